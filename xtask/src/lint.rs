//! `cargo xtask lint`: rustfmt on everything, clippy on the host crates and,
//! separately, on the eBPF crate (nightly, `bpfel-unknown-none`).

use anyhow::Result;

use crate::{setup, util};

/// Runs setup, then all lints; fails at the first one that finds something.
pub fn run() -> Result<()> {
    setup::run()?;
    lint()
}

/// Runs all lints (setup must have run: port-trace's build script needs
/// bpf-linker, and the eBPF crate needs the nightly `rust-src`).
pub fn lint() -> Result<()> {
    util::run(util::cargo()?.args(["fmt", "--all", "--check"]))?;
    // No `-p`: the workspace's default-members are the host crates.
    util::run(util::cargo()?.args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    util::run(
        util::cargo()?
            .current_dir(util::workspace_root().join("port-trace-ebpf"))
            .args(["+nightly", "clippy", "--release", "--target", "bpfel-unknown-none"])
            .args(["-Z", "build-std=core", "--", "-D", "warnings"]),
    )
}
