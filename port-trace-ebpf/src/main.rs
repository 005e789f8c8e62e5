//! The port-trace eBPF programs: the precise (fentry/fexit), kprobe and
//! portable (tracepoints, cgroup hooks) backends.
//!
//! One module per hook family; every program is small, never logs, and
//! always lets the traced operation proceed (cgroup hooks return 1).
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no `AtomicU64::fetch_add` (no CAS).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod bind;
mod connect;
mod emit;
mod in_call;
mod iter;
mod kprobes;
mod port_fns;
mod precise;
mod sk;
mod tcp_state;
mod udp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible licence: the tracing helpers we use require it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
