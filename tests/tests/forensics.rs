//! Kernel tests of issue 7 (forensics): `port-trace record` (a durable,
//! private file: 0600, `O_EXCL`, `--force`, `.zst`, `--rotate-size` /
//! `--rotate-count`) and `port-trace report` on what it wrote (text,
//! `--format json`, `--html`).
//!
//! Every recording here is real: `record --netns` on a private namespace
//! while a workload (src/bin) runs in it. The expectations come from outside
//! the tool: the workload's own truth (getsockname ports, its pid, its
//! count of connections), the file as the kernel holds it (its mode, its
//! bytes, read here line by line and decompressed here with the zstd
//! crate), and a browser's rendering of the HTML page (headless Chromium's
//! screenshot, decoded here). The tests run one at a time (see [`serial`])
//! so that a storm in one does not slow the recorder of another.
//!
//! They need root (see `require_root`); the HTML test also needs Chromium
//! at [`CHROMIUM`] (`.ci/run` installs Debian's). Set
//! `PORT_TRACE_REPORT_SAMPLES=DIR` to keep the screenshot
//! (`DIR/report-html.png`) and the text report (`DIR/report-sample.txt`).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use port_trace_integration::netns::NetNs;
use port_trace_integration::truth::Truth;
use port_trace_integration::{
    output_with_timeout, prepare_netns, require_root, rfc3339, run_workload, tracer_bin, tracer_extra_args, Capture,
    SessionOptions, HEADER_TIMEOUT, STOP_TIMEOUT, WORKLOAD_TIMEOUT,
};
use serde_json::Value;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_port-workload");
const STORM: &str = env!("CARGO_BIN_EXE_port-storm");

/// The workload's `comm` (its binary name).
const WORKLOAD_COMM: &str = "port-workload";

/// The namespaces' `ip_local_port_range` (the ports `basic` chooses itself
/// lie below it).
const RANGE: (u16, u16) = (40000, 49999);

/// How long after the workload the recorder is killed: the contract is a
/// flush at least every 100 ms, so everything the workload did must be in
/// the file by then.
const FLUSH_WAIT: Duration = Duration::from_millis(300);

/// How long `report` may take on these small recordings.
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a refused `record` may take to exit.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one Chromium run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// Debian's Chromium.
const CHROMIUM: &str = "/usr/bin/chromium";

/// `--rotate-size 64K --rotate-count 3`.
const ROTATE_SIZE: u64 = 64 * 1024;
const ROTATE_COUNT: u64 = 3;

/// How long the connect storms run, in seconds.
const STORM_SECS: &str = "0.5";

/// The kernel tests of this file run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(out: &Output) -> String {
    format!("exit: {}\nstdout:\n{}\nstderr:\n{}", out.status, text(&out.stdout), text(&out.stderr))
}

fn namespace() -> NetNs {
    prepare_netns(&SessionOptions { ephemeral_range: Some(RANGE), ..SessionOptions::default() }).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).permissions().mode() & 0o7777
}

/// A directory of its own under the system's temporary directory, removed
/// when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pt-forensics-{}-{n}-{what}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------
// Reading recordings, independently of port-trace's reader.
// ---------------------------------------------------------------------

/// A recording's bytes: decompressed when the file starts with zstd's magic
/// number, as far as the data goes.
struct Decoded {
    bytes: Vec<u8>,
    /// The file was zstd.
    compressed: bool,
    /// Why decompression stopped before the end of the frame (a killed
    /// recorder leaves a frame without its end: `UnexpectedEof`).
    stream_error: Option<std::io::Error>,
}

fn decode(path: &Path) -> Decoded {
    let raw = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    if !raw.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Decoded { bytes: raw, compressed: false, stream_error: None };
    }
    let mut decoder = zstd::stream::read::Decoder::new(&raw[..]).expect("a zstd decoder");
    let (mut bytes, mut buf) = (Vec::new(), [0u8; 8192]);
    loop {
        match decoder.read(&mut buf) {
            Ok(0) => return Decoded { bytes, compressed: true, stream_error: None },
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) => return Decoded { bytes, compressed: true, stream_error: Some(e) },
        }
    }
}

/// A recording read line by line.
struct Lines {
    /// The complete lines that are JSON objects, with their 1-based line
    /// numbers.
    records: Vec<(usize, Value)>,
    /// Complete lines that are not (line number, text).
    bad: Vec<(usize, String)>,
    /// A last line without its newline (the recorder stopped while writing
    /// it).
    torn: Option<String>,
}

fn split_lines(bytes: &[u8]) -> Lines {
    let mut lines = Lines { records: Vec::new(), bad: Vec::new(), torn: None };
    let mut pieces: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // After the last newline: empty, or a torn line.
    let tail = pieces.pop().unwrap_or_default();
    if !tail.is_empty() {
        lines.torn = Some(text(tail));
    }
    for (i, piece) in pieces.into_iter().enumerate() {
        match serde_json::from_slice::<Value>(piece) {
            Ok(v) if v.is_object() => lines.records.push((i + 1, v)),
            _ => lines.bad.push((i + 1, text(piece))),
        }
    }
    lines
}

impl Lines {
    fn of_type<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.records.iter().map(|(_, v)| v).filter(move |v| v["type"] == kind)
    }

    /// Allocations as `report` counts them: `alloc` lines but those of the
    /// start-up snapshot (ports held before tracing began).
    fn allocations(&self) -> u64 {
        self.of_type("alloc").filter(|v| v["origin"] != "snapshot").count() as u64
    }

    /// The times of the event lines, in file order.
    fn event_times(&self) -> Vec<i128> {
        self.records
            .iter()
            .filter(|(_, v)| v["type"] != "header")
            .filter_map(|(_, v)| v["ts"].as_str())
            .filter_map(rfc3339::parse)
            .collect()
    }
}

/// The truth's allocations that have no `alloc` line (same proto, family,
/// port and pid) in `lines`, as labels.
fn missing_allocations(truth: &Truth, lines: &Lines) -> Vec<String> {
    truth
        .allocations()
        .into_iter()
        .filter(|s| s.port_known())
        .filter(|s| {
            !lines.of_type("alloc").any(|v| {
                v["proto"] == s.proto.as_str()
                    && v["family"] == s.family.as_str()
                    && v["lport"] == s.lport
                    && v["pid"] == s.pid
            })
        })
        .map(|s| s.label())
        .collect()
}

// ---------------------------------------------------------------------
// Running the tool.
// ---------------------------------------------------------------------

/// `port-trace record -o FILE --netns NS EXTRA...` as a child process.
/// Dropping it kills the process.
struct Recorder {
    child: Child,
    stderr: Option<Capture>,
    file: PathBuf,
}

impl Recorder {
    fn start(file: &Path, ns: &NetNs, extra: &[&str]) -> Recorder {
        let mut args: Vec<OsString> =
            vec!["record".into(), "-o".into(), file.into(), "--netns".into(), ns.path().into()];
        args.extend(extra.iter().map(OsString::from));
        args.extend(tracer_extra_args());
        let mut child = Command::new(tracer_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", tracer_bin().display()));
        let stderr = child.stderr.take().map(Capture::start);
        Recorder { child, stderr, file: file.to_path_buf() }
    }

    /// Waits up to [`HEADER_TIMEOUT`] for the file to begin with a complete
    /// header line.
    fn wait_header(&mut self) {
        let deadline = Instant::now() + HEADER_TIMEOUT;
        loop {
            if fs::symlink_metadata(&self.file).is_ok_and(|m| m.is_file()) {
                let lines = split_lines(&decode(&self.file).bytes);
                if lines.records.first().is_some_and(|(n, v)| *n == 1 && v["type"] == "header") {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("record exited before writing its header ({status}):\n{}", self.take_stderr());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.take_stderr();
                panic!("no header in {} within {HEADER_TIMEOUT:?}; stderr:\n{stderr}", self.file.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`: no chance to flush or end anything.
    fn kill9(mut self) -> (ExitStatus, String) {
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().expect("waiting for the recorder");
        (status, self.take_stderr())
    }

    /// SIGINT, and its exit within [`STOP_TIMEOUT`].
    fn interrupt(mut self) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) }, 0, "SIGINT");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the recorder") {
                return (status, self.take_stderr());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("record did not exit within {STOP_TIMEOUT:?} of SIGINT; stderr:\n{}", self.take_stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn take_stderr(&mut self) -> String {
        self.stderr.take().map(|c| text(&c.finish(Duration::from_secs(2)))).unwrap_or_default()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `port-trace ARGS...` (no tracing: `report`, a refused `record`).
fn port_trace(args: &[&dyn AsRef<OsStr>], timeout: Duration) -> Output {
    let mut cmd = Command::new(tracer_bin());
    cmd.args(args.iter().map(|a| a.as_ref()));
    output_with_timeout(&mut cmd, timeout).unwrap()
}

/// `port-trace report FILE --format json`: must exit 0 with one JSON
/// object on stdout.
fn report_json(file: &Path) -> (Value, Output) {
    let out = port_trace(&[&"report", &file, &"--format", &"json"], REPORT_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "report {} --format json\n{}", file.display(), describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("report --format json is not JSON ({e})\n{}", describe(&out)));
    (v, out)
}

/// A storm of TCP connections in `ns` for [`STORM_SECS`]: its own count of
/// connections (each took and gave back one port).
fn storm(ns: &NetNs) -> u64 {
    let out = output_with_timeout(ns.command(STORM).args(["tcp", STORM_SECS]), WORKLOAD_TIMEOUT).unwrap();
    assert!(out.status.success(), "port-storm\n{}", describe(&out));
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("port-storm output ({e})\n{}", describe(&out)));
    let ops = v["ops"].as_u64().expect("port-storm's ops");
    assert!(ops > 0, "the storm made no connection\n{}", describe(&out));
    ops
}

// ---------------------------------------------------------------------
// A clean recording shared by the tests that only read one.
// ---------------------------------------------------------------------

/// A recording of `basic`, a connect storm and `basic` again, ended with
/// SIGINT (so it ends with its summary).
struct Shared {
    bytes: Vec<u8>,
    /// The two runs of `basic`.
    truths: Vec<Truth>,
    /// The storm's count of connections.
    storm_ops: u64,
}

fn shared_recording() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = TempDir::new("shared");
        let file = dir.join("shared.jsonl");
        let ns = namespace();
        let mut rec = Recorder::start(&file, &ns, &[]);
        rec.wait_header();
        let first = run_workload(&ns, Path::new(WORKLOAD), "basic").unwrap();
        let storm_ops = storm(&ns);
        let second = run_workload(&ns, Path::new(WORKLOAD), "basic").unwrap();
        let truths = vec![first, second];
        // Until the last workload's allocations are in the file (read as it
        // grows: it holds the storm): then SIGINT.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut read, mut allocs) = (0, Lines { records: Vec::new(), bad: Vec::new(), torn: None });
        loop {
            let bytes = fs::read(&file).unwrap();
            let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if end > read {
                let new = split_lines(&bytes[read..end]);
                allocs.records.extend(new.records.into_iter().filter(|(_, v)| v["type"] == "alloc"));
                read = end;
            }
            if missing_allocations(&truths[1], &allocs).is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (status, stderr) = rec.interrupt();
        assert_eq!(status.code(), Some(0), "record after SIGINT: {status}\nstderr:\n{stderr}");
        let bytes = fs::read(&file).unwrap();
        let lines = split_lines(&bytes);
        assert!(
            lines.bad.is_empty() && lines.torn.is_none(),
            "a clean recording with bad lines: {:?} {:?}",
            lines.bad,
            lines.torn
        );
        for truth in &truths {
            let missing = missing_allocations(truth, &lines);
            assert!(missing.is_empty(), "allocations of `basic` not recorded: {missing:#?}");
        }
        assert!(lines.records.last().is_some_and(|(_, v)| v["type"] == "summary"), "no summary at the end");
        Shared { bytes, truths, storm_ops }
    })
}

// ---------------------------------------------------------------------
// 1. kill -9.
// ---------------------------------------------------------------------

/// `record -o NAME` on a namespace, `basic` in it, 300 ms, `kill -9`. The
/// file is 0600; readable line by line but for at most a torn last line
/// (zstd: the flushed blocks decode, the frame just has no end); every port
/// the workload got (getsockname) is there as an `alloc`; and `report
/// --format json` exits 0 and counts them: allocations as the file holds
/// them (at least the workload's), the workload's comm in `top_comms`,
/// `bad_lines` 1 for a torn tail else 0, and for zstd a note that the
/// stream has no end.
fn killed_recording_keeps_what_was_flushed(test: &str, name: &str) {
    if !require_root(test) {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let dir = TempDir::new(test);
    let file = dir.join(name);
    let ns = namespace();
    let mut rec = Recorder::start(&file, &ns, &[]);
    rec.wait_header();
    let truth = run_workload(&ns, Path::new(WORKLOAD), "basic").unwrap();
    let shape = truth.scenario_problems("basic", RANGE);
    assert!(shape.is_empty(), "the workload did not do what `basic` promises: {shape:#?}");
    std::thread::sleep(FLUSH_WAIT);
    let (status, stderr) = rec.kill9();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the recorder was not killed: {status}\nstderr:\n{stderr}");

    assert_eq!(mode(&file), 0o600, "{name}: mode");
    let decoded = decode(&file);
    let lines = split_lines(&decoded.bytes);
    let ctx = format!("recording {name} (decoded):\n{}\nrecorder stderr:\n{stderr}", text(&decoded.bytes));
    assert_eq!(decoded.compressed, name.ends_with(".zst"), "compression by name\n{ctx}");
    if let Some(e) = &decoded.stream_error {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof,
            "the zstd data is corrupt, not just unfinished: {e}\n{ctx}"
        );
    }
    assert!(lines.bad.is_empty(), "unreadable lines before the last: {:?}\n{ctx}", lines.bad);
    assert!(lines.records.first().is_some_and(|(_, v)| v["type"] == "header"), "no header first\n{ctx}");
    let foreign: Vec<&Value> =
        lines.records.iter().map(|(_, v)| v).filter(|v| v.get("netns").is_some_and(|n| *n != ns.inode())).collect();
    assert!(foreign.is_empty(), "records of another namespace than {}: {foreign:#?}", ns.inode());
    let missing = missing_allocations(&truth, &lines);
    assert!(
        missing.is_empty(),
        "{} ms after the workload, kill -9 lost allocations: {missing:#?}\n{ctx}",
        FLUSH_WAIT.as_millis()
    );

    let (report, out) = report_json(&file);
    let ctx = format!("{ctx}\nreport:\n{}", describe(&out));
    let want = truth.allocations().len() as u64;
    assert_eq!(report["allocations"], lines.allocations(), "report's allocations vs the file's alloc lines\n{ctx}");
    assert!(lines.allocations() >= want, "fewer allocations than the workload's {want}\n{ctx}");
    let comm = report["top_comms"].as_array().and_then(|c| c.iter().find(|c| c["comm"] == WORKLOAD_COMM));
    assert!(
        comm.is_some_and(|c| c["allocations"].as_u64().is_some_and(|n| n >= want)),
        "{WORKLOAD_COMM} with at least {want} allocations is not in top_comms\n{ctx}"
    );
    assert_eq!(report["bad_lines"], u64::from(lines.torn.is_some()), "bad_lines (torn tail: {:?})\n{ctx}", lines.torn);
    let notes = report["notes"].as_array().map_or(0, Vec::len);
    if decoded.compressed {
        assert!(decoded.stream_error.is_some(), "a killed recorder ended its zstd frame?\n{ctx}");
        assert!(notes > 0 && text(&out.stderr).contains("end mark"), "no note that the stream has no end\n{ctx}");
    } else {
        assert_eq!(notes, 0, "notes on a plain file\n{ctx}");
    }
    eprintln!("{test}: {} lines, torn tail: {}, {:?}", lines.records.len(), lines.torn.is_some(), t0.elapsed());
}

#[test]
fn killed_plain_recording_keeps_what_was_flushed() {
    killed_recording_keeps_what_was_flushed("killed_plain_recording_keeps_what_was_flushed", "rec.jsonl");
}

#[test]
fn killed_zstd_recording_keeps_what_was_flushed() {
    killed_recording_keeps_what_was_flushed("killed_zstd_recording_keeps_what_was_flushed", "rec.jsonl.zst");
}

// ---------------------------------------------------------------------
// 2. Refusing to overwrite.
// ---------------------------------------------------------------------

/// `record -o EXISTING` exits 2 at once with one line on stderr, and the
/// file keeps its bytes and mode; a symbolic link is refused the same way
/// even with `--force` (its target untouched, a dangling one's target not
/// created); `--force` on a regular file replaces it with a recording,
/// mode 0600.
#[test]
fn record_refuses_to_overwrite_and_never_follows_a_symlink() {
    if !require_root("record_refuses_to_overwrite_and_never_follows_a_symlink") {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let dir = TempDir::new("refuse");
    let ns = namespace();
    let netns = ns.path();
    let precious = b"precious: not a recording\n";
    let existing = dir.join("old.jsonl");
    fs::write(&existing, precious).unwrap();
    fs::set_permissions(&existing, fs::Permissions::from_mode(0o644)).unwrap();
    let target = dir.join("target.txt");
    fs::write(&target, precious).unwrap();
    let link = dir.join("link.jsonl");
    symlink(&target, &link).unwrap();
    let dangling = dir.join("dangling.jsonl");
    let nowhere = dir.join("nowhere.jsonl");
    symlink(&nowhere, &dangling).unwrap();

    let refused = |file: &Path, force: bool, says: &str| {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"record", &"-o", &file, &"--netns", &netns];
        if force {
            args.push(&"--force");
        }
        let t = Instant::now();
        let out = port_trace(&args, REFUSAL_TIMEOUT);
        let ctx = format!("record -o {} (force: {force})\n{}", file.display(), describe(&out));
        assert_eq!(out.status.code(), Some(2), "{ctx}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "want one line on stderr\n{ctx}");
        assert!(
            stderr.contains(&file.display().to_string()) && stderr.contains(says),
            "the line does not name the file and say `{says}`\n{ctx}"
        );
        assert!(out.stdout.is_empty(), "{ctx}");
        assert!(t.elapsed() < Duration::from_secs(5), "a refusal took {:?}", t.elapsed());
    };
    refused(&existing, false, "--force");
    assert_eq!(fs::read(&existing).unwrap(), precious, "a refused record touched the file");
    assert_eq!(mode(&existing), 0o644, "a refused record changed the mode");
    for force in [false, true] {
        refused(&link, force, "symbolic link");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
        assert_eq!(fs::read(&target).unwrap(), precious, "record wrote through a symbolic link");
        assert_eq!(mode(&target), 0o644, "record changed the link target's mode");
    }
    refused(&dangling, true, "symbolic link");
    assert!(!nowhere.exists(), "record created a dangling link's target");

    let mut rec = Recorder::start(&existing, &ns, &["--force"]);
    rec.wait_header();
    let (status, stderr) = rec.interrupt();
    assert_eq!(status.code(), Some(0), "record --force after SIGINT: {status}\nstderr:\n{stderr}");
    let bytes = fs::read(&existing).unwrap();
    let lines = split_lines(&bytes);
    let ctx = format!("after record --force:\n{}", text(&bytes));
    assert!(!bytes.windows(precious.len()).any(|w| w == precious), "the old content survived --force\n{ctx}");
    assert!(lines.bad.is_empty() && lines.torn.is_none(), "{ctx}");
    assert!(lines.records.first().is_some_and(|(n, v)| *n == 1 && v["type"] == "header"), "{ctx}");
    assert!(lines.records.last().is_some_and(|(_, v)| v["type"] == "summary"), "{ctx}");
    assert_eq!(mode(&existing), 0o600, "--force must leave the recording private");
    eprintln!("record_refuses_to_overwrite_and_never_follows_a_symlink: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------
// 3. Damaged files.
// ---------------------------------------------------------------------

/// A real recording with a garbage line put in its middle and its last
/// line torn in half: `report` exits 0, counts `bad_lines` 2, lists both
/// line numbers (JSON and stderr) and still counts every allocation of the
/// file (the torn line is the summary). A header of a newer schema (99) is
/// an error that says so (nonzero exit, nothing on stdout).
#[test]
fn damaged_recordings_are_read_around_their_bad_lines() {
    if !require_root("damaged_recordings_are_read_around_their_bad_lines") {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let shared = shared_recording();
    let dir = TempDir::new("damaged");
    let clean = split_lines(&shared.bytes);
    let (clean_report, _) = {
        let file = dir.join("clean.jsonl");
        fs::write(&file, &shared.bytes).unwrap();
        report_json(&file)
    };
    assert_eq!(clean_report["bad_lines"], 0);
    assert_eq!(clean_report["allocations"], clean.allocations(), "report's allocations vs the file's alloc lines");
    let want: u64 = shared.truths.iter().map(|t| t.allocations().len() as u64).sum::<u64>() + shared.storm_ops;
    assert!(clean.allocations() >= want, "{} allocations recorded, the workloads made {want}", clean.allocations());

    let text_lines: Vec<&[u8]> = shared.bytes.strip_suffix(b"\n").unwrap().split(|&b| b == b'\n').collect();
    let n = text_lines.len();
    assert!(n >= 10, "a short recording: {n} lines");
    let mid = n / 2;
    let last = text_lines[n - 1];
    assert!(serde_json::from_slice::<Value>(last).unwrap()["type"] == "summary");
    let mut damaged = Vec::new();
    for line in &text_lines[..mid] {
        damaged.extend_from_slice(line);
        damaged.push(b'\n');
    }
    damaged.extend_from_slice(b"{\"type\":\"alloc\",\"ts\":\x01garbage\xff not json\n");
    for line in &text_lines[mid..n - 1] {
        damaged.extend_from_slice(line);
        damaged.push(b'\n');
    }
    damaged.extend_from_slice(&last[..last.len() / 2]);
    // 1-based: the garbage is line mid + 1, the torn summary line n + 1.
    let (garbage_line, torn_line) = (mid + 1, n + 1);
    let file = dir.join("damaged.jsonl");
    fs::write(&file, &damaged).unwrap();
    let (report, out) = report_json(&file);
    let stderr = text(&out.stderr);
    let ctx = describe(&out);
    assert_eq!(report["bad_lines"], 2, "{ctx}");
    let listed: Vec<u64> =
        report["unreadable_lines"].as_array().unwrap().iter().filter_map(|b| b["line"].as_u64()).collect();
    assert_eq!(listed, vec![garbage_line as u64, torn_line as u64], "unreadable_lines\n{ctx}");
    for line in [garbage_line, torn_line] {
        assert!(
            stderr.contains(&format!("{}:{line}:", file.display())),
            "stderr does not name {}:{line}\n{ctx}",
            file.display()
        );
    }
    assert_eq!(report["allocations"], clean.allocations(), "allocations of the damaged file\n{ctx}");

    // A header of a schema from the future.
    let mut header: Value = serde_json::from_slice(text_lines[0]).unwrap();
    assert!(header["schema"].is_u64(), "the header has no schema: {header}");
    header["schema"] = 99.into();
    let mut future = serde_json::to_vec(&header).unwrap();
    future.push(b'\n');
    for line in &text_lines[1..] {
        future.extend_from_slice(line);
        future.push(b'\n');
    }
    let file = dir.join("future.jsonl");
    fs::write(&file, &future).unwrap();
    let out = port_trace(&[&"report", &file, &"--format", &"json"], REPORT_TIMEOUT);
    let ctx = describe(&out);
    assert!(!out.status.success() && out.status.code().is_some(), "report on schema 99 must fail\n{ctx}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("schema") && stderr.contains("99"), "the error does not say schema 99\n{ctx}");
    assert!(out.stdout.is_empty(), "a report of a file it cannot read\n{ctx}");
    eprintln!("damaged_recordings_are_read_around_their_bad_lines: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------
// 4. HTML.
// ---------------------------------------------------------------------

/// The plots' size in the page (html.rs draws them at 860x300 CSS pixels)
/// and their plot area inside (left, top, right, bottom margins).
const PLOT_SIZE: (usize, usize) = (860, 300);
const PLOT_MARGINS: (usize, usize, usize, usize) = (64, 60, 16, 48);
/// The plots' background, `#fcfcfc`.
const PLOT_BACKGROUND: [u8; 3] = [0xfc, 0xfc, 0xfc];
/// Plot background pixels a row (column) through a plot has at least: the
/// margins left and right of the plot area are 64 + 16 px wide, those above
/// and below it 60 + 48 px high.
const MIN_BACKGROUND_IN_ROW: usize = 32;
/// Coloured pixels (data marks) each plot area must hold at least: a blank
/// or axes-only plot has none (axes, grid and text are grey); one series
/// drawn across the whole area is about 1% of it (a 2 px line), and the
/// tallest bar of the hold-time histogram reaches the top.
const MIN_INK: f64 = 0.005;

/// An RGB screenshot.
struct Image {
    width: usize,
    height: usize,
    rgb: Vec<[u8; 3]>,
}

impl Image {
    fn decode(path: &Path) -> Image {
        let mut decoder = png::Decoder::new(fs::File::open(path).unwrap());
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        let channels = match info.color_type {
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            png::ColorType::Grayscale => 1,
            png::ColorType::GrayscaleAlpha => 2,
            other => panic!("unexpected PNG colour type {other:?}"),
        };
        let rgb = buf[..info.buffer_size()]
            .chunks(channels)
            .map(|p| if channels >= 3 { [p[0], p[1], p[2]] } else { [p[0]; 3] })
            .collect();
        Image { width: info.width as usize, height: info.height as usize, rgb }
    }

    fn at(&self, x: usize, y: usize) -> [u8; 3] {
        self.rgb[y * self.width + x]
    }
}

/// A plot found in a screenshot: its frame's inside.
#[derive(Debug)]
struct Found {
    x: (usize, usize),
    y: (usize, usize),
}

/// The plots in `img`: bands of rows that hold the plot background (at
/// least [`MIN_BACKGROUND_IN_ROW`] pixels of it, as in the margins beside a
/// grid line; the page has it nowhere else), and in each band the columns
/// that hold as much of it (as above and below the plot area).
fn find_plots(img: &Image) -> Vec<Found> {
    let fill = |y: usize| (0..img.width).filter(|&x| img.at(x, y) == PLOT_BACKGROUND).count();
    let mut bands = Vec::new();
    let mut start = None;
    for y in 0..=img.height {
        let inside = y < img.height && fill(y) >= MIN_BACKGROUND_IN_ROW;
        match (inside, start) {
            (true, None) => start = Some(y),
            (false, Some(s)) => {
                if y - s >= PLOT_SIZE.1 / 2 {
                    bands.push((s, y - 1));
                }
                start = None;
            }
            _ => {}
        }
    }
    bands
        .into_iter()
        .map(|(y0, y1)| {
            // The longest run of columns with the background above and below
            // the plot area.
            let mostly =
                |x: usize| (y0..=y1).filter(|&y| img.at(x, y) == PLOT_BACKGROUND).count() >= MIN_BACKGROUND_IN_ROW;
            let (mut best, mut run) = ((0, 0), None);
            for x in 0..=img.width {
                match (x < img.width && mostly(x), run) {
                    (true, None) => run = Some(x),
                    (false, Some(s)) => {
                        if x - s > best.1 - best.0 {
                            best = (s, x);
                        }
                        run = None;
                    }
                    _ => {}
                }
            }
            Found { x: (best.0, best.1.saturating_sub(1)), y: (y0, y1) }
        })
        .collect()
}

/// The share of coloured pixels (not grey: channels differ by 64 or more)
/// in `plot`'s plot area, its axes included (a series at 0 is drawn over
/// the x axis), the legend above it not.
fn ink(img: &Image, plot: &Found) -> f64 {
    let (left, top, right, bottom) = PLOT_MARGINS;
    let (x0, x1) = (plot.x.0 + left - 1, plot.x.0 + PLOT_SIZE.0 - right + 2);
    let (y0, y1) = (plot.y.0 + top - 2, plot.y.0 + PLOT_SIZE.1 - bottom + 3);
    let mut coloured = 0usize;
    for y in y0..y1 {
        for x in x0..x1 {
            let [r, g, b] = img.at(x, y);
            if r.max(g).max(b) - r.min(g).min(b) >= 64 {
                coloured += 1;
            }
        }
    }
    coloured as f64 / ((x1 - x0) * (y1 - y0)) as f64
}

/// Headless Chromium on `url` with `mode` (`--screenshot=FILE`,
/// `--dump-dom`), a fresh profile, nothing from the network, the console
/// logged to stderr. Fails unless it exits 0 and logged nothing from the
/// page's console (script errors, failed loads).
fn chromium(dir: &TempDir, url: &str, mode: &str) -> Output {
    static RUN: AtomicU32 = AtomicU32::new(0);
    let profile = dir.join(&format!("chromium-profile-{}", RUN.fetch_add(1, Ordering::Relaxed)));
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1200,2000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(mode)
    .arg(url);
    let out = output_with_timeout(&mut cmd, BROWSER_TIMEOUT).unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "chromium {mode}\n{}", describe(&out));
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught")).collect();
    assert!(console.is_empty(), "the page logged to the console in chromium {mode}:\n{}", console.join("\n"));
    out
}

/// `report FILE --html OUT` on a real recording: a private page that
/// fetches nothing (no remote or local references at all); headless
/// Chromium renders it without console messages, its DOM holds the three
/// plots in order, and in its screenshot there are three plot frames of
/// the size html.rs draws, each with data marks (coloured pixels) in its
/// plot area.
#[test]
fn html_report_is_self_contained_and_draws_its_plots() {
    if !require_root("html_report_is_self_contained_and_draws_its_plots") {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing (.ci/run installs Debian's chromium)");
    let shared = shared_recording();
    let dir = TempDir::new("html");
    let file = dir.join("rec.jsonl");
    fs::write(&file, &shared.bytes).unwrap();
    let page_path = dir.join("report.html");
    let out = port_trace(&[&"report", &file, &"--html", &page_path], REPORT_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "report --html\n{}", describe(&out));
    let report_text = text(&out.stdout);
    assert!(report_text.contains(WORKLOAD_COMM), "the text report does not name the workload\n{report_text}");
    assert_eq!(mode(&page_path), 0o600, "the page's mode");

    let page = fs::read_to_string(&page_path).unwrap();
    let lower = page.to_ascii_lowercase();
    for needle in
        ["src=", "href=", "url(", "@import", "<link", "<script", "<iframe", "<object", "<embed", "https:", "//cdn"]
    {
        assert!(!lower.contains(needle), "the page refers to something outside it ({needle})");
    }
    let http = lower.matches("http://").count();
    let svg_ns = lower.matches("xmlns=\"http://www.w3.org/2000/svg\"").count();
    assert_eq!(http, svg_ns, "http:// other than the SVG namespace");

    let url = format!("file://{}", page_path.display());
    let dom = text(&chromium(&dir, &url, "--dump-dom").stdout);
    let at = |id: &str| dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} in the rendered DOM"));
    assert!(at("plot-churn") < at("plot-in-use") && at("plot-in-use") < at("plot-hold"), "plot order");
    assert!(dom.matches("<svg").count() >= 3, "fewer than three SVG plots in the DOM");

    let shot = dir.join("report.png");
    chromium(&dir, &url, &format!("--screenshot={}", shot.display()));
    let img = Image::decode(&shot);
    assert_eq!((img.width, img.height), (1200, 2000), "the screenshot's size");
    let plots = find_plots(&img);
    assert_eq!(plots.len(), 3, "want three plot frames in the screenshot, found {plots:?}");
    let mut inks = Vec::new();
    for (plot, id) in plots.iter().zip(["plot-churn", "plot-in-use", "plot-hold"]) {
        // The frame's inside: the drawn size less its 1px stroke.
        let (w, h) = (plot.x.1 - plot.x.0 + 1, plot.y.1 - plot.y.0 + 1);
        assert!(
            w.abs_diff(PLOT_SIZE.0) <= 4 && h.abs_diff(PLOT_SIZE.1) <= 4,
            "{id}: {w}x{h} px, not {PLOT_SIZE:?}: {plot:?}"
        );
        let share = ink(&img, plot);
        inks.push(format!("{id} {:.2}%", share * 100.0));
        assert!(share >= MIN_INK, "{id}: only {:.3}% of its plot area is drawn ({plot:?})", share * 100.0);
    }
    if let Some(samples) = std::env::var_os("PORT_TRACE_REPORT_SAMPLES") {
        let samples = PathBuf::from(samples);
        fs::copy(&shot, samples.join("report-html.png")).unwrap();
        fs::write(samples.join("report-sample.txt"), &report_text).unwrap();
    }
    eprintln!("html_report_is_self_contained_and_draws_its_plots: ink {}, {:?}", inks.join(", "), t0.elapsed());
}

// ---------------------------------------------------------------------
// 5. Rotation.
// ---------------------------------------------------------------------

/// `record --rotate-size 64K --rotate-count 3` under a connect storm, ended
/// with SIGINT: the live file and exactly three older parts (`FILE.1` to
/// `FILE.3`, nothing else) exist, each 0600, starting with the same header
/// and ending at a line end, none past 64 KiB by more than its last line;
/// their times run from the oldest part to the live file; and `report` on
/// the base name reads all four, oldest first, counting exactly the
/// allocations the parts hold.
#[test]
fn rotated_recordings_are_read_in_order() {
    if !require_root("rotated_recordings_are_read_in_order") {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let dir = TempDir::new("rotate");
    let base = dir.join("rot.jsonl");
    let ns = namespace();
    let size = format!("{}K", ROTATE_SIZE / 1024);
    let count = ROTATE_COUNT.to_string();
    let mut rec = Recorder::start(&base, &ns, &["--rotate-size", &size, "--rotate-count", &count]);
    rec.wait_header();
    let ops = storm(&ns);
    let (status, stderr) = rec.interrupt();
    assert_eq!(status.code(), Some(0), "record after SIGINT: {status}\nstderr:\n{stderr}");

    let mut names: Vec<String> =
        fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let want: Vec<String> =
        std::iter::once("rot.jsonl".to_string()).chain((1..=ROTATE_COUNT).map(|n| format!("rot.jsonl.{n}"))).collect();
    assert_eq!(names, want, "the files after a storm of {ops} connections (stderr:\n{stderr})");

    // Oldest first.
    let order: Vec<PathBuf> = want.iter().skip(1).rev().chain(std::iter::once(&want[0])).map(|n| dir.join(n)).collect();
    let mut header: Option<Vec<u8>> = None;
    let mut total = 0u64;
    let mut previous: Option<(i128, i128, PathBuf)> = None;
    for path in &order {
        let bytes = fs::read(path).unwrap();
        let name = path.display();
        assert_eq!(mode(path), 0o600, "{name}: mode");
        assert!(bytes.ends_with(b"\n"), "{name} does not end at a line end");
        let first = &bytes[..bytes.iter().position(|&b| b == b'\n').unwrap() + 1];
        match &header {
            None => header = Some(first.to_vec()),
            Some(h) => assert_eq!(first, &h[..], "{name} does not start with the same header"),
        }
        let last_len = bytes[..bytes.len() - 1].iter().rev().position(|&b| b == b'\n').map_or(bytes.len(), |i| i + 1);
        assert!(
            ((bytes.len() - last_len) as u64) < ROTATE_SIZE,
            "{name}: {} bytes before its last line ({last_len} bytes), the limit is {ROTATE_SIZE}",
            bytes.len() - last_len
        );
        let lines = split_lines(&bytes);
        assert!(lines.bad.is_empty() && lines.torn.is_none(), "{name}: unreadable lines {:?}", lines.bad);
        assert_eq!(lines.records[0].1["type"], "header", "{name}");
        let times = lines.event_times();
        let (Some(&lo), Some(&hi)) = (times.iter().min(), times.iter().max()) else { panic!("{name} has no events") };
        if let Some((plo, phi, ppath)) = &previous {
            assert!(
                lo >= *plo && hi >= *phi,
                "{name} ({lo}..{hi}) is not later than {} ({plo}..{phi})",
                ppath.display()
            );
        }
        previous = Some((lo, hi, path.clone()));
        total += lines.allocations();
    }
    assert!(total > 0, "the parts hold no allocation");

    let (report, out) = report_json(&base);
    let ctx = describe(&out);
    let files: Vec<String> = order.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(report["files"], serde_json::json!(files), "the files report read, in order\n{ctx}");
    assert_eq!(report["allocations"], total, "report's allocations vs the sum over the parts\n{ctx}");
    assert_eq!(report["bad_lines"], 0, "{ctx}");
    eprintln!(
        "rotated_recordings_are_read_in_order: {ops} connections, {total} allocations in the kept parts, {:?}",
        t0.elapsed()
    );
}
