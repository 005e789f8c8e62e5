//! CLI tests: the real `port-trace` binary as a user meets it: `doctor`,
//! usage errors, missing privileges, how `watch` ends (`--duration`,
//! SIGTERM) and its text format.
//!
//! Every expectation comes from outside the tool where one exists: the
//! kernel (`/proc/sys/kernel/osrelease`, `/sys/kernel/btf/vmlinux`, what
//! `watch` really attached), the workload's own truth, our own clock.
//! Most tests need root (see `require_root`); the usage-error test does not.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use port_trace_integration::check::{self, HeaderTruth, Window};
use port_trace_integration::netns::NetNs;
use port_trace_integration::tracer::Tracer;
use port_trace_integration::truth::join_addr;
use port_trace_integration::{
    kernel_release, output_with_timeout, require_root, rfc3339, run_session_with, run_workload, tracer_bin, Capture,
    SessionOptions, DRAIN, HEADER_TIMEOUT, STOP_TIMEOUT,
};
use serde_json::Value;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_port-workload");

/// Runs the tracer with `args`, killed after `timeout`.
fn port_trace(args: &[&str], timeout: Duration) -> Output {
    output_with_timeout(Command::new(tracer_bin()).args(args), timeout).unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `port-trace doctor --json`, parsed (run once: probing takes seconds).
fn doctor_json() -> &'static Value {
    static DOC: OnceLock<Result<Value, String>> = OnceLock::new();
    let doc = DOC.get_or_init(|| {
        let out = port_trace(&["doctor", "--json"], Duration::from_secs(30));
        if !out.status.success() {
            return Err(format!("doctor --json: {}\nstderr:\n{}", out.status, text(&out.stderr)));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("doctor --json is not JSON ({e}):\n{}", text(&out.stdout)))
    });
    doc.as_ref().unwrap_or_else(|e| panic!("{e}"))
}

/// The `doctor` table: every hook of `doctor --json` is a row with its
/// backend and an ok/refused status that agrees with `available`; after
/// the rows comes the line with "auto chooses portable", followed only by
/// the reasons the other backends were not chosen. The header lines agree
/// with the machine.
#[test]
fn doctor_table_names_every_hook_and_the_choice() {
    if !require_root("doctor_table_names_every_hook_and_the_choice") {
        return;
    }
    let out = port_trace(&["doctor"], Duration::from_secs(30));
    let stdout = text(&out.stdout);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    assert!(!text(&out.stderr).contains("panicked"), "{ctx}");
    let lines: Vec<&str> = stdout.lines().collect();

    let mut problems = Vec::new();
    let kernel = kernel_release();
    if !lines.iter().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["kernel", kernel.as_str()]) {
        problems.push(format!("no `kernel {kernel}` line"));
    }
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    match lines.iter().find(|l| l.starts_with("BTF")) {
        Some(l) if l.contains("missing") != btf => {}
        other => problems.push(format!("BTF line {other:?}, but /sys/kernel/btf/vmlinux exists: {btf}")),
    }

    let hooks = doctor_json()["hooks"].as_array().cloned().unwrap_or_default();
    if hooks.is_empty() {
        problems.push("doctor --json lists no hooks".into());
    }
    let Some(head) = lines.iter().position(|l| l.split_whitespace().next() == Some("HOOK")) else {
        panic!("no HOOK column header in the table\n{ctx}");
    };
    let mut last_row = head;
    for h in &hooks {
        let (name, mech, backend) = (
            h["hook"].as_str().unwrap_or("?"),
            h["mechanism"].as_str().unwrap_or("?"),
            h["backend"].as_str().unwrap_or("?"),
        );
        let label = if backend == "portable" { format!("{name} ({mech})") } else { name.to_owned() };
        let want_status = if h["available"] == true { "ok" } else { "refused" };
        let row = lines.iter().enumerate().skip(head + 1).find(|(_, l)| {
            l.strip_prefix(label.as_str())
                .is_some_and(|rest| rest.split_whitespace().take(2).collect::<Vec<_>>() == [backend, want_status])
        });
        match row {
            Some((i, _)) => last_row = last_row.max(i),
            None => problems.push(format!("no row `{label}  {backend}  {want_status}`")),
        }
    }
    match lines.iter().position(|l| l.contains("auto chooses portable")) {
        Some(i) if i > last_row => {
            if let Some(l) = lines[i + 1..].iter().find(|l| !l.starts_with("  not ")) {
                problems.push(format!("after the choice, a line that is not a `not BACKEND: why`: {l:?}"));
            }
        }
        Some(i) => {
            problems.push(format!("the choice (line {}) comes before the last hook row ({})", i + 1, last_row + 1))
        }
        None => problems.push("no line with \"auto chooses portable\"".into()),
    }
    assert!(problems.is_empty(), "doctor table:\n  {}\n{ctx}", problems.join("\n  "));
}

/// `doctor --json` agrees with the machine and with what `watch` really
/// attaches: backend portable (as the `watch` header's), an available
/// `sock:inet_sock_set_state`, every portable hook doctor calls available
/// attached by `watch`, and every hook `watch` attached by mechanism M that
/// doctor names listed as available by M.
#[test]
fn doctor_json_agrees_with_the_kernel_and_with_watch() {
    if !require_root("doctor_json_agrees_with_the_kernel_and_with_watch") {
        return;
    }
    let doc = doctor_json();
    let mut problems = Vec::new();
    if !doc["backend"].as_str().is_some_and(|b| b.starts_with("portable")) {
        problems.push(format!("backend: want portable..., got {}", doc["backend"]));
    }
    if doc["kernel"].as_str() != Some(kernel_release().as_str()) {
        problems.push(format!("kernel: want {:?}, got {}", kernel_release(), doc["kernel"]));
    }
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    if doc["btf"] != btf {
        problems.push(format!("btf: {}, but /sys/kernel/btf/vmlinux exists: {btf}", doc["btf"]));
    }
    let hooks = doc["hooks"].as_array().cloned().unwrap_or_default();
    let available = |hook: &str, mech: &str| {
        hooks.iter().any(|h| h["hook"] == hook && h["mechanism"] == mech && h["available"] == true)
    };
    if !hooks.iter().any(|h| h["hook"] == "sock:inet_sock_set_state" && h["available"] == true) {
        problems.push("no available entry for sock:inet_sock_set_state".into());
    }
    if !Path::new("/sys/bus/event_source/devices/kprobe").exists()
        && hooks.iter().any(|h| h["mechanism"] == "kprobe" && h["available"] == true)
    {
        problems.push("kprobes listed as available, but the kernel has no kprobe event source".into());
    }

    // What watch attaches, in a namespace of its own. It ends by
    // `--duration` (a signal right after the header is a test of its own).
    let ns = NetNs::new().unwrap();
    let args: Vec<OsString> =
        vec!["watch".into(), "-f".into(), "json".into(), "-d".into(), "1s".into(), "--netns".into(), ns.path().into()];
    let tracer = Tracer::start(&tracer_bin(), &args, HEADER_TIMEOUT).unwrap();
    let header = tracer.header.clone();
    let out = tracer.wait(STOP_TIMEOUT).unwrap();
    problems.extend(out.exit_problems());
    let attached = header["hooks"].as_array().cloned().unwrap_or_default();
    // What doctor calls available, watch attaches (auto, like doctor's
    // choice) ...
    for h in hooks.iter().filter(|h| h["backend"] == "portable" && h["available"] == true) {
        let name = h["hook"].as_str().unwrap_or("?");
        let status = attached.iter().find(|a| a["hook"] == name).and_then(|a| a["status"].as_str());
        if !status.is_some_and(|st| st.starts_with("attached")) {
            problems.push(format!("doctor lists {name} ({}) as available; watch: {status:?}", h["mechanism"]));
        }
    }
    // ... and what watch attached by mechanism M, doctor lists as available
    // by M (for the hooks doctor names).
    for h in &attached {
        let (name, status) = (h["hook"].as_str().unwrap_or("?"), h["status"].as_str().unwrap_or("?"));
        let Some(mech) = status.strip_prefix("attached (").and_then(|s| s.split([')', ';']).next()) else {
            continue;
        };
        if hooks.iter().any(|d| d["hook"] == name) && !available(name, mech) {
            problems.push(format!("watch attached {name} by {mech}; doctor does not list that as available"));
        }
    }
    let backend = header["backend"].as_str().unwrap_or("?");
    if !doc["backend"].as_str().is_some_and(|b| b.starts_with(backend)) {
        problems.push(format!("watch (auto) runs backend {backend:?}, doctor says auto chooses {}", doc["backend"]));
    }
    assert!(
        problems.is_empty(),
        "doctor --json:\n  {}\n{}\nwatch header: {header}",
        problems.join("\n  "),
        serde_json::to_string_pretty(&doc).unwrap()
    );
}

/// Bad command lines: exit 2 at once (nothing attached: no header, no
/// output), a message on stderr that names what is wrong, no panic.
#[test]
fn usage_errors_exit_2_quickly_and_say_what_is_wrong() {
    let cases: [(&[&str], &str); 11] = [
        (&["watch", "-P", "70000"], "70000"),
        (&["watch", "-P", "90-80"], "90-80"),
        (&["watch", "-p", "abc"], "abc"),
        (&["watch", "--proto", "sctp"], "sctp"),
        (&["watch", "-f", "xml"], "xml"),
        (&["watch", "-d", "soon"], "soon"),
        (&["watch", "--netns", "/nonexistent"], "/nonexistent"),
        (&["watch", "--netns", "/etc/hostname"], "/etc/hostname"),
        (&["watch", "--cgroup", "/nonexistent-cgroup"], "/nonexistent-cgroup"),
        (&["frobnicate"], "frobnicate"),
        (&["watch", "--force"], "--output"),
    ];
    let mut rows = Vec::new();
    for (args, names) in cases {
        let t0 = Instant::now();
        let out = port_trace(args, Duration::from_secs(10));
        let took = t0.elapsed();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        let mut bad = Vec::new();
        if out.status.code() != Some(2) {
            bad.push(format!("exit {}, want 2", out.status));
        }
        if stderr.trim().is_empty() {
            bad.push("stderr is empty".into());
        } else if !stderr.lines().any(|l| l.starts_with("error:") || l.starts_with("port-trace: error:")) {
            bad.push("no `error:` line".into());
        }
        if !stderr.contains(names) {
            bad.push(format!("stderr does not name {names:?}"));
        }
        if stderr.contains("panicked") {
            bad.push("panicked".into());
        }
        if !stdout.is_empty() {
            bad.push(format!("wrote to stdout (it started tracing?): {stdout:?}"));
        }
        if took >= Duration::from_secs(5) {
            bad.push(format!("took {took:?}"));
        }
        if !bad.is_empty() {
            rows.push(format!(
                "{:<40} {}\n{:<40} stderr: {}",
                args.join(" "),
                bad.join("; "),
                "",
                stderr.trim().replace('\n', "\n                                         ")
            ));
        }
    }
    assert!(rows.is_empty(), "usage errors handled wrongly:\n{}", rows.join("\n"));
}

/// The tracer binary where an unprivileged user can run it: in place if
/// they can, else a copy in a fresh world-readable directory (removed when
/// dropped).
struct ReachableBin {
    path: PathBuf,
    copy_dir: Option<PathBuf>,
}

impl ReachableBin {
    fn new(setpriv: &[&str]) -> ReachableBin {
        let bin = tracer_bin();
        let ok = Command::new(setpriv[0])
            .args(&setpriv[1..])
            .args(["/bin/sh", "-c", "test -x \"$0\""])
            .arg(&bin)
            .status()
            .unwrap_or_else(|e| panic!("running setpriv (util-linux): {e}"));
        if ok.success() {
            return ReachableBin { path: bin, copy_dir: None };
        }
        let dir = std::env::temp_dir().join(format!("port-trace-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("port-trace");
        std::fs::copy(&bin, &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        ReachableBin { path, copy_dir: Some(dir) }
    }
}

impl Drop for ReachableBin {
    fn drop(&mut self) {
        if let Some(d) = &self.copy_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// As nobody with no capabilities at all, `watch` and `doctor` exit 1 with
/// a line naming the three capabilities and how to get them (sudo), and
/// start nothing.
#[test]
fn unprivileged_user_is_told_what_is_missing() {
    if !require_root("unprivileged_user_is_told_what_is_missing") {
        return;
    }
    let setpriv =
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"];
    // The premise: under setpriv the process really is unprivileged.
    let status = output_with_timeout(
        Command::new(setpriv[0]).args(&setpriv[1..]).args(["cat", "/proc/self/status"]),
        Duration::from_secs(10),
    )
    .unwrap();
    let st = text(&status.stdout);
    let field = |name: &str| st.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("?").to_owned();
    assert_eq!(field("CapEff:"), "0000000000000000", "setpriv did not drop capabilities:\n{st}");
    assert!(field("Uid:").starts_with("65534"), "setpriv did not change the uid:\n{st}");

    let bin = ReachableBin::new(&setpriv);
    let mut rows = Vec::new();
    for args in [&["watch", "-d", "1s"][..], &["doctor"]] {
        let out = output_with_timeout(
            Command::new(setpriv[0]).args(&setpriv[1..]).arg(&bin.path).args(args),
            Duration::from_secs(10),
        )
        .unwrap();
        let stderr = text(&out.stderr);
        let mut bad = Vec::new();
        if out.status.code() != Some(1) {
            bad.push(format!("exit {}, want 1", out.status));
        }
        for want in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "sudo"] {
            if !stderr.contains(want) {
                bad.push(format!("stderr does not mention {want}"));
            }
        }
        if stderr.contains("panicked") {
            bad.push("panicked".into());
        }
        if !out.stdout.is_empty() {
            bad.push(format!("wrote to stdout: {:?}", text(&out.stdout)));
        }
        if !bad.is_empty() {
            rows.push(format!("{}: {}\n  stderr: {}", args.join(" "), bad.join("; "), stderr.trim()));
        }
    }
    assert!(rows.is_empty(), "unprivileged runs:\n{}", rows.join("\n"));
}

/// `watch --duration 2s` ends by itself after 2 s (within 2-6 s of the
/// start, by our clock), exits 0, and closes with a summary whose counts
/// match the records and whose duration is at least the 2 s and at most
/// what we measured.
#[test]
fn duration_ends_the_run_with_a_summary() {
    if !require_root("duration_ends_the_run_with_a_summary") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let range = ns.ephemeral_range().unwrap();
    let started = rfc3339::unix_nanos(SystemTime::now());
    let args: Vec<OsString> =
        vec!["watch".into(), "-f".into(), "json".into(), "-d".into(), "2s".into(), "--netns".into(), ns.path().into()];
    let tracer = Tracer::start(&tracer_bin(), &args, HEADER_TIMEOUT).unwrap();
    let out = tracer.wait(Duration::from_secs(10)).unwrap();
    let ended = rfc3339::unix_nanos(SystemTime::now());
    let mut problems = out.exit_problems();
    problems.extend(check::check_summary(&out.records));
    let truth = HeaderTruth {
        ephemeral_range: range,
        kernel_release: kernel_release(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        window: Window { start: started, end: ended },
    };
    problems.extend(check::check_header(&out.header, &truth));
    if !(Duration::from_secs(2)..=Duration::from_secs(6)).contains(&out.ran_for) {
        problems.push(format!("ran for {:?}, want 2-6 s", out.ran_for));
    }
    let duration_s = out.records.last().and_then(|r| r["duration_s"].as_f64());
    match duration_s {
        Some(d) if d >= 2.0 && d <= out.ran_for.as_secs_f64() => {}
        other => problems.push(format!("summary duration_s {other:?}, want 2.0..={:.3}", out.ran_for.as_secs_f64())),
    }
    assert!(
        problems.is_empty(),
        "--duration 2s:\n  {}\nstdout:\n{}\nstderr:\n{}",
        problems.join("\n  "),
        out.dump(),
        out.stderr
    );
}

/// SIGTERM ends a run like SIGINT: exit 0, a summary, and nothing lost on
/// the way out: the `basic` workload's records still match its truth.
#[test]
fn sigterm_ends_the_run_with_a_summary() {
    if !require_root("sigterm_ends_the_run_with_a_summary") {
        return;
    }
    let opts = SessionOptions {
        ephemeral_range: Some((40000, 49999)),
        stop_signal: libc::SIGTERM,
        ..SessionOptions::default()
    };
    let s = run_session_with(Path::new(WORKLOAD), "basic", &opts).unwrap();
    let problems = s.run_problems();
    let report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    assert!(
        problems.is_empty() && report.ok(),
        "after SIGTERM:\n  {}\n{report}\nstderr:\n{}",
        problems.join("\n  "),
        s.tracer.stderr
    );
}

/// The text format's columns, in order.
const COLUMNS: [&str; 8] = ["TIME", "EVENT", "PROTO", "PID", "COMM", "LADDR:LPORT", "RADDR:RPORT", "DETAIL"];

/// `watch -f text`: the column header first; each TCP connect the `basic`
/// workload made (by its own getsockname) is an `alloc` line with its pid,
/// comm, local and remote address:port and `connect`; the summary goes to
/// stderr as the last line, starting with "port-trace:", with the number of
/// alloc lines printed, and not to stdout.
#[test]
fn text_format_has_columns_and_shows_connects() {
    if !require_root("text_format_has_columns_and_shows_connects") {
        return;
    }
    let ns = NetNs::new().unwrap();
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 49999").unwrap();
    let args: Vec<OsString> = vec!["watch".into(), "-f".into(), "text".into(), "--netns".into(), ns.path().into()];
    let tracer = Tracer::start_text(&tracer_bin(), &args, HEADER_TIMEOUT).unwrap();
    let first = tracer.first_line().to_owned();
    let truth = run_workload(&ns, Path::new(WORKLOAD), "basic").unwrap();
    std::thread::sleep(DRAIN);
    let out = tracer.stop(STOP_TIMEOUT).unwrap();
    let ctx = format!("stdout:\n{}\nstderr:\n{}", out.dump(), out.stderr);

    let mut problems = Vec::new();
    if !out.status.success() {
        problems.push(format!("exit {}, want 0", out.status));
    }
    if !first.starts_with("TIME") || first.split_whitespace().collect::<Vec<_>>() != COLUMNS {
        problems.push(format!("first line {first:?}, want the columns {}", COLUMNS.join(" ")));
    }
    let rows: Vec<Vec<&str>> = out.lines.iter().skip(1).map(|l| l.text.split_whitespace().collect()).collect();
    let connects: Vec<_> =
        truth.allocations().into_iter().filter(|t| t.proto == "tcp" && t.origin == "connect").collect();
    if connects.len() != 4 {
        problems.push(format!("the workload made {} TCP connects, `basic` makes 4", connects.len()));
    }
    for t in connects {
        let (Some(raddr), Some(rport)) = (&t.raddr, t.rport) else {
            problems.push(format!("{}: no remote in the truth", t.label()));
            continue;
        };
        let pid = t.pid.to_string();
        let want = ["alloc", "tcp", pid.as_str(), check::WORKLOAD_COMM];
        let local = join_addr(&t.laddr, t.lport);
        let remote = join_addr(raddr, rport);
        let found = rows
            .iter()
            .any(|r| r.len() >= 8 && r[1..5] == want && r[5] == local && r[6] == remote && r[7] == "connect");
        if !found {
            problems
                .push(format!("no line `TIME alloc tcp {pid} {} {local} {remote} connect ...`", check::WORKLOAD_COMM));
        }
    }
    for (i, l) in out.lines.iter().enumerate() {
        if !l.terminated || !l.utf8 || l.text.starts_with('{') {
            problems.push(format!("stdout line {} is not a newline-terminated UTF-8 text line: {:?}", i + 1, l.text));
        }
    }
    let allocs = rows.iter().filter(|r| r.get(1) == Some(&"alloc")).count();
    match out.stderr.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(l) if l.starts_with("port-trace:") && l.contains(&format!(" {allocs} alloc")) => {}
        other => problems
            .push(format!("last stderr line {other:?}: want the summary, \"port-trace: ... {allocs} alloc ...\"")),
    }
    assert!(problems.is_empty(), "text output:\n  {}\n{ctx}", problems.join("\n  "));
}

/// The header is the sign that tracing has begun (the harness, and any
/// script, starts its workload on it). A SIGINT or SIGTERM that comes right
/// after it must end the run like any other: exit 0 and a summary, not
/// death by the signal. The signal is sent the moment the first byte of the
/// header can be read, several times each, as this is a race.
#[test]
fn signal_right_after_the_header_still_gives_a_summary() {
    if !require_root("signal_right_after_the_header_still_gives_a_summary") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let mut rows = Vec::new();
    for (n, sig) in [libc::SIGINT, libc::SIGTERM].into_iter().cycle().take(4).enumerate() {
        let mut child = Command::new(tracer_bin())
            .args(["watch", "-f", "json", "--netns"])
            .arg(ns.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = Capture::start(child.stderr.take().unwrap());
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        let got = stdout.read(&mut first).unwrap();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let mut rest = Vec::new();
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = stdout.read_to_end(&mut rest);
        let out = [&first[..got], &rest[..]].concat();
        let text_out = text(&out);
        let stderr = text(&err.finish(Duration::from_secs(2)));
        let name = if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
        let last = text_out.lines().last().and_then(|l| serde_json::from_str::<Value>(l).ok());
        let summary = last.as_ref().is_some_and(|v| v["type"] == "summary");
        let header = text_out.lines().next().is_some_and(|l| l.contains("\"type\":\"header\""));
        match status {
            Some(st) if st.success() && summary && header => {}
            st => {
                let lines: Vec<&str> = text_out.lines().collect();
                let last_line: String = lines.last().map_or("", |l| *l).chars().take(160).collect();
                rows.push(format!(
                    "try {} ({name} at the header): exit {st:?}, header {header}, summary last {summary}; \
                     {} stdout line(s), the last: {last_line}\n  stderr: {}",
                    n + 1,
                    lines.len(),
                    stderr.trim()
                ))
            }
        }
    }
    assert!(rows.is_empty(), "signals right after the header:\n{}", rows.join("\n"));
}
