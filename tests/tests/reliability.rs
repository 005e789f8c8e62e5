//! Reliability and security: what a missing capability, a closed standard
//! output, `kill -9`, a million port lifecycles, twenty thousand held
//! sockets, a hostile `--output` path and `--duration` do to `port-trace
//! watch`.
//!
//! Every expectation is checked against something outside the tracer: the
//! capability sets the kernel shows in `/proc/self/status`, the BPF objects
//! the kernel lists (`/proc/PID/fdinfo`, `bpftool`), the sockets it lists
//! (`/proc/net/udp` in the traced namespace), the workload's own count
//! (`port-churn`), the tracer's memory as the kernel accounts it
//! (`/proc/PID/status`), the file system (`lstat`), our own clock.
//!
//! Every test needs root (see `require_root`), and runs on the host only
//! (not in `cargo xtask vm-test`). Figures (RSS, lifecycles/s, timings) are
//! printed to stderr: `cargo test --test reliability -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use port_trace_integration::netns::NetNs;
use port_trace_integration::procnet;
use port_trace_integration::tracer::Tracer;
use port_trace_integration::{
    check, output_with_timeout, require_root, signal, stdout_lines, tracer_bin, tracer_extra_args, watch_json_args,
    Capture, HEADER_TIMEOUT, STOP_TIMEOUT,
};
use serde_json::Value;

const CHURN: &str = env!("CARGO_BIN_EXE_port-churn");

/// The most resident memory the tracer may use, in KiB (`VmHWM`, the
/// kernel's high-water mark). For scale, measured on the 2-core development
/// machine: the release build (what `cargo xtask test` runs) peaks at about
/// 69 MiB in the soak with a 16 MiB ring buffer (the ring's pages are mapped
/// twice); a debug build that falls behind and loses events peaks near the
/// bound, following the sockets whose releases were lost.
const RSS_BOUND_KIB: u64 = 150 * 1024;

/// UDP port lifecycles of the soak.
const SOAK_LIFECYCLES: u64 = 1_000_000;

/// The most time the soak's workload gets for them (it stops there and
/// reports how far it got). Measured on the 2-core development machine
/// with the tracer attached: 9-10 s alone, 17-31 s while other tests ran;
/// 7 s without the tracer.
const SOAK_TIME_LIMIT_S: u64 = 50;

/// UDP sockets the hold variant keeps open at once.
const HELD_SOCKETS: u64 = 20_000;

/// The hold variant's `--max-tracked`.
const HOLD_MAX_TRACKED: u64 = 4096;

/// A ring buffer large enough for bursts (`--ring-buffer-kib`).
const BIG_RING_KIB: &str = "16384";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The non-empty lines of `s`.
fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Waits up to `timeout` for `child` to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("waitpid") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`); `None` once
/// the process is gone or a zombie.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The tracer's memory, sampled from `/proc/PID/status` every 100 ms by a
/// background thread until the process is gone (or a zombie).
struct MemorySampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Memory>,
}

/// What [`MemorySampler`] saw.
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    samples: u64,
    /// The first `VmRSS`.
    first_rss_kib: u64,
    /// The largest `VmRSS` sampled.
    max_rss_kib: u64,
    /// The last `VmHWM` read: the kernel's own peak of `VmRSS` over the
    /// process's life up to then.
    hwm_kib: u64,
}

impl Memory {
    /// The peak: the kernel's high-water mark, or a larger sample.
    fn peak_kib(&self) -> u64 {
        self.hwm_kib.max(self.max_rss_kib)
    }

    fn show(&self) -> String {
        format!(
            "VmRSS first {}, max sampled {}; VmHWM {} ({} samples)",
            mib(self.first_rss_kib),
            mib(self.max_rss_kib),
            mib(self.hwm_kib),
            self.samples
        )
    }
}

impl MemorySampler {
    fn start(pid: u32) -> MemorySampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut m = Memory::default();
            while !flag.load(Ordering::Relaxed) {
                let (Some(rss), Some(hwm)) = (status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")) else { break };
                if m.samples == 0 {
                    m.first_rss_kib = rss;
                }
                m.samples += 1;
                m.max_rss_kib = m.max_rss_kib.max(rss);
                m.hwm_kib = m.hwm_kib.max(hwm);
                std::thread::sleep(Duration::from_millis(100));
            }
            m
        });
        MemorySampler { stop, thread }
    }

    /// What was sampled so far, and the sampler stopped.
    fn finish(self) -> Memory {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the memory sampler panicked")
    }
}

// ---------------------------------------------------------------------------
// 1. Missing capabilities.

/// Capability numbers (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn cap_name(cap: u32) -> &'static str {
    match cap {
        CAP_NET_ADMIN => "CAP_NET_ADMIN",
        CAP_SYS_ADMIN => "CAP_SYS_ADMIN",
        CAP_PERFMON => "CAP_PERFMON",
        CAP_BPF => "CAP_BPF",
        _ => "?",
    }
}

/// setpriv's name of a capability (`--bounding-set -bpf`).
fn setpriv_name(cap: u32) -> String {
    cap_name(cap).trim_start_matches("CAP_").to_lowercase()
}

/// As root, but with `dropped` removed from the bounding, inheritable and
/// ambient sets (so that the exec'd process cannot have them), `watch -d 1s`
/// and `doctor` exit 1 with one line that names `missing`, the capability
/// port-trace then lacks, and says to use sudo: no panic, no verifier log
/// (at most 2 lines on stderr), nothing on stdout. The premise is checked
/// in the same setpriv invocation: `grep CapEff /proc/self/status` right
/// before port-trace is exec'd shows the dropped capabilities absent and
/// the other needed ones present.
fn capability_missing(test: &str, dropped: &[u32], missing: u32) {
    if !require_root(test) {
        return;
    }
    let list = dropped.iter().map(|c| format!("-{}", setpriv_name(*c))).collect::<Vec<_>>().join(",");
    let setpriv = [
        "setpriv".to_owned(),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
        format!("--bounding-set={list}"),
    ];
    let mut rows = Vec::new();
    for args in [&["watch", "-d", "1s"][..], &["doctor"]] {
        let out = output_with_timeout(
            Command::new(&setpriv[0])
                .args(&setpriv[1..])
                .args(["/bin/sh", "-c", "grep CapEff /proc/self/status && exec \"$0\" \"$@\""])
                .arg(tracer_bin())
                .args(args),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("running setpriv (util-linux): {e:#}"));
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        let ctx = format!(
            "{} {}: exit {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            setpriv.join(" "),
            args.join(" "),
            out.status
        );

        // The premise, from the kernel.
        let mut out_lines = stdout.lines();
        let capeff = out_lines
            .next()
            .and_then(|l| l.strip_prefix("CapEff:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no CapEff line from inside setpriv\n{ctx}"));
        for cap in [CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF] {
            let has = capeff & (1 << cap) != 0;
            assert_eq!(
                has,
                !dropped.contains(&cap),
                "premise: inside setpriv {} is {} (CapEff {capeff:016x})\n{ctx}",
                cap_name(cap),
                if has { "present" } else { "absent" }
            );
        }

        let mut bad = Vec::new();
        if out.status.code() != Some(1) {
            bad.push(format!("exit {}, want 1", out.status));
        }
        let err_lines = lines(&stderr);
        if err_lines.len() > 2 {
            bad.push(format!("{} lines on stderr, want one (at most 2)", err_lines.len()));
        }
        let want = cap_name(missing);
        match err_lines.iter().find(|l| l.contains(want)) {
            None => bad.push(format!("no stderr line names {want}")),
            Some(l) => {
                if !l.contains("sudo") {
                    bad.push(format!("the line naming {want} does not say sudo"));
                }
                // Where the line lists what is missing, it lists exactly that.
                if let Some(list) = l.split("missing:").nth(1) {
                    let listed: BTreeSet<&str> =
                        list.split([')', ';']).next().unwrap_or("").split(',').map(str::trim).collect();
                    if listed != BTreeSet::from([want]) {
                        bad.push(format!("it says missing: {listed:?}, but only {want} is"));
                    }
                }
            }
        }
        for (what, needle) in
            [("panicked", "panicked"), ("a verifier log", "verifier"), ("a verifier log", "processed")]
        {
            if stderr.contains(needle) {
                bad.push(format!("stderr has {what} ({needle:?})"));
            }
        }
        let rest: Vec<&str> = out_lines.collect();
        if !rest.is_empty() {
            bad.push(format!("wrote to stdout: {rest:?}"));
        }
        if !bad.is_empty() {
            rows.push(format!("{}\n  {}\n  {ctx}", args.join(" "), bad.join("\n  ")));
        }
    }
    assert!(
        rows.is_empty(),
        "without {}:\n{}",
        dropped.iter().map(|c| cap_name(*c)).collect::<Vec<_>>().join(" and "),
        rows.join("\n")
    );
}

/// [`capability_missing`]: without CAP_SYS_ADMIN (which would stand in) and
/// CAP_BPF, port-trace lacks CAP_BPF.
#[test]
fn without_cap_bpf_watch_and_doctor_say_so() {
    capability_missing("without_cap_bpf_watch_and_doctor_say_so", &[CAP_SYS_ADMIN, CAP_BPF], CAP_BPF);
}

/// [`capability_missing`]: without CAP_SYS_ADMIN and CAP_PERFMON,
/// port-trace lacks CAP_PERFMON.
#[test]
fn without_cap_perfmon_watch_and_doctor_say_so() {
    capability_missing("without_cap_perfmon_watch_and_doctor_say_so", &[CAP_SYS_ADMIN, CAP_PERFMON], CAP_PERFMON);
}

/// [`capability_missing`]: without CAP_NET_ADMIN (CAP_SYS_ADMIN kept).
#[test]
fn without_cap_net_admin_watch_and_doctor_say_so() {
    capability_missing("without_cap_net_admin_watch_and_doctor_say_so", &[CAP_NET_ADMIN], CAP_NET_ADMIN);
}

// ---------------------------------------------------------------------------
// Workloads.

/// Runs `port-churn cycle COUNT SECONDS` in `ns` and returns its `done`
/// line; fails when it exits non-zero.
fn churn_cycles(ns: &NetNs, count: u64, secs: u64) -> Value {
    let out = output_with_timeout(
        ns.command(CHURN).args(["cycle", &count.to_string(), &secs.to_string()]),
        Duration::from_secs(secs + 30),
    )
    .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "port-churn cycle failed ({}):\n{stdout}\n{}", out.status, text(&out.stderr));
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["op"] == "done")
        .unwrap_or_else(|| panic!("no done line from port-churn:\n{stdout}"))
}

/// The UDP sockets (IPv4 and IPv6) the kernel lists in `ns`.
fn udp_sockets(ns: &NetNs) -> usize {
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .map(|table| {
            let out = ns.command("cat").arg(table).output().unwrap();
            assert!(out.status.success(), "cat {table} in {}: {}", ns.name(), text(&out.stderr));
            procnet::parse(&text(&out.stdout)).unwrap_or_else(|e| panic!("{table}: {e}")).len()
        })
        .sum()
}

// ---------------------------------------------------------------------------
// 2. A closed standard output.

/// `watch --format json` whose standard output is a pipe that the reader
/// closes right after the header, while `port-churn` opens and closes 5000
/// UDP sockets in the traced namespace: the tracer's next write fails with
/// EPIPE, and it must exit 0, quietly (no panic, no "Broken pipe" or other
/// error on stderr), within 5 s of the workload's end.
#[test]
fn closed_stdout_ends_the_tracer_quietly() {
    if !require_root("closed_stdout_ends_the_tracer_quietly") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let mut child = Command::new(tracer_bin())
        .args(watch_json_args(&ns, &[]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = Capture::start(child.stderr.take().unwrap());
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut header = String::new();
    stdout.read_line(&mut header).unwrap();
    let header_ok = serde_json::from_str::<Value>(&header).is_ok_and(|v| v["type"] == "header");
    // The reader goes away: the pipe has no reader any more.
    drop(stdout);
    if !header_ok {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no JSON header first: {header:?}\nstderr:\n{}", text(&err.finish(Duration::from_secs(2))));
    }
    let done = churn_cycles(&ns, 5000, 20);
    let workload_end = Instant::now();
    let status = wait_timeout(&mut child, Duration::from_secs(5));
    let took = workload_end.elapsed();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stderr = text(&err.finish(Duration::from_secs(2)));
    eprintln!("closed stdout: workload {done}; tracer exit {status:?} {took:?} after the workload; stderr {stderr:?}");
    let mut bad = Vec::new();
    match status {
        None => bad.push("still running 5 s after the workload (killed)".to_owned()),
        Some(st) if st.code() != Some(0) => bad.push(format!("exit {st}, want 0")),
        Some(_) => {}
    }
    for needle in ["panicked", "Broken pipe", "broken pipe", "error", "EPIPE"] {
        if stderr.contains(needle) {
            bad.push(format!("stderr has {needle:?}"));
        }
    }
    assert!(bad.is_empty(), "stdout closed after the header:\n  {}\nstderr:\n{stderr}", bad.join("\n  "));
}

// ---------------------------------------------------------------------------
// 3. kill -9.

/// The BPF objects a process holds open, by the kernel's fdinfo.
#[derive(Debug, Default)]
struct BpfHeld {
    progs: BTreeSet<u64>,
    /// Link id → its `link_type`.
    links: BTreeMap<u64, String>,
    maps: BTreeSet<u64>,
}

/// Reads `/proc/PID/fd` and `/proc/PID/fdinfo`: every `anon_inode:bpf-prog`,
/// `bpf_link` and `bpf-map` with its id. (bpftool's `pids` would say the
/// same, but Debian's bpftool is built without that feature.)
fn bpf_held(pid: u32) -> BpfHeld {
    let mut held = BpfHeld::default();
    let dir = format!("/proc/{pid}/fd");
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")).flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        let target = target.to_string_lossy().into_owned();
        let Some(kind) = target.strip_prefix("anon_inode:") else { continue };
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()))
        else {
            continue;
        };
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim().to_owned()))
        };
        let id = |name: &str| field(name).and_then(|v| v.parse::<u64>().ok());
        match kind {
            "bpf-prog" => held.progs.extend(id("prog_id")),
            "bpf_link" | "bpf-link" => {
                if let Some(link) = id("link_id") {
                    held.links.insert(link, field("link_type").unwrap_or_default());
                }
            }
            "bpf-map" => held.maps.extend(id("map_id")),
            _ => {}
        }
    }
    held
}

/// The ids `bpftool KIND show --json` lists (`prog`, `link`, `map`): what
/// exists in the kernel.
fn bpftool_ids(kind: &str) -> BTreeSet<u64> {
    let out = output_with_timeout(Command::new("bpftool").args([kind, "show", "--json"]), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("running bpftool (apt-get install bpftool): {e:#}"));
    assert!(out.status.success(), "bpftool {kind} show: {}\n{}", out.status, text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool {kind} show --json is not JSON ({e}): {}", text(&out.stdout)));
    v.as_array()
        .unwrap_or_else(|| panic!("bpftool {kind} show --json is not an array: {v}"))
        .iter()
        .filter_map(|o| o["id"].as_u64())
        .collect()
}

/// The cgroup v2 mount point, from /proc/mounts.
fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .unwrap_or_else(|| panic!("no cgroup2 mount in /proc/mounts:\n{mounts}"))
}

/// Program id → the cgroups it is attached to, for every cgroup under the
/// cgroup v2 mount (`bpftool cgroup tree MOUNT --json`).
fn cgroup_attachments(mount: &Path) -> BTreeMap<u64, Vec<String>> {
    let out = output_with_timeout(
        Command::new("bpftool").arg("cgroup").arg("tree").arg(mount).arg("--json"),
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(out.status.success(), "bpftool cgroup tree: {}\n{}", out.status, text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool cgroup tree --json is not JSON ({e}): {}", text(&out.stdout)));
    let mut by_prog: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for cg in v.as_array().into_iter().flatten() {
        for p in cg["programs"].as_array().into_iter().flatten() {
            if let Some(id) = p["id"].as_u64() {
                by_prog.entry(id).or_default().push(format!("{} {}", cg["cgroup"], p["attach_type"]));
            }
        }
    }
    by_prog
}

/// After `kill -9` nothing of the tracer stays in the kernel: the BPF
/// programs, links and maps it held (by `/proc/PID/fdinfo`, while it ran;
/// at least 5 programs, 5 links and 2 maps, of which at least one cgroup
/// link, and all of them listed by bpftool: the premise that the check can
/// see them) are gone from `bpftool prog/link/map show` within 3 s of it
/// being reaped (the kernel frees them asynchronously), and no cgroup under
/// the cgroup v2 mount has any of those programs attached
/// (`bpftool cgroup tree`). Only the killed process's ids are looked at:
/// other tests' tracers may run meanwhile.
#[test]
fn kill_9_leaves_nothing_in_the_kernel() {
    if !require_root("kill_9_leaves_nothing_in_the_kernel") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let mount = cgroup2_mount();
    let tracer = Tracer::start(&tracer_bin(), &watch_json_args(&ns, &[]), HEADER_TIMEOUT).unwrap();
    let pid = tracer.pid();
    let held = bpf_held(pid);
    let (progs, links, maps) = (bpftool_ids("prog"), bpftool_ids("link"), bpftool_ids("map"));
    let attached = cgroup_attachments(&mount);
    let cgroup_links = held.links.values().filter(|t| *t == "cgroup").count();
    let attached_ours: Vec<u64> = held.progs.iter().copied().filter(|p| attached.contains_key(p)).collect();
    eprintln!(
        "tracer {pid} holds {} programs {:?}, {} links {:?}, {} maps {:?}; {} of its programs attached to cgroups \
         under {}",
        held.progs.len(),
        held.progs,
        held.links.len(),
        held.links,
        held.maps.len(),
        held.maps,
        attached_ours.len(),
        mount.display()
    );
    let mut premise = Vec::new();
    if held.progs.len() < 5 || held.links.len() < 5 || held.maps.len() < 2 {
        premise.push("fewer than 5 programs, 5 links or 2 maps held".to_owned());
    }
    if cgroup_links == 0 || attached_ours.is_empty() {
        premise.push(format!("{cgroup_links} cgroup links held, {} programs attached to cgroups", attached_ours.len()));
    }
    for (what, ours, listed) in [
        ("programs", &held.progs, &progs),
        ("links", &held.links.keys().copied().collect(), &links),
        ("maps", &held.maps, &maps),
    ] {
        let unlisted: Vec<&u64> = ours.difference(listed).collect();
        if !unlisted.is_empty() {
            premise.push(format!("{what} {unlisted:?} held but not listed by bpftool"));
        }
    }
    assert!(premise.is_empty(), "premise of the kill -9 test: {}", premise.join("; "));

    signal(pid, libc::SIGKILL);
    // Dropping the tracer reaps it (its kill is a no-op by now).
    drop(tracer);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the killed tracer {pid} was not reaped");
    let killed = Instant::now();

    let deadline = killed + Duration::from_secs(3);
    let left = loop {
        let mut left = Vec::new();
        let still = |ours: &BTreeSet<u64>, now: &BTreeSet<u64>| ours.intersection(now).copied().collect::<Vec<_>>();
        let (p, l, m) = (
            still(&held.progs, &bpftool_ids("prog")),
            still(&held.links.keys().copied().collect(), &bpftool_ids("link")),
            still(&held.maps, &bpftool_ids("map")),
        );
        for (what, ids) in [("programs", p), ("links", l), ("maps", m)] {
            if !ids.is_empty() {
                left.push(format!("{what} {ids:?} still exist"));
            }
        }
        let attachments = cgroup_attachments(&mount);
        for prog in &held.progs {
            if let Some(at) = attachments.get(prog) {
                left.push(format!("program {prog} still attached: {at:?}"));
            }
        }
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("kill -9: {:?} after the reap: {left:?}", killed.elapsed());
    assert!(left.is_empty(), "3 s after kill -9 of the tracer {pid}:\n  {}", left.join("\n  "));
}

// ---------------------------------------------------------------------------
// 4. Soak: a million lifecycles, and twenty thousand held sockets.

/// What a stream of JSON Lines held, counted as it went by (too many lines
/// to keep): the first line, the last, lines per `type`, the `lost` records.
#[derive(Debug, Default)]
struct Tally {
    first: Option<String>,
    last: Option<String>,
    lines: u64,
    by_type: BTreeMap<String, u64>,
    lost_records: Vec<String>,
    unterminated: u64,
    /// When the last line came.
    last_at: Option<Instant>,
}

/// Counts the tracer's stdout in a background thread.
struct Counter {
    tally: Arc<Mutex<Tally>>,
    thread: JoinHandle<()>,
}

impl Counter {
    fn start(stdout: impl std::io::Read + Send + 'static) -> Counter {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let t = Arc::clone(&tally);
        let thread = std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, stdout);
            let mut buf = Vec::with_capacity(1024);
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let mut t = t.lock().unwrap_or_else(PoisonError::into_inner);
                t.lines += 1;
                t.last_at = Some(Instant::now());
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                } else {
                    t.unterminated += 1;
                }
                // Every record starts with its type: {"type":"alloc",...
                let ty = buf
                    .strip_prefix(b"{\"type\":\"")
                    .and_then(|rest| rest.split(|b| *b == b'"').next())
                    .map(|ty| String::from_utf8_lossy(ty).into_owned())
                    .unwrap_or_else(|| "(not a record)".into());
                if ty == "lost" {
                    t.lost_records.push(text(&buf));
                }
                *t.by_type.entry(ty).or_default() += 1;
                if t.first.is_none() {
                    t.first = Some(text(&buf));
                }
                t.last = Some(text(&buf));
            }
        });
        Counter { tally, thread }
    }

    fn lines(&self) -> u64 {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner).lines
    }

    fn has_first(&self) -> bool {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner).first.is_some()
    }

    /// Waits up to `grace` for EOF, then returns the tally.
    fn finish(self, grace: Duration) -> Tally {
        let deadline = Instant::now() + grace;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::mem::take(&mut *self.tally.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// `port-trace ARGS` with its stdout counted by a [`Counter`] (for runs
/// with too many lines to keep) and its stderr captured; returns once the
/// first line (the header) is there.
struct CountedTracer {
    child: Child,
    counter: Counter,
    stderr: Capture,
}

impl CountedTracer {
    fn start(args: &[OsString]) -> CountedTracer {
        let spawned = Instant::now();
        let mut child = Command::new(tracer_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", tracer_bin().display()));
        let stderr = Capture::start(child.stderr.take().unwrap());
        let counter = Counter::start(child.stdout.take().unwrap());
        while !counter.has_first() {
            if spawned.elapsed() > HEADER_TIMEOUT || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no header from the tracer; stderr:\n{}", text(&stderr.finish(Duration::from_secs(2))));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        CountedTracer { child, counter, stderr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the exit (SIGKILL after that: `None`),
    /// then returns the tally and stderr.
    fn wait(mut self, timeout: Duration) -> (Option<ExitStatus>, Tally, String) {
        let status = wait_timeout(&mut self.child, timeout);
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let tally = self.counter.finish(Duration::from_secs(5));
        (status, tally, text(&self.stderr.finish(Duration::from_secs(2))))
    }
}

/// The accounting of `n` UDP lifecycles (each takes one port and gives it
/// back, and nothing else in the namespace does) in a tracer's output,
/// `tally` and its last line parsed as `summary`: the last line is the
/// summary; its counts are the lines printed and its `lost` the sum of the
/// `lost` records; no more than `n` allocs or releases; and each
/// lifecycle's alloc and release either printed or counted as lost
/// (`alloc + lost ≥ n`, `release + lost ≥ n`: not equalities, as `lost`
/// counts events of every kind, so one lifecycle may lose several).
fn lifecycle_accounting(tally: &Tally, summary: &Value, n: u64) -> Vec<String> {
    let mut bad = Vec::new();
    if summary["type"] != "summary" {
        bad.push(format!("the last line is not a summary: {:?}", tally.last));
    }
    let count = |k: &str| summary["counts"][k].as_u64();
    for ty in ["alloc", "alloc_fail", "state", "release", "lost"] {
        let printed = tally.by_type.get(ty).copied().unwrap_or(0);
        if count(ty) != Some(printed) {
            bad.push(format!("summary counts.{ty} = {:?}, but {printed} {ty} lines were printed", count(ty)));
        }
    }
    let lost = summary["lost"].as_u64().unwrap_or(0);
    let lost_sum: u64 =
        tally.lost_records.iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()?["count"].as_u64()).sum();
    if lost_sum != lost {
        bad.push(format!("the lost records add up to {lost_sum} events, the summary says lost {lost}"));
    }
    let (alloc, release) = (count("alloc").unwrap_or(0), count("release").unwrap_or(0));
    if alloc > n || release > n {
        bad.push(format!("{alloc} allocs and {release} releases for {n} lifecycles: more than there were"));
    }
    if alloc + lost < n || release + lost < n {
        bad.push(format!(
            "alloc {alloc} + lost {lost} and release {release} + lost {lost} must each be ≥ {n} lifecycles: \
             events vanished unreported"
        ));
    }
    bad
}

/// One million UDP port lifecycles (`port-churn cycle`: socket,
/// bind(127.0.0.1:0), close, as fast as one thread can, at most
/// [`SOAK_TIME_LIMIT_S`]) in a fresh namespace, traced by `watch --format
/// json --ring-buffer-kib 16384` into a pipe that the test drains and
/// counts. The tracer's memory is sampled throughout. After the workload
/// the test waits for the tracer to catch up (its output quiet for 1 s),
/// then 2.5 s more (a loss is reported within 100 ms, and the repair walk
/// follows at the next tick of `--walk-interval`, 1 s), then sends SIGINT.
///
/// - The workload did all 1 000 000 (its own count), none failed.
/// - The tracer's peak resident memory (the kernel's `VmHWM`, and every
///   `VmRSS` sample) stays under [`RSS_BOUND_KIB`].
/// - Accounting: each lifecycle takes one port and gives it back, and
///   nothing else in the namespace does, so `alloc` ≤ N and `release` ≤ N.
///   Each lifecycle's allocation event either reached the tracer (an
///   `alloc` record) or was counted as lost (the programs count every
///   failed ring-buffer reservation), so `alloc + lost ≥ N`, likewise
///   `release + lost ≥ N` (a release whose alloc was lost is still printed,
///   unpaired; a lost release is repaired as `reconciled`). Neither is an
///   equality: `lost` counts events of every kind (the asked-port event of
///   `bind`, allocations, releases), so one lifecycle may lose several.
///   A release the kernel never reported (it skips the `sock_release`
///   hook for about one close in several million, see the README's
///   "Losses and floods"; about one run of this suite in five had one) is
///   printed too, as `reconciled`, by the tracer's last walk at exit.
/// - The summary's counts are the lines printed, no decode errors, and
///   after the repair walks `ports_in_use` is 0, as the kernel has no UDP
///   socket left in the namespace. The run ends on SIGINT with exit 0 and
///   the summary as the last line.
#[test]
fn soak_a_million_udp_lifecycles() {
    if !require_root("soak_a_million_udp_lifecycles") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let tracer = CountedTracer::start(&watch_json_args(&ns, &["--ring-buffer-kib", BIG_RING_KIB]));
    let pid = tracer.pid();
    let memory = MemorySampler::start(pid);

    let started = Instant::now();
    let done = churn_cycles(&ns, SOAK_LIFECYCLES, SOAK_TIME_LIMIT_S);
    let workload_wall = started.elapsed();
    // The tracer catches up (its output stops growing), reports the loss
    // (every 100 ms) and repairs it (the next walk, within a second or so).
    let drain_started = Instant::now();
    let mut last = (tracer.counter.lines(), Instant::now());
    while last.1.elapsed() < Duration::from_secs(1) && drain_started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
        let n = tracer.counter.lines();
        if n != last.0 {
            last = (n, Instant::now());
        }
    }
    let caught_up = last.1.duration_since(drain_started);
    std::thread::sleep(Duration::from_millis(2500));
    let kernel_udp = udp_sockets(&ns);

    signal(pid, libc::SIGINT);
    let stop_sent = Instant::now();
    let (status, tally, stderr) = tracer.wait(STOP_TIMEOUT);
    let stop_took = stop_sent.elapsed();
    let memory = memory.finish();

    let n = SOAK_LIFECYCLES;
    let cycles = done["cycles"].as_u64().unwrap_or(0);
    let summary: Value = tally.last.as_deref().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    eprintln!(
        "soak: workload {done} ({workload_wall:.1?} wall); tracer caught up {caught_up:.1?} after it, stopped \
         {stop_took:.1?} after SIGINT; memory: {}; {} lines {:?}; lost records {:?}\nsummary: {summary}",
        memory.show(),
        tally.lines,
        tally.by_type,
        tally.lost_records
    );

    let mut bad = Vec::new();
    if cycles != n || done["failed"] != 0 {
        bad.push(format!(
            "the workload did {cycles} lifecycles ({} failed) of {n} in at most {SOAK_TIME_LIMIT_S} s ({} per s)",
            done["failed"], done["per_s"]
        ));
    }
    match status {
        None => bad.push(format!("no exit within {STOP_TIMEOUT:?} of SIGINT (killed)")),
        Some(st) if !st.success() => bad.push(format!("exit {st}, want 0")),
        Some(_) => {}
    }
    if memory.peak_kib() >= RSS_BOUND_KIB {
        bad.push(format!("peak resident memory {} ≥ the bound {}", mib(memory.peak_kib()), mib(RSS_BOUND_KIB)));
    }
    if memory.samples < 10 {
        bad.push(format!("only {} memory samples", memory.samples));
    }
    if !tally.first.as_deref().is_some_and(|l| l.starts_with("{\"type\":\"header\"")) {
        bad.push(format!("the first line is not the header: {:?}", tally.first));
    }
    if tally.unterminated > 0 || tally.by_type.contains_key("(not a record)") {
        bad.push(format!("{} unterminated lines; lines by type {:?}", tally.unterminated, tally.by_type));
    }
    bad.extend(lifecycle_accounting(&tally, &summary, n));
    if summary["decode_errors"] != 0 {
        bad.push(format!("decode_errors {}", summary["decode_errors"]));
    }
    if kernel_udp != 0 || summary["ports_in_use"] != 0 {
        bad.push(format!(
            "ports_in_use {} at the end; the kernel lists {kernel_udp} UDP sockets in the namespace",
            summary["ports_in_use"]
        ));
    }
    if stderr.contains("panicked") {
        bad.push("stderr has \"panicked\"".into());
    }
    assert!(bad.is_empty(), "soak of {n} UDP lifecycles:\n  {}\nstderr:\n{stderr}", bad.join("\n  "));
}

/// UDP lifecycles made while the tracer cannot read (see
/// [`backlog_at_exit_is_printed_or_counted`]).
const BACKLOG_LIFECYCLES: u64 = 200_000;

/// A backlog at exit: the tracer (`watch --format json --ring-buffer-kib
/// 262144` into a pipe the test drains) is stopped (SIGSTOP) once its
/// header is out, `port-churn cycle` makes [`BACKLOG_LIFECYCLES`] UDP
/// lifecycles in its namespace meanwhile (400 000 events, about 58 MB, in
/// a 256 MiB ring: nothing is lost in the kernel), and the tracer is told
/// to stop (SIGINT) the moment it runs again (SIGCONT). The events in the
/// ring happened during the trace: each must come out as a record or be
/// counted in `lost`, as in the soak (`alloc + lost ≥ N`, `release + lost
/// ≥ N`, no more than N of either; a release the kernel skipped comes out
/// as `reconciled`, as in the soak), with the summary's counts equal to the
/// lines printed and the lost records adding up to its `lost`; the tracer
/// exits 0 within [`STOP_TIMEOUT`]. (The drain at exit used to read at most
/// 16 384 events and drop the rest without a word: 6 144 allocs and lost 0
/// for 200 000 lifecycles.)
#[test]
fn backlog_at_exit_is_printed_or_counted() {
    if !require_root("backlog_at_exit_is_printed_or_counted") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let tracer = CountedTracer::start(&watch_json_args(&ns, &["--ring-buffer-kib", "262144"]));
    let pid = tracer.pid();
    signal(pid, libc::SIGSTOP);
    let done = churn_cycles(&ns, BACKLOG_LIFECYCLES, 60);
    signal(pid, libc::SIGCONT);
    signal(pid, libc::SIGINT);
    let stop_sent = Instant::now();
    let (status, tally, stderr) = tracer.wait(STOP_TIMEOUT);
    let stop_took = stop_sent.elapsed();

    let n = BACKLOG_LIFECYCLES;
    let summary: Value = tally.last.as_deref().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    eprintln!(
        "backlog: workload {done}; tracer exited {stop_took:.1?} after SIGCONT and SIGINT; {} lines {:?}; lost \
         records {:?}",
        tally.lines, tally.by_type, tally.lost_records
    );
    let mut bad = Vec::new();
    if done["cycles"].as_u64() != Some(n) || done["failed"] != 0 {
        bad.push(format!("the workload did {} lifecycles ({} failed) of {n}", done["cycles"], done["failed"]));
    }
    match status {
        None => bad.push(format!("no exit within {STOP_TIMEOUT:?} of SIGINT (killed)")),
        Some(st) if !st.success() => bad.push(format!("exit {st}, want 0")),
        Some(_) => {}
    }
    bad.extend(lifecycle_accounting(&tally, &summary, n));
    if stderr.contains("panicked") {
        bad.push("stderr has \"panicked\"".into());
    }
    assert!(bad.is_empty(), "backlog of {n} UDP lifecycles at exit:\n  {}\nstderr:\n{stderr}", bad.join("\n  "));
}

/// `port-churn hold`, running: its ready line, and its stdin to let go.
struct Holder {
    child: Child,
    ready: Value,
}

impl Holder {
    /// Starts `port-churn hold COUNT` in `ns` and waits up to `timeout` for
    /// its ready line.
    fn start(ns: &NetNs, count: u64, timeout: Duration) -> Holder {
        let mut child = ns
            .command(CHURN)
            .args(["hold", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = Capture::start(child.stderr.take().unwrap());
        let rx = stdout_lines(&mut child);
        match rx.recv_timeout(timeout).ok().and_then(|l| serde_json::from_str::<Value>(&l).ok()) {
            Some(ready) if ready["op"] == "ready" => Holder { child, ready },
            other => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "port-churn hold {count}: no ready line ({other:?}, exit {status:?}); stderr:\n{}",
                    text(&err.finish(Duration::from_secs(2)))
                );
            }
        }
    }

    /// Lets the sockets go and waits for the workload to exit.
    fn release(mut self) -> Option<ExitStatus> {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
        let st = wait_timeout(&mut self.child, Duration::from_secs(30));
        if st.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        st
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 20 000 UDP sockets open at once (`port-churn hold`, which raises
/// `RLIMIT_NOFILE` and, where the hard limit is lower, spreads them over
/// helper processes) in a namespace whose ephemeral range has room for
/// them, traced with `--max-tracked 4096`.
///
/// One UDP socket (the marker) is opened before the tracer starts, and the
/// 20 000 only once the tracer has reported the marker as a `snapshot`:
/// then its start-up walk is over, and the sockets are not bound while it
/// runs. (That is a race of its own, not this test's subject: a socket
/// bound right after the header and evicted before the walk reaches it is
/// reported a second time, as a `snapshot`.)
///
/// The kernel lists all 20 001 in the namespace (`/proc/net/udp`); once
/// the tracer has printed their allocs it is stopped with the sockets
/// still open. Its summary must report `evicted` > 0 and at most 4096
/// `ports_in_use` (what it still follows); with nothing lost, exactly: one
/// alloc per socket (20 000 `bind` and the marker's `snapshot`, no socket
/// twice), and evicted + ports_in_use = 20 001 (every socket is either
/// followed or counted as dropped). Peak resident memory stays under
/// [`RSS_BOUND_KIB`].
#[test]
fn holding_20000_sockets_with_max_tracked_4096_evicts() {
    if !require_root("holding_20000_sockets_with_max_tracked_4096_evicts") {
        return;
    }
    let ns = NetNs::new().unwrap();
    ns.sysctl("net.ipv4.ip_local_port_range", "10000 60999").unwrap();
    let marker = Holder::start(&ns, 1, Duration::from_secs(20));
    let max = HOLD_MAX_TRACKED.to_string();
    let mut tracer = Tracer::start(
        &tracer_bin(),
        &watch_json_args(&ns, &["--max-tracked", &max, "--ring-buffer-kib", BIG_RING_KIB]),
        HEADER_TIMEOUT,
    )
    .unwrap();
    let memory = MemorySampler::start(tracer.pid());
    let snapshot_done = tracer.wait_until(Duration::from_secs(20), |recs| {
        recs.iter().any(|r| r["type"] == "alloc" && r["origin"] == "snapshot" && r["proto"] == "udp")
    });
    assert!(
        snapshot_done,
        "premise: no snapshot alloc for the marker socket ({}) within 20 s; records: {:?}",
        marker.ready,
        tracer.records_so_far()
    );
    let started = Instant::now();
    let holder = Holder::start(&ns, HELD_SOCKETS, Duration::from_secs(60));
    let opened = started.elapsed();
    let total = HELD_SOCKETS + 1;
    let kernel_udp = udp_sockets(&ns) as u64;

    // Until every alloc is printed, or reported lost.
    let (mut seen, mut allocs, mut lost) = (0, 0u64, 0u64);
    let complete = tracer.wait_until(Duration::from_secs(30), |recs| {
        for r in &recs[seen..] {
            match r["type"].as_str() {
                Some("alloc") => allocs += 1,
                Some("lost") => lost += r["count"].as_u64().unwrap_or(0),
                _ => {}
            }
        }
        seen = recs.len();
        allocs + lost >= total
    });
    let memory_before_stop = status_kib(tracer.pid(), "VmHWM").unwrap_or(0);
    let out = tracer.stop(STOP_TIMEOUT).unwrap();
    let memory = memory.finish();
    let ready = holder.ready.clone();
    let workload_exit = holder.release();
    drop(marker);

    let summary = out.records.last().cloned().unwrap_or(Value::Null);
    let (evicted, in_use) = (summary["evicted"].as_u64(), summary["ports_in_use"].as_u64());
    let lost = summary["lost"].as_u64().unwrap_or(0);
    let alloc = summary["counts"]["alloc"].as_u64().unwrap_or(0);
    let mut per_sock: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for r in out.records.iter().filter(|r| r["type"] == "alloc") {
        per_sock.entry(r["sock"].as_u64().unwrap_or(0)).or_default().push(r);
    }
    let twice: Vec<&Vec<&Value>> = per_sock.values().filter(|v| v.len() > 1).collect();
    let origins = out.records.iter().filter(|r| r["type"] == "alloc").fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r["origin"].to_string()).or_insert(0u64) += 1;
        m
    });
    eprintln!(
        "hold: workload {ready} ({opened:.1?}); kernel lists {kernel_udp} UDP sockets; all allocs seen: \
         {complete}; allocs by origin {origins:?}, {} sockets with more than one; memory: {} (VmHWM {} before \
         SIGINT)\nsummary: {summary}",
        twice.len(),
        memory.show(),
        mib(memory_before_stop)
    );

    let mut bad = out.exit_problems();
    bad.extend(check::check_summary(&out.records));
    if ready["held"].as_u64() != Some(HELD_SOCKETS) || kernel_udp != total {
        bad.push(format!(
            "premise: the workload holds {} sockets and the marker 1, the kernel lists {kernel_udp}; want {total}",
            ready["held"]
        ));
    }
    if !complete {
        bad.push(format!("within 30 s the tracer printed {alloc} allocs and {lost} lost events, want ≥ {total}"));
    }
    if evicted.unwrap_or(0) == 0 {
        bad.push(format!("evicted {}, want > 0", summary["evicted"]));
    }
    if !matches!(in_use, Some(u) if u <= HOLD_MAX_TRACKED) {
        bad.push(format!("ports_in_use {}, want ≤ {HOLD_MAX_TRACKED} (--max-tracked)", summary["ports_in_use"]));
    }
    if let Some(v) = twice.first() {
        let shown: Vec<String> = v.iter().map(ToString::to_string).collect();
        bad.push(format!(
            "{} sockets have more than one alloc record, e.g.:\n      {}",
            twice.len(),
            shown.join("\n      ")
        ));
    }
    if lost == 0 {
        if alloc != total {
            bad.push(format!("{alloc} allocs, nothing lost: want {total}"));
        }
        if let (Some(e), Some(u)) = (evicted, in_use) {
            if e + u != total {
                bad.push(format!("evicted {e} + ports_in_use {u} = {}, want {total}", e + u));
            }
        }
    }
    if memory.peak_kib() >= RSS_BOUND_KIB {
        bad.push(format!("peak resident memory {} ≥ the bound {}", mib(memory.peak_kib()), mib(RSS_BOUND_KIB)));
    }
    if !workload_exit.is_some_and(|s| s.success()) {
        bad.push(format!("the workload ended with {workload_exit:?} after its release"));
    }
    assert!(
        bad.is_empty(),
        "20 000 held sockets, --max-tracked 4096:\n  {}\nstderr:\n{}",
        bad.join("\n  "),
        out.stderr
    );
}

// ---------------------------------------------------------------------------
// 5. The output file.

/// A fresh private directory (0700), removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "port-trace-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        ));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `watch -d 1s --netns NS -o FILE` (no `--format`: a file is not a
/// terminal, so JSON) plus `more`, killed after 20 s.
fn watch_to(ns: &NetNs, file: &Path, more: &[&str]) -> std::process::Output {
    output_with_timeout(
        Command::new(tracer_bin())
            .args(["watch", "-d", "1s", "--netns"])
            .arg(ns.path())
            .arg("-o")
            .arg(file)
            .args(more)
            .args(tracer_extra_args()),
        Duration::from_secs(20),
    )
    .unwrap()
}

/// `-o FILE`: a new file is created with mode 0600 (by `lstat`: a regular
/// file, owned by us), holds the run (the header first, the summary last),
/// and nothing goes to stdout. An existing file is refused without
/// `--force`: exit 2, one stderr line that mentions `--force`, the file
/// unchanged. A symlink at the path is refused, with and without
/// `--force`, whether its target exists or not: non-zero exit, the link
/// and its target unchanged, no dangling target created.
#[test]
fn output_file_is_private_and_never_clobbered_or_followed() {
    if !require_root("output_file_is_private_and_never_clobbered_or_followed") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let dir = TempDir::new("output");
    let mut bad = Vec::new();

    // A new file.
    let file = dir.0.join("trace.jsonl");
    let out = watch_to(&ns, &file, &[]);
    let ctx = |out: &std::process::Output| {
        format!("exit {}; stdout {:?}; stderr {:?}", out.status, text(&out.stdout), text(&out.stderr))
    };
    match std::fs::symlink_metadata(&file) {
        Err(e) => bad.push(format!("new file: not created ({e}); {}", ctx(&out))),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if !m.file_type().is_file() || mode != 0o600 || m.uid() != 0 {
                bad.push(format!(
                    "new file: {:?}, mode {mode:o}, uid {}; want a regular file, 0600, uid 0",
                    m.file_type(),
                    m.uid()
                ));
            }
            let content = std::fs::read_to_string(&file).unwrap_or_default();
            let recs: Vec<Value> = content.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            if recs.first().map(|r| &r["type"]) != Some(&Value::from("header"))
                || recs.last().map(|r| &r["type"]) != Some(&Value::from("summary"))
                || recs.len() != content.lines().count()
            {
                bad.push(format!("new file: want JSON Lines from the header to the summary, got:\n{content}"));
            }
        }
    }
    if !out.status.success() || !out.stdout.is_empty() {
        bad.push(format!("new file: want exit 0 and nothing on stdout; {}", ctx(&out)));
    }

    // An existing file, without --force.
    let existing = dir.0.join("existing.jsonl");
    let precious = "precious data, not a trace\n";
    std::fs::write(&existing, precious).unwrap();
    let t0 = Instant::now();
    let out = watch_to(&ns, &existing, &[]);
    let took = t0.elapsed();
    let stderr = text(&out.stderr);
    if out.status.code() != Some(2) || lines(&stderr).len() != 1 || !stderr.contains("--force") {
        bad.push(format!("existing file: want exit 2 and one stderr line mentioning --force; {}", ctx(&out)));
    }
    if std::fs::read_to_string(&existing).ok().as_deref() != Some(precious) {
        bad.push(format!("existing file: changed to {:?}", std::fs::read_to_string(&existing)));
    }
    if took > Duration::from_secs(5) {
        bad.push(format!("existing file: the refusal took {took:?} (did it start tracing?)"));
    }

    // Symlinks: to an existing file, and dangling.
    let target = dir.0.join("target.txt");
    let target_text = "the symlink's target\n";
    std::fs::write(&target, target_text).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = dir.0.join("link.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let missing = dir.0.join("not-there.txt");
    let dangling = dir.0.join("dangling.jsonl");
    std::os::unix::fs::symlink(&missing, &dangling).unwrap();
    for (path, to) in [(&link, &target), (&dangling, &missing)] {
        for more in [&["--force"][..], &[]] {
            let what = format!("symlink {} -> {} {}", path.display(), to.display(), more.join(" "));
            let out = watch_to(&ns, path, more);
            if out.status.success() {
                bad.push(format!("{what}: accepted; {}", ctx(&out)));
            }
            if std::fs::read_link(path).ok().as_deref() != Some(to.as_path()) {
                bad.push(format!("{what}: the link is no longer a link to its target"));
            }
            if text(&out.stderr).contains("panicked") {
                bad.push(format!("{what}: panicked; {}", ctx(&out)));
            }
        }
    }
    let t = std::fs::metadata(&target).unwrap();
    if std::fs::read_to_string(&target).ok().as_deref() != Some(target_text) || t.permissions().mode() & 0o7777 != 0o644
    {
        bad.push(format!(
            "the symlink's target was changed: {:?}, mode {:o}",
            std::fs::read_to_string(&target),
            t.permissions().mode() & 0o7777
        ));
    }
    if std::fs::symlink_metadata(&missing).is_ok() {
        bad.push(format!("the dangling symlink's target {} was created", missing.display()));
    }
    assert!(bad.is_empty(), "--output:\n  {}", bad.join("\n  "));
}

// ---------------------------------------------------------------------------
// 6. --duration.

/// `watch --duration D` for 1 s and 3 s (the two at once, on one
/// namespace): exit 0, the summary as the last record (its counts agreeing
/// with the records), and the run ends on time by our clock: at least D
/// after the spawn, at most D + 2 s after the header (which the tracer
/// prints once attached, just before its clock starts); the summary's
/// `duration_s` is at least D and at most what we measured from the spawn.
#[test]
fn duration_ends_on_time() {
    if !require_root("duration_ends_on_time") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let run = |secs: u64| -> Option<String> {
        let d = Duration::from_secs(secs);
        let tracer =
            Tracer::start(&tracer_bin(), &watch_json_args(&ns, &["-d", &format!("{secs}s")]), HEADER_TIMEOUT).unwrap();
        let header_at = Instant::now();
        let out = tracer.wait(d + Duration::from_secs(10)).unwrap();
        let after_header = header_at.elapsed();
        let mut bad = out.exit_problems();
        bad.extend(check::check_summary(&out.records));
        if out.ran_for < d {
            bad.push(format!("ended {:?} after the spawn, before {d:?}", out.ran_for));
        }
        if after_header > d + Duration::from_secs(2) {
            bad.push(format!("ended {after_header:?} after the header, want ≤ {:?}", d + Duration::from_secs(2)));
        }
        let duration_s = out.records.last().and_then(|r| r["duration_s"].as_f64());
        if !duration_s.is_some_and(|s| s >= d.as_secs_f64() && s <= out.ran_for.as_secs_f64()) {
            bad.push(format!("summary duration_s {duration_s:?}, want {secs}..={:.3}", out.ran_for.as_secs_f64()));
        }
        eprintln!(
            "-d {secs}s: ended {:.3?} after the spawn, {after_header:.3?} after the header; duration_s {duration_s:?}",
            out.ran_for
        );
        (!bad.is_empty())
            .then(|| format!("-d {secs}s:\n  {}\n  stdout:\n{}  stderr: {}", bad.join("\n  "), out.dump(), out.stderr))
    };
    let rows: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = [1, 3].into_iter().map(|secs| s.spawn(move || run(secs))).collect();
        runs.into_iter().filter_map(|r| r.join().expect("a --duration run panicked")).collect()
    });
    assert!(rows.is_empty(), "--duration:\n{}", rows.join("\n"));
}

/// `--duration 3s` also ends on time while the traced namespace is busy:
/// `port-churn cycle` churns UDP ports (for up to 10 s) from right after the
/// header. The run must end within 3 s + 2 s of the header, exit 0, with a
/// summary as the last line, although events keep coming. (If it does not,
/// the churn is stopped then and the tracer given 20 s more, to say when
/// it did end.)
#[test]
fn duration_ends_on_time_under_a_flood_of_events() {
    if !require_root("duration_ends_on_time_under_a_flood_of_events") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let d = Duration::from_secs(3);
    let bound = d + Duration::from_secs(2);
    let mut tracer = CountedTracer::start(&watch_json_args(&ns, &["-d", "3s"]));
    let header_at = Instant::now();
    let mut churn = ns
        .command(CHURN)
        .args(["cycle", "100000000", "10"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let on_time = wait_timeout(&mut tracer.child, bound.saturating_sub(header_at.elapsed())).is_some();
    let ended_by_then = header_at.elapsed();
    let churn_running = churn.try_wait().unwrap().is_none();
    let _ = churn.kill();
    let _ = churn.wait();
    let (status, tally, stderr) = tracer.wait(Duration::from_secs(20));
    // When late, it ended after the churn was stopped.
    let after_header = if on_time { ended_by_then } else { header_at.elapsed() };
    let summary: Value = tally.last.as_deref().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    eprintln!(
        "-d 3s under a flood: ended {after_header:.2?} after the header (exited within {bound:?}: {on_time}; churn \
         still running then: {churn_running}); {} lines {:?}; summary: {summary}",
        tally.lines, tally.by_type
    );
    let mut bad = Vec::new();
    if !churn_running {
        bad.push("premise: the churn had ended before the tracer (no flood at the end)".to_owned());
    }
    if !on_time || after_header > bound {
        bad.push(format!("ended {after_header:.2?} after the header, want ≤ {bound:?}"));
    }
    if !status.is_some_and(|s| s.success()) {
        bad.push(format!("exit {status:?}, want 0"));
    }
    if summary["type"] != "summary" {
        bad.push(format!("the last line is not a summary: {:?}", tally.last));
    }
    assert!(
        bad.is_empty(),
        "--duration 3s with events flooding in:\n  {}\nsummary: {summary}\nstderr:\n{stderr}",
        bad.join("\n  ")
    );
}
