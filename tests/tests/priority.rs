//! The reader's CPU priority (`--reader-priority`): nice 19 while the ring
//! buffer has room, the starting priority back while the backlog grows,
//! and no event lost for it.
//!
//! Checked against the kernel's own view of the tracer's threads (the nice
//! field of `/proc/PID/task/TID/stat`) and the workload's own count of its
//! connections (`port-storm`). The load that starves a nice-19 reader is
//! real: busy threads at the starting priority, two per CPU, beside a TCP
//! connect storm.
//!
//! A test file of its own: its busy threads would slow the tests of a
//! shared binary, which run in parallel. Needs root; host only.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use port_trace_integration::netns::NetNs;
use port_trace_integration::tracer::Tracer;
use port_trace_integration::{
    output_with_timeout, require_root, tracer_bin, watch_json_args, HEADER_TIMEOUT, STOP_TIMEOUT,
};
use serde_json::Value;

const STORM: &str = env!("CARGO_BIN_EXE_port-storm");

/// Seconds of connect storm under the busy threads.
const STORM_SECS: u64 = 5;

/// How long the reader may take to be lowered at start, or again once the
/// load is gone (the tracer waits a calm second before lowering it).
const SETTLE: Duration = Duration::from_secs(6);

/// The nice value of the reader while the ring has room.
const LOW_NICE: i32 = 19;

/// A thread's name and nice value as the kernel shows them in its `stat`
/// file; `None` once it is gone.
fn stat_nice(path: &str) -> Option<(String, i32)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // `pid (comm) state ...`: comm may hold spaces; field 19 is nice.
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let nice = rest.split_whitespace().nth(19 - 3)?.parse().ok()?;
    Some((comm, nice))
}

/// Thread `tid` of process `pid`: see [`stat_nice`].
fn task_nice(pid: u32, tid: u32) -> Option<(String, i32)> {
    stat_nice(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// Every thread of `pid`: (tid, name, nice).
fn threads(pid: u32) -> Vec<(u32, String, i32)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|tid| task_nice(pid, tid).map(|(comm, nice)| (tid, comm, nice)))
        .collect()
}

/// This thread's nice value, which the tracer it spawns inherits.
fn own_nice() -> i32 {
    stat_nice("/proc/thread-self/stat").expect("/proc/thread-self/stat").1
}

/// Polls the reader's (the main thread's) nice value until `want` or
/// `timeout`; returns the last value seen.
fn wait_for_nice(pid: u32, want: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let nice = task_nice(pid, pid).map(|(_, n)| n);
        if nice == Some(want) || Instant::now() >= deadline {
            return nice;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Busy threads at this process's priority, two per CPU, until dropped.
struct BusyThreads {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl BusyThreads {
    fn start() -> BusyThreads {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..2 * cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                })
            })
            .collect();
        BusyThreads { stop, handles }
    }
}

impl Drop for BusyThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Samples the reader's nice value every 5 ms until dropped; keeps the
/// lowest seen.
struct NiceSampler {
    stop: Arc<AtomicBool>,
    lowest: Arc<AtomicI32>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl NiceSampler {
    fn start(pid: u32) -> NiceSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let lowest = Arc::new(AtomicI32::new(i32::MAX));
        let handle = std::thread::spawn({
            let (stop, lowest) = (stop.clone(), lowest.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some((_, nice)) = task_nice(pid, pid) {
                        lowest.fetch_min(nice, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        NiceSampler { stop, lowest, handle: Some(handle) }
    }

    fn finish(mut self) -> i32 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.lowest.load(Ordering::Relaxed)
    }
}

/// The summary record of a stopped tracer's output.
fn summary(records: &[Value]) -> Value {
    records.iter().rev().find(|r| r["type"] == "summary").cloned().unwrap_or(Value::Null)
}

#[test]
fn reader_runs_low_and_takes_its_priority_back_under_load() {
    if !require_root("reader_runs_low_and_takes_its_priority_back_under_load") {
        return;
    }
    let start_nice = own_nice();
    assert!(start_nice < LOW_NICE, "the test runs at nice {start_nice}: nothing to lower");
    let ns = NetNs::new().unwrap();
    let tracer = Tracer::start(&tracer_bin(), &watch_json_args(&ns, &[]), HEADER_TIMEOUT).unwrap();
    let pid = tracer.pid();
    let mut bad = Vec::new();

    // Idle: the reader low, the thread that watches the ring not.
    let idle = wait_for_nice(pid, LOW_NICE, SETTLE);
    if idle != Some(LOW_NICE) {
        bad.push(format!("idle: the reader's nice is {idle:?}, want {LOW_NICE}"));
    }
    let watcher = threads(pid).into_iter().find(|(_, comm, _)| comm == "reader-priority");
    match &watcher {
        Some((_, _, nice)) if *nice == start_nice => {}
        other => bad.push(format!("the reader-priority thread is {other:?}, want it at nice {start_nice}")),
    }

    // Load: the reader at nice 19 gets about 1/68 of a busy thread's CPU
    // share, too little for the storm's events: the backlog grows and the
    // tracer must give the reader its priority back.
    let sampler = NiceSampler::start(pid);
    let busy = BusyThreads::start();
    let out = output_with_timeout(
        ns.command(STORM).args(["tcp", &STORM_SECS.to_string()]),
        Duration::from_secs(STORM_SECS + 30),
    )
    .unwrap();
    drop(busy);
    let lowest = sampler.finish();
    let storm: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .next_back()
        .unwrap_or(Value::Null);
    if !out.status.success() || storm["errors"] != 0 {
        bad.push(format!("the storm failed: {} {storm}", out.status));
    }
    if lowest != start_nice {
        bad.push(format!("under load the reader's nice went down to {lowest} at most, want {start_nice}"));
    }

    // Calm again: lowered again.
    let after = wait_for_nice(pid, LOW_NICE, SETTLE);
    if after != Some(LOW_NICE) {
        bad.push(format!("after the load: the reader's nice is {after:?}, want {LOW_NICE} again"));
    }

    let output = tracer.stop(STOP_TIMEOUT).unwrap();
    let s = summary(&output.records);
    let priority = &s["reader_priority"];
    eprintln!(
        "storm {storm}; reader nice: idle {idle:?}, lowest under load {lowest}, after {after:?}; summary \
         reader_priority {priority}, lost {}",
        s["lost"]
    );
    if priority["low_nice"] != LOW_NICE || priority["normal_nice"] != start_nice {
        bad.push(format!("summary reader_priority {priority}: want low_nice {LOW_NICE}, normal_nice {start_nice}"));
    }
    if priority["raised"].as_u64().is_none_or(|n| n == 0) || priority["raised_s"].as_f64().is_none_or(|s| s <= 0.0) {
        bad.push(format!("summary reader_priority {priority}: want raised at least once, for some time"));
    }
    if s["lost"] != 0 {
        bad.push(format!("{} events lost: the reader was raised too late", s["lost"]));
    }
    // Every connection of the storm, as an allocation (the storm's
    // listener is a `listen` allocation of its own).
    let connects = output.records.iter().filter(|r| r["type"] == "alloc" && r["origin"] == "connect").count();
    if storm["ops"].as_u64() != Some(connects as u64) {
        bad.push(format!("{connects} connect allocations, the storm made {} connections", storm["ops"]));
    }
    if output.stderr.contains("panicked") || !output.status.success() {
        bad.push(format!("exit {}; stderr:\n{}", output.status, output.stderr));
    }
    assert!(bad.is_empty(), "reader priority:\n  {}", bad.join("\n  "));
}

#[test]
fn normal_reader_priority_keeps_the_starting_one() {
    if !require_root("normal_reader_priority_keeps_the_starting_one") {
        return;
    }
    let start_nice = own_nice();
    let ns = NetNs::new().unwrap();
    let tracer =
        Tracer::start(&tracer_bin(), &watch_json_args(&ns, &["--reader-priority", "normal"]), HEADER_TIMEOUT).unwrap();
    let pid = tracer.pid();
    // As long as the other test gives the low reader to settle.
    std::thread::sleep(Duration::from_secs(2));
    let names: Vec<(u32, String, i32)> = threads(pid);
    let output = tracer.stop(STOP_TIMEOUT).unwrap();
    let s = summary(&output.records);
    let mut bad = Vec::new();
    if names.is_empty() || names.iter().any(|(_, _, nice)| *nice != start_nice) {
        bad.push(format!("threads {names:?}: want every one at nice {start_nice}"));
    }
    if names.iter().any(|(_, comm, _)| comm == "reader-priority") {
        bad.push("a reader-priority thread runs".into());
    }
    if !s["reader_priority"].is_null() {
        bad.push(format!("summary reader_priority {}, want null", s["reader_priority"]));
    }
    assert!(bad.is_empty(), "--reader-priority normal:\n  {}", bad.join("\n  "));
}
