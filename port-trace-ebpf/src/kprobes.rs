//! The kprobe backend: the same functions as the precise backend, through
//! kprobe/kretprobe, for kernels without BTF trampolines. A return probe
//! cannot see the arguments, so the entry probe keeps them per thread. kprobe
//! programs cannot ask for socket cookies: events carry the stored cookie
//! and the socket's address, by which the tracker joins them.

use aya_ebpf::{
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use core::ffi::c_void;
use port_trace_common::kind;

use crate::port_fns::{self, IPPROTO_TCP, IPPROTO_UDP};
use crate::sk::Cookie;

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> *mut c_void {
    ctx.arg::<*mut c_void>(n).unwrap_or(core::ptr::null_mut())
}

#[inline(always)]
fn remember_get_port(ctx: &ProbeContext) -> u32 {
    let snum = ctx.arg::<u64>(1).unwrap_or(0) as u16;
    port_fns::remember_entry(arg(ctx, 0), snum);
    0
}

#[inline(always)]
fn report_get_port(ctx: &RetProbeContext, protocol: u16) -> u32 {
    match port_fns::take_entry() {
        Some(e) => {
            port_fns::get_port(e.sk_ptr as *mut c_void, e.port, ctx.ret::<u64>() as i32, protocol, Cookie::Stored)
        }
        None => 0,
    }
}

#[inline(always)]
fn remember_hash_connect(ctx: &ProbeContext) -> u32 {
    let sk = arg(ctx, 1);
    port_fns::remember_entry(sk, port_fns::port_at_entry(sk));
    0
}

#[inline(always)]
fn report_hash_connect(ctx: &RetProbeContext) -> u32 {
    match port_fns::take_entry() {
        Some(e) => port_fns::hash_connect(e.sk_ptr as *mut c_void, e.port, ctx.ret::<u64>() as i32, Cookie::Stored),
        None => 0,
    }
}

/// `inet_csk_get_port` entry.
#[kprobe]
pub fn kprobe_inet_csk_get_port(ctx: ProbeContext) -> u32 {
    remember_get_port(&ctx)
}

/// `inet_csk_get_port` return.
#[kretprobe]
pub fn kretprobe_inet_csk_get_port(ctx: RetProbeContext) -> u32 {
    report_get_port(&ctx, IPPROTO_TCP)
}

/// `udp_v4_get_port` entry.
#[kprobe]
pub fn kprobe_udp_v4_get_port(ctx: ProbeContext) -> u32 {
    remember_get_port(&ctx)
}

/// `udp_v4_get_port` return.
#[kretprobe]
pub fn kretprobe_udp_v4_get_port(ctx: RetProbeContext) -> u32 {
    report_get_port(&ctx, IPPROTO_UDP)
}

/// `udp_v6_get_port` entry.
#[kprobe]
pub fn kprobe_udp_v6_get_port(ctx: ProbeContext) -> u32 {
    remember_get_port(&ctx)
}

/// `udp_v6_get_port` return.
#[kretprobe]
pub fn kretprobe_udp_v6_get_port(ctx: RetProbeContext) -> u32 {
    report_get_port(&ctx, IPPROTO_UDP)
}

/// `inet_hash_connect` entry.
#[kprobe]
pub fn kprobe_inet_hash_connect(ctx: ProbeContext) -> u32 {
    remember_hash_connect(&ctx)
}

/// `inet_hash_connect` return.
#[kretprobe]
pub fn kretprobe_inet_hash_connect(ctx: RetProbeContext) -> u32 {
    report_hash_connect(&ctx)
}

/// `inet6_hash_connect` entry.
#[kprobe]
pub fn kprobe_inet6_hash_connect(ctx: ProbeContext) -> u32 {
    remember_hash_connect(&ctx)
}

/// `inet6_hash_connect` return.
#[kretprobe]
pub fn kretprobe_inet6_hash_connect(ctx: RetProbeContext) -> u32 {
    report_hash_connect(&ctx)
}

/// `inet_put_port(sk)`.
#[kprobe]
pub fn kprobe_inet_put_port(ctx: ProbeContext) -> u32 {
    port_fns::put_port(arg(&ctx, 0), kind::PUT_PORT, IPPROTO_TCP)
}

/// `udp_lib_unhash(sk)`.
#[kprobe]
pub fn kprobe_udp_lib_unhash(ctx: ProbeContext) -> u32 {
    port_fns::put_port(arg(&ctx, 0), kind::UDP_RELEASE, IPPROTO_UDP)
}

/// `inet_twsk_hashdance_schedule(tw, sk, ...)` / `inet_twsk_hashdance`.
#[kprobe]
pub fn kprobe_inet_twsk_hashdance(ctx: ProbeContext) -> u32 {
    port_fns::time_wait_start(arg(&ctx, 0), arg(&ctx, 1))
}

/// `inet_twsk_bind_unhash(tw, hashinfo)`.
#[kprobe]
pub fn kprobe_inet_twsk_bind_unhash(ctx: ProbeContext) -> u32 {
    port_fns::time_wait_end(arg(&ctx, 0), true)
}

/// `tcp_twsk_destructor(sk)` (backstop).
#[kprobe]
pub fn kprobe_tcp_twsk_destructor(ctx: ProbeContext) -> u32 {
    port_fns::time_wait_end(arg(&ctx, 0), false)
}

#[inline(always)]
fn remember_socket(ctx: &ProbeContext) -> u32 {
    port_fns::remember_entry(arg(ctx, 0), 0);
    0
}

#[inline(always)]
fn report_datagram_connect(ctx: &RetProbeContext) -> u32 {
    match port_fns::take_entry() {
        Some(e) => port_fns::datagram_connect(e.sk_ptr as *mut c_void, ctx.ret::<u64>() as i32, Cookie::Stored),
        None => 0,
    }
}

/// `__ip4_datagram_connect` entry.
#[kprobe]
pub fn kprobe_ip4_datagram_connect(ctx: ProbeContext) -> u32 {
    remember_socket(&ctx)
}

/// `__ip4_datagram_connect` return.
#[kretprobe]
pub fn kretprobe_ip4_datagram_connect(ctx: RetProbeContext) -> u32 {
    report_datagram_connect(&ctx)
}

/// `__ip6_datagram_connect` entry.
#[kprobe]
pub fn kprobe_ip6_datagram_connect(ctx: ProbeContext) -> u32 {
    remember_socket(&ctx)
}

/// `__ip6_datagram_connect` return.
#[kretprobe]
pub fn kretprobe_ip6_datagram_connect(ctx: RetProbeContext) -> u32 {
    report_datagram_connect(&ctx)
}
