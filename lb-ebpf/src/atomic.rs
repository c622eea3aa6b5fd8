//! Atomic add on map values shared by all CPUs. The BPF target has no compare-and-swap, so
//! `core`'s atomic types lack `fetch_add` there, and the fetching form of BPF's atomic add
//! needs ISA v3, which aya-build's `--cpu generic` does not give. The plain atomic add (the
//! result unused) works on every BPF ISA and is all the counters need.

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
