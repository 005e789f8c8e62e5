//! TCP hooks that need no function tracing: `sock:inet_sock_set_state` and
//! `tcp:tcp_destroy_sock`, each as a BTF tracepoint (typed `struct sock *`,
//! preferred) and as a raw tracepoint (the fallback).

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use port_trace_common::{kind, options};

use crate::{emit, sk};

const IPPROTO_TCP: u16 = 6;
const TCP_SYN_SENT: u8 = 2;
const TCP_CLOSE: u8 = 7;

/// Whether a transition matters to a port's lifecycle: leaving CLOSE
/// (connect, listen: the owner is known here), leaving SYN_SENT (the port
/// shows, or the connect failed) and reaching CLOSE (the port goes back, or
/// to a TIME_WAIT socket: `tcp_time_wait`). The rest (FIN_WAIT1, CLOSE_WAIT,
/// accepted children's handshakes, ...) is reported only when asked.
#[inline(always)]
fn matters_to_the_port(old: u8, new: u8) -> bool {
    old == TCP_CLOSE || new == TCP_CLOSE || old == TCP_SYN_SENT
}

/// `inet_sk_state_store()` / `inet_sk_set_state()` fire this *after*
/// `tcp_set_state()` ran `inet_put_port()` for a move to CLOSE, so `skc_num`
/// tells whether this socket still holds its port (an explicit `bind(port)`,
/// `SOCK_BINDPORT_LOCK`, keeps it until `tcp_v4_destroy_sock`).
#[inline(always)]
fn on_state_change(sk_ptr: *mut core::ffi::c_void, old: i32, new: i32, how: sk::Cookie) -> i32 {
    if !sk::configured() {
        return 0;
    }
    if sk::setting!(options) & options::ALL_TCP_STATES == 0 && !matters_to_the_port(old as u8, new as u8) {
        return 0;
    }
    let sock = sk::Sock::load(sk::addr_of_arg(sk_ptr));
    // Leaving CLOSE (connect, listen) is where a socket we follow is born:
    // ask its cookie (assigning one), before the reservation, so that a full
    // ring does not leave it without the cookie its later events are matched
    // by. Any later transition of a socket we follow finds it set: one
    // without is an accepted connection (see options::KEYED_BY_COOKIE).
    let born = old as u8 == TCP_CLOSE;
    let how = if born { how } else { sk::Cookie::Stored };
    let cookie = sk::cookie_of(how, sk_ptr, &sock);
    if sk::unknown_to_us(cookie) {
        return 0;
    }
    if sock.protocol() != IPPROTO_TCP {
        return 0; // MPTCP subflows and others share this tracepoint.
    }
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    // Leaving CLOSE runs in the caller's process context; every other
    // transition may run in softirq, where `current` is a stranger.
    let Some(mut event) = emit::start(kind::TCP_STATE, born) else {
        return 0;
    };
    let ev = event.fields();
    sk::put_cookie(ev, how, cookie);
    ev.netns = netns;
    ev.old_state = old as u8;
    ev.new_state = new as u8;
    sock.fill_tuple(IPPROTO_TCP, ev);
    ev.req_port = sock.port_held();
    ev.ret = sock.sk_err();
    event.submit();
    0
}

/// `sock:inet_sock_set_state` as a BTF tracepoint (preferred).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    on_state_change(ctx.arg(0), ctx.arg(1), ctx.arg(2), sk::Cookie::Helper)
}

/// The same as a raw tracepoint, for kernels that refuse BTF tracing programs.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_raw(ctx: RawTracePointContext) -> i32 {
    on_state_change(ctx.arg(0), ctx.arg(1), ctx.arg(2), sk::Cookie::Stored)
}

/// `tcp_v4_destroy_sock()` (IPv6 too) fires this before its own
/// `inet_put_port()`: a socket that still holds a port here gives it back now.
/// A socket we follow always has a cookie by now (it was asked at its
/// birth), so the stored one is read rather than asking for one.
#[inline(always)]
fn on_destroy(sk_ptr: *mut core::ffi::c_void) -> i32 {
    if !sk::configured() {
        return 0;
    }
    let sock = sk::Sock::load(sk::addr_of_arg(sk_ptr));
    let held = sock.port_held();
    if held == 0 {
        return 0; // the port was put back at the move to CLOSE already
    }
    let cookie = sock.stored_cookie();
    if sk::unknown_to_us(cookie) {
        return 0; // an accepted connection (see options::KEYED_BY_COOKIE)
    }
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::TCP_DESTROY, false) else {
        return 0;
    };
    let ev = event.fields();
    sk::put_cookie(ev, sk::Cookie::Stored, cookie);
    ev.netns = netns;
    sock.fill_tuple(sock.protocol(), ev);
    ev.req_port = held;
    event.submit();
    0
}

/// `tcp:tcp_destroy_sock` as a BTF tracepoint (preferred).
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    on_destroy(ctx.arg(0))
}

/// The same as a raw tracepoint.
#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn tcp_destroy_sock_raw(ctx: RawTracePointContext) -> i32 {
    on_destroy(ctx.arg(0))
}
