//! The next-hop cache: a FIB lookup's result (egress interface and MACs) kept per
//! (source, destination, ingress interface), so a flow's packets after the first skip the
//! lookup (the bench's `cost_fib` row: the largest single step of a forwarded packet).
//!
//! Only a result the lookup would give again is used: one made under the current routing
//! generation (the agent raises it on every route, rule, neighbour, link or address
//! change), less than `HOP_TTL_NS` old (a bound for the time an agent is not running), and
//! for a packet no longer than one the lookup found to fit the route's MTU (GSO packets are
//! not checked against the MTU by the lookup either).
use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use lb_common::{HOP_FLAG_POD, HopKey, HopValue};

use crate::maps::{HOP_SCRATCH, NEXT_HOPS, ROUTE_GEN};

/// A FIB lookup's parameters and the entry made from its result, in a per-CPU slot: on the
/// stack they would overflow the callers' frames.
#[repr(C)]
pub struct HopScratch {
    pub fib: FibParams,
    pub hop: HopValue,
}

/// This CPU's slot (a program run's alone: programs of a hook do not nest on a CPU).
#[inline(always)]
pub fn scratch() -> Option<*mut HopScratch> {
    HOP_SCRATCH.get_ptr_mut(0)
}

const HOP_TTL_NS: u64 = 1_000_000_000;

/// A packet's view of the cache.
pub enum Cached {
    /// The entry, in the cache map (valid for this program run).
    Hit(*const HopValue),
    /// No usable entry; a new one keeps this length bound (the old entry's if only the
    /// packet was too long for it).
    Miss { max_len: u16 },
}

#[inline(always)]
fn generation() -> u32 {
    ROUTE_GEN.get(0).map_or(0, |&g| g as u32)
}

/// The cached next hop of a packet of IPv4 total length `len` (`gso`: a GSO packet).
#[inline(always)]
pub fn lookup(key: &HopKey, len: u16, gso: bool, now: u64) -> Cached {
    let Some(hop) = NEXT_HOPS.get_ptr(key) else {
        return Cached::Miss { max_len: 0 };
    };
    // SAFETY: a map value from this run's lookup.
    let (generation_then, stamp, max_len) =
        unsafe { ((*hop).generation, (*hop).stamp_ns, (*hop).max_len) };
    if generation_then != generation() || now.saturating_sub(stamp) >= HOP_TTL_NS {
        return Cached::Miss { max_len: 0 };
    }
    if !gso && len > max_len {
        return Cached::Miss { max_len };
    }
    Cached::Hit(hop)
}

/// Records the successful lookup in `s.fib` (`pod`: the egress is a pod interface); the
/// entry stays in `s.hop` for the caller.
#[inline(always)]
pub fn remember(s: &mut HopScratch, key: &HopKey, pod: bool, max_len: u16, now: u64) {
    let hop = &mut s.hop;
    hop.macs[..6].copy_from_slice(&s.fib.dmac);
    hop.macs[6..].copy_from_slice(&s.fib.smac);
    hop.ifindex = s.fib.ifindex;
    hop.generation = generation();
    hop.max_len = max_len;
    hop.flags = if pod { HOP_FLAG_POD } else { 0 };
    hop.stamp_ns = now;
    // A full cache only costs the next packet a lookup. By reference: by value, the entry
    // would be copied onto the stack the callers cannot spare.
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "keeps the entry in the per-CPU slot"
    )]
    let _ = NEXT_HOPS.insert(key, &s.hop, 0);
}
