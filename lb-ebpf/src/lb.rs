//! The two packet paths: pod → service (DNAT) and service → pod (reverse NAT).
use aya_ebpf::{
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CT_FLAG_CLOSING, Outcome, SVC_FLAG_AFFINITY, ServiceKey,
    ServiceValue, outcome,
};

use crate::{
    ct,
    icmp::{self, InnerEnd},
    maps::{AFFINITY, BACKENDS, CONNTRACK, SERVICES},
    nat,
    parse::{self, Flow, Packet},
    sched, stats,
};

// TC verdicts, as i32 on every target (the generated bindings differ in signedness by arch).
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// Runs the pod → service path; returns the TC verdict and the outcome to count.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> (i32, Outcome) {
    let result = match parse::parse(ctx) {
        Ok(Packet::Flow(flow)) => dnat(ctx, &flow),
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
        Err(
            o @ (outcome::DROP_CT_FULL
            | outcome::DROP_REWRITE_FAILED
            | outcome::DROP_BACKEND_MISSING),
        ) => (TC_ACT_SHOT, o),
        Err(o) => (TC_ACT_UNSPEC, o),
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// A backend that still belongs to `service_id` (ids are never shared between services).
#[inline(always)]
fn live_backend(backend_id: u32, service_id: u32) -> Option<Backend> {
    // SAFETY: value copied out immediately.
    let backend = unsafe { BACKENDS.get(backend_id) }.copied()?;
    (backend.service_id == service_id).then_some(backend)
}

fn dnat(ctx: &TcContext, flow: &Flow) -> Result<(i32, Outcome), Outcome> {
    let now = now_ns();
    let bytes = ctx.len();
    if let Some(entry) = CONNTRACK.get_ptr_mut(ct::forward_key(flow)) {
        // SAFETY: copy of a map value from this run's lookup.
        let known = unsafe { *entry };
        // A flow whose backend left the service, or whose entry outlived its lifetime (the
        // tuple is being reused), is balanced again as a new flow.
        let expired = ct::expired(&known, flow.proto, now);
        if !expired && let Some(backend) = live_backend(known.backend_id, known.service_id) {
            let flags = ct::touch(entry, flow, now, bytes);
            if flags & CT_FLAG_CLOSING != 0 && known.flags & CT_FLAG_CLOSING == 0 {
                sched::flow_closed(known.backend_id);
            }
            ct::ensure_reverse(flow, known.backend_id, &backend, known.service_id, now)?;
            nat::rewrite_dst(ctx, flow, backend.ip, backend.port)?;
            stats::count_traffic(known.service_id, known.backend_id, bytes, false);
            return Ok((TC_ACT_OK, outcome::DNAT_ESTABLISHED));
        }
        if expired && known.flags & CT_FLAG_CLOSING == 0 {
            sched::flow_closed(known.backend_id);
        }
    }

    let frontend_key = ServiceKey {
        vip: flow.dst,
        port: flow.dport,
        slot: 0,
        proto: flow.proto,
        _pad: [0; 3],
    };
    // SAFETY: value copied out immediately.
    let frontend = unsafe { SERVICES.get(frontend_key) }
        .copied()
        .ok_or(outcome::PASS_NOT_SERVICE)?;
    if frontend.count == 0 {
        return icmp::reject(ctx, flow).map(|v| (v, outcome::REJECT_NO_BACKEND));
    }
    let (backend_id, backend) = select_backend(&frontend_key, &frontend, flow, now)?;
    ct::create(flow, backend_id, &backend, frontend.service_id, now, bytes)?;
    sched::flow_opened(backend_id);
    nat::rewrite_dst(ctx, flow, backend.ip, backend.port)?;
    stats::count_traffic(frontend.service_id, backend_id, bytes, true);
    Ok((TC_ACT_OK, outcome::DNAT_NEW))
}

/// Session affinity first (if set and fresh), else the frontend's algorithm.
#[inline(always)]
fn select_backend(
    frontend_key: &ServiceKey,
    frontend: &ServiceValue,
    flow: &Flow,
    now: u64,
) -> Result<(u32, Backend), Outcome> {
    let affinity = frontend.flags & SVC_FLAG_AFFINITY != 0;
    let affinity_key = AffinityKey {
        client: flow.src,
        service_id: frontend.service_id,
    };
    if affinity {
        // SAFETY: value copied out immediately.
        if let Some(pinned) = unsafe { AFFINITY.get(affinity_key) }.copied() {
            let timeout_ns = frontend.affinity_timeout_s as u64 * 1_000_000_000;
            if now.wrapping_sub(pinned.last_used_ns) < timeout_ns
                && let Some(backend) = live_backend(pinned.backend_id, frontend.service_id)
            {
                remember_affinity(&affinity_key, pinned.backend_id, now);
                stats::count(outcome::AFFINITY_HIT);
                return Ok((pinned.backend_id, backend));
            }
        }
    }
    let (backend_id, backend) = match sched::pick(frontend_key, frontend, flow) {
        Some(id) => match live_backend(id, frontend.service_id) {
            Some(backend) => (id, backend),
            None => random_backend(frontend_key, frontend)?,
        },
        None => random_backend(frontend_key, frontend)?,
    };
    if affinity {
        remember_affinity(&affinity_key, backend_id, now);
    }
    Ok((backend_id, backend))
}

/// Uniform random over the slots, as kube-proxy's iptables mode does with
/// `statistic --mode random`; also the fallback when an algorithm cannot decide.
#[inline(always)]
fn random_backend(
    frontend_key: &ServiceKey,
    frontend: &ServiceValue,
) -> Result<(u32, Backend), Outcome> {
    if lb_common::scheduler_of(frontend.flags) != lb_common::scheduler::RANDOM {
        stats::count(outcome::SCHED_FALLBACK);
    }
    // SAFETY: helper without side effects.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = (random % frontend.count as u32) as u16 + 1;
    let backend_id =
        sched::slot_backend(frontend_key, slot).ok_or(outcome::DROP_BACKEND_MISSING)?;
    let backend =
        live_backend(backend_id, frontend.service_id).ok_or(outcome::DROP_BACKEND_MISSING)?;
    Ok((backend_id, backend))
}

#[inline(always)]
fn remember_affinity(key: &AffinityKey, backend_id: u32, now: u64) {
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    // Losing an affinity entry (map full) only costs stickiness, never the packet.
    let _ = AFFINITY.insert(key, value, 0);
}

fn revnat(ctx: &TcContext, flow: &Flow) -> Result<(i32, Outcome), Outcome> {
    let entry = CONNTRACK
        .get_ptr_mut(ct::reverse_key(flow))
        .ok_or(outcome::PASS_NOT_SERVICE)?;
    // SAFETY: copy of a map value from this run's lookup.
    let known = unsafe { *entry };
    ct::touch(entry, flow, now_ns(), ctx.len());
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
