//! `bind()`: cgroup `bind4/6` run before the kernel picks a port and
//! remember what was asked; `post_bind4/6` run after it succeeded; the
//! `sys_exit_bind` tracepoint reports the binds that failed for want of a
//! port. The cgroup hooks are attached to the cgroup v2 root and run for
//! every process: they must be cheap and always allow the call (return 1).

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock, cgroup_sock_addr, map, tracepoint},
    maps::{Array, LruHashMap},
    programs::{SockAddrContext, SockContext, TracePointContext},
    EbpfContext,
};
use port_trace_common::kind;

use crate::{
    emit,
    in_call::{self, Slot},
    sk, udp,
};

const ALLOW: i32 = 1;
const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;

/// What a thread's `bind()` asked for, from `bind4/6` (before the kernel
/// picks a port) until `post_bind4/6` or `sys_exit_bind` reads it.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BindRequest {
    /// Kernel address of the socket.
    sk: u64,
    /// Socket cookie.
    cookie: u64,
    /// The port asked for, host order (0: any).
    port: u16,
    _pad: u16,
    _pad2: u32,
    /// The address asked for (IPv4 in the first word), network order.
    addr: [u32; 4],
}

/// Each thread's `bind()` in flight (see `in_call`).
#[map(name = "BIND_SLOTS")]
static BIND_SLOTS: Array<Slot<BindRequest>> = Array::with_max_entries(in_call::SLOTS, 0);

/// The calls whose thread found its slot held by another thread.
#[map(name = "BIND_SPILLED")]
static BIND_SPILLED: LruHashMap<u64, BindRequest> = LruHashMap::with_max_entries(in_call::SPILLED, 0);

#[inline(always)]
fn remember_bind_request(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let (user_port, protocol, sk_ptr) = unsafe {
        let a = &*ctx.sock_addr;
        (a.user_port, a.protocol, a.__bindgen_anon_1.sk)
    };
    if protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32 {
        return ALLOW;
    }
    let request = BindRequest {
        // Kept for `sys_exit_bind`, which reads through it.
        sk: sk::addr_of_arg(sk_ptr.cast()),
        // SAFETY: the context is a socket address context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        port: u16::from_be(user_port as u16),
        _pad: 0,
        _pad2: 0,
        // The verifier lets bind4 read only user_ip4, and bind6 only user_ip6.
        // SAFETY: as above.
        addr: if v6 { unsafe { (*ctx.sock_addr).user_ip6 } } else { [unsafe { (*ctx.sock_addr).user_ip4 }, 0, 0, 0] },
    };
    in_call::put(&BIND_SLOTS, &BIND_SPILLED, &request);
    ALLOW
}

/// `__inet_bind()` before `get_port`: remember the requested port.
#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    remember_bind_request(&ctx, false)
}

/// `__inet6_bind()` before `get_port`: remember the requested port.
#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    remember_bind_request(&ctx, true)
}

#[inline(always)]
fn report_bind(ctx: &SockContext) -> i32 {
    if !sk::configured() {
        return ALLOW;
    }
    let requested = in_call::take(&BIND_SLOTS, &BIND_SPILLED).map_or(0, |r| r.port);
    // SAFETY: the context is the socket; `protocol` is readable in every
    // cgroup sock program (`sock_filter_is_valid_access`).
    let protocol = unsafe { (*ctx.sock).protocol } as u16;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return ALLOW; // raw and ping sockets bind too
    }
    let sock = sk::Sock::load(sk::addr_of_arg(ctx.sock.cast()));
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return ALLOW;
    }
    let Some(mut event) = emit::start(kind::BIND, true) else {
        return ALLOW;
    };
    let ev = event.fields();
    // SAFETY: the context is the socket.
    ev.cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ev.netns = netns;
    sock.fill_tuple(protocol, ev);
    ev.req_port = requested;
    let cookie = ev.cookie;
    event.submit();
    if protocol == IPPROTO_UDP {
        udp::mark_reported(cookie);
    }
    ALLOW
}

/// `__inet_bind()` after `get_port` succeeded: the socket holds `skc_num`.
#[cgroup_sock(post_bind4)]
pub fn post_bind4(ctx: SockContext) -> i32 {
    report_bind(&ctx)
}

/// `__inet6_bind()` after `get_port` succeeded.
#[cgroup_sock(post_bind6)]
pub fn post_bind6(ctx: SockContext) -> i32 {
    report_bind(&ctx)
}

const EADDRINUSE: i32 = 98;

/// `bind()` returns: a bind that failed because the port is taken (or, for
/// port 0, because the range is exhausted) is an allocation failure.
#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn sys_exit_bind(ctx: TracePointContext) -> i32 {
    let Some(request) = in_call::take(&BIND_SLOTS, &BIND_SPILLED) else {
        return 0; // not a TCP/UDP bind, or post_bind consumed it (success)
    };
    let ret = in_call::sys_exit_ret(&ctx);
    if ret != -EADDRINUSE {
        return 0;
    }
    if !sk::configured() {
        return 0;
    }
    let sock = sk::Sock::load(request.sk);
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::BIND_FAILED, true) else {
        return 0;
    };
    let ev = event.fields();
    ev.cookie = request.cookie;
    ev.netns = netns;
    sock.fill_tuple(sock.protocol(), ev);
    ev.lport = request.port;
    emit::store_addr(&mut ev.laddr, request.addr);
    ev.req_port = request.port;
    ev.ret = ret;
    event.submit();
    0
}
