//! Kernel tests of issue 5: range pressure and OpenMetrics.
//!
//! A private namespace whose `ip_local_port_range` is [`RANGE`] (50 ports),
//! `port-trace watch --format json --netns ... --metrics 127.0.0.1:P`, and
//! `port-exhaust` (src/bin) inside the namespace: a listener on
//! 127.0.0.1:[`DEST_PORT`] (outside the range), then `connect()`s to it,
//! every connection kept open, until one fails with EADDRNOTAVAIL, then
//! [`EXTRA`] more attempts. Its truth is what it saw: the port `getsockname`
//! gave each connect, the errno of each failure, the time of the first one.
//!
//! While it holds its 50 connections the page at /metrics must show the
//! destination with 50 ports in use (and pass `promtool check metrics`);
//! after the tracer stops, its records must hold one `alloc` per port the
//! workload got, one `alloc_fail` per failure it counted, and a `pressure`
//! record at 95 % or more of the 50 ports toward that destination before
//! the first failure. They need root (see `require_root`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use port_trace_integration::check::{self, Finding, Kind, Report};
use port_trace_integration::netns::NetNs;
use port_trace_integration::truth::Truth;
use port_trace_integration::{
    assert_report, output_with_input, output_with_timeout, prepare_netns, require_root, rfc3339, stdout_lines,
    tracer_bin, tracer_extra_args, Capture, LiveSession, SessionOptions,
};
use serde_json::Value;

const EXHAUST: &str = env!("CARGO_BIN_EXE_port-exhaust");

/// The namespace's `ip_local_port_range`: exactly 50 ports.
const RANGE: (u16, u16) = (41000, 41049);
/// Ports in [`RANGE`].
const RANGE_SIZE: u64 = (RANGE.1 - RANGE.0) as u64 + 1;
/// The destination every connect goes to: 127.0.0.1, outside [`RANGE`].
const DEST_PORT: u16 = 42000;
const DEST_ADDR: &str = "127.0.0.1";
/// Attempts after the first EADDRNOTAVAIL.
const EXTRA: usize = 5;

/// How long the workload may take to run the range dry.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the tracer may take to print what the workload did (it
/// flushes every 100 ms; this is for a loaded machine).
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the metrics page may take to show it (re-rendered about once
/// a second).
const METRICS_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one scrape, and of `promtool`.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What `port-exhaust` reported on its `ready` line.
#[derive(Debug)]
struct ExhaustTruth {
    pid: u32,
    comm: String,
    /// Local ports of the successful connects, in order (`getsockname`).
    ports: Vec<u16>,
    /// The local addresses of those connects (`getsockname`).
    laddrs: Vec<String>,
    /// Failed connects, as the workload counted them.
    failures: usize,
    /// Their errno names, in order.
    errnos: Vec<String>,
    /// Wall clock right after the first failure returned.
    first_failure_at: Option<rfc3339::UnixNanos>,
    line: String,
}

impl ExhaustTruth {
    fn parse(line: &str) -> Result<ExhaustTruth> {
        let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        let num = |k: &str| v[k].as_u64().with_context(|| format!("no {k:?} in {line}"));
        let ports = v["ports"]
            .as_array()
            .context("no ports")?
            .iter()
            .map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()).context("a port is not a port"))
            .collect::<Result<Vec<u16>>>()?;
        let errnos = v["errnos"]
            .as_array()
            .context("no errnos")?
            .iter()
            .map(|e| e.as_str().map(str::to_owned).context("an errno is not a string"))
            .collect::<Result<Vec<String>>>()?;
        Ok(ExhaustTruth {
            pid: u32::try_from(num("pid")?)?,
            comm: v["comm"].as_str().context("no comm")?.to_owned(),
            ports,
            laddrs: v["laddrs"]
                .as_array()
                .context("no laddrs")?
                .iter()
                .map(|a| a.as_str().map(str::to_owned).context("an address is not a string"))
                .collect::<Result<Vec<String>>>()?,
            failures: usize::try_from(num("failures")?)?,
            errnos,
            first_failure_at: v["first_failure_at"].as_str().and_then(rfc3339::parse),
            line: line.to_owned(),
        })
    }

    /// What the workload must have done for the comparison to mean
    /// anything: every port of the range once, then 1 + [`EXTRA`]
    /// EADDRNOTAVAIL failures.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut sorted = self.ports.clone();
        sorted.sort_unstable();
        if sorted != (RANGE.0..=RANGE.1).collect::<Vec<u16>>() {
            p.push(format!("its ports are not each port of {RANGE:?} once: {sorted:?}"));
        }
        if self.laddrs != [DEST_ADDR] {
            p.push(format!("local addresses {:?}, want only {DEST_ADDR}", self.laddrs));
        }
        if self.failures != 1 + EXTRA || self.errnos.len() != self.failures {
            p.push(format!("{} failures ({:?}), want {}", self.failures, self.errnos, 1 + EXTRA));
        }
        if self.errnos.iter().any(|e| e != "EADDRNOTAVAIL") {
            p.push(format!("errors other than EADDRNOTAVAIL: {:?}", self.errnos));
        }
        if self.first_failure_at.is_none() {
            p.push("no first_failure_at".into());
        }
        p
    }
}

/// `port-exhaust DEST_PORT EXTRA` in a namespace, holding its sockets until
/// released. Dropping it kills the process.
struct Exhaust {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Option<Capture>,
    truth: ExhaustTruth,
}

impl Exhaust {
    fn start(ns: &NetNs) -> Result<Exhaust> {
        let mut child = ns
            .command(EXHAUST)
            .args([DEST_PORT.to_string(), EXTRA.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting port-exhaust")?;
        let lines = stdout_lines(&mut child);
        let stdin = child.stdin.take();
        let stderr = child.stderr.take().map(Capture::start);
        let why = match lines.recv_timeout(READY_TIMEOUT) {
            Ok(line) => match ExhaustTruth::parse(&line) {
                Ok(truth) => return Ok(Exhaust { child, stdin, lines, stderr, truth }),
                Err(e) => format!("printed a bad ready line: {e:#}"),
            },
            Err(RecvTimeoutError::Timeout) => format!("printed nothing within {READY_TIMEOUT:?}"),
            Err(RecvTimeoutError::Disconnected) => "exited without its ready line".to_owned(),
        };
        let _ = child.kill();
        let status = child.wait();
        let err = stderr.map(|c| c.finish(Duration::from_secs(2))).unwrap_or_default();
        bail!("port-exhaust {why} (exit: {status:?}); stderr:\n{}", String::from_utf8_lossy(&err))
    }

    /// Closes its stdin: it closes every socket and prints `done`; fails
    /// unless it exits 0 within [`READY_TIMEOUT`].
    fn release(mut self) -> Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut done = false;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => done |= l.contains("\"done\""),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => bail!("port-exhaust did not exit within {READY_TIMEOUT:?}"),
            }
        }
        let status = self.child.wait()?;
        let stderr = self.stderr.take().map(|c| c.finish(Duration::from_secs(2))).unwrap_or_default();
        if !status.success() || !done {
            bail!(
                "port-exhaust ended with {status} (done line: {done}); stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Exhaust {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback TCP port nobody listens on now (the kernel's choice).
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// `GET /metrics` on 127.0.0.1:`port`: the `Content-Type` and the body of
/// a 200 answer.
fn scrape(port: u16) -> Result<(String, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).context("reading the answer")?;
    let reply = String::from_utf8(reply).context("the answer is not UTF-8")?;
    let (head, body) = reply.split_once("\r\n\r\n").context("no end of headers")?;
    let mut head_lines = head.lines();
    let status = head_lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") {
        bail!("status {status:?}:\n{reply}");
    }
    let content_type = head_lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Ok((content_type, body.to_owned()))
}

/// A sample the page must have: name, some of its labels, value.
type Expected<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// One sample line of the page: name, labels, value.
#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of an OpenMetrics page (comment lines skipped); a line
/// that does not parse is an error.
fn samples(page: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in page.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let bad = || format!("sample line {line:?}");
        let (series, value) = line.rsplit_once(' ').with_context(bad)?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().with_context(bad)?,
        };
        let (name, mut rest) = match series.split_once('{') {
            Some((n, r)) => (n, r.strip_suffix('}').with_context(bad)?),
            None => (series, ""),
        };
        let mut labels = BTreeMap::new();
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").with_context(bad)?;
            let mut val = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().with_context(bad)? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().with_context(bad)?.1 {
                        'n' => val.push('\n'),
                        c => val.push(c),
                    },
                    (_, c) => val.push(c),
                }
            };
            labels.insert(key.to_owned(), val);
            rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
        }
        out.push(Sample { name: name.to_owned(), labels, value });
    }
    Ok(out)
}

/// The value of the sample `name` whose labels include all of `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
}

/// `promtool check metrics` on `page` (stdin): its exit and what it said.
fn promtool(page: &str) -> Result<(bool, String)> {
    let out = output_with_input(Command::new("promtool").args(["check", "metrics"]), Some(page.as_bytes()), IO_TIMEOUT)
        .context("promtool is needed for this test (Debian package `prometheus`)")?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), said))
}

fn ts(v: &Value) -> Option<rfc3339::UnixNanos> {
    v["ts"].as_str().and_then(rfc3339::parse)
}

fn finding(kind: Kind, record: &str, subject: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding { kind, record: record.into(), subject: subject.into(), detail: detail.into() }
}

/// Issue 5's acceptance: a 50-port range run dry toward one destination.
/// While the workload holds its 50 connections, /metrics shows exactly 50
/// ports in use toward it (and passes `promtool check metrics`); the
/// records hold an `alloc` per port it got, exactly as many `alloc_fail`
/// as it counted failures, and a `pressure` record at >= 95 % of the 50
/// ports toward it before the first `alloc_fail`.
#[test]
fn exhausting_a_50_port_range_warns_before_the_first_failure_and_metrics_show_it() {
    if !require_root("exhausting_a_50_port_range_warns_before_the_first_failure_and_metrics_show_it") {
        return;
    }
    let metrics_port = free_port();
    let opts = SessionOptions {
        ephemeral_range: Some(RANGE),
        extra_args: vec!["--metrics".into(), format!("127.0.0.1:{metrics_port}").into()],
        ..SessionOptions::default()
    };
    let ns = prepare_netns(&opts).unwrap();
    let inode = ns.inode();
    let netns_label = inode.to_string();
    let dest_port = DEST_PORT.to_string();
    let mut live = LiveSession::start_in(ns, &opts).unwrap();
    let workload = Exhaust::start(live.ns()).unwrap();
    let truth = &workload.truth;
    eprintln!("port-exhaust: {}", truth.line);
    let shape = truth.problems();
    assert!(shape.is_empty(), "port-exhaust did not run the range dry as planned: {shape:#?}\n{}", truth.line);

    // The tracer has printed what the workload did (not required below,
    // but the page is then only a second behind).
    let (want_allocs, want_fails) = (truth.ports.len(), truth.failures);
    let in_ns = |v: &Value| v["netns"].as_u64() == Some(inode);
    let seen = live.tracer().expect("running").wait_until(EVENT_TIMEOUT, |recs| {
        recs.iter().filter(|v| v["type"] == "alloc" && in_ns(v)).count() >= want_allocs
            && recs.iter().filter(|v| v["type"] == "alloc_fail" && in_ns(v)).count() >= want_fails
    });
    eprintln!("records of the workload seen live: {seen}");

    // The page, polled until it shows the 50 ports (bounded).
    let dest_labels = [("netns", netns_label.as_str()), ("raddr", DEST_ADDR), ("rport", dest_port.as_str())];
    let mut metric_findings = Vec::new();
    let deadline = Instant::now() + METRICS_TIMEOUT;
    let mut last = (String::new(), String::new(), String::from("no scrape yet"));
    let page = loop {
        match scrape(metrics_port).and_then(|(ct, body)| samples(&body).map(|s| (ct, body, s))) {
            Ok((ct, body, s)) => {
                let gauge = value(&s, "port_trace_destination_ports_in_use", &dest_labels);
                let fails =
                    value(&s, "port_trace_allocation_failures_total", &[("proto", "tcp"), ("errno", "EADDRNOTAVAIL")]);
                let state = format!("gauge {gauge:?}, failures_total {fails:?}");
                if gauge == Some(RANGE_SIZE as f64) && fails == Some(want_fails as f64) {
                    break Some((ct, body, s));
                }
                last = (ct, body, state);
            }
            Err(e) => last.2 = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    match &page {
        None => metric_findings.push(finding(
            Kind::Missing,
            "metrics",
            "/metrics",
            format!(
                "within {METRICS_TIMEOUT:?} the page never showed port_trace_destination_ports_in_use{{netns=\"{inode}\",\
                 raddr=\"{DEST_ADDR}\",rport=\"{DEST_PORT}\"}} = {RANGE_SIZE} with allocation_failures_total = \
                 {want_fails}; last: {}\n{}",
                last.2, last.1
            ),
        )),
        Some((content_type, body, s)) => {
            eprintln!("----- metrics page -----\n{body}----- end of metrics page -----");
            if !content_type.starts_with("application/openmetrics-text") {
                metric_findings.push(finding(Kind::Invalid, "metrics", "Content-Type", content_type.clone()));
            }
            let (ok, said) = promtool(body).unwrap();
            if !ok || !said.trim().is_empty() {
                metric_findings.push(finding(
                    Kind::Invalid,
                    "metrics",
                    "promtool check metrics",
                    format!("exit ok: {ok}; said: {said}"),
                ));
            }
            // More of the page against the workload's truth.
            let expect: [Expected; 4] = [
                ("port_trace_ephemeral_range_size", vec![("netns", netns_label.as_str())], RANGE_SIZE as f64),
                ("port_trace_destination_range_ratio", dest_labels.to_vec(), 1.0),
                (
                    "port_trace_allocations_total",
                    vec![("proto", "tcp"), ("origin", "connect")],
                    truth.ports.len() as f64,
                ),
                (
                    "port_trace_allocation_failures_total",
                    vec![("proto", "tcp"), ("errno", "EADDRNOTAVAIL")],
                    want_fails as f64,
                ),
            ];
            for (name, labels, want) in expect {
                let got = value(s, name, &labels);
                if got != Some(want) {
                    metric_findings.push(finding(
                        Kind::Mismatch,
                        "metrics",
                        format!("{name}{labels:?}"),
                        format!("want {want}, got {got:?}"),
                    ));
                }
            }
        }
    }

    live.stop().unwrap();
    let pid = truth.pid;
    let truth_line = truth.line.clone();
    let (ports, laddrs, errnos, comm, first_failure_at) =
        (truth.ports.clone(), truth.laddrs.clone(), truth.errnos.clone(), truth.comm.clone(), truth.first_failure_at);
    workload.release().unwrap();
    let s = live.finish(Truth { pid, sockets: Vec::new() }).unwrap();
    let recs = &s.tracer.records;
    let mut more = metric_findings;

    // One connect `alloc` toward the destination per port the workload got.
    let allocs: Vec<&Value> = recs.iter().filter(|v| v["type"] == "alloc" && in_ns(v)).collect();
    let mut want_ports = ports.clone();
    want_ports.sort_unstable();
    let mut got_ports: Vec<u16> = allocs
        .iter()
        .filter(|v| v["origin"] == "connect" && v["raddr"] == DEST_ADDR && v["rport"] == DEST_PORT)
        .filter_map(|v| v["lport"].as_u64().and_then(|p| u16::try_from(p).ok()))
        .collect();
    got_ports.sort_unstable();
    if got_ports != want_ports {
        more.push(finding(
            Kind::Mismatch,
            "alloc",
            format!("connect to {DEST_ADDR}:{DEST_PORT}"),
            format!("lports {got_ports:?}, the workload's getsockname ports {want_ports:?}"),
        ));
    }
    for v in allocs.iter().filter(|v| v["origin"] == "connect") {
        if v["pid"].as_u64() != Some(u64::from(pid)) || v["comm"] != comm.as_str() {
            more.push(finding(Kind::Mismatch, "alloc", v["lport"].to_string(), format!("pid/comm: {v}")));
        }
    }

    // Exactly the failures the workload counted, with its errnos.
    let fails: Vec<&Value> = recs.iter().filter(|v| v["type"] == "alloc_fail" && in_ns(v)).collect();
    let got_errnos: Vec<&str> = fails.iter().map(|v| v["errno"].as_str().unwrap_or("?")).collect();
    if fails.len() != errnos.len() || got_errnos != errnos.iter().map(String::as_str).collect::<Vec<_>>() {
        more.push(finding(
            Kind::Mismatch,
            "alloc_fail",
            format!("netns {inode}"),
            format!(
                "{} records with errnos {got_errnos:?}; the workload counted {} failures: {errnos:?}",
                fails.len(),
                errnos.len()
            ),
        ));
    }
    for v in &fails {
        let mut d = Vec::new();
        if v["pid"].as_u64() != Some(u64::from(pid)) || v["comm"] != comm.as_str() {
            d.push(format!("pid/comm: want {pid}/{comm}"));
        }
        if v["origin"] != "connect" {
            d.push("origin: want connect".to_owned());
        }
        if v["raddr"] != DEST_ADDR || v["rport"] != DEST_PORT {
            d.push(format!("raddr/rport: want {DEST_ADDR}:{DEST_PORT}"));
        }
        if !d.is_empty() {
            more.push(finding(Kind::Mismatch, "alloc_fail", v["ts"].to_string(), format!("{}: {v}", d.join("; "))));
        }
    }
    let first_fail_ts = fails.iter().filter_map(|v| ts(v)).min();
    if let (Some(tool), Some(wall)) = (first_fail_ts, first_failure_at) {
        if (tool - wall).abs() > check::CLOCK_SLACK_NS {
            more.push(finding(
                Kind::Mismatch,
                "alloc_fail",
                "first",
                format!("ts is {} ms from the workload's clock after its first failure", (tool - wall) / 1_000_000),
            ));
        }
    }

    // A warning at >= 95 % toward the destination, before the first failure.
    let pressure: Vec<&Value> = recs.iter().filter(|v| v["type"] == "pressure").collect();
    let warning = pressure
        .iter()
        .filter(|v| {
            in_ns(v)
                && v["raddr"] == DEST_ADDR
                && v["rport"] == DEST_PORT
                && v["capacity"].as_u64() == Some(RANGE_SIZE)
                && v["ratio"].as_f64().is_some_and(|r| r >= 0.95)
        })
        .filter_map(|v| ts(v).map(|t| (t, *v)))
        .min_by_key(|(t, _)| *t);
    match (warning, first_fail_ts) {
        (Some((t, v)), Some(f)) if t < f => {
            eprintln!("----- pressure record -----\n{v}\n----- first alloc_fail ts {} -----", fails[0]["ts"]);
        }
        (w, f) => {
            let w = w.map(|(_, v)| v.to_string());
            more.push(finding(
                Kind::Missing,
                "pressure",
                format!("{DEST_ADDR}:{DEST_PORT}"),
                format!(
                    "no record with capacity {RANGE_SIZE} and ratio >= 0.95 before the first alloc_fail \
                     (the first such: {w:?}; the first alloc_fail at {f:?} ns)"
                ),
            ));
        }
    }
    // Every pressure record is about the workload's only pool: its source
    // address, its destination, the 50 ports; an exhausted one (threshold
    // 1.0, at a failure) counts the ports the workload held then.
    for v in pressure.iter().filter(|v| in_ns(v)) {
        let mut d = Vec::new();
        if !v["laddr"].as_str().is_some_and(|a| laddrs.iter().any(|l| l == a)) {
            d.push(format!("laddr: want one of the workload's {laddrs:?}"));
        }
        if v["raddr"] != DEST_ADDR || v["rport"] != DEST_PORT || v["capacity"].as_u64() != Some(RANGE_SIZE) {
            d.push(format!("raddr/rport/capacity: want {DEST_ADDR}/{DEST_PORT}/{RANGE_SIZE}"));
        }
        let used = v["used"].as_u64();
        if v["threshold"].as_f64().is_some_and(|t| t >= 1.0) && used != Some(ports.len() as u64) {
            d.push(format!("used: want {} (the workload held every port when it failed)", ports.len()));
        }
        if used.is_none_or(|u| u > RANGE_SIZE) {
            d.push(format!("used: want at most {RANGE_SIZE}"));
        }
        if !d.is_empty() {
            more.push(finding(Kind::Mismatch, "pressure", v["ts"].to_string(), format!("{}: {v}", d.join("; "))));
        }
    }

    let report = Report {
        findings: Vec::new(),
        notes: Vec::new(),
        context: format!(
            "port-exhaust: {truth_line}\npressure records:\n{}\nalloc_fail records:\n{}\n",
            pressure.iter().map(|v| format!("  {v}\n")).collect::<String>(),
            fails.iter().map(|v| format!("  {v}\n")).collect::<String>()
        ),
    };
    assert_report(&s, "a 50-port range run dry", report, more);
}

/// `--metrics` on a port something already listens on is a usage error:
/// exit 2 before tracing (nothing on stdout), one line on stderr naming
/// the address.
#[test]
fn metrics_on_a_port_in_use_is_a_usage_error() {
    if !require_root("metrics_on_a_port_in_use_is_a_usage_error") {
        return;
    }
    let holder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let mut args: Vec<OsString> =
        ["watch", "--format", "json", "--duration", "5s", "--metrics", &addr].iter().map(OsString::from).collect();
    args.extend(tracer_extra_args());
    let t0 = Instant::now();
    let out = output_with_timeout(Command::new(tracer_bin()).args(&args), Duration::from_secs(30)).unwrap();
    let took = t0.elapsed();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut bad = Vec::new();
    if out.status.code() != Some(2) {
        bad.push(format!("exit {}, want 2", out.status));
    }
    if lines.len() != 1 {
        bad.push(format!("{} lines on stderr, want 1", lines.len()));
    }
    if !stderr.contains("--metrics") || !stderr.contains(&addr) {
        bad.push(format!("stderr does not name --metrics {addr}"));
    }
    if !stdout.is_empty() {
        bad.push("wrote to stdout (it started tracing?)".into());
    }
    if took >= Duration::from_secs(10) {
        bad.push(format!("took {took:?}"));
    }
    drop(holder);
    assert!(
        bad.is_empty(),
        "watch --metrics {addr} (in use): {}\nstderr:\n{stderr}\nstdout:\n{stdout}",
        bad.join("; ")
    );
}
