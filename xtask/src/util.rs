//! Helpers shared by the subcommands: paths, command execution, privileges.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// The workspace root (the parent of the `xtask` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives inside the workspace").to_path_buf()
}

/// The project-local tool folder, `<workspace>/.tools`.
pub fn tools_dir() -> PathBuf {
    workspace_root().join(".tools")
}

/// `PATH` with `<workspace>/.tools/bin` in front, so that `bpf-linker` is found.
pub fn tools_path() -> Result<OsString> {
    let mut dirs = vec![tools_dir().join("bin")];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).context("cannot build PATH")
}

/// A `cargo` command (the rustup proxy, so `+nightly` works) with `.tools/bin`
/// on `PATH`, run from the workspace root.
pub fn cargo() -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()).env("PATH", tools_path()?);
    Ok(cmd)
}

/// Renders a command for messages, e.g. `cargo build -p port-trace`.
pub fn display(cmd: &Command) -> String {
    let parts = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    parts.map(|part| part.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

/// Prints the command, runs it and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd.status().with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs the command quietly and returns its standard output.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", display(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}`: output is not UTF-8", display(cmd)))
}

/// Whether this process runs as root (effective uid 0, asked through `id -u`).
pub fn is_root() -> Result<bool> {
    Ok(output(Command::new("id").arg("-u"))?.trim() == "0")
}

/// `program` when running as root, else `sudo -E program`.
pub fn privileged(program: impl Into<OsString>, root: bool) -> Command {
    if root {
        Command::new(program.into())
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(program.into());
        cmd
    }
}
