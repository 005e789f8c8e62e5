//! The binary interface shared by the port-trace eBPF programs and the
//! userspace loader.
//!
//! Everything here crosses the kernel/userspace boundary as raw bytes, so the
//! types are `#[repr(C)]`, hold plain integers only and have no padding holes
//! (checked by the size assertions at the bottom). Userspace decodes them with
//! `TryFrom` into typed events (see `port_trace::decode`).
#![no_std]
#![warn(missing_docs)]

/// Version of this ABI. Bump it whenever [`RawEvent`] or [`KernelConfig`]
/// change shape or meaning; the loader refuses an object with another version.
pub const ABI_VERSION: u32 = 8;

/// How many bytes of a socket's start (its `sock_common`) the programs copy
/// in one read; the loader checks that every `sock_common` field they take
/// from that copy lies inside it.
pub const SOCK_HEAD_BYTES: usize = 128;

/// Raw event kinds, the value of [`RawEvent::kind`].
pub mod kind {
    /// `sock:inet_sock_set_state`: a TCP socket changed state.
    pub const TCP_STATE: u16 = 1;
    /// `tcp:tcp_destroy_sock`: a TCP socket is being destroyed; if it still
    /// holds a port (`lport != 0`), `tcp_v4_destroy_sock` releases it next.
    pub const TCP_DESTROY: u16 = 2;
    /// cgroup `post_bind4/6`: `bind()` gave the socket a port.
    pub const BIND: u16 = 3;
    /// `syscalls:sys_exit_connect` joined with cgroup `connect4/6`: a
    /// `connect()` ended; `ret` is its return value, `req_port` the local port
    /// the socket had before the call (0: the kernel had to pick one).
    pub const CONNECT: u16 = 4;
    /// cgroup `sock_release` or `udp_lib_unhash` (precise): a UDP socket
    /// gives its port back (close, or `connect(AF_UNSPEC)` per `syscall_nr`).
    pub const UDP_RELEASE: u16 = 5;
    /// fexit `inet_csk_get_port` / `udp_v4_get_port` / `udp_v6_get_port`:
    /// the kernel tried to give the socket a port. `req_port` is the port
    /// asked for (0: any), `ret` the result (0, a negative errno, or 1 on
    /// kernels before 6.0), `old_state` the socket state (LISTEN for
    /// `listen()`), `syscall_nr` the caller's syscall.
    pub const GET_PORT: u16 = 6;
    /// fentry `inet_put_port`: a TCP socket gives up its port (`lport`);
    /// `old_state` is its state then, `ret` its `sk_err`.
    pub const PUT_PORT: u16 = 7;
    /// fentry `inet_twsk_hashdance_schedule`: a TIME_WAIT socket takes over
    /// the port of the socket (`cookie`) in state `old_state`.
    pub const TIME_WAIT_START: u16 = 8;
    /// fentry `inet_twsk_bind_unhash` (or the `tcp_twsk_destructor`
    /// backstop): the TIME_WAIT socket with this cookie frees the port.
    pub const TIME_WAIT_END: u16 = 9;
    /// `sys_exit_bind` joined with cgroup `bind4/6`: `bind()` failed with
    /// `ret` (-EADDRINUSE); `lport` is the port asked for.
    pub const BIND_FAILED: u16 = 10;
    /// cgroup `sendmsg4/6`: the first unconnected send of a UDP socket whose
    /// port was not reported before (the kernel autobound it for the send).
    pub const UDP_FIRST_SEND: u16 = 11;
    /// `iter/tcp`, `iter/udp`: a socket found by a walk of a namespace's
    /// sockets, written to the iterator's output (not the ring buffer);
    /// `old_state` is its state, `inode` its socket inode.
    pub const SNAPSHOT: u16 = 12;
}

/// Bits of [`RawEvent::flags`].
pub mod flags {
    /// `pid_tgid`, `comm` and `cgroup_id` describe the task that caused the
    /// event (the hook runs in that task's context).
    pub const PROCESS_CONTEXT: u16 = 1 << 0;
    /// `cookie` is the socket's stored cookie, which may be 0: the program
    /// could not ask the kernel to assign one (kprobes, raw tracepoints).
    pub const STORED_COOKIE: u16 = 1 << 1;
}

/// Maximum length of a task command name, including the NUL.
pub const COMM_LEN: usize = 16;

/// One event as the eBPF programs write it into the ring buffer.
///
/// Addresses are in network byte order as the kernel stores them (IPv4 in the
/// first four bytes, the rest zero); ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// `bpf_ktime_get_boot_ns()` when the hook ran (CLOCK_BOOTTIME).
    pub ts_ns: u64,
    /// Socket cookie (`bpf_get_socket_cookie`): joins every event of one
    /// socket and of its TIME_WAIT successor.
    pub cookie: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the upper half, thread id in the
    /// lower. Meaningful only with [`flags::PROCESS_CONTEXT`] or for the TCP
    /// transitions that run in process context.
    pub pid_tgid: u64,
    /// cgroup v2 id of the current task.
    pub cgroup_id: u64,
    /// Network namespace inode (`sk->__sk_common.skc_net.net->ns.inum`).
    pub netns: u32,
    /// One of [`kind`].
    pub kind: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    /// `IPPROTO_TCP` (6) or `IPPROTO_UDP` (17).
    pub protocol: u16,
    /// Local port (`skc_num`, or `inet_sport` where `skc_num` was already
    /// cleared by `__inet_put_port`).
    pub lport: u16,
    /// Remote port (`skc_dport`, converted to host order), 0 when none.
    pub rport: u16,
    /// Kind-specific port: for [`kind::BIND`] the port the caller asked for,
    /// for [`kind::CONNECT`] the local port before the call, for
    /// [`kind::TCP_STATE`] the current `skc_num` (0 once the port was put back).
    pub req_port: u16,
    /// TCP state before the change ([`kind::TCP_STATE`]).
    pub old_state: u8,
    /// TCP state after the change ([`kind::TCP_STATE`]).
    pub new_state: u8,
    /// Bits of [`flags`].
    pub flags: u16,
    /// Kind-specific value: the syscall return for [`kind::CONNECT`],
    /// `sk_err` for [`kind::TCP_STATE`].
    pub ret: i32,
    /// Local address (`skc_rcv_saddr` or `skc_v6_rcv_saddr`).
    pub laddr: [u8; 16],
    /// Remote address (`skc_daddr` or `skc_v6_daddr`).
    pub raddr: [u8; 16],
    /// `bpf_get_current_comm()`, NUL padded.
    pub comm: [u8; COMM_LEN],
    /// The current task's syscall number (`orig_ax` on x86_64), -1 when
    /// unknown (cgroup hooks, softirq).
    pub syscall_nr: i32,
    /// [`kind::SNAPSHOT`]: the socket's inode (as in `/proc/PID/fd`), 0 for
    /// TIME_WAIT sockets, which have none.
    pub inode: u32,
    /// Kernel address of the socket (`struct sock` or, for
    /// [`kind::TIME_WAIT_END`], the TIME_WAIT socket). The kprobe backend,
    /// which cannot ask for cookies, joins events by it.
    pub sk_addr: u64,
    /// [`kind::TIME_WAIT_START`]: the address of the TIME_WAIT socket taking
    /// over; 0 otherwise.
    pub tw_addr: u64,
}

/// Offsets, in bytes, of the kernel struct fields the programs read. They are
/// read from the running kernel's BTF at start-up, because Rust eBPF gets no
/// CO-RE relocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `sock_common.skc_daddr`
    pub skc_daddr: u32,
    /// `sock_common.skc_rcv_saddr`
    pub skc_rcv_saddr: u32,
    /// `sock_common.skc_dport`
    pub skc_dport: u32,
    /// `sock_common.skc_num`
    pub skc_num: u32,
    /// `sock_common.skc_family`
    pub skc_family: u32,
    /// `sock_common.skc_net` (a `possible_net_t` holding `struct net *`)
    pub skc_net: u32,
    /// `sock_common.skc_v6_daddr`
    pub skc_v6_daddr: u32,
    /// `sock_common.skc_v6_rcv_saddr`
    pub skc_v6_rcv_saddr: u32,
    /// `sock.sk_protocol` (a `u16` on every kernel we support)
    pub sk_protocol: u32,
    /// `sock.sk_err`
    pub sk_err: u32,
    /// `inet_sock.inet_sport`
    pub inet_sport: u32,
    /// `net.ns.inum`
    pub net_ns_inum: u32,
    /// `sock_common.skc_cookie` (an `atomic64_t`), read by the raw tracepoint
    /// fallback, where `bpf_get_socket_cookie` is not offered.
    pub skc_cookie: u32,
    /// `sock_common.skc_state` (one byte).
    pub skc_state: u32,
    /// `inet_timewait_sock.tw_tb`: NULL once the TIME_WAIT socket left its
    /// bind bucket.
    pub tw_tb: u32,
    /// The syscall number in `struct pt_regs` (`orig_ax` on x86_64,
    /// `syscallno` on arm64).
    pub pt_regs_syscall: u32,
    /// `sock.sk_socket`
    pub sk_socket: u32,
    /// `socket.file`
    pub socket_file: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
}

/// Read-only configuration the loader writes into the programs' `CONFIG`
/// global before loading them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// Must equal [`ABI_VERSION`]; a zero means the loader did not set it and
    /// the programs emit nothing.
    pub abi_version: u32,
    /// Only report sockets of this network namespace inode (0: all).
    pub netns_filter: u32,
    /// Field offsets for the running kernel.
    pub offsets: KernelOffsets,
    /// Wake the reader only once this many bytes wait in the ring buffer
    /// (0: on every event, the kernel's default); the reader also polls on
    /// a short timer, so fewer wake-ups cost latency, not events.
    pub wakeup_bytes: u32,
    /// [`options`] bits.
    pub options: u32,
    /// Slots of the per-thread tables of calls in flight (connect, bind, and
    /// the entry state of the precise and kprobe backends' function
    /// probes), minus one: a thread uses slot `tid & in_call_slots_mask`.
    /// The loader sizes the tables to match ([`IN_CALL_SLOTS`] by default).
    pub in_call_slots_mask: u32,
}

/// Slots of each per-thread table of calls in flight, by default: thread
/// ids below this never share one (`kernel.pid_max` is 32768 by default on
/// hosts of up to 32 CPUs). A power of two.
pub const IN_CALL_SLOTS: u32 = 32768;

/// Names of the per-thread tables of calls in flight.
pub const IN_CALL_SLOT_MAPS: [&str; 3] = ["CONNECT_SLOTS", "BIND_SLOTS", "CALL_ENTRY_SLOTS"];

/// Bits of [`KernelConfig::options`].
pub mod options {
    /// Report every TCP state change, not only those a port's lifecycle
    /// turns on.
    pub const ALL_TCP_STATES: u32 = 1;
    /// Userspace joins events by socket cookie (not by address, as the
    /// kprobe backend does): a TCP socket that no hook nor walk of ours ever
    /// asked the cookie of (`sk_cookie` still 0) is none we follow, so its
    /// state changes, its destruction and its TIME_WAIT stay in the kernel.
    /// Those are accepted connections: `inet_csk_clone_lock` gives a child
    /// the request socket's cookie, which nothing asked for.
    pub const KEYED_BY_COOKIE: u32 = 2;
}

/// Name of the ring buffer map.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU array counting failed ring-buffer reservations.
pub const LOST_MAP: &str = "LOST";
/// Name of the configuration global.
pub const CONFIG_GLOBAL: &str = "CONFIG";

const _: () = assert!(core::mem::size_of::<RawEvent>() == 128);
const _: () = assert!(core::mem::align_of::<RawEvent>() == 8);
// The programs store addresses as aligned words.
const _: () = assert!(core::mem::offset_of!(RawEvent, laddr) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(RawEvent, raddr) % 8 == 0);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 80);
const _: () = assert!(core::mem::size_of::<KernelConfig>() == 100);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain integers, `#[repr(C)]`, no padding (see the assertions).
    unsafe impl aya::Pod for super::RawEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelConfig {}
}
