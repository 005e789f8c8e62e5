//! cgroup v2 socket hooks for `bind()` and UDP close. Attached to the cgroup
//! v2 root, they run for every process: they must be cheap and always allow
//! the operation (return 1).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use port_trace_common::kind;

use crate::{emit, sk};

const ALLOW: i32 = 1;
const IPPROTO_UDP: u16 = 17;

/// The port each thread asked `bind()` for, from the `bind4/6` hook that runs
/// before the kernel picks one, until `post_bind4/6` reads it.
#[map(name = "BIND_REQUEST")]
static BIND_REQUEST: LruHashMap<u64, u16> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn remember_bind_request(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let user_port = unsafe { (*ctx.sock_addr).user_port } as u16;
    let _ = BIND_REQUEST.insert(bpf_get_current_pid_tgid(), u16::from_be(user_port), 0);
    ALLOW
}

/// `__inet_bind()` before `get_port`: remember the requested port.
#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    remember_bind_request(&ctx)
}

/// `__inet6_bind()` before `get_port`: remember the requested port.
#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    remember_bind_request(&ctx)
}

#[inline(always)]
fn report_bind(ctx: &SockContext) -> i32 {
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return ALLOW;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: map value read by copy.
    let requested = unsafe { BIND_REQUEST.get(pid_tgid) }.copied().unwrap_or(0);
    let _ = BIND_REQUEST.remove(pid_tgid);
    let sk = sk::addr_of(ctx.sock);
    let netns = sk::netns_of(&cfg, sk);
    if sk::filtered_out(&cfg, netns) {
        return ALLOW;
    }
    let Some(mut event) = emit::start(kind::BIND, true) else {
        return ALLOW;
    };
    let ev = event.fields();
    // SAFETY: the context is the socket.
    ev.cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ev.netns = netns;
    sk::fill_tuple(&cfg, sk, ev);
    ev.req_port = requested;
    event.submit();
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

/// `inet_release()`: the last reference to a socket is closed. For UDP this
/// is where the port goes back (`sk_common_release` → `udp_lib_unhash`).
/// TCP ports are followed through the state tracepoints instead, because a
/// closed TCP socket may keep its port in FIN_WAIT or TIME_WAIT.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return ALLOW;
    }
    let sk = sk::addr_of(ctx.sock);
    if sk::protocol(&cfg, sk) != IPPROTO_UDP {
        return ALLOW;
    }
    let held = sk::local_port_held(&cfg, sk);
    if held == 0 {
        return ALLOW;
    }
    let netns = sk::netns_of(&cfg, sk);
    if sk::filtered_out(&cfg, netns) {
        return ALLOW;
    }
    let Some(mut event) = emit::start(kind::UDP_RELEASE, true) else {
        return ALLOW;
    };
    let ev = event.fields();
    // SAFETY: the context is the socket.
    ev.cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ev.netns = netns;
    sk::fill_tuple(&cfg, sk, ev);
    ev.req_port = held;
    event.submit();
    ALLOW
}
