//! Decoding the raw ring-buffer records of the eBPF programs into typed
//! kernel events. Pure: no kernel access, unit tested on byte strings.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use port_trace_common::{flags, kind, RawEvent, COMM_LEN};

use crate::model::{Comm, Family, Proto, TcpState};

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a [`RawEvent`].
    #[error("record of {0} bytes, expected {expected}", expected = std::mem::size_of::<RawEvent>())]
    Short(usize),
    /// A `kind` this build does not know.
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    /// Neither `AF_INET` nor `AF_INET6`.
    #[error("unknown address family {0}")]
    UnknownFamily(u16),
    /// Neither TCP nor UDP.
    #[error("unknown protocol {0}")]
    UnknownProtocol(u16),
    /// A TCP state number out of range.
    #[error("unknown TCP state {0}")]
    UnknownState(u8),
}

/// The task a hook ran in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Thread-group id (what users call the pid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Command name.
    pub comm: Comm,
    /// cgroup v2 id (0 when unknown).
    pub cgroup: u64,
}

/// Addresses and ports of a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// Protocol.
    pub proto: Proto,
    /// Family.
    pub family: Family,
    /// Local address.
    pub laddr: IpAddr,
    /// Local port (host order).
    pub lport: u16,
    /// Remote address, `None` when unconnected.
    pub raddr: Option<IpAddr>,
    /// Remote port, `None` when unconnected.
    pub rport: Option<u16>,
}

/// What a hook saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Happening {
    /// A TCP state change (`inet_sock_set_state`).
    TcpState {
        /// State before.
        old: TcpState,
        /// State after.
        new: TcpState,
        /// `skc_num` after the change: 0 once this socket gave its port back.
        port_held: u16,
        /// `sk_err` (non-zero on resets and timeouts).
        sk_err: i32,
    },
    /// A TCP socket that still holds a port is destroyed; the port goes back.
    TcpDestroy,
    /// `bind()` succeeded.
    Bind {
        /// The port the caller asked for (0: the kernel chose).
        requested_port: u16,
    },
    /// `connect()` returned.
    Connect {
        /// The syscall's return value (0 or a negative errno).
        ret: i32,
        /// The local port the socket had before the call (0: none).
        port_before: u16,
    },
    /// A UDP socket gave its port back (close, or disconnect when the
    /// event's syscall is `connect`).
    UdpRelease,
    /// A `get_port` function ran (precise backend): `bind()`, `listen()` on an
    /// unbound socket, UDP autobind.
    GetPort {
        /// The port asked for (0: any).
        requested_port: u16,
        /// 0, a negative errno, or 1 (kernels before 6.0) on failure.
        ret: i32,
        /// The socket's TCP state then (LISTEN for `listen()`).
        state: Option<TcpState>,
    },
    /// `inet_put_port`: a TCP socket gives up its port (precise backend).
    PutPort {
        /// The socket's state then.
        state: Option<TcpState>,
        /// `sk_err`.
        sk_err: i32,
    },
    /// A TIME_WAIT socket takes over the port (precise backend).
    TimeWaitStart {
        /// The full socket's state at the hand-off.
        state: Option<TcpState>,
    },
    /// The TIME_WAIT socket frees the port (precise backend).
    TimeWaitEnd,
    /// `bind()` failed with `ret` (-EADDRINUSE) for the port asked for.
    BindFailed {
        /// The syscall's return value.
        ret: i32,
    },
    /// The first unconnected send of a UDP socket not reported before: the
    /// kernel autobound it for the send.
    UdpFirstSend,
    /// A socket found by a walk of a namespace's sockets.
    Snapshot {
        /// Its state (TCP; for UDP, ESTABLISHED when connected).
        state: Option<TcpState>,
        /// Its inode, 0 for TIME_WAIT sockets.
        inode: u32,
    },
}

/// One decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    /// CLOCK_BOOTTIME nanoseconds.
    pub ts_ns: u64,
    /// Socket cookie.
    pub cookie: u64,
    /// Network namespace inode.
    pub netns: u32,
    /// Addresses and ports.
    pub endpoints: Endpoints,
    /// The current task, when the hook ran in process context.
    pub task: Option<Task>,
    /// What happened.
    pub happening: Happening,
    /// The syscall the task was in, when the hook knows it.
    pub syscall: Option<i32>,
    /// Kernel address of the socket (the TIME_WAIT socket for
    /// [`Happening::TimeWaitEnd`]).
    pub sk_addr: u64,
    /// For [`Happening::TimeWaitStart`], the TIME_WAIT socket's address.
    pub tw_addr: u64,
}

fn comm_of(raw: &[u8; COMM_LEN]) -> Comm {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    match std::str::from_utf8(&raw[..end]) {
        Ok(comm) => Comm::new(comm),
        Err(_) => Comm::new(String::from_utf8_lossy(&raw[..end])),
    }
}

fn addr_of(family: Family, raw: &[u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(*raw)),
    }
}

impl TryFrom<&RawEvent> for KernelEvent {
    type Error = DecodeError;

    fn try_from(raw: &RawEvent) -> Result<Self, Self::Error> {
        let family = match raw.family {
            2 => Family::Ipv4,
            10 => Family::Ipv6,
            other => return Err(DecodeError::UnknownFamily(other)),
        };
        let proto = match raw.protocol {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            other => return Err(DecodeError::UnknownProtocol(other)),
        };
        let state = |v: u8| TcpState::from_kernel(v).ok_or(DecodeError::UnknownState(v));
        let happening = match raw.kind {
            kind::TCP_STATE => Happening::TcpState {
                old: state(raw.old_state)?,
                new: state(raw.new_state)?,
                port_held: raw.req_port,
                sk_err: raw.ret,
            },
            kind::TCP_DESTROY => Happening::TcpDestroy,
            kind::BIND => Happening::Bind { requested_port: raw.req_port },
            kind::CONNECT => Happening::Connect { ret: raw.ret, port_before: raw.req_port },
            kind::UDP_RELEASE => Happening::UdpRelease,
            kind::GET_PORT => Happening::GetPort {
                requested_port: raw.req_port,
                ret: raw.ret,
                state: TcpState::from_kernel(raw.old_state),
            },
            kind::PUT_PORT => Happening::PutPort { state: TcpState::from_kernel(raw.old_state), sk_err: raw.ret },
            kind::TIME_WAIT_START => Happening::TimeWaitStart { state: TcpState::from_kernel(raw.old_state) },
            kind::TIME_WAIT_END => Happening::TimeWaitEnd,
            kind::BIND_FAILED => Happening::BindFailed { ret: raw.ret },
            kind::UDP_FIRST_SEND => Happening::UdpFirstSend,
            kind::SNAPSHOT => Happening::Snapshot { state: TcpState::from_kernel(raw.old_state), inode: raw.inode },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        // Old → CLOSE transitions out of CLOSE run in the caller's context too.
        let process = raw.flags & flags::PROCESS_CONTEXT != 0;
        let task = process.then(|| Task {
            pid: (raw.pid_tgid >> 32) as u32,
            tid: raw.pid_tgid as u32,
            comm: comm_of(&raw.comm),
            cgroup: raw.cgroup_id,
        });
        let connected = raw.rport != 0;
        Ok(KernelEvent {
            ts_ns: raw.ts_ns,
            cookie: raw.cookie,
            netns: raw.netns,
            endpoints: Endpoints {
                proto,
                family,
                laddr: addr_of(family, &raw.laddr),
                lport: raw.lport,
                raddr: connected.then(|| addr_of(family, &raw.raddr)),
                rport: connected.then_some(raw.rport),
            },
            task,
            happening,
            syscall: (raw.syscall_nr >= 0).then_some(raw.syscall_nr),
            sk_addr: raw.sk_addr,
            tw_addr: raw.tw_addr,
        })
    }
}

impl TryFrom<&[u8]> for KernelEvent {
    type Error = DecodeError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        if bytes.len() < std::mem::size_of::<RawEvent>() {
            return Err(DecodeError::Short(bytes.len()));
        }
        // SAFETY: RawEvent is plain integers with no invalid bit patterns;
        // read_unaligned copes with any alignment of the ring-buffer slot.
        let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        KernelEvent::try_from(&raw)
    }
}

/// The kernel's time stamp of a ring-buffer record (`RawEvent::ts_ns`,
/// CLOCK_BOOTTIME) without decoding the rest; `None` for a short record.
pub fn timestamp(bytes: &[u8]) -> Option<u64> {
    let at = std::mem::offset_of!(RawEvent, ts_ns);
    let field = bytes.get(at..at + 8)?;
    Some(u64::from_ne_bytes(field.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_reads_ts_ns_alone() {
        let raw = RawEvent { ts_ns: 0x0102_0304_0506_0708, ..raw_bind() };
        assert_eq!(timestamp(&bytes_of(&raw)), Some(0x0102_0304_0506_0708));
        assert_eq!(timestamp(&bytes_of(&raw)[..4]), None);
    }

    fn bytes_of(raw: &RawEvent) -> Vec<u8> {
        // SAFETY: RawEvent has no padding.
        unsafe { std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), std::mem::size_of::<RawEvent>()) }
            .to_vec()
    }

    fn raw_bind() -> RawEvent {
        let mut raw = RawEvent {
            ts_ns: 5,
            cookie: 77,
            pid_tgid: (1234u64 << 32) | 1240,
            cgroup_id: 9,
            netns: 4026531840,
            kind: kind::BIND,
            family: 2,
            protocol: 17,
            lport: 40000,
            req_port: 0,
            flags: flags::PROCESS_CONTEXT,
            ..RawEvent::default()
        };
        raw.laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        raw.comm[..4].copy_from_slice(b"curl");
        raw
    }

    #[test]
    fn decodes_a_bind() {
        let ev = KernelEvent::try_from(bytes_of(&raw_bind()).as_slice()).unwrap();
        assert_eq!(ev.cookie, 77);
        assert_eq!(ev.endpoints.proto, Proto::Udp);
        assert_eq!(ev.endpoints.laddr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(ev.endpoints.lport, 40000);
        assert_eq!(ev.endpoints.raddr, None);
        let task = ev.task.unwrap();
        assert_eq!((task.pid, task.tid, task.comm.as_str(), task.cgroup), (1234, 1240, "curl", 9));
        assert_eq!(ev.happening, Happening::Bind { requested_port: 0 });
    }

    #[test]
    fn decodes_ipv6_tcp_state_with_remote() {
        let mut raw = raw_bind();
        raw.kind = kind::TCP_STATE;
        raw.family = 10;
        raw.protocol = 6;
        raw.flags = 0;
        raw.old_state = 4;
        raw.new_state = 7;
        raw.rport = 443;
        raw.laddr = Ipv6Addr::LOCALHOST.octets();
        raw.raddr = Ipv6Addr::LOCALHOST.octets();
        let ev = KernelEvent::try_from(&raw).unwrap();
        assert_eq!(ev.task, None);
        assert_eq!(ev.endpoints.raddr, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(ev.endpoints.rport, Some(443));
        assert!(matches!(ev.happening, Happening::TcpState { old: TcpState::FinWait1, new: TcpState::Close, .. }));
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(KernelEvent::try_from(&[0u8; 10][..]), Err(DecodeError::Short(10)));
        let mut raw = raw_bind();
        raw.kind = 99;
        assert_eq!(KernelEvent::try_from(&raw), Err(DecodeError::UnknownKind(99)));
        let mut raw = raw_bind();
        raw.family = 1;
        assert_eq!(KernelEvent::try_from(&raw), Err(DecodeError::UnknownFamily(1)));
        let mut raw = raw_bind();
        raw.protocol = 1;
        assert_eq!(KernelEvent::try_from(&raw), Err(DecodeError::UnknownProtocol(1)));
        let mut raw = raw_bind();
        raw.kind = kind::TCP_STATE;
        raw.protocol = 6;
        raw.old_state = 0;
        raw.new_state = 1;
        assert_eq!(KernelEvent::try_from(&raw), Err(DecodeError::UnknownState(0)));
    }
}
