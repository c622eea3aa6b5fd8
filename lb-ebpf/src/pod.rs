//! The pod interface's two packet paths (TC): pod → service (DNAT) and service → pod
//! (reverse NAT).
use aya_ebpf::programs::TcContext;
use lb_common::{Outcome, SCOPE_INTERNAL, is_drop, outcome};

use crate::{
    ct,
    icmp::{self, InnerEnd},
    maps::CONNTRACK,
    nat,
    parse::{self, Flow, Packet},
    route,
    svc::{self, Decision},
    verdict::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
};

/// Runs the pod → service path; returns the TC verdict and the outcome to count.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> (i32, Outcome) {
    let result = match parse::parse(ctx) {
        Ok(Packet::Flow(flow)) => pod_flow(ctx, &flow),
        Ok(Packet::IcmpError { outer, inner }) => icmp_error(ctx, &outer, &inner, InnerEnd::Source),
        Err(outcome) => Err(outcome),
    };
    finish(result)
}

/// Runs the service → pod path.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> (i32, Outcome) {
    let result = match parse::parse(ctx) {
        Ok(Packet::Flow(flow)) => revnat(ctx, &flow),
        Ok(Packet::IcmpError { outer, inner }) => {
            icmp_error(ctx, &outer, &inner, InnerEnd::Destination)
        }
        Err(outcome) => Err(outcome),
    };
    finish(result)
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
fn pod_flow(ctx: &TcContext, flow: &Flow) -> Result<(i32, Outcome), Outcome> {
    let now = svc::now_ns();
    let decision = match svc::follow(flow, SCOPE_INTERNAL, ctx.len(), now) {
        Some(decision) => decision?,
        None => {
            let frontend = svc::find_frontend(flow, SCOPE_INTERNAL, false);
            match frontend {
                // Routed replies go to a client outside or to the node's SNAT address, not
                // to a frontend on another address: a new flow skips that (missing) lookup.
                Some(found) if !svc::is_node_ip(flow.dst) => {
                    svc::new_flow(flow, SCOPE_INTERNAL, found, ctx.len(), now)?
                }
                _ => {
                    if let Some(done) = routed_reply(ctx, flow) {
                        return done;
                    }
                    let found = frontend.ok_or(outcome::PASS_NOT_SERVICE)?;
                    svc::new_flow(flow, SCOPE_INTERNAL, found, ctx.len(), now)?
                }
            }
        }
    };
    dnat(ctx, flow, decision)
}

fn dnat(ctx: &TcContext, flow: &Flow, decision: Decision) -> Result<(i32, Outcome), Outcome> {
    match decision {
        Decision::Translate { dst, src, outcome } => {
            nat::rewrite_dst(ctx, flow, dst.0, dst.1)?;
            if let Some((addr, port)) = src {
                // Hairpin: with a node address as source the stack would see a martian.
                nat::rewrite_src(ctx, flow, addr, port)?;
            }
            // Straight to the backend's interface (FIB lookup + redirect), skipping the
            // stack's routing and netfilter, as Cilium's BPF host routing does.
            Ok((route::forward(ctx)?, outcome))
        }
        Decision::Reject => icmp::reject(ctx, flow).map(|v| (v, outcome::REJECT_NO_BACKEND)),
    }
}

/// A local backend's reply to a client outside, or to a SNATed (hairpin) client: source
/// back to the frontend, destination back to the client if the flow was SNATed; then
/// straight out of the route's interface.
#[inline(always)]
fn routed_reply(ctx: &TcContext, flow: &Flow) -> Option<Result<(i32, Outcome), Outcome>> {
    let reply = svc::routed_reply(flow, ctx.len())?;
    Some((|| {
        if let Some((addr, port)) = reply.dst {
            nat::rewrite_dst(ctx, flow, addr, port)?;
        }
        nat::rewrite_src(ctx, flow, reply.src.0, reply.src.1)?;
        Ok((route::forward(ctx)?, reply.outcome))
    })())
}

fn revnat(ctx: &TcContext, flow: &Flow) -> Result<(i32, Outcome), Outcome> {
    let entry = CONNTRACK
        .get_ptr_mut(ct::reverse_key(flow))
        .ok_or(outcome::PASS_NOT_SERVICE)?;
    // SAFETY: copy of a map value from this run's lookup.
    let known = unsafe { *entry };
    ct::touch(entry, flow, svc::now_ns(), ctx.len());
    nat::rewrite_src(ctx, flow, known.nat_addr, known.nat_port)?;
    Ok((TC_ACT_OK, outcome::REVNAT))
}

/// ICMP error about a NATed flow. `InnerEnd::Destination`: from a backend (or a router on
/// its path) about a client → backend packet, found by the reverse entry. `InnerEnd::Source`:
/// from a client about a reply it got from a VIP, found by the forward entry.
fn icmp_error(
    ctx: &TcContext,
    outer: &Flow,
    inner: &Flow,
    end: InnerEnd,
) -> Result<(i32, Outcome), Outcome> {
    let key = match end {
        InnerEnd::Destination => ct::reverse_key(&inner.reversed()),
        InnerEnd::Source => ct::forward_key(&inner.reversed()),
    };
    // SAFETY: value copied out immediately.
    let known = unsafe { CONNTRACK.get(key) }
        .copied()
        .ok_or(outcome::PASS_NOT_SERVICE)?;
    icmp::translate_error(ctx, outer, inner, end, known.nat_addr, known.nat_port)?;
    Ok((TC_ACT_OK, outcome::ICMP_ERROR_XLATE))
}
