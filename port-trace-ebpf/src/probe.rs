//! Empty programs that `port-trace doctor` loads to ask the kernel whether it
//! allows fentry/fexit trampolines and kprobes at all. Never attached during
//! a trace.

use aya_ebpf::{
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};

/// Loads only where BTF trampolines are allowed.
#[fentry(function = "inet_put_port")]
pub fn probe_fentry(_ctx: FEntryContext) -> u32 {
    0
}

/// Loads anywhere; attaching needs the kprobe PMU.
#[kprobe]
pub fn probe_kprobe(_ctx: ProbeContext) -> u32 {
    0
}
