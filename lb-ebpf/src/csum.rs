//! Checksums: of packets we build ourselves, and incremental updates (RFC 1624) where a
//! rewrite may compute them inline (`nat` on TC says where it may not).
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

/// Internet checksum of an ICMPv6 message `body` from `src` to `dst`: the IPv6
/// pseudo-header (addresses, upper-layer length, next header 58) and the message.
#[inline(always)]
pub fn icmp6_checksum<T>(src: &lb_common::Ip6, dst: &lb_common::Ip6, body: &mut T) -> u16 {
    let len = core::mem::size_of::<T>() as u32;
    let mut pseudo = Pseudo6 {
        src: *src,
        dst: *dst,
        len: len.to_be(),
        next: u32::from(lb_common::PROTO_ICMPV6).to_be(),
    };
    // SAFETY: live stack values of the lengths given; the helper only reads them.
    let sum = unsafe {
        let seed = bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            (&mut pseudo as *mut Pseudo6).cast(),
            core::mem::size_of::<Pseudo6>() as u32,
            0,
        );
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            (body as *mut T).cast(),
            len,
            seed as u32,
        )
    };
    fold(sum as u32 as u64)
}

#[repr(C)]
struct Pseudo6 {
    src: lb_common::Ip6,
    dst: lb_common::Ip6,
    len: u32,
    next: u32,
}

/// The TTL's part of its IPv4 checksum word (TTL and protocol share one 16-bit word):
/// lowering the TTL by one lowers the word by this much (`replace2(csum, TTL_ONE, 0)`).
pub const TTL_ONE: u16 = 0x0100u16.to_be();

/// RFC 1624: HC' = ~(~HC + ~m + m'), on values as stored (byte order cancels out).
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    apply(check, diff4(old, new))
}

#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    apply(check, diff2(old, new))
}

/// The checksum `check` after changes whose word sums (`~m + m'`) add up to `diff`.
#[inline(always)]
pub fn apply(check: u16, diff: u64) -> u16 {
    apply_flipped(check, 0xffff, diff)
}

/// [`apply`] (`flip` 0xffff) or, `flip` 0, the same change to a field that holds a sum
/// uncomplemented: the pseudo-header sum of a CHECKSUM_PARTIAL packet's L4 checksum.
#[inline(always)]
pub fn apply_flipped(check: u16, flip: u16, diff: u64) -> u16 {
    fold16(u64::from(check ^ flip) + diff) ^ flip
}

/// `~m + m'` of replacing 16-bit word `old` by `new`.
#[inline(always)]
pub fn diff2(old: u16, new: u16) -> u64 {
    u64::from(!old) + u64::from(new)
}

/// `~m + m'` of replacing a 32-bit value (two words).
#[inline(always)]
pub fn diff4(old: u32, new: u32) -> u64 {
    u64::from(!old & 0xffff)
        + u64::from(!old >> 16)
        + u64::from(new & 0xffff)
        + u64::from(new >> 16)
}

/// `~m + m'` of replacing a 16-byte (IPv6) address.
#[inline(always)]
pub fn diff16(old: &lb_common::Ip6, new: &lb_common::Ip6) -> u64 {
    old.iter()
        .zip(new)
        .map(|(old, new)| diff4(*old, *new))
        .sum()
}

#[inline(always)]
fn fold16(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
