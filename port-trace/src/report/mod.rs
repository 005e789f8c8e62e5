//! `port-trace report`: forensics on recordings. [`reader`] reads the
//! files, [`analysis`] turns lines into figures, [`text`] and [`html`] show
//! them; `--format json` prints the [`analysis::Report`] as one object.

pub mod analysis;
pub mod html;
pub mod live;
pub mod reader;
pub mod text;

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::SelectArgs;
use crate::output::Format;
use crate::recording::create_private_file;
use crate::UsageError;
use analysis::{parse_time_bound, Query, TimeBound};
use reader::Recording;

/// Bad lines printed on stderr before "... and N more".
pub const MAX_PRINTED_BAD_LINES: usize = 20;

fn top(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err(format!("'{text}': --top takes a number from 1 to 1000")),
    }
}

/// `report` options.
#[derive(Clone, Debug, Args)]
pub struct ReportArgs {
    /// Recordings (JSON Lines, plain or .zst); a file's rotated parts
    /// (FILE.1, FILE.2, ... or STEM.1.zst, ...) are read with it, oldest
    /// first. Without a file, --duration traces live and reports on that.
    #[arg(value_name = "FILE", required_unless_present = "duration")]
    pub files: Vec<PathBuf>,
    /// With no FILE: trace live for this long (30s, 5m; Ctrl-C ends it
    /// early), then report.
    #[arg(short = 'd', long, value_name = "DURATION", value_parser = crate::cli::parse_duration, conflicts_with = "files")]
    pub duration: Option<std::time::Duration>,
    /// With --duration: which hooks to use.
    #[arg(long, value_enum, default_value = "auto", requires = "duration")]
    pub backend: crate::cli::BackendArg,
    /// Output format.
    #[arg(short = 'f', long, value_enum, default_value = "text")]
    pub format: Format,
    /// Also write one self-contained HTML page with the plots to FILE
    /// (created 0600; an existing file is kept unless --force).
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Overwrite the --html file if it exists.
    #[arg(long, requires = "html")]
    pub force: bool,
    /// Which sockets.
    #[command(flatten)]
    pub select: SelectArgs,
    /// Start at this time (RFC 3339, UTC unless an offset is given), or this
    /// long before the end of the recording (10m, 1h).
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_time_bound)]
    pub since: Option<TimeBound>,
    /// End at this time, or this long before the end of the recording.
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_time_bound)]
    pub until: Option<TimeBound>,
    /// Length of the top lists (commands, destinations).
    #[arg(long, value_name = "N", default_value = "10", value_parser = top)]
    pub top: usize,
}

impl ReportArgs {
    /// The query these options describe (`--netns` paths resolved here).
    pub fn query(&self) -> Result<Query> {
        let netns = match &self.select.netns {
            Some(arg) => Some(crate::system::resolve_netns(arg).map_err(|e| UsageError(format!("{e:#}")))?),
            None => None,
        };
        Ok(Query { filter: self.select.filter(None), netns, since: self.since, until: self.until, top: self.top })
    }
}

/// The lines telling what could not be read, for stderr: at most
/// [`MAX_PRINTED_BAD_LINES`] lines, then how many more.
pub fn bad_line_messages(recording: &Recording) -> Vec<String> {
    let mut messages: Vec<String> = recording
        .bad_lines
        .iter()
        .take(MAX_PRINTED_BAD_LINES)
        .map(|b| format!("port-trace: {}:{}: skipped: {}", b.file.display(), b.line, b.reason))
        .collect();
    let shown = messages.len() as u64;
    if recording.bad_line_count > shown {
        messages.push(format!("port-trace: ... and {} more unreadable lines", recording.bad_line_count - shown));
    }
    messages.extend(recording.notes.iter().map(|n| format!("port-trace: note: {n}")));
    messages
}

/// Runs `report`: reads, analyses, prints (text or JSON) on stdout and
/// writes the `--html` page. Usage mistakes are [`UsageError`]s (exit 2);
/// unreadable files fail the run (exit 1); unreadable lines are listed on
/// stderr and counted.
pub fn run(args: ReportArgs) -> Result<()> {
    run_to(args, &mut io::stdout().lock())
}

/// [`run`], printing the report to `out`.
pub fn run_to(args: ReportArgs, out: &mut dyn Write) -> Result<()> {
    let query = args.query()?;
    let recording = reader::read_recordings(&args.files)?;
    let report = analyze_reporting_bad_lines(&recording, &query)?;
    write_report(&args, &report, out)
}

/// Analyses a recording after naming its unreadable lines on stderr.
fn analyze_reporting_bad_lines(recording: &Recording, query: &Query) -> Result<analysis::Report> {
    for message in bad_line_messages(recording) {
        eprintln!("{message}");
    }
    Ok(analysis::analyze(recording, query).map_err(UsageError)?)
}

/// Writes the `--html` page, then the report in the chosen format to `out`.
fn write_report(args: &ReportArgs, report: &analysis::Report, out: &mut dyn Write) -> Result<()> {
    if let Some(path) = &args.html {
        let mut file = create_private_file(path, args.force).map_err(|e| {
            if e.is_usage() {
                anyhow::Error::new(UsageError(e.to_string()))
            } else {
                anyhow::Error::new(e)
            }
        })?;
        file.write_all(html::render(report).as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    let body = match args.format {
        Format::Text => text::render(report),
        Format::Json => serde_json::to_string_pretty(report)? + "\n",
    };
    match out.write_all(body.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use clap::Parser;

    use super::reader::tests::{event, HEADER};
    use super::*;
    use crate::model::{Family, Proto};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReportArgs,
    }

    /// `report ARGS...` parsed as the CLI parses it.
    pub(crate) fn parse(args: &[&str]) -> Result<ReportArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("report").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn options_parse_into_a_query() {
        let args = parse(&[
            "a.jsonl",
            "b.jsonl.zst",
            "-f",
            "json",
            "-p",
            "1,2",
            "-c",
            "curl",
            "-P",
            "80,1000-2000",
            "--proto",
            "udp",
            "-6",
            "--netns",
            "4026531840",
            "--ephemeral-only",
            "--since",
            "10m",
            "--until",
            "2026-11-26T06:40:00Z",
            "--top",
            "3",
        ])
        .unwrap();
        assert_eq!(args.files.len(), 2);
        assert_eq!(args.format, Format::Json);
        let q = args.query().unwrap();
        assert_eq!(q.filter.pids, vec![1, 2]);
        assert_eq!(q.filter.comm.as_deref(), Some("curl"));
        assert_eq!(q.filter.ports, vec![80..=80, 1000..=2000]);
        assert_eq!((q.filter.proto, q.filter.family), (Some(Proto::Udp), Some(Family::Ipv6)));
        assert!(q.filter.ephemeral_only);
        assert_eq!(q.netns, Some(4026531840));
        assert_eq!(q.since, Some(TimeBound::BeforeEnd(std::time::Duration::from_secs(600))));
        assert_eq!(q.until, Some(TimeBound::At(1_795_675_200_000_000_000)));
        assert_eq!(q.top, 3);
    }

    #[test]
    fn bad_options_are_usage_errors() {
        for args in [
            &[][..],
            &["a", "--since", "soon"],
            &["a", "--top", "0"],
            &["a", "-P", "0"],
            &["a", "-p", "x"],
            &["a", "-4", "-6"],
            &["a", "--force"],
            &["a", "-f", "xml"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} should fail"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let args = parse(&["a", "--netns", "/nonexistent/ns"]).unwrap();
        assert!(args.query().unwrap_err().downcast_ref::<UsageError>().is_some());
    }

    /// The whole path the lead wires: `Output` (JSON) → `RecordWriter`
    /// (zstd, rotating) → `read_recordings` → `analyze`.
    #[test]
    fn output_through_a_rotating_record_writer_reads_back() {
        use std::net::{IpAddr, Ipv4Addr};

        use crate::clock::BootClock;
        use crate::model::{Origin, ReleaseReason};
        use crate::output::{Header, Output, Summary};
        use crate::record::{PortRecord, PortRef, RecordBody};
        use crate::recording::{RecordFileOptions, RecordWriter};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl.zst");
        let writer = RecordWriter::create(&RecordFileOptions {
            rotate_size: Some(4096),
            rotate_count: 100,
            ..RecordFileOptions::new(&path)
        })
        .unwrap();
        let clock = BootClock::with_offset_ns(1_795_675_200_000_000_000);
        let mut out = Output::new(Box::new(io::BufWriter::new(writer)), Format::Json, false, clock);
        out.header(&Header {
            kernel: "6.18.44".into(),
            backend: "portable".into(),
            hooks: vec![],
            host: "test".into(),
            ephemeral_range: [32768, 60999],
            ranges: vec![],
            netns: None,
            started_boot_ns: 0,
        })
        .unwrap();
        let port = |sock: u64| PortRef {
            sock,
            netns: 4026531840,
            proto: Proto::Tcp,
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            lport: 40000 + sock as u16,
            raddr: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            rport: Some(443),
            pid: 42,
            comm: "curl".into(),
            cgroup: 1,
            ephemeral: Some(true),
        };
        // 200 connections, one every 100 ms, each held (sock % 7 + 1) * 50 ms.
        let mut records = Vec::new();
        for sock in 0..200u64 {
            let start = sock * 100_000_000;
            let held = (sock % 7 + 1) * 50_000_000;
            records.push(PortRecord {
                ts_ns: start,
                port: port(sock),
                body: RecordBody::Alloc { origin: Origin::Connect, ephemeral: true },
            });
            records.push(PortRecord {
                ts_ns: start + held,
                port: port(sock),
                body: RecordBody::Release {
                    reason: ReleaseReason::Close,
                    held_ns: Some(held),
                    origin: Some(Origin::Connect),
                    alloc_ts_ns: Some(start),
                },
            });
        }
        records.sort_by_key(|r| r.ts_ns);
        for (i, rec) in records.iter().enumerate() {
            out.record(rec).unwrap();
            if i % 50 == 0 {
                out.flush().unwrap();
            }
        }
        out.lost(21_000_000_000, 2).unwrap();
        out.summary(21_000_000_000, &Summary::default()).unwrap();
        out.flush().unwrap();
        drop(out);

        let parts = crate::recording::rotated_parts(&path);
        assert!(parts.len() >= 3, "{} parts", parts.len());
        let recording = reader::read_recordings(std::slice::from_ref(&path)).unwrap();
        assert_eq!(recording.bad_line_count, 0, "{:?}", recording.bad_lines);
        assert_eq!(recording.files.len(), parts.len() + 1);
        let report = analysis::analyze(&recording, &Query::default()).unwrap();
        assert_eq!((report.allocations, report.releases, report.lost), (200, 200, 2));
        assert_eq!(report.duration_s, 21.0);
        // Brute force: the most intervals [start, start + held) holding any
        // one allocation instant.
        let intervals: Vec<(u64, u64)> =
            (0..200u64).map(|s| (s * 100_000_000, s * 100_000_000 + (s % 7 + 1) * 50_000_000)).collect();
        let peak = intervals.iter().map(|&(t, _)| intervals.iter().filter(|(a, b)| *a <= t && t < *b).count()).max();
        assert_eq!(Some(report.peak_ports_in_use as usize), peak);
        assert!(report.peak_ports_in_use > 1);
        let max = report.hold_seconds.max.unwrap();
        assert!((max - 0.35).abs() < 1e-9, "{max}");
        assert_eq!(report.top_destinations[0].destination, "10.0.0.1:443");
        assert_eq!(report.top_comms[0].allocations, 200);
    }

    #[test]
    fn bad_lines_are_capped_on_stderr() {
        let mut rec = Recording::default();
        for line in 1..=25 {
            rec.bad_lines.push(reader::BadLine { file: "r.jsonl".into(), line, reason: "invalid JSON".into() });
        }
        rec.bad_line_count = 30;
        let messages = bad_line_messages(&rec);
        assert_eq!(messages.len(), 21);
        assert_eq!(messages[0], "port-trace: r.jsonl:1: skipped: invalid JSON");
        assert_eq!(messages[20], "port-trace: ... and 10 more unreadable lines");
    }

    #[test]
    fn run_writes_a_private_html_page_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("rec.jsonl");
        let alloc = event(
            "alloc",
            "2026-11-26T06:40:01Z",
            "tcp",
            40000,
            Some(("10.0.0.1", 443)),
            1,
            "curl",
            1,
            r#","origin":"connect","ephemeral":true"#,
        );
        fs::write(&rec, format!("{HEADER}\n{alloc}\n")).unwrap();
        let html = dir.path().join("report.html");
        let args = |extra: &[&str]| {
            let mut all = vec![rec.to_str().unwrap(), "-f", "json", "--html", html.to_str().unwrap()];
            all.extend_from_slice(extra);
            parse(&all).unwrap()
        };
        let mut out = Vec::new();
        run_to(args(&[]), &mut out).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["allocations"], 1);
        assert_eq!(json["peak_ports_in_use"], 1);
        assert_eq!(fs::metadata(&html).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(fs::read_to_string(&html).unwrap().contains("id=\"plot-churn\""));
        let err = run_to(args(&[]), &mut Vec::new()).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        assert!(err.to_string().contains("--force"), "{err:#}");
        run_to(args(&["--force"]), &mut Vec::new()).unwrap();

        let mut text = Vec::new();
        run_to(parse(&[rec.to_str().unwrap()]).unwrap(), &mut text).unwrap();
        assert!(String::from_utf8(text).unwrap().contains("allocations"));

        let missing = parse(&[dir.path().join("absent").to_str().unwrap()]).unwrap();
        let err = run_to(missing, &mut Vec::new()).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_none(), "an unreadable file exits 1");
        assert!(format!("{err:#}").contains("absent"));
    }
}
