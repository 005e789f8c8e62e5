//! `cargo xtask vm-test`: the kernel tests inside a QEMU guest running
//! Debian's 6.1 cloud kernel, where fentry/fexit and kprobes work (the 6.18
//! host refuses both).
//!
//! Steps:
//!
//! 1. The kernel: the versioned package that `linux-image-cloud-amd64`
//!    depends on, fetched with `apt-get download` and unpacked with `dpkg -x`
//!    (not installed) into `<workspace>/.tools/vm/kernel-<version>/`, reused
//!    while the metapackage points at the same version. Its `boot/config-*`
//!    must enable what the guest and the requested backends need.
//! 2. The binaries: `cargo xtask build` (port-trace), then the kernel test
//!    binary, `port-workload` and `port-storm` (`cargo test --no-run`, paths
//!    from cargo's JSON messages). Their debug info is stripped in the copies.
//! 3. The initramfs, `target/vm/initramfs.cpio` (uncompressed `newc`: the
//!    kernel unpacks it faster than it would inflate it under emulation):
//!    busybox-static with its applets, iproute2's `ip` (busybox's lacks
//!    `netns`), the binaries above and every shared library `ldd` lists,
//!    `/etc/vm-test.conf` and `/init` (`xtask/vm/init.sh`). The test binary
//!    finds `port-workload` and `port-storm` at the absolute paths cargo
//!    compiled into it, so that is where they go in the guest too.
//! 4. The guest: `qemu-system-x86_64 -accel tcg` (KVM hangs on these
//!    machines), serial console streamed to the terminal and saved in
//!    `target/vm/console.log`. `/init` runs the kernel tests once per
//!    backend with `PORT_TRACE_EXTRA_ARGS="--backend B"`, prints a
//!    `VM-VERDICT` line for each, then `port-trace doctor -v`, and powers
//!    off. A watchdog in the guest and a timeout here (QEMU is killed) keep
//!    it from hanging.
//!
//! The command fails unless every requested backend has a passing verdict.

use std::{
    fs,
    io::{self, BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};

use crate::{build, cpio::Archive, util};

/// The metapackage whose dependency names the kernel to boot.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// `/init` of the guest.
const INIT: &str = include_str!("../vm/init.sh");

/// Where the guest finds the tracer (`PORT_TRACE_BIN`) and the kernel tests.
const GUEST_TRACER: &str = "/bin/port-trace";
const GUEST_TESTS: &str = "/bin/port-trace-kernel-tests";
const GUEST_PORTABLE_TESTS: &str = "/bin/port-trace-portable-tests";

/// Kernel modules the tests need in the guest: `ss` (the tests' truth for
/// sockets, cookies and `ss -K`) asks the kernel through sock_diag, built as
/// modules in Debian's kernel.
const GUEST_MODULES: &[&str] = &["net/ipv4/inet_diag.ko", "net/ipv4/tcp_diag.ko", "net/ipv4/udp_diag.ko"];

/// Host tools the tests run in the guest besides busybox's applets, and
/// where they go: `ip netns add/exec/delete` needs the real iproute2, and the
/// tests compare with (and end TIME_WAIT sockets through) its `ss`.
const HOST_TOOLS: &[(&str, &str)] = &[("ip", "/usr/sbin/ip"), ("ss", "/usr/bin/ss")];

/// What the guest itself needs from the kernel configuration.
const GUEST_CONFIG: &[&str] = &[
    "BLK_DEV_INITRD",
    "BINFMT_SCRIPT",
    "DEVTMPFS",
    "TMPFS",
    "SERIAL_8250_CONSOLE",
    "NET_NS",
    "BPF_SYSCALL",
    "DEBUG_INFO_BTF",
];

/// Options printed for information only.
const INFO_CONFIG: &[&str] =
    &["BPF_JIT", "BPF_JIT_ALWAYS_ON", "BPF_LSM", "LSM", "DEBUG_INFO_BTF_MODULES", "MAGIC_SYSRQ", "HZ"];

/// A backend of port-trace, as `--backend` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Tracepoints, cgroup v2 socket hooks and iterators.
    Portable,
    /// fentry/fexit.
    Precise,
    /// kprobe/kretprobe.
    Kprobe,
    /// Whatever the tracer picks.
    Auto,
}

impl Backend {
    /// The name port-trace's `--backend` takes.
    fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::Precise => "precise",
            Backend::Kprobe => "kprobe",
            Backend::Auto => "auto",
        }
    }

    /// The kernel options this backend's hooks need.
    fn config(self) -> &'static [&'static str] {
        match self {
            Backend::Portable => &["CGROUP_BPF", "BPF_EVENTS"],
            Backend::Precise => &["BPF_JIT", "FUNCTION_TRACER", "DYNAMIC_FTRACE_WITH_DIRECT_CALLS"],
            Backend::Kprobe => &["KPROBES", "KRETPROBES", "KPROBE_EVENTS", "BPF_EVENTS"],
            Backend::Auto => &[],
        }
    }
}

/// The backends tested when no `--backend` is given: all three, each forced.
const DEFAULT_BACKENDS: &[&str] = &["portable", "precise", "kprobe"];

/// Options of `cargo xtask vm-test`.
#[derive(Args)]
pub struct Options {
    /// Run the kernel tests with this backend (repeatable; default: portable,
    /// precise and kprobe).
    #[arg(long = "backend", value_enum, value_name = "BACKEND", default_values = DEFAULT_BACKENDS)]
    backends: Vec<Backend>,
    /// Keep target/vm/initramfs.cpio and its staging folder, and print the
    /// QEMU command line that boots it again.
    #[arg(long)]
    keep: bool,
    /// Kill the VM after this many seconds (the guest's own watchdog powers
    /// off 30 s earlier).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    timeout: u64,
    /// Extra arguments for the kernel test binary (after `--`), e.g. a test
    /// name filter.
    #[arg(last = true)]
    args: Vec<String>,
}

impl Options {
    /// What `cargo xtask test` runs: every default backend.
    pub fn defaults() -> Self {
        let backends = DEFAULT_BACKENDS
            .iter()
            .filter_map(|name| <Backend as clap::ValueEnum>::from_str(name, true).ok())
            .collect();
        Self { backends, keep: false, timeout: 600, args: Vec::new() }
    }
}

/// Runs the whole VM stage.
pub fn run(options: &Options) -> Result<()> {
    let started = Instant::now();
    let mut backends: Vec<Backend> = Vec::new();
    for backend in &options.backends {
        if !backends.contains(backend) {
            backends.push(*backend);
        }
    }
    let names: Vec<&str> = backends.iter().map(|b| b.name()).collect();
    eprintln!("vm-test: backends to test: {}", names.join(", "));
    let qemu = find_program("qemu-system-x86_64").context("install the `qemu-system-x86` package")?;
    let busybox = find_program("busybox").context("install the `busybox-static` package")?;

    let kernel = ensure_kernel()?;
    check_config(&kernel, &backends)?;

    // The release build, as on the host (see `test::run`).
    let tracer = build::run(&build::Options { release: true })?;
    let tests = test_binaries()?;

    let vm_dir = util::workspace_root().join("target").join("vm");
    let stage = vm_dir.join("stage");
    let initrd = vm_dir.join("initramfs.cpio");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage).with_context(|| format!("cannot create {}", stage.display()))?;
    let conf = guest_conf(&names, options.timeout.saturating_sub(30).max(30), &options.args);
    let modules = kernel.modules.clone();
    let size = initramfs(&busybox, &tracer, &tests, &modules, &conf, &stage, &initrd)?;
    eprintln!("vm-test: wrote {} ({:.1} MiB)", initrd.display(), mib(size));

    let mut qemu = qemu_command(&qemu, &kernel.vmlinuz, &initrd);
    let log = vm_dir.join("console.log");
    let doctor_file = vm_dir.join("doctor.txt");
    let _ = fs::remove_file(&doctor_file);
    let boot = Instant::now();
    let outcome = boot_guest(&mut qemu, &log, Duration::from_secs(options.timeout));
    let boot_time = boot.elapsed();
    if options.keep {
        eprintln!("vm-test: kept {} and {}; boot it again with:", initrd.display(), stage.display());
        eprintln!("  {}", shell_line(&qemu));
    } else {
        let _ = fs::remove_file(&initrd);
        let _ = fs::remove_dir_all(&stage);
    }
    let console = outcome?;

    let verdicts = judge(&console, &names);
    eprintln!();
    eprintln!("vm-test: kernel {} in QEMU (TCG); console log: {}", kernel.version, log.display());
    let skipped: Vec<&str> =
        ["portable", "precise", "kprobe"].into_iter().filter(|name| !names.contains(name)).collect();
    if !skipped.is_empty() {
        eprintln!("vm-test: not tested (add `--backend NAME`): {}", skipped.join(", "));
    }
    for line in &verdicts.lines {
        eprintln!("vm-test: {line}");
    }
    match doctor(&console) {
        Some(text) => {
            fs::write(&doctor_file, &text).with_context(|| format!("cannot write {}", doctor_file.display()))?;
            let chosen = text.lines().find(|l| l.starts_with("backend:")).unwrap_or("no `backend:` line");
            eprintln!("vm-test: port-trace doctor in the guest ({}): {chosen}", doctor_file.display());
        }
        None => eprintln!("vm-test: the guest printed no `port-trace doctor` output"),
    }
    eprintln!(
        "vm-test: VM {:.1}s, total {:.1}s (kernel download, build and initramfs included)",
        boot_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if !verdicts.problems.is_empty() {
        bail!("vm-test failed:\n  {}", verdicts.problems.join("\n  "));
    }
    Ok(())
}

/// An unpacked kernel package.
struct Kernel {
    /// E.g. `6.1.0-56-cloud-amd64`.
    version: String,
    vmlinuz: PathBuf,
    config: PathBuf,
    /// `lib/modules/<version>` of the package.
    modules: PathBuf,
}

/// Downloads and unpacks the kernel unless `.tools/vm/kernel-<version>`
/// already holds it; other versions' folders are removed.
fn ensure_kernel() -> Result<Kernel> {
    let deps = util::output(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))
        .context("cannot ask apt which kernel to use (has `apt-get update` run?)")?;
    let version = kernel_version(&deps)
        .with_context(|| format!("`apt-cache depends {KERNEL_METAPACKAGE}` names no versioned kernel:\n{deps}"))?;
    let vm = util::tools_dir().join("vm");
    let dir = vm.join(format!("kernel-{version}"));
    let kernel = Kernel {
        vmlinuz: dir.join("boot").join(format!("vmlinuz-{version}")),
        config: dir.join("boot").join(format!("config-{version}")),
        modules: dir.join("lib/modules").join(&version),
        version,
    };
    if kernel.vmlinuz.is_file() && kernel.config.is_file() {
        eprintln!("vm-test: kernel {} (cached in {})", kernel.version, dir.display());
        return Ok(kernel);
    }

    let package = format!("linux-image-{}", kernel.version);
    eprintln!("vm-test: downloading {package} (not installed, only unpacked into {})", dir.display());
    let download = vm.join("download");
    let partial = vm.join(format!("kernel-{}.partial", kernel.version));
    for stale in [&download, &partial] {
        remove_dir_if_present(stale)?;
    }
    fs::create_dir_all(&download).with_context(|| format!("cannot create {}", download.display()))?;
    let mut apt = Command::new("apt-get");
    apt.current_dir(&download);
    if util::is_root()? {
        // Else apt warns that its sandbox user cannot write here.
        apt.args(["-o", "APT::Sandbox::User=root"]);
    }
    util::run(apt.args(["download", &package]))?;
    let deb = fs::read_dir(&download)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("`apt-get download {package}` left no .deb in {}", download.display()))?;
    util::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &dir).with_context(|| format!("cannot rename {} to {}", partial.display(), dir.display()))?;
    remove_dir_if_present(&download)?;
    if !kernel.vmlinuz.is_file() || !kernel.config.is_file() {
        bail!("{package} has no {} or {}", kernel.vmlinuz.display(), kernel.config.display());
    }
    // Other kernel versions are dead weight (~120 MB each).
    for entry in fs::read_dir(&vm)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("kernel-") && path != dir {
            eprintln!("vm-test: removing the old {}", path.display());
            remove_dir_if_present(&path)?;
        }
    }
    Ok(kernel)
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// `6.1.0-56-cloud-amd64` from the `Depends: linux-image-6.1.0-56-cloud-amd64`
/// line of `apt-cache depends linux-image-cloud-amd64`.
fn kernel_version(apt_depends: &str) -> Option<String> {
    apt_depends.lines().find_map(|line| {
        let package = line.trim().strip_prefix("Depends:")?.trim();
        let version = package.strip_prefix("linux-image-")?;
        let numbered = version.starts_with(|c: char| c.is_ascii_digit());
        (numbered && version.ends_with("-cloud-amd64")).then(|| version.to_owned())
    })
}

/// Prints the kernel options that matter and fails when the guest or a
/// requested backend lacks one.
fn check_config(kernel: &Kernel, backends: &[Backend]) -> Result<()> {
    let text =
        fs::read_to_string(&kernel.config).with_context(|| format!("cannot read {}", kernel.config.display()))?;
    let value = |option: &str| config_value(&text, option).unwrap_or("not set");
    let enabled = |option: &str| matches!(value(option), "y" | "m");
    let mut missing = Vec::new();
    let mut line = |what: &str, options: &[&str], required: bool| {
        let shown: Vec<String> = options.iter().map(|o| format!("{o}={}", value(o))).collect();
        eprintln!("vm-test: config ({what}): {}", shown.join(" "));
        if required {
            missing.extend(options.iter().filter(|o| !enabled(o)).map(|o| format!("CONFIG_{o} ({what})")));
        }
    };
    line("guest", GUEST_CONFIG, true);
    for backend in [Backend::Portable, Backend::Precise, Backend::Kprobe] {
        line(backend.name(), backend.config(), backends.contains(&backend));
    }
    line("info", INFO_CONFIG, false);
    if !missing.is_empty() {
        bail!("kernel {} lacks {}", kernel.version, missing.join(", "));
    }
    Ok(())
}

/// The value of `CONFIG_<option>` in a kernel `.config` (`y`, `m`, a number,
/// a quoted string), or `None` when it is not set.
fn config_value<'a>(config: &'a str, option: &str) -> Option<&'a str> {
    let key = format!("CONFIG_{option}=");
    config.lines().find_map(|line| line.strip_prefix(key.as_str()))
}

/// The test binaries cargo built for the guest.
struct TestBinaries {
    /// `target/debug/deps/kernel-<hash>` (tests/tests/kernel.rs).
    kernel: PathBuf,
    /// `target/debug/deps/portable-<hash>` (tests/tests/portable.rs): TIME_WAIT
    /// ends, snapshots, failures, loss and repair.
    portable: PathBuf,
    /// `target/debug/port-workload`, also the path compiled into `kernel`.
    workload: PathBuf,
    /// `target/debug/port-storm`, likewise.
    storm: PathBuf,
}

/// Builds the kernel test binary, `port-workload` and `port-storm` and finds
/// their paths.
fn test_binaries() -> Result<TestBinaries> {
    let mut cmd = util::cargo()?;
    cmd.args(["test", "-p", "port-trace-integration", "--test", "kernel", "--test", "portable", "--no-run"])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit());
    eprintln!("$ {}", util::display(&cmd));
    let messages = util::output(&mut cmd)?;
    let find = |kind: &str, name: &str| {
        messages
            .lines()
            .find_map(|line| artifact_executable(line, kind, name))
            .with_context(|| format!("`{}` reported no {kind} executable named {name}", util::display(&cmd)))
    };
    Ok(TestBinaries {
        kernel: find("test", "kernel")?,
        portable: find("test", "portable")?,
        workload: find("bin", "port-workload")?,
        storm: find("bin", "port-storm")?,
    })
}

/// The `executable` of a cargo `compiler-artifact` message whose target has
/// this kind and name.
fn artifact_executable(message: &str, kind: &str, name: &str) -> Option<PathBuf> {
    let is_it = message.starts_with(r#"{"reason":"compiler-artifact""#)
        && message.contains(&format!(r#""kind":["{kind}"]"#))
        && json_string(message, "name").as_deref() == Some(name);
    is_it.then(|| json_string(message, "executable").map(PathBuf::from)).flatten()
}

/// The first `"key":"value"` string value in a line of compact JSON, with the
/// escapes decoded. Enough for cargo's messages, which is all it reads.
fn json_string(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!(r#""{key}":""#))? + key.len() + 4;
    let mut out = String::new();
    let mut chars = json[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other), // `"`, `\`, `/`
            },
            c => out.push(c),
        }
    }
}

/// `/etc/vm-test.conf`, sourced by `/init`.
fn guest_conf(backends: &[&str], watchdog: u64, test_args: &[String]) -> String {
    let args: Vec<String> = test_args.iter().map(|a| shell_quote(a)).collect();
    format!(
        "BACKENDS={}\nWATCHDOG={watchdog}\nTEST_ARGS={}\n",
        shell_quote(&backends.join(" ")),
        shell_quote(&args.join(" "))
    )
}

/// `s` in single quotes for `sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Assembles the initramfs (stripped copies of the Rust binaries go to
/// `stage`); returns its size.
fn initramfs(
    busybox: &Path,
    tracer: &Path,
    tests: &TestBinaries,
    modules: &Path,
    conf: &str,
    stage: &Path,
    out: &Path,
) -> Result<u64> {
    let mut archive = Archive::default();
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/usr/bin", "/sbin"] {
        archive.dir(dir)?;
    }
    // The kernel opens /dev/console for /init before devtmpfs is mounted.
    archive.char_dev("/dev/console", 5, 1)?;
    archive.char_dev("/dev/null", 1, 3)?;
    archive.symlink("/var/run", "../run")?;
    archive.symlink("/etc/mtab", "/proc/self/mounts")?;
    archive.data("/etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n")?;
    archive.data("/etc/group", 0o644, "root:x:0:\n")?;
    archive.data("/etc/vm-test.conf", 0o644, conf)?;
    archive.data("/init", 0o755, INIT)?;

    let strip = find_program("strip").ok();
    if strip.is_none() {
        eprintln!("vm-test: no `strip` (binutils): the binaries keep their debug info");
    }
    let rust_binaries = [
        (tracer, GUEST_TRACER.into()),
        (&tests.kernel, GUEST_TESTS.into()),
        (&tests.portable, GUEST_PORTABLE_TESTS.into()),
        (&tests.workload, tests.workload.clone()),
        (&tests.storm, tests.storm.clone()),
    ];
    for (host, guest) in rust_binaries {
        let source = match &strip {
            Some(strip) => {
                let copy = stage.join(host.file_name().context("binary without a file name")?);
                util::output(Command::new(strip).arg("--strip-debug").arg("-o").arg(&copy).arg(host))?;
                copy
            }
            None => host.to_path_buf(),
        };
        add_elf(&mut archive, &guest, &source)?;
    }
    for (name, guest) in HOST_TOOLS {
        add_elf(&mut archive, Path::new(guest), &find_program(name)?)?;
    }
    for module in GUEST_MODULES {
        let source = modules.join("kernel").join(module);
        let name = Path::new(module).file_name().context("module without a file name")?;
        archive.file(Path::new("/lib/modules/vm").join(name), 0o644, source)?;
    }

    add_elf(&mut archive, Path::new("/bin/busybox"), busybox)?;
    let applets = util::output(Command::new(busybox).arg("--list"))?;
    for applet in applets.split_whitespace() {
        let taken = HOST_TOOLS.iter().any(|(name, _)| *name == applet);
        if !taken && !archive.contains(format!("/bin/{applet}")) {
            archive.symlink(format!("/bin/{applet}"), "busybox")?;
        }
    }
    archive.write(out)
}

/// Adds an executable and the shared libraries (and loader) it needs, each
/// at the path `ldd` shows for it on this machine.
fn add_elf(archive: &mut Archive, guest: &Path, host: &Path) -> Result<()> {
    archive.file(guest, 0o755, host)?;
    let out = Command::new("ldd").arg(host).output().context("cannot run `ldd`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static executables: "not a dynamic executable".
        return Ok(());
    }
    for lib in ldd_paths(&text).with_context(|| format!("ldd {}", host.display()))? {
        archive.file(&lib, 0o755, &lib)?;
    }
    Ok(())
}

/// The absolute paths in `ldd` output: `libc.so.6 => /lib/.../libc.so.6
/// (0x...)` and `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has none.
fn ldd_paths(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in ldd.lines().map(str::trim) {
        if line.contains("=> not found") {
            bail!("missing library: {line}");
        }
        let path = line.split_once("=>").map_or(line, |(_, path)| path.trim());
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

/// The QEMU command line that boots `vmlinuz` with `initrd`.
fn qemu_command(qemu: &Path, vmlinuz: &Path, initrd: &Path) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-m", "2048", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    cmd
}

/// Renders a command for a shell, quoting what needs it.
fn shell_line(cmd: &Command) -> String {
    let parts = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    let quote = |s: String| if s.contains([' ', '\'', '"']) { shell_quote(&s) } else { s };
    parts.map(|part| quote(part.to_string_lossy().into_owned())).collect::<Vec<_>>().join(" ")
}

/// Boots the guest, streams its console (prefixed `vm| `) and saves it to
/// `log`; kills QEMU after `timeout`. Returns the console lines.
fn boot_guest(qemu: &mut Command, log: &Path, timeout: Duration) -> Result<Vec<String>> {
    eprintln!("$ {}", util::display(qemu));
    let mut file = fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start `{}`", util::display(qemu)))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        let mut out = io::stdout().lock();
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = printable(&String::from_utf8_lossy(&line));
            let _ = writeln!(file, "{line}");
            let _ = writeln!(out, "vm| {line}");
            let _ = out.flush();
            lines.push(line);
        }
        lines
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let mut lines = reader.join().map_err(|_| anyhow::anyhow!("the console reader panicked"))?;
    match status {
        None => lines.push(format!("VM-TIMEOUT: killed QEMU after {}s", timeout.as_secs())),
        Some(status) if !status.success() => lines.push(format!("VM-QEMU-FAILED: QEMU exited with {status}")),
        Some(_) => {}
    }
    Ok(lines)
}

/// `line` without terminal escape sequences (SeaBIOS clears the screen)
/// and other control characters but tabs.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            // CSI: ESC [ parameters... final byte in @..~; else ESC and one more.
            '\u{1b}' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The output of `port-trace doctor -v` in the guest: the console lines
/// between `VM-DOCTOR-BEGIN` and `VM-DOCTOR-END`.
fn doctor(console: &[String]) -> Option<String> {
    let begin = console.iter().position(|line| line == "VM-DOCTOR-BEGIN")?;
    let end = begin + console[begin..].iter().position(|line| line.starts_with("VM-DOCTOR-END"))?;
    Some(console[begin + 1..end].iter().map(|line| format!("{line}\n")).collect())
}

/// What the console says about the run.
struct Verdicts {
    /// One summary line per requested backend.
    lines: Vec<String>,
    /// Why the run failed; empty when it passed.
    problems: Vec<String>,
}

/// Checks the console for a passing `VM-VERDICT` per backend and for signs
/// that the guest did not finish.
fn judge(console: &[String], backends: &[&str]) -> Verdicts {
    let mut verdicts = Verdicts { lines: Vec::new(), problems: Vec::new() };
    for backend in backends {
        let found = console.iter().filter_map(|line| line.strip_prefix("VM-VERDICT ")).find_map(|rest| {
            let fields: Vec<(&str, &str)> = rest.split_whitespace().filter_map(|f| f.split_once('=')).collect();
            let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
            (get("backend") == Some(backend)).then(|| {
                let summary = format!(
                    "{backend}: {} ({} tests, {} failed, {} in the guest)",
                    get("result").unwrap_or("?"),
                    get("tests").unwrap_or("?"),
                    get("failed").unwrap_or("?"),
                    get("time").unwrap_or("?")
                );
                (get("result") == Some("pass"), summary)
            })
        });
        match found {
            Some((passed, summary)) => {
                if !passed {
                    verdicts.problems.push(summary.clone());
                }
                verdicts.lines.push(summary);
            }
            None => {
                verdicts.lines.push(format!("{backend}: no verdict"));
                verdicts.problems.push(format!("{backend}: the guest printed no verdict"));
            }
        }
    }
    for line in console {
        let alarm = ["VM-TIMEOUT", "VM-WATCHDOG", "VM-QEMU-FAILED", "Kernel panic"].iter().any(|a| line.contains(a));
        if alarm {
            verdicts.problems.push(line.trim().to_owned());
        }
    }
    if !console.iter().any(|line| line.starts_with("VM-DONE")) && verdicts.problems.is_empty() {
        verdicts.problems.push("the guest did not get to the end of /init (no VM-DONE)".into());
    }
    verdicts
}

/// The first `name` in `PATH`, then in `/usr/sbin` and `/sbin` (not on a
/// user's `PATH` everywhere).
fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`{name}` not found on PATH")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_the_versioned_kernel() {
        let apt = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(kernel_version(apt).as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(kernel_version("linux-image-cloud-amd64\n  Depends: libc6\n"), None);
    }

    #[test]
    fn reads_config_values() {
        let config = "# CONFIG_FPROBE is not set\nCONFIG_KPROBES=y\nCONFIG_LSM=\"bpf\"\nCONFIG_HZ=250\n";
        assert_eq!(config_value(config, "KPROBES"), Some("y"));
        assert_eq!(config_value(config, "LSM"), Some("\"bpf\""));
        assert_eq!(config_value(config, "FPROBE"), None);
        assert_eq!(config_value(config, "KPROBE"), None);
    }

    #[test]
    fn finds_cargo_artifacts() {
        let test = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#x@0.1.0","target":{"kind":["test"],"crate_types":["bin"],"name":"kernel","src_path":"/w/tests/tests/kernel.rs","test":true},"filenames":["/w/target/debug/deps/kernel-d3"],"executable":"/w/target/debug/deps/kernel-d3","fresh":true}"#;
        let lib = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"kernel"},"executable":null}"#;
        assert_eq!(artifact_executable(test, "test", "kernel"), Some("/w/target/debug/deps/kernel-d3".into()));
        assert_eq!(artifact_executable(test, "bin", "kernel"), None);
        assert_eq!(artifact_executable(lib, "lib", "kernel"), None);
        assert_eq!(json_string(r#"{"a":"x\"y\\z\u00e9"}"#, "a").as_deref(), Some("x\"y\\z\u{e9}"));
    }

    #[test]
    fn parses_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let paths = ldd_paths(ldd).unwrap();
        assert_eq!(paths, [Path::new("/lib/x86_64-linux-gnu/libc.so.6"), Path::new("/lib64/ld-linux-x86-64.so.2")]);
        assert!(ldd_paths("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn guest_conf_survives_the_shell() {
        let conf = guest_conf(&["portable", "kprobe"], 570, &["it's".into(), "b c".into(), "$x".into()]);
        let file = std::env::temp_dir().join(format!("xtask-vm-conf-{}", std::process::id()));
        fs::write(&file, conf).unwrap();
        let script = r#". "$1"; eval "set -- $TEST_ARGS"; printf '%s\n' "$BACKENDS" "$WATCHDOG" "$@""#;
        let out = util::output(Command::new("sh").args(["-c", script, "sh"]).arg(&file)).unwrap();
        fs::remove_file(&file).unwrap();
        assert_eq!(out, "portable kprobe\n570\nit's\nb c\n$x\n");
    }

    #[test]
    fn strips_escapes() {
        assert_eq!(printable("\u{1b}c\u{1b}[?7l\u{1b}[2JVM-INFO a=1\r"), "VM-INFO a=1");
        assert_eq!(printable("a\tb\u{7}"), "a\tb");
    }

    #[test]
    fn judges_verdicts() {
        let console: Vec<String> = [
            "VM-VERDICT backend=portable result=pass tests=3 failed=0 exit=0 time=40.1s",
            "VM-VERDICT backend=kprobe result=fail tests=3 failed=1 exit=101 time=50.0s",
            "VM-DONE uptime=99s",
        ]
        .map(String::from)
        .to_vec();
        let v = judge(&console, &["portable"]);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.lines, ["portable: pass (3 tests, 0 failed, 40.1s in the guest)"]);
        let v = judge(&console, &["portable", "kprobe", "precise"]);
        assert_eq!(v.problems.len(), 2, "{:?}", v.problems);
        assert_eq!(doctor(&console), None);
        let lines = ["x", "VM-DOCTOR-BEGIN", "HOOK", "backend: auto", "VM-DOCTOR-END exit=0 time=1s"].map(String::from);
        assert_eq!(doctor(&lines).as_deref(), Some("HOOK\nbackend: auto\n"));
        let v = judge(&console[..1], &["portable"]);
        assert_eq!(v.problems, ["the guest did not get to the end of /init (no VM-DONE)"]);
    }
}
