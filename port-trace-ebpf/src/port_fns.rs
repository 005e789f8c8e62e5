//! What the precise and kprobe backends report from the port allocation and
//! release functions (`kernel-hooks.md` §1–§2). The bodies are shared: the
//! fentry/fexit programs (`precise.rs`) and the kprobe/kretprobe programs
//! (`kprobes.rs`) differ only in how they get the arguments and the cookie.

use aya_ebpf::{
    helpers::generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    macros::map,
    maps::{Array, LruHashMap},
};
use core::ffi::c_void;
use port_trace_common::kind;

use crate::{
    emit,
    in_call::{self, Slot},
    sk::{self, Cookie},
};

pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
const TCP_LISTEN: u8 = 10;

/// The syscall the current task is in (`orig_ax`), from its saved user
/// registers: tells `bind()` from `listen()`, `connect()` and the implicit
/// bind on a first `sendmsg()`. Only meaningful in process context.
#[inline(always)]
fn current_syscall() -> i32 {
    // SAFETY: helpers without preconditions in tracing programs.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return -1;
    }
    sk::read::<i64>(regs, sk::setting!(offsets.pt_regs_syscall)) as i32
}

/// What an entry probe remembers for its return probe, per thread.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Entry {
    /// The socket argument.
    pub sk_ptr: u64,
    /// `snum` for get_port; `skc_num` at entry for hash_connect.
    pub port: u16,
    _pad: u16,
    _pad2: u32,
}

/// Entry state of the get_port and hash_connect calls in flight, one slot
/// per thread (they do not nest; see `in_call`).
#[map(name = "CALL_ENTRY_SLOTS")]
static CALL_ENTRY_SLOTS: Array<Slot<Entry>> = Array::with_max_entries(in_call::SLOTS, 0);

/// The calls whose thread found its slot held by another thread.
#[map(name = "CALL_ENTRY_SPILLED")]
static CALL_ENTRY_SPILLED: LruHashMap<u64, Entry> = LruHashMap::with_max_entries(in_call::SPILLED, 0);

/// Remembers a call's entry state for its exit.
#[inline(always)]
pub fn remember_entry(sk_ptr: *mut c_void, port: u16) {
    let entry = Entry { sk_ptr: sk_ptr as u64, port, _pad: 0, _pad2: 0 };
    in_call::put(&CALL_ENTRY_SLOTS, &CALL_ENTRY_SPILLED, &entry);
}

/// Takes a call's entry state back at its exit.
#[inline(always)]
pub fn take_entry() -> Option<Entry> {
    in_call::take(&CALL_ENTRY_SLOTS, &CALL_ENTRY_SPILLED)
}

/// `skc_num` of a socket at a function's entry.
#[inline(always)]
pub fn port_at_entry(sk_ptr: *mut c_void) -> u16 {
    sk::read(sk::addr_of_arg(sk_ptr), sk::setting!(offsets.skc_num))
}

/// A `get_port` call ended with `ret` (0, -errno, or 1 before 6.0).
#[inline(always)]
pub fn get_port(sk_ptr: *mut c_void, snum: u16, ret: i32, protocol: u16, how: Cookie) -> u32 {
    if !sk::configured() {
        return 0;
    }
    let sock = sk::Sock::load(sk::addr_of_arg(sk_ptr));
    if sock.protocol() != protocol {
        return 0; // MPTCP's own socket also calls inet_csk_get_port
    }
    let state = sock.state();
    // listen() on a bound socket only re-validates its port: listen sets
    // TCP_LISTEN before calling get_port (inet_csk_listen_start).
    if protocol == IPPROTO_TCP && state == TCP_LISTEN && snum != 0 {
        return 0;
    }
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    // Asked before the reservation, so that a full ring does not leave the
    // socket without the cookie its later events are matched by.
    let cookie = sk::cookie_of(how, sk_ptr, &sock);
    let Some(mut event) = emit::start(kind::GET_PORT, true) else {
        return 0;
    };
    let ev = event.fields();
    sk::put_cookie(ev, how, cookie);
    ev.netns = netns;
    sock.fill_tuple(protocol, ev);
    ev.lport = sock.port_held();
    ev.req_port = snum;
    ev.ret = ret;
    ev.old_state = state;
    ev.syscall_nr = current_syscall();
    event.submit();
    0
}

/// An `inet_hash_connect` call ended with `ret`; `port_before` is `skc_num`
/// at its entry (non-zero: bound before, no allocation).
#[inline(always)]
pub fn hash_connect(sk_ptr: *mut c_void, port_before: u16, ret: i32, how: Cookie) -> u32 {
    if !sk::configured() || port_before != 0 {
        return 0;
    }
    let sock = sk::Sock::load(sk::addr_of_arg(sk_ptr));
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    // Before the reservation, as in get_port.
    let cookie = sk::cookie_of(how, sk_ptr, &sock);
    let Some(mut event) = emit::start(kind::CONNECT, true) else {
        return 0;
    };
    let ev = event.fields();
    sk::put_cookie(ev, how, cookie);
    ev.netns = netns;
    sock.fill_tuple(IPPROTO_TCP, ev);
    ev.lport = sock.port_held();
    ev.req_port = 0;
    ev.ret = ret;
    ev.syscall_nr = current_syscall();
    event.submit();
    0
}

/// A socket gives its port back (`kind`): read at function entry, where
/// `skc_num` is still set.
#[inline(always)]
///
/// The cookie is read, not asked for: a socket we follow got one at its
/// birth, and one without is an accepted connection (on its listener's
/// port) or nothing we know (see `options::KEYED_BY_COOKIE`).
pub fn put_port(sk_ptr: *mut c_void, kind: u16, protocol: u16) -> u32 {
    if !sk::configured() {
        return 0;
    }
    let sock = sk::Sock::load(sk::addr_of_arg(sk_ptr));
    let held = sock.port_held();
    if held == 0 || sock.protocol() != protocol {
        return 0;
    }
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    let cookie = sock.stored_cookie();
    if sk::unknown_to_us(cookie) {
        return 0;
    }
    let Some(mut event) = emit::start(kind, false) else {
        return 0;
    };
    let ev = event.fields();
    sk::put_cookie(ev, Cookie::Stored, cookie);
    ev.netns = netns;
    sock.fill_tuple(protocol, ev);
    ev.lport = held;
    ev.req_port = held;
    ev.old_state = sock.state();
    ev.ret = sock.sk_err();
    ev.syscall_nr = current_syscall();
    event.submit();
    0
}

/// `inet_twsk_hashdance_schedule(tw, sk, ...)`: the TIME_WAIT socket `tw`
/// takes over the port of `sk` (and has copied its cookie).
#[inline(always)]
/// The full socket's cookie is read, as in [`put_port`].
pub fn time_wait_start(tw_ptr: *mut c_void, sk_ptr: *mut c_void) -> u32 {
    if !sk::configured() {
        return 0;
    }
    let sock = sk::Sock::load(sk::addr_of_arg(sk_ptr));
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    let cookie = sock.stored_cookie();
    if sk::unknown_to_us(cookie) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::TIME_WAIT_START, false) else {
        return 0;
    };
    let ev = event.fields();
    sk::put_cookie(ev, Cookie::Stored, cookie);
    ev.netns = netns;
    sock.fill_tuple(IPPROTO_TCP, ev);
    ev.old_state = sock.state();
    ev.tw_addr = sk::addr_of_arg(tw_ptr);
    event.submit();
    0
}

/// The TIME_WAIT socket `tw` frees its port. With `check_bucket`, only
/// while it is still in a bind bucket (`inet_twsk_bind_unhash` acts only
/// then).
#[inline(always)]
pub fn time_wait_end(tw_ptr: *mut c_void, check_bucket: bool) -> u32 {
    if !sk::configured() {
        return 0;
    }
    let tw = sk::addr_of_arg(tw_ptr);
    if check_bucket && sk::read::<u64>(tw, sk::setting!(offsets.tw_tb)) == 0 {
        return 0;
    }
    let sock = sk::Sock::load(tw);
    let cookie = sock.stored_cookie();
    if sk::unknown_to_us(cookie) {
        return 0;
    }
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    let Some(mut event) = emit::start(kind::TIME_WAIT_END, false) else {
        return 0;
    };
    let ev = event.fields();
    // The TIME_WAIT socket starts with a sock_common: same offsets; its
    // cookie is the full socket's (inet_twsk_alloc copies it).
    sk::put_cookie(ev, Cookie::Stored, cookie);
    ev.netns = netns;
    ev.sk_addr = tw;
    ev.family = sock.family();
    ev.protocol = IPPROTO_TCP;
    ev.lport = sock.port_held();
    event.submit();
    0
}

/// A datagram `connect()` ended (`__ip4_datagram_connect`,
/// `__ip6_datagram_connect`): the UDP socket's destination is set now (its
/// port was autobound just before, by `get_port`). Reported as a CONNECT
/// whose `req_port` is the port the socket holds.
#[inline(always)]
pub fn datagram_connect(sk_ptr: *mut c_void, ret: i32, how: Cookie) -> u32 {
    if !sk::configured() {
        return 0;
    }
    let sock = sk::Sock::load(sk::addr_of_arg(sk_ptr));
    if sock.protocol() != IPPROTO_UDP {
        return 0; // ping, raw and L2TP sockets connect through here too
    }
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    // Before the reservation, as in get_port.
    let cookie = sk::cookie_of(how, sk_ptr, &sock);
    let Some(mut event) = emit::start(kind::CONNECT, true) else {
        return 0;
    };
    let ev = event.fields();
    sk::put_cookie(ev, how, cookie);
    ev.netns = netns;
    sock.fill_tuple(IPPROTO_UDP, ev);
    ev.lport = sock.port_held();
    ev.req_port = ev.lport;
    ev.ret = ret;
    ev.syscall_nr = current_syscall();
    event.submit();
    0
}
