//! The kernel's socket list as `ss` (iproute2) shows it inside a network
//! namespace, and `ss -K`, which makes the kernel destroy sockets
//! (`SOCK_DESTROY`; TIME_WAIT ones included).
//!
//! Unlike `/proc/net/*` (see [`crate::procnet`]), `ss` can be run from the
//! test process for any namespace (`ip netns exec`), and it is what a person
//! would look at to check the tracer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Context, Result};

use crate::netns::NetNs;

/// One socket as `ss -Htuan` lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SsSocket {
    /// `tcp` or `udp`.
    pub proto: String,
    /// `ss`'s state name: `LISTEN`, `ESTAB`, `TIME-WAIT`, `UNCONN`, ...
    pub state: String,
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port, `None` when `ss` shows none (`*`, port 0).
    pub peer: Option<SocketAddr>,
    /// The socket cookie (`sk:` of `ss -e`), which port-trace's `sock`
    /// must be; a TIME_WAIT socket has its parent's.
    pub cookie: Option<u64>,
}

impl SsSocket {
    /// `proto state local -> peer`, for messages.
    pub fn label(&self) -> String {
        let peer = self.peer.map_or_else(|| "*".to_owned(), |p| p.to_string());
        let cookie = self.cookie.map_or_else(|| "?".to_owned(), |c| c.to_string());
        format!("{} {} {} -> {peer} (sock {cookie})", self.proto, self.state, self.local)
    }
}

/// Every TCP and UDP socket of the namespace (`ss -Htuane`).
pub fn list(ns: &NetNs) -> Result<Vec<SsSocket>> {
    let out = ns.command("ss").arg("-Htuane").output().context("running ss (iproute2) in the namespace")?;
    if !out.status.success() {
        bail!("ss -Htuane in {}: {} ({})", ns.name(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// The namespace's TCP sockets in TIME_WAIT.
pub fn time_wait(ns: &NetNs) -> Result<Vec<SsSocket>> {
    Ok(list(ns)?.into_iter().filter(|s| s.proto == "tcp" && s.state == "TIME-WAIT").collect())
}

/// `ss -K -tan state time-wait`: the kernel destroys every TIME_WAIT socket
/// of the namespace, freeing their ports at once (needs
/// `CONFIG_INET_DIAG_DESTROY`).
pub fn kill_time_wait(ns: &NetNs) -> Result<()> {
    let out = ns
        .command("ss")
        .args(["-K", "-tan", "state", "time-wait"])
        .output()
        .context("running ss -K (iproute2) in the namespace")?;
    if !out.status.success() {
        bail!("ss -K in {}: {} ({})", ns.name(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The sockets that hold a port of their own: all but accepted children.
/// A child shares its listener's port (`__inet_inherit_port`): here, a TCP
/// socket, not listening, whose local port a listening socket of the list
/// has. (A client whose own port equals a listener's port on another
/// address would be taken for a child; the tests keep their listeners
/// outside the ephemeral range, so that no client gets such a port.)
pub fn port_holders(all: &[SsSocket]) -> Vec<&SsSocket> {
    let listening: Vec<u16> =
        all.iter().filter(|s| s.proto == "tcp" && s.state == "LISTEN").map(|s| s.local.port()).collect();
    all.iter().filter(|s| !(s.proto == "tcp" && s.state != "LISTEN" && listening.contains(&s.local.port()))).collect()
}

/// Parses `ss -Htuan[e]` output: `Netid State Recv-Q Send-Q Local Peer`,
/// then with `-e` details among which `sk:COOKIE` (hex).
pub fn parse(text: &str) -> Result<Vec<SsSocket>> {
    let mut v = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(proto), Some(state), Some(local), Some(peer)) = (f.first(), f.get(1), f.get(4), f.get(5)) else {
            bail!("cannot parse ss line {line:?}");
        };
        let local = addr(local).with_context(|| format!("local address of ss line {line:?}"))?;
        let peer = addr(peer).with_context(|| format!("peer address of ss line {line:?}"))?;
        let cookie = match f.iter().skip(6).find_map(|x| x.strip_prefix("sk:")) {
            Some(hex) => Some(u64::from_str_radix(hex, 16).with_context(|| format!("cookie of ss line {line:?}"))?),
            None => None,
        };
        v.push(SsSocket {
            proto: (*proto).to_owned(),
            state: (*state).to_owned(),
            local,
            peer: Some(peer).filter(|p| p.port() != 0),
            cookie,
        });
    }
    Ok(v)
}

/// `127.0.0.1:80`, `[::1]:80`, `0.0.0.0:*`, `[::]:*`, `*:*`, with an
/// optional `%interface` after the address.
fn addr(s: &str) -> Result<SocketAddr> {
    let (host, port) = s.rsplit_once(':').with_context(|| format!("no port in {s:?}"))?;
    let port = if port == "*" { 0 } else { port.parse().with_context(|| format!("port of {s:?}"))? };
    let host = host.split('%').next().unwrap_or(host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host == "*" { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { host.parse().context(s.to_owned())? };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_udp_v4_v6_and_finds_children() {
        let text = "\
udp   UNCONN    0 0         127.0.0.1:40203       0.0.0.0:*     ino:214022 sk:6a7c cgroup:unreachable:1 <->
udp   ESTAB     0 0             [::1]:46004         [::1]:47423
tcp   LISTEN    0 128       127.0.0.1:20002       0.0.0.0:*
tcp   ESTAB     0 0         127.0.0.1:45342     127.0.0.1:20002
tcp   ESTAB     0 0         127.0.0.1:20002     127.0.0.1:45342
tcp   TIME-WAIT 0 0         127.0.0.1:47224     127.0.0.1:40009 timer:(timewait,59sec,0) ino:0 sk:6a7a
tcp   LISTEN    0 4096  127.0.0.53%lo:53          0.0.0.0:*
";
        let all = parse(text).unwrap();
        assert_eq!(all.len(), 7);
        assert_eq!(all[1].local, "[::1]:46004".parse().unwrap());
        assert_eq!(all[1].peer, Some("[::1]:47423".parse().unwrap()));
        assert_eq!(all[0].peer, None);
        assert_eq!(all[6].local, "127.0.0.53:53".parse().unwrap());
        assert_eq!((all[0].cookie, all[1].cookie, all[5].cookie), (Some(0x6a7c), None, Some(0x6a7a)));
        let holders: Vec<String> = port_holders(&all).iter().map(|s| s.label()).collect();
        assert_eq!(holders.len(), 6, "{holders:#?}");
        assert!(!holders.iter().any(|h| h.contains("127.0.0.1:20002 -> 127.0.0.1:45342 ")), "{holders:#?}");
        assert!(parse("tcp LISTEN 0 1 nonsense 0.0.0.0:*\n").is_err());
    }
}
