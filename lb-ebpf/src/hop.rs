//! The next-hop cache: a FIB lookup's result (egress interface and MACs) kept per
//! (source, destination, ingress interface), one map per family, so a flow's packets after the first skip the
//! lookup (the bench's `cost_fib` row: the largest single step of a forwarded packet).
//!
//! Only a result the lookup would give again is used: one made under the current routing
//! generation (the agent raises it on every route, rule, neighbour, link or address
//! change), less than `HOP_TTL_NS` old (a bound for the time an agent is not running), and
//! for a packet no longer than one the lookup found to fit the route's MTU (GSO packets are
//! not checked against the MTU by the lookup either).
use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, maps::LruHashMap};
use lb_common::{HOP_FLAG_POD, HopKey, HopKey6, HopValue};

use crate::{
    maps::{HOP_SCRATCH, NEXT_HOPS, NEXT_HOPS6, ROUTE_GEN},
    parse::Ipv6Hdr,
};

/// The key of each family's cache.
pub trait Key: Sized + 'static {
    fn cache() -> &'static LruHashMap<Self, HopValue>;
}

impl Key for HopKey {
    #[inline(always)]
    fn cache() -> &'static LruHashMap<HopKey, HopValue> {
        &NEXT_HOPS
    }
}

impl Key for HopKey6 {
    #[inline(always)]
    fn cache() -> &'static LruHashMap<HopKey6, HopValue> {
        &NEXT_HOPS6
    }
}

/// A FIB lookup's parameters and the entry made from its result, in a per-CPU slot: on the
/// stack they would overflow the callers' frames.
#[repr(C)]
pub struct HopScratch {
    pub fib: FibParams,
    pub hop: HopValue,
    /// An IPv6 packet's header and key (76 bytes the IPv6 stages' stacks cannot spare).
    pub ip6: Ipv6Hdr,
    pub key6: HopKey6,
}

/// Sets `s.key6` from the header in `s.ip6` and the ingress interface.
#[inline(always)]
pub fn key6_of(s: &mut HopScratch, ingress: u32) {
    s.key6.dst = s.ip6.dst;
    s.key6.src = s.ip6.src;
    s.key6.ifindex = ingress;
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

/// The cached next hop of a packet of datagram length `len` (`gso`: a GSO packet).
#[inline(always)]
pub fn lookup<K: Key>(key: &K, len: u16, gso: bool, now: u64) -> Cached {
    let Some(hop) = K::cache().get_ptr(key) else {
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
pub fn remember<K: Key>(s: &mut HopScratch, key: &K, pod: bool, max_len: u16, now: u64) {
    fill(s, pod, max_len, now);
    insert(key, &s.hop);
}

/// `remember` for the IPv6 key in `s.key6`.
#[inline(always)]
pub fn remember6(s: &mut HopScratch, pod: bool, max_len: u16, now: u64) {
    fill(s, pod, max_len, now);
    insert(&s.key6, &s.hop);
}

#[inline(always)]
fn fill(s: &mut HopScratch, pod: bool, max_len: u16, now: u64) {
    let hop = &mut s.hop;
    hop.macs[..6].copy_from_slice(&s.fib.dmac);
    hop.macs[6..].copy_from_slice(&s.fib.smac);
    hop.ifindex = s.fib.ifindex;
    hop.generation = generation();
    hop.max_len = max_len;
    hop.flags = if pod { HOP_FLAG_POD } else { 0 };
    hop.stamp_ns = now;
}

/// A full cache only costs the next packet a lookup. Key and entry by reference: by value
/// they would be copied onto the stack the callers cannot spare.
#[inline(always)]
fn insert<K: Key>(key: &K, hop: &HopValue) {
    let _ = K::cache().insert(key, hop, 0);
}
