//! `port-workload SCENARIO`: performs socket operations on loopback and
//! prints, as JSON Lines on stdout, what it did and what the kernel showed it
//! (see [`port_trace_integration::truth`]): one object per socket, written
//! when that socket's life is over, then `{"op":"done","pid":N}`.
//!
//! The binary name is also the process's `comm`, which the tests expect on
//! every record. Run it inside a private network namespace: it checks its
//! sockets in the namespace's `/proc/net` tables, and exits 1 with a message
//! on stderr when the kernel does not behave as the scenario needs (so that a
//! broken scenario never turns into a wrong expectation). Usage errors exit 2.
//!
//! Scenarios:
//!
//! - `basic`: for 127.0.0.1 and then ::1 (IPv6 sockets are `IPV6_V6ONLY`):
//!   - a: a TCP listener on `bind(0)` (origin `bind`, ephemeral);
//!   - b: a TCP `connect()` from an unbound socket to it (origin `connect`,
//!     ephemeral); the accepted side closes first, the client reads EOF and
//!     closes last, so its port is freed (LAST_ACK → CLOSE);
//!   - c: a second such connection where the client closes first, so its
//!     port is held in TIME_WAIT (`time_wait`, no release expected);
//!   - d: a TCP `bind()` to a chosen port outside the ephemeral range, no
//!     listen, then close (origin `bind`, not ephemeral);
//!   - e: a UDP receiver on `bind(0)`, and a UDP sender on `bind(0)` that
//!     `sendto()`s it (both origin `bind`, ephemeral);
//!   - f: a UDP `connect()` of an unbound socket to the receiver (the kernel
//!     autobinds: origin `connect`, ephemeral), one `send()`, close;
//!
//!   then the receiver and the listener close. Every port but the TIME_WAIT
//!   one is released by the end.
//! - `failures`: for 127.0.0.1 and then ::1:
//!   - r: a TCP `connect()` from an unbound socket to a port nobody listens
//!     on; it must fail with ECONNREFUSED (the kernel allocated a port and
//!     gave it back: origin `connect`, release reason `connect_failed`);
//!   - x: a TCP listener on a chosen port outside the ephemeral range, one
//!     client per port of the ephemeral range (the namespace's range must be
//!     tiny, e.g. 40000-40001), then one more `connect()`, which must fail
//!     with EADDRNOTAVAIL (no port: an `alloc_fail`); then every connection
//!     is closed server side first, so that no client port is left in
//!     TIME_WAIT.
//! - `listen-unbound`: for 0.0.0.0 and then :: : a TCP socket that is never
//!   bound calls `listen()`, so the kernel picks its port (origin `listen`,
//!   ephemeral); `getsockname`, close.
//! - `udp-sendto`: for 127.0.0.1 and then ::1: a UDP receiver on `bind(0)`,
//!   and a never-bound UDP socket that `sendto()`s it, so the kernel
//!   autobinds it (origin `autobind`, ephemeral); both close.
//!
//! Every failed call's errno is checked: anything but the one the step
//! needs exits 1.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use port_trace_integration::procnet::{self, tcp_state_name, Entry, Proto};
use port_trace_integration::rfc3339;
use port_trace_integration::truth::TruthSocket;
use socket2::{Domain, Protocol, Socket, Type};

/// How long to wait for the kernel to settle a socket after a close.
const SETTLE: Duration = Duration::from_secs(3);
/// Read timeout on every blocking receive.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

const TCP_ESTABLISHED: u8 = 1;
const TCP_TIME_WAIT: u8 = 6;
const TCP_LISTEN: u8 = 10;
/// `/proc/net/udp` shows connected UDP sockets as 1, unconnected ones as 7.
const UDP_CONNECTED: u8 = 1;
const UDP_UNCONNECTED: u8 = 7;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario: fn(&mut Workload) -> Result<()> = match args.as_slice() {
        [s] if s == "basic" => basic,
        [s] if s == "failures" => failures,
        [s] if s == "listen-unbound" => listen_unbound,
        [s] if s == "udp-sendto" => udp_sendto,
        _ => {
            eprintln!("usage: port-workload basic|failures|listen-unbound|udp-sendto");
            return ExitCode::from(2);
        }
    };
    let mut w = Workload::new();
    match scenario(&mut w).and_then(|()| w.done()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("port-workload: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// State shared by the steps of a scenario.
struct Workload {
    pid: u32,
    next_seq: u32,
    out: io::Stdout,
}

/// A socket whose port is allocated, waiting for its truth line.
struct Alloc {
    seq: u32,
    step: &'static str,
    op: &'static str,
    proto: Proto,
    local: SocketAddr,
    remote: Option<SocketAddr>,
    origin: &'static str,
    ephemeral: bool,
    allocated_at: SystemTime,
}

/// What the kernel showed after a close.
struct AfterClose {
    closed_at: SystemTime,
    time_wait: bool,
    freed: Option<bool>,
}

impl Workload {
    fn new() -> Self {
        Workload { pid: std::process::id(), next_seq: 0, out: io::stdout() }
    }

    /// Registers an allocation that just happened.
    #[allow(clippy::too_many_arguments)]
    fn alloc(
        &mut self,
        step: &'static str,
        op: &'static str,
        proto: Proto,
        local: SocketAddr,
        remote: Option<SocketAddr>,
        origin: &'static str,
        ephemeral: bool,
    ) -> Alloc {
        let seq = self.next_seq;
        self.next_seq += 1;
        Alloc { seq, step, op, proto, local, remote, origin, ephemeral, allocated_at: SystemTime::now() }
    }

    /// Prints one truth line.
    fn emit(&mut self, t: &TruthSocket) -> Result<()> {
        let mut out = self.out.lock();
        writeln!(out, "{}", serde_json::to_string(t)?)?;
        out.flush()?;
        Ok(())
    }

    /// Prints the truth line of a closed socket.
    fn closed(&mut self, a: &Alloc, after: AfterClose, expect_release: bool) -> Result<()> {
        let t = self.truth_of(a, after, expect_release)?;
        self.emit(&t)
    }

    /// The truth line of a closed socket, checked against what the kernel
    /// showed after the close.
    fn truth_of(&self, a: &Alloc, after: AfterClose, expect_release: bool) -> Result<TruthSocket> {
        if expect_release && after.freed == Some(false) {
            bail!("{}: the kernel still lists the socket after close", a.step);
        }
        if !expect_release && !after.time_wait {
            bail!("{}: expected the port to be held in TIME_WAIT, but it is not", a.step);
        }
        Ok(TruthSocket {
            op: a.op.into(),
            step: a.step.into(),
            seq: a.seq,
            proto: proto_name(a.proto).into(),
            family: family_name(a.local.ip()).into(),
            laddr: a.local.ip().to_string(),
            lport: a.local.port(),
            raddr: a.remote.map(|r| r.ip().to_string()),
            rport: a.remote.map(|r| r.port()),
            pid: self.pid,
            origin: a.origin.into(),
            ephemeral: a.ephemeral,
            expect_release,
            time_wait: after.time_wait,
            freed: after.freed,
            allocated_at: rfc3339::format(a.allocated_at),
            closed_at: Some(rfc3339::format(after.closed_at)),
            errno: None,
            release_reason: None,
        })
    }

    /// Prints the truth line of a bind the kernel refused.
    fn bind_failed(&mut self, step: &'static str, want: SocketAddr, err: &io::Error) -> Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let t = TruthSocket {
            op: "bind_fail".into(),
            step: step.into(),
            seq,
            proto: "tcp".into(),
            family: family_name(want.ip()).into(),
            laddr: want.ip().to_string(),
            lport: want.port(),
            raddr: None,
            rport: None,
            pid: self.pid,
            origin: "bind".into(),
            ephemeral: false,
            expect_release: false,
            time_wait: false,
            freed: None,
            allocated_at: rfc3339::format(SystemTime::now()),
            closed_at: None,
            errno: Some(errno_name(err)),
            release_reason: None,
        };
        self.emit(&t)
    }

    /// Prints the truth line of a TCP connect that got no port at all
    /// (`local`: getsockname after the failure).
    fn connect_failed(&mut self, step: &'static str, local: SocketAddr, to: SocketAddr, err: &io::Error) -> Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let t = TruthSocket {
            op: "connect_fail".into(),
            step: step.into(),
            seq,
            proto: "tcp".into(),
            family: family_name(to.ip()).into(),
            laddr: local.ip().to_string(),
            lport: local.port(),
            raddr: Some(to.ip().to_string()),
            rport: Some(to.port()),
            pid: self.pid,
            origin: "connect".into(),
            ephemeral: true,
            expect_release: false,
            time_wait: false,
            freed: None,
            allocated_at: rfc3339::format(SystemTime::now()),
            closed_at: None,
            errno: Some(errno_name(err)),
            release_reason: None,
        };
        self.emit(&t)
    }

    fn done(&mut self) -> Result<()> {
        let mut out = self.out.lock();
        writeln!(out, "{}", serde_json::json!({"op": "done", "pid": self.pid}))?;
        out.flush()?;
        Ok(())
    }
}

/// The `basic` scenario (see the crate documentation).
fn basic(w: &mut Workload) -> Result<()> {
    let range = ephemeral_range()?;
    basic_family(w, IpAddr::V4(Ipv4Addr::LOCALHOST), range).context("IPv4")?;
    basic_family(w, IpAddr::V6(Ipv6Addr::LOCALHOST), range).context("IPv6")?;
    Ok(())
}

fn basic_family(w: &mut Workload, ip: IpAddr, range: (u16, u16)) -> Result<()> {
    // a. listener on bind(0)
    let sock = new_socket(ip, Proto::Tcp)?;
    sock.bind(&SocketAddr::new(ip, 0).into()).context("a: bind(0)")?;
    sock.listen(16).context("a: listen")?;
    let laddr = local_addr(&sock)?;
    let listener_alloc = w.alloc("a:listener", "listen", Proto::Tcp, laddr, None, "bind", true);
    let listener: TcpListener = sock.into();
    expect_listed("a", Proto::Tcp, laddr, None, TCP_LISTEN)?;

    // b. client closes last: LAST_ACK -> CLOSE frees its port
    let (client, client_alloc) = tcp_connect(w, "b:client-closes-last", laddr)?;
    let (mut server, peer) = listener.accept().context("b: accept")?;
    ensure!(peer == client_alloc.local, "b: accept saw {peer}, getsockname {}", client_alloc.local);
    expect_listed("b", Proto::Tcp, client_alloc.local, Some(laddr), TCP_ESTABLISHED)?;
    drop(server);
    let mut client = client;
    let n = client.read(&mut [0u8; 16]).context("b: client read")?;
    ensure!(n == 0, "b: client read {n} bytes, expected EOF");
    drop(client);
    let after = settle(Proto::Tcp, client_alloc.local, Some(laddr))?;
    w.closed(&client_alloc, after, true)?;

    // c. client closes first: its port stays in TIME_WAIT
    let (client, client_alloc) = tcp_connect(w, "c:client-closes-first", laddr)?;
    (server, _) = listener.accept().context("c: accept")?;
    expect_listed("c", Proto::Tcp, client_alloc.local, Some(laddr), TCP_ESTABLISHED)?;
    drop(client);
    server.set_read_timeout(Some(IO_TIMEOUT))?;
    let n = server.read(&mut [0u8; 16]).context("c: server read")?;
    ensure!(n == 0, "c: server read {n} bytes, expected EOF");
    drop(server);
    let after = settle(Proto::Tcp, client_alloc.local, Some(laddr))?;
    w.closed(&client_alloc, after, false)?;

    // d. explicit bind outside the ephemeral range, no listen
    let (sock, port) = bind_fixed_port(w, "d:explicit-bind", ip, range)?;
    let local = local_addr(&sock)?;
    ensure!(local.port() == port, "d: asked for port {port}, getsockname says {local}");
    let alloc = w.alloc("d:explicit-bind", "bind", Proto::Tcp, local, None, "bind", false);
    drop(sock);
    // Bound-only TCP sockets are not in /proc/net/tcp: nothing to check.
    let after = AfterClose { closed_at: SystemTime::now(), time_wait: false, freed: None };
    w.closed(&alloc, after, true)?;

    // e. UDP receiver and sender, both on bind(0)
    let (recv_sock, recv_alloc) = udp_bind0(w, ip, "e:udp-receiver", "bind")?;
    let raddr = recv_alloc.local;
    let (send_sock, send_alloc) = udp_bind0(w, ip, "e:udp-sender", "sendto")?;
    send_sock.send_to(b"e", raddr).context("e: sendto")?;
    expect_datagram(&recv_sock, send_alloc.local, "e")?;
    drop(send_sock);
    let after = settle(Proto::Udp, send_alloc.local, None)?;
    w.closed(&send_alloc, after, true)?;

    // f. UDP connect on an unbound socket: the kernel autobinds
    let sock = new_socket(ip, Proto::Udp)?;
    sock.connect(&raddr.into()).context("f: connect")?;
    let local = local_addr(&sock)?;
    ensure!(local.port() != 0, "f: no port after connect");
    let alloc = w.alloc("f:udp-connect", "connect", Proto::Udp, local, Some(raddr), "connect", true);
    expect_listed("f", Proto::Udp, local, Some(raddr), UDP_CONNECTED)?;
    let sock: UdpSocket = sock.into();
    sock.send(b"f").context("f: send")?;
    expect_datagram(&recv_sock, local, "f")?;
    drop(sock);
    let after = settle(Proto::Udp, local, Some(raddr))?;
    w.closed(&alloc, after, true)?;

    drop(recv_sock);
    let after = settle(Proto::Udp, raddr, None)?;
    w.closed(&recv_alloc, after, true)?;

    // a. (end) the listener closes: LISTEN -> CLOSE frees its bind(0) port
    drop(listener);
    let after = settle(Proto::Tcp, laddr, None)?;
    w.closed(&listener_alloc, after, true)?;
    Ok(())
}

/// A port no socket of this namespace listens on (checked in the kernel's
/// tables), outside the ephemeral range, for connects that must be refused.
fn closed_port(ip: IpAddr, range: (u16, u16)) -> Result<u16> {
    let listening: Vec<u16> = procnet::read(Proto::Tcp, ip.is_ipv6())?
        .into_iter()
        .filter(|e| e.state == TCP_LISTEN)
        .map(|e| e.local.port())
        .collect();
    (1..range.0).find(|p| !listening.contains(p)).context("no closed port below the ephemeral range")
}

/// The source address the kernel's routing table picks for `to`
/// (`ip -j route get`, whose `prefsrc` is that address).
fn route_source(to: IpAddr) -> Result<IpAddr> {
    let out = std::process::Command::new("ip")
        .args(["-j", "route", "get", &to.to_string()])
        .output()
        .context("running `ip route get`")?;
    ensure!(out.status.success(), "ip route get {to}: {}", String::from_utf8_lossy(&out.stderr).trim());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j route get: not JSON")?;
    let src = v[0]["prefsrc"].as_str().with_context(|| format!("ip route get {to}: no prefsrc in {v}"))?;
    src.parse().with_context(|| format!("ip route get {to}: prefsrc {src:?}"))
}

/// The `failures` scenario (see the crate documentation).
fn failures(w: &mut Workload) -> Result<()> {
    let range = ephemeral_range()?;
    let size = usize::from(range.1 - range.0) + 1;
    ensure!(size <= 16, "failures: the ephemeral range {range:?} is too large to exhaust; set e.g. 40000-40001");
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        connect_refused(w, ip, range).with_context(|| format!("r: {ip}"))?;
    }
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        connect_exhausted(w, ip, range, size).with_context(|| format!("x: {ip}"))?;
    }
    Ok(())
}

/// r. A connect to a closed port: ECONNREFUSED after the kernel allocated
/// a port for it.
fn connect_refused(w: &mut Workload, ip: IpAddr, range: (u16, u16)) -> Result<()> {
    let to = SocketAddr::new(ip, closed_port(ip, range)?);
    let src = route_source(ip)?;
    let sock = new_socket(ip, Proto::Tcp)?;
    match sock.connect(&to.into()) {
        Ok(()) => bail!("connect to {to} succeeded; nothing should listen there"),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        Err(e) => bail!("connect to {to}: want ECONNREFUSED, the kernel said {} ({e})", errno_name(&e)),
    }
    // The kernel clears the address on failure; the port may survive.
    let after = local_addr(&sock)?;
    let local = SocketAddr::new(src, after.port());
    let alloc = w.alloc("r:connect-refused", "connect_refused", Proto::Tcp, local, Some(to), "connect", true);
    drop(sock);
    // A failed connect's socket is in no table; nothing to settle.
    let after = AfterClose { closed_at: SystemTime::now(), time_wait: false, freed: None };
    let mut t = w.truth_of(&alloc, after, true)?;
    t.errno = Some("ECONNREFUSED".into());
    t.release_reason = Some("connect_failed".into());
    w.emit(&t)
}

/// x. Every port of the range held towards one listener, then one more
/// connect to it: EADDRNOTAVAIL.
fn connect_exhausted(w: &mut Workload, ip: IpAddr, range: (u16, u16), size: usize) -> Result<()> {
    let (sock, port) = bind_fixed_port(w, "x:listener", ip, range)?;
    sock.listen(16).context("listen")?;
    let laddr = local_addr(&sock)?;
    ensure!(laddr.port() == port, "asked for port {port}, getsockname says {laddr}");
    let listener_alloc = w.alloc("x:listener", "listen", Proto::Tcp, laddr, None, "bind", false);
    let listener: TcpListener = sock.into();
    expect_listed("x:listener", Proto::Tcp, laddr, None, TCP_LISTEN)?;

    let mut conns = Vec::new();
    for _ in 0..size {
        let (client, alloc) = tcp_connect(w, "x:client", laddr)?;
        let (server, peer) = listener.accept().context("accept")?;
        ensure!(peer == alloc.local, "accept saw {peer}, getsockname {}", alloc.local);
        expect_listed("x:client", Proto::Tcp, alloc.local, Some(laddr), TCP_ESTABLISHED)?;
        conns.push((client, server, alloc));
    }
    let mut used: Vec<u16> = conns.iter().map(|(_, _, a)| a.local.port()).collect();
    used.sort_unstable();
    ensure!(used == (range.0..=range.1).collect::<Vec<u16>>(), "client ports {used:?} are not the range {range:?}");

    let sock = new_socket(ip, Proto::Tcp)?;
    match sock.connect(&laddr.into()) {
        Ok(()) => bail!("connect {} -> {laddr} succeeded with every port of {range:?} in use", local_addr(&sock)?),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            let local = local_addr(&sock)?;
            w.connect_failed("x:connect-exhausted", local, laddr, &e)?;
        }
        Err(e) => bail!("connect to {laddr}: want EADDRNOTAVAIL, the kernel said {} ({e})", errno_name(&e)),
    }
    drop(sock);

    // The server side closes first, so that the client ports are freed.
    for (mut client, server, alloc) in conns {
        drop(server);
        let n = client.read(&mut [0u8; 16]).context("client read")?;
        ensure!(n == 0, "client read {n} bytes, expected EOF");
        drop(client);
        let after = settle(Proto::Tcp, alloc.local, Some(laddr))?;
        w.closed(&alloc, after, true)?;
    }
    drop(listener);
    let after = settle(Proto::Tcp, laddr, None)?;
    w.closed(&listener_alloc, after, true)
}

/// The `listen-unbound` scenario (see the crate documentation).
fn listen_unbound(w: &mut Workload) -> Result<()> {
    for ip in [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)] {
        let step = "g:listen-unbound";
        let sock = new_socket(ip, Proto::Tcp)?;
        sock.listen(16).with_context(|| format!("{step}: listen on an unbound socket ({ip})"))?;
        let local = local_addr(&sock)?;
        ensure!(local.port() != 0, "{step}: no port after listen ({local})");
        ensure!(local.ip() == ip, "{step}: listening on {local}, want the wildcard address {ip}");
        let alloc = w.alloc(step, "listen_unbound", Proto::Tcp, local, None, "listen", true);
        expect_listed(step, Proto::Tcp, local, None, TCP_LISTEN)?;
        drop(sock);
        let after = settle(Proto::Tcp, local, None)?;
        w.closed(&alloc, after, true)?;
    }
    Ok(())
}

/// The `udp-sendto` scenario (see the crate documentation).
fn udp_sendto(w: &mut Workload) -> Result<()> {
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let step = "h:udp-sendto-autobind";
        let (recv_sock, recv_alloc) = udp_bind0(w, ip, "h:udp-receiver", "bind")?;
        let sock: UdpSocket = new_socket(ip, Proto::Udp)?.into();
        sock.send_to(b"h", recv_alloc.local).with_context(|| format!("{step}: sendto"))?;
        let local = sock.local_addr().context("getsockname")?;
        ensure!(local.port() != 0, "{step}: no port after sendto ({local})");
        let alloc = w.alloc(step, "autobind", Proto::Udp, local, None, "autobind", true);
        expect_listed(step, Proto::Udp, local, None, UDP_UNCONNECTED)?;
        expect_datagram(&recv_sock, SocketAddr::new(ip, local.port()), step)?;
        drop(sock);
        let after = settle(Proto::Udp, local, None)?;
        w.closed(&alloc, after, true)?;

        drop(recv_sock);
        let after = settle(Proto::Udp, recv_alloc.local, None)?;
        w.closed(&recv_alloc, after, true)?;
    }
    Ok(())
}

/// A TCP or UDP socket of the family of `ip` (IPv6 ones `IPV6_V6ONLY`).
fn new_socket(ip: IpAddr, proto: Proto) -> Result<Socket> {
    let (ty, p) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let domain = if ip.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, ty, Some(p)).context("socket")?;
    if ip.is_ipv6() {
        s.set_only_v6(true).context("IPV6_V6ONLY")?;
    }
    Ok(s)
}

/// `getsockname` as a `SocketAddr`.
fn local_addr(s: &Socket) -> Result<SocketAddr> {
    s.local_addr().context("getsockname")?.as_socket().context("getsockname: not an inet address")
}

/// `connect()` from an unbound TCP socket.
fn tcp_connect(w: &mut Workload, step: &'static str, to: SocketAddr) -> Result<(TcpStream, Alloc)> {
    let sock = new_socket(to.ip(), Proto::Tcp)?;
    sock.connect(&to.into()).with_context(|| format!("{step}: connect"))?;
    let local = local_addr(&sock)?;
    let alloc = w.alloc(step, "connect", Proto::Tcp, local, Some(to), "connect", true);
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok((stream, alloc))
}

/// A UDP socket on `bind(0)`.
fn udp_bind0(w: &mut Workload, ip: IpAddr, step: &'static str, op: &'static str) -> Result<(UdpSocket, Alloc)> {
    let sock = new_socket(ip, Proto::Udp)?;
    sock.bind(&SocketAddr::new(ip, 0).into()).with_context(|| format!("{step}: bind(0)"))?;
    let local = local_addr(&sock)?;
    let alloc = w.alloc(step, op, Proto::Udp, local, None, "bind", true);
    expect_listed(step, Proto::Udp, local, None, UDP_UNCONNECTED)?;
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok((sock, alloc))
}

/// Binds a TCP socket to the first free port of 20000..=30000 that lies
/// outside the ephemeral range, reporting every refused attempt.
fn bind_fixed_port(w: &mut Workload, step: &'static str, ip: IpAddr, range: (u16, u16)) -> Result<(Socket, u16)> {
    let candidates = (20000..=30000).chain(1024..range.0).filter(|p| !(range.0..=range.1).contains(p));
    for port in candidates {
        let sock = new_socket(ip, Proto::Tcp)?;
        let want = SocketAddr::new(ip, port);
        match sock.bind(&want.into()) {
            Ok(()) => return Ok((sock, port)),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => w.bind_failed(step, want, &e)?,
            Err(e) => return Err(e).with_context(|| format!("{step}: bind {want}")),
        }
    }
    bail!("{step}: no free port outside the ephemeral range {range:?}")
}

/// Receives one datagram and checks that it came from `from`.
fn expect_datagram(receiver: &UdpSocket, from: SocketAddr, step: &str) -> Result<()> {
    let (_, src) = receiver.recv_from(&mut [0u8; 16]).with_context(|| format!("{step}: receive"))?;
    ensure!(src == from, "{step}: datagram came from {src}, the sender's getsockname says {from}");
    Ok(())
}

/// The rows of `/proc/net/*` for one socket: its local address and either
/// its remote address or, when `remote` is `None`, no remote (port 0).
fn rows(proto: Proto, local: SocketAddr, remote: Option<SocketAddr>) -> Result<Vec<Entry>> {
    let all = procnet::read(proto, local.is_ipv6()).context("reading /proc/net")?;
    Ok(all.into_iter().filter(|e| e.local == local && remote.map_or(e.remote.port() == 0, |r| e.remote == r)).collect())
}

/// Checks that the kernel lists the socket in `state`.
fn expect_listed(step: &str, proto: Proto, local: SocketAddr, remote: Option<SocketAddr>, state: u8) -> Result<()> {
    let found = rows(proto, local, remote)?;
    ensure!(
        found.iter().any(|e| e.state == state),
        "{step}: the kernel does not list {local} -> {remote:?} in state {state} (found {:?})",
        found.iter().map(|e| e.state).collect::<Vec<_>>()
    );
    Ok(())
}

/// Waits until the kernel's view of a closed socket settles: gone, or (TCP)
/// only TIME_WAIT left; a timeout leaves whatever is listed.
fn settle(proto: Proto, local: SocketAddr, remote: Option<SocketAddr>) -> Result<AfterClose> {
    let closed_at = SystemTime::now();
    let deadline = Instant::now() + SETTLE;
    loop {
        let found = rows(proto, local, remote)?;
        let only_tw = !found.is_empty() && proto == Proto::Tcp && found.iter().all(|e| e.state == TCP_TIME_WAIT);
        if found.is_empty() || only_tw || Instant::now() >= deadline {
            if !found.is_empty() && !only_tw {
                let states: Vec<_> = found.iter().map(|e| tcp_state_name(e.state)).collect();
                eprintln!("port-workload: {local} still listed after close: {states:?}");
            }
            return Ok(AfterClose { closed_at, time_wait: only_tw, freed: Some(found.is_empty()) });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// This namespace's `net.ipv4.ip_local_port_range`.
fn ephemeral_range() -> Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok((lo, hi)),
        _ => bail!("cannot parse ip_local_port_range {text:?}"),
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn family_name(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() {
        "ipv6"
    } else {
        "ipv4"
    }
}

/// `EADDRINUSE` and friends; `E<n>` for the rest.
fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => "EADDRINUSE".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(n) => format!("E{n}"),
        None => "unknown".into(),
    }
}
