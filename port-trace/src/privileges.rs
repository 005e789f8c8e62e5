//! Checking, before touching the kernel, that we have the capabilities
//! loading and attaching the programs needs, so that a user without them
//! gets one clear line instead of a verifier dump.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_NICE: u32 = 23;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability bits of this process.
fn effective_caps() -> Option<u64> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header { version: 0x2008_0522, pid: 0 }; // _LINUX_CAPABILITY_VERSION_3
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header and room for two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    (rc == 0).then(|| u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

/// Names of the needed capabilities this process lacks (empty: all there).
pub fn missing_capabilities() -> Vec<&'static str> {
    let Some(caps) = effective_caps() else { return Vec::new() };
    let has = |cap: u32| caps & (1 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !admin {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// Whether this process may raise a thread's priority (`CAP_SYS_NICE`).
pub fn has_sys_nice() -> bool {
    effective_caps().is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

/// The one line for a user who lacks capabilities.
pub fn missing_message(missing: &[&str]) -> String {
    format!(
        "port-trace needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN to load its eBPF programs \
         (missing: {}); run it as root, e.g. `sudo port-trace ...`",
        missing.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_what_is_missing() {
        let m = missing_message(&["CAP_BPF", "CAP_NET_ADMIN"]);
        assert!(m.contains("missing: CAP_BPF, CAP_NET_ADMIN"));
        assert!(m.contains("sudo"));
    }

    #[test]
    fn reads_own_capabilities() {
        // As root (CI) nothing is missing; elsewhere at least the answer is a
        // subset of the three.
        let missing = missing_capabilities();
        assert!(missing.iter().all(|m| ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"].contains(m)));
        if unsafe { libc::geteuid() } == 0 {
            assert!(missing.is_empty(), "{missing:?}");
        }
    }
}
