//! `cargo xtask build`: setup, then `cargo build -p port-trace` with
//! bpf-linker on `PATH` (port-trace's build script compiles the eBPF crate
//! through aya-build with the nightly toolchain).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::{setup, util};

/// Options of `cargo xtask build`.
#[derive(Args)]
pub struct Options {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
}

/// Runs setup and builds port-trace; returns the path of the binary.
pub fn run(options: &Options) -> Result<PathBuf> {
    setup::run()?;
    build(options.release)
}

/// Builds port-trace (setup must have run); returns the path of the binary.
pub fn build(release: bool) -> Result<PathBuf> {
    let mut cmd = util::cargo()?;
    cmd.args(["build", "-p", "port-trace"]);
    if release {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;
    Ok(binary(release))
}

/// `<workspace>/target/<profile>/port-trace`.
pub fn binary(release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    util::workspace_root().join("target").join(profile).join("port-trace")
}
