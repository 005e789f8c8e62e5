//! A live trace: load and attach the programs, read the ring buffer, walk
//! the kernel's sockets when a hook cannot tell, and hand every record to a
//! [`Frontend`] (`watch` and `record` write lines, `top` draws, `who`
//! answers) until Ctrl-C, SIGTERM, `--duration` or the frontend says stop.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use crate::analysis::{Analysis, Derived};
use crate::cli::{BackendArg, ReaderPriorityArg, TraceArgs};
use crate::clock::BootClock;
use crate::filter::Filter;
use crate::kernel;
use crate::model::Proto;
use crate::output::{Counts, Header, Summary};
use crate::pipeline::{Pipeline, RecordSink};
use crate::privileges;
use crate::reader_priority::{PriorityWatch, ReaderPriority};
use crate::record::PortRecord;
use crate::system;
use crate::tracker::{Keying, Tracker, WalkStart};
use crate::UsageError;

/// What consumes a live trace.
pub trait Frontend {
    /// Tracing has begun: the programs are attached.
    fn start(&mut self, header: &Header) -> io::Result<()>;
    /// A record that passed the user's filters.
    fn record(&mut self, rec: &PortRecord) -> io::Result<()>;
    /// A pressure warning or a notice from the live analysis.
    fn derived(&mut self, derived: &Derived) -> io::Result<()>;
    /// Events the kernel could not deliver.
    fn lost(&mut self, ts_ns: u64, count: u64) -> io::Result<()>;
    /// The start-up walk is over: what existed before is known. `Ok(false)`
    /// ends the trace (`who` without `--follow`).
    fn ready(&mut self, _state: &LiveState<'_>) -> io::Result<bool> {
        Ok(true)
    }
    /// Called every [`TICK`]: flush, redraw. `Ok(false)` ends the trace.
    fn tick(&mut self, state: &LiveState<'_>) -> io::Result<bool>;
    /// The trace ended: write the summary.
    fn finish(&mut self, summary: &Summary) -> io::Result<()>;
}

/// What a frontend may look at on a tick.
pub struct LiveState<'a> {
    /// The backend's name.
    pub backend: &'a str,
    /// The live analysis: pools, churn, notices.
    pub analysis: &'a Analysis,
    /// Records passed to the frontend, per type.
    pub counts: &'a Counts,
    /// Events lost so far.
    pub lost: u64,
    /// Ring-buffer records read so far.
    pub events: u64,
    /// Ports followed by the tracker now.
    pub ports_in_use: usize,
    /// Of those, held by TIME_WAIT.
    pub time_wait: usize,
    /// CLOCK_BOOTTIME now.
    pub now_ns: u64,
    /// The lifecycle tracker (what each followed socket is doing).
    pub tracker: &'a Tracker,
}

/// The contract: output is flushed at least every 100 ms; `top` redraws at
/// this rate (at most 10 Hz).
pub const TICK: Duration = Duration::from_millis(100);

/// The filters of `TraceArgs` that run in userspace.
pub fn build_filter(args: &TraceArgs) -> Result<Filter> {
    let cgroup = match &args.cgroup {
        Some(path) => Some(system::resolve_cgroup(path).map_err(|e| UsageError(format!("{e:#}")))?),
        None => None,
    };
    Ok(args.select.filter(cgroup))
}

/// Maps the backend choice to the loader's.
pub fn backend_choice(choice: BackendArg) -> kernel::Choice {
    match choice {
        BackendArg::Auto => kernel::Choice::Auto,
        BackendArg::Portable => kernel::Choice::Portable,
        BackendArg::Precise => kernel::Choice::Precise,
        BackendArg::Kprobe => kernel::Choice::Kprobe,
    }
}

/// Whether an error is a closed reader (`| head`): the run ends quietly.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// SIGINT and SIGTERM, caught from the start so that a signal at any time
/// ends the run cleanly (a summary, exit 0) instead of killing it.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

/// A checked request to trace: arguments validated, privileges present,
/// signals caught, nothing loaded yet (so that a command can still refuse its
/// own arguments, e.g. an existing output file, before the kernel is
/// touched).
pub struct Plan {
    signals: Signals,
    filter: Filter,
    netns: Option<u32>,
    netns_arg: Option<String>,
    trace: TraceArgs,
    metrics: Option<std::net::TcpListener>,
    analysis: Analysis,
}

impl Plan {
    /// Validates `trace` and checks privileges.
    pub fn new(trace: &TraceArgs) -> Result<Self> {
        let signals =
            Signals { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? };
        let filter = build_filter(trace)?;
        let netns = match &trace.select.netns {
            Some(arg) => Some(system::resolve_netns(arg).map_err(|e| UsageError(format!("{e:#}")))?),
            None => None,
        };
        let analysis = Analysis::new(&trace.allow_listener).with_range_source(Box::new(system::usable_range_of));
        let missing = privileges::missing_capabilities();
        if !missing.is_empty() {
            bail!(privileges::missing_message(&missing));
        }
        let metrics = match &trace.metrics {
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr.0)
                    .map_err(|e| UsageError(format!("--metrics {}: cannot listen there: {e}", addr.0)))?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
            None => None,
        };
        Ok(Self {
            signals,
            filter,
            netns,
            netns_arg: trace.select.netns.clone(),
            trace: trace.clone(),
            metrics,
            analysis,
        })
    }

    /// The network namespace inode `--netns` named.
    pub fn netns(&self) -> Option<u32> {
        self.netns
    }

    /// Loads and attaches the programs.
    pub fn load(self) -> Result<Session> {
        let Plan { signals, filter, netns, netns_arg, trace, metrics, mut analysis } = self;
        let ring_bytes = trace.ring_buffer_kib * 1024;
        let options = if trace.all_states { port_trace_common::options::ALL_TCP_STATES } else { 0 };
        let wakeup_bytes = trace.ring_wakeup_bytes.unwrap_or_else(|| kernel::wakeup_bytes(ring_bytes));
        let config = kernel::kernel_config(netns, wakeup_bytes, options, trace.in_call_slots)?;
        let mut backend = kernel::load(
            &config,
            &kernel::LoadOptions { ring_bytes, verbose: trace.verbose, skip_mechanisms: trace.skip_mechanism.clone() },
            backend_choice(trace.backend),
        )?;
        let events = backend.take_events()?;
        let loss = Loss { counter: backend.take_lost()?, events: 0, records: 0 };
        let started = BootClock::boot_now_ns();
        let clock = BootClock::now();

        let path_arg = netns_arg.as_deref().filter(|a| a.parse::<u32>().is_err());
        let own = system::own_netns();
        let mut ranges = Vec::new();
        let traced = netns.or(own);
        if let Some(inode) = traced {
            if let Ok(range) = system::usable_range(path_arg) {
                ranges.push(crate::output::NetnsRange::new(inode, &range));
                analysis.set_range(inode, range);
            }
        }
        let ephemeral_range = ranges.first().map(|r| [r.low, r.high]).unwrap_or([0, 0]);
        let header = Header {
            kernel: system::kernel_release(),
            host: system::host_name(),
            backend: backend.name.to_string(),
            hooks: backend.hooks.clone(),
            ephemeral_range,
            ranges,
            netns,
            started_boot_ns: started,
        };
        // In auto mode, refused precise hooks are expected on many kernels:
        // the portable ones stand in, and the header lists them all.
        for hook in backend.hooks.iter().filter(|h| !h.status.starts_with("attached")) {
            if hook.backend == "portable" || backend.name == "precise+portable" {
                eprintln!("port-trace: warning: {} ({}): {}", hook.hook, hook.purpose, hook.status);
            }
        }
        let keying = if backend.keying_by_address { Keying::Address { mask: rand_mask() } } else { Keying::Cookie };
        let pipeline = Pipeline::with_tracker(filter, Tracker::with_keying(keying).with_limit(trace.max_tracked));
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged
        // while the AsyncFd holds it.
        let ring = unsafe { AsyncFd::register(events) }.context("polling the ring buffer")?;
        let exact_time_wait_end =
            backend.hooks.iter().any(|h| h.hook.ends_with("inet_twsk_bind_unhash") && h.status.starts_with("attached"));
        let scope = match (&netns_arg, netns) {
            (Some(arg), Some(inode)) if arg.parse::<u32>().is_err() => Scope::One(inode, Some(PathBuf::from(arg))),
            (Some(_), Some(inode)) => Scope::One(inode, None),
            _ => Scope::All,
        };
        let metrics = match metrics {
            Some(listener) => {
                let page = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
                let listener = tokio::net::TcpListener::from_std(listener)?;
                tokio::spawn(crate::metrics::serve(listener, page.clone()));
                Some(page)
            }
            None => None,
        };
        Ok(Session {
            header,
            clock,
            duration: trace.duration,
            signals,
            live: Live {
                backend,
                ring,
                pipeline,
                analysis,
                loss,
                scope,
                time_wait_walks: (!exact_time_wait_end).then_some(trace.walk_interval),
                walk_errors: 0,
                catch_up_for: CATCH_UP_FOR,
                events: 0,
                metrics,
                started_ns: started,
                refreshes: 0,
                deadline: None,
                lost_repaired: 0,
                low_priority_ring: (trace.reader_priority == ReaderPriorityArg::Low).then_some(u64::from(ring_bytes)),
                reader_priority: None,
            },
        })
    }
}

/// A loaded trace, ready to run.
pub struct Session {
    /// What the header says.
    pub header: Header,
    /// CLOCK_BOOTTIME to wall time.
    pub clock: BootClock,
    duration: Option<Duration>,
    signals: Signals,
    live: Live,
}

impl Session {
    /// Runs the trace into `frontend` until a signal, the duration or the
    /// frontend ends it; returns the summary it was given. A closed reader
    /// (broken pipe) ends the run quietly with `Ok(None)`.
    pub async fn run<F: Frontend>(self, frontend: &mut F) -> Result<Option<Summary>> {
        let Session { header, duration, mut signals, mut live, .. } = self;
        let result = live.run(&header, duration, &mut signals, frontend).await;
        match result {
            Err(e) if is_broken_pipe(&e) => return Ok(None),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        let summary = live.summary();
        match frontend.finish(&summary) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(None),
            other => other?,
        }
        Ok(Some(summary))
    }
}

/// The kernel's loss counter, what it said so far, and `lost` records
/// written.
struct Loss {
    counter: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    events: u64,
    records: u64,
}

impl Loss {
    /// Reports `n` events that were in the ring buffer at exit and that the
    /// final drain had no time to read: lost too, if not by the kernel.
    /// Called last (after the final [`Loss::report`]).
    fn unread_at_exit<F: Frontend>(&mut self, frontend: &mut F, n: u64) -> io::Result<()> {
        if n > 0 {
            frontend.lost(BootClock::boot_now_ns(), n)?;
            self.events += n;
            self.records += 1;
        }
        Ok(())
    }

    /// Reports events lost since the last call, if any.
    fn report<F: Frontend>(&mut self, frontend: &mut F) -> io::Result<()> {
        let lost = kernel::read_lost(&self.counter);
        if lost > self.events {
            frontend.lost(BootClock::boot_now_ns(), lost - self.events)?;
            self.events = lost;
            self.records += 1;
        }
        Ok(())
    }
}

/// The pipeline's sink in a live trace: the analysis sees every record, the
/// frontend what passes the filters and what the analysis derives.
struct Stage<'a, F> {
    analysis: &'a mut Analysis,
    frontend: &'a mut F,
    derived: Vec<Derived>,
}

impl<F: Frontend> Stage<'_, F> {
    fn pass_derived(&mut self) -> io::Result<()> {
        for derived in self.derived.drain(..) {
            self.frontend.derived(&derived)?;
        }
        Ok(())
    }
}

impl<F: Frontend> RecordSink for Stage<'_, F> {
    type Error = io::Error;

    fn observe(&mut self, rec: &PortRecord) -> io::Result<()> {
        self.analysis.observe(rec, &mut self.derived);
        self.pass_derived()
    }

    fn record(&mut self, rec: &PortRecord) -> io::Result<()> {
        self.analysis.record(rec, &mut self.derived);
        self.frontend.record(rec)?;
        self.pass_derived()
    }
}

/// Which network namespaces the run traces.
enum Scope {
    /// One (`--netns`), with a path to enter it when given as one.
    One(u32, Option<PathBuf>),
    /// Every namespace.
    All,
}

/// A trace in progress: the loaded backend, its ring buffer, the pipeline
/// and the live analysis.
struct Live {
    backend: kernel::Backend,
    ring: AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    pipeline: Pipeline,
    analysis: Analysis,
    loss: Loss,
    scope: Scope,
    /// Walk interval for TIME_WAIT ends, when no hook reports them exactly.
    time_wait_walks: Option<Duration>,
    walk_errors: u64,
    /// How long a walk may spend reading the ring before it judges
    /// ([`CATCH_UP_FOR`]; [`EXIT_CATCH_UP_FOR`] for the last one).
    catch_up_for: Duration,
    /// Ring-buffer records read.
    events: u64,
    /// The OpenMetrics page, re-rendered every second, when served.
    metrics: Option<std::sync::Arc<std::sync::Mutex<String>>>,
    started_ns: u64,
    /// Refresh ticks so far.
    refreshes: u64,
    /// The end `--duration` set: a walk still running then is abandoned,
    /// so that the run ends on time however loaded the host is.
    deadline: Option<std::time::Instant>,
    /// Events lost as of the last repair walk.
    lost_repaired: u64,
    /// With `--reader-priority low`, the ring's size in bytes.
    low_priority_ring: Option<u64>,
    /// What the reader's priority did, when it was lowered.
    reader_priority: Option<ReaderPriority>,
}

/// Most events one synchronous drain handles (before and after a walk).
const MAX_DRAIN: usize = 16384;

/// How long the drain at exit may feed the pipeline; what is still in the
/// ring buffer after that is counted, not decoded, and reported as lost.
const FINAL_DRAIN_FOR: Duration = Duration::from_secs(2);

/// How much of a walk's output one read takes.
const WALK_READ_BYTES: usize = 64 * 1024;

/// Walk records fed between two turns of the ring (one read's worth).
const WALK_RECORDS_PER_TURN: u64 = (WALK_READ_BYTES / std::mem::size_of::<port_trace_common::RawEvent>()) as u64;

/// How a walk's reading ended.
enum WalkRead {
    /// Every socket visited.
    Done,
    /// `--duration` ran out: the summary matters more.
    PastDeadline,
    /// The kernel refused or failed the walk.
    Failed,
}

/// Longest a walk waits for the reader to take in the events from before
/// its end (see `Live::catch_up`); 1 s is some 2 million events.
const CATCH_UP_FOR: Duration = Duration::from_secs(1);

/// The same for the last repair walk at exit, which runs once the exit
/// drain has read everything up to the stop: short, so that the run ends
/// on time under a flood.
const EXIT_CATCH_UP_FOR: Duration = Duration::from_millis(250);

/// Most events handled per wake-up before the other work of the loop.
const BATCH: usize = 4096;

/// The least time between two repair walks after lost events: under a
/// flood, losses go on, and walking every second would starve the loop.
const REPAIR_AFTER_LOSS_EVERY: Duration = Duration::from_secs(5);

/// How often every followed socket is checked against a walk, to repair
/// what lost events broke.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// How often the metrics page is renewed and the analysis' timers run.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// Every this many refreshes, the known namespaces' port ranges are read
/// again (they are sysctls an administrator may change).
const RANGE_REFRESH_EVERY: u64 = 10;

impl Live {
    /// Feeds at most `limit` ring-buffer records to the pipeline; returns
    /// whether the ring ran empty.
    fn read_ring<F: Frontend>(&mut self, frontend: &mut F, limit: usize) -> io::Result<bool> {
        let ring = self.ring.get_mut();
        let mut stage = Stage { analysis: &mut self.analysis, frontend, derived: Vec::new() };
        for _ in 0..limit {
            let Some(item) = ring.next() else { return Ok(true) };
            self.events += 1;
            self.pipeline.feed(&item, &mut stage)?;
        }
        Ok(false)
    }

    /// Reads what the kernel wrote up to `stop_ns` (CLOCK_BOOTTIME, when the
    /// trace ended): into the pipeline for up to [`FINAL_DRAIN_FOR`], then
    /// only counted; returns that count, the events left unread. A reader
    /// that was stopped or starved may find a whole ring of backlog here
    /// (a 1 GiB ring holds 7 million events), which a bounded drain used
    /// to leave behind unreported. The programs stay attached until exit:
    /// the first record stamped after `stop_ns`, taken in like the others
    /// (reading consumes it; once only counting, it is not counted), ends
    /// the drain; the last repair walk reads on from there.
    fn drain_at_exit<F: Frontend>(&mut self, frontend: &mut F, stop_ns: u64) -> io::Result<u64> {
        if self.catch_up(frontend, stop_ns, FINAL_DRAIN_FOR)? {
            return Ok(0);
        }
        let mut unread = 0u64;
        while let Some(item) = self.ring.get_mut().next() {
            if crate::decode::timestamp(&item) > Some(stop_ns) {
                break; // not the trace's: not a loss either
            }
            unread += 1;
        }
        Ok(unread)
    }

    /// A last repair walk of the UDP sockets we follow, at exit: after a
    /// loss not yet repaired (`adopt`: with its adoptions), and because a
    /// UDP port's release comes from one hook only (`sock_release` on the
    /// portable backend), which the 6.18 kernel was seen to skip for about
    /// one close in several million (the program's own run counter one
    /// short, nothing lost). The periodic repair ([`RECONCILE_EVERY`]) finds such a port
    /// during a trace, this walk at its end; its release is `reconciled`.
    /// TCP needs none: its releases come from state tracepoints, and the
    /// TIME_WAIT walks run every second where TIME_WAIT ends are not seen.
    /// The deadline is past by now: it no longer cuts the walk short; its
    /// reads of the ring are bounded by [`EXIT_CATCH_UP_FOR`] instead.
    fn final_repair<F: Frontend>(&mut self, frontend: &mut F, adopt: bool) -> io::Result<()> {
        let namespaces = self.pipeline.tracker.namespaces();
        if namespaces.is_empty() {
            return Ok(());
        }
        self.deadline = None;
        self.catch_up_for = EXIT_CATCH_UP_FOR;
        let protos: &[Proto] = if adopt { &[Proto::Tcp, Proto::Udp] } else { &[Proto::Udp] };
        self.walk(frontend, Some(&namespaces), protos, adopt, adopt)?;
        Ok(())
    }

    /// Whether `--duration` has run out.
    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| std::time::Instant::now() >= d)
    }

    /// Feeds what the ring buffer holds to the pipeline: at most what a full
    /// ring buffer holds, so that a flood cannot keep this going for ever
    /// (what is left is read by the main loop).
    fn drain<F: Frontend>(&mut self, frontend: &mut F) -> io::Result<()> {
        self.read_ring(frontend, MAX_DRAIN).map(|_| ())
    }

    /// Feeds the ring's records to the pipeline until it has taken in
    /// everything stamped up to `until_ns` (CLOCK_BOOTTIME): until the ring
    /// runs empty or a later record has been fed. False when that takes
    /// longer than `budget` (a reader far behind a flood).
    fn catch_up<F: Frontend>(&mut self, frontend: &mut F, until_ns: u64, budget: Duration) -> io::Result<bool> {
        let give_up = std::time::Instant::now() + budget;
        let ring = self.ring.get_mut();
        let mut stage = Stage { analysis: &mut self.analysis, frontend, derived: Vec::new() };
        let mut n = 0u64;
        while let Some(item) = ring.next() {
            let later = crate::decode::timestamp(&item) > Some(until_ns);
            self.events += 1;
            self.pipeline.feed(&item, &mut stage)?;
            if later {
                return Ok(true);
            }
            n += 1;
            if n.is_multiple_of(1024) && std::time::Instant::now() >= give_up {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Feeds a walk's SNAPSHOT records to the pipeline as the iterator
    /// writes them, and between reads what the ring holds: on a host with
    /// 100 000 TIME_WAIT sockets followed (a web server's), a walk takes
    /// long enough that a reader waiting for its end let a 4 MiB ring
    /// overflow under a UDP storm. Events fed during the walk are what the
    /// walk's judgment expects to know anyway (see `Tracker::end_walk`).
    fn feed_walk<F: Frontend>(&mut self, frontend: &mut F, walk: File) -> io::Result<WalkRead> {
        use std::io::Read;
        const RECORD: usize = std::mem::size_of::<port_trace_common::RawEvent>();
        // One `read` may end inside a record; `read_exact` joins the pieces.
        let mut walk = io::BufReader::with_capacity(WALK_READ_BYTES, walk);
        let mut record = [0u8; RECORD];
        let mut fed = 0u64;
        loop {
            match walk.read_exact(&mut record) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(WalkRead::Done),
                Err(_) => return Ok(WalkRead::Failed),
            }
            let mut stage = Stage { analysis: &mut self.analysis, frontend, derived: Vec::new() };
            self.pipeline.feed(&record, &mut stage)?;
            fed += 1;
            if fed.is_multiple_of(WALK_RECORDS_PER_TURN) {
                if self.past_deadline() {
                    return Ok(WalkRead::PastDeadline);
                }
                self.read_ring(frontend, BATCH)?;
            }
        }
    }

    /// Walks the given namespaces' sockets of `protos` (all namespaces the
    /// scope allows when `which` is `None`). With `adopt_unknown` (the first
    /// walk), unknown sockets become `snapshot` allocs, attributed through
    /// `/proc/*/fd` when `owners` is set. False when a walk was abandoned
    /// (the deadline passed, or the reader could not catch up with it); a
    /// walk the kernel refused counts in `walk_errors` instead.
    fn walk<F: Frontend>(
        &mut self,
        frontend: &mut F,
        which: Option<&[u32]>,
        protos: &[Proto],
        owners: bool,
        adopt_unknown: bool,
    ) -> io::Result<bool> {
        if protos.iter().all(|p| !self.backend.can_walk(*p)) {
            return Ok(true);
        }
        let targets: Vec<(u32, Option<PathBuf>)> = match &self.scope {
            Scope::One(inode, path) => {
                if which.is_some_and(|w| !w.contains(inode)) {
                    return Ok(true);
                }
                let path = path.clone().or_else(|| system::netns_paths().remove(inode));
                vec![(*inode, path)]
            }
            Scope::All => {
                let paths = system::netns_paths();
                match which {
                    Some(which) => which.iter().map(|i| (*i, paths.get(i).cloned())).collect(),
                    None => paths.into_iter().map(|(i, p)| (i, Some(p))).collect(),
                }
            }
        };
        let only = match &self.scope {
            Scope::One(inode, _) => Some(*inode),
            Scope::All => None,
        };
        let owners = if owners { system::socket_owners(only) } else { Default::default() };
        for (netns, path) in targets {
            // A namespace nobody can enter any more is gone, and with it its
            // sockets (inet_twsk_purge); walking the own namespace needs no
            // path.
            let own = system::own_netns() == Some(netns);
            if path.is_none() && !own {
                continue;
            }
            // Only adoption estimates `ephemeral` and needs the range; it
            // costs a thread entering the namespace, not to be paid every
            // second.
            let ephemeral_range = if adopt_unknown {
                let path = if own { None } else { path.as_deref().and_then(|p| p.to_str()) };
                match system::usable_range(path) {
                    Ok(range) => {
                        let bounds = [range.low, range.high];
                        self.analysis.set_range(netns, range);
                        bounds
                    }
                    Err(_) => [0, 0],
                }
            } else {
                [0, 0]
            };
            for proto in protos {
                if !self.backend.can_walk(*proto) {
                    continue;
                }
                self.pipeline.tracker.begin_walk(WalkStart {
                    netns,
                    proto: *proto,
                    started_ns: BootClock::boot_now_ns(),
                    owners: owners.clone(),
                    ephemeral_range,
                    adopt_unknown,
                    adopt_time_wait: adopt_unknown && which.is_none(),
                });
                // Events that happened before the walk first, so that the
                // walk compares with an up-to-date tracker.
                self.drain(frontend)?;
                if self.past_deadline() {
                    // The run is over: its summary matters more than a walk
                    // that a loaded host would make late.
                    self.pipeline.tracker.abandon_walk();
                    return Ok(false);
                }
                // Only adoption needs every socket; the others compare the
                // sockets we follow, which all carry cookies.
                let followed_only = !adopt_unknown;
                let walk = match self.backend.open_walk(*proto, if own { None } else { path.as_deref() }, followed_only)
                {
                    Ok(file) => self.feed_walk(frontend, file)?,
                    Err(_) => WalkRead::Failed,
                };
                match walk {
                    WalkRead::Failed => {
                        self.walk_errors += 1;
                        self.pipeline.tracker.abandon_walk();
                    }
                    WalkRead::PastDeadline => {
                        self.pipeline.tracker.abandon_walk();
                        return Ok(false);
                    }
                    WalkRead::Done => {
                        // What happened while the walk ran (a socket closed
                        // before the walk reached it, one opened after it
                        // passed) is in the ring: take it in before judging,
                        // all of it up to now. A reader behind a backlog that
                        // judged after a bounded drain missed allocations
                        // still queued: the walk did not find them (closed),
                        // the tracker did not have them yet, and once read
                        // they stayed in use for ever (their releases were
                        // the events lost). Too far behind, it leaves the
                        // judgment to a later walk.
                        let walk_ended_ns = BootClock::boot_now_ns();
                        if !self.catch_up(frontend, walk_ended_ns, self.catch_up_for)? || self.past_deadline() {
                            self.pipeline.tracker.abandon_walk();
                            return Ok(false);
                        }
                        let mut stage = Stage { analysis: &mut self.analysis, frontend, derived: Vec::new() };
                        self.pipeline.end_walk(BootClock::boot_now_ns(), &mut stage)?;
                    }
                }
            }
        }
        Ok(true)
    }

    /// A namespace's usable range, read through the `--netns` path when
    /// that is the one.
    fn range_of(&self, netns: u32) -> Option<crate::pressure::UsableRange> {
        match &self.scope {
            Scope::One(inode, Some(path)) if *inode == netns => system::usable_range(path.to_str()).ok(),
            _ => system::usable_range_of(netns, 0),
        }
    }

    fn state(&self) -> LiveState<'_> {
        LiveState {
            backend: self.backend.name,
            analysis: &self.analysis,
            counts: &self.pipeline.counts,
            lost: self.loss.events,
            events: self.events,
            ports_in_use: self.pipeline.tracker.ports_in_use(),
            time_wait: self.pipeline.tracker.time_wait_ports(),
            now_ns: BootClock::boot_now_ns(),
            tracker: &self.pipeline.tracker,
        }
    }

    /// Once a second: ranges of namespaces seen for the first time, the
    /// analysis' timers, the metrics page.
    fn refresh<F: Frontend>(&mut self, frontend: &mut F) -> io::Result<()> {
        let now = BootClock::boot_now_ns();
        // A lost release would make a closed UDP socket look like one that
        // serves: judge no bind until a repair walk has run.
        self.analysis.notices.hold_decisions(self.loss.events > self.lost_repaired);
        // A bound UDP socket that connected since is a client, not a
        // listener; the tracker learnt the remote end without a record.
        for (netns, sock) in self.analysis.notices.pending_binds() {
            if self.pipeline.tracker.is_connected(sock) {
                self.analysis.notices.on_connected(netns, sock);
            }
        }
        let mut derived = Vec::new();
        self.analysis.tick(now, &mut derived);
        for d in &derived {
            frontend.derived(d)?;
        }
        for netns in self.analysis.netns_without_range() {
            match self.range_of(netns) {
                Some(range) => self.analysis.set_range(netns, range),
                None => self.analysis.range_unknown(netns),
            }
        }
        // The ranges may be changed by the administrator at any time.
        self.refreshes += 1;
        if self.refreshes.is_multiple_of(RANGE_REFRESH_EVERY) {
            for (netns, _) in self.analysis.pools.range_sizes() {
                if let Some(range) = self.range_of(netns) {
                    if self.analysis.pools.range(netns) != Some(&range) {
                        self.analysis.set_range(netns, range);
                    }
                }
            }
        }
        if let Some(page) = &self.metrics {
            let text = self.analysis.metrics_page(self.loss.events);
            if let Ok(mut page) = page.lock() {
                *page = text;
            }
        }
        Ok(())
    }

    async fn run<F: Frontend>(
        &mut self,
        header: &Header,
        duration: Option<Duration>,
        signals: &mut Signals,
        frontend: &mut F,
    ) -> Result<()> {
        // --duration counts from the header, the start of tracing (the end
        // is fixed now, not when the future is first polled).
        let end = duration.map(|d| tokio::time::Instant::now() + d);
        self.deadline = end.map(tokio::time::Instant::into_std);
        let deadline = async move {
            match end {
                Some(end) => tokio::time::sleep_until(end).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        frontend.start(header)?;
        // The programs are attached: what existed before is now the snapshot.
        self.walk(frontend, None, &[Proto::Tcp, Proto::Udp], true, true)?;
        self.refresh(frontend)?;
        if !frontend.ready(&self.state())? {
            return Ok(());
        }

        // From here on this thread is the reader: at low priority while
        // the ring has room (see `reader_priority`).
        let priority_watch = match self.low_priority_ring {
            Some(ring_bytes) => PriorityWatch::start(self.ring.get_ref().as_fd(), ring_bytes).unwrap_or_else(|e| {
                eprintln!("port-trace: warning: the reader keeps its priority: {e:#}");
                None
            }),
            None => None,
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The programs wake this loop only when much waits (see
        // `kernel::wakeup_bytes`); the rest is read on this timer.
        let mut poll = tokio::time::interval(kernel::RING_POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut walk_tick = tokio::time::interval(self.time_wait_walks.unwrap_or(RECONCILE_EVERY));
        walk_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile = tokio::time::Instant::now();
        // The first repair after a loss may run at once.
        let mut last_repair: Option<tokio::time::Instant> = None;
        let mut lost_at_reconcile = 0;
        // Losses counted at the previous walk tick: none since means the
        // flood that caused them is over.
        let mut lost_at_walk_tick = 0;

        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    // A bounded batch: under a flood the ring never runs
                    // empty, and signals, the deadline, flushes and walks
                    // must still get their turn.
                    let ring = guard.get_inner_mut();
                    let mut stage = Stage { analysis: &mut self.analysis, frontend, derived: Vec::new() };
                    let mut drained = false;
                    for _ in 0..BATCH {
                        let Some(item) = ring.next() else {
                            drained = true;
                            break;
                        };
                        self.events += 1;
                        self.pipeline.feed(&item, &mut stage)?;
                    }
                    if drained {
                        guard.clear_ready();
                    } else {
                        // Let the runtime drive its timers and signals: the
                        // ring alone would keep this task busy for ever.
                        drop(guard);
                        tokio::task::yield_now().await;
                    }
                }
                _ = poll.tick() => {
                    self.read_ring(frontend, BATCH)?;
                }
                _ = tick.tick() => {
                    self.loss.report(frontend)?;
                    if !frontend.tick(&self.state())? {
                        break;
                    }
                }
                _ = refresh.tick() => self.refresh(frontend)?,
                _ = walk_tick.tick() => {
                    // Under a flood, losses go on and walking at every
                    // tick would starve the loop: at most one repair per
                    // REPAIR_AFTER_LOSS_EVERY. Once the losses stop, the
                    // repair comes at the next tick, not up to 5 s later.
                    let losses_stopped = self.loss.events == lost_at_walk_tick;
                    lost_at_walk_tick = self.loss.events;
                    let lost_more = self.loss.events > lost_at_reconcile
                        && (losses_stopped || last_repair.is_none_or(|t| t.elapsed() >= REPAIR_AFTER_LOSS_EVERY));
                    if lost_more || last_reconcile.elapsed() >= RECONCILE_EVERY {
                        if lost_more {
                            last_repair = Some(tokio::time::Instant::now());
                        }
                        // Repair: every followed socket against the kernel's.
                        let losses_now = self.loss.events;
                        last_reconcile = tokio::time::Instant::now();
                        // After a loss, sockets the walk finds that we do not
                        // know are allocations we lost: adopt them.
                        let namespaces = self.pipeline.tracker.namespaces();
                        // An abandoned repair is tried again at a later tick.
                        if self.walk(frontend, Some(&namespaces), &[Proto::Tcp, Proto::Udp], lost_more, lost_more)? {
                            lost_at_reconcile = losses_now;
                            self.lost_repaired = losses_now;
                        }
                    } else if self.time_wait_walks.is_some() {
                        let namespaces = self.pipeline.tracker.time_wait_namespaces();
                        if !namespaces.is_empty() {
                            self.walk(frontend, Some(&namespaces), &[Proto::Tcp], false, false)?;
                        }
                    }
                }
                _ = signals.interrupt.recv() => break,
                _ = signals.terminate.recv() => break,
                _ = &mut deadline => break,
            }
        }
        // The drain at exit runs at the starting priority: someone waits.
        self.reader_priority = priority_watch.and_then(PriorityWatch::finish);
        // What the kernel wrote before we stopped.
        let unread = self.drain_at_exit(frontend, BootClock::boot_now_ns())?;
        // A last repair, so that the summary's ports in use are the kernel's,
        // once the tracker holds everything up to the stop (a reader still
        // behind after the exit drain reports the rest as lost instead).
        if unread == 0 {
            let unrepaired_loss = self.loss.events > lost_at_reconcile;
            self.final_repair(frontend, unrepaired_loss)?;
        }
        self.loss.report(frontend)?;
        self.loss.unread_at_exit(frontend, unread)?;
        Ok(())
    }

    /// The closing summary.
    fn summary(&self) -> Summary {
        let now = BootClock::boot_now_ns();
        let duration_s = (now.saturating_sub(self.started_ns)) as f64 / 1e9;
        let pipeline = &self.pipeline;
        let stats = pipeline.tracker.stats().clone();
        let per_s = |n: u64| if duration_s > 0.0 { n as f64 / duration_s } else { 0.0 };
        Summary {
            ts_ns: now,
            duration_s,
            counts: Counts { lost: self.loss.records, ..pipeline.counts.clone() },
            lost: self.loss.events,
            decode_errors: pipeline.decode_errors,
            ports_in_use: pipeline.tracker.ports_in_use(),
            time_wait: pipeline.tracker.time_wait_ports(),
            unpaired_releases: stats.unpaired_releases,
            unknown_socket_events: stats.unknown_socket_events,
            reconciled: stats.reconciled,
            evicted: stats.evicted,
            allocations_per_s: per_s(pipeline.counts.alloc),
            releases_per_s: per_s(pipeline.counts.release),
            analysis: self.analysis.summary(),
            reader_priority: self.reader_priority.clone(),
        }
    }
}

/// A per-run secret that hides kernel addresses in the kprobe backend's
/// socket ids.
fn rand_mask() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: valid buffer; getrandom fills at most its length.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != 8 {
        return BootClock::boot_now_ns().wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    u64::from_ne_bytes(bytes)
}
