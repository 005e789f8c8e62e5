//! Record files (`port-trace record`): JSON Lines written to a private file,
//! optionally zstd-compressed and rotated by size.
//!
//! - The file is created mode 0600 with `O_CREAT|O_EXCL|O_NOFOLLOW`; with
//!   `--force` an existing *regular* file is truncated instead, but a
//!   symbolic link is never followed.
//! - A name ending in `.zst` means zstd. Every [`Write::flush`] ends a zstd
//!   block (`ZSTD_e_flush`), so a reader decodes everything flushed so far
//!   even when the recorder is killed with SIGKILL and the frame never ends.
//! - Rotation: once the current file holds `rotate_size` bytes (uncompressed),
//!   the next line boundary closes it and shifts the set: `FILE.1` is the
//!   newest older part, `FILE.<rotate_count - 1>` the oldest; older ones are
//!   deleted. `rotate_count` counts every file kept, the live one included.
//!   For compressed files the number goes before the suffix, so every part
//!   keeps it: `rec.jsonl.zst` → `rec.jsonl.1.zst`, `rec.jsonl.2.zst`, ...
//!   ([`part_path`]). Each file starts with the same header line, so each
//!   part reads on its own. A rotating recording that finds the live file of
//!   an earlier run (a restarted recorder) rotates it away first: nothing
//!   recorded before a crash is overwritten, and `--force` is not needed.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Files kept by default when rotating (the live one included).
pub const DEFAULT_ROTATE_COUNT: usize = 5;

/// zstd compression level: fast, and still ~10x on JSON Lines.
const ZSTD_LEVEL: i32 = 3;

/// How to create a record file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordFileOptions {
    /// The file; a name ending in `.zst` means zstd compression.
    pub path: PathBuf,
    /// Truncate an existing regular file (and remove rotated parts of an
    /// earlier recording) instead of refusing.
    pub force: bool,
    /// Rotate once the live file holds this many bytes (uncompressed).
    pub rotate_size: Option<u64>,
    /// Files kept when rotating, the live one included (at least 1).
    pub rotate_count: usize,
}

impl RecordFileOptions {
    /// Options for `path`: no `--force`, no rotation.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), force: false, rotate_size: None, rotate_count: DEFAULT_ROTATE_COUNT }
    }
}

/// Why a record (or report) file could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RecordFileError {
    /// The file exists and `--force` was not given.
    #[error("cannot create {}: the file exists (use --force to overwrite it)", .path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The path is a symbolic link.
    #[error("cannot create {}: it is a symbolic link, and port-trace never writes through one (--force or not)", .path.display())]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// The path exists and is not a regular file (a directory, a FIFO, ...).
    #[error("cannot create {}: it exists and is not a regular file", .path.display())]
    NotRegular {
        /// The path.
        path: PathBuf,
    },
    /// A rotated part of an earlier recording is in the way: a reader given
    /// the file would take it for part of the new recording.
    #[error("cannot create {}: {} (a rotated part of an earlier recording) exists (use --force to remove it)", .path.display(), .part.display())]
    StalePart {
        /// The file to create.
        path: PathBuf,
        /// The part found.
        part: PathBuf,
    },
    /// The options make no sense.
    #[error("{0}")]
    Invalid(String),
    /// Any other failure of the system.
    #[error("cannot create {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
}

impl RecordFileError {
    /// Whether this is the caller's mistake (exit 2) rather than a failure
    /// of the system (exit 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, RecordFileError::Io { .. })
    }
}

/// Creates `path` for writing, mode 0600, never through a symbolic link.
/// Without `force` the file must not exist (`O_EXCL`); with it an existing
/// regular file is truncated and its mode set to 0600.
pub fn create_private_file(path: &Path, force: bool) -> Result<File, RecordFileError> {
    let io_err = |source| RecordFileError::Io { path: path.to_path_buf(), source };
    // A nicer message than EEXIST/ELOOP for the common case; the open below
    // is what actually refuses (no race matters: O_NOFOLLOW decides).
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(RecordFileError::Symlink { path: path.to_path_buf() });
    }
    let mut options = OpenOptions::new();
    // O_NONBLOCK: opening a FIFO for writing would otherwise wait for a
    // reader; it is refused below as not a regular file.
    options.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    if force {
        options.create(true);
    } else {
        options.create_new(true);
    }
    let file = options.open(path).map_err(|e| match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::AlreadyExists, _) => RecordFileError::Exists { path: path.to_path_buf() },
        (_, Some(libc::ELOOP)) => RecordFileError::Symlink { path: path.to_path_buf() },
        (_, Some(libc::ENXIO)) | (_, Some(libc::EISDIR)) => RecordFileError::NotRegular { path: path.to_path_buf() },
        _ => io_err(e),
    })?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.file_type().is_file() {
        return Err(RecordFileError::NotRegular { path: path.to_path_buf() });
    }
    // Back to blocking mode (meaningless for regular files, but tidy).
    // SAFETY: a valid open descriptor; F_GETFL/F_SETFL take no pointers.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    if force {
        file.set_len(0).map_err(io_err)?;
        if meta.permissions().mode() & 0o7777 != 0o600 {
            file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        }
    }
    Ok(file)
}

/// Whether a name means zstd compression (ends in `.zst`).
pub fn is_zstd_path(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.as_bytes().ends_with(b".zst") && n.len() > 4)
}

/// The name of rotated part `n` (1 = newest) of `base`: `FILE.n`, or
/// `STEM.n.zst` for `STEM.zst`.
pub fn part_path(base: &Path, n: u64) -> PathBuf {
    let name = base.file_name().map(OsStr::as_bytes).unwrap_or_default();
    let mut part = Vec::with_capacity(name.len() + 8);
    if is_zstd_path(base) {
        part.extend_from_slice(&name[..name.len() - 4]);
        part.extend_from_slice(format!(".{n}.zst").as_bytes());
    } else {
        part.extend_from_slice(name);
        part.extend_from_slice(format!(".{n}").as_bytes());
    }
    match base.file_name() {
        Some(_) => base.with_file_name(OsString::from_vec(part)),
        None => {
            let mut whole = base.as_os_str().to_os_string();
            whole.push(format!(".{n}"));
            PathBuf::from(whole)
        }
    }
}

/// Which rotated part of `base` the file name `candidate` is, if any.
fn part_number(base_name: &[u8], zstd: bool, candidate: &[u8]) -> Option<u64> {
    let (stem, suffix): (&[u8], &[u8]) =
        if zstd { (&base_name[..base_name.len() - 4], b".zst") } else { (base_name, b"") };
    let rest = candidate.strip_prefix(stem)?.strip_prefix(b".")?.strip_suffix(suffix)?;
    if rest.is_empty() || rest.len() > 9 || !rest.iter().all(u8::is_ascii_digit) || rest[0] == b'0' {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// The rotated parts of `base` that exist, newest (1) first. Unreadable
/// directories yield none.
pub fn rotated_parts(base: &Path) -> Vec<(u64, PathBuf)> {
    let Some(name) = base.file_name() else { return Vec::new() };
    let dir = match base.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let zstd = is_zstd_path(base);
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut parts: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = part_number(name.as_bytes(), zstd, e.file_name().as_bytes())?;
            Some((n, base.with_file_name(e.file_name())))
        })
        .collect();
    parts.sort();
    parts
}

/// Where bytes go: the file, or a zstd encoder over it.
enum Sink {
    Plain(File),
    Zstd(zstd::stream::write::Encoder<'static, File>),
}

impl Sink {
    fn new(file: File, compressed: bool) -> io::Result<Self> {
        Ok(if compressed {
            Sink::Zstd(zstd::stream::write::Encoder::new(file, ZSTD_LEVEL)?)
        } else {
            Sink::Plain(file)
        })
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(f) => f.write_all(buf),
            Sink::Zstd(z) => z.write_all(buf),
        }
    }

    /// Plain: nothing is buffered. zstd: `ZSTD_e_flush` ends the current
    /// block and writes it out, so everything so far is decodable.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(f) => f.flush(),
            Sink::Zstd(z) => z.flush(),
        }
    }

    /// Ends the zstd frame; closes the file.
    fn finish(self) -> io::Result<()> {
        match self {
            Sink::Plain(mut f) => f.flush(),
            Sink::Zstd(z) => z.finish()?.flush(),
        }
    }
}

/// A record file being written: [`Write`] whole or partial lines into it;
/// rotation happens only at line boundaries.
pub struct RecordWriter {
    path: PathBuf,
    compressed: bool,
    rotate_size: Option<u64>,
    rotate_count: usize,
    /// The line each file starts with; `None` until given or captured.
    header: Option<Vec<u8>>,
    /// The first line written so far, while it is taken as the header.
    capturing: Option<Vec<u8>>,
    sink: Option<Sink>,
    /// Uncompressed bytes in the live file, header included.
    written: u64,
    /// Of those, bytes after the header.
    body: u64,
    at_line_start: bool,
    rotations: u64,
}

impl RecordWriter {
    /// Creates the record file (see the module docs for the rules).
    pub fn create(opts: &RecordFileOptions) -> Result<Self, RecordFileError> {
        if opts.rotate_count == 0 {
            return Err(RecordFileError::Invalid("the rotation count must be at least 1 (the live file)".into()));
        }
        if opts.rotate_size == Some(0) {
            return Err(RecordFileError::Invalid("the rotation size must be more than 0 bytes".into()));
        }
        // A rotating recording that finds its live file from an earlier run
        // (a restart after a crash or an OOM kill: the evidence) rotates it
        // away like any full file, instead of refusing or truncating it.
        let keep_earlier = opts.rotate_size.is_some() && !opts.force;
        if keep_earlier && fs::symlink_metadata(&opts.path).is_ok_and(|m| m.file_type().is_file()) {
            shift_parts(&opts.path, opts.rotate_count)
                .map_err(|source| RecordFileError::Io { path: opts.path.clone(), source })?;
        }
        let file = create_private_file(&opts.path, opts.force)?;
        let stale = if keep_earlier { Vec::new() } else { rotated_parts(&opts.path) };
        if let Some((_, part)) = stale.first() {
            if !opts.force {
                // Leave nothing behind: the new file is still empty.
                let _ = fs::remove_file(&opts.path);
                return Err(RecordFileError::StalePart { path: opts.path.clone(), part: part.clone() });
            }
            for (_, part) in &stale {
                // unlink never follows a link: only the name goes.
                fs::remove_file(part).map_err(|source| RecordFileError::Io { path: part.clone(), source })?;
            }
        }
        let compressed = is_zstd_path(&opts.path);
        let sink =
            Sink::new(file, compressed).map_err(|source| RecordFileError::Io { path: opts.path.clone(), source })?;
        Ok(Self {
            path: opts.path.clone(),
            compressed,
            rotate_size: opts.rotate_size,
            rotate_count: opts.rotate_count,
            header: None,
            capturing: Some(Vec::new()),
            sink: Some(sink),
            written: 0,
            body: 0,
            at_line_start: true,
            rotations: 0,
        })
    }

    /// Sets the header line every file starts with, and writes it now if
    /// nothing was written yet. Without it, the first line written is taken
    /// as the header (so a caller that writes the header line itself first
    /// needs no call).
    pub fn with_header(mut self, mut header: Vec<u8>) -> io::Result<Self> {
        if header.last() != Some(&b'\n') {
            header.push(b'\n');
        }
        self.capturing = None;
        if self.written == 0 {
            self.sink_mut()?.write_all(&header)?;
            self.written = header.len() as u64;
        }
        self.header = Some(header);
        Ok(self)
    }

    /// The live file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times the file was rotated.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Ends the zstd frame and closes the file (dropping does the same,
    /// ignoring errors).
    pub fn finish(mut self) -> io::Result<()> {
        match self.sink.take() {
            Some(sink) => sink.finish(),
            None => Ok(()),
        }
    }

    fn sink_mut(&mut self) -> io::Result<&mut Sink> {
        self.sink
            .as_mut()
            .ok_or_else(|| io::Error::other(format!("{}: closed after a failed rotation", self.path.display())))
    }

    fn rotation_due(&self) -> bool {
        self.rotate_size.is_some_and(|size| self.written >= size && self.body > 0)
    }

    /// Closes the live file, shifts the parts, and starts a new file with
    /// the header.
    fn rotate(&mut self) -> io::Result<()> {
        let context = |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
        if let Some(sink) = self.sink.take() {
            sink.finish().map_err(context(format!("closing {}", self.path.display())))?;
        }
        shift_parts(&self.path, self.rotate_count)?;
        let file = create_private_file(&self.path, false).map_err(|e| io::Error::other(e.to_string()))?;
        let mut sink = Sink::new(file, self.compressed)?;
        let header = self.header.as_deref().unwrap_or_default();
        sink.write_all(header)?;
        self.sink = Some(sink);
        self.written = header.len() as u64;
        self.body = 0;
        self.at_line_start = true;
        self.rotations += 1;
        Ok(())
    }

    fn capture_header(&mut self, chunk: &[u8]) {
        let Some(line) = self.capturing.as_mut() else { return };
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                line.extend_from_slice(&chunk[..=end]);
                self.header = self.capturing.take();
            }
            None => line.extend_from_slice(chunk),
        }
    }
}

/// Moves the live file `path` to `path.1`, `.1` to `.2`, ..., deleting the
/// part that would exceed `count` files (the live one included; with a count
/// of 1 the live file itself is deleted).
fn shift_parts(path: &Path, count: usize) -> io::Result<()> {
    let context = |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let remove = |path: &Path| match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(context(format!("removing {}", path.display()))(e)),
        _ => Ok(()),
    };
    let rename = |from: &Path, to: &Path| match fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(context(format!("renaming {} to {}", from.display(), to.display()))(e))
        }
        _ => Ok(()),
    };
    if count <= 1 {
        return remove(path);
    }
    let oldest = (count - 1) as u64;
    remove(&part_path(path, oldest))?;
    for n in (1..oldest).rev() {
        rename(&part_path(path, n), &part_path(path, n + 1))?;
    }
    rename(path, &part_path(path, 1))
}

impl Write for RecordWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            if self.at_line_start && self.rotation_due() {
                self.rotate()?;
            }
            // Write up to the end of the line that reaches the size, so that
            // the next round rotates at its boundary.
            let len = match self.rotate_size {
                None => rest.len(),
                Some(size) => {
                    let need = usize::try_from(size.saturating_sub(self.written)).unwrap_or(usize::MAX).max(1);
                    let from = (need - 1).min(rest.len());
                    match rest[from..].iter().position(|&b| b == b'\n') {
                        Some(end) => from + end + 1,
                        None => rest.len(),
                    }
                }
            };
            let chunk = &rest[..len];
            self.capture_header(chunk);
            self.sink_mut()?.write_all(chunk)?;
            let header_len = self.header.as_ref().map_or(0, |h| h.len() as u64);
            self.written += len as u64;
            self.body = self.written.saturating_sub(header_len);
            self.at_line_start = chunk.last() == Some(&b'\n');
            rest = &rest[len..];
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink_mut()?.flush()
    }
}

impl Drop for RecordWriter {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            let _ = sink.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::symlink;

    use super::*;

    fn decompress(path: &Path) -> (Vec<u8>, Option<io::Error>) {
        let mut decoder = zstd::stream::read::Decoder::new(File::open(path).unwrap()).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match decoder.read(&mut buf) {
                Ok(0) => return (out, None),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_private_file_and_refuses_existing_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl");
        let mut w = RecordWriter::create(&RecordFileOptions::new(&path)).unwrap();
        w.write_all(b"{\"type\":\"header\"}\n").unwrap();
        w.finish().unwrap();
        assert_eq!(mode(&path), 0o600);
        let err = RecordWriter::create(&RecordFileOptions::new(&path)).err().unwrap();
        assert!(matches!(err, RecordFileError::Exists { .. }));
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(err.is_usage());
        assert_eq!(fs::read(&path).unwrap(), b"{\"type\":\"header\"}\n", "refusal must not touch the file");
    }

    #[test]
    fn force_truncates_a_regular_file_and_makes_it_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl");
        fs::write(&path, b"old content\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let mut w = RecordWriter::create(&RecordFileOptions { force: true, ..RecordFileOptions::new(&path) }).unwrap();
        w.write_all(b"new\n").unwrap();
        drop(w);
        assert_eq!(fs::read(&path).unwrap(), b"new\n");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn never_writes_through_a_symlink_even_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"precious\n").unwrap();
        let link = dir.path().join("rec.jsonl");
        symlink(&target, &link).unwrap();
        for force in [false, true] {
            let err =
                RecordWriter::create(&RecordFileOptions { force, ..RecordFileOptions::new(&link) }).err().unwrap();
            assert!(matches!(err, RecordFileError::Symlink { .. }), "{err}");
        }
        // A dangling link too: O_CREAT must not create its target.
        let dangling = dir.path().join("dangling");
        symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(RecordWriter::create(&RecordFileOptions { force: true, ..RecordFileOptions::new(&dangling) }).is_err());
        assert!(!dir.path().join("nowhere").exists());
        assert_eq!(fs::read(&target).unwrap(), b"precious\n");
    }

    #[test]
    fn refuses_directories_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let err = create_private_file(dir.path(), true).unwrap_err();
        assert!(matches!(err, RecordFileError::NotRegular { .. } | RecordFileError::Io { .. }), "{err}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = create_private_file(&fifo, true).unwrap_err();
        assert!(matches!(err, RecordFileError::NotRegular { .. }), "{err}");
    }

    #[test]
    fn part_names() {
        assert_eq!(part_path(Path::new("/x/rec.jsonl"), 1), PathBuf::from("/x/rec.jsonl.1"));
        assert_eq!(part_path(Path::new("/x/rec.jsonl.zst"), 12), PathBuf::from("/x/rec.jsonl.12.zst"));
        assert_eq!(part_path(Path::new("rec"), 2), PathBuf::from("rec.2"));
        assert_eq!(part_number(b"rec.jsonl", false, b"rec.jsonl.3"), Some(3));
        assert_eq!(part_number(b"rec.jsonl", false, b"rec.jsonl.03"), None);
        assert_eq!(part_number(b"rec.jsonl", false, b"rec.jsonl."), None);
        assert_eq!(part_number(b"rec.jsonl", false, b"rec.jsonl.x"), None);
        assert_eq!(part_number(b"rec.zst", true, b"rec.4.zst"), Some(4));
        assert_eq!(part_number(b"rec.zst", true, b"rec.zst.4"), None);
    }

    #[test]
    fn zstd_flush_is_readable_after_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl.zst");
        let mut w = RecordWriter::create(&RecordFileOptions::new(&path)).unwrap();
        let lines: Vec<String> = (0..500).map(|i| format!("{{\"type\":\"alloc\",\"n\":{i}}}\n")).collect();
        for line in &lines {
            w.write_all(line.as_bytes()).unwrap();
        }
        w.flush().unwrap();
        w.write_all(b"{\"type\":\"never flushed\"}\n").unwrap();
        // As if killed -9: no Drop, the frame never ends.
        std::mem::forget(w);
        let (data, err) = decompress(&path);
        assert_eq!(String::from_utf8(data).unwrap(), lines.concat());
        assert_eq!(err.expect("the frame has no end").kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn zstd_finish_ends_the_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.zst");
        let mut w = RecordWriter::create(&RecordFileOptions::new(&path)).unwrap();
        w.write_all(b"a\nb\n").unwrap();
        w.finish().unwrap();
        let (data, err) = decompress(&path);
        assert_eq!(data, b"a\nb\n");
        assert!(err.is_none());
        assert_eq!(&fs::read(&path).unwrap()[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    }

    /// Writes `lines` in odd-sized chunks (as a BufWriter would: not at line
    /// boundaries).
    fn write_chunked(w: &mut RecordWriter, lines: &[String], chunk: usize) {
        let all = lines.concat().into_bytes();
        for piece in all.chunks(chunk) {
            w.write_all(piece).unwrap();
        }
    }

    fn read_all(path: &Path) -> String {
        if is_zstd_path(path) {
            String::from_utf8(decompress(path).0).unwrap()
        } else {
            fs::read_to_string(path).unwrap()
        }
    }

    fn check_rotation(name: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let opts = RecordFileOptions { rotate_size: Some(200), rotate_count: 3, ..RecordFileOptions::new(&path) };
        let header = "{\"type\":\"header\",\"schema\":1}\n".to_string();
        let mut w = RecordWriter::create(&opts).unwrap();
        let mut lines = vec![header.clone()];
        lines.extend((0..40).map(|i| format!("{{\"type\":\"alloc\",\"line\":{i:03}}}\n")));
        // The header comes through the writer as its first line.
        write_chunked(&mut w, &lines, 7);
        assert!(w.rotations() >= 3, "{} rotations", w.rotations());
        w.finish().unwrap();

        let parts = rotated_parts(&path);
        assert_eq!(parts.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2], "rotate_count 3 keeps 2 older parts");
        let mut seen = Vec::new();
        for file in [&parts[1].1, &parts[0].1, &path] {
            let text = read_all(file);
            assert!(text.starts_with(&header), "{} must start with the header", file.display());
            assert!(text.ends_with('\n'), "rotation must happen at a line boundary");
            let body: Vec<&str> = text.lines().skip(1).collect();
            assert!(body.iter().all(|l| l.starts_with("{\"type\":\"alloc\"") && l.ends_with('}')), "{text}");
            seen.extend(body.into_iter().map(str::to_string));
            assert_eq!(mode(file), 0o600);
        }
        // The newest lines survive, in order, without gaps.
        let last: Vec<String> = lines[lines.len() - seen.len()..].iter().map(|l| l.trim_end().to_string()).collect();
        assert_eq!(seen, last);
        // Each file stops at the first line end past 200 bytes.
        let oldest = read_all(&parts[1].1);
        assert!(oldest.len() >= 200 && oldest.len() < 200 + 30, "{}", oldest.len());
    }

    #[test]
    fn rotates_plain_files_at_line_boundaries() {
        check_rotation("rec.jsonl");
    }

    #[test]
    fn rotates_compressed_files_at_line_boundaries() {
        check_rotation("rec.jsonl.zst");
    }

    #[test]
    fn explicit_header_starts_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let opts = RecordFileOptions { rotate_size: Some(50), rotate_count: 2, ..RecordFileOptions::new(&path) };
        let mut w = RecordWriter::create(&opts).unwrap().with_header(b"HEADER".to_vec()).unwrap();
        for i in 0..10 {
            writeln!(w, "line number {i:02} padded to be long").unwrap();
        }
        w.finish().unwrap();
        let live = fs::read_to_string(&path).unwrap();
        let older = fs::read_to_string(part_path(&path, 1)).unwrap();
        // 7 + 33 bytes stay under 50, the second line passes it: two lines
        // a file.
        assert_eq!(live, "HEADER\nline number 08 padded to be long\nline number 09 padded to be long\n");
        assert_eq!(older, "HEADER\nline number 06 padded to be long\nline number 07 padded to be long\n");
        assert!(!part_path(&path, 2).exists());
    }

    #[test]
    fn rotate_count_one_keeps_only_the_live_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let opts = RecordFileOptions { rotate_size: Some(10), rotate_count: 1, ..RecordFileOptions::new(&path) };
        let mut w = RecordWriter::create(&opts).unwrap();
        w.write_all(b"h\nfirst line\nsecond line\n").unwrap();
        drop(w);
        assert_eq!(fs::read_to_string(&path).unwrap(), "h\nsecond line\n");
        assert!(rotated_parts(&path).is_empty());
    }

    #[test]
    fn stale_parts_need_force_and_are_removed_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl");
        fs::write(part_path(&path, 1), b"old\n").unwrap();
        let err = RecordWriter::create(&RecordFileOptions::new(&path)).err().unwrap();
        assert!(matches!(err, RecordFileError::StalePart { .. }), "{err}");
        assert!(err.to_string().contains("rec.jsonl.1") && err.to_string().contains("--force"), "{err}");
        assert!(!path.exists(), "a refused create leaves no file");
        let w = RecordWriter::create(&RecordFileOptions { force: true, ..RecordFileOptions::new(&path) }).unwrap();
        drop(w);
        assert!(!part_path(&path, 1).exists());
    }

    #[test]
    fn a_restarted_rotating_recorder_keeps_the_earlier_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl");
        fs::write(&path, b"h\nbefore the crash\n").unwrap();
        fs::write(part_path(&path, 1), b"h\nolder\n").unwrap();
        fs::write(part_path(&path, 2), b"h\noldest\n").unwrap();
        let opts = RecordFileOptions { rotate_size: Some(1 << 20), rotate_count: 3, ..RecordFileOptions::new(&path) };
        let mut w = RecordWriter::create(&opts).unwrap();
        w.write_all(b"h\nafter the restart\n").unwrap();
        drop(w);
        assert_eq!(fs::read_to_string(&path).unwrap(), "h\nafter the restart\n");
        assert_eq!(fs::read_to_string(part_path(&path, 1)).unwrap(), "h\nbefore the crash\n");
        assert_eq!(fs::read_to_string(part_path(&path, 2)).unwrap(), "h\nolder\n");
        assert!(!part_path(&path, 3).exists(), "the oldest beyond the count is gone");
        // A symbolic link in the file's place is still refused, not moved.
        let target = dir.path().join("target");
        fs::write(&target, b"x").unwrap();
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let opts = RecordFileOptions { rotate_size: Some(1 << 20), rotate_count: 3, ..RecordFileOptions::new(&link) };
        assert!(RecordWriter::create(&opts).is_err());
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(!part_path(&link, 1).exists());
    }

    #[test]
    fn invalid_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let zero_count = RecordFileOptions { rotate_count: 0, ..RecordFileOptions::new(&path) };
        assert!(matches!(RecordWriter::create(&zero_count), Err(RecordFileError::Invalid(_))));
        let zero_size = RecordFileOptions { rotate_size: Some(0), ..RecordFileOptions::new(&path) };
        assert!(matches!(RecordWriter::create(&zero_size), Err(RecordFileError::Invalid(_))));
        assert!(!path.exists());
    }
}
