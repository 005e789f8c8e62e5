//! State carried through one system call on one thread: from a hook that runs
//! before the kernel picks a port (`connect4`, `bind4`) to the hook that sees
//! the outcome later in the same call (`sys_exit_connect`, `post_bind4`,
//! `sys_exit_bind`), and from a function probe's entry to its exit (the
//! precise and kprobe backends: `inet_hash_connect`, `get_port`).
//!
//! A hash map keyed by `pid_tgid` costs an insert, a lookup and a delete per
//! call, each taking a bucket lock: about 300 ns per `connect()` under the
//! benchmark's TCP storm. Here a thread uses the slot of an array indexed by the
//! low bits of its thread id, which needs no lock. The loader sizes the
//! arrays ([`SLOTS`] by default, `in_call_slots_mask` + 1), so thread ids
//! below that (every thread where `kernel.pid_max` is at most that: the
//! kernel's default up to 32 CPUs) never share a slot. Where they can (a
//! larger `pid_max`), a thread claims its slot with an atomic add and, when
//! another call holds it, keeps its state in a hash map instead: nothing is
//! lost, it only costs what every call cost before.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, LruHashMap},
    programs::TracePointContext,
    EbpfContext,
};

pub use port_trace_common::IN_CALL_SLOTS as SLOTS;

/// Spilled calls (slot taken by another thread whose id has the same low
/// bits) per table.
pub const SPILLED: u32 = 4096;

/// Calls kept in the spill maps now, over all tables: an upper bound (an
/// entry an LRU map evicts is never taken back and stays counted). While it
/// is 0, [`take`] needs no hash lookup, and most of its callers find nothing:
/// `sys_exit_connect` after an `AF_UNIX` connect, `sys_exit_bind` after a
/// netlink bind or a bind `post_bind` already took.
#[map(name = "IN_CALL_SPILLED")]
static SPILLED_NOW: Array<u64> = Array::with_max_entries(1, 0);

/// One thread's call in flight.
#[repr(C)]
pub struct Slot<T> {
    /// `pid_tgid` of the thread whose call `value` belongs to; 0 when free.
    owner: u64,
    /// Claims on the slot: 1 while a call holds it (more only for an
    /// instant, while a colliding thread tries and gives up).
    claims: u64,
    value: T,
}

/// Copies `T` with word stores: a struct assignment compiles to a call of
/// bpf-linker's byte-loop `memcpy` (see `emit::zero`).
///
/// # Safety
/// Both pointers valid and 8-byte aligned (`put` asserts `T` is a whole
/// number of words and 8-byte aligned).
#[inline(always)]
unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    let (dst, src) = (dst.cast::<u64>(), src.cast::<u64>());
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: in bounds and aligned (the caller's promise).
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
}

/// Adds `n` (wrapping: `u64::MAX` takes one away) to a counter in map
/// memory atomically. The result is not used, so this is BPF's oldest atomic
/// instruction (`lock xadd`), which needs no newer instruction set.
///
/// # Safety
/// `counter` valid for writes and 8-byte aligned.
#[inline(always)]
unsafe fn add(counter: *mut u64, n: u64) {
    // SAFETY: the caller's promise.
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(counter, n) };
}

/// The current thread's slot of `slots`.
#[inline(always)]
fn slot_of<T>(slots: &Array<Slot<T>>, me: u64) -> Option<*mut Slot<T>> {
    slots.get_ptr_mut(me as u32 & crate::sk::setting!(in_call_slots_mask))
}

/// Keeps `value` for the current thread until [`take`].
#[inline(always)]
pub fn put<T: Copy>(slots: &Array<Slot<T>>, spilled: &LruHashMap<u64, T>, value: &T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8) && core::mem::align_of::<T>() == 8) };
    let me = bpf_get_current_pid_tgid();
    if let Some(slot) = slot_of(slots, me) {
        // SAFETY: a map value, valid for the program's run; the fields are
        // only written by the thread that holds the claim.
        unsafe {
            if (&raw const (*slot).owner).read_volatile() == me {
                // Still ours: a call whose end we never saw (io_uring's
                // connect and bind do not pass the syscall tracepoints).
                copy_words(&raw mut (*slot).value, value);
                return;
            }
            add(&raw mut (*slot).claims, 1);
            if (&raw const (*slot).claims).read_volatile() == 1 {
                copy_words(&raw mut (*slot).value, value);
                (&raw mut (*slot).owner).write_volatile(me);
                return;
            }
            // Another thread's call holds it: give the claim back.
            add(&raw mut (*slot).claims, u64::MAX);
        }
    }
    if let Some(count) = SPILLED_NOW.get_ptr_mut(0) {
        // SAFETY: map memory; counted before the entry exists.
        unsafe { add(count, 1) };
    }
    let _ = spilled.insert(me, value, 0);
}

/// Takes back what [`put`] kept for the current thread, if anything.
#[inline(always)]
pub fn take<T: Copy>(slots: &Array<Slot<T>>, spilled: &LruHashMap<u64, T>) -> Option<T> {
    let me = bpf_get_current_pid_tgid();
    if let Some(slot) = slot_of(slots, me) {
        // SAFETY: as in `put`; only the owner reads and frees its slot.
        unsafe {
            if (&raw const (*slot).owner).read_volatile() == me {
                let mut value = core::mem::MaybeUninit::<T>::uninit();
                copy_words(value.as_mut_ptr(), &raw const (*slot).value);
                (&raw mut (*slot).owner).write_volatile(0);
                add(&raw mut (*slot).claims, u64::MAX);
                return Some(value.assume_init());
            }
        }
    }
    let count = SPILLED_NOW.get_ptr_mut(0)?;
    // SAFETY: map memory.
    if unsafe { count.read_volatile() } == 0 {
        return None;
    }
    // SAFETY: map value read by copy.
    let value = unsafe { spilled.get(me) }.copied()?;
    let _ = spilled.remove(me);
    // SAFETY: map memory; uncounted after the entry is gone.
    unsafe { add(count, u64::MAX) };
    Some(value)
}

/// Offset of `ret` in the `syscalls:sys_exit_*` record (after the common
/// fields and `__syscall_nr`, as the tracepoint's `format` file says).
const SYS_EXIT_RET_OFFSET: usize = 16;

/// The return value of the call a `syscalls:sys_exit_*` tracepoint reports.
/// A direct load from the record (the verifier allows aligned reads of a
/// tracepoint context), where `read_at` costs a `bpf_probe_read_kernel`.
#[inline(always)]
pub fn sys_exit_ret(ctx: &TracePointContext) -> i32 {
    // SAFETY: inside the record, 8-byte aligned.
    unsafe { ctx.as_ptr().cast::<u8>().add(SYS_EXIT_RET_OFFSET).cast::<i64>().read() as i32 }
}
