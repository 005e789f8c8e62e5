//! UDP ports outside `bind()` and `connect()`: the implicit bind on the
//! first unconnected send, and the release on close. cgroup hooks on the
//! cgroup v2 root: cheap, and always allow the call (return 1).

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use port_trace_common::kind;

use crate::{emit, sk};

const ALLOW: i32 = 1;
const IPPROTO_UDP: u16 = 17;

/// UDP sockets whose port was reported (by bind, connect or a first send),
/// by cookie: a send on them is not news. Forgotten at release.
///
/// Small on purpose: the insert (`htab_lru_map_update_elem`, which takes a
/// node from the preallocated pool with `bpf_lru_pop_free`) got cheaper as
/// the map shrank, presumably fewer cold cache lines among its nodes and
/// buckets. Measured under the UDP storm (`bpftool`, run_time_ns / run_cnt
/// of `post_bind4`, whose insert this is): 65536 entries ~500 ns, 16384
/// ~400, 4096 ~340, 1024 ~335; the delete in `sock_release` did not
/// change. A mark evicted early costs one repeated first-send event,
/// which userspace ignores for a socket it follows; a socket that keeps
/// sending keeps its mark (the lookup refreshes it).
#[map(name = "UDP_REPORTED")]
static UDP_REPORTED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(UDP_REPORTED_ENTRIES, 0);

/// Entries of [`UDP_REPORTED`].
const UDP_REPORTED_ENTRIES: u32 = 4096;

/// Notes that this UDP socket's port was reported.
#[inline(always)]
pub fn mark_reported(cookie: u64) {
    let _ = UDP_REPORTED.insert(cookie, 1, 0);
}

#[inline(always)]
fn first_send(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let (protocol, sk_ptr) = unsafe {
        let a = &*ctx.sock_addr;
        (a.protocol, a.__bindgen_anon_1.sk)
    };
    if protocol != IPPROTO_UDP as u32 {
        return ALLOW;
    }
    // SAFETY: the context is a socket address context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: lookup only.
    if unsafe { UDP_REPORTED.get(cookie) }.is_some() {
        return ALLOW; // the common case: a socket that sent before
    }
    mark_reported(cookie);
    if !sk::configured() {
        return ALLOW;
    }
    let sock = sk::Sock::load(sk::addr_of(sk_ptr));
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return ALLOW;
    }
    let Some(mut event) = emit::start(kind::UDP_FIRST_SEND, true) else {
        return ALLOW;
    };
    let ev = event.fields();
    ev.cookie = cookie;
    ev.netns = netns;
    sock.fill_tuple(IPPROTO_UDP, ev);
    // An unconnected send has no fixed peer.
    ev.rport = 0;
    emit::store_addr(&mut ev.raddr, [0; 4]);
    event.submit();
    ALLOW
}

/// `udp_sendmsg()` with a destination, after `inet_send_prepare` autobound
/// the socket: the first such send of a socket never bound nor connected is
/// where its port was allocated.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    first_send(&ctx)
}

/// The same for `udpv6_sendmsg()`.
#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    first_send(&ctx)
}

/// `inet_release()`: the last reference to a socket is closed. For UDP this
/// is where the port goes back (`sk_common_release` → `udp_lib_unhash`).
/// TCP ports are followed through the state tracepoints instead, because a
/// closed TCP socket may keep its port in FIN_WAIT or TIME_WAIT.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    if !sk::configured() {
        return ALLOW;
    }
    // SAFETY: the context is the socket; `protocol` is readable in every
    // cgroup sock program (`sock_filter_is_valid_access`).
    if unsafe { (*ctx.sock).protocol } != u32::from(IPPROTO_UDP) {
        return ALLOW; // most releases: TCP (followed through its states)
    }
    let sock = sk::Sock::load(sk::addr_of_arg(ctx.sock.cast()));
    let held = sock.port_held();
    if held == 0 {
        return ALLOW;
    }
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return ALLOW;
    }
    let Some(mut event) = emit::start(kind::UDP_RELEASE, true) else {
        return ALLOW;
    };
    let ev = event.fields();
    // SAFETY: the context is the socket.
    ev.cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ev.netns = netns;
    sock.fill_tuple(IPPROTO_UDP, ev);
    ev.req_port = held;
    let cookie = ev.cookie;
    event.submit();
    let _ = UDP_REPORTED.remove(cookie);
    ALLOW
}
