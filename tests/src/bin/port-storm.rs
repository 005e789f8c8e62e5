//! `port-storm MODE SECONDS`: a connect storm on loopback for the benchmark
//! (`cargo xtask bench`), as fast as one thread can for SECONDS, counting
//! its own successes. Run it inside a private network namespace, so that
//! every port event there is its own.
//!
//! Modes:
//!
//! - `tcp`: a listener on `127.0.0.1:0` served by a thread that accepts and
//!   closes each connection at once (the server closes first, so the client
//!   port is freed rather than held in TIME_WAIT); the main thread connects
//!   from an unbound socket (an ephemeral port), waits for EOF and closes.
//! - `udp`: a receiver on `127.0.0.1:0` drained by a thread; per iteration
//!   the main thread makes a socket, `bind(127.0.0.1:0)`, `sendto()`s the
//!   receiver one byte and closes.
//!
//! - `threads N`: N threads at once (the SECONDS argument is their count of
//!   iterations each), each iteration: a TCP `connect()` from an unbound
//!   socket to a listener of its own (served as in `tcp`), a UDP
//!   `bind(127.0.0.1:0)` and a UDP `bind()` to a port of the thread's own
//!   below the ephemeral range (20000 + 500 * thread + iteration), each
//!   closed at once. Many threads in `connect()` and `bind()` at the same
//!   time: the test of the tracer's per-thread tables of calls in flight.
//!   Prints, before the summary line, one line per port it got (the
//!   listener's too), as `getsockname` gave it:
//!   `{"proto":"tcp","origin":"connect","lport":N,"ephemeral":true}`.
//!
//! Then one JSON line on stdout:
//! `{"mode":"tcp","pid":N,"ops":N,"errors":N,"secs":S,"per_s":R}`: `ops`
//! counts the iterations that fully succeeded (each took and gave back one
//! ephemeral port), `errors` those that did not. Exits 2 on usage errors,
//! 1 when the listener or receiver cannot be set up.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, secs) = match args.as_slice() {
        [mode, secs] => match secs.parse::<f64>() {
            Ok(secs) if secs > 0.0 && (mode == "tcp" || mode == "udp") => (mode.clone(), secs),
            _ => return usage(),
        },
        [mode, threads, iterations] if mode == "threads" => {
            return match (threads.parse(), iterations.parse()) {
                (Ok(threads @ 1..=64), Ok(iterations @ 1..=500)) => match in_threads(threads, iterations) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => {
                        eprintln!("port-storm: {err}");
                        ExitCode::FAILURE
                    }
                },
                _ => usage(),
            };
        }
        _ => return usage(),
    };
    let duration = Duration::from_secs_f64(secs);
    let result = if mode == "tcp" { tcp(duration) } else { udp(duration) };
    match result {
        Ok((ops, errors, elapsed)) => {
            let secs = elapsed.as_secs_f64();
            println!(
                "{{\"mode\":\"{mode}\",\"pid\":{},\"ops\":{ops},\"errors\":{errors},\"secs\":{secs},\"per_s\":{}}}",
                std::process::id(),
                ops as f64 / secs
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("port-storm: {err}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: port-storm tcp|udp SECONDS | port-storm threads N(1-64) ITERATIONS(1-500)");
    ExitCode::from(2)
}

/// Loopback, any port: the kernel picks one.
fn any_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// TCP connections to a listener of our own until `duration` has passed.
fn tcp(duration: Duration) -> std::io::Result<(u64, u64, Duration)> {
    let listener = TcpListener::bind(any_port())?;
    let target = listener.local_addr()?;
    // The acceptor lives until the process exits.
    thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let (mut ops, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    let mut buf = [0u8; 16];
    while start.elapsed() < duration {
        match TcpStream::connect(target) {
            Ok(mut stream) => {
                // Wait for the server's FIN (EOF) so that we close last.
                match stream.read(&mut buf) {
                    Ok(0) => ops += 1,
                    Ok(_) | Err(_) => errors += 1,
                }
            }
            Err(_) => errors += 1,
        }
    }
    Ok((ops, errors, start.elapsed()))
}

/// UDP socket + bind(0) + sendto + close until `duration` has passed.
fn udp(duration: Duration) -> std::io::Result<(u64, u64, Duration)> {
    let receiver = UdpSocket::bind(any_port())?;
    let target = receiver.local_addr()?;
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while receiver.recv_from(&mut buf).is_ok() {}
    });
    let (mut ops, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < duration {
        let sent = UdpSocket::bind(any_port()).and_then(|sock| sock.send_to(b"x", target));
        match sent {
            Ok(_) => ops += 1,
            Err(_) => errors += 1,
        }
    }
    Ok((ops, errors, start.elapsed()))
}

/// One port the `threads` mode got, as `getsockname` showed it.
fn port_line(proto: &str, origin: &str, lport: u16, ephemeral: bool) -> String {
    format!("{{\"proto\":\"{proto}\",\"origin\":\"{origin}\",\"lport\":{lport},\"ephemeral\":{ephemeral}}}")
}

/// `threads`: `threads` threads of `iterations` connect + bind(0) +
/// bind(port) each, all at once; every port they got on stdout.
fn in_threads(threads: u16, iterations: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(any_port())?;
    let target = listener.local_addr()?;
    let mut lines = vec![port_line("tcp", "bind", target.port(), true)];
    thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let start = std::sync::Barrier::new(usize::from(threads));
    let per_thread: Vec<std::io::Result<Vec<String>>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    let mut lines = Vec::new();
                    let mut buf = [0u8; 16];
                    for i in 0..iterations {
                        let mut stream = TcpStream::connect(target)?;
                        lines.push(port_line("tcp", "connect", stream.local_addr()?.port(), true));
                        // The server closes first: the port is freed, not held in TIME_WAIT.
                        let _ = stream.read(&mut buf);
                        let any = UdpSocket::bind(any_port())?;
                        lines.push(port_line("udp", "bind", any.local_addr()?.port(), true));
                        let chosen = UdpSocket::bind((Ipv4Addr::LOCALHOST, 20000 + 500 * t + i))?;
                        lines.push(port_line("udp", "bind", chosen.local_addr()?.port(), false));
                    }
                    Ok(lines)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a worker panicked")).collect()
    });
    for worker in per_thread {
        lines.extend(worker?);
    }
    let ops = lines.len();
    for line in lines {
        println!("{line}");
    }
    println!("{{\"mode\":\"threads\",\"pid\":{},\"ops\":{ops},\"errors\":0}}", std::process::id());
    Ok(())
}
