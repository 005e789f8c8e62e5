//! `port-trace watch` (and `record`, which is `watch --format json` into a
//! durable file): stream records until Ctrl-C, SIGTERM or `--duration`, then
//! flush and summarise.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Result};

use crate::cli::{RecordArgs, WatchArgs};
use crate::live::{Frontend, LiveState, Plan};
use crate::output::{summary_text, Format, Output};
use crate::recording::{RecordFileOptions, RecordWriter};
use crate::UsageError;

/// Creates `path` for writing: mode 0600, never through a symbolic link,
/// never over an existing file unless `force`.
pub fn create_private_file(path: &Path, force: bool) -> Result<std::fs::File> {
    let mut options = OpenOptions::new();
    options.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(UsageError(format!(
            "{} is a symbolic link: port-trace never writes through one, --force or not",
            path.display()
        )));
    }
    options.open(path).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::AlreadyExists { " (use --force to overwrite)" } else { "" };
        UsageError(format!("cannot create {}: {e}{hint}", path.display())).into()
    })
}

fn open_output(args: &WatchArgs) -> Result<(Box<dyn Write + Send>, bool)> {
    match &args.output {
        None => {
            let terminal = io::stdout().is_terminal();
            Ok((Box::new(io::BufWriter::with_capacity(64 * 1024, io::stdout())), terminal))
        }
        Some(path) => {
            let file = create_private_file(path, args.force)?;
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
        rotate_count: args.rotate_count,
    })
    .map_err(|e| UsageError(e.to_string()))?;
    let session = plan.load()?;
    let output = Output::new(Box::new(io::BufWriter::with_capacity(64 * 1024, writer)), Format::Json, false, session.clock);
    let mut frontend = LineFrontend::new(output);
    if let Some(summary) = session.run(&mut frontend).await? {
        eprintln!("{}", summary_text(&summary));
        eprintln!("port-trace: recorded to {}", args.output.display());
    }
    Ok(())
}
