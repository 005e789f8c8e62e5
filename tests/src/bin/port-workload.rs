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
//! - `time-wait`: for 127.0.0.1 and then ::1: a TCP listener on `bind(0)`
//!   (origin `bind`, ephemeral) and a client that `connect()`s to it and
//!   closes first (origin `connect`, ephemeral), so that the kernel keeps
//!   its port in TIME_WAIT after the workload has exited; the listener
//!   closes (released).
//! - `hold`: sockets for a tracer to find when it starts, for 127.0.0.1 and
//!   then ::1: a TCP listener on a chosen port outside the ephemeral range,
//!   a client connected to it (the accepted child is kept open too) and a
//!   UDP socket on a chosen port. Their origin is `snapshot` (they exist
//!   before the tracer), `ephemeral` as port-trace estimates it (true only
//!   for the connected client, whose port is in the range). Then one line
//!   `{"op":"ready","pid":N,"sockets":[{"proto","family","laddr","lport"},
//!   ...]}`, and the workload waits for a line on stdin (or EOF). Then the
//!   accepted child closes first, so that the client reads EOF and frees its
//!   port (LAST_ACK -> CLOSE), and the listener and the UDP socket close.
//! - `connect-storm`: for 127.0.0.1 and then ::1, with an ephemeral range of
//!   at most 64 ports (e.g. 40000-40019): a TCP listener on a chosen port,
//!   then [`STORM_EXTRA`] more `connect()` attempts than the range has ports,
//!   from fresh unbound sockets, keeping every connection open; each attempt
//!   that gets EADDRNOTAVAIL is a `connect_fail` (no port). While the
//!   listener holds its port, `bind()`s of another TCP socket to the
//!   listener's address and port and to the wildcard address and that port
//!   must fail with EADDRINUSE (`bind_fail`, step `z:bind-in-use`); a UDP
//!   socket on a chosen port, and a second UDP socket's `bind()` to the same
//!   address and port, likewise (`z:udp-bind-in-use`). Then every connection
//!   closes server side first (no client port left in TIME_WAIT).
//! - `churn`: for 127.0.0.1 and then ::1 a known set is opened first: a TCP
//!   listener on a chosen port, two clients connected to it (children kept),
//!   two UDP sockets on `bind(0)` and one UDP socket `connect()`ed to one of
//!   them; then one line `{"op":"armed","pid":N,"known":[{"proto",
//!   "family","laddr","lport"},...]}`, and the workload waits for a line on
//!   stdin (a test stops the tracer meanwhile). Then a burst on 127.0.0.1:
//!   up to [`BURST_UDP`] UDP sockets on `bind(0)`, each closed once
//!   [`BURST_UDP_OPEN`] newer ones are open (the rest at the burst's end)
//!   but for every [`BURST_KEEP_EVERY`]th (the stragglers, kept open), and
//!   up to [`BURST_TCP`] TCP connections to the listener, accepted, then
//!   aborted on both sides (`SO_LINGER` 0: RST, no TIME_WAIT), for at most
//!   [`BURST_MAX`]; then one line `{"op":"paused","pid":N,"lingering":N}`,
//!   and on a line on stdin the last [`BURST_UDP_OPEN`] UDP sockets close,
//!   200 µs apart (a test lets the tracer go meanwhile). Then one line
//!   `{"op":"ready","pid":N,"burst":{"udp":N,"tcp":N,"started":T,"ended":T,
//!   "kept":[{"proto","family","laddr","lport"},...]}}`, and the workload
//!   waits for a line on stdin (or EOF) before closing the stragglers and the
//!   known set (TCP server side first); only the known set has truth lines.
//! - `crowd`: [`CROWD`] UDP sockets per family (127.0.0.1, then ::1), each on
//!   a chosen port outside the ephemeral range (origin `snapshot`, not
//!   ephemeral, for a tracer started later), then one line
//!   `{"op":"ready","pid":N,"sockets":[...]}` as for `hold`; they close on a
//!   line on stdin (or EOF).
//!
//! Every failed call's errno is checked: anything but the one the step
//! needs exits 1.

use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use port_trace_integration::procnet::{self, tcp_state_name, Entry, Proto};
use port_trace_integration::rfc3339;
use port_trace_integration::truth::{TruthSocket, CROWD, STORM_EXTRA};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

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
        [s] if s == "time-wait" => time_wait,
        [s] if s == "hold" => hold,
        [s] if s == "connect-storm" => connect_storm,
        [s] if s == "churn" => churn,
        [s] if s == "crowd" => crowd,
        _ => {
            eprintln!(
                "usage: port-workload basic|failures|listen-unbound|udp-sendto|time-wait|hold|connect-storm|churn|crowd"
            );
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
    fn bind_failed(&mut self, step: &'static str, proto: Proto, want: SocketAddr, err: &io::Error) -> Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let t = TruthSocket {
            op: "bind_fail".into(),
            step: step.into(),
            seq,
            proto: proto_name(proto).into(),
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

/// The `time-wait` scenario (see the crate documentation).
fn time_wait(w: &mut Workload) -> Result<()> {
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let sock = new_socket(ip, Proto::Tcp)?;
        sock.bind(&SocketAddr::new(ip, 0).into()).context("t: bind(0)")?;
        sock.listen(16).context("t: listen")?;
        let laddr = local_addr(&sock)?;
        let listener_alloc = w.alloc("t:listener", "listen", Proto::Tcp, laddr, None, "bind", true);
        let listener: TcpListener = sock.into();
        expect_listed("t:listener", Proto::Tcp, laddr, None, TCP_LISTEN)?;

        let (client, client_alloc) = tcp_connect(w, "t:client-closes-first", laddr)?;
        let (mut server, peer) = listener.accept().context("t: accept")?;
        ensure!(peer == client_alloc.local, "t: accept saw {peer}, getsockname {}", client_alloc.local);
        expect_listed("t:client", Proto::Tcp, client_alloc.local, Some(laddr), TCP_ESTABLISHED)?;
        drop(client);
        server.set_read_timeout(Some(IO_TIMEOUT))?;
        let n = server.read(&mut [0u8; 16]).context("t: server read")?;
        ensure!(n == 0, "t: server read {n} bytes, expected EOF");
        drop(server);
        let after = settle(Proto::Tcp, client_alloc.local, Some(laddr))?;
        w.closed(&client_alloc, after, false)?;

        drop(listener);
        let after = settle(Proto::Tcp, laddr, None)?;
        w.closed(&listener_alloc, after, true)?;
    }
    Ok(())
}

/// Prints the `ready` line of a scenario that holds its sockets, then waits
/// for a line on stdin (or EOF).
fn ready_then_wait(w: &mut Workload, what: serde_json::Value) -> Result<()> {
    announce_then_wait(w, "ready", what)
}

/// Prints `{"op": op, "pid": N, ...what}` and waits for a line on stdin
/// (or EOF).
fn announce_then_wait(w: &mut Workload, op: &str, what: serde_json::Value) -> Result<()> {
    let mut line = serde_json::json!({"op": op, "pid": w.pid});
    if let (Some(obj), serde_json::Value::Object(more)) = (line.as_object_mut(), what) {
        obj.extend(more);
    }
    {
        let mut out = w.out.lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    io::stdin().lock().read_line(&mut String::new()).context("waiting for a line on stdin")?;
    Ok(())
}

/// The `hold` scenario (see the crate documentation).
fn hold(w: &mut Workload) -> Result<()> {
    let range = ephemeral_range()?;
    let mut held = Vec::new();
    let mut announced = Vec::new();
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let (sock, port) = bind_fixed_port(w, "s:listener", ip, range)?;
        sock.listen(16).context("s: listen")?;
        let laddr = local_addr(&sock)?;
        ensure!(laddr.port() == port, "s: asked for port {port}, getsockname says {laddr}");
        let listener_alloc = w.alloc("s:listener", "listen", Proto::Tcp, laddr, None, "snapshot", false);
        let listener: TcpListener = sock.into();
        expect_listed("s:listener", Proto::Tcp, laddr, None, TCP_LISTEN)?;

        let (client, mut client_alloc) = tcp_connect(w, "s:client", laddr)?;
        client_alloc.origin = "snapshot";
        let port = client_alloc.local.port();
        ensure!((range.0..=range.1).contains(&port), "s: client port {port} outside the ephemeral range {range:?}");
        let (child, peer) = listener.accept().context("s: accept")?;
        ensure!(peer == client_alloc.local, "s: accept saw {peer}, getsockname {}", client_alloc.local);
        expect_listed("s:client", Proto::Tcp, client_alloc.local, Some(laddr), TCP_ESTABLISHED)?;

        let (udp, uport) = bind_fixed(w, "s:udp", ip, Proto::Udp, range)?;
        let ulocal = local_addr(&udp)?;
        ensure!(ulocal.port() == uport, "s: asked for UDP port {uport}, getsockname says {ulocal}");
        let udp_alloc = w.alloc("s:udp", "bind", Proto::Udp, ulocal, None, "snapshot", false);
        expect_listed("s:udp", Proto::Udp, ulocal, None, UDP_UNCONNECTED)?;

        for a in [&listener_alloc, &client_alloc, &udp_alloc] {
            announced.push(announcement(a.proto, a.local));
        }
        held.push((listener, listener_alloc, client, client_alloc, child, udp, udp_alloc));
    }
    ready_then_wait(w, serde_json::json!({ "sockets": announced }))?;

    for (listener, listener_alloc, mut client, client_alloc, child, udp, udp_alloc) in held {
        // The accepted side closes first: the client reads EOF and closes
        // last, so its own port is freed (the child's TIME_WAIT shares the
        // listener's port).
        drop(child);
        let n = client.read(&mut [0u8; 16]).context("s: client read")?;
        ensure!(n == 0, "s: client read {n} bytes, expected EOF");
        drop(client);
        let laddr = listener_alloc.local;
        let after = settle(Proto::Tcp, client_alloc.local, Some(laddr))?;
        w.closed(&client_alloc, after, true)?;
        drop(listener);
        let after = settle(Proto::Tcp, laddr, None)?;
        w.closed(&listener_alloc, after, true)?;
        drop(udp);
        let after = settle(Proto::Udp, udp_alloc.local, None)?;
        w.closed(&udp_alloc, after, true)?;
    }
    Ok(())
}

/// The `connect-storm` scenario (see the crate documentation).
fn connect_storm(w: &mut Workload) -> Result<()> {
    let range = ephemeral_range()?;
    let size = usize::from(range.1 - range.0) + 1;
    ensure!(size <= 64, "connect-storm: the ephemeral range {range:?} is too large to exhaust; set e.g. 40000-40019");
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        connect_storm_family(w, ip, range, size).with_context(|| format!("y: {ip}"))?;
    }
    Ok(())
}

fn connect_storm_family(w: &mut Workload, ip: IpAddr, range: (u16, u16), size: usize) -> Result<()> {
    let (sock, port) = bind_fixed_port(w, "y:listener", ip, range)?;
    let attempts = size + STORM_EXTRA;
    sock.listen(i32::try_from(attempts)?).context("listen")?;
    let laddr = local_addr(&sock)?;
    ensure!(laddr.port() == port, "asked for port {port}, getsockname says {laddr}");
    let listener_alloc = w.alloc("y:listener", "listen", Proto::Tcp, laddr, None, "bind", false);
    let listener: TcpListener = sock.into();
    expect_listed("y:listener", Proto::Tcp, laddr, None, TCP_LISTEN)?;

    let mut conns = Vec::new();
    for _ in 0..attempts {
        let sock = new_socket(ip, Proto::Tcp)?;
        match sock.connect(&laddr.into()) {
            Ok(()) => {
                let local = local_addr(&sock)?;
                let alloc = w.alloc("y:client", "connect", Proto::Tcp, local, Some(laddr), "connect", true);
                let client: TcpStream = sock.into();
                client.set_read_timeout(Some(IO_TIMEOUT))?;
                let (server, peer) = listener.accept().context("accept")?;
                ensure!(peer == alloc.local, "accept saw {peer}, getsockname {}", alloc.local);
                conns.push((client, server, alloc));
            }
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                let local = local_addr(&sock)?;
                w.connect_failed("y:connect-exhausted", local, laddr, &e)?;
            }
            Err(e) => bail!("connect to {laddr}: the kernel said {} ({e})", errno_name(&e)),
        }
    }
    let mut used: Vec<u16> = conns.iter().map(|(_, _, a)| a.local.port()).collect();
    used.sort_unstable();
    ensure!(used == (range.0..=range.1).collect::<Vec<u16>>(), "client ports {used:?} are not the range {range:?}");

    // Binds that must fail while the listener holds its port: its own
    // address and the wildcard address.
    let wildcard = if ip.is_ipv6() { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    for want in [laddr, SocketAddr::new(wildcard, port)] {
        expect_bind_in_use(w, "z:bind-in-use", Proto::Tcp, want)?;
    }
    let (udp, uport) = bind_fixed(w, "z:udp-holder", ip, Proto::Udp, range)?;
    let ulocal = local_addr(&udp)?;
    ensure!(ulocal.port() == uport, "asked for UDP port {uport}, getsockname says {ulocal}");
    let udp_alloc = w.alloc("z:udp-holder", "bind", Proto::Udp, ulocal, None, "bind", false);
    expect_listed("z:udp-holder", Proto::Udp, ulocal, None, UDP_UNCONNECTED)?;
    expect_bind_in_use(w, "z:udp-bind-in-use", Proto::Udp, ulocal)?;
    drop(udp);
    let after = settle(Proto::Udp, ulocal, None)?;
    w.closed(&udp_alloc, after, true)?;

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

/// A `bind()` of a fresh socket to `want`, which another socket holds: it
/// must fail with EADDRINUSE, reported as a `bind_fail`.
fn expect_bind_in_use(w: &mut Workload, step: &'static str, proto: Proto, want: SocketAddr) -> Result<()> {
    let sock = new_socket(want.ip(), proto)?;
    match sock.bind(&want.into()) {
        Ok(()) => bail!("{step}: bind {want} succeeded although the port is held"),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => w.bind_failed(step, proto, want, &e),
        Err(e) => bail!("{step}: bind {want}: want EADDRINUSE, the kernel said {} ({e})", errno_name(&e)),
    }
}

/// UDP sockets the `churn` burst opens and closes, at most.
const BURST_UDP: usize = 3000;
/// TCP connections the `churn` burst makes and aborts, at most.
const BURST_TCP: usize = 500;
/// Every how many UDP sockets of the `churn` burst one stays open (10 of
/// 3000: with the known set, fewer sockets than a 4 KiB ring buffer holds
/// walk events, see the `crowd` scenario for more).
const BURST_KEEP_EVERY: usize = 300;
/// How many UDP sockets of the `churn` burst are open at once: each closes
/// when this many newer ones are open, so that its release comes about
/// 2 x 64 events after its alloc, further than a 4 KiB ring buffer holds
/// (30 events). A loss then always separates some alloc the tracer saw from
/// its release, which only a repair walk can supply; had each socket closed
/// right after its bind, a loss could swallow whole lifetimes and leave
/// nothing to repair.
const BURST_UDP_OPEN: usize = 64;
/// How long the `churn` burst may take.
const BURST_MAX: Duration = Duration::from_secs(3);

/// The `churn` scenario (see the crate documentation).
fn churn(w: &mut Workload) -> Result<()> {
    let range = ephemeral_range()?;
    let mut known = Vec::new();
    let mut burst_listener = None;
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let (sock, port) = bind_fixed_port(w, "k:listener", ip, range)?;
        sock.listen(128).context("k: listen")?;
        let laddr = local_addr(&sock)?;
        ensure!(laddr.port() == port, "k: asked for port {port}, getsockname says {laddr}");
        let listener_alloc = w.alloc("k:listener", "listen", Proto::Tcp, laddr, None, "bind", false);
        let listener: TcpListener = sock.into();
        expect_listed("k:listener", Proto::Tcp, laddr, None, TCP_LISTEN)?;
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (client, alloc) = tcp_connect(w, "k:client", laddr)?;
            let (child, peer) = listener.accept().context("k: accept")?;
            ensure!(peer == alloc.local, "k: accept saw {peer}, getsockname {}", alloc.local);
            expect_listed("k:client", Proto::Tcp, alloc.local, Some(laddr), TCP_ESTABLISHED)?;
            clients.push((client, child, alloc));
        }
        let mut udps = Vec::new();
        for _ in 0..2 {
            udps.push(udp_bind0(w, ip, "k:udp-bound", "bind")?);
        }
        let to = udps[0].1.local;
        let sock = new_socket(ip, Proto::Udp)?;
        sock.connect(&to.into()).context("k: UDP connect")?;
        let local = local_addr(&sock)?;
        let connected = w.alloc("k:udp-connect", "connect", Proto::Udp, local, Some(to), "connect", true);
        expect_listed("k:udp-connect", Proto::Udp, local, Some(to), UDP_CONNECTED)?;
        udps.push((sock.into(), connected));
        if ip.is_ipv4() {
            burst_listener = Some((listener.try_clone()?, laddr));
        }
        known.push((listener, listener_alloc, clients, udps));
    }

    let (listener, to) = burst_listener.context("no IPv4 listener")?;
    let announced: Vec<serde_json::Value> = known
        .iter()
        .flat_map(|(_, listener, clients, udps)| {
            let tcp = std::iter::once(listener).chain(clients.iter().map(|(_, _, a)| a));
            tcp.chain(udps.iter().map(|(_, a)| a))
        })
        .map(|a| announcement(a.proto, a.local))
        .collect();
    announce_then_wait(w, "armed", serde_json::json!({ "known": announced }))?;
    let started = SystemTime::now();
    let t0 = Instant::now();
    let (mut udp_n, mut tcp_n) = (0, 0);
    let mut kept = Vec::new();
    let mut lingering = std::collections::VecDeque::with_capacity(BURST_UDP_OPEN + 1);
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    while (udp_n < BURST_UDP || tcp_n < BURST_TCP) && t0.elapsed() < BURST_MAX {
        for _ in 0..BURST_UDP.div_ceil(BURST_TCP) {
            if udp_n < BURST_UDP {
                let s = new_socket(v4, Proto::Udp)?;
                s.bind(&SocketAddr::new(v4, 0).into()).context("burst: UDP bind(0)")?;
                if udp_n % BURST_KEEP_EVERY == 0 {
                    kept.push(s);
                } else {
                    lingering.push_back(s);
                }
                if lingering.len() > BURST_UDP_OPEN {
                    drop(lingering.pop_front());
                }
                udp_n += 1;
            }
        }
        if tcp_n < BURST_TCP {
            let s = new_socket(v4, Proto::Tcp)?;
            s.connect(&to.into()).context("burst: connect")?;
            let (child, _) = listener.accept().context("burst: accept")?;
            // Abort both ends: RST, no FIN exchange, no TIME_WAIT.
            s.set_linger(Some(Duration::ZERO))?;
            SockRef::from(&child).set_linger(Some(Duration::ZERO))?;
            drop(s);
            drop(child);
            tcp_n += 1;
        }
    }
    // The tracer is let go now (by a test that stopped it), and sees these
    // releases, of sockets whose allocs it missed; one at a time, so that
    // it can keep up.
    announce_then_wait(w, "paused", serde_json::json!({ "lingering": lingering.len() }))?;
    while let Some(s) = lingering.pop_front() {
        drop(s);
        std::thread::sleep(Duration::from_micros(200));
    }
    let ended = SystemTime::now();
    drop(listener);
    let burst = serde_json::json!({
        "udp": udp_n,
        "tcp": tcp_n,
        "started": rfc3339::format(started),
        "ended": rfc3339::format(ended),
        "kept": kept
            .iter()
            .map(|s| Ok(announcement(Proto::Udp, local_addr(s)?)))
            .collect::<Result<Vec<_>>>()?,
    });
    ready_then_wait(w, serde_json::json!({ "burst": burst }))?;
    drop(kept);

    for (listener, listener_alloc, clients, udps) in known {
        let laddr = listener_alloc.local;
        for (mut client, child, alloc) in clients {
            drop(child);
            let n = client.read(&mut [0u8; 16]).context("k: client read")?;
            ensure!(n == 0, "k: client read {n} bytes, expected EOF");
            drop(client);
            let after = settle(Proto::Tcp, alloc.local, Some(laddr))?;
            w.closed(&alloc, after, true)?;
        }
        for (sock, alloc) in udps.into_iter().rev() {
            drop(sock);
            let after = settle(Proto::Udp, alloc.local, alloc.remote)?;
            w.closed(&alloc, after, true)?;
        }
        drop(listener);
        let after = settle(Proto::Tcp, laddr, None)?;
        w.closed(&listener_alloc, after, true)?;
    }
    Ok(())
}

/// The `crowd` scenario (see the crate documentation).
fn crowd(w: &mut Workload) -> Result<()> {
    let range = ephemeral_range()?;
    let mut held = Vec::new();
    let mut announced = Vec::new();
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        for _ in 0..CROWD {
            let (sock, port) = bind_fixed(w, "c:udp", ip, Proto::Udp, range)?;
            let local = local_addr(&sock)?;
            ensure!(local.port() == port, "c: asked for UDP port {port}, getsockname says {local}");
            let alloc = w.alloc("c:udp", "bind", Proto::Udp, local, None, "snapshot", false);
            expect_listed("c:udp", Proto::Udp, local, None, UDP_UNCONNECTED)?;
            announced.push(announcement(Proto::Udp, local));
            held.push((sock, alloc));
        }
    }
    ready_then_wait(w, serde_json::json!({ "sockets": announced }))?;
    for (sock, alloc) in held {
        drop(sock);
        let after = settle(Proto::Udp, alloc.local, None)?;
        w.closed(&alloc, after, true)?;
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
    bind_fixed(w, step, ip, Proto::Tcp, range)
}

/// [`bind_fixed_port`] for either protocol.
fn bind_fixed(
    w: &mut Workload,
    step: &'static str,
    ip: IpAddr,
    proto: Proto,
    range: (u16, u16),
) -> Result<(Socket, u16)> {
    let candidates = (20000..=30000).chain(1024..range.0).filter(|p| !(range.0..=range.1).contains(p));
    for port in candidates {
        let sock = new_socket(ip, proto)?;
        let want = SocketAddr::new(ip, port);
        match sock.bind(&want.into()) {
            Ok(()) => return Ok((sock, port)),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => w.bind_failed(step, proto, want, &e)?,
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

/// A held socket as a ready line lists it:
/// `{"proto","family","laddr","lport"}`.
fn announcement(proto: Proto, local: SocketAddr) -> serde_json::Value {
    serde_json::json!({
        "proto": proto_name(proto),
        "family": family_name(local.ip()),
        "laddr": local.ip().to_string(),
        "lport": local.port(),
    })
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
