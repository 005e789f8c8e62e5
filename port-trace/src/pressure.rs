//! Ephemeral range pressure: how full each pool of local ports is, warnings
//! before the kernel runs out, and a forecast of when it will. Pure logic,
//! fed with every [`PortRecord`] (before user filters) and with each network
//! namespace's usable range.
//!
//! The pools mirror how the kernel picks a port:
//!
//! * **Connect pools** (TCP), keyed by (netns, laddr, raddr, rport).
//!   `__inet_hash_connect` may reuse a port that other sockets use toward
//!   *other* destinations (`__inet_check_established` only rejects the same
//!   4-tuple), but skips a port whose bind bucket was made by `bind()` or
//!   `listen()` (`tb->fastreuse >= 0`), and a port that a TIME_WAIT socket
//!   holds toward the same destination. So a connect pool's ports in use are
//!   its own sockets' ports (TIME_WAIT included) together with every port held
//!   by a bound or listening TCP socket on the same or a wildcard address.
//! * **Local pools**, keyed by (netns, proto, laddr): TCP `bind(0)` or
//!   `listen()` on an unbound socket (`inet_csk_find_open_port`) and every UDP
//!   port choice (`udp_lib_get_port`) need a port that no socket on the same or
//!   a wildcard address holds, whatever its peer. Their ports in use are all
//!   ports held on a compatible address.
//!
//! A pool exists while a socket that drew from it holds a port (a connect
//! socket to that destination, an ephemeral bind or UDP socket on that
//! address), and for a few seconds after a failure in it; others are dropped,
//! so memory follows the sockets alive. Only ports inside the namespace's
//! usable range (`ip_local_port_range` minus `ip_local_reserved_ports`) count.
//! The per-socket `IP_LOCAL_PORT_RANGE` option is not known here.
//!
//! A port is held from its `alloc` record to its `release` record; `state`
//! records change nothing (a TIME_WAIT socket still holds its port).
//!
//! Warnings: a pool crossing 50 %, 80 % or 95 % upward emits one
//! [`PressureEvent`], on the allocation that crosses (so before the first
//! failure when the pool fills through allocations seen). A level re-arms
//! only when the ratio falls [`HYSTERESIS`] below it, so a port coming and
//! going at a boundary does not flap. When the last armed-off level re-arms,
//! one falling event (`rising: false`, threshold 0.5) says the pool
//! recovered. A failed allocation for lack of ports (`EADDRNOTAVAIL` from a
//! TCP connect, `EAGAIN` from UDP autobind, `EADDRINUSE` from `bind(0)`)
//! emits an exhausted event (threshold 1.0) unless one was emitted for that
//! pool and the pool has not since been quiet for [`FAILURE_MEMORY_NS`] and
//! below 95 %.

use std::collections::{BTreeSet, VecDeque};

use foldhash::{HashMap, HashMapExt};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::model::{Origin, Proto};
use crate::record::{PortRecord, RecordBody};

/// The warning levels crossed upward, as shares of the usable range.
pub const LEVELS: [f64; 3] = [0.5, 0.8, 0.95];
/// The level of an exhausted pool (a failed allocation).
pub const EXHAUSTED: f64 = 1.0;
/// How far below a level the ratio must fall before the level warns again.
pub const HYSTERESIS: f64 = 0.05;
/// How long (record time) a pool is remembered after a failure in it, and
/// how quiet it must stay before another failure is reported.
pub const FAILURE_MEMORY_NS: u64 = 10 * NS_PER_S;
/// The sliding window of the exhaustion forecast, in seconds.
pub const RATE_WINDOW_S: u64 = 10;
/// The most held ports followed at once unless told otherwise (as many as
/// the tracker follows).
pub const DEFAULT_MAX_HOLDERS: usize = crate::tracker::DEFAULT_MAX_TRACKED;

const NS_PER_S: u64 = 1_000_000_000;

/// The ports a namespace hands out by itself: `ip_local_port_range` minus
/// `ip_local_reserved_ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsableRange {
    /// Lowest port of the range.
    pub low: u16,
    /// Highest port of the range (inclusive).
    pub high: u16,
    /// Reserved ports, sorted and merged by [`UsableRange::parse`].
    pub reserved: Vec<RangeInclusive<u16>>,
}

impl UsableRange {
    /// Parses the texts of `/proc/sys/net/ipv4/ip_local_port_range`
    /// (`"32768\t60999\n"`) and `ip_local_reserved_ports`
    /// (`"8080,9000-9010\n"`, or empty).
    pub fn parse(range_text: &str, reserved_text: &str) -> Result<Self, String> {
        let mut fields = range_text.split_whitespace();
        let (Some(low), Some(high), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!("ip_local_port_range {range_text:?} is not two numbers"));
        };
        let low = parse_port(low, "ip_local_port_range")?;
        let high = parse_port(high, "ip_local_port_range")?;
        if low > high {
            return Err(format!("ip_local_port_range {low}-{high} is empty"));
        }
        let mut reserved = Vec::new();
        for item in reserved_text.trim().split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (first, last) = match item.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (item, item),
            };
            let first = parse_port(first, "ip_local_reserved_ports")?;
            let last = parse_port(last, "ip_local_reserved_ports")?;
            if first > last {
                return Err(format!("ip_local_reserved_ports has an empty range {item:?}"));
            }
            reserved.push(first..=last);
        }
        Ok(Self { low, high, reserved: merge(reserved) })
    }

    /// How many ports the kernel may choose: the range minus the reserved
    /// ports inside it.
    pub fn size(&self) -> u32 {
        let whole = u32::from(self.high) - u32::from(self.low) + 1;
        let reserved: u32 = merge(self.reserved.clone())
            .iter()
            .map(|r| {
                let first = (*r.start()).max(self.low);
                let last = (*r.end()).min(self.high);
                if first > last {
                    0
                } else {
                    u32::from(last) - u32::from(first) + 1
                }
            })
            .sum();
        whole - reserved
    }

    /// Whether the kernel may choose `port` by itself.
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port) && !self.reserved.iter().any(|r| r.contains(&port))
    }
}

fn parse_port(text: &str, file: &str) -> Result<u16, String> {
    text.parse::<u16>().map_err(|_| format!("{file}: {text:?} is not a port number"))
}

/// Sorts ranges and merges those that overlap or touch.
fn merge(mut ranges: Vec<RangeInclusive<u16>>) -> Vec<RangeInclusive<u16>> {
    ranges.sort_by_key(|r| (*r.start(), *r.end()));
    let mut merged: Vec<RangeInclusive<u16>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(*r.start()) <= u32::from(*last.end()) + 1 => {
                if r.end() > last.end() {
                    *last = *last.start()..=*r.end();
                }
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// Which pool: a destination's (connect) or an address's (bind, listen, UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Network namespace inode.
    pub netns: u32,
    /// Protocol.
    pub proto: Proto,
    /// Local address.
    pub laddr: IpAddr,
    /// Destination address (connect pools only).
    pub raddr: Option<IpAddr>,
    /// Destination port (connect pools only).
    pub rport: Option<u16>,
}

/// A pool crossed a warning level (or ran out, or recovered).
#[derive(Clone, Debug, PartialEq)]
pub struct PressureEvent {
    /// CLOCK_BOOTTIME nanoseconds of the record that caused it.
    pub ts_ns: u64,
    /// Network namespace inode.
    pub netns: u32,
    /// Protocol.
    pub proto: Proto,
    /// Local address of the pool.
    pub laddr: IpAddr,
    /// Destination address (`None` for bind and UDP pools).
    pub raddr: Option<IpAddr>,
    /// Destination port (`None` for bind and UDP pools).
    pub rport: Option<u16>,
    /// Ports of the usable range in use in this pool.
    pub used: u32,
    /// Size of the usable range.
    pub capacity: u32,
    /// `used / capacity`; at least 1.0 on an exhausted event (the kernel
    /// found no port, whatever was seen).
    pub ratio: f64,
    /// The level crossed: 0.5, 0.8, 0.95, or 1.0 for a failure.
    pub threshold: f64,
    /// Seconds until the pool is full at the net allocation rate of the last
    /// [`RATE_WINDOW_S`] seconds; `None` when it is not filling.
    pub exhaust_in_s: Option<f64>,
    /// `true` when crossing upward, `false` when the pool recovered below
    /// every level.
    pub rising: bool,
}

/// How full one pool is now.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStatus {
    /// The pool.
    pub key: PoolKey,
    /// Ports of the usable range in use.
    pub used: u32,
    /// Size of the usable range.
    pub capacity: u32,
    /// `used / capacity`.
    pub ratio: f64,
    /// Forecast as in [`PressureEvent::exhaust_in_s`].
    pub exhaust_in_s: Option<f64>,
}

/// A socket that holds a port.
#[derive(Clone, Debug)]
struct Holder {
    laddr: IpAddr,
    lport: u16,
    /// The destination of a TCP connect socket (`None` for bound ones).
    dest: Option<(IpAddr, u16)>,
    /// The socket drew its port from its own pool (see [`own_pool`]).
    owns_pool: bool,
    since_ns: u64,
}

/// A set of ports competing for the same range.
#[derive(Clone, Debug)]
struct Pool {
    /// Port → how many holders counted in this pool hold it.
    ports: HashMap<u16, u32>,
    /// Holders that drew from this pool; the pool is dropped at zero.
    own: u32,
    /// Distinct ports of `ports` inside the usable range (all of them while
    /// the range is unknown).
    used: u32,
    /// Warning levels that fired and have not re-armed.
    fired: [bool; LEVELS.len()],
    /// An exhausted event was emitted.
    exhausted: bool,
    last_failure_ns: u64,
    /// Kept at least until then although no socket holds a port in it.
    keep_until_ns: u64,
    created_ns: u64,
    /// (second, net change of `used`) over the forecast window.
    rate: VecDeque<(u64, i64)>,
}

impl Pool {
    fn new(ts_ns: u64) -> Self {
        Self {
            ports: HashMap::new(),
            own: 0,
            used: 0,
            fired: [false; LEVELS.len()],
            exhausted: false,
            last_failure_ns: 0,
            keep_until_ns: 0,
            created_ns: ts_ns,
            rate: VecDeque::new(),
        }
    }

    /// Counts one more holder of `port`; returns whether `used` grew.
    fn add(&mut self, port: u16, range: Option<&UsableRange>) -> bool {
        let count = self.ports.entry(port).or_insert(0);
        *count += 1;
        if *count == 1 && range.is_none_or(|r| r.contains(port)) {
            self.used += 1;
            return true;
        }
        false
    }

    /// Counts one holder of `port` less; returns whether `used` shrank.
    fn remove(&mut self, port: u16, range: Option<&UsableRange>) -> bool {
        let Some(count) = self.ports.get_mut(&port) else {
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        self.ports.remove(&port);
        if range.is_none_or(|r| r.contains(port)) {
            self.used -= 1;
            return true;
        }
        false
    }

    fn recount(&mut self, range: Option<&UsableRange>) {
        self.used = self.ports.keys().filter(|p| range.is_none_or(|r| r.contains(**p))).count() as u32;
    }

    fn note_rate(&mut self, ts_ns: u64, change: i64) {
        let sec = ts_ns / NS_PER_S;
        // Records may come slightly out of order: keep the buckets sorted.
        let at = self.rate.partition_point(|(s, _)| *s < sec);
        match self.rate.get_mut(at) {
            Some((s, net)) if *s == sec => *net += change,
            _ => self.rate.insert(at, (sec, change)),
        }
        let newest = self.rate.back().map_or(sec, |(s, _)| *s);
        while self.rate.front().is_some_and(|(s, _)| *s + RATE_WINDOW_S <= newest) {
            self.rate.pop_front();
        }
    }

    /// Seconds until full at the net rate over the last [`RATE_WINDOW_S`]
    /// seconds (from the pool's creation when younger).
    fn forecast(&self, now_ns: u64, capacity: u32) -> Option<f64> {
        let now_sec = now_ns / NS_PER_S;
        let first_sec = (now_sec + 1).saturating_sub(RATE_WINDOW_S);
        let net: i64 = self.rate.iter().filter(|(s, _)| *s >= first_sec && *s <= now_sec).map(|(_, n)| n).sum();
        if net <= 0 {
            return None;
        }
        let start_ns = (first_sec * NS_PER_S).max(self.created_ns);
        let span_s = now_ns.saturating_sub(start_ns).max(NS_PER_S) as f64 / NS_PER_S as f64;
        let free = f64::from(capacity.saturating_sub(self.used));
        Some(free / (net as f64 / span_s))
    }

    fn ratio(&self, capacity: u32) -> f64 {
        f64::from(self.used) / f64::from(capacity)
    }

    fn event(&self, key: &PoolKey, ts_ns: u64, capacity: u32, threshold: f64, rising: bool) -> PressureEvent {
        PressureEvent {
            ts_ns,
            netns: key.netns,
            proto: key.proto,
            laddr: key.laddr,
            raddr: key.raddr,
            rport: key.rport,
            used: self.used,
            capacity,
            ratio: self.ratio(capacity),
            threshold,
            exhaust_in_s: self.forecast(ts_ns, capacity),
            rising,
        }
    }

    /// Checks the warning levels after `used` changed.
    fn evaluate(&mut self, key: &PoolKey, ts_ns: u64, capacity: u32, out: &mut Vec<PressureEvent>) {
        if capacity == 0 {
            return;
        }
        let ratio = self.ratio(capacity);
        let any_fired = self.fired.iter().any(|f| *f);
        for (fired, level) in self.fired.iter_mut().zip(LEVELS) {
            if *fired && ratio < level - HYSTERESIS {
                *fired = false;
            }
        }
        if any_fired && !self.fired.iter().any(|f| *f) {
            out.push(self.event(key, ts_ns, capacity, LEVELS[0], false));
            return;
        }
        // The highest level newly reached; lower ones count as passed.
        if let Some(top) = (0..LEVELS.len()).rev().find(|i| !self.fired[*i] && ratio >= LEVELS[*i]) {
            for fired in &mut self.fired[..=top] {
                *fired = true;
            }
            out.push(self.event(key, ts_ns, capacity, LEVELS[top], true));
        }
    }

    /// A failure to find a port in this pool.
    fn fail(&mut self, key: &PoolKey, ts_ns: u64, capacity: u32, out: &mut Vec<PressureEvent>) {
        self.keep_until_ns = self.keep_until_ns.max(ts_ns.saturating_add(FAILURE_MEMORY_NS));
        if self.exhausted
            && (capacity == 0 || self.ratio(capacity) < EXHAUSTED - HYSTERESIS)
            && ts_ns.saturating_sub(self.last_failure_ns) >= FAILURE_MEMORY_NS
        {
            self.exhausted = false;
        }
        self.last_failure_ns = ts_ns;
        if self.exhausted {
            return;
        }
        self.exhausted = true;
        let mut event = self.event(key, ts_ns, capacity, EXHAUSTED, true);
        event.ratio = if capacity == 0 { EXHAUSTED } else { event.ratio.max(EXHAUSTED) };
        event.exhaust_in_s = Some(0.0);
        out.push(event);
    }
}

/// Whether sockets on these local addresses compete for the same ports
/// (`inet_rcv_saddr_equal` with wildcards): equal addresses, or a wildcard on
/// either side (`0.0.0.0` covers IPv4 and v4-mapped addresses; `::` covers
/// every address, as a dual-stack socket does).
fn compatible(a: IpAddr, b: IpAddr) -> bool {
    let (a, b) = (a.to_canonical(), b.to_canonical());
    a == b || covers(a, b) || covers(b, a)
}

fn covers(wildcard: IpAddr, other: IpAddr) -> bool {
    match wildcard {
        IpAddr::V6(w) => w.is_unspecified(),
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
    }
}

/// Which pool a newly held port was drawn from, if any: the destination's
/// for a TCP connect, the address's for an ephemeral bind or a UDP port the
/// kernel chose. Explicit ports and sockets found at start drew from none
/// (they still count in the pools they compete with).
fn own_pool(proto: Proto, origin: Origin, ephemeral: bool, dest: Option<(IpAddr, u16)>) -> bool {
    match (proto, origin) {
        (Proto::Tcp, Origin::Connect | Origin::Snapshot) => dest.is_some(),
        (Proto::Udp, Origin::Snapshot) => false,
        (Proto::Udp, Origin::Connect | Origin::Autobind) => true,
        _ => ephemeral,
    }
}

/// The ports of one namespace and protocol.
#[derive(Default)]
struct Space {
    /// Bound or listening TCP sockets, and every UDP socket: their ports
    /// count in every pool on a compatible address.
    bound: HashMap<u64, Holder>,
    /// TCP connect sockets: their ports count in their destination's pool
    /// and in the local pools on a compatible address.
    connected: HashMap<u64, Holder>,
    connect_pools: HashMap<(IpAddr, IpAddr, u16), Pool>,
    local_pools: HashMap<IpAddr, Pool>,
}

/// What [`Space::adjust`] needs besides the space.
struct Context<'a> {
    netns: u32,
    proto: Proto,
    ts_ns: u64,
    range: Option<&'a RangeInfo>,
    /// Count the change in the pools' allocation rates.
    count_rate: bool,
}

impl Context<'_> {
    fn usable(&self) -> Option<&UsableRange> {
        self.range.map(|r| &r.range)
    }
}

impl Space {
    fn holders(&self) -> usize {
        self.bound.len() + self.connected.len()
    }

    /// Adds (`add`) or removes one holder's port in every pool that counts
    /// it, and checks the warning levels of the pools whose use changed.
    fn adjust(&mut self, holder: &Holder, connected: bool, add: bool, cx: &Context, out: &mut Vec<PressureEvent>) {
        let mut touch = |pool: &mut Pool, key: PoolKey| {
            let changed =
                if add { pool.add(holder.lport, cx.usable()) } else { pool.remove(holder.lport, cx.usable()) };
            if changed {
                if cx.count_rate {
                    pool.note_rate(cx.ts_ns, if add { 1 } else { -1 });
                }
                if let Some(info) = cx.range {
                    pool.evaluate(&key, cx.ts_ns, info.capacity, out);
                }
            }
        };
        let key = |laddr, dest: Option<(IpAddr, u16)>| PoolKey {
            netns: cx.netns,
            proto: cx.proto,
            laddr,
            raddr: dest.map(|d| d.0),
            rport: dest.map(|d| d.1),
        };
        if cx.proto == Proto::Tcp {
            match (connected, holder.dest) {
                (true, Some(dest)) => {
                    if let Some(pool) = self.connect_pools.get_mut(&(holder.laddr, dest.0, dest.1)) {
                        touch(pool, key(holder.laddr, Some(dest)));
                    }
                }
                (true, None) => {}
                // A port held through bind() or listen() blocks connects to
                // every destination (`tb->fastreuse >= 0`).
                (false, _) => {
                    for ((laddr, raddr, rport), pool) in &mut self.connect_pools {
                        if compatible(*laddr, holder.laddr) {
                            touch(pool, key(*laddr, Some((*raddr, *rport))));
                        }
                    }
                }
            }
        }
        for (laddr, pool) in &mut self.local_pools {
            if compatible(*laddr, holder.laddr) {
                touch(pool, key(*laddr, None));
            }
        }
    }

    /// A new pool with the ports it competes with now.
    fn seeded_pool(&self, laddr: IpAddr, dest: Option<(IpAddr, u16)>, ts_ns: u64, range: Option<&UsableRange>) -> Pool {
        let mut pool = Pool::new(ts_ns);
        let compatible_ports = |holders: &HashMap<u64, Holder>| {
            holders.values().filter(|h| compatible(h.laddr, laddr)).map(|h| h.lport).collect::<Vec<_>>()
        };
        let mut ports = compatible_ports(&self.bound);
        // Connect sockets count in local pools; in a destination's pool only
        // its own sockets do, and there are none before the pool exists.
        if dest.is_none() {
            ports.extend(compatible_ports(&self.connected));
        }
        for port in ports {
            pool.add(port, range);
        }
        pool
    }

    fn pool_mut(&mut self, laddr: IpAddr, dest: Option<(IpAddr, u16)>) -> Option<&mut Pool> {
        match dest {
            Some((raddr, rport)) => self.connect_pools.get_mut(&(laddr, raddr, rport)),
            None => self.local_pools.get_mut(&laddr),
        }
    }

    /// The pool `laddr`/`dest` names, made (and seeded) when missing.
    fn pool_or_seed(
        &mut self,
        laddr: IpAddr,
        dest: Option<(IpAddr, u16)>,
        ts_ns: u64,
        range: Option<&UsableRange>,
    ) -> &mut Pool {
        if self.pool_mut(laddr, dest).is_none() {
            let pool = self.seeded_pool(laddr, dest, ts_ns, range);
            match dest {
                Some((raddr, rport)) => self.connect_pools.insert((laddr, raddr, rport), pool),
                None => self.local_pools.insert(laddr, pool),
            };
        }
        self.pool_mut(laddr, dest).expect("pool inserted above")
    }

    /// Removes a holder; returns it and whether it was a connect socket.
    fn take(&mut self, sock: u64) -> Option<(Holder, bool)> {
        if let Some(h) = self.connected.remove(&sock) {
            return Some((h, true));
        }
        self.bound.remove(&sock).map(|h| (h, false))
    }

    /// Drops a holder's claim on its own pool, and the pool when nothing
    /// else keeps it.
    fn disown(&mut self, holder: &Holder, ts_ns: u64) {
        if !holder.owns_pool {
            return;
        }
        let dest = holder.dest;
        let Some(pool) = self.pool_mut(holder.laddr, dest) else {
            return;
        };
        pool.own = pool.own.saturating_sub(1);
        if pool.own == 0 && pool.keep_until_ns <= ts_ns {
            match dest {
                Some((raddr, rport)) => self.connect_pools.remove(&(holder.laddr, raddr, rport)),
                None => self.local_pools.remove(&holder.laddr),
            };
        }
    }

    fn pools(&self) -> impl Iterator<Item = (IpAddr, Option<(IpAddr, u16)>, &Pool)> {
        let connect = self.connect_pools.iter().map(|((l, r, p), pool)| (*l, Some((*r, *p)), pool));
        let local = self.local_pools.iter().map(|(l, pool)| (*l, None, pool));
        connect.chain(local)
    }
}

#[derive(Clone, Debug)]
struct RangeInfo {
    range: UsableRange,
    capacity: u32,
}

/// Every pool of every namespace: feed it all records with
/// [`Pools::on_record`] and each namespace's range with [`Pools::set_range`].
pub struct Pools {
    spaces: HashMap<(u32, Proto), Space>,
    ranges: HashMap<u32, RangeInfo>,
    /// Every (netns, proto) a record named.
    seen: BTreeSet<(u32, Proto)>,
    now_ns: u64,
    last_sweep_ns: u64,
    max_holders: usize,
    holders: usize,
}

impl Default for Pools {
    fn default() -> Self {
        Self::new()
    }
}

impl Pools {
    /// No pools, following at most [`DEFAULT_MAX_HOLDERS`] held ports.
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_MAX_HOLDERS)
    }

    /// No pools, following at most `max` held ports: past that the oldest
    /// sixteenth is forgotten (their releases may never come, e.g. when the
    /// tracker evicted them).
    pub fn with_limit(max: usize) -> Self {
        Self {
            spaces: HashMap::new(),
            ranges: HashMap::new(),
            seen: BTreeSet::new(),
            now_ns: 0,
            last_sweep_ns: 0,
            max_holders: max.max(16),
            holders: 0,
        }
    }

    /// Sets (or replaces) a namespace's usable range and recounts its pools.
    pub fn set_range(&mut self, netns: u32, range: UsableRange) {
        let capacity = range.size();
        for ((ns, _), space) in &mut self.spaces {
            if *ns == netns {
                for pool in space.connect_pools.values_mut().chain(space.local_pools.values_mut()) {
                    pool.recount(Some(&range));
                }
            }
        }
        self.ranges.insert(netns, RangeInfo { range, capacity });
    }

    /// A namespace's usable range, when set.
    pub fn range(&self, netns: u32) -> Option<&UsableRange> {
        self.ranges.get(&netns).map(|r| &r.range)
    }

    /// Every namespace with a range set, with the range's usable size.
    pub fn range_sizes(&self) -> Vec<(u32, u32)> {
        let mut sizes: Vec<(u32, u32)> = self.ranges.iter().map(|(ns, r)| (*ns, r.capacity)).collect();
        sizes.sort_unstable();
        sizes
    }

    /// Namespaces that records named and whose range is not set yet (the
    /// caller reads it from the kernel and calls [`Pools::set_range`]).
    pub fn netns_without_range(&self) -> Vec<u32> {
        let mut missing: Vec<u32> =
            self.seen.iter().map(|(ns, _)| *ns).filter(|ns| !self.ranges.contains_key(ns)).collect();
        missing.dedup();
        missing
    }

    /// Takes one record into account; pressure events go to `out`.
    pub fn on_record(&mut self, rec: &PortRecord, out: &mut Vec<PressureEvent>) {
        self.now_ns = self.now_ns.max(rec.ts_ns);
        self.seen.insert((rec.port.netns, rec.port.proto));
        match &rec.body {
            RecordBody::Alloc { origin, ephemeral } => self.alloc(rec, *origin, *ephemeral, out),
            RecordBody::AllocFail { errno, .. } => self.fail(rec, *errno, out),
            RecordBody::Release { .. } => self.release(rec, out),
            RecordBody::State { .. } => {}
        }
        if self.now_ns.saturating_sub(self.last_sweep_ns) >= FAILURE_MEMORY_NS {
            self.sweep();
        }
    }

    fn alloc(&mut self, rec: &PortRecord, origin: Origin, ephemeral: bool, out: &mut Vec<PressureEvent>) {
        let p = &rec.port;
        if p.lport == 0 {
            return;
        }
        // A second alloc for a socket that holds a port replaces the first.
        self.forget(p.netns, p.proto, p.sock, rec.ts_ns, false, out);
        if self.holders >= self.max_holders {
            self.make_room();
        }
        let dest = p.raddr.zip(p.rport);
        let connected =
            p.proto == Proto::Tcp && (origin == Origin::Connect || (origin == Origin::Snapshot && dest.is_some()));
        let holder = Holder {
            laddr: p.laddr,
            lport: p.lport,
            dest: if connected { dest } else { None },
            owns_pool: own_pool(p.proto, origin, ephemeral, dest),
            since_ns: rec.ts_ns,
        };
        let cx = Context {
            netns: p.netns,
            proto: p.proto,
            ts_ns: rec.ts_ns,
            range: self.ranges.get(&p.netns),
            count_rate: true,
        };
        let space = self.spaces.entry((p.netns, p.proto)).or_default();
        if holder.owns_pool {
            space.pool_or_seed(holder.laddr, holder.dest, rec.ts_ns, cx.usable()).own += 1;
        }
        space.adjust(&holder, connected, true, &cx, out);
        if connected {
            space.connected.insert(p.sock, holder);
        } else {
            space.bound.insert(p.sock, holder);
        }
        self.holders += 1;
    }

    fn release(&mut self, rec: &PortRecord, out: &mut Vec<PressureEvent>) {
        let p = &rec.port;
        self.forget(p.netns, p.proto, p.sock, rec.ts_ns, true, out);
    }

    /// Removes a holder if there is one.
    fn forget(
        &mut self,
        netns: u32,
        proto: Proto,
        sock: u64,
        ts_ns: u64,
        count_rate: bool,
        out: &mut Vec<PressureEvent>,
    ) {
        let Some(space) = self.spaces.get_mut(&(netns, proto)) else {
            return;
        };
        let Some((holder, connected)) = space.take(sock) else {
            return;
        };
        self.holders -= 1;
        let cx = Context { netns, proto, ts_ns, range: self.ranges.get(&netns), count_rate };
        space.adjust(&holder, connected, false, &cx, out);
        space.disown(&holder, ts_ns);
    }

    fn fail(&mut self, rec: &PortRecord, errno: i32, out: &mut Vec<PressureEvent>) {
        let p = &rec.port;
        // Only the errors that mean "no free port": `__inet_hash_connect`
        // gives EADDRNOTAVAIL, `inet_autobind` EAGAIN, and `bind(0)` on a
        // full range EADDRINUSE (a bind to a given port failing with
        // EADDRINUSE is a conflict, not pressure).
        let dest = match (p.proto, errno) {
            (Proto::Tcp, libc::EADDRNOTAVAIL) => p.raddr.zip(p.rport),
            (Proto::Tcp, libc::EADDRINUSE) | (Proto::Udp, libc::EADDRINUSE) if p.lport == 0 => None,
            (Proto::Udp, libc::EAGAIN) => None,
            _ => return,
        };
        // Without the range there is no capacity: the next failure, once
        // the caller has set the range, reports it.
        let Some(info) = self.ranges.get(&p.netns) else {
            return;
        };
        let space = self.spaces.entry((p.netns, p.proto)).or_default();
        // A connect that found no port reports no source address (the
        // kernel clears it on the failure): its pool is the destination's,
        // from the local address that has one (the fullest, if several).
        let laddr = match dest {
            Some((raddr, rport)) if p.laddr.is_unspecified() => space
                .connect_pools
                .iter()
                .filter(|((_, r, port), _)| (*r, *port) == (raddr, rport))
                .max_by(|((la, _, _), a), ((lb, _, _), b)| a.used.cmp(&b.used).then(lb.cmp(la)))
                .map_or(p.laddr, |((laddr, _, _), _)| *laddr),
            _ => p.laddr,
        };
        let key = PoolKey { netns: p.netns, proto: p.proto, laddr, raddr: dest.map(|d| d.0), rport: dest.map(|d| d.1) };
        space.pool_or_seed(laddr, dest, rec.ts_ns, Some(&info.range)).fail(&key, rec.ts_ns, info.capacity, out);
    }

    /// Forgets the oldest sixteenth of the held ports.
    fn make_room(&mut self) {
        let mut ages: Vec<(u64, u32, Proto, u64)> = self
            .spaces
            .iter()
            .flat_map(|((ns, proto), s)| {
                s.bound.iter().chain(s.connected.iter()).map(move |(sock, h)| (h.since_ns, *ns, *proto, *sock))
            })
            .collect();
        let drop = (self.max_holders / 16).clamp(1, ages.len().max(1));
        if ages.is_empty() {
            return;
        }
        ages.select_nth_unstable(drop - 1);
        let mut ignored = Vec::new();
        for (_, ns, proto, sock) in ages.into_iter().take(drop) {
            self.forget(ns, proto, sock, self.now_ns, false, &mut ignored);
        }
    }

    /// Drops pools kept after a failure once their time is up, and empty
    /// namespaces.
    fn sweep(&mut self) {
        let now = self.now_ns;
        self.last_sweep_ns = now;
        self.spaces.retain(|_, space| {
            space.connect_pools.retain(|_, p| p.own > 0 || p.keep_until_ns > now);
            space.local_pools.retain(|_, p| p.own > 0 || p.keep_until_ns > now);
            space.holders() > 0 || !space.connect_pools.is_empty() || !space.local_pools.is_empty()
        });
    }

    /// The `n` fullest pools of namespaces with a known range, fullest first.
    pub fn busiest(&self, n: usize) -> Vec<PoolStatus> {
        self.statuses(n, |_| true)
    }

    /// The `n` fullest destination (TCP connect) pools, fullest first.
    pub fn busiest_destinations(&self, n: usize) -> Vec<PoolStatus> {
        self.statuses(n, |key| key.raddr.is_some())
    }

    fn statuses(&self, n: usize, wanted: impl Fn(&PoolKey) -> bool) -> Vec<PoolStatus> {
        let mut all = Vec::new();
        for ((netns, proto), space) in &self.spaces {
            let Some(info) = self.ranges.get(netns).filter(|i| i.capacity > 0) else {
                continue;
            };
            for (laddr, dest, pool) in space.pools() {
                let key =
                    PoolKey { netns: *netns, proto: *proto, laddr, raddr: dest.map(|d| d.0), rport: dest.map(|d| d.1) };
                if !wanted(&key) || pool.own == 0 {
                    continue;
                }
                all.push(PoolStatus {
                    key,
                    used: pool.used,
                    capacity: info.capacity,
                    ratio: pool.ratio(info.capacity),
                    exhaust_in_s: pool.forecast(self.now_ns, info.capacity),
                });
            }
        }
        all.sort_by(|a, b| b.ratio.total_cmp(&a.ratio).then(b.used.cmp(&a.used)).then(a.key.cmp(&b.key)));
        all.truncate(n);
        all
    }

    /// Ports held now (sockets holding one, TIME_WAIT included, inside the
    /// range or not) per namespace and protocol; every pair a record named
    /// is listed, with 0 when nothing is held.
    pub fn ports_in_use_by(&self) -> Vec<(u32, Proto, u64)> {
        self.seen.iter().map(|key| (key.0, key.1, self.spaces.get(key).map_or(0, |s| s.holders() as u64))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, ReleaseReason, TcpState};
    use crate::record::PortRef;

    const NS: u32 = 4026531840;
    const SEC: u64 = NS_PER_S;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn port_ref(sock: u64, proto: Proto, laddr: &str, lport: u16, dest: Option<(&str, u16)>) -> PortRef {
        PortRef {
            sock,
            netns: NS,
            proto,
            family: if ip(laddr).is_ipv4() { Family::Ipv4 } else { Family::Ipv6 },
            laddr: ip(laddr),
            lport,
            raddr: dest.map(|d| ip(d.0)),
            rport: dest.map(|d| d.1),
            pid: 42,
            comm: "client".into(),
            cgroup: 0,
            ephemeral: Some(true),
        }
    }

    fn alloc(ts_ns: u64, port: PortRef, origin: Origin, ephemeral: bool) -> PortRecord {
        PortRecord { ts_ns, port, body: RecordBody::Alloc { origin, ephemeral } }
    }

    fn connect(ts_ns: u64, sock: u64, lport: u16, dest: (&str, u16)) -> PortRecord {
        alloc(ts_ns, port_ref(sock, Proto::Tcp, "10.0.0.1", lport, Some(dest)), Origin::Connect, true)
    }

    fn release(ts_ns: u64, port: PortRef, reason: ReleaseReason) -> PortRecord {
        PortRecord { ts_ns, port, body: RecordBody::Release { reason, held_ns: None, origin: None, alloc_ts_ns: None } }
    }

    fn close_connect(ts_ns: u64, sock: u64, lport: u16, dest: (&str, u16)) -> PortRecord {
        release(ts_ns, port_ref(sock, Proto::Tcp, "10.0.0.1", lport, Some(dest)), ReleaseReason::Close)
    }

    fn fail(ts_ns: u64, proto: Proto, errno: i32, dest: Option<(&str, u16)>) -> PortRecord {
        PortRecord {
            ts_ns,
            port: port_ref(999_999, proto, "10.0.0.1", 0, dest),
            body: RecordBody::AllocFail { errno, origin: Origin::Connect },
        }
    }

    fn pools_with_range(low: u16, high: u16) -> Pools {
        let mut pools = Pools::new();
        pools.set_range(NS, UsableRange::parse(&format!("{low}\t{high}\n"), "").unwrap());
        pools
    }

    fn feed(pools: &mut Pools, rec: PortRecord) -> Vec<PressureEvent> {
        let mut out = Vec::new();
        pools.on_record(&rec, &mut out);
        out
    }

    fn status_of(pools: &Pools, dest: Option<(&str, u16)>) -> Option<PoolStatus> {
        pools
            .busiest(usize::MAX)
            .into_iter()
            .find(|s| s.key.raddr == dest.map(|d| ip(d.0)) && s.key.rport == dest.map(|d| d.1))
    }

    const DEST: (&str, u16) = ("10.0.0.9", 443);
    const OTHER: (&str, u16) = ("10.0.0.8", 80);

    #[test]
    fn range_parses_proc_texts_and_subtracts_reserved_ports() {
        let range =
            UsableRange::parse("32768\t60999\n", "8080,9000-9010,40000-40009,40005-40019,60990-61010\n").unwrap();
        assert_eq!((range.low, range.high), (32768, 60999));
        // Overlapping reserved ranges are merged.
        assert_eq!(range.reserved, vec![8080..=8080, 9000..=9010, 40000..=40019, 60990..=61010]);
        // Only the reserved ports inside the range count: 20 + 10 (60990-60999).
        assert_eq!(range.size(), (60999 - 32768 + 1) - 20 - 10);
        assert!(range.contains(32768) && range.contains(60989));
        assert!(!range.contains(40005) && !range.contains(60995) && !range.contains(8080) && !range.contains(32767));
        let empty_reserved = UsableRange::parse("1024 1024", "\n").unwrap();
        assert_eq!(empty_reserved.size(), 1);
    }

    #[test]
    fn bad_range_texts_are_errors() {
        for (range, reserved) in [
            ("", ""),
            ("32768", ""),
            ("1 2 3", ""),
            ("60999 32768", ""),
            ("a b", ""),
            ("1 70000", ""),
            ("1 9", "5-3"),
            ("1 9", "x"),
            ("1 9", "1-2-3"),
        ] {
            assert!(UsableRange::parse(range, reserved).is_err(), "{range:?} {reserved:?}");
        }
    }

    #[test]
    fn reserved_ports_are_neither_capacity_nor_use() {
        let mut pools = Pools::new();
        pools.set_range(NS, UsableRange::parse("40000 40009", "40005-40009").unwrap());
        feed(&mut pools, connect(0, 1, 40001, DEST));
        // An explicit connect from a reserved port (bound by hand) does not count.
        feed(&mut pools, connect(0, 2, 40006, DEST));
        let status = status_of(&pools, Some(DEST)).unwrap();
        assert_eq!((status.used, status.capacity), (1, 5));
        assert!((status.ratio - 0.2).abs() < 1e-9);
    }

    #[test]
    fn bound_ports_count_for_every_destination_but_connect_ports_only_for_theirs() {
        let mut pools = pools_with_range(40000, 40099);
        // A listener on an ephemeral-range port blocks connects everywhere.
        feed(&mut pools, alloc(0, port_ref(1, Proto::Tcp, "0.0.0.0", 40050, None), Origin::Bind, false));
        for (sock, lport) in [(10, 40000), (11, 40001), (12, 40002)] {
            feed(&mut pools, connect(0, sock, lport, DEST));
        }
        // The same port toward another destination: allowed by the kernel,
        // and not part of DEST's pool.
        feed(&mut pools, connect(0, 20, 40000, OTHER));
        assert_eq!(status_of(&pools, Some(DEST)).unwrap().used, 4);
        assert_eq!(status_of(&pools, Some(OTHER)).unwrap().used, 2);
        // The listener is explicit (not ephemeral): it made no pool of its own.
        assert_eq!(status_of(&pools, None), None);
        // The listener going away frees its port in both pools.
        feed(&mut pools, release(1, port_ref(1, Proto::Tcp, "0.0.0.0", 40050, None), ReleaseReason::Close));
        assert_eq!(status_of(&pools, Some(DEST)).unwrap().used, 3);
        assert_eq!(status_of(&pools, Some(OTHER)).unwrap().used, 1);
    }

    #[test]
    fn ephemeral_bind_pool_counts_every_tcp_port_on_a_compatible_address() {
        let mut pools = pools_with_range(40000, 40099);
        feed(&mut pools, connect(0, 10, 40000, DEST));
        feed(&mut pools, connect(0, 11, 40001, OTHER));
        // bind(0) on the wildcard: competes with every socket in the netns.
        feed(&mut pools, alloc(0, port_ref(1, Proto::Tcp, "0.0.0.0", 40002, None), Origin::Bind, true));
        let local = status_of(&pools, None).unwrap();
        assert_eq!(local.key.laddr, ip("0.0.0.0"));
        assert_eq!(local.used, 3);
        // ... and its port now blocks both destinations.
        assert_eq!(status_of(&pools, Some(DEST)).unwrap().used, 2);
        feed(&mut pools, connect(0, 12, 40003, DEST));
        assert_eq!(status_of(&pools, None).unwrap().used, 4);
    }

    #[test]
    fn time_wait_keeps_the_port_until_its_release() {
        let mut pools = pools_with_range(40000, 40099);
        feed(&mut pools, connect(0, 1, 40000, DEST));
        let to_time_wait = PortRecord {
            ts_ns: SEC,
            port: port_ref(1, Proto::Tcp, "10.0.0.1", 40000, Some(DEST)),
            body: RecordBody::State { old: TcpState::FinWait2, new: TcpState::TimeWait },
        };
        feed(&mut pools, to_time_wait);
        assert_eq!(status_of(&pools, Some(DEST)).unwrap().used, 1);
        assert_eq!(pools.ports_in_use_by(), vec![(NS, Proto::Tcp, 1)]);
        feed(
            &mut pools,
            release(61 * SEC, port_ref(1, Proto::Tcp, "10.0.0.1", 40000, Some(DEST)), ReleaseReason::TimeWaitEnd),
        );
        assert_eq!(status_of(&pools, Some(DEST)), None);
        assert_eq!(pools.ports_in_use_by(), vec![(NS, Proto::Tcp, 0)]);
    }

    #[test]
    fn snapshot_sockets_count_and_connected_ones_make_their_pool() {
        let mut pools = pools_with_range(40000, 40099);
        let tw = alloc(0, port_ref(1, Proto::Tcp, "10.0.0.1", 40010, Some(DEST)), Origin::Snapshot, false);
        feed(&mut pools, tw);
        let listener = alloc(0, port_ref(2, Proto::Tcp, "::", 40020, None), Origin::Snapshot, false);
        feed(&mut pools, listener);
        assert_eq!(status_of(&pools, Some(DEST)).unwrap().used, 2);
        assert_eq!(pools.busiest(10).len(), 1);
    }

    #[test]
    fn wildcard_addresses_compete_with_every_address_of_their_family() {
        let mut pools = pools_with_range(40000, 40099);
        for (sock, laddr, lport) in [
            (1, "0.0.0.0", 40050),
            (2, "10.0.0.2", 40051),
            (3, "::", 40052),
            (4, "fe80::1", 40053),
            (5, "::ffff:10.0.0.1", 40054),
        ] {
            feed(&mut pools, alloc(0, port_ref(sock, Proto::Tcp, laddr, lport, None), Origin::Listen, false));
        }
        feed(&mut pools, connect(0, 10, 40000, DEST));
        // 10.0.0.1's pool: 0.0.0.0, ::, the v4-mapped 10.0.0.1, and its own
        // port; not 10.0.0.2 nor fe80::1.
        assert_eq!(status_of(&pools, Some(DEST)).unwrap().used, 4);
    }

    #[test]
    fn ports_outside_the_range_do_not_count() {
        let mut pools = pools_with_range(40000, 40099);
        feed(&mut pools, alloc(0, port_ref(1, Proto::Tcp, "0.0.0.0", 8080, None), Origin::Listen, false));
        feed(&mut pools, connect(0, 10, 40000, DEST));
        feed(&mut pools, connect(0, 11, 50000, DEST));
        assert_eq!(status_of(&pools, Some(DEST)).unwrap().used, 1);
        // Every held port is "in use" for the namespace count, in range or not.
        assert_eq!(pools.ports_in_use_by(), vec![(NS, Proto::Tcp, 3)]);
    }

    #[test]
    fn a_range_set_late_recounts_the_pools() {
        let mut pools = Pools::new();
        feed(&mut pools, connect(0, 10, 40000, DEST));
        feed(&mut pools, connect(0, 11, 50000, DEST));
        assert_eq!(pools.netns_without_range(), vec![NS]);
        assert!(pools.busiest(10).is_empty(), "no capacity without a range");
        pools.set_range(NS, UsableRange::parse("40000 40099", "").unwrap());
        assert!(pools.netns_without_range().is_empty());
        assert_eq!(status_of(&pools, Some(DEST)).unwrap().used, 1);
        assert_eq!(pools.range(NS).map(UsableRange::size), Some(100));
        assert_eq!(pools.range_sizes(), vec![(NS, 100)]);
    }

    #[test]
    fn filling_a_range_warns_at_each_level_before_it_is_full_then_reports_the_failure() {
        let mut pools = pools_with_range(40000, 40049);
        let mut warnings = Vec::new();
        for i in 0..50u16 {
            for event in feed(&mut pools, connect(u64::from(i) * SEC / 10, u64::from(i), 40000 + i, DEST)) {
                warnings.push((i + 1, event));
            }
        }
        let levels: Vec<(u16, f64)> = warnings.iter().map(|(n, e)| (*n, e.threshold)).collect();
        // ceil(50 * level) allocations cross each level.
        assert_eq!(levels, vec![(25, 0.5), (40, 0.8), (48, 0.95)]);
        for (n, event) in &warnings {
            assert!(event.rising);
            assert_eq!((event.used, event.capacity), (u32::from(*n), 50));
            assert_eq!(event.raddr, Some(ip(DEST.0)));
            assert!(event.ratio >= event.threshold);
            // Filling at 10 per second: the forecast is the free ports / 10.
            let expected = f64::from(50 - u32::from(*n)) / 10.0;
            assert!((event.exhaust_in_s.unwrap() - expected).abs() < 0.3, "{event:?}");
        }
        let failures = feed(&mut pools, fail(5 * SEC, Proto::Tcp, libc::EADDRNOTAVAIL, Some(DEST)));
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].threshold, EXHAUSTED);
        assert!(failures[0].ratio >= 1.0);
        assert_eq!(failures[0].exhaust_in_s, Some(0.0));
        // The next failures of the same episode say nothing new.
        assert!(feed(&mut pools, fail(5 * SEC + 1, Proto::Tcp, libc::EADDRNOTAVAIL, Some(DEST))).is_empty());
        // Other errors are not pressure.
        assert!(feed(&mut pools, fail(5 * SEC, Proto::Tcp, libc::ECONNREFUSED, Some(OTHER))).is_empty());
    }

    #[test]
    fn a_failed_connect_without_a_source_address_is_reported_on_its_destination_pool() {
        let mut pools = pools_with_range(40000, 40009);
        for i in 0..10u16 {
            feed(&mut pools, connect(0, u64::from(i), 40000 + i, DEST));
        }
        // Another local address toward the same destination, less full.
        let other_laddr = port_ref(50, Proto::Tcp, "10.0.0.2", 40000, Some(DEST));
        feed(&mut pools, alloc(0, other_laddr, Origin::Connect, true));
        // The kernel cleared the source address of the socket that failed.
        let mut failed = fail(SEC, Proto::Tcp, libc::EADDRNOTAVAIL, Some(DEST));
        failed.port.laddr = ip("0.0.0.0");
        let events = feed(&mut pools, failed);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!((events[0].laddr, events[0].used, events[0].threshold), (ip("10.0.0.1"), 10, EXHAUSTED));
        // No pool of its own for the wildcard address.
        assert!(pools.spaces.values().all(|s| s.connect_pools.keys().all(|(l, _, _)| !l.is_unspecified())));
        // Toward a destination with no pool, the failure still counts.
        let mut unseen = fail(SEC, Proto::Tcp, libc::EADDRNOTAVAIL, Some(OTHER));
        unseen.port.laddr = ip("0.0.0.0");
        let events = feed(&mut pools, unseen);
        assert_eq!((events.len(), events[0].laddr, events[0].used), (1, ip("0.0.0.0"), 0));
    }

    #[test]
    fn one_port_coming_and_going_at_a_level_does_not_flap() {
        let mut pools = pools_with_range(40000, 40099);
        let mut events = Vec::new();
        for i in 0..50u16 {
            events.extend(feed(&mut pools, connect(0, u64::from(i), 40000 + i, DEST)));
        }
        assert_eq!(events.len(), 1);
        for round in 0..20u64 {
            let ts = (round + 1) * SEC;
            events.extend(feed(&mut pools, close_connect(ts, 49, 40049, DEST)));
            events.extend(feed(&mut pools, connect(ts + 1, 49, 40049, DEST)));
        }
        assert_eq!(events.len(), 1, "{events:?}");
        // Falling below 45 % re-arms the level, with one recovery event.
        for i in (44..50u16).rev() {
            events.extend(feed(&mut pools, close_connect(30 * SEC, u64::from(i), 40000 + i, DEST)));
        }
        assert_eq!(events.len(), 2);
        assert!(!events[1].rising);
        assert_eq!(events[1].used, 44);
        for i in 44..50u16 {
            events.extend(feed(&mut pools, connect(31 * SEC, u64::from(i), 40000 + i, DEST)));
        }
        assert_eq!(events.len(), 3);
        assert!(events[2].rising && events[2].threshold == 0.5);
    }

    #[test]
    fn forecast_is_free_ports_over_the_net_rate() {
        let mut pools = pools_with_range(40000, 40999);
        // 20 allocations and 5 releases per second for 5 s: net 15/s.
        let mut sock = 0u64;
        let mut open = Vec::new();
        for second in 0..5u64 {
            for k in 0..20u64 {
                let ts = second * SEC + k * SEC / 20;
                sock += 1;
                feed(&mut pools, connect(ts, sock, 40000 + sock as u16, DEST));
                open.push(sock);
                if k % 4 == 3 {
                    let gone = open.remove(0);
                    feed(&mut pools, close_connect(ts, gone, 40000 + gone as u16, DEST));
                }
            }
        }
        let status = status_of(&pools, Some(DEST)).unwrap();
        assert_eq!(status.used, 75);
        let span_s = 4.0 + 19.0 / 20.0; // from the first record to the last
        let expected = f64::from(1000 - 75) / (75.0 / span_s);
        assert!((status.exhaust_in_s.unwrap() - expected).abs() < 1e-6, "{status:?} vs {expected}");
        // Draining: not filling, no forecast.
        for gone in open.drain(..65) {
            feed(&mut pools, close_connect(5 * SEC, gone, 40000 + gone as u16, DEST));
        }
        // Once the fill is out of the window, one more release: net < 0.
        let gone = open.remove(0);
        feed(&mut pools, close_connect(20 * SEC, gone, 40000 + gone as u16, DEST));
        let status = status_of(&pools, Some(DEST)).unwrap();
        assert_eq!((status.used, status.exhaust_in_s), (9, None));
    }

    #[test]
    fn forecast_forgets_allocations_older_than_the_window() {
        let mut pools = pools_with_range(40000, 40999);
        for i in 0..100u16 {
            feed(&mut pools, connect(0, u64::from(i), 40000 + i, DEST));
        }
        assert!(status_of(&pools, Some(DEST)).unwrap().exhaust_in_s.is_some());
        // 30.5 s later, one allocation: 101 used. The window is the current
        // second and the nine before (21 s to now): 1 allocation in 9.5 s.
        feed(&mut pools, connect(30 * SEC + SEC / 2, 500, 40500, DEST));
        let forecast = status_of(&pools, Some(DEST)).unwrap().exhaust_in_s.unwrap();
        assert!((forecast - f64::from(1000 - 101) * 9.5).abs() < 1e-6, "{forecast}");
    }

    #[test]
    fn udp_autobind_failure_is_reported_on_the_address_pool() {
        let mut pools = pools_with_range(40000, 40009);
        for i in 0..10u16 {
            let rec =
                alloc(0, port_ref(u64::from(i), Proto::Udp, "0.0.0.0", 40000 + i, Some(DEST)), Origin::Connect, true);
            feed(&mut pools, rec);
        }
        let events = feed(&mut pools, fail(SEC, Proto::Udp, libc::EAGAIN, None));
        let exhausted: Vec<_> = events.iter().filter(|e| e.threshold == EXHAUSTED).collect();
        assert_eq!(exhausted.len(), 1);
        assert_eq!((exhausted[0].proto, exhausted[0].raddr, exhausted[0].rport), (Proto::Udp, None, None));
        assert_eq!(exhausted[0].used, 10);
    }

    #[test]
    fn a_failure_in_an_unseen_pool_is_remembered_for_a_while_then_reported_again() {
        let mut pools = pools_with_range(40000, 40099);
        assert_eq!(feed(&mut pools, fail(SEC, Proto::Tcp, libc::EADDRNOTAVAIL, Some(DEST))).len(), 1);
        assert!(feed(&mut pools, fail(2 * SEC, Proto::Tcp, libc::EADDRNOTAVAIL, Some(DEST))).is_empty());
        // The kept pool is not a pool in use.
        assert!(pools.busiest(10).is_empty());
        // Quiet for longer than FAILURE_MEMORY_NS: a new episode.
        feed(&mut pools, connect(30 * SEC, 1, 40000, OTHER));
        let again = feed(&mut pools, fail(30 * SEC, Proto::Tcp, libc::EADDRNOTAVAIL, Some(DEST)));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].used, 0);
    }

    #[test]
    fn empty_pools_are_dropped() {
        let mut pools = pools_with_range(40000, 40099);
        for i in 0..10u16 {
            feed(&mut pools, connect(0, u64::from(i), 40000 + i, ("10.1.0.1", 1000 + i)));
        }
        assert_eq!(pools.busiest(100).len(), 10);
        for i in 0..10u16 {
            feed(&mut pools, close_connect(SEC, u64::from(i), 40000 + i, ("10.1.0.1", 1000 + i)));
        }
        assert!(pools.busiest(100).is_empty());
        assert!(pools.spaces.values().all(|s| s.connect_pools.is_empty() && s.holders() == 0));
    }

    #[test]
    fn the_holder_limit_forgets_the_oldest() {
        let mut pools = Pools::with_limit(32);
        pools.set_range(NS, UsableRange::parse("40000 40099", "").unwrap());
        for i in 0..40u16 {
            feed(&mut pools, connect(u64::from(i), u64::from(i), 40000 + i, DEST));
        }
        let held = pools.ports_in_use_by()[0].2;
        assert!((30..=32).contains(&held), "{held}");
        assert_eq!(status_of(&pools, Some(DEST)).unwrap().used as u64, held);
        // A release of a forgotten socket changes nothing.
        feed(&mut pools, close_connect(100, 0, 40000, DEST));
        assert_eq!(pools.ports_in_use_by()[0].2, held);
    }

    #[test]
    fn busiest_is_fullest_first_and_bounded() {
        let mut pools = pools_with_range(40000, 40099);
        let mut sock = 0;
        for (n, dest) in [(3u16, ("10.1.0.1", 80)), (7, ("10.1.0.2", 80)), (5, ("10.1.0.3", 80))] {
            for _ in 0..n {
                sock += 1;
                feed(&mut pools, connect(0, sock, 40000 + sock as u16, dest));
            }
        }
        let top: Vec<u32> = pools.busiest(2).iter().map(|s| s.used).collect();
        assert_eq!(top, vec![7, 5]);
        assert_eq!(pools.busiest_destinations(10).len(), 3);
    }
}
