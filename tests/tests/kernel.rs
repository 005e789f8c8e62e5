//! Kernel tests: the real port-trace against real sockets.
//!
//! One traced run of `port-workload basic` in a private network namespace
//! (ephemeral range narrowed to [`RANGE`] so that the header's range is
//! checkably the namespace's) is shared by the first tests below; each
//! checks one aspect of the tracer's output against what the workload
//! itself saw. Every other scenario gets its own namespace and tracer run,
//! and its test checks that run's header and summary too.
//!
//! Needs root (see `require_root`); a missing tracer binary fails.
//! The tracer is `$PORT_TRACE_BIN`, else `target/debug/port-trace`.

use std::path::Path;
use std::sync::OnceLock;

use port_trace_integration::check::{self, Finding, Transition};
use port_trace_integration::truth::Truth;
use port_trace_integration::{
    assert_matches_truth, output_with_timeout, require_root, run_session, run_session_with, tracer_bin, LiveSession,
    Session, SessionOptions, DRAIN, WORKLOAD_TIMEOUT,
};
use serde_json::Value;

/// The traced namespace's `ip_local_port_range`.
const RANGE: (u16, u16) = (40000, 49999);

/// A range of two ports, small enough for the `failures` scenario to
/// exhaust towards one destination.
const TINY_RANGE: (u16, u16) = (40000, 40001);

const WORKLOAD: &str = env!("CARGO_BIN_EXE_port-workload");
const STORM: &str = env!("CARGO_BIN_EXE_port-storm");

/// The shared run, made by the first test that needs it.
fn session(test: &str) -> Option<&'static Session> {
    static SESSION: OnceLock<Result<Session, String>> = OnceLock::new();
    if !require_root(test) {
        return None;
    }
    let run =
        SESSION.get_or_init(|| run_session(Path::new(WORKLOAD), "basic", Some(RANGE)).map_err(|e| format!("{e:#}")));
    match run {
        Ok(s) => Some(s),
        Err(e) => panic!("the traced run of {} failed: {e}", tracer_bin().display()),
    }
}

/// A run of its own for one test: `scenario` in a fresh namespace with
/// `range`, the tracer started with `extra_args`.
fn own_session(test: &str, scenario: &str, range: (u16, u16), extra_args: &[&str]) -> Option<Session> {
    if !require_root(test) {
        return None;
    }
    let opts = SessionOptions {
        ephemeral_range: Some(range),
        extra_args: extra_args.iter().map(Into::into).collect(),
        ..SessionOptions::default()
    };
    match run_session_with(Path::new(WORKLOAD), scenario, &opts) {
        Ok(s) => Some(s),
        Err(e) => panic!("the traced run of {} with `{scenario}` failed: {e:#}", tracer_bin().display()),
    }
}

#[test]
fn header_and_summary() {
    let Some(s) = session("header_and_summary") else {
        return;
    };
    let problems = s.run_problems();
    eprintln!("header: {}", s.tracer.header);
    eprintln!("summary: {}", s.tracer.records.last().map(ToString::to_string).unwrap_or_default());
    assert!(
        problems.is_empty(),
        "header/summary problems:\n  {}\n\nstdout:\n{}\nstderr:\n{}",
        problems.join("\n  "),
        s.tracer.dump(),
        s.tracer.stderr
    );
}

#[test]
fn basic_lifecycles_match_workload_truth() {
    let Some(s) = session("basic_lifecycles_match_workload_truth") else {
        return;
    };
    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    assert_matches_truth(s, "basic", report, Vec::new());
}

#[test]
fn time_wait_handoff_is_reported_as_state() {
    let Some(s) = session("time_wait_handoff_is_reported_as_state") else {
        return;
    };
    let findings = check::check_time_wait_states(&s.truth, &s.tracer.records);
    let table: Vec<String> =
        findings.iter().map(|f| format!("{} {} {}: {}", f.kind, f.record, f.subject, f.detail)).collect();
    assert!(
        findings.is_empty() && s.truth.sockets.iter().any(|t| t.time_wait),
        "TIME_WAIT hand-offs the workload saw in the kernel but port-trace did not report as \
         state records:\n  {}\n\nstdout:\n{}",
        table.join("\n  "),
        s.tracer.dump()
    );
}

/// `basic` accepts four connections (b and c, per family); their sockets
/// share the listener's port and are none of port-trace's business. Where
/// events are joined by socket cookie, the programs keep those sockets'
/// state changes and destruction in the kernel (no hook ever asked their
/// cookie), so userspace never sees an event it cannot place: the summary's
/// `unknown_socket_events` is 0. The kprobe backend joins events by socket
/// address and has no such filter: there the children's events do arrive,
/// and are counted as unknown.
#[test]
fn accepted_connections_stay_in_the_kernel() {
    let Some(s) = session("accepted_connections_stay_in_the_kernel") else {
        return;
    };
    let summary = s.tracer.records.last().filter(|r| r["type"] == "summary").expect("a summary record");
    let unknown = summary["unknown_socket_events"].as_u64().expect("unknown_socket_events");
    let accepted = s.truth.sockets.iter().filter(|t| t.step.starts_with("b:") || t.step.starts_with("c:")).count();
    assert!(accepted >= 4, "the workload did not make its four connections: {:#?}", s.truth.sockets);
    if s.tracer.header["backend"] == "kprobe" {
        assert!(unknown > 0, "kprobe backend: the accepted children's events should arrive (and be unknown)");
    } else {
        assert_eq!(unknown, 0, "events of sockets port-trace does not follow left the kernel:\n{}", s.tracer.dump());
    }
}

/// Eight threads in `connect()` and `bind()` at once (`port-storm threads`),
/// with the tracer's per-thread tables of calls in flight cut to one slot
/// (`--in-call-slots 1`): every call but one at a time finds the slot taken
/// and keeps its state in the spill map, and the claims race. Every port
/// the workload got (its `getsockname`) must arrive as exactly one `alloc`
/// of its pid, with the origin and `ephemeral` flag it asked for (a bind's
/// requested port is what tells them apart: a mix-up between threads shows
/// as a wrong flag), nothing else, and nothing lost. With the precise and
/// kprobe backends (in the VM) the slots shared are those of their function
/// probes' entry state (`inet_hash_connect`, `get_port`).
#[test]
fn threads_sharing_call_slots_lose_nothing() {
    let test = "threads_sharing_call_slots_lose_nothing";
    if !require_root(test) {
        return;
    }
    let opts = SessionOptions {
        ephemeral_range: Some(RANGE),
        extra_args: ["--in-call-slots", "1"].iter().map(Into::into).collect(),
        ..SessionOptions::default()
    };
    let live = LiveSession::start(&opts).expect("the tracer starts");
    let out = output_with_timeout(live.ns().command(STORM).args(["threads", "8", "100"]), WORKLOAD_TIMEOUT)
        .expect("port-storm threads runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "port-storm threads failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("port-storm prints JSON")).collect();
    let (summary, ports) = lines.split_last().expect("port-storm's summary line");
    let pid = summary["pid"].as_u64().expect("port-storm's pid");
    std::thread::sleep(DRAIN);
    let s = live.finish(Truth { pid: pid as u32, sockets: Vec::new() }).expect("the tracer stops");

    let key = |v: &Value| format!("{} {} {} ephemeral={}", v["proto"], v["origin"], v["lport"], v["ephemeral"]);
    let mut want: Vec<String> = ports.iter().map(key).collect();
    let mut got: Vec<String> =
        s.tracer.records.iter().filter(|r| r["type"] == "alloc" && r["pid"] == pid).map(key).collect();
    want.sort();
    got.sort();
    assert_eq!(want.len(), 1 + 8 * 100 * 3, "port-storm's own count");
    let missing: Vec<&String> = want.iter().filter(|w| !got.contains(w)).collect();
    let extra: Vec<&String> = got.iter().filter(|g| !want.contains(g)).collect();
    assert!(
        want == got,
        "{} of {} allocations missing, {} extra (of {} reported)\nmissing: {missing:?}\nextra: {extra:?}",
        missing.len(),
        want.len(),
        extra.len(),
        got.len()
    );
    let summary = s.tracer.records.last().filter(|r| r["type"] == "summary").expect("a summary record");
    assert_eq!(summary["lost"], 0, "events lost: {summary}");
}

/// The TCP hooks that have a tp_btf and a raw_tp form.
const TCP_HOOKS: [&str; 2] = ["sock:inet_sock_set_state", "tcp:tcp_destroy_sock"];

/// The header's `hooks` entry for `hook`.
fn hook_status<'a>(header: &'a Value, hook: &str) -> Option<&'a str> {
    header["hooks"].as_array()?.iter().find(|h| h["hook"] == hook)?["status"].as_str()
}

/// `basic` with tp_btf refused (`--skip-mechanism tp_btf`): the TCP hooks
/// fall back to raw tracepoints, the header says so, and the records match
/// the workload's truth exactly as in the default run, TIME_WAIT hand-offs
/// included.
#[test]
fn raw_tracepoint_fallback_matches_workload_truth() {
    let test = "raw_tracepoint_fallback_matches_workload_truth";
    let Some(s) = own_session(test, "basic", RANGE, &["--skip-mechanism", "tp_btf"]) else {
        return;
    };
    // With the precise or kprobe backend (in the VM) only the state hook of
    // the portable backend is attached; the others are not in the header.
    let backend = s.tracer.header["backend"].as_str().unwrap_or_default().to_string();
    let tcp_hooks: Vec<&str> = TCP_HOOKS
        .iter()
        .copied()
        .filter(|h| backend.contains("portable") || *h == "sock:inet_sock_set_state")
        .collect();
    let mut hooks = Vec::new();
    for hook in tcp_hooks.iter().copied() {
        match hook_status(&s.tracer.header, hook) {
            Some(st) if st.starts_with("attached (raw_tp") && st.contains("tp_btf") => {}
            other => {
                hooks.push(format!("{hook}: want \"attached (raw_tp; fallback: tp_btf skipped ...)\", got {other:?}"))
            }
        }
    }
    // Without the flag the same hooks use tp_btf, so the flag made the
    // difference (the shared default run).
    if let Some(default) = session(test) {
        for hook in tcp_hooks.iter().copied() {
            let st = hook_status(&default.tracer.header, hook);
            if st != Some("attached (tp_btf)") {
                hooks.push(format!("{hook} in the default run: want \"attached (tp_btf)\", got {st:?}"));
            }
        }
    }
    assert!(hooks.is_empty(), "header hooks:\n  {}\nheader: {}", hooks.join("\n  "), s.tracer.header);

    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    let time_wait = check::check_time_wait_states(&s.truth, &s.tracer.records);
    assert_matches_truth(&s, "basic", report, time_wait);
}

/// The states a refused connect goes through.
const REFUSED: &[Transition] = &[("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")];

/// `failures`: a refused connect is an alloc (origin connect, ephemeral,
/// destination, the workload's pid) released with reason `connect_failed`,
/// via SYN_SENT; a connect that found every port of the range in use is
/// exactly one `alloc_fail` with errno EADDRNOTAVAIL, the destination and
/// the caller; the rest of the scenario (listener, clients) matches
/// normally, and nothing else is reported.
#[test]
fn failed_connects_are_reported() {
    let Some(s) = own_session("failed_connects_are_reported", "failures", TINY_RANGE, &[]) else {
        return;
    };
    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    let mut more =
        check::check_state_sequences(&s.truth, &s.tracer.records, |t| (t.op == "connect_refused").then_some(REFUSED));
    // A refused socket's port may be invisible to the workload; the
    // kernel can only have taken it from the range.
    let (lo, hi) = s.ephemeral_range;
    for (i, v) in s.tracer.records.iter().enumerate() {
        let lport = v["lport"].as_u64().unwrap_or(0);
        if v["type"] == "alloc" && v["ephemeral"] == true && !(u64::from(lo)..=u64::from(hi)).contains(&lport) {
            more.push(Finding {
                kind: check::Kind::Mismatch,
                record: "alloc".into(),
                subject: format!("line {}", i + 2),
                detail: format!("ephemeral port {lport} outside the namespace's range {lo}-{hi}: {v}"),
            });
        }
    }
    let fails = s.truth.failures().len();
    assert!(fails >= 2, "the workload reported {fails} failed calls; `failures` makes one per family");
    assert_matches_truth(&s, "failures", report, more);
}

/// The states of a listener that is closed without a connection.
const LISTENED: &[Transition] = &[("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")];

/// `listen-unbound`: `listen()` on a never-bound socket allocates a port
/// the kernel chose; it must be an alloc with origin `listen`, ephemeral,
/// the wildcard address and getsockname's port (the portable backend sees
/// it only at the socket's next event, but stamps it with the listen time),
/// then CLOSE->LISTEN, LISTEN->CLOSE and a release on close.
#[test]
fn listen_on_unbound_socket_is_an_allocation() {
    let Some(s) = own_session("listen_on_unbound_socket_is_an_allocation", "listen-unbound", RANGE, &[]) else {
        return;
    };
    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    let more =
        check::check_state_sequences(&s.truth, &s.tracer.records, |t| (t.op == "listen_unbound").then_some(LISTENED));
    assert_matches_truth(&s, "listen-unbound", report, more);
}

/// UDP `sendto()` on an unbound socket: the kernel autobinds it for the
/// send (`inet_send_prepare`); the portable backend reports it from the
/// first unconnected send (cgroup `sendmsg4/6`) as an `autobind` alloc.
#[test]
fn udp_sendto_autobind_is_an_allocation() {
    let Some(s) = own_session("udp_sendto_autobind_is_an_allocation", "udp-sendto", RANGE, &[]) else {
        return;
    };
    let autobound = s.truth.sockets.iter().filter(|t| t.origin == "autobind").count();
    assert!(autobound == 2, "the workload autobound {autobound} sockets; `udp-sendto` makes one per family");
    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    assert_matches_truth(&s, "udp-sendto", report, Vec::new());
}

/// UDP `connect()` on an unbound socket: the kernel autobinds it
/// (`ip4_datagram_connect` / `ip6_datagram_connect`), which the tracer must
/// report as an alloc with origin `connect`, the destination and the port
/// getsockname saw, released on close. The shared `basic` run does it once
/// per family (step `f:udp-connect`); this test holds those two sockets to
/// account on their own.
#[test]
fn udp_connect_is_an_allocation() {
    let Some(s) = session("udp_connect_is_an_allocation") else {
        return;
    };
    let step = "f:udp-connect";
    let mine: Vec<_> = s.truth.allocations().into_iter().filter(|t| t.step == step).collect();
    let families: Vec<&str> = mine.iter().map(|t| t.family.as_str()).collect();
    assert!(
        families == ["ipv4", "ipv6"]
            && mine.iter().all(|t| t.proto == "udp" && t.origin == "connect" && t.rport.is_some()),
        "the workload's UDP connects: {mine:#?}"
    );
    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    let about_them: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.subject.contains(step))
        .map(|f| format!("{} {} {}: {}", f.kind, f.record, f.subject, f.detail))
        .collect();
    let extra_udp: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.kind == check::Kind::Extra && f.detail.contains("\"proto\":\"udp\""))
        .map(|f| format!("{} {} {}: {}", f.kind, f.record, f.subject, f.detail))
        .collect();
    assert!(
        about_them.is_empty() && extra_udp.is_empty(),
        "UDP connect autobinds:\n  {}\n{report}",
        about_them.iter().chain(&extra_udp).cloned().collect::<Vec<_>>().join("\n  ")
    );
}
