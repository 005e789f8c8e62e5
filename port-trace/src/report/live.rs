//! `port-trace report --duration D` without a file: trace live for D (or
//! until Ctrl-C), then report on what was seen, as if it had been recorded.
//!
//! The trace goes through the same path as `record` (JSON Lines into a
//! private file, here an unlinked temporary one), so a live report and a
//! report on a recording of the same events say the same.

use std::io;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{reader, ReportArgs};
use crate::cli::TraceArgs;
use crate::live::Plan;
use crate::output::{Format, Output};
use crate::recording::{RecordFileOptions, RecordWriter};
use crate::watch::LineFrontend;
use crate::UsageError;

/// The trace options a live report runs with: its selection (also applied
/// in the kernel where it can be), its duration and backend.
fn trace_args(args: &ReportArgs) -> TraceArgs {
    let mut trace = TraceArgs::defaults();
    trace.select = args.select.clone();
    trace.duration = args.duration;
    trace.backend = args.backend;
    trace
}

/// Removes the temporary recording however the run ends.
struct TempRecording(PathBuf);

impl Drop for TempRecording {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs a live report.
pub async fn run(args: ReportArgs) -> Result<()> {
    let query = args.query()?;
    let plan = Plan::new(&trace_args(&args))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let path = std::env::temp_dir().join(format!("port-trace-report-{}-{nanos}.jsonl", std::process::id()));
    let writer = RecordWriter::create(&RecordFileOptions::new(&path)).map_err(|e| UsageError(e.to_string()))?;
    let temp = TempRecording(path);
    let session = plan.load()?;
    eprintln!(
        "port-trace: tracing{} for the report; Ctrl-C ends it early",
        args.duration.map(|d| format!(" for {}", humantime::format_duration(d))).unwrap_or_default()
    );
    let output =
        Output::new(Box::new(io::BufWriter::with_capacity(64 * 1024, writer)), Format::Json, false, session.clock);
    let mut frontend = LineFrontend::new(output);
    session.run(&mut frontend).await?;
    drop(frontend);

    let recording = reader::read_recordings(std::slice::from_ref(&temp.0))
        .with_context(|| format!("reading back the live trace {}", temp.0.display()))?;
    drop(temp);
    let mut report = super::analyze_reporting_bad_lines(&recording, &query)?;
    // The temporary file is gone: name what was read instead.
    report.files = vec!["(live trace)".to_string()];
    super::write_report(&args, &report, &mut io::stdout().lock())
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use super::*;

    #[test]
    fn filters_and_duration_reach_the_trace() {
        let args = parse(&["-d", "5s", "-c", "curl", "-P", "80", "--proto", "tcp", "-4"]).unwrap();
        assert!(args.files.is_empty());
        let trace = trace_args(&args);
        assert_eq!(trace.duration, Some(std::time::Duration::from_secs(5)));
        assert_eq!(trace.select.comm.as_deref(), Some("curl"));
        assert!(trace.select.ipv4 && !trace.select.ipv6);
        assert!(trace.select.ports.is_some() && trace.select.proto.is_some());
    }

    #[test]
    fn a_report_needs_files_or_a_duration() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["-d", "1s"]).is_ok());
        assert!(parse(&["a.jsonl"]).is_ok());
    }
}
