//! `connect()`: the cgroup `connect4/6` hooks run before the kernel picks a
//! local port (`inet_hash_connect` for TCP, `inet_autobind` for UDP), so they
//! stash the socket per thread; the `sys_exit_connect` tracepoint then reads
//! the port the call ended with, and the call's return code.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, map, tracepoint},
    maps::{Array, LruHashMap},
    programs::{SockAddrContext, TracePointContext},
    EbpfContext,
};
use port_trace_common::kind;

use crate::{
    emit,
    in_call::{self, Slot},
    sk, udp,
};

const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;
const TCP_SYN_SENT: u8 = 2;
const EINPROGRESS: i32 = 115;

const ALLOW: i32 = 1;

/// What `connect4/6` learnt about a socket before the kernel gave it a port.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct PendingConnect {
    /// Kernel address of the `struct sock`.
    sk: u64,
    /// Socket cookie.
    cookie: u64,
    /// `skc_num` before the call (0: the kernel must choose a port).
    port_before: u16,
    /// Destination port asked for, host order.
    rport: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    protocol: u16,
    _pad: u16,
    /// Destination address asked for (IPv4 in the first word), network order.
    raddr: [u32; 4],
}

/// Each thread's `connect()` in flight (see `in_call`).
#[map(name = "CONNECT_SLOTS")]
static CONNECT_SLOTS: Array<Slot<PendingConnect>> = Array::with_max_entries(in_call::SLOTS, 0);

/// The calls whose thread found its slot held by another thread.
#[map(name = "CONNECT_SPILLED")]
static CONNECT_SPILLED: LruHashMap<u64, PendingConnect> = LruHashMap::with_max_entries(in_call::SPILLED, 0);

#[inline(always)]
fn stash(ctx: &SockAddrContext, v6: bool) -> i32 {
    if !sk::configured() {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let (sk_ptr, user_port, ip4, ip6, protocol) = unsafe {
        let a = &*ctx.sock_addr;
        (a.__bindgen_anon_1.sk, a.user_port, a.user_ip4, a.user_ip6, a.protocol)
    };
    let protocol = protocol as u16;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return ALLOW; // raw and ping sockets connect too
    }
    let raddr = if v6 { ip6 } else { [ip4, 0, 0, 0] };
    let pending = PendingConnect {
        // Kept for `sys_exit_connect`, which reads through it.
        sk: sk::addr_of_arg(sk_ptr.cast()),
        // SAFETY: the context is a socket address context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        // `bpf_sock.src_port` is `skc_num` (`bpf_sock_convert_ctx_access`):
        // a direct load, where reading the socket costs a helper call.
        // SAFETY: `sk` of a socket address context is never null.
        port_before: unsafe { (*sk_ptr).src_port } as u16,
        rport: u16::from_be(user_port as u16),
        protocol,
        _pad: 0,
        raddr,
    };
    in_call::put(&CONNECT_SLOTS, &CONNECT_SPILLED, &pending);
    ALLOW
}

/// `inet_stream_connect()` / `inet_dgram_connect()` for IPv4 destinations.
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    stash(&ctx, false)
}

/// The same for IPv6 destinations (v4-mapped included).
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    stash(&ctx, true)
}

/// The `connect()` syscall returns: report the port the socket now holds.
#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> i32 {
    let Some(pending) = in_call::take(&CONNECT_SLOTS, &CONNECT_SPILLED) else {
        return 0;
    };
    let PendingConnect { sk, cookie, port_before, rport, protocol, raddr, .. } = pending;
    if !sk::configured() {
        return 0;
    }
    let sock = sk::Sock::load(sk);
    let ret = in_call::sys_exit_ret(&ctx);
    if protocol == IPPROTO_TCP && (ret == 0 || ret == -EINPROGRESS) && sock.state() != TCP_SYN_SENT {
        // The handshake ended inside the call (loopback runs it in softirq
        // on the way out of `inet_stream_connect`): its state change, which
        // `inet_sk_state_store` traces before storing the new state, has
        // already reported the port and the destination. Only a connect
        // still in SYN_SENT (its port shows here first) or a failed one
        // (its errno: EADDRNOTAVAIL when `inet_hash_connect` found no
        // port) needs this event.
        return 0;
    }
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::CONNECT, true) else {
        return 0;
    };
    let ev = event.fields();
    ev.cookie = cookie;
    ev.netns = netns;
    ev.ret = ret;
    sock.fill_tuple(protocol, ev);
    // A failed connect clears the destination (`tcp_v4_connect` error path):
    // keep what the caller asked for.
    if ev.rport == 0 {
        ev.rport = rport;
        emit::store_addr(&mut ev.raddr, raddr);
    }
    ev.req_port = port_before;
    // The port held now: 0 when the call failed and put it back.
    ev.lport = sock.port_held();
    let cookie = ev.cookie;
    event.submit();
    if protocol == IPPROTO_UDP {
        udp::mark_reported(cookie);
    }
    0
}
