//! The trace filters users give (`--pid`, `--comm`, `--port`, ...): parsing
//! and matching. Filters that the kernel applies (the network namespace) are
//! passed to the programs instead; these run on records in userspace.

use std::ops::RangeInclusive;

use crate::model::{Family, Proto};
use crate::record::PortRecord;

/// Parses `PORT`, `LO-HI`, and comma-separated lists of them.
pub fn parse_port_ranges(text: &str) -> Result<Vec<RangeInclusive<u16>>, String> {
    let port = |s: &str| -> Result<u16, String> {
        let s = s.trim();
        let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a port number"))?;
        if n == 0 || n > 65535 {
            return Err(format!("port {n} is out of range (1-65535)"));
        }
        Ok(n as u16)
    };
    let mut ranges = Vec::new();
    for part in text.split(',') {
        if part.trim().is_empty() {
            return Err(format!("empty port in '{text}'"));
        }
        let range = match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!("port range {lo}-{hi} is reversed"));
                }
                lo..=hi
            }
            None => {
                let p = port(part)?;
                p..=p
            }
        };
        ranges.push(range);
    }
    Ok(ranges)
}

/// Parses a comma-separated list of process ids.
pub fn parse_pids(text: &str) -> Result<Vec<u32>, String> {
    text.split(',')
        .map(|s| {
            let s = s.trim();
            match s.parse::<u32>() {
                Ok(0) => Err("pid 0 is not a process".to_string()),
                Ok(pid) => Ok(pid),
                Err(_) => Err(format!("'{s}' is not a process id")),
            }
        })
        .collect()
}

/// What to report.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only these thread-group ids.
    pub pids: Vec<u32>,
    /// Only this command name (the kernel's 15-character `comm`).
    pub comm: Option<String>,
    /// Only local ports in these ranges.
    pub ports: Vec<RangeInclusive<u16>>,
    /// Only this protocol.
    pub proto: Option<Proto>,
    /// Only this family.
    pub family: Option<Family>,
    /// Only sockets created in this cgroup v2 (by id).
    pub cgroup: Option<u64>,
    /// Only ports the kernel chose.
    pub ephemeral_only: bool,
}

impl Filter {
    /// Whether a record passes. Every field tested is constant over a
    /// socket's life (the owner is the allocating process), so a lifecycle
    /// is reported whole or not at all.
    pub fn matches(&self, rec: &PortRecord) -> bool {
        let p = &rec.port;
        if !self.pids.is_empty() && !self.pids.contains(&p.pid) {
            return false;
        }
        if let Some(comm) = &self.comm {
            // comm is truncated to 15 bytes by the kernel.
            let want = &comm.as_bytes()[..comm.len().min(15)];
            if p.comm.as_bytes() != want {
                return false;
            }
        }
        if !self.ports.is_empty() && !self.ports.iter().any(|r| r.contains(&p.lport)) {
            return false;
        }
        if self.proto.is_some_and(|proto| proto != p.proto) {
            return false;
        }
        if self.family.is_some_and(|family| family != p.family) {
            return false;
        }
        if self.cgroup.is_some_and(|cg| cg != p.cgroup) {
            return false;
        }
        if self.ephemeral_only && p.ephemeral != Some(true) {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::Origin;
    use crate::record::{PortRef, RecordBody};

    #[test]
    fn parses_ports_and_ranges() {
        assert_eq!(parse_port_ranges("80").unwrap(), vec![80..=80]);
        assert_eq!(parse_port_ranges("80,8000-8100").unwrap(), vec![80..=80, 8000..=8100]);
        assert!(parse_port_ranges("0").unwrap_err().contains("out of range"));
        assert!(parse_port_ranges("65536").unwrap_err().contains("out of range"));
        assert!(parse_port_ranges("90-80").unwrap_err().contains("reversed"));
        assert!(parse_port_ranges("http").unwrap_err().contains("not a port"));
        assert!(parse_port_ranges("80,,81").unwrap_err().contains("empty"));
    }

    #[test]
    fn parses_pids() {
        assert_eq!(parse_pids("1,22").unwrap(), vec![1, 22]);
        assert!(parse_pids("x").is_err());
        assert!(parse_pids("0").is_err());
        assert!(parse_pids("-5").is_err());
    }

    fn rec(pid: u32, comm: &str, lport: u16, ephemeral: Option<bool>) -> PortRecord {
        PortRecord {
            ts_ns: 0,
            port: PortRef {
                sock: 1,
                netns: 1,
                proto: Proto::Udp,
                family: Family::Ipv4,
                laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                lport,
                raddr: None,
                rport: None,
                pid,
                comm: comm.into(),
                cgroup: 5,
                ephemeral,
            },
            body: RecordBody::Alloc { origin: Origin::Bind, ephemeral: ephemeral.unwrap_or(false) },
        }
    }

    #[test]
    fn matches_each_criterion() {
        let r = rec(10, "systemd-resolve", 5353, Some(false));
        assert!(Filter::default().matches(&r));
        assert!(Filter { pids: vec![10, 11], ..Default::default() }.matches(&r));
        assert!(!Filter { pids: vec![11], ..Default::default() }.matches(&r));
        assert!(Filter { comm: Some("systemd-resolved".into()), ..Default::default() }.matches(&r));
        assert!(!Filter { comm: Some("curl".into()), ..Default::default() }.matches(&r));
        assert!(Filter { ports: vec![5000..=6000], ..Default::default() }.matches(&r));
        assert!(!Filter { ports: vec![80..=80], ..Default::default() }.matches(&r));
        assert!(!Filter { proto: Some(Proto::Tcp), ..Default::default() }.matches(&r));
        assert!(!Filter { family: Some(Family::Ipv6), ..Default::default() }.matches(&r));
        assert!(Filter { cgroup: Some(5), ..Default::default() }.matches(&r));
        assert!(!Filter { ephemeral_only: true, ..Default::default() }.matches(&r));
        assert!(Filter { ephemeral_only: true, ..Default::default() }.matches(&rec(1, "a", 40000, Some(true))));
        assert!(!Filter { ephemeral_only: true, ..Default::default() }.matches(&rec(1, "a", 40000, None)));
    }
}
