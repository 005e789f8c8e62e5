//! Tests of the test harness itself, without port-trace: the namespace
//! guard, the workload's truth, and the tracer child-process handling
//! (driven by small shell scripts, never by a stand-in for the tracer's
//! findings).

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use port_trace_integration::netns::NetNs;
use port_trace_integration::ss;
use port_trace_integration::tracer::Tracer;
use port_trace_integration::{require_root, run_workload, HeldWorkload};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_port-workload");

fn own_netns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

#[test]
fn netns_is_private_and_deleted_on_drop() {
    if !require_root("netns_is_private_and_deleted_on_drop") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let path = ns.path();
    assert!(path.exists());
    assert_ne!(ns.inode(), own_netns_inode());
    // The inode is what a process inside sees.
    let out = ns.command("readlink").arg("/proc/self/ns/net").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("net:[{}]", ns.inode()));
    // Loopback is up, with both addresses.
    let out = ns.command("ip").args(["-br", "addr", "show", "lo"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("127.0.0.1/8") && text.contains("::1/128"), "{text}");
    drop(ns);
    assert!(!path.exists(), "{} left behind", path.display());
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&name));
}

#[test]
fn netns_is_deleted_when_a_test_panics() {
    if !require_root("netns_is_deleted_when_a_test_panics") {
        return;
    }
    let mut path = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = NetNs::new().unwrap();
        path = Some(ns.path());
        panic!("deliberate panic with {} alive", ns.name());
    }));
    assert!(r.is_err());
    let path = path.unwrap();
    assert!(!path.exists(), "{} survived the panic", path.display());
}

#[test]
fn workload_truth_is_consistent_with_the_kernel() {
    if !require_root("workload_truth_is_consistent_with_the_kernel") {
        return;
    }
    let ns = NetNs::new().unwrap();
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 49999").unwrap();
    let range = ns.ephemeral_range().unwrap();
    assert_eq!(range, (40000, 49999));
    let truth = run_workload(&ns, Path::new(WORKLOAD), "basic").unwrap();
    let problems = truth.basic_problems(range);
    assert!(problems.is_empty(), "{problems:#?}\n{truth:#?}");
    // The pid is the workload's: `ip netns exec` execs it in place, so the
    // process that printed it is gone, and the pid was not ours.
    assert_ne!(truth.pid, std::process::id());
    assert!(truth.failures().is_empty(), "binds refused in a fresh namespace: {truth:#?}");
}

/// The other scenarios, untraced: each does what it promises (see
/// `Truth::scenario_problems`), so that a kernel test failing on them points
/// at the tracer and not at the workload.
#[test]
fn workload_scenarios_do_what_they_promise() {
    if !require_root("workload_scenarios_do_what_they_promise") {
        return;
    }
    // The holding scenarios (hold, churn, crowd) read EOF on stdin at once
    // and close what they hold right after their ready line.
    for (scenario, range) in [
        ("failures", "40000 40001"),
        ("listen-unbound", "40000 49999"),
        ("udp-sendto", "40000 49999"),
        ("time-wait", "40000 49999"),
        ("hold", "40000 49999"),
        ("connect-storm", "40000 40019"),
        ("churn", "40000 49999"),
        ("crowd", "40000 49999"),
    ] {
        let ns = NetNs::new().unwrap();
        ns.sysctl("net.ipv4.ip_local_port_range", range).unwrap();
        let range = ns.ephemeral_range().unwrap();
        let truth = run_workload(&ns, Path::new(WORKLOAD), scenario).unwrap();
        let problems = truth.scenario_problems(scenario, range);
        assert!(problems.is_empty(), "{scenario}: {problems:#?}\n{truth:#?}");
        assert_ne!(truth.pid, std::process::id());
    }
}

#[test]
fn failures_scenario_refuses_a_large_range() {
    if !require_root("failures_scenario_refuses_a_large_range") {
        return;
    }
    // Exhausting 10000 ports is not what the scenario is for: it must say
    // so instead of running for minutes.
    let ns = NetNs::new().unwrap();
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 49999").unwrap();
    let err = run_workload(&ns, Path::new(WORKLOAD), "failures").expect_err("must refuse");
    assert!(format!("{err:#}").contains("too large to exhaust"), "{err:#}");
}

/// A held workload keeps its sockets until released: after its ready line
/// the kernel (`ss`, cookies included) lists exactly the sockets it
/// announced plus the accepted children, and after the release none; its
/// truth then says what `hold` promises.
#[test]
fn held_workload_holds_until_released() {
    if !require_root("held_workload_holds_until_released") {
        return;
    }
    let ns = NetNs::new().unwrap();
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 49999").unwrap();
    let held = HeldWorkload::start(&ns, Path::new(WORKLOAD), "hold", Duration::from_secs(20)).unwrap();
    assert_eq!(held.ready["pid"].as_u64(), Some(u64::from(held.pid())), "{}", held.ready);
    let listed = ss::list(&ns).unwrap();
    let mut announced: Vec<(String, String)> = held.ready["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["proto"].as_str().unwrap().to_owned(), v["lport"].to_string()))
        .collect();
    announced.sort();
    let mut holders: Vec<(String, String)> =
        ss::port_holders(&listed).iter().map(|s| (s.proto.clone(), s.local.port().to_string())).collect();
    holders.sort();
    assert_eq!(announced, holders, "ss:\n{listed:#?}");
    assert_eq!(listed.len(), 8, "3 sockets and an accepted child per family: {listed:#?}");
    assert!(listed.iter().all(|s| s.cookie.is_some()), "{listed:#?}");
    let truth = held.release().unwrap();
    assert!(truth.hold_problems((40000, 49999)).is_empty(), "{:#?}", truth.hold_problems((40000, 49999)));
    let left: Vec<_> = ss::list(&ns).unwrap().into_iter().filter(|s| s.state != "TIME-WAIT").collect();
    assert!(left.is_empty(), "still open after the release: {left:#?}");
}

#[test]
fn workload_rejects_unknown_scenarios() {
    let out = Command::new(WORKLOAD).arg("nope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}

fn sh(script: &str) -> Vec<OsString> {
    vec!["-c".into(), script.into()]
}

#[test]
fn missing_tracer_binary_is_a_clear_error() {
    let err =
        Tracer::start(Path::new("/nonexistent/port-trace"), &[], Duration::from_secs(1)).err().expect("must fail");
    assert!(err.to_string().contains("does not exist"), "{err:#}");
}

#[test]
fn tracer_without_header_fails_in_time() {
    let t0 = Instant::now();
    let err = Tracer::start(Path::new("/bin/sh"), &sh("sleep 5"), Duration::from_millis(500)).err().expect("must fail");
    assert!(err.to_string().contains("no header"), "{err:#}");
    assert!(t0.elapsed() < Duration::from_secs(5));

    // stderr first: the harness kills the process as soon as it has read
    // the bad first line, which must not race with the script's next write.
    let err = Tracer::start(Path::new("/bin/sh"), &sh("echo oops >&2; echo hello"), Duration::from_secs(5))
        .err()
        .expect("must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("hello") && msg.contains("oops"), "{msg}");
}

#[test]
fn tracer_is_stopped_with_sigint_and_every_line_collected() {
    let script = r#"
        trap 'echo "{\"type\":\"summary\"}"; exit 0' INT
        echo '{"type":"header","schema":1}'
        echo '{"type":"alloc","lport":1}'
        while :; do sleep 0.05; done"#;
    let t = Tracer::start(Path::new("/bin/sh"), &sh(script), Duration::from_secs(5)).unwrap();
    assert_eq!(t.header["schema"], 1);
    std::thread::sleep(Duration::from_millis(200));
    let out = t.stop(Duration::from_secs(5)).unwrap();
    assert!(out.status.success());
    assert_eq!(out.records.len(), 2, "{}", out.dump());
    assert!(out.exit_problems().is_empty(), "{:?}", out.exit_problems());
}

/// Reading records as they come: `wait_until` returns once its condition
/// holds (not before the record is there, not long after), says false on a
/// timeout, and what it read is still part of the output at the end.
#[test]
fn tracer_records_can_be_awaited_as_they_come() {
    let script = r#"
        trap 'echo "{\"type\":\"summary\"}"; exit 0' INT
        echo '{"type":"header","schema":1}'
        echo '{"type":"alloc","lport":1}'
        sleep 0.3
        echo '{"type":"release","lport":1}'
        while :; do sleep 0.05; done"#;
    let mut t = Tracer::start(Path::new("/bin/sh"), &sh(script), Duration::from_secs(5)).unwrap();
    let t0 = Instant::now();
    assert!(t.wait_until(Duration::from_secs(5), |r| r.iter().any(|v| v["type"] == "release")));
    let waited = t0.elapsed();
    assert!((Duration::from_millis(200)..Duration::from_secs(2)).contains(&waited), "waited {waited:?}");
    assert_eq!(t.records_so_far().len(), 2);
    let t0 = Instant::now();
    assert!(!t.wait_until(Duration::from_millis(200), |r| r.len() > 2));
    assert!(t0.elapsed() >= Duration::from_millis(200));
    let out = t.stop(Duration::from_secs(5)).unwrap();
    let types: Vec<&str> = out.records.iter().map(|v| v["type"].as_str().unwrap_or("?")).collect();
    assert_eq!(types, ["alloc", "release", "summary"], "{}", out.dump());
}

#[test]
fn tracer_ignoring_sigint_is_killed_and_fails() {
    let script = r#"
        trap '' INT
        echo '{"type":"header"}'
        while :; do sleep 0.05; done"#;
    let t = Tracer::start(Path::new("/bin/sh"), &sh(script), Duration::from_secs(5)).unwrap();
    let pid = t.pid();
    let err = t.stop(Duration::from_millis(500)).expect_err("must fail");
    assert!(err.to_string().contains("did not exit"), "{err:#}");
    // SAFETY: signal 0 only checks existence.
    assert_ne!(unsafe { libc::kill(pid as i32, 0) }, 0, "pid {pid} still alive");
}

#[test]
fn tracer_non_json_line_and_bad_exit_are_reported() {
    let script = r#"
        trap 'echo "not json"; exit 3' INT
        echo '{"type":"header"}'
        while :; do sleep 0.05; done"#;
    let t = Tracer::start(Path::new("/bin/sh"), &sh(script), Duration::from_secs(5)).unwrap();
    let err = t.stop(Duration::from_secs(5)).expect_err("must fail");
    assert!(err.to_string().contains("not json"), "{err:#}");

    let script = r#"
        trap 'printf "{\"type\":\"alloc\"}"; exit 3' INT
        echo '{"type":"header"}'
        while :; do sleep 0.05; done"#;
    let t = Tracer::start(Path::new("/bin/sh"), &sh(script), Duration::from_secs(5)).unwrap();
    let out = t.stop(Duration::from_secs(5)).unwrap();
    let p = out.exit_problems();
    assert_eq!(p.len(), 3, "{p:?}"); // exit 3, no summary, unterminated line
}

#[test]
fn tracer_is_stopped_with_sigterm_or_ends_by_itself() {
    let script = r#"
        trap 'echo "{\"type\":\"summary\",\"by\":\"term\"}"; exit 0' TERM
        echo '{"type":"header"}'
        while :; do sleep 0.05; done"#;
    let t = Tracer::start(Path::new("/bin/sh"), &sh(script), Duration::from_secs(5)).unwrap();
    let out = t.terminate(Duration::from_secs(5)).unwrap();
    assert!(out.exit_problems().is_empty(), "{:?}", out.exit_problems());
    assert_eq!(out.records[0]["by"], "term");

    let script = r#"
        echo '{"type":"header"}'
        sleep 0.3
        echo '{"type":"summary"}'"#;
    let t = Tracer::start(Path::new("/bin/sh"), &sh(script), Duration::from_secs(5)).unwrap();
    let out = t.wait(Duration::from_secs(5)).unwrap();
    assert!(out.exit_problems().is_empty(), "{:?}", out.exit_problems());
    assert!(out.ran_for >= Duration::from_millis(300), "{:?}", out.ran_for);

    let t = Tracer::start(Path::new("/bin/sh"), &sh("echo '{\"type\":\"header\"}'; sleep 5"), Duration::from_secs(5))
        .unwrap();
    let err = t.wait(Duration::from_millis(300)).expect_err("must time out");
    assert!(err.to_string().contains("no signal sent"), "{err:#}");
}

#[test]
fn text_tracer_lines_are_kept_unparsed() {
    let script = r#"
        trap 'echo "port-trace: 0 alloc" >&2; exit 0' INT
        echo 'TIME  EVENT'
        echo '12:00 alloc {not json'
        while :; do sleep 0.05; done"#;
    let t = Tracer::start_text(Path::new("/bin/sh"), &sh(script), Duration::from_secs(5)).unwrap();
    assert_eq!(t.first_line(), "TIME  EVENT");
    std::thread::sleep(Duration::from_millis(200));
    let out = t.stop(Duration::from_secs(5)).unwrap();
    assert!(out.status.success());
    assert!(out.records.is_empty() && out.header.is_null());
    assert_eq!(out.lines.len(), 2, "{}", out.dump());
    assert!(out.stderr.contains("port-trace: 0 alloc"), "{}", out.stderr);
}
