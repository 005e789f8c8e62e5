//! The state behind `port-trace top`: the ports seen, how they age, and what
//! the keys do to the view. Pure: no terminal, no kernel; the time is always
//! passed in (CLOCK_BOOTTIME nanoseconds, the clock of [`PortRecord::ts_ns`]).

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::IpAddr;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::model::{Origin, Proto, ReleaseReason, TcpState};
use crate::record::{PortRecord, PortRef, RecordBody};

const NS_PER_S: u64 = 1_000_000_000;

/// How long a TCP socket stays in TIME_WAIT on Linux: `TCP_TIMEWAIT_LEN`
/// (60 s, `include/net/tcp.h`), not tunable.
pub const TCP_TIMEWAIT_LEN_NS: u64 = 60 * NS_PER_S;

/// The longest filter text accepted (longer input is ignored).
const MAX_FILTER_CHARS: usize = 64;

/// Tuning of the view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopOptions {
    /// Most rows kept; past that the oldest released row goes first, then
    /// the oldest held one, and each one dropped is counted.
    pub max_rows: usize,
    /// How long a released port stays on screen (dimmed) before it is removed.
    pub fade_ns: u64,
    /// TIME_WAIT length the countdown starts from.
    pub time_wait_ns: u64,
}

impl Default for TopOptions {
    fn default() -> Self {
        Self { max_rows: 50_000, fade_ns: 3 * NS_PER_S, time_wait_ns: TCP_TIMEWAIT_LEN_NS }
    }
}

/// What the trace loop knows once a tick, shown in the header, pressure and
/// churn panes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    /// Backend in use (`precise`, `kprobe`, `portable`).
    pub backend: String,
    /// Kernel events per second, recently.
    pub events_per_s: f64,
    /// Events lost so far (running total).
    pub lost: u64,
    /// Ephemeral range per traced namespace: (netns inode, low, high, usable ports).
    pub ranges: Vec<(u32, u16, u16, u32)>,
    /// Pools of ports and how full they are (any order).
    pub pools: Vec<crate::pressure::PoolStatus>,
    /// (allocations, releases) per second over the last 60 s, oldest first.
    pub churn_history: Vec<(u64, u64)>,
}

/// What the caller should do after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep going.
    None,
    /// Leave `top`.
    Quit,
}

/// The order of the lifecycle table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Newest allocation first.
    Age,
    /// Local port, lowest first.
    Port,
    /// Command name.
    Comm,
    /// State shown (TCP state, or how the port was released).
    State,
    /// Owner's pid, lowest first.
    Pid,
}

impl SortKey {
    /// The next key in the `s` cycle.
    pub fn next(self) -> Self {
        match self {
            SortKey::Age => SortKey::Port,
            SortKey::Port => SortKey::Comm,
            SortKey::Comm => SortKey::State,
            SortKey::State => SortKey::Pid,
            SortKey::Pid => SortKey::Age,
        }
    }

    /// Name shown in the header.
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Age => "age",
            SortKey::Port => "port",
            SortKey::Comm => "comm",
            SortKey::State => "state",
            SortKey::Pid => "pid",
        }
    }
}

/// How a port shown went back to the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// View time (the `now_ns` given with the record) when the view learnt
    /// of the release: the fade-out counts from here.
    pub seen_ns: u64,
    /// Why.
    pub reason: ReleaseReason,
    /// How long the port was held, when known.
    pub held_ns: Option<u64>,
}

/// One port in the lifecycle table (one socket, TIME_WAIT successor included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRow {
    /// Socket cookie (the row's key).
    pub sock: u64,
    /// Network namespace inode.
    pub netns: u32,
    /// Protocol.
    pub proto: Proto,
    /// Local address.
    pub laddr: IpAddr,
    /// Local port.
    pub lport: u16,
    /// Remote address, when connected.
    pub raddr: Option<IpAddr>,
    /// Remote port, when connected.
    pub rport: Option<u16>,
    /// Owner's pid.
    pub pid: u32,
    /// Owner's command name.
    pub comm: String,
    /// Allocation time, or when the port was first seen if its allocation
    /// was not.
    pub since_ns: u64,
    /// Whether the allocation was seen (else the age is a lower bound).
    pub alloc_seen: bool,
    /// Last TCP state reported (`None`: not known, or UDP).
    pub state: Option<TcpState>,
    /// When the socket moved to TIME_WAIT.
    pub time_wait_since_ns: Option<u64>,
    /// Set once the port went back to the pool.
    pub released: Option<Released>,
    /// Insertion number of this lifecycle (joins the eviction queues).
    seq: u64,
}

impl PortRow {
    fn new(port: &PortRef, ts_ns: u64, seq: u64) -> Self {
        Self {
            sock: port.sock,
            netns: port.netns,
            proto: port.proto,
            laddr: port.laddr,
            lport: port.lport,
            raddr: port.raddr,
            rport: port.rport,
            pid: port.pid,
            comm: port.comm.to_string(),
            since_ns: ts_ns,
            alloc_seen: false,
            state: None,
            time_wait_since_ns: None,
            released: None,
            seq,
        }
    }

    /// Takes the endpoints and owner a newer record reports.
    fn refresh(&mut self, port: &PortRef) {
        self.netns = port.netns;
        self.proto = port.proto;
        self.laddr = port.laddr;
        self.lport = port.lport;
        self.raddr = port.raddr;
        self.rport = port.rport;
        self.pid = port.pid;
        if self.comm != port.comm {
            self.comm.clear();
            self.comm.push_str(&port.comm);
        }
    }

    /// Whether a TIME_WAIT socket holds the port now.
    pub fn in_time_wait(&self) -> bool {
        self.released.is_none() && self.time_wait_since_ns.is_some()
    }

    /// Age shown: time held so far, or in all for a released port.
    pub fn age_ns(&self, now_ns: u64) -> u64 {
        match &self.released {
            Some(released) => released.held_ns.unwrap_or(0),
            None => now_ns.saturating_sub(self.since_ns),
        }
    }

    /// Time left in TIME_WAIT (`time_wait_ns` minus the time spent in it),
    /// for a port a TIME_WAIT socket holds.
    pub fn time_wait_left_ns(&self, now_ns: u64, time_wait_ns: u64) -> Option<u64> {
        if self.released.is_some() {
            return None;
        }
        let since = self.time_wait_since_ns?;
        Some(time_wait_ns.saturating_sub(now_ns.saturating_sub(since)))
    }

    /// State column text: the TCP state, `-` when unknown, or how the port
    /// was released.
    pub fn state_text(&self) -> &'static str {
        if let Some(released) = &self.released {
            return match released.reason {
                ReleaseReason::Close => "closed",
                ReleaseReason::TimeWaitEnd => "tw ended",
                ReleaseReason::Disconnect => "disconnected",
                ReleaseReason::ConnectFailed => "conn failed",
                ReleaseReason::Reconciled => "gone",
            };
        }
        self.state.map_or("-", TcpState::name)
    }
}

/// `addr:port`, with IPv6 addresses in brackets.
pub fn format_endpoint(addr: IpAddr, port: u16) -> String {
    let mut out = String::new();
    write_endpoint(&mut out, addr, port);
    out
}

fn write_endpoint(out: &mut String, addr: IpAddr, port: u16) {
    // Writing to a String cannot fail.
    let _ = match addr {
        IpAddr::V4(v4) => write!(out, "{v4}:{port}"),
        IpAddr::V6(v6) => write!(out, "[{v6}]:{port}"),
    };
}

/// A duration for a person: `850ms`, `12.3s`, `5m02s`, `1h05m`, `3d02h`.
pub fn format_duration_ns(ns: u64) -> String {
    let secs = ns / NS_PER_S;
    if secs < 1 {
        format!("{}ms", ns / 1_000_000)
    } else if secs < 60 {
        format!("{:.1}s", ns as f64 / NS_PER_S as f64)
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else if secs < 86_400 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600)
    }
}

/// Whether `needle` (ASCII case ignored) occurs in `haystack`.
fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    let needle = needle.as_bytes();
    needle.is_empty() || haystack.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// Running counts since the view started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Allocation records.
    pub allocs: u64,
    /// Release records.
    pub releases: u64,
    /// Failed allocation records.
    pub alloc_fails: u64,
    /// The last failure's errno (positive).
    pub last_fail_errno: Option<i32>,
    /// TCP state change records.
    pub state_changes: u64,
    /// Events lost, as told by [`TopView::on_lost`].
    pub lost: u64,
    /// Rows dropped to keep within [`TopOptions::max_rows`].
    pub dropped_rows: u64,
}

/// The table as it was when `p` was pressed.
#[derive(Clone, Debug)]
struct Frozen {
    rows: Vec<PortRow>,
    now_ns: u64,
}

/// Everything `port-trace top` shows, fed by the trace loop and the keys.
#[derive(Debug)]
pub struct TopView {
    options: TopOptions,
    rows: HashMap<u64, PortRow>,
    /// (seq, sock) in insertion order; stale entries are skipped lazily.
    order: VecDeque<(u64, u64)>,
    /// (seq, sock) in release order; stale entries are skipped lazily.
    released_order: VecDeque<(u64, u64)>,
    next_seq: u64,
    counters: Counters,
    status: Status,
    last_now_ns: u64,
    sort: SortKey,
    filter: String,
    filter_draft: Option<String>,
    show_time_wait: bool,
    help: bool,
    frozen: Option<Frozen>,
    scroll: usize,
    page_rows: usize,
    /// TCP sockets found by the start-up walk (their records carry no
    /// state): asked of the tracker by [`TopView::fill_states`].
    states_unknown: Vec<u64>,
}

impl TopView {
    /// An empty view.
    pub fn new(options: TopOptions) -> Self {
        Self {
            options: TopOptions { max_rows: options.max_rows.max(1), ..options },
            rows: HashMap::new(),
            order: VecDeque::new(),
            released_order: VecDeque::new(),
            next_seq: 0,
            counters: Counters::default(),
            status: Status::default(),
            last_now_ns: 0,
            sort: SortKey::Age,
            filter: String::new(),
            filter_draft: None,
            show_time_wait: true,
            help: false,
            frozen: None,
            scroll: 0,
            page_rows: 10,
            states_unknown: Vec::new(),
        }
    }

    /// Takes one record (one that passed the user's filters). `now_ns` is
    /// CLOCK_BOOTTIME now. Amortised O(1): no sorting or formatting here.
    pub fn on_record(&mut self, record: &PortRecord, now_ns: u64) {
        self.tick(now_ns);
        match &record.body {
            RecordBody::Alloc { origin, .. } => {
                self.counters.allocs += 1;
                let sock = record.port.sock;
                if *origin == Origin::Snapshot && record.port.proto == Proto::Tcp {
                    self.states_unknown.push(sock);
                }
                let row = self.upsert(record);
                // A second allocation for the socket key starts a new
                // lifecycle: older queue entries must no longer name it.
                let seq = if row.released.is_some() || row.alloc_seen {
                    let seq = self.new_seq();
                    self.order.push_back((seq, sock));
                    Some(seq)
                } else {
                    None
                };
                let Some(row) = self.rows.get_mut(&sock) else { return };
                if let Some(seq) = seq {
                    row.seq = seq;
                }
                row.since_ns = record.ts_ns;
                row.alloc_seen = true;
                row.state = None;
                row.time_wait_since_ns = None;
                row.released = None;
                self.compact_queues();
            }
            RecordBody::AllocFail { errno, .. } => {
                self.counters.alloc_fails += 1;
                self.counters.last_fail_errno = Some(*errno);
            }
            RecordBody::State { new, .. } => {
                self.counters.state_changes += 1;
                let row = self.upsert(record);
                if row.released.is_some() {
                    return;
                }
                row.state = Some(*new);
                if *new == TcpState::TimeWait {
                    row.time_wait_since_ns.get_or_insert(record.ts_ns);
                } else {
                    row.time_wait_since_ns = None;
                }
            }
            RecordBody::Release { reason, held_ns, alloc_ts_ns, .. } => {
                self.counters.releases += 1;
                let row = self.upsert(record);
                if row.released.is_some() {
                    return;
                }
                if !row.alloc_seen {
                    if let Some(alloc_ts) = alloc_ts_ns {
                        row.since_ns = *alloc_ts;
                        row.alloc_seen = true;
                    }
                }
                let held = held_ns.or_else(|| row.alloc_seen.then(|| record.ts_ns.saturating_sub(row.since_ns)));
                row.released = Some(Released { seen_ns: now_ns, reason: *reason, held_ns: held });
                let entry = (row.seq, row.sock);
                self.released_order.push_back(entry);
                self.compact_queues();
            }
        }
    }

    /// Counts events the kernel could not deliver.
    pub fn on_lost(&mut self, count: u64) {
        self.counters.lost = self.counters.lost.saturating_add(count);
    }

    /// Takes the loop's figures for this tick.
    pub fn set_status(&mut self, status: Status) {
        self.status = status;
    }

    /// Moves the view's clock on and removes released ports whose fade-out
    /// is over. Called by [`TopView::on_record`] and before each draw.
    pub fn tick(&mut self, now_ns: u64) {
        self.last_now_ns = self.last_now_ns.max(now_ns);
        while let Some(&(seq, sock)) = self.released_order.front() {
            match self.rows.get(&sock) {
                Some(row) if row.seq == seq => match &row.released {
                    Some(released) if released.seen_ns.saturating_add(self.options.fade_ns) <= now_ns => {
                        self.rows.remove(&sock);
                    }
                    Some(_) => break,
                    None => {}
                },
                _ => {}
            }
            self.released_order.pop_front();
        }
    }

    fn new_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// The row of the record's socket, made (room permitting) if new, with
    /// the record's endpoints and owner.
    fn upsert(&mut self, record: &PortRecord) -> &mut PortRow {
        let sock = record.port.sock;
        if !self.rows.contains_key(&sock) {
            self.make_room();
            let seq = self.new_seq();
            self.order.push_back((seq, sock));
            self.rows.insert(sock, PortRow::new(&record.port, record.ts_ns, seq));
            self.compact_queues();
        }
        let port = &record.port;
        self.rows.entry(sock).and_modify(|row| row.refresh(port)).or_insert_with(|| PortRow::new(port, record.ts_ns, 0))
    }

    /// Drops rows until one more fits: the oldest released first, then the
    /// oldest held.
    fn make_room(&mut self) {
        while self.rows.len() >= self.options.max_rows {
            let victim = Self::pop_valid(&mut self.released_order, &self.rows, true)
                .or_else(|| Self::pop_valid(&mut self.order, &self.rows, false));
            let Some(sock) = victim else { break };
            self.rows.remove(&sock);
            self.counters.dropped_rows += 1;
        }
    }

    /// Pops entries off `queue` until one names a current row (a released
    /// one when `released`), and returns its socket.
    fn pop_valid(queue: &mut VecDeque<(u64, u64)>, rows: &HashMap<u64, PortRow>, released: bool) -> Option<u64> {
        while let Some((seq, sock)) = queue.pop_front() {
            if rows.get(&sock).is_some_and(|row| row.seq == seq && (!released || row.released.is_some())) {
                return Some(sock);
            }
        }
        None
    }

    /// Drops stale queue entries once they outnumber the rows (amortised O(1)).
    fn compact_queues(&mut self) {
        let limit = 2 * self.rows.len() + 64;
        let rows = &self.rows;
        if self.order.len() > limit {
            self.order.retain(|(seq, sock)| rows.get(sock).is_some_and(|row| row.seq == *seq));
        }
        if self.released_order.len() > limit {
            self.released_order
                .retain(|(seq, sock)| rows.get(sock).is_some_and(|row| row.seq == *seq && row.released.is_some()));
        }
    }

    /// Sets the state of sockets found at start from `lookup` (the
    /// tracker's view: the state the walk found), at most `limit` of them
    /// per call; rows that learnt a state meanwhile keep it.
    pub fn fill_states(&mut self, limit: usize, lookup: impl Fn(u64) -> Option<TcpState>) {
        let take = self.states_unknown.len().min(limit);
        for sock in self.states_unknown.drain(..take) {
            if let Some(row) = self.rows.get_mut(&sock).filter(|r| r.state.is_none() && r.released.is_none()) {
                row.state = lookup(sock);
            }
        }
    }

    /// Acts on one key.
    pub fn handle_key(&mut self, key: KeyEvent) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('C')) {
            return Action::Quit;
        }
        if let Some(draft) = self.filter_draft.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    self.filter = draft.trim().to_string();
                    self.filter_draft = None;
                    self.scroll = 0;
                }
                KeyCode::Esc => self.filter_draft = None,
                KeyCode::Backspace => {
                    draft.pop();
                }
                KeyCode::Char('u') if ctrl => draft.clear(),
                KeyCode::Char(c) if !ctrl && !c.is_control() && draft.chars().count() < MAX_FILTER_CHARS => {
                    draft.push(c)
                }
                _ => {}
            }
            return Action::None;
        }
        if key.code == KeyCode::Char('q') {
            return Action::Quit;
        }
        if self.help {
            self.help = false;
            return Action::None;
        }
        match key.code {
            KeyCode::Char('/') => self.filter_draft = Some(self.filter.clone()),
            KeyCode::Esc => {
                self.filter.clear();
                self.scroll = 0;
            }
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('p') => {
                self.frozen = match self.frozen {
                    Some(_) => None,
                    None => Some(Frozen { rows: self.rows.values().cloned().collect(), now_ns: self.last_now_ns }),
                }
            }
            KeyCode::Char('t') => self.show_time_wait = !self.show_time_wait,
            KeyCode::Char('?') => self.help = true,
            KeyCode::Down | KeyCode::Char('j') => self.scroll = self.scroll.saturating_add(1),
            KeyCode::Up | KeyCode::Char('k') => self.scroll = self.scroll.saturating_sub(1),
            KeyCode::PageDown => self.scroll = self.scroll.saturating_add(self.page_rows.max(1)),
            KeyCode::PageUp => self.scroll = self.scroll.saturating_sub(self.page_rows.max(1)),
            KeyCode::Home | KeyCode::Char('g') => self.scroll = 0,
            KeyCode::End | KeyCode::Char('G') => self.scroll = usize::MAX,
            _ => {}
        }
        Action::None
    }

    /// The clock the table is shown at: the pause time while paused.
    pub fn table_now_ns(&self) -> u64 {
        self.frozen.as_ref().map_or(self.last_now_ns, |frozen| frozen.now_ns)
    }

    /// The table's rows, filtered and sorted as shown (the frozen ones
    /// while paused).
    pub fn visible_rows(&self) -> Vec<&PortRow> {
        let mut haystack = String::new();
        let filter = self.filter.as_str();
        let keep = |row: &&PortRow| {
            (self.show_time_wait || !row.in_time_wait())
                && (filter.is_empty() || self.matches(row, filter, &mut haystack))
        };
        let mut shown: Vec<&PortRow> = match &self.frozen {
            Some(frozen) => frozen.rows.iter().filter(keep).collect(),
            None => self.rows.values().filter(keep).collect(),
        };
        let sort = self.sort;
        shown.sort_unstable_by(|a, b| {
            let by_key = match sort {
                // By allocation time: a released row's age is frozen at the
                // time it was held, which would put a port held for a moment
                // seconds ago above newer ones.
                SortKey::Age => b.since_ns.cmp(&a.since_ns),
                SortKey::Port => Ordering::Equal,
                SortKey::Comm => a.comm.cmp(&b.comm),
                SortKey::State => a.state_text().cmp(b.state_text()),
                SortKey::Pid => a.pid.cmp(&b.pid),
            };
            // Ports held now come first: during a storm thousands of
            // released rows fade out, and would bury the few that matter.
            let held_first = a.released.is_some().cmp(&b.released.is_some());
            held_first.then(by_key).then(a.lport.cmp(&b.lport)).then(a.sock.cmp(&b.sock))
        });
        shown
    }

    /// Whether the filter text occurs in the row's port, command or addresses.
    fn matches(&self, row: &PortRow, filter: &str, haystack: &mut String) -> bool {
        haystack.clear();
        // Fields apart (newline), so a match never spans two of them.
        let _ = write!(haystack, "{}\n{}\n{}\n", row.lport, row.comm, row.laddr);
        write_endpoint(haystack, row.laddr, row.lport);
        if let (Some(raddr), Some(rport)) = (row.raddr, row.rport) {
            haystack.push('\n');
            write_endpoint(haystack, raddr, rport);
            let _ = write!(haystack, "\n{raddr}");
        }
        contains_ignore_ascii_case(haystack, filter)
    }

    /// Rows kept now (held, in TIME_WAIT, or fading out).
    pub fn row_count(&self) -> usize {
        self.rows.len()
    }

    /// Ports held now and, of those, by TIME_WAIT sockets (live figures,
    /// also while paused).
    pub fn ports_in_use(&self) -> (usize, usize) {
        self.rows
            .values()
            .filter(|row| row.released.is_none())
            .fold((0, 0), |(held, tw), row| (held + 1, tw + usize::from(row.in_time_wait())))
    }

    /// Lost events to show: the larger of those counted by
    /// [`TopView::on_lost`] and the status's running total.
    pub fn lost(&self) -> u64 {
        self.counters.lost.max(self.status.lost)
    }

    /// Running counts.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The last status given.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// The options in force.
    pub fn options(&self) -> &TopOptions {
        &self.options
    }

    /// Current sort order.
    pub fn sort_key(&self) -> SortKey {
        self.sort
    }

    /// The filter applied (empty: none).
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// The filter being typed, while `/` editing is on.
    pub fn filter_draft(&self) -> Option<&str> {
        self.filter_draft.as_deref()
    }

    /// Whether the table is frozen.
    pub fn is_paused(&self) -> bool {
        self.frozen.is_some()
    }

    /// Whether TIME_WAIT ports are shown.
    pub fn shows_time_wait(&self) -> bool {
        self.show_time_wait
    }

    /// Whether the help overlay is shown.
    pub fn help_visible(&self) -> bool {
        self.help
    }

    /// First table row shown (may exceed the rows; the renderer clamps it).
    pub fn scroll(&self) -> usize {
        self.scroll
    }

    /// Sets the clamped scroll offset and page height after a draw.
    pub(super) fn set_viewport(&mut self, scroll: usize, page_rows: usize) {
        self.scroll = scroll;
        self.page_rows = page_rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;
    use std::net::Ipv4Addr;

    const S: u64 = NS_PER_S;

    fn port(sock: u64, lport: u16, comm: &str, pid: u32) -> PortRef {
        PortRef {
            sock,
            netns: 4026531840,
            proto: Proto::Tcp,
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            lport,
            raddr: Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
            rport: Some(8080),
            pid,
            comm: comm.into(),
            cgroup: 0,
            ephemeral: Some(true),
        }
    }

    fn alloc(ts_ns: u64, port: PortRef) -> PortRecord {
        PortRecord { ts_ns, port, body: RecordBody::Alloc { origin: Origin::Connect, ephemeral: true } }
    }

    fn state(ts_ns: u64, port: PortRef, old: TcpState, new: TcpState) -> PortRecord {
        PortRecord { ts_ns, port, body: RecordBody::State { old, new } }
    }

    fn release(ts_ns: u64, port: PortRef, reason: ReleaseReason, held_ns: Option<u64>) -> PortRecord {
        PortRecord {
            ts_ns,
            port,
            body: RecordBody::Release { reason, held_ns, origin: Some(Origin::Connect), alloc_ts_ns: None },
        }
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn type_text(view: &mut TopView, text: &str) {
        for c in text.chars() {
            assert_eq!(view.handle_key(key(KeyCode::Char(c))), Action::None);
        }
    }

    fn ports(view: &TopView) -> Vec<u16> {
        view.visible_rows().iter().map(|row| row.lport).collect()
    }

    /// Three held ports: 40001 curl (oldest), 40003 nginx, 40002 apt (newest).
    fn three_ports() -> TopView {
        let mut view = TopView::new(TopOptions::default());
        view.on_record(&alloc(S, port(1, 40001, "curl", 300)), S);
        view.on_record(&alloc(2 * S, port(3, 40003, "nginx", 100)), 2 * S);
        view.on_record(&alloc(3 * S, port(2, 40002, "apt", 200)), 3 * S);
        view.on_record(&state(3 * S, port(3, 40003, "nginx", 100), TcpState::SynSent, TcpState::Established), 3 * S);
        view
    }

    #[test]
    fn sockets_found_at_start_get_their_state_from_the_lookup() {
        let mut view = TopView::new(TopOptions::default());
        let mut rec = alloc(1, port(7, 40000, "nginx", 42));
        rec.body = RecordBody::Alloc { origin: Origin::Snapshot, ephemeral: false };
        view.on_record(&rec, 1);
        let shown = |v: &TopView| v.visible_rows().first().and_then(|r| r.state);
        assert_eq!(shown(&view), None);
        view.fill_states(0, |_| Some(TcpState::Listen));
        assert_eq!(shown(&view), None, "limit 0 asks nothing");
        view.fill_states(10, |sock| (sock == 7).then_some(TcpState::Listen));
        assert_eq!(shown(&view), Some(TcpState::Listen));
    }

    #[test]
    fn sorts_by_each_key_in_the_cycle() {
        let mut view = three_ports();
        assert_eq!(view.sort_key(), SortKey::Age);
        assert_eq!(ports(&view), [40002, 40003, 40001], "newest first");
        view.handle_key(key(KeyCode::Char('s')));
        assert_eq!(view.sort_key(), SortKey::Port);
        assert_eq!(ports(&view), [40001, 40002, 40003]);
        view.handle_key(key(KeyCode::Char('s')));
        assert_eq!(view.sort_key(), SortKey::Comm);
        assert_eq!(ports(&view), [40002, 40001, 40003]);
        view.handle_key(key(KeyCode::Char('s')));
        assert_eq!(view.sort_key(), SortKey::State);
        assert_eq!(ports(&view), [40001, 40002, 40003], "'-' sorts before ESTABLISHED");
        view.handle_key(key(KeyCode::Char('s')));
        assert_eq!(view.sort_key(), SortKey::Pid);
        assert_eq!(ports(&view), [40003, 40002, 40001]);
        view.handle_key(key(KeyCode::Char('s')));
        assert_eq!(view.sort_key(), SortKey::Age);
    }

    #[test]
    fn age_sort_puts_held_ports_first_then_newest_allocations() {
        let mut view = three_ports();
        // Allocated at 4 s and released at once, its AGE shows 0ms; among
        // the released rows it sorts by allocation time, but after every
        // port still held (a storm's fading rows must not bury them).
        view.on_record(&alloc(4 * S, port(4, 40004, "probe", 400)), 4 * S);
        view.on_record(&release(4 * S, port(4, 40004, "probe", 400), ReleaseReason::Close, Some(0)), 4 * S);
        view.on_record(&alloc(5 * S, port(5, 40005, "late", 500)), 5 * S);
        view.on_record(&alloc(3 * S, port(6, 40006, "gone", 600)), 5 * S);
        view.on_record(&release(3 * S, port(6, 40006, "gone", 600), ReleaseReason::Close, Some(0)), 5 * S);
        view.tick(5 * S);
        assert_eq!(ports(&view), [40005, 40002, 40003, 40001, 40004, 40006]);
    }

    #[test]
    fn filter_editing_applies_on_enter_and_cancels_on_esc() {
        let mut view = three_ports();
        view.handle_key(key(KeyCode::Char('/')));
        assert_eq!(view.filter_draft(), Some(""));
        type_text(&mut view, "CURLx");
        view.handle_key(key(KeyCode::Backspace));
        assert_eq!(view.filter_draft(), Some("CURL"));
        assert_eq!(ports(&view).len(), 3, "not applied while typing");
        view.handle_key(key(KeyCode::Enter));
        assert_eq!(view.filter(), "CURL");
        assert_eq!(view.filter_draft(), None);
        assert_eq!(ports(&view), [40001], "command names match ignoring case");

        // Editing starts from the filter in force; Esc keeps it.
        view.handle_key(key(KeyCode::Char('/')));
        assert_eq!(view.filter_draft(), Some("CURL"));
        type_text(&mut view, "zzz");
        view.handle_key(key(KeyCode::Esc));
        assert_eq!(view.filter(), "CURL");
        assert_eq!(view.filter_draft(), None);

        // Esc outside editing clears the filter.
        view.handle_key(key(KeyCode::Esc));
        assert_eq!(view.filter(), "");
        assert_eq!(ports(&view).len(), 3);
    }

    #[test]
    fn filter_matches_ports_and_addresses() {
        let mut view = three_ports();
        let mut other = port(9, 50000, "dig", 9);
        other.raddr = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)));
        other.rport = Some(53);
        view.on_record(&alloc(4 * S, other), 4 * S);
        let mut apply = |text: &str| {
            view.handle_key(key(KeyCode::Char('/')));
            view.handle_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
            type_text(&mut view, text);
            view.handle_key(key(KeyCode::Enter));
            ports(&view)
        };
        assert_eq!(apply("4000"), [40002, 40003, 40001]);
        assert_eq!(apply("40003"), [40003]);
        assert_eq!(apply("192.0.2"), [50000]);
        assert_eq!(apply("2.53:53"), [50000]);
        assert_eq!(apply("10.1.2.3:8080"), [40002, 40003, 40001]);
        assert_eq!(apply("nomatch"), Vec::<u16>::new());
    }

    #[test]
    fn typed_q_is_filter_text_but_ctrl_c_still_quits() {
        let mut view = three_ports();
        view.handle_key(key(KeyCode::Char('/')));
        assert_eq!(view.handle_key(key(KeyCode::Char('q'))), Action::None);
        assert_eq!(view.filter_draft(), Some("q"));
        assert_eq!(view.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::Quit);
        view.handle_key(key(KeyCode::Esc));
        assert_eq!(view.handle_key(key(KeyCode::Char('q'))), Action::Quit);
        let mut release_q = key(KeyCode::Char('q'));
        release_q.kind = KeyEventKind::Release;
        assert_eq!(view.handle_key(release_q), Action::None, "key releases are ignored");
    }

    #[test]
    fn help_overlay_opens_and_any_key_closes_it() {
        let mut view = three_ports();
        view.handle_key(key(KeyCode::Char('?')));
        assert!(view.help_visible());
        view.handle_key(key(KeyCode::Char('s')));
        assert!(!view.help_visible());
        assert_eq!(view.sort_key(), SortKey::Age, "the closing key does nothing else");
        view.handle_key(key(KeyCode::Char('?')));
        assert_eq!(view.handle_key(key(KeyCode::Char('q'))), Action::Quit);
    }

    #[test]
    fn ages_from_allocation_and_freezes_at_release() {
        let mut view = TopView::new(TopOptions::default());
        view.on_record(&alloc(10 * S, port(1, 40001, "curl", 1)), 10 * S);
        view.tick(25 * S);
        let row = view.visible_rows()[0].clone();
        assert_eq!(row.age_ns(view.table_now_ns()), 15 * S);
        assert_eq!(row.state_text(), "-");

        view.on_record(&release(30 * S, port(1, 40001, "curl", 1), ReleaseReason::Close, Some(20 * S)), 30 * S);
        view.tick(31 * S);
        let row = view.visible_rows()[0].clone();
        assert_eq!(row.age_ns(view.table_now_ns()), 20 * S, "held time, no longer growing");
        assert_eq!(row.state_text(), "closed");
        assert_eq!(view.ports_in_use(), (0, 0));
    }

    #[test]
    fn released_ports_fade_out_after_the_fade_time() {
        let mut view = three_ports();
        view.on_record(&release(4 * S, port(1, 40001, "curl", 300), ReleaseReason::Close, Some(3 * S)), 4 * S);
        view.tick(4 * S + 2 * S);
        assert_eq!(view.row_count(), 3, "still fading");
        assert!(view.visible_rows().iter().any(|row| row.lport == 40001 && row.released.is_some()));
        view.tick(4 * S + 3 * S);
        assert_eq!(view.row_count(), 2);
        assert!(!ports(&view).contains(&40001));
        assert_eq!(view.counters().releases, 1);
    }

    #[test]
    fn release_without_allocation_still_shows_and_fades() {
        let mut view = TopView::new(TopOptions::default());
        view.on_record(&release(5 * S, port(7, 40007, "old", 7), ReleaseReason::Reconciled, None), 5 * S);
        let rows = view.visible_rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state_text(), "gone");
        assert_eq!(rows[0].released.as_ref().and_then(|r| r.held_ns), None);
        view.tick(9 * S);
        assert_eq!(view.row_count(), 0);
    }

    #[test]
    fn time_wait_countdown_and_end() {
        let mut view = TopView::new(TopOptions::default());
        let p = port(1, 40001, "curl", 1);
        view.on_record(&alloc(S, p.clone()), S);
        view.on_record(&state(2 * S, p.clone(), TcpState::SynSent, TcpState::Established), 2 * S);
        view.on_record(&state(5 * S, p.clone(), TcpState::FinWait2, TcpState::TimeWait), 5 * S);
        view.tick(20 * S);
        let row = view.visible_rows()[0].clone();
        assert!(row.in_time_wait());
        assert_eq!(row.state_text(), "TIME_WAIT");
        assert_eq!(row.time_wait_left_ns(20 * S, TCP_TIMEWAIT_LEN_NS), Some(45 * S));
        assert_eq!(row.time_wait_left_ns(90 * S, TCP_TIMEWAIT_LEN_NS), Some(0), "never negative");
        assert_eq!(view.ports_in_use(), (1, 1));

        view.on_record(&release(65 * S, p, ReleaseReason::TimeWaitEnd, Some(64 * S)), 65 * S);
        let row = view.visible_rows()[0].clone();
        assert_eq!(row.time_wait_left_ns(65 * S, TCP_TIMEWAIT_LEN_NS), None);
        assert_eq!(row.state_text(), "tw ended");
    }

    #[test]
    fn time_wait_toggle_hides_only_time_wait_ports() {
        let mut view = three_ports();
        view.on_record(&state(4 * S, port(2, 40002, "apt", 200), TcpState::FinWait2, TcpState::TimeWait), 4 * S);
        assert_eq!(ports(&view).len(), 3);
        view.handle_key(key(KeyCode::Char('t')));
        assert!(!view.shows_time_wait());
        assert_eq!(ports(&view), [40003, 40001]);
        assert_eq!(view.ports_in_use(), (3, 1), "still counted");
        view.handle_key(key(KeyCode::Char('t')));
        assert_eq!(ports(&view).len(), 3);
    }

    #[test]
    fn pause_freezes_the_table_but_keeps_counting() {
        let mut view = three_ports();
        view.tick(10 * S);
        view.handle_key(key(KeyCode::Char('p')));
        assert!(view.is_paused());
        view.on_record(&alloc(11 * S, port(5, 40005, "new", 5)), 11 * S);
        view.on_record(&release(11 * S, port(1, 40001, "curl", 300), ReleaseReason::Close, None), 11 * S);
        view.tick(20 * S);
        assert_eq!(view.visible_rows().len(), 3);
        assert!(!ports(&view).contains(&40005));
        assert!(view.visible_rows().iter().all(|row| row.released.is_none()));
        assert_eq!(view.table_now_ns(), 10 * S, "ages frozen too");
        assert_eq!(view.counters().allocs, 4);
        assert_eq!(view.ports_in_use(), (3, 0));

        view.handle_key(key(KeyCode::Char('p')));
        assert!(!view.is_paused());
        assert!(ports(&view).contains(&40005));
        assert_eq!(view.table_now_ns(), 20 * S);
    }

    #[test]
    fn bounded_rows_drop_oldest_released_first() {
        let mut view = TopView::new(TopOptions { max_rows: 3, ..TopOptions::default() });
        view.on_record(&alloc(S, port(1, 1001, "a", 1)), S);
        view.on_record(&alloc(S, port(2, 1002, "b", 1)), S);
        view.on_record(&alloc(S, port(3, 1003, "c", 1)), S);
        view.on_record(&release(S, port(2, 1002, "b", 1), ReleaseReason::Close, None), S);
        view.on_record(&alloc(S, port(4, 1004, "d", 1)), S);
        view.handle_key(key(KeyCode::Char('s'))); // by port
        assert_eq!(ports(&view), [1001, 1003, 1004], "the released one went first");
        assert_eq!(view.counters().dropped_rows, 1);
        view.on_record(&alloc(S, port(5, 1005, "e", 1)), S);
        assert_eq!(ports(&view), [1003, 1004, 1005], "then the oldest held one");
        assert_eq!(view.counters().dropped_rows, 2);
        assert_eq!(view.row_count(), 3);
    }

    #[test]
    fn many_records_stay_bounded() {
        let mut view = TopView::new(TopOptions { max_rows: 100, ..TopOptions::default() });
        for i in 0..10_000u64 {
            let p = port(i, (i % 60_000) as u16, "load", 1);
            view.on_record(&alloc(i, p.clone()), i);
            if i % 2 == 0 {
                view.on_record(&release(i, p, ReleaseReason::Close, Some(1)), i);
            }
        }
        assert_eq!(view.row_count(), 100);
        assert_eq!(view.counters().dropped_rows, 9_900);
        assert!(view.order.len() <= 2 * 100 + 65);
        assert!(view.released_order.len() <= 2 * 100 + 65);
    }

    #[test]
    fn new_allocation_of_a_fading_socket_starts_a_new_lifecycle() {
        let mut view = TopView::new(TopOptions::default());
        let p = port(1, 40001, "curl", 1);
        view.on_record(&alloc(S, p.clone()), S);
        view.on_record(&release(2 * S, p.clone(), ReleaseReason::Close, Some(S)), 2 * S);
        view.on_record(&alloc(3 * S, p), 3 * S);
        view.tick(10 * S);
        let rows = view.visible_rows();
        assert_eq!(rows.len(), 1, "not removed by the old release's fade-out");
        assert!(rows[0].released.is_none());
        assert_eq!(rows[0].age_ns(10 * S), 7 * S);
    }

    #[test]
    fn lost_shows_the_larger_count() {
        let mut view = TopView::new(TopOptions::default());
        view.on_lost(5);
        assert_eq!(view.lost(), 5);
        view.set_status(Status { lost: 12, ..Status::default() });
        assert_eq!(view.lost(), 12);
    }

    #[test]
    fn formats_durations_and_endpoints() {
        assert_eq!(format_duration_ns(850_000_000), "850ms");
        assert_eq!(format_duration_ns(12_340_000_000), "12.3s");
        assert_eq!(format_duration_ns(302 * S), "5m02s");
        assert_eq!(format_duration_ns(3900 * S), "1h05m");
        assert_eq!(format_duration_ns(3 * 86_400 * S + 2 * 3600 * S), "3d02h");
        assert_eq!(format_endpoint("::1".parse().unwrap(), 80), "[::1]:80");
        assert_eq!(format_endpoint("10.0.0.1".parse().unwrap(), 443), "10.0.0.1:443");
    }
}
