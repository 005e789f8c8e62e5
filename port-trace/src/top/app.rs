//! `port-trace top` wired to the live trace: a [`Frontend`] that feeds the
//! [`TopView`], reads the keys and redraws on the trace loop's tick (10 Hz at
//! most, never per event).

use std::io;

use anyhow::{Context, Result};

use super::terminal::Screen;
use super::view::{Action, Status, TopOptions, TopView};
use crate::analysis::Derived;
use crate::cli::TopArgs;
use crate::live::{Frontend, LiveState, Plan};
use crate::output::{summary_text, Header, Summary};
use crate::record::PortRecord;

/// Pools listed in the pressure pane.
const POOLS_SHOWN: usize = 8;

const NS_PER_S: f64 = 1e9;

/// The frontend of `top`.
struct TopFrontend {
    screen: Screen,
    view: TopView,
    backend: String,
    /// Events counted and the time at the previous tick, for events/s.
    last_events: Option<(u64, u64)>,
    events_per_s: f64,
    /// Status is rebuilt at most once a second (the analysis moves no faster).
    last_status_ns: u64,
}

impl TopFrontend {
    fn status(&mut self, state: &LiveState<'_>) -> Status {
        let mut ranges: Vec<(u32, u16, u16, u32)> = Vec::new();
        for (netns, size) in state.analysis.pools.range_sizes() {
            if let Some(range) = state.analysis.pools.range(netns) {
                ranges.push((netns, range.low, range.high, size));
            }
        }
        let pools = state.analysis.pools.busiest(POOLS_SHOWN);
        Status {
            backend: self.backend.clone(),
            events_per_s: self.events_per_s,
            lost: state.lost,
            ranges,
            pools,
            churn_history: state.analysis.churn.history(),
        }
    }
}

impl Frontend for TopFrontend {
    fn start(&mut self, header: &Header) -> io::Result<()> {
        self.backend.clone_from(&header.backend);
        Ok(())
    }

    fn record(&mut self, rec: &PortRecord) -> io::Result<()> {
        self.view.on_record(rec, rec.ts_ns);
        Ok(())
    }

    fn derived(&mut self, _derived: &Derived) -> io::Result<()> {
        // Pressure and notices reach the screen through the pools pane.
        Ok(())
    }

    fn lost(&mut self, _ts_ns: u64, count: u64) -> io::Result<()> {
        self.view.on_lost(count);
        Ok(())
    }

    fn ready(&mut self, state: &LiveState<'_>) -> io::Result<bool> {
        self.tick(state)
    }

    fn tick(&mut self, state: &LiveState<'_>) -> io::Result<bool> {
        for key in self.screen.poll_keys() {
            if self.view.handle_key(key) == Action::Quit {
                return Ok(false);
            }
        }
        if let Some((events, at_ns)) = self.last_events {
            let elapsed = state.now_ns.saturating_sub(at_ns);
            if elapsed > 0 {
                let rate = state.events.saturating_sub(events) as f64 * NS_PER_S / elapsed as f64;
                // Smoothed over about a second of 100 ms ticks.
                self.events_per_s = if self.events_per_s == 0.0 { rate } else { 0.8 * self.events_per_s + 0.2 * rate };
            }
        }
        self.last_events = Some((state.events, state.now_ns));
        if self.last_status_ns == 0 || state.now_ns.saturating_sub(self.last_status_ns) >= 1_000_000_000 {
            let status = self.status(state);
            self.view.set_status(status);
            self.last_status_ns = state.now_ns;
        } else {
            let mut status = self.view.status().clone();
            status.events_per_s = self.events_per_s;
            status.lost = state.lost;
            self.view.set_status(status);
        }
        // Bounded: the tracker's lookup by `sock` may scan (kprobe keying).
        self.view.fill_states(4096, |sock| state.tracker.tcp_state(sock));
        self.view.tick(state.now_ns);
        self.screen.draw(&mut self.view, state.now_ns)?;
        Ok(true)
    }

    fn finish(&mut self, _summary: &Summary) -> io::Result<()> {
        Ok(())
    }
}

/// Runs `top` until `q`, Ctrl-C, SIGTERM or `--duration`; the terminal is
/// restored before the summary goes to stderr.
pub async fn run(args: TopArgs) -> Result<()> {
    let plan = Plan::new(&args.trace)?;
    let session = plan.load()?;
    let screen = Screen::enter().context("cannot start the full-screen view")?;
    let mut frontend = TopFrontend {
        screen,
        view: TopView::new(TopOptions::default()),
        backend: String::new(),
        last_events: None,
        events_per_s: 0.0,
        last_status_ns: 0,
    };
    let result = session.run(&mut frontend).await;
    // Leaves the alternate screen (also done on panic by the hook).
    drop(frontend);
    if let Some(summary) = result? {
        eprintln!("{}", summary_text(&summary));
    }
    Ok(())
}
