//! Comparing port-trace's JSON Lines with the workload's truth.
//!
//! Nothing here is lenient by default: every truth socket must have exactly
//! one matching `alloc`, every released one exactly one `release` joined by
//! its `sock` cookie, and anything the tracer reports beyond that is listed
//! as extra. The result is a [`Report`] whose `Display` is a table of
//! missing / extra / mismatched records followed by both sides in full.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

use crate::rfc3339::{self, UnixNanos};
use crate::truth::{join_addr, Truth, TruthSocket};

/// The `comm` every record of the workload must carry.
pub const WORKLOAD_COMM: &str = "port-workload";

/// Slack between the workload's wall clock and the tracer's `ts` (which is
/// converted from the kernel's clock) for one event.
pub const CLOCK_SLACK_NS: i128 = 2_000_000_000;

/// Slack between `held_ns` and the difference of the `ts` of the alloc and
/// the release.
pub const HELD_SLACK_NS: i128 = 1_000_000;

/// What kind of difference a [`Finding`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The workload did it; the tracer did not report it.
    Missing,
    /// The tracer reported something the workload did not do.
    Extra,
    /// Both sides have it but fields differ.
    Mismatch,
    /// A record breaks the JSON Lines contract (types, formats, netns).
    Invalid,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::Mismatch => "mismatch",
            Kind::Invalid => "invalid",
        })
    }
}

/// One difference between the tracer's records and the truth.
#[derive(Clone, Debug)]
pub struct Finding {
    /// Missing, extra, ...
    pub kind: Kind,
    /// The record type concerned (`alloc`, `release`, `state`, ...).
    pub record: String,
    /// Which socket or line: a truth label or `line N ...`.
    pub subject: String,
    /// What exactly differs.
    pub detail: String,
}

/// The outcome of a comparison.
#[derive(Debug, Default)]
pub struct Report {
    /// Differences that fail the test.
    pub findings: Vec<Finding>,
    /// Things a person should know that do not fail this check.
    pub notes: Vec<String>,
    /// Both sides, for the failure message.
    pub context: String,
}

impl Report {
    /// No findings.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    fn add(&mut self, kind: Kind, record: &str, subject: impl Into<String>, detail: impl Into<String>) {
        self.findings.push(Finding { kind, record: record.into(), subject: subject.into(), detail: detail.into() });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.findings.is_empty() {
            writeln!(f, "no differences")?;
        } else {
            let w = self.findings.iter().map(|x| x.subject.len()).max().unwrap_or(0).max(13);
            writeln!(f, "{} difference(s):", self.findings.len())?;
            writeln!(f, "{:<9} {:<10} {:<w$} DETAIL", "KIND", "RECORD", "SOCKET / LINE")?;
            for x in &self.findings {
                writeln!(f, "{:<9} {:<10} {:<w$} {}", x.kind, x.record, x.subject, x.detail)?;
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        f.write_str(&self.context)
    }
}

/// When the run happened, to check the tracer's timestamps.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Wall clock before the tracer started.
    pub start: UnixNanos,
    /// Wall clock after it exited.
    pub end: UnixNanos,
}

/// The facts a header must agree with.
#[derive(Clone, Debug)]
pub struct HeaderTruth {
    /// The traced namespace's `ip_local_port_range`.
    pub ephemeral_range: (u16, u16),
    /// `/proc/sys/kernel/osrelease`.
    pub kernel_release: String,
    /// The workspace version (port-trace shares it).
    pub version: String,
    /// When the run happened.
    pub window: Window,
}

/// Checks the header line against the contract and the machine.
pub fn check_header(h: &Value, t: &HeaderTruth) -> Vec<String> {
    let mut p = Vec::new();
    let mut want = |ok: bool, what: String| {
        if !ok {
            p.push(what);
        }
    };
    want(h["type"] == "header", format!("type: want \"header\", got {}", h["type"]));
    want(h["schema"] == 1, format!("schema: want 1, got {}", h["schema"]));
    want(h["tool"] == "port-trace", format!("tool: want \"port-trace\", got {}", h["tool"]));
    // The hooks of the backend in use must all be in place: a program the
    // verifier refuses is a bug, not something to trace around silently.
    let backend = h["backend"].as_str().unwrap_or_default();
    for hook in h["hooks"].as_array().into_iter().flatten() {
        // precise+portable: portable hooks stand in for refused precise ones.
        let in_use = match backend {
            "precise+portable" => hook["backend"] == "portable",
            b => hook["backend"] == b || hook["backend"] == "portable",
        };
        let attached = hook["status"].as_str().is_some_and(|s| s.starts_with("attached"));
        want(!in_use || attached, format!("hook of the {backend} backend not attached: {hook}"));
    }
    want(
        h["version"].as_str() == Some(t.version.as_str()),
        format!("version: want {:?}, got {}", t.version, h["version"]),
    );
    let kernel = h["kernel"].as_str().unwrap_or("");
    want(
        !kernel.is_empty() && t.kernel_release.starts_with(kernel),
        format!("kernel: want (a prefix of) {:?}, got {}", t.kernel_release, h["kernel"]),
    );
    want(
        matches!(h["backend"].as_str(), Some("precise" | "kprobe" | "portable")),
        format!("backend: want precise|kprobe|portable, got {}", h["backend"]),
    );
    let (lo, hi) = t.ephemeral_range;
    want(
        h["ephemeral_range"] == serde_json::json!([lo, hi]),
        format!(
            "ephemeral_range: want [{lo},{hi}] (the traced namespace's ip_local_port_range), got {}",
            h["ephemeral_range"]
        ),
    );
    match h["started"].as_str().map(|s| (s, rfc3339::parse(s))) {
        Some((_, Some(ns))) => want(
            ns >= t.window.start - CLOCK_SLACK_NS && ns <= t.window.end + CLOCK_SLACK_NS,
            format!("started: {} is outside the run", h["started"]),
        ),
        _ => want(false, format!("started: want an RFC 3339 string, got {}", h["started"])),
    }
    p
}

/// Checks the closing `summary` record: it is the last record, and its
/// per-type `counts` (the contract's "counts per type") agree with the
/// records actually printed.
pub fn check_summary(records: &[Value]) -> Vec<String> {
    let mut p = Vec::new();
    let Some(summary) = records.last().filter(|r| r["type"] == "summary") else {
        p.push("the last record is not a summary".into());
        return p;
    };
    let Some(counts) = summary["counts"].as_object() else {
        p.push(format!("the summary has no \"counts\" object (counts per type): {summary}"));
        return p;
    };
    for (ty, n) in counts {
        let printed = records.iter().filter(|r| r["type"] == ty.as_str()).count() as u64;
        // `lost` counts events, not records.
        if ty != "lost" && n.as_u64() != Some(printed) {
            p.push(format!("summary counts.{ty} = {n}, but {printed} {ty} records were printed"));
        }
    }
    for ty in ["alloc", "release"] {
        if !counts.contains_key(ty) {
            p.push(format!("summary counts has no {ty:?}"));
        }
    }
    p
}

/// Record types that describe one socket and carry every common field.
const EVENT_TYPES: [&str; 4] = ["alloc", "alloc_fail", "state", "release"];

/// Checks every record against the contract: common fields and their types
/// on events, `netns` equal to the traced namespace on every record that
/// has one, timestamps inside the run, and no `lost` records.
pub fn check_schema(records: &[Value], netns: u64, window: Window) -> Report {
    let mut r = Report::default();
    for (i, v) in records.iter().enumerate() {
        let line = format!("line {}", i + 2);
        let Some(ty) = v["type"].as_str() else {
            r.add(Kind::Invalid, "?", line, format!("no string \"type\": {v}"));
            continue;
        };
        if ty == "header" {
            r.add(Kind::Invalid, ty, line, "a second header");
            continue;
        }
        if ty == "lost" {
            r.add(Kind::Extra, ty, &line, format!("the tracer lost events: {v}"));
        }
        if !v["netns"].is_null() && v["netns"].as_u64() != Some(netns) {
            r.add(Kind::Invalid, ty, &line, format!("netns: want {netns}, got {}", v["netns"]));
        }
        if !EVENT_TYPES.contains(&ty) {
            continue;
        }
        let mut bad = Vec::new();
        match v["ts"].as_str().map(rfc3339::parse) {
            Some(Some(ns)) if ns >= window.start - CLOCK_SLACK_NS && ns <= window.end + CLOCK_SLACK_NS => {}
            Some(Some(_)) => bad.push(format!("ts {} is outside the run", v["ts"])),
            _ => bad.push(format!("ts: want RFC 3339, got {}", v["ts"])),
        }
        if !matches!(v["proto"].as_str(), Some("tcp" | "udp")) {
            bad.push(format!("proto: {}", v["proto"]));
        }
        let family = v["family"].as_str();
        if !matches!(family, Some("ipv4" | "ipv6")) {
            bad.push(format!("family: {}", v["family"]));
        }
        match ip(&v["laddr"]) {
            Some(a) if family == Some(family_of(a)) => {}
            _ => bad.push(format!("laddr: want an {} address, got {}", family.unwrap_or("?"), v["laddr"])),
        }
        if !is_port(&v["lport"]) {
            bad.push(format!("lport: {}", v["lport"]));
        }
        match (&v["raddr"], &v["rport"]) {
            (Value::Null, Value::Null) => {}
            (a, p) if ip(a).map(family_of) == family && is_port(p) => {}
            (a, p) => bad.push(format!("raddr/rport: want both null or an address and a port, got {a}/{p}")),
        }
        if v["pid"].as_u64().is_none() {
            bad.push(format!("pid: {}", v["pid"]));
        }
        if !v["comm"].is_string() {
            bad.push(format!("comm: {}", v["comm"]));
        }
        if v["netns"].as_u64().is_none() {
            bad.push(format!("netns: {}", v["netns"]));
        }
        if v["sock"].as_u64().is_none() && ty != "alloc_fail" {
            bad.push(format!("sock: {}", v["sock"]));
        }
        match ty {
            "alloc" => {
                if !matches!(v["origin"].as_str(), Some("connect" | "bind" | "listen" | "autobind" | "snapshot")) {
                    bad.push(format!("origin: {}", v["origin"]));
                }
                if !v["ephemeral"].is_boolean() {
                    bad.push(format!("ephemeral: {}", v["ephemeral"]));
                }
            }
            "alloc_fail" => {
                if !v["errno"].as_str().is_some_and(|e| e.starts_with('E')) {
                    bad.push(format!("errno: {}", v["errno"]));
                }
                if !v["origin"].is_string() {
                    bad.push(format!("origin: {}", v["origin"]));
                }
            }
            "state" if !v["old"].is_string() || !v["new"].is_string() => {
                bad.push(format!("old/new: {}/{}", v["old"], v["new"]));
            }
            "release" => {
                if !v["reason"].is_string() {
                    bad.push(format!("reason: {}", v["reason"]));
                }
                if !(v["held_ns"].is_null() || v["held_ns"].is_u64()) {
                    bad.push(format!("held_ns: {}", v["held_ns"]));
                }
            }
            _ => {}
        }
        if !bad.is_empty() {
            r.add(Kind::Invalid, ty, line, bad.join("; "));
        }
    }
    r
}

/// The exact comparison of allocations, failures and releases (see the
/// module documentation). TIME_WAIT sockets must have no release; a
/// missing `state` → `TIME_WAIT` record is only a note here (see
/// [`check_time_wait_states`] for the strict form).
pub fn check_lifecycles(truth: &Truth, records: &[Value], netns: u64) -> Report {
    let mut r = Report::default();
    let pairs = pair_allocs(truth, records, &mut r);

    // Each alloc has its own cookie.
    let mut by_cookie: HashMap<u64, Vec<&TruthSocket>> = HashMap::new();
    for (t, i) in &pairs {
        if let Some(c) = records[*i]["sock"].as_u64() {
            by_cookie.entry(c).or_default().push(t);
        }
    }
    for (c, ts) in &by_cookie {
        if ts.len() > 1 {
            let names: Vec<_> = ts.iter().map(|t| t.label()).collect();
            r.add(Kind::Mismatch, "alloc", format!("sock {c}"), format!("one cookie for {}", names.join(", ")));
        }
    }

    for (t, i) in &pairs {
        let a = &records[*i];
        let mut d = Vec::new();
        diff_common(t, a, netns, &mut d);
        if a["origin"].as_str() != Some(t.origin.as_str()) {
            d.push(format!("origin: want {:?}, got {}", t.origin, a["origin"]));
        }
        if a["ephemeral"].as_bool() != Some(t.ephemeral) {
            d.push(format!("ephemeral: want {}, got {}", t.ephemeral, a["ephemeral"]));
        }
        if t.origin == "snapshot" {
            // Found by the tracer's first walk, after the socket was made.
            if let (Some(got), Some(made)) = (ts(a), rfc3339::parse(&t.allocated_at)) {
                if got < made - CLOCK_SLACK_NS {
                    d.push(format!("ts {} is before the socket was made ({})", a["ts"], t.allocated_at));
                }
            }
        } else {
            diff_time(&a["ts"], &t.allocated_at, "ts vs the workload's clock after the call", &mut d);
        }
        if !d.is_empty() {
            r.add(Kind::Mismatch, "alloc", format!("{} line {}", t.label(), i + 2), d.join("; "));
        }
    }

    check_failures(truth, records, netns, &mut r);
    check_releases(&pairs, records, netns, &mut r);

    for f in check_time_wait_states(truth, records) {
        if f.kind == Kind::Missing {
            r.notes.push(format!("{}: {} (not asserted here; see the time_wait state test)", f.subject, f.detail));
        } else {
            r.findings.push(f);
        }
    }
    r.context = context(truth, records);
    r
}

/// Strict: every socket the workload saw in TIME_WAIT has a `state` record
/// with `"new":"TIME_WAIT"` for its alloc's cookie, with matching fields
/// (but for those already in TIME_WAIT when the tracer started: origin
/// `snapshot`, no hand-off to see).
pub fn check_time_wait_states(truth: &Truth, records: &[Value]) -> Vec<Finding> {
    let mut r = Report::default();
    let pairs = pair_allocs(truth, records, &mut Report::default());
    for t in truth.allocations().into_iter().filter(|t| t.time_wait && t.origin != "snapshot") {
        let Some((_, i)) = pairs.iter().find(|(p, _)| std::ptr::eq(*p, t)) else {
            r.add(Kind::Missing, "state", t.label(), "no alloc record, so no cookie to find its state records by");
            continue;
        };
        let Some(cookie) = records[*i]["sock"].as_u64() else {
            r.add(Kind::Missing, "state", t.label(), format!("the alloc on line {} has no sock cookie", i + 2));
            continue;
        };
        let states: Vec<(usize, &Value)> = records
            .iter()
            .enumerate()
            .filter(|(_, v)| v["type"] == "state" && v["sock"].as_u64() == Some(cookie) && v["new"] == "TIME_WAIT")
            .collect();
        match states.as_slice() {
            [] => r.add(
                Kind::Missing,
                "state",
                t.label(),
                format!("no state record with \"new\":\"TIME_WAIT\" for sock {cookie} (the kernel listed the socket in TIME_WAIT)"),
            ),
            [(j, s)] => {
                let mut d = Vec::new();
                if s["laddr"].as_str().and_then(|a| a.parse::<IpAddr>().ok()) != t.laddr.parse().ok()
                    || s["lport"].as_u64() != Some(u64::from(t.lport))
                {
                    d.push(format!("laddr:lport: want {}, got {}:{}", join_addr(&t.laddr, t.lport), s["laddr"], s["lport"]));
                }
                if s["pid"].as_u64() != Some(u64::from(t.pid)) {
                    d.push(format!("pid: want {}, got {}", t.pid, s["pid"]));
                }
                if !d.is_empty() {
                    r.add(Kind::Mismatch, "state", format!("{} line {}", t.label(), j + 2), d.join("; "));
                }
            }
            more => r.add(
                Kind::Extra,
                "state",
                t.label(),
                format!("{} TIME_WAIT state records for sock {cookie}", more.len()),
            ),
        }
    }
    r.findings
}

/// A TCP state change, `(old, new)`, as the tracer names the states.
pub type Transition = (&'static str, &'static str);

/// Strict: for every truth allocation that `want` gives a sequence for, the
/// `state` records carrying its alloc's cookie are exactly that sequence of
/// (old, new) transitions, in order, with the socket's lport and pid.
pub fn check_state_sequences(
    truth: &Truth,
    records: &[Value],
    want: impl Fn(&TruthSocket) -> Option<&'static [Transition]>,
) -> Vec<Finding> {
    let mut r = Report::default();
    let pairs = pair_allocs(truth, records, &mut Report::default());
    for t in truth.allocations() {
        let Some(seq) = want(t) else {
            continue;
        };
        let show = |s: &[Transition]| s.iter().map(|(o, n)| format!("{o}->{n}")).collect::<Vec<_>>().join(", ");
        let Some((_, i)) = pairs.iter().find(|(p, _)| std::ptr::eq(*p, t)) else {
            r.add(
                Kind::Missing,
                "state",
                t.label(),
                format!("no alloc record, so no cookie to find [{}] by", show(seq)),
            );
            continue;
        };
        let Some(cookie) = records[*i]["sock"].as_u64() else {
            r.add(Kind::Missing, "state", t.label(), format!("the alloc on line {} has no sock cookie", i + 2));
            continue;
        };
        let states: Vec<(usize, &Value)> = records
            .iter()
            .enumerate()
            .filter(|(_, v)| v["type"] == "state" && v["sock"].as_u64() == Some(cookie))
            .collect();
        let got: Vec<String> =
            states.iter().map(|(_, v)| format!("{}->{}", str_or(&v["old"]), str_or(&v["new"]))).collect();
        if got.join(", ") != show(seq) {
            let lines: Vec<String> = states.iter().map(|(j, _)| (j + 2).to_string()).collect();
            r.add(
                Kind::Mismatch,
                "state",
                t.label(),
                format!("sock {cookie}: want [{}], got [{}] (lines {})", show(seq), got.join(", "), lines.join(", ")),
            );
        }
        for (j, v) in &states {
            let mut d = Vec::new();
            if t.port_known() && v["lport"].as_u64() != Some(u64::from(t.lport)) {
                d.push(format!("lport: want {}, got {}", t.lport, v["lport"]));
            }
            if v["pid"].as_u64() != Some(u64::from(t.pid)) {
                d.push(format!("pid: want {}, got {}", t.pid, v["pid"]));
            }
            if !d.is_empty() {
                r.add(Kind::Mismatch, "state", format!("{} line {}", t.label(), j + 2), d.join("; "));
            }
        }
    }
    r.findings
}

fn str_or(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// Pairs truth allocations with `alloc` records by (proto, family, laddr,
/// lport), in allocation order on both sides (a port can be reused by a
/// later socket). A truth socket whose port the workload could not see
/// (see [`TruthSocket::port_known`]) is paired afterwards with a leftover
/// alloc of the same proto, family, laddr, destination and origin. Unpaired
/// ones are added to `r` as missing / extra.
fn pair_allocs<'t>(truth: &'t Truth, records: &[Value], r: &mut Report) -> Vec<(&'t TruthSocket, usize)> {
    type Key = (String, String, Option<IpAddr>, u64);
    let mut want: BTreeMap<Key, Vec<&TruthSocket>> = BTreeMap::new();
    let mut unknown_port = Vec::new();
    for t in truth.allocations() {
        if t.port_known() {
            want.entry((t.proto.clone(), t.family.clone(), t.laddr.parse().ok(), u64::from(t.lport)))
                .or_default()
                .push(t);
        } else {
            unknown_port.push(t);
        }
    }
    let mut got: BTreeMap<Key, Vec<usize>> = BTreeMap::new();
    for (i, v) in records.iter().enumerate().filter(|(_, v)| v["type"] == "alloc") {
        let key = (
            v["proto"].as_str().unwrap_or("?").to_owned(),
            v["family"].as_str().unwrap_or("?").to_owned(),
            ip(&v["laddr"]),
            v["lport"].as_u64().unwrap_or(u64::MAX),
        );
        got.entry(key).or_default().push(i);
    }
    for idx in got.values_mut() {
        idx.sort_by_key(|i| (records[*i]["ts"].as_str().and_then(rfc3339::parse), *i));
    }
    let mut pairs = Vec::new();
    let mut leftover = Vec::new();
    for (key, ts) in &want {
        let is = got.remove(key).unwrap_or_default();
        for (n, t) in ts.iter().enumerate() {
            match is.get(n) {
                Some(i) => pairs.push((*t, *i)),
                None => r.add(
                    Kind::Missing,
                    "alloc",
                    t.label(),
                    format!("origin {} ephemeral {} pid {}", t.origin, t.ephemeral, t.pid),
                ),
            }
        }
        leftover.extend(is.iter().skip(ts.len()));
    }
    leftover.extend(got.values().flatten());
    leftover.sort_unstable();
    for t in unknown_port {
        let same = |v: &Value| {
            v["proto"] == t.proto.as_str()
                && v["family"] == t.family.as_str()
                && ip(&v["laddr"]) == t.laddr.parse().ok()
                && ip(&v["raddr"]) == t.raddr.as_deref().and_then(|a| a.parse().ok())
                && v["rport"].as_u64() == t.rport.map(u64::from)
                && v["origin"] == t.origin.as_str()
        };
        match leftover.iter().position(|i| same(&records[*i])) {
            Some(p) => pairs.push((t, leftover.remove(p))),
            None => r.add(
                Kind::Missing,
                "alloc",
                t.label(),
                format!(
                    "origin {} to {:?}:{:?} pid {} (port not seen by the workload)",
                    t.origin, t.raddr, t.rport, t.pid
                ),
            ),
        }
    }
    for i in leftover {
        r.add(Kind::Extra, "alloc", format!("line {}", i + 2), records[i].to_string());
    }
    pairs
}

/// Calls the kernel refused without allocating a port must show up as one
/// `alloc_fail` each (matched by proto, family, lport, errno and, for
/// connects, the destination), with the caller's pid and comm, and nothing
/// else may be reported as one.
fn check_failures(truth: &Truth, records: &[Value], netns: u64, r: &mut Report) {
    let mut fails: Vec<usize> =
        records.iter().enumerate().filter(|(_, v)| v["type"] == "alloc_fail").map(|(i, _)| i).collect();
    for t in truth.failures() {
        let want_raddr: Option<IpAddr> = t.raddr.as_deref().and_then(|a| a.parse().ok());
        let pos = fails.iter().position(|i| {
            let v = &records[*i];
            v["proto"] == t.proto.as_str()
                && v["family"] == t.family.as_str()
                && v["lport"].as_u64() == Some(u64::from(t.lport))
                && v["errno"].as_str() == t.errno.as_deref()
                && (want_raddr.is_none() || ip(&v["raddr"]) == want_raddr)
                && (t.rport.is_none() || v["rport"].as_u64() == t.rport.map(u64::from))
        });
        match pos {
            Some(p) => {
                let i = fails.remove(p);
                let v = &records[i];
                let mut d = Vec::new();
                if v["pid"].as_u64() != Some(u64::from(t.pid)) {
                    d.push(format!("pid: want {} (the workload), got {}", t.pid, v["pid"]));
                }
                if v["comm"] != WORKLOAD_COMM {
                    d.push(format!("comm: want {WORKLOAD_COMM:?}, got {}", v["comm"]));
                }
                if v["netns"].as_u64() != Some(netns) {
                    d.push(format!("netns: want {netns}, got {}", v["netns"]));
                }
                if v["origin"].as_str() != Some(t.origin.as_str()) {
                    d.push(format!("origin: want {:?}, got {}", t.origin, v["origin"]));
                }
                // A refused bind names the address that was asked for.
                if t.op == "bind_fail" && ip(&v["laddr"]) != t.laddr.parse().ok() {
                    d.push(format!("laddr: want {:?} (asked of bind), got {}", t.laddr, v["laddr"]));
                }
                diff_time(&v["ts"], &t.allocated_at, "ts vs the workload's clock after the call", &mut d);
                if !d.is_empty() {
                    r.add(Kind::Mismatch, "alloc_fail", format!("{} line {}", t.label(), i + 2), d.join("; "));
                }
            }
            None => {
                let to = match (&t.raddr, t.rport) {
                    (Some(a), Some(p)) => format!(" to {}", join_addr(a, p)),
                    _ => String::new(),
                };
                r.add(
                    Kind::Missing,
                    "alloc_fail",
                    t.label(),
                    format!("errno {}{to} ({} call by pid {})", t.errno.as_deref().unwrap_or("?"), t.origin, t.pid),
                )
            }
        }
    }
    for i in fails {
        r.add(Kind::Extra, "alloc_fail", format!("line {}", i + 2), records[i].to_string());
    }
}

/// Releases join their alloc by `sock`; see [`check_lifecycles`].
fn check_releases(pairs: &[(&TruthSocket, usize)], records: &[Value], netns: u64, r: &mut Report) {
    let mut releases: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut no_cookie = Vec::new();
    for (i, v) in records.iter().enumerate().filter(|(_, v)| v["type"] == "release") {
        match v["sock"].as_u64() {
            Some(c) => releases.entry(c).or_default().push(i),
            None => no_cookie.push(i),
        }
    }
    for (t, ai) in pairs {
        let a = &records[*ai];
        let Some(cookie) = a["sock"].as_u64() else {
            continue;
        };
        let rels = releases.remove(&cookie).unwrap_or_default();
        if !t.expect_release {
            for i in &rels {
                r.add(
                    Kind::Extra,
                    "release",
                    format!("{} line {}", t.label(), i + 2),
                    format!(
                        "released, but the kernel still held the port{}: {}",
                        if t.time_wait { " in TIME_WAIT" } else { "" },
                        records[*i]
                    ),
                );
            }
            continue;
        }
        let i = match rels.as_slice() {
            [] => {
                r.add(
                    Kind::Missing,
                    "release",
                    t.label(),
                    format!("no release with sock {cookie} (closed at {})", t.closed_at.as_deref().unwrap_or("?")),
                );
                continue;
            }
            [i] => *i,
            [first, ..] => {
                let lines: Vec<_> = rels.iter().map(|i| (i + 2).to_string()).collect();
                r.add(
                    Kind::Extra,
                    "release",
                    t.label(),
                    format!("{} releases for sock {cookie} (lines {})", rels.len(), lines.join(", ")),
                );
                *first
            }
        };
        let v = &records[i];
        let mut d = Vec::new();
        diff_common(t, v, netns, &mut d);
        if v["reason"].as_str() != Some(t.expected_release_reason()) {
            d.push(format!("reason: want {:?}, got {}", t.expected_release_reason(), v["reason"]));
        }
        if let Some(closed) = &t.closed_at {
            diff_time(&v["ts"], closed, "ts vs the workload's clock after close", &mut d);
        }
        let (ats, rts) = (ts(a), ts(v));
        if let (Some(ats), Some(rts)) = (ats, rts) {
            if rts < ats {
                d.push("ts: the release is before the alloc".into());
            }
            match v["held_ns"].as_u64() {
                // A snapshot is not the allocation: the hold time is unknown.
                _ if t.origin == "snapshot" => {
                    if !v["held_ns"].is_null() {
                        d.push(format!("held_ns: want null (the alloc was not seen), got {}", v["held_ns"]));
                    }
                }
                Some(h) if (i128::from(h) - (rts - ats)).abs() <= HELD_SLACK_NS => {}
                Some(h) => d.push(format!("held_ns: {h}, but release ts - alloc ts = {}", rts - ats)),
                None => d.push(format!("held_ns: want the time since the alloc, got {}", v["held_ns"])),
            }
        }
        if !d.is_empty() {
            r.add(Kind::Mismatch, "release", format!("{} line {}", t.label(), i + 2), d.join("; "));
        }
    }
    let mut rest: Vec<usize> = releases.into_values().flatten().chain(no_cookie).collect();
    rest.sort_unstable();
    for i in rest {
        r.add(
            Kind::Extra,
            "release",
            format!("line {}", i + 2),
            format!("no alloc of the workload has this sock: {}", records[i]),
        );
    }
}

/// Fields an alloc and a release share with the truth.
fn diff_common(t: &TruthSocket, v: &Value, netns: u64, d: &mut Vec<String>) {
    if v["proto"].as_str() != Some(t.proto.as_str()) {
        d.push(format!("proto: want {:?}, got {}", t.proto, v["proto"]));
    }
    if v["family"].as_str() != Some(t.family.as_str()) {
        d.push(format!("family: want {:?}, got {}", t.family, v["family"]));
    }
    if ip(&v["laddr"]) != t.laddr.parse().ok() {
        d.push(format!("laddr: want {:?}, got {}", t.laddr, v["laddr"]));
    }
    if t.port_known() && v["lport"].as_u64() != Some(u64::from(t.lport)) {
        d.push(format!("lport: want {}, got {}", t.lport, v["lport"]));
    }
    let want_raddr: Option<IpAddr> = t.raddr.as_deref().and_then(|a| a.parse().ok());
    if ip(&v["raddr"]) != want_raddr || (want_raddr.is_none() && !v["raddr"].is_null()) {
        d.push(format!("raddr: want {}, got {}", json_opt(&t.raddr), v["raddr"]));
    }
    if v["rport"].as_u64() != t.rport.map(u64::from) || (t.rport.is_none() && !v["rport"].is_null()) {
        d.push(format!("rport: want {}, got {}", json_opt(&t.rport), v["rport"]));
    }
    if v["pid"].as_u64() != Some(u64::from(t.pid)) {
        d.push(format!("pid: want {} ({}), got {}", t.pid, owner(t), v["pid"]));
    }
    let comm = if t.pid == 0 { "" } else { WORKLOAD_COMM };
    if v["comm"] != comm {
        d.push(format!("comm: want {comm:?} ({}), got {}", owner(t), v["comm"]));
    }
    if v["netns"].as_u64() != Some(netns) {
        d.push(format!("netns: want {netns}, got {}", v["netns"]));
    }
}

/// Who owns a truth socket, for messages: pid 0 stands for no process
/// (a TIME_WAIT socket found by a walk belongs to nobody).
fn owner(t: &TruthSocket) -> &'static str {
    if t.pid == 0 {
        "no process owns it"
    } else {
        "the workload"
    }
}

fn diff_time(got: &Value, want: &str, what: &str, d: &mut Vec<String>) {
    if let (Some(g), Some(w)) = (got.as_str().and_then(rfc3339::parse), rfc3339::parse(want)) {
        if (g - w).abs() > CLOCK_SLACK_NS {
            d.push(format!("{what}: {got} vs {want} ({} ms apart)", (g - w) / 1_000_000));
        }
    }
}

fn ts(v: &Value) -> Option<UnixNanos> {
    v["ts"].as_str().and_then(rfc3339::parse)
}

fn ip(v: &Value) -> Option<IpAddr> {
    v.as_str().and_then(|s| s.parse().ok())
}

fn is_port(v: &Value) -> bool {
    v.as_u64().is_some_and(|p| p <= 65535)
}

fn family_of(a: IpAddr) -> &'static str {
    if a.is_ipv6() {
        "ipv6"
    } else {
        "ipv4"
    }
}

fn json_opt<T: serde::Serialize>(v: &Option<T>) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Both sides as tables, for failure messages.
fn context(truth: &Truth, records: &[Value]) -> String {
    let mut s = format!("\nworkload truth (pid {}), in allocation order:\n", truth.pid);
    s += &format!(
        "{:>3} {:<22} {:<15} {:<5} {:<5} {:<20} {:<20} {:<8} {:<5} {:<7} {:<9}\n",
        "SEQ", "STEP", "OP", "PROTO", "FAM", "LOCAL", "REMOTE", "ORIGIN", "EPH", "RELEASE", "TIME_WAIT"
    );
    let mut all: Vec<&TruthSocket> = truth.sockets.iter().collect();
    all.sort_by_key(|t| t.seq);
    for t in all {
        let remote = match (&t.raddr, t.rport) {
            (Some(a), Some(p)) => join_addr(a, p),
            _ => "-".into(),
        };
        s += &format!(
            "{:>3} {:<22} {:<15} {:<5} {:<5} {:<20} {:<20} {:<8} {:<5} {:<7} {:<9}\n",
            t.seq,
            t.step,
            t.op,
            t.proto,
            t.family,
            join_addr(&t.laddr, t.lport),
            remote,
            t.origin,
            t.ephemeral,
            t.expect_release,
            t.time_wait
        );
    }
    s += "\ntracer records (header is line 1):\n";
    for (i, v) in records.iter().enumerate() {
        s += &format!("{:4}: {v}\n", i + 2);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NS: u64 = 4026532999;

    fn sock(seq: u32, proto: &str, lport: u16, remote: Option<u16>, origin: &str, release: bool) -> TruthSocket {
        TruthSocket {
            op: if origin == "connect" { "connect" } else { "bind" }.into(),
            step: format!("s{seq}"),
            seq,
            proto: proto.into(),
            family: "ipv4".into(),
            laddr: "127.0.0.1".into(),
            lport,
            raddr: remote.map(|_| "127.0.0.1".into()),
            rport: remote,
            pid: 42,
            origin: origin.into(),
            ephemeral: true,
            expect_release: release,
            time_wait: !release,
            freed: Some(release),
            allocated_at: "2026-11-26T06:40:00.000000000Z".into(),
            closed_at: Some("2026-11-26T06:40:00.500000000Z".into()),
            errno: None,
            release_reason: None,
        }
    }

    fn rec(ty: &str, t: &TruthSocket, cookie: u64, ts: &str) -> Value {
        let mut v = json!({
            "type": ty, "ts": ts, "proto": t.proto, "family": t.family,
            "laddr": t.laddr, "lport": t.lport, "raddr": t.raddr, "rport": t.rport,
            "pid": t.pid, "comm": WORKLOAD_COMM, "netns": NS, "sock": cookie,
        });
        if ty == "alloc" {
            v["origin"] = json!(t.origin);
            v["ephemeral"] = json!(t.ephemeral);
        } else {
            v["reason"] = json!("close");
            v["held_ns"] = json!(500_000_000u64);
        }
        v
    }

    /// A listener, a released client and a TIME_WAIT client; the tracer
    /// output that matches them exactly.
    fn fixture() -> (Truth, Vec<Value>) {
        let truth = Truth {
            pid: 42,
            sockets: vec![
                sock(0, "tcp", 40001, None, "bind", true),
                sock(1, "tcp", 40002, Some(40001), "connect", true),
                sock(2, "tcp", 40004, Some(40001), "connect", false),
            ],
        };
        let (t0, t1) = ("2026-11-26T06:40:00.000000000Z", "2026-11-26T06:40:00.500000000Z");
        let s = &truth.sockets;
        let records = vec![
            rec("alloc", &s[0], 10, t0),
            rec("alloc", &s[1], 11, t0),
            rec("alloc", &s[2], 12, t0),
            rec("release", &s[1], 11, t1),
            rec("release", &s[0], 10, t1),
        ];
        (truth, records)
    }

    fn kinds(r: &Report) -> Vec<(Kind, String)> {
        r.findings.iter().map(|f| (f.kind, f.record.clone())).collect()
    }

    #[test]
    fn exact_match_has_no_findings_but_notes_the_missing_time_wait_state() {
        let (truth, records) = fixture();
        let r = check_lifecycles(&truth, &records, NS);
        assert!(r.ok(), "{r}");
        assert_eq!(r.notes.len(), 1, "{r}");
        assert_eq!(check_time_wait_states(&truth, &records).len(), 1);
        let w = Window {
            start: rfc3339::parse("2026-11-26T06:39:59Z").unwrap(),
            end: rfc3339::parse("2026-11-26T06:40:01Z").unwrap(),
        };
        let s = check_schema(&records, NS, w);
        assert!(s.ok(), "{s}");
    }

    #[test]
    fn time_wait_state_of_an_unseen_alloc_is_missing() {
        let (truth, mut records) = fixture();
        records.remove(2);
        let f = check_time_wait_states(&truth, &records);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, Kind::Missing);
    }

    #[test]
    fn time_wait_state_is_found() {
        let (truth, mut records) = fixture();
        let mut st = records[2].clone();
        st["type"] = json!("state");
        st["old"] = json!("FIN_WAIT2");
        st["new"] = json!("TIME_WAIT");
        records.push(st);
        assert!(check_time_wait_states(&truth, &records).is_empty());
        assert!(check_lifecycles(&truth, &records, NS).notes.is_empty());
    }

    #[test]
    fn missing_extra_and_mismatched_records_are_reported() {
        let (truth, mut records) = fixture();
        records.remove(3); // release of the client
        records[0]["ephemeral"] = json!(false);
        records[0]["raddr"] = json!("0.0.0.0");
        records[0]["rport"] = json!(0);
        let mut extra = records[1].clone();
        extra["lport"] = json!(40001); // an accepted child reported as an alloc
        extra["sock"] = json!(99);
        records.push(extra);
        let mut tw_release = records[2].clone();
        tw_release["type"] = json!("release");
        records.push(tw_release);
        let r = check_lifecycles(&truth, &records, NS);
        let k = kinds(&r);
        assert!(k.contains(&(Kind::Missing, "release".into())), "{r}");
        assert!(k.contains(&(Kind::Mismatch, "alloc".into())), "{r}");
        assert!(k.contains(&(Kind::Extra, "alloc".into())), "{r}");
        assert!(k.contains(&(Kind::Extra, "release".into())), "{r}");
        let text = r.to_string();
        assert!(text.contains("ephemeral: want true, got false"), "{text}");
        assert!(text.contains("raddr: want null"), "{text}");
    }

    #[test]
    fn port_reuse_pairs_in_order() {
        let (mut truth, mut records) = fixture();
        // A later socket got the released client's port again.
        truth.sockets.push(sock(3, "tcp", 40002, Some(40001), "connect", true));
        let t2 = "2026-11-26T06:40:00.600000000Z";
        records.push(rec("alloc", &truth.sockets[3], 13, t2));
        let mut rel = rec("release", &truth.sockets[3], 13, t2);
        rel["held_ns"] = json!(0);
        records.push(rel);
        let r = check_lifecycles(&truth, &records, NS);
        assert!(r.ok(), "{r}");
    }

    #[test]
    fn schema_problems_and_wrong_netns_are_invalid() {
        let (_, mut records) = fixture();
        records[0]["netns"] = json!(1);
        records[1]["ts"] = json!("yesterday");
        records[2]["lport"] = json!("40004");
        records.push(json!({"type": "lost", "count": 3}));
        let w = Window { start: 0, end: i128::MAX / 2 };
        let r = check_schema(&records, NS, w);
        assert_eq!(r.findings.len(), 4, "{r}");
    }

    #[test]
    fn header_is_checked_against_the_machine() {
        let now = rfc3339::unix_nanos(std::time::SystemTime::now());
        let t = HeaderTruth {
            ephemeral_range: (40000, 49999),
            kernel_release: "6.18.44-cloud".into(),
            version: "0.1.0".into(),
            window: Window { start: now, end: now },
        };
        let started = rfc3339::format(std::time::SystemTime::now());
        let good = json!({"type":"header","schema":1,"tool":"port-trace","version":"0.1.0",
            "kernel":"6.18.44","backend":"portable","ephemeral_range":[40000,49999],"started":started});
        assert!(check_header(&good, &t).is_empty(), "{:?}", check_header(&good, &t));
        let mut bad = good.clone();
        bad["ephemeral_range"] = json!([32768, 60999]);
        bad["schema"] = json!(2);
        assert_eq!(check_header(&bad, &t).len(), 2);
    }

    #[test]
    fn summary_counts_must_match_the_records() {
        let (_, mut records) = fixture();
        records.push(json!({"type": "summary", "counts": {"alloc": 3, "release": 2, "lost": 0}}));
        assert!(check_summary(&records).is_empty(), "{:?}", check_summary(&records));
        let n = records.len();
        records[n - 1]["counts"]["release"] = json!(5);
        assert_eq!(check_summary(&records).len(), 1);
        records[n - 1] = json!({"type": "summary"});
        assert_eq!(check_summary(&records).len(), 1);
        records.pop();
        assert_eq!(check_summary(&records).len(), 1);
    }

    /// A refused connect (port seen by the workload or not) and an
    /// EADDRNOTAVAIL connect, with the records the tracer gives for them.
    fn failures_fixture(port_known: bool) -> (Truth, Vec<Value>) {
        let mut refused = sock(0, "tcp", 40000, Some(1), "connect", true);
        refused.op = "connect_refused".into();
        refused.errno = Some("ECONNREFUSED".into());
        refused.release_reason = Some("connect_failed".into());
        let mut exhausted = sock(1, "tcp", 0, Some(20000), "connect", false);
        exhausted.op = "connect_fail".into();
        exhausted.laddr = "0.0.0.0".into();
        exhausted.time_wait = false;
        exhausted.closed_at = None;
        exhausted.errno = Some("EADDRNOTAVAIL".into());
        let (t0, t1) = ("2026-11-26T06:40:00.000000000Z", "2026-11-26T06:40:00.000100000Z");
        let mut rel = rec("release", &refused, 10, t1);
        rel["reason"] = json!("connect_failed");
        rel["held_ns"] = json!(100_000u64);
        let mut states = Vec::new();
        for (old, new, ts) in [("CLOSE", "SYN_SENT", t0), ("SYN_SENT", "CLOSE", t1)] {
            let mut st = rec("state", &refused, 10, ts);
            st["type"] = json!("state");
            st["old"] = json!(old);
            st["new"] = json!(new);
            st.as_object_mut().unwrap().remove("reason");
            st.as_object_mut().unwrap().remove("held_ns");
            states.push(st);
        }
        let mut fail = rec("alloc_fail", &exhausted, 11, t1);
        fail["origin"] = json!("connect");
        fail["errno"] = json!("EADDRNOTAVAIL");
        let records = vec![rec("alloc", &refused, 10, t0), states[0].clone(), states[1].clone(), rel, fail];
        if !port_known {
            refused.lport = 0;
        }
        (Truth { pid: 42, sockets: vec![refused, exhausted] }, records)
    }

    const REFUSED: &[Transition] = &[("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")];

    #[test]
    fn failed_connects_match_with_and_without_the_port() {
        for known in [true, false] {
            let (truth, records) = failures_fixture(known);
            let r = check_lifecycles(&truth, &records, NS);
            assert!(r.ok(), "port known {known}: {r}");
            let f = check_state_sequences(&truth, &records, |t| (t.op == "connect_refused").then_some(REFUSED));
            assert!(f.is_empty(), "{f:?}");
        }
    }

    #[test]
    fn failed_connect_problems_are_found() {
        let (truth, mut records) = failures_fixture(true);
        records[3]["reason"] = json!("close"); // release reason
        records[4]["rport"] = json!(1); // alloc_fail to another destination
        records.remove(2); // SYN_SENT -> CLOSE
        let r = check_lifecycles(&truth, &records, NS);
        let k = kinds(&r);
        assert!(k.contains(&(Kind::Mismatch, "release".into())), "{r}");
        assert!(k.contains(&(Kind::Missing, "alloc_fail".into())), "{r}");
        assert!(k.contains(&(Kind::Extra, "alloc_fail".into())), "{r}");
        assert!(r.to_string().contains("reason: want \"connect_failed\""), "{r}");
        let f = check_state_sequences(&truth, &records, |t| (t.op == "connect_refused").then_some(REFUSED));
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].detail.contains("want [CLOSE->SYN_SENT, SYN_SENT->CLOSE], got [CLOSE->SYN_SENT]"), "{f:?}");
    }

    /// The fixture as sockets that existed before the tracer: a listener
    /// and a released client of one process, and a TIME_WAIT socket nobody
    /// owns (pid 0), released when its TIME_WAIT ends.
    fn snapshot_fixture() -> (Truth, Vec<Value>) {
        let (mut truth, mut records) = fixture();
        for t in &mut truth.sockets {
            t.origin = "snapshot".into();
            t.allocated_at = "2026-11-26T06:39:00.000000000Z".into();
        }
        let tw = &mut truth.sockets[2];
        tw.pid = 0;
        tw.expect_release = true;
        tw.release_reason = Some("time_wait_end".into());
        for r in &mut records {
            if r["type"] == "alloc" {
                r["origin"] = json!("snapshot");
            }
            if r["type"] == "release" {
                r["held_ns"] = Value::Null;
            }
        }
        records[2]["pid"] = json!(0);
        records[2]["comm"] = json!("");
        records[2]["ephemeral"] = json!(true);
        let mut rel = records[2].clone();
        rel["type"] = json!("release");
        rel["ts"] = json!("2026-11-26T06:40:00.500000000Z");
        rel["reason"] = json!("time_wait_end");
        rel["held_ns"] = Value::Null;
        rel.as_object_mut().unwrap().remove("origin");
        records.push(rel);
        (truth, records)
    }

    #[test]
    fn snapshots_match_with_null_hold_times_and_no_owner_for_time_wait() {
        let (truth, records) = snapshot_fixture();
        let r = check_lifecycles(&truth, &records, NS);
        assert!(r.ok(), "{r}");
        assert!(r.notes.is_empty(), "no hand-off to TIME_WAIT is expected of a snapshot: {r}");
    }

    #[test]
    fn snapshot_problems_are_found() {
        let (truth, mut records) = snapshot_fixture();
        records[3]["held_ns"] = json!(500_000_000u64); // the client's release
        records[5]["comm"] = json!(WORKLOAD_COMM); // the TIME_WAIT release
        records[0]["ts"] = json!("2026-11-26T06:30:00.000000000Z"); // before the socket was made
        let r = check_lifecycles(&truth, &records, NS);
        let text = r.to_string();
        assert_eq!(r.findings.len(), 3, "{text}");
        assert!(text.contains("held_ns: want null"), "{text}");
        assert!(text.contains("comm: want \"\" (no process owns it)"), "{text}");
        assert!(text.contains("before the socket was made"), "{text}");
    }

    #[test]
    fn a_refused_bind_must_name_the_address_asked_for() {
        let mut t = sock(0, "tcp", 20000, None, "bind", false);
        t.op = "bind_fail".into();
        t.laddr = "0.0.0.0".into();
        t.errno = Some("EADDRINUSE".into());
        t.time_wait = false;
        let truth = Truth { pid: 42, sockets: vec![t.clone()] };
        let mut fail = rec("alloc_fail", &t, 0, "2026-11-26T06:40:00.000000000Z");
        fail["origin"] = json!("bind");
        fail["errno"] = json!("EADDRINUSE");
        fail.as_object_mut().unwrap().remove("reason");
        assert!(check_lifecycles(&truth, std::slice::from_ref(&fail), NS).ok());
        fail["laddr"] = json!("127.0.0.1");
        let r = check_lifecycles(&truth, &[fail], NS);
        assert!(r.to_string().contains("laddr: want \"0.0.0.0\" (asked of bind)"), "{r}");
    }

    #[test]
    fn a_second_alloc_fail_for_one_call_is_extra() {
        let (truth, mut records) = failures_fixture(true);
        records.push(records[4].clone());
        let r = check_lifecycles(&truth, &records, NS);
        assert_eq!(kinds(&r), vec![(Kind::Extra, "alloc_fail".to_string())], "{r}");
    }
}
