//! The report as one self-contained HTML page: tables and three inline SVG
//! plots drawn here (no scripts, nothing fetched): churn over time
//! (`#plot-churn`), ports in use over time for the busiest pools
//! (`#plot-in-use`) and the hold-time distribution on a log scale
//! (`#plot-hold`). Every text from the recording is escaped.

use std::fmt::Write;

use super::analysis::{HoldStats, Report};
use crate::output::human_duration;

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
/// Room above the plot area for the title and [`LEGEND_ROWS`] rows of
/// legend.
const TOP: f64 = 60.0;
const BOTTOM: f64 = 48.0;
/// Legend rows under the title; entries that do not fit are counted in a
/// last "+N more".
const LEGEND_ROWS: usize = 2;
/// The first legend row's top, and the distance between rows.
const LEGEND_Y: f64 = 26.0;
const LEGEND_ROW_HEIGHT: f64 = 16.0;
/// An estimate of the width of one character of the legend (font-size 11).
const LEGEND_CHAR_WIDTH: f64 = 6.5;

/// Colours of series (none white, all visible on the white background).
const PALETTE: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"];

/// A round step that cuts `0..max` into about `parts` pieces.
fn nice_step(max: f64, parts: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / parts;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude);
    step.max(f64::MIN_POSITIVE)
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.2}")
    }
}

/// A plot area with linear axes from 0 to `x_max` and `y_max`.
struct Plot {
    svg: String,
    x_max: f64,
    y_max: f64,
}

impl Plot {
    fn new(title: &str, x_label: &str, y_label: &str, x_max: f64, y_max: f64, x_ticks: Vec<(f64, String)>) -> Self {
        let y_step = nice_step(y_max, 5.0);
        let y_max = ((y_max / y_step).ceil() * y_step).max(y_step);
        let x_max = if x_max > 0.0 { x_max } else { 1.0 };
        let mut plot = Plot { svg: String::new(), x_max, y_max };
        let s = &mut plot.svg;
        let _ = write!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{}">"##,
            escape(title)
        );
        let _ = write!(s, r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#fcfcfc" stroke="#cccccc"/>"##);
        let _ = write!(
            s,
            r##"<text x="{}" y="18" font-size="14" font-weight="bold" fill="#222222">{}</text>"##,
            LEFT,
            escape(title)
        );
        // Grid and y ticks.
        let mut y = 0.0;
        while y <= y_max + y_step / 2.0 {
            let py = plot_y(y, y_max);
            let _ = write!(
                s,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" fill="#333333">{}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                py + 4.0,
                number(y)
            );
            y += y_step;
        }
        for (x, label) in x_ticks {
            let px = LEFT + x / x_max * (WIDTH - LEFT - RIGHT);
            let _ = write!(
                s,
                r##"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="#333333"/><text x="{px:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="#333333">{}</text>"##,
                HEIGHT - BOTTOM,
                HEIGHT - BOTTOM + 5.0,
                HEIGHT - BOTTOM + 18.0,
                escape(&label)
            );
        }
        // Axes and their labels.
        let _ = write!(
            s,
            r##"<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="#333333"/><line class="axis" x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333333"/>"##,
            HEIGHT - BOTTOM,
            HEIGHT - BOTTOM,
            WIDTH - RIGHT,
            HEIGHT - BOTTOM
        );
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle" fill="#333333">{}</text>"##,
            LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
            HEIGHT - 8.0,
            escape(x_label)
        );
        let _ = write!(
            s,
            r##"<text x="14" y="{:.1}" font-size="12" text-anchor="middle" fill="#333333" transform="rotate(-90 14 {:.1})">{}</text>"##,
            TOP + (HEIGHT - TOP - BOTTOM) / 2.0,
            TOP + (HEIGHT - TOP - BOTTOM) / 2.0,
            escape(y_label)
        );
        plot
    }

    fn x(&self, x: f64) -> f64 {
        LEFT + x / self.x_max * (WIDTH - LEFT - RIGHT)
    }

    fn line(&mut self, class: &str, color: &str, points: &[(f64, f64)], dashed: bool) {
        if points.is_empty() {
            return;
        }
        let coords: Vec<String> =
            points.iter().map(|&(x, y)| format!("{:.1},{:.1}", self.x(x), plot_y(y, self.y_max))).collect();
        let dash = if dashed { r#" stroke-dasharray="5 3""# } else { "" };
        let _ = write!(
            self.svg,
            r#"<polyline class="{class}" fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{}"/>"#,
            coords.join(" ")
        );
    }

    /// The legend in rows under the title, left to right (never over the
    /// title, whatever the labels' lengths).
    fn legend(&mut self, entries: &[(String, &str)]) {
        let right = WIDTH - RIGHT;
        let max_chars = ((right - LEFT - 22.0) / LEGEND_CHAR_WIDTH) as usize;
        let width = |label: &str| 22.0 + LEGEND_CHAR_WIDTH * label.chars().count() as f64;
        // (x, row, label, color) of the entries that fit.
        let mut placed: Vec<(f64, usize, String, &str)> = Vec::new();
        let (mut x, mut row) = (LEFT, 0);
        for (label, color) in entries {
            let label: String = if label.chars().count() > max_chars {
                label.chars().take(max_chars.saturating_sub(1)).chain(std::iter::once('\u{2026}')).collect()
            } else {
                label.clone()
            };
            if x + width(&label) > right && x > LEFT {
                (x, row) = (LEFT, row + 1);
            }
            if row >= LEGEND_ROWS {
                break;
            }
            placed.push((x, row, label.clone(), *color));
            x += width(&label);
        }
        let mut hidden = entries.len() - placed.len();
        let mut more_at = None;
        while hidden > 0 {
            let (end, row) = placed.last().map_or((LEFT, 0), |(x, row, label, _)| (x + width(label), *row));
            if end + width(&format!("+{hidden} more")) - 16.0 <= right || placed.is_empty() {
                more_at = Some((end, row));
                break;
            }
            placed.pop();
            hidden += 1;
        }
        for (x, row, label, color) in &placed {
            let y = LEGEND_Y + *row as f64 * LEGEND_ROW_HEIGHT;
            let _ = write!(
                self.svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="12" height="12" fill="{color}" stroke="{color}"/><text x="{:.1}" y="{:.1}" font-size="11" fill="{color}">{}</text>"#,
                x + 16.0,
                y + 10.0,
                escape(label)
            );
        }
        if let Some((x, row)) = more_at {
            let _ = write!(
                self.svg,
                r##"<text x="{x:.1}" y="{:.1}" font-size="11" fill="#555555">+{hidden} more</text>"##,
                LEGEND_Y + row as f64 * LEGEND_ROW_HEIGHT + 10.0
            );
        }
    }

    fn no_data(&mut self) {
        let _ = write!(
            self.svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle" fill="#777777">no data in this window</text>"##,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
    }

    fn finish(mut self) -> String {
        self.svg.push_str("</svg>");
        self.svg
    }
}

fn plot_y(y: f64, y_max: f64) -> f64 {
    HEIGHT - BOTTOM - y / y_max * (HEIGHT - TOP - BOTTOM)
}

/// At most eight time ticks over `0..span` seconds, on round durations,
/// labelled like `+1m 30s`.
fn time_ticks(span: f64) -> Vec<(f64, String)> {
    const STEPS: [u64; 17] = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200];
    let span = if span.is_finite() { span.max(0.0) } else { 0.0 };
    let step = STEPS
        .iter()
        .copied()
        .find(|s| span / *s as f64 <= 8.0)
        .unwrap_or_else(|| ((span / 8.0 / 86400.0).ceil() as u64).max(1) * 86400);
    (0..=(span / step as f64) as u64)
        .map(|i| {
            let t = i * step;
            (t as f64, format!("+{}", humantime::format_duration(std::time::Duration::from_secs(t))))
        })
        .collect()
}

fn churn_plot(r: &Report) -> String {
    let churn = &r.series.churn;
    let span = churn.last().map_or(0.0, |p| p.t + r.series.bucket_s);
    let y_max = churn.iter().map(|p| p.allocations.max(p.releases).max(p.failures)).max().unwrap_or(0) as f64;
    let mut plot = Plot::new(
        "Churn: allocations and releases per bucket",
        &format!(
            "time since {} ({} buckets)",
            r.start.as_deref().unwrap_or("start"),
            human_duration((r.series.bucket_s * 1e9) as u64)
        ),
        "ports per bucket",
        span,
        y_max,
        time_ticks(span),
    );
    if y_max == 0.0 {
        plot.no_data();
    }
    // Each bucket's value drawn across its width (a step line).
    let steps = |value: &dyn Fn(usize) -> u64| -> Vec<(f64, f64)> {
        churn
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                let v = value(i) as f64;
                [(p.t, v), (p.t + r.series.bucket_s, v)]
            })
            .collect()
    };
    plot.line("allocations", PALETTE[0], &steps(&|i| churn[i].allocations), false);
    plot.line("releases", PALETTE[1], &steps(&|i| churn[i].releases), false);
    let any_failures = churn.iter().any(|p| p.failures > 0);
    if any_failures {
        plot.line("failures", "#d62728", &steps(&|i| churn[i].failures), true);
    }
    let mut legend = vec![("allocations".to_string(), PALETTE[0]), ("releases".to_string(), PALETTE[1])];
    if any_failures {
        legend.push(("failed allocations".to_string(), "#d62728"));
    }
    plot.legend(&legend);
    plot.finish()
}

fn in_use_plot(r: &Report) -> String {
    let series = &r.series;
    let span = series.in_use.len() as f64 * series.bucket_s;
    let y_max = series.in_use.iter().copied().max().unwrap_or(0) as f64;
    let mut plot = Plot::new(
        "Ports in use: all, and the busiest pools (most in use per bucket)",
        &format!("time since {}", r.start.as_deref().unwrap_or("start")),
        "ports in use",
        span,
        y_max,
        time_ticks(span),
    );
    if y_max == 0.0 {
        plot.no_data();
    }
    let steps = |values: &[u64]| -> Vec<(f64, f64)> {
        values
            .iter()
            .enumerate()
            .flat_map(|(i, &v)| {
                let t = i as f64 * series.bucket_s;
                [(t, v as f64), (t + series.bucket_s, v as f64)]
            })
            .collect()
    };
    plot.line("in-use-all", "#444444", &steps(&series.in_use), true);
    let mut legend = vec![("all".to_string(), "#444444")];
    for (i, pool) in series.pools.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        plot.line("in-use-pool", color, &steps(&pool.points), false);
        legend.push((format!("{} {}", pool.destination, pool.proto), color));
    }
    plot.legend(&legend);
    plot.finish()
}

fn hold_plot(r: &Report) -> String {
    let bins = &r.hold_histogram;
    let y_max = bins.iter().map(|b| b.count).max().unwrap_or(0) as f64;
    let n = bins.len().max(1) as f64;
    // One tick per decade (every fourth quarter-decade bin edge).
    let ticks: Vec<(f64, String)> = bins
        .iter()
        .enumerate()
        .filter(|(_, b)| {
            let decades = (b.from_s / 1e-6).log10();
            (decades - decades.round()).abs() < 1e-6
        })
        .map(|(i, b)| (i as f64, human_duration((b.from_s * 1e9).round() as u64)))
        .collect();
    let mut plot = Plot::new(
        "Hold time: how long ports were held (log scale, four bins per decade)",
        "time from allocation to release",
        "ports released",
        n,
        y_max,
        ticks,
    );
    if bins.is_empty() {
        plot.no_data();
    }
    for (i, b) in bins.iter().enumerate() {
        if b.count == 0 {
            continue;
        }
        let x0 = plot.x(i as f64) + 1.0;
        let x1 = plot.x(i as f64 + 1.0) - 1.0;
        let y = plot_y(b.count as f64, plot.y_max);
        let _ = write!(
            plot.svg,
            r#"<rect class="bar" x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}" stroke="{}"><title>{} to {}: {}</title></rect>"#,
            (x1 - x0).max(1.0),
            (HEIGHT - BOTTOM - y).max(0.0),
            PALETTE[2],
            PALETTE[2],
            human_duration((b.from_s * 1e9) as u64),
            human_duration((b.to_s * 1e9) as u64),
            b.count
        );
    }
    plot.finish()
}

fn seconds(s: Option<f64>) -> String {
    match s {
        Some(s) if s.is_finite() && s >= 0.0 => human_duration((s * 1e9).round() as u64),
        _ => "-".into(),
    }
}

fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    out.push_str("<table><thead><tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{}</td>", escape(cell));
        }
        out.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(out, r#"<tr><td colspan="{}">none</td></tr>"#, headers.len());
    }
    out.push_str("</tbody></table>\n");
}

fn hold_cells(h: &HoldStats) -> Vec<String> {
    vec![h.count.to_string(), seconds(h.p50), seconds(h.p90), seconds(h.p99), seconds(h.max)]
}

/// Renders the page.
pub fn render(r: &Report) -> String {
    let mut o = String::with_capacity(64 * 1024);
    o.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>port-trace report</title><style>\
         body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:960px}\
         table{border-collapse:collapse;margin:0.5em 0 1.5em}\
         th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}\
         th:first-child,td:first-child{text-align:left}\
         figure{margin:1em 0}svg{max-width:100%;height:auto}\
         </style></head><body>\n",
    );
    let _ = writeln!(o, "<h1>port-trace report</h1>");
    let _ = writeln!(o, "<p>Files: {}</p>", escape(&r.files.join(", ")));
    if let (Some(start), Some(end)) = (&r.start, &r.end) {
        let _ = writeln!(o, "<p>Window: {} to {} ({})</p>", escape(start), escape(end), seconds(Some(r.duration_s)));
    }
    for run in &r.runs {
        let _ = writeln!(
            o,
            "<p>Run started {}: kernel {}, backend {}, ephemeral range {}</p>",
            escape(run.started.as_deref().unwrap_or("?")),
            escape(run.kernel.as_deref().unwrap_or("?")),
            escape(run.backend.as_deref().unwrap_or("?")),
            run.ephemeral_range.map(|[lo, hi]| format!("{lo}-{hi}")).unwrap_or_else(|| "?".into())
        );
    }

    let _ = writeln!(o, "<h2>Totals</h2>");
    let when = |t: &Option<String>| t.clone().unwrap_or_default();
    table(
        &mut o,
        &["", "count", ""],
        &[
            vec!["allocations".into(), r.allocations.to_string(), format!("{:.2}/s", r.allocations_per_s)],
            vec!["releases".into(), r.releases.to_string(), format!("{:.2}/s", r.releases_per_s)],
            vec!["failed allocations".into(), r.alloc_failures.to_string(), String::new()],
            vec!["ports held at start".into(), r.ports_at_start.to_string(), String::new()],
            vec!["unpaired releases".into(), r.unpaired_releases.to_string(), String::new()],
            vec!["missed releases".into(), r.missed_releases.to_string(), String::new()],
            vec!["still held at end".into(), r.held_at_end.to_string(), String::new()],
            vec!["peak ports in use".into(), r.peak_ports_in_use.to_string(), when(&r.peak_ports_in_use_at)],
            vec!["TIME_WAIT peak".into(), r.time_wait_peak.to_string(), when(&r.time_wait_peak_at)],
            vec!["lost events".into(), r.lost.to_string(), String::new()],
            vec!["unreadable lines".into(), r.bad_lines.to_string(), String::new()],
        ],
    );

    let _ = writeln!(o, "<h2>Churn</h2>\n<figure id=\"plot-churn\">{}</figure>", churn_plot(r));
    let _ = writeln!(o, "<h2>Ports in use</h2>\n<figure id=\"plot-in-use\">{}</figure>", in_use_plot(r));
    let _ = writeln!(o, "<h2>Hold times</h2>\n<figure id=\"plot-hold\">{}</figure>", hold_plot(r));
    let mut rows = vec![[vec!["all".to_string()], hold_cells(&r.hold_seconds)].concat()];
    rows.extend(r.hold_seconds_by_proto.iter().map(|(k, h)| [vec![format!("proto {k}")], hold_cells(h)].concat()));
    rows.extend(r.hold_seconds_by_origin.iter().map(|(k, h)| [vec![format!("origin {k}")], hold_cells(h)].concat()));
    table(&mut o, &["", "count", "p50", "p90", "p99", "max"], &rows);

    let _ = writeln!(o, "<h2>Top commands</h2>");
    let rows: Vec<Vec<String>> = r
        .top_comms
        .iter()
        .map(|c| {
            vec![
                c.comm.clone(),
                c.allocations.to_string(),
                c.releases.to_string(),
                c.failures.to_string(),
                seconds(c.hold_seconds.p50),
                seconds(c.hold_seconds.max),
            ]
        })
        .collect();
    table(&mut o, &["command", "allocations", "releases", "failures", "hold p50", "hold max"], &rows);

    let _ = writeln!(o, "<h2>Top destinations</h2>");
    let rows: Vec<Vec<String>> = r
        .top_destinations
        .iter()
        .map(|d| {
            vec![
                d.destination.clone(),
                d.proto.to_string(),
                d.allocations.to_string(),
                d.failures.to_string(),
                d.peak_in_use.to_string(),
            ]
        })
        .collect();
    table(&mut o, &["destination", "proto", "allocations", "failures", "peak in use"], &rows);

    let _ = writeln!(o, "<h2>Exhaustion windows</h2>");
    let list = |items: &[super::analysis::NamedCount]| {
        items.iter().map(|n| format!("{} ({})", n.name, n.count)).collect::<Vec<_>>().join(", ")
    };
    let rows: Vec<Vec<String>> = r
        .exhaustion_windows
        .iter()
        .map(|w| vec![w.start.clone(), w.end.clone(), w.failures.to_string(), list(&w.destinations), list(&w.comms)])
        .collect();
    table(&mut o, &["start", "end", "failures", "destinations", "commands"], &rows);

    if !r.pressure_peaks.is_empty() {
        let _ = writeln!(o, "<h2>Range pressure</h2>");
        let rows: Vec<Vec<String>> = r
            .pressure_peaks
            .iter()
            .map(|p| vec![p.destination.clone(), format!("{:.1}%", p.ratio * 100.0), p.at.clone()])
            .collect();
        table(&mut o, &["destination", "highest share of the range", "at"], &rows);
    }
    if !r.notices.is_empty() {
        let _ = writeln!(o, "<h2>Notices</h2>");
        let rows: Vec<Vec<String>> = r.notices.iter().map(|(k, v)| vec![k.clone(), v.to_string()]).collect();
        table(&mut o, &["kind", "count"], &rows);
    }
    if r.bad_lines > 0 || !r.notes.is_empty() {
        let _ = writeln!(o, "<h2>Unreadable lines</h2>");
        let rows: Vec<Vec<String>> = r
            .unreadable_lines
            .iter()
            .take(100)
            .map(|b| vec![b.file.clone(), b.line.to_string(), b.reason.clone()])
            .collect();
        table(&mut o, &["file", "line", "reason"], &rows);
        for note in &r.notes {
            let _ = writeln!(o, "<p>Note: {}</p>", escape(note));
        }
    }
    o.push_str("</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::analysis::{analyze, Query};
    use crate::report::reader::tests::{event, HEADER};
    use crate::report::reader::{LineParser, Recording};

    pub(super) fn report_for_dump() -> Report {
        report("curl")
    }

    fn report(comm: &str) -> Report {
        let mut parser = LineParser::new();
        let mut lines = vec![HEADER.to_string()];
        for i in 0..20u64 {
            let ts = |ms: u64| format!("2026-11-26T06:40:{:02}.{:03}Z", ms / 1000, ms % 1000);
            let dest = Some(("10.0.0.1", 443));
            lines.push(event(
                "alloc",
                &ts(i * 1000),
                "tcp",
                40000 + i as u16,
                dest,
                1,
                comm,
                i + 1,
                r#","origin":"connect","ephemeral":true"#,
            ));
            let held = 10u64.pow((i % 5) as u32);
            lines.push(event(
                "release",
                &ts(i * 1000 + held),
                "tcp",
                40000 + i as u16,
                dest,
                1,
                comm,
                i + 1,
                &format!(r#","reason":"close","held_ns":{}"#, held * 1_000_000),
            ));
        }
        let rec = Recording {
            lines: lines.iter().map(|l| parser.parse(l.as_bytes()).unwrap()).collect(),
            ..Recording::default()
        };
        analyze(&rec, &Query::default()).unwrap()
    }

    /// The `<figure id=...>` element's content.
    fn figure<'a>(page: &'a str, id: &str) -> &'a str {
        let start = page.find(&format!("<figure id=\"{id}\">")).unwrap_or_else(|| panic!("no {id}"));
        let end = start + page[start..].find("</figure>").unwrap();
        &page[start..end]
    }

    #[test]
    fn three_plots_with_stable_ids_axes_and_visible_marks() {
        let page = render(&report("curl"));
        assert!(page.starts_with("<!DOCTYPE html>"));
        for id in ["plot-churn", "plot-in-use", "plot-hold"] {
            let fig = figure(&page, id);
            assert!(fig.contains("<svg"), "{id}");
            assert_eq!(fig.matches("class=\"axis\"").count(), 2, "{id}: two axes");
            assert!(fig.contains("transform=\"rotate(-90"), "{id}: a y label");
            assert!(!fig.contains("no data"), "{id}");
        }
        let churn = figure(&page, "plot-churn");
        assert!(churn.contains(r##"class="allocations" fill="none" stroke="#1f77b4""##));
        assert!(churn.contains(r##"class="releases" fill="none" stroke="#ff7f0e""##));
        let in_use = figure(&page, "plot-in-use");
        assert!(in_use.contains("class=\"in-use-pool\""));
        assert!(in_use.contains("10.0.0.1:443 tcp"));
        // Holds of 1 ms, 10 ms, 100 ms, 1 s, 10 s: five bars on decade edges.
        let hold = figure(&page, "plot-hold");
        assert_eq!(hold.matches("class=\"bar\"").count(), 5);
        assert!(hold.contains(r##"fill="#2ca02c""##));
        for label in ["1.0ms", "10.0ms", "100.0ms", "1.0s", "10.0s"] {
            assert!(hold.contains(&format!(">{label}</text>")), "tick {label}");
        }
        // No white strokes or fills on marks, no scripts, nothing fetched.
        assert!(!page.contains("stroke=\"#ffffff\"") && !page.contains("fill=\"#ffffff\""));
        assert!(!page.contains("<script"));
        assert_eq!(page.matches("http://").count(), 3, "only the SVG namespace");
        assert!(!page.contains("https://"));
    }

    #[test]
    fn process_names_are_escaped() {
        let page = render(&report("<img src=x>"));
        assert!(!page.contains("<img"));
        assert!(page.contains("&lt;img src=x&gt;"));
        assert_eq!(escape("a&b\"'<>\u{1b}"), "a&amp;b&quot;&#39;&lt;&gt;\u{fffd}");
    }

    #[test]
    fn empty_report_still_draws_axes() {
        let page = render(&analyze(&Recording::default(), &Query::default()).unwrap());
        for id in ["plot-churn", "plot-in-use", "plot-hold"] {
            let fig = figure(&page, id);
            assert!(fig.contains("no data"), "{id}");
            assert_eq!(fig.matches("class=\"axis\"").count(), 2);
        }
    }

    #[test]
    fn long_legends_wrap_under_the_title_and_count_the_rest() {
        let mut plot = Plot::new("t", "x", "y", 1.0, 1.0, vec![]);
        let labels: Vec<(String, &str)> =
            (0..6).map(|i| (format!("[2001:db8:aaaa:bbbb:cccc:dddd:eeee:{i:04x}]:65535 udp"), PALETTE[i])).collect();
        plot.legend(&labels);
        let svg = plot.finish();
        let rects: Vec<(f64, f64)> = svg
            .match_indices("<rect x=\"")
            .skip(1) // the background
            .map(|(i, _)| {
                let attr = |name: &str| -> f64 {
                    let from = i + svg[i..].find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                    svg[from..from + svg[from..].find('"').unwrap()].parse().unwrap()
                };
                (attr("x"), attr("y"))
            })
            .collect();
        assert!(!rects.is_empty() && rects.len() < 6, "{svg}");
        for (x, y) in &rects {
            // Below the title (baseline 18), inside the frame, above the plot.
            assert!(*y >= LEGEND_Y && y + 12.0 <= TOP, "{svg}");
            assert!(*x >= LEFT && x + 22.0 + 6.5 * 50.0 <= WIDTH - RIGHT + 1e-9, "{svg}");
        }
        assert!(svg.contains(&format!(">+{} more</text>", 6 - rects.len())), "{svg}");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(7.0, 5.0), 2.0);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
        assert_eq!(nice_step(3600.0, 6.0), 1000.0);
        let ticks = time_ticks(3600.0);
        assert_eq!(ticks.len(), 7);
        assert_eq!(ticks[1], (600.0, "+10m".to_string()));
        assert_eq!(time_ticks(0.0), vec![(0.0, "+0s".to_string())]);
        assert!(time_ticks(400.0 * 86400.0).len() <= 9);
    }
}
#[cfg(test)]
mod dump_tmp {
    #[test]
    #[ignore]
    fn dump() {
        let r = super::tests::report_for_dump();
        std::fs::write("/tmp/pt-report.html", super::render(&r)).unwrap();
    }
}
