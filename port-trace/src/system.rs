//! Facts about the host read from `/proc` and `/sys`: kernel release, cgroup
//! v2 and tracefs mounts, kprobe support, network namespaces and their
//! ephemeral port range.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `uname -r`.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// Mount points of a filesystem type, from `/proc/self/mountinfo`.
fn mounts_of(fstype: &str) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            (right.split(' ').next()? == fstype).then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// The cgroup v2 root (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = mounts_of("cgroup2");
    mounts.iter().find(|p| p.as_path() == Path::new("/sys/fs/cgroup")).or_else(|| mounts.first()).cloned()
}

/// Where tracefs is mounted, if anywhere (classic tracepoints need it).
pub fn tracefs_root() -> Option<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// Whether the kernel offers kprobes (`CONFIG_KPROBE_EVENTS`).
pub fn kprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
}

/// The network namespace inode of a `--netns` argument: a path
/// (`/run/netns/NAME`, `/proc/PID/ns/net`) or an inode number.
pub fn resolve_netns(arg: &str) -> Result<u32> {
    if let Ok(inode) = arg.parse::<u32>() {
        return Ok(inode);
    }
    let meta = fs::metadata(arg).with_context(|| format!("--netns {arg}: no such network namespace"))?;
    let inode = meta.ino();
    let c_path = std::ffi::CString::new(arg)?;
    // SAFETY: an all-zero statfs is a valid out buffer.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and out pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut buf) };
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    if rc != 0 || buf.f_type as i64 != NSFS_MAGIC {
        bail!("--netns {arg}: not a network namespace file (expected /run/netns/NAME or /proc/PID/ns/net)");
    }
    u32::try_from(inode).context("namespace inode out of range")
}

/// The current process's network namespace inode.
pub fn own_netns() -> Option<u32> {
    fs::metadata("/proc/self/ns/net").ok().and_then(|m| u32::try_from(m.ino()).ok())
}

fn parse_range(text: &str) -> Result<[u16; 2]> {
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok([lo, hi]),
        _ => bail!("unexpected ip_local_port_range '{}'", text.trim()),
    }
}

/// Reads `files` (under `/proc/sys/net`) as the network namespace at
/// `netns_path` sees them (the calling task's own namespace when `None`).
/// `/proc/sys/net` shows the namespace of the task that opens it, so a
/// helper thread joins the namespace to read them.
fn read_in_netns(netns_path: Option<&str>, files: &'static [&'static str]) -> Result<Vec<String>> {
    let read_all = || -> Result<Vec<String>> {
        files.iter().map(|f| fs::read_to_string(f).with_context(|| format!("cannot read {f}"))).collect()
    };
    let Some(ns) = netns_path else {
        return read_all();
    };
    let file = fs::File::open(ns).with_context(|| format!("cannot open {ns}"))?;
    std::thread::spawn(move || -> Result<Vec<String>> {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        read_all()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace reader thread panicked"))?
}

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// `net.ipv4.ip_local_port_range` as the namespace at `netns_path` sees it
/// (the calling task's own namespace when `None`).
pub fn ephemeral_range(netns_path: Option<&str>) -> Result<[u16; 2]> {
    parse_range(&read_in_netns(netns_path, &[PORT_RANGE])?[0])
}

/// The ports the kernel may choose for ephemeral use in the namespace at
/// `netns_path`: `ip_local_port_range` minus `ip_local_reserved_ports`
/// (both per namespace, and IPv6 uses the IPv4 settings:
/// `inet_get_local_port_range`, `inet_is_local_reserved_port`).
pub fn usable_range(netns_path: Option<&str>) -> Result<crate::pressure::UsableRange> {
    let texts = read_in_netns(netns_path, &[PORT_RANGE, RESERVED_PORTS])?;
    crate::pressure::UsableRange::parse(&texts[0], &texts[1]).map_err(|e| anyhow::anyhow!(e))
}

/// The usable range of network namespace `netns`, entered through the
/// namespace of `pid` when it is that one (the process that just used a
/// port there), else through any path to it ([`netns_paths`]).
pub fn usable_range_of(netns: u32, pid: u32) -> Option<crate::pressure::UsableRange> {
    if own_netns() == Some(netns) {
        return usable_range(None).ok();
    }
    let by_pid = format!("/proc/{pid}/ns/net");
    if pid != 0 && fs::metadata(&by_pid).is_ok_and(|m| m.ino() == u64::from(netns)) {
        if let Ok(range) = usable_range(Some(&by_pid)) {
            return Some(range);
        }
    }
    let path = netns_paths().remove(&netns)?;
    usable_range(path.to_str()).ok()
}

/// The host's name (`uname -n`).
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// The cgroup v2 id of a `--cgroup` path (the directory's inode), absolute or
/// relative to the cgroup v2 root.
pub fn resolve_cgroup(arg: &str) -> Result<u64> {
    let path = Path::new(arg);
    let full = if path.is_absolute() && path.exists() {
        path.to_path_buf()
    } else {
        let root = cgroup2_root().context("--cgroup: no cgroup v2 hierarchy is mounted")?;
        root.join(arg.trim_start_matches('/'))
    };
    let meta = fs::metadata(&full).with_context(|| format!("--cgroup {arg}: no such cgroup ({})", full.display()))?;
    if !meta.is_dir() {
        bail!("--cgroup {arg}: not a cgroup directory");
    }
    Ok(meta.ino())
}

/// Makes tracefs visible to this process when the host has not mounted it:
/// the process moves to a mount namespace of its own (a slave of the host's,
/// so later host mounts such as new `/run/netns` entries still appear) and
/// mounts tracefs there. The host's mounts are untouched. Must run before
/// any thread is started (`unshare(CLONE_NEWNS)` refuses threaded callers).
/// Returns whether it mounted anything.
pub fn ensure_private_tracefs() -> Result<bool> {
    let result = mount_private_tracefs();
    if let Ok(true) = result {
        PRIVATE_TRACEFS.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    result
}

/// Set once [`ensure_private_tracefs`] mounted tracefs for this process.
static PRIVATE_TRACEFS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether tracefs is mounted only in this process's private mount namespace.
pub fn tracefs_is_private() -> bool {
    PRIVATE_TRACEFS.load(std::sync::atomic::Ordering::Relaxed)
}

fn mount_private_tracefs() -> Result<bool> {
    if tracefs_root().is_some() {
        return Ok(false);
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (root, target, fstype, source) = (c("/"), c("/sys/kernel/tracing"), c("tracefs"), c("nodev"));
    // SAFETY: plain syscalls with valid NUL-terminated strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            bail!("unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
        }
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) != 0
        {
            bail!("making / a slave mount: {}", std::io::Error::last_os_error());
        }
        if libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) != 0 {
            bail!("mounting tracefs on /sys/kernel/tracing: {}", std::io::Error::last_os_error());
        }
    }
    Ok(true)
}

/// Every network namespace this process can enter, by inode: the named
/// ones (`/run/netns/*`) and those of running processes (`/proc/*/ns/net`).
pub fn netns_paths() -> std::collections::HashMap<u32, PathBuf> {
    let mut paths = std::collections::HashMap::new();
    let named = fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.path());
    let of_processes = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .map(|e| e.path().join("ns/net"));
    for path in named.chain(of_processes) {
        if let Ok(inode) = fs::metadata(&path).map(|m| m.ino()) {
            if let Ok(inode) = u32::try_from(inode) {
                paths.entry(inode).or_insert(path);
            }
        }
    }
    paths
}

/// Which process holds each socket, by socket inode, from the
/// `socket:[INODE]` links in `/proc/*/fd` (what `ss -p` does). With
/// `netns`, only processes in that network namespace are looked at (a
/// process elsewhere may hold a socket of it, after `setns`; it is then not
/// named).
pub fn socket_owners(netns: Option<u32>) -> std::collections::HashMap<u32, crate::decode::Task> {
    let mut owners = std::collections::HashMap::new();
    let cgroup_root = cgroup2_root();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Ok(pid) = name.to_string_lossy().parse::<u32>() else { continue };
        if let Some(netns) = netns {
            let inode = fs::metadata(entry.path().join("ns/net")).map(|m| m.ino()).ok();
            if inode != Some(u64::from(netns)) {
                continue;
            }
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else { continue };
        let mut owner: Option<crate::decode::Task> = None;
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            let target = target.to_string_lossy();
            let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) else { continue };
            let Ok(inode) = inode.parse::<u32>() else { continue };
            let owner = owner.get_or_insert_with(|| crate::decode::Task {
                pid,
                tid: pid,
                comm: fs::read_to_string(entry.path().join("comm")).map(|c| c.trim_end().into()).unwrap_or_default(),
                cgroup: cgroup_root.as_deref().and_then(|root| cgroup_of_pid_under(root, pid)).unwrap_or(0),
            });
            owners.entry(inode).or_insert_with(|| owner.clone());
        }
    }
    owners
}

/// The cgroup v2 id of a process (the inode of its cgroup v2 directory),
/// from the `0::PATH` line of `/proc/PID/cgroup`.
pub fn cgroup_of_pid(pid: u32) -> Option<u64> {
    cgroup_of_pid_under(&cgroup2_root()?, pid)
}

fn cgroup_of_pid_under(root: &Path, pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    fs::metadata(root.join(path.trim_start_matches('/'))).ok().map(|m| m.ino())
}

/// Maps cgroup v2 ids to their paths (relative to the cgroup v2 root, as
/// `/proc/PID/cgroup` shows them), walking the hierarchy when an id is new;
/// unknown ids are looked for again at most once a second.
#[derive(Default)]
pub struct CgroupPaths {
    known: std::collections::HashMap<u64, String>,
    last_scan: Option<std::time::Instant>,
}

impl CgroupPaths {
    /// The path of cgroup `id`, if it exists.
    pub fn path(&mut self, id: u64) -> Option<&str> {
        if id == 0 {
            return None;
        }
        if !self.known.contains_key(&id) && self.last_scan.is_none_or(|t| t.elapsed().as_secs() >= 1) {
            self.scan();
        }
        self.known.get(&id).map(String::as_str)
    }

    fn scan(&mut self) {
        self.last_scan = Some(std::time::Instant::now());
        let Some(root) = cgroup2_root() else { return };
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(meta) = fs::metadata(&dir) {
                let rel = dir.strip_prefix(&root).map(|p| format!("/{}", p.display())).unwrap_or_default();
                self.known.insert(meta.ino(), rel);
            }
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_range() {
        assert_eq!(parse_range("32768\t60999\n").unwrap(), [32768, 60999]);
        assert!(parse_range("garbage").is_err());
    }

    #[test]
    fn reads_own_namespace_facts() {
        let range = ephemeral_range(None).unwrap();
        assert!(range[0] <= range[1]);
        assert_eq!(ephemeral_range(Some("/proc/self/ns/net")).unwrap(), range);
        assert_eq!(resolve_netns("/proc/self/ns/net").unwrap(), own_netns().unwrap());
        assert!(resolve_netns("/nonexistent/ns").is_err());
        assert!(resolve_netns("/etc/hostname").is_err());
        assert_eq!(resolve_netns("4026531840").unwrap(), 4026531840);
    }

    #[test]
    fn finds_own_namespace_and_sockets() {
        let own = own_netns().unwrap();
        assert!(netns_paths().contains_key(&own));
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let link = fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).unwrap();
        let inode: u32 = link.to_string_lossy().trim_start_matches("socket:[").trim_end_matches(']').parse().unwrap();
        let owner = socket_owners(None).remove(&inode).expect("our socket");
        assert!(socket_owners(own_netns()).contains_key(&inode));
        assert_eq!(owner.pid, std::process::id());
    }

    #[test]
    fn cgroup_ids_and_paths_agree() {
        let id = cgroup_of_pid(std::process::id()).expect("own cgroup v2 id");
        let mut paths = CgroupPaths::default();
        let path = paths.path(id).expect("own cgroup path").to_string();
        let text = fs::read_to_string("/proc/self/cgroup").unwrap();
        let want = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        assert_eq!(path.trim_end_matches('/'), want.trim_end_matches('/'));
        assert_eq!(paths.path(0), None);
    }
}
