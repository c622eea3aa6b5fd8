//! Checksums for packets we build ourselves (rewrites use the kernel's incremental helpers).
use aya_ebpf::helpers::generated::bpf_csum_diff;

/// Internet checksum of `words` (a whole header, length a multiple of 4), ready to store
/// as-is: the one's-complement sum is byte-order independent.
#[inline(always)]
pub fn checksum<T>(header: &mut T) -> u16 {
    let len = core::mem::size_of::<T>() as u32;
    // SAFETY: `header` is a live stack value of `len` bytes; the helper only reads it.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, (header as *mut T).cast(), len, 0) };
    fold(sum as u64)
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
