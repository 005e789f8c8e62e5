//! End-to-end tests for port-trace.
//!
//! The pieces:
//!
//! - `port-workload` (src/bin): performs socket operations and prints what
//!   it saw ([`truth`]), checked against the kernel's own tables
//!   ([`procnet`]).
//! - [`netns::NetNs`]: a private network namespace per run, so that every
//!   port event in it belongs to the workload.
//! - [`tracer::Tracer`]: `port-trace watch --format json` as a child
//!   process.
//! - [`run_session`] / [`run_session_with`]: all of the above in order:
//!   namespace, tracer (until its header), workload, SIGINT (or SIGTERM),
//!   every line collected.
//! - [`check`]: the exact comparison of the tracer's records with the truth.
//!
//! The kernel tests (tests/kernel.rs) and some harness tests need root; see
//! [`require_root`] for the only way to skip them.

pub mod check;
pub mod netns;
pub mod procnet;
pub mod rfc3339;
pub mod tracer;
pub mod truth;

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::netns::NetNs;
use crate::rfc3339::UnixNanos;
use crate::tracer::{Tracer, TracerOutput};
use crate::truth::Truth;

/// How long the tracer may take to print its header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the workload may run.
pub const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after the workload, for the tracer to drain its buffers.
pub const DRAIN: Duration = Duration::from_secs(1);
/// How long the tracer may take to exit after SIGINT.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate lives inside the workspace").to_path_buf()
}

/// The tracer to test: `$PORT_TRACE_BIN`, else
/// `<workspace>/target/debug/port-trace`.
pub fn tracer_bin() -> PathBuf {
    std::env::var_os("PORT_TRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/port-trace"))
}

/// `$PORT_TRACE_EXTRA_ARGS` split at whitespace: arguments appended to
/// every tracer command line (`cargo xtask vm-test` sets `--backend B`).
pub fn tracer_extra_args() -> Vec<OsString> {
    std::env::var("PORT_TRACE_EXTRA_ARGS").unwrap_or_default().split_whitespace().map(OsString::from).collect()
}

/// Whether a test that needs root may run.
///
/// As root: true. Otherwise the test fails, because a test that reports
/// `ok` without having run would be a lie, unless the person running it
/// opted out with `PORT_TRACE_SKIP_KERNEL_TESTS=1`: then this prints why
/// and returns false. With `CI=true` (CI runs as root) the opt-out is
/// refused.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let opt_out = std::env::var("PORT_TRACE_SKIP_KERNEL_TESTS").is_ok_and(|v| v == "1");
    if opt_out && !ci {
        eprintln!("SKIPPED {test}: needs root (PORT_TRACE_SKIP_KERNEL_TESTS=1)");
        return false;
    }
    panic!(
        "{test}: needs root (network namespaces, eBPF){}",
        if ci { "; CI=true forbids skipping" } else { "; run as root, or set PORT_TRACE_SKIP_KERNEL_TESTS=1 to skip" }
    );
}

/// Everything read from a pipe so far, by a background thread.
///
/// Unlike joining a reader thread, [`Capture::finish`] cannot hang when a
/// grandchild still holds the pipe open after its parent was killed.
pub struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: JoinHandle<()>,
}

impl Capture {
    /// Starts reading `r` until EOF.
    pub fn start(mut r: impl Read + Send + 'static) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::clone(&buf);
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = r.read(&mut chunk) {
                b.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(&chunk[..n]);
            }
        });
        Capture { buf, thread }
    }

    /// Waits up to `grace` for EOF, then returns what was read.
    pub fn finish(self, grace: Duration) -> Vec<u8> {
        let deadline = Instant::now() + grace;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Runs `cmd` with stdout and stderr captured; kills it and fails after
/// `timeout`.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let out = Capture::start(child.stdout.take().expect("piped"));
    let err = Capture::start(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err.finish(Duration::from_secs(1))).into_owned();
            bail!("{cmd:?} did not finish within {timeout:?} (killed); stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let grace = Duration::from_secs(2);
    Ok(Output { status, stdout: out.finish(grace), stderr: err.finish(grace) })
}

/// Runs `workload scenario` inside `ns` and parses its truth; fails when it
/// exits non-zero (a scenario the kernel did not play along with).
pub fn run_workload(ns: &NetNs, workload: &Path, scenario: &str) -> Result<Truth> {
    let out = output_with_timeout(ns.command(workload).arg(scenario), WORKLOAD_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the workload failed ({}):\nstderr:\n{}\nstdout:\n{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Truth::parse(&stdout).with_context(|| format!("workload output:\n{stdout}"))
}

/// A traced workload run and everything it produced.
#[derive(Debug)]
pub struct Session {
    /// The namespace's name (deleted by now).
    pub netns_name: String,
    /// The namespace inode, which every record must carry.
    pub netns_inode: u64,
    /// The namespace's `ip_local_port_range` during the run.
    pub ephemeral_range: (u16, u16),
    /// What the workload did and saw.
    pub truth: Truth,
    /// What the tracer printed, and how it ended.
    pub tracer: TracerOutput,
    /// Wall clock before the tracer started.
    pub started: UnixNanos,
    /// Wall clock after the tracer exited.
    pub ended: UnixNanos,
}

impl Session {
    /// The run's time window, for timestamp checks.
    pub fn window(&self) -> check::Window {
        check::Window { start: self.started, end: self.ended }
    }

    /// What the header must agree with: this namespace's range, this
    /// machine's kernel, this workspace's version, this run's time.
    pub fn header_truth(&self) -> check::HeaderTruth {
        check::HeaderTruth {
            ephemeral_range: self.ephemeral_range,
            kernel_release: kernel_release(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            window: self.window(),
        }
    }

    /// Everything wrong with the run's frame: the header (see
    /// [`check::check_header`]), how the tracer exited, and the closing
    /// summary (see [`check::check_summary`]). Empty when all is well.
    pub fn run_problems(&self) -> Vec<String> {
        let mut p = check::check_header(&self.tracer.header, &self.header_truth());
        p.extend(self.tracer.exit_problems());
        p.extend(check::check_summary(&self.tracer.records));
        p
    }
}

/// `/proc/sys/kernel/osrelease`, trimmed (empty if unreadable).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// How [`run_session_with`] runs the tracer.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Set the namespace's `net.ipv4.ip_local_port_range` to this first.
    pub ephemeral_range: Option<(u16, u16)>,
    /// Extra arguments after `watch --format json --netns PATH`, e.g.
    /// `--skip-mechanism tp_btf`.
    pub extra_args: Vec<OsString>,
    /// The signal that ends the run: SIGINT (the default) or SIGTERM.
    pub stop_signal: libc::c_int,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { ephemeral_range: None, extra_args: Vec::new(), stop_signal: libc::SIGINT }
    }
}

/// Runs one traced session: a fresh namespace (with `ephemeral_range` set
/// when given), `port-trace watch --format json --netns /run/netns/NAME`
/// until its header, `workload scenario` inside the namespace, a pause of
/// [`DRAIN`], SIGINT, and every line until the tracer exits. The namespace
/// is deleted before this returns, also on failure.
pub fn run_session(workload: &Path, scenario: &str, ephemeral_range: Option<(u16, u16)>) -> Result<Session> {
    run_session_with(workload, scenario, &SessionOptions { ephemeral_range, ..SessionOptions::default() })
}

/// [`run_session`] with more control: extra tracer arguments and the stop
/// signal (see [`SessionOptions`]).
pub fn run_session_with(workload: &Path, scenario: &str, opts: &SessionOptions) -> Result<Session> {
    let ns = NetNs::new()?;
    if let Some((lo, hi)) = opts.ephemeral_range {
        ns.sysctl("net.ipv4.ip_local_port_range", &format!("{lo} {hi}"))?;
    }
    let range = ns.ephemeral_range()?;
    let started = rfc3339::unix_nanos(SystemTime::now());
    let mut args: Vec<OsString> =
        vec!["watch".into(), "--format".into(), "json".into(), "--netns".into(), ns.path().into()];
    args.extend(opts.extra_args.iter().cloned());
    args.extend(tracer_extra_args());
    let tracer = Tracer::start(&tracer_bin(), &args, HEADER_TIMEOUT)?;
    let truth = run_workload(&ns, workload, scenario)?;
    std::thread::sleep(DRAIN);
    let out = match opts.stop_signal {
        libc::SIGINT => tracer.stop(STOP_TIMEOUT)?,
        libc::SIGTERM => tracer.terminate(STOP_TIMEOUT)?,
        other => bail!("run_session_with: stop signal {other} is not SIGINT or SIGTERM"),
    };
    let ended = rfc3339::unix_nanos(SystemTime::now());
    Ok(Session {
        netns_name: ns.name().to_owned(),
        netns_inode: ns.inode(),
        ephemeral_range: range,
        truth,
        tracer: out,
        started,
        ended,
    })
}
