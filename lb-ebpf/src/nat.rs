//! Address/port rewrites with incremental checksum updates.
//!
//! Pod traffic over veth is usually CHECKSUM_PARTIAL: only the pseudo-header part of its L4
//! checksum may be touched. A rewrite reads which kind the skb has (`skb`) and updates the
//! L4 checksum inline; where it cannot (CHECKSUM_COMPLETE, an old kernel, headers not
//! linear, IPv6 extension headers), the kernel's helpers do (`BPF_F_PSEUDO_HDR`).
//! A zero UDP checksum stays zero (`BPF_F_MARK_MANGLED_0`). Everything else (addresses,
//! ports, the IPv4 header checksum) is written in place when the headers are linear.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{Ip6, Outcome, PROTO_UDP, outcome};

use crate::{
    csum::{apply_flipped, diff2, diff4, diff16, replace4},
    parse::{
        Flow, IP_CSUM_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_SRC_OFF, L4_DIRECT,
        L4_OFF, headers_in_place,
    },
    skb::{self, CHECKSUM_COMPLETE},
    words,
};

/// DNAT: destination becomes `addr:port`.
#[inline(always)]
pub fn rewrite_dst(ctx: &TcContext, flow: &Flow, addr: u32, port: u16) -> Result<(), Outcome> {
    rewrite(ctx, flow, IP_DST_OFF, 2, flow.dst, addr, flow.dport, port)
}

/// Reverse NAT: source becomes `addr:port`.
#[inline(always)]
pub fn rewrite_src(ctx: &TcContext, flow: &Flow, addr: u32, port: u16) -> Result<(), Outcome> {
    rewrite(ctx, flow, IP_SRC_OFF, 0, flow.src, addr, flow.sport, port)
}

#[expect(
    clippy::too_many_arguments,
    reason = "inlined; keeps both directions on one path"
)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    addr_off: usize,
    port_off: usize,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), Outcome> {
    let udp = flow.proto == PROTO_UDP;
    let mangled0 = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let csum_off = flow.csum_off(L4_OFF);
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    if let Some(data) = headers_in_place(ctx, L4_OFF + 4) {
        // The IPv4 header's own checksum is never offloaded: updated inline, as are the
        // stores. The L4 checksum is too unless the skb is CHECKSUM_COMPLETE (`skb`) or the
        // field is not in the linear data.
        let summed = skb::ip_summed(ctx);
        let field = data + csum_off;
        let inline = summed != CHECKSUM_COMPLETE && field + 2 <= ctx.data_end();
        // SAFETY: the IPv4 header and the ports lie inside the linear data (checked above),
        // and the L4 checksum field when `inline`.
        unsafe {
            let mut addr = 0;
            if old_addr != new_addr {
                let csum = (data + IP_OFF + IP_CSUM_OFF) as *mut u16;
                csum.write_unaligned(replace4(csum.read_unaligned(), old_addr, new_addr));
                ((data + IP_OFF + addr_off) as *mut u32).write_unaligned(new_addr);
                addr = diff4(old_addr, new_addr);
            }
            let mut port = 0;
            if old_port != new_port {
                ((data + L4_OFF + port_off) as *mut u16).write_unaligned(new_port);
                port = diff2(old_port, new_port);
            }
            if inline {
                fold_l4(field as *mut u16, summed, udp, addr, port);
                return Ok(());
            }
        }
    } else {
        if old_addr != new_addr {
            replace_ip_addr(ctx, IP_OFF, addr_off, old_addr, new_addr)?;
        }
        if old_port != new_port {
            ctx.store(L4_OFF + port_off, &new_port, 0).map_err(failed)?;
        }
    }
    // After the direct writes: these helpers may move the packet's data.
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
        )
        .map_err(failed)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled0 | 2)
            .map_err(failed)?;
    }
    Ok(())
}

/// Folds a rewrite into the L4 checksum field at `field` as `bpf_l4_csum_replace` would for
/// `ip_summed` `summed` (anything but CHECKSUM_COMPLETE): `addr` is the word sum of the
/// address change (in the pseudo-header), `port` that of the port change (in the L4 header,
/// which the device sums itself under CHECKSUM_PARTIAL). No branch on `summed`: each
/// multiplied the verifier's walk of the programs after it. A zero UDP checksum means none
/// and stays zero; one that comes out zero is stored as 0xffff (`BPF_F_MARK_MANGLED_0`).
///
/// # Safety
/// `field..field + 2` lies in the packet's linear data.
#[inline(always)]
unsafe fn fold_l4(field: *mut u16, summed: u8, udp: bool, addr: u64, port: u64) {
    // SAFETY: the caller's.
    let check = unsafe { field.read_unaligned() };
    if udp && check == 0 {
        return;
    }
    // CHECKSUM_PARTIAL is 3, the only value with both bits set (BPF has no set-on-compare).
    let partial = summed & (summed >> 1) & 1;
    let whole = u64::from(partial ^ 1);
    let check = apply_flipped(check, (whole * 0xffff) as u16, addr + whole * port);
    // SAFETY: the caller's.
    unsafe { field.write_unaligned(if udp && check == 0 { 0xffff } else { check }) };
}

/// Stores a new address in the IPv4 header at `ip_off` and fixes that header's checksum.
#[inline(always)]
pub fn replace_ip_addr(
    ctx: &TcContext,
    ip_off: usize,
    addr_off: usize,
    old: u32,
    new: u32,
) -> Result<(), Outcome> {
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    ctx.l3_csum_replace(ip_off + IP_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(failed)?;
    ctx.store(ip_off + addr_off, &new, 0).map_err(failed)
}

/// `bpf_l4_csum_replace` flag (kernel 6.16+): the packet is IPv6, so a pseudo-header change
/// must not be folded into a CHECKSUM_COMPLETE `skb->csum`. Older kernels refuse the flag;
/// the rewrite then retries without it (what every kernel before it did).
const BPF_F_IPV6: u64 = 1 << 7;

/// IPv6 DNAT: destination becomes `addr:port`.
#[inline(always)]
pub fn rewrite6_dst(
    ctx: &TcContext,
    flow: &Flow<Ip6>,
    addr: Ip6,
    port: u16,
) -> Result<(), Outcome> {
    rewrite6(
        ctx,
        flow,
        IP6_DST_OFF,
        2,
        &flow.dst,
        &addr,
        flow.dport,
        port,
    )
}

/// IPv6 reverse NAT: source becomes `addr:port`.
#[inline(always)]
pub fn rewrite6_src(
    ctx: &TcContext,
    flow: &Flow<Ip6>,
    addr: Ip6,
    port: u16,
) -> Result<(), Outcome> {
    rewrite6(
        ctx,
        flow,
        IP6_SRC_OFF,
        0,
        &flow.src,
        &addr,
        flow.sport,
        port,
    )
}

/// IPv6 has no header checksum: only the L4 checksum changes, through its pseudo-header
/// for the address (a 16-byte difference from `bpf_csum_diff`) and directly for the port.
/// UDP checksums are never zero here (the parser refused those), and an update that
/// comes out zero is stored as 0xffff (`BPF_F_MARK_MANGLED_0`).
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; keeps both directions on one path"
)]
#[inline(always)]
fn rewrite6(
    ctx: &TcContext,
    flow: &Flow<Ip6>,
    addr_off: usize,
    port_off: usize,
    old_addr: &Ip6,
    new_addr: &Ip6,
    old_port: u16,
    new_port: u16,
) -> Result<(), Outcome> {
    let mangled0 = if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let l4_off = flow.l4_off as usize;
    let csum_off = flow.csum_off(l4_off);
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    // In place without extension headers (constant offsets), as for IPv4, the checksum too
    // unless the skb is CHECKSUM_COMPLETE (`skb`).
    match headers_in_place(ctx, L4_DIRECT + 4) {
        Some(data) if l4_off == L4_DIRECT => {
            let summed = skb::ip_summed(ctx);
            let field = data + flow.csum_off(L4_DIRECT);
            let inline = summed != CHECKSUM_COMPLETE && field + 2 <= ctx.data_end();
            // SAFETY: the IPv6 header and the ports lie inside the linear data (checked),
            // and the L4 checksum field when `inline`.
            unsafe {
                let mut addr = 0;
                if old_addr != new_addr {
                    words::copy((data + IP_OFF + addr_off) as *mut Ip6, new_addr);
                    addr = diff16(old_addr, new_addr);
                }
                let mut port = 0;
                if old_port != new_port {
                    ((data + L4_DIRECT + port_off) as *mut u16).write_unaligned(new_port);
                    port = diff2(old_port, new_port);
                }
                if inline {
                    fold_l4(
                        field as *mut u16,
                        summed,
                        flow.proto == PROTO_UDP,
                        addr,
                        port,
                    );
                    return Ok(());
                }
            }
        }
        _ => {
            if old_addr != new_addr {
                ctx.store(IP_OFF + addr_off, new_addr, 0).map_err(failed)?;
            }
            if old_port != new_port {
                ctx.store(l4_off + port_off, &new_port, 0).map_err(failed)?;
            }
        }
    }
    // After the direct writes: these helpers may move the packet's data.
    if old_addr != new_addr {
        let diff = addr_diff(old_addr, new_addr);
        pseudo_csum_replace(ctx, csum_off, diff, mangled0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled0 | 2)
            .map_err(failed)?;
    }
    Ok(())
}

/// The checksum difference of replacing address `old` by `new` (16 bytes each).
#[inline(always)]
pub fn addr_diff(old: &Ip6, new: &Ip6) -> u64 {
    // SAFETY: both are 16-byte stack values; the helper only reads them.
    unsafe {
        bpf_csum_diff(
            old.as_ptr() as *mut u32,
            16,
            new.as_ptr() as *mut u32,
            16,
            0,
        ) as u32 as u64
    }
}

/// Applies an address difference to the L4 checksum at `csum_off` through its IPv6
/// pseudo-header.
#[inline(always)]
pub fn pseudo_csum_replace(
    ctx: &TcContext,
    csum_off: usize,
    diff: u64,
    extra: u64,
) -> Result<(), Outcome> {
    let flags = BPF_F_PSEUDO_HDR as u64 | extra;
    if ctx
        .l4_csum_replace(csum_off, 0, diff, flags | BPF_F_IPV6)
        .is_ok()
    {
        return Ok(());
    }
    ctx.l4_csum_replace(csum_off, 0, diff, flags)
        .map_err(|_| outcome::DROP_REWRITE_FAILED)
}
