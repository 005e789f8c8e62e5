//! Details of the process that holds a port, from `/proc/PID`: command line,
//! user, cgroup and start time, for `port-trace who`.

use std::io::Read;
use std::time::SystemTime;

use crate::clock::BootClock;

/// What `/proc` tells about one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessDetails {
    /// Thread-group id.
    pub pid: u32,
    /// Command name (`/proc/PID/stat`, at most 15 bytes).
    pub comm: String,
    /// Arguments joined with spaces (NUL-separated in `/proc/PID/cmdline`,
    /// invalid UTF-8 replaced); empty for kernel threads and zombies.
    pub cmdline: String,
    /// Effective user id (the `Uid:` line of `/proc/PID/status`, as `ps`
    /// shows it; the owner of `/proc/PID` is root for non-dumpable processes).
    pub uid: u32,
    /// The user's name from `/etc/passwd`, when listed there.
    pub user: Option<String>,
    /// The cgroup v2 path (the `0::PATH` line of `/proc/PID/cgroup`).
    pub cgroup_path: Option<String>,
    /// CLOCK_BOOTTIME nanoseconds when the process started (`starttime` of
    /// `/proc/PID/stat`, kept in clock ticks since boot).
    pub start_boot_ns: Option<u64>,
    /// Wall-clock time the process started.
    pub start_time: Option<SystemTime>,
}

impl ProcessDetails {
    /// Reads the details of `pid`; `None` when the process is gone (or
    /// `/proc` hides it). All files are read through one handle on
    /// `/proc/PID`, so a recycled pid cannot mix two processes' details.
    pub fn read(pid: u32) -> Option<Self> {
        let pid_i32 = i32::try_from(pid).ok().filter(|p| *p > 0)?;
        let process = procfs::process::Process::new(pid_i32).ok()?;
        let stat = process.stat().ok()?;
        let uid = process.status().ok()?.euid;
        let cmdline = process
            .open_relative("cmdline")
            .ok()
            .and_then(|mut f| {
                let mut raw = Vec::new();
                f.read_to_end(&mut raw).ok()?;
                Some(join_cmdline(&raw))
            })
            .unwrap_or_default();
        let cgroup_path = process.open_relative("cgroup").ok().and_then(|mut f| {
            let mut text = String::new();
            f.read_to_string(&mut text).ok()?;
            cgroup_v2_path(&text)
        });
        let start_boot_ns = ticks_to_ns(stat.starttime, procfs::ticks_per_second());
        Some(Self {
            pid,
            comm: stat.comm,
            cmdline,
            uid,
            user: user_name(uid),
            cgroup_path,
            start_boot_ns,
            start_time: start_boot_ns.map(|ns| BootClock::now().wall(ns)),
        })
    }
}

/// `/proc/PID/cmdline` as one line: NUL-separated arguments joined with
/// spaces, trailing NULs dropped, invalid UTF-8 replaced.
pub fn join_cmdline(raw: &[u8]) -> String {
    let trimmed = raw.strip_suffix(b"\0").unwrap_or(raw);
    if trimmed.is_empty() {
        return String::new();
    }
    trimmed.split(|b| *b == 0).map(String::from_utf8_lossy).collect::<Vec<_>>().join(" ")
}

/// The cgroup v2 path in the text of `/proc/PID/cgroup` (its `0::PATH` line).
pub fn cgroup_v2_path(text: &str) -> Option<String> {
    text.lines().find_map(|line| line.strip_prefix("0::")).map(str::to_string)
}

/// Clock ticks (`USER_HZ`) to nanoseconds; `None` for a zero tick rate or on
/// overflow.
fn ticks_to_ns(ticks: u64, ticks_per_second: u64) -> Option<u64> {
    if ticks_per_second == 0 {
        return None;
    }
    let ns = u128::from(ticks) * 1_000_000_000 / u128::from(ticks_per_second);
    u64::try_from(ns).ok()
}

/// The name of user `uid` in `/etc/passwd`, if listed. Read directly rather
/// than through NSS, which could load modules or query a directory server.
pub fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read("/etc/passwd").ok()?;
    passwd_name(&String::from_utf8_lossy(&text), uid)
}

/// The name of user `uid` in the text of a passwd file
/// (`name:password:uid:gid:gecos:home:shell` lines).
pub fn passwd_name(text: &str, uid: u32) -> Option<String> {
    text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let line_uid: u32 = fields.next()?.trim().parse().ok()?;
        (line_uid == uid && !name.is_empty()).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reads_this_test_process() {
        let details = ProcessDetails::read(std::process::id()).expect("the test process exists");
        assert_eq!(details.pid, std::process::id());
        let exe = std::env::current_exe().unwrap();
        let exe_name = exe.file_name().unwrap().to_string_lossy();
        assert!(details.cmdline.contains(exe_name.as_ref()), "{} lacks {exe_name}", details.cmdline);
        // comm is the first 15 bytes of the executable's name (or a thread's
        // name, which libtest sets only on threads, not the main one).
        assert!(exe_name.starts_with(&details.comm), "{} vs {exe_name}", details.comm);
        // SAFETY: getuid has no preconditions.
        assert_eq!(details.uid, unsafe { libc::geteuid() });
        assert_eq!(details.uid, unsafe { libc::getuid() });
        let started = details.start_time.expect("start time");
        let age = SystemTime::now().duration_since(started).expect("started in the past");
        // Started before now, and not before this test binary was built.
        assert!(age < Duration::from_secs(24 * 3600), "{age:?}");
        assert!(details.start_boot_ns.unwrap() <= BootClock::boot_now_ns());
        if let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") {
            assert_eq!(details.cgroup_path, cgroup_v2_path(&own));
        }
        if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
            assert_eq!(details.user, passwd_name(&passwd, details.uid));
        }
    }

    #[test]
    fn a_process_that_is_gone_is_none() {
        assert_eq!(ProcessDetails::read(0), None);
        assert_eq!(ProcessDetails::read(u32::MAX), None);
        // A child that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(ProcessDetails::read(pid).map(|d| d.pid), None);
    }

    #[test]
    fn joins_command_lines() {
        assert_eq!(join_cmdline(b"python3\0-m\0http.server\0"), "python3 -m http.server");
        assert_eq!(join_cmdline(b"nginx: worker process"), "nginx: worker process");
        assert_eq!(join_cmdline(b"a\0\0b\0"), "a  b");
        assert_eq!(join_cmdline(b"bad\xff\0arg\0"), "bad\u{fffd} arg");
        assert_eq!(join_cmdline(b""), "");
        assert_eq!(join_cmdline(b"\0"), "");
    }

    #[test]
    fn finds_the_cgroup_v2_line() {
        assert_eq!(cgroup_v2_path("0::/system.slice/nginx.service\n"), Some("/system.slice/nginx.service".into()));
        let hybrid = "12:cpu,cpuacct:/user.slice\n1:name=systemd:/user.slice/x\n0::/user.slice/x.scope\n";
        assert_eq!(cgroup_v2_path(hybrid), Some("/user.slice/x.scope".into()));
        assert_eq!(cgroup_v2_path("4:memory:/docker/abc\n"), None);
        assert_eq!(cgroup_v2_path(""), None);
    }

    #[test]
    fn parses_passwd() {
        let passwd = "# comment\nroot:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n\
                      broken line\n:x:77:77::/:/bin/false\nnobody:x:65534:65534::/:/bin/false\n";
        assert_eq!(passwd_name(passwd, 0), Some("root".into()));
        assert_eq!(passwd_name(passwd, 33), Some("www-data".into()));
        assert_eq!(passwd_name(passwd, 65534), Some("nobody".into()));
        assert_eq!(passwd_name(passwd, 77), None, "an empty name is no name");
        assert_eq!(passwd_name(passwd, 1000), None);
    }

    #[test]
    fn converts_ticks() {
        assert_eq!(ticks_to_ns(250, 100), Some(2_500_000_000));
        assert_eq!(ticks_to_ns(1, 0), None);
        assert_eq!(ticks_to_ns(u64::MAX, 1), None);
    }
}
