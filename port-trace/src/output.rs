//! Writing records for people (aligned text columns) and for programs (JSON
//! Lines, `../shared/design/interface.md`).

use std::io::{self, Write};
use std::net::IpAddr;

use serde::Serialize;

use crate::clock::BootClock;
use crate::model::errno_name;
use crate::record::{PortRecord, RecordBody};

/// Version of the JSON Lines schema written in the header.
pub const SCHEMA_VERSION: u32 = 1;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Text,
    /// JSON Lines for programs.
    Json,
}

/// How one hook of the running backend fared, for the header and `doctor`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HookReport {
    /// The hook, e.g. `sock:inet_sock_set_state`.
    pub hook: String,
    /// The backend it belongs to (`precise`, `portable`).
    pub backend: &'static str,
    /// What it is for.
    pub purpose: &'static str,
    /// `attached`, or why not.
    pub status: String,
}

/// What the header line says.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// The backend in use.
    pub backend: String,
    /// Per-hook outcome.
    pub hooks: Vec<HookReport>,
    /// The host's name.
    pub host: String,
    /// `ip_local_port_range` of the traced namespace.
    pub ephemeral_range: [u16; 2],
    /// The usable range of each namespace known at start (the traced one,
    /// or the tool's own).
    pub ranges: Vec<NetnsRange>,
    /// The traced network namespace inode, `None` for all.
    pub netns: Option<u32>,
    /// CLOCK_BOOTTIME at start.
    #[serde(skip)]
    pub started_boot_ns: u64,
}

/// A namespace's ephemeral port range, as the header names it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NetnsRange {
    /// Network namespace inode.
    pub netns: u32,
    /// `ip_local_port_range` low end.
    pub low: u16,
    /// `ip_local_port_range` high end.
    pub high: u16,
    /// `ip_local_reserved_ports` inside the range.
    pub reserved: Vec<[u16; 2]>,
    /// Ports the kernel may choose: the range minus the reserved ones.
    pub usable: u32,
}

impl NetnsRange {
    /// The header's view of a namespace's range.
    pub fn new(netns: u32, range: &crate::pressure::UsableRange) -> Self {
        Self {
            netns,
            low: range.low,
            high: range.high,
            reserved: range.reserved.iter().map(|r| [*r.start(), *r.end()]).collect(),
            usable: range.size(),
        }
    }
}

/// Totals for the closing summary.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    /// CLOCK_BOOTTIME at the end.
    #[serde(skip)]
    pub ts_ns: u64,
    /// Seconds traced.
    pub duration_s: f64,
    /// Records written, per type.
    pub counts: Counts,
    /// Events the kernel could not deliver (ring buffer full).
    pub lost: u64,
    /// Ring-buffer records that could not be decoded.
    pub decode_errors: u64,
    /// Ports held at the end by sockets whose allocation was seen.
    pub ports_in_use: usize,
    /// Of those, ports held by TIME_WAIT sockets.
    pub time_wait: usize,
    /// Releases of ports whose allocation was not seen.
    pub unpaired_releases: u64,
    /// Events of sockets not followed (accepted children, older sockets).
    pub unknown_socket_events: u64,
    /// Releases inferred from a socket walk (the release event was lost).
    pub reconciled: u64,
    /// Sockets no longer followed because `--max-tracked` was reached.
    pub evicted: u64,
    /// Allocations per second over the run.
    pub allocations_per_s: f64,
    /// Releases per second over the run.
    pub releases_per_s: f64,
    /// Churn, pressure and listeners.
    #[serde(flatten)]
    pub analysis: crate::analysis::AnalysisSummary,
    /// The reader's CPU priority over the run (`--reader-priority low`);
    /// null when it was not lowered.
    pub reader_priority: Option<crate::reader_priority::ReaderPriority>,
}

/// Records written per type.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// `alloc` records.
    pub alloc: u64,
    /// `alloc_fail` records.
    pub alloc_fail: u64,
    /// `state` records.
    pub state: u64,
    /// `release` records.
    pub release: u64,
    /// `lost` records.
    pub lost: u64,
}

impl Counts {
    /// Counts one record.
    pub fn add(&mut self, body: &RecordBody) {
        match body {
            RecordBody::Alloc { .. } => self.alloc += 1,
            RecordBody::AllocFail { .. } => self.alloc_fail += 1,
            RecordBody::State { .. } => self.state += 1,
            RecordBody::Release { .. } => self.release += 1,
        }
    }
}

/// One port record as JSON. Written by [`JsonPort::write_json`]; the serde
/// derive is the reference its unit test compares the bytes with.
#[derive(Serialize)]
struct JsonPort<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts: &'a str,
    proto: &'static str,
    family: &'static str,
    laddr: IpAddr,
    lport: u16,
    raddr: Option<IpAddr>,
    rport: Option<u16>,
    pid: u32,
    comm: &'a str,
    netns: u32,
    cgroup: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_path: Option<&'a str>,
    sock: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    started: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ephemeral: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errno: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    /// `Some(None)` serialises as `null`: releases always carry the field.
    #[serde(skip_serializing_if = "Option::is_none")]
    held_ns: Option<Option<u64>>,
}

impl JsonPort<'_> {
    /// Appends the same bytes as `serde_json::to_writer(buf, self)` (a unit
    /// test holds the two equal) without serde's generic path, which was a
    /// fifth of the tracer's CPU under a connect storm: the keys and the
    /// fixed vocabulary (types, states, reasons, time stamps, addresses) need
    /// no escaping, so only the free text (`comm`, the cgroup path, errno
    /// names) goes through serde_json's escaper.
    fn write_json(&self, buf: &mut Vec<u8>) {
        let mut num = itoa::Buffer::new();
        let raw = |buf: &mut Vec<u8>, key: &str, value: &[u8]| {
            buf.extend_from_slice(b",\"");
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(b"\":");
            buf.extend_from_slice(value);
        };
        let quoted = |buf: &mut Vec<u8>, key: &str, value: &str| {
            buf.extend_from_slice(b",\"");
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(b"\":\"");
            buf.extend_from_slice(value.as_bytes());
            buf.push(b'"');
        };
        let escaped = |buf: &mut Vec<u8>, key: &str, value: &str| {
            buf.extend_from_slice(b",\"");
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(b"\":");
            // Writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *buf, value);
        };
        let addr = |buf: &mut Vec<u8>, key: &str, value: Option<IpAddr>| {
            buf.extend_from_slice(b",\"");
            buf.extend_from_slice(key.as_bytes());
            match value {
                Some(IpAddr::V4(ip)) => {
                    // Display of an Ipv4Addr, without the formatting machinery.
                    buf.extend_from_slice(b"\":\"");
                    let mut octet = itoa::Buffer::new();
                    for (i, byte) in ip.octets().into_iter().enumerate() {
                        if i > 0 {
                            buf.push(b'.');
                        }
                        buf.extend_from_slice(octet.format(byte).as_bytes());
                    }
                    buf.push(b'"');
                }
                Some(ip) => {
                    buf.extend_from_slice(b"\":\"");
                    let _ = write!(buf, "{ip}");
                    buf.push(b'"');
                }
                None => buf.extend_from_slice(b"\":null"),
            }
        };
        buf.extend_from_slice(b"{\"type\":\"");
        buf.extend_from_slice(self.kind.as_bytes());
        buf.push(b'"');
        quoted(buf, "ts", self.ts);
        quoted(buf, "proto", self.proto);
        quoted(buf, "family", self.family);
        addr(buf, "laddr", Some(self.laddr));
        raw(buf, "lport", num.format(self.lport).as_bytes());
        addr(buf, "raddr", self.raddr);
        match self.rport {
            Some(port) => raw(buf, "rport", num.format(port).as_bytes()),
            None => raw(buf, "rport", b"null"),
        }
        raw(buf, "pid", num.format(self.pid).as_bytes());
        escaped(buf, "comm", self.comm);
        raw(buf, "netns", num.format(self.netns).as_bytes());
        raw(buf, "cgroup", num.format(self.cgroup).as_bytes());
        if let Some(path) = self.cgroup_path {
            escaped(buf, "cgroup_path", path);
        }
        raw(buf, "sock", num.format(self.sock).as_bytes());
        if let Some(started) = &self.started {
            quoted(buf, "started", started);
        }
        if let Some(origin) = self.origin {
            quoted(buf, "origin", origin);
        }
        if let Some(ephemeral) = self.ephemeral {
            raw(buf, "ephemeral", if ephemeral { b"true" } else { b"false" });
        }
        if let Some(errno) = &self.errno {
            escaped(buf, "errno", errno);
        }
        if let Some(old) = self.old {
            quoted(buf, "old", old);
        }
        if let Some(new) = self.new {
            quoted(buf, "new", new);
        }
        if let Some(reason) = self.reason {
            quoted(buf, "reason", reason);
        }
        match self.held_ns {
            Some(Some(ns)) => raw(buf, "held_ns", num.format(ns).as_bytes()),
            Some(None) => raw(buf, "held_ns", b"null"),
            None => {}
        }
        buf.push(b'}');
    }
}

/// `addr:port` for a column (`[v6]:port`, `addr:*` without a port, `-`
/// without an address).
pub(crate) fn endpoint(addr: Option<IpAddr>, port: Option<u16>) -> String {
    match (addr, port) {
        (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(IpAddr::V6(a)), None) => format!("[{a}]:*"),
        (Some(a), None) => format!("{a}:*"),
        _ => "-".to_string(),
    }
}

/// A duration for people: `850us`, `12.3ms`, `60.0s`.
pub fn human_duration(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{}us", ns / 1_000)
    } else if ns < 1_000_000_000 {
        format!("{:.1}ms", ns as f64 / 1e6)
    } else {
        format!("{:.1}s", ns as f64 / 1e9)
    }
}

/// Writes records in one format.
pub struct Output {
    writer: Box<dyn Write + Send>,
    format: Format,
    lifecycles: bool,
    clock: BootClock,
    cgroups: crate::system::CgroupPaths,
    /// Event stamps, formatted without allocating.
    stamps: crate::clock::Rfc3339Writer,
    /// One JSON line, built here and written with one call: the writer is
    /// a trait object, and serde_json would call it once per token.
    line: Vec<u8>,
}

impl Output {
    /// An output to `writer`. With `lifecycles`, only completed lifecycles
    /// (releases) are written, one line each.
    pub fn new(writer: Box<dyn Write + Send>, format: Format, lifecycles: bool, clock: BootClock) -> Self {
        Self {
            writer,
            format,
            lifecycles,
            clock,
            cgroups: Default::default(),
            stamps: crate::clock::Rfc3339Writer::new(clock),
            line: Vec::with_capacity(1024),
        }
    }

    /// The run's header: a JSON object, or the column titles.
    pub fn header(&mut self, header: &Header) -> io::Result<()> {
        match self.format {
            Format::Json => {
                #[derive(Serialize)]
                struct Line<'a> {
                    #[serde(rename = "type")]
                    kind: &'static str,
                    schema: u32,
                    tool: &'static str,
                    version: &'static str,
                    #[serde(flatten)]
                    header: &'a Header,
                    started: String,
                }
                let line = Line {
                    kind: "header",
                    schema: SCHEMA_VERSION,
                    tool: "port-trace",
                    version: env!("CARGO_PKG_VERSION"),
                    header,
                    started: self.clock.rfc3339(header.started_boot_ns),
                };
                serde_json::to_writer(&mut self.writer, &line)?;
                self.writer.write_all(b"\n")
            }
            Format::Text => self.columns(),
        }
    }

    /// The column titles of the text format (nothing in JSON).
    pub fn columns(&mut self) -> io::Result<()> {
        match self.format {
            Format::Json => Ok(()),
            Format::Text => {
                if self.lifecycles {
                    writeln!(
                        self.writer,
                        "{:<12} {:<12} {:<5} {:<7} {:<15} {:<21} {:<21} {:<9} {:<14} HELD",
                        "START", "END", "PROTO", "PID", "COMM", "LADDR:LPORT", "RADDR:RPORT", "ORIGIN", "REASON"
                    )
                } else {
                    writeln!(
                        self.writer,
                        "{:<12} {:<10} {:<5} {:<7} {:<15} {:<21} {:<21} DETAIL",
                        "TIME", "EVENT", "PROTO", "PID", "COMM", "LADDR:LPORT", "RADDR:RPORT"
                    )
                }
            }
        }
    }

    fn clock_time(&self, boot_ns: u64) -> String {
        // HH:MM:SS.mmm of the RFC 3339 UTC stamp.
        self.clock.rfc3339(boot_ns)[11..23].to_string()
    }

    /// Writes one record (with `lifecycles`, only releases).
    pub fn record(&mut self, rec: &PortRecord) -> io::Result<()> {
        if self.lifecycles && !matches!(rec.body, RecordBody::Release { .. }) {
            return Ok(());
        }
        match self.format {
            Format::Json => self.json_record(rec),
            Format::Text => self.text_record(rec),
        }
    }

    fn json_record(&mut self, rec: &PortRecord) -> io::Result<()> {
        let p = &rec.port;
        let Output { writer, lifecycles, clock, cgroups, stamps, line: buf, .. } = self;
        let mut line = JsonPort {
            kind: rec.body.type_name(),
            ts: stamps.format(rec.ts_ns),
            proto: p.proto.name(),
            family: p.family.name(),
            laddr: p.laddr,
            lport: p.lport,
            raddr: p.raddr,
            rport: p.rport,
            pid: p.pid,
            comm: &p.comm,
            netns: p.netns,
            cgroup: p.cgroup,
            cgroup_path: cgroups.path(p.cgroup),
            sock: p.sock,
            started: None,
            origin: None,
            ephemeral: None,
            errno: None,
            old: None,
            new: None,
            reason: None,
            held_ns: None,
        };
        match &rec.body {
            RecordBody::Alloc { origin, ephemeral } => {
                line.origin = Some(origin.name());
                line.ephemeral = Some(*ephemeral);
            }
            RecordBody::AllocFail { errno, origin } => {
                line.errno = Some(errno_name(*errno));
                line.origin = Some(origin.name());
            }
            RecordBody::State { old, new } => {
                line.old = Some(old.name());
                line.new = Some(new.name());
            }
            RecordBody::Release { reason, held_ns, origin, alloc_ts_ns } => {
                line.reason = Some(reason.name());
                line.held_ns = Some(*held_ns);
                if *lifecycles {
                    line.kind = "lifecycle";
                    line.origin = origin.map(|o| o.name());
                    line.ephemeral = p.ephemeral;
                    line.started = alloc_ts_ns.map(|ts| clock.rfc3339(ts));
                }
            }
        }
        buf.clear();
        line.write_json(buf);
        buf.push(b'\n');
        writer.write_all(buf)
    }

    fn text_record(&mut self, rec: &PortRecord) -> io::Result<()> {
        let p = &rec.port;
        let local = endpoint(Some(p.laddr), Some(p.lport));
        let remote = endpoint(p.raddr, p.rport);
        if let (true, RecordBody::Release { reason, held_ns, origin, alloc_ts_ns }) = (self.lifecycles, &rec.body) {
            let start = alloc_ts_ns.map(|ts| self.clock_time(ts)).unwrap_or_else(|| "?".into());
            let end = self.clock_time(rec.ts_ns);
            return writeln!(
                self.writer,
                "{:<12} {:<12} {:<5} {:<7} {:<15} {:<21} {:<21} {:<9} {:<14} {}",
                start,
                end,
                p.proto.name(),
                p.pid,
                p.comm,
                local,
                remote,
                origin.map(|o| o.name()).unwrap_or("?"),
                reason.name(),
                held_ns.map(human_duration).unwrap_or_else(|| "?".into())
            );
        }
        let detail = match &rec.body {
            RecordBody::Alloc { origin, ephemeral } => {
                format!("{}{}", origin.name(), if *ephemeral { " ephemeral" } else { "" })
            }
            RecordBody::AllocFail { errno, origin } => format!("{} {}", origin.name(), errno_name(*errno)),
            RecordBody::State { old, new } => format!("{old} -> {new}"),
            RecordBody::Release { reason, held_ns, .. } => {
                format!("{} held {}", reason.name(), held_ns.map(human_duration).unwrap_or_else(|| "?".into()))
            }
        };
        writeln!(
            self.writer,
            "{:<12} {:<10} {:<5} {:<7} {:<15} {:<21} {:<21} {}",
            self.clock_time(rec.ts_ns),
            rec.body.type_name(),
            p.proto.name(),
            p.pid,
            p.comm,
            local,
            remote,
            detail
        )
    }

    /// A free line of text (nothing in JSON).
    pub fn note(&mut self, text: &str) -> io::Result<()> {
        match self.format {
            Format::Json => Ok(()),
            Format::Text => writeln!(self.writer, "{text}"),
        }
    }

    /// Writes a pressure warning or a notice.
    pub fn derived(&mut self, derived: &crate::analysis::Derived) -> io::Result<()> {
        use crate::analysis::Derived;
        match (derived, self.format) {
            (Derived::Pressure(p), Format::Json) => {
                #[derive(Serialize)]
                struct Line {
                    #[serde(rename = "type")]
                    kind: &'static str,
                    ts: String,
                    proto: &'static str,
                    netns: u32,
                    laddr: IpAddr,
                    raddr: Option<IpAddr>,
                    rport: Option<u16>,
                    used: u32,
                    capacity: u32,
                    ratio: f64,
                    threshold: f64,
                    rising: bool,
                    exhaust_in_s: Option<f64>,
                }
                let line = Line {
                    kind: "pressure",
                    ts: self.clock.rfc3339(p.ts_ns),
                    proto: p.proto.name(),
                    netns: p.netns,
                    laddr: p.laddr,
                    raddr: p.raddr,
                    rport: p.rport,
                    used: p.used,
                    capacity: p.capacity,
                    ratio: (p.ratio * 1e4).round() / 1e4,
                    threshold: p.threshold,
                    rising: p.rising,
                    exhaust_in_s: p.exhaust_in_s.map(|s| (s * 1e3).round() / 1e3),
                };
                serde_json::to_writer(&mut self.writer, &line)?;
                self.writer.write_all(b"\n")
            }
            (Derived::Pressure(p), Format::Text) => {
                let pool = match (p.raddr, p.rport) {
                    (Some(_), Some(_)) => format!("to {}", endpoint(p.raddr, p.rport)),
                    _ => format!("on {}", p.laddr),
                };
                let forecast = match (p.rising, p.exhaust_in_s) {
                    (false, _) => "recovered".to_string(),
                    (true, _) if p.threshold >= 1.0 => "EXHAUSTED: the kernel found no free port".to_string(),
                    (true, Some(s)) => format!("full in {s:.1}s at the current rate"),
                    (true, None) => "not filling now".to_string(),
                };
                writeln!(
                    self.writer,
                    "{:<12} {:<10} {:<5} ports {pool}: {}/{} in use ({:.0}%), {forecast}",
                    self.clock_time(p.ts_ns),
                    "pressure",
                    p.proto.name(),
                    p.used,
                    p.capacity,
                    p.ratio * 100.0
                )
            }
            (Derived::Notice(n), Format::Json) => {
                serde_json::to_writer(&mut self.writer, &crate::notices::notice_json(n, &self.clock))?;
                self.writer.write_all(b"\n")
            }
            (Derived::Notice(n), Format::Text) => {
                writeln!(self.writer, "{}", crate::notices::notice_text(n, &self.clock))
            }
        }
    }

    /// Reports events the kernel could not deliver.
    pub fn lost(&mut self, ts_ns: u64, count: u64) -> io::Result<()> {
        match self.format {
            Format::Json => {
                #[derive(Serialize)]
                struct Line {
                    #[serde(rename = "type")]
                    kind: &'static str,
                    ts: String,
                    count: u64,
                }
                serde_json::to_writer(&mut self.writer, &Line { kind: "lost", ts: self.clock.rfc3339(ts_ns), count })?;
                self.writer.write_all(b"\n")
            }
            Format::Text => {
                writeln!(
                    self.writer,
                    "{:<12} {:<10} {count} events lost (ring buffer full)",
                    self.clock_time(ts_ns),
                    "lost"
                )
            }
        }
    }

    /// The closing summary: a JSON record, or for text a few lines that the
    /// caller sends to stderr.
    pub fn summary(&mut self, ts_ns: u64, summary: &Summary) -> io::Result<()> {
        if self.format == Format::Json {
            #[derive(Serialize)]
            struct Line<'a> {
                #[serde(rename = "type")]
                kind: &'static str,
                ts: String,
                #[serde(flatten)]
                summary: &'a Summary,
            }
            serde_json::to_writer(&mut self.writer, &Line { kind: "summary", ts: self.clock.rfc3339(ts_ns), summary })?;
            self.writer.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Flushes buffered lines.
    pub fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// The summary in words, for stderr.
pub fn summary_text(s: &Summary) -> String {
    let mut text = format!(
        "port-trace: {:.1}s traced: {} alloc, {} alloc_fail, {} state, {} release records; \
         {} ports held at exit ({} in TIME_WAIT); {:.1} allocations/s, {:.1} releases/s",
        s.duration_s,
        s.counts.alloc,
        s.counts.alloc_fail,
        s.counts.state,
        s.counts.release,
        s.ports_in_use,
        s.time_wait,
        s.allocations_per_s,
        s.releases_per_s
    );
    if s.lost > 0 {
        text.push_str(&format!("; {} EVENTS LOST (ring buffer full)", s.lost));
    }
    if s.decode_errors > 0 {
        text.push_str(&format!("; {} undecodable records", s.decode_errors));
    }
    if s.reconciled > 0 {
        text.push_str(&format!("; {} releases inferred from socket walks", s.reconciled));
    }
    if s.evicted > 0 {
        text.push_str(&format!("; {} sockets dropped from tracking (--max-tracked)", s.evicted));
    }
    if let Some(p) = s.reader_priority.as_ref().filter(|p| p.raised > 0) {
        text.push_str(&format!(
            "; the backlog raised the reader from nice {} to {} {} times ({:.1}s in all)",
            p.low_nice, p.normal_nice, p.raised, p.raised_s
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::model::{Family, Origin, Proto, ReleaseReason, TcpState};
    use crate::record::PortRef;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn port() -> PortRef {
        PortRef {
            sock: 99,
            netns: 4026531840,
            proto: Proto::Tcp,
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            lport: 54012,
            raddr: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            rport: Some(8080),
            pid: 4242,
            comm: "curl".into(),
            cgroup: 1,
            ephemeral: Some(true),
        }
    }

    fn render(format: Format, lifecycles: bool, recs: &[PortRecord]) -> String {
        let buf = Buffer::default();
        let clock = BootClock::with_offset_ns(1_795_000_000_000_000_000);
        let mut out = Output::new(Box::new(buf.clone()), format, lifecycles, clock);
        for r in recs {
            out.record(r).unwrap();
        }
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn release() -> PortRecord {
        PortRecord {
            ts_ns: 60_000_000_000,
            port: port(),
            body: RecordBody::Release {
                reason: ReleaseReason::TimeWaitEnd,
                held_ns: Some(60_000_000_000),
                origin: Some(Origin::Connect),
                alloc_ts_ns: Some(0),
            },
        }
    }

    /// The hand-written JSON writer produces exactly serde_json's bytes,
    /// for every combination of optional fields and for free text that
    /// needs escaping.
    #[test]
    fn json_writer_matches_serde_json() {
        use std::net::Ipv6Addr;
        let comms = ["curl", "a\"b\\c", "tab\tnl\n\u{1}", "été", ""];
        let paths = [None, Some("/system.slice/x.service"), Some("/we\"ird\\")];
        let addrs = [
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(255, 199, 0, 99)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped()),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x42)),
        ];
        let mut cases = 0;
        for (i, comm) in comms.iter().enumerate() {
            for path in paths {
                for (j, laddr) in addrs.iter().enumerate() {
                    for variant in 0..4 {
                        let line = JsonPort {
                            kind: ["alloc", "alloc_fail", "state", "release"][variant],
                            ts: "2026-11-18T11:06:40.000000001Z",
                            proto: if j % 2 == 0 { "tcp" } else { "udp" },
                            family: if laddr.is_ipv4() { "ipv4" } else { "ipv6" },
                            laddr: *laddr,
                            lport: [0, 1, 54012, u16::MAX][(i + j) % 4],
                            raddr: (variant % 2 == 1).then_some(addrs[(j + 1) % addrs.len()]),
                            rport: (variant % 2 == 1).then_some(8080),
                            pid: [0, 4242, u32::MAX][variant % 3],
                            comm,
                            netns: 4026531840,
                            cgroup: [0, 1, u64::MAX][j % 3],
                            cgroup_path: path,
                            sock: 1 + i as u64,
                            started: (variant == 3).then(|| "2026-11-18T11:05:40.5Z".to_string()),
                            origin: (variant != 2).then_some("connect"),
                            ephemeral: [None, Some(true), Some(false)][(variant + i) % 3],
                            errno: (variant == 1).then(|| errno_name(99)),
                            old: (variant == 2).then_some("SYN_SENT"),
                            new: (variant == 2).then_some("ESTABLISHED"),
                            reason: (variant == 3).then_some("time_wait_end"),
                            held_ns: [None, None, None, Some(None), Some(Some(60_000_000_000))][variant + (i % 2)],
                        };
                        let mut ours = Vec::new();
                        line.write_json(&mut ours);
                        let serde = serde_json::to_vec(&line).unwrap();
                        assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&serde));
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 5 * 3 * 5 * 4);
    }

    #[test]
    fn json_alloc_has_the_contract_fields() {
        let rec =
            PortRecord { ts_ns: 1, port: port(), body: RecordBody::Alloc { origin: Origin::Connect, ephemeral: true } };
        let text = render(Format::Json, false, &[rec]);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["type"], "alloc");
        assert_eq!(v["ts"], "2026-11-18T11:06:40.000000001Z");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["laddr"], "127.0.0.1");
        assert_eq!(v["lport"], 54012);
        assert_eq!(v["raddr"], "127.0.0.1");
        assert_eq!(v["rport"], 8080);
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["netns"], 4026531840u32);
        assert_eq!(v["sock"], 99);
        assert_eq!(v["origin"], "connect");
        assert_eq!(v["ephemeral"], true);
        assert!(v.get("held_ns").is_none());
    }

    #[test]
    fn json_release_always_has_held_ns_and_unconnected_is_null() {
        let mut rec = release();
        rec.port.raddr = None;
        rec.port.rport = None;
        rec.body = RecordBody::Release { reason: ReleaseReason::Close, held_ns: None, origin: None, alloc_ts_ns: None };
        let v: serde_json::Value = serde_json::from_str(render(Format::Json, false, &[rec]).trim()).unwrap();
        assert_eq!(v["reason"], "close");
        assert!(v["held_ns"].is_null() && v.get("held_ns").is_some());
        assert!(v["raddr"].is_null() && v["rport"].is_null());
    }

    #[test]
    fn text_lines_are_aligned_columns() {
        let state = PortRecord {
            ts_ns: 123_000_000,
            port: port(),
            body: RecordBody::State { old: TcpState::SynSent, new: TcpState::Established },
        };
        let text = render(Format::Text, false, &[state, release()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "11:06:40.123 state      tcp   4242    curl            127.0.0.1:54012       127.0.0.1:8080        SYN_SENT -> ESTABLISHED"
        );
        assert!(lines[1].ends_with("time_wait_end held 60.0s"), "{}", lines[1]);
    }

    #[test]
    fn lifecycles_mode_writes_only_releases() {
        let alloc =
            PortRecord { ts_ns: 0, port: port(), body: RecordBody::Alloc { origin: Origin::Connect, ephemeral: true } };
        let json = render(Format::Json, true, &[alloc.clone(), release()]);
        assert_eq!(json.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["type"], "lifecycle");
        assert_eq!(v["started"], "2026-11-18T11:06:40.000000000Z");
        assert_eq!(v["origin"], "connect");
        let text = render(Format::Text, true, &[alloc, release()]);
        assert!(text.contains("connect   time_wait_end  60.0s"), "{text}");
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        assert_eq!(endpoint(Some("::1".parse().unwrap()), Some(80)), "[::1]:80");
        assert_eq!(endpoint(None, None), "-");
        assert_eq!(human_duration(850_000), "850us");
        assert_eq!(human_duration(12_300_000), "12.3ms");
    }
}
