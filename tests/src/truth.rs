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
    /// What was done: `listen` (bind(0) + listen), `connect` (TCP or UDP
    /// connect on an unbound socket), `bind` (explicit or bind(0), no
    /// listen), `sendto` (UDP bind(0), then sendto), `bind_fail` (a bind that
    /// the kernel refused; no socket was allocated).
    pub op: String,
    /// The scenario step, e.g. `a:listener`, `b:client-last-close`.
    pub step: String,
    /// Allocation order within the workload run, from 0.
    pub seq: u32,
    /// `tcp` or `udp`.
    pub proto: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// Local address, as `getsockname` returned it.
    pub laddr: String,
    /// Local port, as `getsockname` returned it (for `bind_fail`: the port
    /// that was asked for).
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
    /// For `bind_fail`: the errno name (`EADDRINUSE`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
}

impl TruthSocket {
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
    /// `{"op":"done","pid":N}`; every socket line must carry that pid.
    pub fn parse(stdout: &str) -> Result<Truth> {
        let mut sockets = Vec::new();
        let mut done_pid = None;
        for (i, line) in stdout.lines().enumerate() {
            if done_pid.is_some() {
                bail!("workload line {} after `done`: {line}", i + 1);
            }
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("workload line {} is not JSON: {line}", i + 1))?;
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
    /// except `bind_fail`.
    pub fn allocations(&self) -> Vec<&TruthSocket> {
        let mut v: Vec<&TruthSocket> = self.sockets.iter().filter(|s| s.op != "bind_fail").collect();
        v.sort_by_key(|s| s.seq);
        v
    }

    /// Binds the kernel refused, in order.
    pub fn failures(&self) -> Vec<&TruthSocket> {
        let mut v: Vec<&TruthSocket> = self.sockets.iter().filter(|s| s.op == "bind_fail").collect();
        v.sort_by_key(|s| s.seq);
        v
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
