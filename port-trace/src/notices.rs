//! Notices: things a person should look at. The one kind so far is a socket
//! serving on a port inside the ephemeral range — a client's `connect()` may
//! take that port first, and the service then fails to bind it on restart.
//!
//! A socket starts serving when:
//!
//! * TCP: it moves to LISTEN (a `state` record), it got its port from
//!   `listen()` itself (`alloc` with origin `listen`), or it was found
//!   unconnected by the start-up walk (`alloc` with origin `snapshot`);
//! * UDP: an explicit `bind()` to a port it named (or, found by the start-up
//!   walk, an unconnected socket) is still unconnected and unreleased after
//!   [`UDP_LISTENER_GRACE_NS`]: a bind followed by `connect()` is a client.
//!   A `bind(0)` is a client's pattern too (the kernel picked the port, so
//!   nobody can be told where to send), and is not reported.
//!
//! The ephemeral range is the namespace's `ip_local_port_range` (less its
//! `ip_local_reserved_ports`, which the kernel never hands out:
//! `inet_is_local_reserved_port`), or else IANA's dynamic range.

use foldhash::HashMap;
use std::ops::RangeInclusive;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::clock::BootClock;
use crate::model::{Origin, Proto, TcpState};
use crate::record::{PortRecord, PortRef, RecordBody};

/// How long a bound, unconnected UDP socket must stay so before it counts as
/// serving.
pub const UDP_LISTENER_GRACE_NS: u64 = 1_000_000_000;

/// IANA's dynamic (private, ephemeral) ports, RFC 6335.
pub const IANA_DYNAMIC: [u16; 2] = [49152, 65535];

/// Sockets remembered as noticed (so each is reported once) at most; past
/// it the oldest half is forgotten. Releases forget sockets as they come.
const MAX_REMEMBERED: usize = 1 << 16;

/// Distinct listeners kept for the run summary at most.
const MAX_SUMMARY: usize = 256;

/// What a notice is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// A socket serving on a port inside the ephemeral range.
    EphemeralListener,
}

impl NoticeKind {
    /// The `kind` name in JSON and text.
    pub fn name(self) -> &'static str {
        match self {
            NoticeKind::EphemeralListener => "ephemeral_listener",
        }
    }
}

/// Which range a port fell in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RangeName {
    /// The namespace's `net.ipv4.ip_local_port_range`.
    IpLocalPortRange,
    /// IANA's dynamic range, 49152–65535.
    IanaDynamic,
}

impl RangeName {
    /// The `range_name` in JSON and text.
    pub fn name(self) -> &'static str {
        match self {
            RangeName::IpLocalPortRange => "ip_local_port_range",
            RangeName::IanaDynamic => "iana_dynamic",
        }
    }
}

/// Something a person should look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// CLOCK_BOOTTIME nanoseconds when the notice was decided (the LISTEN
    /// record's time; for UDP, the tick after the grace period).
    pub ts_ns: u64,
    /// What it is about.
    pub kind: NoticeKind,
    /// The socket, its addresses and owner.
    pub port: PortRef,
    /// The range the port fell in.
    pub range: [u16; 2],
    /// Which range that is.
    pub range_name: RangeName,
    /// CLOCK_BOOTTIME nanoseconds when the socket started serving (LISTEN,
    /// or the UDP bind).
    pub since_ns: u64,
}

/// One `--allow-listener` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allow {
    /// Local ports (`PORT` or `LO-HI`).
    Ports(RangeInclusive<u16>),
    /// A command name (compared as the kernel truncates it, 15 bytes).
    Comm(String),
}

/// One `--allow-listener` value (a comma list), as a clap value type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowArg(pub Vec<Allow>);

/// Parses an `--allow-listener` value for clap.
pub fn parse_allow_arg(text: &str) -> Result<AllowArg, String> {
    parse_allow_list(text).map(AllowArg)
}

/// Parses `PORT|LO-HI|COMM[,...]`: all-digit entries are ports, anything
/// else a command name.
pub fn parse_allow_list(text: &str) -> Result<Vec<Allow>, String> {
    let port = |s: &str| -> Result<u16, String> {
        match s.parse::<u32>() {
            Ok(n @ 1..=65535) => Ok(n as u16),
            _ => Err(format!("port {s} is out of range (1-65535)")),
        }
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut allows = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("empty entry in --allow-listener '{text}'"));
        }
        let allow = match part.split_once('-') {
            None if digits(part) => {
                let p = port(part)?;
                Allow::Ports(p..=p)
            }
            Some((lo, hi)) if digits(lo) && digits(hi) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!("port range {lo}-{hi} is reversed"));
                }
                Allow::Ports(lo..=hi)
            }
            _ => Allow::Comm(part.to_string()),
        };
        allows.push(allow);
    }
    Ok(allows)
}

/// Listeners the user said are fine (`--allow-listener`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList(Vec<Allow>);

impl AllowList {
    /// A list of entries.
    pub fn new(allows: Vec<Allow>) -> Self {
        Self(allows)
    }

    /// The entries of every `--allow-listener` given.
    pub fn from_args(args: &[AllowArg]) -> Self {
        Self(args.iter().flat_map(|a| a.0.iter().cloned()).collect())
    }

    /// Whether a socket is allowed to serve where it does.
    pub fn allows(&self, port: &PortRef) -> bool {
        self.0.iter().any(|allow| match allow {
            Allow::Ports(range) => range.contains(&port.lport),
            Allow::Comm(comm) => {
                let want = &comm.as_bytes()[..comm.len().min(15)];
                port.comm.as_bytes() == want
            }
        })
    }
}

/// Parses `ip_local_reserved_ports` (`8080,9000-9010`, empty for none).
pub fn parse_reserved_ports(text: &str) -> Result<Vec<RangeInclusive<u16>>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    crate::filter::parse_port_ranges(text)
}

/// A listener for the run summary: one line per owner and local address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListenerSummary {
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    /// Local address.
    pub laddr: std::net::IpAddr,
    /// Local port.
    pub lport: u16,
    /// Owner.
    pub pid: u32,
    /// Owner's command name.
    pub comm: String,
    /// Network namespace inode.
    pub netns: u32,
    /// The range the port fell in.
    pub range: [u16; 2],
    /// Which range.
    pub range_name: &'static str,
    /// Sockets noticed with these details.
    pub sockets: u64,
    /// CLOCK_BOOTTIME of the first notice.
    #[serde(skip)]
    pub first_ns: u64,
}

/// A UDP bind waiting out its grace period.
struct PendingBind {
    port: PortRef,
    bind_ts_ns: u64,
}

/// Per-namespace range facts.
#[derive(Clone, Debug, Default)]
struct NetnsRanges {
    local: Option<[u16; 2]>,
    reserved: Vec<RangeInclusive<u16>>,
}

/// Finds sockets serving on ephemeral-range ports, one notice per socket.
#[derive(Default)]
pub struct ListenerNotices {
    allow: AllowList,
    ranges: HashMap<u32, NetnsRanges>,
    /// (netns, sock) of UDP binds not yet decided.
    pending: HashMap<(u32, u64), PendingBind>,
    /// (netns, sock) already noticed or allowed → when, until released.
    noticed: HashMap<(u32, u64), u64>,
    summary: Vec<ListenerSummary>,
    unlisted: u64,
    silenced: u64,
    /// Events were lost and no repair walk has run since: a pending bind's
    /// release may be among them, so no bind is judged a listener yet.
    hold: bool,
}

impl ListenerNotices {
    /// Notices for everything but what `allow` allows.
    pub fn new(allow: AllowList) -> Self {
        Self { allow, ..Default::default() }
    }

    /// The namespace's `ip_local_port_range`.
    pub fn set_range(&mut self, netns: u32, low: u16, high: u16) {
        let (low, high) = if low <= high { (low, high) } else { (high, low) };
        self.ranges.entry(netns).or_default().local = Some([low, high]);
    }

    /// The namespace's `ip_local_reserved_ports`: ports there are never
    /// handed out by the kernel, so listening on them is safe.
    pub fn set_reserved(&mut self, netns: u32, reserved: Vec<RangeInclusive<u16>>) {
        self.ranges.entry(netns).or_default().reserved = reserved;
    }

    /// The range `lport` falls in, if any.
    pub fn ephemeral_range_of(&self, netns: u32, lport: u16) -> Option<([u16; 2], RangeName)> {
        let ranges = self.ranges.get(&netns);
        if ranges.is_some_and(|r| r.reserved.iter().any(|res| res.contains(&lport))) {
            return None;
        }
        if let Some([lo, hi]) = ranges.and_then(|r| r.local) {
            if (lo..=hi).contains(&lport) {
                return Some(([lo, hi], RangeName::IpLocalPortRange));
            }
        }
        let [lo, hi] = IANA_DYNAMIC;
        (lo..=hi).contains(&lport).then_some((IANA_DYNAMIC, RangeName::IanaDynamic))
    }

    /// Feeds one record that passed the user's filters.
    pub fn on_record(&mut self, rec: &PortRecord, out: &mut Vec<Notice>) {
        let p = &rec.port;
        let key = (p.netns, p.sock);
        match (&rec.body, p.proto) {
            (RecordBody::Release { .. }, _) => {
                self.pending.remove(&key);
                self.noticed.remove(&key);
            }
            (RecordBody::State { new: TcpState::Listen, .. }, Proto::Tcp) => self.serving(p, rec.ts_ns, rec.ts_ns, out),
            (RecordBody::Alloc { origin: Origin::Listen, .. }, Proto::Tcp) => {
                self.serving(p, rec.ts_ns, rec.ts_ns, out)
            }
            (RecordBody::Alloc { origin: Origin::Snapshot, .. }, Proto::Tcp) if p.raddr.is_none() => {
                self.serving(p, rec.ts_ns, rec.ts_ns, out)
            }
            (RecordBody::Alloc { origin, ephemeral }, Proto::Udp) if p.raddr.is_none() => {
                let named_port = *origin == Origin::Bind && !*ephemeral;
                if (named_port || *origin == Origin::Snapshot)
                    && !self.noticed.contains_key(&key)
                    && self.ephemeral_range_of(p.netns, p.lport).is_some()
                {
                    self.pending.insert(key, PendingBind { port: p.clone(), bind_ts_ns: rec.ts_ns });
                } else {
                    self.pending.remove(&key);
                }
            }
            _ => {
                // Any other sign of a remote end: a client.
                if p.raddr.is_some() {
                    self.pending.remove(&key);
                }
            }
        }
    }

    /// (netns, sock) of the UDP binds not decided yet.
    pub fn pending_binds(&self) -> Vec<(u32, u64)> {
        self.pending.keys().copied().collect()
    }

    /// The socket connected without a record saying so (a UDP `connect()`
    /// on a bound socket learns the remote end silently): not a listener.
    pub fn on_connected(&mut self, netns: u32, sock: u64) {
        self.pending.remove(&(netns, sock));
    }

    /// While `hold` is set (events lost, not yet repaired by a walk), the
    /// pending UDP binds wait instead of becoming notices.
    pub fn hold_decisions(&mut self, hold: bool) {
        self.hold = hold;
    }

    /// Decides the UDP binds whose grace period has passed by `now_ns`
    /// (CLOCK_BOOTTIME); call about once a second.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<Notice>) {
        if self.hold {
            return;
        }
        let due: Vec<(u32, u64)> = self
            .pending
            .iter()
            .filter(|(_, b)| now_ns.saturating_sub(b.bind_ts_ns) >= UDP_LISTENER_GRACE_NS)
            .map(|(key, _)| *key)
            .collect();
        let mut decided: Vec<PendingBind> = due.iter().filter_map(|key| self.pending.remove(key)).collect();
        decided.sort_by_key(|b| (b.bind_ts_ns, b.port.sock));
        for bind in decided {
            self.serving(&bind.port, now_ns, bind.bind_ts_ns, out);
        }
    }

    fn serving(&mut self, port: &PortRef, ts_ns: u64, since_ns: u64, out: &mut Vec<Notice>) {
        let key = (port.netns, port.sock);
        if self.noticed.contains_key(&key) {
            return;
        }
        let Some((range, range_name)) = self.ephemeral_range_of(port.netns, port.lport) else { return };
        self.remember(key, ts_ns);
        if self.allow.allows(port) {
            self.silenced += 1;
            return;
        }
        let notice =
            Notice { ts_ns, kind: NoticeKind::EphemeralListener, port: port.clone(), range, range_name, since_ns };
        self.add_to_summary(&notice);
        out.push(notice);
    }

    fn remember(&mut self, key: (u32, u64), ts_ns: u64) {
        if self.noticed.len() >= MAX_REMEMBERED {
            let mut stamps: Vec<u64> = self.noticed.values().copied().collect();
            stamps.sort_unstable();
            let cutoff = stamps[stamps.len() / 2];
            self.noticed.retain(|_, ts| *ts > cutoff);
        }
        self.noticed.insert(key, ts_ns);
    }

    fn add_to_summary(&mut self, n: &Notice) {
        let p = &n.port;
        if let Some(entry) = self.summary.iter_mut().find(|s| {
            s.netns == p.netns
                && s.proto == p.proto.name()
                && s.laddr == p.laddr
                && s.lport == p.lport
                && s.pid == p.pid
                && s.comm == p.comm
        }) {
            entry.sockets += 1;
            return;
        }
        if self.summary.len() >= MAX_SUMMARY {
            self.unlisted += 1;
            return;
        }
        self.summary.push(ListenerSummary {
            proto: p.proto.name(),
            family: p.family.name(),
            laddr: p.laddr,
            lport: p.lport,
            pid: p.pid,
            comm: p.comm.to_string(),
            netns: p.netns,
            range: n.range,
            range_name: n.range_name.name(),
            sockets: 1,
            first_ns: n.ts_ns,
        });
    }

    /// The listeners noticed this run, first noticed first.
    pub fn summary(&self) -> Vec<ListenerSummary> {
        let mut list = self.summary.clone();
        list.sort_by_key(|s| s.first_ns);
        list
    }

    /// Notices left out of [`ListenerNotices::summary`] (it keeps
    /// [`MAX_SUMMARY`] distinct listeners).
    pub fn unlisted(&self) -> u64 {
        self.unlisted
    }

    /// Listeners on ephemeral-range ports that `--allow-listener` silenced.
    pub fn silenced(&self) -> u64 {
        self.silenced
    }

    /// UDP binds waiting for their grace period to end.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The port fields of a record, named as in JSON Lines records: `proto`,
/// `family`, `laddr`, `lport`, `raddr`, `rport`, `pid`, `comm`, `netns`,
/// `cgroup`, `sock`.
pub fn port_fields_json(p: &PortRef) -> Map<String, Value> {
    let fields = json!({
        "proto": p.proto.name(),
        "family": p.family.name(),
        "laddr": p.laddr,
        "lport": p.lport,
        "raddr": p.raddr,
        "rport": p.rport,
        "pid": p.pid,
        "comm": p.comm,
        "netns": p.netns,
        "cgroup": p.cgroup,
        "sock": p.sock,
    });
    match fields {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// A notice as a JSON Lines record: `type` `notice`, `ts`, `kind`, the port
/// fields, `range`, `range_name`, `since`, and `message` in words.
pub fn notice_json(n: &Notice, clock: &BootClock) -> Value {
    let mut map = Map::new();
    map.insert("type".into(), "notice".into());
    map.insert("ts".into(), clock.rfc3339(n.ts_ns).into());
    map.insert("kind".into(), n.kind.name().into());
    map.extend(port_fields_json(&n.port));
    map.insert("range".into(), json!(n.range));
    map.insert("range_name".into(), n.range_name.name().into());
    map.insert("since".into(), clock.rfc3339(n.since_ns).into());
    map.insert("message".into(), notice_message(n).into());
    Value::Object(map)
}

/// What a notice means, in one sentence.
pub fn notice_message(n: &Notice) -> String {
    let p = &n.port;
    let [lo, hi] = n.range;
    match n.range_name {
        RangeName::IpLocalPortRange => format!(
            "{} serves {}/{} inside ip_local_port_range {lo}-{hi}: a client's connect() may take the port first; \
             move it out of the range or add it to net.ipv4.ip_local_reserved_ports",
            p.comm,
            p.lport,
            p.proto.name()
        ),
        RangeName::IanaDynamic => format!(
            "{} serves {}/{} inside IANA's dynamic range {lo}-{hi}, where other hosts' clients pick ports",
            p.comm,
            p.lport,
            p.proto.name()
        ),
    }
}

fn endpoint(port: &PortRef) -> String {
    match port.laddr {
        std::net::IpAddr::V6(a) => format!("[{a}]:{}", port.lport),
        a => format!("{a}:{}", port.lport),
    }
}

/// A notice as a line of `watch`'s text table (TIME EVENT PROTO PID COMM
/// LADDR:LPORT RADDR:RPORT DETAIL).
pub fn notice_text(n: &Notice, clock: &BootClock) -> String {
    let p = &n.port;
    let time = clock.rfc3339(n.ts_ns).get(11..23).unwrap_or_default().to_string();
    let [lo, hi] = n.range;
    format!(
        "{:<12} {:<10} {:<5} {:<7} {:<15} {:<21} {:<21} {} in {} {lo}-{hi}",
        time,
        "notice",
        p.proto.name(),
        p.pid,
        p.comm,
        endpoint(p),
        "-",
        n.kind.name(),
        n.range_name.name()
    )
}

/// The listeners for the closing summary on stderr; `None` when there were
/// none.
pub fn summary_text(list: &[ListenerSummary], unlisted: u64) -> Option<String> {
    if list.is_empty() && unlisted == 0 {
        return None;
    }
    let mut text = String::from("port-trace: listeners on ephemeral-range ports:");
    for s in list {
        let laddr = match s.laddr {
            std::net::IpAddr::V6(a) => format!("[{a}]"),
            a => a.to_string(),
        };
        text.push_str(&format!(
            "\n  {} {laddr}:{} pid {} {} ({} {}-{}{})",
            s.proto,
            s.lport,
            s.pid,
            s.comm,
            s.range_name,
            s.range[0],
            s.range[1],
            if s.sockets > 1 { format!(", {} sockets", s.sockets) } else { String::new() }
        ));
    }
    if unlisted > 0 {
        text.push_str(&format!("\n  and {unlisted} more"));
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::model::{Family, ReleaseReason};

    const NS: u32 = 4026531840;
    const SEC: u64 = 1_000_000_000;

    fn port(sock: u64, proto: Proto, lport: u16, raddr: Option<u16>) -> PortRef {
        PortRef {
            sock,
            netns: NS,
            proto,
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            lport,
            raddr: raddr.map(|_| IpAddr::V4(Ipv4Addr::LOCALHOST)),
            rport: raddr,
            pid: 4242,
            comm: "python3".into(),
            cgroup: 1,
            ephemeral: Some(false),
        }
    }

    fn rec(ts_ns: u64, port: PortRef, body: RecordBody) -> PortRecord {
        PortRecord { ts_ns, port, body }
    }

    fn alloc(origin: Origin, ephemeral: bool) -> RecordBody {
        RecordBody::Alloc { origin, ephemeral }
    }

    fn listen() -> RecordBody {
        RecordBody::State { old: TcpState::Close, new: TcpState::Listen }
    }

    fn release() -> RecordBody {
        RecordBody::Release { reason: ReleaseReason::Close, held_ns: Some(1), origin: None, alloc_ts_ns: None }
    }

    fn notices() -> ListenerNotices {
        let mut n = ListenerNotices::new(AllowList::default());
        n.set_range(NS, 32768, 60999);
        n
    }

    #[test]
    fn tcp_listener_in_range_gets_exactly_one_notice() {
        let mut n = notices();
        let mut out = Vec::new();
        let p = port(7, Proto::Tcp, 40000, None);
        n.on_record(&rec(1, p.clone(), alloc(Origin::Bind, false)), &mut out);
        assert!(out.is_empty(), "a bind alone is not serving");
        n.on_record(&rec(2, p.clone(), listen()), &mut out);
        // Repeated LISTEN records (listen() called again, duplicates).
        n.on_record(&rec(3, p.clone(), listen()), &mut out);
        n.on_record(&rec(4, p.clone(), RecordBody::State { old: TcpState::Listen, new: TcpState::Close }), &mut out);
        n.on_record(&rec(5, p.clone(), listen()), &mut out);
        n.tick(100 * SEC, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let notice = &out[0];
        assert_eq!(notice.kind, NoticeKind::EphemeralListener);
        assert_eq!((notice.ts_ns, notice.since_ns), (2, 2));
        assert_eq!(notice.port.lport, 40000);
        assert_eq!(notice.port.comm, "python3");
        assert_eq!(notice.range, [32768, 60999]);
        assert_eq!(notice.range_name, RangeName::IpLocalPortRange);
        let summary = n.summary();
        assert_eq!(summary.len(), 1);
        assert_eq!((summary[0].lport, summary[0].sockets, summary[0].range_name), (40000, 1, "ip_local_port_range"));
    }

    #[test]
    fn each_socket_gets_its_own_notice_and_release_forgets() {
        let mut n = notices();
        let mut out = Vec::new();
        // SO_REUSEPORT: two sockets on one port.
        n.on_record(&rec(1, port(1, Proto::Tcp, 40000, None), listen()), &mut out);
        n.on_record(&rec(2, port(2, Proto::Tcp, 40000, None), listen()), &mut out);
        n.on_record(&rec(3, port(1, Proto::Tcp, 40000, None), release()), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(n.noticed.len(), 1, "the released socket is forgotten");
        assert_eq!(n.summary()[0].sockets, 2);
    }

    #[test]
    fn listen_autobind_and_snapshot_listeners() {
        let mut n = notices();
        let mut out = Vec::new();
        n.on_record(&rec(1, port(1, Proto::Tcp, 45000, None), alloc(Origin::Listen, true)), &mut out);
        // The LISTEN state that follows a listen autobind adds nothing.
        n.on_record(&rec(1, port(1, Proto::Tcp, 45000, None), listen()), &mut out);
        n.on_record(&rec(2, port(2, Proto::Tcp, 46000, None), alloc(Origin::Snapshot, false)), &mut out);
        // A connected snapshot socket (or TIME_WAIT) is a client.
        n.on_record(&rec(3, port(3, Proto::Tcp, 47000, Some(80)), alloc(Origin::Snapshot, true)), &mut out);
        // A connect is never serving.
        n.on_record(&rec(4, port(4, Proto::Tcp, 48000, Some(80)), alloc(Origin::Connect, true)), &mut out);
        let ports: Vec<u16> = out.iter().map(|n| n.port.lport).collect();
        assert_eq!(ports, [45000, 46000]);
    }

    #[test]
    fn ports_outside_both_ranges_and_reserved_ports_are_quiet() {
        let mut n = notices();
        n.set_reserved(NS, parse_reserved_ports("40000-40010\n").unwrap());
        let mut out = Vec::new();
        n.on_record(&rec(1, port(1, Proto::Tcp, 8080, None), listen()), &mut out);
        n.on_record(&rec(2, port(2, Proto::Tcp, 32767, None), listen()), &mut out);
        n.on_record(&rec(3, port(3, Proto::Tcp, 40005, None), listen()), &mut out);
        assert!(out.is_empty(), "{out:?}");
        // IANA's range, above ip_local_port_range.
        n.on_record(&rec(4, port(4, Proto::Tcp, 61000, None), listen()), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].range, out[0].range_name), ([49152, 65535], RangeName::IanaDynamic));
    }

    #[test]
    fn without_a_known_range_only_iana_applies() {
        let mut n = ListenerNotices::new(AllowList::default());
        let mut out = Vec::new();
        n.on_record(&rec(1, port(1, Proto::Tcp, 40000, None), listen()), &mut out);
        n.on_record(&rec(2, port(2, Proto::Tcp, 50000, None), listen()), &mut out);
        assert_eq!(out.iter().map(|n| n.port.lport).collect::<Vec<_>>(), [50000]);
        // A reversed range is taken as meant.
        n.set_range(NS, 60999, 32768);
        assert_eq!(n.ephemeral_range_of(NS, 40000), Some(([32768, 60999], RangeName::IpLocalPortRange)));
        assert_eq!(n.ephemeral_range_of(NS + 1, 40000), None, "ranges are per namespace");
    }

    #[test]
    fn udp_server_bind_is_noticed_after_the_grace_period() {
        let mut n = notices();
        let mut out = Vec::new();
        n.on_record(&rec(10 * SEC, port(5, Proto::Udp, 40000, None), alloc(Origin::Bind, false)), &mut out);
        n.tick(10 * SEC + SEC / 2, &mut out);
        assert!(out.is_empty(), "still within the grace period");
        assert_eq!(n.pending(), 1);
        n.tick(11 * SEC, &mut out);
        n.tick(12 * SEC, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].ts_ns, out[0].since_ns), (11 * SEC, 10 * SEC));
        assert_eq!(n.pending(), 0);
        // Later records of the same socket add nothing.
        n.on_record(&rec(13 * SEC, port(5, Proto::Udp, 40000, None), alloc(Origin::Bind, false)), &mut out);
        n.tick(20 * SEC, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn udp_bind_then_connect_is_a_client() {
        let mut n = notices();
        let mut out = Vec::new();
        // The connect is seen on a later record carrying the remote end.
        n.on_record(&rec(SEC, port(6, Proto::Udp, 40000, None), alloc(Origin::Bind, false)), &mut out);
        n.on_record(&rec(SEC + 10, port(6, Proto::Udp, 40000, Some(53)), release()), &mut out);
        // Or told by the caller (the tracker learns it silently).
        n.on_record(&rec(SEC, port(7, Proto::Udp, 40001, None), alloc(Origin::Bind, false)), &mut out);
        n.on_connected(NS, 7);
        // Or the bind came with a remote end already.
        n.on_record(&rec(SEC, port(8, Proto::Udp, 40002, Some(53)), alloc(Origin::Bind, false)), &mut out);
        n.tick(5 * SEC, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(n.pending(), 0);
    }

    #[test]
    fn no_bind_is_judged_while_lost_events_are_unrepaired() {
        let mut n = notices();
        let mut out = Vec::new();
        n.on_record(&rec(SEC, port(10, Proto::Udp, 40000, None), alloc(Origin::Bind, false)), &mut out);
        n.hold_decisions(true);
        n.tick(5 * SEC, &mut out);
        assert!(out.is_empty() && n.pending() == 1, "held: its release may have been lost");
        // The repair walk found it closed: its (reconciled) release comes.
        n.on_record(&rec(6 * SEC, port(10, Proto::Udp, 40000, None), release()), &mut out);
        n.hold_decisions(false);
        n.tick(7 * SEC, &mut out);
        assert!(out.is_empty() && n.pending() == 0, "{out:?}");
        // One still open after the repair is judged then.
        n.on_record(&rec(8 * SEC, port(11, Proto::Udp, 40001, None), alloc(Origin::Bind, false)), &mut out);
        n.hold_decisions(true);
        n.tick(10 * SEC, &mut out);
        n.hold_decisions(false);
        n.tick(11 * SEC, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn udp_released_within_the_grace_period_is_forgotten() {
        let mut n = notices();
        let mut out = Vec::new();
        n.on_record(&rec(SEC, port(9, Proto::Udp, 40000, None), alloc(Origin::Bind, false)), &mut out);
        n.on_record(&rec(SEC + 5, port(9, Proto::Udp, 40000, None), release()), &mut out);
        assert_eq!(n.pending(), 0);
        n.tick(5 * SEC, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn udp_clients_are_not_pending() {
        let mut n = notices();
        let mut out = Vec::new();
        // bind(0), autobind and connect: the kernel chose the port.
        n.on_record(&rec(1, port(1, Proto::Udp, 40000, None), alloc(Origin::Bind, true)), &mut out);
        n.on_record(&rec(1, port(2, Proto::Udp, 40001, None), alloc(Origin::Autobind, true)), &mut out);
        n.on_record(&rec(1, port(3, Proto::Udp, 40002, Some(53)), alloc(Origin::Connect, true)), &mut out);
        // A server port outside the ranges need not wait.
        n.on_record(&rec(1, port(4, Proto::Udp, 5353, None), alloc(Origin::Bind, false)), &mut out);
        assert_eq!(n.pending(), 0);
        // An unconnected UDP socket found at start-up is a server.
        n.on_record(&rec(1, port(5, Proto::Udp, 50000, None), alloc(Origin::Snapshot, false)), &mut out);
        n.tick(10 * SEC, &mut out);
        assert_eq!(out.iter().map(|n| n.port.sock).collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn allow_list_silences_ports_and_commands() {
        let allow = AllowList::from_args(&[
            parse_allow_arg("40000,41000-41010").unwrap(),
            parse_allow_arg("systemd-resolved").unwrap(),
        ]);
        let mut n = ListenerNotices::new(allow);
        n.set_range(NS, 32768, 60999);
        let mut out = Vec::new();
        n.on_record(&rec(1, port(1, Proto::Tcp, 40000, None), listen()), &mut out);
        n.on_record(&rec(1, port(2, Proto::Tcp, 41005, None), listen()), &mut out);
        let mut resolved = port(3, Proto::Tcp, 42000, None);
        resolved.comm = "systemd-resolve".into(); // truncated by the kernel
        n.on_record(&rec(1, resolved, listen()), &mut out);
        n.on_record(&rec(1, port(4, Proto::Tcp, 42001, None), listen()), &mut out);
        assert_eq!(out.iter().map(|n| n.port.lport).collect::<Vec<_>>(), [42001]);
        assert_eq!(n.silenced(), 3);
        // A silenced socket stays silenced on later LISTEN records.
        n.on_record(&rec(2, port(1, Proto::Tcp, 40000, None), listen()), &mut out);
        assert_eq!(n.silenced(), 3);
    }

    #[test]
    fn parses_allow_lists() {
        assert_eq!(
            parse_allow_list("8080, 9000-9010,nginx,systemd-resolve").unwrap(),
            vec![
                Allow::Ports(8080..=8080),
                Allow::Ports(9000..=9010),
                Allow::Comm("nginx".into()),
                Allow::Comm("systemd-resolve".into())
            ]
        );
        assert!(parse_allow_list("0").unwrap_err().contains("out of range"));
        assert!(parse_allow_list("70000").unwrap_err().contains("out of range"));
        assert!(parse_allow_list("99999999999999999999").unwrap_err().contains("out of range"));
        assert!(parse_allow_list("90-80").unwrap_err().contains("reversed"));
        assert!(parse_allow_list("a,,b").unwrap_err().contains("empty"));
        assert!(parse_allow_list("").is_err());
        assert_eq!(parse_reserved_ports("").unwrap(), vec![]);
        assert_eq!(parse_reserved_ports("8080,9000-9001\n").unwrap(), vec![8080..=8080, 9000..=9001]);
    }

    #[test]
    fn allow_arg_works_as_a_repeatable_clap_option() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[arg(long = "allow-listener", value_parser = parse_allow_arg)]
            allow: Vec<AllowArg>,
        }
        let cli = Cli::try_parse_from(["t", "--allow-listener", "8080,nginx", "--allow-listener", "9000"]).unwrap();
        let list = AllowList::from_args(&cli.allow);
        assert_eq!(list.0.len(), 3);
        assert_eq!(Cli::try_parse_from(["t", "--allow-listener", "0"]).err().map(|e| e.exit_code()), Some(2));
    }

    #[test]
    fn memory_stays_bounded() {
        let mut n = notices();
        let mut out = Vec::new();
        for sock in 0..(MAX_REMEMBERED as u64 + 10) {
            n.on_record(&rec(sock, port(sock, Proto::Tcp, 40000 + (sock % 1000) as u16, None), listen()), &mut out);
        }
        assert!(n.noticed.len() <= MAX_REMEMBERED);
        assert!(n.summary().len() <= MAX_SUMMARY);
        assert_eq!(n.summary().iter().map(|s| s.sockets).sum::<u64>() + n.unlisted(), out.len() as u64);
    }

    #[test]
    fn renders_notices() {
        let clock = BootClock::with_offset_ns(1_795_000_000_000_000_000);
        let mut p = port(9, Proto::Tcp, 40000, None);
        p.laddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        p.family = Family::Ipv6;
        let notice = Notice {
            ts_ns: 2 * SEC,
            kind: NoticeKind::EphemeralListener,
            port: p,
            range: [32768, 60999],
            range_name: RangeName::IpLocalPortRange,
            since_ns: SEC,
        };
        let v = notice_json(&notice, &clock);
        assert_eq!(v["type"], "notice");
        assert_eq!(v["kind"], "ephemeral_listener");
        assert_eq!(v["ts"], "2026-11-18T11:06:42.000000000Z");
        assert_eq!(v["since"], "2026-11-18T11:06:41.000000000Z");
        assert_eq!(v["laddr"], "::");
        assert_eq!(v["lport"], 40000);
        assert!(v["raddr"].is_null());
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["comm"], "python3");
        assert_eq!(v["netns"], NS);
        assert_eq!(v["sock"], 9);
        assert_eq!(v["range"], json!([32768, 60999]));
        assert_eq!(v["range_name"], "ip_local_port_range");
        assert!(v["message"].as_str().unwrap().contains("ip_local_reserved_ports"));
        let line = notice_text(&notice, &clock);
        assert!(line.starts_with("11:06:42.000 notice     tcp   4242    python3         [::]:40000"), "{line}");
        assert!(line.ends_with("ephemeral_listener in ip_local_port_range 32768-60999"), "{line}");
    }

    #[test]
    fn renders_the_summary() {
        assert_eq!(summary_text(&[], 0), None);
        let mut n = notices();
        let mut out = Vec::new();
        n.on_record(&rec(1, port(1, Proto::Tcp, 40000, None), listen()), &mut out);
        n.on_record(&rec(2, port(2, Proto::Tcp, 40000, None), listen()), &mut out);
        let text = summary_text(&n.summary(), 3).unwrap();
        assert!(text.contains("tcp 0.0.0.0:40000 pid 4242 python3 (ip_local_port_range 32768-60999, 2 sockets)"));
        assert!(text.ends_with("and 3 more"), "{text}");
        let v = serde_json::to_value(n.summary()).unwrap();
        assert_eq!(v[0]["sockets"], 2);
        assert_eq!(v[0]["range_name"], "ip_local_port_range");
    }
}
