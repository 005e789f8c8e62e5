//! `cargo xtask test`: lint (unless `--no-lint`), build port-trace, then
//! `cargo test` on the host crates, then the VM stage (`cargo xtask
//! vm-test`, unless `--no-vm`): the kernel tests on a second kernel, once per
//! backend. tracefs is left as the host has it: the
//! tracer mounts it privately for itself when it is missing, and the tests
//! exercise that.
//!
//! The tests get `PORT_TRACE_BIN=<workspace>/target/release/port-trace`. The
//! kernel tests need root: when not root, cargo stays unprivileged and runs
//! each test binary through `sudo -E` (cargo's target runner), so no
//! root-owned files end up in `target/`.

use std::process::Command;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{build, lint, setup, util, vm};

/// Options of `cargo xtask test`.
#[derive(Args)]
pub struct Options {
    /// Skip `cargo xtask lint`.
    #[arg(long)]
    no_lint: bool,
    /// Skip the VM stage (`cargo xtask vm-test`).
    #[arg(long)]
    no_vm: bool,
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Runs the whole test step.
pub fn run(options: &Options) -> Result<()> {
    setup::run()?;
    if !options.no_lint {
        lint::lint()?;
    }
    // The kernel tests run the build users run: the release one. Their
    // floods, soaks and deadlines measure the tracer keeping up, which an
    // unoptimised build does not; debug assertions are exercised by the
    // unit and property tests of the pure logic.
    let binary = build::build(true)?;
    let root = util::is_root()?;

    let mut cmd = util::cargo()?;
    cmd.arg("test").args(&options.args).env("PORT_TRACE_BIN", &binary);
    if !root {
        let host = host_triple()?;
        let runner = format!("CARGO_TARGET_{}_RUNNER", host.to_uppercase().replace(['-', '.'], "_"));
        eprintln!("test: not root; running the test binaries through `sudo -E` ({runner})");
        cmd.env(runner, "sudo -E");
    }
    util::run(&mut cmd)?;
    if !options.no_vm {
        vm::run(&vm::Options::defaults())?;
    }
    Ok(())
}

/// The host target triple of the default toolchain (`host:` of `rustc -vV`).
fn host_triple() -> Result<String> {
    let version = util::output(Command::new("rustc").arg("-vV"))?;
    version
        .lines()
        .find_map(|line| line.strip_prefix("host:"))
        .map(|host| host.trim().to_owned())
        .context("`rustc -vV` has no `host:` line")
}
