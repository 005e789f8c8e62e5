//! `port-churn MODE ...`: port lifecycles in bulk, for the reliability
//! tests (tests/reliability.rs). It prints what it did as JSON Lines on
//! stdout, counted by itself; run it inside a private network namespace, so
//! that every port event there is its own.
//!
//! Modes:
//!
//! - `cycle COUNT SECONDS`: UDP lifecycles on 127.0.0.1 as fast as one
//!   thread can: `socket()`, `bind(127.0.0.1:0)` (the kernel picks a port),
//!   `close()`, COUNT times or until SECONDS have passed, whichever comes
//!   first. Every `getsockname` check (see `CHECK_EVERY`) makes sure the
//!   kernel really handed out a port. Then one line
//!   `{"op":"done","pid":N,"cycles":N,"failed":N,"secs":S,"per_s":R}`:
//!   `cycles` counts the lifecycles whose `bind()` succeeded (each took and
//!   gave back one port), `failed` the `socket()`/`bind()` calls that did
//!   not.
//! - `hold COUNT`: raises `RLIMIT_NOFILE` as far as needed, opens COUNT UDP
//!   sockets on `bind(127.0.0.1:0)` and keeps them all open. Where the hard
//!   limit is too low (raising it takes CAP_SYS_RESOURCE, which containers
//!   often lack), helper processes (`port-churn hold N` again) hold the
//!   rest. Then one line `{"op":"ready","pid":N,"pids":[N,...],"held":N,
//!   "secs":S}` (`pids`: this process and its helpers; `held`: sockets open
//!   in all of them, each with a port by getsockname) and it waits for a
//!   line on stdin (or EOF); then closes them all and prints
//!   `{"op":"done","pid":N,"closed":N}`.
//!
//! Exits 1 with a message on stderr when the kernel does not play along
//! (a hold that cannot open its sockets), 2 on usage errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::mem::size_of;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// How often `cycle` asks the kernel which port it got (a `getsockname`
/// per lifecycle would slow the churn by a tenth).
const CHECK_EVERY: u64 = 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["cycle", count, secs] => count.parse::<u64>().ok().zip(secs.parse::<f64>().ok()).map(|(c, s)| cycle(c, s)),
        ["hold", count] => count.parse::<usize>().ok().map(hold),
        _ => None,
    };
    match parsed {
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("port-churn: {e}");
            ExitCode::from(1)
        }
        None => {
            eprintln!("usage: port-churn cycle COUNT SECONDS | port-churn hold COUNT");
            ExitCode::from(2)
        }
    }
}

/// 127.0.0.1 port 0, as `bind()` takes it.
fn loopback_any_port() -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be() },
        sin_zero: [0; 8],
    }
}

/// A UDP socket bound to 127.0.0.1:0; `Err(errno)` when `socket()` or
/// `bind()` fails (the socket is closed then).
fn bound_udp(addr: &libc::sockaddr_in) -> Result<libc::c_int, i32> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `addr` is a valid sockaddr_in of the length given.
    let rc = unsafe {
        libc::bind(fd, (addr as *const libc::sockaddr_in).cast(), size_of::<libc::sockaddr_in>() as libc::socklen_t)
    };
    if rc != 0 {
        let e = errno();
        // SAFETY: our own fd.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    Ok(fd)
}

/// The local port of `fd` (getsockname), 0 when it has none.
fn local_port(fd: libc::c_int) -> u16 {
    // SAFETY: an all-zero sockaddr_in is valid.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `sa` has room for `len` bytes.
    let rc = unsafe { libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) };
    if rc != 0 {
        return 0;
    }
    u16::from_be(sa.sin_port)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn cycle(count: u64, secs: f64) -> Result<(), String> {
    let addr = loopback_any_port();
    let limit = Duration::from_secs_f64(secs);
    let started = Instant::now();
    let (mut cycles, mut failed) = (0u64, 0u64);
    while cycles < count {
        // The clock only every 1024 lifecycles: it costs as much as a syscall.
        if (cycles + failed) % 1024 == 0 && started.elapsed() >= limit {
            break;
        }
        match bound_udp(&addr) {
            Ok(fd) => {
                if cycles % CHECK_EVERY == 0 && local_port(fd) == 0 {
                    return Err(format!(
                        "lifecycle {cycles}: bind(127.0.0.1:0) succeeded but getsockname shows port 0"
                    ));
                }
                // SAFETY: our own fd.
                unsafe { libc::close(fd) };
                cycles += 1;
            }
            Err(_) => failed += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"op\":\"done\",\"pid\":{},\"cycles\":{cycles},\"failed\":{failed},\"secs\":{secs:.3},\"per_s\":{:.0}}}",
        std::process::id(),
        cycles as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` towards `want` (never above the hard
/// limit, which takes CAP_SYS_RESOURCE to raise and is tried only when
/// needed); returns the soft limit in force.
fn raise_nofile(want: u64) -> Result<u64, String> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    for new in [
        libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) },
        libc::rlimit { rlim_cur: lim.rlim_max.min(want), rlim_max: lim.rlim_max },
    ] {
        // SAFETY: `new` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return Ok(new.rlim_cur);
        }
    }
    Err(format!("setrlimit(RLIMIT_NOFILE) to {want} or {} failed: {}", lim.rlim_max, std::io::Error::last_os_error()))
}

/// File descriptors a holding process keeps for itself (stdio, pipes).
const SPARE_FDS: u64 = 64;

/// A helper process holding part of the sockets (`port-churn hold N`).
struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Its stdout after the ready line (its `done` line comes there).
    stdout: BufReader<ChildStdout>,
    held: u64,
}

fn hold(count: usize) -> Result<(), String> {
    let limit = raise_nofile(count as u64 + SPARE_FDS)?;
    // Where the hard limit is below `count` (and cannot be raised without
    // CAP_SYS_RESOURCE), helper processes hold the rest.
    let own = (count as u64).min(limit.saturating_sub(SPARE_FDS)) as usize;
    if own == 0 {
        return Err(format!("RLIMIT_NOFILE {limit} leaves no room for sockets"));
    }
    let started = Instant::now();
    let mut helpers = Vec::new();
    let mut rest = count - own;
    while rest > 0 {
        let n = rest.min(own);
        helpers.push(start_helper(n)?);
        rest -= n;
    }
    let addr = loopback_any_port();
    let mut fds = Vec::with_capacity(own);
    let close_all = |fds: &[libc::c_int]| {
        for fd in fds {
            // SAFETY: our own fds.
            unsafe { libc::close(*fd) };
        }
    };
    for i in 0..own {
        match bound_udp(&addr) {
            Ok(fd) if local_port(fd) != 0 => fds.push(fd),
            Ok(fd) => {
                close_all(&fds);
                // SAFETY: our own fd.
                unsafe { libc::close(fd) };
                return Err(format!("socket {i}: bind(127.0.0.1:0) succeeded but getsockname shows port 0"));
            }
            Err(e) => {
                close_all(&fds);
                return Err(format!(
                    "socket {i} of {own} (of {count} in all): socket/bind(127.0.0.1:0) failed: {}",
                    std::io::Error::from_raw_os_error(e)
                ));
            }
        }
    }
    let held = fds.len() as u64 + helpers.iter().map(|h| h.held).sum::<u64>();
    let pids: Vec<String> = std::iter::once(std::process::id())
        .chain(helpers.iter().map(|h| h.child.id()))
        .map(|p| p.to_string())
        .collect();
    let secs = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    let ready = format!(
        "{{\"op\":\"ready\",\"pid\":{},\"pids\":[{}],\"held\":{held},\"secs\":{secs:.3}}}",
        std::process::id(),
        pids.join(",")
    );
    writeln!(out, "{ready}").and_then(|()| out.flush()).map_err(|e| format!("writing stdout: {e}"))?;
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    close_all(&fds);
    let mut closed = fds.len() as u64;
    for mut h in helpers {
        if let Some(mut stdin) = h.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
        let mut rest = String::new();
        let _ = h.stdout.read_to_string(&mut rest);
        match h.child.wait() {
            Ok(s) if s.success() => closed += h.held,
            other => return Err(format!("helper {} ended with {other:?}", h.child.id())),
        }
    }
    writeln!(out, "{{\"op\":\"done\",\"pid\":{},\"closed\":{closed}}}", std::process::id())
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing stdout: {e}"))
}

/// Starts `port-churn hold n` and waits for its ready line.
fn start_helper(n: usize) -> Result<Helper, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .args(["hold", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting a helper: {e}"))?;
    let stdin = child.stdin.take();
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    let read = stdout.read_line(&mut line);
    let held = line
        .split("\"held\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse::<u64>().ok());
    match held {
        Some(held) if held == n as u64 => Ok(Helper { child, stdin, stdout, held }),
        _ => {
            let _ = child.kill();
            let status = child.wait();
            Err(format!("helper `hold {n}`: ready line {line:?} ({read:?}, exit {status:?})"))
        }
    }
}
