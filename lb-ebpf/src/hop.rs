//! The next-hop cache: a FIB lookup's result (egress interface and MACs) kept per
//! (source, destination, ingress interface) — per (destination, ingress interface) where
//! the source cannot change the result (`key`) — so a flow's packets after the first skip the
//! lookup (the bench's `cost_fib` row: the largest single step of a forwarded packet). One
//! direct-mapped per-CPU array per family (`lb_common::HopSlot`): a lookup is a hash and an
//! array read, a miss overwrites the slot.
//!
//! Only a result the lookup would give again is used: one made under the current routing
//! generation (the agent raises it on every route, rule, nexthop object, neighbour, link or
//! address change), less than `HOP_TTL_NS` old (a bound for the time an agent is not
//! running), and for a packet no longer than one the lookup found to fit the route's MTU
//! (GSO packets are not checked against the MTU by the lookup either).
use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use lb_common::{HOP_FLAG_POD, HopKey, HopKey6, HopValue, MapAddr, next_hops, route_gen};

use crate::{
    maps::{HOP_SCRATCH, NEXT_HOPS, NEXT_HOPS6, ROUTE_GEN},
    parse::{Ipv4Hdr, Ipv6Hdr},
};

/// The key of each family's cache.
pub trait Key: Copy + PartialEq + 'static {
    /// The key's slot on this CPU: its key and its next hop.
    fn slot(&self) -> Option<(*mut Self, *mut HopValue)>;
}

impl Key for HopKey {
    #[inline(always)]
    fn slot(&self) -> Option<(*mut HopKey, *mut HopValue)> {
        let index = next_hops::index(self.dst, self.src, self.ifindex);
        let slot = NEXT_HOPS.get_ptr_mut(index)?;
        // SAFETY: a map value of this run.
        Some(unsafe { (&raw mut (*slot).key, &raw mut (*slot).hop) })
    }
}

impl Key for HopKey6 {
    #[inline(always)]
    fn slot(&self) -> Option<(*mut HopKey6, *mut HopValue)> {
        let index = next_hops::index(self.dst.hash_word(), self.src.hash_word(), self.ifindex);
        let slot = NEXT_HOPS6.get_ptr_mut(index)?;
        // SAFETY: a map value of this run.
        Some(unsafe { (&raw mut (*slot).key, &raw mut (*slot).hop) })
    }
}

/// A FIB lookup's parameters and the entry made from its result, in a per-CPU slot: on the
/// stack they would overflow the callers' frames.
#[repr(C)]
pub struct HopScratch {
    pub fib: FibParams,
    pub hop: HopValue,
    /// An IPv4 packet's header for the FIB lookup (`route::forward`).
    pub ip: Ipv4Hdr,
    /// An IPv6 packet's header and key (76 bytes the IPv6 stages' stacks cannot spare).
    pub ip6: Ipv6Hdr,
    pub key6: HopKey6,
}

/// The cache key of an IPv4 packet from `src` to `dst` that arrived on `ingress`, and
/// whether it was made without the source: when the agent found that lookups cannot depend
/// on it (`lb_common::route_gen`), every client's flows to a backend share one entry.
#[inline(always)]
pub fn key(dst: u32, src: u32, ingress: u32) -> (HopKey, bool) {
    let free = source_free(route_gen::SOURCE_FREE_V4);
    (
        HopKey {
            dst,
            src: if free { 0 } else { src },
            ifindex: ingress,
        },
        free,
    )
}

/// Sets `s.key6` from the header in `s.ip6` and the ingress interface, as `key` does;
/// whether it was made without the source.
#[inline(always)]
pub fn key6_of(s: &mut HopScratch, ingress: u32) -> bool {
    let free = source_free(route_gen::SOURCE_FREE_V6);
    s.key6.dst = s.ip6.dst;
    s.key6.src = if free { [0; 4] } else { s.ip6.src };
    s.key6.ifindex = ingress;
    free
}

#[inline(always)]
fn source_free(flag: u64) -> bool {
    ROUTE_GEN.get(0).is_some_and(|&g| g & flag != 0)
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
    let Some((slot_key, hop)) = key.slot() else {
        return Cached::Miss { max_len: 0 };
    };
    // SAFETY: the slot of this run's lookup.
    let (same, ifindex, generation_then, stamp, max_len) = unsafe {
        (
            *slot_key == *key,
            (*hop).ifindex,
            (*hop).generation,
            (*hop).stamp_ns,
            (*hop).max_len,
        )
    };
    if !same || ifindex == 0 {
        return Cached::Miss { max_len: 0 };
    }
    if generation_then != generation() || now.saturating_sub(stamp) >= HOP_TTL_NS {
        return Cached::Miss { max_len: 0 };
    }
    if !gso && len > max_len {
        return Cached::Miss { max_len };
    }
    Cached::Hit(hop)
}

/// Whether a translated packet's next hop is worth caching: not for the first packet of
/// a flow. Entries are made by flows' later packets, so one-packet flows (a scan, a DNS
/// query; the bench's stream of new flows) neither pay the store nor evict the entries
/// long flows use, while a pod's next flow to a backend it already talks to still hits.
#[inline(always)]
pub fn keeps(outcome: lb_common::Outcome) -> bool {
    !matches!(
        outcome,
        lb_common::outcome::DNAT_NEW | lb_common::outcome::EXTERNAL_NEW
    )
}

/// Turns the successful lookup in `s.fib` into the entry in `s.hop` (`pod`: the egress is
/// a pod interface), and caches it if `keep`.
#[inline(always)]
pub fn remember<K: Key>(
    s: &mut HopScratch,
    key: &K,
    keep: bool,
    pod: bool,
    max_len: u16,
    now: u64,
) {
    fill(s, pod, max_len, now);
    if keep {
        store(key, &s.hop);
    }
}

/// `remember` for the IPv6 key in `s.key6`.
#[inline(always)]
pub fn remember6(s: &mut HopScratch, keep: bool, pod: bool, max_len: u16, now: u64) {
    fill(s, pod, max_len, now);
    if keep {
        store(&s.key6, &s.hop);
    }
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

/// Overwrites the key's slot (whatever it held: a collision only costs a lookup).
#[inline(always)]
fn store<K: Key>(key: &K, hop: &HopValue) {
    if let Some((slot_key, slot_hop)) = key.slot() {
        // SAFETY: the slot of this run's lookup; plain data.
        unsafe {
            *slot_key = *key;
            *slot_hop = *hop;
        }
    }
}
