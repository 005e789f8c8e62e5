//! Drawing `port-trace top`: header, pressure pane, churn sparklines, the
//! lifecycle table, a key line and the help overlay. Renders into any
//! ratatui [`Frame`], so tests draw into a `TestBackend`.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, LineGauge, Paragraph, Row, Sparkline, Table};
use ratatui::Frame;

use super::view::{format_duration_ns, format_endpoint, PortRow, TopView};
use crate::model::errno_name;
use crate::pressure::PoolStatus;

/// Most pools the pressure pane lists.
const MAX_POOLS_SHOWN: usize = 4;

const NS_PER_S: u64 = 1_000_000_000;

/// Draws the whole view at `now_ns` (CLOCK_BOOTTIME): first moves the view's
/// clock on (fading out released ports), then renders.
pub fn render(frame: &mut Frame, view: &mut TopView, now_ns: u64) {
    view.tick(now_ns);
    let pools_rows = view.status().pools.len().clamp(1, MAX_POOLS_SHOWN) as u16;
    let [header, pressure, churn, table, footer] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(pools_rows + 2),
        Constraint::Length(4),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_header(frame, view, header);
    render_pressure(frame, view, pressure);
    render_churn(frame, view, churn);
    render_table(frame, view, table);
    render_footer(frame, view, footer);
    if view.help_visible() {
        render_help(frame, view);
    }
}

fn separator() -> Span<'static> {
    Span::styled(" │ ", Style::default().fg(Color::DarkGray))
}

fn bold(text: String) -> Span<'static> {
    Span::styled(text, Style::default().add_modifier(Modifier::BOLD))
}

fn ranges_text(ranges: &[(u32, u16, u16, u32)]) -> String {
    match ranges {
        [] => "range unknown".to_string(),
        [(_, low, high, usable)] => format!("range {low}-{high} ({usable} usable)"),
        many => {
            let each: Vec<String> = many
                .iter()
                .map(|(netns, low, high, usable)| format!("netns {netns} {low}-{high} ({usable})"))
                .collect();
            format!("ranges {}", each.join(", "))
        }
    }
}

fn render_header(frame: &mut Frame, view: &TopView, area: Rect) {
    let status = view.status();
    let backend = if status.backend.is_empty() { "-".to_string() } else { status.backend.clone() };
    let rate = if status.events_per_s.is_finite() && status.events_per_s >= 0.0 {
        format!("{:.0}", status.events_per_s)
    } else {
        "-".to_string()
    };
    let lost = view.lost();
    let lost_style = if lost > 0 { Style::default().fg(Color::Red) } else { Style::default() };
    let first = Line::from(vec![
        Span::raw("backend "),
        bold(backend),
        separator(),
        bold(rate),
        Span::raw(" events/s"),
        separator(),
        Span::styled(format!("lost {lost}"), lost_style),
        separator(),
        Span::raw(ranges_text(&status.ranges)),
    ]);

    let counters = view.counters();
    let (held, time_wait) = view.ports_in_use();
    let hidden = if view.shows_time_wait() { "" } else { ", hidden" };
    let mut second = vec![
        Span::raw("in use "),
        bold(held.to_string()),
        Span::raw(format!(" (TIME_WAIT {time_wait}{hidden})")),
        separator(),
        Span::raw(format!(
            "allocs {}  releases {}  failures {}",
            counters.allocs, counters.releases, counters.alloc_fails
        )),
    ];
    if let Some(errno) = counters.last_fail_errno {
        second.push(Span::styled(format!(" (last {})", errno_name(errno)), Style::default().fg(Color::Red)));
    }
    second.push(separator());
    second.push(Span::raw(format!("sort {}", view.sort_key().name())));
    if !view.filter().is_empty() {
        second.push(separator());
        second.push(Span::raw(format!("filter \"{}\"", view.filter())));
    }
    if counters.dropped_rows > 0 {
        second.push(separator());
        second.push(Span::raw(format!("dropped {} rows", counters.dropped_rows)));
    }
    if view.is_paused() {
        second.push(separator());
        second.push(Span::styled("PAUSED", Style::default().fg(Color::Black).bg(Color::Yellow)));
    }
    let block = Block::bordered().title(" port-trace top ");
    frame.render_widget(Paragraph::new(vec![first, Line::from(second)]).block(block), area);
}

/// `used / capacity` for the bar: within 0..=1 (0 for an empty range).
fn shown_ratio(pool: &PoolStatus) -> f64 {
    if pool.ratio.is_finite() {
        pool.ratio.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

fn pool_label(pool: &PoolStatus, with_netns: bool) -> String {
    let key = &pool.key;
    let netns = if with_netns { format!("[{}] ", key.netns) } else { String::new() };
    let target = match (key.raddr, key.rport) {
        (Some(raddr), Some(rport)) => format!("→ {}", format_endpoint(raddr, rport)),
        (Some(raddr), None) => format!("→ {raddr}"),
        _ => "(bind)".to_string(),
    };
    format!("{netns}{} {} {target}", key.proto.name(), key.laddr)
}

/// Forecasts further out than this are shown only for pools at 50 % or more:
/// with allocations and releases nearly balanced, the net rate is noise and
/// an empty pool would read "full in 7h50m".
const FORECAST_HORIZON_S: f64 = 600.0;

fn forecast(pool: &PoolStatus) -> Span<'static> {
    match pool.exhaust_in_s {
        Some(secs) if secs.is_finite() && secs >= 0.0 && (secs <= FORECAST_HORIZON_S || shown_ratio(pool) >= 0.5) => {
            let ns = (secs * NS_PER_S as f64).min(u64::MAX as f64) as u64;
            let style = if secs < 60.0 { Style::default().fg(Color::Red) } else { Style::default() };
            Span::styled(format!("full in {}", format_duration_ns(ns)), style)
        }
        _ => Span::styled("not filling", Style::default().fg(Color::DarkGray)),
    }
}

fn render_pressure(frame: &mut Frame, view: &TopView, area: Rect) {
    let block = Block::bordered().title(" pressure: fullest pools ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let status = view.status();
    let mut pools: Vec<&PoolStatus> = status.pools.iter().collect();
    if pools.is_empty() {
        let text = Span::styled("no pool in use yet", Style::default().fg(Color::DarkGray));
        frame.render_widget(Paragraph::new(Line::from(text)), inner);
        return;
    }
    pools.sort_by(|a, b| shown_ratio(b).total_cmp(&shown_ratio(a)).then(b.used.cmp(&a.used)));
    let with_netns = status.ranges.len() > 1;
    let label_width = (inner.width / 2).min(50);
    for (pool, row) in pools.iter().zip(inner.rows()) {
        let [label, bar, eta] =
            Layout::horizontal([Constraint::Length(label_width), Constraint::Fill(1), Constraint::Length(18)])
                .spacing(1)
                .areas(row);
        frame.render_widget(Paragraph::new(pool_label(pool, with_netns)), label);
        let ratio = shown_ratio(pool);
        let color = if ratio >= 0.9 {
            Color::Red
        } else if ratio >= 0.7 {
            Color::Yellow
        } else {
            Color::Green
        };
        let gauge = LineGauge::default()
            .ratio(ratio)
            .label(format!("{:>13} {:>5.1}%", format!("{}/{}", pool.used, pool.capacity), ratio * 100.0))
            .filled_symbol(ratatui::symbols::line::THICK_HORIZONTAL)
            .filled_style(Style::default().fg(color))
            .unfilled_style(Style::default().fg(Color::DarkGray));
        frame.render_widget(gauge, bar);
        frame.render_widget(Paragraph::new(Line::from(forecast(pool))), eta);
    }
}

fn render_churn(frame: &mut Frame, view: &TopView, area: Rect) {
    let block = Block::bordered().title(" churn per second, last 60 s ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let history = &view.status().churn_history;
    let allocs: Vec<u64> = history.iter().map(|(a, _)| *a).collect();
    let releases: Vec<u64> = history.iter().map(|(_, r)| *r).collect();
    let peak = allocs.iter().chain(&releases).copied().max().unwrap_or(0).max(1);
    let series = [("allocs", &allocs, Color::Cyan), ("releases", &releases, Color::Magenta)];
    for ((name, data, color), row) in series.into_iter().zip(inner.rows()) {
        let [label, spark] = Layout::horizontal([Constraint::Length(33), Constraint::Fill(1)]).areas(row);
        let now = data.last().copied().unwrap_or(0);
        let max = data.iter().copied().max().unwrap_or(0);
        frame.render_widget(Paragraph::new(format!("{name:<9}now {now:>6}  max {max:>6}")), label);
        // The newest values, the latest at the pane's right edge.
        let tail = &data[data.len().saturating_sub(usize::from(spark.width))..];
        let width = tail.len() as u16;
        let spark = Rect { x: spark.right().saturating_sub(width), width, ..spark };
        frame.render_widget(Sparkline::default().data(tail).max(peak).style(Style::default().fg(color)), spark);
    }
}

fn table_cells(row: &PortRow, now_ns: u64, time_wait_ns: u64) -> [String; 9] {
    let remote = match (row.raddr, row.rport) {
        (Some(raddr), Some(rport)) => format_endpoint(raddr, rport),
        (Some(raddr), None) => raddr.to_string(),
        _ => "-".to_string(),
    };
    let age = format_duration_ns(row.age_ns(now_ns));
    let age = if row.alloc_seen { age } else { format!(">{age}") };
    let time_wait_left =
        row.time_wait_left_ns(now_ns, time_wait_ns).map(|ns| format!("{}s", ns.div_ceil(NS_PER_S))).unwrap_or_default();
    [
        row.lport.to_string(),
        row.proto.name().to_string(),
        row.pid.to_string(),
        row.comm.clone(),
        row.laddr.to_string(),
        remote,
        row.state_text().to_string(),
        age,
        time_wait_left,
    ]
}

fn render_table(frame: &mut Frame, view: &mut TopView, area: Rect) {
    let now_ns = view.table_now_ns();
    let time_wait_ns = view.options().time_wait_ns;
    let page_rows = usize::from(area.height.saturating_sub(3)).max(1);
    let (block, rows, scroll) = {
        let shown = view.visible_rows();
        let scroll = view.scroll().min(shown.len().saturating_sub(page_rows));
        let title = format!(" ports: {} shown of {} · sort {} ", shown.len(), view.row_count(), view.sort_key().name());
        let rows: Vec<Row> = shown
            .iter()
            .skip(scroll)
            .take(page_rows)
            .map(|row| {
                let style = if row.released.is_some() {
                    Style::default().fg(Color::DarkGray).add_modifier(Modifier::DIM)
                } else if row.in_time_wait() {
                    Style::default().fg(Color::Yellow)
                } else {
                    Style::default()
                };
                Row::new(table_cells(row, now_ns, time_wait_ns).map(Cell::from)).style(style)
            })
            .collect();
        (Block::bordered().title(title), rows, scroll)
    };
    view.set_viewport(scroll, page_rows);
    let header = Row::new(["PORT", "PROTO", "PID", "COMM", "LOCAL", "REMOTE", "STATE", "AGE", "TW LEFT"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    let widths = [
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(15),
        Constraint::Fill(2),
        Constraint::Fill(3),
        Constraint::Length(12),
        Constraint::Length(8),
        Constraint::Length(7),
    ];
    frame.render_widget(Table::new(rows, widths).header(header).block(block), area);
}

fn render_footer(frame: &mut Frame, view: &TopView, area: Rect) {
    let line = match view.filter_draft() {
        Some(draft) => Line::from(vec![
            bold("filter: ".to_string()),
            Span::raw(draft.to_string()),
            Span::styled("▏", Style::default().add_modifier(Modifier::SLOW_BLINK)),
            Span::styled("  Enter apply · Esc cancel · Ctrl-U clear", Style::default().fg(Color::DarkGray)),
        ]),
        None => Line::from(Span::styled(
            "q quit  / filter  s sort  p pause  t TIME_WAIT  ? help  ↑↓ PgUp PgDn scroll",
            Style::default().fg(Color::DarkGray),
        )),
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn render_help(frame: &mut Frame, view: &TopView) {
    let fade_s = view.options().fade_ns as f64 / NS_PER_S as f64;
    let time_wait_s = view.options().time_wait_ns / NS_PER_S;
    let lines = vec![
        Line::from(bold("port-trace top: every local port, live".to_string())),
        Line::from(""),
        Line::from("q, Ctrl-C   quit"),
        Line::from("/           filter: type, Enter applies, Esc cancels"),
        Line::from("            (port, command, local or remote address)"),
        Line::from("Esc         clear the filter"),
        Line::from("s           sort: age, port, comm, state, pid"),
        Line::from("p           pause the table (counting goes on)"),
        Line::from("t           show or hide TIME_WAIT ports"),
        Line::from("↑ ↓ PgUp PgDn Home End   scroll"),
        Line::from("?           this help (any key closes it)"),
        Line::from(""),
        Line::from(format!("Released ports stay dimmed for {fade_s:.0} s. TW LEFT counts")),
        Line::from(format!("down the {time_wait_s} s a socket stays in TIME_WAIT.")),
    ];
    let height = lines.len() as u16 + 2;
    let area = frame.area().centered(Constraint::Length(60), Constraint::Length(height));
    frame.render_widget(Clear, area);
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(" help ")), area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, Origin, Proto, ReleaseReason, TcpState};
    use crate::pressure::PoolKey;
    use crate::record::{PortRecord, PortRef, RecordBody};
    use crate::top::view::{Status, TopOptions};
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use std::net::{IpAddr, Ipv4Addr};

    const S: u64 = NS_PER_S;

    fn port(sock: u64, lport: u16, comm: &str) -> PortRef {
        PortRef {
            sock,
            netns: 4026531840,
            proto: Proto::Tcp,
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            lport,
            raddr: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))),
            rport: Some(8080),
            pid: 4242,
            comm: comm.into(),
            cgroup: 0,
            ephemeral: Some(true),
        }
    }

    fn pool(proto: Proto, dest: Option<(IpAddr, u16)>, used: u32, exhaust_in_s: Option<f64>) -> PoolStatus {
        let laddr = match dest {
            Some(_) => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let key = PoolKey { netns: 4026531840, proto, laddr, raddr: dest.map(|d| d.0), rport: dest.map(|d| d.1) };
        PoolStatus { key, used, capacity: 28232, ratio: f64::from(used) / 28232.0, exhaust_in_s }
    }

    #[test]
    fn bars_are_bounded() {
        let mut p = pool(Proto::Tcp, None, 5, None);
        p.ratio = f64::NAN;
        assert_eq!(shown_ratio(&p), 0.0);
        p.ratio = 1.7;
        assert_eq!(shown_ratio(&p), 1.0);
        p.ratio = 0.25;
        assert_eq!(shown_ratio(&p), 0.25);
    }

    fn status() -> Status {
        Status {
            backend: "precise".to_string(),
            events_per_s: 1234.4,
            lost: 7,
            ranges: vec![(4026531840, 32768, 60999, 28232)],
            pools: vec![
                pool(Proto::Tcp, Some((IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 8080)), 21174, Some(42.0)),
                pool(Proto::Udp, None, 10, None),
            ],
            churn_history: (0..60).map(|i| (i * 10, i * 5)).collect(),
        }
    }

    /// A view with curl holding 54012, wget's 54013 in TIME_WAIT for 15 s,
    /// and dig's 54014 released 1 s ago.
    fn sample_view() -> TopView {
        let mut view = TopView::new(TopOptions::default());
        view.set_status(status());
        let curl = port(1, 54012, "curl");
        view.on_record(&PortRecord { ts_ns: 10 * S, port: curl.clone(), body: alloc_body() }, 10 * S);
        view.on_record(
            &PortRecord {
                ts_ns: 10 * S,
                port: curl,
                body: RecordBody::State { old: TcpState::SynSent, new: TcpState::Established },
            },
            10 * S,
        );
        let wget = port(2, 54013, "wget");
        view.on_record(&PortRecord { ts_ns: 20 * S, port: wget.clone(), body: alloc_body() }, 20 * S);
        view.on_record(
            &PortRecord {
                ts_ns: 25 * S,
                port: wget,
                body: RecordBody::State { old: TcpState::FinWait2, new: TcpState::TimeWait },
            },
            25 * S,
        );
        let dig = port(3, 54014, "dig");
        view.on_record(&PortRecord { ts_ns: 30 * S, port: dig.clone(), body: alloc_body() }, 30 * S);
        view.on_record(
            &PortRecord {
                ts_ns: 39 * S,
                port: dig,
                body: RecordBody::Release {
                    reason: ReleaseReason::Close,
                    held_ns: Some(9 * S),
                    origin: Some(Origin::Connect),
                    alloc_ts_ns: Some(30 * S),
                },
            },
            39 * S,
        );
        view
    }

    fn alloc_body() -> RecordBody {
        RecordBody::Alloc { origin: Origin::Connect, ephemeral: true }
    }

    fn draw(view: &mut TopView, now_ns: u64) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(120, 30)).expect("test backend");
        terminal.draw(|frame| render(frame, view, now_ns)).expect("draw");
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect::<String>())
            .collect()
    }

    fn line_with<'a>(lines: &'a [String], needle: &str) -> &'a str {
        lines
            .iter()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{}", lines.join("\n")))
    }

    fn words(line: &str) -> Vec<&str> {
        line.split(|c: char| c.is_whitespace() || c == '│').filter(|w| !w.is_empty()).collect()
    }

    #[test]
    fn header_shows_backend_rate_lost_and_range() {
        let mut view = sample_view();
        let lines = draw(&mut view, 40 * S);
        assert!(lines[0].contains("port-trace top"));
        let first = line_with(&lines, "backend");
        assert!(first.contains("backend precise"), "{first}");
        assert!(first.contains("1234 events/s"), "{first}");
        assert!(first.contains("lost 7"), "{first}");
        assert!(first.contains("range 32768-60999 (28232 usable)"), "{first}");
        let second = line_with(&lines, "in use");
        assert!(second.contains("in use 2 (TIME_WAIT 1)"), "{second}");
        assert!(second.contains("allocs 3  releases 1  failures 0"), "{second}");
        assert!(second.contains("sort age"), "{second}");
    }

    #[test]
    fn table_shows_held_port_time_wait_countdown_and_fading_release() {
        let mut view = sample_view();
        let lines = draw(&mut view, 40 * S);
        assert!(line_with(&lines, "PORT").contains("TW LEFT"));
        let curl = words(line_with(&lines, "curl"));
        assert_eq!(curl, ["54012", "tcp", "4242", "curl", "127.0.0.1", "127.0.0.1:8080", "ESTABLISHED", "30.0s"]);
        let wget = words(line_with(&lines, "wget"));
        assert_eq!(wget, ["54013", "tcp", "4242", "wget", "127.0.0.1", "127.0.0.1:8080", "TIME_WAIT", "20.0s", "45s"]);
        let dig = words(line_with(&lines, "dig"));
        assert_eq!(dig, ["54014", "tcp", "4242", "dig", "127.0.0.1", "127.0.0.1:8080", "closed", "9.0s"]);
        assert!(line_with(&lines, "ports:").contains("3 shown of 3"));

        // Three seconds after the release, dig's port is gone.
        let lines = draw(&mut view, 42 * S);
        assert!(!lines.iter().any(|line| line.contains("dig")));
        assert!(line_with(&lines, "ports:").contains("2 shown of 2"));
    }

    #[test]
    fn released_rows_are_dimmed() {
        let mut view = sample_view();
        let mut terminal = Terminal::new(TestBackend::new(120, 30)).expect("test backend");
        terminal.draw(|frame| render(frame, &mut view, 40 * S)).expect("draw");
        let buffer = terminal.backend().buffer();
        let row_of = |needle: &str| {
            (0..buffer.area.height)
                .find(|&y| (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect::<String>().contains(needle))
                .expect("row present")
        };
        assert!(buffer[(2, row_of("dig"))].modifier.contains(Modifier::DIM));
        assert!(!buffer[(2, row_of("curl"))].modifier.contains(Modifier::DIM));
    }

    #[test]
    fn pressure_pane_shows_fullest_pool_first_with_bar_and_forecast() {
        let mut view = sample_view();
        let lines = draw(&mut view, 40 * S);
        let pane_top = lines.iter().position(|line| line.contains("pressure")).expect("pressure pane");
        let fullest = &lines[pane_top + 1];
        assert!(fullest.contains("tcp 127.0.0.1 → 127.0.0.1:8080"), "{fullest}");
        assert!(fullest.contains("21174/28232  75.0%"), "{fullest}");
        assert!(fullest.contains('━') && fullest.contains('─'), "a partly filled bar: {fullest}");
        assert!(fullest.contains("full in 42.0s"), "{fullest}");
        let second = &lines[pane_top + 2];
        assert!(second.contains("udp 0.0.0.0 (bind)"), "{second}");
        assert!(second.contains("     10/28232   0.0%"), "{second}");
        assert!(second.contains("not filling"), "{second}");
    }

    #[test]
    fn churn_pane_shows_latest_and_peak() {
        let mut view = sample_view();
        let lines = draw(&mut view, 40 * S);
        let allocs = line_with(&lines, "allocs   now");
        assert!(allocs.contains("now    590  max    590"), "{allocs}");
        assert!(
            allocs.trim_end_matches(['│', ' ']).ends_with('█'),
            "the newest bar, at the right edge, is full height: {allocs}"
        );
        assert!(line_with(&lines, "releases now").contains("now    295  max    295"));
    }

    #[test]
    fn help_overlay_and_filter_prompt() {
        let mut view = sample_view();
        view.handle_key(KeyEvent::new(KeyCode::Char('?'), KeyModifiers::NONE));
        let lines = draw(&mut view, 40 * S);
        assert!(lines.iter().any(|line| line.contains("┌ help ─")), "overlay drawn");
        assert!(lines.iter().any(|line| line.contains("p           pause the table (counting goes on)")));
        assert!(lines.iter().any(|line| line.contains("down the 60 s a socket stays in TIME_WAIT.")));

        view.handle_key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE));
        view.handle_key(KeyEvent::new(KeyCode::Char('/'), KeyModifiers::NONE));
        for c in "wg".chars() {
            view.handle_key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE));
        }
        let lines = draw(&mut view, 40 * S);
        assert!(!lines.iter().any(|line| line.contains("pause the table")));
        assert!(lines[29].starts_with("filter: wg▏"), "{}", lines[29]);
        view.handle_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        let lines = draw(&mut view, 40 * S);
        assert!(line_with(&lines, "in use").contains("filter \"wg\""));
        assert!(line_with(&lines, "ports:").contains("1 shown of 3"));
        assert!(lines.iter().any(|line| line.contains("wget")));
        assert!(!lines.iter().any(|line| line.contains("curl")));
    }

    #[test]
    fn paused_and_scrolled_views() {
        let mut view = TopView::new(TopOptions::default());
        for i in 0..40u16 {
            let p = port(u64::from(i), 40000 + i, "load");
            view.on_record(&PortRecord { ts_ns: S, port: p, body: alloc_body() }, S);
        }
        view.handle_key(KeyEvent::new(KeyCode::Char('s'), KeyModifiers::NONE)); // by port
        view.handle_key(KeyEvent::new(KeyCode::End, KeyModifiers::NONE));
        let lines = draw(&mut view, 2 * S);
        assert!(lines.iter().any(|line| line.contains("40039")), "scrolled to the end");
        assert!(!lines.iter().any(|line| line.contains("40000")));
        assert!(lines.iter().any(|line| line.contains("no pool in use yet")));
        assert!(view.scroll() < 40, "clamped after drawing: {}", view.scroll());
        view.handle_key(KeyEvent::new(KeyCode::Home, KeyModifiers::NONE));
        view.handle_key(KeyEvent::new(KeyCode::Char('p'), KeyModifiers::NONE));
        let lines = draw(&mut view, 3 * S);
        assert!(line_with(&lines, "in use").contains("PAUSED"));
        assert!(lines.iter().any(|line| line.contains("40000")));
    }

    #[test]
    fn tiny_terminal_does_not_panic() {
        let mut view = sample_view();
        view.handle_key(KeyEvent::new(KeyCode::Char('?'), KeyModifiers::NONE));
        for (width, height) in [(1, 1), (10, 5), (40, 12), (0, 0)] {
            let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test backend");
            terminal.draw(|frame| render(frame, &mut view, 40 * S)).expect("draw");
            assert_eq!(terminal.backend().buffer().area.width, width);
        }
    }
}
