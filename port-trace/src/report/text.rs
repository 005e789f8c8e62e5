//! The report for a person: aligned sections on a terminal.

use std::fmt::Write;

use super::analysis::{HoldStats, Report};
use crate::output::human_duration;

/// Replaces control characters (from process names, say) so that they
/// cannot drive the terminal.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// `HH:MM:SS.mmm` of an RFC 3339 time.
fn clock(rfc3339: &str) -> &str {
    rfc3339.get(11..23).unwrap_or(rfc3339)
}

fn seconds(s: Option<f64>) -> String {
    match s {
        // `human_duration` would say 0us.
        Some(s) if s.is_finite() && s >= 0.0 => match (s * 1e9).round() as u64 {
            0 => "0s".into(),
            ns => human_duration(ns),
        },
        _ => "-".into(),
    }
}

/// A one-line chart of `values` squeezed into at most `width` characters
/// (each the maximum of the values it covers).
pub fn sparkline(values: &[u64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if values.is_empty() || width == 0 {
        return String::new();
    }
    let per = values.len().div_ceil(width);
    let cells: Vec<u64> = values.chunks(per).map(|c| c.iter().copied().max().unwrap_or(0)).collect();
    let max = cells.iter().copied().max().unwrap_or(0);
    cells.iter().map(|&v| if max == 0 || v == 0 { ' ' } else { BARS[((v * 7).div_ceil(max)) as usize] }).collect()
}

fn hold_row(out: &mut String, label: &str, h: &HoldStats) {
    let _ = writeln!(
        out,
        "  {:<22} {:>8} {:>9} {:>9} {:>9} {:>9}",
        label,
        h.count,
        seconds(h.p50),
        seconds(h.p90),
        seconds(h.p99),
        seconds(h.max)
    );
}

/// Renders the report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let o = &mut out;
    let _ = writeln!(o, "port-trace report: {}", printable(&r.files.join(", ")));
    match (&r.start, &r.end) {
        (Some(start), Some(end)) => {
            let _ = writeln!(o, "window: {start} .. {end} ({})", seconds(Some(r.duration_s)));
        }
        _ => {
            let _ = writeln!(o, "window: the recording holds no records");
        }
    }
    for run in &r.runs {
        let range = run.ephemeral_range.map(|[lo, hi]| format!("{lo}-{hi}")).unwrap_or_else(|| "?".into());
        let _ = writeln!(
            o,
            "run: started {}, kernel {}, backend {}, ephemeral range {range}",
            run.started.as_deref().unwrap_or("?"),
            printable(run.kernel.as_deref().unwrap_or("?")),
            printable(run.backend.as_deref().unwrap_or("?"))
        );
    }

    let _ = writeln!(o, "\nTOTALS");
    let at = |when: &Option<String>| when.as_deref().map(|t| format!("at {}", clock(t))).unwrap_or_default();
    let rows: [(&str, u64, String); 11] = [
        ("allocations", r.allocations, format!("{:.2}/s", r.allocations_per_s)),
        ("releases", r.releases, format!("{:.2}/s", r.releases_per_s)),
        ("failed allocations", r.alloc_failures, String::new()),
        ("ports held at start", r.ports_at_start, "(sockets that existed when tracing began)".into()),
        ("unpaired releases", r.unpaired_releases, "(allocated before the recording)".into()),
        ("missed releases", r.missed_releases, "(release not recorded: lost events)".into()),
        ("still held at end", r.held_at_end, String::new()),
        ("peak ports in use", r.peak_ports_in_use, at(&r.peak_ports_in_use_at)),
        ("TIME_WAIT peak", r.time_wait_peak, at(&r.time_wait_peak_at)),
        ("lost events", r.lost, if r.lost > 0 { "(counts are lower bounds)".into() } else { String::new() }),
        ("unreadable lines", r.bad_lines, String::new()),
    ];
    for (label, value, note) in rows {
        // Trailing spaces of an empty note are trimmed at the end.
        let _ = writeln!(o, "  {label:<22} {value:>8}  {note}");
    }
    if !r.releases_by_reason.is_empty() {
        let reasons: Vec<String> = r.releases_by_reason.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(o, "  {:<22} {}", "releases by reason", reasons.join(", "));
    }
    if !r.failures_by_errno.is_empty() {
        let errnos: Vec<String> = r.failures_by_errno.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(o, "  {:<22} {}", "failures by errno", errnos.join(", "));
    }

    let _ = writeln!(o, "\nCHURN (per {} bucket)", seconds(Some(r.series.bucket_s)));
    let allocs: Vec<u64> = r.series.churn.iter().map(|p| p.allocations).collect();
    let releases: Vec<u64> = r.series.churn.iter().map(|p| p.releases).collect();
    let failures: Vec<u64> = r.series.churn.iter().map(|p| p.failures).collect();
    for (label, values) in [("allocations", &allocs), ("releases", &releases), ("failures", &failures)] {
        let (busiest, when) = values
            .iter()
            .enumerate()
            .max_by_key(|(i, v)| (**v, std::cmp::Reverse(*i)))
            .map_or((0, 0), |(i, v)| (*v, i));
        let peak = if busiest > 0 {
            format!("max {busiest} at +{}", seconds(Some(r.series.churn[when].t)))
        } else {
            "none".into()
        };
        let _ = writeln!(o, "  {label:<12} |{:<60}| {peak}", sparkline(values, 60));
    }
    let _ = writeln!(o, "  {:<12} |{:<60}| peak {}", "in use", sparkline(&r.series.in_use, 60), r.peak_ports_in_use);

    let _ = writeln!(o, "\nHOLD TIMES");
    let _ = writeln!(o, "  {:<22} {:>8} {:>9} {:>9} {:>9} {:>9}", "", "COUNT", "P50", "P90", "P99", "MAX");
    hold_row(o, "all", &r.hold_seconds);
    for (proto, h) in &r.hold_seconds_by_proto {
        hold_row(o, &format!("proto {proto}"), h);
    }
    for (origin, h) in &r.hold_seconds_by_origin {
        hold_row(o, &format!("origin {}", printable(origin)), h);
    }

    let _ = writeln!(o, "\nTOP COMMANDS");
    if r.top_comms.is_empty() {
        let _ = writeln!(o, "  none");
    } else {
        let _ = writeln!(
            o,
            "  {:<16} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "COMM", "ALLOCS", "RELEASES", "FAILURES", "HOLD P50", "HOLD MAX"
        );
        for c in &r.top_comms {
            let _ = writeln!(
                o,
                "  {:<16} {:>9} {:>9} {:>9} {:>9} {:>9}",
                printable(&c.comm),
                c.allocations,
                c.releases,
                c.failures,
                seconds(c.hold_seconds.p50),
                seconds(c.hold_seconds.max)
            );
        }
    }

    let _ = writeln!(o, "\nTOP DESTINATIONS");
    if r.top_destinations.is_empty() {
        let _ = writeln!(o, "  none");
    } else {
        let _ = writeln!(
            o,
            "  {:<46} {:<5} {:>9} {:>9} {:>11}",
            "DESTINATION", "PROTO", "ALLOCS", "FAILURES", "PEAK IN USE"
        );
        for d in &r.top_destinations {
            let _ = writeln!(
                o,
                "  {:<46} {:<5} {:>9} {:>9} {:>11}",
                d.destination, d.proto, d.allocations, d.failures, d.peak_in_use
            );
        }
    }

    let _ = writeln!(o, "\nTIME_WAIT");
    let _ = writeln!(o, "  peak {} {}", r.time_wait_peak, at(&r.time_wait_peak_at));

    let _ = writeln!(o, "\nEXHAUSTION WINDOWS (EADDRNOTAVAIL/EAGAIN, failures < 1s apart merged)");
    if r.exhaustion_windows.is_empty() {
        let _ = writeln!(o, "  none");
    } else {
        let _ = writeln!(o, "  {:<12} {:<12} {:>9}  DESTINATIONS / COMMANDS", "START", "END", "FAILURES");
        for w in &r.exhaustion_windows {
            let list = |items: &[super::analysis::NamedCount]| {
                items.iter().map(|n| format!("{} ({})", printable(&n.name), n.count)).collect::<Vec<_>>().join(", ")
            };
            let _ = writeln!(
                o,
                "  {:<12} {:<12} {:>9}  {} / {}",
                clock(&w.start),
                clock(&w.end),
                w.failures,
                list(&w.destinations),
                list(&w.comms)
            );
        }
        if r.exhaustion_windows_total > r.exhaustion_windows.len() as u64 {
            let _ = writeln!(o, "  ... and {} more", r.exhaustion_windows_total - r.exhaustion_windows.len() as u64);
        }
    }

    if !r.pressure_peaks.is_empty() {
        let _ = writeln!(o, "\nRANGE PRESSURE (highest per destination)");
        for p in &r.pressure_peaks {
            let used = match (p.used, p.capacity) {
                (Some(u), Some(c)) => format!("{u}/{c}"),
                _ => String::new(),
            };
            let _ = writeln!(o, "  {:<46} {:>5.1}% {:>13} at {}", p.destination, p.ratio * 100.0, used, clock(&p.at));
        }
    }
    if !r.notices.is_empty() {
        let _ = writeln!(o, "\nNOTICES");
        for (kind, count) in &r.notices {
            let _ = writeln!(o, "  {:<22} {count:>8}", printable(kind));
        }
    }

    let _ = writeln!(o, "\nLOST EVENTS AND UNREADABLE LINES");
    if r.lost > 0 {
        let _ = writeln!(
            o,
            "  {} events lost by the kernel (ring buffer full): the figures above are lower bounds",
            r.lost
        );
    } else {
        let _ = writeln!(o, "  no events lost");
    }
    if r.bad_lines == 0 {
        let _ = writeln!(o, "  every line was read");
    } else {
        let _ = writeln!(o, "  {} lines could not be read:", r.bad_lines);
        for b in r.unreadable_lines.iter().take(super::MAX_PRINTED_BAD_LINES) {
            let _ = writeln!(o, "    {}:{}: {}", printable(&b.file), b.line, printable(&b.reason));
        }
        if r.bad_lines > r.unreadable_lines.len().min(super::MAX_PRINTED_BAD_LINES) as u64 {
            let _ = writeln!(o, "    ...");
        }
    }
    for note in &r.notes {
        let _ = writeln!(o, "  note: {}", printable(note));
    }
    out.lines().map(str::trim_end).collect::<Vec<_>>().join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::analysis::{analyze, CommStats, Query};
    use crate::report::reader::tests::{event, HEADER};
    use crate::report::reader::{LineParser, Recording};

    fn report() -> Report {
        let mut parser = LineParser::new();
        let lines = [
            HEADER.to_string(),
            event(
                "alloc",
                "2026-11-26T06:40:01Z",
                "tcp",
                40000,
                Some(("10.0.0.1", 443)),
                1,
                "curl",
                1,
                r#","origin":"connect","ephemeral":true"#,
            ),
            event(
                "release",
                "2026-11-26T06:40:03.5Z",
                "tcp",
                40000,
                Some(("10.0.0.1", 443)),
                1,
                "curl",
                1,
                r#","reason":"close","held_ns":2500000000"#,
            ),
            event(
                "alloc_fail",
                "2026-11-26T06:40:04Z",
                "tcp",
                0,
                Some(("10.0.0.1", 443)),
                1,
                "curl",
                2,
                r#","errno":"EADDRNOTAVAIL","origin":"connect""#,
            ),
        ];
        let rec = Recording {
            lines: lines.iter().map(|l| parser.parse(l.as_bytes()).unwrap()).collect(),
            ..Recording::default()
        };
        analyze(&rec, &Query::default()).unwrap()
    }

    #[test]
    fn sections_and_figures() {
        let text = render(&report());
        for section in [
            "TOTALS",
            "CHURN",
            "HOLD TIMES",
            "TOP COMMANDS",
            "TOP DESTINATIONS",
            "TIME_WAIT",
            "EXHAUSTION WINDOWS",
            "LOST",
        ] {
            assert!(text.contains(section), "missing {section}:\n{text}");
        }
        assert!(text.contains("  allocations                   1  0.25/s"), "{text}");
        assert!(text.contains("  peak ports in use             1  at 06:40:01.000"), "{text}");
        let curl = text.lines().find(|l| l.starts_with("  curl")).unwrap();
        assert_eq!(curl, "  curl                     1         1         1      2.5s      2.5s");
        assert!(text.contains("10.0.0.1:443"));
        assert!(text.contains("06:40:04.000 06:40:04.000         1  10.0.0.1:443 (1) / curl (1)"), "{text}");
        assert!(text.lines().all(|l| l == l.trim_end()), "no trailing spaces");
    }

    #[test]
    fn control_characters_are_neutralised() {
        let mut r = report();
        r.top_comms[0] = CommStats { comm: "evil\x1b[2J".into(), ..r.top_comms[0].clone() };
        let text = render(&r);
        assert!(!text.contains('\x1b'));
        assert!(text.contains("evil?[2J"));
    }

    #[test]
    fn sparkline_scales_to_the_maximum() {
        assert_eq!(sparkline(&[0, 1, 2, 4], 10), " ▃▅█");
        assert_eq!(sparkline(&[1, 0, 0, 8], 2), "▂█");
        assert_eq!(sparkline(&[], 5), "");
    }
}
