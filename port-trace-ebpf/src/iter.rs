//! Socket walks: BPF iterators over a network namespace's TCP and UDP
//! sockets (`iter/tcp` includes TIME_WAIT sockets). The loader runs them at
//! start-up (the snapshot of sockets that existed before tracing), on an
//! interval (to see TIME_WAIT sockets end on the portable backend) and after
//! lost events (to repair its state). Each socket becomes a SNAPSHOT record
//! written to the iterator's own output (`bpf_seq_write`), which the loader
//! reads whole: a walk never competes with events for ring-buffer space.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::seq_file,
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_seq_write},
};
use port_trace_common::{kind, RawEvent};

use crate::{emit, sk};

const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// `struct bpf_iter__tcp` / `bpf_iter__udp`: `meta` then the socket, both
/// pointers; the socket is NULL on the final call. `bpf_iter_meta` starts
/// with the `seq_file` to write to.
///
/// With `tracked_only`, sockets whose cookie nobody asked for are skipped:
/// none we follow (see `options::KEYED_BY_COOKIE`); the TIME_WAIT sockets of
/// accepted connections are most of a busy server's sockets.
#[inline(always)]
fn walk(ctx: *mut c_void, protocol: u16, tracked_only: bool) -> i32 {
    // SAFETY: the iterator context starts with these two pointers, and the
    // meta with the seq_file pointer; direct loads keep their BTF types.
    let (seq, sk_ptr) = unsafe {
        let fields = ctx as *const *mut c_void;
        let meta = *fields;
        (*(meta as *const *mut seq_file), *fields.add(1))
    };
    if sk_ptr.is_null() {
        return 0;
    }
    if !sk::configured() {
        return 0;
    }
    let sock = sk::Sock::load(sk::addr_of_arg(sk_ptr));
    let stored_cookie = sock.stored_cookie();
    if tracked_only && stored_cookie == 0 {
        return 0;
    }
    let state = sock.state();
    if state == TCP_NEW_SYN_RECV {
        return 0; // a request socket: no port of its own
    }
    let netns = sock.netns();
    if sk::filtered_out(netns) {
        return 0;
    }
    let mut slot = core::mem::MaybeUninit::<RawEvent>::uninit();
    // SAFETY: our own aligned stack slot, zeroed before it is used.
    let ev = unsafe {
        emit::zero(slot.as_mut_ptr());
        slot.assume_init_mut()
    };
    ev.kind = kind::SNAPSHOT;
    // SAFETY: helper without preconditions.
    ev.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    ev.cookie = if tracked_only {
        stored_cookie
    } else {
        // SAFETY: a typed socket pointer, checked for NULL above.
        unsafe { bpf_get_socket_cookie(sk_ptr) }
    };
    ev.netns = netns;
    ev.old_state = state;
    ev.syscall_nr = -1;
    // TIME_WAIT sockets are only a sock_common: nothing past it is theirs,
    // so the protocol is the iterator's.
    sock.fill_tuple(protocol, ev);
    ev.lport = sock.port_held();
    if state != TCP_TIME_WAIT {
        ev.inode = sock.inode();
    }
    // SAFETY: the iterator's seq_file, and a record on our stack.
    unsafe { bpf_seq_write(seq, (ev as *const RawEvent).cast(), core::mem::size_of::<RawEvent>() as u32) };
    0
}

/// Every TCP socket of the namespace that created the iterator.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn iter_tcp(ctx: *mut c_void) -> i32 {
    walk(ctx, IPPROTO_TCP, false)
}

/// The TCP sockets of the namespace that we follow: the periodic walks
/// (TIME_WAIT ends, repair after loss) when events are joined by cookie.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn iter_tcp_tracked(ctx: *mut c_void) -> i32 {
    walk(ctx, IPPROTO_TCP, true)
}

/// Every UDP socket of the namespace that created the iterator.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub fn iter_udp(ctx: *mut c_void) -> i32 {
    walk(ctx, IPPROTO_UDP, false)
}
