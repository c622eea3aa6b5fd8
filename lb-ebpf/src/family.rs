//! The two address families. Balancing (`svc`, `ct`, `sched`) is written once, generic over
//! [`Family`]; each family names its own maps, so an IPv4 packet only ever touches the IPv4
//! tables (with their IPv4-sized keys) and an IPv6 packet the IPv6 ones.
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, lpm_trie::Key};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, Ip6, MapAddr, NodeConfig, ReplyClaim,
    ServiceKey, ServiceValue, SourceRangeKey,
};

use crate::ct::CtScratch;

use crate::maps::{
    AFFINITY, AFFINITY6, BACKENDS, BACKENDS6, CONFIG, CONFIG6, CONNTRACK, CONNTRACK6, CT_SCRATCH,
    CT_SCRATCH6, FLOW_CLAIMS, NODE_IPS, NODE_IPS6, REPLY_CLAIMS, REPLY_CLAIMS6, SERVICES,
    SERVICES6, SOURCE_RANGES, SOURCE_RANGES6, STATS, STATS6,
};

pub trait Family: 'static {
    type Addr: MapAddr;
    /// Whether every reverse entry (not only a SNATed flow's) is first tried as a claim
    /// (`ct::record_reverse`). Measured per family: an IPv4 claim (72 bytes) costs less
    /// than the LRU insert it replaces; an IPv6 one (120 bytes, two or three cache lines at
    /// a place as random as the client) costs more, so IPv6 claims only SNAT ports, whose
    /// slots lie in one run per backend.
    const CLAIMED_REPLIES: bool;
    /// Whether forward entries are first tried as claims (`ct::record_forward`; looked up
    /// there first: `ct::forward_entry`). IPv4 only, for the reason above, and
    /// the IPv6 stages have no verifier budget left for a second place to look.
    const CLAIMED_FLOWS: bool;
    /// Whether hooks that read a reply claim inline (`crate::read::Read::Inline`) may: IPv6's
    /// inlined read crashed LLVM 22 (`ct::claimed`), so it always calls.
    const INLINE_CLAIM_READS: bool;
    fn services() -> &'static HashMap<ServiceKey<Self::Addr>, ServiceValue>;
    fn backends() -> &'static Array<Backend<Self::Addr>>;
    fn conntrack() -> &'static LruHashMap<CtKey<Self::Addr>, CtValue<Self::Addr>>;
    /// Reverse entries as claims (`ct`): every SNATed flow's, and others' per
    /// `CLAIMED_REPLIES`.
    fn reply_claims() -> &'static Array<ReplyClaim<Self::Addr>>;
    /// Forward entries as claims, per `CLAIMED_FLOWS` (a family without them names its reply
    /// claims here, never used).
    fn flow_claims() -> &'static Array<ReplyClaim<Self::Addr>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::Addr>, AffinityValue>;
    fn node_ips() -> &'static HashMap<Self::Addr, u32>;
    /// The node's SNAT address and ports for this family (zeros until the agent wrote them).
    fn config() -> NodeConfig<Self::Addr>;
    /// The node's SNAT port range for this family, host order (`(0, 0)` until written).
    fn snat_ports() -> (u16, u16);
    /// Whether `client` is inside one of the service's loadBalancerSourceRanges.
    fn source_allowed(service_id: u32, client: Self::Addr) -> bool;
    /// 127.0.0.0/8, or ::1.
    fn is_loopback(addr: Self::Addr) -> bool;
    /// This CPU's slot for building conntrack entries.
    fn ct_scratch() -> Option<*mut CtScratch<Self::Addr>>;
    /// The family's outcome counters.
    fn stats() -> &'static PerCpuArray<u64>;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    const CLAIMED_REPLIES: bool = true;
    const CLAIMED_FLOWS: bool = true;
    const INLINE_CLAIM_READS: bool = true;
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey, ServiceValue> {
        &SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend> {
        &BACKENDS
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey, CtValue> {
        &CONNTRACK
    }
    #[inline(always)]
    fn reply_claims() -> &'static Array<ReplyClaim> {
        &REPLY_CLAIMS
    }
    #[inline(always)]
    fn flow_claims() -> &'static Array<ReplyClaim> {
        &FLOW_CLAIMS
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey, AffinityValue> {
        &AFFINITY
    }
    #[inline(always)]
    fn node_ips() -> &'static HashMap<u32, u32> {
        &NODE_IPS
    }
    #[inline(always)]
    fn config() -> NodeConfig {
        CONFIG.get(0).copied().unwrap_or_default()
    }
    #[inline(always)]
    fn snat_ports() -> (u16, u16) {
        CONFIG
            .get(0)
            .map_or((0, 0), |c| (c.snat_port_min, c.snat_port_max))
    }
    #[inline(always)]
    fn source_allowed(service_id: u32, client: u32) -> bool {
        let key = Key::new(
            64,
            SourceRangeKey {
                service_id_be: service_id.to_be(),
                addr: client,
            },
        );
        SOURCE_RANGES.get(&key).is_some()
    }
    #[inline(always)]
    fn ct_scratch() -> Option<*mut CtScratch<u32>> {
        CT_SCRATCH.get_ptr_mut(0)
    }
    #[inline(always)]
    fn stats() -> &'static PerCpuArray<u64> {
        &STATS
    }
    #[inline(always)]
    fn is_loopback(addr: u32) -> bool {
        // The first address byte is the lowest in memory (network order).
        addr & 0xff == 127
    }
}

impl Family for V6 {
    type Addr = Ip6;
    const CLAIMED_REPLIES: bool = false;
    const CLAIMED_FLOWS: bool = false;
    const INLINE_CLAIM_READS: bool = false;
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Ip6>, ServiceValue> {
        &SERVICES6
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend<Ip6>> {
        &BACKENDS6
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey<Ip6>, CtValue<Ip6>> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn reply_claims() -> &'static Array<ReplyClaim<Ip6>> {
        &REPLY_CLAIMS6
    }
    #[inline(always)]
    fn flow_claims() -> &'static Array<ReplyClaim<Ip6>> {
        &REPLY_CLAIMS6
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Ip6>, AffinityValue> {
        &AFFINITY6
    }
    #[inline(always)]
    fn node_ips() -> &'static HashMap<Ip6, u32> {
        &NODE_IPS6
    }
    #[inline(always)]
    fn config() -> NodeConfig<Ip6> {
        CONFIG6.get(0).copied().unwrap_or_default()
    }
    #[inline(always)]
    fn snat_ports() -> (u16, u16) {
        CONFIG6
            .get(0)
            .map_or((0, 0), |c| (c.snat_port_min, c.snat_port_max))
    }
    #[inline(always)]
    fn source_allowed(service_id: u32, client: Ip6) -> bool {
        let key = Key::new(
            32 + 128,
            SourceRangeKey {
                service_id_be: service_id.to_be(),
                addr: client,
            },
        );
        SOURCE_RANGES6.get(&key).is_some()
    }
    #[inline(always)]
    fn ct_scratch() -> Option<*mut CtScratch<Ip6>> {
        CT_SCRATCH6.get_ptr_mut(0)
    }
    #[inline(always)]
    fn stats() -> &'static PerCpuArray<u64> {
        &STATS6
    }
    #[inline(always)]
    fn is_loopback(addr: Ip6) -> bool {
        addr == [0, 0, 0, 1u32.to_be()]
    }
}
