//! The vocabulary of port lifecycles: protocols, families, TCP states,
//! origins, release reasons and errno names, with the names users see.

use std::fmt;

/// A command name (`comm`): at most 15 bytes from the kernel, kept inline
/// (up to 24 bytes), so that cloning it into every record allocates nothing.
pub type Comm = compact_str::CompactString;

/// Transport protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP (`IPPROTO_TCP`).
    #[default]
    Tcp,
    /// UDP (`IPPROTO_UDP`).
    Udp,
}

impl Proto {
    /// Name used in output and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// `AF_INET`.
    Ipv4,
    /// `AF_INET6` (v4-mapped addresses included).
    Ipv6,
}

impl Family {
    /// Name used in output.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// TCP states as `include/net/tcp_states.h` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
}

impl TcpState {
    /// The state for a kernel number, if it is one.
    pub fn from_kernel(value: u8) -> Option<Self> {
        use TcpState::*;
        Some(match value {
            1 => Established,
            2 => SynSent,
            3 => SynRecv,
            4 => FinWait1,
            5 => FinWait2,
            6 => TimeWait,
            7 => Close,
            8 => CloseWait,
            9 => LastAck,
            10 => Listen,
            11 => Closing,
            12 => NewSynRecv,
            13 => BoundInactive,
            _ => return None,
        })
    }

    /// The kernel's name without the `TCP_` prefix, as `ss` and bcc print it.
    pub fn name(self) -> &'static str {
        use TcpState::*;
        match self {
            Established => "ESTABLISHED",
            SynSent => "SYN_SENT",
            SynRecv => "SYN_RECV",
            FinWait1 => "FIN_WAIT1",
            FinWait2 => "FIN_WAIT2",
            TimeWait => "TIME_WAIT",
            Close => "CLOSE",
            CloseWait => "CLOSE_WAIT",
            LastAck => "LAST_ACK",
            Listen => "LISTEN",
            Closing => "CLOSING",
            NewSynRecv => "NEW_SYN_RECV",
            BoundInactive => "BOUND_INACTIVE",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a socket came to hold its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// `connect()` (TCP `inet_hash_connect`, UDP autobind on connect).
    Connect,
    /// `bind()`, with a port or with 0.
    Bind,
    /// `listen()` on a socket that had no port.
    Listen,
    /// UDP autobind on the first send of an unbound socket.
    Autobind,
    /// The socket held the port when tracing began.
    Snapshot,
}

impl Origin {
    /// Name used in output.
    pub fn name(self) -> &'static str {
        match self {
            Origin::Connect => "connect",
            Origin::Bind => "bind",
            Origin::Listen => "listen",
            Origin::Autobind => "autobind",
            Origin::Snapshot => "snapshot",
        }
    }
}

/// Why a port went back to the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReleaseReason {
    /// The socket was closed (or reset) and gave the port back.
    Close,
    /// The TIME_WAIT socket that held the port ended.
    TimeWaitEnd,
    /// `connect(AF_UNSPEC)` dissolved the association (UDP).
    Disconnect,
    /// The connect that allocated the port failed (refused, timed out, ...).
    ConnectFailed,
    /// The release itself was not seen (lost events): a walk of the
    /// namespace's sockets no longer found the socket.
    Reconciled,
}

impl ReleaseReason {
    /// Name used in output.
    pub fn name(self) -> &'static str {
        match self {
            ReleaseReason::Close => "close",
            ReleaseReason::TimeWaitEnd => "time_wait_end",
            ReleaseReason::Disconnect => "disconnect",
            ReleaseReason::ConnectFailed => "connect_failed",
            ReleaseReason::Reconciled => "reconciled",
        }
    }
}

/// The symbolic name of an errno value (positive), for the few a port
/// allocation can fail with, else `E<number>`.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EAGAIN => "EAGAIN",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EISCONN => "EISCONN",
        libc::EALREADY => "EALREADY",
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EINTR => "EINTR",
        libc::ECONNRESET => "ECONNRESET",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        _ => return format!("E{errno}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_state_numbers_round_trip_names() {
        assert_eq!(TcpState::from_kernel(6), Some(TcpState::TimeWait));
        assert_eq!(TcpState::from_kernel(10).unwrap().name(), "LISTEN");
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(14), None);
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(99), "EADDRNOTAVAIL");
        assert_eq!(errno_name(98), "EADDRINUSE");
        assert_eq!(errno_name(11), "EAGAIN");
        assert_eq!(errno_name(4095), "E4095");
    }
}
