//! The port lifecycle state machine: joins the kernel events of each socket
//! by cookie and turns them into `alloc`, `alloc_fail`, `state` and `release`
//! records. Pure logic, no kernel access.
//!
//! The portable backend sees a port being taken and given back from several
//! hooks; the subtle cases, with the kernel functions behind them:
//!
//! * TCP `connect()`: `tcp_v4_connect` moves the socket to SYN_SENT *before*
//!   `inet_hash_connect` picks the port, so CLOSE→SYN_SENT carries the owner
//!   but no port; the port shows on the next event of the socket (the
//!   handshake's state change or `sys_exit_connect`), microseconds later. The
//!   allocation is stamped with the SYN_SENT time.
//! * A move to CLOSE runs `inet_put_port` first (`tcp_set_state`), so
//!   `port_held == 0` there means this socket gave its port back — unless a
//!   TIME_WAIT socket took it over (`tcp_time_wait` →
//!   `inet_twsk_hashdance_schedule` before `tcp_done`). That hand-off is the
//!   only way to CLOSE from FIN_WAIT1, FIN_WAIT2 or CLOSING without an error
//!   (`tcp_reset` and the timeout paths set `sk_err`), so it is reported as a
//!   move to TIME_WAIT and the port stays held.
//! * An explicit `bind(port)` sets `SOCK_BINDPORT_LOCK`: the port survives
//!   the move to CLOSE and goes back in `tcp_v4_destroy_sock`.
//! * Accepted children share their listener's port (`__inet_inherit_port`):
//!   they are not allocations, and their events are ignored.

// Keys are kernel cookies and ports: foldhash (seeded per process) is
// several times faster than SipHash on the per-event path.
use foldhash::{HashMap, HashSet, HashSetExt};

use crate::decode::{Endpoints, Happening, KernelEvent, Task};
use crate::model::{Comm, Origin, Proto, ReleaseReason, TcpState};
use crate::record::{PortRecord, PortRef, RecordBody};

/// Where a tracked socket is in its port's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The socket asked for a port (connect, or listen while unbound) and the
    /// port is not visible yet.
    Awaiting(Origin),
    /// The socket holds the port.
    Held,
    /// A TIME_WAIT socket holds the port for this socket's 4-tuple.
    TimeWait,
}

#[derive(Clone, Debug)]
struct Tracked {
    phase: Phase,
    owner: Task,
    netns: u32,
    endpoints: Endpoints,
    /// When the port was (or, while awaiting, is about to be) allocated.
    alloc_ts_ns: u64,
    origin: Origin,
    ephemeral: bool,
    /// A state change seen while awaiting the port, reported after the alloc.
    deferred_state: Option<(u64, TcpState, TcpState)>,
    /// When a TIME_WAIT socket took the port over.
    time_wait_since_ns: u64,
    /// `inet_put_port` ran inside `tcp_set_state(CLOSE)` (precise and kprobe
    /// backends): the release, held back until the move to CLOSE that
    /// follows it is reported, so that records keep the kernel's order of
    /// meaning (state, then release).
    pending_release: Option<(u64, ReleaseReason)>,
    /// The `sock` reported: the cookie, or with address keying a per-run
    /// number (addresses are reused by later sockets).
    sock_id: u64,
    /// The last TCP state reported (or found by the walk that adopted it).
    tcp_state: Option<TcpState>,
}

/// Counters of what the tracker saw but could not pair, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Events of sockets the tracker does not know (accepted children, or
    /// sockets that existed before tracing began).
    pub unknown_socket_events: u64,
    /// Releases of ports whose allocation was not seen.
    pub unpaired_releases: u64,
    /// An allocation for a socket that already held a port.
    pub duplicate_allocs: u64,
    /// Ports released because a walk no longer found their socket although
    /// no release was seen (lost events).
    pub reconciled: u64,
    /// Sockets no longer followed because the limit of followed sockets was
    /// reached.
    pub evicted: u64,
}

/// A walk of one namespace's sockets, as announced to [`Tracker::begin_walk`].
#[derive(Clone, Debug, Default)]
pub struct WalkStart {
    /// The namespace walked.
    pub netns: u32,
    /// TCP or UDP.
    pub proto: Proto,
    /// CLOCK_BOOTTIME before the walk began.
    pub started_ns: u64,
    /// Socket inode → owning process.
    pub owners: std::collections::HashMap<u32, Task>,
    /// The namespace's `ip_local_port_range`.
    pub ephemeral_range: [u16; 2],
    /// Report the sockets the tracker does not know as `snapshot` allocs:
    /// the first walk, and the repair walks after lost events (the lost
    /// events may have been allocations).
    pub adopt_unknown: bool,
    /// Adopt unknown TIME_WAIT sockets too (the first walk only: later, an
    /// unknown TIME_WAIT socket is an accepted child's, whose listener may be
    /// gone, not a port of its own).
    pub adopt_time_wait: bool,
}

struct Walk {
    start: WalkStart,
    seen: HashSet<u64>,
    found: Vec<Found>,
    /// Sockets released while the walk ran: a walk may find a socket just
    /// before its release (or before its allocation) is reported.
    released: HashSet<u64>,
}

/// A socket a walk found that the tracker did not know.
struct Found {
    ev: KernelEvent,
    state: Option<TcpState>,
    inode: u32,
}

/// What joins the events of one socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Keying {
    /// The socket cookie (precise and portable backends): never reused, and
    /// inherited by the TIME_WAIT socket.
    #[default]
    Cookie,
    /// The socket's kernel address (kprobe backend, whose programs cannot
    /// ask for cookies). Addresses are reused only after a socket is freed,
    /// that is after its port's release; the TIME_WAIT socket's address is
    /// tied to its parent's at the hand-off. The `sock` reported is the
    /// address masked with a per-run secret, not the address itself.
    Address {
        /// XORed into addresses before they are shown.
        mask: u64,
    },
}

/// Joins kernel events into port lifecycles.
#[derive(Default)]
pub struct Tracker {
    sockets: HashMap<u64, Tracked>,
    stats: TrackerStats,
    keying: Keying,
    /// Address keying: TIME_WAIT socket key → its parent's key.
    time_wait_parent: HashMap<u64, u64>,
    /// The walk in progress.
    walk: Option<Walk>,
    /// The last per-run socket number given (address keying).
    next_sock_id: u64,
    /// The most sockets followed at once (0: [`DEFAULT_MAX_TRACKED`]).
    max_tracked: usize,
}

/// How many sockets a tracker follows at most unless told otherwise: about
/// 60 MiB of state at the worst (measured: about 0.45 KiB a socket).
pub const DEFAULT_MAX_TRACKED: usize = 1 << 17;

fn unknown_owner() -> Task {
    Task { pid: 0, tid: 0, comm: Comm::default(), cgroup: 0 }
}

/// TCP states from which a clean move to CLOSE is the TIME_WAIT hand-off.
fn closes_into_time_wait(old: TcpState, sk_err: i32) -> bool {
    matches!(old, TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing) && sk_err == 0
}

/// Whether a failed `connect()` failed for want of a local port.
fn is_port_shortage(proto: Proto, errno: i32) -> bool {
    match proto {
        Proto::Tcp => errno == libc::EADDRNOTAVAIL || errno == libc::EADDRINUSE,
        // `inet_dgram_connect`: a failed autobind returns -EAGAIN.
        Proto::Udp => errno == libc::EAGAIN || errno == libc::EADDRNOTAVAIL,
    }
}

impl Tracked {
    /// A socket whose port `ev` shows, owned by the task `ev` ran in.
    fn from_event(ev: &KernelEvent, phase: Phase, origin: Origin, ephemeral: bool) -> Self {
        Tracked {
            phase,
            owner: ev.task.clone().unwrap_or_else(unknown_owner),
            netns: ev.netns,
            endpoints: ev.endpoints.clone(),
            alloc_ts_ns: ev.ts_ns,
            origin,
            ephemeral,
            deferred_state: None,
            time_wait_since_ns: 0,
            pending_release: None,
            sock_id: 0,
            tcp_state: None,
        }
    }

    fn port_ref(&self, cookie: u64) -> PortRef {
        PortRef {
            sock: if self.sock_id != 0 { self.sock_id } else { cookie },
            netns: self.netns,
            proto: self.endpoints.proto,
            family: self.endpoints.family,
            laddr: self.endpoints.laddr,
            lport: self.endpoints.lport,
            raddr: self.endpoints.raddr,
            rport: self.endpoints.rport,
            pid: self.owner.pid,
            comm: self.owner.comm.clone(),
            cgroup: self.owner.cgroup,
            ephemeral: Some(self.ephemeral),
        }
    }

    /// Takes what is new in `seen`: the remote side once connected, the
    /// local address once bound to one.
    fn learn(&mut self, seen: &Endpoints) {
        if seen.raddr.is_some() {
            self.endpoints.raddr = seen.raddr;
            self.endpoints.rport = seen.rport;
        }
        if !seen.laddr.is_unspecified() {
            self.endpoints.laddr = seen.laddr;
        }
        if seen.lport != 0 {
            self.endpoints.lport = seen.lport;
        }
    }
}

impl Tracker {
    /// An empty tracker joining events by cookie.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty tracker joining events as `keying` says.
    pub fn with_keying(keying: Keying) -> Self {
        Self { keying, ..Self::default() }
    }

    /// Follows at most `max` sockets: past that, the oldest sixteenth is
    /// dropped (counted in [`TrackerStats::evicted`]), so that memory stays
    /// bounded whatever is lost or never released.
    pub fn with_limit(mut self, max: usize) -> Self {
        self.max_tracked = max.max(16);
        self
    }

    /// Makes room for one more socket when the limit is reached.
    fn make_room(&mut self) {
        let max = if self.max_tracked == 0 { DEFAULT_MAX_TRACKED } else { self.max_tracked };
        if self.sockets.len() < max {
            return;
        }
        let mut ages: Vec<(u64, u64)> = self.sockets.iter().map(|(k, t)| (t.alloc_ts_ns, *k)).collect();
        let drop = (max / 16).max(1);
        ages.select_nth_unstable(drop - 1);
        for (_, key) in &ages[..drop] {
            self.sockets.remove(key);
            // A walk running now must not take them for sockets it never
            // heard of.
            if let Some(walk) = self.walk.as_mut() {
                walk.released.insert(*key);
            }
        }
        self.stats.evicted += drop as u64;
        // Forget TIME_WAIT aliases of sockets no longer followed.
        let sockets = &self.sockets;
        self.time_wait_parent.retain(|_, parent| sockets.contains_key(parent));
    }

    /// The TCP state of a followed socket, by the `sock` its records carry:
    /// the last one reported, or the one a walk found it in.
    pub fn tcp_state(&self, sock: u64) -> Option<crate::model::TcpState> {
        let state = |t: &Tracked| t.tcp_state.or((t.phase == Phase::TimeWait).then_some(TcpState::TimeWait));
        match self.sockets.get(&sock).filter(|t| t.sock_id == 0 || t.sock_id == sock) {
            Some(t) => state(t),
            None => self.sockets.values().find(|t| t.sock_id == sock).and_then(state),
        }
    }

    /// Whether a followed socket has a remote end now (a UDP `connect()` on
    /// a bound socket is learnt without a record), by its `sock`.
    pub fn is_connected(&self, sock: u64) -> bool {
        let connected = |t: &Tracked| t.endpoints.raddr.is_some();
        match self.sockets.get(&sock).filter(|t| t.sock_id == 0 || t.sock_id == sock) {
            Some(t) => connected(t),
            None => self.sockets.values().find(|t| t.sock_id == sock).is_some_and(connected),
        }
    }

    /// Sockets followed now.
    pub fn tracked(&self) -> usize {
        self.sockets.len()
    }

    /// Ports held now by the sockets the tracker follows (TIME_WAIT included).
    pub fn ports_in_use(&self) -> usize {
        self.sockets.values().filter(|t| t.phase != Phase::Awaiting(t.origin)).count()
    }

    /// Ports held by TIME_WAIT sockets now.
    pub fn time_wait_ports(&self) -> usize {
        self.sockets.values().filter(|t| t.phase == Phase::TimeWait).count()
    }

    /// What could not be paired so far.
    pub fn stats(&self) -> &TrackerStats {
        &self.stats
    }

    /// Feeds one kernel event; appends the records it produces to `out`.
    pub fn on_event(&mut self, ev: &KernelEvent, out: &mut Vec<PortRecord>) {
        let Keying::Address { mask } = self.keying else {
            return self.dispatch(ev, out);
        };
        // Re-key the event by address; the handlers below use `cookie`.
        let mut keyed = ev.clone();
        keyed.cookie = ev.sk_addr ^ mask;
        match ev.happening {
            Happening::TimeWaitStart { .. } => {
                self.time_wait_parent.insert(ev.tw_addr ^ mask, keyed.cookie);
            }
            Happening::TimeWaitEnd => match self.time_wait_parent.remove(&keyed.cookie) {
                Some(parent) => keyed.cookie = parent,
                None => return,
            },
            // A walk finds the TIME_WAIT socket at its own address: it holds
            // its parent's port.
            Happening::Snapshot { state: Some(TcpState::TimeWait), .. } => {
                if let Some(parent) = self.time_wait_parent.get(&keyed.cookie) {
                    keyed.cookie = *parent;
                }
            }
            _ => {}
        }
        self.dispatch(&keyed, out);
    }

    fn dispatch(&mut self, ev: &KernelEvent, out: &mut Vec<PortRecord>) {
        // A stored cookie of 0 (raw tracepoints, before anything asked for
        // the socket's cookie) names no socket.
        if ev.cookie == 0 {
            self.stats.unknown_socket_events += 1;
            return;
        }
        if let Some((ts_ns, reason)) = self.sockets.get(&ev.cookie).and_then(|t| t.pending_release) {
            let closing = match ev.happening {
                Happening::TcpState { old, new: TcpState::Close, .. } => Some(old),
                _ => None,
            };
            if let (Some(old), Some(tracked)) = (closing, self.sockets.get(&ev.cookie)) {
                out.push(PortRecord {
                    ts_ns: ev.ts_ns,
                    port: tracked.port_ref(ev.cookie),
                    body: RecordBody::State { old, new: TcpState::Close },
                });
                self.release(ev.cookie, ts_ns, reason, out);
                return;
            }
            // Whatever else came first, the port went back then.
            self.release(ev.cookie, ts_ns, reason, out);
        }
        match &ev.happening {
            Happening::TcpState { old, new, port_held, sk_err } => {
                self.on_tcp_state(ev, *old, *new, *port_held, *sk_err, out)
            }
            Happening::TcpDestroy => self.on_tcp_destroy(ev, out),
            Happening::Bind { requested_port } => self.on_bind(ev, *requested_port, out),
            Happening::Connect { ret, port_before } => self.on_connect(ev, *ret, *port_before, out),
            Happening::UdpRelease => self.on_udp_release(ev, out),
            Happening::GetPort { requested_port, ret, state } => {
                self.on_get_port(ev, *requested_port, *ret, *state, out)
            }
            Happening::PutPort { state, .. } => self.on_put_port(ev, *state, out),
            Happening::TimeWaitStart { state } => self.on_time_wait_start(ev, *state, out),
            Happening::TimeWaitEnd => self.on_time_wait_end(ev, out),
            Happening::BindFailed { ret } => self.on_bind_failed(ev, *ret, out),
            Happening::UdpFirstSend => self.on_udp_first_send(ev, out),
            Happening::Snapshot { state, inode } => self.on_snapshot(ev, *state, *inode, out),
        }
    }

    /// Announces a walk of one namespace's sockets of `proto`, starting now
    /// (`started_ns`, CLOCK_BOOTTIME, taken before the walk begins). Its
    /// SNAPSHOT records follow, then [`Tracker::end_walk`]. `owners` maps socket inodes to
    /// their processes (from `/proc/*/fd`); `ephemeral_range` is the
    /// namespace's.
    pub fn begin_walk(&mut self, walk: WalkStart) {
        self.walk = Some(Walk { start: walk, seen: HashSet::new(), found: Vec::new(), released: HashSet::new() });
    }

    /// Ports held by sockets of `netns` in TIME_WAIT (for deciding which
    /// namespaces to walk).
    pub fn time_wait_namespaces(&self) -> Vec<u32> {
        let mut ns: Vec<u32> = self.sockets.values().filter(|t| t.phase == Phase::TimeWait).map(|t| t.netns).collect();
        ns.sort_unstable();
        ns.dedup();
        ns
    }

    /// Forgets the walk announced last without concluding anything (it
    /// failed, so not finding a socket means nothing).
    pub fn abandon_walk(&mut self) {
        self.walk = None;
    }

    /// Namespaces with sockets the tracker follows.
    pub fn namespaces(&self) -> Vec<u32> {
        let mut ns: Vec<u32> = self.sockets.values().map(|t| t.netns).collect();
        ns.sort_unstable();
        ns.dedup();
        ns
    }

    fn on_snapshot(&mut self, ev: &KernelEvent, state: Option<TcpState>, inode: u32, out: &mut Vec<PortRecord>) {
        let Some(walk) = self.walk.as_mut() else { return };
        walk.seen.insert(ev.cookie);
        match self.sockets.get(&ev.cookie).map(|t| t.phase) {
            Some(Phase::Awaiting(_)) if ev.endpoints.lport != 0 => self.materialize(ev.cookie, &ev.endpoints, out),
            Some(Phase::Held) if state == Some(TcpState::TimeWait) => {
                // The hand-off was not seen (lost, or a reset heuristic).
                if let Some(tracked) = self.sockets.get_mut(&ev.cookie) {
                    tracked.phase = Phase::TimeWait;
                    tracked.time_wait_since_ns = ev.ts_ns;
                }
            }
            Some(_) => {}
            None => walk.found.push(Found { ev: ev.clone(), state, inode }),
        }
    }

    /// Ends the walk announced by [`Tracker::begin_walk`] once its SNAPSHOT
    /// records are fed: adopts what the first walk found, and releases what
    /// no walk finds any more. `ts_ns` is when the walk ended.
    pub fn end_walk(&mut self, ts_ns: u64, out: &mut Vec<PortRecord>) {
        let Some(walk) = self.walk.take() else { return };
        let start = &walk.start;
        // Sockets we did not know: ports held since before we started (or
        // whose allocation was lost). Accepted children share a listener's
        // port and are not allocations.
        let listening: HashSet<u16> = walk
            .found
            .iter()
            .filter(|f| f.state == Some(TcpState::Listen))
            .map(|f| f.ev.endpoints.lport)
            .chain(
                self.sockets
                    .values()
                    .filter(|t| {
                        t.netns == start.netns && t.endpoints.proto == Proto::Tcp && t.endpoints.raddr.is_none()
                    })
                    .map(|t| t.endpoints.lport),
            )
            .collect();
        for found in walk.found.iter().filter(|_| start.adopt_unknown) {
            let e = &found.ev;
            // Its allocation or release was reported while the walk ran.
            if self.sockets.contains_key(&e.cookie) || walk.released.contains(&e.cookie) {
                continue;
            }
            if e.endpoints.lport == 0 {
                continue;
            }
            let tcp = e.endpoints.proto == Proto::Tcp;
            let listener = found.state == Some(TcpState::Listen);
            if tcp && !listener && listening.contains(&e.endpoints.lport) {
                continue; // an accepted child (or its TIME_WAIT)
            }
            if found.state == Some(TcpState::TimeWait) && !start.adopt_time_wait {
                continue;
            }
            let [lo, hi] = start.ephemeral_range;
            let connected = e.endpoints.raddr.is_some();
            let owner = start.owners.get(&found.inode).cloned().unwrap_or_else(unknown_owner);
            let tracked = Tracked {
                phase: if found.state == Some(TcpState::TimeWait) && tcp { Phase::TimeWait } else { Phase::Held },
                owner,
                netns: e.netns,
                endpoints: e.endpoints.clone(),
                alloc_ts_ns: e.ts_ns,
                origin: Origin::Snapshot,
                // Estimated: a connected socket on a port of the ephemeral
                // range most likely had it chosen by the kernel.
                ephemeral: connected && (lo..=hi).contains(&e.endpoints.lport),
                deferred_state: None,
                time_wait_since_ns: e.ts_ns,
                pending_release: None,
                sock_id: 0,
                tcp_state: if tcp { found.state } else { None },
            };
            self.alloc(e, tracked, out);
        }
        // Sockets we follow that the walk no longer found: their release
        // was not seen (lost events), or, for TIME_WAIT on the portable
        // backend, it ended between two walks.
        let gone: Vec<u64> = self
            .sockets
            .iter()
            .filter(|(cookie, t)| {
                t.netns == start.netns
                    && t.endpoints.proto == start.proto
                    && !walk.seen.contains(cookie)
                    && match t.phase {
                        Phase::Held => t.alloc_ts_ns < start.started_ns,
                        Phase::TimeWait => t.time_wait_since_ns < start.started_ns,
                        Phase::Awaiting(_) => false,
                    }
            })
            .map(|(cookie, _)| *cookie)
            .collect();
        for cookie in gone {
            let reason = match self.sockets.get(&cookie).map(|t| t.phase) {
                Some(Phase::TimeWait) => ReleaseReason::TimeWaitEnd,
                _ => {
                    self.stats.reconciled += 1;
                    ReleaseReason::Reconciled
                }
            };
            self.release(cookie, ts_ns, reason, out);
        }
    }

    /// `bind()` failed for want of the port (portable backend).
    fn on_bind_failed(&mut self, ev: &KernelEvent, ret: i32, out: &mut Vec<PortRecord>) {
        let port = Tracked::from_event(ev, Phase::Held, Origin::Bind, ev.endpoints.lport == 0).port_ref(ev.cookie);
        out.push(PortRecord {
            ts_ns: ev.ts_ns,
            port,
            body: RecordBody::AllocFail { errno: -ret, origin: Origin::Bind },
        });
    }

    /// A UDP socket's first unconnected send (portable backend): unless its
    /// port is known, the kernel autobound it for this send.
    fn on_udp_first_send(&mut self, ev: &KernelEvent, out: &mut Vec<PortRecord>) {
        if self.sockets.contains_key(&ev.cookie) || ev.endpoints.lport == 0 {
            return;
        }
        let tracked = Tracked::from_event(ev, Phase::Held, Origin::Autobind, true);
        self.alloc(ev, tracked, out);
    }

    /// A `get_port` call (precise backend): a new allocation, or a failed one.
    fn on_get_port(
        &mut self,
        ev: &KernelEvent,
        requested_port: u16,
        ret: i32,
        state: Option<TcpState>,
        out: &mut Vec<PortRecord>,
    ) {
        let proto = ev.endpoints.proto;
        let origin = match proto {
            Proto::Tcp if state == Some(TcpState::Listen) => Origin::Listen,
            Proto::Tcp => Origin::Bind,
            Proto::Udp => match ev.syscall.map(i64::from) {
                Some(libc::SYS_bind) => Origin::Bind,
                Some(libc::SYS_connect) => Origin::Connect,
                _ => Origin::Autobind,
            },
        };
        let owner = ev.task.clone().unwrap_or_else(unknown_owner);
        if ret != 0 {
            // What the caller sees: bind and listen fail with EADDRINUSE; a
            // failed UDP autobind becomes EAGAIN (inet_autobind).
            let errno = match origin {
                Origin::Connect | Origin::Autobind => libc::EAGAIN,
                _ if ret < 0 => -ret,
                _ => libc::EADDRINUSE,
            };
            let mut port = Tracked {
                phase: Phase::Held,
                owner,
                netns: ev.netns,
                endpoints: ev.endpoints.clone(),
                alloc_ts_ns: ev.ts_ns,
                origin,
                ephemeral: requested_port == 0,
                deferred_state: None,
                time_wait_since_ns: 0,
                pending_release: None,
                sock_id: 0,
                tcp_state: None,
            }
            .port_ref(ev.cookie);
            port.lport = requested_port;
            out.push(PortRecord { ts_ns: ev.ts_ns, port, body: RecordBody::AllocFail { errno, origin } });
            return;
        }
        match self.sockets.get(&ev.cookie).map(|t| t.phase) {
            Some(Phase::Awaiting(_)) => {
                if let Some(tracked) = self.sockets.get_mut(&ev.cookie) {
                    tracked.origin = origin;
                    tracked.ephemeral = requested_port == 0;
                }
                self.materialize(ev.cookie, &ev.endpoints, out);
            }
            // UDP connect() autobinds before it sets the addresses: the alloc
            // waits for the connect's end, which says where to.
            None if proto == Proto::Udp && origin == Origin::Connect => {
                self.make_room();
                self.sockets.insert(
                    ev.cookie,
                    Tracked {
                        phase: Phase::Awaiting(Origin::Connect),
                        owner,
                        netns: ev.netns,
                        endpoints: ev.endpoints.clone(),
                        alloc_ts_ns: ev.ts_ns,
                        origin,
                        ephemeral: requested_port == 0,
                        deferred_state: None,
                        time_wait_since_ns: 0,
                        pending_release: None,
                        sock_id: 0,
                        tcp_state: None,
                    },
                );
            }
            // Seen already through another hook (a portable one alongside).
            Some(_) if self.sockets.get(&ev.cookie).is_some_and(|t| t.endpoints.lport == ev.endpoints.lport) => {}
            _ => {
                let tracked = Tracked {
                    phase: Phase::Held,
                    owner,
                    netns: ev.netns,
                    endpoints: ev.endpoints.clone(),
                    alloc_ts_ns: ev.ts_ns,
                    origin,
                    ephemeral: requested_port == 0,
                    deferred_state: None,
                    time_wait_since_ns: 0,
                    pending_release: None,
                    sock_id: 0,
                    tcp_state: None,
                };
                self.alloc(ev, tracked, out);
            }
        }
    }

    /// `inet_put_port` (precise backend): the socket gives its port back,
    /// unless a TIME_WAIT socket already took it over.
    fn on_put_port(&mut self, ev: &KernelEvent, state: Option<TcpState>, out: &mut Vec<PortRecord>) {
        match self.sockets.get(&ev.cookie).map(|t| t.phase) {
            Some(Phase::Held) => {
                let reason =
                    if state == Some(TcpState::SynSent) { ReleaseReason::ConnectFailed } else { ReleaseReason::Close };
                if state.is_some_and(|s| s != TcpState::Close) {
                    // tcp_set_state(CLOSE) → inet_put_port: the move to CLOSE
                    // is reported next, by the state tracepoint.
                    if let Some(tracked) = self.sockets.get_mut(&ev.cookie) {
                        tracked.pending_release = Some((ev.ts_ns, reason));
                    }
                } else {
                    // tcp_v4_destroy_sock: the socket was closed already.
                    self.release(ev.cookie, ev.ts_ns, reason, out);
                }
            }
            Some(Phase::Awaiting(_)) => {
                self.sockets.remove(&ev.cookie);
            }
            Some(Phase::TimeWait) => {}
            None => self.stats.unknown_socket_events += 1,
        }
    }

    fn on_time_wait_start(&mut self, ev: &KernelEvent, state: Option<TcpState>, out: &mut Vec<PortRecord>) {
        let Some(tracked) = self.sockets.get_mut(&ev.cookie) else {
            self.stats.unknown_socket_events += 1;
            return;
        };
        if tracked.phase != Phase::Held {
            return;
        }
        tracked.phase = Phase::TimeWait;
        tracked.time_wait_since_ns = ev.ts_ns;
        let old = state.unwrap_or(TcpState::FinWait2);
        out.push(PortRecord {
            ts_ns: ev.ts_ns,
            port: tracked.port_ref(ev.cookie),
            body: RecordBody::State { old, new: TcpState::TimeWait },
        });
    }

    fn on_time_wait_end(&mut self, ev: &KernelEvent, out: &mut Vec<PortRecord>) {
        match self.sockets.get(&ev.cookie).map(|t| t.phase) {
            Some(Phase::TimeWait) | Some(Phase::Held) => {
                self.release(ev.cookie, ev.ts_ns, ReleaseReason::TimeWaitEnd, out)
            }
            _ => {}
        }
    }

    fn alloc(&mut self, ev: &KernelEvent, mut tracked: Tracked, out: &mut Vec<PortRecord>) {
        if self.sockets.contains_key(&ev.cookie) {
            self.stats.duplicate_allocs += 1;
        }
        self.assign_sock_id(&mut tracked);
        out.push(PortRecord {
            ts_ns: tracked.alloc_ts_ns,
            port: tracked.port_ref(ev.cookie),
            body: RecordBody::Alloc { origin: tracked.origin, ephemeral: tracked.ephemeral },
        });
        if !self.sockets.contains_key(&ev.cookie) {
            self.make_room();
        }
        self.sockets.insert(ev.cookie, tracked);
    }

    /// With address keying, numbers each lifecycle: a socket's address is
    /// reused by later sockets, a reported `sock` must not be.
    fn assign_sock_id(&mut self, tracked: &mut Tracked) {
        if let Keying::Address { .. } = self.keying {
            if tracked.sock_id == 0 {
                self.next_sock_id += 1;
                tracked.sock_id = self.next_sock_id;
            }
        }
    }

    /// An awaited port became visible: report the alloc and the state change
    /// that was held back.
    fn materialize(&mut self, cookie: u64, seen: &Endpoints, out: &mut Vec<PortRecord>) {
        let Some(mut tracked) = self.sockets.remove(&cookie) else { return };
        self.assign_sock_id(&mut tracked);
        self.sockets.insert(cookie, tracked);
        let Some(tracked) = self.sockets.get_mut(&cookie) else { return };
        tracked.learn(seen);
        tracked.phase = Phase::Held;
        out.push(PortRecord {
            ts_ns: tracked.alloc_ts_ns,
            port: tracked.port_ref(cookie),
            body: RecordBody::Alloc { origin: tracked.origin, ephemeral: tracked.ephemeral },
        });
        if let Some((ts_ns, old, new)) = tracked.deferred_state.take() {
            out.push(PortRecord { ts_ns, port: tracked.port_ref(cookie), body: RecordBody::State { old, new } });
        }
    }

    fn release(&mut self, cookie: u64, ts_ns: u64, reason: ReleaseReason, out: &mut Vec<PortRecord>) {
        // A port whose allocation was held back for more detail (UDP connect
        // on the precise backend) is reported before its release.
        if let Some(t) = self.sockets.get(&cookie) {
            if matches!(t.phase, Phase::Awaiting(_)) && t.endpoints.lport != 0 {
                let seen = t.endpoints.clone();
                self.materialize(cookie, &seen, out);
            }
        }
        let Some(tracked) = self.sockets.remove(&cookie) else { return };
        if let Some(walk) = self.walk.as_mut() {
            walk.released.insert(cookie);
        }
        out.push(PortRecord {
            ts_ns,
            port: tracked.port_ref(cookie),
            body: RecordBody::Release {
                reason,
                // A snapshot is not the allocation: how long it was held is
                // not known.
                held_ns: (tracked.origin != Origin::Snapshot).then(|| ts_ns.saturating_sub(tracked.alloc_ts_ns)),
                origin: Some(tracked.origin),
                alloc_ts_ns: Some(tracked.alloc_ts_ns),
            },
        });
    }

    fn on_tcp_state(
        &mut self,
        ev: &KernelEvent,
        old: TcpState,
        new: TcpState,
        port_held: u16,
        sk_err: i32,
        out: &mut Vec<PortRecord>,
    ) {
        let cookie = ev.cookie;
        let Some(phase) = self.sockets.get(&cookie).map(|t| t.phase) else {
            // Leaving CLOSE without a port: connect() or listen() is about to
            // pick one. With a port, the socket was bound before we started.
            let awaiting = match (old, new) {
                (TcpState::Close, TcpState::SynSent) => Some(Origin::Connect),
                (TcpState::Close, TcpState::Listen) => Some(Origin::Listen),
                _ => None,
            };
            match awaiting {
                Some(origin) if ev.endpoints.lport == 0 => {
                    self.make_room();
                    self.sockets.insert(
                        cookie,
                        Tracked {
                            phase: Phase::Awaiting(origin),
                            owner: ev.task.clone().unwrap_or_else(unknown_owner),
                            netns: ev.netns,
                            endpoints: ev.endpoints.clone(),
                            alloc_ts_ns: ev.ts_ns,
                            origin,
                            ephemeral: true,
                            deferred_state: Some((ev.ts_ns, old, new)),
                            time_wait_since_ns: 0,
                            pending_release: None,
                            sock_id: 0,
                            tcp_state: None,
                        },
                    );
                }
                _ => self.stats.unknown_socket_events += 1,
            }
            return;
        };

        if let Phase::Awaiting(_) = phase {
            if ev.endpoints.lport == 0 {
                if new == TcpState::Close {
                    // Failed before a port was chosen; a failed connect is
                    // reported from its syscall's return code.
                    self.sockets.remove(&cookie);
                }
                return;
            }
            self.materialize(cookie, &ev.endpoints, out);
        }
        if phase == Phase::TimeWait {
            return;
        }

        let Some(tracked) = self.sockets.get_mut(&cookie) else { return };
        tracked.learn(&ev.endpoints);
        tracked.tcp_state = Some(new);
        if new != TcpState::Close {
            out.push(PortRecord {
                ts_ns: ev.ts_ns,
                port: tracked.port_ref(cookie),
                body: RecordBody::State { old, new },
            });
            return;
        }
        if closes_into_time_wait(old, sk_err) {
            tracked.tcp_state = Some(TcpState::TimeWait);
            tracked.phase = Phase::TimeWait;
            tracked.time_wait_since_ns = ev.ts_ns;
            tracked.time_wait_since_ns = ev.ts_ns;
            out.push(PortRecord {
                ts_ns: ev.ts_ns,
                port: tracked.port_ref(cookie),
                body: RecordBody::State { old, new: TcpState::TimeWait },
            });
            return;
        }
        out.push(PortRecord { ts_ns: ev.ts_ns, port: tracked.port_ref(cookie), body: RecordBody::State { old, new } });
        if port_held == 0 {
            let reason = if old == TcpState::SynSent { ReleaseReason::ConnectFailed } else { ReleaseReason::Close };
            self.release(cookie, ev.ts_ns, reason, out);
        }
        // Otherwise an explicit bind keeps the port until tcp_v4_destroy_sock.
    }

    fn on_tcp_destroy(&mut self, ev: &KernelEvent, out: &mut Vec<PortRecord>) {
        match self.sockets.get(&ev.cookie).map(|t| t.phase) {
            Some(Phase::Held) => self.release(ev.cookie, ev.ts_ns, ReleaseReason::Close, out),
            Some(Phase::Awaiting(_)) => {
                self.sockets.remove(&ev.cookie);
            }
            // The TIME_WAIT socket holds the port on; children and sockets
            // from before we started are not ours to release.
            Some(Phase::TimeWait) => {}
            None => self.stats.unknown_socket_events += 1,
        }
    }

    fn on_bind(&mut self, ev: &KernelEvent, requested_port: u16, out: &mut Vec<PortRecord>) {
        if self
            .sockets
            .get(&ev.cookie)
            .is_some_and(|t| t.phase == Phase::Held && t.endpoints.lport == ev.endpoints.lport)
        {
            return; // reported by the precise get_port hook already
        }
        let tracked = Tracked::from_event(ev, Phase::Held, Origin::Bind, requested_port == 0);
        self.alloc(ev, tracked, out);
    }

    fn on_connect(&mut self, ev: &KernelEvent, ret: i32, port_before: u16, out: &mut Vec<PortRecord>) {
        let cookie = ev.cookie;
        let proto = ev.endpoints.proto;
        match self.sockets.get(&cookie).map(|t| t.phase) {
            Some(Phase::Awaiting(_)) if ev.endpoints.lport != 0 => {
                self.materialize(cookie, &ev.endpoints, out);
                return;
            }
            Some(Phase::Held) => {
                if let Some(tracked) = self.sockets.get_mut(&cookie) {
                    tracked.learn(&ev.endpoints);
                }
                return;
            }
            Some(Phase::TimeWait) => return,
            Some(Phase::Awaiting(_)) | None => {}
        }
        if port_before != 0 {
            return; // the socket had its port already (bound before we started)
        }
        if ev.endpoints.lport != 0 {
            // TCP: inet_hash_connect chose the port (precise backend, or a
            // portable run that missed the SYN_SENT state change); UDP:
            // inet_dgram_connect → inet_autobind did.
            let tracked = Tracked::from_event(ev, Phase::Held, Origin::Connect, true);
            self.alloc(ev, tracked, out);
            return;
        }
        if ret < 0 && is_port_shortage(proto, -ret) {
            self.sockets.remove(&cookie);
            let owner = ev.task.clone().unwrap_or_else(unknown_owner);
            let mut port = Tracked {
                phase: Phase::Held,
                owner,
                netns: ev.netns,
                endpoints: ev.endpoints.clone(),
                alloc_ts_ns: ev.ts_ns,
                origin: Origin::Connect,
                ephemeral: true,
                deferred_state: None,
                time_wait_since_ns: 0,
                pending_release: None,
                sock_id: 0,
                tcp_state: None,
            }
            .port_ref(cookie);
            port.lport = 0;
            out.push(PortRecord {
                ts_ns: ev.ts_ns,
                port,
                body: RecordBody::AllocFail { errno: -ret, origin: Origin::Connect },
            });
        }
    }

    fn on_udp_release(&mut self, ev: &KernelEvent, out: &mut Vec<PortRecord>) {
        // udp_lib_unhash runs for close and for connect(AF_UNSPEC).
        let reason = if ev.syscall.map(i64::from) == Some(libc::SYS_connect) {
            ReleaseReason::Disconnect
        } else {
            ReleaseReason::Close
        };
        if self.sockets.contains_key(&ev.cookie) {
            self.release(ev.cookie, ev.ts_ns, reason, out);
            return;
        }
        // UDP has no children: a release of an unknown socket is a port
        // allocated before we started, or on a path this backend cannot see.
        self.stats.unpaired_releases += 1;
        let owner = ev.task.clone().unwrap_or_else(unknown_owner);
        out.push(PortRecord {
            ts_ns: ev.ts_ns,
            port: PortRef {
                sock: ev.cookie,
                netns: ev.netns,
                proto: ev.endpoints.proto,
                family: ev.endpoints.family,
                laddr: ev.endpoints.laddr,
                lport: ev.endpoints.lport,
                raddr: ev.endpoints.raddr,
                rport: ev.endpoints.rport,
                pid: owner.pid,
                comm: owner.comm,
                cgroup: owner.cgroup,
                ephemeral: None,
            },
            body: RecordBody::Release { reason, held_ns: None, origin: None, alloc_ts_ns: None },
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::Family;

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn task() -> Option<Task> {
        Some(Task { pid: 42, tid: 43, comm: "curl".into(), cgroup: 7 })
    }

    fn ev(
        ts: u64,
        cookie: u64,
        proto: Proto,
        lport: u16,
        remote: Option<u16>,
        task: Option<Task>,
        happening: Happening,
    ) -> KernelEvent {
        KernelEvent {
            ts_ns: ts,
            cookie,
            netns: 1,
            endpoints: Endpoints {
                proto,
                family: Family::Ipv4,
                laddr: if lport == 0 { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { LO },
                lport,
                raddr: remote.map(|_| LO),
                rport: remote,
            },
            task,
            happening,
            syscall: None,
            sk_addr: cookie * 64,
            tw_addr: 0,
        }
    }

    fn state(old: TcpState, new: TcpState, port_held: u16, sk_err: i32) -> Happening {
        Happening::TcpState { old, new, port_held, sk_err }
    }

    fn kinds(out: &[PortRecord]) -> Vec<String> {
        out.iter()
            .map(|r| match &r.body {
                RecordBody::State { old, new } => format!("state {old}>{new}"),
                RecordBody::Release { reason, .. } => format!("release {}", reason.name()),
                RecordBody::Alloc { origin, ephemeral } => format!("alloc {} {ephemeral}", origin.name()),
                RecordBody::AllocFail { errno, .. } => format!("alloc_fail {errno}"),
            })
            .collect()
    }

    use TcpState::*;

    /// connect → established → passive close (LAST_ACK → CLOSE frees the port).
    #[test]
    fn tcp_client_lifecycle_with_passive_close() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(100, 1, Proto::Tcp, 0, Some(80), task(), state(Close, SynSent, 0, 0)), &mut out);
        assert!(out.is_empty(), "no port known yet");
        t.on_event(&ev(150, 1, Proto::Tcp, 40000, Some(80), None, state(SynSent, Established, 40000, 0)), &mut out);
        t.on_event(
            &ev(160, 1, Proto::Tcp, 40000, Some(80), task(), Happening::Connect { ret: 0, port_before: 0 }),
            &mut out,
        );
        assert_eq!(t.ports_in_use(), 1);
        t.on_event(&ev(200, 1, Proto::Tcp, 40000, Some(80), None, state(Established, CloseWait, 40000, 0)), &mut out);
        t.on_event(&ev(300, 1, Proto::Tcp, 40000, Some(80), None, state(CloseWait, LastAck, 40000, 0)), &mut out);
        t.on_event(&ev(400, 1, Proto::Tcp, 40000, Some(80), None, state(LastAck, Close, 0, 0)), &mut out);
        assert_eq!(
            kinds(&out),
            [
                "alloc connect true",
                "state CLOSE>SYN_SENT",
                "state SYN_SENT>ESTABLISHED",
                "state ESTABLISHED>CLOSE_WAIT",
                "state CLOSE_WAIT>LAST_ACK",
                "state LAST_ACK>CLOSE",
                "release close"
            ]
        );
        // The alloc is stamped at SYN_SENT and carries the owner from it,
        // although the port only showed in softirq.
        assert_eq!(out[0].ts_ns, 100);
        assert_eq!((out[0].port.pid, out[0].port.comm.as_str(), out[0].port.lport), (42, "curl", 40000));
        let last = out.last().unwrap();
        assert_eq!(last.port.pid, 42, "owner carried to the softirq release");
        assert!(matches!(last.body, RecordBody::Release { held_ns: Some(300), .. }));
        assert_eq!(t.ports_in_use(), 0);
    }

    /// Active close: FIN_WAIT2 → CLOSE without error is the TIME_WAIT hand-off.
    #[test]
    fn active_close_hands_the_port_to_time_wait() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 9, Proto::Tcp, 0, Some(80), task(), state(Close, SynSent, 0, 0)), &mut out);
        t.on_event(&ev(2, 9, Proto::Tcp, 41000, Some(80), None, state(SynSent, Established, 41000, 0)), &mut out);
        t.on_event(&ev(3, 9, Proto::Tcp, 41000, Some(80), task(), state(Established, FinWait1, 41000, 0)), &mut out);
        t.on_event(&ev(4, 9, Proto::Tcp, 41000, Some(80), None, state(FinWait1, FinWait2, 41000, 0)), &mut out);
        t.on_event(&ev(5, 9, Proto::Tcp, 41000, Some(80), None, state(FinWait2, Close, 0, 0)), &mut out);
        assert_eq!(kinds(&out).last().unwrap(), "state FIN_WAIT2>TIME_WAIT");
        assert_eq!(t.ports_in_use(), 1);
        assert_eq!(t.time_wait_ports(), 1);
        // tcp_destroy_sock of the full socket does not free the TIME_WAIT port.
        out.clear();
        t.on_event(&ev(6, 9, Proto::Tcp, 41000, Some(80), None, Happening::TcpDestroy), &mut out);
        assert!(out.is_empty());
        assert_eq!(t.time_wait_ports(), 1);
    }

    /// A reset in FIN_WAIT2 sets sk_err: a real release, not TIME_WAIT.
    #[test]
    fn reset_in_fin_wait_releases() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 9, Proto::Tcp, 0, Some(80), task(), state(Close, SynSent, 0, 0)), &mut out);
        t.on_event(&ev(2, 9, Proto::Tcp, 41000, Some(80), None, state(SynSent, Established, 41000, 0)), &mut out);
        t.on_event(&ev(3, 9, Proto::Tcp, 41000, Some(80), None, state(Established, FinWait2, 41000, 0)), &mut out);
        t.on_event(&ev(4, 9, Proto::Tcp, 41000, Some(80), None, state(FinWait2, Close, 0, libc::ECONNRESET)), &mut out);
        assert_eq!(kinds(&out).last().unwrap(), "release close");
        assert_eq!(t.ports_in_use(), 0);
    }

    /// A refused connect: the port shows only through inet_sport at CLOSE.
    #[test]
    fn refused_connect_is_alloc_then_connect_failed() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 5, Proto::Tcp, 0, Some(81), task(), state(Close, SynSent, 0, 0)), &mut out);
        t.on_event(
            &ev(2, 5, Proto::Tcp, 42000, Some(81), None, state(SynSent, Close, 0, libc::ECONNREFUSED)),
            &mut out,
        );
        t.on_event(
            &ev(3, 5, Proto::Tcp, 0, Some(81), task(), Happening::Connect { ret: -libc::ECONNREFUSED, port_before: 0 }),
            &mut out,
        );
        assert_eq!(
            kinds(&out),
            ["alloc connect true", "state CLOSE>SYN_SENT", "state SYN_SENT>CLOSE", "release connect_failed"]
        );
    }

    /// EADDRNOTAVAIL: no port was ever held.
    #[test]
    fn exhausted_connect_is_alloc_fail() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 5, Proto::Tcp, 0, Some(81), task(), state(Close, SynSent, 0, 0)), &mut out);
        t.on_event(&ev(2, 5, Proto::Tcp, 0, Some(81), task(), state(SynSent, Close, 0, 0)), &mut out);
        t.on_event(
            &ev(
                3,
                5,
                Proto::Tcp,
                0,
                Some(81),
                task(),
                Happening::Connect { ret: -libc::EADDRNOTAVAIL, port_before: 0 },
            ),
            &mut out,
        );
        assert_eq!(kinds(&out), ["alloc_fail 99"]);
        assert_eq!(out[0].port.rport, Some(81));
        assert_eq!(out[0].port.pid, 42);
        assert_eq!(t.ports_in_use(), 0);
    }

    /// bind(0) + listen + close: the port goes back at LISTEN → CLOSE.
    #[test]
    fn ephemeral_listener() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 3, Proto::Tcp, 43000, None, task(), Happening::Bind { requested_port: 0 }), &mut out);
        t.on_event(&ev(2, 3, Proto::Tcp, 43000, None, task(), state(Close, Listen, 43000, 0)), &mut out);
        t.on_event(&ev(3, 3, Proto::Tcp, 43000, None, task(), state(Listen, Close, 0, 0)), &mut out);
        assert_eq!(kinds(&out), ["alloc bind true", "state CLOSE>LISTEN", "state LISTEN>CLOSE", "release close"]);
    }

    /// bind(port): SOCK_BINDPORT_LOCK keeps the port past CLOSE until destroy.
    #[test]
    fn explicit_bind_released_at_destroy() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 4, Proto::Tcp, 8080, None, task(), Happening::Bind { requested_port: 8080 }), &mut out);
        t.on_event(&ev(2, 4, Proto::Tcp, 8080, None, task(), state(Close, Listen, 8080, 0)), &mut out);
        t.on_event(&ev(3, 4, Proto::Tcp, 8080, None, task(), state(Listen, Close, 8080, 0)), &mut out);
        assert_eq!(t.ports_in_use(), 1);
        t.on_event(&ev(4, 4, Proto::Tcp, 8080, None, None, Happening::TcpDestroy), &mut out);
        assert_eq!(kinds(&out), ["alloc bind false", "state CLOSE>LISTEN", "state LISTEN>CLOSE", "release close"]);
        assert_eq!(t.ports_in_use(), 0);
    }

    /// Accepted children and pre-existing sockets produce nothing.
    #[test]
    fn unknown_tcp_sockets_are_ignored() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 50, Proto::Tcp, 8080, Some(40000), None, state(SynRecv, Established, 8080, 0)), &mut out);
        t.on_event(&ev(2, 50, Proto::Tcp, 8080, Some(40000), None, state(Established, Close, 8080, 0)), &mut out);
        t.on_event(&ev(3, 50, Proto::Tcp, 8080, Some(40000), None, Happening::TcpDestroy), &mut out);
        assert!(out.is_empty());
        assert_eq!(t.stats().unknown_socket_events, 3);
    }

    /// UDP connect autobind, then close; then a release of an unknown socket.
    #[test]
    fn udp_connect_autobind_and_unpaired_release() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(
            &ev(10, 6, Proto::Udp, 50000, Some(53), task(), Happening::Connect { ret: 0, port_before: 0 }),
            &mut out,
        );
        t.on_event(&ev(30, 6, Proto::Udp, 50000, Some(53), task(), Happening::UdpRelease), &mut out);
        t.on_event(&ev(40, 7, Proto::Udp, 50001, None, task(), Happening::UdpRelease), &mut out);
        assert_eq!(kinds(&out), ["alloc connect true", "release close", "release close"]);
        assert!(matches!(out[1].body, RecordBody::Release { held_ns: Some(20), .. }));
        assert!(matches!(out[2].body, RecordBody::Release { held_ns: None, .. }));
        assert_eq!(t.stats().unpaired_releases, 1);
    }

    /// UDP connect on a bound socket, and a failed autobind.
    #[test]
    fn udp_connect_after_bind_and_failed_autobind() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 8, Proto::Udp, 5353, None, task(), Happening::Bind { requested_port: 5353 }), &mut out);
        t.on_event(
            &ev(2, 8, Proto::Udp, 5353, Some(53), task(), Happening::Connect { ret: 0, port_before: 5353 }),
            &mut out,
        );
        t.on_event(
            &ev(3, 9, Proto::Udp, 0, Some(53), task(), Happening::Connect { ret: -libc::EAGAIN, port_before: 0 }),
            &mut out,
        );
        assert_eq!(kinds(&out), ["alloc bind false", "alloc_fail 11"]);
        t.on_event(&ev(4, 8, Proto::Udp, 5353, Some(53), task(), Happening::UdpRelease), &mut out);
        assert_eq!(out.last().unwrap().port.rport, Some(53), "remote learnt at connect");
    }

    /// A cookie seen again after its release starts a fresh lifecycle; a
    /// second bind on a held socket counts as a duplicate.
    #[test]
    fn cookie_reuse_and_duplicate_alloc() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 2, Proto::Udp, 6000, None, task(), Happening::Bind { requested_port: 0 }), &mut out);
        t.on_event(&ev(2, 2, Proto::Udp, 6000, None, task(), Happening::UdpRelease), &mut out);
        t.on_event(&ev(3, 2, Proto::Udp, 6001, None, task(), Happening::Bind { requested_port: 0 }), &mut out);
        assert_eq!(t.stats().duplicate_allocs, 0);
        t.on_event(&ev(4, 2, Proto::Udp, 6002, None, task(), Happening::Bind { requested_port: 0 }), &mut out);
        assert_eq!(t.stats().duplicate_allocs, 1);
        assert_eq!(kinds(&out), ["alloc bind true", "release close", "alloc bind true", "alloc bind true"]);
        assert_eq!(t.ports_in_use(), 1);
    }

    /// listen() on an unbound socket: the port shows at the next event.
    #[test]
    fn listen_autobind_materializes_later() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 11, Proto::Tcp, 0, None, task(), state(Close, Listen, 0, 0)), &mut out);
        t.on_event(&ev(9, 11, Proto::Tcp, 45000, None, task(), state(Listen, Close, 0, 0)), &mut out);
        assert_eq!(kinds(&out), ["alloc listen true", "state CLOSE>LISTEN", "state LISTEN>CLOSE", "release close"]);
        assert_eq!(out[0].ts_ns, 1);
    }

    fn with_syscall(mut e: KernelEvent, nr: i64) -> KernelEvent {
        e.syscall = Some(nr as i32);
        e
    }

    /// Precise backend: connect, TIME_WAIT hand-off, TIME_WAIT end.
    #[test]
    fn precise_client_through_time_wait_end() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 5, Proto::Tcp, 0, Some(80), task(), state(Close, SynSent, 0, 0)), &mut out);
        t.on_event(
            &ev(2, 5, Proto::Tcp, 40000, Some(80), task(), Happening::Connect { ret: 0, port_before: 0 }),
            &mut out,
        );
        t.on_event(&ev(3, 5, Proto::Tcp, 40000, Some(80), None, state(SynSent, Established, 40000, 0)), &mut out);
        t.on_event(&ev(4, 5, Proto::Tcp, 40000, Some(80), None, state(Established, FinWait1, 40000, 0)), &mut out);
        t.on_event(&ev(5, 5, Proto::Tcp, 40000, Some(80), None, state(FinWait1, FinWait2, 40000, 0)), &mut out);
        t.on_event(
            &ev(6, 5, Proto::Tcp, 40000, Some(80), None, Happening::TimeWaitStart { state: Some(FinWait2) }),
            &mut out,
        );
        t.on_event(
            &ev(7, 5, Proto::Tcp, 40000, Some(80), None, Happening::PutPort { state: Some(FinWait2), sk_err: 0 }),
            &mut out,
        );
        t.on_event(&ev(7, 5, Proto::Tcp, 40000, Some(80), None, state(FinWait2, Close, 0, 0)), &mut out);
        assert_eq!(t.time_wait_ports(), 1);
        t.on_event(&ev(60_000_000_007, 5, Proto::Tcp, 40000, None, None, Happening::TimeWaitEnd), &mut out);
        assert_eq!(
            kinds(&out),
            [
                "alloc connect true",
                "state CLOSE>SYN_SENT",
                "state SYN_SENT>ESTABLISHED",
                "state ESTABLISHED>FIN_WAIT1",
                "state FIN_WAIT1>FIN_WAIT2",
                "state FIN_WAIT2>TIME_WAIT",
                "release time_wait_end"
            ]
        );
        let last = out.last().unwrap();
        assert_eq!((last.port.pid, last.port.rport), (42, Some(80)), "owner and destination kept");
        assert!(matches!(last.body, RecordBody::Release { held_ns: Some(60_000_000_006), .. }));
        assert_eq!(t.ports_in_use(), 0);
    }

    /// Precise backend: bind(0) + listen, with the portable post_bind
    /// report of the same bind alongside (deduplicated), then close.
    #[test]
    fn precise_bind_listen_close_dedupes_portable() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        let get_port = Happening::GetPort { requested_port: 0, ret: 0, state: Some(Close) };
        t.on_event(&with_syscall(ev(1, 3, Proto::Tcp, 43000, None, task(), get_port), libc::SYS_bind), &mut out);
        t.on_event(&ev(2, 3, Proto::Tcp, 43000, None, task(), Happening::Bind { requested_port: 0 }), &mut out);
        t.on_event(&ev(3, 3, Proto::Tcp, 43000, None, task(), state(Close, Listen, 43000, 0)), &mut out);
        t.on_event(
            &ev(4, 3, Proto::Tcp, 43000, None, None, Happening::PutPort { state: Some(Listen), sk_err: 0 }),
            &mut out,
        );
        t.on_event(&ev(4, 3, Proto::Tcp, 43000, None, None, state(Listen, Close, 0, 0)), &mut out);
        // inet_put_port runs inside tcp_set_state(CLOSE), before the state
        // tracepoint: the release waits for the move to CLOSE.
        assert_eq!(kinds(&out), ["alloc bind true", "state CLOSE>LISTEN", "state LISTEN>CLOSE", "release close"]);
        assert_eq!(out[3].ts_ns, 4);
        assert_eq!(t.stats().duplicate_allocs, 0);
    }

    /// Precise backend: listen() on an unbound socket is an allocation at
    /// get_port time, and a re-validating get_port is never reported.
    #[test]
    fn precise_listen_autobind() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 4, Proto::Tcp, 0, None, task(), state(Close, Listen, 0, 0)), &mut out);
        let get_port = Happening::GetPort { requested_port: 0, ret: 0, state: Some(Listen) };
        t.on_event(&with_syscall(ev(2, 4, Proto::Tcp, 44000, None, task(), get_port), libc::SYS_listen), &mut out);
        assert_eq!(kinds(&out), ["alloc listen true", "state CLOSE>LISTEN"]);
    }

    /// Precise backend: UDP origins from the syscall, disconnect, failures.
    #[test]
    fn precise_udp_origins_and_failures() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        let ok = Happening::GetPort { requested_port: 0, ret: 0, state: None };
        t.on_event(&with_syscall(ev(1, 1, Proto::Udp, 50000, None, task(), ok.clone()), libc::SYS_connect), &mut out);
        t.on_event(&with_syscall(ev(2, 2, Proto::Udp, 50001, None, task(), ok.clone()), libc::SYS_sendto), &mut out);
        t.on_event(
            &with_syscall(
                ev(3, 3, Proto::Udp, 53, None, task(), Happening::GetPort { requested_port: 53, ret: 0, state: None }),
                libc::SYS_bind,
            ),
            &mut out,
        );
        t.on_event(
            &with_syscall(ev(4, 1, Proto::Udp, 50000, None, task(), Happening::UdpRelease), libc::SYS_connect),
            &mut out,
        );
        t.on_event(
            &with_syscall(ev(5, 2, Proto::Udp, 50001, None, task(), Happening::UdpRelease), libc::SYS_close),
            &mut out,
        );
        let in_use = Happening::GetPort { requested_port: 53, ret: -libc::EADDRINUSE, state: None };
        t.on_event(&with_syscall(ev(6, 9, Proto::Udp, 0, None, task(), in_use), libc::SYS_bind), &mut out);
        let exhausted = Happening::GetPort { requested_port: 0, ret: -libc::EADDRINUSE, state: None };
        t.on_event(&with_syscall(ev(7, 10, Proto::Udp, 0, None, task(), exhausted), libc::SYS_sendto), &mut out);
        let tcp_in_use = Happening::GetPort { requested_port: 80, ret: 1, state: Some(Close) };
        t.on_event(&with_syscall(ev(8, 11, Proto::Tcp, 0, None, task(), tcp_in_use), libc::SYS_bind), &mut out);
        // The UDP connect's alloc waits for the connect's end (the addresses);
        // here none came, so the release reports it first.
        assert_eq!(
            kinds(&out),
            [
                "alloc autobind true",
                "alloc bind false",
                "alloc connect true",
                "release disconnect",
                "release close",
                "alloc_fail 98",
                "alloc_fail 11",
                "alloc_fail 98"
            ]
        );
        assert_eq!(out[5].port.lport, 53, "a failed bind names the port asked for");
        assert_eq!(t.ports_in_use(), 1);
    }

    /// kprobe backend: events joined by socket address, TIME_WAIT included;
    /// the reported `sock` is masked.
    #[test]
    fn address_keying_joins_time_wait() {
        let mask = 0x5a5a_5a5a_5a5a_5a5a;
        let mut t = Tracker::with_keying(Keying::Address { mask });
        let mut out = Vec::new();
        let mut connect = ev(1, 0, Proto::Tcp, 40000, Some(80), task(), Happening::Connect { ret: 0, port_before: 0 });
        connect.sk_addr = 0xffff_8880_0000_1000;
        t.on_event(&connect, &mut out);
        let mut tw_start =
            ev(2, 0, Proto::Tcp, 40000, Some(80), None, Happening::TimeWaitStart { state: Some(FinWait2) });
        tw_start.sk_addr = connect.sk_addr;
        tw_start.tw_addr = 0xffff_8880_0000_2000;
        t.on_event(&tw_start, &mut out);
        let mut put =
            ev(3, 0, Proto::Tcp, 40000, Some(80), None, Happening::PutPort { state: Some(FinWait2), sk_err: 0 });
        put.sk_addr = connect.sk_addr;
        t.on_event(&put, &mut out);
        let mut tw_end = ev(9, 0, Proto::Tcp, 40000, None, None, Happening::TimeWaitEnd);
        tw_end.sk_addr = tw_start.tw_addr;
        t.on_event(&tw_end, &mut out);
        assert_eq!(kinds(&out), ["alloc connect true", "state FIN_WAIT2>TIME_WAIT", "release time_wait_end"]);
        assert!(out.iter().all(|r| r.port.sock == out[0].port.sock));
        assert_ne!(out[0].port.sock, connect.sk_addr, "addresses are not shown");
        assert_eq!(t.ports_in_use(), 0);
        // A later socket at the same address is another lifecycle.
        let mut again = connect.clone();
        again.ts_ns = 20;
        t.on_event(&again, &mut out);
        assert_ne!(out.last().unwrap().port.sock, out[0].port.sock);
    }

    /// Portable backend: UDP sendto autobind, a repeated first-send report
    /// (LRU eviction in the kernel) and a failed bind.
    #[test]
    fn udp_first_send_and_bind_failure() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 4, Proto::Udp, 51000, None, task(), Happening::UdpFirstSend), &mut out);
        t.on_event(&ev(2, 4, Proto::Udp, 51000, None, task(), Happening::UdpFirstSend), &mut out);
        t.on_event(&ev(3, 4, Proto::Udp, 51000, None, task(), Happening::UdpRelease), &mut out);
        t.on_event(
            &ev(4, 5, Proto::Tcp, 8080, None, task(), Happening::BindFailed { ret: -libc::EADDRINUSE }),
            &mut out,
        );
        assert_eq!(kinds(&out), ["alloc autobind true", "release close", "alloc_fail 98"]);
        assert_eq!(out[2].port.lport, 8080);
        assert!(matches!(out[2].body, RecordBody::AllocFail { origin: Origin::Bind, .. }));
        assert_eq!(t.stats().duplicate_allocs, 0);
    }

    fn snapshot(ts: u64, cookie: u64, lport: u16, remote: Option<u16>, state: TcpState, inode: u32) -> KernelEvent {
        ev(ts, cookie, Proto::Tcp, lport, remote, None, Happening::Snapshot { state: Some(state), inode })
    }

    fn walk_start(started_ns: u64, adopt_unknown: bool) -> WalkStart {
        let mut owners = std::collections::HashMap::new();
        owners.insert(900, Task { pid: 77, tid: 77, comm: "nginx".into(), cgroup: 0 });
        WalkStart {
            netns: 1,
            proto: Proto::Tcp,
            started_ns,
            owners,
            ephemeral_range: [32768, 60999],
            adopt_unknown,
            adopt_time_wait: adopt_unknown,
        }
    }

    /// The first walk adopts pre-existing sockets, skipping accepted
    /// children; a later walk that no longer finds them releases them.
    #[test]
    fn snapshot_adopts_then_reconciles() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.begin_walk(walk_start(10, true));
        t.on_event(&snapshot(11, 1, 8080, None, Listen, 900), &mut out);
        t.on_event(&snapshot(12, 2, 8080, Some(40000), Established, 901), &mut out); // child
        t.on_event(&snapshot(13, 3, 45000, Some(443), Established, 900), &mut out); // client
        t.on_event(&snapshot(14, 4, 46000, Some(443), TimeWait, 0), &mut out);
        t.end_walk(15, &mut out);
        assert_eq!(kinds(&out), ["alloc snapshot false", "alloc snapshot true", "alloc snapshot true"]);
        assert_eq!((out[0].port.pid, out[0].port.comm.as_str()), (77, "nginx"));
        assert_eq!(out[2].port.pid, 0, "TIME_WAIT sockets have no owner");
        assert_eq!((t.ports_in_use(), t.time_wait_ports()), (3, 1));

        // A second walk finds only the listener: the client was released
        // unseen (reconciled), the TIME_WAIT ended; held times are unknown.
        out.clear();
        t.begin_walk(walk_start(100, false));
        t.on_event(&snapshot(101, 1, 8080, None, Listen, 900), &mut out);
        t.on_event(&snapshot(102, 9, 8080, Some(40001), TimeWait, 0), &mut out); // a child's TIME_WAIT
        t.end_walk(103, &mut out);
        let mut got = kinds(&out);
        got.sort();
        assert_eq!(got, ["release reconciled", "release time_wait_end"]);
        assert!(out.iter().all(|r| matches!(r.body, RecordBody::Release { held_ns: None, .. })));
        assert_eq!(t.stats().reconciled, 1);
        assert_eq!(t.ports_in_use(), 1);
    }

    /// A walk never releases what began after it started, nor what it saw.
    #[test]
    fn walk_spares_newer_and_seen_sockets() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(50, 5, Proto::Tcp, 0, Some(80), task(), state(Close, SynSent, 0, 0)), &mut out);
        t.on_event(&ev(51, 5, Proto::Tcp, 41000, Some(80), None, state(SynSent, Established, 41000, 0)), &mut out);
        t.on_event(&ev(60, 6, Proto::Tcp, 0, Some(80), task(), state(Close, SynSent, 0, 0)), &mut out);
        t.on_event(&ev(61, 6, Proto::Tcp, 41002, Some(80), None, state(SynSent, Established, 41002, 0)), &mut out);
        out.clear();
        t.begin_walk(walk_start(55, false));
        t.on_event(&snapshot(70, 5, 41000, Some(80), Established, 1), &mut out);
        t.end_walk(71, &mut out);
        assert!(out.is_empty(), "{:?}", kinds(&out));
        assert_eq!(t.ports_in_use(), 2);
    }

    /// listen() on an unbound socket: a walk shows its port.
    #[test]
    fn walk_materializes_listen_autobind() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 11, Proto::Tcp, 0, None, task(), state(Close, Listen, 0, 0)), &mut out);
        t.begin_walk(walk_start(5, false));
        t.on_event(&snapshot(6, 11, 45000, None, Listen, 1), &mut out);
        t.end_walk(7, &mut out);
        assert_eq!(kinds(&out), ["alloc listen true", "state CLOSE>LISTEN"]);
        assert_eq!(out[0].ts_ns, 1, "stamped at listen()");
    }

    /// Events with cookie 0 (a raw tracepoint before any cookie was
    /// assigned) are not joined into anything.
    #[test]
    fn cookie_zero_names_no_socket() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.on_event(&ev(1, 0, Proto::Tcp, 0, Some(80), task(), state(Close, SynSent, 0, 0)), &mut out);
        t.on_event(&ev(2, 0, Proto::Tcp, 41000, Some(80), None, state(SynSent, Established, 41000, 0)), &mut out);
        assert!(out.is_empty());
        assert_eq!(t.stats().unknown_socket_events, 2);
    }

    /// Past the limit the oldest sockets are dropped, and counted.
    #[test]
    fn limit_evicts_the_oldest() {
        let mut t = Tracker::new().with_limit(32);
        let mut out = Vec::new();
        for i in 1..=100u64 {
            t.on_event(
                &ev(i, i, Proto::Udp, 1000 + i as u16, None, task(), Happening::Bind { requested_port: 0 }),
                &mut out,
            );
        }
        assert!(t.tracked() <= 32, "{}", t.tracked());
        assert_eq!(t.stats().evicted as usize + t.tracked(), 100);
        // The newest is still followed; an evicted one's release is unpaired.
        out.clear();
        t.on_event(&ev(200, 100, Proto::Udp, 1100, None, task(), Happening::UdpRelease), &mut out);
        assert!(matches!(out[0].body, RecordBody::Release { held_ns: Some(100), .. }));
        t.on_event(&ev(201, 1, Proto::Udp, 1001, None, task(), Happening::UdpRelease), &mut out);
        assert!(matches!(out[1].body, RecordBody::Release { held_ns: None, .. }));
    }

    /// A socket a walk finds while it is being allocated or released is not
    /// adopted twice.
    #[test]
    fn walk_races_with_allocations_and_releases() {
        let mut t = Tracker::new();
        let mut out = Vec::new();
        t.begin_walk(WalkStart { proto: Proto::Udp, adopt_unknown: true, ..walk_start(10, true) });
        let udp = |ts, cookie, lport, happening| ev(ts, cookie, Proto::Udp, lport, None, task(), happening);
        // Found before its bind is reported, then bound.
        let snap = Happening::Snapshot { state: None, inode: 1 };
        t.on_event(&udp(11, 1, 5000, snap.clone()), &mut out);
        t.on_event(&udp(12, 1, 5000, Happening::Bind { requested_port: 0 }), &mut out);
        // Allocated, released, then found (the ring's order).
        t.on_event(&udp(13, 2, 5001, Happening::UdpFirstSend), &mut out);
        t.on_event(&udp(14, 2, 5001, Happening::UdpRelease), &mut out);
        t.on_event(&udp(15, 2, 5001, snap), &mut out);
        t.end_walk(16, &mut out);
        assert_eq!(kinds(&out), ["alloc bind true", "alloc autobind true", "release close"]);
    }

    /// kprobe backend: a walk that finds the TIME_WAIT socket (at its own
    /// address) keeps its parent's port held.
    #[test]
    fn address_keying_walks_see_time_wait_sockets() {
        let mask = 0x77;
        let mut t = Tracker::with_keying(Keying::Address { mask });
        let mut out = Vec::new();
        let (sk, tw) = (0xffff_8880_0000_1000u64, 0xffff_8880_0000_2000u64);
        let mut connect = ev(1, 0, Proto::Tcp, 40000, Some(80), task(), Happening::Connect { ret: 0, port_before: 0 });
        connect.sk_addr = sk;
        t.on_event(&connect, &mut out);
        let mut start = ev(2, 0, Proto::Tcp, 40000, Some(80), None, Happening::TimeWaitStart { state: Some(FinWait2) });
        start.sk_addr = sk;
        start.tw_addr = tw;
        t.on_event(&start, &mut out);
        t.begin_walk(walk_start(10, false));
        let mut found = snapshot(11, 0, 40000, Some(80), TimeWait, 0);
        found.sk_addr = tw;
        t.on_event(&found, &mut out);
        t.end_walk(12, &mut out);
        assert_eq!(kinds(&out), ["alloc connect true", "state FIN_WAIT2>TIME_WAIT"], "no early time_wait_end");
        assert_eq!(t.time_wait_ports(), 1);
    }
}
