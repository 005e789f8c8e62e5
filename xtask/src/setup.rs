//! `cargo xtask setup`: the nightly `rust-src` component and a bpf-linker
//! that uses the nightly toolchain's own libLLVM.
//!
//! Layout under `<workspace>/.tools`:
//!
//! - `llvm/lib/libLLVM.so` and `llvm/lib/libLLVM.so.<ver>-rust-<ver>-nightly`:
//!   symlinks to the nightly sysroot's `lib/libLLVM.so.*` (the `LLVM_PREFIX`
//!   bpf-linker is built against; its binary keeps an rpath to this folder).
//! - `bin/bpf-linker`: installed by `cargo +nightly install --root .tools`.
//! - `bpf-linker.stamp`: what the installed linker was built for (the output
//!   of `rustc +nightly -vV`, the LLVM prefix and the bpf-linker version). The
//!   linker is rebuilt whenever this differs.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::util;

/// The bpf-linker release to install (0.13.0 can link the nightly's libLLVM).
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// The toolchain that compiles the eBPF crate.
const NIGHTLY: &str = "nightly";

/// Runs the whole setup; cheap when there is nothing to do.
pub fn run() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

/// Adds `rust-src` to the nightly toolchain (needed for `-Z build-std=core`).
fn ensure_rust_src() -> Result<()> {
    let installed =
        util::output(Command::new("rustup").args(["component", "list", "--toolchain", NIGHTLY, "--installed"]))
            .context("is the `nightly` toolchain installed? (`rustup toolchain list`)")?;
    if installed.lines().any(|line| line.trim() == "rust-src") {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the {NIGHTLY} toolchain");
    util::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// Builds bpf-linker into `.tools` unless the stamp says it is current.
fn ensure_bpf_linker() -> Result<()> {
    let tools = util::tools_dir();
    let llvm_prefix = tools.join("llvm");
    let version = util::output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let major = llvm_major(&version)?;
    let sysroot = util::output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let libllvm = find_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    link_libllvm(&llvm_prefix.join("lib"), &libllvm)?;

    let stamp_path = tools.join("bpf-linker.stamp");
    let stamp = stamp_contents(&version, &llvm_prefix);
    let linker = tools.join("bin").join("bpf-linker");
    let old_stamp = match fs::read_to_string(&stamp_path) {
        Ok(old) => Some(old),
        Err(err) if err.kind() == ErrorKind::NotFound => None,
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", stamp_path.display())),
    };
    let reason = match old_stamp {
        _ if !linker.exists() => "not installed yet",
        None => "no stamp",
        Some(old) if old == stamp => {
            eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} (LLVM {major}) is up to date");
            return Ok(());
        }
        Some(_) => "the nightly toolchain changed",
    };

    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the {NIGHTLY} libLLVM {major} ({reason}; takes about a minute)"
    );
    // A failed build must not leave a stamp that claims success.
    match fs::remove_file(&stamp_path) {
        Err(err) if err.kind() != ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("cannot remove {}", stamp_path.display()))
        }
        _ => {}
    }
    util::run(
        Command::new("cargo")
            .current_dir(&tools)
            .env("LLVM_PREFIX", &llvm_prefix)
            .args([&format!("+{NIGHTLY}"), "install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--force", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .arg("--root")
            .arg(&tools),
    )?;
    let linked =
        util::output(Command::new(&linker).arg("--version")).context("the freshly built bpf-linker does not run")?;
    if !linked.contains(BPF_LINKER_VERSION) {
        bail!("{} reports `{}`, expected {BPF_LINKER_VERSION}", linker.display(), linked.trim());
    }
    fs::write(&stamp_path, stamp).with_context(|| format!("cannot write {}", stamp_path.display()))?;
    eprintln!("setup: installed {}", linker.display());
    Ok(())
}

/// The major version from the `LLVM version: 22.1.4` line of `rustc -vV`.
fn llvm_major(rustc_version: &str) -> Result<u32> {
    let line = rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .context("`rustc +nightly -vV` has no `LLVM version:` line")?;
    let major = line.trim().split('.').next().unwrap_or_default();
    major.parse().with_context(|| format!("cannot parse the LLVM version `{}`", line.trim()))
}

/// What the stamp holds for a linker built with this nightly and prefix.
fn stamp_contents(rustc_version: &str, llvm_prefix: &Path) -> String {
    format!("{}\nllvm-prefix: {}\nbpf-linker {BPF_LINKER_VERSION}\n", rustc_version.trim_end(), llvm_prefix.display())
}

/// The single `libLLVM.so.*` in the nightly sysroot's `lib` folder.
fn find_libllvm(lib: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(lib).with_context(|| format!("cannot list {}", lib.display()))? {
        let path = entry?.path();
        if path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with("libLLVM.so.")) {
            found.push(path);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no libLLVM.so.* in {} (is the nightly toolchain complete?)", lib.display()),
        many => bail!("several libLLVM.so.* in {}: {many:?}", lib.display()),
    }
}

/// Makes `dir` hold exactly `libLLVM.so` and `<file name of libllvm>`, both
/// symlinks to `libllvm`; stale `libLLVM.so.*` links from an older nightly go.
fn link_libllvm(dir: &Path, libllvm: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let versioned = libllvm.file_name().context("libLLVM path has no file name")?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let is_llvm = name.to_str().is_some_and(|name| name.starts_with("libLLVM.so."));
        if is_llvm && name != versioned {
            eprintln!("setup: removing stale {}", entry.path().display());
            fs::remove_file(entry.path())?;
        }
    }
    for name in [std::ffi::OsStr::new("libLLVM.so"), versioned] {
        let link = dir.join(name);
        match fs::read_link(&link) {
            Ok(target) if target == libllvm => continue,
            Ok(_) => fs::remove_file(&link)?,
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(_) => fs::remove_file(&link)?, // exists but is not a symlink
        }
        symlink(libllvm, &link).with_context(|| format!("cannot link {} -> {}", link.display(), libllvm.display()))?;
        eprintln!("setup: linked {} -> {}", link.display(), libllvm.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";

    #[test]
    fn parses_llvm_major() {
        assert_eq!(llvm_major(VV).unwrap(), 22);
        assert!(llvm_major("rustc 1.0.0\n").is_err());
    }

    #[test]
    fn stamp_names_toolchain_prefix_and_linker() {
        let stamp = stamp_contents(VV, Path::new("/ws/.tools/llvm"));
        assert!(stamp.starts_with("rustc 1.97.0-nightly"));
        assert!(stamp.contains("LLVM version: 22.1.4\nllvm-prefix: /ws/.tools/llvm\n"));
        assert!(stamp.ends_with("bpf-linker 0.13.0\n"));
    }
}
