//! Developer tasks for port-trace: `cargo xtask <command>`.
//!
//! The alias lives in `.cargo/config.toml`. Every command works from a fresh
//! clone: `setup` prepares the project-local tool folder `.tools` (bpf-linker
//! built against the nightly toolchain's own libLLVM), and the other commands
//! run it first.

mod bench;
mod build;
mod cpio;
mod lint;
mod run;
mod setup;
mod test;
mod util;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build, run, lint and test port-trace.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain pieces: nightly `rust-src` and bpf-linker in `.tools`.
    Setup,
    /// Benchmark port-trace against tcplife and bpftrace on nginx/wrk and connect storms.
    Bench(bench::Options),
    /// Build `target/<profile>/port-trace` (the eBPF objects are built by its build script).
    Build(build::Options),
    /// Build and run port-trace (through `sudo -E` when not root).
    Run(run::Options),
    /// Check formatting and run clippy on the host crates and the eBPF crate.
    Lint,
    /// Lint, build and run the whole test suite (kernel tests need root).
    Test(test::Options),
    /// Boot Debian's cloud kernel (6.1) in QEMU and run the kernel tests there, per backend.
    VmTest(vm::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Bench(options) => bench::run(&options),
        Command::Build(options) => build::run(&options).map(drop),
        Command::Run(options) => run::run(&options),
        Command::Lint => lint::run(),
        Command::Test(options) => test::run(&options),
        Command::VmTest(options) => vm::run(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
