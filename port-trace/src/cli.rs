//! The command line: commands, trace options and their validation. Usage
//! errors exit 2 with one line (clap's own errors do the same).

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::filter::{parse_pids, parse_port_ranges};
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

fn port_list(s: &str) -> Result<PortList, String> {
    parse_port_ranges(s).map(PortList)
}

fn duration(s: &str) -> Result<Duration, String> {
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

/// Options shared by every tracing command.
#[derive(Clone, Debug, Args)]
pub struct TraceArgs {
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
    /// Only sockets whose owner was in this cgroup v2 (path, absolute or
    /// relative to the cgroup v2 root).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// Only ports the kernel chose itself (connect, bind(0), autobind).
    #[arg(long)]
    pub ephemeral_only: bool,
    /// Stop after this long: 30s, 5m, 1h.
    #[arg(short = 'd', long, value_name = "DURATION", value_parser = duration)]
    pub duration: Option<Duration>,
    /// Which hooks to use.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// How often to look for TIME_WAIT sockets that ended, where no hook
    /// reports it (the portable backend): their release is reported within
    /// this much of the kernel freeing the port.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration)]
    pub walk_interval: Duration,
    /// Follow at most this many sockets; past it the oldest are dropped and
    /// counted in the summary (`evicted`), keeping memory bounded.
    #[arg(long, value_name = "N", default_value_t = crate::tracker::DEFAULT_MAX_TRACKED, value_parser = clap::value_parser!(usize))]
    pub max_tracked: usize,
    /// Ring buffer size in KiB (a power of two); a larger one loses fewer
    /// events in bursts.
    #[arg(long, value_name = "KIB", default_value = "4096", value_parser = ring_kib)]
    pub ring_buffer_kib: u32,
    /// Show the kernel verifier's log when a program is refused.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Do not use this attach mechanism (tp_btf, raw_tp, tracepoint,
    /// cgroup), as if the kernel refused it: exercises the fallbacks.
    #[arg(long, value_name = "MECHANISM", hide = true)]
    pub skip_mechanism: Vec<String>,
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
        assert_eq!(cli.watch.trace.pids, Some(PidList(vec![1, 2])));
        assert_eq!(cli.watch.trace.proto, Some(ProtoArg::Udp));
    }

    #[test]
    fn watch_options_parse() {
        let cli = parse(&["watch", "-f", "json", "-P", "80,1000-2000", "-d", "10s", "--lifecycles", "-6"]).unwrap();
        let Some(Command::Watch(w)) = cli.command else { panic!("not watch") };
        assert_eq!(w.format, Some(Format::Json));
        assert_eq!(w.trace.ports, Some(PortList(vec![80..=80, 1000..=2000])));
        assert_eq!(w.trace.duration, Some(Duration::from_secs(10)));
        assert!(w.lifecycles && w.trace.ipv6);
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
            &["frobnicate"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} should fail"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
