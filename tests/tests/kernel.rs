//! Kernel tests: the real port-trace against real sockets.
//!
//! One traced run of `port-workload basic` in a private network namespace
//! (ephemeral range narrowed to [`RANGE`] so that the header's range is
//! checkably the namespace's) is shared by the tests below; each checks one
//! aspect of the tracer's output against what the workload itself saw.
//!
//! Needs root (see `require_root`); a missing tracer binary fails.
//! The tracer is `$PORT_TRACE_BIN`, else `target/debug/port-trace`.

use std::path::Path;
use std::sync::OnceLock;

use port_trace_integration::check::{self, HeaderTruth};
use port_trace_integration::{require_root, run_session, tracer_bin, Session};

/// The traced namespace's `ip_local_port_range`.
const RANGE: (u16, u16) = (40000, 49999);

/// The shared run, made by the first test that needs it.
fn session(test: &str) -> Option<&'static Session> {
    static SESSION: OnceLock<Result<Session, String>> = OnceLock::new();
    if !require_root(test) {
        return None;
    }
    let run = SESSION.get_or_init(|| {
        let workload = Path::new(env!("CARGO_BIN_EXE_port-workload"));
        run_session(workload, "basic", Some(RANGE)).map_err(|e| format!("{e:#}"))
    });
    match run {
        Ok(s) => Some(s),
        Err(e) => panic!("the traced run of {} failed: {e}", tracer_bin().display()),
    }
}

#[test]
fn header_and_summary() {
    let Some(s) = session("header_and_summary") else {
        return;
    };
    let t = HeaderTruth {
        ephemeral_range: s.ephemeral_range,
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        window: s.window(),
    };
    let mut problems = check::check_header(&s.tracer.header, &t);
    problems.extend(s.tracer.exit_problems());
    problems.extend(check::check_summary(&s.tracer.records));
    eprintln!("header: {}", s.tracer.header);
    eprintln!("summary: {}", s.tracer.records.last().map(ToString::to_string).unwrap_or_default());
    assert!(
        problems.is_empty(),
        "header/summary problems:\n  {}\n\nstdout:\n{}\nstderr:\n{}",
        problems.join("\n  "),
        s.tracer.dump(),
        s.tracer.stderr
    );
}

#[test]
fn basic_lifecycles_match_workload_truth() {
    let Some(s) = session("basic_lifecycles_match_workload_truth") else {
        return;
    };
    let shape = s.truth.basic_problems(s.ephemeral_range);
    assert!(shape.is_empty(), "the workload did not do what `basic` promises: {shape:#?}");

    let mut report = check::check_lifecycles(&s.truth, &s.tracer.records, s.netns_inode);
    let schema = check::check_schema(&s.tracer.records, s.netns_inode, s.window());
    report.findings.extend(schema.findings);
    for p in s.tracer.exit_problems() {
        report.notes.push(format!("tracer exit: {p}"));
    }
    let exit_ok = s.tracer.exit_problems().is_empty();
    eprintln!("netns {} (inode {}):\n{report}", s.netns_name, s.netns_inode);
    assert!(
        report.ok() && exit_ok,
        "port-trace's records differ from the workload's truth in netns {} (inode {}):\n{report}\ntracer stderr:\n{}",
        s.netns_name,
        s.netns_inode,
        s.tracer.stderr
    );
}

#[test]
fn time_wait_handoff_is_reported_as_state() {
    let Some(s) = session("time_wait_handoff_is_reported_as_state") else {
        return;
    };
    let findings = check::check_time_wait_states(&s.truth, &s.tracer.records);
    let table: Vec<String> =
        findings.iter().map(|f| format!("{} {} {}: {}", f.kind, f.record, f.subject, f.detail)).collect();
    assert!(
        findings.is_empty() && s.truth.sockets.iter().any(|t| t.time_wait),
        "TIME_WAIT hand-offs the workload saw in the kernel but port-trace did not report as \
         state records:\n  {}\n\nstdout:\n{}",
        table.join("\n  "),
        s.tracer.dump()
    );
}
