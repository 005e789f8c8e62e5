//! The command line: commands, trace options and their validation. Usage
//! errors exit 2 with one line (clap's own errors do the same).

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::filter::{parse_pids, parse_port_ranges, Filter};
use crate::model::{Family, Proto};
use crate::output::Format;

/// port-trace: follow every local port from allocation to release.
#[derive(Debug, Parser)]
#[command(name = "port-trace", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// The command (default: watch).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of the default command, `watch`.
    #[command(flatten)]
    pub watch: WatchArgs,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Live stream of port events (the default command).
    Watch(Box<WatchArgs>),
    /// Full-screen live view: ports in use, churn, range pressure.
    Top(Box<TopArgs>),
    /// Trace and write JSON Lines to a private, durable file for later
    /// forensics.
    Record(Box<RecordArgs>),
    /// Analyse recordings (or, with --duration and no file, a live run).
    Report(Box<crate::report::ReportArgs>),
    /// Who holds a port now (--follow: and next; --history FILE: and before).
    Who(Box<crate::who::WhoArgs>),
    /// Which hooks this kernel allows, and the backend `auto` would choose.
    Doctor(DoctorArgs),
}

/// A comma-separated list of pids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PidList(pub Vec<u32>);

/// A comma-separated list of ports and port ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortList(pub Vec<RangeInclusive<u16>>);

fn pid_list(s: &str) -> Result<PidList, String> {
    parse_pids(s).map(PidList)
}

/// Parses `80,8000-8100` for a port option.
pub(crate) fn port_list(s: &str) -> Result<PortList, String> {
    parse_port_ranges(s).map(PortList)
}

/// Parses a positive humantime duration (`30s`, `5m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration like 30s or 5m ({e})"))?;
    if d.is_zero() {
        return Err("the duration must be longer than zero".into());
    }
    Ok(d)
}

fn ring_kib(s: &str) -> Result<u32, String> {
    let kib: u32 = s.parse().map_err(|_| format!("'{s}' is not a number of KiB"))?;
    if !(4..=1 << 20).contains(&kib) || !kib.is_power_of_two() {
        return Err(format!("{kib} KiB: the ring buffer must be a power of two between 4 KiB and 1 GiB"));
    }
    Ok(kib)
}

/// `--in-call-slots`: a power of two, at most the default.
fn in_call_slots(s: &str) -> Result<u32, String> {
    let slots: u32 = s.parse().map_err(|_| format!("'{s}' is not a number of slots"))?;
    if !slots.is_power_of_two() || slots > port_trace_common::IN_CALL_SLOTS {
        return Err(format!("{slots}: the slots must be a power of two up to {}", port_trace_common::IN_CALL_SLOTS));
    }
    Ok(slots)
}

/// Where `--metrics` serves: `PORT`, `:PORT` or `HOST:PORT` (loopback
/// unless a host is named).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub std::net::SocketAddr);

fn metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    let bad = || format!("'{s}' is not PORT, :PORT or HOST:PORT");
    let text = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = text.parse::<u16>() {
        return Ok(MetricsAddr(std::net::SocketAddr::from(([127, 0, 0, 1], port))));
    }
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return Ok(MetricsAddr(addr));
    }
    use std::net::ToSocketAddrs;
    let mut addrs = s.to_socket_addrs().map_err(|_| bad())?;
    addrs.next().map(MetricsAddr).ok_or_else(bad)
}

/// A size in bytes: `1048576`, `512K`, `100M`, `2G` (powers of 1024).
fn byte_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size like 100M"))?;
    let shift = match unit.trim_end_matches(['i', 'B', 'b']).to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("'{s}': unknown unit (use K, M or G)")),
    };
    let size = n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("'{s}' is too large"))?;
    if size < 4096 {
        return Err(format!("'{s}': rotate at 4K or more"));
    }
    Ok(size)
}

/// Protocol filter values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
}

/// Backend choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The best the kernel allows, hook by hook.
    Auto,
    /// fentry/fexit on the port allocation and release functions.
    Precise,
    /// kprobe/kretprobe on the same functions.
    Kprobe,
    /// Tracepoints and cgroup v2 socket hooks.
    Portable,
}

/// The reader's CPU priority (`--reader-priority`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReaderPriorityArg {
    /// Nice 19 while the ring buffer has room; the starting priority while
    /// a quarter of it waits.
    Low,
    /// The starting priority throughout.
    Normal,
}

/// Which sockets to show: the selection options shared by the tracing
/// commands and `report`.
#[derive(Clone, Debug, Default, Args)]
pub struct SelectArgs {
    /// Only these processes (thread-group ids), e.g. 1234,5678.
    #[arg(short = 'p', long = "pid", value_name = "PID[,PID...]", value_parser = pid_list)]
    pub pids: Option<PidList>,
    /// Only this command name (as the kernel truncates it, 15 bytes).
    #[arg(short = 'c', long, value_name = "NAME")]
    pub comm: Option<String>,
    /// Only these local ports, e.g. 80,8000-8100.
    #[arg(short = 'P', long = "port", value_name = "PORT|LO-HI[,...]", value_parser = port_list)]
    pub ports: Option<PortList>,
    /// Only this protocol.
    #[arg(long, value_enum)]
    pub proto: Option<ProtoArg>,
    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6 sockets (v4-mapped included).
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Only this network namespace: /run/netns/NAME, /proc/PID/ns/net, or an inode.
    #[arg(long, value_name = "PATH|INODE")]
    pub netns: Option<String>,
    /// Only ports the kernel chose itself (connect, bind(0), autobind).
    #[arg(long)]
    pub ephemeral_only: bool,
}

impl SelectArgs {
    /// The record filter these options describe (`--netns` is applied
    /// apart: in the kernel, or by the reader); `cgroup` is the resolved
    /// `--cgroup` of the tracing commands.
    pub fn filter(&self, cgroup: Option<u64>) -> Filter {
        Filter {
            pids: self.pids.clone().map(|p| p.0).unwrap_or_default(),
            comm: self.comm.clone(),
            ports: self.ports.clone().map(|p| p.0).unwrap_or_default(),
            proto: self.proto.map(|p| match p {
                ProtoArg::Tcp => Proto::Tcp,
                ProtoArg::Udp => Proto::Udp,
            }),
            family: match (self.ipv4, self.ipv6) {
                (true, _) => Some(Family::Ipv4),
                (_, true) => Some(Family::Ipv6),
                _ => None,
            },
            cgroup,
            ephemeral_only: self.ephemeral_only,
        }
    }
}

/// Options shared by every tracing command.
#[derive(Clone, Debug, Args)]
pub struct TraceArgs {
    /// Which sockets.
    #[command(flatten)]
    pub select: SelectArgs,
    /// Only sockets whose owner was in this cgroup v2 (path, absolute or
    /// relative to the cgroup v2 root).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// Stop after this long: 30s, 5m, 1h.
    #[arg(short = 'd', long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Which hooks to use.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// How often to look for TIME_WAIT sockets that ended, where no hook
    /// reports it (the portable backend): their release is reported within
    /// this much of the kernel freeing the port.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub walk_interval: Duration,
    /// Follow at most this many sockets; past it the oldest are dropped and
    /// counted in the summary (`evicted`), keeping memory bounded.
    #[arg(long, value_name = "N", default_value_t = crate::tracker::DEFAULT_MAX_TRACKED, value_parser = clap::value_parser!(usize))]
    pub max_tracked: usize,
    /// Ring buffer size in KiB (a power of two); a larger one loses fewer
    /// events in bursts.
    #[arg(long, value_name = "KIB", default_value = "4096", value_parser = ring_kib)]
    pub ring_buffer_kib: u32,
    /// The reader's CPU priority: `low` runs it at nice 19 while the ring
    /// buffer has room, so that it takes idle CPU rather than the traced
    /// workload's, and gives it back its starting priority while a quarter
    /// of the ring waits; `normal` keeps the starting priority throughout.
    #[arg(long, value_enum, value_name = "low|normal", default_value = "low")]
    pub reader_priority: ReaderPriorityArg,
    /// Serve OpenMetrics at http://ADDR/metrics: PORT, :PORT or HOST:PORT
    /// (127.0.0.1 unless a host is named).
    #[arg(long, value_name = "ADDR", value_parser = metrics_addr)]
    pub metrics: Option<MetricsAddr>,
    /// Do not report a listener on these ports or of these commands as an
    /// `ephemeral_listener` notice (repeatable; comma lists).
    #[arg(long, value_name = "PORT|COMM", value_parser = crate::notices::parse_allow_arg)]
    pub allow_listener: Vec<crate::notices::AllowArg>,
    /// Report every TCP state change (by default only those that take,
    /// keep or give back a port: connect, listen, TIME_WAIT, close).
    #[arg(long)]
    pub all_states: bool,
    /// Wake the reader once this many bytes wait in the ring buffer (0:
    /// on every event, the kernel's default). For the benchmark's
    /// before/after comparison; the default is an eighth of the ring.
    #[arg(long, value_name = "BYTES", hide = true)]
    pub ring_wakeup_bytes: Option<u32>,
    /// Slots per table of connect() and bind() calls in flight (a power of
    /// two up to 32768). Threads whose ids share a slot fall back to a hash
    /// map; a test makes them share on purpose.
    #[arg(long, value_name = "N", hide = true, value_parser = in_call_slots)]
    pub in_call_slots: Option<u32>,
    /// Show the kernel verifier's log when a program is refused.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Do not use this attach mechanism (tp_btf, raw_tp, tracepoint,
    /// cgroup), as if the kernel refused it: exercises the fallbacks.
    #[arg(long, value_name = "MECHANISM", hide = true)]
    pub skip_mechanism: Vec<String>,
}

impl TraceArgs {
    /// Every option at its default.
    pub fn defaults() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            trace: TraceArgs,
        }
        Only::parse_from(["port-trace"]).trace
    }
}

/// `watch` options.
#[derive(Clone, Debug, Args)]
pub struct WatchArgs {
    /// Trace options.
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Output format (default: text on a terminal, JSON Lines otherwise).
    #[arg(short = 'f', long, value_enum)]
    pub format: Option<Format>,
    /// Write to this file instead of standard output (created 0600; an
    /// existing file is kept unless --force).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Overwrite the --output file if it exists.
    #[arg(long, requires = "output")]
    pub force: bool,
    /// One line per completed port lifecycle (like tcplife) instead of one
    /// per event.
    #[arg(long)]
    pub lifecycles: bool,
}

/// `top` options.
#[derive(Clone, Debug, Args)]
pub struct TopArgs {
    /// Trace options.
    #[command(flatten)]
    pub trace: TraceArgs,
}

/// `record` options.
#[derive(Clone, Debug, Args)]
pub struct RecordArgs {
    /// Trace options.
    #[command(flatten)]
    pub trace: TraceArgs,
    /// The recording: JSON Lines, zstd-compressed when the name ends in
    /// `.zst`; created 0600, never over an existing file unless --force
    /// (with --rotate-size an existing file is rotated away instead).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    /// Overwrite an existing recording and delete its rotated parts (never
    /// through a symbolic link).
    #[arg(long)]
    pub force: bool,
    /// Start a new file once this much is written (e.g. 100M); older files
    /// become FILE.1, FILE.2, ... A file left by an earlier run (a restart)
    /// is rotated away too, never overwritten.
    #[arg(long, value_name = "SIZE", value_parser = byte_size)]
    pub rotate_size: Option<u64>,
    /// Keep this many rotated files besides the current one.
    #[arg(long, value_name = "N", default_value_t = 5, requires = "rotate_size")]
    pub rotate_count: usize,
}

/// `doctor` options.
#[derive(Clone, Debug, Args)]
pub struct DoctorArgs {
    /// Show the kernel verifier's log for refused programs.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("port-trace").chain(args.iter().copied()))
    }

    #[test]
    fn watch_is_the_default_command() {
        let cli = parse(&["-p", "1,2", "--proto", "udp"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.watch.trace.select.pids, Some(PidList(vec![1, 2])));
        assert_eq!(cli.watch.trace.select.proto, Some(ProtoArg::Udp));
    }

    #[test]
    fn watch_options_parse() {
        let cli = parse(&["watch", "-f", "json", "-P", "80,1000-2000", "-d", "10s", "--lifecycles", "-6"]).unwrap();
        let Some(Command::Watch(w)) = cli.command else { panic!("not watch") };
        assert_eq!(w.format, Some(Format::Json));
        assert_eq!(w.trace.select.ports, Some(PortList(vec![80..=80, 1000..=2000])));
        assert_eq!(w.trace.duration, Some(Duration::from_secs(10)));
        assert!(w.lifecycles && w.trace.select.ipv6);
    }

    #[test]
    fn metrics_addresses_default_to_loopback() {
        let cli = parse(&["watch", "--metrics", "9954"]).unwrap();
        let Some(Command::Watch(w)) = cli.command else { panic!("not watch") };
        assert_eq!(w.trace.metrics.unwrap().0, "127.0.0.1:9954".parse().unwrap());
        assert_eq!(metrics_addr(":80").unwrap().0, "127.0.0.1:80".parse().unwrap());
        assert_eq!(metrics_addr("0.0.0.0:9954").unwrap().0, "0.0.0.0:9954".parse().unwrap());
        assert_eq!(metrics_addr("[::1]:9").unwrap().0, "[::1]:9".parse().unwrap());
    }

    #[test]
    fn record_options_parse() {
        let cli =
            parse(&["record", "-o", "/tmp/x.zst", "--rotate-size", "100M", "--rotate-count", "3", "-P", "80"]).unwrap();
        let Some(Command::Record(r)) = cli.command else { panic!("not record") };
        assert_eq!(r.rotate_size, Some(100 << 20));
        assert_eq!(r.rotate_count, 3);
        assert_eq!(byte_size("4096").unwrap(), 4096);
        assert_eq!(byte_size("2GiB").unwrap(), 2 << 30);
        assert!(byte_size("99999999999999999999G").is_err());
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        for args in [
            &["watch", "-P", "70000"][..],
            &["watch", "-P", "90-80"],
            &["watch", "-p", "abc"],
            &["watch", "--proto", "sctp"],
            &["watch", "-f", "xml"],
            &["watch", "-d", "soon"],
            &["watch", "-d", "0s"],
            &["watch", "-4", "-6"],
            &["watch", "--ring-buffer-kib", "1000"],
            &["watch", "--force"],
            &["watch", "--metrics", "nohost:99999"],
            &["record"],
            &["record", "-o", "x", "--rotate-size", "1"],
            &["record", "-o", "x", "--rotate-size", "10X"],
            &["record", "-o", "x", "--rotate-count", "3"],
            &["frobnicate"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} should fail"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
