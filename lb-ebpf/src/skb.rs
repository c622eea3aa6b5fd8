//! What the kernel knows about a TC packet's L4 checksum (`ip_summed` of its `struct
//! sk_buff`), so that a rewrite can update the checksum inline instead of through
//! `bpf_l4_csum_replace`: two helper calls per NATed packet, each paying its return through
//! the Safe-RET thunk (43 ns of an established ClusterIP packet's 148 on the bench's AMD EPYC).
//!
//! The context (`__sk_buff`) does not show `ip_summed`. The kfunc `bpf_cast_to_kern_ctx`
//! turns it into the kernel's `struct sk_buff *`, and the verifier replaces that call with a
//! register move, so the read is one load. The object carries a placeholder helper call that
//! the loader rewrites into the kfunc call (the pinned aya resolves no kfuncs), and the loader
//! stores where the field lies (from the kernel's BTF) in a read-only global. The verifier
//! sees that global's value: the load has a constant offset, and where the loader found no
//! kfunc or field (0) the read is dead code and the helpers are used.
use aya_ebpf::programs::TcContext;
use lb_common::skb_access::CAST_TO_KERN_CTX_MARKER;

/// `lb_common::skb_access::IP_SUMMED_BIT`, set by the loader.
#[unsafe(no_mangle)]
static XLB_SKB_IP_SUMMED_BIT: u32 = 0;

/// `ip_summed` values (include/linux/skbuff.h): NONE (0) and UNNECESSARY (1), the L4
/// checksum field holds the whole checksum; PARTIAL (3), it holds only the pseudo-header sum
/// and the device or `skb_checksum_help` completes it (what pods send over veth); COMPLETE
/// (2), the skb's `csum` must follow a pseudo-header change, which only the helper can write.
pub const CHECKSUM_COMPLETE: u8 = 2;

/// The packet's `ip_summed`, or CHECKSUM_COMPLETE (the helpers' case) where the loader
/// found no way to read it.
#[inline(always)]
pub fn ip_summed(ctx: &TcContext) -> u8 {
    // SAFETY: a global of the object, read as the loader left it.
    let bit = unsafe { core::ptr::read_volatile(&raw const XLB_SKB_IP_SUMMED_BIT) };
    if bit == 0 {
        return CHECKSUM_COMPLETE;
    }
    // SAFETY: the loader made the marker call a call of `bpf_cast_to_kern_ctx` (it set `bit`
    // only then), which returns the context's `struct sk_buff`; the verifier checks the
    // byte load against the kernel's BTF of that struct.
    unsafe {
        let cast: unsafe extern "C" fn(*mut core::ffi::c_void) -> *const u8 =
            core::mem::transmute(CAST_TO_KERN_CTX_MARKER as usize);
        let skb = cast(ctx.skb.skb.cast());
        (core::ptr::read_volatile(skb.add((bit >> 3) as usize)) >> (bit & 7)) & 3
    }
}
