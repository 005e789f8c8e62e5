//! The precise backend: fentry/fexit on the kernel functions that hand out
//! and take back local ports. Bodies in `port_fns.rs`.

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use port_trace_common::kind;

use crate::port_fns::{self, IPPROTO_TCP, IPPROTO_UDP};
use crate::sk::Cookie;

/// `inet_csk_get_port(sk, snum)`: TCP `bind()`, `listen()` on an unbound
/// socket (and MPTCP). fexit sees the arguments and the return value.
#[fexit(function = "inet_csk_get_port")]
pub fn fexit_inet_csk_get_port(ctx: FExitContext) -> u32 {
    port_fns::get_port(ctx.arg(0), ctx.arg::<u64>(1) as u16, ctx.arg::<u64>(2) as i32, IPPROTO_TCP, Cookie::Helper)
}

/// `udp_v4_get_port(sk, snum)`: UDP `bind()` and autobind.
#[fexit(function = "udp_v4_get_port")]
pub fn fexit_udp_v4_get_port(ctx: FExitContext) -> u32 {
    port_fns::get_port(ctx.arg(0), ctx.arg::<u64>(1) as u16, ctx.arg::<u64>(2) as i32, IPPROTO_UDP, Cookie::Helper)
}

/// `udp_v6_get_port(sk, snum)`.
#[fexit(function = "udp_v6_get_port")]
pub fn fexit_udp_v6_get_port(ctx: FExitContext) -> u32 {
    port_fns::get_port(ctx.arg(0), ctx.arg::<u64>(1) as u16, ctx.arg::<u64>(2) as i32, IPPROTO_UDP, Cookie::Helper)
}

/// `inet_hash_connect(death_row, sk)` entry: was the socket bound?
#[fentry(function = "inet_hash_connect")]
pub fn fentry_inet_hash_connect(ctx: FEntryContext) -> u32 {
    let sk = ctx.arg(1);
    port_fns::remember_entry(sk, port_fns::port_at_entry(sk));
    0
}

/// `inet_hash_connect` exit: the port TCP `connect()` picked, or
/// -EADDRNOTAVAIL when the range is exhausted for this destination.
#[fexit(function = "inet_hash_connect")]
pub fn fexit_inet_hash_connect(ctx: FExitContext) -> u32 {
    match port_fns::take_entry() {
        Some(entry) => port_fns::hash_connect(ctx.arg(1), entry.port, ctx.arg::<u64>(2) as i32, Cookie::Helper),
        None => 0,
    }
}

/// `inet6_hash_connect(death_row, sk)` entry.
#[fentry(function = "inet6_hash_connect")]
pub fn fentry_inet6_hash_connect(ctx: FEntryContext) -> u32 {
    let sk = ctx.arg(1);
    port_fns::remember_entry(sk, port_fns::port_at_entry(sk));
    0
}

/// `inet6_hash_connect` exit.
#[fexit(function = "inet6_hash_connect")]
pub fn fexit_inet6_hash_connect(ctx: FExitContext) -> u32 {
    match port_fns::take_entry() {
        Some(entry) => port_fns::hash_connect(ctx.arg(1), entry.port, ctx.arg::<u64>(2) as i32, Cookie::Helper),
        None => 0,
    }
}

/// `inet_put_port(sk)`: every TCP owner removal — a real release, an
/// accepted child leaving its listener's port, or the hand-off to TIME_WAIT
/// (the TIME_WAIT socket took its own owner slot first).
#[fentry(function = "inet_put_port")]
pub fn fentry_inet_put_port(ctx: FEntryContext) -> u32 {
    port_fns::put_port(ctx.arg(0), kind::PUT_PORT, IPPROTO_TCP)
}

/// `udp_lib_unhash(sk)`: UDP close (`sk_common_release`) or disconnect
/// (`__udp_disconnect`, from `connect(AF_UNSPEC)`).
#[fentry(function = "udp_lib_unhash")]
pub fn fentry_udp_lib_unhash(ctx: FEntryContext) -> u32 {
    port_fns::put_port(ctx.arg(0), kind::UDP_RELEASE, IPPROTO_UDP)
}

/// `inet_twsk_hashdance_schedule(tw, sk, hashinfo, timeo)` (called
/// `inet_twsk_hashdance(tw, sk, hashinfo)` before 6.7; the loader attaches
/// to whichever the kernel has).
#[fentry(function = "inet_twsk_hashdance_schedule")]
pub fn fentry_inet_twsk_hashdance(ctx: FEntryContext) -> u32 {
    port_fns::time_wait_start(ctx.arg(0), ctx.arg(1))
}

/// `inet_twsk_bind_unhash(tw, hashinfo)`: the TIME_WAIT socket leaves its
/// bind bucket — the port is free again (timer, RST/SYN, `tcp_tw_reuse`,
/// namespace exit).
#[fentry(function = "inet_twsk_bind_unhash")]
pub fn fentry_inet_twsk_bind_unhash(ctx: FEntryContext) -> u32 {
    port_fns::time_wait_end(ctx.arg(0), true)
}

/// `tcp_twsk_destructor(sk)`: once per TIME_WAIT socket, when it is freed;
/// the backstop where `inet_twsk_bind_unhash` is inlined.
#[fentry(function = "tcp_twsk_destructor")]
pub fn fentry_tcp_twsk_destructor(ctx: FEntryContext) -> u32 {
    port_fns::time_wait_end(ctx.arg(0), false)
}

/// `__ip4_datagram_connect(sk, uaddr, addr_len)`: a UDP `connect()` set its
/// destination.
#[fexit(function = "__ip4_datagram_connect")]
pub fn fexit_ip4_datagram_connect(ctx: FExitContext) -> u32 {
    port_fns::datagram_connect(ctx.arg(0), ctx.arg::<u64>(3) as i32, Cookie::Helper)
}

/// `__ip6_datagram_connect(sk, uaddr, addr_len)`.
#[fexit(function = "__ip6_datagram_connect")]
pub fn fexit_ip6_datagram_connect(ctx: FExitContext) -> u32 {
    port_fns::datagram_connect(ctx.arg(0), ctx.arg::<u64>(3) as i32, Cookie::Helper)
}
