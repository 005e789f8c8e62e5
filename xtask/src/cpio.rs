//! A minimal writer for the cpio `newc` format, the one the kernel unpacks as
//! an initramfs (see the kernel's `Documentation/driver-api/early-userspace/
//! buffer-format.rst`). Enough for `vm-test`: directories, regular files,
//! symlinks and character devices, all owned by root, mtime 0.
//!
//! Entries are collected first and written sorted by path, so every
//! directory comes before what it holds (the kernel does not create missing
//! parents) and the archive does not depend on the order of the calls.

use std::{
    collections::{btree_map::Entry, BTreeMap},
    fs::File,
    io::{self, Write},
    path::{Component, Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// `S_IFDIR`, `S_IFREG`, `S_IFLNK`, `S_IFCHR` from `<sys/stat.h>`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// What one path in the archive is.
#[derive(Debug, PartialEq)]
enum Node {
    Dir,
    /// A regular file with these permission bits, copied from a host file.
    File {
        mode: u32,
        source: PathBuf,
    },
    /// A regular file with these permission bits and contents.
    Data {
        mode: u32,
        data: Vec<u8>,
    },
    Symlink(String),
    CharDev {
        major: u32,
        minor: u32,
    },
}

/// An archive being assembled; nothing is read or written before
/// [`Archive::write`].
#[derive(Default)]
pub struct Archive {
    /// Relative paths (no leading `/`) to what they are.
    nodes: BTreeMap<PathBuf, Node>,
}

impl Archive {
    /// Adds `path` (absolute, as seen in the guest) as a copy of the host
    /// file `source` (symlinks followed) with permission bits `mode`.
    pub fn file(&mut self, path: impl AsRef<Path>, mode: u32, source: impl Into<PathBuf>) -> Result<()> {
        self.insert(path.as_ref(), Node::File { mode, source: source.into() })
    }

    /// Adds `path` as a regular file holding `data`.
    pub fn data(&mut self, path: impl AsRef<Path>, mode: u32, data: impl Into<Vec<u8>>) -> Result<()> {
        self.insert(path.as_ref(), Node::Data { mode, data: data.into() })
    }

    /// Adds `path` as a symlink to `target`.
    pub fn symlink(&mut self, path: impl AsRef<Path>, target: &str) -> Result<()> {
        self.insert(path.as_ref(), Node::Symlink(target.to_owned()))
    }

    /// Adds `path` as a directory (parents are added by every call anyway).
    pub fn dir(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.insert(path.as_ref(), Node::Dir)
    }

    /// Adds `path` as a character device node.
    pub fn char_dev(&mut self, path: impl AsRef<Path>, major: u32, minor: u32) -> Result<()> {
        self.insert(path.as_ref(), Node::CharDev { major, minor })
    }

    /// Whether something was added at `path`.
    pub fn contains(&self, path: impl AsRef<Path>) -> bool {
        relative(path.as_ref()).is_ok_and(|rel| self.nodes.contains_key(&rel))
    }

    /// Adds `node` at `path` and every missing parent directory. Adding the
    /// same thing twice is fine (two binaries need the same library); two
    /// different things at one path is an error.
    fn insert(&mut self, path: &Path, node: Node) -> Result<()> {
        let rel = relative(path)?;
        for parent in rel.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
            match self.nodes.entry(parent.to_path_buf()) {
                Entry::Vacant(slot) => {
                    slot.insert(Node::Dir);
                }
                Entry::Occupied(slot) if *slot.get() == Node::Dir => {}
                Entry::Occupied(_) => bail!("initramfs: /{} is needed as a directory", parent.display()),
            }
        }
        match self.nodes.entry(rel) {
            Entry::Vacant(slot) => {
                slot.insert(node);
            }
            Entry::Occupied(slot) if *slot.get() == node => {}
            Entry::Occupied(slot) => {
                bail!("initramfs: /{} added twice: {:?} and {node:?}", slot.key().display(), slot.get())
            }
        }
        Ok(())
    }

    /// Writes the archive (uncompressed) to `out`; returns its size in bytes.
    pub fn write(&self, out: &Path) -> Result<u64> {
        let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
        let mut w = Counter { inner: io::BufWriter::with_capacity(1 << 20, file), written: 0 };
        for (ino, (path, node)) in (1u32..).zip(&self.nodes) {
            let name = path.to_str().with_context(|| format!("initramfs: {} is not UTF-8", path.display()))?;
            let entry = |mode, size, rdev| Header { ino, mode, size, rdev, name };
            match node {
                Node::Dir => entry(S_IFDIR | 0o755, 0, (0, 0)).write(&mut w)?,
                Node::Symlink(target) => {
                    entry(S_IFLNK | 0o777, len32(target.len())?, (0, 0)).write(&mut w)?;
                    w.write_all(target.as_bytes())?;
                    pad(&mut w)?;
                }
                Node::CharDev { major, minor } => entry(S_IFCHR | 0o600, 0, (*major, *minor)).write(&mut w)?,
                Node::Data { mode, data } => {
                    entry(S_IFREG | mode, len32(data.len())?, (0, 0)).write(&mut w)?;
                    w.write_all(data)?;
                    pad(&mut w)?;
                }
                Node::File { mode, source } => {
                    let mut src = File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
                    let size = src.metadata()?.len();
                    let size = u32::try_from(size).with_context(|| format!("{} is too big", source.display()))?;
                    entry(S_IFREG | mode, size, (0, 0)).write(&mut w)?;
                    let copied =
                        io::copy(&mut src, &mut w).with_context(|| format!("cannot read {}", source.display()))?;
                    if copied != u64::from(size) {
                        bail!("{} changed size while being archived", source.display());
                    }
                    pad(&mut w)?;
                }
            }
        }
        Header { ino: 0, mode: 0, size: 0, rdev: (0, 0), name: "TRAILER!!!" }.write(&mut w)?;
        w.inner.flush().with_context(|| format!("cannot write {}", out.display()))?;
        Ok(w.written)
    }
}

/// `path` without its leading `/`; it must be absolute and plain (no `..`).
fn relative(path: &Path) -> Result<PathBuf> {
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        bail!("initramfs paths must be absolute: {}", path.display());
    }
    let rel: PathBuf = components.clone().collect();
    if rel.as_os_str().is_empty() || !components.all(|c| matches!(c, Component::Normal(_))) {
        bail!("not a plain absolute path: {}", path.display());
    }
    Ok(rel)
}

fn len32(len: usize) -> Result<u32> {
    u32::try_from(len).context("initramfs entry larger than 4 GiB")
}

/// One `newc` header: the magic, 13 fields of 8 hex digits, the name.
struct Header<'a> {
    ino: u32,
    mode: u32,
    size: u32,
    rdev: (u32, u32),
    name: &'a str,
}

impl Header<'_> {
    fn write(&self, w: &mut Counter<impl Write>) -> io::Result<()> {
        let nlink = if self.mode & S_IFDIR != 0 { 2 } else { 1 };
        let namesize = self.name.len() + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        write!(
            w,
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, self.mode, 0, 0, nlink, 0, self.size, 0, 0, self.rdev.0, self.rdev.1, namesize, 0
        )?;
        w.write_all(self.name.as_bytes())?;
        w.write_all(&[0])?;
        pad(w)
    }
}

/// Pads with zeros to the next multiple of 4 bytes.
fn pad(w: &mut Counter<impl Write>) -> io::Result<()> {
    let n = (4 - w.written % 4) % 4;
    w.write_all(&[0; 3][..usize::try_from(n).unwrap_or(0)])
}

/// A writer that counts bytes (for the 4-byte alignment and the size).
struct Counter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_sorted_aligned_newc() {
        let mut a = Archive::default();
        a.data("/etc/x", 0o644, b"hello".to_vec()).unwrap();
        a.symlink("/bin/sh", "busybox").unwrap();
        a.char_dev("/dev/console", 5, 1).unwrap();
        // The same thing twice is fine, a different thing is not.
        a.symlink("/bin/sh", "busybox").unwrap();
        assert!(a.symlink("/bin/sh", "dash").is_err());
        assert!(a.data("/etc", 0o644, Vec::new()).is_err());
        assert!(a.dir("relative").is_err());
        assert!(a.contains("/bin") && a.contains("/bin/sh") && !a.contains("/usr"));

        let out = std::env::temp_dir().join(format!("xtask-cpio-test-{}", std::process::id()));
        let size = a.write(&out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(size % 4, 0);

        // Walk the archive back: names in order, contents where promised.
        let mut names = Vec::new();
        let mut at = 0;
        loop {
            let header = std::str::from_utf8(&bytes[at..at + 110]).unwrap();
            assert!(header.starts_with("070701"));
            let field = |i: usize| u32::from_str_radix(&header[6 + 8 * i..14 + 8 * i], 16).unwrap() as usize;
            let (size, namesize) = (field(6), field(11));
            let name = std::str::from_utf8(&bytes[at + 110..at + 110 + namesize - 1]).unwrap().to_owned();
            at = (at + 110 + namesize).next_multiple_of(4);
            if name == "etc/x" {
                assert_eq!(&bytes[at..at + size], b"hello");
            }
            if name == "dev/console" {
                assert_eq!((field(1) as u32 & 0o170000, field(9), field(10)), (S_IFCHR, 5, 1));
            }
            at = (at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
            names.push(name);
        }
        assert_eq!(at, bytes.len());
        assert_eq!(names, ["bin", "bin/sh", "dev", "dev/console", "etc", "etc/x"]);
    }
}
