//! Port churn: how many ports are allocated and released per second, and
//! how long they are held. Pure logic, fed with every [`PortRecord`]; time is
//! the records' (CLOCK_BOOTTIME), not the wall clock, so recordings replay
//! the same figures. The TIME_WAIT population comes from the tracker.

use std::collections::{BTreeMap, VecDeque};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::model::{Origin, Proto};
use crate::record::{PortRecord, RecordBody};

const NS_PER_S: u64 = 1_000_000_000;
/// Seconds of per-second counts kept (the longest rate window and the
/// sparkline history).
pub const HISTORY_S: u64 = 60;
/// Hold times below this many nanoseconds share the histogram's first bucket.
const HOLD_LOWEST_NS: u64 = 1_000;
/// Hold times above this (a week) are recorded as this.
const HOLD_HIGHEST_NS: u64 = 7 * 24 * 3600 * NS_PER_S;
/// Two significant digits: quantiles within 1 %, a few tens of KiB per
/// histogram.
const HOLD_SIGNIFICANT_DIGITS: u8 = 2;

/// Counts of one second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Second {
    sec: u64,
    allocs: u64,
    releases: u64,
}

/// Rates per second over the last 1, 10 and 60 seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Over the last complete second.
    #[serde(rename = "1s")]
    pub last_1s: f64,
    /// Over the last 10 complete seconds.
    #[serde(rename = "10s")]
    pub last_10s: f64,
    /// Over the last 60 complete seconds.
    #[serde(rename = "60s")]
    pub last_60s: f64,
}

/// Hold-time figures of one protocol and origin, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct HoldFigures {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Longest.
    pub max: f64,
    /// Releases whose hold time was known.
    pub count: u64,
}

/// A snapshot of the churn, as the summary record and the TUI show it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChurnFigures {
    /// Allocations per second (sockets found at start not counted).
    pub allocations_per_s: Rates,
    /// Releases per second.
    pub releases_per_s: Rates,
    /// Hold times by protocol name, then origin name (`unknown` when the
    /// allocation's origin was not reported).
    pub hold_seconds: BTreeMap<String, BTreeMap<String, HoldFigures>>,
}

/// Allocation and release rates and hold-time histograms.
#[derive(Clone, Debug, Default)]
pub struct Churn {
    /// Seconds with counts, oldest first, within [`HISTORY_S`] of `now_ns`.
    seconds: VecDeque<Second>,
    first_ns: Option<u64>,
    now_ns: u64,
    holds: BTreeMap<(Proto, Option<Origin>), Histogram<u64>>,
}

impl Churn {
    /// No records yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one record into account.
    pub fn on_record(&mut self, rec: &PortRecord) {
        match &rec.body {
            // Sockets found at start are not churn.
            RecordBody::Alloc { origin: Origin::Snapshot, .. } => self.advance(rec.ts_ns),
            RecordBody::Alloc { .. } => self.count(rec.ts_ns, 1, 0),
            RecordBody::Release { held_ns, origin, .. } => {
                self.count(rec.ts_ns, 0, 1);
                if let Some(held) = held_ns {
                    self.hold(rec.port.proto, *origin, *held);
                }
            }
            RecordBody::AllocFail { .. } | RecordBody::State { .. } => self.advance(rec.ts_ns),
        }
    }

    /// Moves time forward without a record (call it each second with
    /// CLOCK_BOOTTIME so that rates fall to zero when nothing happens).
    /// Time never goes back.
    pub fn advance(&mut self, now_ns: u64) {
        self.first_ns.get_or_insert(now_ns);
        self.now_ns = self.now_ns.max(now_ns);
        let now_sec = self.now_ns / NS_PER_S;
        while self.seconds.front().is_some_and(|s| s.sec + HISTORY_S < now_sec) {
            self.seconds.pop_front();
        }
    }

    fn count(&mut self, ts_ns: u64, allocs: u64, releases: u64) {
        self.advance(ts_ns);
        let sec = ts_ns / NS_PER_S;
        if sec + HISTORY_S < self.now_ns / NS_PER_S {
            return; // too old to matter
        }
        // Records may come slightly out of order: keep the seconds sorted.
        let at = self.seconds.partition_point(|s| s.sec < sec);
        match self.seconds.get_mut(at) {
            Some(second) if second.sec == sec => {
                second.allocs += allocs;
                second.releases += releases;
            }
            _ => self.seconds.insert(at, Second { sec, allocs, releases }),
        }
    }

    fn hold(&mut self, proto: Proto, origin: Option<Origin>, held_ns: u64) {
        let histogram = self.holds.entry((proto, origin)).or_insert_with(|| {
            Histogram::new_with_bounds(HOLD_LOWEST_NS, HOLD_HIGHEST_NS, HOLD_SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid")
        });
        histogram.saturating_record(held_ns);
    }

    /// Allocations and releases per second over the `window` complete
    /// seconds before the current one (fewer right after the first record;
    /// before one second has passed, the counts so far).
    fn rates(&self, window: u64) -> (f64, f64) {
        let Some(first_ns) = self.first_ns else {
            return (0.0, 0.0);
        };
        let now_sec = self.now_ns / NS_PER_S;
        let start = now_sec.saturating_sub(window).max(first_ns / NS_PER_S);
        let (from, to, span) =
            if now_sec > start { (start, now_sec, (now_sec - start) as f64) } else { (now_sec, now_sec + 1, 1.0) };
        let (allocs, releases) = self
            .seconds
            .iter()
            .filter(|s| s.sec >= from && s.sec < to)
            .fold((0, 0), |(a, r), s| (a + s.allocs, r + s.releases));
        (allocs as f64 / span, releases as f64 / span)
    }

    /// The figures now.
    pub fn figures(&self) -> ChurnFigures {
        let (a1, r1) = self.rates(1);
        let (a10, r10) = self.rates(10);
        let (a60, r60) = self.rates(60);
        let mut hold_seconds: BTreeMap<String, BTreeMap<String, HoldFigures>> = BTreeMap::new();
        for ((proto, origin), h) in &self.holds {
            let seconds = |ns: u64| ns as f64 / NS_PER_S as f64;
            hold_seconds.entry(proto.name().to_string()).or_default().insert(
                origin.map_or("unknown", Origin::name).to_string(),
                HoldFigures {
                    p50: seconds(h.value_at_quantile(0.50)),
                    p90: seconds(h.value_at_quantile(0.90)),
                    p99: seconds(h.value_at_quantile(0.99)),
                    max: seconds(h.max()),
                    count: h.len(),
                },
            );
        }
        ChurnFigures {
            allocations_per_s: Rates { last_1s: a1, last_10s: a10, last_60s: a60 },
            releases_per_s: Rates { last_1s: r1, last_10s: r10, last_60s: r60 },
            hold_seconds,
        }
    }

    /// (allocations, releases) of each complete second of the last
    /// [`HISTORY_S`], oldest first, since the first record.
    pub fn history(&self) -> Vec<(u64, u64)> {
        let Some(first_ns) = self.first_ns else {
            return Vec::new();
        };
        let now_sec = self.now_ns / NS_PER_S;
        let start = now_sec.saturating_sub(HISTORY_S).max(first_ns / NS_PER_S);
        let mut history = vec![(0, 0); (now_sec - start) as usize];
        for s in self.seconds.iter().filter(|s| s.sec >= start && s.sec < now_sec) {
            history[(s.sec - start) as usize] = (s.allocs, s.releases);
        }
        history
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, ReleaseReason};
    use crate::record::PortRef;

    const SEC: u64 = NS_PER_S;

    fn port(proto: Proto) -> PortRef {
        PortRef {
            sock: 1,
            netns: 1,
            proto,
            family: Family::Ipv4,
            laddr: "127.0.0.1".parse().unwrap(),
            lport: 40000,
            raddr: None,
            rport: None,
            pid: 1,
            comm: "t".into(),
            cgroup: 0,
            ephemeral: Some(true),
        }
    }

    fn alloc(ts_ns: u64, origin: Origin) -> PortRecord {
        PortRecord { ts_ns, port: port(Proto::Tcp), body: RecordBody::Alloc { origin, ephemeral: true } }
    }

    fn release(ts_ns: u64, proto: Proto, origin: Option<Origin>, held_ns: Option<u64>) -> PortRecord {
        PortRecord {
            ts_ns,
            port: port(proto),
            body: RecordBody::Release { reason: ReleaseReason::Close, held_ns, origin, alloc_ts_ns: None },
        }
    }

    #[test]
    fn rates_over_each_window_count_complete_seconds() {
        let mut churn = Churn::new();
        // Seconds 100..=159: k allocations in second 100+k, and 2 releases.
        for k in 0..60u64 {
            for i in 0..k {
                churn.on_record(&alloc((100 + k) * SEC + i * 1000, Origin::Connect));
            }
            churn.on_record(&release((100 + k) * SEC + 5, Proto::Tcp, None, None));
            churn.on_record(&release((100 + k) * SEC + 6, Proto::Tcp, None, None));
        }
        churn.advance(160 * SEC + SEC / 2);
        let figures = churn.figures();
        assert_eq!(figures.allocations_per_s.last_1s, 59.0);
        assert_eq!(figures.allocations_per_s.last_10s, (50..60).sum::<u64>() as f64 / 10.0);
        assert_eq!(figures.allocations_per_s.last_60s, (0..60).sum::<u64>() as f64 / 60.0);
        assert_eq!(figures.releases_per_s, Rates { last_1s: 2.0, last_10s: 2.0, last_60s: 2.0 });
        // Nothing for 30 s: the short windows fall to zero.
        churn.advance(190 * SEC);
        let quiet = churn.figures();
        assert_eq!(quiet.allocations_per_s.last_1s, 0.0);
        assert_eq!(quiet.allocations_per_s.last_10s, 0.0);
        assert_eq!(quiet.allocations_per_s.last_60s, (30..60).sum::<u64>() as f64 / 60.0);
    }

    #[test]
    fn young_runs_divide_by_the_seconds_seen_and_snapshots_are_not_churn() {
        let mut churn = Churn::new();
        for i in 0..1000 {
            churn.on_record(&alloc(50 * SEC + i, Origin::Snapshot));
        }
        for i in 0..30 {
            churn.on_record(&alloc(50 * SEC + SEC / 2 + i, Origin::Connect));
        }
        // Within the first second: the counts so far.
        assert_eq!(churn.figures().allocations_per_s.last_60s, 30.0);
        for i in 0..10 {
            churn.on_record(&alloc(51 * SEC + i, Origin::Bind));
        }
        churn.advance(53 * SEC);
        let figures = churn.figures();
        // Three complete seconds seen (50, 51, 52): 40 / 3.
        assert_eq!(figures.allocations_per_s.last_60s, 40.0 / 3.0);
        assert_eq!(figures.allocations_per_s.last_10s, 40.0 / 3.0);
        assert_eq!(figures.allocations_per_s.last_1s, 0.0);
        assert_eq!(churn.history(), vec![(30, 0), (10, 0), (0, 0)]);
    }

    #[test]
    fn history_keeps_the_last_minute_in_order() {
        let mut churn = Churn::new();
        for sec in 0..100u64 {
            for _ in 0..sec % 7 {
                churn.on_record(&alloc(sec * SEC, Origin::Connect));
            }
            churn.on_record(&release(sec * SEC + 1, Proto::Udp, None, None));
        }
        churn.advance(100 * SEC);
        let history = churn.history();
        assert_eq!(history.len(), 60);
        let expected: Vec<(u64, u64)> = (40..100u64).map(|sec| (sec % 7, 1)).collect();
        assert_eq!(history, expected);
        assert!(churn.seconds.len() <= HISTORY_S as usize + 1);
    }

    #[test]
    fn out_of_order_records_land_in_their_second() {
        let mut churn = Churn::new();
        churn.on_record(&alloc(100 * SEC, Origin::Connect));
        churn.on_record(&alloc(102 * SEC, Origin::Connect));
        churn.on_record(&alloc(101 * SEC, Origin::Connect));
        churn.on_record(&alloc(101 * SEC + 1, Origin::Connect));
        // Older than the history: ignored, and time does not go back.
        churn.on_record(&alloc(30 * SEC, Origin::Connect));
        churn.advance(103 * SEC);
        assert_eq!(churn.history(), vec![(1, 0), (2, 0), (1, 0)]);
    }

    #[test]
    fn hold_quantiles_per_protocol_and_origin() {
        let mut churn = Churn::new();
        // 1..=100 ms for TCP connect.
        for ms in 1..=100u64 {
            churn.on_record(&release(SEC, Proto::Tcp, Some(Origin::Connect), Some(ms * 1_000_000)));
        }
        churn.on_record(&release(SEC, Proto::Udp, Some(Origin::Autobind), Some(60 * SEC)));
        churn.on_record(&release(SEC, Proto::Udp, None, Some(3 * SEC)));
        // Unknown hold times are not in the histograms.
        churn.on_record(&release(SEC, Proto::Udp, None, None));
        let figures = churn.figures();
        let tcp = figures.hold_seconds["tcp"]["connect"];
        assert_eq!(tcp.count, 100);
        for (value, expected) in [(tcp.p50, 0.050), (tcp.p90, 0.090), (tcp.p99, 0.099), (tcp.max, 0.100)] {
            assert!((value - expected).abs() <= expected * 0.01, "{value} vs {expected}");
        }
        let udp = &figures.hold_seconds["udp"];
        assert_eq!(udp["autobind"].count, 1);
        assert!((udp["autobind"].max - 60.0).abs() <= 0.6);
        assert_eq!(udp["unknown"].count, 1);
        // A hold longer than the histogram's range is clamped, not lost.
        churn.on_record(&release(SEC, Proto::Tcp, Some(Origin::Bind), Some(u64::MAX)));
        assert_eq!(churn.figures().hold_seconds["tcp"]["bind"].count, 1);
    }

    #[test]
    fn figures_serialize_with_window_names() {
        let mut churn = Churn::new();
        churn.on_record(&release(SEC, Proto::Tcp, Some(Origin::Connect), Some(SEC)));
        let json = serde_json::to_value(churn.figures()).unwrap();
        assert!(json["allocations_per_s"]["1s"].is_number());
        assert!(json["releases_per_s"]["60s"].is_number());
        assert_eq!(json["hold_seconds"]["tcp"]["connect"]["count"], 1);
        assert!(json["hold_seconds"]["tcp"]["connect"]["p99"].is_number());
    }
}
