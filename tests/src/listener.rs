//! Helpers for the `who` and `notice` tests: [`Listener`], a
//! `port-listener` process holding a chosen port in a namespace (its pid,
//! comm and port as it reports them), and [`LineChild`], a command whose
//! stdout lines are read as they come, each with the test's clock at its
//! arrival (for `who --follow`, which prints no header).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::netns::NetNs;
use crate::Capture;

/// A process's stdout, line by line, each line stamped with
/// [`Instant::now`] when the reader thread got it.
struct StampedLines {
    rx: Receiver<(String, Instant)>,
}

impl StampedLines {
    fn start(child: &mut Child) -> StampedLines {
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((line, Instant::now())).is_err() {
                    break;
                }
            }
        });
        StampedLines { rx }
    }
}

/// A `port-listener` holding a TCP port inside a namespace. Dropping it
/// kills the process.
pub struct Listener {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: StampedLines,
    stderr: Option<Capture>,
    /// The pid it reported (`getpid`).
    pub pid: u32,
    /// The command name it reported (`/proc/self/comm` after
    /// `PR_SET_NAME`).
    pub comm: String,
    /// The local address it reported (`getsockname`).
    pub addr: String,
    /// The port it reported (`getsockname`).
    pub port: u16,
    /// The test's clock when its `listening` line arrived.
    pub listening_at: Instant,
}

impl Listener {
    /// Starts `bin PORT COMM [ADDR] TAGS...` inside `ns` (with ADDR only when
    /// given) and waits up to `timeout` for its `listening` line; fails
    /// when it reports something other than `comm` and `port`.
    pub fn start(
        ns: &NetNs,
        bin: &Path,
        port: u16,
        comm: &str,
        addr: Option<&str>,
        tags: &[&str],
        timeout: Duration,
    ) -> Result<Listener> {
        let mut cmd = ns.command(bin);
        // ADDR is positional before the tags: always give it.
        cmd.arg(port.to_string()).arg(comm).arg(addr.unwrap_or("127.0.0.1")).args(tags);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let lines = StampedLines::start(&mut child);
        let mut l = Listener {
            stdin: child.stdin.take(),
            stderr: child.stderr.take().map(Capture::start),
            child,
            lines,
            pid: 0,
            comm: String::new(),
            addr: String::new(),
            port: 0,
            listening_at: Instant::now(),
        };
        let (line, at) = match l.lines.rx.recv_timeout(timeout) {
            Ok(got) => got,
            Err(e) => {
                let _ = l.child.kill();
                let status = l.child.wait();
                let why = if e == RecvTimeoutError::Timeout { "in time" } else { "before closing stdout" };
                bail!("{cmd:?} reported nothing {why} (exit: {status:?}); stderr:\n{}", l.take_stderr());
            }
        };
        let v: Value = serde_json::from_str(&line).with_context(|| format!("port-listener printed {line:?}"))?;
        if v["op"] != "listening" {
            bail!("port-listener's first line is not `listening`: {line}");
        }
        l.pid = v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).context("no pid")?;
        l.comm = v["comm"].as_str().context("no comm")?.to_owned();
        l.addr = v["addr"].as_str().context("no addr")?.to_owned();
        l.port = v["port"].as_u64().and_then(|p| u16::try_from(p).ok()).context("no port")?;
        l.listening_at = at;
        if l.comm != comm || l.port != port {
            bail!("port-listener reports comm {:?} port {}, asked for {comm:?} {port}", l.comm, l.port);
        }
        Ok(l)
    }

    /// Closes its stdin: it closes the socket and exits; waits up to
    /// `timeout` and fails unless it exited 0.
    pub fn release(mut self, timeout: Duration) -> Result<()> {
        drop(self.stdin.take());
        let status = wait_for_exit(&mut self.child, timeout)?;
        if !status.success() {
            bail!("port-listener exited with {status}; stderr:\n{}", self.take_stderr());
        }
        Ok(())
    }

    /// Kills it (SIGKILL: the kernel closes the socket) and reaps it.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill().context("killing port-listener")?;
        self.child.wait().context("reaping port-listener")?;
        Ok(())
    }

    fn take_stderr(&mut self) -> String {
        crate::take_text(&mut self.stderr)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        crate::kill_if_running(&mut self.child);
    }
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the process did not exit within {timeout:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One stdout line of a [`LineChild`].
#[derive(Clone, Debug)]
pub struct StampedLine {
    /// The text without its newline.
    pub text: String,
    /// The line parsed as JSON (`Null` when it is not).
    pub json: Value,
    /// The test's clock when the line arrived.
    pub at: Instant,
}

/// What a stopped [`LineChild`] produced.
#[derive(Debug)]
pub struct LineChildOutput {
    /// Every stdout line, in order.
    pub lines: Vec<StampedLine>,
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// A running command (e.g. `port-trace who --follow`) whose stdout lines
/// are collected as they come. Dropping it kills the process.
pub struct LineChild {
    child: Option<Child>,
    lines: StampedLines,
    seen: Vec<StampedLine>,
    stderr: Option<Capture>,
}

impl LineChild {
    /// Starts `program args...` with stdin closed and stdout, stderr piped.
    pub fn start<I, S>(program: &Path, args: I) -> Result<LineChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let lines = StampedLines::start(&mut child);
        let stderr = child.stderr.take().map(Capture::start);
        Ok(LineChild { child: Some(child), lines, seen: Vec::new(), stderr })
    }

    /// Reads lines until `done` holds for the lines so far or `timeout`
    /// has passed (or stdout closed); returns whether `done` held.
    pub fn wait_until(&mut self, timeout: Duration, mut done: impl FnMut(&[StampedLine]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.seen) {
                return true;
            }
            match self.lines.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((text, at)) => {
                    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                    self.seen.push(StampedLine { text, json, at });
                }
                Err(_) => return done(&self.seen),
            }
        }
    }

    /// The lines read so far.
    pub fn lines(&self) -> &[StampedLine] {
        &self.seen
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (e.g. SIGINT), then collects every line until the
    /// process exits; kills it and fails after `timeout`.
    pub fn signal_and_wait(mut self, signal: libc::c_int, timeout: Duration) -> Result<LineChildOutput> {
        let pid = libc::pid_t::try_from(self.pid())?;
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("signal {signal} to {pid}: {}", std::io::Error::last_os_error());
        }
        let deadline = Instant::now() + timeout;
        // Until stdout closes (the process exited, or a grandchild holds it).
        self.wait_until(timeout, |_| false);
        let mut child = self.child.take().expect("child present until stopped");
        let status = wait_for_exit(&mut child, deadline.saturating_duration_since(Instant::now()))
            .with_context(|| format!("after signal {signal}"))?;
        let stderr = self
            .stderr
            .take()
            .map(|c| String::from_utf8_lossy(&c.finish(Duration::from_secs(2))).into_owned())
            .unwrap_or_default();
        Ok(LineChildOutput { lines: std::mem::take(&mut self.seen), status, stderr })
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
