//! Turning the kernel's CLOCK_BOOTTIME stamps into wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Maps CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns`) to wall time.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    /// CLOCK_REALTIME minus CLOCK_BOOTTIME, in nanoseconds since the epoch.
    offset_ns: i128,
}

impl BootClock {
    /// Samples both clocks now.
    pub fn now() -> Self {
        let boot = now_ns(libc::CLOCK_BOOTTIME) as i128;
        let real = now_ns(libc::CLOCK_REALTIME) as i128;
        Self { offset_ns: real - boot }
    }

    /// A clock with a fixed offset (for tests and recordings).
    pub fn with_offset_ns(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// CLOCK_BOOTTIME now, in nanoseconds.
    pub fn boot_now_ns() -> u64 {
        now_ns(libc::CLOCK_BOOTTIME)
    }

    /// Wall time of a boot-clock stamp.
    pub fn wall(&self, boot_ns: u64) -> SystemTime {
        let ns = (boot_ns as i128 + self.offset_ns).max(0) as u128;
        UNIX_EPOCH + Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32)
    }

    /// RFC 3339 UTC with nanoseconds.
    pub fn rfc3339(&self, boot_ns: u64) -> String {
        humantime::format_rfc3339_nanos(self.wall(boot_ns)).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_with_nanoseconds() {
        let clock = BootClock::with_offset_ns(1_795_000_000_000_000_000);
        assert_eq!(clock.rfc3339(123_456_789), "2026-11-18T11:06:40.123456789Z");
    }

    #[test]
    fn live_clock_is_close_to_system_time() {
        let clock = BootClock::now();
        let wall = clock.wall(BootClock::boot_now_ns());
        let diff = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(diff < Duration::from_secs(1));
    }
}
