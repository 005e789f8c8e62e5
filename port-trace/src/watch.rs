//! `port-trace watch`: attach, stream records until Ctrl-C, SIGTERM or
//! `--duration`, then flush and summarise.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{BackendArg, ProtoArg, TraceArgs, WatchArgs};
use crate::clock::BootClock;
use crate::filter::Filter;
use crate::kernel;
use crate::model::{Family, Proto};
use crate::output::{summary_text, Counts, Format, Header, Output, Summary};
use crate::pipeline::Pipeline;
use crate::privileges;
use crate::system;
use crate::tracker::{Keying, Tracker, WalkStart};
use crate::UsageError;
use std::path::PathBuf;

/// The kernel's loss counter, what it said so far, and `lost` records
/// written.
struct Loss {
    counter: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    events: u64,
    records: u64,
}

impl Loss {
    /// Reports events lost since the last call, if any.
    fn report(&mut self, output: &mut Output) -> io::Result<()> {
        let lost = kernel::read_lost(&self.counter);
        if lost > self.events {
            output.lost(BootClock::boot_now_ns(), lost - self.events)?;
            self.events = lost;
            self.records += 1;
        }
        Ok(())
    }
}

/// Flush at least this often (the contract: every 100 ms).
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// The filters of `TraceArgs` that run in userspace.
pub fn build_filter(args: &TraceArgs) -> Result<Filter> {
    Ok(Filter {
        pids: args.pids.clone().map(|p| p.0).unwrap_or_default(),
        comm: args.comm.clone(),
        ports: args.ports.clone().map(|p| p.0).unwrap_or_default(),
        proto: args.proto.map(|p| match p {
            ProtoArg::Tcp => Proto::Tcp,
            ProtoArg::Udp => Proto::Udp,
        }),
        family: match (args.ipv4, args.ipv6) {
            (true, _) => Some(Family::Ipv4),
            (_, true) => Some(Family::Ipv6),
            _ => None,
        },
        cgroup: match &args.cgroup {
            Some(path) => Some(system::resolve_cgroup(path).map_err(|e| UsageError(format!("{e:#}")))?),
            None => None,
        },
        ephemeral_only: args.ephemeral_only,
    })
}

fn open_output(args: &WatchArgs) -> Result<(Box<dyn Write + Send>, bool)> {
    match &args.output {
        None => {
            let terminal = io::stdout().is_terminal();
            Ok((Box::new(io::BufWriter::with_capacity(64 * 1024, io::stdout())), terminal))
        }
        Some(path) => {
            let mut options = OpenOptions::new();
            options.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
            if args.force {
                options.create(true).truncate(true);
            } else {
                options.create_new(true);
            }
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                bail!(UsageError(format!(
                    "{} is a symbolic link: port-trace never writes through one, --force or not",
                    path.display()
                )));
            }
            let file = options.open(path).map_err(|e| {
                let hint = if e.kind() == io::ErrorKind::AlreadyExists { " (use --force to overwrite)" } else { "" };
                UsageError(format!("cannot create {}: {e}{hint}", path.display()))
            })?;
            Ok((Box::new(io::BufWriter::with_capacity(64 * 1024, file)), false))
        }
    }
}

/// Maps the backend choice to the loader's.
fn check_backend(choice: BackendArg) -> Result<kernel::Choice> {
    Ok(match choice {
        BackendArg::Auto => kernel::Choice::Auto,
        BackendArg::Portable => kernel::Choice::Portable,
        BackendArg::Precise => kernel::Choice::Precise,
        BackendArg::Kprobe => kernel::Choice::Kprobe,
    })
}

fn is_broken_pipe(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::BrokenPipe
}

/// SIGINT and SIGTERM, caught from the start so that a signal at any time
/// ends the run cleanly (a summary, exit 0) instead of killing it.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

/// Runs `watch`.
pub async fn run(args: WatchArgs) -> Result<()> {
    let mut signals =
        Signals { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? };
    let filter = build_filter(&args.trace)?;
    let netns = match &args.trace.netns {
        Some(arg) => Some(system::resolve_netns(arg).map_err(|e| UsageError(format!("{e:#}")))?),
        None => None,
    };
    let choice = check_backend(args.trace.backend)?;
    let missing = privileges::missing_capabilities();
    if !missing.is_empty() {
        bail!(privileges::missing_message(&missing));
    }
    let (writer, terminal) = open_output(&args)?;
    let format = args.format.unwrap_or(if terminal { Format::Text } else { Format::Json });

    let config = kernel::kernel_config(netns)?;
    let mut backend = kernel::load(
        &config,
        &kernel::LoadOptions {
            ring_bytes: args.trace.ring_buffer_kib * 1024,
            verbose: args.trace.verbose,
            skip_mechanisms: args.trace.skip_mechanism.clone(),
        },
        choice,
    )?;
    let events = backend.take_events()?;
    let loss = Loss { counter: backend.take_lost()?, events: 0, records: 0 };
    let started = BootClock::boot_now_ns();
    let clock = BootClock::now();

    let range_ns = args.trace.netns.as_deref().filter(|a| a.parse::<u32>().is_err());
    let ephemeral_range = system::ephemeral_range(range_ns).unwrap_or([0, 0]);
    let header = Header {
        kernel: system::kernel_release(),
        backend: backend.name.to_string(),
        hooks: backend.hooks.clone(),
        ephemeral_range,
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

    let output = Output::new(writer, format, args.lifecycles, clock);
    let keying = if backend.keying_by_address { Keying::Address { mask: rand_mask() } } else { Keying::Cookie };
    let pipeline = Pipeline::with_tracker(filter, Tracker::with_keying(keying).with_limit(args.trace.max_tracked));
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged
    // while the AsyncFd holds it.
    let ring = unsafe { AsyncFd::register(events) }.context("polling the ring buffer")?;
    let exact_time_wait_end =
        backend.hooks.iter().any(|h| h.hook.ends_with("inet_twsk_bind_unhash") && h.status.starts_with("attached"));
    let scope = match (&args.trace.netns, netns) {
        (Some(arg), Some(inode)) if arg.parse::<u32>().is_err() => Scope::One(inode, Some(PathBuf::from(arg))),
        (Some(_), Some(inode)) => Scope::One(inode, None),
        _ => Scope::All,
    };
    let mut live = Live {
        backend,
        ring,
        pipeline,
        output,
        loss,
        scope,
        time_wait_walks: (!exact_time_wait_end).then_some(args.trace.walk_interval),
        walk_errors: 0,
    };
    let result = live.run(&header, args.trace.duration, &mut signals).await;
    let Live { backend, pipeline, mut output, loss, .. } = live;
    match result {
        Err(e) if e.downcast_ref::<io::Error>().is_some_and(is_broken_pipe) => return Ok(()),
        Err(e) => return Err(e),
        Ok(()) => {}
    }

    let now = BootClock::boot_now_ns();
    let duration_s = (now.saturating_sub(started)) as f64 / 1e9;
    let stats = pipeline.tracker.stats().clone();
    let per_s = |n: u64| if duration_s > 0.0 { n as f64 / duration_s } else { 0.0 };
    let summary = Summary {
        duration_s,
        counts: Counts { lost: loss.records, ..pipeline.counts.clone() },
        lost: loss.events,
        decode_errors: pipeline.decode_errors,
        ports_in_use: pipeline.tracker.ports_in_use(),
        time_wait: pipeline.tracker.time_wait_ports(),
        unpaired_releases: stats.unpaired_releases,
        unknown_socket_events: stats.unknown_socket_events,
        reconciled: stats.reconciled,
        evicted: stats.evicted,
        allocations_per_s: per_s(pipeline.counts.alloc),
        releases_per_s: per_s(pipeline.counts.release),
    };
    let finish = (|| -> io::Result<()> {
        output.summary(now, &summary)?;
        output.flush()
    })();
    match finish {
        Err(e) if is_broken_pipe(&e) => return Ok(()),
        other => other?,
    }
    if format == Format::Text {
        eprintln!("{}", summary_text(&summary));
    }
    drop(backend);
    Ok(())
}

/// Which network namespaces the run traces.
enum Scope {
    /// One (`--netns`), with a path to enter it when given as one.
    One(u32, Option<PathBuf>),
    /// Every namespace.
    All,
}

/// A trace in progress: the loaded backend, its ring buffer, and where its
/// records go.
struct Live {
    backend: kernel::Backend,
    ring: AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    pipeline: Pipeline,
    output: Output,
    loss: Loss,
    scope: Scope,
    /// Walk interval for TIME_WAIT ends, when no hook reports them exactly.
    time_wait_walks: Option<Duration>,
    walk_errors: u64,
}

/// Most events one synchronous drain handles (before and after a walk).
const MAX_DRAIN: usize = 16384;

/// Most events handled per wake-up before the other work of the loop.
const BATCH: usize = 4096;

/// The least time between two repair walks after lost events: under a
/// flood, losses go on, and walking every second would starve the loop.
const REPAIR_AFTER_LOSS_EVERY: Duration = Duration::from_secs(5);

/// How often every followed socket is checked against a walk, to repair
/// what lost events broke.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);

impl Live {
    /// Feeds what the ring buffer holds to the pipeline: at most what a full
    /// ring buffer holds, so that a flood cannot keep this going for ever
    /// (what is left is read by the main loop).
    fn drain(&mut self) -> Result<()> {
        let (pipeline, output) = (&mut self.pipeline, &mut self.output);
        let ring = self.ring.get_mut();
        for _ in 0..MAX_DRAIN {
            let Some(item) = ring.next() else { break };
            pipeline.feed(&item, |rec| output.record(rec))?;
        }
        Ok(())
    }

    /// Walks the given namespaces' sockets of `protos` (all namespaces the
    /// scope allows when `which` is `None`). With `adopt_unknown` (the first
    /// walk), unknown sockets become `snapshot` allocs, attributed through
    /// `/proc/*/fd` when `owners` is set.
    fn walk(&mut self, which: Option<&[u32]>, protos: &[Proto], owners: bool, adopt_unknown: bool) -> Result<()> {
        if protos.iter().all(|p| !self.backend.can_walk(*p)) {
            return Ok(());
        }
        let targets: Vec<(u32, Option<PathBuf>)> = match &self.scope {
            Scope::One(inode, path) => {
                if which.is_some_and(|w| !w.contains(inode)) {
                    return Ok(());
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
            // Only adoption estimates `ephemeral`; reading the range costs a
            // thread entering the namespace, not to be paid every second.
            let ephemeral_range = if adopt_unknown {
                system::ephemeral_range(path.as_deref().and_then(|p| p.to_str())).unwrap_or([0, 0])
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
                self.drain()?;
                match self.backend.walk(*proto, if own { None } else { path.as_deref() }) {
                    Ok(records) => {
                        let (pipeline, output) = (&mut self.pipeline, &mut self.output);
                        for record in records.chunks_exact(std::mem::size_of::<port_trace_common::RawEvent>()) {
                            pipeline.feed(record, |rec| output.record(rec))?;
                        }
                        // What happened while the walk ran (a socket closed
                        // before the walk reached it, one opened after it
                        // passed) is in the ring: take it in before judging.
                        self.drain()?;
                        let (pipeline, output) = (&mut self.pipeline, &mut self.output);
                        pipeline.end_walk(BootClock::boot_now_ns(), |rec| output.record(rec))?;
                    }
                    Err(_) => {
                        self.walk_errors += 1;
                        self.pipeline.tracker.abandon_walk();
                    }
                }
            }
        }
        Ok(())
    }

    async fn run(&mut self, header: &Header, duration: Option<Duration>, signals: &mut Signals) -> Result<()> {
        // --duration counts from the header, the start of tracing (the end
        // is fixed now, not when the future is first polled).
        let end = duration.map(|d| tokio::time::Instant::now() + d);
        let deadline = async move {
            match end {
                Some(end) => tokio::time::sleep_until(end).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        self.output.header(header)?;
        self.output.flush()?;
        // The programs are attached: what existed before is now the snapshot.
        self.walk(None, &[Proto::Tcp, Proto::Udp], true, true)?;

        let mut flush_tick = tokio::time::interval(FLUSH_EVERY);
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut walk_tick = tokio::time::interval(self.time_wait_walks.unwrap_or(RECONCILE_EVERY));
        walk_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile = tokio::time::Instant::now();
        // The first repair after a loss may run at once.
        let mut last_repair: Option<tokio::time::Instant> = None;
        let mut lost_at_reconcile = 0;

        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    let ring = guard.get_inner_mut();
                    // A bounded batch: under a flood the ring never runs
                    // empty, and signals, the deadline, flushes and walks
                    // must still get their turn.
                    let mut drained = true;
                    for _ in 0..BATCH {
                        match ring.next() {
                            Some(item) => self.pipeline.feed(&item, |rec| self.output.record(rec))?,
                            None => {
                                drained = true;
                                break;
                            }
                        }
                        drained = false;
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
                _ = flush_tick.tick() => {
                    self.loss.report(&mut self.output)?;
                    self.output.flush()?;
                }
                _ = walk_tick.tick() => {
                    let lost_more = self.loss.events > lost_at_reconcile
                        && last_repair.is_none_or(|t| t.elapsed() >= REPAIR_AFTER_LOSS_EVERY);
                    if lost_more || last_reconcile.elapsed() >= RECONCILE_EVERY {
                        if lost_more {
                            last_repair = Some(tokio::time::Instant::now());
                        }
                        // Repair: every followed socket against the kernel's.
                        lost_at_reconcile = self.loss.events;
                        last_reconcile = tokio::time::Instant::now();
                        // After a loss, sockets the walk finds that we do not
                        // know are allocations we lost: adopt them.
                        let namespaces = self.pipeline.tracker.namespaces();
                        self.walk(Some(&namespaces), &[Proto::Tcp, Proto::Udp], lost_more, lost_more)?;
                    } else if self.time_wait_walks.is_some() {
                        let namespaces = self.pipeline.tracker.time_wait_namespaces();
                        if !namespaces.is_empty() {
                            self.walk(Some(&namespaces), &[Proto::Tcp], false, false)?;
                        }
                    }
                }
                _ = signals.interrupt.recv() => break,
                _ = signals.terminate.recv() => break,
                _ = &mut deadline => break,
            }
        }
        // What the kernel wrote before we stopped.
        self.drain()?;
        self.loss.report(&mut self.output)?;
        Ok(())
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
