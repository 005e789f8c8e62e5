//! `cargo xtask bench`: port-trace side by side with its peers, on the same
//! workloads, in a private network namespace (`ip netns add pt-bench-<pid>`).
//!
//! Workloads, each for a fixed time per round (10 s; `--quick`: 2 s):
//!
//! - `wrk`: nginx (one worker, `127.0.0.1:8080`, a tiny static body, no
//!   access log) driven by `wrk -H 'Connection: close'`, a new connection per
//!   request, from inside the namespace;
//! - `storm-tcp`, `storm-udp`: `port-storm` (tests/src/bin/port-storm.rs), a
//!   connect storm that counts its own successes.
//!
//! Configurations, alternated within each round: untraced; `port-trace
//! watch --format json --netns /run/netns/<ns>` to a file (release build);
//! with `--baseline BIN`, the same `watch` with another build (an earlier
//! commit: before and after in one run); `watch` with two options undone
//! (`--ring-wakeup-bytes 0 --all-states`: a reader wake-up per event, every
//! TCP state change of the sockets it follows sent up), to measure what
//! batching and state filtering buy; `port-trace record`; `watch` stalled
//! (`port-trace stalled`, and `baseline stalled` with `--baseline`): its
//! reader stopped (SIGSTOP) for the whole load and resumed after it, with a
//! 1 GiB ring buffer (256 MiB with `--quick`, quicker to set up) that holds
//! what the programs write meanwhile, to
//! measure the programs alone and what a reader that falls behind costs
//! the traced host;
//! libbpf-tools `tcplife` (under `stdbuf -oL`) to a file; a bpftrace
//! one-liner on `tracepoint:sock:inet_sock_set_state`, one line per event,
//! to a file.
//! Peers that cannot be installed are reported as skipped, with the reason.
//!
//! Each traced run is two loads under one tracer: the measured load, with
//! `kernel.bpf_stats_enabled=0` as on production hosts (the accounting costs
//! every program run two clock reads), then a short cost load (1 s; 3 s
//! without `--quick`) with the sysctl at 1, for the BPF figures.
//!
//! Per workload and configuration, medians over rounds: throughput (the
//! measured load) and its ratio to untraced; events delivered against
//! connections made over both loads (port-trace: `alloc` records; tcplife
//! and bpftrace: output lines); lost events (port-trace's summary); tracer
//! CPU per event (utime + stime of the tracer process over both loads); peak
//! RSS (`VmHWM`); BPF cost per connection of the cost load (`run_time_ns` of
//! the programs the tracer holds, found through `/proc/<pid>/fdinfo`; the
//! sysctl is restored on exit).
//! A table on stdout, JSON in `target/bench/results.json` (or `--out`).
//!
//! Everything started is stopped and the namespace deleted on every exit
//! path: by `Drop` on errors, and by a watchdog shell in its own process
//! group when xtask itself dies (Ctrl-C, kill).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use crate::{build, setup, util};

/// Options of `cargo xtask bench`.
#[derive(Args)]
pub struct Options {
    /// Short rounds (2 s) and, unless `--rounds` says otherwise, one round: under 2 minutes.
    #[arg(long)]
    quick: bool,
    /// Rounds per configuration (medians are taken over them); default 3, `--quick` 1.
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,
    /// Where to write the JSON results; default `target/bench/results.json`.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Also run `watch --format json` with this other port-trace binary (a
    /// build of an earlier commit), in the same rounds: before and after
    /// measured side by side, as "port-trace baseline".
    #[arg(long, value_name = "BIN")]
    baseline: Option<PathBuf>,
}

/// The nginx port inside the namespace.
const NGINX_PORT: u16 = 8080;
/// wrk connections (one thread; the machine may have two cores only).
const WRK_CONNECTIONS: u32 = 8;
/// The sysctl that makes the kernel account BPF program run time.
const BPF_STATS: &str = "kernel.bpf_stats_enabled";
/// Mounts tracefs (and debugfs, where older tools look) when missing, then execs `"$@"`.
const MOUNT_TRACEFS: &str =
    "mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing || exit 1; \
     mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug; exec \"$@\"";
/// What the table's columns mean, printed under it.
const LEGEND: [&str; 6] = [
    "RATIO: throughput / untraced throughput (medians over rounds).",
    "stalled: watch with its reader stopped (SIGSTOP) through the load, a 1 GiB ring (256 MiB with --quick); CPU counted while it \
     catches up afterwards.",
    "EVENTS/CONNECTIONS: over the measured load and the cost load; port-trace: `alloc` records (snapshot \
     ones excluded); tcplife: lines (one per session, both ends of a loopback connection); bpftrace: lines \
     (one per TCP state change).",
    "CPU ns/ev: tracer utime + stime over both loads / records it wrote (port-trace: every record, \
     alloc, state, release...; peers: lines); CPU ns/conn: the same / CONNECTIONS. User space only: BPF \
     runs in the workload.",
    "PEAK RSS: the tracer's VmHWM.",
    "BPF ns/conn: run_time_ns of the tracer's programs (with port-trace's own TIME_WAIT walks) / connections \
     over the cost load, the only one with kernel.bpf_stats_enabled=1.",
];
/// The bpftrace one-liner: one line per TCP state change.
const BPFTRACE_PROGRAM: &str =
    "tracepoint:sock:inet_sock_set_state { printf(\"%s %d %d %d\\n\", comm, args->sport, args->dport, args->newstate); }";

/// A workload: what generates the connections.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Wrk,
    StormTcp,
    StormUdp,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Wrk, Workload::StormTcp, Workload::StormUdp];

    fn name(self) -> &'static str {
        match self {
            Workload::Wrk => "wrk",
            Workload::StormTcp => "storm-tcp",
            Workload::StormUdp => "storm-udp",
        }
    }

    /// The unit of its throughput.
    fn unit(self) -> &'static str {
        match self {
            Workload::Wrk => "req/s",
            Workload::StormTcp | Workload::StormUdp => "conn/s",
        }
    }
}

/// A tracer configuration.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Untraced,
    PortTrace,
    /// `watch` with the binary given by `--baseline`.
    PortTraceBaseline,
    /// `watch` as before the cost work: a wake-up per event and every TCP
    /// state change sent up (`--ring-wakeup-bytes 0 --all-states`).
    PortTraceUnbatched,
    PortTraceRecord,
    /// `watch` whose reader is stopped (SIGSTOP) for the whole load, with a
    /// 1 GiB ring buffer that holds what the programs write meanwhile: the
    /// cost of the programs alone, and of a reader that falls behind.
    PortTraceStalled,
    /// The same with the binary given by `--baseline`.
    PortTraceBaselineStalled,
    Tcplife,
    Bpftrace,
}

impl Config {
    const ALL: [Config; 9] = [
        Config::Untraced,
        Config::PortTrace,
        Config::PortTraceBaseline,
        Config::PortTraceUnbatched,
        Config::PortTraceRecord,
        Config::PortTraceStalled,
        Config::PortTraceBaselineStalled,
        Config::Tcplife,
        Config::Bpftrace,
    ];

    /// One of port-trace's own configurations.
    fn is_port_trace(self) -> bool {
        matches!(
            self,
            Config::PortTrace
                | Config::PortTraceBaseline
                | Config::PortTraceUnbatched
                | Config::PortTraceRecord
                | Config::PortTraceStalled
                | Config::PortTraceBaselineStalled
        )
    }

    /// Runs the `--baseline` binary.
    fn is_baseline(self) -> bool {
        matches!(self, Config::PortTraceBaseline | Config::PortTraceBaselineStalled)
    }

    /// Its reader is stopped for the load.
    fn is_stalled(self) -> bool {
        matches!(self, Config::PortTraceStalled | Config::PortTraceBaselineStalled)
    }

    fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::PortTrace => "port-trace watch",
            Config::PortTraceBaseline => "port-trace baseline",
            Config::PortTraceUnbatched => "port-trace unbatched",
            Config::PortTraceRecord => "port-trace record",
            Config::PortTraceStalled => "port-trace stalled",
            Config::PortTraceBaselineStalled => "baseline stalled",
            Config::Tcplife => "tcplife",
            Config::Bpftrace => "bpftrace",
        }
    }
}

/// What one run (one workload under one configuration, one round) measured.
#[derive(Default, Clone)]
struct Sample {
    /// Requests/s (wrk) or connections/s (port-storm).
    throughput: f64,
    /// Connections the generator made (wrk: requests, each on its own connection).
    connections: f64,
    /// Generator errors (wrk socket errors and non-2xx responses; port-storm errors).
    errors: f64,
    /// Events the tracer delivered (port-trace: `alloc` records; peers: output lines).
    events: Option<f64>,
    /// Records the tracer wrote (port-trace: every line but the header and
    /// the summary; peers: their lines, as `events`).
    records: Option<f64>,
    /// Events the tracer says it lost (port-trace's summary `lost`).
    lost: Option<f64>,
    /// Tracer CPU (utime + stime) over the workload, ns.
    tracer_cpu_ns: Option<f64>,
    /// The tracer's peak RSS, KiB.
    peak_rss_kib: Option<f64>,
    /// BPF run time of the tracer's programs over the cost load, per program name: (ns, runs).
    bpf: Option<BTreeMap<String, (f64, f64)>>,
    /// Connections the cost load made.
    bpf_connections: f64,
}

impl Sample {
    fn cpu_per_event(&self) -> Option<f64> {
        match (self.tracer_cpu_ns, self.records) {
            (Some(cpu), Some(records)) if records > 0.0 => Some(cpu / records),
            _ => None,
        }
    }

    fn cpu_per_connection(&self) -> Option<f64> {
        self.tracer_cpu_ns.filter(|_| self.connections > 0.0).map(|cpu| cpu / self.connections)
    }

    fn bpf_total_ns(&self) -> Option<f64> {
        self.bpf.as_ref().map(|progs| progs.values().map(|(ns, _)| ns).sum())
    }

    fn bpf_ns_per_connection(&self) -> Option<f64> {
        self.bpf_total_ns().filter(|_| self.bpf_connections > 0.0).map(|ns| ns / self.bpf_connections)
    }
}

/// Runs the benchmark.
pub fn run(options: &Options) -> Result<()> {
    if !util::is_root()? {
        bail!("bench loads BPF programs and creates a network namespace: run it as root");
    }
    let started = Instant::now();
    // `--quick` aims at under 2 minutes: 18 traced runs, each with its
    // tracer's start-up, two loads and a drain.
    let seconds: u64 = if options.quick { 2 } else { 10 };
    // The cost load after each measured one: per-run averages over tens of
    // thousands of program runs settle within a second.
    let cost_seconds: u64 = if options.quick { 1 } else { 3 };
    let rounds = options.rounds.unwrap_or(if options.quick { 1 } else { 3 }).max(1);
    let out = options.out.clone().unwrap_or_else(|| util::workspace_root().join("target/bench/results.json"));

    setup::run()?;
    let port_trace = build::build(true)?;
    let mut cmd = util::cargo()?;
    cmd.args(["build", "-p", "port-trace-integration", "--release", "--bin", "port-storm"]);
    util::run(&mut cmd)?;
    let storm = util::workspace_root().join("target/release/port-storm");

    // What is there, what could be installed, what is skipped and why.
    let mut skipped: BTreeMap<String, String> = BTreeMap::new();
    let mut notes: Vec<String> = Vec::new();
    let nginx = ensure_tool(&["nginx"], "nginx", &mut notes);
    let wrk = ensure_tool(&["wrk"], "wrk", &mut notes);
    let tcplife = ensure_tool(&["tcplife", "/usr/sbin/tcplife"], "libbpf-tools", &mut notes);
    let bpftrace = ensure_tool(&["bpftrace"], "bpftrace", &mut notes);
    let bpftool = ensure_tool(&["bpftool"], "bpftool", &mut notes);
    let mut workloads = Vec::new();
    for workload in Workload::ALL {
        if workload == Workload::Wrk {
            match (&nginx, &wrk) {
                (Err(e), _) | (_, Err(e)) => {
                    skipped.insert(format!("workload {}", workload.name()), e.clone());
                    continue;
                }
                _ => {}
            }
        }
        workloads.push(workload);
    }
    let mut configs = Vec::new();
    for config in Config::ALL {
        let unavailable = match config {
            Config::Tcplife => tcplife.as_ref().err().cloned(),
            Config::Bpftrace => bpftrace.as_ref().err().cloned(),
            Config::Untraced
            | Config::PortTrace
            | Config::PortTraceUnbatched
            | Config::PortTraceRecord
            | Config::PortTraceStalled => None,
            // Not asked for: not a configuration of this run at all.
            Config::PortTraceBaseline | Config::PortTraceBaselineStalled if options.baseline.is_none() => continue,
            Config::PortTraceBaseline | Config::PortTraceBaselineStalled => {
                let bin = options.baseline.as_deref().unwrap_or(Path::new(""));
                (!bin.is_file()).then(|| format!("--baseline {}: no such file", bin.display()))
            }
        };
        match unavailable {
            Some(reason) => {
                skipped.insert(config.name().to_owned(), reason);
            }
            None => configs.push(config),
        }
    }
    if let Err(e) = &bpftool {
        notes.push(format!("BPF cost not measured: {e}"));
    }

    let mut env = BenchEnv::new(if options.quick { QUICK_STALLED_RING_KIB } else { STALLED_RING_KIB })?;
    if bpftool.is_ok() {
        // Saved for the restore; on only for the cost loads (see `run_one`).
        env.save_bpf_stats()?;
    }
    if workloads.contains(&Workload::Wrk) {
        env.start_nginx(nginx.as_deref().unwrap_or("nginx"))?;
    }

    let mut samples: BTreeMap<(Workload, Config), Vec<Sample>> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    for round in 1..=rounds {
        for &workload in &workloads {
            // Rotate the order from round to round, so that no configuration
            // always runs right after another (TIME_WAIT left by wrk, caches).
            let start = (round as usize - 1) % configs.len();
            for &config in configs[start..].iter().chain(&configs[..start]) {
                eprintln!("bench: round {round}/{rounds}: {} under {}", workload.name(), config.name());
                let tracer_bin = tracer_binary(config, &port_trace, options, &tcplife, &bpftrace);
                let generator =
                    Generator { workload, seconds, wrk: wrk.as_deref().unwrap_or("wrk"), storm: &storm, ns: &env.ns };
                let cost_seconds = bpftool.is_ok().then_some(cost_seconds);
                match run_one(&env, config, &tracer_bin, &generator, cost_seconds, round) {
                    Ok(sample) => samples.entry((workload, config)).or_default().push(sample),
                    Err(e) => {
                        let msg = format!("round {round}: {} under {}: {e:#}", workload.name(), config.name());
                        eprintln!("bench: failed: {msg}");
                        failures.push(msg);
                    }
                }
            }
        }
    }
    drop(env);

    let shown: Vec<Config> =
        Config::ALL.into_iter().filter(|&c| !c.is_baseline() || options.baseline.is_some()).collect();
    let table = render_table(&workloads, &shown, &samples, &skipped);
    println!("{table}");
    for line in LEGEND {
        println!("{line}");
    }
    for (what, why) in &skipped {
        println!("skipped: {what}: {why}");
    }
    for note in &notes {
        println!("note: {note}");
    }
    for failure in &failures {
        println!("failed: {failure}");
    }
    let json = results_json(seconds, cost_seconds, rounds, &workloads, &samples, &skipped, &notes, &failures);
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(&out, json.render() + "\n").with_context(|| format!("cannot write {}", out.display()))?;
    println!("results: {} ({:.0} s)", out.display(), started.elapsed().as_secs_f64());
    if samples.is_empty() {
        bail!("no run succeeded");
    }
    Ok(())
}

/// The program a configuration runs (empty for untraced).
fn tracer_binary(
    config: Config,
    port_trace: &Path,
    options: &Options,
    tcplife: &Result<String, String>,
    bpftrace: &Result<String, String>,
) -> String {
    match config {
        Config::PortTrace | Config::PortTraceUnbatched | Config::PortTraceRecord | Config::PortTraceStalled => {
            port_trace.to_string_lossy().into_owned()
        }
        Config::PortTraceBaseline | Config::PortTraceBaselineStalled => {
            options.baseline.as_deref().unwrap_or(Path::new("")).to_string_lossy().into_owned()
        }
        Config::Tcplife => tcplife.clone().unwrap_or_default(),
        Config::Bpftrace => bpftrace.clone().unwrap_or_default(),
        Config::Untraced => String::new(),
    }
}

/// Finds a tool (a name on `PATH` or an absolute path); when missing,
/// installs its Debian package with apt-get (noted). `Err` is the reason to skip.
fn ensure_tool(candidates: &[&str], package: &str, notes: &mut Vec<String>) -> Result<String, String> {
    let find = || candidates.iter().find_map(|c| which(c));
    if let Some(path) = find() {
        return Ok(path);
    }
    eprintln!("bench: {} missing; installing the Debian package `{package}`", candidates[0]);
    let apt_get = |args: &[&str]| {
        Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").stdout(Stdio::null()).status()
    };
    let install = ["install", "-y", "--no-install-recommends", package];
    // A stale package index names versions the mirror no longer has (404):
    // refresh it once and try again.
    let status = match apt_get(&install) {
        Ok(s) if !s.success() => apt_get(&["update"]).and_then(|_| apt_get(&install)),
        other => other,
    };
    match status {
        Ok(s) if s.success() => match find() {
            Some(path) => {
                notes.push(format!("installed the Debian package `{package}` with apt-get"));
                Ok(path)
            }
            None => Err(format!("package `{package}` installed but `{}` is still missing", candidates[0])),
        },
        Ok(s) => Err(format!("`{}` missing and `apt-get install {package}` failed ({s})", candidates[0])),
        Err(e) => Err(format!("`{}` missing and apt-get cannot run: {e}", candidates[0])),
    }
}

/// The path of `name` if it is executable (absolute) or found on `PATH`.
fn which(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return Path::new(name).is_file().then(|| name.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()).map(|p| p.to_string_lossy().into())
}

/// The namespace, the temp dir, nginx, the sysctl: all undone on drop.
struct BenchEnv {
    ns: String,
    dir: PathBuf,
    nginx: Option<Child>,
    bpf_stats_old: Option<String>,
    watchdog: Option<Child>,
    /// `--ring-buffer-kib` of the stalled configurations.
    stalled_ring_kib: &'static str,
}

impl BenchEnv {
    /// Creates the namespace (with `lo` up), the temp dir and the watchdog;
    /// the stalled configurations will get a ring of `stalled_ring_kib`.
    fn new(stalled_ring_kib: &'static str) -> Result<BenchEnv> {
        let pid = std::process::id();
        let ns = format!("pt-bench-{pid}");
        let dir = std::env::temp_dir().join(format!("pt-bench-{pid}"));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let bpf_stats_old = util::output(Command::new("sysctl").args(["-n", BPF_STATS])).ok();
        let mut env = BenchEnv { ns, dir, nginx: None, bpf_stats_old: None, watchdog: None, stalled_ring_kib };
        env.spawn_watchdog(pid, bpf_stats_old.as_deref().map(str::trim))?;
        util::run(Command::new("ip").args(["netns", "add", &env.ns]))?;
        util::run(Command::new("ip").args(["netns", "exec", &env.ns, "ip", "link", "set", "lo", "up"]))?;
        Ok(env)
    }

    /// A shell in its own process group (so a terminal Ctrl-C spares it) that
    /// waits for xtask to die and then undoes what `Drop` would have.
    fn spawn_watchdog(&mut self, parent: u32, bpf_stats_old: Option<&str>) -> Result<()> {
        use std::os::unix::process::CommandExt as _;
        let restore = bpf_stats_old.map(|v| format!("sysctl -qw {BPF_STATS}={v};")).unwrap_or_default();
        let script = format!(
            "trap '' INT TERM HUP; while kill -0 {parent} 2>/dev/null; do sleep 1; done; \
             [ -f {dir}/pids ] && kill $(cat {dir}/pids) 2>/dev/null; sleep 1; \
             ip netns delete {ns} 2>/dev/null; {restore} rm -rf {dir}",
            dir = self.dir.display(),
            ns = self.ns,
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("cannot start the cleanup watchdog")?;
        self.watchdog = Some(child);
        Ok(())
    }

    /// Remembers a long-lived child's pid for the watchdog.
    fn track(&self, pid: u32) {
        let path = self.dir.join("pids");
        let mut pids = fs::read_to_string(&path).unwrap_or_default();
        let _ = writeln!(pids, "{pid}");
        let _ = fs::write(path, pids);
    }

    /// Remembers `kernel.bpf_stats_enabled` to restore it on drop.
    fn save_bpf_stats(&mut self) -> Result<()> {
        let old = util::output(Command::new("sysctl").args(["-n", BPF_STATS]))?.trim().to_owned();
        self.bpf_stats_old = Some(old);
        Ok(())
    }

    /// Starts nginx in the namespace with a config of our own and waits for its port.
    fn start_nginx(&mut self, nginx: &str) -> Result<()> {
        let dir = self.dir.join("nginx");
        fs::create_dir_all(&dir)?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             server {{\n    listen 127.0.0.1:{NGINX_PORT};\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, nginx, "-e"])
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null());
        eprintln!("$ {}", util::display(&cmd));
        let child = cmd.spawn().context("cannot start nginx")?;
        self.track(child.id());
        self.nginx = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ss = util::output(Command::new("ip").args([
                "netns",
                "exec",
                &self.ns,
                "ss",
                "-Hltn",
                &format!("sport = :{NGINX_PORT}"),
            ]))?;
            if !ss.trim().is_empty() {
                return Ok(());
            }
            if let Some(status) = self.nginx.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited ({status}): {}", log.trim());
            }
            if Instant::now() > deadline {
                bail!("nginx does not listen on 127.0.0.1:{NGINX_PORT} after 10 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        if let Some(mut nginx) = self.nginx.take() {
            stop(&mut nginx, "-QUIT", Duration::from_secs(5));
        }
        if let Err(e) = util::output(Command::new("ip").args(["netns", "delete", &self.ns])) {
            eprintln!("bench: cannot delete the namespace {}: {e:#}", self.ns);
        }
        if let Some(old) = self.bpf_stats_old.take() {
            if let Err(e) = util::output(Command::new("sysctl").args(["-qw", &format!("{BPF_STATS}={old}")])) {
                eprintln!("bench: cannot restore {BPF_STATS}={old}: {e:#}");
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

/// Sends `signal` (e.g. `-INT`), waits up to `grace`, then kills.
fn stop(child: &mut Child, signal: &str, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    send(child.id(), signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `sig` (`-INT`, `-STOP`, `-CONT`, ...) to `pid` with kill(1).
fn send(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// Waits until `file` has stopped growing for half a second (a resumed
/// reader has worked through its backlog), at most `limit`.
fn wait_quiet(file: &Path, limit: Duration) {
    let started = Instant::now();
    let mut last = (u64::MAX, Instant::now());
    while started.elapsed() < limit {
        let len = fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if len != last.0 {
            last = (len, Instant::now());
        } else if last.1.elapsed() >= Duration::from_millis(500) {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The stalled configurations' ring buffer: room for what the programs
/// write during a 10 s round of the UDP storm and its cost load (about
/// 400 MB).
const STALLED_RING_KIB: &str = "1048576";

/// The same for `--quick`'s 2 s rounds (about 110 MB): a 1 GiB ring takes
/// 4-6 s to set up, three times a run.
const QUICK_STALLED_RING_KIB: &str = "262144";

/// A running tracer, killed on drop.
struct Tracer {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    stdout: PathBuf,
}

impl Drop for Tracer {
    /// Kills the tracer and deletes its files, read by then: a 3-round run
    /// writes some 40 GB of JSON otherwise (a 10 s UDP storm run, 1.4 GB).
    fn drop(&mut self) {
        stop(&mut self.child, "-KILL", Duration::from_secs(1));
        for file in [&self.out, &self.err, &self.stdout] {
            let _ = fs::remove_file(file);
        }
    }
}

impl Tracer {
    /// Starts `config`'s tracer with its output in `dir`; waits until it holds its BPF programs.
    fn start(env: &BenchEnv, config: Config, bin: &str, tag: &str) -> Result<Tracer> {
        let tag = format!("{tag}-{}", config.name().replace(' ', "-"));
        let out = env.dir.join(format!("{tag}.out"));
        let err = env.dir.join(format!("{tag}.err"));
        let netns = format!("/run/netns/{}", env.ns);
        let mut cmd = match config {
            Config::PortTrace | Config::PortTraceBaseline => {
                let mut cmd = Command::new(bin);
                cmd.args(["watch", "--format", "json", "--netns", &netns, "--force", "--output"]).arg(&out);
                cmd
            }
            Config::PortTraceStalled | Config::PortTraceBaselineStalled => {
                let mut cmd = Command::new(bin);
                cmd.args(["watch", "--format", "json", "--netns", &netns, "--ring-buffer-kib", env.stalled_ring_kib]);
                cmd.args(["--force", "--output"]).arg(&out);
                cmd
            }
            Config::PortTraceUnbatched => {
                let mut cmd = Command::new(bin);
                cmd.args(["watch", "--format", "json", "--netns", &netns, "--ring-wakeup-bytes", "0", "--all-states"]);
                cmd.args(["--force", "--output"]).arg(&out);
                cmd
            }
            Config::PortTraceRecord => {
                let mut cmd = Command::new(bin);
                cmd.args(["record", "--netns", &netns, "--force", "--output"]).arg(&out);
                cmd
            }
            Config::Tcplife => with_tracefs(&["stdbuf", "-oL", bin]),
            Config::Bpftrace => with_tracefs(&[bin, "-B", "line", "-e", BPFTRACE_PROGRAM]),
            Config::Untraced => bail!("{} has no tracer", config.name()),
        };
        let stdout = if config.is_port_trace() { env.dir.join(format!("{tag}.stdout")) } else { out.clone() };
        cmd.stdin(Stdio::null()).stdout(fs::File::create(&stdout)?).stderr(fs::File::create(&err)?);
        eprintln!("$ {}", util::display(&cmd));
        let child = cmd.spawn().with_context(|| format!("cannot start `{}`", util::display(&cmd)))?;
        env.track(child.id());
        let mut tracer = Tracer { child, out, err, stdout };
        tracer.wait_ready(config)?;
        Ok(tracer)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the tracer holds BPF programs and their number has been
    /// stable for half a second (and, for port-trace, its header is out).
    fn wait_ready(&mut self, config: Config) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = (0usize, Instant::now());
        loop {
            if let Some(status) = self.child.try_wait()? {
                let err = fs::read_to_string(&self.err).unwrap_or_default();
                bail!("tracer exited during startup ({status}): {}", err.trim());
            }
            let progs = prog_ids(self.pid()).len();
            if progs != last.0 {
                last = (progs, Instant::now());
            }
            let header = !config.is_port_trace() || fs::metadata(&self.out).map(|m| m.len() > 0).unwrap_or(false);
            if progs > 0 && header && last.1.elapsed() > Duration::from_millis(500) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("tracer not ready after 30 s ({progs} BPF programs held)");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `argv` in a private mount namespace of its own where tracefs (and
/// debugfs) are mounted when the host has not: the peers attach to
/// tracepoints through tracefs, and the host's mounts are left alone.
/// `unshare` and `sh` exec, so the pid is the tracer's.
fn with_tracefs(argv: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", MOUNT_TRACEFS, "sh"]).args(argv);
    cmd
}

/// What drives the load.
#[derive(Clone, Copy)]
struct Generator<'a> {
    workload: Workload,
    seconds: u64,
    wrk: &'a str,
    storm: &'a Path,
    ns: &'a str,
}

/// Throughput, connections, errors.
struct Load {
    throughput: f64,
    connections: f64,
    errors: f64,
}

impl Generator<'_> {
    fn run(&self) -> Result<Load> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns]);
        match self.workload {
            Workload::Wrk => {
                cmd.args([
                    self.wrk,
                    "-t1",
                    &format!("-c{WRK_CONNECTIONS}"),
                    &format!("-d{}s", self.seconds),
                    "-H",
                    "Connection: close",
                    &format!("http://127.0.0.1:{NGINX_PORT}/"),
                ]);
                let text = util::output(&mut cmd)?;
                parse_wrk(&text)
            }
            Workload::StormTcp | Workload::StormUdp => {
                let mode = if self.workload == Workload::StormTcp { "tcp" } else { "udp" };
                cmd.arg(self.storm).args([mode, &self.seconds.to_string()]);
                let text = util::output(&mut cmd)?;
                let json = Json::parse(text.trim()).context("port-storm output is not JSON")?;
                let field =
                    |k: &str| json.get(k).and_then(Json::as_f64).with_context(|| format!("port-storm: no `{k}`"));
                Ok(Load { throughput: field("per_s")?, connections: field("ops")?, errors: field("errors")? })
            }
        }
    }
}

/// Reads wrk's report: `N requests in`, `Requests/sec:`, socket errors and non-2xx responses.
fn parse_wrk(text: &str) -> Result<Load> {
    let mut load = Load { throughput: f64::NAN, connections: f64::NAN, errors: 0.0 };
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            load.throughput = rest.trim().parse()?;
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            load.connections = n.trim().parse()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                if let Some(n) = part.split_whitespace().last().and_then(|n| n.parse::<f64>().ok()) {
                    load.errors += n;
                }
            }
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            load.errors += rest.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    if load.throughput.is_nan() || load.connections.is_nan() {
        bail!("cannot read wrk's report:\n{text}");
    }
    Ok(load)
}

/// One workload under one configuration.
fn run_one(
    env: &BenchEnv,
    config: Config,
    tracer_bin: &str,
    generator: &Generator,
    cost_seconds: Option<u64>,
    round: u32,
) -> Result<Sample> {
    if config == Config::Untraced {
        let load = generator.run()?;
        return Ok(Sample {
            throughput: load.throughput,
            connections: load.connections,
            errors: load.errors,
            ..Sample::default()
        });
    }
    let tag = format!("{round}-{}", generator.workload.name());
    let mut tracer = Tracer::start(env, config, tracer_bin, &tag)?;
    let pid = tracer.pid();
    let ids = prog_ids(pid);
    let cpu_before = cpu_ticks(pid)?;
    if config.is_stalled() {
        send(pid, "-STOP");
    }
    let load = generator.run()?;
    // The cost load: the same tracer, right after, with BPF run-time
    // accounting on for it alone (it costs every program run two clock
    // reads in `__bpf_prog_run`: left on through the measured load, it
    // would slow every tracer's throughput too, 2-3 points of the wrk ratio
    // here, where production hosts run with it off).
    let (bpf, cost_connections) = match cost_seconds {
        Some(seconds) => {
            set_bpf_stats(true)?;
            let cost = prog_stats(&ids).and_then(|before| {
                let load = Generator { seconds, ..*generator }.run()?;
                Ok((before, prog_stats(&ids)?, load.connections))
            });
            set_bpf_stats(false)?;
            let (before, after, connections) = cost?;
            let mut per_name: BTreeMap<String, (f64, f64)> = BTreeMap::new();
            for (id, (name, ns, cnt)) in after {
                let (ns0, cnt0) = before.get(&id).map(|(_, ns, cnt)| (*ns, *cnt)).unwrap_or((0.0, 0.0));
                let entry = per_name.entry(name).or_default();
                entry.0 += ns - ns0;
                entry.1 += cnt - cnt0;
            }
            (Some(per_name), connections)
        }
        None => (None, 0.0),
    };
    if config.is_stalled() {
        send(pid, "-CONT");
        wait_quiet(&tracer.out, Duration::from_secs(30));
    }
    // Let the tracer drain its ring buffer before reading its counters.
    thread::sleep(Duration::from_secs(1));
    let cpu_after = cpu_ticks(pid)?;
    let peak_rss_kib = status_field(pid, "VmHWM:");
    stop(&mut tracer.child, "-INT", Duration::from_secs(10));
    let output = fs::read_to_string(&tracer.out).with_context(|| format!("cannot read {}", tracer.out.display()))?;
    let (events, records, lost) = match config {
        Config::PortTrace
        | Config::PortTraceBaseline
        | Config::PortTraceUnbatched
        | Config::PortTraceRecord
        | Config::PortTraceStalled
        | Config::PortTraceBaselineStalled => {
            // Sockets found at startup (e.g. TIME_WAIT left by an earlier
            // run) are reported as `snapshot` allocations: not this run's.
            let allocs = output
                .lines()
                .filter(|l| l.starts_with("{\"type\":\"alloc\"") && !l.contains("\"origin\":\"snapshot\""))
                .count();
            let summary = output.lines().rev().find(|l| l.starts_with("{\"type\":\"summary\"")).map(Json::parse);
            let lost = match summary {
                Some(Ok(json)) => json.get("lost").and_then(Json::as_f64),
                _ => None,
            };
            if lost.is_none() {
                let err = fs::read_to_string(&tracer.err).unwrap_or_default();
                bail!("port-trace wrote no summary: {}", err.trim());
            }
            let records = output
                .lines()
                .filter(|l| !l.starts_with("{\"type\":\"header\"") && !l.starts_with("{\"type\":\"summary\""))
                .count();
            (allocs as f64, records as f64, lost)
        }
        // tcplife: one line per session after its header.
        Config::Tcplife => {
            let lines = output.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("PID")).count() as f64;
            (lines, lines, None)
        }
        // bpftrace: one line per event after "Attaching N probes...".
        Config::Bpftrace => {
            let lines = output.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("Attaching")).count() as f64;
            (lines, lines, None)
        }
        Config::Untraced => (0.0, 0.0, None),
    };
    let ns_per_tick = 1e9 / clk_tck();
    Ok(Sample {
        throughput: load.throughput,
        // The tracer saw both loads: events, records and CPU cover both.
        connections: load.connections + cost_connections,
        errors: load.errors,
        events: Some(events),
        records: Some(records),
        lost,
        tracer_cpu_ns: Some((cpu_after - cpu_before) * ns_per_tick),
        peak_rss_kib,
        bpf,
        bpf_connections: cost_connections,
    })
}

/// Turns `kernel.bpf_stats_enabled` on or off (`BenchEnv` restores the
/// value it found).
fn set_bpf_stats(on: bool) -> Result<()> {
    util::output(Command::new("sysctl").args(["-qw", &format!("{BPF_STATS}={}", u8::from(on))]))?;
    Ok(())
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when that fails).
fn clk_tck() -> f64 {
    util::output(Command::new("getconf").arg("CLK_TCK")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(100.0)
}

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: count fields after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// A `/proc/PID/status` field in kB, e.g. `VmHWM:`.
fn status_field(pid: u32, field: &str) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// The ids of the BPF programs `pid` holds (`prog_id:` in /proc/PID/fdinfo/*,
/// which covers program fds and link fds).
fn prog_ids(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return ids };
    for entry in entries.flatten() {
        let Ok(info) = fs::read_to_string(entry.path()) else { continue };
        for line in info.lines() {
            if let Some(id) = line.strip_prefix("prog_id:").and_then(|v| v.trim().parse().ok()) {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `bpftool prog show --json` for `ids`: id → (name, run_time_ns, run_cnt).
fn prog_stats(ids: &[u64]) -> Result<BTreeMap<u64, (String, f64, f64)>> {
    let text = util::output(Command::new("bpftool").args(["prog", "show", "--json"]))?;
    let json = Json::parse(&text).context("bpftool output is not JSON")?;
    let mut stats = BTreeMap::new();
    for prog in json.as_array().context("bpftool: not an array")? {
        let Some(id) = prog.get("id").and_then(Json::as_f64).map(|id| id as u64) else { continue };
        if ids.binary_search(&id).is_err() {
            continue;
        }
        let name = prog.get("name").and_then(Json::as_str).unwrap_or("?").to_owned();
        let ns = prog.get("run_time_ns").and_then(Json::as_f64).unwrap_or(0.0);
        let cnt = prog.get("run_cnt").and_then(Json::as_f64).unwrap_or(0.0);
        stats.insert(id, (name, ns, cnt));
    }
    Ok(stats)
}

/// The median of the values present.
fn median(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.flatten().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 })
}

/// Medians of one workload under one configuration.
struct Summary {
    throughput: Option<f64>,
    connections: Option<f64>,
    errors: Option<f64>,
    events: Option<f64>,
    lost: Option<f64>,
    cpu_per_event: Option<f64>,
    cpu_per_connection: Option<f64>,
    peak_rss_kib: Option<f64>,
    bpf_ns_per_connection: Option<f64>,
    bpf_programs: BTreeMap<String, (Option<f64>, Option<f64>)>,
}

fn summarize(samples: &[Sample]) -> Summary {
    let m = |f: &dyn Fn(&Sample) -> Option<f64>| median(samples.iter().map(f));
    let names: BTreeSet<String> = samples.iter().flat_map(|s| s.bpf.iter().flat_map(|b| b.keys().cloned())).collect();
    let bpf_programs = names
        .into_iter()
        .map(|name| {
            let get = |s: &Sample| s.bpf.as_ref().and_then(|b| b.get(&name).copied());
            let per_run = m(&|s| get(s).filter(|(_, cnt)| *cnt > 0.0).map(|(ns, cnt)| ns / cnt));
            let runs = m(&|s| get(s).map(|(_, cnt)| cnt));
            (name, (per_run, runs))
        })
        .collect();
    Summary {
        throughput: m(&|s| Some(s.throughput)),
        connections: m(&|s| Some(s.connections)),
        errors: m(&|s| Some(s.errors)),
        events: m(&|s| s.events),
        lost: m(&|s| s.lost),
        cpu_per_event: m(&Sample::cpu_per_event),
        cpu_per_connection: m(&Sample::cpu_per_connection),
        peak_rss_kib: m(&|s| s.peak_rss_kib),
        bpf_ns_per_connection: m(&Sample::bpf_ns_per_connection),
        bpf_programs,
    }
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map(|v| format!("{v:.decimals$}")).unwrap_or_else(|| "-".to_owned())
}

/// The human table: one line per workload and configuration.
fn render_table(
    workloads: &[Workload],
    configs: &[Config],
    samples: &BTreeMap<(Workload, Config), Vec<Sample>>,
    skipped: &BTreeMap<String, String>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<20} {:>16} {:>7} {:>22} {:>6} {:>9} {:>11} {:>9} {:>11}",
        "WORKLOAD",
        "CONFIG",
        "THROUGHPUT",
        "RATIO",
        "EVENTS/CONNECTIONS",
        "LOST",
        "CPU ns/ev",
        "CPU ns/conn",
        "PEAK RSS",
        "BPF ns/conn"
    );
    for &workload in workloads {
        let base = samples.get(&(workload, Config::Untraced)).map(|s| summarize(s)).and_then(|s| s.throughput);
        for &config in configs {
            let cells = match samples.get(&(workload, config)) {
                Some(s) => {
                    let s = summarize(s);
                    let ratio = match (s.throughput, base) {
                        (Some(t), Some(b)) if b > 0.0 => Some(t / b),
                        _ => None,
                    };
                    let events = match (s.events, s.connections) {
                        (Some(e), Some(c)) if c > 0.0 => format!("{e:.0}/{c:.0} ({:.2})", e / c),
                        _ => "-".to_owned(),
                    };
                    [
                        format!("{} {}", fmt(s.throughput, 0), workload.unit()),
                        fmt(ratio, 3),
                        events,
                        fmt(s.lost, 0),
                        fmt(s.cpu_per_event, 0),
                        fmt(s.cpu_per_connection, 0),
                        s.peak_rss_kib.map(|k| format!("{:.1} MiB", k / 1024.0)).unwrap_or_else(|| "-".to_owned()),
                        fmt(s.bpf_ns_per_connection, 0),
                    ]
                }
                None => {
                    let why = if skipped.contains_key(config.name()) { "n/a" } else { "failed" };
                    [why, "", "", "", "", "", "", ""].map(str::to_owned)
                }
            };
            let _ = writeln!(
                out,
                "{:<10} {:<20} {:>16} {:>7} {:>22} {:>6} {:>9} {:>11} {:>9} {:>11}",
                workload.name(),
                config.name(),
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                cells[4],
                cells[5],
                cells[6],
                cells[7]
            );
        }
    }
    out
}

/// The JSON results document.
#[allow(clippy::too_many_arguments)]
fn results_json(
    seconds: u64,
    cost_seconds: u64,
    rounds: u32,
    workloads: &[Workload],
    samples: &BTreeMap<(Workload, Config), Vec<Sample>>,
    skipped: &BTreeMap<String, String>,
    notes: &[String],
    failures: &[String],
) -> Json {
    let num = |v: Option<f64>| v.map(Json::Num).unwrap_or(Json::Null);
    let mut results = Vec::new();
    for &workload in workloads {
        let base = samples.get(&(workload, Config::Untraced)).map(|s| summarize(s)).and_then(|s| s.throughput);
        for config in Config::ALL {
            let Some(runs) = samples.get(&(workload, config)) else { continue };
            let s = summarize(runs);
            let ratio = match (s.throughput, base) {
                (Some(t), Some(b)) if b > 0.0 => Some(t / b),
                _ => None,
            };
            let programs = s
                .bpf_programs
                .iter()
                .map(|(name, (per_run, runs))| {
                    Json::Obj(vec![
                        ("name".into(), Json::Str(name.clone())),
                        ("ns_per_run".into(), num(*per_run)),
                        ("runs".into(), num(*runs)),
                    ])
                })
                .collect();
            results.push(Json::Obj(vec![
                ("workload".into(), Json::Str(workload.name().into())),
                ("config".into(), Json::Str(config.name().into())),
                ("rounds".into(), Json::Num(runs.len() as f64)),
                ("throughput".into(), num(s.throughput)),
                ("throughput_unit".into(), Json::Str(workload.unit().into())),
                ("ratio_to_untraced".into(), num(ratio)),
                ("connections".into(), num(s.connections)),
                ("generator_errors".into(), num(s.errors)),
                ("events".into(), num(s.events)),
                ("lost".into(), num(s.lost)),
                ("tracer_cpu_ns_per_event".into(), num(s.cpu_per_event)),
                ("tracer_cpu_ns_per_connection".into(), num(s.cpu_per_connection)),
                ("peak_rss_kib".into(), num(s.peak_rss_kib)),
                ("bpf_ns_per_connection".into(), num(s.bpf_ns_per_connection)),
                ("bpf_programs".into(), Json::Arr(programs)),
                ("throughput_per_round".into(), Json::Arr(runs.iter().map(|r| Json::Num(r.throughput)).collect())),
            ]));
        }
    }
    let strings = |v: &[String]| Json::Arr(v.iter().cloned().map(Json::Str).collect());
    Json::Obj(vec![
        ("seconds_per_run".into(), Json::Num(seconds as f64)),
        ("seconds_per_cost_load".into(), Json::Num(cost_seconds as f64)),
        ("rounds".into(), Json::Num(rounds as f64)),
        ("results".into(), Json::Arr(results)),
        ("skipped".into(), Json::Obj(skipped.iter().map(|(k, v)| (k.clone(), Json::Str(v.clone()))).collect())),
        ("notes".into(), strings(notes)),
        ("failures".into(), strings(failures)),
    ])
}

/// A minimal JSON value (xtask has no serde): enough to read bpftool's and
/// the generators' output and to write the results.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Result<Json> {
        let mut parser = JsonParser { bytes: text.as_bytes(), pos: 0 };
        let value = parser.value()?;
        parser.skip_ws();
        if parser.pos != parser.bytes.len() {
            bail!("trailing characters at byte {}", parser.pos);
        }
        Ok(value)
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(items) => Some(items),
            _ => None,
        }
    }

    /// Pretty-printed, two spaces per level.
    fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out, 0);
        out
    }

    fn render_into(&self, out: &mut String, indent: usize) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) if !n.is_finite() => out.push_str("null"),
            Json::Num(n) if n.fract() == 0.0 && n.abs() < 1e15 => {
                let _ = write!(out, "{}", *n as i64);
            }
            Json::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Obj(fields) if fields.is_empty() => out.push_str("{}"),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&"  ".repeat(indent + 1));
                    item.render_into(out, indent + 1);
                }
                out.push('\n');
                out.push_str(&"  ".repeat(indent));
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&"  ".repeat(indent + 1));
                    Json::Str(key.clone()).render_into(out, indent + 1);
                    out.push_str(": ");
                    value.render_into(out, indent + 1);
                }
                out.push('\n');
                out.push_str(&"  ".repeat(indent));
                out.push('}');
            }
        }
    }
}

/// A recursive-descent JSON reader over bytes.
struct JsonParser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl JsonParser<'_> {
    fn skip_ws(&mut self) {
        while self.bytes.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, literal: &str) -> Result<()> {
        if self.bytes[self.pos..].starts_with(literal.as_bytes()) {
            self.pos += literal.len();
            Ok(())
        } else {
            bail!("expected `{literal}` at byte {}", self.pos)
        }
    }

    fn value(&mut self) -> Result<Json> {
        self.skip_ws();
        match self.bytes.get(self.pos) {
            Some(b'n') => self.expect("null").map(|()| Json::Null),
            Some(b't') => self.expect("true").map(|()| Json::Bool(true)),
            Some(b'f') => self.expect("false").map(|()| Json::Bool(false)),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.skip_ws();
                if self.bytes.get(self.pos) == Some(&b']') {
                    self.pos += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.skip_ws();
                    match self.bytes.get(self.pos) {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => bail!("expected `,` or `]` at byte {}", self.pos),
                    }
                }
            }
            Some(b'{') => {
                self.pos += 1;
                let mut fields = Vec::new();
                self.skip_ws();
                if self.bytes.get(self.pos) == Some(&b'}') {
                    self.pos += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.skip_ws();
                    let key = self.string()?;
                    self.skip_ws();
                    self.expect(":")?;
                    fields.push((key, self.value()?));
                    self.skip_ws();
                    match self.bytes.get(self.pos) {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => bail!("expected `,` or `}}` at byte {}", self.pos),
                    }
                }
            }
            Some(_) => {
                let start = self.pos;
                while self.bytes.get(self.pos).is_some_and(|b| b"+-.eE0123456789".contains(b)) {
                    self.pos += 1;
                }
                let text = std::str::from_utf8(&self.bytes[start..self.pos])?;
                text.parse().map(Json::Num).with_context(|| format!("bad value at byte {start}"))
            }
            None => bail!("unexpected end of JSON"),
        }
    }

    fn string(&mut self) -> Result<String> {
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            let Some(&b) = self.bytes.get(self.pos) else { bail!("unterminated string") };
            self.pos += 1;
            match b {
                b'"' => return Ok(String::from_utf8(out)?),
                b'\\' => {
                    let Some(&esc) = self.bytes.get(self.pos) else { bail!("unterminated string") };
                    self.pos += 1;
                    let c = match esc {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = self.bytes.get(self.pos..self.pos + 4).context("short \\u escape")?;
                            self.pos += 4;
                            let code = u32::from_str_radix(std::str::from_utf8(hex)?, 16)?;
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        other => other as char,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                b => out.push(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let text = r#"[{"id":12,"name":"a\"b","run_time_ns":1500,"run_cnt":3,"x":[true,null,-1.5e2]}]"#;
        let json = Json::parse(text).unwrap();
        let prog = &json.as_array().unwrap()[0];
        assert_eq!(prog.get("id").and_then(Json::as_f64), Some(12.0));
        assert_eq!(prog.get("name").and_then(Json::as_str), Some("a\"b"));
        assert_eq!(Json::parse(&json.render()).unwrap(), json);
    }

    #[test]
    fn wrk_report() {
        let text = "Running 3s test @ http://127.0.0.1:8080/\n  1 threads and 8 connections\n  \
                    30000 requests in 3.00s, 4.5MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
                    Requests/sec:  10000.50\nTransfer/sec:      1.5MB\n";
        let load = parse_wrk(text).unwrap();
        assert_eq!(load.connections, 30000.0);
        assert_eq!(load.throughput, 10000.5);
        assert_eq!(load.errors, 3.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median([Some(3.0), None, Some(1.0), Some(2.0)].into_iter()), Some(2.0));
        assert_eq!(median([Some(1.0), Some(4.0)].into_iter()), Some(2.5));
        assert_eq!(median(std::iter::empty()), None);
    }
}
