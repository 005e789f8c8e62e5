//! A private, named network namespace per test (`ip netns add pt-…`), with
//! loopback up, deleted again when the guard is dropped (also on panic).

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// A named network namespace that exists while this guard lives.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    inode: u64,
}

impl NetNs {
    /// Creates `pt-<random>` and brings its loopback up.
    pub fn new() -> Result<NetNs> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u32(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(crate::rfc3339::unix_nanos(std::time::SystemTime::now()) as u128);
        let name = format!("pt-{:012x}", h.finish() & 0xffff_ffff_ffff);

        run_ip(["netns", "add", &name])?;
        // From here on the guard deletes the namespace, whatever fails next.
        let mut ns = NetNs { name, inode: 0 };
        run_ip(["-n", &ns.name, "link", "set", "lo", "up"])?;
        ns.inode = std::fs::metadata(ns.path()).with_context(|| format!("stat {}", ns.path().display()))?.ino();
        Ok(ns)
    }

    /// The name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what `port-trace --netns` accepts.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The namespace inode (`stat -L /run/netns/<name>`), the `netns` field
    /// port-trace must put on every record.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// A command that runs `program` inside the namespace
    /// (`ip netns exec <name> program`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Sets a sysctl inside the namespace, e.g.
    /// `("net.ipv4.ip_local_port_range", "40000 49999")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let out = self
            .command("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")])
            .output()
            .context("running sysctl in the namespace")?;
        if !out.status.success() {
            bail!("sysctl {key}={value} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// The namespace's `net.ipv4.ip_local_port_range` (it applies to IPv6
    /// too).
    pub fn ephemeral_range(&self) -> Result<(u16, u16)> {
        let out = self.command("cat").arg("/proc/sys/net/ipv4/ip_local_port_range").output()?;
        let text = String::from_utf8(out.stdout)?;
        let v: Vec<u16> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("ip_local_port_range {text:?}"))?;
        match v.as_slice() {
            [lo, hi] => Ok((*lo, *hi)),
            _ => bail!("ip_local_port_range {text:?}"),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_ip(["netns", "delete", &self.name]) {
            eprintln!("warning: could not delete network namespace {}: {e:#}", self.name);
        }
    }
}

fn run_ip<const N: usize>(args: [&str; N]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
