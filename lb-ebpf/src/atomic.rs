//! Atomics on map values shared by all CPUs. Rust's BPF target declares no compare-and-swap,
//! so `core`'s atomic types lack `fetch_add` and `compare_exchange` there, and the fetching
//! form of BPF's atomic add needs ISA v3, which aya-build's `--cpu generic` does not give.
//! The plain atomic add (the result unused) works on every BPF ISA and is all the counters
//! need. The compare-and-swap intrinsic is lowered to `BPF_CMPXCHG` by LLVM whatever the
//! CPU setting (the kernel has it since 5.12): the reply claims need it.

/// Adds `delta` (wrapping: `u64::MAX` subtracts one) to `*target` atomically.
///
/// # Safety
/// `target` must point into a map value valid for this program run.
#[inline(always)]
pub unsafe fn add(target: *mut u64, delta: u64) {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering, atomic_xadd};
        // SAFETY: per this function's contract.
        let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(target, delta) };
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        use core::sync::atomic::{AtomicU64, Ordering};
        // SAFETY: per this function's contract.
        unsafe { AtomicU64::from_ptr(target) }.fetch_add(delta, Ordering::Relaxed);
    }
}

/// Replaces `*target` by `new` if it is `current`, atomically; true if it did.
///
/// # Safety
/// `target` must point into a map value valid for this program run.
#[inline(always)]
pub unsafe fn compare_exchange(target: *mut u64, current: u64, new: u64) -> bool {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering, atomic_cxchg};
        // SAFETY: per this function's contract.
        unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                target, current, new,
            )
        }
        .1
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        use core::sync::atomic::{AtomicU64, Ordering};
        // SAFETY: per this function's contract.
        unsafe { AtomicU64::from_ptr(target) }
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}
