//! Kernel tests of issue 6: `port-trace top`, the full-screen view, in a
//! real terminal.
//!
//! The terminal is a tmux pane (a private server per test, `tmux -L NAME`,
//! killed again by a guard on every path) running
//! `port-trace top --netns /run/netns/NAME`. The screen is read with
//! `tmux capture-pane`, keys are typed with `tmux send-keys`. A shell
//! around the tracer saves the terminal's modes (`stty -g`) before and after
//! it and its exit status, and stays, so that tmux can still tell whether
//! the terminal was left on the alternate screen or with a hidden cursor
//! (tmux resets both in a dead pane).
//!
//! Every expectation on the screen is a workload's own truth: the port the
//! `port-listener` bound and the comm it gave itself, its pid; the ports the
//! `hold` workload got from `getsockname`; the pid of `port-storm`.
//! They need root (see `require_root`) and tmux.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use port_trace_integration::listener::Listener;
use port_trace_integration::netns::NetNs;
use port_trace_integration::{
    output_with_timeout, prepare_netns, require_root, tracer_bin, tracer_extra_args, HeldWorkload, SessionOptions,
    HEADER_TIMEOUT,
};
use serde_json::Value;

const LISTENER: &str = env!("CARGO_BIN_EXE_port-listener");
const WORKLOAD: &str = env!("CARGO_BIN_EXE_port-workload");
const STORM: &str = env!("CARGO_BIN_EXE_port-storm");

/// The namespaces' `ip_local_port_range`; the listeners' ports lie below.
const RANGE: (u16, u16) = (40000, 44999);

/// How long a workload may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the screen may take to show what the test caused (it is
/// redrawn every 100 ms; this is for a loaded machine).
const SCREEN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `top` may take to exit after `q` or Ctrl-C (it drains the ring
/// and prints its summary).
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long one tmux command may take.
const TMUX_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the screen is read while waiting.
const POLL: Duration = Duration::from_millis(200);

/// The storm lasts longer than any test; it is killed at the end.
const STORM_SECONDS: &str = "300";

// ---------------------------------------------------------------------
// The terminal: a private tmux server.
// ---------------------------------------------------------------------

/// A private tmux server (`tmux -L NAME`) with one session, `top`, whose
/// pane runs `port-trace top` through `sh`: the shell saves the terminal's
/// modes (`stty -g`) before and after it, writes its exit status to a file,
/// and stays (so that tmux still reports the pane's terminal modes).
/// Dropping it kills the server (and whatever still runs in the pane) and
/// removes its files.
struct Tmux {
    socket: String,
    dir: PathBuf,
    /// The server's socket file (`kill-server` leaves it).
    socket_path: Option<PathBuf>,
}

impl Tmux {
    /// Starts a `width`x`height` pane running `argv` as described above.
    fn start(width: u16, height: u16, argv: &[OsString]) -> Result<Tmux> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let socket = format!("pt-top-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(&socket);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, the guard kills the server and removes the files
        // whatever fails next.
        let mut tmux = Tmux { socket, dir, socket_path: None };
        let top = argv.iter().map(|a| shell_quote(&a.to_string_lossy())).collect::<Vec<_>>().join(" ");
        let file = |name: &str| shell_quote(&tmux.dir.join(name).to_string_lossy());
        let script = format!(
            "stty -g > {before}; {top}; echo $? > {tmp}; stty -g > {after}; mv {tmp} {status}; exec sleep 3600",
            before = file("stty-before"),
            after = file("stty-after"),
            tmp = file("status.tmp"),
            status = file("status"),
        );
        let (w, h) = (width.to_string(), height.to_string());
        // One command list: the options are set before the pane exists.
        tmux.run(&[
            "set-option",
            "-g",
            "remain-on-exit",
            "on",
            ";",
            "set-option",
            "-g",
            "status",
            "off",
            ";",
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            &w,
            "-y",
            &h,
            &script,
        ])?;
        tmux.socket_path = Some(PathBuf::from(tmux.display("#{socket_path}")?));
        let size = tmux.display("#{pane_width}x#{pane_height}")?;
        if size != format!("{width}x{height}") {
            bail!("the pane is {size}, asked for {width}x{height}");
        }
        Ok(tmux)
    }

    /// `tmux -L SOCKET -f /dev/null ARGS...`; fails unless it exits 0.
    fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.socket, "-f", "/dev/null"]).args(args).env_remove("TMUX");
        let out = output_with_timeout(&mut cmd, TMUX_TIMEOUT)?;
        if !out.status.success() {
            bail!("tmux {args:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A format expanded for the pane, e.g. `#{alternate_on}`.
    fn display(&self, format: &str) -> Result<String> {
        Ok(self.run(&["display-message", "-p", "-t", "top", format])?.trim_end_matches('\n').to_owned())
    }

    /// The screen as shown now.
    fn screen(&self) -> Result<String> {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// The screen and the lines scrolled off it.
    fn screen_and_history(&self) -> Result<String> {
        self.run(&["capture-pane", "-p", "-S", "-", "-t", "top"])
    }

    /// Types `text` as it is.
    fn type_text(&self, text: &str) -> Result<()> {
        self.run(&["send-keys", "-t", "top", "-l", text]).map(drop)
    }

    /// Presses a named key (`Enter`, `C-c`, `C-u`).
    fn press(&self, key: &str) -> Result<()> {
        self.run(&["send-keys", "-t", "top", key]).map(drop)
    }

    /// One of the shell's files, trimmed; `None` while it does not exist.
    fn file(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(name)).ok().map(|s| s.trim().to_owned())
    }

    /// `top`'s exit status as the shell saw it (128+N: signal N), once it
    /// has exited; also `Some` when the shell itself is gone.
    fn exit_status(&self) -> Result<Option<String>> {
        if let Some(status) = self.file("status") {
            return Ok(Some(status));
        }
        if self.display("#{pane_dead}")? == "1" {
            return Ok(Some(self.display("the shell died: status #{pane_dead_status} signal #{pane_dead_signal}")?));
        }
        Ok(None)
    }

    /// Reads the screen until `done` holds for it, or fails after
    /// `timeout` (or when `top` has exited) with the last screen.
    fn wait_for_screen(&self, what: &str, timeout: Duration, mut done: impl FnMut(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen()?;
            if done(&screen) {
                return Ok(screen);
            }
            if let Some(status) = self.exit_status()? {
                bail!(
                    "top exited ({status}) before the screen showed {what}; the pane:\n{}",
                    self.screen_and_history()?
                );
            }
            if Instant::now() >= deadline {
                bail!("the screen did not show {what} within {timeout:?}; the last screen:\n{screen}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` for `top` to exit; returns its exit status and
    /// how long that took.
    fn wait_for_exit(&self, timeout: Duration) -> Result<(String, Duration)> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit_status()? {
                return Ok((status, start.elapsed()));
            }
            if start.elapsed() >= timeout {
                bail!("top did not exit within {timeout:?}; the last screen:\n{}", self.screen()?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if let Err(e) = self.run(&["kill-server"]) {
            eprintln!("warning: could not kill the tmux server {}: {e:#}", self.socket);
        }
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `s` in single quotes for `sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------
// The screen.
// ---------------------------------------------------------------------

/// The words of a screen line: split at spaces and the boxes' `│`.
fn words(line: &str) -> Vec<&str> {
    line.split(|c: char| c.is_whitespace() || c == '│').filter(|w| !w.is_empty()).collect()
}

/// The first line whose words include every one of `want`.
fn row_with<'a>(screen: &'a str, want: &[&str]) -> Option<&'a str> {
    screen.lines().find(|line| {
        let w = words(line);
        want.iter().all(|x| w.contains(x))
    })
}

/// One row of the lifecycle table, by column.
#[derive(Debug, PartialEq)]
struct Row<'a> {
    port: &'a str,
    proto: &'a str,
    pid: &'a str,
    comm: &'a str,
    local: &'a str,
    remote: &'a str,
    state: &'a str,
}

/// The row a listener must have: TCP, its own port, pid, comm and address
/// (`port` and `pid` as text), no remote end, LISTEN.
fn listening_row<'a>(listener: &'a Listener, port: &'a str, pid: &'a str) -> Row<'a> {
    Row { port, proto: "tcp", pid, comm: &listener.comm, local: &listener.addr, remote: "-", state: "LISTEN" }
}

/// The lifecycle table's rows on the screen (no field of them has spaces
/// in these tests: the comms are chosen so).
fn rows(screen: &str) -> Vec<Row<'_>> {
    screen
        .lines()
        .filter_map(|line| match words(line).as_slice() {
            [port, proto @ ("tcp" | "udp"), pid, comm, local, remote, state, _age, ..]
                if port.parse::<u16>().is_ok() && pid.parse::<u32>().is_ok() =>
            {
                Some(Row { port, proto, pid, comm, local, remote, state })
            }
            _ => None,
        })
        .collect()
}

/// The screen has drawn its panes: the header, the table's column names
/// and the key line.
fn drawn(screen: &str) -> bool {
    screen.contains("port-trace top")
        && screen.contains("backend ")
        && screen.contains("pressure")
        && screen.contains("churn per second")
        && row_with(screen, &["PORT", "PROTO", "PID", "COMM", "STATE"]).is_some()
        && screen.contains("q quit")
}

// ---------------------------------------------------------------------
// The tracer and the workloads.
// ---------------------------------------------------------------------

/// `port-trace top --netns PATH` (plus [`tracer_extra_args`]).
fn top_argv(ns: &NetNs) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![tracer_bin().into(), "top".into(), "--netns".into(), ns.path().into()];
    argv.extend(tracer_extra_args());
    argv
}

/// A fresh namespace with its range set to [`RANGE`].
fn namespace() -> NetNs {
    prepare_netns(&SessionOptions { ephemeral_range: Some(RANGE), ..SessionOptions::default() }).unwrap()
}

/// `port-storm tcp` in a namespace; dropping it kills it.
struct Storm {
    child: Child,
}

impl Storm {
    fn start(ns: &NetNs) -> Result<Storm> {
        let child = ns
            .command(STORM)
            .args(["tcp", STORM_SECONDS])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting port-storm")?;
        Ok(Storm { child })
    }

    /// Its pid (`ip netns exec` execs it).
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A socket the `hold` workload announced (from its `getsockname`), and
/// what it did with it.
#[derive(Debug)]
struct HeldSocket {
    proto: String,
    family: String,
    laddr: String,
    lport: String,
    /// The TCP state the workload left it in (`None` for UDP).
    state: Option<&'static str>,
    /// The REMOTE column: the listener it connected to, or `-`.
    remote: String,
}

/// The sockets of the `hold` workload's ready line: for each family a TCP
/// listener on a port below the ephemeral range, a client connected to that
/// listener (its port in the range, ESTABLISHED as the workload checked)
/// and a UDP socket.
fn held_sockets(ready: &Value) -> Vec<HeldSocket> {
    let mut sockets: Vec<HeldSocket> = ready["sockets"]
        .as_array()
        .expect("the hold workload's ready line lists its sockets")
        .iter()
        .map(|s| {
            let text = |k: &str| s[k].as_str().unwrap_or_else(|| panic!("no {k} in {s}")).to_owned();
            let proto = text("proto");
            let lport = s["lport"].as_u64().and_then(|p| u16::try_from(p).ok()).expect("lport");
            let state = match proto.as_str() {
                "udp" => None,
                _ if (RANGE.0..=RANGE.1).contains(&lport) => Some("ESTABLISHED"),
                _ => Some("LISTEN"),
            };
            HeldSocket {
                proto,
                family: text("family"),
                laddr: text("laddr"),
                lport: lport.to_string(),
                state,
                remote: "-".to_owned(),
            }
        })
        .collect();
    let listeners: Vec<(String, String)> = sockets
        .iter()
        .filter(|s| s.state == Some("LISTEN"))
        .map(|s| {
            let endpoint = if s.family == "ipv6" {
                format!("[{}]:{}", s.laddr, s.lport)
            } else {
                format!("{}:{}", s.laddr, s.lport)
            };
            (s.family.clone(), endpoint)
        })
        .collect();
    for s in sockets.iter_mut().filter(|s| s.state == Some("ESTABLISHED")) {
        let (_, endpoint) = listeners.iter().find(|(f, _)| *f == s.family).expect("a listener per family");
        s.remote.clone_from(endpoint);
    }
    sockets
}

/// The row showing `s` of the workload `pid`: its port, protocol, pid,
/// comm, local address and remote endpoint; its state the one the workload
/// saw, or `-` (unknown: a socket found by the start-up walk has had no
/// state change yet); never another.
fn held_row<'a>(screen: &'a str, s: &HeldSocket, pid: &str) -> Option<Row<'a>> {
    rows(screen).into_iter().find(|r| {
        r.port == s.lport
            && r.proto == s.proto
            && r.pid == pid
            && r.comm == "port-workload"
            && r.local == s.laddr
            && r.remote == s.remote
            && (r.state == "-" || Some(r.state) == s.state)
    })
}

/// `top` has exited with `status` (its exit status as the shell saw it):
/// it must be 0; the terminal must be as before it started (the same
/// `stty -g` modes: no raw mode left), off the alternate screen with the
/// cursor shown, and the summary printed on the normal screen.
fn assert_clean_exit(tmux: &Tmux, status: &str, how: &str) {
    let alternate = tmux.display("#{alternate_on}").unwrap();
    let cursor = tmux.display("#{cursor_flag}").unwrap();
    let after = tmux.screen_and_history().unwrap();
    let ctx = format!("after {how}; the pane:\n{after}");
    assert_eq!(status, "0", "top's exit status (as the shell saw it) {ctx}");
    let (before, after_modes) = (tmux.file("stty-before"), tmux.file("stty-after"));
    assert!(before.as_deref().is_some_and(|m| !m.is_empty()), "no terminal modes from before top {ctx}");
    assert_eq!(after_modes, before, "the terminal modes (stty -g) after top differ from before {ctx}");
    assert_eq!(alternate, "0", "the terminal was left on the alternate screen {ctx}");
    assert_eq!(cursor, "1", "the cursor was left hidden {ctx}");
    assert!(after.contains("port-trace: ") && after.contains(" traced: "), "no summary on the normal screen {ctx}");
}

// ---------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------

/// During a connect storm, `top` shows the storm's connections (its pid and
/// comm), a port a `port-listener` took after `top` started (its port,
/// comm, pid, address and LISTEN on one row, found with the `/` filter among
/// the storm's thousands), and every socket a workload held before `top`
/// started (each port it got from `getsockname` on a row with its comm, pid
/// and address). Then `q` ends it with status 0 and the terminal as before.
#[test]
fn top_shows_held_ports_during_a_storm_and_q_quits() {
    if !require_root("top_shows_held_ports_during_a_storm_and_q_quits") {
        return;
    }
    let t0 = Instant::now();
    let ns = namespace();
    // Before the tracer: found by its start-up walk.
    let held = HeldWorkload::start(&ns, Path::new(WORKLOAD), "hold", READY_TIMEOUT).unwrap();
    let held_pid = held.pid().to_string();
    let sockets = held_sockets(&held.ready);
    assert!(
        sockets.iter().filter(|s| s.state == Some("ESTABLISHED")).count() == 2 && sockets.len() == 6,
        "the hold workload did not announce what its scenario promises: {}",
        held.ready
    );
    let tmux = Tmux::start(200, 50, &top_argv(&ns)).unwrap();
    tmux.wait_for_screen("its panes", HEADER_TIMEOUT, drawn).unwrap();

    // After the tracer started: seen live.
    let listener = Listener::start(&ns, Path::new(LISTENER), 39123, "pt-top-held", None, &[], READY_TIMEOUT).unwrap();
    let mut storm = Storm::start(&ns).unwrap();
    let storm_pid = storm.pid().to_string();
    tmux.wait_for_screen("a row of port-storm", SCREEN_TIMEOUT, |s| {
        rows(s).iter().any(|r| r.pid == storm_pid && r.comm == "port-storm" && r.proto == "tcp")
    })
    .unwrap();

    // The listener's row, among thousands of the storm's.
    tmux.type_text("/").unwrap();
    tmux.type_text(&listener.comm).unwrap();
    tmux.press("Enter").unwrap();
    let (port, pid) = (listener.port.to_string(), listener.pid.to_string());
    let want = listening_row(&listener, &port, &pid);
    let filter_shown = format!("filter \"{}\"", listener.comm);
    let screen = tmux
        .wait_for_screen("the listener's row", SCREEN_TIMEOUT, |s| s.contains(&filter_shown) && rows(s).contains(&want))
        .unwrap();
    eprintln!("the listener's row: {}", row_with(&screen, &[&port, &listener.comm]).unwrap_or_default().trim());

    // The held workload's sockets, by its comm.
    tmux.type_text("/").unwrap();
    tmux.press("C-u").unwrap();
    tmux.type_text("port-workload").unwrap();
    tmux.press("Enter").unwrap();
    let mut missing = Vec::new();
    let waited = tmux.wait_for_screen("the held workload's rows", SCREEN_TIMEOUT, |s| {
        missing = sockets.iter().filter(|h| held_row(s, h, &held_pid).is_none()).collect();
        s.contains("filter \"port-workload\"") && missing.is_empty()
    });
    let screen = match waited {
        Ok(screen) => screen,
        Err(e) => panic!("no row for {missing:#?}\n(the hold workload, pid {held_pid}, said {}):\n{e:#}", held.ready),
    };
    for h in &sockets {
        let row = held_row(&screen, h, &held_pid).expect("found above");
        eprintln!("held {} {}:{} ({:?}): {row:?}", h.proto, h.laddr, h.lport, h.state);
    }
    assert!(storm.running(), "port-storm ended before the screen was read: the storm proves nothing");

    tmux.type_text("q").unwrap();
    let (status, took) = tmux.wait_for_exit(EXIT_TIMEOUT).unwrap();
    assert_clean_exit(&tmux, &status, "q");
    eprintln!("top exited {took:?} after q");

    drop(storm);
    held.release().unwrap();
    listener.release(READY_TIMEOUT).unwrap();
    eprintln!("top_shows_held_ports_during_a_storm_and_q_quits: {:?}", t0.elapsed());
}

/// Ctrl-C (a key in the raw-mode terminal, not a signal) ends `top` with
/// status 0 and the terminal as before, once it shows a listener's row
/// (port, comm, pid, address, LISTEN).
#[test]
fn ctrl_c_quits_top_and_restores_the_terminal() {
    if !require_root("ctrl_c_quits_top_and_restores_the_terminal") {
        return;
    }
    let t0 = Instant::now();
    let ns = namespace();
    let tmux = Tmux::start(120, 40, &top_argv(&ns)).unwrap();
    tmux.wait_for_screen("its panes", HEADER_TIMEOUT, drawn).unwrap();
    let listener = Listener::start(&ns, Path::new(LISTENER), 39124, "pt-top-ctrlc", None, &[], READY_TIMEOUT).unwrap();
    let (port, pid) = (listener.port.to_string(), listener.pid.to_string());
    let want = listening_row(&listener, &port, &pid);
    tmux.wait_for_screen("the listener's row", SCREEN_TIMEOUT, |s| rows(s).contains(&want)).unwrap();

    tmux.press("C-c").unwrap();
    let (status, took) = tmux.wait_for_exit(EXIT_TIMEOUT).unwrap();
    assert_clean_exit(&tmux, &status, "Ctrl-C");
    eprintln!("top exited {took:?} after Ctrl-C");
    listener.release(READY_TIMEOUT).unwrap();
    eprintln!("ctrl_c_quits_top_and_restores_the_terminal: {:?}", t0.elapsed());
}
