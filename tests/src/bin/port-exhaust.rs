//! `port-exhaust PORT EXTRA`: runs a namespace's ephemeral range dry toward
//! one destination, for the range pressure test (tests/pressure.rs).
//!
//! Run it inside a private network namespace whose `ip_local_port_range` is
//! small (at most [`MAX_RANGE`] ports) and does not contain PORT. It listens
//! on 127.0.0.1:PORT, then `connect()`s fresh unbound TCP sockets to that
//! address again and again, keeping every connection (and its accepted
//! side) open, until a `connect()` fails with EADDRNOTAVAIL; then it tries
//! EXTRA more times. Then it prints one line with its own truth:
//!
//! ```json
//! {"op":"ready","pid":4242,"comm":"port-exhaust","range":[41000,41049],
//!  "listener":{"addr":"127.0.0.1","port":42000},"attempts":56,
//!  "ports":[41012,41014,...],"laddrs":["127.0.0.1"],"failures":6,"errnos":["EADDRNOTAVAIL",...],
//!  "first_failure_at":"2026-...Z"}
//! ```
//!
//! `ports` are the local ports `getsockname` gave each successful connect,
//! in order, and `laddrs` the local addresses it gave them; `failures` counts the `connect()` calls that failed and
//! `errnos` names their errors, in order (any error is counted; the test
//! decides what it expects); `first_failure_at` is the wall clock right
//! after the first failure returned (RFC 3339). Then it holds every socket
//! until its stdin closes or says anything, closes them (the accepted side
//! first), prints `{"op":"done","pid":N}` and exits 0.
//!
//! Setup failures (PORT inside the range, a range too large, a connect that
//! never fails) exit 1 with the reason on stderr; usage errors exit 2.

use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{bail, ensure, Context, Result};
use port_trace_integration::rfc3339;
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

/// The largest range this workload will exhaust.
const MAX_RANGE: usize = 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [port, extra] => port.parse::<u16>().ok().filter(|p| *p != 0).zip(extra.parse::<usize>().ok()),
        _ => None,
    };
    let Some((port, extra)) = parsed else {
        eprintln!("usage: port-exhaust PORT EXTRA   (PORT: 1-65535 outside the ephemeral range)");
        return ExitCode::from(2);
    };
    match run(port, extra) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("port-exhaust: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(port: u16, extra: usize) -> Result<()> {
    let range = ephemeral_range()?;
    let size = usize::from(range.1.saturating_sub(range.0)) + 1;
    ensure!(size <= MAX_RANGE, "the ephemeral range {range:?} is too large to exhaust (at most {MAX_RANGE} ports)");
    ensure!(!(range.0..=range.1).contains(&port), "port {port} is inside the ephemeral range {range:?}");

    let dest = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).context("socket")?;
    sock.bind(&dest.into()).with_context(|| format!("bind {dest}"))?;
    // Room for every connection in the accept queue.
    sock.listen(i32::try_from(size + extra + 16)?).context("listen")?;
    let listener: TcpListener = sock.into();
    let local = listener.local_addr()?;
    ensure!(local == dest, "asked for {dest}, getsockname says {local}");

    let mut held: Vec<(TcpStream, TcpStream)> = Vec::new();
    let mut ports = Vec::new();
    let mut laddrs = Vec::new();
    let mut errnos = Vec::new();
    let mut first_failure_at = None;
    let mut since_exhausted = None::<usize>;
    let mut attempts = 0usize;
    // Bounded: the range, the extra attempts, and some slack for errors
    // other than EADDRNOTAVAIL (which are counted, not retried forever).
    while since_exhausted.is_none_or(|n| n < extra) {
        ensure!(
            attempts < size + extra + 16,
            "{attempts} connect() calls without running out of ports ({} succeeded, range {range:?})",
            ports.len()
        );
        attempts += 1;
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).context("socket")?;
        match sock.connect(&dest.into()) {
            Ok(()) => {
                let me = sock.local_addr()?.as_socket().context("getsockname: not an inet address")?;
                let (server, peer) = listener.accept().context("accept")?;
                ensure!(peer == me, "accept saw {peer}, getsockname {me}");
                ports.push(me.port());
                if !laddrs.contains(&me.ip()) {
                    laddrs.push(me.ip());
                }
                held.push((sock.into(), server));
            }
            Err(e) => {
                if first_failure_at.is_none() {
                    first_failure_at = Some(rfc3339::format(SystemTime::now()));
                }
                errnos.push(errno_name(&e));
                if let Some(n) = since_exhausted.as_mut() {
                    *n += 1;
                } else if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                    since_exhausted = Some(0);
                }
            }
        }
    }

    let pid = std::process::id();
    let comm = std::fs::read_to_string("/proc/self/comm").context("reading /proc/self/comm")?;
    let mut stdout = std::io::stdout().lock();
    let ready = json!({
        "op": "ready",
        "pid": pid,
        "comm": comm.trim_end(),
        "range": [range.0, range.1],
        "listener": {"addr": local.ip().to_string(), "port": local.port()},
        "attempts": attempts,
        "ports": ports,
        "laddrs": laddrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "failures": errnos.len(),
        "errnos": errnos,
        "first_failure_at": first_failure_at,
    });
    writeln!(stdout, "{ready}")?;
    stdout.flush()?;

    // Held until stdin closes or says anything.
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    for (client, server) in held {
        drop(server);
        drop(client);
    }
    drop(listener);
    writeln!(stdout, "{}", json!({"op": "done", "pid": pid}))?;
    stdout.flush()?;
    Ok(())
}

fn ephemeral_range() -> Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Ok((lo, hi)),
        _ => bail!("cannot parse ip_local_port_range {text:?}"),
    }
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::EADDRINUSE) => "EADDRINUSE".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(n) => format!("E{n}"),
        None => format!("unknown ({e})"),
    }
}
