//! OpenMetrics for `--metrics ADDR`: counters fed with every record
//! ([`MetricCounters`]), a snapshot of them and of the pools
//! ([`MetricsSnapshot`]) rendered as text, and a small HTTP server that
//! answers `GET /metrics` with the last rendered page ([`serve`]).
//!
//! Counters are declared under their sample name (`# TYPE x_total counter`),
//! as the Prometheus text format has it: `promtool check metrics` parses that
//! format and rejects the bare OpenMetrics family name, while Prometheus'
//! OpenMetrics parser takes either. The page ends with `# EOF`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::model::{errno_name, Origin, Proto, ReleaseReason};
use crate::pressure::Pools;
use crate::record::{PortRecord, RecordBody};

/// Every metric the page has, by the name in `# TYPE` (the interface's
/// names).
pub const METRIC_NAMES: [&str; 9] = [
    "port_trace_allocations_total",
    "port_trace_releases_total",
    "port_trace_allocation_failures_total",
    "port_trace_ports_in_use",
    "port_trace_ephemeral_range_size",
    "port_trace_destination_ports_in_use",
    "port_trace_destination_range_ratio",
    "port_trace_port_hold_seconds",
    "port_trace_events_lost_total",
];

/// The histogram among [`METRIC_NAMES`]: its samples are named with the
/// suffixes in [`HISTOGRAM_SUFFIXES`].
pub const HISTOGRAM_NAME: &str = "port_trace_port_hold_seconds";
/// Sample name suffixes of a histogram.
pub const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// Upper bounds (`le`) of the hold-time histogram buckets, in seconds; a
/// `+Inf` bucket follows.
pub const HOLD_BUCKETS_S: [f64; 18] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// How many destinations the page lists unless told otherwise.
pub const DEFAULT_DESTINATIONS: usize = 20;

/// The media type of the page.
pub const CONTENT_TYPE_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a sample name appears on the page: a metric name, or the
/// histogram's name with one of its suffixes.
pub fn is_sample_name(name: &str) -> bool {
    METRIC_NAMES.contains(&name)
        || name.strip_prefix(HISTOGRAM_NAME).is_some_and(|suffix| HISTOGRAM_SUFFIXES.contains(&suffix))
}

/// A histogram of hold times with the fixed buckets of [`HOLD_BUCKETS_S`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HoldHistogram {
    /// Observations per bucket, not cumulative; the last is above every bound.
    pub buckets: [u64; HOLD_BUCKETS_S.len() + 1],
    /// Sum of the observations, in seconds.
    pub sum_s: f64,
    /// Number of observations.
    pub count: u64,
}

impl HoldHistogram {
    /// Adds one hold time.
    pub fn observe(&mut self, seconds: f64) {
        let seconds = if seconds.is_finite() { seconds.max(0.0) } else { 0.0 };
        let bucket = HOLD_BUCKETS_S.partition_point(|bound| *bound < seconds);
        self.buckets[bucket] += 1;
        self.sum_s += seconds;
        self.count += 1;
    }
}

/// Counters since the start, fed with every record.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricCounters {
    /// Allocations by protocol and origin.
    pub allocations: BTreeMap<(Proto, Origin), u64>,
    /// Releases by protocol and reason.
    pub releases: BTreeMap<(Proto, ReleaseReason), u64>,
    /// Failed allocations by protocol and errno name.
    pub failures: BTreeMap<(Proto, String), u64>,
    /// Events the kernel could not deliver.
    pub events_lost: u64,
    /// Hold times of releases whose allocation was seen, by protocol.
    pub hold: BTreeMap<Proto, HoldHistogram>,
}

impl MetricCounters {
    /// Counts one record.
    pub fn on_record(&mut self, rec: &PortRecord) {
        let proto = rec.port.proto;
        match &rec.body {
            RecordBody::Alloc { origin, .. } => *self.allocations.entry((proto, *origin)).or_default() += 1,
            RecordBody::AllocFail { errno, .. } => *self.failures.entry((proto, errno_name(*errno))).or_default() += 1,
            RecordBody::Release { reason, held_ns, .. } => {
                *self.releases.entry((proto, *reason)).or_default() += 1;
                if let Some(held) = held_ns {
                    self.hold.entry(proto).or_default().observe(*held as f64 / 1e9);
                }
            }
            RecordBody::State { .. } => {}
        }
    }

    /// Counts events the kernel could not deliver.
    pub fn on_lost(&mut self, count: u64) {
        self.events_lost = self.events_lost.saturating_add(count);
    }
}

/// One destination's share of its namespace's range.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationGauge {
    /// Network namespace inode.
    pub netns: u32,
    /// Destination address.
    pub raddr: IpAddr,
    /// Destination port.
    pub rport: u16,
    /// Ports of the usable range that a connect to it cannot use.
    pub ports_in_use: u32,
    /// `ports_in_use` over the usable range size.
    pub range_ratio: f64,
}

/// Everything the page shows, as plain data.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Counters and the hold-time histograms.
    pub counters: MetricCounters,
    /// Ports held per (netns, proto).
    pub ports_in_use: Vec<(u32, Proto, u64)>,
    /// Usable range size per netns.
    pub range_sizes: Vec<(u32, u32)>,
    /// The busiest destinations, busiest first, at most one per
    /// (netns, raddr, rport).
    pub destinations: Vec<DestinationGauge>,
}

impl MetricsSnapshot {
    /// A snapshot of `counters` and `pools`, with at most `max_destinations`
    /// destinations (the busiest; a destination reached from several local
    /// addresses is shown with its fullest pool).
    pub fn new(counters: &MetricCounters, pools: &Pools, max_destinations: usize) -> Self {
        let mut destinations: Vec<DestinationGauge> = Vec::new();
        for status in pools.busiest_destinations(usize::MAX) {
            if destinations.len() >= max_destinations {
                break;
            }
            let (Some(raddr), Some(rport)) = (status.key.raddr, status.key.rport) else {
                continue;
            };
            let netns = status.key.netns;
            if destinations.iter().any(|d| (d.netns, d.raddr, d.rport) == (netns, raddr, rport)) {
                continue;
            }
            destinations.push(DestinationGauge {
                netns,
                raddr,
                rport,
                ports_in_use: status.used,
                range_ratio: status.ratio,
            });
        }
        Self {
            counters: counters.clone(),
            ports_in_use: pools.ports_in_use_by(),
            range_sizes: pools.range_sizes(),
            destinations,
        }
    }

    /// The page: OpenMetrics text ending with `# EOF`.
    pub fn render(&self) -> String {
        let mut page = String::new();
        let c = &self.counters;

        family(&mut page, METRIC_NAMES[0], "counter", "Ports allocated, by protocol and how.");
        for ((proto, origin), n) in &c.allocations {
            sample(&mut page, METRIC_NAMES[0], &[("proto", proto.name()), ("origin", origin.name())], *n);
        }
        family(&mut page, METRIC_NAMES[1], "counter", "Ports released, by protocol and why.");
        for ((proto, reason), n) in &c.releases {
            sample(&mut page, METRIC_NAMES[1], &[("proto", proto.name()), ("reason", reason.name())], *n);
        }
        family(&mut page, METRIC_NAMES[2], "counter", "Port allocations that failed, by protocol and errno.");
        for ((proto, errno), n) in &c.failures {
            sample(&mut page, METRIC_NAMES[2], &[("proto", proto.name()), ("errno", errno)], *n);
        }
        family(
            &mut page,
            METRIC_NAMES[3],
            "gauge",
            "Ports held now (TIME_WAIT included), by network namespace and protocol.",
        );
        for (netns, proto, n) in &self.ports_in_use {
            sample(&mut page, METRIC_NAMES[3], &[("netns", &netns.to_string()), ("proto", proto.name())], *n);
        }
        family(
            &mut page,
            METRIC_NAMES[4],
            "gauge",
            "Ports the kernel may choose: ip_local_port_range minus ip_local_reserved_ports.",
        );
        for (netns, size) in &self.range_sizes {
            sample(&mut page, METRIC_NAMES[4], &[("netns", &netns.to_string())], size);
        }
        family(
            &mut page,
            METRIC_NAMES[5],
            "gauge",
            "Ports of the range a connect to this destination cannot use (busiest destinations only).",
        );
        for d in &self.destinations {
            let labels = destination_labels(d);
            sample(&mut page, METRIC_NAMES[5], &labels_ref(&labels), d.ports_in_use);
        }
        family(
            &mut page,
            METRIC_NAMES[6],
            "gauge",
            "Share of the usable range in use toward this destination (busiest destinations only).",
        );
        for d in &self.destinations {
            let labels = destination_labels(d);
            sample(&mut page, METRIC_NAMES[6], &labels_ref(&labels), float(d.range_ratio));
        }
        family(&mut page, HISTOGRAM_NAME, "histogram", "How long ports were held, from allocation to release.");
        for proto in [Proto::Tcp, Proto::Udp] {
            let empty = HoldHistogram::default();
            let h = c.hold.get(&proto).unwrap_or(&empty);
            let bucket_name = format!("{HISTOGRAM_NAME}_bucket");
            let mut cumulative = 0;
            for (bound, n) in HOLD_BUCKETS_S.iter().zip(&h.buckets) {
                cumulative += n;
                sample(&mut page, &bucket_name, &[("proto", proto.name()), ("le", &float(*bound))], cumulative);
            }
            sample(&mut page, &bucket_name, &[("proto", proto.name()), ("le", "+Inf")], h.count);
            sample(&mut page, &format!("{HISTOGRAM_NAME}_sum"), &[("proto", proto.name())], float(h.sum_s));
            sample(&mut page, &format!("{HISTOGRAM_NAME}_count"), &[("proto", proto.name())], h.count);
        }
        family(&mut page, METRIC_NAMES[8], "counter", "Events the kernel could not deliver (ring buffer full).");
        sample(&mut page, METRIC_NAMES[8], &[], c.events_lost);
        page.push_str("# EOF\n");
        page
    }
}

fn destination_labels(d: &DestinationGauge) -> [(&'static str, String); 3] {
    [("netns", d.netns.to_string()), ("raddr", d.raddr.to_string()), ("rport", d.rport.to_string())]
}

fn labels_ref<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn family(page: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(page, "# HELP {name} {}", escape(help, false));
    let _ = writeln!(page, "# TYPE {name} {kind}");
}

fn sample(page: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    page.push_str(name);
    if !labels.is_empty() {
        page.push('{');
        for (i, (key, val)) in labels.iter().enumerate() {
            if i > 0 {
                page.push(',');
            }
            let _ = write!(page, "{key}=\"{}\"", escape(val, true));
        }
        page.push('}');
    }
    let _ = writeln!(page, " {value}");
}

/// Escapes `\` and newlines (and `"` in label values), as both text formats
/// require.
fn escape(text: &str, quote: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            _ => out.push(ch),
        }
    }
    out
}

/// A number as OpenMetrics writes it: `NaN`, `+Inf`, `-Inf`, or decimal.
fn float(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

/// The address `--metrics` names: `PORT`, `:PORT` (both on 127.0.0.1),
/// `HOST:PORT` with an IP address or `localhost`, or `[IPV6]:PORT`.
pub fn bind_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("--metrics {text:?}: {p:?} is not a port number"));
    if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() {
        return Ok(SocketAddr::new(loopback, port(text)?));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match text.rsplit_once(':') {
        Some(("", p)) | Some(("localhost", p)) => Ok(SocketAddr::new(loopback, port(p)?)),
        Some((host, p)) => {
            port(p)?;
            Err(format!("--metrics {text:?}: {host:?} is not an IP address (or localhost)"))
        }
        None => Err(format!("--metrics {text:?}: expected PORT, :PORT or HOST:PORT")),
    }
}

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `page` (the caller re-renders it) at `GET /metrics` until the task
/// is dropped; other paths are 404, other methods 405. Never returns.
pub async fn serve(listener: TcpListener, page: Arc<Mutex<String>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = match slots.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => return, // the semaphore is never closed
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // EMFILE and the like: wait a little instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let page = page.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(&req, &page);
                async move { Ok::<_, Infallible>(response) }
            });
            // Errors are the client's (bad request, hang-up): nothing to do.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn respond(req: &Request<Incoming>, page: &Mutex<String>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        response
    };
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    // A panic elsewhere while holding the lock leaves the last page intact.
    let body = page.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;
    use crate::pressure::UsableRange;
    use crate::record::PortRef;
    use std::io::Write;
    use std::process::{Command, Stdio};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const NS: u32 = 4026531840;

    fn port(sock: u64, proto: Proto, lport: u16, dest: Option<(&str, u16)>) -> PortRef {
        PortRef {
            sock,
            netns: NS,
            proto,
            family: Family::Ipv4,
            laddr: "10.0.0.1".parse().unwrap(),
            lport,
            raddr: dest.map(|d| d.0.parse().unwrap()),
            rport: dest.map(|d| d.1),
            pid: 7,
            comm: "curl".into(),
            cgroup: 0,
            ephemeral: Some(true),
        }
    }

    /// Counters and pools after a small, known workload.
    fn workload() -> (MetricCounters, Pools) {
        let mut counters = MetricCounters::default();
        let mut pools = Pools::new();
        pools.set_range(NS, UsableRange::parse("40000 40099", "40090-40099").unwrap());
        let mut records = Vec::new();
        for i in 0..30u16 {
            let dest = if i < 20 { ("10.0.0.9", 443) } else { ("10.0.0.8", 80) };
            let p = port(u64::from(i), Proto::Tcp, 40000 + i, Some(dest));
            records.push(PortRecord {
                ts_ns: 1,
                port: p,
                body: RecordBody::Alloc { origin: Origin::Connect, ephemeral: true },
            });
        }
        for i in 0..5u16 {
            let dest = if i < 3 { ("10.0.0.9", 443) } else { ("10.0.0.8", 80) };
            let p = port(u64::from(i) * 7 % 30, Proto::Tcp, 40000 + (i * 7 % 30), Some(dest));
            records.push(PortRecord {
                ts_ns: 2,
                port: p,
                body: RecordBody::Release {
                    reason: ReleaseReason::Close,
                    held_ns: Some(u64::from(i) * 400_000_000),
                    origin: Some(Origin::Connect),
                    alloc_ts_ns: Some(1),
                },
            });
        }
        records.push(PortRecord {
            ts_ns: 3,
            port: port(99, Proto::Udp, 0, None),
            body: RecordBody::AllocFail { errno: libc::EAGAIN, origin: Origin::Autobind },
        });
        let mut ignored = Vec::new();
        for rec in &records {
            counters.on_record(rec);
            pools.on_record(rec, &mut ignored);
        }
        counters.on_lost(3);
        (counters, pools)
    }

    fn sample_value(page: &str, prefix: &str) -> Option<f64> {
        page.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
    }

    #[test]
    fn page_has_every_metric_with_its_type_and_labels() {
        let (counters, pools) = workload();
        let page = MetricsSnapshot::new(&counters, &pools, DEFAULT_DESTINATIONS).render();
        for name in METRIC_NAMES {
            assert!(page.contains(&format!("# TYPE {name} ")), "{name}");
            assert!(page.contains(&format!("# HELP {name} ")), "{name}");
        }
        assert!(page.ends_with("# EOF\n"));
        assert_eq!(sample_value(&page, "port_trace_allocations_total{proto=\"tcp\",origin=\"connect\"}"), Some(30.0));
        assert_eq!(sample_value(&page, "port_trace_releases_total{proto=\"tcp\",reason=\"close\"}"), Some(5.0));
        assert_eq!(
            sample_value(&page, "port_trace_allocation_failures_total{proto=\"udp\",errno=\"EAGAIN\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample_value(&page, &format!("port_trace_ports_in_use{{netns=\"{NS}\",proto=\"tcp\"}}")),
            Some(25.0)
        );
        assert_eq!(sample_value(&page, &format!("port_trace_ephemeral_range_size{{netns=\"{NS}\"}}")), Some(90.0));
        let dest = format!("{{netns=\"{NS}\",raddr=\"10.0.0.9\",rport=\"443\"}}");
        assert_eq!(sample_value(&page, &format!("port_trace_destination_ports_in_use{dest}")), Some(17.0));
        assert_eq!(sample_value(&page, &format!("port_trace_destination_range_ratio{dest}")), Some(17.0 / 90.0));
        assert_eq!(sample_value(&page, "port_trace_events_lost_total "), Some(3.0));
        // Every sample line names a rendered metric.
        for line in page.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(is_sample_name(name), "{line}");
        }
    }

    #[test]
    fn hold_histogram_buckets_are_cumulative() {
        let (counters, pools) = workload();
        let page = MetricsSnapshot::new(&counters, &pools, 5).render();
        // Hold times 0, 0.4, 0.8, 1.2, 1.6 s.
        let bucket = |le: &str| {
            sample_value(&page, &format!("port_trace_port_hold_seconds_bucket{{proto=\"tcp\",le=\"{le}\"}}"))
        };
        assert_eq!(bucket("0.001"), Some(1.0));
        assert_eq!(bucket("0.5"), Some(2.0));
        assert_eq!(bucket("1.0"), Some(3.0));
        assert_eq!(bucket("2.5"), Some(5.0));
        assert_eq!(bucket("+Inf"), Some(5.0));
        let sum = sample_value(&page, "port_trace_port_hold_seconds_sum{proto=\"tcp\"}").unwrap();
        assert!((sum - 4.0).abs() < 1e-9);
        assert_eq!(sample_value(&page, "port_trace_port_hold_seconds_count{proto=\"udp\"}"), Some(0.0));
        let mut previous = 0.0;
        for line in page.lines().filter(|l| l.starts_with("port_trace_port_hold_seconds_bucket{proto=\"tcp\"")) {
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(value >= previous, "{line}");
            previous = value;
        }
    }

    #[test]
    fn destinations_are_bounded_to_the_busiest() {
        let (counters, pools) = workload();
        let snapshot = MetricsSnapshot::new(&counters, &pools, 1);
        assert_eq!(snapshot.destinations.len(), 1);
        assert_eq!(snapshot.destinations[0].rport, 443);
        let page = snapshot.render();
        assert_eq!(page.matches("port_trace_destination_range_ratio{").count(), 1);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut counters = MetricCounters::default();
        counters.failures.insert((Proto::Tcp, "E\"odd\\\nname".into()), 2);
        let page = MetricsSnapshot { counters, ..Default::default() }.render();
        assert!(page.contains(r#"errno="E\"odd\\\nname"} 2"#), "{page}");
        assert_eq!(escape("a\\b\n\"c\"", false), "a\\\\b\\n\"c\"");
    }

    #[test]
    fn numbers_are_written_as_openmetrics_wants() {
        assert_eq!(float(f64::NAN), "NaN");
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(float(3.0), "3.0");
        assert_eq!(float(0.25), "0.25");
        assert_eq!(float(1e20), "100000000000000000000");
    }

    #[test]
    fn histogram_observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = HoldHistogram::default();
        for s in [0.0, 0.001, 0.0011, 600.0, 601.0, f64::NAN, -1.0] {
            h.observe(s);
        }
        assert_eq!(h.buckets[0], 4); // 0, 0.001, NaN and -1 taken as 0
        assert_eq!(h.buckets[1], 1); // 0.0011 <= 0.0025
        assert_eq!(h.buckets[HOLD_BUCKETS_S.len() - 1], 1); // 600
        assert_eq!(h.buckets[HOLD_BUCKETS_S.len()], 1); // above every bound
        assert_eq!(h.count, 7);
    }

    /// `promtool` comes with Debian's `prometheus` package.
    #[test]
    fn promtool_accepts_the_page() {
        let (counters, pools) = workload();
        let page = MetricsSnapshot::new(&counters, &pools, DEFAULT_DESTINATIONS).render();
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool is needed for this test (Debian package `prometheus`)");
        child.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "promtool: {said}\n{page}");
        assert!(said.trim().is_empty(), "promtool: {said}");
    }

    #[test]
    fn bind_addr_forms() {
        assert_eq!(bind_addr("9954"), Ok("127.0.0.1:9954".parse().unwrap()));
        assert_eq!(bind_addr(":9954"), Ok("127.0.0.1:9954".parse().unwrap()));
        assert_eq!(bind_addr("0.0.0.0:9954"), Ok("0.0.0.0:9954".parse().unwrap()));
        assert_eq!(bind_addr("localhost:80"), Ok("127.0.0.1:80".parse().unwrap()));
        assert_eq!(bind_addr("[::1]:9954"), Ok("[::1]:9954".parse().unwrap()));
        assert_eq!(bind_addr("0"), Ok("127.0.0.1:0".parse().unwrap()));
        for bad in ["", "70000", ":", ":x", "example.org:80", "1.2.3.4", "1.2.3.4:99999", "::1:80:"] {
            assert!(bind_addr(bad).is_err(), "{bad:?}");
        }
    }

    async fn fetch(addr: SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await.unwrap().unwrap();
        String::from_utf8_lossy(&reply).into_owned()
    }

    #[tokio::test]
    async fn server_answers_metrics_and_404_elsewhere() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let page = Arc::new(Mutex::new("first\n# EOF\n".to_string()));
        let server = tokio::spawn(serve(listener, page.clone()));

        let reply = fetch(addr, "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(
            reply.to_ascii_lowercase().contains(&format!("content-type: {CONTENT_TYPE_OPENMETRICS}\r\n")),
            "{reply}"
        );
        assert!(reply.ends_with("\r\n\r\nfirst\n# EOF\n"), "{reply}");

        // The caller re-renders; the next request sees the new page.
        *page.lock().unwrap() = "second\n# EOF\n".into();
        let reply = fetch(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(reply.ends_with("second\n# EOF\n"), "{reply}");

        let reply = fetch(addr, "GET /other HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 404 Not Found\r\n"), "{reply}");
        let reply =
            fetch(addr, "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{reply}");

        // Garbage gets an error or a hang-up, and the server keeps serving.
        let reply = fetch(addr, "\x00\x01 nonsense\r\n\r\n").await;
        assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 400"), "{reply}");
        let reply = fetch(addr, "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(!server.is_finished());
        server.abort();
    }
}
