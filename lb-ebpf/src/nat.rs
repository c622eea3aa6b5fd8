//! Address/port rewrites with incremental checksum updates.
//!
//! The kernel helpers are used instead of recomputing sums because pod traffic over veth is
//! usually CHECKSUM_PARTIAL: only the pseudo-header part of the L4 checksum may be touched,
//! which `BPF_F_PSEUDO_HDR` handles. `BPF_F_MARK_MANGLED_0` keeps a zero UDP checksum zero.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{Outcome, PROTO_UDP, outcome};

use crate::parse::{Flow, IP_CSUM_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF, L4_OFF};

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
    let mangled0 = if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = flow.csum_off(L4_OFF);
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
        )
        .map_err(failed)?;
        replace_ip_addr(ctx, IP_OFF, addr_off, old_addr, new_addr)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled0 | 2)
            .map_err(failed)?;
        ctx.store(L4_OFF + port_off, &new_port, 0).map_err(failed)?;
    }
    Ok(())
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
