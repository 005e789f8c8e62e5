//! Kernel tests of issue 10: `port-trace who` (now, `--follow`,
//! `--history`) and the `ephemeral_listener` notice of `watch`.
//!
//! Each test has its own network namespace with its `ip_local_port_range`
//! set to [`RANGE`], and a `port-listener` (src/bin) holding a chosen port
//! inside that range. Every expectation is the listener's own truth: the
//! pid it got from `getpid`, the comm it gave itself (`PR_SET_NAME`, read
//! back from `/proc/self/comm`), the port from `getsockname`, the arguments
//! it was started with, and the test's clock when it said it listens.
//! They need root (see `require_root`), except the usage test.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use port_trace_integration::check;
use port_trace_integration::listener::{LineChild, Listener, StampedLine};
use port_trace_integration::netns::NetNs;
use port_trace_integration::truth::Truth;
use port_trace_integration::{
    output_with_timeout, prepare_netns, require_root, tracer_bin, tracer_extra_args, LiveSession, Session,
    SessionOptions, DRAIN, HEADER_TIMEOUT, STOP_TIMEOUT,
};
use serde_json::Value;

const LISTENER: &str = env!("CARGO_BIN_EXE_port-listener");

/// The namespaces' `ip_local_port_range`.
const RANGE: (u16, u16) = (40000, 40999);

/// The port the listeners hold: inside [`RANGE`].
const PORT: u16 = 40500;

/// A port of [`RANGE`] nobody holds.
const FREE_PORT: u16 = 40600;

/// How long a listener may take to report.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a one-shot `who` may take (it loads and attaches the programs
/// and walks the namespace's sockets).
const WHO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the tracer may take to show an event the test caused (it
/// flushes every 100 ms; this is for a loaded machine).
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound: `who --follow` prints a new holder's alloc within
/// this time of the holder saying it listens.
const FOLLOW_BOUND: Duration = Duration::from_secs(1);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh namespace with its range set to [`RANGE`].
fn namespace() -> NetNs {
    prepare_netns(&SessionOptions { ephemeral_range: Some(RANGE), ..SessionOptions::default() }).unwrap()
}

/// `port-trace who ARGS...` on the live system (with
/// [`tracer_extra_args`], e.g. `--backend`), killed after [`WHO_TIMEOUT`].
fn who_live(args: &[&str]) -> Output {
    let mut cmd = Command::new(tracer_bin());
    cmd.arg("who").args(args).args(tracer_extra_args());
    output_with_timeout(&mut cmd, WHO_TIMEOUT).unwrap()
}

/// `port-trace who ARGS...` reading recordings (no tracing).
fn who_history(args: &[&str]) -> Output {
    output_with_timeout(Command::new(tracer_bin()).arg("who").args(args), WHO_TIMEOUT).unwrap()
}

/// The JSON objects of `who -f json` output; fails on a line that is not
/// one.
fn json_lines(out: &Output) -> Vec<Value> {
    text(&out.stdout)
        .lines()
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v @ Value::Object(_)) => v,
            _ => panic!("`who -f json` printed a line that is not a JSON object: {l:?}\n{}", describe(out)),
        })
        .collect()
}

fn describe(out: &Output) -> String {
    format!("exit: {}\nstdout:\n{}\nstderr:\n{}", out.status, text(&out.stdout), text(&out.stderr))
}

fn path_str(ns: &NetNs) -> String {
    ns.path().to_str().expect("namespace paths are UTF-8").to_owned()
}

/// Whether `v` is a record of `type` about `l`'s port and process.
fn is_of(v: &Value, ty: &str, l: &Listener) -> bool {
    v["type"] == ty && v["lport"] == l.port && v["pid"] == l.pid
}

/// Whether `v` is the `state` record of `l`'s socket moving to LISTEN.
fn is_listen_of(v: &Value, l: &Listener) -> bool {
    is_of(v, "state", l) && v["new"] == "LISTEN"
}

/// Problems with a record's port and owner against the listener's truth.
fn owner_problems(v: &Value, l: &Listener, netns: u64) -> Vec<String> {
    let mut p = Vec::new();
    let want = [
        ("pid", Value::from(l.pid)),
        ("comm", Value::from(l.comm.as_str())),
        ("lport", Value::from(l.port)),
        ("laddr", Value::from(l.addr.as_str())),
        ("proto", Value::from("tcp")),
        ("family", Value::from("ipv4")),
        ("netns", Value::from(netns)),
    ];
    for (field, want) in want {
        if v[field] != want {
            p.push(format!("{field}: want {want}, got {}", v[field]));
        }
    }
    p
}

// ---------------------------------------------------------------------
// 1. The `ephemeral_listener` notice of `watch`.
// ---------------------------------------------------------------------

/// A traced run in which `comm` listens on [`PORT`] until the tracer has
/// seen it listen (its `state` → LISTEN record) and [`DRAIN`] more, then
/// lets go; `extra` are more `watch` arguments. Returns the session and the
/// listener's truth (pid, comm, port, addr).
fn listener_session(comm: &str, extra: &[&str]) -> (Session, u32, String, u16, String) {
    let opts = SessionOptions {
        ephemeral_range: Some(RANGE),
        extra_args: extra.iter().map(OsString::from).collect(),
        ..SessionOptions::default()
    };
    let mut live = LiveSession::start(&opts).unwrap();
    let l = Listener::start(live.ns(), Path::new(LISTENER), PORT, comm, None, &[], LISTENER_TIMEOUT).unwrap();
    let tracer = live.tracer().expect("running");
    let seen = tracer.wait_until(EVENT_TIMEOUT, |recs| recs.iter().any(|v| is_listen_of(v, &l)));
    assert!(
        seen,
        "the tracer did not report {} (pid {}) moving to LISTEN on {} within {EVENT_TIMEOUT:?}; records so far:\n{:#?}",
        l.comm,
        l.pid,
        l.port,
        tracer.records_so_far()
    );
    // Time for a notice (or a second one) to follow.
    tracer.wait_until(DRAIN, |_| false);
    let (pid, comm, port, addr) = (l.pid, l.comm.clone(), l.port, l.addr.clone());
    l.release(LISTENER_TIMEOUT).unwrap();
    std::thread::sleep(DRAIN);
    let s = live.finish(Truth { pid, sockets: Vec::new() }).unwrap();
    (s, pid, comm, port, addr)
}

/// The run's frame is right (header, exit 0, summary counts) and every
/// record keeps the contract's fields and carries the namespace.
fn assert_run_ok(s: &Session) {
    let mut problems = s.run_problems();
    let schema = check::check_schema(&s.tracer.records, s.netns_inode, s.window());
    problems.extend(schema.findings.iter().map(|f| format!("{f:?}")));
    assert!(problems.is_empty(), "{problems:#?}\nrecords:\n{}\nstderr:\n{}", s.tracer.dump(), s.tracer.stderr);
}

fn notices(s: &Session) -> Vec<&Value> {
    s.tracer.records.iter().filter(|v| v["type"] == "notice").collect()
}

fn summary(s: &Session) -> &Value {
    s.tracer.records.last().filter(|v| v["type"] == "summary").expect("a summary (checked by assert_run_ok)")
}

/// A process listening on a port inside its namespace's
/// `ip_local_port_range` gets exactly one `ephemeral_listener` notice with
/// its pid, comm and port, the range and its name; the summary counts it
/// and lists it.
#[test]
fn a_listener_inside_the_range_gets_one_notice() {
    if !require_root("a_listener_inside_the_range_gets_one_notice") {
        return;
    }
    let t0 = Instant::now();
    let (s, pid, comm, port, addr) = listener_session("pt-notice", &[]);
    assert_run_ok(&s);
    let found = notices(&s);
    let ctx = format!("records:\n{}\nstderr:\n{}", s.tracer.dump(), s.tracer.stderr);
    assert_eq!(found.len(), 1, "want exactly one notice\n{ctx}");
    let n = found[0];
    let mut p = Vec::new();
    let want = [
        ("kind", Value::from("ephemeral_listener")),
        ("pid", Value::from(pid)),
        ("comm", Value::from(comm.as_str())),
        ("lport", Value::from(port)),
        ("laddr", Value::from(addr.as_str())),
        ("proto", Value::from("tcp")),
        ("netns", Value::from(s.netns_inode)),
        ("range", serde_json::json!([RANGE.0, RANGE.1])),
        ("range_name", Value::from("ip_local_port_range")),
    ];
    for (field, want) in want {
        if n[field] != want {
            p.push(format!("{field}: want {want}, got {}", n[field]));
        }
    }
    // The notice follows the LISTEN that caused it.
    let listen_at =
        s.tracer.records.iter().position(|v| v["type"] == "state" && v["new"] == "LISTEN" && v["pid"] == pid);
    let notice_at = s.tracer.records.iter().position(|v| v["type"] == "notice");
    if !(listen_at.is_some() && notice_at > listen_at) {
        p.push(format!("the notice (record {notice_at:?}) does not follow the LISTEN (record {listen_at:?})"));
    }
    let sum = summary(&s);
    if sum["notices"] != 1 {
        p.push(format!("summary notices: want 1, got {}", sum["notices"]));
    }
    match sum["ephemeral_listeners"].as_array().map(Vec::as_slice) {
        Some([one]) if one["pid"] == pid && one["comm"] == comm.as_str() && one["lport"] == port => {}
        other => p.push(format!(
            "summary ephemeral_listeners: want one entry for {comm} pid {pid} port {port}, got {other:?}"
        )),
    }
    assert!(p.is_empty(), "notice {n}:\n  {}\n{ctx}", p.join("\n  "));
    eprintln!("a_listener_inside_the_range_gets_one_notice: {:?}", t0.elapsed());
}

/// UDP: a socket bound inside the range and left unconnected serves there
/// (one notice, after the grace period that lets a client connect); one
/// bound inside the range and then connected is a client on a fixed port
/// (no notice), although the tracer learns that connect without a record.
#[test]
fn a_bound_udp_socket_is_noticed_unless_it_connects() {
    if !require_root("a_bound_udp_socket_is_noticed_unless_it_connects") {
        return;
    }
    let t0 = Instant::now();
    let opts = SessionOptions { ephemeral_range: Some(RANGE), ..SessionOptions::default() };
    let mut live = LiveSession::start(&opts).unwrap();
    let server =
        Listener::start(live.ns(), Path::new(LISTENER), PORT, "pt-udp-serve", None, &["--udp"], LISTENER_TIMEOUT)
            .unwrap();
    let client = Listener::start(
        live.ns(),
        Path::new(LISTENER),
        PORT + 1,
        "pt-udp-client",
        None,
        &["--udp", "--connect=127.0.0.1:40999"],
        LISTENER_TIMEOUT,
    )
    .unwrap();
    let tracer = live.tracer().expect("running");
    let alloc_of = |v: &Value, l: &Listener| v["type"] == "alloc" && v["pid"] == l.pid && v["lport"] == l.port;
    let noticed = tracer.wait_until(Duration::from_secs(10), |recs| {
        recs.iter().any(|v| alloc_of(v, &server))
            && recs.iter().any(|v| alloc_of(v, &client))
            && recs.iter().any(|v| v["type"] == "notice")
    });
    // Time for a wrong second notice (the client's) to show.
    tracer.wait_until(Duration::from_secs(2), |_| false);
    let (server_pid, client_pid) = (server.pid, client.pid);
    server.release(LISTENER_TIMEOUT).unwrap();
    client.release(LISTENER_TIMEOUT).unwrap();
    std::thread::sleep(DRAIN);
    let s = live.finish(Truth { pid: server_pid, sockets: Vec::new() }).unwrap();
    assert_run_ok(&s);
    let ctx = format!("records:\n{}\nstderr:\n{}", s.tracer.dump(), s.tracer.stderr);
    assert!(noticed, "no notice (or a missing alloc) within 10 s\n{ctx}");
    let found = notices(&s);
    assert_eq!(found.len(), 1, "want one notice, the unconnected socket's\n{ctx}");
    let n = found[0];
    assert_eq!(
        (&n["pid"], &n["comm"], &n["lport"], &n["proto"]),
        (&Value::from(server_pid), &Value::from("pt-udp-serve"), &Value::from(PORT), &Value::from("udp")),
        "{ctx}"
    );
    assert!(found.iter().all(|v| v["pid"] != client_pid), "{ctx}");
    eprintln!("a_bound_udp_socket_is_noticed_unless_it_connects: {:?}", t0.elapsed());
}

/// `--allow-listener PORT` (and `--allow-listener COMM`) silences the
/// notice: the listener is traced (its LISTEN is there), no notice is
/// written, and the summary lists no listener.
#[test]
fn allowed_listeners_get_no_notice() {
    if !require_root("allowed_listeners_get_no_notice") {
        return;
    }
    let t0 = Instant::now();
    let port_arg = PORT.to_string();
    for allow in [port_arg.as_str(), "pt-allowed"] {
        let (s, pid, ..) = listener_session("pt-allowed", &["--allow-listener", allow]);
        assert_run_ok(&s);
        let ctx = format!("--allow-listener {allow}\nrecords:\n{}\nstderr:\n{}", s.tracer.dump(), s.tracer.stderr);
        assert!(
            s.tracer.records.iter().any(|v| v["type"] == "state" && v["new"] == "LISTEN" && v["pid"] == pid),
            "the listener's LISTEN is missing: the run proves nothing\n{ctx}"
        );
        assert_eq!(notices(&s).len(), 0, "want no notice\n{ctx}");
        let sum = summary(&s);
        assert_eq!(sum["notices"], 0, "summary notices\n{ctx}");
        assert_eq!(sum["ephemeral_listeners"], serde_json::json!([]), "summary ephemeral_listeners\n{ctx}");
    }
    eprintln!("allowed_listeners_get_no_notice: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------
// 2.-3. `who PORT` now.
// ---------------------------------------------------------------------

/// `who PORT -f json` names the process that listens there: one `holder`
/// line with its pid, comm, port, address and namespace, state LISTEN, and
/// the command line it was started with; exit 0. The text form names the
/// comm and pid on the row and shows the command line under it.
#[test]
fn who_names_the_listener() {
    if !require_root("who_names_the_listener") {
        return;
    }
    let t0 = Instant::now();
    let ns = namespace();
    let tag = format!("tag-who-{}", std::process::id());
    let l = Listener::start(&ns, Path::new(LISTENER), PORT, "pt-who-holder", None, &[&tag], LISTENER_TIMEOUT).unwrap();
    let netns = path_str(&ns);
    let port = PORT.to_string();

    let out = who_live(&[&port, "--netns", &netns, "-f", "json"]);
    let ctx = describe(&out);
    assert_eq!(out.status.code(), Some(0), "who {port} (a listener holds it)\n{ctx}");
    let holders: Vec<Value> = json_lines(&out).into_iter().filter(|v| v["type"] == "holder").collect();
    assert_eq!(holders.len(), 1, "want one holder line\n{ctx}");
    let h = &holders[0];
    let mut p = owner_problems(h, &l, ns.inode());
    if h["state"] != "LISTEN" {
        p.push(format!("state: want LISTEN, got {}", h["state"]));
    }
    let cmdline = h["cmdline"].as_str().unwrap_or_default();
    for arg in [LISTENER, port.as_str(), "pt-who-holder", tag.as_str()] {
        if !cmdline.split(' ').any(|a| a == arg) {
            p.push(format!("cmdline {cmdline:?} lacks the argument {arg:?}"));
        }
    }
    assert!(p.is_empty(), "holder {h}:\n  {}\n{ctx}", p.join("\n  "));

    let out = who_live(&[&port, "--netns", &netns, "-f", "text"]);
    let stdout = text(&out.stdout);
    let ctx = describe(&out);
    assert_eq!(out.status.code(), Some(0), "who {port} -f text\n{ctx}");
    let row = stdout.lines().find(|line| line.split_whitespace().any(|w| w == l.comm));
    let Some(row) = row else { panic!("no row names {}\n{ctx}", l.comm) };
    let words: Vec<&str> = row.split_whitespace().collect();
    assert!(words.contains(&l.pid.to_string().as_str()) && words.contains(&"LISTEN"), "row {row:?}\n{ctx}");
    let command = stdout.lines().find(|line| line.trim_start().starts_with("command:"));
    assert!(command.is_some_and(|c| c.contains(&tag)), "no `command:` line with {tag}\n{ctx}");

    l.release(LISTENER_TIMEOUT).unwrap();
    eprintln!("who_names_the_listener: {:?}", t0.elapsed());
}

/// `who FREE_PORT` in a namespace where only another port is held: exit 1
/// and no holder (JSON: no line; text: a line that says so).
#[test]
fn who_on_a_free_port_exits_1() {
    if !require_root("who_on_a_free_port_exits_1") {
        return;
    }
    let t0 = Instant::now();
    let ns = namespace();
    let l = Listener::start(&ns, Path::new(LISTENER), PORT, "pt-who-other", None, &[], LISTENER_TIMEOUT).unwrap();
    let netns = path_str(&ns);
    let free = FREE_PORT.to_string();

    let out = who_live(&[&free, "--netns", &netns, "-f", "json"]);
    let ctx = describe(&out);
    assert_eq!(out.status.code(), Some(1), "who {free} (nobody holds it)\n{ctx}");
    assert!(json_lines(&out).iter().all(|v| v["type"] != "holder"), "a holder of a free port\n{ctx}");

    let out = who_live(&[&free, "--netns", &netns, "-f", "text"]);
    let ctx = describe(&out);
    assert_eq!(out.status.code(), Some(1), "who {free} -f text\n{ctx}");
    assert!(!text(&out.stdout).contains(&l.comm), "the text names the holder of another port\n{ctx}");
    assert!(text(&out.stdout).contains(&free), "the text does not name the port it looked at\n{ctx}");

    l.release(LISTENER_TIMEOUT).unwrap();
    eprintln!("who_on_a_free_port_exits_1: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------
// 4. `who PORT --follow`.
// ---------------------------------------------------------------------

fn dump(lines: &[StampedLine]) -> String {
    lines.iter().enumerate().map(|(i, l)| format!("{:4}: {}\n", i + 1, l.text)).collect()
}

/// `who PORT --follow -f json`: first the holder A; A is killed (its
/// release is printed); B, with another comm, listens on the same port:
/// B's `alloc` (pid and comm B) is printed within [`FOLLOW_BOUND`] of B
/// saying it listens (the test's clock); SIGINT ends it with exit 0.
#[test]
fn who_follow_shows_the_next_holder_within_a_second() {
    if !require_root("who_follow_shows_the_next_holder_within_a_second") {
        return;
    }
    let t0 = Instant::now();
    let ns = namespace();
    let a = Listener::start(&ns, Path::new(LISTENER), PORT, "pt-follow-a", None, &[], LISTENER_TIMEOUT).unwrap();
    let port = PORT.to_string();
    let netns = path_str(&ns);
    let mut args: Vec<OsString> =
        ["who", &port, "--follow", "-f", "json", "--netns", &netns].iter().map(OsString::from).collect();
    args.extend(tracer_extra_args());
    let mut who = LineChild::start(&tracer_bin(), &args).unwrap();

    let (a_pid, a_comm) = (a.pid, a.comm.clone());
    let has_a = who.wait_until(HEADER_TIMEOUT, |lines| lines.iter().any(|x| x.json["type"] == "holder"));
    assert!(has_a, "who --follow printed no holder within {HEADER_TIMEOUT:?}:\n{}", dump(who.lines()));
    let holders: Vec<&Value> = who.lines().iter().map(|x| &x.json).filter(|v| v["type"] == "holder").collect();
    assert_eq!(holders.len(), 1, "want holder A only:\n{}", dump(who.lines()));
    let p = owner_problems(holders[0], &a, ns.inode());
    assert!(p.is_empty(), "holder A: {p:#?}\n{}", dump(who.lines()));

    a.kill().unwrap();
    let released = who.wait_until(EVENT_TIMEOUT, |lines| {
        lines.iter().any(|x| x.json["type"] == "release" && x.json["pid"] == a_pid && x.json["lport"] == PORT)
    });
    assert!(released, "no release of A ({a_comm}, pid {a_pid}) within {EVENT_TIMEOUT:?}:\n{}", dump(who.lines()));

    let b = Listener::start(&ns, Path::new(LISTENER), PORT, "pt-follow-b", None, &[], LISTENER_TIMEOUT).unwrap();
    let is_b_alloc = |x: &StampedLine| x.json["type"] == "alloc" && x.json["pid"] == b.pid && x.json["lport"] == PORT;
    let got = who.wait_until(EVENT_TIMEOUT, |lines| lines.iter().any(is_b_alloc));
    assert!(got, "no alloc of B (pid {}) within {EVENT_TIMEOUT:?}:\n{}", b.pid, dump(who.lines()));
    let alloc = who.lines().iter().find(|x| is_b_alloc(x)).expect("found above").clone();
    let p = owner_problems(&alloc.json, &b, ns.inode());
    assert!(p.is_empty(), "B's alloc {}: {p:#?}\n{}", alloc.text, dump(who.lines()));
    let lag = alloc.at.saturating_duration_since(b.listening_at);
    eprintln!("who --follow: B's alloc printed {lag:?} after B reported listening");
    assert!(lag <= FOLLOW_BOUND, "B's alloc came {lag:?} after B listened (bound {FOLLOW_BOUND:?})");

    let out = who.signal_and_wait(libc::SIGINT, STOP_TIMEOUT).unwrap();
    assert_eq!(out.status.code(), Some(0), "who --follow after SIGINT: {}\nstderr:\n{}", out.status, out.stderr);
    let not_json: Vec<&StampedLine> = out.lines.iter().filter(|x| !x.json.is_object()).collect();
    assert!(not_json.is_empty(), "lines that are not JSON objects: {not_json:#?}");
    let foreign: Vec<&StampedLine> = out
        .lines
        .iter()
        .filter(|x| x.json["lport"] != PORT || (x.json["pid"] != a_pid && x.json["pid"] != b.pid))
        .filter(|x| x.json["type"] != "lost")
        .collect();
    assert!(foreign.is_empty(), "lines about other ports or processes: {foreign:#?}");
    b.release(LISTENER_TIMEOUT).unwrap();
    eprintln!("who_follow_shows_the_next_holder_within_a_second: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------
// 5. `who PORT --history FILE`.
// ---------------------------------------------------------------------

/// A recording's path, removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The JSON objects of a recording so far (a torn last line left out).
fn recorded(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Polls the recording until `done` holds for its records, up to `timeout`.
fn wait_for_recorded(path: &Path, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done(&recorded(path)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `record -o FILE` while A then B hold the port, stopped with SIGINT;
/// then `who PORT --history FILE -f json` lists both holdings in order: A
/// first with its end (close), B second (still held at the end); exit 0.
/// A free port exits 1 with no holding.
#[test]
fn who_history_lists_the_holders_in_order() {
    if !require_root("who_history_lists_the_holders_in_order") {
        return;
    }
    let t0 = Instant::now();
    let ns = namespace();
    let netns = path_str(&ns);
    let file = TempFile(std::env::temp_dir().join(format!("{}-who-history.jsonl", ns.name())));
    let mut args: Vec<OsString> = vec!["record".into(), "-o".into(), file.0.clone().into()];
    args.extend(["--netns", &netns].map(OsString::from));
    args.extend(tracer_extra_args());
    let recorder = LineChild::start(&tracer_bin(), &args).unwrap();
    let has_header = wait_for_recorded(&file.0, HEADER_TIMEOUT, |r| r.first().is_some_and(|h| h["type"] == "header"));
    if !has_header {
        let out = recorder.signal_and_wait(libc::SIGINT, STOP_TIMEOUT);
        panic!("the recording has no header within {HEADER_TIMEOUT:?}; recorder: {out:?}");
    }

    let a = Listener::start(&ns, Path::new(LISTENER), PORT, "pt-history-a", None, &[], LISTENER_TIMEOUT).unwrap();
    let (a_pid, a_comm) = (a.pid, a.comm.clone());
    let seen = wait_for_recorded(&file.0, EVENT_TIMEOUT, |r| r.iter().any(|v| is_listen_of(v, &a)));
    assert!(seen, "A's LISTEN was not recorded within {EVENT_TIMEOUT:?}:\n{:#?}", recorded(&file.0));
    a.release(LISTENER_TIMEOUT).unwrap();
    let seen = wait_for_recorded(&file.0, EVENT_TIMEOUT, |r| {
        r.iter().any(|v| v["type"] == "release" && v["pid"] == a_pid && v["lport"] == PORT)
    });
    assert!(seen, "A's release was not recorded within {EVENT_TIMEOUT:?}:\n{:#?}", recorded(&file.0));
    let b = Listener::start(&ns, Path::new(LISTENER), PORT, "pt-history-b", None, &[], LISTENER_TIMEOUT).unwrap();
    let seen = wait_for_recorded(&file.0, EVENT_TIMEOUT, |r| r.iter().any(|v| is_listen_of(v, &b)));
    assert!(seen, "B's LISTEN was not recorded within {EVENT_TIMEOUT:?}:\n{:#?}", recorded(&file.0));

    let out = recorder.signal_and_wait(libc::SIGINT, STOP_TIMEOUT).unwrap();
    assert_eq!(out.status.code(), Some(0), "record after SIGINT: {}\nstderr:\n{}", out.status, out.stderr);
    let records = recorded(&file.0);
    assert!(records.last().is_some_and(|v| v["type"] == "summary"), "the recording does not end with its summary");

    let port = PORT.to_string();
    let file_arg = file.0.to_str().expect("UTF-8 temp path");
    let out = who_history(&[&port, "--history", file_arg, "-f", "json"]);
    let ctx = format!("{}\nrecording:\n{}", describe(&out), std::fs::read_to_string(&file.0).unwrap_or_default());
    assert_eq!(out.status.code(), Some(0), "who --history (A and B held the port)\n{ctx}");
    let holdings: Vec<Value> = json_lines(&out).into_iter().filter(|v| v["type"] == "holding").collect();
    assert_eq!(holdings.len(), 2, "want the holdings of A and B\n{ctx}");
    let (ha, hb) = (&holdings[0], &holdings[1]);
    let mut p = Vec::new();
    for (h, name, pid, comm) in [(ha, "A", a_pid, a_comm.as_str()), (hb, "B", b.pid, b.comm.as_str())] {
        if h["pid"] != pid || h["comm"] != comm || h["lport"] != PORT || h["netns"] != ns.inode() {
            p.push(format!("holding {name}: want pid {pid} comm {comm} port {PORT} netns {}, got {h}", ns.inode()));
        }
        if h["start"].as_str().and_then(port_trace_integration::rfc3339::parse).is_none() {
            p.push(format!("holding {name}: start is not a time: {}", h["start"]));
        }
    }
    let time = |v: &Value| v.as_str().and_then(port_trace_integration::rfc3339::parse);
    match (time(&ha["end"]), time(&ha["start"]), time(&hb["start"])) {
        (Some(end), Some(start), Some(b_start)) if start <= end && end <= b_start => {}
        other => p.push(format!("A's start <= A's end <= B's start does not hold: {other:?}")),
    }
    if ha["end_reason"] != "close" {
        p.push(format!("A's end_reason: want close, got {}", ha["end_reason"]));
    }
    if !hb["end"].is_null() {
        p.push(format!("B still held the port when the recording ended, but its end is {}", hb["end"]));
    }
    assert!(p.is_empty(), "{}\n{ctx}", p.join("\n"));

    let free = FREE_PORT.to_string();
    let out = who_history(&[&free, "--history", file_arg, "-f", "json"]);
    assert_eq!(out.status.code(), Some(1), "who --history on a port nobody held\n{}", describe(&out));
    assert!(json_lines(&out).is_empty(), "holdings of a port nobody held\n{}", describe(&out));

    b.release(LISTENER_TIMEOUT).unwrap();
    eprintln!("who_history_lists_the_holders_in_order: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------
// 6. Usage.
// ---------------------------------------------------------------------

/// `who` without a port is a usage error: exit 2 with one line on stderr,
/// nothing on stdout, at once.
#[test]
fn who_without_a_port_is_a_usage_error() {
    let t0 = Instant::now();
    let out = output_with_timeout(Command::new(tracer_bin()).arg("who"), Duration::from_secs(10)).unwrap();
    let took = t0.elapsed();
    let stderr = text(&out.stderr);
    let ctx = describe(&out);
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert_eq!(stderr.lines().count(), 1, "want one line on stderr\n{ctx}");
    assert!(stderr.contains("port"), "the line does not say a port is missing\n{ctx}");
    assert!(out.stdout.is_empty(), "{ctx}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    eprintln!("who_without_a_port_is_a_usage_error: {took:?}");
}
