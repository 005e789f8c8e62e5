//! Socket walks: BPF iterators over a network namespace's TCP and UDP
//! sockets (`iter/tcp` includes TIME_WAIT sockets). The loader runs them at
//! start-up (the snapshot of sockets that existed before tracing), on an
//! interval (to see TIME_WAIT sockets end on the portable backend) and after
//! lost events (to repair its state). Each socket becomes a SNAPSHOT event;
//! the iterator's final call, with no socket, a WALK_END event.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_get_socket_cookie;
use port_trace_common::kind;

use crate::{emit, sk};

const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// `bpf_iter_meta.session_id`: one per walk.
const META_SESSION_ID: u32 = 8;

/// `struct bpf_iter__tcp` / `bpf_iter__udp`: `meta` then the socket, both
/// pointers; the socket is NULL on the final call.
#[inline(always)]
fn walk(ctx: *mut c_void, protocol: u16) -> i32 {
    // SAFETY: the iterator context starts with these two pointers.
    let (meta, sk_ptr) = unsafe {
        let fields = ctx as *const *mut c_void;
        (*fields, *fields.add(1))
    };
    let cfg = sk::config();
    if cfg.abi_version == 0 {
        return 0;
    }
    let session: u64 = sk::read(sk::addr_of(meta), META_SESSION_ID);
    if sk_ptr.is_null() {
        if let Some(mut event) = emit::start(kind::WALK_END, false) {
            let ev = event.fields();
            ev.cgroup_id = session;
            ev.protocol = protocol;
            ev.family = 2;
            event.submit();
        }
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
    let Some(mut event) = emit::start(kind::SNAPSHOT, false) else {
        return 0;
    };
    let ev = event.fields();
    // SAFETY: a typed socket pointer, checked for NULL above.
    ev.cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    ev.netns = netns;
    ev.cgroup_id = session;
    sk::fill_tuple(&cfg, sk, ev);
    // TIME_WAIT sockets are only a sock_common: nothing past it is theirs.
    ev.protocol = protocol;
    ev.lport = sk::local_port_held(&cfg, sk);
    ev.old_state = state;
    if state != TCP_TIME_WAIT {
        ev.inode = sk::inode_of(&cfg, sk);
    }
    event.submit();
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
