//! `port-listener PORT COMM [ADDR] [TAG...]`: a TCP listener on a chosen
//! port, for the `who` and `notice` tests.
//!
//! It names itself COMM (`prctl(PR_SET_NAME)`, the name the kernel shows in
//! `/proc/PID/comm` and gives eBPF programs), binds ADDR:PORT (default
//! 127.0.0.1) and listens, then prints one JSON line with its own truth:
//!
//! ```json
//! {"op":"listening","pid":4242,"comm":"pt-holder-a","addr":"127.0.0.1","port":40500}
//! ```
//!
//! `pid` is `getpid()`, `comm` is read back from `/proc/self/comm`, `addr`
//! and `port` come from `getsockname`. Then it holds the socket until its
//! stdin closes (or a line arrives), closes it, prints
//! `{"op":"closed","pid":N}` and exits 0; a signal ends it with the socket.
//! The TAG arguments are ignored (they let a test recognise the command
//! line), except two options among them: `--udp` binds a UDP socket instead
//! (a UDP "listener"), and `--connect=ADDR:PORT` then `connect()`s it, a UDP
//! client on a fixed port (its truth line adds `"connected":"ADDR:PORT"`).
//! Setup failures exit 1 with the reason on stderr; usage errors exit 2.

use std::ffi::CString;
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use socket2::{Domain, Socket, Type};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (port, comm, addr, options) = match parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("port-listener: {e:#}\nusage: port-listener PORT COMM [ADDR] [TAG...]");
            return ExitCode::from(2);
        }
    };
    match run(port, &comm, addr, &options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("port-listener: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The options among the tags.
#[derive(Default)]
struct Options {
    udp: bool,
    connect: Option<SocketAddr>,
}

fn parse(args: &[String]) -> Result<(u16, String, IpAddr, Options)> {
    let [port, comm, rest @ ..] = args else { bail!("PORT and COMM are required") };
    let port: u16 = port.parse().with_context(|| format!("port {port:?}"))?;
    if port == 0 {
        bail!("port 0: this helper listens on a chosen port");
    }
    if comm.is_empty() || comm.len() > 15 || comm.contains('\0') {
        bail!("comm {comm:?}: 1 to 15 bytes (TASK_COMM_LEN - 1), no NUL");
    }
    let addr = match rest.first() {
        Some(a) => a.parse().with_context(|| format!("address {a:?}"))?,
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let mut options = Options::default();
    for tag in rest.iter().skip(1) {
        if tag == "--udp" {
            options.udp = true;
        } else if let Some(to) = tag.strip_prefix("--connect=") {
            options.connect = Some(to.parse().with_context(|| format!("--connect={to}"))?);
        }
    }
    if options.connect.is_some() && !options.udp {
        bail!("--connect is for --udp sockets");
    }
    Ok((port, comm.clone(), addr, options))
}

fn run(port: u16, comm: &str, addr: IpAddr, options: &Options) -> Result<()> {
    let name = CString::new(comm)?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes
    // (longer ones are truncated by the kernel); `name` outlives the call.
    if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("prctl(PR_SET_NAME)");
    }
    let own_comm = std::fs::read_to_string("/proc/self/comm").context("reading /proc/self/comm")?;
    let own_comm = own_comm.trim_end_matches('\n');

    let want = SocketAddr::new(addr, port);
    let kind = if options.udp { Type::DGRAM } else { Type::STREAM };
    let sock = Socket::new(Domain::for_address(want), kind, None).context("socket")?;
    sock.bind(&want.into()).with_context(|| format!("bind {want}"))?;
    if options.udp {
        if let Some(to) = options.connect {
            sock.connect(&to.into()).with_context(|| format!("connect {to}"))?;
        }
    } else {
        sock.listen(16).context("listen")?;
    }
    let local = sock.local_addr()?.as_socket().context("getsockname: not an inet address")?;

    let mut stdout = std::io::stdout().lock();
    let mut ready = json!({
        "op": "listening",
        "pid": std::process::id(),
        "comm": own_comm,
        "addr": local.ip().to_string(),
        "port": local.port(),
    });
    if let Some(to) = options.connect {
        ready["connected"] = json!(to.to_string());
    }
    writeln!(stdout, "{ready}")?;
    stdout.flush()?;

    // Held until stdin closes or says anything.
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    drop(sock);
    writeln!(stdout, "{}", json!({"op": "closed", "pid": std::process::id()}))?;
    stdout.flush()?;
    Ok(())
}
