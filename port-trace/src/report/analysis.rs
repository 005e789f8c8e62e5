//! From recorded lines to a report: port lifecycles (alloc → release, joined
//! by `netns` + `sock`), counts, hold times, churn and ports in use over
//! time, TIME_WAIT and exhaustion windows.
//!
//! A lifecycle starts at its `alloc` and ends at its `release`. A release
//! whose alloc is not in the recording (it happened before, or in a rotated
//! part no longer kept) starts `held_ns` before it, or before the recording
//! when `held_ns` is null; an alloc without a release is still held at the
//! end. A second alloc of a socket that still holds a port means its release
//! was lost: the earlier lifecycle ends there, without a hold time.
//!
//! `snapshot` allocations (sockets that existed when tracing began) count as
//! ports in use, not as allocations, and their hold times (lower bounds)
//! appear only under `hold_seconds_by_origin.snapshot`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::reader::{format_rfc3339_ns, Line, Name, Port, Recording};
use crate::filter::Filter;
use crate::model::Proto;

/// Most points of a time series (churn, ports in use).
pub const MAX_POINTS: u64 = 600;

/// Pools drawn in the ports-in-use plot.
pub const PLOTTED_POOLS: usize = 5;

/// Exhaustion windows listed (all are counted).
pub const MAX_WINDOWS: usize = 100;

/// Failures closer than this belong to one exhaustion window.
const WINDOW_GAP_NS: i64 = 1_000_000_000;

/// A `--since`/`--until` bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeBound {
    /// An instant, nanoseconds since the Unix epoch.
    At(i64),
    /// This long before the end of the recording (its last record).
    BeforeEnd(Duration),
}

/// Parses a bound: a duration (`10m`, `1h30m`: that long before the end of
/// the recording) or an RFC 3339 time (`2026-11-26T06:40:00Z`; UTC unless
/// it ends in an offset like `+01:00`).
pub fn parse_time_bound(text: &str) -> Result<TimeBound, String> {
    let text = text.trim();
    if let Ok(d) = humantime::parse_duration(text) {
        return Ok(TimeBound::BeforeEnd(d));
    }
    let bytes = text.as_bytes();
    let (base, offset_s) = match bytes.len().checked_sub(6).map(|i| (i, &bytes[i..])) {
        Some((i, [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2])) if text.is_char_boundary(i) && i > 10 => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return Err(format!("'{text}': bad UTC offset"));
            }
            let n = |a: u8, b: u8| i64::from(a - b'0') * 10 + i64::from(b - b'0');
            let seconds = n(digits[0], digits[1]) * 3600 + n(digits[2], digits[3]) * 60;
            (&text[..i], if *sign == b'+' { seconds } else { -seconds })
        }
        _ => (text, 0),
    };
    let time = humantime::parse_rfc3339_weak(base)
        .map_err(|_| format!("'{text}' is neither a time like 2026-11-26T06:40:00Z nor a duration like 10m"))?;
    let ns = super::reader::system_time_ns(time).ok_or_else(|| format!("'{text}' is out of range"))?;
    Ok(TimeBound::At(ns - offset_s * 1_000_000_000))
}

/// What to report on.
#[derive(Clone, Debug)]
pub struct Query {
    /// The trace filters (pid, comm, ports, proto, family, cgroup id,
    /// ephemeral only).
    pub filter: Filter,
    /// Only this network namespace inode.
    pub netns: Option<u32>,
    /// Start of the window.
    pub since: Option<TimeBound>,
    /// End of the window.
    pub until: Option<TimeBound>,
    /// Length of the top lists.
    pub top: usize,
}

impl Default for Query {
    fn default() -> Self {
        Self { filter: Filter::default(), netns: None, since: None, until: None, top: 10 }
    }
}

/// Hold-time percentiles in seconds (`null` without lifecycles).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HoldStats {
    /// Lifecycles measured.
    pub count: u64,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Longest.
    pub max: Option<f64>,
}

/// A command's share.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CommStats {
    /// Command name.
    pub comm: String,
    /// Ports allocated.
    pub allocations: u64,
    /// Ports released.
    pub releases: u64,
    /// Failed allocations.
    pub failures: u64,
    /// Its hold times.
    pub hold_seconds: HoldStats,
}

/// A destination's share (a pool of local ports: one remote endpoint).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationStats {
    /// `raddr:rport`, or `(unconnected)`.
    pub destination: String,
    /// Protocol.
    pub proto: &'static str,
    /// Remote address.
    pub raddr: Option<IpAddr>,
    /// Remote port.
    pub rport: Option<u16>,
    /// Ports allocated.
    pub allocations: u64,
    /// Failed allocations.
    pub failures: u64,
    /// Most ports in use at once.
    pub peak_in_use: u64,
}

/// Allocations and releases per bucket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChurnPoint {
    /// Seconds from the start of the window to the start of the bucket.
    pub t: f64,
    /// Allocations in the bucket.
    pub allocations: u64,
    /// Releases in the bucket.
    pub releases: u64,
    /// Failed allocations in the bucket.
    pub failures: u64,
}

/// Ports in use of one pool over time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PoolSeries {
    /// `raddr:rport`, or `(unconnected)`.
    pub destination: String,
    /// Protocol.
    pub proto: &'static str,
    /// Most ports in use at once.
    pub peak: u64,
    /// Most ports in use in each bucket.
    pub points: Vec<u64>,
}

/// Time series over the window, in buckets of `bucket_s`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Series {
    /// Bucket width in seconds.
    pub bucket_s: f64,
    /// Churn per bucket.
    pub churn: Vec<ChurnPoint>,
    /// Most ports in use (all pools) per bucket.
    pub in_use: Vec<u64>,
    /// The busiest pools (by peak ports in use).
    pub pools: Vec<PoolSeries>,
}

/// One bin of the hold-time histogram (quarter decades).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HoldBin {
    /// Lower bound, seconds.
    pub from_s: f64,
    /// Upper bound (exclusive), seconds.
    pub to_s: f64,
    /// Lifecycles in the bin.
    pub count: u64,
}

/// A named count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamedCount {
    /// The name (destination or command).
    pub name: String,
    /// How many.
    pub count: u64,
}

/// A stretch of time where allocations failed for want of ports
/// (`EADDRNOTAVAIL`, `EAGAIN`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExhaustionWindow {
    /// First failure.
    pub start: String,
    /// Last failure.
    pub end: String,
    /// Seconds between them.
    pub duration_s: f64,
    /// Failures in the window.
    pub failures: u64,
    /// Where they tried to connect, busiest first (at most 5).
    pub destinations: Vec<NamedCount>,
    /// Who tried, busiest first (at most 5).
    pub comms: Vec<NamedCount>,
}

/// The highest range pressure a destination reached.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PressurePeak {
    /// `raddr:rport`, or `(unconnected)`.
    pub destination: String,
    /// Highest `used / capacity`.
    pub ratio: f64,
    /// Ports in use then.
    pub used: Option<u64>,
    /// Usable ports.
    pub capacity: Option<u64>,
    /// When.
    pub at: String,
}

/// A line that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnreadableLine {
    /// The file.
    pub file: String,
    /// 1-based line number.
    pub line: u64,
    /// Why.
    pub reason: String,
}

/// One traced run (a distinct header).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunInfo {
    /// When it began.
    pub started: Option<String>,
    /// port-trace version.
    pub version: Option<String>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// Backend.
    pub backend: Option<String>,
    /// Ephemeral port range.
    pub ephemeral_range: Option<[u16; 2]>,
}

/// The report (`report --format json` prints it as one object).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// Files read, in order.
    pub files: Vec<String>,
    /// The traced runs.
    pub runs: Vec<RunInfo>,
    /// Start of the window reported on.
    pub start: Option<String>,
    /// End of the window.
    pub end: Option<String>,
    /// Its length.
    pub duration_s: f64,
    /// Ports allocated (`snapshot` excluded).
    pub allocations: u64,
    /// Ports released.
    pub releases: u64,
    /// Failed allocations.
    pub alloc_failures: u64,
    /// Events the kernel could not deliver.
    pub lost: u64,
    /// Lines of the input that could not be read.
    pub bad_lines: u64,
    /// Ports held by sockets that existed when tracing began.
    pub ports_at_start: u64,
    /// Releases whose allocation is not in the recording.
    pub unpaired_releases: u64,
    /// Lifecycles whose release was not recorded before the socket's next
    /// allocation (lost events).
    pub missed_releases: u64,
    /// Ports still held at the end of the window.
    pub held_at_end: u64,
    /// Allocations per second.
    pub allocations_per_s: f64,
    /// Releases per second.
    pub releases_per_s: f64,
    /// Most ports in use at once.
    pub peak_ports_in_use: u64,
    /// When that was first reached.
    pub peak_ports_in_use_at: Option<String>,
    /// Most ports held by TIME_WAIT sockets at once (from `state` records).
    pub time_wait_peak: u64,
    /// When that was first reached.
    pub time_wait_peak_at: Option<String>,
    /// Hold times of ports released in the window.
    pub hold_seconds: HoldStats,
    /// Per protocol.
    pub hold_seconds_by_proto: BTreeMap<String, HoldStats>,
    /// Per origin (`unknown` when the alloc was not seen).
    pub hold_seconds_by_origin: BTreeMap<String, HoldStats>,
    /// Releases per reason.
    pub releases_by_reason: BTreeMap<String, u64>,
    /// Failures per errno.
    pub failures_by_errno: BTreeMap<String, u64>,
    /// Busiest commands first.
    pub top_comms: Vec<CommStats>,
    /// Busiest destinations first.
    pub top_destinations: Vec<DestinationStats>,
    /// Churn and ports in use over time.
    pub series: Series,
    /// Hold-time distribution.
    pub hold_histogram: Vec<HoldBin>,
    /// Where allocations failed for want of ports (the first
    /// [`MAX_WINDOWS`]).
    pub exhaustion_windows: Vec<ExhaustionWindow>,
    /// How many windows there were.
    pub exhaustion_windows_total: u64,
    /// Highest range pressure per destination, highest first.
    pub pressure_peaks: Vec<PressurePeak>,
    /// Notices per kind.
    pub notices: BTreeMap<String, u64>,
    /// The unreadable lines (the first ones).
    pub unreadable_lines: Vec<UnreadableLine>,
    /// Remarks about the input.
    pub notes: Vec<String>,
}

/// One port held from `start_ns` to `end_ns`.
struct Life<'a> {
    port: &'a Port,
    raddr: Option<IpAddr>,
    rport: Option<u16>,
    /// `None`: before the recording.
    start_ns: Option<i64>,
    /// The alloc (or its time, from a `lifecycle` line) was recorded.
    alloc_seen: bool,
    origin: Option<Name>,
    ephemeral: Option<bool>,
    /// `None`: still held at the end.
    end_ns: Option<i64>,
    /// Ended by a release record (not by a later alloc).
    released: bool,
    reason: Option<Name>,
    hold_ns: Option<u64>,
    time_wait_ns: Option<i64>,
}

impl Life<'_> {
    fn is_snapshot(&self) -> bool {
        self.origin.as_deref() == Some("snapshot")
    }

    fn interval(&self) -> (i64, i64) {
        let end = self.end_ns.unwrap_or(i64::MAX);
        (self.start_ns.unwrap_or(i64::MIN).min(end), end)
    }

    fn pool(&self) -> PoolKey {
        (self.port.proto, self.raddr, self.rport)
    }
}

struct Failure<'a> {
    ts_ns: i64,
    port: &'a Port,
    errno: &'a Name,
}

type PoolKey = (Proto, Option<IpAddr>, Option<u16>);

/// `raddr:rport` as people write it.
pub fn destination_label(raddr: Option<IpAddr>, rport: Option<u16>) -> String {
    match (raddr, rport) {
        (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        (None, Some(p)) => format!("*:{p}"),
        (None, None) => "(unconnected)".to_string(),
    }
}

fn matches(query: &Query, port: &Port) -> bool {
    let f = &query.filter;
    if !f.pids.is_empty() && !f.pids.contains(&port.pid) {
        return false;
    }
    if let Some(comm) = &f.comm {
        // The kernel truncates comm to 15 bytes.
        if port.comm.as_bytes() != &comm.as_bytes()[..comm.len().min(15)] {
            return false;
        }
    }
    if !f.ports.is_empty() && !f.ports.iter().any(|r| r.contains(&port.lport)) {
        return false;
    }
    f.proto.is_none_or(|p| p == port.proto)
        && f.family.is_none_or(|fam| fam == port.family)
        && f.cgroup.is_none_or(|cg| cg == port.cgroup)
        && query.netns.is_none_or(|ns| ns == port.netns)
}

/// The time span of the recording: the earliest header start or record,
/// and the last record.
pub fn recording_span(recording: &Recording) -> Option<(i64, i64)> {
    let mut span: Option<(i64, i64)> = None;
    let started = recording.lines.iter().filter_map(|l| match l {
        Line::Lifecycle { started_ns, .. } => *started_ns,
        _ => None,
    });
    for ts in recording.lines.iter().filter_map(Line::ts_ns).chain(started) {
        span = Some(match span {
            None => (ts, ts),
            Some((lo, hi)) => (lo.min(ts), hi.max(ts)),
        });
    }
    // A header's start bounds the beginning only.
    let last = recording.lines.iter().filter(|l| !matches!(l, Line::Header(_))).filter_map(Line::ts_ns).max();
    span.map(|(lo, hi)| (lo, last.unwrap_or(hi)))
}

/// The window `query` selects: `(since, until)` in nanoseconds, clamped to
/// the recording; `Err` when `--since` is after `--until`.
pub fn resolve_window(recording: &Recording, query: &Query) -> Result<(i64, i64), String> {
    let (first, last) = recording_span(recording).unwrap_or((0, 0));
    let resolve = |bound: TimeBound| match bound {
        TimeBound::At(ns) => ns,
        TimeBound::BeforeEnd(d) => last.saturating_sub(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
    };
    let since = query.since.map(resolve);
    let until = query.until.map(resolve);
    if let (Some(s), Some(u)) = (since, until) {
        if s > u {
            return Err(format!("--since ({}) is after --until ({})", format_rfc3339_ns(s), format_rfc3339_ns(u)));
        }
    }
    let start = since.map_or(first, |s| s.max(first));
    let end = until.map_or(last, |u| u.min(last)).max(start);
    Ok((start, end))
}

/// Buckets of a window.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Buckets {
    start: i64,
    width: i64,
    count: usize,
}

impl Buckets {
    /// The smallest "round" width (1 s at least) that cuts `[start, end]`
    /// into at most [`MAX_POINTS`] buckets.
    fn new(start: i64, end: i64) -> Self {
        const S: i64 = 1_000_000_000;
        let span = (end - start).max(0);
        let steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
        let fits = |w: i64| (span / w + 1) as u64 <= MAX_POINTS;
        let width = match steps.iter().map(|s| s * S).find(|w| fits(*w)) {
            Some(w) => w,
            None => (span / (MAX_POINTS as i64 - 1) / (86400 * S) + 1) * 86400 * S,
        };
        Self { start, width, count: (span / width + 1) as usize }
    }

    fn index(&self, ts: i64) -> usize {
        (((ts - self.start).max(0) / self.width) as usize).min(self.count - 1)
    }
}

/// Result of a sweep over intervals.
struct Sweep {
    peak: u64,
    peak_at: i64,
    per_bucket: Vec<u64>,
}

/// Counts how many of `intervals` (`[start, end)`) overlap each instant of
/// `[ws, we]`: the peak, when first reached, and the most per bucket.
fn sweep(intervals: impl Iterator<Item = (i64, i64)>, ws: i64, we: i64, buckets: Option<&Buckets>) -> Sweep {
    let mut level: i64 = 0;
    let mut changes = Vec::new();
    for (start, end) in intervals {
        if end <= ws || start > we || start >= end {
            continue;
        }
        if start <= ws {
            level += 1;
        } else {
            changes.push((start, 1i64));
        }
        if end <= we {
            changes.push((end, -1));
        }
    }
    // At the same instant, releases first: a port given back and taken
    // again was not held twice.
    changes.sort_unstable();
    let mut per_bucket = buckets.map(|b| vec![0u64; b.count]).unwrap_or_default();
    let mut current = 0;
    if let Some(first) = per_bucket.first_mut() {
        *first = level as u64;
    }
    let (mut peak, mut peak_at) = (level, ws);
    for (ts, delta) in changes {
        if let Some(b) = buckets {
            let i = b.index(ts);
            while current < i {
                current += 1;
                // A change right at the bucket's start: the level before it
                // does not last into the bucket.
                let held_into = current < i || ts > b.start + current as i64 * b.width;
                per_bucket[current] = if held_into { level.max(0) as u64 } else { 0 };
            }
        }
        level += delta;
        if let Some(slot) = per_bucket.get_mut(current) {
            *slot = (*slot).max(level.max(0) as u64);
        }
        if level > peak {
            (peak, peak_at) = (level, ts);
        }
    }
    while current + 1 < per_bucket.len() {
        current += 1;
        per_bucket[current] = level.max(0) as u64;
    }
    Sweep { peak: peak.max(0) as u64, peak_at, per_bucket }
}

/// Longest hold recorded (ten years): beyond is corrupt input.
const MAX_HOLD_NS: u64 = 10 * 365 * 86400 * 1_000_000_000;

/// Hold times in nanoseconds: percentiles from an HDR histogram (3
/// significant digits), the maximum exact.
struct Holds {
    histogram: Histogram<u64>,
    max: u64,
}

impl Holds {
    fn new() -> Self {
        // 3 significant digits, auto-resizing: cannot fail.
        Self { histogram: Histogram::new(3).expect("valid sigfig"), max: 0 }
    }

    fn record(&mut self, ns: u64) {
        let ns = ns.min(MAX_HOLD_NS);
        self.max = self.max.max(ns);
        let _ = self.histogram.record(ns);
    }

    fn stats(&self) -> HoldStats {
        let h = &self.histogram;
        if h.is_empty() {
            return HoldStats::default();
        }
        // Never above the true maximum (the histogram rounds up).
        let at = |q: f64| Some(h.value_at_quantile(q).min(self.max) as f64 / 1e9);
        HoldStats { count: h.len(), p50: at(0.5), p90: at(0.9), p99: at(0.99), max: Some(self.max as f64 / 1e9) }
    }

    /// Quarter-decade bins from the first to the last non-empty one; holds
    /// under 1 µs fall in the first.
    fn bins(&self) -> Vec<HoldBin> {
        let mut counts: BTreeMap<i32, u64> = BTreeMap::new();
        for v in self.histogram.iter_recorded() {
            let ns = v.value_iterated_to().max(1) as f64;
            let bin = ((ns / 1e3).log10() * 4.0).floor().max(0.0) as i32;
            *counts.entry(bin).or_default() += v.count_at_value();
        }
        let (Some(&first), Some(&last)) = (counts.keys().next(), counts.keys().next_back()) else { return Vec::new() };
        let edge = |k: i32| 1e-6 * 10f64.powf(f64::from(k) / 4.0);
        (first..=last)
            .map(|k| HoldBin { from_s: edge(k), to_s: edge(k + 1), count: counts.get(&k).copied().unwrap_or(0) })
            .collect()
    }
}

fn in_window(ts: i64, ws: i64, we: i64) -> bool {
    ts >= ws && ts <= we
}

fn top_counts(counts: HashMap<String, u64>, n: usize) -> Vec<NamedCount> {
    let mut list: Vec<NamedCount> = counts.into_iter().map(|(name, count)| NamedCount { name, count }).collect();
    list.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
    list.truncate(n);
    list
}

/// Joins records into lifecycles, in time order.
fn lifecycles<'a>(query: &Query, recording: &'a Recording) -> (Vec<Life<'a>>, Vec<Failure<'a>>, u64) {
    let mut lines: Vec<&Line> = recording
        .lines
        .iter()
        .filter(|l| match l {
            Line::Alloc { event, .. }
            | Line::AllocFail { event, .. }
            | Line::State { event, .. }
            | Line::Release { event, .. }
            | Line::Lifecycle { event, .. } => matches(query, &event.port),
            _ => false,
        })
        .collect();
    // Stable: records of one instant keep their order.
    lines.sort_by_key(|l| l.ts_ns());
    let mut lives: Vec<Life> = Vec::new();
    let mut failures = Vec::new();
    let mut open: HashMap<(u32, u64), usize> = HashMap::new();
    let mut missed = 0;
    let learn = |life: &mut Life, port: &Port| {
        if life.raddr.is_none() && port.raddr.is_some() {
            (life.raddr, life.rport) = (port.raddr, port.rport);
        }
    };
    for line in lines {
        match line {
            Line::Alloc { event, origin, ephemeral } => {
                let key = (event.port.netns, event.port.sock);
                if let Some(previous) = open.remove(&key) {
                    lives[previous].end_ns = Some(event.ts_ns);
                    missed += 1;
                }
                open.insert(key, lives.len());
                lives.push(Life {
                    port: &event.port,
                    raddr: event.port.raddr,
                    rport: event.port.rport,
                    start_ns: Some(event.ts_ns),
                    alloc_seen: true,
                    origin: Some(origin.clone()),
                    ephemeral: Some(*ephemeral),
                    end_ns: None,
                    released: false,
                    reason: None,
                    hold_ns: None,
                    time_wait_ns: None,
                });
            }
            Line::State { event, new, .. } => {
                if let Some(&i) = open.get(&(event.port.netns, event.port.sock)) {
                    let life = &mut lives[i];
                    learn(life, &event.port);
                    if new.as_ref() == "TIME_WAIT" && life.time_wait_ns.is_none() {
                        life.time_wait_ns = Some(event.ts_ns);
                    }
                }
            }
            Line::Release { event, reason, held_ns } => match open.remove(&(event.port.netns, event.port.sock)) {
                Some(i) => {
                    let life = &mut lives[i];
                    learn(life, &event.port);
                    life.end_ns = Some(event.ts_ns);
                    life.released = true;
                    life.reason = Some(reason.clone());
                    life.hold_ns = held_ns.or_else(|| life.start_ns.and_then(|s| u64::try_from(event.ts_ns - s).ok()));
                }
                None => lives.push(Life {
                    port: &event.port,
                    raddr: event.port.raddr,
                    rport: event.port.rport,
                    start_ns: held_ns.map(|h| event.ts_ns.saturating_sub(h.min(i64::MAX as u64) as i64)),
                    alloc_seen: false,
                    origin: None,
                    ephemeral: None,
                    end_ns: Some(event.ts_ns),
                    released: true,
                    reason: Some(reason.clone()),
                    hold_ns: *held_ns,
                    time_wait_ns: None,
                }),
            },
            Line::Lifecycle { event, reason, held_ns, origin, ephemeral, started_ns } => {
                let start =
                    started_ns.or_else(|| held_ns.map(|h| event.ts_ns.saturating_sub(h.min(i64::MAX as u64) as i64)));
                lives.push(Life {
                    port: &event.port,
                    raddr: event.port.raddr,
                    rport: event.port.rport,
                    start_ns: start,
                    alloc_seen: started_ns.is_some(),
                    origin: origin.clone(),
                    ephemeral: *ephemeral,
                    end_ns: Some(event.ts_ns),
                    released: true,
                    reason: Some(reason.clone()),
                    hold_ns: held_ns.or_else(|| start.and_then(|s| u64::try_from(event.ts_ns - s).ok())),
                    time_wait_ns: None,
                })
            }
            Line::AllocFail { event, errno, .. } => {
                failures.push(Failure { ts_ns: event.ts_ns, port: &event.port, errno })
            }
            _ => {}
        }
    }
    if query.filter.ephemeral_only {
        lives.retain(|l| l.ephemeral == Some(true));
        // A failed allocation with no port was the kernel's choice failing.
        failures.retain(|f| f.port.lport == 0);
    }
    (lives, failures, missed)
}

/// Analyses a recording.
pub fn analyze(recording: &Recording, query: &Query) -> Result<Report, String> {
    let (ws, we) = resolve_window(recording, query)?;
    let top = query.top.max(1);
    let buckets = Buckets::new(ws, we);
    let (lives, failures, _) = lifecycles(query, recording);
    let failures: Vec<&Failure> = failures.iter().filter(|f| in_window(f.ts_ns, ws, we)).collect();

    let mut report = Report {
        files: recording.files.iter().map(|f| f.path.display().to_string()).collect(),
        runs: Vec::new(),
        start: recording_span(recording).map(|_| format_rfc3339_ns(ws)),
        end: recording_span(recording).map(|_| format_rfc3339_ns(we)),
        duration_s: (we - ws) as f64 / 1e9,
        allocations: 0,
        releases: 0,
        alloc_failures: failures.len() as u64,
        lost: 0,
        bad_lines: recording.bad_line_count,
        ports_at_start: 0,
        unpaired_releases: 0,
        missed_releases: 0,
        held_at_end: 0,
        allocations_per_s: 0.0,
        releases_per_s: 0.0,
        peak_ports_in_use: 0,
        peak_ports_in_use_at: None,
        time_wait_peak: 0,
        time_wait_peak_at: None,
        hold_seconds: HoldStats::default(),
        hold_seconds_by_proto: BTreeMap::new(),
        hold_seconds_by_origin: BTreeMap::new(),
        releases_by_reason: BTreeMap::new(),
        failures_by_errno: BTreeMap::new(),
        top_comms: Vec::new(),
        top_destinations: Vec::new(),
        series: Series {
            bucket_s: buckets.width as f64 / 1e9,
            churn: (0..buckets.count)
                .map(|i| ChurnPoint {
                    t: (i as i64 * buckets.width) as f64 / 1e9,
                    allocations: 0,
                    releases: 0,
                    failures: 0,
                })
                .collect(),
            in_use: Vec::new(),
            pools: Vec::new(),
        },
        hold_histogram: Vec::new(),
        exhaustion_windows: Vec::new(),
        exhaustion_windows_total: 0,
        pressure_peaks: Vec::new(),
        notices: BTreeMap::new(),
        unreadable_lines: recording
            .bad_lines
            .iter()
            .map(|b| UnreadableLine { file: b.file.display().to_string(), line: b.line, reason: b.reason.clone() })
            .collect(),
        notes: recording.notes.clone(),
    };

    // Runs, losses, pressure and notices.
    let mut pressure: HashMap<String, PressurePeak> = HashMap::new();
    for line in &recording.lines {
        match line {
            Line::Header(h) => {
                let started = h.started_ns.map(format_rfc3339_ns);
                if !report.runs.iter().any(|r| r.started == started) {
                    report.runs.push(RunInfo {
                        started,
                        version: h.version.clone(),
                        kernel: h.kernel.clone(),
                        backend: h.backend.clone(),
                        ephemeral_range: h.ephemeral_range,
                    });
                }
            }
            Line::Lost { ts_ns, count } if in_window(*ts_ns, ws, we) => report.lost += count,
            Line::Notice { ts_ns, kind } if in_window(*ts_ns, ws, we) => {
                *report.notices.entry(kind.to_string()).or_default() += 1
            }
            Line::Pressure(p) if in_window(p.ts_ns, ws, we) => {
                let Some(ratio) = p.ratio else { continue };
                let raddr = p.raddr.as_deref().and_then(|a| a.parse().ok());
                let destination = destination_label(raddr, p.rport);
                let peak = PressurePeak {
                    destination: destination.clone(),
                    ratio,
                    used: p.used,
                    capacity: p.capacity,
                    at: format_rfc3339_ns(p.ts_ns),
                };
                let entry = pressure.entry(destination).or_insert_with(|| peak.clone());
                if ratio > entry.ratio {
                    *entry = peak;
                }
            }
            _ => {}
        }
    }
    let mut pressure: Vec<PressurePeak> = pressure.into_values().collect();
    pressure.sort_by(|a, b| b.ratio.total_cmp(&a.ratio).then_with(|| a.destination.cmp(&b.destination)));
    pressure.truncate(top);
    report.pressure_peaks = pressure;

    // Counts, churn, hold times.
    let mut holds = Holds::new();
    let mut by_proto: BTreeMap<String, Holds> = BTreeMap::new();
    let mut by_origin: BTreeMap<String, Holds> = BTreeMap::new();
    let mut comms: HashMap<Name, CommStats> = HashMap::new();
    let mut pools: HashMap<PoolKey, DestinationStats> = HashMap::new();
    fn comm_stats<'m>(comms: &'m mut HashMap<Name, CommStats>, name: &Name) -> &'m mut CommStats {
        comms.entry(name.clone()).or_insert_with(|| CommStats {
            comm: name.to_string(),
            allocations: 0,
            releases: 0,
            failures: 0,
            hold_seconds: HoldStats::default(),
        })
    }
    fn pool_stats(pools: &mut HashMap<PoolKey, DestinationStats>, key: PoolKey) -> &mut DestinationStats {
        pools.entry(key).or_insert_with(|| DestinationStats {
            destination: destination_label(key.1, key.2),
            proto: key.0.name(),
            raddr: key.1,
            rport: key.2,
            allocations: 0,
            failures: 0,
            peak_in_use: 0,
        })
    }
    for life in &lives {
        if let (Some(start), true) = (life.start_ns, life.alloc_seen) {
            if in_window(start, ws, we) {
                if life.is_snapshot() {
                    report.ports_at_start += 1;
                } else {
                    report.allocations += 1;
                    report.series.churn[buckets.index(start)].allocations += 1;
                    comm_stats(&mut comms, &life.port.comm).allocations += 1;
                    pool_stats(&mut pools, life.pool()).allocations += 1;
                }
            }
        }
        match life.end_ns {
            Some(end) if in_window(end, ws, we) => {
                if !life.released {
                    report.missed_releases += 1;
                    continue;
                }
                report.releases += 1;
                report.series.churn[buckets.index(end)].releases += 1;
                if !life.alloc_seen {
                    report.unpaired_releases += 1;
                }
                if let Some(reason) = &life.reason {
                    *report.releases_by_reason.entry(reason.to_string()).or_default() += 1;
                }
                comm_stats(&mut comms, &life.port.comm).releases += 1;
                if let Some(hold) = life.hold_ns {
                    let origin = life.origin.as_deref().unwrap_or("unknown");
                    by_origin.entry(origin.to_string()).or_insert_with(Holds::new).record(hold);
                    if !life.is_snapshot() {
                        holds.record(hold);
                        by_proto.entry(life.port.proto.name().to_string()).or_insert_with(Holds::new).record(hold);
                    }
                }
            }
            Some(_) => {}
            None => {}
        }
    }
    report.held_at_end = lives
        .iter()
        .filter(|l| {
            let (start, end) = l.interval();
            start <= we && end > we
        })
        .count() as u64;
    for f in &failures {
        report.series.churn[buckets.index(f.ts_ns)].failures += 1;
        *report.failures_by_errno.entry(f.errno.to_string()).or_default() += 1;
        comm_stats(&mut comms, &f.port.comm).failures += 1;
        pool_stats(&mut pools, (f.port.proto, f.port.raddr, f.port.rport)).failures += 1;
    }
    let seconds = report.duration_s;
    if seconds > 0.0 {
        report.allocations_per_s = report.allocations as f64 / seconds;
        report.releases_per_s = report.releases as f64 / seconds;
    }
    report.hold_seconds = holds.stats();
    report.hold_histogram = holds.bins();
    report.hold_seconds_by_proto = by_proto.iter().map(|(k, h)| (k.clone(), h.stats())).collect();
    report.hold_seconds_by_origin = by_origin.iter().map(|(k, h)| (k.clone(), h.stats())).collect();

    // Top commands, with their hold times.
    let mut top_comms: Vec<CommStats> = comms.into_values().collect();
    top_comms.sort_by(|a, b| {
        (b.allocations + b.failures).cmp(&(a.allocations + a.failures)).then_with(|| a.comm.cmp(&b.comm))
    });
    top_comms.truncate(top);
    let mut comm_holds: HashMap<&str, Holds> = top_comms.iter().map(|c| (c.comm.as_str(), Holds::new())).collect();
    for life in &lives {
        if let (Some(end), Some(hold), false) = (life.end_ns, life.hold_ns, life.is_snapshot()) {
            if life.released && in_window(end, ws, we) {
                if let Some(h) = comm_holds.get_mut(life.port.comm.as_ref()) {
                    h.record(hold);
                }
            }
        }
    }
    let comm_stats_list: Vec<HoldStats> = top_comms.iter().map(|c| comm_holds[c.comm.as_str()].stats()).collect();
    for (c, stats) in top_comms.iter_mut().zip(comm_stats_list) {
        c.hold_seconds = stats;
    }
    report.top_comms = top_comms;

    // Ports in use: overall, per pool, TIME_WAIT.
    let overall = sweep(lives.iter().map(Life::interval), ws, we, Some(&buckets));
    report.peak_ports_in_use = overall.peak;
    report.peak_ports_in_use_at = (overall.peak > 0).then(|| format_rfc3339_ns(overall.peak_at));
    report.series.in_use = overall.per_bucket;
    let time_wait =
        sweep(lives.iter().filter_map(|l| l.time_wait_ns.map(|tw| (tw, l.end_ns.unwrap_or(i64::MAX)))), ws, we, None);
    report.time_wait_peak = time_wait.peak;
    report.time_wait_peak_at = (time_wait.peak > 0).then(|| format_rfc3339_ns(time_wait.peak_at));

    let mut by_pool: HashMap<PoolKey, Vec<(i64, i64)>> = HashMap::new();
    for life in &lives {
        by_pool.entry(life.pool()).or_default().push(life.interval());
    }
    let mut pool_peaks: Vec<(u64, PoolKey)> = Vec::new();
    for (key, intervals) in &by_pool {
        let peak = sweep(intervals.iter().copied(), ws, we, None).peak;
        if peak > 0 {
            pool_stats(&mut pools, *key).peak_in_use = peak;
            pool_peaks.push((peak, *key));
        }
    }
    let busy = |key: &PoolKey| pools.get(key).map_or(0, |d| d.allocations + d.failures);
    pool_peaks.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| busy(&b.1).cmp(&busy(&a.1)))
            .then_with(|| destination_label(a.1 .1, a.1 .2).cmp(&destination_label(b.1 .1, b.1 .2)))
    });
    report.series.pools = pool_peaks
        .iter()
        .take(PLOTTED_POOLS)
        .map(|(peak, key)| PoolSeries {
            destination: destination_label(key.1, key.2),
            proto: key.0.name(),
            peak: *peak,
            points: sweep(by_pool[key].iter().copied(), ws, we, Some(&buckets)).per_bucket,
        })
        .collect();

    let mut destinations: Vec<DestinationStats> =
        pools.into_values().filter(|d| d.allocations + d.failures + d.peak_in_use > 0).collect();
    destinations.sort_by(|a, b| {
        (b.allocations + b.failures)
            .cmp(&(a.allocations + a.failures))
            .then_with(|| b.peak_in_use.cmp(&a.peak_in_use))
            .then_with(|| a.destination.cmp(&b.destination))
            .then_with(|| a.proto.cmp(b.proto))
    });
    destinations.truncate(top);
    report.top_destinations = destinations;

    // Exhaustion windows.
    let mut shortages: Vec<&&Failure> =
        failures.iter().filter(|f| matches!(f.errno.as_ref(), "EADDRNOTAVAIL" | "EAGAIN")).collect();
    shortages.sort_by_key(|f| f.ts_ns);
    let mut group: Vec<&Failure> = Vec::new();
    let close = |group: &mut Vec<&Failure>, report: &mut Report| {
        let (Some(first), Some(last)) = (group.first(), group.last()) else { return };
        report.exhaustion_windows_total += 1;
        if report.exhaustion_windows.len() < MAX_WINDOWS {
            let mut dests: HashMap<String, u64> = HashMap::new();
            let mut who: HashMap<String, u64> = HashMap::new();
            for f in group.iter() {
                *dests.entry(destination_label(f.port.raddr, f.port.rport)).or_default() += 1;
                *who.entry(f.port.comm.to_string()).or_default() += 1;
            }
            report.exhaustion_windows.push(ExhaustionWindow {
                start: format_rfc3339_ns(first.ts_ns),
                end: format_rfc3339_ns(last.ts_ns),
                duration_s: (last.ts_ns - first.ts_ns) as f64 / 1e9,
                failures: group.len() as u64,
                destinations: top_counts(dests, 5),
                comms: top_counts(who, 5),
            });
        }
        group.clear();
    };
    for f in shortages {
        if group.last().is_some_and(|last| f.ts_ns - last.ts_ns >= WINDOW_GAP_NS) {
            close(&mut group, &mut report);
        }
        group.push(f);
    }
    close(&mut group, &mut report);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::reader::tests::{event, HEADER};
    use super::super::reader::LineParser;
    use super::*;
    use crate::model::Family;

    const T0: i64 = 1_795_675_200_000_000_000; // 2026-11-26T06:40:00Z

    /// `2026-11-26T06:40:00Z` plus `ms` milliseconds, as output.rs writes it.
    fn ts(ms: i64) -> String {
        format_rfc3339_ns(T0 + ms * 1_000_000)
    }

    fn alloc(ms: i64, sock: u64, comm: &str, dest: Option<(&str, u16)>, origin: &str) -> String {
        let extra = format!(r#","origin":"{origin}","ephemeral":{}"#, origin == "connect");
        event("alloc", &ts(ms), "tcp", 40000 + sock as u16, dest, 100, comm, sock, &extra)
    }

    fn release(ms: i64, sock: u64, comm: &str, dest: Option<(&str, u16)>, held_ms: Option<i64>) -> String {
        let held = held_ms.map_or("null".to_string(), |h| (h * 1_000_000).to_string());
        let extra = format!(r#","reason":"close","held_ns":{held}"#);
        event("release", &ts(ms), "tcp", 40000 + sock as u16, dest, 100, comm, sock, &extra)
    }

    fn fail(ms: i64, comm: &str, dest: (&str, u16), errno: &str) -> String {
        let extra = format!(r#","errno":"{errno}","origin":"connect""#);
        event("alloc_fail", &ts(ms), "tcp", 0, Some(dest), 100, comm, 999, &extra)
    }

    fn state(ms: i64, sock: u64, new: &str) -> String {
        let extra = format!(r#","old":"FIN_WAIT2","new":"{new}""#);
        event("state", &ts(ms), "tcp", 40000 + sock as u16, Some(("10.0.0.1", 443)), 100, "curl", sock, &extra)
    }

    fn recording(lines: &[String]) -> Recording {
        let mut parser = LineParser::new();
        let mut rec = Recording::default();
        rec.files.push(super::super::reader::RecordingFile {
            path: PathBuf::from("test.jsonl"),
            compressed: false,
            lines: lines.len() as u64,
            header: None,
        });
        for l in lines {
            rec.lines.push(parser.parse(l.as_bytes()).unwrap());
        }
        rec
    }

    const WEB: Option<(&str, u16)> = Some(("10.0.0.1", 443));
    const DB: Option<(&str, u16)> = Some(("10.0.0.2", 5432));

    /// Three curl connections to WEB (held 1 s, 2 s, 4 s), a psql one to DB
    /// held to the end, a snapshot, a release of an unseen alloc.
    fn sample() -> Vec<String> {
        vec![
            HEADER.to_string(),
            alloc(0, 9, "sshd", None, "snapshot"),
            alloc(1000, 1, "curl", WEB, "connect"),
            alloc(1500, 2, "curl", WEB, "connect"),
            alloc(2000, 3, "curl", WEB, "connect"),
            release(2000, 1, "curl", WEB, Some(1000)),
            alloc(2500, 4, "psql", DB, "connect"),
            release(3500, 2, "curl", WEB, Some(2000)),
            state(5000, 3, "TIME_WAIT"),
            release(6000, 3, "curl", WEB, Some(4000)),
            release(7000, 7, "nginx", None, None),
            r#"{"type":"lost","ts":"2026-11-26T06:40:08Z","count":4}"#.to_string(),
            fail(8000, "curl", ("10.0.0.1", 443), "EADDRNOTAVAIL"),
            fail(8500, "curl", ("10.0.0.1", 443), "EADDRNOTAVAIL"),
            fail(9000, "wget", ("10.0.0.3", 80), "EADDRNOTAVAIL"),
            fail(12000, "curl", ("10.0.0.1", 443), "EAGAIN"),
            fail(12100, "curl", ("10.0.0.1", 443), "ECONNREFUSED"),
            r#"{"type":"summary","ts":"2026-11-26T06:40:20Z","duration_s":20.0}"#.to_string(),
        ]
    }

    fn analyze_sample(query: &Query) -> Report {
        analyze(&recording(&sample()), query).unwrap()
    }

    #[test]
    fn counts_and_lifecycles() {
        let r = analyze_sample(&Query::default());
        assert_eq!(r.start.as_deref(), Some("2026-11-26T06:40:00.000000000Z"));
        assert_eq!(r.end.as_deref(), Some("2026-11-26T06:40:20.000000000Z"));
        assert_eq!(r.duration_s, 20.0);
        assert_eq!(r.allocations, 4, "the snapshot is not an allocation");
        assert_eq!(r.ports_at_start, 1);
        assert_eq!(r.releases, 4);
        assert_eq!(r.unpaired_releases, 1);
        assert_eq!(r.alloc_failures, 5);
        assert_eq!(r.lost, 4);
        assert_eq!(r.bad_lines, 0);
        // Still held at the end: sshd's snapshot and psql.
        assert_eq!(r.held_at_end, 2);
        assert_eq!(r.allocations_per_s, 4.0 / 20.0);
        assert_eq!(r.failures_by_errno["EADDRNOTAVAIL"], 3);
        assert_eq!(r.releases_by_reason["close"], 4);
        assert_eq!(r.runs.len(), 1);
        assert_eq!(r.runs[0].kernel.as_deref(), Some("6.18.44"));
    }

    #[test]
    fn peak_in_use_counts_overlaps() {
        let r = analyze_sample(&Query::default());
        // In use: sshd (from 0), nginx (unseen alloc, held since before),
        // curl 1 [1,2), curl 2 [1.5,3.5), curl 3 [2,6), psql [2.5,end).
        // At 2.0 curl 1 leaves as curl 3 comes: 4; at 2.5 psql: 5.
        assert_eq!(r.peak_ports_in_use, 5);
        assert_eq!(r.peak_ports_in_use_at.as_deref(), Some("2026-11-26T06:40:02.500000000Z"));
        assert_eq!(r.time_wait_peak, 1);
        assert_eq!(r.time_wait_peak_at.as_deref(), Some("2026-11-26T06:40:05.000000000Z"));
        // 1 s buckets over 20 s: 21 points.
        assert_eq!(r.series.bucket_s, 1.0);
        assert_eq!(r.series.churn.len(), 21);
        assert_eq!(r.series.in_use.len(), 21);
        assert_eq!(r.series.in_use[..4], [2, 4, 5, 5]);
        assert_eq!(r.series.in_use[7], 2, "nginx released at 7 s");
        assert_eq!(r.series.churn[1].allocations, 2);
        assert_eq!(r.series.churn[2].allocations, 2);
        assert_eq!(r.series.churn[2].releases, 1);
        assert_eq!(r.series.churn[8].failures, 2);
        let web = &r.series.pools[0];
        assert_eq!((web.destination.as_str(), web.proto, web.peak), ("10.0.0.1:443", "tcp", 2));
        // curl 3 ends right at 6 s: bucket 6 does not count it.
        assert_eq!(web.points[..7], [0, 2, 2, 2, 1, 1, 0]);
    }

    #[test]
    fn hold_times_match_an_independent_computation() {
        let r = analyze_sample(&Query::default());
        // Released in the window with a hold: 1, 2, 4 s (nginx's is null).
        let h = &r.hold_seconds;
        assert_eq!(h.count, 3);
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() <= b * 1e-3;
        assert!(close(h.p50, 2.0), "{h:?}");
        assert!(close(h.p90, 4.0), "{h:?}");
        assert_eq!(h.max, Some(4.0));
        assert_eq!(r.hold_seconds_by_proto["tcp"].count, 3);
        assert_eq!(r.hold_seconds_by_origin["connect"].count, 3);
        assert!(!r.hold_seconds_by_origin.contains_key("unknown"), "nginx had no hold time");
        // Quarter-decade bins: 1 s is bin 24 ([1, 1.78) s), 2 s bin 25, 4 s bin 26.
        let counts: Vec<u64> = r.hold_histogram.iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![1, 1, 1]);
        assert!((r.hold_histogram[0].from_s - 1.0).abs() < 1e-9);
        assert!(r.hold_histogram[2].from_s <= 4.0 && 4.0 < r.hold_histogram[2].to_s);
    }

    #[test]
    fn top_lists_are_busiest_first() {
        let r = analyze_sample(&Query::default());
        let names: Vec<&str> = r.top_comms.iter().map(|c| c.comm.as_str()).collect();
        assert_eq!(names[..3], ["curl", "psql", "wget"]);
        let curl = &r.top_comms[0];
        assert_eq!((curl.allocations, curl.releases, curl.failures), (3, 3, 4));
        assert_eq!(curl.hold_seconds.count, 3);
        assert_eq!(curl.hold_seconds.max, Some(4.0));
        let d = &r.top_destinations[0];
        assert_eq!((d.destination.as_str(), d.allocations, d.failures, d.peak_in_use), ("10.0.0.1:443", 3, 4, 2));
        assert_eq!(r.top_destinations[1].destination, "10.0.0.2:5432");
        let limited = analyze_sample(&Query { top: 1, ..Query::default() });
        assert_eq!((limited.top_comms.len(), limited.top_destinations.len()), (1, 1));
    }

    #[test]
    fn exhaustion_windows_merge_failures_under_a_second_apart() {
        let r = analyze_sample(&Query::default());
        // 8.0, 8.5, 9.0 s: one window; 12.0 s (EAGAIN): another;
        // ECONNREFUSED is not a shortage.
        assert_eq!(r.exhaustion_windows_total, 2);
        let w = &r.exhaustion_windows[0];
        assert_eq!((w.failures, w.duration_s), (3, 1.0));
        assert_eq!(w.start, "2026-11-26T06:40:08.000000000Z");
        assert_eq!(w.destinations[0], NamedCount { name: "10.0.0.1:443".into(), count: 2 });
        assert_eq!(w.comms[1], NamedCount { name: "wget".into(), count: 1 });
        assert_eq!(r.exhaustion_windows[1].failures, 1);
    }

    #[test]
    fn filters_select_lifecycles() {
        let by_comm = analyze_sample(&Query {
            filter: Filter { comm: Some("psql".into()), ..Default::default() },
            ..Query::default()
        });
        assert_eq!((by_comm.allocations, by_comm.releases, by_comm.alloc_failures), (1, 0, 0));
        assert_eq!(by_comm.peak_ports_in_use, 1);

        let ephemeral = analyze_sample(&Query {
            filter: Filter { ephemeral_only: true, ..Default::default() },
            ..Query::default()
        });
        // connect allocs only: no snapshot, no nginx (alloc unseen).
        assert_eq!((ephemeral.allocations, ephemeral.ports_at_start, ephemeral.releases), (4, 0, 3));
        assert_eq!(ephemeral.alloc_failures, 5);

        let ports = analyze_sample(&Query {
            filter: Filter { ports: vec![40001..=40002], ..Default::default() },
            ..Query::default()
        });
        assert_eq!((ports.allocations, ports.releases, ports.alloc_failures), (2, 2, 0));

        let udp = analyze_sample(&Query {
            filter: Filter { proto: Some(Proto::Udp), ..Default::default() },
            ..Query::default()
        });
        assert_eq!(udp.allocations + udp.releases + udp.alloc_failures, 0);
        let v6 = analyze_sample(&Query {
            filter: Filter { family: Some(Family::Ipv6), ..Default::default() },
            ..Query::default()
        });
        assert_eq!(v6.allocations, 0);
        assert_eq!(analyze_sample(&Query { netns: Some(1), ..Query::default() }).allocations, 0);
        assert_eq!(analyze_sample(&Query { netns: Some(4026531840), ..Query::default() }).allocations, 4);
        let pid =
            analyze_sample(&Query { filter: Filter { pids: vec![100], ..Default::default() }, ..Query::default() });
        assert_eq!(pid.allocations, 4);
    }

    #[test]
    fn since_and_until_cut_the_window() {
        let relative =
            analyze_sample(&Query { since: Some(TimeBound::BeforeEnd(Duration::from_secs(12))), ..Query::default() });
        // The last 12 s: from 8 s on.
        assert_eq!(relative.start.as_deref(), Some("2026-11-26T06:40:08.000000000Z"));
        assert_eq!((relative.allocations, relative.releases, relative.alloc_failures), (0, 0, 5));
        // Ports allocated before the window are still in use in it.
        assert_eq!(relative.peak_ports_in_use, 2);
        assert_eq!(relative.series.in_use[0], 2);

        let absolute = analyze_sample(&Query {
            since: Some(parse_time_bound("2026-11-26T06:40:01.500Z").unwrap()),
            until: Some(parse_time_bound("2026-11-26T07:40:03+01:00").unwrap()),
            ..Query::default()
        });
        assert_eq!(absolute.duration_s, 1.5);
        assert_eq!((absolute.allocations, absolute.releases), (3, 1));
        assert_eq!(absolute.hold_seconds.count, 1);

        let reversed = Query {
            since: Some(TimeBound::At(T0 + 5_000_000_000)),
            until: Some(TimeBound::At(T0)),
            ..Query::default()
        };
        assert!(analyze(&recording(&sample()), &reversed).unwrap_err().contains("after"));
    }

    #[test]
    fn parses_time_bounds() {
        assert_eq!(parse_time_bound("10m").unwrap(), TimeBound::BeforeEnd(Duration::from_secs(600)));
        assert_eq!(parse_time_bound("2026-11-26T06:40:00Z").unwrap(), TimeBound::At(T0));
        assert_eq!(parse_time_bound("2026-11-26T08:40:00+02:00").unwrap(), TimeBound::At(T0));
        assert_eq!(parse_time_bound("2026-11-26T06:30:00-00:10").unwrap(), TimeBound::At(T0));
        assert_eq!(parse_time_bound("2026-11-26 06:40:00").unwrap(), TimeBound::At(T0));
        assert!(parse_time_bound("soon").is_err());
        assert!(parse_time_bound("2026-11-26T06:40:00+0x:00").is_err());
    }

    #[test]
    fn lost_release_ends_at_the_next_alloc() {
        let lines = vec![
            alloc(0, 1, "a", WEB, "connect"),
            alloc(1000, 1, "a", WEB, "connect"),
            release(3000, 1, "a", WEB, Some(2000)),
        ];
        let r = analyze(&recording(&lines), &Query::default()).unwrap();
        assert_eq!((r.allocations, r.releases, r.missed_releases), (2, 1, 1));
        assert_eq!(r.peak_ports_in_use, 1);
        assert_eq!(r.hold_seconds.count, 1);
        assert_eq!(r.hold_seconds.max, Some(2.0));
    }

    #[test]
    fn lifecycle_lines_count_as_alloc_and_release() {
        let extra = format!(
            r#","reason":"time_wait_end","held_ns":60000000000,"started":"{}","origin":"connect","ephemeral":true"#,
            ts(0)
        );
        let lines = vec![event("lifecycle", &ts(60_000), "tcp", 40000, WEB, 1, "curl", 5, &extra)];
        let r = analyze(&recording(&lines), &Query::default()).unwrap();
        assert_eq!((r.allocations, r.releases, r.peak_ports_in_use), (1, 1, 1));
        assert_eq!(r.hold_seconds.max, Some(60.0));
        assert_eq!(r.duration_s, 60.0);
    }

    #[test]
    fn empty_recording_reports_zeros() {
        let r = analyze(&Recording::default(), &Query::default()).unwrap();
        assert_eq!((r.allocations, r.peak_ports_in_use, r.duration_s), (0, 0, 0.0));
        assert_eq!(r.hold_seconds, HoldStats::default());
        assert!(r.start.is_none());
        assert_eq!(r.series.churn.len(), 1);
    }

    #[test]
    fn json_has_the_contract_keys() {
        let value = serde_json::to_value(analyze_sample(&Query::default())).unwrap();
        for key in [
            "allocations",
            "releases",
            "alloc_failures",
            "lost",
            "bad_lines",
            "duration_s",
            "peak_ports_in_use",
            "hold_seconds",
            "top_comms",
            "top_destinations",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        for key in ["p50", "p90", "p99", "max"] {
            assert!(value["hold_seconds"][key].is_number(), "hold_seconds.{key}");
        }
        assert!(value["top_comms"].is_array() && value["top_destinations"].is_array());
    }

    #[test]
    fn buckets_stay_under_the_point_limit() {
        const S: i64 = 1_000_000_000;
        assert_eq!(Buckets::new(0, 10 * S), Buckets { start: 0, width: S, count: 11 });
        let hour = Buckets::new(0, 3600 * S);
        assert_eq!(hour.width, 10 * S);
        assert!(hour.count as u64 <= MAX_POINTS);
        let year = Buckets::new(0, 365 * 86400 * S);
        assert!(year.count as u64 <= MAX_POINTS, "{year:?}");
        assert_eq!(year.index(365 * 86400 * S), year.count - 1);
        assert_eq!(year.index(-5), 0);
    }

    #[test]
    fn sweep_releases_before_allocations_at_one_instant() {
        let s = sweep([(0, 10), (10, 20)].into_iter(), 0, 20, None);
        assert_eq!(s.peak, 1);
        let s = sweep([(0, 10), (5, 20), (i64::MIN, i64::MAX)].into_iter(), 0, 20, None);
        assert_eq!((s.peak, s.peak_at), (3, 5));
    }
}
