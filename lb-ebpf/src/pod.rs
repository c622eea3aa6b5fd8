//! The pod interface's two packet paths (TC): pod → service (DNAT) and service → pod
//! (reverse NAT).
use aya_ebpf::programs::TcContext;
use lb_common::{Ip6, Outcome, SCOPE_INTERNAL, is_drop, outcome};

use crate::{
    ct,
    family::{Family, V4, V6},
    filter, hop,
    icmp::{self, InnerEnd},
    maps::PROGS6,
    nat,
    parse::{self, Flow, Packet},
    read::Read,
    route, stats,
    svc::{self, Decision, Look},
    verdict::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
};

/// The packet rewrites of one family on TC.
trait TcFamily: Family {
    fn rewrite_dst(
        ctx: &TcContext,
        flow: &Flow<Self::Addr>,
        addr: Self::Addr,
        port: u16,
    ) -> Result<(), Outcome>;
    fn rewrite_src(
        ctx: &TcContext,
        flow: &Flow<Self::Addr>,
        addr: Self::Addr,
        port: u16,
    ) -> Result<(), Outcome>;
    /// `keep`: cache the next hop if it had to be looked up (`hop::keeps`); `now`: the
    /// packet's clock reading (one per packet: each costs about a map lookup).
    fn forward(ctx: &TcContext, keep: bool, now: u64) -> Result<i32, Outcome>;
    fn reject(ctx: &TcContext, flow: &Flow<Self::Addr>) -> Result<i32, Outcome>;
    /// `dnat`, `route_reply` and `icmp_error` of this family. IPv4 calls `icmp_error` as a
    /// subprogram (inlined, the verifier walks its paths once per caller path) and inlines
    /// `route_reply`: as a subprogram its 136-byte frame added to `xlb_from_pod`'s 368, the
    /// whole 512-byte limit, where inlined its spills share the program's frame (344 bytes;
    /// the verifier walks 107k instructions instead of 98k). IPv6 inlines both (a
    /// subprogram's frame adds to the caller's, which the IPv6 stages cannot spare).
    fn dnat(
        ctx: &TcContext,
        flow: &Flow<Self::Addr>,
        decision: Decision<Self::Addr>,
        now: u64,
    ) -> Result<(i32, Outcome), Outcome>;
    fn route_reply(
        ctx: &TcContext,
        flow: &Flow<Self::Addr>,
        reply: &svc::Reply<Self::Addr>,
    ) -> Result<(i32, Outcome), Outcome>;
    fn icmp_error(
        ctx: &TcContext,
        outer: &Flow<Self::Addr>,
        inner: &Flow<Self::Addr>,
        end: InnerEnd,
    ) -> Result<(i32, Outcome), Outcome>;
    fn translate_error(
        ctx: &TcContext,
        outer: &Flow<Self::Addr>,
        inner: &Flow<Self::Addr>,
        end: InnerEnd,
        addr: Self::Addr,
        port: u16,
    ) -> Result<(), Outcome>;
}

impl TcFamily for V4 {
    #[inline(always)]
    fn rewrite_dst(ctx: &TcContext, flow: &Flow, addr: u32, port: u16) -> Result<(), Outcome> {
        nat::rewrite_dst(ctx, flow, addr, port)
    }
    #[inline(always)]
    fn rewrite_src(ctx: &TcContext, flow: &Flow, addr: u32, port: u16) -> Result<(), Outcome> {
        nat::rewrite_src(ctx, flow, addr, port)
    }
    #[inline(always)]
    fn forward(ctx: &TcContext, keep: bool, now: u64) -> Result<i32, Outcome> {
        route::forward(ctx, keep, now)
    }
    #[inline(always)]
    fn reject(ctx: &TcContext, flow: &Flow) -> Result<i32, Outcome> {
        icmp::reject(ctx, flow)
    }
    #[inline(always)]
    fn dnat(
        ctx: &TcContext,
        flow: &Flow,
        decision: Decision<u32>,
        now: u64,
    ) -> Result<(i32, Outcome), Outcome> {
        dnat::<V4>(ctx, flow, decision, now)
    }
    #[inline(always)]
    fn route_reply(
        ctx: &TcContext,
        flow: &Flow,
        reply: &svc::Reply<u32>,
    ) -> Result<(i32, Outcome), Outcome> {
        route_reply4(ctx, flow, reply)
    }
    #[inline(always)]
    fn icmp_error(
        ctx: &TcContext,
        outer: &Flow,
        inner: &Flow,
        end: InnerEnd,
    ) -> Result<(i32, Outcome), Outcome> {
        icmp_error4(ctx, outer, inner, end)
    }
    #[inline(always)]
    fn translate_error(
        ctx: &TcContext,
        outer: &Flow,
        inner: &Flow,
        end: InnerEnd,
        addr: u32,
        port: u16,
    ) -> Result<(), Outcome> {
        icmp::translate_error(ctx, outer, inner, end, addr, port)
    }
}

impl TcFamily for V6 {
    #[inline(always)]
    fn rewrite_dst(ctx: &TcContext, flow: &Flow<Ip6>, addr: Ip6, port: u16) -> Result<(), Outcome> {
        nat::rewrite6_dst(ctx, flow, addr, port)
    }
    #[inline(always)]
    fn rewrite_src(ctx: &TcContext, flow: &Flow<Ip6>, addr: Ip6, port: u16) -> Result<(), Outcome> {
        nat::rewrite6_src(ctx, flow, addr, port)
    }
    #[inline(always)]
    fn forward(ctx: &TcContext, keep: bool, now: u64) -> Result<i32, Outcome> {
        forward6(ctx, keep, now)
    }
    #[inline(always)]
    fn reject(ctx: &TcContext, _flow: &Flow<Ip6>) -> Result<i32, Outcome> {
        Err(tail_call(ctx, Stage6::FromPodRare))
    }
    #[inline(always)]
    fn dnat(
        ctx: &TcContext,
        flow: &Flow<Ip6>,
        decision: Decision<Ip6>,
        now: u64,
    ) -> Result<(i32, Outcome), Outcome> {
        dnat::<V6>(ctx, flow, decision, now)
    }
    #[inline(always)]
    fn route_reply(
        ctx: &TcContext,
        flow: &Flow<Ip6>,
        reply: &svc::Reply<Ip6>,
    ) -> Result<(i32, Outcome), Outcome> {
        route_reply::<V6>(ctx, flow, reply)
    }
    #[inline(always)]
    fn icmp_error(
        ctx: &TcContext,
        outer: &Flow<Ip6>,
        inner: &Flow<Ip6>,
        end: InnerEnd,
    ) -> Result<(i32, Outcome), Outcome> {
        icmp_error::<V6>(ctx, outer, inner, end)
    }
    #[inline(always)]
    fn translate_error(
        ctx: &TcContext,
        outer: &Flow<Ip6>,
        inner: &Flow<Ip6>,
        end: InnerEnd,
        addr: Ip6,
        port: u16,
    ) -> Result<(), Outcome> {
        icmp::translate_error6(ctx, outer, inner, end, addr, port)
    }
}

#[inline(always)]
fn route_reply4(
    ctx: &TcContext,
    flow: &Flow,
    reply: &svc::Reply<u32>,
) -> Result<(i32, Outcome), Outcome> {
    route_reply::<V4>(ctx, flow, reply)
}

#[inline(never)]
fn icmp_error4(
    ctx: &TcContext,
    outer: &Flow,
    inner: &Flow,
    end: InnerEnd,
) -> Result<(i32, Outcome), Outcome> {
    icmp_error::<V4>(ctx, outer, inner, end)
}

/// Runs the pod → service path; returns the TC verdict and the outcome to count. IPv6
/// packets continue in the IPv6 programs (tail calls): each program has its own 512-byte
/// stack, which the IPv6 path needs, and the IPv4 path stays what it was.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> (i32, Outcome) {
    let result = match parse::parse(ctx) {
        Ok(Packet::Flow(flow)) => pod_flow::<V4>(ctx, &flow),
        Ok(Packet::IcmpError { outer, inner }) => {
            V4::icmp_error(ctx, &outer, &inner, InnerEnd::Source)
        }
        Err(parse::IPV6) => return from_pod_ipv6(ctx),
        Err(outcome) => Err(outcome),
    };
    finish(result)
}

/// Runs the service → pod path.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> (i32, Outcome) {
    let result = match parse::parse(ctx) {
        Ok(packet) => to_pod_packet::<V4>(ctx, packet),
        Err(parse::IPV6) => Err(tail_call(ctx, Stage6::ToPod)),
        Err(outcome) => Err(outcome),
    };
    finish(result)
}

/// An IPv6 packet from a pod: let go here if it cannot concern a service (most of a pod's
/// traffic: to no frontend and no node address, and no reply), which spares it the tail
/// call and the second parse (60 -> 52 ns on the bench); else on to `xlb_from_pod6`. The
/// outcome is counted here, with the IPv6 counters; the sentinel `parse::IPV6` returned
/// is counted nowhere. (`to_pod` does not do this: a reply, that hook's business, would
/// parse and read the filter twice, costing it more than a pass gains.)
#[inline(always)]
fn from_pod_ipv6(ctx: &TcContext) -> (i32, Outcome) {
    if let Some(flow) = parse::flow6_in_place(ctx)
        && !filter::may_be_local(flow.dst)
        && !svc::may_be_reply::<V6>(&flow, false, Read::Inline)
    {
        stats::count6(outcome::PASS_NOT_SERVICE);
        return (TC_ACT_UNSPEC, parse::IPV6);
    }
    finish(Err(tail_call(ctx, Stage6::FromPod)))
}

/// The IPv6 programs, by their index in `PROGS6` (the agent fills it after loading).
#[derive(Clone, Copy)]
pub enum Stage6 {
    FromPod = 0,
    ToPod = 1,
    /// A pod's IPv6 packet of no tracked flow (a third program: with the tracked path in
    /// the same one, the stack does not fit).
    FromPodUntracked = 2,
    /// The rare ones: a pod's ICMPv6 error about a flow, and the ICMPv6 port unreachable
    /// for a pod's flow to a frontend without endpoints.
    FromPodRare = 3,
}

#[inline(always)]
fn forward6(ctx: &TcContext, keep: bool, now: u64) -> Result<i32, Outcome> {
    route::forward6(ctx, keep, now)
}

/// `xlb_from_pod6_rare`: translates a pod's ICMPv6 error, or answers the pod's packet (to
/// a frontend without endpoints: the caller decided so) with an ICMPv6 port unreachable.
#[inline(always)]
pub fn from_pod6_rare(ctx: &TcContext) -> (i32, Outcome) {
    finish((|| match parse::parse6(ctx)? {
        Packet::Flow(flow) => icmp::reject6(ctx, &flow).map(|v| (v, outcome::REJECT_NO_BACKEND)),
        Packet::IcmpError { outer, inner } => {
            icmp_error::<V6>(ctx, &outer, &inner, InnerEnd::Source)
        }
    })())
}

/// Continues in an IPv6 program; returns only if it cannot (not loaded: the packet is
/// passed and counted as not handled).
#[inline(always)]
fn tail_call(ctx: &TcContext, stage: Stage6) -> Outcome {
    // SAFETY: a tail call replaces this program run; on failure it returns.
    unsafe { PROGS6.tail_call(ctx, stage as u32) };
    outcome::NOT_IP
}

/// `xlb_from_pod6`: an IPv6 packet from a pod, of a tracked flow or an ICMPv6 error.
#[inline(always)]
pub fn from_pod6(ctx: &TcContext) -> (i32, Outcome) {
    finish((|| match parse::parse6(ctx)? {
        Packet::Flow(flow) => match filter::may_be_local(flow.dst) {
            // A packet that opens a connection is balanced first (`svc::new_flow`).
            true if ct::opens(&flow) => Err(tail_call(ctx, Stage6::FromPodUntracked)),
            true => match tracked::<V6>(ctx, &flow, svc::now_ns()) {
                Some(done) => done,
                None => Err(tail_call(ctx, Stage6::FromPodUntracked)),
            },
            // To no frontend and no node address: only a routed reply is left, and that
            // has a reverse entry; without one the packet goes here, without the next
            // stage's tail call and parse.
            false
                if !svc::may_be_reply::<V6>(&flow, false, Read::Inline)
                    || !ct::has_reverse::<V6>(&flow) =>
            {
                Err(outcome::PASS_NOT_SERVICE)
            }
            false => Err(tail_call(ctx, Stage6::FromPodUntracked)),
        },
        Packet::IcmpError { .. } => Err(tail_call(ctx, Stage6::FromPodRare)),
    })())
}

/// `xlb_from_pod6_untracked`: the rest of `from_pod6` (parsed again: nothing is handed
/// over in a tail call but the packet).
#[inline(always)]
pub fn from_pod6_untracked(ctx: &TcContext) -> (i32, Outcome) {
    finish(from_pod6_untracked_packet(ctx))
}

/// A named function rather than a closure: LLVM may keep a closure out of line, and the
/// verifier allows tail calls (here: to `FromPodRare`) only in functions returning an int.
#[inline(always)]
fn from_pod6_untracked_packet(ctx: &TcContext) -> Result<(i32, Outcome), Outcome> {
    match parse::parse6(ctx)? {
        Packet::Flow(flow) => untracked::<V6>(
            ctx,
            &flow,
            filter::may_be_local(flow.dst),
            !ct::opens(&flow),
            svc::now_ns(),
        ),
        Packet::IcmpError { .. } => Err(outcome::PASS_NOT_SERVICE),
    }
}

/// `xlb_to_pod6`.
#[inline(always)]
pub fn to_pod6(ctx: &TcContext) -> (i32, Outcome) {
    finish((|| to_pod_packet::<V6>(ctx, parse::parse6(ctx)?))())
}

#[inline(always)]
fn to_pod_packet<F: TcFamily>(
    ctx: &TcContext,
    packet: Packet<F::Addr>,
) -> Result<(i32, Outcome), Outcome> {
    match packet {
        Packet::Flow(flow) => revnat::<F>(ctx, &flow),
        Packet::IcmpError { outer, inner } => {
            F::icmp_error(ctx, &outer, &inner, InnerEnd::Destination)
        }
    }
}

/// Drops are dropped; every other non-translated outcome lets the packet continue untouched
/// (`TC_ACT_UNSPEC` = next program on tcx, so we do not hide packets from other programs).
#[inline(always)]
fn finish(result: Result<(i32, Outcome), Outcome>) -> (i32, Outcome) {
    match result {
        Ok(done) => done,
        Err(o) if is_drop(o) => (TC_ACT_SHOT, o),
        Err(o) => (TC_ACT_UNSPEC, o),
    }
}

/// A pod's packet: of a tracked flow (looked up first: most packets are), a reply to route
/// back, or a new flow to a service.
#[inline(always)]
fn pod_flow<F: TcFamily>(ctx: &TcContext, flow: &Flow<F::Addr>) -> Result<(i32, Outcome), Outcome> {
    let local = filter::may_be_local(flow.dst);
    // The clock only where a step may need it: a packet to no frontend and no node address
    // (most of a pod's traffic) goes on with no state touched; a routed reply reads it once
    // its entry is found (`svc::Reply::now`).
    let now = if local { svc::now_ns() } else { 0 };
    // A packet that opens a connection is balanced first (`svc::new_flow`).
    let followed = !ct::opens(flow);
    if local
        && followed
        && let Some(done) = tracked::<F>(ctx, flow, now)
    {
        return done;
    }
    untracked::<F>(ctx, flow, local, followed, now)
}

/// The packet of a tracked flow, translated; `None` if it belongs to none.
#[inline(always)]
fn tracked<F: TcFamily>(
    ctx: &TcContext,
    flow: &Flow<F::Addr>,
    now: u64,
) -> Option<Result<(i32, Outcome), Outcome>> {
    let decision = svc::follow::<F>(flow, SCOPE_INTERNAL, ctx.len(), now, Look::First)?;
    Some(decision.and_then(|decision| F::dnat(ctx, flow, decision, now)))
}

/// A packet of no tracked flow: a routed reply, or a new flow to a service. `local`: the
/// destination may be a frontend or a node address (`filter`); if not, only a routed reply
/// (to a client outside) is looked for. `followed`: the flow was looked up (`tracked`).
#[inline(always)]
fn untracked<F: TcFamily>(
    ctx: &TcContext,
    flow: &Flow<F::Addr>,
    local: bool,
    followed: bool,
    now: u64,
) -> Result<(i32, Outcome), Outcome> {
    let frontend = if local {
        svc::find_frontend::<F>(flow, SCOPE_INTERNAL, false)
    } else {
        None
    };
    // The filter holds every node address: a destination it turns away is none.
    let to_node = local && svc::is_node_ip::<F>(flow.dst);
    // Routed replies go to a client outside or to the node's SNAT address, not to a
    // frontend on another address: a new flow skips that (missing) lookup.
    if (frontend.is_none() || to_node)
        && let Some(done) = routed_reply::<F>(ctx, flow, to_node)
    {
        return done;
    }
    let found = frontend.ok_or(outcome::PASS_NOT_SERVICE)?;
    let decision = svc::new_flow::<F>(
        flow,
        SCOPE_INTERNAL,
        found,
        ctx.len(),
        now,
        svc::Lookup::after(followed),
    )?;
    F::dnat(ctx, flow, decision, now)
}

#[inline(always)]
fn dnat<F: TcFamily>(
    ctx: &TcContext,
    flow: &Flow<F::Addr>,
    decision: Decision<F::Addr>,
    now: u64,
) -> Result<(i32, Outcome), Outcome> {
    match decision {
        Decision::Translate { dst, src, outcome } => {
            F::rewrite_dst(ctx, flow, dst.0, dst.1)?;
            if let Some((addr, port)) = src {
                // Hairpin: with a node address as source the stack would see a martian.
                F::rewrite_src(ctx, flow, addr, port)?;
            }
            // Straight to the backend's interface (FIB lookup + redirect), skipping the
            // stack's routing and netfilter, as Cilium's BPF host routing does.
            Ok((F::forward(ctx, hop::keeps(outcome), now)?, outcome))
        }
        Decision::Reject => F::reject(ctx, flow).map(|v| (v, outcome::REJECT_NO_BACKEND)),
    }
}

/// A local backend's reply to a client outside, or to a SNATed (hairpin) client: source
/// back to the frontend, destination back to the client if the flow was SNATed; then
/// straight out of the route's interface.
#[inline(always)]
fn routed_reply<F: TcFamily>(
    ctx: &TcContext,
    flow: &Flow<F::Addr>,
    to_node: bool,
) -> Option<Result<(i32, Outcome), Outcome>> {
    let reply = svc::routed_reply::<F>(flow, to_node, ctx.len(), Read::Inline)?;
    Some(F::route_reply(ctx, flow, &reply))
}

#[inline(always)]
fn route_reply<F: TcFamily>(
    ctx: &TcContext,
    flow: &Flow<F::Addr>,
    reply: &svc::Reply<F::Addr>,
) -> Result<(i32, Outcome), Outcome> {
    if let Some((addr, port)) = reply.dst {
        F::rewrite_dst(ctx, flow, addr, port)?;
    }
    F::rewrite_src(ctx, flow, reply.src.0, reply.src.1)?;
    Ok((F::forward(ctx, true, reply.now)?, reply.outcome))
}

fn revnat<F: TcFamily>(ctx: &TcContext, flow: &Flow<F::Addr>) -> Result<(i32, Outcome), Outcome> {
    // Most packets to a pod answer nothing translated: from no backend, or opening.
    if !svc::may_be_reply::<F>(flow, false, Read::Inline) {
        return Err(outcome::PASS_NOT_SERVICE);
    }
    let entry = ct::reverse_entry::<F>(&ct::reverse_key(flow), F::CLAIMED_REPLIES, Read::Inline)
        .ok_or(outcome::PASS_NOT_SERVICE)?;
    // SAFETY: the entry from this run's lookup.
    let (addr, port) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
    ct::touch(entry, flow, svc::now_ns(), ctx.len());
    F::rewrite_src(ctx, flow, addr, port)?;
    Ok((TC_ACT_OK, outcome::REVNAT))
}

/// ICMP error about a NATed flow. `InnerEnd::Destination`: from a backend (or a router on
/// its path) about a client → backend packet, found by the reverse entry. `InnerEnd::Source`:
/// from a client about a reply it got from a VIP, found by the forward entry.
#[inline(always)]
fn icmp_error<F: TcFamily>(
    ctx: &TcContext,
    outer: &Flow<F::Addr>,
    inner: &Flow<F::Addr>,
    end: InnerEnd,
) -> Result<(i32, Outcome), Outcome> {
    let entry = match end {
        // Any flow's, a SNATed one's included (rare: the claim is always looked at).
        InnerEnd::Destination => {
            ct::reverse_entry::<F>(&ct::reverse_key(&inner.reversed()), true, Read::Call)
        }
        InnerEnd::Source => ct::forward_entry::<F>(&inner.reversed()),
    }
    .ok_or(outcome::PASS_NOT_SERVICE)?;
    // SAFETY: the entry from this run's lookup; copied out at once.
    let (addr, port) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
    F::translate_error(ctx, outer, inner, end, addr, port)?;
    Ok((TC_ACT_OK, outcome::ICMP_ERROR_XLATE))
}
