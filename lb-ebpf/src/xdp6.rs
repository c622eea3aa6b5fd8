//! IPv6 from outside (XDP), tail-called by `xlb_external` for IPv6 frames: NodePort,
//! externalIP and LoadBalancer-IP frontends of the external scope, and replies of SNATed
//! flows, as `xdp` does for IPv4. Two stages (tracked flows, then the rest), each its own
//! program: one stack frame does not hold both with IPv6 entries.
//!
//! TCP/UDP right after the fixed header (nearly every packet) is read and written in place;
//! after extension headers, whose offsets are variable, with `bpf_xdp_load_bytes` and
//! `bpf_xdp_store_bytes`. Checksums are updated incrementally (IPv6 has no header
//! checksum, and a UDP checksum is never zero: the parser refuses those).
use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_tail, bpf_xdp_store_bytes},
    programs::XdpContext,
};
use lb_common::{Ip6, Outcome, PROTO_UDP, SCOPE_EXTERNAL, outcome};

use crate::{
    csum::{replace2, replace4},
    ct,
    family::V6,
    filter,
    hop::{self, Cached},
    icmp::{REPLY6_LEN, unreachable6},
    maps::{PROGS6_XDP, XDP6_BOUNCE},
    parse::{
        self, ETH_HLEN, ETH_P_IPV6, Flow, Frame, IP_OFF, IP6_DST_OFF, IP6_HLEN, IP6_HOP_LIMIT_OFF,
        IP6_SRC_OFF, Ipv6Hdr, L4_DIRECT, Packet, packet_read,
    },
    read::Read,
    route,
    svc::{self, Addr, Decision, Look, Lookup},
    words,
};

const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// The IPv6 XDP stages, by their index in `PROGS6_XDP`.
#[derive(Clone, Copy)]
pub enum Stage {
    External = 0,
    Untracked = 1,
}

/// What a stage tells the stage it tail-calls, through `XDP6_BOUNCE`. Each stage takes
/// (clears) it on entry and sets it only right before a tail call, so a value left by a
/// tail call that failed reaches only the next packet's first stage, which then looks up
/// a SYN (`Follow`) as it did before SYNs were balanced first, or has another packet's
/// insert replace a tuple's entry as it did before inserts were exclusive: never a wrong
/// decision.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Bounce {
    None = 0,
    /// To `External`: a new flow's packet whose tuple may have a flow (a SYN's, or one
    /// recorded since its first lookup): follow it if there is one.
    Follow = 1,
    /// To `Untracked`: a packet that was followed after `Follow` and had no flow to follow.
    Followed = 2,
}

#[inline(always)]
fn take_bounce() -> Bounce {
    let Some(slot) = XDP6_BOUNCE.get_ptr_mut(0) else {
        return Bounce::None;
    };
    // SAFETY: this CPU's slot; programs of a hook do not nest on a CPU.
    let value = unsafe { core::mem::replace(&mut *slot, Bounce::None as u32) };
    match value {
        1 => Bounce::Follow,
        2 => Bounce::Followed,
        _ => Bounce::None,
    }
}

/// `tail_call` telling the stage `what`.
#[inline(always)]
fn bounce(ctx: &XdpContext, stage: Stage, what: Bounce) -> Outcome {
    if let Some(slot) = XDP6_BOUNCE.get_ptr_mut(0) {
        // SAFETY: as in `take_bounce`.
        unsafe { *slot = what as u32 };
    }
    tail_call(ctx, stage)
}

/// Continues in an IPv6 XDP stage; returns only if it cannot (not loaded: passed).
#[inline(always)]
pub fn tail_call(ctx: &XdpContext, stage: Stage) -> Outcome {
    // SAFETY: a tail call replaces this program run; on failure it returns.
    unsafe { PROGS6_XDP.tail_call(ctx, stage as u32) };
    outcome::NOT_IP
}

#[inline(always)]
fn finish(result: Result<(u32, Outcome), Outcome>) -> (u32, Outcome) {
    match result {
        Ok(done) => done,
        Err(o) if lb_common::is_drop(o) => (xdp_action::XDP_DROP, o),
        Err(o) => (xdp_action::XDP_PASS, o),
    }
}

/// TCP or UDP over IPv6; anything else (ICMPv6 included) passes, as on IPv4.
#[inline(always)]
fn flow_of(ctx: &XdpContext) -> Result<Flow<Ip6>, Outcome> {
    match parse::parse6(ctx)? {
        Packet::Flow(flow) => Ok(flow),
        Packet::IcmpError { .. } => Err(outcome::OTHER_PROTOCOL),
    }
}

/// `xlb_external6`: a packet of a tracked flow, translated; any other continues in
/// `xlb_external6_untracked`.
#[inline(always)]
pub fn external6(ctx: &XdpContext) -> (u32, Outcome) {
    finish((|| {
        let bounced = take_bounce();
        let flow = flow_of(ctx)?;
        // Everything this hook translates is addressed to a frontend or a node address.
        if !filter::may_be_local(flow.dst) {
            return Err(outcome::PASS_NOT_SERVICE);
        }
        // A packet that opens a connection is balanced first (`svc::new_flow`), in the
        // next stage, which sends it back here if its tuple may have a flow to follow.
        let opens = ct::opens(&flow);
        if opens && bounced != Bounce::Follow {
            return Err(tail_call(ctx, Stage::Untracked));
        }
        // A packet that does not open a connection and comes back (`Follow`) was followed
        // on its first pass: its insert found the tuple taken since.
        let again = !opens && bounced == Bounce::Follow;
        let look = if again { Look::Again } else { Look::First };
        match svc::follow::<V6>(&flow, SCOPE_EXTERNAL, ctx.frame_len(), svc::now_ns(), look) {
            Some(decision) => translate::<true>(ctx, &flow, decision?),
            None if opens || again => Err(bounce(ctx, Stage::Untracked, Bounce::Followed)),
            None => Err(tail_call(ctx, Stage::Untracked)),
        }
    })())
}

/// `xlb_external6_untracked`: a SNATed flow's reply, or a new flow to a frontend.
#[inline(always)]
pub fn external6_untracked(ctx: &XdpContext) -> (u32, Outcome) {
    finish(untracked(ctx))
}

/// A named function rather than a closure: LLVM may keep a closure out of line, and the
/// verifier allows tail calls only in functions returning an int.
#[inline(always)]
fn untracked(ctx: &XdpContext) -> Result<(u32, Outcome), Outcome> {
    let bounced = take_bounce();
    let flow = flow_of(ctx)?;
    let bytes = ctx.frame_len();
    if svc::is_node_ip::<V6>(flow.dst)
        && let Some(reply) = svc::routed_reply::<V6>(&flow, true, bytes, Read::Call)
    {
        if let Some(dst) = reply.dst {
            rewrite::<false>(ctx, &flow, Field::Dst, dst)?;
        }
        rewrite::<false>(ctx, &flow, Field::Src, reply.src)?;
        return Ok((forward(ctx, true), reply.outcome));
    }
    let now = svc::now_ns();
    // The first stage looked up every flow but a connection's first packet, which is
    // balanced here first; a follow as `svc::new_flow` makes for it when its tuple has
    // an entry (or gets one since the lookup) does not fit this stage's stack, so the
    // first stage makes it.
    let lookup = if bounced == Bounce::Followed {
        Lookup::Final
    } else {
        Lookup::Deferred
    };
    let decision = match svc::balance_new::<V6>(&flow, SCOPE_EXTERNAL, bytes, now, lookup) {
        Err(svc::MAY_BE_TRACKED) => return Err(bounce(ctx, Stage::External, Bounce::Follow)),
        decision => decision?,
    };
    translate::<false>(ctx, &flow, decision)
}

#[inline(always)]
fn translate<const IN_PLACE: bool>(
    ctx: &XdpContext,
    flow: &Flow<Ip6>,
    decision: Decision<Ip6>,
) -> Result<(u32, Outcome), Outcome> {
    match decision {
        Decision::Translate { dst, src, outcome } => {
            rewrite::<IN_PLACE>(ctx, flow, Field::Dst, dst)?;
            if let Some(src) = src {
                rewrite::<IN_PLACE>(ctx, flow, Field::Src, src)?;
            }
            Ok((forward(ctx, hop::keeps(outcome)), outcome))
        }
        Decision::Reject => reject(ctx, flow),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Src,
    Dst,
}

#[inline(always)]
fn store<T>(ctx: &XdpContext, offset: usize, value: &T) -> Result<(), Outcome> {
    // SAFETY: the helper copies `size_of::<T>()` bytes from `value` into the packet, or
    // fails without writing.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            offset as u32,
            (value as *const T).cast_mut().cast(),
            core::mem::size_of::<T>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(outcome::DROP_REWRITE_FAILED)
    }
}

/// Sets the packet's source or destination address and port, updating the L4 checksum
/// (the address through the pseudo-header) incrementally. `IN_PLACE`: packets without
/// extension headers are written in place (the first stage; the second has no stack left
/// for both paths, and takes the store helpers).
#[inline(always)]
fn rewrite<const IN_PLACE: bool>(
    ctx: &XdpContext,
    flow: &Flow<Ip6>,
    field: Field,
    (addr, port): Addr<Ip6>,
) -> Result<(), Outcome> {
    let l4 = flow.l4_off as usize;
    let (addr_off, port_off, old_addr, old_port) = match field {
        Field::Src => (IP6_SRC_OFF, 0, flow.src, flow.sport),
        Field::Dst => (IP6_DST_OFF, 2, flow.dst, flow.dport),
    };
    let csum_off = flow.csum_off(l4);
    let updated = |old: u16| checksum_after(old, flow.proto, (old_addr, old_port), (addr, port));
    if IN_PLACE && l4 == L4_DIRECT {
        let (data, end) = (ctx.data(), ctx.data_end());
        let csum = data + flow.csum_off(L4_DIRECT);
        if data + L4_DIRECT + 4 <= end && csum + 2 <= end {
            // SAFETY: the addresses, the ports and the checksum are inside the frame
            // (checked just above).
            unsafe {
                let sum = updated(packet_read::<u16>(csum));
                words::copy((data + IP_OFF + addr_off) as *mut Ip6, &addr);
                core::ptr::write((data + L4_DIRECT + port_off) as *mut u16, port);
                core::ptr::write(csum as *mut u16, sum);
            }
            return Ok(());
        }
    }
    let sum = updated(ctx.read(csum_off)?);
    store(ctx, IP_OFF + addr_off, &addr)?;
    store(ctx, l4 + port_off, &port)?;
    store(ctx, csum_off, &sum)
}

/// An L4 checksum `check` after an address and port change from `old` to `new`.
#[inline(always)]
fn checksum_after(check: u16, proto: u8, old: Addr<Ip6>, new: Addr<Ip6>) -> u16 {
    let mut sum = check;
    for i in 0..4 {
        sum = replace4(sum, old.0[i], new.0[i]);
    }
    sum = replace2(sum, old.1, new.1);
    if proto == PROTO_UDP && sum == 0 {
        sum = 0xffff;
    }
    sum
}

/// Sends a translated packet on: straight back out when the route leaves through the
/// interface it came in on (hop limit decremented), otherwise to the kernel.
#[inline(always)]
fn forward(ctx: &XdpContext, keep: bool) -> u32 {
    let Some(s) = hop::scratch() else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this run's per-CPU slot.
    let s = unsafe { &mut *s };
    // Every frame the parser took holds the fixed header; the check is the verifier's.
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + L4_DIRECT > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the fixed header is inside the frame (checked just above); copied straight
    // into the slot (a value read would take 40 bytes of stack).
    unsafe { core::ptr::copy_nonoverlapping((data + IP_OFF) as *const Ipv6Hdr, &mut s.ip6, 1) };
    if s.ip6.hop_limit <= 1 {
        return xdp_action::XDP_PASS; // the kernel sends time-exceeded
    }
    let ingress = ctx.ingress_ifindex() as u32;
    // A source-free entry serves every client's flows: worth storing for a first packet.
    let keep = hop::key6_of(s, ingress) | keep;
    let hop_limit = s.ip6.hop_limit;
    let len = u16::from_be(s.ip6.payload_len).saturating_add(IP6_HLEN as u16);
    let now = svc::now_ns();
    let hop = match hop::lookup(&s.key6, len, false, now) {
        Cached::Hit(hop) => hop,
        Cached::Miss { max_len } => {
            let fib = route::fib_params6(route::as_storage(&mut s.fib), &s.ip6, ingress);
            let rc = route::fib_lookup(ctx.ctx.cast(), fib);
            if rc != BPF_FIB_LKUP_RET_SUCCESS {
                return xdp_action::XDP_PASS;
            }
            hop::remember6(s, keep, false, max_len.max(len), now);
            &s.hop as *const lb_common::HopValue
        }
    };
    // SAFETY: the cache's entry or this run's slot, both valid for this run.
    let (macs, egress) = unsafe { ((*hop).macs, (*hop).ifindex) };
    if egress != ingress {
        return xdp_action::XDP_PASS;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + L4_DIRECT > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet and fixed IPv6 headers are inside the frame (checked just above).
    unsafe {
        core::ptr::write(
            (data + IP_OFF + IP6_HOP_LIMIT_OFF) as *mut u8,
            hop_limit - 1,
        );
        core::ptr::write(data as *mut [u8; 12], macs);
    }
    xdp_action::XDP_TX
}

/// ICMPv6 port unreachable from the frontend back to the client, out of the same
/// interface.
#[inline(always)]
fn reject(ctx: &XdpContext, flow: &Flow<Ip6>) -> Result<(u32, Outcome), Outcome> {
    let macs: [u8; 12] = ctx.read(0)?;
    let quoted: [u8; IP6_HLEN + 8] = ctx.read(IP_OFF)?;
    let (ip, body) = unreachable6(flow, quoted);
    let delta = REPLY6_LEN as i32 - ctx.frame_len() as i32;
    // SAFETY: plain helper call on our own packet.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx.cast(), delta) } != 0 {
        return Err(outcome::DROP_REWRITE_FAILED);
    }
    let mut eth = [0u8; ETH_HLEN];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    store(ctx, 0, &eth)?;
    store(ctx, IP_OFF, &ip)?;
    store(ctx, IP_OFF + IP6_HLEN, &body)?;
    Ok((xdp_action::XDP_TX, outcome::REJECT_NO_BACKEND))
}
