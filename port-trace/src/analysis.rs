//! The live analysis of a trace: range pressure per pool (every record, the
//! kernel's pools are shared by everything traced), churn, OpenMetrics
//! counters and ephemeral-range listener notices (the records that pass the
//! user's filters). Pure: the namespaces' port ranges come from a
//! [`RangeSource`] the caller supplies.

use std::collections::HashSet;

use serde::Serialize;

use crate::churn::{Churn, ChurnFigures};
use crate::metrics::{MetricCounters, MetricsSnapshot, DEFAULT_DESTINATIONS};
use crate::notices::{AllowArg, AllowList, ListenerNotices, ListenerSummary, Notice};
use crate::pressure::{PoolStatus, Pools, PressureEvent, UsableRange};
use crate::record::PortRecord;

/// What the analysis tells the frontend besides the records themselves.
#[derive(Clone, Debug, PartialEq)]
pub enum Derived {
    /// A pool crossed a warning level.
    Pressure(PressureEvent),
    /// Something a person should look at.
    Notice(Notice),
}

/// Finds the usable port range of a network namespace, given the inode and
/// the pid of a process that used it (a way into the namespace).
pub type RangeSource = Box<dyn FnMut(u32, u32) -> Option<UsableRange> + Send>;

/// The live analysis.
pub struct Analysis {
    /// Ports in use per pool and the pressure warnings.
    pub pools: Pools,
    /// Allocation and release rates, hold times.
    pub churn: Churn,
    /// Ephemeral-range listeners.
    pub notices: ListenerNotices,
    /// OpenMetrics counters.
    pub counters: MetricCounters,
    range_source: Option<RangeSource>,
    /// Namespaces whose range could not be read (not asked again).
    unreadable_ranges: HashSet<u32>,
    pressure_scratch: Vec<PressureEvent>,
    notice_scratch: Vec<Notice>,
    pressure_records: u64,
    notice_records: u64,
    /// The fullest a pool got in a pressure record.
    peak: Option<PressureEvent>,
}

/// What the analysis adds to the closing summary.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AnalysisSummary {
    /// Rates over 1, 10 and 60 s at the end, hold-time percentiles.
    pub churn: ChurnFigures,
    /// `pressure` records written.
    pub pressure_records: u64,
    /// The fullest pools at the end.
    pub fullest_pools: Vec<PoolSummary>,
    /// The fullest a pool got (from its pressure records), when any.
    pub pressure_peak: Option<PoolSummary>,
    /// `notice` records written.
    pub notices: u64,
    /// Sockets that served on ephemeral-range ports.
    pub ephemeral_listeners: Vec<ListenerSummary>,
}

/// One pool in the summary.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PoolSummary {
    /// Network namespace inode.
    pub netns: u32,
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// Local address of the pool.
    pub laddr: String,
    /// Destination address (connect pools).
    pub raddr: Option<String>,
    /// Destination port (connect pools).
    pub rport: Option<u16>,
    /// Ports in use.
    pub used: u32,
    /// Usable range size.
    pub capacity: u32,
    /// `used / capacity`.
    pub ratio: f64,
}

impl From<&PoolStatus> for PoolSummary {
    fn from(s: &PoolStatus) -> Self {
        Self {
            netns: s.key.netns,
            proto: s.key.proto.name(),
            laddr: s.key.laddr.to_string(),
            raddr: s.key.raddr.map(|a| a.to_string()),
            rport: s.key.rport,
            used: s.used,
            capacity: s.capacity,
            ratio: s.ratio,
        }
    }
}

impl From<&PressureEvent> for PoolSummary {
    fn from(p: &PressureEvent) -> Self {
        Self {
            netns: p.netns,
            proto: p.proto.name(),
            laddr: p.laddr.to_string(),
            raddr: p.raddr.map(|a| a.to_string()),
            rport: p.rport,
            used: p.used,
            capacity: p.capacity,
            ratio: p.ratio,
        }
    }
}

impl Analysis {
    /// An analysis silencing the `--allow-listener` entries.
    pub fn new(allow: &[AllowArg]) -> Self {
        Self {
            pools: Pools::new(),
            churn: Churn::new(),
            notices: ListenerNotices::new(AllowList::from_args(allow)),
            counters: MetricCounters::default(),
            range_source: None,
            unreadable_ranges: HashSet::new(),
            pressure_scratch: Vec::new(),
            notice_scratch: Vec::new(),
            pressure_records: 0,
            notice_records: 0,
            peak: None,
        }
    }

    /// Where ranges of namespaces seen for the first time come from: asked
    /// at once, before the first record of the namespace counts, so that a
    /// pool filling right away warns before it runs out.
    pub fn with_range_source(mut self, source: RangeSource) -> Self {
        self.range_source = Some(source);
        self
    }

    /// Sets a namespace's usable range.
    pub fn set_range(&mut self, netns: u32, range: UsableRange) {
        self.notices.set_range(netns, range.low, range.high);
        self.notices.set_reserved(netns, range.reserved.clone());
        self.pools.set_range(netns, range);
    }

    /// Namespaces seen whose range is neither known nor unreadable.
    pub fn netns_without_range(&self) -> Vec<u32> {
        self.pools.netns_without_range().into_iter().filter(|n| !self.unreadable_ranges.contains(n)).collect()
    }

    /// A namespace whose range cannot be read (gone already): not asked
    /// again.
    pub fn range_unknown(&mut self, netns: u32) {
        self.unreadable_ranges.insert(netns);
    }

    fn ensure_range(&mut self, rec: &PortRecord) {
        let netns = rec.port.netns;
        if self.pools.range(netns).is_some() || self.unreadable_ranges.contains(&netns) {
            return;
        }
        let Some(source) = self.range_source.as_mut() else { return };
        match source(netns, rec.port.pid) {
            Some(range) => self.set_range(netns, range),
            None => {
                self.unreadable_ranges.insert(netns);
            }
        }
    }

    /// Every record the tracker produced: the pools.
    pub fn observe(&mut self, rec: &PortRecord, out: &mut Vec<Derived>) {
        self.ensure_range(rec);
        self.pools.on_record(rec, &mut self.pressure_scratch);
        for event in self.pressure_scratch.drain(..) {
            self.pressure_records += 1;
            if self.peak.as_ref().is_none_or(|p| event.ratio > p.ratio) {
                self.peak = Some(event.clone());
            }
            out.push(Derived::Pressure(event));
        }
    }

    /// A record that passed the filters: churn, counters, notices.
    pub fn record(&mut self, rec: &PortRecord, out: &mut Vec<Derived>) {
        self.churn.on_record(rec);
        self.counters.on_record(rec);
        self.notices.on_record(rec, &mut self.notice_scratch);
        self.pass_notices(out);
    }

    fn pass_notices(&mut self, out: &mut Vec<Derived>) {
        for notice in self.notice_scratch.drain(..) {
            self.notice_records += 1;
            out.push(Derived::Notice(notice));
        }
    }

    /// Time passes (about once a second): rates fall when nothing happens,
    /// UDP binds past their grace period become notices.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<Derived>) {
        self.churn.advance(now_ns);
        self.notices.tick(now_ns, &mut self.notice_scratch);
        self.pass_notices(out);
    }

    /// The OpenMetrics page, with `lost` events the kernel could not deliver.
    pub fn metrics_page(&self, lost: u64) -> String {
        let mut counters = self.counters.clone();
        counters.events_lost = lost;
        MetricsSnapshot::new(&counters, &self.pools, DEFAULT_DESTINATIONS).render()
    }

    /// The figures for the closing summary.
    pub fn summary(&self) -> AnalysisSummary {
        AnalysisSummary {
            churn: self.churn.figures(),
            pressure_records: self.pressure_records,
            fullest_pools: self.pools.busiest(5).iter().map(PoolSummary::from).collect(),
            pressure_peak: self.peak.as_ref().map(PoolSummary::from),
            notices: self.notice_records,
            ephemeral_listeners: self.notices.summary(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::{Family, Origin, Proto, TcpState};
    use crate::record::{PortRef, RecordBody};

    fn port(netns: u32, lport: u16, raddr: Option<IpAddr>) -> PortRef {
        PortRef {
            sock: u64::from(lport),
            netns,
            proto: Proto::Tcp,
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            lport,
            raddr,
            rport: raddr.map(|_| 8080),
            pid: 7,
            comm: "client".into(),
            cgroup: 0,
            ephemeral: Some(true),
        }
    }

    fn alloc(netns: u32, lport: u16, ts_ns: u64) -> PortRecord {
        PortRecord {
            ts_ns,
            port: port(netns, lport, Some(IpAddr::V4(Ipv4Addr::LOCALHOST))),
            body: RecordBody::Alloc { origin: Origin::Connect, ephemeral: true },
        }
    }

    #[test]
    fn a_new_namespace_range_is_asked_before_its_first_record_counts() {
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        let mut analysis = Analysis::new(&[]).with_range_source(Box::new(move |netns, pid| {
            log.lock().unwrap().push((netns, pid));
            Some(UsableRange::parse("40000 40009", "").unwrap())
        }));
        let mut out = Vec::new();
        for (i, port) in (40000..40010).enumerate() {
            analysis.observe(&alloc(5, port, i as u64 * 1_000_000), &mut out);
        }
        assert_eq!(*asked.lock().unwrap(), vec![(5, 7)], "asked once, with the owner's pid");
        let thresholds: Vec<f64> = out
            .iter()
            .filter_map(|d| match d {
                Derived::Pressure(p) if p.rising => Some(p.threshold),
                _ => None,
            })
            .collect();
        assert_eq!(thresholds, vec![0.5, 0.8, 0.95], "warned while filling a 10-port range");
        let summary = analysis.summary();
        assert_eq!(summary.pressure_records, 3);
        assert_eq!(summary.pressure_peak.as_ref().map(|p| (p.used, p.capacity)), Some((10, 10)));
        assert_eq!(summary.fullest_pools[0].used, 10);
    }

    #[test]
    fn an_unreadable_range_is_not_asked_again() {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = calls.clone();
        let mut analysis = Analysis::new(&[]).with_range_source(Box::new(move |_, _| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        }));
        let mut out = Vec::new();
        analysis.observe(&alloc(9, 40000, 1), &mut out);
        analysis.observe(&alloc(9, 40001, 2), &mut out);
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(analysis.netns_without_range().is_empty());
        assert!(out.is_empty(), "no capacity, no pressure");
    }

    #[test]
    fn listeners_in_the_range_become_one_notice_and_metrics_count_records() {
        let mut analysis = Analysis::new(&[]);
        analysis.set_range(3, UsableRange::parse("32768 60999", "").unwrap());
        let mut out = Vec::new();
        let listener = PortRecord {
            ts_ns: 5,
            port: port(3, 45000, None),
            body: RecordBody::State { old: TcpState::Close, new: TcpState::Listen },
        };
        analysis.record(&listener, &mut out);
        analysis.record(&listener, &mut out);
        let notices = out.iter().filter(|d| matches!(d, Derived::Notice(_))).count();
        assert_eq!(notices, 1);
        analysis.record(&alloc(3, 40000, 10), &mut out);
        let page = analysis.metrics_page(4);
        assert!(page.contains("port_trace_allocations_total{proto=\"tcp\",origin=\"connect\"} 1"), "{page}");
        assert!(page.contains("port_trace_events_lost_total 4"), "{page}");
        assert!(page.ends_with("# EOF\n"));
    }
}
