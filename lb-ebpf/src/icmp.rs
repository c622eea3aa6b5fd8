//! ICMP: translating errors about NATed flows, and rejecting flows to services with no
//! usable endpoint (kube-proxy's `REJECT --reject-with icmp-port-unreachable`).
use aya_ebpf::{
    helpers::generated::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{Ip6, Outcome, PROTO_ICMP, PROTO_ICMPV6, outcome};

use crate::{
    csum,
    nat::{self, replace_ip_addr},
    parse::{
        ETH_HLEN, ETH_P_IPV6, Flow, ICMP_CSUM_OFF, ICMP_DEST_UNREACH, ICMP_HLEN, ICMP_PORT_UNREACH,
        ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, INNER_IP_OFF, INNER_L4_OFF, IP_CSUM_OFF,
        IP_DST_OFF, IP_HLEN, IP_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_HLEN, IP6_SRC_OFF, Ipv4Hdr,
        Ipv6Hdr, L4_OFF,
    },
    verdict::TC_ACT_REDIRECT,
};

/// Which end of the embedded packet the NAT applies to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum InnerEnd {
    /// Embedded packet went client → backend (error travels back to the client): its
    /// destination becomes the VIP, and so does the outer source if the backend sent it.
    Destination,
    /// Embedded packet went VIP → client (error travels from the client to the backend): its
    /// source becomes the backend, and so does the outer destination.
    Source,
}

/// Rewrites the embedded header of an ICMP error (address, port, its IP checksum) and the
/// matching outer address, keeping the ICMP checksum right. The embedded L4 checksum is
/// left alone: it may be truncated, and receivers do not check it when matching errors.
#[inline(always)]
pub fn translate_error(
    ctx: &TcContext,
    outer: &Flow,
    inner: &Flow,
    end: InnerEnd,
    new_addr: u32,
    new_port: u16,
) -> Result<(), Outcome> {
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    let (addr_off, port_off, old_addr, old_port) = match end {
        InnerEnd::Destination => (IP_DST_OFF, 2, inner.dst, inner.dport),
        InnerEnd::Source => (IP_SRC_OFF, 0, inner.src, inner.sport),
    };
    let icmp_csum = L4_OFF + ICMP_CSUM_OFF;
    let inner_csum_off = INNER_IP_OFF + IP_CSUM_OFF;

    let old_inner_csum: u16 = ctx.load(inner_csum_off).map_err(failed)?;
    replace_ip_addr(ctx, INNER_IP_OFF, addr_off, old_addr, new_addr)?;
    let new_inner_csum: u16 = ctx.load(inner_csum_off).map_err(failed)?;
    ctx.store(INNER_L4_OFF + port_off, &new_port, 0)
        .map_err(failed)?;
    // The ICMP checksum covers the embedded bytes we just changed (no pseudo-header).
    ctx.l4_csum_replace(icmp_csum, old_addr as u64, new_addr as u64, 4)
        .map_err(failed)?;
    ctx.l4_csum_replace(icmp_csum, old_inner_csum as u64, new_inner_csum as u64, 2)
        .map_err(failed)?;
    ctx.l4_csum_replace(icmp_csum, old_port as u64, new_port as u64, 2)
        .map_err(failed)?;

    match end {
        InnerEnd::Destination if outer.src == old_addr => {
            replace_ip_addr(ctx, IP_OFF, IP_SRC_OFF, outer.src, new_addr)
        }
        InnerEnd::Source if outer.dst == old_addr => {
            replace_ip_addr(ctx, IP_OFF, IP_DST_OFF, outer.dst, new_addr)
        }
        _ => Ok(()),
    }
}

/// ICMP header plus the quoted IPv4 header and first 8 bytes of the offending packet.
#[repr(C)]
pub struct UnreachableBody {
    pub icmp_type: u8,
    pub code: u8,
    pub csum: u16,
    pub unused: u32,
    pub quoted: [u8; IP_HLEN + 8],
}

pub const REPLY_LEN: u32 = (ETH_HLEN + IP_HLEN + core::mem::size_of::<UnreachableBody>()) as u32;

/// The IPv4 header and ICMP body of a port unreachable from the frontend (`flow`'s
/// destination) back to its client, quoting the offending packet's first 28 bytes.
#[inline(always)]
pub fn unreachable(flow: &Flow, quoted: [u8; IP_HLEN + 8]) -> (Ipv4Hdr, UnreachableBody) {
    let mut body = UnreachableBody {
        icmp_type: ICMP_DEST_UNREACH,
        code: ICMP_PORT_UNREACH,
        csum: 0,
        unused: 0,
        quoted,
    };
    body.csum = csum::checksum(&mut body);
    let mut ip = Ipv4Hdr {
        ver_ihl: 0x45,
        tos: 0xc0, // IPTOS_PREC_INTERNETCONTROL, as the kernel's own ICMP errors
        tot_len: ((REPLY_LEN as usize - ETH_HLEN) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto: PROTO_ICMP,
        csum: 0,
        src: flow.dst,
        dst: flow.src,
    };
    ip.csum = csum::checksum(&mut ip);
    (ip, body)
}

/// Turns the packet into an ICMP port unreachable from the VIP back to the client and sends
/// it out of the interface it came from (towards the client pod).
#[inline(always)]
pub fn reject(ctx: &TcContext, flow: &Flow) -> Result<i32, Outcome> {
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    let macs: [u8; 12] = ctx.load(0).map_err(failed)?;
    let quoted: [u8; IP_HLEN + 8] = ctx.load(IP_OFF).map_err(failed)?;
    let (ip, body) = unreachable(flow, quoted);

    // SAFETY: plain helper call on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, REPLY_LEN, 0) } != 0 {
        return Err(outcome::DROP_REWRITE_FAILED);
    }
    let mut eth = [0u8; ETH_HLEN];
    eth[0..6].copy_from_slice(&macs[6..12]);
    eth[6..12].copy_from_slice(&macs[0..6]);
    eth[12] = 0x08;
    ctx.store(0, &eth, 0).map_err(failed)?;
    ctx.store(IP_OFF, &ip, 0).map_err(failed)?;
    ctx.store(L4_OFF, &body, 0).map_err(failed)?;
    bounce(ctx)
}

/// ICMPv6 header plus the quoted IPv6 header and first 8 bytes of the offending packet.
#[repr(C)]
pub struct Unreachable6Body {
    pub icmp_type: u8,
    pub code: u8,
    pub csum: u16,
    pub unused: u32,
    pub quoted: [u8; IP6_HLEN + 8],
}

pub const REPLY6_LEN: u32 = (ETH_HLEN + IP6_HLEN + core::mem::size_of::<Unreachable6Body>()) as u32;

/// The IPv6 header and ICMPv6 port unreachable (destination unreachable, code 4) from the
/// frontend (`flow`'s destination) back to its client, quoting the offending packet's first
/// 48 bytes.
#[inline(always)]
pub fn unreachable6(flow: &Flow<Ip6>, quoted: [u8; IP6_HLEN + 8]) -> (Ipv6Hdr, Unreachable6Body) {
    let mut body = Unreachable6Body {
        icmp_type: ICMPV6_DEST_UNREACH,
        code: ICMPV6_PORT_UNREACH,
        csum: 0,
        unused: 0,
        quoted,
    };
    body.csum = csum::icmp6_checksum(&flow.dst, &flow.src, &mut body);
    let ip = Ipv6Hdr {
        vtc_flow: 0x6000_0000u32.to_be(),
        payload_len: (core::mem::size_of::<Unreachable6Body>() as u16).to_be(),
        nexthdr: PROTO_ICMPV6,
        hop_limit: 64,
        src: flow.dst,
        dst: flow.src,
    };
    (ip, body)
}

/// `reject` for IPv6: the packet becomes an ICMPv6 port unreachable back to the client.
#[inline(always)]
pub fn reject6(ctx: &TcContext, flow: &Flow<Ip6>) -> Result<i32, Outcome> {
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    let macs: [u8; 12] = ctx.load(0).map_err(failed)?;
    let quoted: [u8; IP6_HLEN + 8] = ctx.load(IP_OFF).map_err(failed)?;
    let (ip, body) = unreachable6(flow, quoted);

    // SAFETY: plain helper call on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, REPLY6_LEN, 0) } != 0 {
        return Err(outcome::DROP_REWRITE_FAILED);
    }
    let mut eth = [0u8; ETH_HLEN];
    eth[0..6].copy_from_slice(&macs[6..12]);
    eth[6..12].copy_from_slice(&macs[0..6]);
    eth[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    ctx.store(0, &eth, 0).map_err(failed)?;
    ctx.store(IP_OFF, &ip, 0).map_err(failed)?;
    ctx.store(IP_OFF + IP6_HLEN, &body, 0).map_err(failed)?;
    bounce(ctx)
}

/// Sends the packet back out of the interface it came in on (towards the client pod).
#[inline(always)]
fn bounce(ctx: &TcContext) -> Result<i32, Outcome> {
    // SAFETY: reading the skb's own ifindex field.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; egress of the pod's host-side interface leads to the pod.
    let verdict = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if verdict == TC_ACT_REDIRECT {
        Ok(verdict)
    } else {
        Err(outcome::DROP_REWRITE_FAILED)
    }
}

/// `translate_error` for ICMPv6: the embedded address (16 bytes) and port change, and so
/// does the matching outer address. The ICMPv6 checksum covers the message and, unlike
/// ICMP's, a pseudo-header with the outer addresses.
#[inline(always)]
pub fn translate_error6(
    ctx: &TcContext,
    outer: &Flow<Ip6>,
    inner: &Flow<Ip6>,
    end: InnerEnd,
    new_addr: Ip6,
    new_port: u16,
) -> Result<(), Outcome> {
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    let inner_ip = outer.l4_off as usize + ICMP_HLEN;
    let (addr_off, port_off, old_addr, old_port) = match end {
        InnerEnd::Destination => (IP6_DST_OFF, 2, inner.dst, inner.dport),
        InnerEnd::Source => (IP6_SRC_OFF, 0, inner.src, inner.sport),
    };
    let icmp_csum = outer.l4_off as usize + ICMP_CSUM_OFF;
    let diff = nat::addr_diff(&old_addr, &new_addr);
    ctx.store(inner_ip + addr_off, &new_addr, 0)
        .map_err(failed)?;
    ctx.l4_csum_replace(icmp_csum, 0, diff, 0).map_err(failed)?;
    ctx.store(inner.l4_off as usize + port_off, &new_port, 0)
        .map_err(failed)?;
    ctx.l4_csum_replace(icmp_csum, old_port as u64, new_port as u64, 2)
        .map_err(failed)?;
    let outer_off = match end {
        InnerEnd::Destination if outer.src == old_addr => IP6_SRC_OFF,
        InnerEnd::Source if outer.dst == old_addr => IP6_DST_OFF,
        _ => return Ok(()),
    };
    nat::pseudo_csum_replace(ctx, icmp_csum, diff, 0)?;
    ctx.store(IP_OFF + outer_off, &new_addr, 0).map_err(failed)
}
