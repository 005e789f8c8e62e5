//! The `port-trace` command.

use std::process::ExitCode;

use clap::Parser;
use port_trace::cli::{Cli, Command};
use port_trace::{doctor, watch, UsageError};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if err.use_stderr() => {
            eprintln!("port-trace: error: {} (see --help)", one_line(&err.render().to_string()));
            return ExitCode::from(2);
        }
        // --help and --version.
        Err(err) => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
    };
    if port_trace::privileges::missing_capabilities().is_empty() {
        // Classic tracepoints need tracefs; without it on the host, mount it
        // in a private mount namespace (before the runtime starts threads).
        // The host's mounts are not changed.
        if let Err(e) = port_trace::system::ensure_private_tracefs() {
            eprintln!(
                "port-trace: warning: tracefs is not mounted and could not be mounted privately ({e:#}); \
                 syscall tracepoints are unavailable"
            );
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("port-trace: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Some(Command::Doctor(args)) => doctor::run(args),
        Some(Command::Watch(args)) => runtime.block_on(watch::run(*args)),
        Some(Command::Record(args)) => runtime.block_on(watch::record(*args)),
        Some(Command::Top(args)) => runtime.block_on(port_trace::top::run(*args)),
        Some(Command::Report(args)) if args.files.is_empty() => runtime.block_on(port_trace::report::live::run(*args)),
        Some(Command::Report(args)) => port_trace::report::run(*args),
        Some(Command::Who(args)) => match runtime.block_on(port_trace::who::run(*args)) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        None => runtime.block_on(watch::run(cli.watch)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<UsageError>().is_some() => {
            eprintln!("port-trace: error: {err}");
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("port-trace: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// A clap error as the one line the contract promises: its text up to the
/// usage block, without the `error:` prefix, lines joined.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .take_while(|line| !line.trim().is_empty() && !line.starts_with("Usage:"))
        .map(|line| line.trim().trim_start_matches("error:").trim())
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
