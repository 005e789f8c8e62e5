//! The reader's CPU priority: nice 19 while the ring buffer has room, the
//! priority it started with once the backlog grows.
//!
//! A reader at the workload's priority is woken and scheduled as soon as
//! events wait, and takes that CPU time from the workload it traces, even
//! on a host with idle CPU. Under the benchmark's wrk load (2 vCPUs, about
//! 27 % idle untraced) the same binary kept 0.86 of untraced throughput at
//! nice 0 and 0.91 at nice 19 (six alternating rounds each; `SCHED_BATCH`,
//! which only stops wake-up preemption, kept 0.86): at nice 19 the reader
//! runs in the idle gaps and the ring buffer holds the events meanwhile.
//!
//! On a saturated host a nice-19 thread gets about 1/68 of a nice-0 one's
//! share (`sched_prio_to_weight`), too little to keep up with a flood. So a
//! small watch thread, at the starting priority, reads the ring's producer
//! and consumer positions every [`CHECK_EVERY`] and gives the reader its
//! starting priority back once a quarter of the ring waits (events are lost
//! only when all of it is full), and takes it away again after a second
//! with less than an eighth waiting. The decision is [`Governor`]; the
//! system calls are [`PriorityWatch`].

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// How often the watch thread reads the ring's positions.
pub const CHECK_EVERY: Duration = Duration::from_millis(20);

/// How long the backlog must stay under the low mark before the reader is
/// lowered again.
pub const CALM_FOR: Duration = Duration::from_secs(1);

/// The nice value the reader runs at while the ring has room (the lowest
/// priority `setpriority` offers).
pub const LOW_NICE: i32 = 19;

/// What the governor asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Give the reader its starting priority back.
    Raise,
    /// Lower the reader to the low priority again.
    Lower,
}

/// Decides, from samples of the ring's backlog, when the reader needs its
/// starting priority. Pure: no clock or system call of its own.
#[derive(Debug)]
pub struct Governor {
    /// Backlog (bytes) at which the reader is raised: a quarter of the ring.
    raise_at: u64,
    /// Backlog under which a raised reader counts as caught up: an eighth.
    calm_below: u64,
    raised_since: Option<Instant>,
    /// Since when the backlog has stayed under `calm_below` while raised.
    calm_since: Option<Instant>,
    raises: u64,
    raised_for: Duration,
}

impl Governor {
    /// A governor for a ring buffer of `ring_bytes`.
    pub fn new(ring_bytes: u64) -> Governor {
        Governor {
            raise_at: (ring_bytes / 4).max(1),
            calm_below: (ring_bytes / 8).max(1),
            raised_since: None,
            calm_since: None,
            raises: 0,
            raised_for: Duration::ZERO,
        }
    }

    /// Takes one sample: `backlog` bytes wait in the ring at `now`.
    pub fn sample(&mut self, backlog: u64, now: Instant) -> Option<Change> {
        match self.raised_since {
            None if backlog >= self.raise_at => {
                self.raised_since = Some(now);
                self.calm_since = None;
                self.raises += 1;
                Some(Change::Raise)
            }
            None => None,
            Some(since) => {
                if backlog >= self.calm_below {
                    self.calm_since = None;
                    return None;
                }
                let calm_since = *self.calm_since.get_or_insert(now);
                if now.saturating_duration_since(calm_since) < CALM_FOR {
                    return None;
                }
                self.raised_for += now.saturating_duration_since(since);
                self.raised_since = None;
                self.calm_since = None;
                Some(Change::Lower)
            }
        }
    }

    /// Times raised so far, and for how long in all (up to `now`).
    pub fn totals(&self, now: Instant) -> (u64, Duration) {
        let open = self.raised_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        (self.raises, self.raised_for + open)
    }
}

/// The reader's priority over a run, for the summary.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ReaderPriority {
    /// The nice value the reader ran at while the ring had room.
    pub low_nice: i32,
    /// The nice value it started with, and was raised back to.
    pub normal_nice: i32,
    /// Times the backlog made the reader take its starting priority back.
    pub raised: u64,
    /// Seconds it held it.
    pub raised_s: f64,
}

/// The ring buffer's consumer and producer positions, mapped read-only (the
/// first two pages of the map: `bpf_ringbuf`'s `consumer_pos` and
/// `producer_pos`).
struct RingPositions {
    base: *mut libc::c_void,
    page: usize,
}

// SAFETY: the mapping is read-only shared memory, read with atomic loads.
unsafe impl Send for RingPositions {}

impl RingPositions {
    fn map(ring: BorrowedFd<'_>) -> Result<RingPositions> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        // SAFETY: a fresh shared read-only mapping of the map's first two
        // pages; `ringbuf_map_mmap_kern` allows read-only mappings of any
        // of its pages.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ, libc::MAP_SHARED, ring.as_raw_fd(), 0)
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the ring buffer's positions");
        }
        Ok(RingPositions { base, page })
    }

    /// Bytes written by the programs and not yet consumed by the reader.
    fn backlog(&self) -> u64 {
        // SAFETY: both words lie in the mapping, page aligned; the kernel
        // and the reader update them with release stores.
        let (consumer, producer) = unsafe {
            (
                (*self.base.cast::<AtomicU64>()).load(Ordering::Acquire),
                (*self.base.cast::<u8>().add(self.page).cast::<AtomicU64>()).load(Ordering::Acquire),
            )
        };
        producer.wrapping_sub(consumer)
    }
}

impl Drop for RingPositions {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base, 2 * self.page) };
    }
}

/// This thread's id.
fn current_tid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// A thread's nice value.
fn nice_of(tid: libc::pid_t) -> Result<i32> {
    // getpriority may return -1 legitimately: errno tells.
    // SAFETY: errno is thread-local; getpriority has no preconditions.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: as above.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let err = std::io::Error::last_os_error();
    if nice == -1 && err.raw_os_error() != Some(0) {
        return Err(err).context("reading the reader's nice value");
    }
    Ok(nice)
}

/// Sets one thread's nice value (`PRIO_PROCESS` with a thread id names
/// that thread alone on Linux).
fn set_nice(tid: libc::pid_t, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority has no memory preconditions.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether this process may take a lowered priority back: `CAP_SYS_NICE`,
/// or an `RLIMIT_NICE` that reaches `nice` (`can_nice()` in the kernel).
fn may_return_to(nice: i32) -> bool {
    if crate::privileges::has_sys_nice() {
        return true;
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } != 0 {
        return false;
    }
    // RLIMIT_NICE n allows nice values down to 20 - n.
    i64::try_from(limit.rlim_cur).map_or(true, |cur| 20 - cur <= i64::from(nice))
}

/// Keeps the reader thread at [`LOW_NICE`] while the ring has room (see the
/// module's notes). Dropping it stops the watch thread and gives the reader
/// its starting priority back.
pub struct PriorityWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Governor>>,
    reader: libc::pid_t,
    normal_nice: i32,
}

impl PriorityWatch {
    /// Lowers the calling thread (the reader) and starts watching `ring`
    /// (`ring_bytes` long). `Ok(None)` when there is nothing to do: the
    /// reader already runs at [`LOW_NICE`] or lower, or this process could
    /// not take its priority back (no `CAP_SYS_NICE`), so it is not
    /// lowered.
    pub fn start(ring: BorrowedFd<'_>, ring_bytes: u64) -> Result<Option<PriorityWatch>> {
        let reader = current_tid();
        let normal_nice = nice_of(reader)?;
        if normal_nice >= LOW_NICE || !may_return_to(normal_nice) {
            return Ok(None);
        }
        let positions = RingPositions::map(ring)?;
        let stop = Arc::new(AtomicBool::new(false));
        // Spawned before the reader is lowered: threads inherit their
        // creator's nice value.
        let thread = std::thread::Builder::new()
            .name("reader-priority".into())
            .spawn({
                let stop = stop.clone();
                move || watch(&positions, ring_bytes, reader, normal_nice, &stop)
            })
            .context("starting the reader-priority thread")?;
        let started = PriorityWatch { stop, thread: Some(thread), reader, normal_nice };
        if let Err(e) = set_nice(reader, LOW_NICE) {
            bail!("lowering the reader's priority: {e}"); // dropping `started` stops the thread
        }
        Ok(Some(started))
    }

    /// Stops watching, gives the reader its starting priority back (for
    /// the drain at exit) and returns what happened over the run.
    pub fn finish(mut self) -> Option<ReaderPriority> {
        let governor = self.stop_and_restore()?;
        let (raised, raised_for) = governor.totals(Instant::now());
        Some(ReaderPriority {
            low_nice: LOW_NICE,
            normal_nice: self.normal_nice,
            raised,
            raised_s: raised_for.as_secs_f64(),
        })
    }

    /// Stops the watch thread (once) and sets the reader's starting nice
    /// value again (the watch thread may have done so already: harmless).
    fn stop_and_restore(&mut self) -> Option<Governor> {
        let thread = self.thread.take()?;
        self.stop.store(true, Ordering::Relaxed);
        let governor = thread.join().ok();
        let _ = set_nice(self.reader, self.normal_nice);
        governor
    }
}

impl Drop for PriorityWatch {
    /// An early return from the trace loop (an error) still gives the
    /// reader its priority back.
    fn drop(&mut self) {
        self.stop_and_restore();
    }
}

/// The watch thread: samples the backlog and applies the governor's changes.
fn watch(positions: &RingPositions, ring_bytes: u64, reader: libc::pid_t, normal: i32, stop: &AtomicBool) -> Governor {
    let mut governor = Governor::new(ring_bytes);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(CHECK_EVERY);
        let nice = match governor.sample(positions.backlog(), Instant::now()) {
            Some(Change::Raise) => normal,
            Some(Change::Lower) => LOW_NICE,
            None => continue,
        };
        // A failure leaves the reader where it is; `may_return_to` said
        // raising is allowed, and lowering always is.
        let _ = set_nice(reader, nice);
    }
    governor
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: u64 = 4 << 20;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn raises_at_a_quarter_of_the_ring() {
        let t0 = Instant::now();
        let mut g = Governor::new(RING);
        assert_eq!(g.sample(0, t0), None);
        assert_eq!(g.sample(RING / 4 - 1, at(t0, 20)), None);
        assert_eq!(g.sample(RING / 4, at(t0, 40)), Some(Change::Raise));
        // Raised once, not again while the backlog stays.
        assert_eq!(g.sample(RING, at(t0, 60)), None);
        assert_eq!(g.totals(at(t0, 60)).0, 1);
    }

    #[test]
    fn lowers_after_a_calm_second_only() {
        let t0 = Instant::now();
        let mut g = Governor::new(RING);
        assert_eq!(g.sample(RING / 2, t0), Some(Change::Raise));
        // Under an eighth from 100 ms on...
        assert_eq!(g.sample(RING / 8 - 1, at(t0, 100)), None);
        assert_eq!(g.sample(0, at(t0, 900)), None);
        // ...but back above it at 1000 ms: the calm second starts again.
        assert_eq!(g.sample(RING / 8, at(t0, 1000)), None);
        assert_eq!(g.sample(0, at(t0, 1020)), None);
        assert_eq!(g.sample(0, at(t0, 2000)), None);
        assert_eq!(g.sample(0, at(t0, 2020)), Some(Change::Lower));
        assert_eq!(g.totals(at(t0, 5000)), (1, Duration::from_millis(2020)));
    }

    #[test]
    fn counts_every_raise_and_the_time_still_raised() {
        let t0 = Instant::now();
        let mut g = Governor::new(RING);
        assert_eq!(g.sample(RING / 4, t0), Some(Change::Raise));
        assert_eq!(g.sample(0, at(t0, 10)), None);
        assert_eq!(g.sample(0, at(t0, 1010)), Some(Change::Lower));
        assert_eq!(g.sample(RING / 3, at(t0, 2000)), Some(Change::Raise));
        assert_eq!(g.totals(at(t0, 2500)), (2, Duration::from_millis(1010 + 500)));
    }

    #[test]
    fn a_tiny_ring_still_has_marks() {
        let t0 = Instant::now();
        let mut g = Governor::new(2);
        assert_eq!(g.sample(0, t0), None);
        assert_eq!(g.sample(1, t0), Some(Change::Raise));
    }

    #[test]
    fn nice_of_this_thread_reads_back_what_was_set() {
        // A scratch thread, so that the test runner's threads keep theirs.
        std::thread::spawn(|| {
            let tid = current_tid();
            let before = nice_of(tid).unwrap();
            let target = (before + 1).min(LOW_NICE);
            set_nice(tid, target).unwrap();
            assert_eq!(nice_of(tid).unwrap(), target);
        })
        .join()
        .unwrap();
    }
}
