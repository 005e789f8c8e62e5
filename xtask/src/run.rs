//! `cargo xtask run`: build, then run port-trace (through `sudo -E` when not
//! root).
//!
//! The xtask process replaces itself with port-trace (`exec`), so the exit
//! code is port-trace's and Ctrl-C reaches port-trace alone: it can print its
//! summary before the shell prompt returns.

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{build, util};

/// Options of `cargo xtask run`.
#[derive(Args)]
pub struct Options {
    /// Build and run the release profile.
    #[arg(long)]
    release: bool,
    /// Arguments for port-trace (after `--`); default: `watch`.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Builds port-trace and executes it; returns only on failure.
pub fn run(options: &Options) -> Result<()> {
    let binary = build::run(&build::Options { release: options.release })?;
    let args: &[String] = if options.args.is_empty() { &[String::from("watch")] } else { &options.args };
    let mut cmd = util::privileged(&binary, util::is_root()?);
    cmd.args(args);
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot start `{}`", util::display(&cmd)))
}
