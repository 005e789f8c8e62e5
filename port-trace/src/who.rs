//! `port-trace who PORT`: who holds a port now (`--follow`: and next;
//! `--history FILE`: and before). The live part (the socket walk, the
//! tracing for `--follow`) is the caller's; this module has the options, the
//! renderers and the history of a recording.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;
use serde_json::{json, Map, Value};

use crate::cli::{BackendArg, PortList};
use crate::clock::BootClock;
use crate::filter::parse_port_ranges;
use crate::model::{Proto, TcpState};
use crate::notices::port_fields_json;
use crate::output::{endpoint, human_duration, Format};
use crate::owner::ProcessDetails;
use crate::record::{PortRecord, PortRef, RecordBody};
use crate::report::reader::{self, Line};
use crate::UsageError;

/// `who` options.
#[derive(Clone, Debug, Args)]
pub struct WhoArgs {
    /// The ports to look up, e.g. 8080 or 80,443 or 8000-8100.
    #[arg(value_name = "PORT[,PORT...]", value_parser = crate::cli::port_list, required_unless_present = "history")]
    pub ports: Vec<PortList>,
    /// Only this network namespace: /run/netns/NAME, /proc/PID/ns/net, or an inode.
    #[arg(long, value_name = "PATH|INODE")]
    pub netns: Option<String>,
    /// Then keep watching the ports and print every later event on them.
    #[arg(long)]
    pub follow: bool,
    /// Follow for this long (30s, 5m, 1h); implies --follow.
    #[arg(short = 'd', long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
    pub duration: Option<Duration>,
    /// Read these recordings (from `port-trace record` or `watch -f json`)
    /// and list every socket that held the ports, with when, instead of
    /// looking at the live system.
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["follow", "duration"])]
    pub history: Vec<PathBuf>,
    /// Output format (default: text on a terminal, JSON Lines otherwise).
    #[arg(short = 'f', long, value_enum)]
    pub format: Option<Format>,
    /// Which hooks to use for --follow.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
}

impl WhoArgs {
    /// `--history` values that name no file but read as port lists: the
    /// ports of `who --history rec.jsonl 8080`, where `--history` took
    /// every value after it.
    fn trailing_ports(&self) -> usize {
        if !self.ports.is_empty() {
            return 0;
        }
        self.history
            .iter()
            .rev()
            .take_while(|path| !path.exists() && path.to_str().is_some_and(|s| parse_port_ranges(s).is_ok()))
            .count()
    }

    /// The ports asked about (at least one).
    pub fn port_ranges(&self) -> Result<Vec<RangeInclusive<u16>>, UsageError> {
        let mut ranges: Vec<RangeInclusive<u16>> = self.ports.iter().flat_map(|list| list.0.iter().cloned()).collect();
        let trailing = self.trailing_ports();
        for path in &self.history[self.history.len() - trailing..] {
            if let Some(list) = path.to_str().and_then(|s| parse_port_ranges(s).ok()) {
                ranges.extend(list);
            }
        }
        if ranges.is_empty() {
            return Err(UsageError("who needs a port: port-trace who PORT[,PORT...]".into()));
        }
        Ok(ranges)
    }

    /// The recordings to read (`--history`), without trailing port lists.
    pub fn history_files(&self) -> Vec<PathBuf> {
        self.history[..self.history.len() - self.trailing_ports()].to_vec()
    }

    /// Whether to keep watching after the snapshot (`--follow` or `-d`).
    pub fn follows(&self) -> bool {
        self.follow || self.duration.is_some()
    }
}

/// The exit code of `who`: 0 when someone holds (or held) the ports, 1 when
/// nobody does, like `grep`.
pub fn who_exit_code(found: bool) -> u8 {
    if found {
        0
    } else {
        1
    }
}

/// Which sockets `who` is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WhoScope {
    /// Local ports.
    pub ports: Vec<RangeInclusive<u16>>,
    /// Only this network namespace.
    pub netns: Option<u32>,
}

impl WhoScope {
    /// Whether the socket is one `who` is about.
    pub fn matches(&self, port: &PortRef) -> bool {
        self.ports.iter().any(|r| r.contains(&port.lport)) && self.netns.is_none_or(|ns| ns == port.netns)
    }

    /// Whether a record of `--follow` concerns the ports.
    pub fn matches_record(&self, rec: &PortRecord) -> bool {
        self.matches(&rec.port)
    }

    fn ports_text(&self) -> String {
        let list: Vec<String> = self
            .ports
            .iter()
            .map(|r| if r.start() == r.end() { r.start().to_string() } else { format!("{}-{}", r.start(), r.end()) })
            .collect();
        let plural = self.ports.len() > 1 || self.ports.iter().any(|r| r.start() != r.end());
        format!("port{} {}", if plural { "s" } else { "" }, list.join(","))
    }
}

/// A socket holding one of the ports now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The socket, its addresses and owner.
    pub port: PortRef,
    /// TCP state (`None` for UDP, or when unknown).
    pub state: Option<TcpState>,
    /// CLOCK_BOOTTIME when the socket got the port, when known.
    pub since_ns: Option<u64>,
    /// The owning process, when it could be read.
    pub details: Option<ProcessDetails>,
}

impl Holder {
    /// The holder an `alloc` record of `--follow` reports (`None` for other
    /// records).
    pub fn from_record(rec: &PortRecord, details: Option<ProcessDetails>) -> Option<Self> {
        let RecordBody::Alloc { .. } = rec.body else { return None };
        Some(Self { port: rec.port.clone(), state: None, since_ns: Some(rec.ts_ns), details })
    }

    /// The state as `ss` names it: the TCP state, or for UDP `UNCONN` and
    /// `ESTAB` (connected).
    pub fn state_name(&self) -> &'static str {
        match (self.port.proto, self.state) {
            (Proto::Tcp, Some(state)) => state.name(),
            (Proto::Tcp, None) => "?",
            (Proto::Udp, _) if self.port.raddr.is_some() => "ESTAB",
            (Proto::Udp, _) => "UNCONN",
        }
    }
}

/// A duration for a person, coarse: `42s`, `12m30s`, `2h13m`, `3d2h`.
pub fn human_age(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Replaces control characters (a command line can hold escape sequences
/// that would drive the terminal) with their escapes.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Lays out rows as columns separated by two spaces; the last column is not
/// padded.
fn table(rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
                }
            }
            line
        })
        .collect()
}

fn holder_order(h: &Holder) -> (u16, Proto, bool, u32, u64) {
    (h.port.lport, h.port.proto, h.state != Some(TcpState::Listen), h.port.pid, h.port.sock)
}

/// The holders as a table for a person: one row each (PROTO FAMILY STATE
/// LOCAL REMOTE PID COMM USER SINCE CGROUP, with NETNS when they span
/// several namespaces), the command line under it; listeners first within a
/// port. `now_ns` is CLOCK_BOOTTIME now, for the ages. Empty for no holders
/// (see [`nobody_text`]).
pub fn render_holders_text(holders: &[Holder], clock: &BootClock, now_ns: u64) -> String {
    if holders.is_empty() {
        return String::new();
    }
    let mut sorted: Vec<&Holder> = holders.iter().collect();
    sorted.sort_by_key(|h| holder_order(h));
    let netns_column = sorted.iter().any(|h| h.port.netns != sorted[0].port.netns);
    let mut titles: Vec<String> =
        ["PROTO", "FAMILY", "STATE", "LOCAL", "REMOTE", "PID", "COMM", "USER", "SINCE", "CGROUP"]
            .map(String::from)
            .into();
    if netns_column {
        titles.insert(0, "NETNS".into());
    }
    let mut rows = vec![titles];
    for h in &sorted {
        let p = &h.port;
        let d = h.details.as_ref();
        let mut row = vec![
            p.proto.name().to_string(),
            p.family.name().to_string(),
            h.state_name().to_string(),
            endpoint(Some(p.laddr), Some(p.lport)),
            endpoint(p.raddr, p.rport),
            if p.pid == 0 { "?".into() } else { p.pid.to_string() },
            printable(d.map_or(&p.comm, |d| &d.comm)),
            d.map_or("?".into(), |d| d.user.clone().unwrap_or_else(|| d.uid.to_string())),
            h.since_ns.map_or("?".into(), |since| format!("{} ago", human_age(now_ns.saturating_sub(since)))),
            d.and_then(|d| d.cgroup_path.as_deref()).map_or("-".into(), printable),
        ];
        if netns_column {
            row.insert(0, p.netns.to_string());
        }
        rows.push(row);
    }
    let lines = table(&rows);
    let mut text = format!("{}\n", lines[0]);
    let now_wall = clock.wall(now_ns);
    for (line, h) in lines[1..].iter().zip(&sorted) {
        text.push_str(line);
        text.push('\n');
        text.push_str("    ");
        match &h.details {
            Some(d) => {
                let command = if d.cmdline.is_empty() { format!("[{}]", d.comm) } else { d.cmdline.clone() };
                text.push_str(&format!("command: {}", printable(&command)));
                if let Some(age) = d.start_time.and_then(|t| now_wall.duration_since(t).ok()) {
                    text.push_str(&format!("  (process up {})", human_age(age.as_nanos() as u64)));
                }
            }
            None if h.port.pid == 0 => text.push_str("(owner unknown: no process in reach has the socket open)"),
            None => text.push_str("(process details unavailable: it has exited, or /proc hides it)"),
        }
        text.push('\n');
    }
    text
}

/// The line for nobody holding the ports.
pub fn nobody_text(scope: &WhoScope) -> String {
    let netns = scope.netns.map(|ns| format!(" in network namespace {ns}")).unwrap_or_default();
    format!("no socket holds {}{netns}\n", scope.ports_text())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// One holder as a JSON object: `type` `holder`, `ts` (now), the port fields
/// of records (`proto`, `family`, `laddr`, `lport`, `raddr`, `rport`, `pid`,
/// `comm`, `netns`, `cgroup`, `sock`), `state`, `since` (null when unknown),
/// and from `/proc` (null when unavailable) `cmdline`, `uid`, `user`,
/// `cgroup_path`, `process_started`.
pub fn holder_json(h: &Holder, clock: &BootClock, now_ns: u64) -> Value {
    let d = h.details.as_ref();
    let mut map = Map::new();
    map.insert("type".into(), "holder".into());
    map.insert("ts".into(), clock.rfc3339(now_ns).into());
    map.extend(port_fields_json(&h.port));
    let state = (h.port.proto == Proto::Udp || h.state.is_some()).then(|| h.state_name());
    map.insert("state".into(), json!(state));
    map.insert("since".into(), json!(h.since_ns.map(|ns| clock.rfc3339(ns))));
    map.insert("cmdline".into(), json!(d.map(|d| &d.cmdline)));
    map.insert("uid".into(), json!(d.map(|d| d.uid)));
    map.insert("user".into(), json!(d.and_then(|d| d.user.as_ref())));
    map.insert("cgroup_path".into(), json!(d.and_then(|d| d.cgroup_path.as_ref())));
    map.insert("process_started".into(), json!(d.and_then(|d| d.start_time).map(rfc3339)));
    Value::Object(map)
}

/// One socket's hold on a port, from a recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    /// The socket, its addresses and owner.
    pub port: PortRef,
    /// How it got the port (`connect`, `bind`, ..., `snapshot`), when seen.
    pub origin: Option<String>,
    /// When it got the port; `None` when that was before the recording.
    pub start: Option<SystemTime>,
    /// When the port went back; `None` when still held at the recording's
    /// end.
    pub end: Option<SystemTime>,
    /// Why it went back (`close`, `time_wait_end`, ...).
    pub end_reason: Option<String>,
    /// The last TCP state recorded.
    pub last_state: Option<String>,
    /// How long it was held, from the release record when it says.
    pub held_ns: Option<u64>,
}

impl Holding {
    /// Nanoseconds held: the recorded figure, else end − start.
    pub fn held(&self) -> Option<u64> {
        self.held_ns.or_else(|| {
            let (start, end) = (self.start?, self.end?);
            end.duration_since(start).ok().map(|d| d.as_nanos() as u64)
        })
    }
}

/// Every holder of the ports over a recording.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// In order of start (held since before the recording first).
    pub holdings: Vec<Holding>,
    /// Events the kernel lost while recording (holders may be missing).
    pub lost: u64,
    /// The recording's first and last time stamps.
    pub span: Option<(SystemTime, SystemTime)>,
}

/// Nanoseconds since the Unix epoch (as recordings are read) as a time.
fn system_time(ns: i64) -> Option<SystemTime> {
    u64::try_from(ns).ok().map(|ns| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
}

/// The socket and owner of a recorded event, as the live side names them.
fn port_ref(p: &reader::Port, ephemeral: Option<bool>) -> PortRef {
    PortRef {
        sock: p.sock,
        netns: p.netns,
        proto: p.proto,
        family: p.family,
        laddr: p.laddr,
        lport: p.lport,
        raddr: p.raddr,
        rport: p.rport,
        pid: p.pid,
        comm: p.comm.as_ref().into(),
        cgroup: p.cgroup,
        ephemeral,
    }
}

fn learn_remote(port: &mut PortRef, seen: &PortRef) {
    if seen.raddr.is_some() {
        port.raddr = seen.raddr;
        port.rport = seen.rport;
    }
}

/// Lists every socket that held the ports over a recording (its lines in
/// file order, as [`reader::read_recordings`] gives them; several files may
/// follow one another). Records of one socket are joined by `netns` +
/// `sock`. Also reads `lifecycle` records (`watch --lifecycles -f json`).
pub fn history(lines: &[Line], scope: &WhoScope) -> History {
    let mut result = History::default();
    let mut open: HashMap<(u32, u64), Holding> = HashMap::new();
    let mut done: Vec<Holding> = Vec::new();
    for line in lines {
        let ts = line.ts_ns().and_then(system_time);
        if let Some(ts) = ts {
            result.span = Some(match result.span {
                None => (ts, ts),
                Some((first, last)) => (first.min(ts), last.max(ts)),
            });
        }
        let (event, ephemeral) = match line {
            Line::Lost { count, .. } => {
                result.lost += count;
                continue;
            }
            Line::Alloc { event, ephemeral, .. } => (event, Some(*ephemeral)),
            Line::Lifecycle { event, ephemeral, .. } => (event, *ephemeral),
            Line::State { event, .. } | Line::Release { event, .. } => (event, None),
            _ => continue,
        };
        let Some(ts) = ts else { continue };
        let port = port_ref(&event.port, ephemeral);
        if !scope.matches(&port) {
            continue;
        }
        let key = (port.netns, port.sock);
        let fresh = |port: PortRef, origin: Option<String>, start: Option<SystemTime>| Holding {
            port,
            origin,
            start,
            end: None,
            end_reason: None,
            last_state: None,
            held_ns: None,
        };
        match line {
            Line::Alloc { origin, .. } => {
                if let Some(held) = open.get_mut(&key) {
                    if &**origin == "snapshot" {
                        // A later recording's start-up walk found it again.
                        learn_remote(&mut held.port, &port);
                        continue;
                    }
                    // A new allocation of the socket: the old one ended
                    // by now, unseen.
                    if let Some(mut old) = open.remove(&key) {
                        old.end = Some(ts);
                        done.push(old);
                    }
                }
                open.insert(key, fresh(port, Some(origin.to_string()), Some(ts)));
            }
            Line::State { new, .. } => {
                let holding = open.entry(key).or_insert_with(|| fresh(port.clone(), None, None));
                learn_remote(&mut holding.port, &port);
                holding.last_state = Some(new.to_string());
            }
            Line::Release { reason, held_ns, .. } | Line::Lifecycle { reason, held_ns, .. } => {
                let (origin, started) = match line {
                    Line::Lifecycle { origin, started_ns, .. } => {
                        (origin.as_ref().map(|o| o.to_string()), started_ns.and_then(system_time))
                    }
                    _ => (None, None),
                };
                let start = started.or_else(|| held_ns.and_then(|ns| ts.checked_sub(Duration::from_nanos(ns))));
                let mut holding = open.remove(&key).unwrap_or_else(|| fresh(port.clone(), origin, start));
                learn_remote(&mut holding.port, &port);
                holding.end = Some(ts);
                holding.end_reason = Some(reason.to_string());
                holding.held_ns = *held_ns;
                done.push(holding);
            }
            _ => {}
        }
    }
    done.extend(open.into_values());
    done.sort_by(|a, b| {
        (a.start, a.end.is_none(), a.end, a.port.sock).cmp(&(b.start, b.end.is_none(), b.end, b.port.sock))
    });
    result.holdings = done;
    result
}

fn text_time(t: Option<SystemTime>, missing: &str) -> String {
    match t {
        // 2026-11-26 06:40:00.123 (UTC).
        Some(t) => humantime::format_rfc3339_millis(t).to_string().replace('T', " ").trim_end_matches('Z').to_string(),
        None => missing.to_string(),
    }
}

/// The history as a table for a person (START END HELD PROTO STATE LOCAL
/// REMOTE PID COMM HOW; times in UTC), or a line saying nobody held the
/// ports.
pub fn render_history_text(history: &History, scope: &WhoScope) -> String {
    if history.holdings.is_empty() {
        return format!("no socket held {} in the recording\n", scope.ports_text());
    }
    let mut rows =
        vec![["START (UTC)", "END (UTC)", "HELD", "PROTO", "STATE", "LOCAL", "REMOTE", "PID", "COMM", "HOW"]
            .map(String::from)
            .to_vec()];
    let recording_end = history.span.map(|(_, last)| last);
    for h in &history.holdings {
        let p = &h.port;
        let held = match (h.held(), h.start, recording_end) {
            (Some(ns), _, _) => human_duration(ns),
            (None, Some(start), Some(last)) if h.end.is_none() => {
                format!(">{}", human_duration(last.duration_since(start).unwrap_or_default().as_nanos() as u64))
            }
            _ => "?".into(),
        };
        let how = format!(
            "{} -> {}",
            h.origin.as_deref().unwrap_or("?"),
            h.end_reason.as_deref().unwrap_or(if h.end.is_none() { "held" } else { "?" })
        );
        rows.push(vec![
            text_time(h.start, "before recording"),
            text_time(h.end, "still held"),
            held,
            p.proto.name().into(),
            h.last_state.clone().unwrap_or_else(|| "-".into()),
            endpoint(Some(p.laddr), Some(p.lport)),
            endpoint(p.raddr, p.rport),
            p.pid.to_string(),
            printable(&p.comm),
            how,
        ]);
    }
    let mut text = String::new();
    for line in table(&rows) {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// Warnings about a history's completeness, one line each, for stderr.
pub fn history_warnings(history: &History) -> Vec<String> {
    let mut warnings = Vec::new();
    if history.lost > 0 {
        warnings.push(format!(
            "port-trace: {} events were lost while recording: some holders may be missing",
            history.lost
        ));
    }
    warnings
}

/// One holding as a JSON object: `type` `holding`, the port fields of
/// records, `origin`, `start` and `end` (RFC 3339; null before the recording
/// / still held at its end), `held_ns`, `end_reason`, `state` (the last TCP
/// state recorded).
pub fn holding_json(h: &Holding) -> Value {
    let mut map = Map::new();
    map.insert("type".into(), "holding".into());
    map.extend(port_fields_json(&h.port));
    map.insert("origin".into(), json!(h.origin));
    map.insert("start".into(), json!(h.start.map(rfc3339)));
    map.insert("end".into(), json!(h.end.map(rfc3339)));
    map.insert("held_ns".into(), json!(h.held()));
    map.insert("end_reason".into(), json!(h.end_reason));
    map.insert("state".into(), json!(h.last_state));
    Value::Object(map)
}

/// `who` on the live system: the frontend of the trace. Until the start-up
/// walk is over it collects the holders; then it prints them and, with
/// `--follow`, every later record of the ports.
struct WhoFrontend {
    scope: WhoScope,
    format: Format,
    clock: BootClock,
    follow: bool,
    /// Holders found so far, by (netns, sock).
    holders: std::collections::BTreeMap<(u32, u64), PortRecord>,
    ready: bool,
    found: bool,
    output: crate::output::Output,
}

impl WhoFrontend {
    fn print(&mut self, text: &str) -> std::io::Result<()> {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()
    }
}

impl crate::live::Frontend for WhoFrontend {
    fn start(&mut self, _header: &crate::output::Header) -> std::io::Result<()> {
        Ok(())
    }

    fn record(&mut self, rec: &PortRecord) -> std::io::Result<()> {
        if !self.scope.matches_record(rec) {
            return Ok(());
        }
        if !self.ready {
            let key = (rec.port.netns, rec.port.sock);
            match rec.body {
                RecordBody::Alloc { .. } => {
                    self.holders.insert(key, rec.clone());
                }
                RecordBody::Release { .. } => {
                    self.holders.remove(&key);
                }
                _ => {}
            }
            return Ok(());
        }
        if let RecordBody::Alloc { .. } = rec.body {
            self.found = true;
        }
        self.output.record(rec)?;
        if let (RecordBody::Alloc { .. }, Format::Text) = (&rec.body, self.format) {
            if let Some(d) = ProcessDetails::read(rec.port.pid) {
                let command = if d.cmdline.is_empty() { format!("[{}]", d.comm) } else { d.cmdline };
                self.output.note(&format!("    command: {}", printable(&command)))?;
            }
        }
        self.output.flush()
    }

    fn derived(&mut self, _derived: &crate::analysis::Derived) -> std::io::Result<()> {
        Ok(())
    }

    fn lost(&mut self, ts_ns: u64, count: u64) -> std::io::Result<()> {
        if self.ready {
            self.output.lost(ts_ns, count)?;
        }
        Ok(())
    }

    fn ready(&mut self, state: &crate::live::LiveState<'_>) -> std::io::Result<bool> {
        self.ready = true;
        let now = state.now_ns;
        let holders: Vec<Holder> = self
            .holders
            .values()
            .map(|rec| Holder {
                port: rec.port.clone(),
                state: state.tracker.tcp_state(rec.port.sock),
                since_ns: match rec.body {
                    RecordBody::Alloc { origin: crate::model::Origin::Snapshot, .. } => None,
                    _ => Some(rec.ts_ns),
                },
                details: ProcessDetails::read(rec.port.pid).filter(|d| d.comm == rec.port.comm),
            })
            .collect();
        self.found = !holders.is_empty();
        let text = match self.format {
            Format::Text if holders.is_empty() => nobody_text(&self.scope),
            Format::Text => render_holders_text(&holders, &self.clock, now),
            Format::Json => {
                holders.iter().map(|h| format!("{}\n", holder_json(h, &self.clock, now))).collect::<Vec<_>>().concat()
            }
        };
        self.print(&text)?;
        if self.follow {
            if self.format == Format::Text {
                self.print(&format!("following {} (Ctrl-C to stop)\n", self.scope.ports_text()))?;
            }
            self.output.columns()?;
            self.output.flush()?;
        }
        Ok(self.follow)
    }

    fn tick(&mut self, _state: &crate::live::LiveState<'_>) -> std::io::Result<bool> {
        self.output.flush()?;
        Ok(true)
    }

    fn finish(&mut self, _summary: &crate::output::Summary) -> std::io::Result<()> {
        self.output.flush()
    }
}

/// The trace options `who` uses: the ports, the namespace, the backend and
/// the duration; nothing else filtered.
fn trace_args(args: &WhoArgs, ports: &[RangeInclusive<u16>]) -> crate::cli::TraceArgs {
    let mut trace = crate::cli::TraceArgs::defaults();
    trace.select.ports = Some(PortList(ports.to_vec()));
    trace.select.netns = args.netns.clone();
    trace.backend = args.backend;
    trace.duration = args.duration;
    trace
}

/// Runs `who`; returns the exit code (0 found, 1 nobody).
pub async fn run(args: WhoArgs) -> anyhow::Result<u8> {
    use std::io::IsTerminal;
    let ports = args.port_ranges()?;
    let format = args.format.unwrap_or(if std::io::stdout().is_terminal() { Format::Text } else { Format::Json });
    let files = args.history_files();
    if !files.is_empty() {
        let scope = WhoScope {
            ports,
            netns: match &args.netns {
                Some(arg) => Some(crate::system::resolve_netns(arg).map_err(|e| UsageError(format!("{e:#}")))?),
                None => None,
            },
        };
        let recording = reader::read_recordings(&files)?;
        for message in crate::report::bad_line_messages(&recording) {
            eprintln!("{message}");
        }
        let history = history(&recording.lines, &scope);
        for warning in history_warnings(&history) {
            eprintln!("{warning}");
        }
        let found = !history.holdings.is_empty();
        match format {
            Format::Text => print!("{}", render_history_text(&history, &scope)),
            Format::Json => {
                for h in &history.holdings {
                    println!("{}", holding_json(h));
                }
            }
        }
        return Ok(who_exit_code(found));
    }
    let plan = crate::live::Plan::new(&trace_args(&args, &ports))?;
    let scope = WhoScope { ports, netns: plan.netns() };
    let session = plan.load()?;
    let writer = Box::new(std::io::BufWriter::new(std::io::stdout()));
    let mut frontend = WhoFrontend {
        scope,
        format,
        clock: session.clock,
        follow: args.follows(),
        holders: Default::default(),
        ready: false,
        found: false,
        output: crate::output::Output::new(writer, format, false, session.clock),
    };
    session.run(&mut frontend).await?;
    Ok(who_exit_code(frontend.found))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use clap::Parser;

    use super::*;
    use crate::model::Family;

    const SEC: u64 = 1_000_000_000;
    const NS: u32 = 4026531840;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        who: WhoArgs,
    }

    fn parse(args: &[&str]) -> Result<WhoArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("who").chain(args.iter().copied())).map(|c| c.who)
    }

    #[test]
    fn parses_options() {
        let a = parse(&["8080,9000-9001", "443", "--netns", "/run/netns/blue", "-f", "json"]).unwrap();
        assert_eq!(a.port_ranges().unwrap(), vec![8080..=8080, 9000..=9001, 443..=443]);
        assert_eq!(a.netns.as_deref(), Some("/run/netns/blue"));
        assert_eq!(a.format, Some(Format::Json));
        assert_eq!(a.backend, BackendArg::Auto);
        assert!(!a.follows());
        assert!(a.history_files().is_empty());
        let a = parse(&["80", "-d", "30s", "--backend", "portable"]).unwrap();
        assert!(a.follows());
        assert_eq!(a.duration, Some(Duration::from_secs(30)));
        assert_eq!(a.backend, BackendArg::Portable);
        assert!(parse(&["80", "--follow"]).unwrap().follows());
    }

    #[test]
    fn history_takes_several_files_and_ports_may_trail() {
        let a = parse(&["8080", "--history", "/nonexistent/a.jsonl", "/nonexistent/b.jsonl"]).unwrap();
        assert_eq!(a.history_files().len(), 2);
        assert_eq!(a.port_ranges().unwrap(), vec![8080..=8080]);
        // `--history` swallowed the port: taken back.
        let a = parse(&["--history", "/nonexistent/a.jsonl", "8080,53"]).unwrap();
        assert_eq!(a.history_files(), vec![PathBuf::from("/nonexistent/a.jsonl")]);
        assert_eq!(a.port_ranges().unwrap(), vec![8080..=8080, 53..=53]);
        // Only files, no port.
        let a = parse(&["--history", "/nonexistent/a.jsonl"]).unwrap();
        assert!(a.port_ranges().unwrap_err().0.contains("needs a port"));
    }

    #[test]
    fn bad_options_are_usage_errors() {
        for args in [
            &[][..],
            &["0"],
            &["http"],
            &["90-80"],
            &["80", "-d", "0s"],
            &["80", "--follow", "--history", "x"],
            &["80", "-d", "5s", "--history", "x"],
            &["80", "-f", "xml"],
            &["80", "--backend", "magic"],
        ] {
            let err = parse(args).err().unwrap_or_else(|| panic!("{args:?} should fail"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(who_exit_code(true), 0);
        assert_eq!(who_exit_code(false), 1);
    }

    fn port(sock: u64, proto: Proto, lport: u16, remote: Option<u16>) -> PortRef {
        PortRef {
            sock,
            netns: NS,
            proto,
            family: Family::Ipv4,
            laddr: IpAddr::V4(if remote.is_some() { Ipv4Addr::LOCALHOST } else { Ipv4Addr::UNSPECIFIED }),
            lport,
            raddr: remote.map(|_| IpAddr::V4(Ipv4Addr::LOCALHOST)),
            rport: remote,
            pid: 4242,
            comm: "python3".into(),
            cgroup: 77,
            ephemeral: Some(false),
        }
    }

    fn details() -> ProcessDetails {
        ProcessDetails {
            pid: 4242,
            comm: "python3".into(),
            cmdline: "python3 -m http.server 8080".into(),
            uid: 33,
            user: Some("www-data".into()),
            cgroup_path: Some("/system.slice/web.service".into()),
            start_boot_ns: Some(0),
            start_time: Some(clock().wall(0)),
        }
    }

    fn clock() -> BootClock {
        BootClock::with_offset_ns(1_795_000_000_000_000_000)
    }

    #[test]
    fn scope_matches_ports_and_namespace() {
        let scope = WhoScope { ports: vec![8080..=8080, 9000..=9010], netns: None };
        assert!(scope.matches(&port(1, Proto::Tcp, 8080, None)));
        assert!(scope.matches(&port(1, Proto::Udp, 9005, None)));
        assert!(!scope.matches(&port(1, Proto::Tcp, 8081, None)));
        let scoped = WhoScope { netns: Some(NS + 1), ..scope.clone() };
        assert!(!scoped.matches(&port(1, Proto::Tcp, 8080, None)));
        assert_eq!(nobody_text(&scope), "no socket holds ports 8080,9000-9010\n");
        assert_eq!(
            nobody_text(&WhoScope { ports: vec![53..=53], netns: Some(7) }),
            "no socket holds port 53 in network namespace 7\n"
        );
    }

    #[test]
    fn renders_holders_as_a_table() {
        let listener = Holder {
            port: port(1, Proto::Tcp, 8080, None),
            state: Some(TcpState::Listen),
            since_ns: Some(SEC),
            details: Some(details()),
        };
        let mut client_port = port(2, Proto::Tcp, 8080, Some(54012));
        client_port.pid = 0;
        client_port.comm = "?".into();
        let accepted = Holder { port: client_port, state: Some(TcpState::Established), since_ns: None, details: None };
        let mut gone_port = port(3, Proto::Udp, 8080, None);
        gone_port.pid = 999;
        gone_port.comm = "evil\x1b[2J".into();
        let udp = Holder { port: gone_port, state: None, since_ns: Some(2 * 3600 * SEC), details: None };
        // Given in any order; listeners first, then by pid.
        let text = render_holders_text(&[accepted, udp, listener], &clock(), 2 * 3600 * SEC + 13 * 60 * SEC);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        assert_eq!(
            lines[0],
            "PROTO  FAMILY  STATE        LOCAL           REMOTE           PID   COMM           USER      SINCE       CGROUP"
        );
        assert_eq!(
            lines[1],
            "tcp    ipv4    LISTEN       0.0.0.0:8080    -                4242  python3        www-data  2h12m ago   /system.slice/web.service"
        );
        assert_eq!(lines[2], "    command: python3 -m http.server 8080  (process up 2h13m)");
        assert!(
            lines[3].starts_with("tcp    ipv4    ESTABLISHED  127.0.0.1:8080  127.0.0.1:54012  ? "),
            "{}",
            lines[3]
        );
        assert!(lines[3].ends_with("?           -"), "{}", lines[3]);
        assert!(lines[4].contains("owner unknown"));
        assert!(lines[5].starts_with("udp    ipv4    UNCONN "), "{}", lines[5]);
        assert!(lines[5].contains("evil\\u{1b}[2J"), "control characters are escaped: {}", lines[5]);
        assert!(lines[5].contains("13m00s ago"), "{}", lines[5]);
        assert!(lines[6].contains("has exited"));
        assert_eq!(render_holders_text(&[], &clock(), 0), "");
    }

    #[test]
    fn shows_the_namespace_when_several() {
        let a = Holder {
            port: port(1, Proto::Tcp, 80, None),
            state: Some(TcpState::Listen),
            since_ns: None,
            details: None,
        };
        let mut b = a.clone();
        b.port.netns = 4026532000;
        b.port.laddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let text = render_holders_text(&[a, b], &clock(), 0);
        assert!(text.starts_with("NETNS       PROTO"), "{text}");
        assert!(text.contains("4026532000  tcp    ipv4    LISTEN  [::]:80"), "{text}");
    }

    #[test]
    fn holder_json_has_the_port_and_process_fields() {
        let h = Holder {
            port: port(1, Proto::Tcp, 8080, None),
            state: Some(TcpState::Listen),
            since_ns: Some(SEC),
            details: Some(details()),
        };
        let v = holder_json(&h, &clock(), 5 * SEC);
        assert_eq!(v["type"], "holder");
        assert_eq!(v["ts"], "2026-11-18T11:06:45.000000000Z");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["laddr"], "0.0.0.0");
        assert_eq!(v["lport"], 8080);
        assert!(v["raddr"].is_null() && v["rport"].is_null());
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["comm"], "python3");
        assert_eq!(v["netns"], NS);
        assert_eq!(v["sock"], 1);
        assert_eq!(v["state"], "LISTEN");
        assert_eq!(v["since"], "2026-11-18T11:06:41.000000000Z");
        assert_eq!(v["cmdline"], "python3 -m http.server 8080");
        assert_eq!(v["uid"], 33);
        assert_eq!(v["user"], "www-data");
        assert_eq!(v["cgroup_path"], "/system.slice/web.service");
        assert_eq!(v["process_started"], "2026-11-18T11:06:40.000000000Z");
        let bare = Holder { port: port(2, Proto::Udp, 53, Some(5353)), state: None, since_ns: None, details: None };
        let v = holder_json(&bare, &clock(), 0);
        assert_eq!(v["state"], "ESTAB");
        let unknown_state = Holder { port: port(3, Proto::Tcp, 53, None), ..bare };
        assert!(holder_json(&unknown_state, &clock(), 0)["state"].is_null());
        for field in ["since", "cmdline", "uid", "user", "cgroup_path", "process_started"] {
            assert!(v.get(field).is_some_and(Value::is_null), "{field}");
        }
    }

    #[test]
    fn holder_from_an_alloc_record() {
        let alloc = PortRecord {
            ts_ns: 7,
            port: port(1, Proto::Udp, 53, None),
            body: RecordBody::Alloc { origin: crate::model::Origin::Bind, ephemeral: false },
        };
        let h = Holder::from_record(&alloc, None).unwrap();
        assert_eq!((h.since_ns, h.state_name()), (Some(7), "UNCONN"));
        let state = PortRecord { body: RecordBody::State { old: TcpState::Close, new: TcpState::Listen }, ..alloc };
        assert_eq!(Holder::from_record(&state, None), None);
    }

    fn line(kind: &str, secs: u64, sock: u64, lport: u16, rport: Option<u16>, extra: Value) -> Value {
        let mut v = json!({
            "type": kind,
            "ts": format!("2026-11-26T06:40:{secs:02}.000000000Z"),
            "proto": "tcp", "family": "ipv4",
            "laddr": "127.0.0.1", "lport": lport,
            "raddr": rport.map(|_| "127.0.0.1"), "rport": rport,
            "pid": 100 + sock, "comm": format!("proc{sock}"), "netns": NS, "cgroup": 1, "sock": sock,
        });
        if let (Value::Object(map), Value::Object(more)) = (&mut v, extra) {
            if kind == "alloc" {
                // Every alloc record says it; tests that care override it.
                map.insert("ephemeral".into(), Value::Bool(false));
            }
            map.extend(more);
        }
        v
    }

    /// The lines as the recording reader parses them, and how many it
    /// refused.
    fn parsed(values: &[Value]) -> (Vec<Line>, usize) {
        let mut parser = reader::LineParser::new();
        let mut lines = Vec::new();
        let mut bad = 0;
        for v in values {
            match parser.parse(v.to_string().as_bytes()) {
                Ok(line) => lines.push(line),
                Err(_) => bad += 1,
            }
        }
        (lines, bad)
    }

    fn at(secs: u64) -> SystemTime {
        humantime::parse_rfc3339(&format!("2026-11-26T06:40:{secs:02}Z")).unwrap()
    }

    #[test]
    fn history_lists_every_holder_in_order_of_start() {
        let lines = vec![
            json!({"type": "header", "schema": 1, "started": "2026-11-26T06:40:00.000000000Z"}),
            // Held before the recording (found by the start-up walk).
            line("alloc", 1, 1, 8080, None, json!({"origin": "snapshot", "ephemeral": false})),
            line("state", 1, 1, 8080, None, json!({"old": "CLOSE", "new": "LISTEN"})),
            // Not one of our ports.
            line("alloc", 2, 9, 9999, None, json!({"origin": "bind"})),
            // A client that got 8080 from connect, then TIME_WAIT.
            line("alloc", 3, 2, 8080, Some(80), json!({"origin": "connect", "ephemeral": true})),
            line("state", 4, 2, 8080, Some(80), json!({"old": "ESTABLISHED", "new": "TIME_WAIT"})),
            line("release", 10, 2, 8080, Some(80), json!({"reason": "time_wait_end", "held_ns": 7 * SEC})),
            // A release whose alloc was before the recording: start from held_ns.
            line("release", 5, 3, 8080, None, json!({"reason": "close", "held_ns": 3 * SEC})),
            // A release with nothing known of its start.
            line("release", 6, 4, 8080, None, json!({"reason": "close", "held_ns": null})),
            json!({"type": "lost", "ts": "2026-11-26T06:40:11.000000000Z", "count": 3}),
            json!("not an object"),
            json!({"type": "alloc", "ts": "garbage"}),
            line("summary", 12, 0, 0, None, json!({})),
        ];
        let scope = WhoScope { ports: vec![8080..=8080], netns: Some(NS) };
        let (lines, bad) = parsed(&lines);
        assert_eq!(bad, 2, "the reader refuses the two broken lines");
        let h = history(&lines, &scope);
        assert_eq!(h.lost, 3);
        assert_eq!(h.span, Some((at(0), at(12))));
        let socks: Vec<u64> = h.holdings.iter().map(|x| x.port.sock).collect();
        assert_eq!(socks, [4, 1, 3, 2], "unknown start first, then by start");
        let [unknown, listener, short, client] = &h.holdings[..] else { panic!() };
        assert_eq!((unknown.start, unknown.end, unknown.held()), (None, Some(at(6)), None));
        assert_eq!(listener.start, Some(at(1)));
        assert_eq!(listener.end, None, "still held at the end");
        assert_eq!(listener.origin.as_deref(), Some("snapshot"));
        assert_eq!(listener.last_state.as_deref(), Some("LISTEN"));
        assert_eq!((short.start, short.end, short.held()), (Some(at(2)), Some(at(5)), Some(3 * SEC)));
        assert_eq!(client.start, Some(at(3)));
        assert_eq!(client.end, Some(at(10)));
        assert_eq!(client.end_reason.as_deref(), Some("time_wait_end"));
        assert_eq!(client.last_state.as_deref(), Some("TIME_WAIT"));
        assert_eq!(client.port.rport, Some(80));
        assert_eq!(client.port.comm, "proc2");

        let other_netns = WhoScope { ports: vec![8080..=8080], netns: Some(1) };
        assert!(history(&lines, &other_netns).holdings.is_empty());
    }

    #[test]
    fn history_joins_recordings_and_reallocations() {
        let lines = vec![
            line("alloc", 1, 1, 8080, None, json!({"origin": "bind"})),
            // The next recording's walk finds the same socket: one holding.
            json!({"type": "header", "schema": 1}),
            line("alloc", 20, 1, 8080, None, json!({"origin": "snapshot"})),
            // A UDP-style re-allocation of one socket without a release.
            line("alloc", 21, 2, 8080, None, json!({"origin": "autobind"})),
            line("alloc", 22, 2, 8080, None, json!({"origin": "bind"})),
            // A lifecycle record (watch --lifecycles).
            line(
                "lifecycle",
                30,
                3,
                8080,
                Some(53),
                json!({"started": "2026-11-26T06:40:25.000000000Z", "origin": "connect", "reason": "close", "held_ns": 5 * SEC}),
            ),
        ];
        let (lines, bad) = parsed(&lines);
        assert_eq!(bad, 0);
        let h = history(&lines, &WhoScope { ports: vec![8080..=8080], netns: None });
        let summary: Vec<(u64, Option<SystemTime>)> = h.holdings.iter().map(|x| (x.port.sock, x.start)).collect();
        assert_eq!(summary, [(1, Some(at(1))), (2, Some(at(21))), (2, Some(at(22))), (3, Some(at(25)))]);
        assert_eq!(h.holdings[0].end, None);
        assert_eq!((h.holdings[1].end, h.holdings[1].end_reason.as_deref()), (Some(at(22)), None));
        assert_eq!(h.holdings[2].end, None);
        assert_eq!(h.holdings[0].origin.as_deref(), Some("bind"));
        assert_eq!(h.holdings[3].end_reason.as_deref(), Some("close"));
        assert_eq!(h.holdings[3].origin.as_deref(), Some("connect"));
    }

    #[test]
    fn renders_history() {
        let lines = vec![
            line("alloc", 1, 1, 8080, None, json!({"origin": "bind"})),
            line("alloc", 3, 2, 8080, Some(80), json!({"origin": "connect"})),
            line("release", 10, 2, 8080, Some(80), json!({"reason": "close", "held_ns": 7 * SEC})),
            json!({"type": "lost", "ts": "2026-11-26T06:40:41.000000000Z", "count": 2}),
        ];
        let scope = WhoScope { ports: vec![8080..=8080], netns: None };
        let h = history(&parsed(&lines).0, &scope);
        let text = render_history_text(&h, &scope);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 3, "{text}");
        assert!(rows[0].starts_with("START (UTC)              END (UTC)                HELD"), "{}", rows[0]);
        assert!(rows[1].starts_with("2026-11-26 06:40:01.000  still held               >40.0s"), "{}", rows[1]);
        assert!(rows[1].ends_with("proc1  bind -> held"), "{}", rows[1]);
        assert!(rows[2].starts_with("2026-11-26 06:40:03.000  2026-11-26 06:40:10.000  7.0s"), "{}", rows[2]);
        assert!(rows[2].contains("127.0.0.1:8080  127.0.0.1:80"), "{}", rows[2]);
        assert!(rows[2].ends_with("connect -> close"), "{}", rows[2]);
        assert_eq!(history_warnings(&h).len(), 1);
        assert!(history_warnings(&h)[0].contains("2 events were lost"));

        let v = holding_json(&h.holdings[1]);
        assert_eq!(v["type"], "holding");
        assert_eq!(v["start"], "2026-11-26T06:40:03.000000000Z");
        assert_eq!(v["end"], "2026-11-26T06:40:10.000000000Z");
        assert_eq!(v["held_ns"], 7 * SEC);
        assert_eq!(v["end_reason"], "close");
        assert_eq!(v["origin"], "connect");
        assert_eq!(v["lport"], 8080);
        assert_eq!(v["rport"], 80);
        assert_eq!(v["sock"], 2);
        let open = holding_json(&h.holdings[0]);
        assert!(open["end"].is_null() && open["held_ns"].is_null() && open["end_reason"].is_null());

        let empty = History::default();
        assert_eq!(render_history_text(&empty, &scope), "no socket held port 8080 in the recording\n");
        assert!(history_warnings(&empty).is_empty());
    }

    #[test]
    fn ages_are_coarse() {
        assert_eq!(human_age(42 * SEC), "42s");
        assert_eq!(human_age(750 * SEC), "12m30s");
        assert_eq!(human_age((2 * 3600 + 13 * 60) * SEC), "2h13m");
        assert_eq!(human_age((3 * 86400 + 2 * 3600) * SEC), "3d2h");
    }

    #[test]
    fn recorded_ports_become_port_refs() {
        let (lines, bad) =
            parsed(&[line("alloc", 1, 5, 8080, Some(80), json!({"origin": "connect", "ephemeral": true}))]);
        assert_eq!(bad, 0);
        let Line::Alloc { event, ephemeral, .. } = &lines[0] else { panic!("{lines:?}") };
        let p = port_ref(&event.port, Some(*ephemeral));
        assert_eq!((p.sock, p.lport, p.rport, p.pid, p.ephemeral), (5, 8080, Some(80), 105, Some(true)));
        assert_eq!((p.comm.as_str(), p.netns, p.family), ("proc5", NS, Family::Ipv4));
    }
}
