//! The precise backend: fentry/fexit on the kernel functions that hand out
//! and take back local ports (see `kernel-hooks.md` §1–§2). Each program
//! reports what the function did; the userspace tracker joins them.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_task_btf, bpf_get_socket_cookie, bpf_task_pt_regs},
    },
    macros::{fentry, fexit, map},
    maps::LruHashMap,
    programs::{FEntryContext, FExitContext},
};
use core::ffi::c_void;
use port_trace_common::{kind, KernelConfig};

use crate::{emit, sk};

const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;
const TCP_LISTEN: u8 = 10;

/// The syscall the current task is in (`orig_ax`), from its saved user
/// registers: tells `bind()` from `listen()`, `connect()` and the implicit
/// bind on a first `sendmsg()`. Only meaningful in process context.
#[inline(always)]
pub fn current_syscall(cfg: &KernelConfig) -> i32 {
    // SAFETY: helpers without preconditions in tracing programs.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return -1;
    }
    sk::read::<i64>(regs, cfg.offsets.pt_regs_syscall) as i32
}

/// Reports a `get_port` call. `ret` is the function's result.
#[inline(always)]
fn report_get_port(sk_ptr: *mut c_void, snum: u16, ret: i32, protocol: u16) -> u32 {
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return 0;
    }
    let sk = sk::addr_of(sk_ptr);
    if sk::protocol(&cfg, sk) != protocol {
        return 0; // MPTCP's own socket also calls inet_csk_get_port
    }
    let state = sk::state(&cfg, sk);
    // listen() on a bound socket only re-validates its port: listen sets
    // TCP_LISTEN before calling get_port (inet_csk_listen_start).
    if protocol == IPPROTO_TCP && state == TCP_LISTEN && snum != 0 {
        return 0;
    }
    let netns = sk::netns_of(&cfg, sk);
    if sk::filtered_out(&cfg, netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::GET_PORT, true) else {
        return 0;
    };
    let ev = event.fields();
    // SAFETY: sk_ptr is the traced function's typed socket argument.
    ev.cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    ev.netns = netns;
    sk::fill_tuple(&cfg, sk, ev);
    ev.lport = sk::local_port_held(&cfg, sk);
    ev.req_port = snum;
    ev.ret = ret;
    ev.old_state = state;
    ev.syscall_nr = current_syscall(&cfg);
    event.submit();
    0
}

/// `inet_csk_get_port(sk, snum)`: TCP `bind()`, `listen()` on an unbound
/// socket (and MPTCP). Returns 0 or an errno (1 before 6.0).
#[fexit(function = "inet_csk_get_port")]
pub fn fexit_inet_csk_get_port(ctx: FExitContext) -> u32 {
    report_get_port(ctx.arg(0), ctx.arg::<u64>(1) as u16, ctx.arg::<u64>(2) as i32, IPPROTO_TCP)
}

/// `udp_v4_get_port(sk, snum)`: UDP `bind()` and autobind.
#[fexit(function = "udp_v4_get_port")]
pub fn fexit_udp_v4_get_port(ctx: FExitContext) -> u32 {
    report_get_port(ctx.arg(0), ctx.arg::<u64>(1) as u16, ctx.arg::<u64>(2) as i32, IPPROTO_UDP)
}

/// `udp_v6_get_port(sk, snum)`.
#[fexit(function = "udp_v6_get_port")]
pub fn fexit_udp_v6_get_port(ctx: FExitContext) -> u32 {
    report_get_port(ctx.arg(0), ctx.arg::<u64>(1) as u16, ctx.arg::<u64>(2) as i32, IPPROTO_UDP)
}

/// `skc_num` of the socket each thread passes to `inet_hash_connect`, at
/// entry: 0 means the call must pick a port.
#[map(name = "PORT_BEFORE_CONNECT")]
static PORT_BEFORE_CONNECT: LruHashMap<u64, u16> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn remember_port_before(sk_ptr: *mut c_void) -> u32 {
    let cfg = sk::config();
    let port = sk::local_port_held(&cfg, sk::addr_of(sk_ptr));
    let _ = PORT_BEFORE_CONNECT.insert(bpf_get_current_pid_tgid(), port, 0);
    0
}

#[inline(always)]
fn report_hash_connect(sk_ptr: *mut c_void, ret: i32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: map value read by copy.
    let port_before = unsafe { PORT_BEFORE_CONNECT.get(pid_tgid) }.copied();
    let _ = PORT_BEFORE_CONNECT.remove(pid_tgid);
    let cfg = sk::config();
    if cfg.abi_version == 0 || port_before != Some(0) {
        return 0; // bound before: __inet_hash_connect keeps its port
    }
    let sk = sk::addr_of(sk_ptr);
    let netns = sk::netns_of(&cfg, sk);
    if sk::filtered_out(&cfg, netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::CONNECT, true) else {
        return 0;
    };
    let ev = event.fields();
    // SAFETY: sk_ptr is the traced function's typed socket argument.
    ev.cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    ev.netns = netns;
    sk::fill_tuple(&cfg, sk, ev);
    ev.lport = sk::local_port_held(&cfg, sk);
    ev.req_port = 0;
    ev.ret = ret;
    ev.syscall_nr = current_syscall(&cfg);
    event.submit();
    0
}

/// `inet_hash_connect(death_row, sk)` entry: was the socket bound?
#[fentry(function = "inet_hash_connect")]
pub fn fentry_inet_hash_connect(ctx: FEntryContext) -> u32 {
    remember_port_before(ctx.arg(1))
}

/// `inet_hash_connect` exit: the port TCP `connect()` picked, or
/// -EADDRNOTAVAIL when the range is exhausted for this destination.
#[fexit(function = "inet_hash_connect")]
pub fn fexit_inet_hash_connect(ctx: FExitContext) -> u32 {
    report_hash_connect(ctx.arg(1), ctx.arg::<u64>(2) as i32)
}

/// `inet6_hash_connect(death_row, sk)` entry.
#[fentry(function = "inet6_hash_connect")]
pub fn fentry_inet6_hash_connect(ctx: FEntryContext) -> u32 {
    remember_port_before(ctx.arg(1))
}

/// `inet6_hash_connect` exit.
#[fexit(function = "inet6_hash_connect")]
pub fn fexit_inet6_hash_connect(ctx: FExitContext) -> u32 {
    report_hash_connect(ctx.arg(1), ctx.arg::<u64>(2) as i32)
}

/// Reports a socket giving its port back (`kind`), read at function entry
/// where `skc_num` is still set.
#[inline(always)]
fn report_put(sk_ptr: *mut c_void, kind: u16, protocol: u16) -> u32 {
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return 0;
    }
    let sk = sk::addr_of(sk_ptr);
    let held = sk::local_port_held(&cfg, sk);
    if held == 0 || sk::protocol(&cfg, sk) != protocol {
        return 0;
    }
    let netns = sk::netns_of(&cfg, sk);
    if sk::filtered_out(&cfg, netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind, false) else {
        return 0;
    };
    let ev = event.fields();
    // SAFETY: sk_ptr is the traced function's typed socket argument.
    ev.cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    ev.netns = netns;
    sk::fill_tuple(&cfg, sk, ev);
    ev.lport = held;
    ev.req_port = held;
    ev.old_state = sk::state(&cfg, sk);
    ev.ret = sk::sk_err(&cfg, sk);
    ev.syscall_nr = current_syscall(&cfg);
    event.submit();
    0
}

/// `inet_put_port(sk)`: every TCP owner removal — a real release, an
/// accepted child leaving its listener's port, or the hand-off to
/// TIME_WAIT (the TIME_WAIT socket took its own owner slot first).
#[fentry(function = "inet_put_port")]
pub fn fentry_inet_put_port(ctx: FEntryContext) -> u32 {
    report_put(ctx.arg(0), kind::PUT_PORT, IPPROTO_TCP)
}

/// `udp_lib_unhash(sk)`: UDP close (`sk_common_release`) or disconnect
/// (`__udp_disconnect`, from `connect(AF_UNSPEC)`).
#[fentry(function = "udp_lib_unhash")]
pub fn fentry_udp_lib_unhash(ctx: FEntryContext) -> u32 {
    report_put(ctx.arg(0), kind::UDP_RELEASE, IPPROTO_UDP)
}

/// `inet_twsk_hashdance_schedule(tw, sk, hashinfo, timeo)` (called
/// `inet_twsk_hashdance(tw, sk, hashinfo)` before 6.7; the loader attaches
/// this program to whichever the kernel has): the TIME_WAIT socket takes
/// over the port of `sk`, and inherits its cookie.
#[fentry(function = "inet_twsk_hashdance_schedule")]
pub fn fentry_inet_twsk_hashdance(ctx: FEntryContext) -> u32 {
    let sk_ptr: *mut c_void = ctx.arg(1);
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return 0;
    }
    let sk = sk::addr_of(sk_ptr);
    let netns = sk::netns_of(&cfg, sk);
    if sk::filtered_out(&cfg, netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::TIME_WAIT_START, false) else {
        return 0;
    };
    let ev = event.fields();
    // SAFETY: sk_ptr is the traced function's typed socket argument.
    ev.cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    ev.netns = netns;
    sk::fill_tuple(&cfg, sk, ev);
    ev.old_state = sk::state(&cfg, sk);
    event.submit();
    0
}

/// Reports the end of a TIME_WAIT socket's hold on its port.
#[inline(always)]
fn report_time_wait_end(tw: u64, check_bucket: bool) -> u32 {
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return 0;
    }
    // inet_twsk_bind_unhash acts only while the socket is in a bind bucket.
    if check_bucket && sk::read::<u64>(tw, cfg.offsets.tw_tb) == 0 {
        return 0;
    }
    let netns = sk::netns_of(&cfg, tw);
    if sk::filtered_out(&cfg, netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::TIME_WAIT_END, false) else {
        return 0;
    };
    let ev = event.fields();
    // The TIME_WAIT socket starts with a sock_common: same offsets.
    ev.cookie = sk::stored_cookie(&cfg, tw);
    ev.netns = netns;
    ev.family = sk::read(tw, cfg.offsets.skc_family);
    ev.protocol = IPPROTO_TCP;
    let num: u16 = sk::local_port_held(&cfg, tw);
    ev.lport = num;
    event.submit();
    0
}

/// `inet_twsk_bind_unhash(tw, hashinfo)`: the TIME_WAIT socket leaves its
/// bind bucket — the client port is free again (timer, RST/SYN, reuse by
/// `tcp_tw_reuse`, or namespace exit).
#[fentry(function = "inet_twsk_bind_unhash")]
pub fn fentry_inet_twsk_bind_unhash(ctx: FEntryContext) -> u32 {
    let tw: *mut c_void = ctx.arg(0);
    report_time_wait_end(sk::addr_of(tw), true)
}

/// `tcp_twsk_destructor(sk)`: called once per TIME_WAIT socket when it is
/// freed; the backstop where `inet_twsk_bind_unhash` is inlined.
#[fentry(function = "tcp_twsk_destructor")]
pub fn fentry_tcp_twsk_destructor(ctx: FEntryContext) -> u32 {
    let tw: *mut c_void = ctx.arg(0);
    report_time_wait_end(sk::addr_of(tw), false)
}
