//! Running `port-trace watch --format json` as a child process: start it,
//! wait for its header (the sign that its programs are attached), stop it
//! with SIGINT and collect every line it wrote.

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

/// A running tracer. Dropping it kills the process if it is still running.
pub struct Tracer {
    child: Option<Child>,
    lines: Receiver<Line>,
    seen: Vec<Line>,
    stderr: Option<Capture>,
    /// The header record (the first line).
    pub header: Value,
}

/// Everything a stopped tracer produced.
#[derive(Debug)]
pub struct TracerOutput {
    /// The header record (first line).
    pub header: Value,
    /// Every record after the header, parsed.
    pub records: Vec<Value>,
    /// Every stdout line as written, header included.
    pub lines: Vec<Line>,
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Tracer {
    /// Starts `bin args...` with stdout and stderr piped and waits up to
    /// `header_timeout` for the first stdout line, which must be a JSON
    /// object with `"type":"header"`.
    pub fn start(bin: &Path, args: &[OsString], header_timeout: Duration) -> Result<Tracer> {
        if !bin.exists() {
            bail!(
                "tracer binary {} does not exist: build it (`cargo build -p port-trace`) or set PORT_TRACE_BIN",
                bin.display()
            );
        }
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
        let mut t = Tracer { child: Some(child), lines, seen: Vec::new(), stderr: Some(stderr), header: Value::Null };
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
        t.header = match serde_json::from_str::<Value>(&first.text) {
            Ok(v) if v["type"] == "header" => v,
            _ => {
                let err = t.kill_and_stderr();
                bail!("the tracer's first line is not a JSON header: {}\nstderr:\n{err}", first.text);
            }
        };
        t.seen.push(first);
        Ok(t)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGINT and collects every line until the process exits; after
    /// `timeout` it is killed and this fails. A stdout line that is not a
    /// JSON object fails too, with the line shown.
    pub fn stop(mut self, timeout: Duration) -> Result<TracerOutput> {
        let deadline = Instant::now() + timeout;
        let pid = libc::pid_t::try_from(self.pid())?;
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            bail!("SIGINT to the tracer: {}", std::io::Error::last_os_error());
        }
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => self.seen.push(l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let err = self.kill_and_stderr();
                    bail!(
                        "the tracer did not exit within {timeout:?} of SIGINT (killed); last lines:\n{}\nstderr:\n{err}",
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
                bail!(
                    "the tracer closed stdout but did not exit within {timeout:?} of SIGINT (killed); stderr:\n{err}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        let stderr = self.take_stderr();
        let mut records = Vec::new();
        for (i, l) in self.seen.iter().enumerate().skip(1) {
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
        self.stderr
            .take()
            .map(|c| String::from_utf8_lossy(&c.finish(Duration::from_secs(2))).into_owned())
            .unwrap_or_default()
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
    /// Problems with how the run ended: exit status not 0, last line not a
    /// `summary`, lines that are not newline-terminated UTF-8.
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
