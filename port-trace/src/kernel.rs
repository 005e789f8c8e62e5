//! Loading the eBPF programs and attaching them to their hooks — the thin,
//! kernel-facing part. Each hook is attached on its own: a refused hook is
//! reported and the others carry on.

use std::fs::File;
use std::io;

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{
    BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockAddr, FEntry, KProbe, ProgramError, RawTracePoint,
    TracePoint,
};
use aya::{Btf, Ebpf, EbpfLoader};
use port_trace_common::{KernelConfig, ABI_VERSION, CONFIG_GLOBAL, EVENTS_MAP, LOST_MAP};

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
}

impl Attach {
    /// The mechanism's name, as users see it.
    fn mechanism(self) -> &'static str {
        match self {
            Attach::BtfTracepoint(_) => "tp_btf",
            Attach::RawTracepoint(_) => "raw_tp",
            Attach::Tracepoint(..) => "tracepoint",
            Attach::CgroupSockAddr | Attach::CgroupSock => "cgroup",
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
    EbpfLoader::new()
        .override_global(CONFIG_GLOBAL, config, true)
        .map_max_entries(EVENTS_MAP, ring_bytes)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (maps) failed")
}

fn attach_way(ebpf: &mut Ebpf, way: Way, btf: &Btf, cgroup: Option<&File>, verbose: bool) -> Result<(), String> {
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
                return Err("tracefs is not mounted: mount it with `mount -t tracefs nodev /sys/kernel/tracing`".into());
            }
            let p: &mut TracePoint = program.try_into().map_err(err)?;
            p.load().map_err(err)?;
            p.attach(category, name).map_err(err)?;
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
    cgroup: Option<&File>,
    options: &LoadOptions,
) -> Result<String, String> {
    let mut refused = Vec::new();
    for way in hook.ways {
        let mechanism = way.attach.mechanism();
        let attempt = if options.skip_mechanisms.iter().any(|m| m == mechanism) {
            Err("skipped (--skip-mechanism)".to_string())
        } else {
            attach_way(ebpf, *way, btf, cgroup, options.verbose)
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

/// Loads and attaches the portable backend. Fails only when nothing useful
/// could be attached.
pub fn load_portable(config: &KernelConfig, options: &LoadOptions) -> Result<Backend> {
    let ring_bytes = options.ring_bytes;
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
    let mut ebpf = load_object(config, ring_bytes)?;
    let cgroup = system::cgroup2_root().and_then(|root| File::open(root).ok());
    let mut hooks = Vec::new();
    let mut refused_essential = Vec::new();
    for hook in PORTABLE_HOOKS {
        let status = match attach_hook(&mut ebpf, hook, &btf, cgroup.as_ref(), options) {
            Ok(status) => status,
            Err(reason) => {
                if hook.essential {
                    refused_essential.push(format!("{}: {reason}", hook.name));
                }
                format!("not attached: {reason}")
            }
        };
        hooks.push(HookReport { hook: hook.name.to_string(), purpose: hook.purpose, status });
    }
    if !refused_essential.is_empty() {
        anyhow::bail!("the kernel refused hooks port-trace cannot work without: {}", refused_essential.join("; "));
    }
    Ok(Backend { ebpf, hooks })
}

impl Backend {
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

/// The configuration for this kernel.
pub fn kernel_config(netns_filter: Option<u32>) -> Result<KernelConfig> {
    let btf = crate::btf::Btf::from_sys_fs()?;
    Ok(KernelConfig {
        abi_version: ABI_VERSION,
        netns_filter: netns_filter.unwrap_or(0),
        offsets: crate::offsets::kernel_offsets(&btf)?,
    })
}

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
    let config = kernel_config(None)?;
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let mut probes = Vec::new();

    // precise: can a BTF trampoline program load at all?
    let mut ebpf = load_object(&config, 4096)?;
    let fentry = (|| -> std::result::Result<(), String> {
        let p: &mut FEntry = ebpf
            .program_mut("probe_fentry")
            .ok_or("probe program missing")?
            .try_into()
            .map_err(|e: ProgramError| describe_error(&e, verbose))?;
        p.load("inet_put_port", &btf).map_err(|e| describe_error(&e, verbose))?;
        p.attach().map_err(|e| describe_error(&e, verbose))?;
        Ok(())
    })();
    probes.push(Probe {
        hook: "fentry/fexit (BTF trampolines)".into(),
        mechanism: "fentry",
        backend: "precise",
        result: fentry,
    });

    let kprobe = (|| -> std::result::Result<(), String> {
        if !system::kprobes_available() {
            return Err("kprobes are not available: /sys/bus/event_source/devices/kprobe is missing (kernel built without them)".into());
        }
        let p: &mut KProbe = ebpf
            .program_mut("probe_kprobe")
            .ok_or("probe program missing")?
            .try_into()
            .map_err(|e: ProgramError| describe_error(&e, verbose))?;
        p.load().map_err(|e| describe_error(&e, verbose))?;
        p.attach("inet_put_port", 0).map_err(|e| describe_error(&e, verbose))?;
        Ok(())
    })();
    probes.push(Probe { hook: "kprobe/kretprobe".into(), mechanism: "kprobe", backend: "kprobe", result: kprobe });
    drop(ebpf);

    for hook in PORTABLE_HOOKS {
        for way in hook.ways {
            // A fresh object per mechanism, so each is tried on its own.
            let mut ebpf = load_object(&config, 4096)?;
            let cgroup = system::cgroup2_root().and_then(|root| File::open(root).ok());
            let result = attach_way(&mut ebpf, *way, &btf, cgroup.as_ref(), verbose);
            probes.push(Probe {
                hook: hook.name.to_string(),
                mechanism: way.attach.mechanism(),
                backend: "portable",
                result,
            });
        }
    }
    Ok(probes)
}
