//! What the workload saw: one [`TruthSocket`] per socket operation, written
//! by `port-workload` as JSON Lines and read back by the tests.
//!
//! Every field comes from the workload's own view: the port from
//! `getsockname`, the pid from `getpid`, errors from the failing call, and
//! `time_wait` / `freed` from the kernel's socket tables after the close.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One socket's life as the workload performed and observed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruthSocket {
    /// What was done: `listen` (bind(0) or an explicit bind, then listen),
    /// `connect` (TCP or UDP connect on an unbound socket), `bind` (explicit
    /// or bind(0), no listen), `sendto` (UDP bind(0), then sendto),
    /// `listen_unbound` (listen on a never-bound TCP socket: the kernel
    /// picks the port), `autobind` (UDP sendto on a never-bound socket: the
    /// kernel autobinds), `connect_refused` (TCP connect on an unbound
    /// socket that the peer refused: the kernel allocated a port and gave it
    /// back), and the failures, where no port was allocated: `bind_fail` (a
    /// bind the kernel refused), `connect_fail` (a connect that got no
    /// port, e.g. EADDRNOTAVAIL).
    pub op: String,
    /// The scenario step, e.g. `a:listener`, `b:client-last-close`.
    pub step: String,
    /// Allocation order within the workload run, from 0.
    pub seq: u32,
    /// `tcp` or `udp`.
    pub proto: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// Local address, as `getsockname` returned it (for `connect_refused`,
    /// whose address the kernel clears on failure: the source address the
    /// kernel's routing table gives for the destination, `ip route get`).
    pub laddr: String,
    /// Local port, as `getsockname` returned it (for `bind_fail`: the port
    /// that was asked for; for `connect_refused`: getsockname's after the
    /// failure, 0 when the kernel no longer shows it, see
    /// [`TruthSocket::port_known`]).
    pub lport: u16,
    /// Remote address for connected sockets, else `None`.
    pub raddr: Option<String>,
    /// Remote port for connected sockets, else `None`.
    pub rport: Option<u16>,
    /// The workload's pid (`getpid`, the thread-group id).
    pub pid: u32,
    /// The origin port-trace must report for the allocation (`bind`,
    /// `connect`, ...).
    pub origin: String,
    /// The kernel chose the port (the workload passed port 0 or none).
    pub ephemeral: bool,
    /// The port was really given back by the end of the workload, so the
    /// tracer must report a `release`.
    pub expect_release: bool,
    /// The kernel listed this socket's 4-tuple in TIME_WAIT after the close:
    /// the port is still held, and no `release` may be reported yet.
    pub time_wait: bool,
    /// After the close the kernel no longer listed the socket: `Some(true)`;
    /// still listed: `Some(false)`; not visible in `/proc/net` (bound-only
    /// TCP sockets, failed binds): `None`.
    pub freed: Option<bool>,
    /// Wall-clock time (RFC 3339) right after the allocating call returned.
    pub allocated_at: String,
    /// Wall-clock time (RFC 3339) right after the socket was closed.
    pub closed_at: Option<String>,
    /// For failed calls (`bind_fail`, `connect_fail`, `connect_refused`):
    /// the errno name the workload got (`EADDRINUSE`, `ECONNREFUSED`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// The `reason` the tracer's `release` must carry, when it is not
    /// `close` (e.g. `connect_failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_reason: Option<String>,
}

impl TruthSocket {
    /// A failed call that allocated no port (`bind_fail`, `connect_fail`):
    /// the tracer must report an `alloc_fail`, no `alloc`.
    pub fn is_failure(&self) -> bool {
        matches!(self.op.as_str(), "bind_fail" | "connect_fail")
    }

    /// Whether `lport` is the port the socket held. False only for a
    /// refused connect whose socket showed port 0 after the failure.
    pub fn port_known(&self) -> bool {
        self.lport != 0 || self.is_failure()
    }

    /// The `reason` its release must carry: `close` unless said otherwise.
    pub fn expected_release_reason(&self) -> &str {
        self.release_reason.as_deref().unwrap_or("close")
    }

    /// `proto family laddr:lport` for messages.
    pub fn label(&self) -> String {
        format!("{} {} {} ({})", self.proto, self.family, join_addr(&self.laddr, self.lport), self.step)
    }
}

/// `addr:port`, bracketing IPv6 addresses.
pub fn join_addr(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Everything the workload printed.
#[derive(Clone, Debug)]
pub struct Truth {
    /// The workload's pid from its `done` line.
    pub pid: u32,
    /// Every socket operation, in the order they were printed (their close
    /// order); sort by [`TruthSocket::seq`] for allocation order.
    pub sockets: Vec<TruthSocket>,
}

impl Truth {
    /// Parses the workload's stdout: one JSON object per line, the last one
    /// `{"op":"done","pid":N}`; every socket line must carry that pid. The
    /// `{"op":"ready",...}` line of a scenario that holds its sockets (see
    /// [`crate::HeldWorkload`]) is not a socket and is skipped, as is the
    /// `{"op":"armed",...}` and `{"op":"paused",...}` lines of one that
    /// waits at steps.
    pub fn parse(stdout: &str) -> Result<Truth> {
        let mut sockets = Vec::new();
        let mut done_pid = None;
        for (i, line) in stdout.lines().enumerate() {
            if done_pid.is_some() {
                bail!("workload line {} after `done`: {line}", i + 1);
            }
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("workload line {} is not JSON: {line}", i + 1))?;
            if matches!(v["op"].as_str(), Some("ready" | "armed" | "paused")) {
                continue;
            }
            if v["op"] == "done" {
                let pid = v["pid"].as_u64().context("`done` without a pid")?;
                done_pid = Some(u32::try_from(pid)?);
            } else {
                let s: TruthSocket =
                    serde_json::from_value(v).with_context(|| format!("workload line {}: {line}", i + 1))?;
                sockets.push(s);
            }
        }
        let pid = done_pid.context("the workload did not print its `done` line")?;
        if let Some(s) = sockets.iter().find(|s| s.pid != pid) {
            bail!("socket {} has pid {} but the workload's pid is {pid}", s.label(), s.pid);
        }
        Ok(Truth { pid, sockets })
    }

    /// Sockets that hold (or held) a port, in allocation order: every op
    /// except the failures (see [`TruthSocket::is_failure`]).
    pub fn allocations(&self) -> Vec<&TruthSocket> {
        let mut v: Vec<&TruthSocket> = self.sockets.iter().filter(|s| !s.is_failure()).collect();
        v.sort_by_key(|s| s.seq);
        v
    }

    /// Calls the kernel refused without allocating a port, in order.
    pub fn failures(&self) -> Vec<&TruthSocket> {
        let mut v: Vec<&TruthSocket> = self.sockets.iter().filter(|s| s.is_failure()).collect();
        v.sort_by_key(|s| s.seq);
        v
    }

    /// The same truth without the sockets `drop` picks (e.g. a known gap
    /// that a test checks separately).
    pub fn without(&self, drop: impl Fn(&TruthSocket) -> bool) -> Truth {
        Truth { pid: self.pid, sockets: self.sockets.iter().filter(|s| !drop(s)).cloned().collect() }
    }
}

/// The steps of the `basic` scenario, once per family.
pub const BASIC_STEPS: [&str; 7] = [
    "a:listener",
    "b:client-closes-last",
    "c:client-closes-first",
    "d:explicit-bind",
    "e:udp-receiver",
    "e:udp-sender",
    "f:udp-connect",
];

impl Truth {
    /// Checks that the `basic` scenario really did what it promises (see
    /// `port-workload`), with ephemeral ports inside `range` and the
    /// explicit one outside; returns the problems found. A workload that did
    /// less than this would make the comparison with the tracer vacuous.
    pub fn basic_problems(&self, range: (u16, u16)) -> Vec<String> {
        let mut p = Vec::new();
        let allocs = self.allocations();
        if allocs.len() != 2 * BASIC_STEPS.len() {
            p.push(format!("{} allocations, want {}", allocs.len(), 2 * BASIC_STEPS.len()));
        }
        let mut seqs: Vec<u32> = self.sockets.iter().map(|s| s.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        if seqs.len() != self.sockets.len() {
            p.push("duplicate seq numbers".into());
        }
        for (family, laddr) in [("ipv4", "127.0.0.1"), ("ipv6", "::1")] {
            let step = |name: &str| -> Option<&TruthSocket> {
                let v: Vec<_> = allocs.iter().filter(|s| s.family == family && s.step == name).collect();
                match v.as_slice() {
                    [one] => Some(**one),
                    _ => None,
                }
            };
            for name in BASIC_STEPS {
                let Some(s) = step(name) else {
                    p.push(format!("{family} {name}: not exactly one socket"));
                    continue;
                };
                let want_proto = if name.starts_with("e:") || name.starts_with("f:") { "udp" } else { "tcp" };
                let want_origin = if name.starts_with("b:") || name.starts_with("c:") || name.starts_with("f:") {
                    "connect"
                } else {
                    "bind"
                };
                let tw = name.starts_with("c:");
                let explicit = name.starts_with("d:");
                let checks = [
                    (s.proto == want_proto, format!("proto {}", s.proto)),
                    (s.laddr == laddr, format!("laddr {}", s.laddr)),
                    (s.origin == want_origin, format!("origin {}", s.origin)),
                    (s.ephemeral != explicit, format!("ephemeral {}", s.ephemeral)),
                    (
                        s.ephemeral == (range.0..=range.1).contains(&s.lport),
                        format!("port {} vs ephemeral range {range:?}", s.lport),
                    ),
                    (s.time_wait == tw, format!("time_wait {}", s.time_wait)),
                    (s.expect_release != tw, format!("expect_release {}", s.expect_release)),
                    (s.closed_at.is_some(), "not closed".into()),
                    (
                        s.raddr.is_some() == (want_origin == "connect") && s.raddr.is_some() == s.rport.is_some(),
                        format!("remote {:?}:{:?}", s.raddr, s.rport),
                    ),
                ];
                for (ok, what) in checks {
                    if !ok {
                        p.push(format!("{family} {name}: {what}"));
                    }
                }
            }
            let target = |server: &str, client: &str| {
                if let (Some(srv), Some(cli)) = (step(server), step(client)) {
                    if cli.rport != Some(srv.lport) || cli.raddr.as_deref() != Some(srv.laddr.as_str()) {
                        return Some(format!("{family} {client}: remote is not {server}"));
                    }
                }
                None
            };
            p.extend(target("a:listener", "b:client-closes-last"));
            p.extend(target("a:listener", "c:client-closes-first"));
            p.extend(target("e:udp-receiver", "f:udp-connect"));
        }
        for s in &self.sockets {
            let (a, c) = (crate::rfc3339::parse(&s.allocated_at), s.closed_at.as_deref().map(crate::rfc3339::parse));
            match (a, c) {
                (Some(a), Some(Some(c))) if c >= a => {}
                (Some(_), None) if s.op == "bind_fail" => {}
                _ => p.push(format!("{}: bad times {} / {:?}", s.label(), s.allocated_at, s.closed_at)),
            }
        }
        p
    }
}

/// One step a scenario promises, for each of IPv4 and IPv6.
#[derive(Clone, Copy, Debug)]
pub struct StepWant {
    /// The step name the workload prints.
    pub step: &'static str,
    /// Its `op`.
    pub op: &'static str,
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// The origin the tracer must report.
    pub origin: &'static str,
    /// How many sockets of this step per family.
    pub count: usize,
}

/// The steps of the `failures` scenario; `x:client` is repeated once per
/// port of the ephemeral range.
pub fn failures_steps(range: (u16, u16)) -> [StepWant; 4] {
    let size = usize::from(range.1.saturating_sub(range.0)) + 1;
    [
        StepWant { step: "r:connect-refused", op: "connect_refused", proto: "tcp", origin: "connect", count: 1 },
        StepWant { step: "x:listener", op: "listen", proto: "tcp", origin: "bind", count: 1 },
        StepWant { step: "x:client", op: "connect", proto: "tcp", origin: "connect", count: size },
        StepWant { step: "x:connect-exhausted", op: "connect_fail", proto: "tcp", origin: "connect", count: 1 },
    ]
}

/// The step of the `listen-unbound` scenario.
pub const LISTEN_UNBOUND_STEPS: [StepWant; 1] =
    [StepWant { step: "g:listen-unbound", op: "listen_unbound", proto: "tcp", origin: "listen", count: 1 }];

/// The steps of the `udp-sendto` scenario.
pub const UDP_SENDTO_STEPS: [StepWant; 2] = [
    StepWant { step: "h:udp-receiver", op: "bind", proto: "udp", origin: "bind", count: 1 },
    StepWant { step: "h:udp-sendto-autobind", op: "autobind", proto: "udp", origin: "autobind", count: 1 },
];

/// The steps of the `time-wait` scenario.
pub const TIME_WAIT_STEPS: [StepWant; 2] = [
    StepWant { step: "t:listener", op: "listen", proto: "tcp", origin: "bind", count: 1 },
    StepWant { step: "t:client-closes-first", op: "connect", proto: "tcp", origin: "connect", count: 1 },
];

/// The steps of the `hold` scenario: sockets that exist before the tracer
/// starts, so their origin is `snapshot`.
pub const HOLD_STEPS: [StepWant; 3] = [
    StepWant { step: "s:listener", op: "listen", proto: "tcp", origin: "snapshot", count: 1 },
    StepWant { step: "s:client", op: "connect", proto: "tcp", origin: "snapshot", count: 1 },
    StepWant { step: "s:udp", op: "bind", proto: "udp", origin: "snapshot", count: 1 },
];

/// The steps of the `connect-storm` scenario for an ephemeral range of
/// `size` ports: every port taken by a client, [`STORM_EXTRA`] connects
/// refused for want of a port, and the UDP socket whose port a second bind
/// asks for. (The refused binds, `z:bind-in-use` and `z:udp-bind-in-use`,
/// are checked by [`Truth::connect_storm_problems`].)
pub fn connect_storm_steps(size: usize) -> [StepWant; 4] {
    [
        StepWant { step: "y:listener", op: "listen", proto: "tcp", origin: "bind", count: 1 },
        StepWant { step: "y:client", op: "connect", proto: "tcp", origin: "connect", count: size },
        StepWant {
            step: "y:connect-exhausted",
            op: "connect_fail",
            proto: "tcp",
            origin: "connect",
            count: STORM_EXTRA,
        },
        StepWant { step: "z:udp-holder", op: "bind", proto: "udp", origin: "bind", count: 1 },
    ]
}

/// How many more connects than the ephemeral range has ports
/// `connect-storm` makes per family (each must get EADDRNOTAVAIL).
pub const STORM_EXTRA: usize = 10;

/// UDP sockets per family of the `crowd` scenario.
pub const CROWD: usize = 50;

/// The known set of the `churn` scenario (per family), open across the
/// burst.
pub const CHURN_STEPS: [StepWant; 4] = [
    StepWant { step: "k:listener", op: "listen", proto: "tcp", origin: "bind", count: 1 },
    StepWant { step: "k:client", op: "connect", proto: "tcp", origin: "connect", count: 2 },
    StepWant { step: "k:udp-bound", op: "bind", proto: "udp", origin: "bind", count: 2 },
    StepWant { step: "k:udp-connect", op: "connect", proto: "udp", origin: "connect", count: 1 },
];

/// The sockets of the `crowd` scenario (per family).
pub const CROWD_STEPS: [StepWant; 1] =
    [StepWant { step: "c:udp", op: "bind", proto: "udp", origin: "snapshot", count: CROWD }];

impl Truth {
    /// Checks that `scenario` really did what `port-workload` promises for
    /// it, with ephemeral ports inside `range`; returns the problems found.
    pub fn scenario_problems(&self, scenario: &str, range: (u16, u16)) -> Vec<String> {
        match scenario {
            "basic" => self.basic_problems(range),
            "failures" => self.failures_problems(range),
            "listen-unbound" => self.listen_unbound_problems(range),
            "udp-sendto" => self.udp_sendto_problems(range),
            "time-wait" => self.time_wait_problems(range),
            "hold" => self.hold_problems(range),
            "connect-storm" => self.connect_storm_problems(range),
            "churn" => self.steps_problems(&CHURN_STEPS, range),
            "crowd" => self.steps_problems(&CROWD_STEPS, range),
            other => vec![format!("unknown scenario {other:?}")],
        }
    }

    /// The `time-wait` scenario: per family a released listener and a
    /// client the kernel holds in TIME_WAIT (connected to it, port in
    /// `range`). `steps_problems` would call the client's port not given
    /// back, so the shape is checked here.
    pub fn time_wait_problems(&self, range: (u16, u16)) -> Vec<String> {
        let mut p = self.without(|s| s.time_wait).steps_problems(&TIME_WAIT_STEPS[..1], range);
        for family in ["ipv4", "ipv6"] {
            let (listener, clients) = (self.step(family, "t:listener"), self.step(family, "t:client-closes-first"));
            match (listener.as_slice(), clients.as_slice()) {
                ([l], [c]) => {
                    let checks = [
                        (c.time_wait && !c.expect_release, "not held in TIME_WAIT"),
                        (c.origin == "connect" && c.ephemeral, "not an ephemeral connect"),
                        ((range.0..=range.1).contains(&c.lport), "port outside the range"),
                        (
                            c.raddr.as_deref() == Some(l.laddr.as_str()) && c.rport == Some(l.lport),
                            "not to the listener",
                        ),
                    ];
                    for (ok, what) in checks {
                        if !ok {
                            p.push(format!("{}: {what}", c.label()));
                        }
                    }
                }
                _ => p.push(format!(
                    "{family}: want one listener and one client, got {} and {}",
                    listener.len(),
                    clients.len()
                )),
            }
        }
        p
    }

    /// The `hold` scenario: per family a listener and a UDP socket on
    /// chosen ports outside `range` (estimated not ephemeral) and a client
    /// of the listener on a port inside it (estimated ephemeral), all
    /// released by the end.
    pub fn hold_problems(&self, range: (u16, u16)) -> Vec<String> {
        let mut p = self.steps_problems(&HOLD_STEPS, range);
        for family in ["ipv4", "ipv6"] {
            if let (Some(l), Some(c)) = (self.step(family, "s:listener").first(), self.step(family, "s:client").first())
            {
                if c.raddr.as_deref() != Some(l.laddr.as_str()) || c.rport != Some(l.lport) {
                    p.push(format!("{}: not connected to the listener", c.label()));
                }
            }
        }
        p
    }

    /// The `connect-storm` scenario: every port of `range` held towards one
    /// listener per family, [`STORM_EXTRA`] connects that really got
    /// EADDRNOTAVAIL towards it, and binds that really got EADDRINUSE: of a
    /// TCP socket to the listener's address and port and to the wildcard
    /// address and that port, of a UDP socket to the UDP holder's.
    pub fn connect_storm_problems(&self, range: (u16, u16)) -> Vec<String> {
        let size = usize::from(range.1.saturating_sub(range.0)) + 1;
        let mut p = self.steps_problems(&connect_storm_steps(size), range);
        for family in ["ipv4", "ipv6"] {
            let (Some(listener), Some(udp)) =
                (self.step(family, "y:listener").first().copied(), self.step(family, "z:udp-holder").first().copied())
            else {
                continue;
            };
            let target = (Some(listener.laddr.as_str()), Some(listener.lport));
            let mut ports: Vec<u16> = self.step(family, "y:client").iter().map(|s| s.lport).collect();
            ports.sort_unstable();
            if ports != (range.0..=range.1).collect::<Vec<u16>>() {
                p.push(format!("{family} y:client: ports {ports:?} do not cover the whole range {range:?}"));
            }
            for s in self.step(family, "y:connect-exhausted") {
                if s.errno.as_deref() != Some("EADDRNOTAVAIL")
                    || s.lport != 0
                    || (s.raddr.as_deref(), s.rport) != target
                {
                    p.push(format!("{}: errno {:?}, to {:?}:{:?}", s.label(), s.errno, s.raddr, s.rport));
                }
            }
            let refused = |step: &str| -> Vec<&TruthSocket> {
                self.sockets.iter().filter(|s| s.family == family && s.step == step && s.op == "bind_fail").collect()
            };
            let wildcard = if family == "ipv4" { "0.0.0.0" } else { "::" };
            let mut tcp: Vec<(&str, u16)> =
                refused("z:bind-in-use").iter().map(|s| (s.laddr.as_str(), s.lport)).collect();
            tcp.sort_unstable();
            let mut want = vec![(listener.laddr.as_str(), listener.lport), (wildcard, listener.lport)];
            want.sort_unstable();
            if tcp != want {
                p.push(format!("{family} z:bind-in-use: refused binds {tcp:?}, want {want:?}"));
            }
            let udp_refused: Vec<(&str, u16)> =
                refused("z:udp-bind-in-use").iter().map(|s| (s.laddr.as_str(), s.lport)).collect();
            if udp_refused != [(udp.laddr.as_str(), udp.lport)] {
                p.push(format!("{family} z:udp-bind-in-use: refused binds {udp_refused:?}, want {}", udp.label()));
            }
            for s in refused("z:bind-in-use").into_iter().chain(refused("z:udp-bind-in-use")) {
                if s.errno.as_deref() != Some("EADDRINUSE") {
                    p.push(format!("{}: errno {:?}, want EADDRINUSE", s.label(), s.errno));
                }
            }
        }
        p
    }

    /// The sockets of one step and family, in allocation order.
    pub fn step(&self, family: &str, step: &str) -> Vec<&TruthSocket> {
        let mut v: Vec<&TruthSocket> =
            self.sockets.iter().filter(|s| s.family == family && s.step == step && s.op != "bind_fail").collect();
        v.sort_by_key(|s| s.seq);
        v
    }

    /// The common shape of the newer scenarios: exactly the steps of `want`
    /// per family (refused binds of a fixed port aside, see
    /// `bind_fixed_port`), every allocated port released by the end with no
    /// TIME_WAIT left, ephemeral ports inside `range` and chosen ones
    /// outside, failures with their errno, sane times.
    fn steps_problems(&self, want: &[StepWant], range: (u16, u16)) -> Vec<String> {
        let mut p = Vec::new();
        let mut seqs: Vec<u32> = self.sockets.iter().map(|s| s.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        if seqs.len() != self.sockets.len() {
            p.push("duplicate seq numbers".into());
        }
        for s in self.sockets.iter().filter(|s| s.op != "bind_fail") {
            if !want.iter().any(|w| w.step == s.step) {
                p.push(format!("{}: a step this scenario does not have", s.label()));
            }
        }
        for family in ["ipv4", "ipv6"] {
            for w in want {
                let got = self.step(family, w.step);
                if got.len() != w.count {
                    p.push(format!("{family} {}: {} sockets, want {}", w.step, got.len(), w.count));
                }
                for s in got {
                    let checks = [
                        (s.op == w.op, format!("op {}, want {}", s.op, w.op)),
                        (s.proto == w.proto, format!("proto {}, want {}", s.proto, w.proto)),
                        (s.origin == w.origin, format!("origin {}, want {}", s.origin, w.origin)),
                    ];
                    for (ok, what) in checks {
                        if !ok {
                            p.push(format!("{}: {what}", s.label()));
                        }
                    }
                }
            }
        }
        for s in &self.sockets {
            let a = crate::rfc3339::parse(&s.allocated_at);
            let c = s.closed_at.as_deref().map(crate::rfc3339::parse);
            if s.is_failure() {
                if s.errno.is_none() || a.is_none() {
                    p.push(format!("{}: a failure without errno or time", s.label()));
                }
                continue;
            }
            if !matches!((a, c), (Some(a), Some(Some(c))) if c >= a) {
                p.push(format!("{}: bad times {} / {:?}", s.label(), s.allocated_at, s.closed_at));
            }
            if !s.expect_release || s.time_wait {
                p.push(format!(
                    "{}: the port was not given back (expect_release {}, time_wait {})",
                    s.label(),
                    s.expect_release,
                    s.time_wait
                ));
            }
            if s.port_known() && s.ephemeral != (range.0..=range.1).contains(&s.lport) {
                p.push(format!("{}: ephemeral {} but port {} vs range {range:?}", s.label(), s.ephemeral, s.lport));
            }
        }
        p
    }

    /// The `failures` scenario (see `port-workload`): refused connects that
    /// really got ECONNREFUSED, and a connect that really got EADDRNOTAVAIL
    /// while every port of `range` was held towards its destination.
    pub fn failures_problems(&self, range: (u16, u16)) -> Vec<String> {
        let mut p = self.steps_problems(&failures_steps(range), range);
        for family in ["ipv4", "ipv6"] {
            for s in self.step(family, "r:connect-refused") {
                if s.errno.as_deref() != Some("ECONNREFUSED") || s.expected_release_reason() != "connect_failed" {
                    p.push(format!("{}: errno {:?}, release reason {:?}", s.label(), s.errno, s.release_reason));
                }
                if s.raddr.is_none() || s.rport.is_none() || !s.ephemeral {
                    p.push(format!("{}: remote {:?}:{:?}, ephemeral {}", s.label(), s.raddr, s.rport, s.ephemeral));
                }
            }
            let Some(listener) = self.step(family, "x:listener").first().copied() else {
                continue;
            };
            if listener.ephemeral {
                p.push(format!("{}: the listener must sit on a chosen port outside the range", listener.label()));
            }
            let target = (Some(listener.laddr.as_str()), Some(listener.lport));
            let mut ports: Vec<u16> = Vec::new();
            for s in self.step(family, "x:client") {
                if (s.raddr.as_deref(), s.rport) != target {
                    p.push(format!("{}: not connected to the listener", s.label()));
                }
                ports.push(s.lport);
            }
            ports.sort_unstable();
            if ports != (range.0..=range.1).collect::<Vec<u16>>() {
                p.push(format!("{family} x:client: ports {ports:?} do not cover the whole range {range:?}"));
            }
            for s in self.step(family, "x:connect-exhausted") {
                if s.errno.as_deref() != Some("EADDRNOTAVAIL") || s.lport != 0 {
                    p.push(format!("{}: errno {:?}, lport {}", s.label(), s.errno, s.lport));
                }
                if (s.raddr.as_deref(), s.rport) != target {
                    p.push(format!("{}: destination is not the listener", s.label()));
                }
            }
        }
        p
    }

    /// The `listen-unbound` scenario: a listener on the wildcard address
    /// with a port the kernel chose.
    pub fn listen_unbound_problems(&self, range: (u16, u16)) -> Vec<String> {
        let mut p = self.steps_problems(&LISTEN_UNBOUND_STEPS, range);
        for s in self.sockets.iter().filter(|s| s.op == "listen_unbound") {
            if !unspecified(&s.laddr) || !s.ephemeral || s.raddr.is_some() {
                p.push(format!("{}: want the wildcard address, ephemeral, no remote", s.label()));
            }
        }
        p
    }

    /// The `udp-sendto` scenario: a bind(0) receiver and an autobound
    /// sender on the wildcard address.
    pub fn udp_sendto_problems(&self, range: (u16, u16)) -> Vec<String> {
        let mut p = self.steps_problems(&UDP_SENDTO_STEPS, range);
        for s in self.sockets.iter().filter(|s| s.op == "autobind") {
            if !unspecified(&s.laddr) || !s.ephemeral || s.raddr.is_some() {
                p.push(format!("{}: want the wildcard address, ephemeral, no remote", s.label()));
            }
        }
        p
    }
}

fn unspecified(addr: &str) -> bool {
    addr.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_unspecified())
}
