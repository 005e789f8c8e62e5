//! An empty program that `port-trace doctor` loads to ask the kernel whether
//! it allows kprobes at all. Never attached during a trace.

use aya_ebpf::{macros::kprobe, programs::ProbeContext};

/// Loads anywhere; attaching needs the kprobe PMU.
#[kprobe]
pub fn probe_kprobe(_ctx: ProbeContext) -> u32 {
    0
}
