//! Loading the eBPF programs and attaching them to their hooks — the thin,
//! kernel-facing part. Each hook is attached on its own: a refused hook is
//! reported and the others carry on.

use std::fs::File;
use std::io;

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{
    BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockAddr, FEntry, FExit, Iter, KProbe, ProgramError,
    RawTracePoint, TracePoint,
};
use aya::{Btf, Ebpf, EbpfLoader};
use port_trace_common::{
    KernelConfig, ABI_VERSION, CONFIG_GLOBAL, EVENTS_MAP, IN_CALL_SLOTS, IN_CALL_SLOT_MAPS, LOST_MAP,
};

use crate::output::HookReport;
use crate::system;

/// The compiled eBPF object (built by aya-build from `port-trace-ebpf`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/port-trace"));

/// How a program reaches its hook.
#[derive(Clone, Copy, Debug)]
enum Attach {
    /// `tp_btf/NAME`.
    BtfTracepoint(&'static str),
    /// `raw_tp/NAME`.
    RawTracepoint(&'static str),
    /// A classic tracepoint `CATEGORY:NAME` (needs tracefs).
    Tracepoint(&'static str, &'static str),
    /// A cgroup `sock_addr` program on the cgroup v2 root.
    CgroupSockAddr,
    /// A cgroup `sock` program on the cgroup v2 root.
    CgroupSock,
    /// fentry on the first of these functions the kernel has.
    FEntry(&'static [&'static str]),
    /// fexit on the first of these functions the kernel has.
    FExit(&'static [&'static str]),
    /// kprobe on the first of these functions the kernel has.
    KProbe(&'static [&'static str]),
    /// kretprobe on the first of these functions the kernel has.
    KRetProbe(&'static [&'static str]),
    /// A BPF iterator (`iter/NAME`): loaded here, run by [`Backend::walk`].
    Iter(&'static str),
}

impl Attach {
    /// The mechanism's name, as users see it.
    fn mechanism(self) -> &'static str {
        match self {
            Attach::BtfTracepoint(_) => "tp_btf",
            Attach::RawTracepoint(_) => "raw_tp",
            Attach::Tracepoint(..) => "tracepoint",
            Attach::CgroupSockAddr | Attach::CgroupSock => "cgroup",
            Attach::FEntry(_) => "fentry",
            Attach::FExit(_) => "fexit",
            Attach::KProbe(_) => "kprobe",
            Attach::KRetProbe(_) => "kretprobe",
            Attach::Iter(_) => "iter",
        }
    }
}

/// One way to reach a hook: a program of the object and how to attach it.
#[derive(Clone, Copy, Debug)]
struct Way {
    program: &'static str,
    attach: Attach,
}

/// One hook of the portable backend, with its mechanisms in order of
/// preference: the first that the kernel accepts is used.
#[derive(Clone, Copy)]
struct Hook {
    /// Name users see.
    name: &'static str,
    ways: &'static [Way],
    purpose: &'static str,
    /// Without it the trace is pointless.
    essential: bool,
}

const fn way(program: &'static str, attach: Attach) -> Way {
    Way { program, attach }
}

/// The precise backend: fentry/fexit on the functions that allocate and
/// release ports (`kernel-hooks.md` §1–§2). Every one must attach for the
/// backend to stand alone; otherwise the portable hooks join in, and the
/// tracker takes each port's first report.
const PRECISE_HOOKS: &[Hook] = &[
    Hook {
        name: "fexit/inet_csk_get_port",
        ways: &[way("fexit_inet_csk_get_port", Attach::FExit(&["inet_csk_get_port"]))],
        purpose: "TCP bind() and listen() allocations and failures",
        essential: false,
    },
    Hook {
        name: "fexit/udp_v4_get_port",
        ways: &[way("fexit_udp_v4_get_port", Attach::FExit(&["udp_v4_get_port"]))],
        purpose: "UDP bind() and autobind (IPv4)",
        essential: false,
    },
    Hook {
        name: "fexit/udp_v6_get_port",
        ways: &[way("fexit_udp_v6_get_port", Attach::FExit(&["udp_v6_get_port"]))],
        purpose: "UDP bind() and autobind (IPv6)",
        essential: false,
    },
    Hook {
        name: "fentry/inet_hash_connect",
        ways: &[way("fentry_inet_hash_connect", Attach::FEntry(&["inet_hash_connect"]))],
        purpose: "TCP connect(): was the socket bound",
        essential: false,
    },
    Hook {
        name: "fexit/inet_hash_connect",
        ways: &[way("fexit_inet_hash_connect", Attach::FExit(&["inet_hash_connect"]))],
        purpose: "TCP connect() ports and EADDRNOTAVAIL (IPv4)",
        essential: false,
    },
    Hook {
        name: "fentry/inet6_hash_connect",
        ways: &[way("fentry_inet6_hash_connect", Attach::FEntry(&["inet6_hash_connect"]))],
        purpose: "TCP connect(): was the socket bound (IPv6)",
        essential: false,
    },
    Hook {
        name: "fexit/inet6_hash_connect",
        ways: &[way("fexit_inet6_hash_connect", Attach::FExit(&["inet6_hash_connect"]))],
        purpose: "TCP connect() ports and EADDRNOTAVAIL (IPv6)",
        essential: false,
    },
    Hook {
        name: "fexit/__ip4_datagram_connect",
        ways: &[way("fexit_ip4_datagram_connect", Attach::FExit(&["__ip4_datagram_connect", "ip4_datagram_connect"]))],
        purpose: "UDP connect(): the destination of an autobound port (IPv4)",
        essential: false,
    },
    Hook {
        name: "fexit/__ip6_datagram_connect",
        ways: &[way("fexit_ip6_datagram_connect", Attach::FExit(&["__ip6_datagram_connect", "ip6_datagram_connect"]))],
        purpose: "UDP connect(): the destination of an autobound port (IPv6)",
        essential: false,
    },
    Hook {
        name: "fentry/inet_put_port",
        ways: &[way("fentry_inet_put_port", Attach::FEntry(&["inet_put_port"]))],
        purpose: "TCP releases",
        essential: false,
    },
    Hook {
        name: "fentry/udp_lib_unhash",
        ways: &[way("fentry_udp_lib_unhash", Attach::FEntry(&["udp_lib_unhash"]))],
        purpose: "UDP releases and disconnects",
        essential: false,
    },
    Hook {
        name: "fentry/inet_twsk_hashdance_schedule",
        ways: &[way(
            "fentry_inet_twsk_hashdance",
            Attach::FEntry(&["inet_twsk_hashdance_schedule", "inet_twsk_hashdance"]),
        )],
        purpose: "hand-off of a port to TIME_WAIT",
        essential: false,
    },
    Hook {
        name: "fentry/inet_twsk_bind_unhash",
        ways: &[way("fentry_inet_twsk_bind_unhash", Attach::FEntry(&["inet_twsk_bind_unhash"]))],
        purpose: "end of TIME_WAIT: the port is free",
        essential: false,
    },
    Hook {
        name: "fentry/tcp_twsk_destructor",
        ways: &[way("fentry_tcp_twsk_destructor", Attach::FEntry(&["tcp_twsk_destructor"]))],
        purpose: "end of TIME_WAIT (backstop)",
        essential: false,
    },
];

/// The kprobe backend: the precise backend's functions through
/// kprobe/kretprobe.
const KPROBE_HOOKS: &[Hook] = &[
    Hook {
        name: "kprobe/inet_csk_get_port",
        ways: &[way("kprobe_inet_csk_get_port", Attach::KProbe(&["inet_csk_get_port"]))],
        purpose: "TCP bind()/listen(): arguments",
        essential: false,
    },
    Hook {
        name: "kretprobe/inet_csk_get_port",
        ways: &[way("kretprobe_inet_csk_get_port", Attach::KRetProbe(&["inet_csk_get_port"]))],
        purpose: "TCP bind() and listen() allocations and failures",
        essential: false,
    },
    Hook {
        name: "kprobe/udp_v4_get_port",
        ways: &[way("kprobe_udp_v4_get_port", Attach::KProbe(&["udp_v4_get_port"]))],
        purpose: "UDP bind()/autobind: arguments (IPv4)",
        essential: false,
    },
    Hook {
        name: "kretprobe/udp_v4_get_port",
        ways: &[way("kretprobe_udp_v4_get_port", Attach::KRetProbe(&["udp_v4_get_port"]))],
        purpose: "UDP bind() and autobind (IPv4)",
        essential: false,
    },
    Hook {
        name: "kprobe/udp_v6_get_port",
        ways: &[way("kprobe_udp_v6_get_port", Attach::KProbe(&["udp_v6_get_port"]))],
        purpose: "UDP bind()/autobind: arguments (IPv6)",
        essential: false,
    },
    Hook {
        name: "kretprobe/udp_v6_get_port",
        ways: &[way("kretprobe_udp_v6_get_port", Attach::KRetProbe(&["udp_v6_get_port"]))],
        purpose: "UDP bind() and autobind (IPv6)",
        essential: false,
    },
    Hook {
        name: "kprobe/inet_hash_connect",
        ways: &[way("kprobe_inet_hash_connect", Attach::KProbe(&["inet_hash_connect"]))],
        purpose: "TCP connect(): was the socket bound",
        essential: false,
    },
    Hook {
        name: "kretprobe/inet_hash_connect",
        ways: &[way("kretprobe_inet_hash_connect", Attach::KRetProbe(&["inet_hash_connect"]))],
        purpose: "TCP connect() ports and EADDRNOTAVAIL (IPv4)",
        essential: false,
    },
    Hook {
        name: "kprobe/inet6_hash_connect",
        ways: &[way("kprobe_inet6_hash_connect", Attach::KProbe(&["inet6_hash_connect"]))],
        purpose: "TCP connect(): was the socket bound (IPv6)",
        essential: false,
    },
    Hook {
        name: "kretprobe/inet6_hash_connect",
        ways: &[way("kretprobe_inet6_hash_connect", Attach::KRetProbe(&["inet6_hash_connect"]))],
        purpose: "TCP connect() ports and EADDRNOTAVAIL (IPv6)",
        essential: false,
    },
    Hook {
        name: "kprobe/__ip4_datagram_connect",
        ways: &[way(
            "kprobe_ip4_datagram_connect",
            Attach::KProbe(&["__ip4_datagram_connect", "ip4_datagram_connect"]),
        )],
        purpose: "UDP connect(): the socket (IPv4)",
        essential: false,
    },
    Hook {
        name: "kretprobe/__ip4_datagram_connect",
        ways: &[way(
            "kretprobe_ip4_datagram_connect",
            Attach::KRetProbe(&["__ip4_datagram_connect", "ip4_datagram_connect"]),
        )],
        purpose: "UDP connect(): the destination of an autobound port (IPv4)",
        essential: false,
    },
    Hook {
        name: "kprobe/__ip6_datagram_connect",
        ways: &[way(
            "kprobe_ip6_datagram_connect",
            Attach::KProbe(&["__ip6_datagram_connect", "ip6_datagram_connect"]),
        )],
        purpose: "UDP connect(): the socket (IPv6)",
        essential: false,
    },
    Hook {
        name: "kretprobe/__ip6_datagram_connect",
        ways: &[way(
            "kretprobe_ip6_datagram_connect",
            Attach::KRetProbe(&["__ip6_datagram_connect", "ip6_datagram_connect"]),
        )],
        purpose: "UDP connect(): the destination of an autobound port (IPv6)",
        essential: false,
    },
    Hook {
        name: "kprobe/inet_put_port",
        ways: &[way("kprobe_inet_put_port", Attach::KProbe(&["inet_put_port"]))],
        purpose: "TCP releases",
        essential: false,
    },
    Hook {
        name: "kprobe/udp_lib_unhash",
        ways: &[way("kprobe_udp_lib_unhash", Attach::KProbe(&["udp_lib_unhash"]))],
        purpose: "UDP releases and disconnects",
        essential: false,
    },
    Hook {
        name: "kprobe/inet_twsk_hashdance_schedule",
        ways: &[way(
            "kprobe_inet_twsk_hashdance",
            Attach::KProbe(&["inet_twsk_hashdance_schedule", "inet_twsk_hashdance"]),
        )],
        purpose: "hand-off of a port to TIME_WAIT",
        essential: false,
    },
    Hook {
        name: "kprobe/inet_twsk_bind_unhash",
        ways: &[way("kprobe_inet_twsk_bind_unhash", Attach::KProbe(&["inet_twsk_bind_unhash"]))],
        purpose: "end of TIME_WAIT: the port is free",
        essential: false,
    },
    Hook {
        name: "kprobe/tcp_twsk_destructor",
        ways: &[way("kprobe_tcp_twsk_destructor", Attach::KProbe(&["tcp_twsk_destructor"]))],
        purpose: "end of TIME_WAIT (backstop)",
        essential: false,
    },
];

/// Socket walks, for every backend: the snapshot at start, TIME_WAIT ends
/// on the portable backend, repair after lost events.
const WALK_HOOKS: &[Hook] = &[
    Hook {
        name: "iter/tcp",
        ways: &[way("iter_tcp", Attach::Iter("tcp"))],
        purpose: "TCP sockets that existed before tracing; TIME_WAIT ends (portable); repair after loss",
        essential: false,
    },
    Hook {
        name: "iter/tcp (followed)",
        ways: &[way("iter_tcp_tracked", Attach::Iter("tcp"))],
        purpose: "the TCP sockets port-trace follows, skipping accepted connections: TIME_WAIT ends (portable); \
                  repair after loss",
        essential: false,
    },
    Hook {
        name: "iter/udp",
        ways: &[way("iter_udp", Attach::Iter("udp"))],
        purpose: "UDP sockets that existed before tracing; repair after loss",
        essential: false,
    },
];

/// The hook that reports TCP state changes, for every backend.
const STATE_HOOK: &str = "sock:inet_sock_set_state";

/// The portable backend: tracepoints and cgroup v2 hooks, no function tracing.
const PORTABLE_HOOKS: &[Hook] = &[
    Hook {
        name: "sock:inet_sock_set_state",
        ways: &[
            way("inet_sock_set_state", Attach::BtfTracepoint("inet_sock_set_state")),
            way("inet_sock_set_state_raw", Attach::RawTracepoint("inet_sock_set_state")),
        ],
        purpose: "TCP states, connect ports, TCP releases",
        essential: true,
    },
    Hook {
        name: "tcp:tcp_destroy_sock",
        ways: &[
            way("tcp_destroy_sock", Attach::BtfTracepoint("tcp_destroy_sock")),
            way("tcp_destroy_sock_raw", Attach::RawTracepoint("tcp_destroy_sock")),
        ],
        purpose: "release of explicitly bound TCP ports",
        essential: false,
    },
    Hook {
        name: "cgroup/bind4",
        ways: &[way("bind4", Attach::CgroupSockAddr)],
        purpose: "port asked of bind() (IPv4)",
        essential: false,
    },
    Hook {
        name: "cgroup/bind6",
        ways: &[way("bind6", Attach::CgroupSockAddr)],
        purpose: "port asked of bind() (IPv6)",
        essential: false,
    },
    Hook {
        name: "cgroup/post_bind4",
        ways: &[way("post_bind4", Attach::CgroupSock)],
        purpose: "bind() allocations (IPv4)",
        essential: true,
    },
    Hook {
        name: "cgroup/post_bind6",
        ways: &[way("post_bind6", Attach::CgroupSock)],
        purpose: "bind() allocations (IPv6)",
        essential: false,
    },
    Hook {
        name: "cgroup/connect4",
        ways: &[way("connect4", Attach::CgroupSockAddr)],
        purpose: "connect() start (IPv4)",
        essential: false,
    },
    Hook {
        name: "cgroup/connect6",
        ways: &[way("connect6", Attach::CgroupSockAddr)],
        purpose: "connect() start (IPv6)",
        essential: false,
    },
    Hook {
        name: "syscalls:sys_exit_connect",
        ways: &[way("sys_exit_connect", Attach::Tracepoint("syscalls", "sys_exit_connect"))],
        purpose: "connect() ports and errors, UDP connect autobind",
        essential: false,
    },
    Hook {
        name: "syscalls:sys_exit_bind",
        ways: &[way("sys_exit_bind", Attach::Tracepoint("syscalls", "sys_exit_bind"))],
        purpose: "bind() failures (EADDRINUSE)",
        essential: false,
    },
    Hook {
        name: "cgroup/sendmsg4",
        ways: &[way("sendmsg4", Attach::CgroupSockAddr)],
        purpose: "UDP autobind on a first send (IPv4)",
        essential: false,
    },
    Hook {
        name: "cgroup/sendmsg6",
        ways: &[way("sendmsg6", Attach::CgroupSockAddr)],
        purpose: "UDP autobind on a first send (IPv6)",
        essential: false,
    },
    Hook {
        name: "cgroup/sock_release",
        ways: &[way("sock_release", Attach::CgroupSock)],
        purpose: "UDP releases",
        essential: false,
    },
];

/// The errno behind an aya error, if any.
fn errno_of(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        source = e.source();
    }
    None
}

/// A short reason for a refused hook, with the verifier log only when asked.
pub fn describe_error(err: &ProgramError, verbose: bool) -> String {
    let errno = errno_of(err);
    let base = match errno {
        Some(libc::EPERM) => {
            "refused by the kernel (EPERM: missing capability, or this kernel's policy forbids this program type)"
                .to_string()
        }
        Some(libc::EACCES) => "rejected by the verifier (EACCES)".to_string(),
        Some(libc::EINVAL) => "rejected by the kernel (EINVAL)".to_string(),
        Some(libc::ENOENT) => "hook not found in this kernel (ENOENT)".to_string(),
        Some(libc::ENOTSUP) | Some(524) => "not supported by this kernel".to_string(),
        Some(e) => format!("failed: {}", io::Error::from_raw_os_error(e)),
        None => format!("failed: {err}"),
    };
    match (verbose, err) {
        (true, ProgramError::LoadError { verifier_log, .. }) => format!("{base}\n{verifier_log}"),
        _ => base,
    }
}

/// The loaded backend: programs attached, maps to read.
pub struct Backend {
    /// Keeps programs and links alive; dropping it detaches everything.
    pub ebpf: Ebpf,
    /// Per-hook outcome.
    pub hooks: Vec<HookReport>,
    /// `precise`, `kprobe`, `portable`, or `precise+portable` when some
    /// precise hooks were refused and portable ones stand in.
    pub name: &'static str,
    /// Events join by socket address (kprobe backend), not by cookie.
    pub keying_by_address: bool,
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF memory to it;
/// without CAP_SYS_RESOURCE this fails with EPERM, which is fine on kernels
/// that charge BPF memory to the cgroup instead (5.11+).
fn raise_memlock() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: valid rlimit pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
}

/// Loads the object with the configuration for this kernel.
fn load_object(config: &KernelConfig, ring_bytes: u32) -> Result<Ebpf> {
    raise_memlock();
    let mut loader = EbpfLoader::new();
    loader.override_global(CONFIG_GLOBAL, config, true).map_max_entries(EVENTS_MAP, ring_bytes);
    for map in IN_CALL_SLOT_MAPS {
        loader.map_max_entries(map, config.in_call_slots_mask + 1);
    }
    loader.load(EBPF_OBJECT).context("loading the eBPF object (maps) failed")
}

/// The first of `names` that the running kernel's BTF has as a function.
fn resolve_function(names: &[&'static str], kernel_btf: Option<&crate::btf::Btf>) -> Result<&'static str, String> {
    let Some(btf) = kernel_btf else { return Ok(names[0]) };
    names
        .iter()
        .copied()
        .find(|name| btf.has_function(name))
        .ok_or_else(|| format!("{} not in this kernel", names.join(" / ")))
}

fn attach_way(
    ebpf: &mut Ebpf,
    way: Way,
    btf: &Btf,
    kernel_btf: Option<&crate::btf::Btf>,
    cgroup: Option<&File>,
    verbose: bool,
) -> Result<(), String> {
    let program =
        ebpf.program_mut(way.program).ok_or_else(|| format!("program {} missing from the object", way.program))?;
    let err = |e: ProgramError| describe_error(&e, verbose);
    match way.attach {
        Attach::BtfTracepoint(name) => {
            let p: &mut BtfTracePoint = program.try_into().map_err(err)?;
            p.load(name, btf).map_err(err)?;
            p.attach().map_err(err)?;
        }
        Attach::RawTracepoint(name) => {
            let p: &mut RawTracePoint = program.try_into().map_err(err)?;
            p.load().map_err(err)?;
            p.attach(name).map_err(err)?;
        }
        Attach::Tracepoint(category, name) => {
            if system::tracefs_root().is_none() {
                let unreadable = std::fs::read_dir("/sys/kernel/tracing")
                    .is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied);
                return Err(if unreadable {
                    "tracefs is not readable: run as root or with CAP_DAC_READ_SEARCH".into()
                } else {
                    "tracefs is not mounted: mount it with `mount -t tracefs nodev /sys/kernel/tracing`".into()
                });
            }
            let p: &mut TracePoint = program.try_into().map_err(err)?;
            p.load().map_err(err)?;
            p.attach(category, name).map_err(err)?;
        }
        Attach::FEntry(names) => {
            let function = resolve_function(names, kernel_btf)?;
            let p: &mut FEntry = program.try_into().map_err(err)?;
            p.load(function, btf).map_err(err)?;
            p.attach().map_err(err)?;
        }
        Attach::FExit(names) => {
            let function = resolve_function(names, kernel_btf)?;
            let p: &mut FExit = program.try_into().map_err(err)?;
            p.load(function, btf).map_err(err)?;
            p.attach().map_err(err)?;
        }
        Attach::KProbe(names) | Attach::KRetProbe(names) => {
            let function = resolve_function(names, kernel_btf)?;
            let p: &mut KProbe = program.try_into().map_err(err)?;
            p.load().map_err(err)?;
            if !system::kprobes_available() {
                return Err("kprobes are not available: /sys/bus/event_source/devices/kprobe is missing (kernel built without them)".into());
            }
            p.attach(function, 0).map_err(err)?;
        }
        Attach::Iter(target) => {
            let p: &mut Iter = program.try_into().map_err(err)?;
            p.load(target, btf).map_err(err)?;
        }
        Attach::CgroupSockAddr | Attach::CgroupSock => {
            let Some(cgroup) = cgroup else {
                return Err("no cgroup v2 hierarchy is mounted".into());
            };
            if let Attach::CgroupSockAddr = way.attach {
                let p: &mut CgroupSockAddr = program.try_into().map_err(err)?;
                p.load().map_err(err)?;
                p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
            } else {
                let p: &mut CgroupSock = program.try_into().map_err(err)?;
                p.load().map_err(err)?;
                p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
            }
        }
    }
    Ok(())
}

/// Tries the hook's mechanisms in order. `Ok` names the one used (and why
/// the better ones were refused); `Err` says why none worked.
fn attach_hook(
    ebpf: &mut Ebpf,
    hook: &Hook,
    btf: &Btf,
    kernel_btf: Option<&crate::btf::Btf>,
    cgroup: Option<&File>,
    options: &LoadOptions,
) -> Result<String, String> {
    let mut refused = Vec::new();
    for way in hook.ways {
        let mechanism = way.attach.mechanism();
        let attempt = if options.skip_mechanisms.iter().any(|m| m == mechanism) {
            Err("skipped (--skip-mechanism)".to_string())
        } else {
            attach_way(ebpf, *way, btf, kernel_btf, cgroup, options.verbose)
        };
        match attempt {
            Ok(()) if refused.is_empty() => return Ok(format!("attached ({})", way.attach.mechanism())),
            Ok(()) => return Ok(format!("attached ({}; fallback: {})", way.attach.mechanism(), refused.join("; "))),
            Err(reason) => refused.push(format!("{} {reason}", way.attach.mechanism())),
        }
    }
    Err(refused.join("; "))
}

/// How to load the backend.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Ring buffer size in bytes.
    pub ring_bytes: u32,
    /// Include verifier logs in refusals.
    pub verbose: bool,
    /// Mechanisms to treat as refused (testing the fallbacks).
    pub skip_mechanisms: Vec<String>,
}

/// Which hooks to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The best the kernel allows: precise (with portable hooks standing in
    /// for refused ones), else kprobe, else portable.
    Auto,
    /// Precise only (plus the state tracepoint); fail if any is refused.
    Precise,
    /// kprobe only (plus the state tracepoint); fail if any is refused.
    Kprobe,
    /// Portable only.
    Portable,
}

fn attach_all(
    ebpf: &mut Ebpf,
    hooks: &[Hook],
    backend: &'static str,
    btf: &Btf,
    kernel_btf: Option<&crate::btf::Btf>,
    cgroup: Option<&File>,
    options: &LoadOptions,
) -> Vec<(HookReport, bool)> {
    hooks
        .iter()
        .map(|hook| {
            let (status, ok) = match attach_hook(ebpf, hook, btf, kernel_btf, cgroup, options) {
                Ok(status) => (status, true),
                Err(reason) => (format!("not attached: {reason}"), false),
            };
            (HookReport { hook: hook.name.to_string(), backend, purpose: hook.purpose, status }, ok)
        })
        .collect()
}

/// The refused hooks of a backend in one line, grouped by reason.
fn refusals(reports: &[(HookReport, bool)]) -> String {
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for (report, _) in reports.iter().filter(|(_, ok)| !ok) {
        // "not attached: fexit refused by ..." → "refused by ..."
        let reason = report.status.trim_start_matches("not attached: ");
        let reason = reason.split_once(' ').map_or(reason, |(mechanism, rest)| {
            if ["fentry", "fexit", "kprobe", "kretprobe"].contains(&mechanism) {
                rest
            } else {
                reason
            }
        });
        match groups.iter_mut().find(|(r, _)| r == reason) {
            Some((_, hooks)) => hooks.push(&report.hook),
            None => groups.push((reason.to_string(), vec![&report.hook])),
        }
    }
    let total = reports.len();
    groups
        .into_iter()
        .map(|(reason, hooks)| {
            if hooks.len() == total {
                format!("{reason} (all {total} hooks)")
            } else {
                format!("{reason} ({})", hooks.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Loads and attaches the chosen backend, hook by hook. Fails only when a
/// forced backend cannot load, or nothing useful could be attached.
pub fn load(config: &KernelConfig, options: &LoadOptions, choice: Choice) -> Result<Backend> {
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
    let kernel_btf = crate::btf::Btf::from_sys_fs().ok();
    let cgroup = system::cgroup2_root().and_then(|root| File::open(root).ok());
    let attach = |ebpf: &mut Ebpf, hooks: &[Hook], backend: &'static str| {
        attach_all(ebpf, hooks, backend, &btf, kernel_btf.as_ref(), cgroup.as_ref(), options)
    };
    let mut ebpf = load_object(config, options.ring_bytes)?;
    let mut reports = Vec::new();

    // Function hooks first: precise, then kprobe. A backend whose every
    // hook attached stands alone with the state tracepoint; a partial
    // precise backend is completed by the portable hooks (the tracker keeps
    // the first report of each port). kprobe events join by socket address,
    // so the kprobe backend is used whole or not at all.
    let mut name = "portable";
    let mut keying_by_address = false;
    if matches!(choice, Choice::Auto | Choice::Precise) {
        let precise = attach(&mut ebpf, PRECISE_HOOKS, "precise");
        let all = precise.iter().all(|(_, ok)| *ok);
        let any = precise.iter().any(|(_, ok)| *ok);
        if choice == Choice::Precise && !all {
            anyhow::bail!("--backend precise cannot load: {}", refusals(&precise));
        }
        name = if all {
            "precise"
        } else if any {
            "precise+portable"
        } else {
            "portable"
        };
        reports.extend(precise);
    }
    if choice == Choice::Kprobe || (choice == Choice::Auto && name == "portable") {
        // A fresh object: the refused precise attempts are dropped with the
        // old one. kprobe events are joined by address, so no event may be
        // kept in the kernel for want of a cookie.
        ebpf = load_object(&keyed_by_address(config), options.ring_bytes)?;
        let kprobe = attach(&mut ebpf, KPROBE_HOOKS, "kprobe");
        let all = kprobe.iter().all(|(_, ok)| *ok);
        if choice == Choice::Kprobe && !all {
            anyhow::bail!("--backend kprobe cannot load: {}", refusals(&kprobe));
        }
        if all {
            name = "kprobe";
            keying_by_address = true;
        } else {
            // Drop the partial kprobe set: portable hooks take over.
            ebpf = load_object(config, options.ring_bytes)?;
        }
        reports.extend(kprobe);
    }
    let standalone = matches!(name, "precise" | "kprobe");
    let portable: Vec<Hook> = PORTABLE_HOOKS.iter().filter(|h| !standalone || h.name == STATE_HOOK).copied().collect();
    let portable_reports = attach(&mut ebpf, &portable, "portable");
    let refused_essential: Vec<String> = portable
        .iter()
        .zip(&portable_reports)
        .filter(|(hook, (_, ok))| hook.essential && !ok)
        .map(|(hook, (report, _))| format!("{}: {}", hook.name, report.status))
        .collect();
    if !refused_essential.is_empty() && !standalone {
        anyhow::bail!("the kernel refused hooks port-trace cannot work without: {}", refused_essential.join("; "));
    }
    reports.extend(portable_reports);
    reports.extend(attach(&mut ebpf, WALK_HOOKS, "walk"));
    Ok(Backend { ebpf, hooks: reports.into_iter().map(|(r, _)| r).collect(), name, keying_by_address })
}

impl Backend {
    /// Whether the walks of `proto` sockets can run.
    pub fn can_walk(&self, proto: crate::model::Proto) -> bool {
        let hook = match proto {
            crate::model::Proto::Tcp => "iter/tcp",
            crate::model::Proto::Udp => "iter/udp",
        };
        self.attached(hook)
    }

    /// Whether the hook of this name is attached (for iterators: loaded).
    fn attached(&self, hook: &str) -> bool {
        self.hooks.iter().any(|h| h.hook == hook && h.status.starts_with("attached"))
    }

    /// Starts a walk of the `proto` sockets of one network namespace
    /// (`netns`, a path to enter; the current one when `None`): reading the
    /// returned file runs the iterator program over the sockets, and it
    /// writes a SNAPSHOT record for each (whole records, in the order read,
    /// though one `read` may end inside a record). The iterator takes the
    /// namespace of the thread that creates it, so this thread enters
    /// `netns` for that moment.
    ///
    /// With `followed_only` (only when events are joined by cookie), a TCP
    /// walk skips the sockets no hook of ours ever saw: on a busy server,
    /// the TIME_WAIT sockets of accepted connections, which are most of its
    /// sockets and none of ours.
    pub fn open_walk(
        &mut self,
        proto: crate::model::Proto,
        netns: Option<&std::path::Path>,
        followed_only: bool,
    ) -> Result<File> {
        use std::os::fd::AsRawFd;
        let followed_only = followed_only && !self.keying_by_address && self.attached("iter/tcp (followed)");
        let name = match proto {
            crate::model::Proto::Tcp if followed_only => "iter_tcp_tracked",
            crate::model::Proto::Tcp => "iter_tcp",
            crate::model::Proto::Udp => "iter_udp",
        };
        let program: &mut Iter =
            self.ebpf.program_mut(name).context("iterator program missing")?.try_into().context("not an iterator")?;
        let link_id = program.attach().context("attaching the socket iterator")?;
        let link = program.take_link(link_id).context("taking the iterator link")?;
        let own = File::open("/proc/thread-self/ns/net").context("opening this thread's network namespace")?;
        let target = netns.map(File::open).transpose().context("opening the namespace to walk")?;
        let setns = |ns: &File| -> Result<()> {
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                anyhow::bail!("setns: {}", io::Error::last_os_error());
            }
            Ok(())
        };
        if let Some(target) = &target {
            setns(target)?;
        }
        let file = link.into_file();
        if target.is_some() {
            setns(&own)?;
        }
        file.context("creating the socket iterator")
    }

    /// The ring buffer of events.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(EVENTS_MAP).context("EVENTS map missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The loss counter.
    pub fn take_lost(&mut self) -> Result<PerCpuArray<MapData, u64>> {
        let map = self.ebpf.take_map(LOST_MAP).context("LOST map missing")?;
        Ok(PerCpuArray::try_from(map)?)
    }
}

/// Sum of the per-CPU loss counters.
pub fn read_lost(lost: &PerCpuArray<MapData, u64>) -> u64 {
    lost.get(&0, 0).map(|values| values.iter().sum()).unwrap_or(0)
}

/// The configuration for this kernel: only `netns_filter` (0: all), wake
/// the reader once `wakeup_bytes` wait (0: every event), `options` bits
/// ([`port_trace_common::options`]), `in_call_slots` per table of calls in
/// flight (a power of two; `None`: [`IN_CALL_SLOTS`]). Events are joined by
/// cookie (`KEYED_BY_COOKIE`) unless the kprobe backend is loaded
/// ([`keyed_by_address`]).
pub fn kernel_config(
    netns_filter: Option<u32>,
    wakeup_bytes: u32,
    options: u32,
    in_call_slots: Option<u32>,
) -> Result<KernelConfig> {
    let btf = crate::btf::Btf::from_sys_fs()?;
    Ok(KernelConfig {
        abi_version: ABI_VERSION,
        netns_filter: netns_filter.unwrap_or(0),
        offsets: crate::offsets::kernel_offsets(&btf)?,
        wakeup_bytes,
        options: options | port_trace_common::options::KEYED_BY_COOKIE,
        in_call_slots_mask: in_call_slots.unwrap_or(IN_CALL_SLOTS) - 1,
    })
}

/// `config` for programs whose events userspace joins by socket address
/// (the kprobe backend): nothing is held back for want of a cookie.
fn keyed_by_address(config: &KernelConfig) -> KernelConfig {
    KernelConfig { options: config.options & !port_trace_common::options::KEYED_BY_COOKIE, ..*config }
}

/// How many bytes may wait in a ring buffer of `ring_bytes` before the
/// programs wake the reader: an eighth, at most 256 KiB, so that a burst
/// wakes it long before the ring is full; the reader polls every
/// [`RING_POLL_INTERVAL`] for what waits below that.
pub fn wakeup_bytes(ring_bytes: u32) -> u32 {
    (ring_bytes / 8).clamp(128, 256 * 1024)
}

/// How often the reader looks into the ring buffer without being woken.
pub const RING_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// One row of `doctor`.
pub struct Probe {
    /// The hook or mechanism.
    pub hook: String,
    /// How it was reached (`tp_btf`, `raw_tp`, `cgroup`, ...).
    pub mechanism: &'static str,
    /// Which backend uses it.
    pub backend: &'static str,
    /// `Ok` when usable, else why not.
    pub result: std::result::Result<(), String>,
}

/// Asks the kernel, hook by hook, what it allows. Attaches nothing for
/// longer than the probe and mounts nothing.
pub fn probe_all(verbose: bool) -> Result<Vec<Probe>> {
    let config = kernel_config(None, 0, 0, None)?;
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let mut probes = Vec::new();

    let kernel_btf = crate::btf::Btf::from_sys_fs().ok();
    let cgroup = system::cgroup2_root().and_then(|root| File::open(root).ok());
    for (backend, hooks) in
        [("precise", PRECISE_HOOKS), ("kprobe", KPROBE_HOOKS), ("portable", PORTABLE_HOOKS), ("walk", WALK_HOOKS)]
    {
        for hook in hooks {
            for way in hook.ways {
                // A fresh object per mechanism, so each is tried on its own.
                let mut ebpf = load_object(&config, 4096)?;
                let result = attach_way(&mut ebpf, *way, &btf, kernel_btf.as_ref(), cgroup.as_ref(), verbose);
                probes.push(Probe { hook: hook.name.to_string(), mechanism: way.attach.mechanism(), backend, result });
            }
        }
    }
    Ok(probes)
}
