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

/// Formats RFC 3339 stamps of one clock fast: the date and time to the
/// second are formatted once per second and reused (records come in time
/// order, thousands per second), the nanoseconds appended by hand.
#[derive(Clone, Debug)]
pub struct Rfc3339Writer {
    clock: BootClock,
    /// Wall-clock second of `prefix`.
    second: Option<u64>,
    /// `2026-11-18T11:06:40` (no fraction, no `Z`).
    prefix: String,
    /// The last stamp written.
    text: String,
}

impl Rfc3339Writer {
    /// A writer for `clock`'s stamps.
    pub fn new(clock: BootClock) -> Self {
        Self { clock, second: None, prefix: String::new(), text: String::with_capacity(32) }
    }

    /// The stamp of `boot_ns`, as [`BootClock::rfc3339`] gives it; valid
    /// until the next call.
    pub fn format(&mut self, boot_ns: u64) -> &str {
        let ns = (boot_ns as i128 + self.clock.offset_ns).max(0) as u128;
        let second = (ns / 1_000_000_000) as u64;
        let nanos = (ns % 1_000_000_000) as u32;
        if self.second != Some(second) {
            let whole = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(second)).to_string();
            self.prefix.clear();
            self.prefix.push_str(whole.trim_end_matches('Z'));
            self.second = Some(second);
        }
        self.text.clear();
        self.text.push_str(&self.prefix);
        self.text.push('.');
        let mut digits = [b'0'; 9];
        let mut rest = nanos;
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        // ASCII digits.
        self.text.push_str(std::str::from_utf8(&digits).unwrap_or("000000000"));
        self.text.push('Z');
        &self.text
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
    fn the_fast_writer_agrees_with_humantime() {
        let clock = BootClock::with_offset_ns(1_795_000_000_000_000_000);
        let mut writer = Rfc3339Writer::new(clock);
        for ns in [0, 1, 123_456_789, 999_999_999, 1_000_000_000, 1_000_000_001, 86_399_999_999_999, 86_400_000_000_000]
        {
            assert_eq!(writer.format(ns), clock.rfc3339(ns), "{ns}");
        }
        // Back in time (a walk's record after a newer one) too.
        assert_eq!(writer.format(5), clock.rfc3339(5));
    }

    #[test]
    fn live_clock_is_close_to_system_time() {
        let clock = BootClock::now();
        let wall = clock.wall(BootClock::boot_now_ns());
        let diff = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(diff < Duration::from_secs(1));
    }
}
