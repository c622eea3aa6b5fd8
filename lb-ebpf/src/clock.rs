//! The datapath's clock: CLOCK_MONOTONIC nanoseconds at tick resolution, for flow
//! lifetimes and affinity timeouts (seconds).
//!
//! `bpf_ktime_get_coarse_ns` is a helper call that reads the timekeeper under its seqcount,
//! and on the bench's AMD EPYC every call pays its return through the Safe-RET thunk.
//! `bpf_jiffies64` the verifier inlines into one load of `jiffies_64`, which the kernel
//! advances by one per tick in step with CLOCK_MONOTONIC (`tick_do_update_jiffies64` counts
//! the ticks of that clock). The agent measures the line between the two once per load
//! (`xlb_clock_probe` below; the agent's `load` and `datapath::clock::fit`) and writes it
//! into `XLB_CLOCK_LINE` before any program is attached; where it could not, the line stays
//! zero and the helper is called.
use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_PASS},
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};

/// The line from jiffies to CLOCK_MONOTONIC nanoseconds, [ns per jiffy, offset]
/// (`lb_common::map_names::CLOCK`): a global in a section of its own, so that a read is a
/// load from the map's value (no lookup call, no register spilled around one: the IPv6
/// XDP stage had no stack to spare) and the agent's write reaches only it.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".bss.xlb_clock")]
static mut XLB_CLOCK_LINE: [u64; 2] = [0; 2];

/// CLOCK_MONOTONIC, coarse (up to a tick behind): jiffies along the agent's line, which
/// reads what `bpf_ktime_get_coarse_ns` would, within a tick (the helper itself without a
/// line). A time stamp written by userspace (precise clock) may be slightly ahead of it:
/// ages are taken with `saturating_sub`, so such a stamp counts as fresh, not as ancient.
///
/// A BPF subprogram, not inlined: to the callers' code LLVM sees a call, as it saw the
/// helper's, so the programs' register allocation (and stack frames, each at the
/// verifier's 512 bytes with its callees) stays as it was; inlined, the multiply and the
/// line's loads pushed three programs over. The call's return costs about half the helper.
#[inline(never)]
pub fn now_ns() -> u64 {
    // SAFETY: reads of the global (the agent writes it once, before attaching, and never
    // again); the helpers have no side effects (`bpf_jiffies64` the verifier inlines).
    unsafe {
        let line = &raw const XLB_CLOCK_LINE;
        let tick = core::ptr::read_volatile(&(*line)[0]);
        if tick == 0 {
            return bpf_ktime_get_coarse_ns();
        }
        bpf_jiffies64()
            .wrapping_mul(tick)
            .wrapping_add(core::ptr::read_volatile(&(*line)[1]))
    }
}

/// Writes `jiffies_64` and the coarse clock, read back to back, into the first 16 bytes of
/// the packet (native byte order) for the agent's calibration.
#[inline(always)]
pub fn probe(ctx: &XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 16 > end {
        return XDP_ABORTED;
    }
    // SAFETY: helpers without side effects; the 16 bytes are inside the packet (checked).
    unsafe {
        let jiffies = bpf_jiffies64();
        let ns = bpf_ktime_get_coarse_ns();
        (data as *mut u64).write_unaligned(jiffies);
        ((data + 8) as *mut u64).write_unaligned(ns);
    }
    XDP_PASS
}
