//! Reading recordings: plain or zstd JSON Lines, rotated sets, torn and
//! corrupt lines skipped and listed rather than fatal.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::model::{Family, Proto};
use crate::output::SCHEMA_VERSION;
use crate::recording::rotated_parts;

/// A shared, interned string (command names, origins, reasons, ...).
pub type Name = Arc<str>;

/// Lines longer than this are skipped as corrupt (a record is < 1 KiB).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// At most this many bad lines are kept with their reason (all are counted).
pub const MAX_LISTED_BAD_LINES: usize = 1000;

/// Why reading failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be opened or read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// A header announces a schema this version does not know.
    #[error("{}: schema {found} is newer than this port-trace reads ({supported}); upgrade port-trace", .path.display())]
    SchemaTooNew {
        /// The file.
        path: PathBuf,
        /// The header's schema.
        found: u64,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
}

/// The header line of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// JSON Lines schema version.
    pub schema: u64,
    /// Version of port-trace that wrote it.
    pub version: Option<String>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// Backend in use.
    pub backend: Option<String>,
    /// `ip_local_port_range` of the traced namespace.
    pub ephemeral_range: Option<[u16; 2]>,
    /// The traced namespace, if one.
    pub netns: Option<u32>,
    /// Start of the run, nanoseconds since the Unix epoch.
    pub started_ns: Option<i64>,
}

/// The port an event is about, and its owner.
#[derive(Clone, Debug, PartialEq)]
pub struct Port {
    /// Protocol.
    pub proto: Proto,
    /// Family.
    pub family: Family,
    /// Local address.
    pub laddr: IpAddr,
    /// Local port (0 on failed allocations).
    pub lport: u16,
    /// Remote address when known.
    pub raddr: Option<IpAddr>,
    /// Remote port when known.
    pub rport: Option<u16>,
    /// Owning process.
    pub pid: u32,
    /// Owning command.
    pub comm: Name,
    /// Network namespace inode.
    pub netns: u32,
    /// cgroup v2 id (0 when absent).
    pub cgroup: u64,
    /// Socket cookie.
    pub sock: u64,
}

/// An event about one port, with its time.
#[derive(Clone, Debug, PartialEq)]
pub struct PortEvent {
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: i64,
    /// The port.
    pub port: Port,
}

/// A range-pressure warning.
#[derive(Clone, Debug, PartialEq)]
pub struct Pressure {
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: i64,
    /// Destination address (none for bind/UDP pools).
    pub raddr: Option<String>,
    /// Destination port.
    pub rport: Option<u16>,
    /// Ports of the pool in use.
    pub used: Option<u64>,
    /// Usable ports of the pool.
    pub capacity: Option<u64>,
    /// `used / capacity`.
    pub ratio: Option<f64>,
}

/// One line of a recording, by `type`.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    /// `header`.
    Header(Header),
    /// `alloc`.
    Alloc {
        /// Time and port.
        event: PortEvent,
        /// `connect`, `bind`, `listen`, `autobind`, `snapshot`.
        origin: Name,
        /// Whether the kernel chose the port.
        ephemeral: bool,
    },
    /// `alloc_fail`.
    AllocFail {
        /// Time and port (`lport` may be 0).
        event: PortEvent,
        /// Errno name, e.g. `EADDRNOTAVAIL`.
        errno: Name,
        /// The operation that asked for a port.
        origin: Name,
    },
    /// `state`.
    State {
        /// Time and port.
        event: PortEvent,
        /// TCP state before.
        old: Name,
        /// TCP state after.
        new: Name,
    },
    /// `release`.
    Release {
        /// Time and port.
        event: PortEvent,
        /// Why.
        reason: Name,
        /// From alloc to release; `None` when the alloc was not seen.
        held_ns: Option<u64>,
    },
    /// `lifecycle` (from `watch --lifecycles`): a whole lifecycle at its end.
    Lifecycle {
        /// Time of the release, and the port.
        event: PortEvent,
        /// Why it ended.
        reason: Name,
        /// From alloc to release, when known.
        held_ns: Option<u64>,
        /// How it began, when seen.
        origin: Option<Name>,
        /// Whether the kernel chose the port, when seen.
        ephemeral: Option<bool>,
        /// When it began, when seen.
        started_ns: Option<i64>,
    },
    /// `lost`: events the kernel could not deliver.
    Lost {
        /// When noticed.
        ts_ns: i64,
        /// How many.
        count: u64,
    },
    /// `summary`, the last line of a run.
    Summary {
        /// When written.
        ts_ns: i64,
        /// Seconds traced.
        duration_s: Option<f64>,
    },
    /// `pressure`.
    Pressure(Pressure),
    /// `notice`.
    Notice {
        /// When.
        ts_ns: i64,
        /// What kind, e.g. `ephemeral_listener`.
        kind: Name,
    },
    /// A type this version does not know (kept, not a bad line).
    Other {
        /// Its `type`.
        kind: String,
    },
}

impl Line {
    /// The line's time, for those that have one.
    pub fn ts_ns(&self) -> Option<i64> {
        match self {
            Line::Header(h) => h.started_ns,
            Line::Alloc { event, .. }
            | Line::AllocFail { event, .. }
            | Line::State { event, .. }
            | Line::Release { event, .. }
            | Line::Lifecycle { event, .. } => Some(event.ts_ns),
            Line::Lost { ts_ns, .. } | Line::Summary { ts_ns, .. } | Line::Notice { ts_ns, .. } => Some(*ts_ns),
            Line::Pressure(p) => Some(p.ts_ns),
            Line::Other { .. } => None,
        }
    }
}

/// A line that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    /// The file.
    pub file: PathBuf,
    /// Its 1-based line number.
    pub line: u64,
    /// Why.
    pub reason: String,
}

/// One file read.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordingFile {
    /// As given or found.
    pub path: PathBuf,
    /// Whether it was zstd.
    pub compressed: bool,
    /// Lines read (good and bad).
    pub lines: u64,
    /// Its first header line.
    pub header: Option<Header>,
}

/// Everything read from a set of files.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recording {
    /// The files, in the order read (a rotated set oldest first).
    pub files: Vec<RecordingFile>,
    /// The good lines, in file order.
    pub lines: Vec<Line>,
    /// How many lines could not be read.
    pub bad_line_count: u64,
    /// The first [`MAX_LISTED_BAD_LINES`] of them.
    pub bad_lines: Vec<BadLine>,
    /// Things a person should know that are not bad lines (a compressed
    /// stream without its end mark).
    pub notes: Vec<String>,
}

impl Recording {
    fn bad(&mut self, file: &Path, line: u64, reason: String) {
        self.bad_line_count += 1;
        if self.bad_lines.len() < MAX_LISTED_BAD_LINES {
            self.bad_lines.push(BadLine { file: file.to_path_buf(), line, reason });
        }
    }
}

/// Parses an RFC 3339 UTC time (`Z` or `+00:00`, any fraction) into
/// nanoseconds since the Unix epoch.
pub fn parse_rfc3339_ns(text: &str) -> Result<i64, String> {
    let time = humantime::parse_rfc3339(text).map_err(|e| format!("'{text}' is not an RFC 3339 time ({e})"))?;
    system_time_ns(time).ok_or_else(|| format!("'{text}' is out of range"))
}

/// A `SystemTime` as nanoseconds since the epoch, if representable.
pub fn system_time_ns(time: SystemTime) -> Option<i64> {
    let since = time.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(since.as_nanos()).ok()
}

/// Nanoseconds since the epoch as RFC 3339 UTC with nanoseconds.
pub fn format_rfc3339_ns(ns: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_nanos(time).to_string()
}

/// Interns repeated strings so that millions of lines share them.
#[derive(Default)]
pub struct LineParser {
    names: HashSet<Name>,
}

#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct RawHeader {
    schema: u64,
    version: Option<String>,
    kernel: Option<String>,
    backend: Option<String>,
    ephemeral_range: Option<[u16; 2]>,
    netns: Option<u32>,
    started: Option<String>,
}

#[derive(Deserialize)]
struct RawPort<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(borrow)]
    proto: Cow<'a, str>,
    #[serde(borrow)]
    family: Cow<'a, str>,
    laddr: IpAddr,
    lport: u16,
    #[serde(default)]
    raddr: Option<IpAddr>,
    #[serde(default)]
    rport: Option<u16>,
    pid: u32,
    #[serde(borrow)]
    comm: Cow<'a, str>,
    netns: u32,
    #[serde(default)]
    cgroup: u64,
    sock: u64,
    #[serde(default, borrow)]
    origin: Option<Cow<'a, str>>,
    #[serde(default)]
    ephemeral: Option<bool>,
    #[serde(default, borrow)]
    errno: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    old: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    new: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(default)]
    held_ns: Option<u64>,
    #[serde(default, borrow)]
    started: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawLost<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    count: u64,
}

#[derive(Deserialize)]
struct RawSummary<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(default)]
    duration_s: Option<f64>,
}

#[derive(Deserialize)]
struct RawPressure<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(default)]
    raddr: Option<String>,
    #[serde(default)]
    rport: Option<u16>,
    #[serde(default)]
    used: Option<u64>,
    #[serde(default)]
    capacity: Option<u64>,
    #[serde(default)]
    ratio: Option<f64>,
}

#[derive(Deserialize)]
struct RawNotice<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(default, borrow)]
    kind: Option<Cow<'a, str>>,
}

fn json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("invalid {}: {e}", if e.is_data() { "record" } else { "JSON" }))
}

impl LineParser {
    /// A parser with an empty string table.
    pub fn new() -> Self {
        Self::default()
    }

    fn name(&mut self, text: &str) -> Name {
        if let Some(name) = self.names.get(text) {
            return name.clone();
        }
        let name: Name = Arc::from(text);
        self.names.insert(name.clone());
        name
    }

    /// Parses one line (without its newline).
    pub fn parse(&mut self, bytes: &[u8]) -> Result<Line, String> {
        let kind = json::<TypeOnly>(bytes)?.kind;
        Ok(match kind.as_ref() {
            "header" => {
                let raw: RawHeader = json(bytes)?;
                let started_ns = raw.started.as_deref().map(parse_rfc3339_ns).transpose()?;
                Line::Header(Header {
                    schema: raw.schema,
                    version: raw.version,
                    kernel: raw.kernel,
                    backend: raw.backend,
                    ephemeral_range: raw.ephemeral_range,
                    netns: raw.netns,
                    started_ns,
                })
            }
            "alloc" | "alloc_fail" | "state" | "release" | "lifecycle" => self.port_line(&kind, bytes)?,
            "lost" => {
                let raw: RawLost = json(bytes)?;
                Line::Lost { ts_ns: parse_rfc3339_ns(&raw.ts)?, count: raw.count }
            }
            "summary" => {
                let raw: RawSummary = json(bytes)?;
                Line::Summary { ts_ns: parse_rfc3339_ns(&raw.ts)?, duration_s: raw.duration_s }
            }
            "pressure" => {
                let raw: RawPressure = json(bytes)?;
                Line::Pressure(Pressure {
                    ts_ns: parse_rfc3339_ns(&raw.ts)?,
                    raddr: raw.raddr,
                    rport: raw.rport,
                    used: raw.used,
                    capacity: raw.capacity,
                    ratio: raw.ratio.filter(|r| r.is_finite()),
                })
            }
            "notice" => {
                let raw: RawNotice = json(bytes)?;
                let kind = self.name(raw.kind.as_deref().unwrap_or("unknown"));
                Line::Notice { ts_ns: parse_rfc3339_ns(&raw.ts)?, kind }
            }
            other => Line::Other { kind: other.chars().take(64).collect() },
        })
    }

    fn port_line(&mut self, kind: &str, bytes: &[u8]) -> Result<Line, String> {
        let raw: RawPort = json(bytes)?;
        let proto = match raw.proto.as_ref() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => return Err(format!("unknown proto '{other}'")),
        };
        let family = match raw.family.as_ref() {
            "ipv4" => Family::Ipv4,
            "ipv6" => Family::Ipv6,
            other => return Err(format!("unknown family '{other}'")),
        };
        let event = PortEvent {
            ts_ns: parse_rfc3339_ns(&raw.ts)?,
            port: Port {
                proto,
                family,
                laddr: raw.laddr,
                lport: raw.lport,
                raddr: raw.raddr,
                rport: raw.rport,
                pid: raw.pid,
                comm: self.name(&raw.comm),
                netns: raw.netns,
                cgroup: raw.cgroup,
                sock: raw.sock,
            },
        };
        let mut required = |field: Option<Cow<str>>, what: &str| -> Result<Name, String> {
            match field {
                Some(value) => Ok(self.name(&value)),
                None => Err(format!("{kind} record without '{what}'")),
            }
        };
        Ok(match kind {
            "alloc" => Line::Alloc {
                event,
                origin: required(raw.origin, "origin")?,
                ephemeral: raw.ephemeral.ok_or("alloc record without 'ephemeral'")?,
            },
            "alloc_fail" => {
                Line::AllocFail { event, errno: required(raw.errno, "errno")?, origin: required(raw.origin, "origin")? }
            }
            "state" => Line::State { event, old: required(raw.old, "old")?, new: required(raw.new, "new")? },
            "release" => Line::Release { event, reason: required(raw.reason, "reason")?, held_ns: raw.held_ns },
            _ => {
                let reason = required(raw.reason, "reason")?;
                let started_ns = raw.started.as_deref().map(parse_rfc3339_ns).transpose()?;
                Line::Lifecycle {
                    event,
                    reason,
                    held_ns: raw.held_ns,
                    origin: raw.origin.map(|o| self.name(&o)),
                    ephemeral: raw.ephemeral,
                    started_ns,
                }
            }
        })
    }
}

/// The files to read for `paths`, in order: each given file preceded by its
/// rotated parts oldest first; each file once.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ReportError> {
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for given in paths {
        let mut set: Vec<PathBuf> = rotated_parts(given).into_iter().rev().map(|(_, p)| p).collect();
        set.push(given.clone());
        for path in set {
            let meta = std::fs::metadata(&path).map_err(|source| ReportError::Io { path: path.clone(), source })?;
            if meta.is_dir() {
                return Err(ReportError::Io { path, source: io::Error::other("is a directory, not a recording") });
            }
            if seen.insert((meta.dev(), meta.ino())) {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// Reads recordings: each of `paths` with its rotated parts (oldest first),
/// plain or zstd (recognised by content), skipping lines that cannot be
/// read. Fails only when a file cannot be opened or read, or announces a
/// newer schema.
pub fn read_recordings(paths: &[PathBuf]) -> Result<Recording, ReportError> {
    let mut recording = Recording::default();
    let mut parser = LineParser::new();
    for path in expand_paths(paths)? {
        read_file(&path, &mut parser, &mut recording)?;
    }
    Ok(recording)
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A zstd decoder that stops at its first error instead of failing the
/// file, keeping the error for the report.
struct Tolerant<R> {
    inner: R,
    error: Option<io::Error>,
}

impl<R: Read> Read for Tolerant<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.error.is_some() {
            return Ok(0);
        }
        loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.error = Some(e);
                    return Ok(0);
                }
                Ok(n) => return Ok(n),
            }
        }
    }
}

/// Reads the next line into `buf` (without its newline): `None` at the end,
/// else whether it was complete (newline-terminated) and whether it was too
/// long (then `buf` is empty).
fn next_line<R: BufRead>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<(bool, bool)>> {
    buf.clear();
    let mut any = false;
    let mut too_long = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(any.then_some((false, too_long)));
        }
        any = true;
        let (data, used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], end + 1, true),
            None => (available, available.len(), false),
        };
        if !too_long {
            if buf.len() + data.len() > MAX_LINE_BYTES {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(data);
            }
        }
        reader.consume(used);
        if done {
            return Ok(Some((true, too_long)));
        }
    }
}

fn read_file(path: &Path, parser: &mut LineParser, recording: &mut Recording) -> Result<(), ReportError> {
    let io_err = |source| ReportError::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io_err)?;
    let mut magic = Vec::with_capacity(4);
    (&mut file).take(4).read_to_end(&mut magic).map_err(io_err)?;
    let compressed = magic == ZSTD_MAGIC;
    let source = io::Cursor::new(magic).chain(file);
    let mut info = RecordingFile { path: path.to_path_buf(), compressed, lines: 0, header: None };
    let stream_error = if compressed {
        let decoder = zstd::stream::read::Decoder::new(source).map_err(io_err)?;
        let mut reader = BufReader::with_capacity(256 * 1024, Tolerant { inner: decoder, error: None });
        read_lines(path, &mut reader, parser, recording, &mut info)?;
        reader.into_inner().error
    } else {
        let mut reader = BufReader::with_capacity(256 * 1024, source);
        read_lines(path, &mut reader, parser, recording, &mut info)?;
        None
    };
    match stream_error {
        Some(e) if e.kind() == io::ErrorKind::UnexpectedEof => recording.notes.push(format!(
            "{}: the compressed stream ends without its end mark (the recorder did not exit cleanly); \
             everything it had flushed was read",
            path.display()
        )),
        Some(e) => {
            info.lines += 1;
            recording.bad(
                path,
                info.lines,
                format!("compressed data is corrupt from here on ({e}); the rest is unreadable"),
            );
        }
        None => {}
    }
    recording.files.push(info);
    Ok(())
}

fn read_lines<R: BufRead>(
    path: &Path,
    reader: &mut R,
    parser: &mut LineParser,
    recording: &mut Recording,
    info: &mut RecordingFile,
) -> Result<(), ReportError> {
    let mut buf = Vec::with_capacity(1024);
    while let Some((complete, too_long)) =
        next_line(reader, &mut buf).map_err(|source| ReportError::Io { path: path.to_path_buf(), source })?
    {
        info.lines += 1;
        let number = info.lines;
        if too_long {
            recording.bad(path, number, format!("line longer than {MAX_LINE_BYTES} bytes"));
            continue;
        }
        let text = buf.strip_suffix(b"\r").unwrap_or(&buf);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parser.parse(text) {
            Ok(Line::Header(header)) => {
                if header.schema > u64::from(SCHEMA_VERSION) {
                    return Err(ReportError::SchemaTooNew {
                        path: path.to_path_buf(),
                        found: header.schema,
                        supported: SCHEMA_VERSION,
                    });
                }
                if info.header.is_none() {
                    info.header = Some(header.clone());
                }
                recording.lines.push(Line::Header(header));
            }
            Ok(line) => recording.lines.push(line),
            Err(_) if !complete => {
                recording.bad(path, number, "incomplete last line (the recorder stopped while writing it)".into())
            }
            Err(reason) => recording.bad(path, number, reason),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;

    pub(crate) const HEADER: &str = r#"{"type":"header","schema":1,"tool":"port-trace","version":"0.1.0","kernel":"6.18.44","backend":"portable","hooks":[],"ephemeral_range":[32768,60999],"netns":null,"started":"2026-11-26T06:40:00.000000000Z"}"#;

    /// An event line with the exact shape `output.rs` writes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn event(
        kind: &str,
        ts: &str,
        proto: &str,
        lport: u16,
        remote: Option<(&str, u16)>,
        pid: u32,
        comm: &str,
        sock: u64,
        extra: &str,
    ) -> String {
        let (raddr, rport) = match remote {
            Some((a, p)) => (format!("\"{a}\""), p.to_string()),
            None => ("null".into(), "null".into()),
        };
        format!(
            r#"{{"type":"{kind}","ts":"{ts}","proto":"{proto}","family":"ipv4","laddr":"127.0.0.1","lport":{lport},"raddr":{raddr},"rport":{rport},"pid":{pid},"comm":"{comm}","netns":4026531840,"cgroup":1,"sock":{sock}{extra}}}"#
        )
    }

    fn sample() -> Vec<String> {
        vec![
            HEADER.to_string(),
            event(
                "alloc",
                "2026-11-26T06:40:01.000000000Z",
                "tcp",
                40000,
                Some(("10.0.0.1", 443)),
                7,
                "curl",
                1,
                r#","origin":"connect","ephemeral":true"#,
            ),
            event(
                "state",
                "2026-11-26T06:40:01.500000000Z",
                "tcp",
                40000,
                Some(("10.0.0.1", 443)),
                7,
                "curl",
                1,
                r#","old":"SYN_SENT","new":"ESTABLISHED""#,
            ),
            event(
                "release",
                "2026-11-26T06:40:03.000000000Z",
                "tcp",
                40000,
                Some(("10.0.0.1", 443)),
                7,
                "curl",
                1,
                r#","reason":"close","held_ns":2000000000"#,
            ),
            r#"{"type":"lost","ts":"2026-11-26T06:40:04.000000000Z","count":3}"#.to_string(),
        ]
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn zstd_bytes(text: &str) -> Vec<u8> {
        zstd::stream::encode_all(text.as_bytes(), 3).unwrap()
    }

    #[test]
    fn parses_every_known_type() {
        let mut parser = LineParser::new();
        let lines: Vec<Line> = sample().iter().map(|l| parser.parse(l.as_bytes()).unwrap()).collect();
        let Line::Header(h) = &lines[0] else { panic!("{:?}", lines[0]) };
        assert_eq!(h.schema, 1);
        assert_eq!(h.ephemeral_range, Some([32768, 60999]));
        assert_eq!(h.started_ns, Some(1_795_675_200_000_000_000));
        let Line::Alloc { event: alloc, origin, ephemeral } = &lines[1] else { panic!() };
        assert_eq!(alloc.ts_ns, 1_795_675_201_000_000_000);
        assert_eq!(alloc.port.comm.as_ref(), "curl");
        assert_eq!(alloc.port.raddr, Some("10.0.0.1".parse().unwrap()));
        assert_eq!((origin.as_ref(), *ephemeral), ("connect", true));
        assert!(matches!(&lines[2], Line::State { new, .. } if new.as_ref() == "ESTABLISHED"));
        assert!(matches!(&lines[3], Line::Release { held_ns: Some(2_000_000_000), .. }));
        assert_eq!(lines[4], Line::Lost { ts_ns: 1_795_675_204_000_000_000, count: 3 });
        // Interned: the same command name is one allocation.
        let (Line::Alloc { event: a, .. }, Line::Release { event: r, .. }) = (&lines[1], &lines[3]) else { panic!() };
        assert!(Arc::ptr_eq(&a.port.comm, &r.port.comm));

        let fail = event(
            "alloc_fail",
            "2026-11-26T06:40:01Z",
            "udp",
            0,
            None,
            1,
            "x",
            2,
            r#","errno":"EAGAIN","origin":"autobind""#,
        );
        assert!(
            matches!(parser.parse(fail.as_bytes()).unwrap(), Line::AllocFail { errno, .. } if errno.as_ref() == "EAGAIN")
        );
        let life = event(
            "lifecycle",
            "2026-11-26T06:40:02Z",
            "tcp",
            5,
            None,
            1,
            "x",
            2,
            r#","reason":"close","held_ns":null,"started":"2026-11-26T06:40:01Z","origin":"bind","ephemeral":false"#,
        );
        assert!(matches!(
            parser.parse(life.as_bytes()).unwrap(),
            Line::Lifecycle { started_ns: Some(1_795_675_201_000_000_000), held_ns: None, ephemeral: Some(false), .. }
        ));
        let pressure = r#"{"type":"pressure","ts":"2026-11-26T06:40:02Z","raddr":"10.0.0.1","rport":443,"laddr":"0.0.0.0","used":900,"capacity":1000,"ratio":0.9,"exhaust_in_s":null}"#;
        assert!(matches!(parser.parse(pressure.as_bytes()).unwrap(), Line::Pressure(p) if p.used == Some(900)));
        let notice = r#"{"type":"notice","ts":"2026-11-26T06:40:02Z","kind":"ephemeral_listener","lport":40000}"#;
        assert!(
            matches!(parser.parse(notice.as_bytes()).unwrap(), Line::Notice { kind, .. } if kind.as_ref() == "ephemeral_listener")
        );
        let summary =
            r#"{"type":"summary","ts":"2026-11-26T06:40:09Z","duration_s":9.0,"counts":{"alloc":1},"lost":3}"#;
        assert!(
            matches!(parser.parse(summary.as_bytes()).unwrap(), Line::Summary { duration_s: Some(d), .. } if d == 9.0)
        );
        assert_eq!(
            parser.parse(br#"{"type":"future_thing","x":1}"#).unwrap(),
            Line::Other { kind: "future_thing".into() }
        );
    }

    #[test]
    fn rejects_malformed_records_with_reasons() {
        let mut parser = LineParser::new();
        assert!(parser.parse(b"not json").unwrap_err().contains("invalid JSON"));
        assert!(parser.parse(b"[1,2]").is_err());
        assert!(parser.parse(br#"{"no":"type"}"#).is_err());
        let bad_proto = sample()[1].replace("\"tcp\"", "\"sctp\"");
        assert!(parser.parse(bad_proto.as_bytes()).unwrap_err().contains("sctp"));
        let no_origin = sample()[1].replace(r#","origin":"connect""#, "");
        assert!(parser.parse(no_origin.as_bytes()).unwrap_err().contains("origin"));
        let bad_ts = sample()[1].replace("2026-11-26T06:40:01.000000000Z", "yesterday");
        assert!(parser.parse(bad_ts.as_bytes()).unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn reads_plain_and_zstd_alike() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample().join("\n") + "\n";
        let plain = write(dir.path(), "a.jsonl", &text);
        let packed = dir.path().join("b.jsonl.zst");
        fs::write(&packed, zstd_bytes(&text)).unwrap();
        let a = read_recordings(std::slice::from_ref(&plain)).unwrap();
        let b = read_recordings(std::slice::from_ref(&packed)).unwrap();
        assert_eq!(a.lines.len(), 5);
        assert_eq!(a.lines, b.lines);
        assert!(!a.files[0].compressed && b.files[0].compressed);
        assert_eq!(a.bad_line_count + b.bad_line_count, 0);
        assert!(a.notes.is_empty() && b.notes.is_empty());
    }

    #[test]
    fn torn_and_corrupt_lines_are_counted_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = sample();
        lines.insert(2, "{\"type\":\"alloc\",garbage".into());
        lines.insert(3, String::new());
        let mut text = lines.join("\n") + "\n";
        let torn = &sample()[3];
        text.push_str(&torn[..torn.len() / 2]);
        let path = write(dir.path(), "r.jsonl", &text);
        let rec = read_recordings(std::slice::from_ref(&path)).unwrap();
        assert_eq!(rec.lines.len(), 5);
        assert_eq!(rec.bad_line_count, 2);
        assert_eq!(rec.bad_lines[0].line, 3);
        assert!(rec.bad_lines[0].reason.contains("invalid JSON"), "{}", rec.bad_lines[0].reason);
        assert_eq!(rec.bad_lines[1].line, 8);
        assert!(rec.bad_lines[1].reason.contains("incomplete last line"));
        assert_eq!(rec.files[0].lines, 8);
    }

    #[test]
    fn complete_last_line_without_newline_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "r.jsonl", &sample().join("\n"));
        let rec = read_recordings(&[path]).unwrap();
        assert_eq!((rec.lines.len(), rec.bad_line_count), (5, 0));
    }

    #[test]
    fn killed_zstd_writer_yields_what_was_flushed_plus_one_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl.zst");
        let mut encoder = zstd::stream::write::Encoder::new(fs::File::create(&path).unwrap(), 3).unwrap();
        for line in sample() {
            writeln!(encoder, "{line}").unwrap();
        }
        encoder.flush().unwrap();
        // Half a line, flushed, then SIGKILL: no frame end.
        encoder.write_all(&sample()[1].as_bytes()[..40]).unwrap();
        encoder.flush().unwrap();
        std::mem::forget(encoder);
        let rec = read_recordings(&[path]).unwrap();
        assert_eq!(rec.lines.len(), 5);
        assert_eq!(rec.bad_line_count, 1);
        assert!(rec.bad_lines[0].reason.contains("incomplete"));
        assert_eq!(rec.notes.len(), 1);
        assert!(rec.notes[0].contains("end mark"));
    }

    #[test]
    fn truncated_and_corrupt_zstd_never_fail_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample().join("\n") + "\n";
        let packed = zstd_bytes(&text);
        for cut in [5, packed.len() / 2, packed.len() - 1] {
            let path = dir.path().join(format!("cut{cut}.zst"));
            fs::write(&path, &packed[..cut]).unwrap();
            let rec = read_recordings(&[path]).unwrap();
            assert!(rec.bad_line_count <= 1, "cut {cut}: {:?}", rec.bad_lines);
            assert!(rec.lines.len() <= 5);
        }
        let mut corrupt = packed.clone();
        corrupt[4] ^= 0xff; // frame header descriptor
        let path = dir.path().join("corrupt.zst");
        fs::write(&path, &corrupt).unwrap();
        let rec = read_recordings(&[path]).unwrap();
        assert_eq!(rec.bad_line_count, 1);
        assert!(rec.bad_lines[0].reason.contains("corrupt"), "{:?}", rec.bad_lines);
    }

    #[test]
    fn newer_schema_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "new.jsonl", &HEADER.replace("\"schema\":1", "\"schema\":7"));
        let err = read_recordings(&[path]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("new.jsonl: schema 7 is newer than this port-trace reads (1); upgrade port-trace"),
            "{text}"
        );
    }

    #[test]
    fn missing_file_and_directory_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_recordings(&[dir.path().join("absent")]).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
        assert!(read_recordings(&[dir.path().to_path_buf()]).unwrap_err().to_string().contains("directory"));
    }

    #[test]
    fn rotated_sets_are_read_oldest_first_once() {
        let dir = tempfile::tempdir().unwrap();
        let line = |n: u64| format!(r#"{{"type":"lost","ts":"2026-11-26T06:40:0{n}Z","count":{n}}}"#);
        let base = write(dir.path(), "rec.jsonl", &format!("{HEADER}\n{}\n", line(3)));
        write(dir.path(), "rec.jsonl.1", &format!("{HEADER}\n{}\n", line(2)));
        write(dir.path(), "rec.jsonl.2", &format!("{HEADER}\n{}\n", line(1)));
        let counts = |rec: &Recording| -> Vec<u64> {
            rec.lines
                .iter()
                .filter_map(|l| if let Line::Lost { count, .. } = l { Some(*count) } else { None })
                .collect()
        };
        let rec = read_recordings(std::slice::from_ref(&base)).unwrap();
        assert_eq!(counts(&rec), vec![1, 2, 3]);
        assert_eq!(rec.files.len(), 3);
        assert!(rec.files.iter().all(|f| f.header.is_some()));
        // Parts given explicitly (a shell glob) are not read twice.
        let glob = vec![base.clone(), dir.path().join("rec.jsonl.1"), dir.path().join("rec.jsonl.2")];
        assert_eq!(counts(&read_recordings(&glob).unwrap()), vec![1, 2, 3]);
        // A compressed set.
        let zbase = dir.path().join("z.jsonl.zst");
        fs::write(&zbase, zstd_bytes(&format!("{HEADER}\n{}\n", line(5)))).unwrap();
        fs::write(dir.path().join("z.jsonl.1.zst"), zstd_bytes(&format!("{HEADER}\n{}\n", line(4)))).unwrap();
        assert_eq!(counts(&read_recordings(&[zbase]).unwrap()), vec![4, 5]);
    }

    #[test]
    fn overlong_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let long = "x".repeat(MAX_LINE_BYTES + 10);
        let path = write(dir.path(), "r", &format!("{long}\n{}\n", sample()[4]));
        let rec = read_recordings(&[path]).unwrap();
        assert_eq!((rec.lines.len(), rec.bad_line_count), (1, 1));
        assert!(rec.bad_lines[0].reason.contains("longer"));
    }

    #[test]
    fn timestamps_round_trip() {
        let ns = parse_rfc3339_ns("2026-11-26T06:40:00.123456789Z").unwrap();
        assert_eq!(ns % 1_000_000_000, 123_456_789);
        assert_eq!(format_rfc3339_ns(ns), "2026-11-26T06:40:00.123456789Z");
        assert!(parse_rfc3339_ns("2026-11-26").is_err());
    }

    fn read_bytes(bytes: &[u8]) -> Result<Recording, ReportError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz");
        fs::write(&path, bytes).unwrap();
        read_recordings(&[path])
    }

    fn acceptable(result: Result<Recording, ReportError>) -> Result<(), TestCaseError> {
        match result {
            Ok(rec) => {
                prop_assert!(rec.bad_lines.len() as u64 <= rec.bad_line_count);
                Ok(())
            }
            Err(ReportError::SchemaTooNew { .. }) => Ok(()),
            Err(e) => Err(TestCaseError::fail(format!("unexpected error {e}"))),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            acceptable(read_bytes(&bytes))?;
        }

        #[test]
        fn random_bytes_after_zstd_magic_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut data = ZSTD_MAGIC.to_vec();
            data.extend(bytes);
            acceptable(read_bytes(&data))?;
        }

        #[test]
        fn mutated_recordings_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..20),
            compress in any::<bool>(),
        ) {
            let text = sample().join("\n") + "\n";
            let mut data = if compress { zstd_bytes(&text) } else { text.into_bytes() };
            for (at, byte) in edits {
                let i = at.index(data.len());
                data[i] = byte;
            }
            acceptable(read_bytes(&data))?;
        }

        #[test]
        fn truncated_recordings_keep_every_whole_line(cut in 0usize..2000) {
            let text = sample().join("\n") + "\n";
            let cut = cut.min(text.len());
            let rec = read_bytes(&text.as_bytes()[..cut]).unwrap();
            let whole = text[..cut].matches('\n').count();
            prop_assert!(rec.lines.len() >= whole);
            prop_assert!(rec.bad_line_count <= 1);
        }
    }
}
