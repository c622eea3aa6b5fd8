//! Traffic entering the node from outside (XDP on `--external-ifaces`): NodePort, externalIP
//! and LoadBalancer-IP frontends in the external scope, and the replies of SNATed flows whose
//! backend is on another node. Translated packets are forwarded from here when the route
//! leads back out of the same interface (XDP_TX after a FIB lookup); packets for local pods
//! or other interfaces go to the kernel's forwarding, which needs no netfilter rules.
//!
//! Checksums are updated incrementally and assume complete checksums, as NICs deliver them.
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext,
};
use lb_common::{Outcome, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, outcome};

use crate::{
    csum::{TTL_ONE, replace2, replace4},
    ct,
    family::V4,
    filter,
    hop::{self, Cached},
    icmp::{self, REPLY_LEN, UnreachableBody},
    parse::{self, ETH_HLEN, Flow, IP_HLEN, Ipv4Hdr},
    read::Read,
    route,
    svc::{self, Decision, Look, Lookup},
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
const IP_MF_OFFSET_BE: u16 = 0x3fffu16.to_be();
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// Runs the external path; returns the XDP verdict and the outcome to count.
#[inline(always)]
pub fn external(ctx: &XdpContext) -> (u32, Outcome) {
    match run(ctx) {
        Ok(done) => done,
        Err(o) if lb_common::is_drop(o) => (xdp_action::XDP_DROP, o),
        Err(o) => (xdp_action::XDP_PASS, o),
    }
}

/// Pointers into a parsed TCP/UDP packet; valid until the packet is resized.
struct Packet {
    ip: *mut Ipv4Hdr,
    /// Start of the L4 header (ports first).
    l4: *mut u8,
    flow: Flow,
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Packet, Outcome> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_HLEN + IP_HLEN > end {
        return Err(outcome::MALFORMED);
    }
    // SAFETY: bounds checked above.
    let ethertype = unsafe { ((data + 12) as *const u16).read_unaligned() };
    if ethertype == ETH_P_IPV6_BE {
        return Err(crate::xdp6::tail_call(ctx, crate::xdp6::Stage::External));
    }
    if ethertype != ETH_P_IP_BE {
        return Err(outcome::NOT_IP);
    }
    let ip = (data + ETH_HLEN) as *mut Ipv4Hdr;
    // SAFETY: bounds checked above.
    let hdr = unsafe { ip.read_unaligned() };
    // The same contract as the TC parser: version 4 with IHL >= 5 (less is malformed, more
    // is options), total length within the frame and at least the headers.
    if hdr.ver_ihl >> 4 != 4 || hdr.ver_ihl & 0x0f < 5 {
        return Err(outcome::MALFORMED);
    }
    if hdr.ver_ihl != 0x45 {
        return Err(outcome::IP_OPTIONS);
    }
    let tot_len = u16::from_be(hdr.tot_len) as usize;
    if data + ETH_HLEN + tot_len > end {
        return Err(outcome::MALFORMED);
    }
    if hdr.frag_off & IP_MF_OFFSET_BE != 0 {
        return Err(outcome::FRAGMENT);
    }
    let l4_min = match hdr.proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return Err(outcome::OTHER_PROTOCOL),
    };
    let l4 = data + ETH_HLEN + IP_HLEN;
    if l4 + l4_min > end || tot_len < IP_HLEN + l4_min {
        return Err(outcome::MALFORMED);
    }
    // SAFETY: at least `l4_min` (≥ 8) bytes of L4 header are in bounds.
    let (ports, tcp_flags) = unsafe {
        let ports = (l4 as *const [u16; 2]).read_unaligned();
        let flags = if hdr.proto == PROTO_TCP {
            parse::tcp_header_fits(*((l4 + 12) as *const u8), (tot_len - IP_HLEN) as u32)?;
            *((l4 + 13) as *const u8)
        } else {
            0
        };
        (ports, flags)
    };
    Ok(Packet {
        ip,
        l4: l4 as *mut u8,
        flow: Flow {
            proto: hdr.proto,
            src: hdr.src,
            dst: hdr.dst,
            sport: ports[0],
            dport: ports[1],
            tcp_flags,
            l4_off: (ETH_HLEN + IP_HLEN) as u16,
        },
    })
}

/// Inlined: out of line it would return a `Result`, and the verifier allows its tail call
/// (to the IPv6 stages) only in a function returning an int.
#[inline(always)]
fn run(ctx: &XdpContext) -> Result<(u32, Outcome), Outcome> {
    let pkt = parse(ctx)?;
    let flow = pkt.flow;
    // Everything this hook translates (new and tracked flows, SNATed flows' replies) is
    // addressed to a frontend or a node address: one filter read lets the rest go.
    if !filter::may_be_local(flow.dst) {
        return Err(outcome::PASS_NOT_SERVICE);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u32;
    let now = svc::now_ns();
    // Most packets belong to a tracked flow: look that up first, unless the packet opens
    // a connection (balanced first, see `svc::new_flow`).
    let opens = ct::opens(&flow);
    let tracked = if opens {
        None
    } else {
        svc::follow::<V4>(&flow, SCOPE_EXTERNAL, bytes, now, Look::First)
    };
    let decision = match tracked {
        Some(decision) => decision?,
        None => {
            // Replies of SNATed flows come back to a node address (and never open one).
            if !opens
                && svc::is_node_ip::<V4>(flow.dst)
                && let Some(reply) = svc::routed_reply::<V4>(&flow, true, bytes, Read::Call)
            {
                if let Some(dst) = reply.dst {
                    rewrite(&pkt, Field::Dst, dst);
                }
                rewrite(&pkt, Field::Src, reply.src);
                return Ok((forward(ctx, &pkt, true, now), reply.outcome));
            }
            svc::balance_new::<V4>(&flow, SCOPE_EXTERNAL, bytes, now, Lookup::after(!opens))?
        }
    };
    match decision {
        Decision::Translate { dst, src, outcome } => {
            rewrite(&pkt, Field::Dst, dst);
            if let Some(src) = src {
                rewrite(&pkt, Field::Src, src);
            }
            Ok((forward(ctx, &pkt, hop::keeps(outcome), now), outcome))
        }
        Decision::Reject => reject(ctx, &flow),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Src,
    Dst,
}

/// Sets the packet's source or destination address and port, updating the IPv4 and L4
/// checksums incrementally (a zero UDP checksum means "none" and stays zero).
#[inline(always)]
fn rewrite(pkt: &Packet, field: Field, (addr, port): (u32, u16)) {
    // SAFETY: `parse` checked that the IPv4 header and 8+ bytes of L4 header are in bounds.
    unsafe {
        let ip = &mut *pkt.ip;
        let (old_addr, port_ptr) = match field {
            Field::Src => (ip.src, pkt.l4 as *mut u16),
            Field::Dst => (ip.dst, pkt.l4.add(2) as *mut u16),
        };
        let old_port = port_ptr.read_unaligned();
        match field {
            Field::Src => ip.src = addr,
            Field::Dst => ip.dst = addr,
        }
        ip.csum = replace4(ip.csum, old_addr, addr);
        let csum_ptr = if pkt.flow.proto == PROTO_TCP {
            pkt.l4.add(16) as *mut u16
        } else {
            pkt.l4.add(6) as *mut u16
        };
        let l4_csum = csum_ptr.read_unaligned();
        if pkt.flow.proto == PROTO_UDP && l4_csum == 0 {
            port_ptr.write_unaligned(port);
            return;
        }
        let mut sum = replace4(l4_csum, old_addr, addr);
        sum = replace2(sum, old_port, port);
        if pkt.flow.proto == PROTO_UDP && sum == 0 {
            sum = 0xffff;
        }
        port_ptr.write_unaligned(port);
        csum_ptr.write_unaligned(sum);
    }
}

/// Sends a translated packet on: straight back out when the route leaves through the
/// interface it came in on (TTL decremented as a router would), otherwise to the kernel.
#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet, keep: bool, now: u64) -> u32 {
    // SAFETY: header bounds checked by `parse`; the packet was not resized since.
    let ip = unsafe { &mut *pkt.ip };
    if ip.ttl <= 1 {
        return xdp_action::XDP_PASS; // the kernel sends time-exceeded
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let (key, free) = hop::key(ip.dst, ip.src, ingress);
    // A source-free entry serves every client's flows: worth storing for a first packet.
    let keep = keep | free;
    let len = u16::from_be(ip.tot_len);
    let hop = match hop::lookup(&key, len, false, now) {
        Cached::Hit(hop) => hop,
        Cached::Miss { max_len } => {
            let Some(s) = hop::scratch() else {
                return xdp_action::XDP_PASS;
            };
            // SAFETY: this run's per-CPU slot.
            let s = unsafe { &mut *s };
            let fib = route::fib_params(route::as_storage(&mut s.fib), ip, ingress);
            let rc = route::fib_lookup(ctx.ctx.cast(), fib);
            if rc != BPF_FIB_LKUP_RET_SUCCESS {
                return xdp_action::XDP_PASS;
            }
            hop::remember(s, &key, keep, false, max_len.max(len), now);
            &s.hop as *const lb_common::HopValue
        }
    };
    // SAFETY: the cache's entry or this run's slot, both valid for this run.
    let (macs, egress) = unsafe { ((*hop).macs, (*hop).ifindex) };
    if egress != ingress {
        return xdp_action::XDP_PASS;
    }
    ip.ttl -= 1;
    ip.csum = replace2(ip.csum, TTL_ONE, 0);
    // The verifier needs this check in view of the writes (it does not carry `parse`'s).
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: in bounds, checked just above.
    unsafe { eth.write_unaligned(macs) };
    xdp_action::XDP_TX
}

/// A pointer to a `T` at `offset` in the packet, if the packet is long enough.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The whole ICMP port-unreachable frame.
#[repr(C, packed)]
struct Reply {
    eth: [u8; ETH_HLEN],
    ip: Ipv4Hdr,
    body: UnreachableBody,
}

/// ICMP port unreachable from the frontend back to the client, out of the same interface.
#[inline(always)]
fn reject(ctx: &XdpContext, flow: &Flow) -> Result<(u32, Outcome), Outcome> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let quoted_len = IP_HLEN + 8;
    if data + ETH_HLEN + quoted_len > end {
        return Err(outcome::MALFORMED);
    }
    let mut macs = [0u8; 12];
    let mut quoted = [0u8; IP_HLEN + 8];
    // SAFETY: bounds checked above.
    unsafe {
        macs.copy_from_slice(&*(data as *const [u8; 12]));
        quoted.copy_from_slice(&*((data + ETH_HLEN) as *const [u8; IP_HLEN + 8]));
    }
    let (ip, body) = icmp::unreachable(flow, quoted);
    let delta = REPLY_LEN as i32 - (end - data) as i32;
    // SAFETY: plain helper call on our own packet; pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx.cast(), delta) } != 0 {
        return Err(outcome::DROP_REWRITE_FAILED);
    }
    let Some(reply) = ptr_at::<Reply>(ctx, 0) else {
        return Err(outcome::DROP_REWRITE_FAILED);
    };
    let mut eth = [0u8; ETH_HLEN];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12] = 0x08;
    // SAFETY: in bounds, checked just above.
    unsafe { reply.write_unaligned(Reply { eth, ip, body }) };
    Ok((xdp_action::XDP_TX, outcome::REJECT_NO_BACKEND))
}
