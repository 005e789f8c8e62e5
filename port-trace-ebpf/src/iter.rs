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

use crate::sk;

const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// `struct bpf_iter__tcp` / `bpf_iter__udp`: `meta` then the socket, both
/// pointers; the socket is NULL on the final call. `bpf_iter_meta` starts
/// with the `seq_file` to write to.
#[inline(always)]
fn walk(ctx: *mut c_void, protocol: u16) -> i32 {
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
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return 0;
    }
    let sk = sk::addr_of(sk_ptr);
    let state = sk::state(&cfg, sk);
    if state == TCP_NEW_SYN_RECV {
        return 0; // a request socket: no port of its own
    }
    let netns = sk::netns_of(&cfg, sk);
    if sk::filtered_out(&cfg, netns) {
        return 0;
    }
    let mut ev = RawEvent {
        kind: kind::SNAPSHOT,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        // SAFETY: a typed socket pointer, checked for NULL above.
        cookie: unsafe { bpf_get_socket_cookie(sk_ptr) },
        netns,
        old_state: state,
        syscall_nr: -1,
        ..RawEvent::default()
    };
    sk::fill_tuple(&cfg, sk, &mut ev);
    // TIME_WAIT sockets are only a sock_common: nothing past it is theirs.
    ev.protocol = protocol;
    ev.lport = sk::local_port_held(&cfg, sk);
    if state != TCP_TIME_WAIT {
        ev.inode = sk::inode_of(&cfg, sk);
    }
    // SAFETY: the iterator's seq_file, and a record on our stack.
    unsafe { bpf_seq_write(seq, (&ev as *const RawEvent).cast(), core::mem::size_of::<RawEvent>() as u32) };
    0
}

/// Every TCP socket of the namespace that created the iterator.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn iter_tcp(ctx: *mut c_void) -> i32 {
    walk(ctx, IPPROTO_TCP)
}

/// Every UDP socket of the namespace that created the iterator.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub fn iter_udp(ctx: *mut c_void) -> i32 {
    walk(ctx, IPPROTO_UDP)
}
