//! TCP hooks that need no function tracing: `sock:inet_sock_set_state` and
//! `tcp:tcp_destroy_sock`, both as BTF tracepoints (typed `struct sock *`).

use aya_ebpf::{helpers::generated::bpf_get_socket_cookie, macros::btf_tracepoint, programs::BtfTracePointContext};
use port_trace_common::kind;

use crate::{emit, sk};

const IPPROTO_TCP: u16 = 6;
const TCP_CLOSE: u8 = 7;

/// `inet_sk_state_store()` / `inet_sk_set_state()` fire this *after*
/// `tcp_set_state()` ran `inet_put_port()` for a move to CLOSE, so `skc_num`
/// tells whether this socket still holds its port (an explicit `bind(port)`,
/// `SOCK_BINDPORT_LOCK`, keeps it until `tcp_v4_destroy_sock`).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk_ptr: *mut core::ffi::c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return 0;
    }
    let sk = sk::addr_of(sk_ptr);
    if sk::protocol(&cfg, sk) != IPPROTO_TCP {
        return 0; // MPTCP subflows and others share this tracepoint.
    }
    let netns = sk::netns_of(&cfg, sk);
    if sk::filtered_out(&cfg, netns) {
        return 0;
    }
    // Leaving CLOSE (connect, listen) runs in the caller's process context;
    // every other transition may run in softirq, where `current` is a stranger.
    let process = old as u8 == TCP_CLOSE;
    let Some(mut event) = emit::start(kind::TCP_STATE, process) else {
        return 0;
    };
    let ev = event.fields();
    // SAFETY: sk_ptr is the tracepoint's typed socket argument.
    ev.cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    ev.netns = netns;
    ev.old_state = old as u8;
    ev.new_state = new as u8;
    sk::fill_tuple(&cfg, sk, ev);
    ev.req_port = sk::local_port_held(&cfg, sk);
    ev.ret = sk::sk_err(&cfg, sk);
    event.submit();
    0
}

/// `tcp_v4_destroy_sock()` (IPv6 too) fires this before its own
/// `inet_put_port()`: a socket that still holds a port here gives it back now.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    let sk_ptr: *mut core::ffi::c_void = ctx.arg(0);
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return 0;
    }
    let sk = sk::addr_of(sk_ptr);
    let held = sk::local_port_held(&cfg, sk);
    if held == 0 {
        return 0; // the port was put back at the move to CLOSE already
    }
    let netns = sk::netns_of(&cfg, sk);
    if sk::filtered_out(&cfg, netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::TCP_DESTROY, false) else {
        return 0;
    };
    let ev = event.fields();
    // SAFETY: sk_ptr is the tracepoint's typed socket argument.
    ev.cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    ev.netns = netns;
    sk::fill_tuple(&cfg, sk, ev);
    ev.req_port = held;
    event.submit();
    0
}
