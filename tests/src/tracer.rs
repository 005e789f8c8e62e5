//! Running `port-trace watch` as a child process: start it, wait for its
//! header (the sign that its programs are attached), stop it with SIGINT or
//! SIGTERM (or let `--duration` end it) and collect every line it wrote.
//! JSON output is parsed record by record; text output is kept as lines.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::Capture;

/// One line of the tracer's stdout.
#[derive(Clone, Debug)]
pub struct Line {
    /// The text without its newline (invalid UTF-8 replaced, see `utf8`).
    pub text: String,
    /// The line ended with `\n` (the contract: newline-terminated).
    pub terminated: bool,
    /// The line was valid UTF-8.
    pub utf8: bool,
}

/// What the tracer writes on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `--format json`: the first line is a JSON header, every line a JSON
    /// object.
    Json,
    /// `--format text`: the first line is the column header; lines are not
    /// parsed.
    Text,
}

/// A running tracer. Dropping it kills the process if it is still running.
pub struct Tracer {
    child: Option<Child>,
    lines: Receiver<Line>,
    seen: Vec<Line>,
    /// The JSON records among `seen` after the header, parsed by
    /// [`Tracer::wait_until`] (lines that are not JSON are left out here;
    /// stopping reports them).
    live: Vec<Value>,
    stderr: Option<Capture>,
    format: Format,
    spawned: Instant,
    /// The header record (the first line); `Null` in text mode.
    pub header: Value,
}

/// Everything a stopped tracer produced.
#[derive(Debug)]
pub struct TracerOutput {
    /// The header record (first line); `Null` in text mode.
    pub header: Value,
    /// Every record after the header, parsed (empty in text mode).
    pub records: Vec<Value>,
    /// Every stdout line as written, header included.
    pub lines: Vec<Line>,
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// From spawning the process until it had exited.
    pub ran_for: Duration,
}

impl Tracer {
    /// Starts `bin args...` with stdout and stderr piped and waits up to
    /// `header_timeout` for the first stdout line, which must be a JSON
    /// object with `"type":"header"`.
    pub fn start(bin: &Path, args: &[OsString], header_timeout: Duration) -> Result<Tracer> {
        Tracer::start_as(Format::Json, bin, args, header_timeout)
    }

    /// Like [`Tracer::start`] for `--format text`: the first line (the
    /// column header) is only awaited, not parsed; see [`Tracer::first_line`].
    pub fn start_text(bin: &Path, args: &[OsString], header_timeout: Duration) -> Result<Tracer> {
        Tracer::start_as(Format::Text, bin, args, header_timeout)
    }

    fn start_as(format: Format, bin: &Path, args: &[OsString], header_timeout: Duration) -> Result<Tracer> {
        if !bin.exists() {
            bail!(
                "tracer binary {} does not exist: build it (`cargo build -p port-trace`) or set PORT_TRACE_BIN",
                bin.display()
            );
        }
        let spawned = Instant::now();
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut buf = Vec::new();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let terminated = buf.last() == Some(&b'\n');
                        if terminated {
                            buf.pop();
                        }
                        let (text, utf8) = match String::from_utf8(buf) {
                            Ok(s) => (s, true),
                            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), false),
                        };
                        if tx.send(Line { text, terminated, utf8 }).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = Capture::start(stderr);
        let mut t = Tracer {
            child: Some(child),
            lines,
            seen: Vec::new(),
            live: Vec::new(),
            stderr: Some(stderr),
            format,
            spawned,
            header: Value::Null,
        };
        let first = match t.lines.recv_timeout(header_timeout) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                let err = t.kill_and_stderr();
                bail!("no header from the tracer within {header_timeout:?}; stderr:\n{err}");
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = t.child.as_mut().map(|c| c.wait());
                let err = t.kill_and_stderr();
                bail!("the tracer closed stdout before its header (exit: {status:?}); stderr:\n{err}");
            }
        };
        if format == Format::Json {
            t.header = match serde_json::from_str::<Value>(&first.text) {
                Ok(v) if v["type"] == "header" => v,
                _ => {
                    let err = t.kill_and_stderr();
                    bail!("the tracer's first line is not a JSON header: {}\nstderr:\n{err}", first.text);
                }
            };
        }
        t.seen.push(first);
        Ok(t)
    }

    /// The first stdout line (the header), as written.
    pub fn first_line(&self) -> &str {
        self.seen.first().map_or("", |l| l.text.as_str())
    }

    /// Reads lines as they come until `done` holds for the records so far
    /// (the header excluded, in order) or `timeout` has passed; returns
    /// whether `done` held. The records stay part of what stopping returns.
    /// JSON mode only (in text mode nothing is parsed and `done` sees none).
    pub fn wait_until(&mut self, timeout: Duration, mut done: impl FnMut(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.live) {
                return true;
            }
            let first = match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => l,
                Err(_) => return done(&self.live),
            };
            // Everything already there, before asking `done` again.
            for l in std::iter::once(first).chain(std::iter::from_fn(|| self.lines.try_recv().ok())) {
                if self.format == Format::Json {
                    if let Ok(v) = serde_json::from_str::<Value>(&l.text) {
                        self.live.push(v);
                    }
                }
                self.seen.push(l);
            }
        }
    }

    /// The records [`Tracer::wait_until`] has read so far (header excluded).
    pub fn records_so_far(&self) -> &[Value] {
        &self.live
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGINT and collects every line until the process exits; after
    /// `timeout` it is killed and this fails. In JSON mode a stdout line
    /// that is not a JSON object fails too, with the line shown.
    pub fn stop(self, timeout: Duration) -> Result<TracerOutput> {
        self.finish(Some(libc::SIGINT), timeout)
    }

    /// Like [`Tracer::stop`], with SIGTERM instead of SIGINT.
    pub fn terminate(self, timeout: Duration) -> Result<TracerOutput> {
        self.finish(Some(libc::SIGTERM), timeout)
    }

    /// Sends no signal: waits up to `timeout` for the process to end by
    /// itself (`--duration`), then collects like [`Tracer::stop`].
    pub fn wait(self, timeout: Duration) -> Result<TracerOutput> {
        self.finish(None, timeout)
    }

    fn finish(mut self, signal: Option<libc::c_int>, timeout: Duration) -> Result<TracerOutput> {
        let deadline = Instant::now() + timeout;
        let how = match signal {
            Some(libc::SIGINT) => "of SIGINT",
            Some(libc::SIGTERM) => "of SIGTERM",
            Some(_) => "of the signal",
            None => "(no signal sent)",
        };
        if let Some(sig) = signal {
            let pid = libc::pid_t::try_from(self.pid())?;
            // SAFETY: plain kill(2) on our own child, which has not been reaped.
            if unsafe { libc::kill(pid, sig) } != 0 {
                bail!("signal {sig} to the tracer: {}", std::io::Error::last_os_error());
            }
        }
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => self.seen.push(l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let err = self.kill_and_stderr();
                    bail!(
                        "the tracer did not exit within {timeout:?} {how} (killed); last lines:\n{}\nstderr:\n{err}",
                        tail(&self.seen, 10)
                    );
                }
            }
        }
        let child = self.child.as_mut().expect("child present until stop");
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let err = self.kill_and_stderr();
                bail!("the tracer closed stdout but did not exit within {timeout:?} {how} (killed); stderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let ran_for = self.spawned.elapsed();
        self.child = None;
        let stderr = self.take_stderr();
        let mut records = Vec::new();
        let json_lines = if self.format == Format::Json { self.seen.len() } else { 0 };
        for (i, l) in self.seen.iter().enumerate().take(json_lines).skip(1) {
            let v: Value = serde_json::from_str(&l.text).map_err(|e| {
                anyhow!("tracer stdout line {} is not JSON ({e}): {}\nstderr:\n{stderr}", i + 1, l.text)
            })?;
            if !v.is_object() {
                bail!("tracer stdout line {} is not a JSON object: {}", i + 1, l.text);
            }
            records.push(v);
        }
        Ok(TracerOutput {
            header: std::mem::take(&mut self.header),
            records,
            lines: std::mem::take(&mut self.seen),
            status,
            stderr,
            ran_for,
        })
    }

    /// Kills the process (if still running) and returns its stderr so far.
    fn kill_and_stderr(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.take_stderr()
    }

    /// Stderr until EOF (the process has exited), or what came within 2 s.
    fn take_stderr(&mut self) -> String {
        crate::take_text(&mut self.stderr)
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl TracerOutput {
    /// Problems with how a JSON run ended: exit status not 0, last line not
    /// a `summary`, lines that are not newline-terminated UTF-8.
    pub fn exit_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.status.success() {
            p.push(format!("the tracer exited with {} (want 0)", self.status));
        }
        match self.records.last() {
            Some(r) if r["type"] == "summary" => {}
            Some(r) => p.push(format!("the last line is not a summary: {r}")),
            None => p.push("no line after the header (no summary)".into()),
        }
        for (i, l) in self.lines.iter().enumerate() {
            if !l.terminated {
                p.push(format!("line {} is not newline-terminated", i + 1));
            }
            if !l.utf8 {
                p.push(format!("line {} is not valid UTF-8", i + 1));
            }
        }
        p
    }

    /// All stdout lines, numbered, for failure messages.
    pub fn dump(&self) -> String {
        tail(&self.lines, usize::MAX)
    }
}

fn tail(lines: &[Line], n: usize) -> String {
    let start = lines.len().saturating_sub(n);
    lines[start..].iter().enumerate().map(|(i, l)| format!("{:4}: {}\n", start + i + 1, l.text)).collect()
}
