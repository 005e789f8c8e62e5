//! The kernel's own socket tables in `/proc/net/{tcp,tcp6,udp,udp6}`.
//!
//! The workload reads them to check its expectations (a socket is in
//! TIME_WAIT, a port is gone) against what the kernel really holds, so that
//! the truth it reports is the kernel's and not merely the scenario's intent.
//! The tables are per network namespace (that of the reading process).
//! They list established, listening, TIME_WAIT and UDP sockets, but not TCP
//! sockets that are only bound.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Transport protocol of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// `/proc/net/tcp*`.
    Tcp,
    /// `/proc/net/udp*`.
    Udp,
}

/// One row of a socket table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port (unspecified address and port 0 when none).
    pub remote: SocketAddr,
    /// Kernel state number (`TCP_ESTABLISHED` = 1 ... `TCP_CLOSING` = 11;
    /// UDP uses 1 for connected and 7 for unconnected sockets).
    pub state: u8,
    /// Socket inode, 0 for TIME_WAIT and orphaned sockets.
    pub inode: u64,
}

impl Entry {
    /// The TCP state name port-trace uses (`ESTABLISHED`, `TIME_WAIT`, ...).
    pub fn state_name(&self) -> &'static str {
        tcp_state_name(self.state)
    }
}

/// The name of a kernel TCP state number, as in `include/net/tcp_states.h`.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        13 => "BOUND_INACTIVE",
        _ => "UNKNOWN",
    }
}

/// Reads the table for `proto` and the family of `v6`, in the caller's netns.
pub fn read(proto: Proto, v6: bool) -> io::Result<Vec<Entry>> {
    let path = match (proto, v6) {
        (Proto::Tcp, false) => "/proc/net/tcp",
        (Proto::Tcp, true) => "/proc/net/tcp6",
        (Proto::Udp, false) => "/proc/net/udp",
        (Proto::Udp, true) => "/proc/net/udp6",
    };
    let text = std::fs::read_to_string(path)?;
    parse(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))
}

/// Parses the text of a socket table (header line first).
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| parse_line(line).ok_or_else(|| format!("cannot parse line {line:?}")))
        .collect()
}

fn parse_line(line: &str) -> Option<Entry> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let f: Vec<&str> = line.split_whitespace().collect();
    Some(Entry {
        local: parse_addr(f.get(1)?)?,
        remote: parse_addr(f.get(2)?)?,
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        inode: f.get(9)?.parse().ok()?,
    })
}

/// `0100007F:1F90` or 32 hex digits and a port: the address is printed as
/// 32-bit words in host byte order, the port as a plain number.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6_rows() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:9C41 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000\n   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n";
        let rows = parse(v4).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].local, "127.0.0.1:40001".parse().unwrap());
        assert_eq!(rows[0].remote, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(rows[0].state_name(), "TIME_WAIT");
        assert_eq!(rows[1].state_name(), "LISTEN");
        assert_eq!(rows[1].inode, 4242);

        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:A029 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 77 2 0000000000000000 0\n";
        let rows = parse(v6).unwrap();
        assert_eq!(rows[0].local, "[::1]:41001".parse().unwrap());
        assert_eq!(rows[0].remote, "[::]:0".parse().unwrap());
        assert_eq!(rows[0].inode, 77);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("header\n   0: zz:1 0:0 01\n").is_err());
    }

    #[test]
    fn reads_own_tables() {
        for proto in [Proto::Tcp, Proto::Udp] {
            for v6 in [false, true] {
                match read(proto, v6) {
                    Ok(_) => {}
                    // IPv6 may be disabled on a host; IPv4 tables always exist.
                    Err(e) if v6 && e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => panic!("{proto:?} v6={v6}: {e}"),
                }
            }
        }
    }
}
