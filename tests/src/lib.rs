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
//!   every line collected. [`LiveSession`] does the same in steps, for tests
//!   that act on the namespace while the tracer runs (and read its records
//!   as they come); [`HeldWorkload`] is a workload that keeps its sockets
//!   open until told to let go.
//! - [`ss`]: the namespace's sockets as the kernel lists them (`ss`), and
//!   `ss -K` to end TIME_WAIT early.
//! - [`check`]: the exact comparison of the tracer's records with the truth.
//!
//! The kernel tests (tests/kernel.rs) and some harness tests need root; see
//! [`require_root`] for the only way to skip them.

pub mod check;
pub mod listener;
pub mod netns;
pub mod procnet;
pub mod rfc3339;
pub mod ss;
pub mod tracer;
pub mod truth;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde_json::Value;

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

/// Sends `sig` to `pid` (a child of ours, not yet reaped); panics when
/// kill(2) fails.
pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: plain kill(2).
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

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

/// `watch --format json --netns PATH` plus `more` and
/// [`tracer_extra_args`], as arguments.
pub fn watch_json_args(ns: &NetNs, more: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["watch".into(), "--format".into(), "json".into(), "--netns".into()];
    args.push(ns.path().into());
    args.extend(more.iter().map(OsString::from));
    args.extend(tracer_extra_args());
    args
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

/// The lines of a child's piped stdout, read by a background thread (so
/// that waiting for one can time out); the channel ends at EOF.
pub fn stdout_lines(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
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
    output_with_input(cmd, None, timeout)
}

/// [`output_with_timeout`], writing `input` (when given) to its stdin.
pub fn output_with_input(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    // A thread, so that a child that fills its stdout before reading all of
    // its stdin cannot dead-lock with us.
    let writer = match (input, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => {
            let input = input.to_vec();
            Some(std::thread::spawn(move || pipe.write_all(&input)))
        }
        _ => None,
    };
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
    if let Some(writer) = writer {
        // A child that exits without reading all of it is not an error here.
        let _ = writer.join();
    }
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

/// The full comparison of a run: the workload did what `scenario` promises
/// (see [`Truth::scenario_problems`]), then [`assert_report`]. Fails with
/// the difference table and both sides in full.
pub fn assert_matches_truth(s: &Session, scenario: &str, report: check::Report, more: Vec<check::Finding>) {
    let shape = s.truth.scenario_problems(scenario, s.ephemeral_range);
    assert!(shape.is_empty(), "the workload did not do what `{scenario}` promises: {shape:#?}\n{:#?}", s.truth);
    assert_report(s, &format!("`{scenario}`"), report, more);
}

/// Every record matches its truth (`report`, usually from
/// [`check::check_lifecycles`]), the records keep the contract
/// ([`check::check_schema`]), the header, exit and summary are right
/// ([`Session::run_problems`]), plus `more` findings of the test's own.
/// Fails with the difference table and both sides in full; `what` names the
/// run in messages.
pub fn assert_report(s: &Session, what: &str, mut report: check::Report, more: Vec<check::Finding>) {
    report.findings.extend(check::check_schema(&s.tracer.records, s.netns_inode, s.window()).findings);
    report.findings.extend(more);
    let run = s.run_problems();
    for p in &run {
        report.notes.push(format!("run: {p}"));
    }
    eprintln!("{what} in netns {} (inode {}):\n{report}", s.netns_name, s.netns_inode);
    assert!(
        report.ok() && run.is_empty(),
        "port-trace's records differ from the workload's truth ({what}, netns {}, inode {}):\n{report}\n\
         header: {}\ntracer stderr:\n{}",
        s.netns_name,
        s.netns_inode,
        s.tracer.header,
        s.tracer.stderr
    );
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
    let live = LiveSession::start(opts)?;
    let truth = run_workload(live.ns(), workload, scenario)?;
    std::thread::sleep(DRAIN);
    live.finish(truth)
}

/// A fresh namespace prepared as `opts` says (its ephemeral range), for a
/// test that sets things up in it before [`LiveSession::start_in`].
pub fn prepare_netns(opts: &SessionOptions) -> Result<NetNs> {
    let ns = NetNs::new()?;
    if let Some((lo, hi)) = opts.ephemeral_range {
        ns.sysctl("net.ipv4.ip_local_port_range", &format!("{lo} {hi}"))?;
    }
    Ok(ns)
}

/// A traced session in steps: the tracer runs in its namespace while the
/// test does what it needs there (workloads, `ss -K`, ...), reading the
/// tracer's records as they come if it likes ([`Tracer::wait_until`]); then
/// [`LiveSession::finish`] stops it and makes the [`Session`]. Dropping it
/// kills the tracer and deletes the namespace.
pub struct LiveSession {
    tracer: Option<Tracer>,
    stopped: Option<(TracerOutput, UnixNanos)>,
    ephemeral_range: (u16, u16),
    started: UnixNanos,
    stop_signal: libc::c_int,
    // Last: the namespace goes after the tracer.
    ns: NetNs,
}

impl LiveSession {
    /// A fresh namespace ([`prepare_netns`]) with the tracer started in it.
    pub fn start(opts: &SessionOptions) -> Result<LiveSession> {
        LiveSession::start_in(prepare_netns(opts)?, opts)
    }

    /// Starts `port-trace watch --format json --netns PATH` (plus
    /// `opts.extra_args` and [`tracer_extra_args`]) on `ns` and waits for
    /// its header.
    pub fn start_in(ns: NetNs, opts: &SessionOptions) -> Result<LiveSession> {
        if !matches!(opts.stop_signal, libc::SIGINT | libc::SIGTERM) {
            bail!("stop signal {} is not SIGINT or SIGTERM", opts.stop_signal);
        }
        let ephemeral_range = ns.ephemeral_range()?;
        let started = rfc3339::unix_nanos(SystemTime::now());
        let mut args: Vec<OsString> =
            vec!["watch".into(), "--format".into(), "json".into(), "--netns".into(), ns.path().into()];
        args.extend(opts.extra_args.iter().cloned());
        args.extend(tracer_extra_args());
        let tracer = Tracer::start(&tracer_bin(), &args, HEADER_TIMEOUT)?;
        Ok(LiveSession {
            tracer: Some(tracer),
            stopped: None,
            ephemeral_range,
            started,
            stop_signal: opts.stop_signal,
            ns,
        })
    }

    /// The traced namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The running tracer (see [`Tracer::wait_until`]); `None` once
    /// stopped.
    pub fn tracer(&mut self) -> Option<&mut Tracer> {
        self.tracer.as_mut()
    }

    /// Stops the tracer now (the stop signal of the options), keeping the
    /// namespace and what is in it; [`LiveSession::finish`] returns what it
    /// printed. Does nothing when already stopped.
    pub fn stop(&mut self) -> Result<()> {
        let Some(tracer) = self.tracer.take() else {
            return Ok(());
        };
        let out = match self.stop_signal {
            libc::SIGTERM => tracer.terminate(STOP_TIMEOUT)?,
            _ => tracer.stop(STOP_TIMEOUT)?,
        };
        self.stopped = Some((out, rfc3339::unix_nanos(SystemTime::now())));
        Ok(())
    }

    /// Stops the tracer (unless [`LiveSession::stop`] did), deletes the
    /// namespace and returns the session with `truth`.
    pub fn finish(mut self, truth: Truth) -> Result<Session> {
        self.stop()?;
        let (tracer, ended) = self.stopped.take().context("the tracer was stopped but left no output")?;
        Ok(Session {
            netns_name: self.ns.name().to_owned(),
            netns_inode: self.ns.inode(),
            ephemeral_range: self.ephemeral_range,
            truth,
            tracer,
            started: self.started,
            ended,
        })
    }
}

/// A workload scenario that keeps its sockets open until told to let go
/// (`hold`, `churn`): it prints a `{"op":"ready",...}` line once they are
/// open and then waits for a line on its stdin. Dropping it kills the
/// process.
pub struct HeldWorkload {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stdout: Vec<String>,
    stderr: Option<Capture>,
    /// The `ready` line.
    pub ready: Value,
}

impl HeldWorkload {
    /// Starts `workload scenario` inside `ns` and waits up to `timeout` for
    /// its `ready` line.
    pub fn start(ns: &NetNs, workload: &Path, scenario: &str, timeout: Duration) -> Result<HeldWorkload> {
        HeldWorkload::start_until(ns, workload, scenario, "ready", timeout)
    }

    /// Starts `workload scenario` inside `ns` and waits up to `timeout` for
    /// its line `{"op": op, ...}` (kept as [`HeldWorkload::ready`]).
    pub fn start_until(
        ns: &NetNs,
        workload: &Path,
        scenario: &str,
        op: &str,
        timeout: Duration,
    ) -> Result<HeldWorkload> {
        let mut child = ns
            .command(workload)
            .arg(scenario)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the workload `{scenario}`"))?;
        let lines = stdout_lines(&mut child);
        let mut w = HeldWorkload {
            stdin: child.stdin.take(),
            stderr: child.stderr.take().map(Capture::start),
            child,
            lines,
            stdout: Vec::new(),
            ready: Value::Null,
        };
        w.await_op(scenario, op, timeout)?;
        Ok(w)
    }

    /// Writes `line` to the workload's stdin (a scenario that waits at a
    /// step goes on), then waits up to `timeout` for its line
    /// `{"op": op, ...}`, which becomes [`HeldWorkload::ready`].
    pub fn proceed(&mut self, line: &str, op: &str, timeout: Duration) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the workload's stdin is closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).context("writing to the workload's stdin")?;
        stdin.flush().context("writing to the workload's stdin")?;
        self.await_op("(proceeding)", op, timeout)
    }

    /// Waits up to `timeout` for a line `{"op": op, ...}`; kills the
    /// workload and fails with its output when none comes.
    fn await_op(&mut self, scenario: &str, op: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let v: Option<Value> = serde_json::from_str(&line).ok();
                    self.stdout.push(line);
                    if let Some(v) = v.filter(|v| v["op"] == op) {
                        self.ready = v;
                        return Ok(());
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    let status = self.child.wait();
                    let why = if e == RecvTimeoutError::Timeout { "in time" } else { "before closing stdout" };
                    bail!(
                        "the workload `{scenario}` printed no {op} line {why} (exit: {status:?}):\nstdout:\n{}\nstderr:\n{}",
                        self.stdout.join("\n"),
                        self.take_stderr()
                    );
                }
            }
        }
    }

    /// The process id (the workload's own: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the line that makes the workload close its sockets, waits up
    /// to [`WORKLOAD_TIMEOUT`] for it to exit and parses its truth; fails
    /// when it exits non-zero.
    pub fn release(mut self) -> Result<Truth> {
        if let Some(mut stdin) = self.stdin.take() {
            stdin.write_all(b"go\n").context("writing to the workload's stdin")?;
        }
        let deadline = Instant::now() + WORKLOAD_TIMEOUT;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.stdout.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    bail!("the workload did not finish within {WORKLOAD_TIMEOUT:?} after its release (killed)");
                }
            }
        }
        let status = self.child.wait().context("waiting for the workload")?;
        let stdout = self.stdout.join("\n");
        if !status.success() {
            bail!("the workload failed ({status}):\nstderr:\n{}\nstdout:\n{stdout}", self.take_stderr());
        }
        Truth::parse(&stdout).with_context(|| format!("workload output:\n{stdout}"))
    }

    fn take_stderr(&mut self) -> String {
        take_text(&mut self.stderr)
    }
}

impl Drop for HeldWorkload {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}

/// What a capture got (within 2 s), as text; empty when already taken.
pub fn take_text(capture: &mut Option<Capture>) -> String {
    capture.take().map(|c| String::from_utf8_lossy(&c.finish(Duration::from_secs(2))).into_owned()).unwrap_or_default()
}

/// Kills and reaps `child` unless it has exited: what a helper process's
/// guard does when a test ends early.
pub fn kill_if_running(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
