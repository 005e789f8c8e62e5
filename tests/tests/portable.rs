//! Kernel tests of what the socket walks and the portable backend's newer
//! hooks add: TIME_WAIT ends found by walking the namespace's sockets
//! (`--walk-interval`), the snapshot of sockets that existed before the
//! tracer, failed allocations (EADDRNOTAVAIL storms, EADDRINUSE binds), and
//! loss with its repair (a tiny ring buffer).
//!
//! Each test has its own namespace and tracer run, and compares the tracer
//! with what the workload saw (getsockname, its own errno, its own clock)
//! or with the kernel (`ss` in the namespace). TIME_WAIT is ended early
//! with `ss -K` (the kernel destroys the TIME_WAIT sockets, `SOCK_DESTROY`),
//! instead of waiting its 60 s.
//!
//! These tests are about the portable backend as `auto` picks it on the
//! development kernel (6.18): `--walk-interval` only matters where no hook
//! reports a TIME_WAIT end (the precise and kprobe backends have one), and
//! the time bounds are this machine's. So they live apart from
//! tests/kernel.rs, which `cargo xtask vm-test` runs per backend in an
//! emulated guest. They need iproute2's `ss` (with `-K`, the kernel's
//! `CONFIG_INET_DIAG_DESTROY`) and root (see `require_root`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use port_trace_integration::check::{self, Finding, Kind};
use port_trace_integration::netns::NetNs;
use port_trace_integration::rfc3339::{self, UnixNanos};
use port_trace_integration::ss::{self, SsSocket};
use port_trace_integration::truth::{TruthSocket, CROWD, STORM_EXTRA};
use port_trace_integration::{
    assert_matches_truth, assert_report, prepare_netns, require_root, run_session_with, run_workload, signal,
    tracer_bin, HeldWorkload, LiveSession, Session, SessionOptions,
};
use serde_json::Value;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_port-workload");

/// The traced namespaces' `ip_local_port_range` (ports the tests choose
/// themselves lie below it).
const RANGE: (u16, u16) = (40000, 49999);

/// A range of 20 ports, for `connect-storm`.
const STORM_RANGE: (u16, u16) = (40000, 40019);

/// The most a TIME_WAIT socket's release may trail `ss` no longer listing
/// it.
const TIME_WAIT_END_BOUND_NS: i128 = 2_000_000_000;

/// What a walk and the scheduling may add to `--walk-interval` before a
/// TIME_WAIT end is reported (seen: up to ~0.2 s on a quiet machine, 0.6 s
/// with the load average at 5 on its 2 cores).
const WALK_SLACK_NS: i128 = 800_000_000;

/// The tracer's default `--walk-interval`.
const DEFAULT_WALK_INTERVAL: Duration = Duration::from_secs(1);

/// Slack for comparing our clock with the tracer's (converted from
/// CLOCK_BOOTTIME) where an event cannot precede something we did.
const ORDER_SLACK_NS: i128 = 20_000_000;

/// How often `ss` is polled while waiting for the kernel.
const POLL: Duration = Duration::from_millis(10);

/// Session options: `range`, and `extra` tracer arguments.
fn options(range: (u16, u16), extra: &[&str]) -> SessionOptions {
    SessionOptions {
        ephemeral_range: Some(range),
        extra_args: extra.iter().map(Into::into).collect(),
        ..SessionOptions::default()
    }
}

fn now() -> UnixNanos {
    rfc3339::unix_nanos(SystemTime::now())
}

fn ts(v: &Value) -> Option<UnixNanos> {
    v["ts"].as_str().and_then(rfc3339::parse)
}

fn ms(ns: i128) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

/// Adds a mismatch to `more`.
fn bad(more: &mut Vec<Finding>, record: &str, subject: String, detail: String) {
    more.push(finding(Kind::Mismatch, record, subject, detail));
}

fn finding(kind: Kind, record: &str, subject: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding { kind, record: record.into(), subject: subject.into(), detail: detail.into() }
}

/// Whether `s` is the kernel's TIME_WAIT socket for truth socket `t`.
fn is_time_wait_of(s: &SsSocket, t: &TruthSocket) -> bool {
    let addr = |a: &str, p: u16| a.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, p));
    s.proto == "tcp"
        && s.state == "TIME-WAIT"
        && Some(s.local) == addr(&t.laddr, t.lport)
        && s.peer == t.raddr.as_deref().zip(t.rport).and_then(|(a, p)| addr(a, p))
}

/// When the test ended TIME_WAIT sockets, by its own clock.
#[derive(Clone, Copy, Debug)]
struct Kill {
    /// Just before `ss -K` ran: no release may come before this.
    started: UnixNanos,
    /// The start of the first `ss` poll after the kill that no longer
    /// listed any of them: the release must come within
    /// [`TIME_WAIT_END_BOUND_NS`] of this.
    gone: SystemTime,
}

/// Ends the TIME_WAIT of `sockets` with `ss -K`, after checking that the
/// kernel lists every one of them in TIME_WAIT, then polls `ss` until it
/// lists none of them (at most 2 s). Returns the times and what `ss` listed
/// before the kill.
fn end_time_wait(ns: &NetNs, sockets: &[&TruthSocket]) -> (Kill, Vec<SsSocket>) {
    let before = ss::time_wait(ns).unwrap();
    for t in sockets {
        assert!(
            before.iter().any(|s| is_time_wait_of(s, t)),
            "the kernel does not list {} in TIME_WAIT before the kill; ss:\n{before:#?}",
            t.label()
        );
    }
    let started = now();
    ss::kill_time_wait(ns).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let polled = SystemTime::now();
        let listed = ss::time_wait(ns).unwrap();
        if !listed.iter().any(|s| sockets.iter().any(|t| is_time_wait_of(s, t))) {
            return (Kill { started, gone: polled }, before);
        }
        assert!(Instant::now() < deadline, "ss -K did not end the TIME_WAIT sockets within 2 s; ss:\n{listed:#?}");
        std::thread::sleep(POLL);
    }
}

/// The truth of a TIME_WAIT socket after the kill: its port was given back
/// at `kill.gone` (when the kernel stopped listing it), and the tracer must
/// say `time_wait_end`.
fn ended_by(t: &mut TruthSocket, kill: Kill) {
    t.expect_release = true;
    t.release_reason = Some("time_wait_end".into());
    t.closed_at = Some(rfc3339::format(kill.gone));
}

/// The `alloc` and `release` records of a socket, joined by the alloc's
/// cookie (lport, laddr and proto as the truth says).
fn alloc_and_release<'a>(records: &'a [Value], t: &TruthSocket) -> (Option<&'a Value>, Vec<&'a Value>) {
    let alloc = records.iter().find(|v| {
        v["type"] == "alloc"
            && v["proto"] == t.proto.as_str()
            && v["lport"].as_u64() == Some(u64::from(t.lport))
            && v["laddr"].as_str().and_then(|a| a.parse::<IpAddr>().ok()) == t.laddr.parse().ok()
    });
    let cookie = alloc.and_then(|a| a["sock"].as_u64());
    let releases =
        records.iter().filter(|v| v["type"] == "release" && cookie.is_some() && v["sock"].as_u64() == cookie).collect();
    (alloc, releases)
}

/// A socket as both sides name it: proto, local address, remote address.
type Key = (String, SocketAddr, Option<SocketAddr>);

fn key_of_ss(s: &SsSocket) -> Key {
    (s.proto.clone(), s.local, s.peer)
}

fn key_of_record(v: &Value) -> Option<Key> {
    let addr = |a: &Value, p: &Value| -> Option<SocketAddr> {
        Some(SocketAddr::new(a.as_str()?.parse().ok()?, u16::try_from(p.as_u64()?).ok()?))
    };
    let local = addr(&v["laddr"], &v["lport"])?;
    let remote = if v["raddr"].is_null() { None } else { Some(addr(&v["raddr"], &v["rport"])?) };
    Some((v["proto"].as_str()?.to_owned(), local, remote))
}

fn key_of_truth(t: &TruthSocket) -> Option<Key> {
    let local = SocketAddr::new(t.laddr.parse().ok()?, t.lport);
    let remote = match (&t.raddr, t.rport) {
        (Some(a), Some(p)) => Some(SocketAddr::new(a.parse().ok()?, p)),
        _ => None,
    };
    Some((t.proto.clone(), local, remote))
}

fn key_of_announced(v: &Value) -> Option<Key> {
    let local = SocketAddr::new(v["laddr"].as_str()?.parse().ok()?, u16::try_from(v["lport"].as_u64()?).ok()?);
    Some((v["proto"].as_str()?.to_owned(), local, None))
}

/// The tracer's `sock` is the kernel's socket cookie: for each of
/// `sockets`, the `alloc` record of its address has the cookie `ss -e`
/// showed for it in `kernel` (a TIME_WAIT socket keeps its parent's).
fn cookies_are_the_kernels(records: &[Value], sockets: &[&TruthSocket], kernel: &[SsSocket]) -> Vec<Finding> {
    let mut f = Vec::new();
    for t in sockets {
        let want = key_of_truth(t);
        let listed: Vec<&SsSocket> = kernel.iter().filter(|k| Some(key_of_ss(k)) == want).collect();
        let Some(cookie) = listed.first().and_then(|k| k.cookie).filter(|_| listed.len() == 1) else {
            f.push(finding(Kind::Missing, "alloc", t.label(), format!("not listed once by ss -e: {listed:?}")));
            continue;
        };
        let (alloc, _) = alloc_and_release(records, t);
        if let Some(a) = alloc.filter(|a| a["sock"].as_u64() != Some(cookie)) {
            f.push(finding(
                Kind::Mismatch,
                "alloc",
                t.label(),
                format!("sock {}, but the kernel's cookie for it is {cookie} (ss -e sk:{cookie:x})", a["sock"]),
            ));
        }
    }
    f
}

/// Each ended TIME_WAIT socket's release came after the kill began and
/// within [`TIME_WAIT_END_BOUND_NS`] of `ss` no longer listing it, and
/// within what `--walk-interval` promises ("reported within this much of
/// the kernel freeing the port"): `interval` plus [`WALK_SLACK_NS`] for the
/// walk itself and scheduling. Returns the findings and a table of the
/// latencies, for the log.
fn time_wait_end_timing(
    records: &[Value],
    ended: &[&TruthSocket],
    kill: Kill,
    interval: Duration,
) -> (Vec<Finding>, String) {
    let promised = i128::try_from(interval.as_nanos()).unwrap_or(i128::MAX) + WALK_SLACK_NS;
    let gone = rfc3339::unix_nanos(kill.gone);
    let mut f = Vec::new();
    let mut table = format!("{:<44} {:>12} {:>12}\n", "SOCKET", "AFTER KILL", "AFTER GONE");
    for t in ended {
        let (_, releases) = alloc_and_release(records, t);
        let Some(at) = releases.first().and_then(|r| ts(r)) else {
            f.push(finding(Kind::Missing, "release", t.label(), "no release after its TIME_WAIT was ended"));
            continue;
        };
        table += &format!("{:<44} {:>12} {:>12}\n", t.label(), ms(at - kill.started), ms(at - gone));
        if at < kill.started - ORDER_SLACK_NS {
            f.push(finding(
                Kind::Mismatch,
                "release",
                t.label(),
                format!("released {} before the kill began: the kernel still held the port", ms(kill.started - at)),
            ));
        }
        if at > gone + TIME_WAIT_END_BOUND_NS.min(promised) {
            f.push(finding(
                Kind::Mismatch,
                "release",
                t.label(),
                format!(
                    "released {} after ss stopped listing it (bound: 2 s, and the walk interval {interval:?} + {})",
                    ms(at - gone),
                    ms(WALK_SLACK_NS)
                ),
            ));
        }
    }
    (f, table)
}

/// A client closes first, so the kernel keeps its port in TIME_WAIT: the
/// tracer reports `state` → TIME_WAIT on the alloc's cookie and no release;
/// the test ends the TIME_WAIT with `ss -K`; the tracer, walking the
/// namespace every `interval`, reports a `release` with reason
/// `time_wait_end` on the same cookie within 2 s of `ss` no longer listing
/// the socket (and not before the kill; and within `interval` plus a
/// little, as `--walk-interval` promises), with `held_ns` = release ts −
/// alloc ts. Everything else matches the workload's truth exactly.
fn time_wait_end_is_reported(test: &str, interval: Option<&str>) {
    if !require_root(test) {
        return;
    }
    let extra: Vec<&str> = interval.map(|i| vec!["--walk-interval", i]).unwrap_or_default();
    let walk = match interval {
        Some("200ms") => Duration::from_millis(200),
        Some(other) => panic!("{test}: interval {other:?} not known here"),
        None => DEFAULT_WALK_INTERVAL,
    };
    let mut live = LiveSession::start(&options(RANGE, &extra)).unwrap();
    let mut truth = run_workload(live.ns(), Path::new(WORKLOAD), "time-wait").unwrap();
    let shape = truth.scenario_problems("time-wait", RANGE);
    assert!(shape.is_empty(), "the workload did not do what `time-wait` promises: {shape:#?}\n{truth:#?}");
    let held: Vec<TruthSocket> = truth.sockets.iter().filter(|t| t.time_wait).cloned().collect();
    let (kill, before) = end_time_wait(live.ns(), &held.iter().collect::<Vec<_>>());
    for t in truth.sockets.iter_mut().filter(|t| t.time_wait) {
        ended_by(t, kill);
    }
    // Stop as soon as both releases are in (or 3 s after the kill).
    let wanted = held.len();
    let tracer = live.tracer().expect("running");
    tracer.wait_until(Duration::from_secs(3), |r| {
        r.iter().filter(|v| v["type"] == "release" && v["reason"] == "time_wait_end").count() >= wanted
    });
    let s = live.finish(truth).unwrap();

    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    let mut more = check::check_time_wait_states(&s.truth, &s.tracer.records);
    more.extend(cookies_are_the_kernels(&s.tracer.records, &held.iter().collect::<Vec<_>>(), &before));
    let (timing, table) = time_wait_end_timing(&s.tracer.records, &held.iter().collect::<Vec<_>>(), kill, walk);
    eprintln!("{test}: TIME_WAIT ends (tracer ts vs our clock):\n{table}");
    more.extend(timing);
    assert_report(&s, &format!("`time-wait` with {extra:?}"), report, more);
}

/// [`time_wait_end_is_reported`] with the default walk interval (1 s).
#[test]
fn time_wait_end_is_reported_with_the_default_interval() {
    time_wait_end_is_reported("time_wait_end_is_reported_with_the_default_interval", None);
}

/// [`time_wait_end_is_reported`] with `--walk-interval 200ms`.
#[test]
fn time_wait_end_is_reported_with_a_200ms_interval() {
    time_wait_end_is_reported("time_wait_end_is_reported_with_a_200ms_interval", Some("200ms"));
}

/// Sockets that exist before the tracer starts: `port-workload hold` keeps a
/// listener, a client connected to it (and the accepted child) and a UDP
/// socket per family open, and `time-wait` has left a client port per
/// family in TIME_WAIT. Right after its header the tracer reports exactly
/// those as `alloc` records with origin `snapshot` (and nothing before
/// them): the open ones with the workload's pid and comm (found through
/// `/proc/*/fd`), the TIME_WAIT ones with pid 0 and comm "" (no process
/// owns them); `ephemeral` as estimated (true for the connected sockets on
/// ports inside the range); not the accepted children, which share their
/// listener's port. When the workload closes its sockets, and the test ends
/// the TIME_WAIT ones with `ss -K`, each gets one `release` on its
/// snapshot's cookie with `held_ns` null.
#[test]
fn sockets_from_before_the_start_are_a_snapshot() {
    if !require_root("sockets_from_before_the_start_are_a_snapshot") {
        return;
    }
    let opts = options(RANGE, &[]);
    let ns = prepare_netns(&opts).unwrap();
    let tw_truth = run_workload(&ns, Path::new(WORKLOAD), "time-wait").unwrap();
    let shape = tw_truth.scenario_problems("time-wait", RANGE);
    assert!(shape.is_empty(), "the workload did not do what `time-wait` promises: {shape:#?}\n{tw_truth:#?}");
    let held = HeldWorkload::start(&ns, Path::new(WORKLOAD), "hold", Duration::from_secs(20)).unwrap();
    let announced: Vec<Value> = held.ready["sockets"].as_array().cloned().unwrap_or_default();
    assert_eq!(announced.len(), 6, "the `hold` workload's ready line: {}", held.ready);
    let tw: Vec<TruthSocket> = tw_truth.sockets.iter().filter(|t| t.time_wait).cloned().collect();

    let kernel_before = ss::list(&ns).unwrap();
    let mut live = LiveSession::start_in(ns, &opts).unwrap();
    // The snapshot must be complete before the workload lets go: wait for
    // an alloc of every socket that exists (the UDP walk comes last, so by
    // then any accepted child would have been reported too).
    let port_of = |v: &Value| {
        let ip = v["laddr"].as_str().and_then(|a| a.parse::<IpAddr>().ok());
        (v["proto"].as_str().unwrap_or("?").to_owned(), ip, v["lport"].as_u64())
    };
    let mut expected: Vec<(String, Option<IpAddr>, Option<u64>)> = announced.iter().map(port_of).collect();
    expected.extend(tw.iter().map(|t| (t.proto.clone(), t.laddr.parse().ok(), Some(u64::from(t.lport)))));
    let tracer = live.tracer().expect("running");
    let complete = tracer.wait_until(Duration::from_secs(5), |r| {
        expected.iter().all(|e| r.iter().any(|v| v["type"] == "alloc" && &port_of(v) == e))
    });
    let snapshot_done = SystemTime::now();
    let mut truth = held.release().unwrap();
    let (kill, _) = end_time_wait(live.ns(), &tw.iter().collect::<Vec<_>>());
    let wanted = truth.sockets.len() + tw.len();
    if complete {
        let tracer = live.tracer().expect("running");
        tracer.wait_until(Duration::from_secs(3), |r| r.iter().filter(|v| v["type"] == "release").count() >= wanted);
    }

    let shape = truth.scenario_problems("hold", RANGE);
    assert!(shape.is_empty(), "the workload did not do what `hold` promises: {shape:#?}\n{truth:#?}");
    // The TIME_WAIT sockets belong to nobody: pid 0; a connected socket on
    // a port of the range is estimated ephemeral.
    for mut t in tw.iter().cloned() {
        t.pid = 0;
        t.origin = "snapshot".into();
        t.ephemeral = true;
        ended_by(&mut t, kill);
        truth.sockets.push(t);
    }
    let s = live.finish(truth).unwrap();

    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    let mut more = Vec::new();
    if !complete {
        more.push(finding(
            Kind::Missing,
            "alloc",
            "snapshot",
            format!("within 5 s of the header, no alloc for some of {expected:?}"),
        ));
    }
    // Right after the header: the snapshot allocs come first, all found
    // between the tracer's start and the workload's release.
    let first_other = s.tracer.records.iter().position(|v| v["origin"] != "snapshot").unwrap_or(s.tracer.records.len());
    let (start, done) = (s.started, rfc3339::unix_nanos(snapshot_done));
    for (i, v) in s.tracer.records.iter().enumerate() {
        if v["origin"] != "snapshot" {
            continue;
        }
        if i > first_other {
            more.push(finding(
                Kind::Mismatch,
                "alloc",
                format!("line {}", i + 2),
                format!("a snapshot after line {} (not right after the header): {v}", first_other + 2),
            ));
        }
        if !ts(v).is_some_and(|t| t >= start - ORDER_SLACK_NS && t <= done + ORDER_SLACK_NS) {
            more.push(finding(
                Kind::Mismatch,
                "alloc",
                format!("line {}", i + 2),
                format!("snapshot ts {} outside the tracer's start .. the snapshot's completion", v["ts"]),
            ));
        }
    }
    // Each snapshot's `sock` is the cookie the kernel showed for it before
    // the tracer started.
    more.extend(cookies_are_the_kernels(&s.tracer.records, &s.truth.allocations(), &kernel_before));
    let ended: Vec<&TruthSocket> = s.truth.sockets.iter().filter(|t| t.time_wait).collect();
    let (timing, table) = time_wait_end_timing(&s.tracer.records, &ended, kill, DEFAULT_WALK_INTERVAL);
    eprintln!("snapshot: TIME_WAIT ends (tracer ts vs our clock):\n{table}");
    more.extend(timing);
    assert_report(&s, "`hold` with `time-wait` before the tracer", report, more);
}

/// A connect storm into a namespace whose range holds 20 ports: per family,
/// `connect-storm` makes 30 connects to one listener, keeping every
/// connection open, so that the last 10 get EADDRNOTAVAIL. The tracer
/// reports exactly as many `alloc_fail` records with errno EADDRNOTAVAIL,
/// origin `connect`, the destination and the workload's pid and comm, one
/// per failed call. Binds to a port another socket holds (the listener's
/// address, the wildcard address; a UDP socket's) get EADDRINUSE: one
/// `alloc_fail` each with errno EADDRINUSE, origin `bind`, that port and
/// the address asked for. Everything else matches the truth exactly.
#[test]
fn failed_allocations_are_counted_exactly() {
    if !require_root("failed_allocations_are_counted_exactly") {
        return;
    }
    let s = match run_session_with(Path::new(WORKLOAD), "connect-storm", &options(STORM_RANGE, &[])) {
        Ok(s) => s,
        Err(e) => panic!("the traced run of {} with `connect-storm` failed: {e:#}", tracer_bin().display()),
    };
    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    // The totals, per errno, side by side (check_lifecycles pairs them one
    // by one; this says the same in numbers).
    let mut counts: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    for t in s.truth.failures() {
        counts.entry((t.errno.clone().unwrap_or_default(), t.origin.clone())).or_default().0 += 1;
    }
    for v in s.tracer.records.iter().filter(|v| v["type"] == "alloc_fail") {
        let key = (v["errno"].as_str().unwrap_or("?").to_owned(), v["origin"].as_str().unwrap_or("?").to_owned());
        counts.entry(key).or_default().1 += 1;
    }
    let mut more = Vec::new();
    let mut table = format!("{:<14} {:<8} {:>8} {:>8}\n", "ERRNO", "ORIGIN", "WORKLOAD", "TRACER");
    for ((errno, origin), (want, got)) in &counts {
        table += &format!("{errno:<14} {origin:<8} {want:>8} {got:>8}\n");
        if want != got {
            more.push(finding(
                Kind::Mismatch,
                "alloc_fail",
                format!("{errno} {origin}"),
                format!("the workload got {want}, the tracer reported {got}"),
            ));
        }
    }
    eprintln!("failed calls:\n{table}");
    let want = [("EADDRNOTAVAIL", "connect", 2 * STORM_EXTRA), ("EADDRINUSE", "bind", 2 * 3)];
    for (errno, origin, n) in want {
        let got = counts.get(&(errno.to_owned(), origin.to_owned())).map_or(0, |c| c.0);
        assert_eq!(got, n, "the workload saw {got} {errno} from {origin}, `connect-storm` makes {n}\n{table}");
    }
    assert_matches_truth(&s, "connect-storm", report, more);
}

/// Loss and its repair. The tracer runs with a 4 KiB ring buffer
/// (`--ring-buffer-kib 4`); `port-workload churn` opens a known set of
/// sockets (per family: a listener, two clients with their accepted
/// children, two bound UDP sockets, a connected one), then in a burst of
/// at most 3 s opens and closes 3000 UDP sockets, keeping every 300th open
/// (the stragglers), and makes 500 TCP connections, aborted (so none
/// lingers in TIME_WAIT); then it holds what is open. The tracer is
/// stopped (SIGSTOP) from the moment it has printed the known set's allocs
/// until the burst ends, so the ring fills and the rest of the burst is
/// lost however fast this machine is. Each UDP socket closes only once 64
/// newer ones are open, more events later than the ring holds, so that
/// the loss parts the allocs the tracer saw from their releases: there is
/// always something to repair. The last 64 close, 200 µs apart, after the
/// tracer is let go (SIGCONT): releases of sockets whose allocs were lost.
/// (The namespace then has fewer sockets than the 4 KiB ring holds walk
/// events, 30 of 136 bytes, so that the repair walks themselves can be
/// delivered; walks of more sockets are the subject of
/// `snapshot_of_more_sockets_than_the_ring_holds`.)
///
/// The tracer must say that it lost events: `lost` records with counts
/// above 0, whose sum is the summary's `lost` (and their number its
/// `counts.lost`). It repairs with a walk right after losses (at its next
/// walk tick, every second by default): releases it did not see become
/// `reason: "reconciled"`, each pairing with an alloc of the same cookie,
/// for a socket the kernel no longer has, within 2 s of the burst (long
/// before the 30 s periodic reconcile). About 2.5 s after the burst the
/// tracer is stopped, and its accounting is compared with the kernel's
/// sockets (`ss -e` in the namespace, accepted children excluded, see
/// `ss::port_holders`), socket by socket through the cookies:
///
/// - every socket the tracer has an `alloc` and no `release` for is held by
///   the kernel, at that address, owned by the workload (nothing phantom);
/// - every socket the kernel holds is followed by the tracer, except
///   stragglers whose `alloc` was lost: the summary documents
///   `ports_in_use` as the ports of sockets whose allocation was seen, and
///   the walks after a loss only look for what ended, so such a socket is
///   not counted (the known set, opened into an empty ring buffer before the
///   burst, must always be followed);
/// - so `ports_in_use` = the kernel's count − those unfollowed stragglers,
///   exactly; both numbers are printed. When the tracer learns to adopt
///   such sockets, the difference becomes 0 and this still holds.
///
/// Releases of sockets whose alloc was lost carry `held_ns: null` and are
/// the summary's `unpaired_releases`.
#[test]
fn lost_events_are_reported_and_repaired() {
    if !require_root("lost_events_are_reported_and_repaired") {
        return;
    }
    let mut live = LiveSession::start(&options(RANGE, &["--ring-buffer-kib", "4"])).unwrap();
    let mut held =
        HeldWorkload::start_until(live.ns(), Path::new(WORKLOAD), "churn", "armed", Duration::from_secs(30)).unwrap();
    // The known set's allocs are out of the ring before the burst.
    let armed: Vec<Key> = held.ready["known"].as_array().into_iter().flatten().filter_map(key_of_announced).collect();
    let tracer = live.tracer().expect("running");
    let delivered = tracer.wait_until(Duration::from_secs(5), |r| {
        armed.iter().all(|k| {
            r.iter().any(|v| v["type"] == "alloc" && key_of_record(v).is_some_and(|r| r.0 == k.0 && r.1 == k.1))
        })
    });
    assert!(
        armed.len() == 12 && delivered,
        "the tracer did not print the known set's {} allocs within 5 s: {:#?}\nhas: {:#?}",
        armed.len(),
        held.ready,
        tracer.records_so_far()
    );
    // The tracer stands still for the burst (as a consumer descheduled on a
    // busy host would): the ring fills and the rest is lost, whatever this
    // machine's speed.
    let tracer_pid = tracer.pid();
    signal(tracer_pid, libc::SIGSTOP);
    let proceeded = held.proceed("burst", "paused", Duration::from_secs(30));
    signal(tracer_pid, libc::SIGCONT);
    proceeded.unwrap();
    // The burst's last sockets close with the tracer running: releases
    // whose allocs were lost.
    held.proceed("close", "ready", Duration::from_secs(30)).unwrap();
    let burst = held.ready["burst"].clone();
    let (Some(burst_start), Some(burst_end)) =
        (burst["started"].as_str().and_then(rfc3339::parse), burst["ended"].as_str().and_then(rfc3339::parse))
    else {
        panic!("the `churn` ready line has no burst times: {}", held.ready);
    };
    let (udp, tcp) = (burst["udp"].as_u64().unwrap_or(0), burst["tcp"].as_u64().unwrap_or(0));
    let kept: Vec<Key> = burst["kept"].as_array().into_iter().flatten().filter_map(key_of_announced).collect();
    assert!(udp >= 1000 && tcp >= 100 && !kept.is_empty(), "the burst was too small to overflow anything: {burst}");

    // Quiesce: the repair walk comes at the first walk tick after the loss.
    let settle = burst_end + 2_500_000_000 - now();
    if settle > 0 {
        std::thread::sleep(Duration::from_nanos(u64::try_from(settle).unwrap_or(0)));
    }
    let kernel = ss::list(live.ns()).unwrap();
    let stopped_at = now();
    live.stop().unwrap();
    let kernel_after = ss::list(live.ns()).unwrap();
    let truth = held.release().unwrap();
    let s = live.finish(truth).unwrap();
    let shape = s.truth.scenario_problems("churn", RANGE);
    assert!(shape.is_empty(), "the workload did not do what `churn` promises: {shape:#?}\n{:#?}", s.truth);
    let mut sorted = (kernel.clone(), kernel_after.clone());
    sorted.0.sort();
    sorted.1.sort();
    assert_eq!(sorted.0, sorted.1, "the namespace changed while the tracer stopped; it should be quiet");

    // The premise: the kernel holds the known set and the stragglers, no
    // more (the burst left nothing else), each with a cookie.
    let holders: Vec<&SsSocket> = ss::port_holders(&kernel);
    let known: Vec<Key> = s.truth.allocations().into_iter().filter_map(key_of_truth).collect();
    let mut want: Vec<&Key> = known.iter().chain(&kept).collect();
    want.sort();
    let mut have: Vec<Key> = holders.iter().map(|h| key_of_ss(h)).collect();
    have.sort();
    assert!(
        want.iter().copied().eq(have.iter()) && holders.iter().all(|h| h.cookie.is_some()),
        "the kernel does not hold exactly the known set and the stragglers:\nkernel: {holders:#?}\nwant: {want:#?}"
    );
    let held_by_cookie: BTreeMap<u64, &SsSocket> = holders.iter().filter_map(|h| Some((h.cookie?, *h))).collect();

    let records = &s.tracer.records;
    let summary = records.last().cloned().unwrap_or_default();
    let mut more: Vec<Finding> = Vec::new();

    // Loss is reported, and adds up.
    let lost: Vec<&Value> = records.iter().filter(|v| v["type"] == "lost").collect();
    let lost_sum: u64 = lost.iter().filter_map(|v| v["count"].as_u64()).sum();
    if lost.is_empty() {
        let why = "no lost record, although the burst overflowed a 4 KiB ring buffer";
        bad(&mut more, "lost", "run".into(), why.into());
    }
    for v in lost.iter().filter(|v| v["count"].as_u64().is_none_or(|c| c == 0)) {
        bad(&mut more, "lost", "record".into(), format!("count must be above 0: {v}"));
    }
    if summary["lost"].as_u64() != Some(lost_sum) || lost_sum == 0 {
        let why = format!("{} events, the lost records say {lost_sum} (want > 0)", summary["lost"]);
        bad(&mut more, "summary", "lost".into(), why);
    }
    if summary["counts"]["lost"].as_u64() != Some(lost.len() as u64) {
        let why = format!("{}, but {} lost records", summary["counts"]["lost"], lost.len());
        bad(&mut more, "summary", "counts.lost".into(), why);
    }

    // What the tracer thinks is open: allocs without a release.
    let mut allocs: BTreeMap<u64, &Value> = BTreeMap::new();
    let mut released: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for v in records {
        match (v["type"].as_str(), v["sock"].as_u64()) {
            // (The guard records the alloc; it holds for a second one.)
            (Some("alloc"), Some(c)) if allocs.insert(c, v).is_some() => {
                bad(&mut more, "alloc", format!("sock {c}"), "a second alloc for one cookie".into());
            }
            (Some("release"), Some(c)) => released.entry(c).or_default().push(v),
            _ => {}
        }
    }
    for (c, rs) in released.iter().filter(|(_, rs)| rs.len() > 1) {
        bad(&mut more, "release", format!("sock {c}"), format!("{} releases for one cookie", rs.len()));
    }
    let open: BTreeMap<u64, &Value> =
        allocs.iter().filter(|(c, _)| !released.contains_key(c)).map(|(c, v)| (*c, *v)).collect();
    let pid = u64::from(s.truth.pid);
    for (c, v) in &open {
        let Some(k) = held_by_cookie.get(c) else {
            let why = format!("open by the tracer's records, gone from the kernel: {v}");
            more.push(finding(Kind::Extra, "alloc", format!("sock {c}"), why));
            continue;
        };
        if key_of_record(v) != Some(key_of_ss(k)) || v["pid"].as_u64() != Some(pid) {
            let why = format!("the kernel has {}, by pid {pid} (the workload): {v}", k.label());
            bad(&mut more, "alloc", format!("sock {c}"), why);
        }
    }
    let mut unfollowed = Vec::new();
    for (c, k) in held_by_cookie.iter().filter(|(c, _)| !open.contains_key(c)) {
        let key = key_of_ss(k);
        if allocs.contains_key(c) {
            let why = format!("released, but the kernel still holds it: {:?}", released.get(c));
            bad(&mut more, "release", k.label(), why);
        } else if known.contains(&key) {
            more.push(finding(Kind::Missing, "alloc", k.label(), "a socket of the known set, opened before the burst"));
        } else {
            unfollowed.push(*k);
        }
    }
    let in_use = summary["ports_in_use"].as_u64();
    let accounted = holders.len() - unfollowed.len();
    if in_use != Some(accounted as u64) || in_use != Some(open.len() as u64) {
        let why = format!(
            "{}, but the kernel holds {} ports (ss, children excluded), {} of them by stragglers whose alloc was \
             lost (not followed): want {accounted}; the records leave {} open",
            summary["ports_in_use"],
            holders.len(),
            unfollowed.len(),
            open.len()
        );
        bad(&mut more, "summary", "ports_in_use".into(), why);
    }

    // Releases of sockets whose alloc was lost: allowed, with `held_ns`
    // null, and counted as the summary's `unpaired_releases`.
    let unpaired: Vec<&Value> =
        released.iter().filter(|(c, _)| !allocs.contains_key(c)).flat_map(|(_, rs)| rs.iter().copied()).collect();
    for v in unpaired.iter().filter(|v| !v["held_ns"].is_null()) {
        let why = format!("no alloc was printed for it, so held_ns must be null: {v}");
        bad(&mut more, "release", "unpaired".into(), why);
    }
    if summary["unpaired_releases"].as_u64() != Some(unpaired.len() as u64) {
        let why = format!("{}, but {} releases have no alloc record", summary["unpaired_releases"], unpaired.len());
        bad(&mut more, "summary", "unpaired_releases".into(), why);
    }

    // Repairs: inferred releases, right after the loss, of sockets gone.
    let reconciled: Vec<&Value> =
        records.iter().filter(|v| v["type"] == "release" && v["reason"] == "reconciled").collect();
    if reconciled.is_empty() {
        let why = "none, although events were lost in a burst of closes";
        bad(&mut more, "release", "reconciled".into(), why.into());
    }
    for v in &reconciled {
        let c = v["sock"].as_u64().unwrap_or(u64::MAX);
        let paired = allocs.get(&c).is_some_and(|a| ts(a) <= ts(v));
        let gone = !held_by_cookie.contains_key(&c);
        let timely = ts(v).is_some_and(|t| t >= burst_start - ORDER_SLACK_NS && t <= burst_end + 2_000_000_000);
        if !(paired && gone && timely) {
            let why = format!(
                "reconciled: earlier alloc {paired}, socket gone {gone}, within 2 s of the burst {timely}: {v}"
            );
            bad(&mut more, "release", format!("sock {c}"), why);
        }
    }
    // Not in the contract (yet): a summary count of them, if it has one.
    if let Some(n) = summary.get("reconciled").and_then(Value::as_u64) {
        if n != reconciled.len() as u64 {
            let why = format!("{n}, but {} reconciled release records", reconciled.len());
            bad(&mut more, "summary", "reconciled".into(), why);
        }
    }

    let releases: usize = released.values().map(Vec::len).sum();
    eprintln!(
        "burst: {udp} UDP ({} kept open) + {tcp} TCP in {}; lost: {} record(s), {lost_sum} events; {} allocs, \
         {releases} releases ({} reconciled, {} unpaired)",
        kept.len(),
        ms(burst_end - burst_start),
        lost.len(),
        allocs.len(),
        reconciled.len(),
        unpaired.len(),
    );
    eprintln!(
        "ports_in_use {} vs the kernel's {} (ss {} after the burst, children excluded): {} stragglers whose alloc \
         was lost are not followed",
        summary["ports_in_use"],
        holders.len(),
        ms(stopped_at - burst_end),
        unfollowed.len()
    );
    for h in &holders {
        let mark = if unfollowed.contains(h) { "  (not followed)" } else { "" };
        eprintln!("  {}{mark}", h.label());
    }
    // The rest of the contract, without the lost records that are the point
    // here, and the header, exit and summary.
    let mut schema = check::check_schema(records, s.netns_inode, s.window());
    schema.findings.retain(|f| f.record != "lost");
    more.extend(schema.findings);
    report_loss(&s, more);
}

/// Fails with the findings of a test with too many records to print in
/// full (loss, crowds), the lost records and the tracer's summary.
fn report_loss(s: &Session, more: Vec<Finding>) {
    let run = s.run_problems();
    let table: Vec<String> =
        more.iter().map(|f| format!("{:<9} {:<10} {:<48} {}", f.kind, f.record, f.subject, f.detail)).collect();
    assert!(
        more.is_empty() && run.is_empty(),
        "loss and repair (netns {}, inode {}):\n{}\nrun: {run:#?}\nlost records: {}\nsummary: {}\ntracer stderr:\n{}",
        s.netns_name,
        s.netns_inode,
        table.join("\n"),
        s.tracer.records.iter().filter(|v| v["type"] == "lost").map(ToString::to_string).collect::<Vec<_>>().join(" "),
        s.tracer.records.last().map(ToString::to_string).unwrap_or_default(),
        s.tracer.stderr
    );
}

/// A snapshot of more sockets than the ring buffer holds events: the
/// `crowd` workload holds 100 UDP sockets (50 per family) when a tracer
/// with a 4 KiB ring buffer (30 events of 136 bytes) starts. Whatever the
/// ring's size, the snapshot must report every one of them, as an `alloc`
/// with origin `snapshot`, the kernel's cookie (`ss -e`), the address and
/// the workload's pid; and within 3 s (time for a repair walk after a
/// loss, should there be one) the summary's `ports_in_use` must be the 100
/// the kernel holds. (The same happens with the default 4 MiB ring and
/// ~31,000 sockets, which a busy host has.)
#[test]
fn snapshot_of_more_sockets_than_the_ring_holds() {
    if !require_root("snapshot_of_more_sockets_than_the_ring_holds") {
        return;
    }
    let opts = options(RANGE, &["--ring-buffer-kib", "4"]);
    let ns = prepare_netns(&opts).unwrap();
    let held = HeldWorkload::start(&ns, Path::new(WORKLOAD), "crowd", Duration::from_secs(20)).unwrap();
    let kernel = ss::list(&ns).unwrap();
    let holders: Vec<&SsSocket> = ss::port_holders(&kernel);
    let announced: Vec<Key> =
        held.ready["sockets"].as_array().into_iter().flatten().filter_map(key_of_announced).collect();
    let mut have: Vec<Key> = holders.iter().map(|h| key_of_ss(h)).collect();
    have.sort();
    let mut want = announced.clone();
    want.sort();
    assert!(
        want.len() == 2 * CROWD && want == have && holders.iter().all(|h| h.cookie.is_some()),
        "the kernel does not hold exactly the sockets of `crowd`:\nkernel: {holders:#?}\nready: {}",
        held.ready
    );

    let mut live = LiveSession::start_in(ns, &opts).unwrap();
    let started = Instant::now();
    let tracer = live.tracer().expect("running");
    let complete = tracer.wait_until(Duration::from_secs(3), |r| {
        r.iter().filter(|v| v["type"] == "alloc" && v["origin"] == "snapshot").count() >= 2 * CROWD
    });
    // Give a repair walk its chance in any case.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    live.stop().unwrap();
    let truth = held.release().unwrap();
    let s = live.finish(truth).unwrap();
    let shape = s.truth.scenario_problems("crowd", RANGE);
    assert!(shape.is_empty(), "the workload did not do what `crowd` promises: {shape:#?}\n{:#?}", s.truth);

    let records = &s.tracer.records;
    let summary = records.last().cloned().unwrap_or_default();
    let pid = u64::from(s.truth.pid);
    let mut more = Vec::new();
    let snapshots: BTreeMap<u64, &Value> = records
        .iter()
        .filter(|v| v["type"] == "alloc" && v["origin"] == "snapshot")
        .filter_map(|v| Some((v["sock"].as_u64()?, v)))
        .collect();
    let mut missing = 0;
    for h in &holders {
        let c = h.cookie.unwrap_or_default();
        match snapshots.get(&c) {
            None => missing += 1,
            Some(v) if key_of_record(v) != Some(key_of_ss(h)) || v["pid"].as_u64() != Some(pid) => {
                let why = format!("the kernel has {}, by pid {pid} (the workload): {v}", h.label());
                bad(&mut more, "alloc", format!("sock {c}"), why);
            }
            Some(_) => {}
        }
    }
    if missing > 0 {
        let why = format!("{missing} of the {} sockets the kernel holds have no snapshot alloc", holders.len());
        more.push(finding(Kind::Missing, "alloc", "snapshot", why));
    }
    for (c, v) in snapshots.iter().filter(|(c, _)| !holders.iter().any(|h| h.cookie == Some(**c))) {
        more.push(finding(Kind::Extra, "alloc", format!("sock {c}"), format!("not a socket of the kernel: {v}")));
    }
    if summary["ports_in_use"].as_u64() != Some(holders.len() as u64) {
        let why = format!("{}, but the kernel holds {} ports", summary["ports_in_use"], holders.len());
        bad(&mut more, "summary", "ports_in_use".into(), why);
    }
    let lost: Vec<String> = records.iter().filter(|v| v["type"] == "lost").map(ToString::to_string).collect();
    eprintln!(
        "crowd: {} snapshot allocs of {} sockets within 3 s: {complete}; ports_in_use {}; lost records: {lost:?}",
        snapshots.len(),
        holders.len(),
        summary["ports_in_use"]
    );
    let mut schema = check::check_schema(records, s.netns_inode, s.window());
    schema.findings.retain(|f| f.record != "lost");
    more.extend(schema.findings);
    report_loss(&s, more);
}
