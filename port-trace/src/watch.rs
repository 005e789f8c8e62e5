//! `port-trace watch` (and `record`, which is `watch --format json` into a
//! durable file): stream records until Ctrl-C, SIGTERM or `--duration`, then
//! flush and summarise.

use std::io::{self, IsTerminal, Write};

use anyhow::Result;

use crate::cli::{RecordArgs, WatchArgs};
use crate::live::{Frontend, LiveState, Plan};
use crate::output::{summary_text, Format, Output};
use crate::recording::{create_private_file, RecordFileOptions, RecordWriter};
use crate::UsageError;

fn open_output(args: &WatchArgs) -> Result<(Box<dyn Write + Send>, bool)> {
    match &args.output {
        None => {
            let terminal = io::stdout().is_terminal();
            Ok((Box::new(io::BufWriter::with_capacity(64 * 1024, io::stdout())), terminal))
        }
        Some(path) => {
            let file = create_private_file(path, args.force).map_err(|e| {
                if e.is_usage() {
                    anyhow::Error::new(UsageError(e.to_string()))
                } else {
                    anyhow::Error::new(e)
                }
            })?;
            Ok((Box::new(io::BufWriter::with_capacity(64 * 1024, file)), false))
        }
    }
}

/// Writes a live trace as lines: the frontend of `watch` and `record`.
pub struct LineFrontend {
    output: Output,
}

impl LineFrontend {
    /// A frontend writing through `output`.
    pub fn new(output: Output) -> Self {
        Self { output }
    }
}

impl Frontend for LineFrontend {
    fn start(&mut self, header: &crate::output::Header) -> io::Result<()> {
        self.output.header(header)?;
        self.output.flush()
    }

    fn record(&mut self, rec: &crate::record::PortRecord) -> io::Result<()> {
        self.output.record(rec)
    }

    fn derived(&mut self, derived: &crate::analysis::Derived) -> io::Result<()> {
        self.output.derived(derived)
    }

    fn lost(&mut self, ts_ns: u64, count: u64) -> io::Result<()> {
        self.output.lost(ts_ns, count)
    }

    fn tick(&mut self, _state: &LiveState<'_>) -> io::Result<bool> {
        self.output.flush()?;
        Ok(true)
    }

    fn finish(&mut self, summary: &crate::output::Summary) -> io::Result<()> {
        self.output.summary(summary.ts_ns, summary)?;
        self.output.flush()
    }
}

/// Runs `watch`.
pub async fn run(args: WatchArgs) -> Result<()> {
    let plan = Plan::new(&args.trace)?;
    let (writer, terminal) = open_output(&args)?;
    let format = args.format.unwrap_or(if terminal { Format::Text } else { Format::Json });
    let session = plan.load()?;
    let output = Output::new(writer, format, args.lifecycles, session.clock);
    let mut frontend = LineFrontend::new(output);
    if let Some(summary) = session.run(&mut frontend).await? {
        if format == Format::Text {
            eprintln!("{}", summary_text(&summary));
        }
    }
    Ok(())
}

/// Runs `record`: JSON Lines into a private, durable file.
pub async fn record(args: RecordArgs) -> Result<()> {
    let plan = Plan::new(&args.trace)?;
    let writer = RecordWriter::create(&RecordFileOptions {
        path: args.output.clone(),
        force: args.force,
        rotate_size: args.rotate_size,
        // `--rotate-count N` keeps N rotated files besides the live one
        // (as its help and the DaemonSet say); the writer counts them all.
        rotate_count: args.rotate_count.saturating_add(1),
    })
    .map_err(|e| UsageError(e.to_string()))?;
    let session = plan.load()?;
    let output =
        Output::new(Box::new(io::BufWriter::with_capacity(64 * 1024, writer)), Format::Json, false, session.clock);
    let mut frontend = LineFrontend::new(output);
    if let Some(summary) = session.run(&mut frontend).await? {
        eprintln!("{}", summary_text(&summary));
        eprintln!("port-trace: recorded to {}", args.output.display());
    }
    Ok(())
}
