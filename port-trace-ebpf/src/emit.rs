//! The ring buffer, the loss counter, and building events.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_ktime_get_boot_ns},
    },
    macros::map,
    maps::{ring_buf::RingBufEntry, PerCpuArray, RingBuf},
};
use port_trace_common::{flags, RawEvent};

/// Events for userspace. The loader may resize it (`--ring-buffer-size`).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Failed ring-buffer reservations, per CPU: the ring buffer has no loss
/// counter of its own.
#[map(name = "LOST")]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The ring-buffer bytes of one event: the record and its 8-byte header
/// (`BPF_RINGBUF_HDR_SZ`), the length rounded up to 8 (`__bpf_ringbuf_reserve`).
const RECORD_BYTES: u64 = ((core::mem::size_of::<RawEvent>() as u64 + 7) & !7) + 8;

/// An event being written straight into its ring-buffer slot (the BPF stack
/// is too small for copies).
pub struct Event(RingBufEntry<RawEvent>);

impl Event {
    /// The event's fields.
    #[inline(always)]
    pub fn fields(&mut self) -> &mut RawEvent {
        // SAFETY: `start` initialised the slot.
        unsafe { &mut *self.0.as_mut_ptr() }
    }

    /// Hands the event to userspace, waking the reader only when this
    /// record carries the backlog across a multiple of `wakeup_bytes`: a
    /// wake-up per event (`bpf_ringbuf_commit`'s default when the reader
    /// has caught up) costs an `irq_work` and a context switch each; the
    /// reader polls on a timer for the rest.
    ///
    /// Waking on every record while the backlog stays above the threshold
    /// (as this did before) costs most when the reader cannot run: each
    /// `BPF_RB_FORCE_WAKEUP` queues the `irq_work` (a self-IPI, a VM exit
    /// on a guest) and `bpf_ringbuf_notify` walks the wait queue again.
    /// With the reader stopped (`SIGSTOP`) under wrk, the programs took 39 µs
    /// per request that way. Crossings bound the wake-ups to eight per
    /// ring-full whatever the backlog, and one missed by racing producers
    /// is made up at the next multiple or by the reader's timer.
    #[inline(always)]
    pub fn submit(self) {
        let flags = match core::num::NonZeroU64::new(u64::from(crate::sk::setting!(wakeup_bytes))) {
            None => 0,
            Some(threshold) => {
                // Includes this record: `bpf_ringbuf_reserve` moved the
                // producer position past it.
                let waiting = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
                let before = waiting.saturating_sub(RECORD_BYTES);
                if waiting / threshold != before / threshold {
                    BPF_RB_FORCE_WAKEUP as u64
                } else {
                    BPF_RB_NO_WAKEUP as u64
                }
            }
        };
        self.0.submit(flags);
    }
}

/// Reserves a slot for an event of `kind` and fills in the time and, when
/// `process` is set, the current task's identity; counts the event as lost
/// when the ring buffer is full.
#[inline(always)]
pub fn start(kind: u16, process: bool) -> Option<Event> {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        if let Some(counter) = LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe { *counter += 1 };
        }
        return None;
    };
    // SAFETY: the slot is a whole, 8-byte aligned RawEvent.
    unsafe { zero(entry.as_mut_ptr()) };
    let mut ev = Event(entry);
    let f = ev.fields();
    f.kind = kind;
    // SAFETY: helper without preconditions.
    f.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    f.pid_tgid = bpf_get_current_pid_tgid();
    f.syscall_nr = -1;
    if process {
        f.flags |= flags::PROCESS_CONTEXT;
        // SAFETY: helper without preconditions.
        f.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        // SAFETY: the helper writes at most (and NUL-pads to) the size given.
        unsafe { bpf_get_current_comm(f.comm.as_mut_ptr().cast(), f.comm.len() as u32) };
    }
    Some(ev)
}

/// Zeroes an event with sixteen word stores.
///
/// `*ev = RawEvent::default()` compiles to calls of the `memset` that
/// bpf-linker links in, a byte-at-a-time loop: some 600 instructions per
/// event. Volatile stores cannot be merged back into such a call.
///
/// # Safety
/// `ev` must be valid for writes of a whole `RawEvent` and 8-byte aligned.
#[inline(always)]
pub unsafe fn zero(ev: *mut RawEvent) {
    let words = ev.cast::<u64>();
    for i in 0..core::mem::size_of::<RawEvent>() / 8 {
        // SAFETY: in bounds and aligned (the caller's promise).
        unsafe { words.add(i).write_volatile(0) };
    }
}

/// Stores an IPv6 (or, in the first word, IPv4) address with word stores
/// rather than a `memcpy` call (see [`zero`]). `RawEvent`'s address fields
/// are 8-byte aligned (checked in `port_trace_common`).
#[inline(always)]
pub fn store_addr(dst: &mut [u8; 16], words: [u32; 4]) {
    let out = dst.as_mut_ptr().cast::<u32>();
    for (i, word) in words.into_iter().enumerate() {
        // SAFETY: four aligned words inside `dst`.
        unsafe { out.add(i).write_volatile(word) };
    }
}
