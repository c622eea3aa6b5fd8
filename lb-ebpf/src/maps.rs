//! Map definitions. Maps are not pinned by the object: the agent pins them under `--bpffs`
//! (and reuses existing pins on restart), while tests load private, unpinned copies.
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtTimeouts, CtValue, Ip6, MAGLEV_DEFAULT_SIZE,
    NodeConfig, ReplyClaim, ServiceKey, ServiceName, ServiceValue, SockFrontend, SockKey, SockKey6,
    SourceRangeKey, TrafficCounter, map_sizes, outcome,
};

#[map(name = "XLB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(map_sizes::SERVICES, BPF_F_NO_PREALLOC);

/// Backend id → backend: an array, so following a flow to its backend costs an index (the
/// verifier inlines array lookups) rather than a hash lookup. An unused id's slot is all
/// zeros (service id 0, which no service has). Mmapable: the agent scans it as memory.
#[map(name = "XLB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(map_sizes::BACKENDS, BPF_F_MMAPABLE);

#[map(name = "XLB_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(map_sizes::CONNTRACK, 0);

#[map(name = "XLB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(map_sizes::AFFINITY, 0);

#[map(name = "XLB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(outcome::COUNT, 0);

/// The outcomes of IPv6 packets (metrics carry the family).
#[map(name = "XLB_STATS6")]
pub static STATS6: PerCpuArray<u64> = PerCpuArray::with_max_entries(outcome::COUNT, 0);

/// Traffic per service id, then per backend id: arrays indexed by id (the agent hands out
/// the lowest free id and zeroes a slot when its id is freed), so counting costs no hash
/// lookup. Ids beyond the capacity are not counted.
#[map(name = "XLB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficCounter> =
    PerCpuArray::with_max_entries(map_sizes::SERVICE_STATS, 0);

#[map(name = "XLB_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficCounter> =
    PerCpuArray::with_max_entries(map_sizes::BACKEND_STATS, 0);

/// Service id → round-robin cursor (shared by all CPUs, advanced atomically). LRU so that
/// cursors of deleted services age out even if the agent's removal is missed.
#[map(name = "XLB_RR")]
pub static ROUND_ROBIN: LruHashMap<u32, u64> =
    LruHashMap::with_max_entries(map_sizes::ROUND_ROBIN, 0);

/// Backend id → flows open on this node (raised by new flows, lowered when a flow closes,
/// recounted from conntrack by the agent's GC, which also zeroes the slots of ids nothing
/// is open to). An array, as `BACKENDS`: a new flow's count is an inlined index.
#[map(name = "XLB_CONNS")]
pub static CONNECTIONS: Array<u64> =
    Array::with_max_entries(map_sizes::CONNECTIONS, BPF_F_MMAPABLE);

/// Maglev table of one frontend: element 0 holds the table size M, elements 1..=M backend
/// ids. `BPF_F_INNER_MAP` (4096) lets the agent use another M than this template's.
pub type MaglevTable = btf_maps::Array<u32, { MAGLEV_DEFAULT_SIZE as usize + 1 }, 4096>;

/// Service id → its Maglev table. The agent builds a new table and swaps it in with one
/// update, so a packet sees either the old or the new table, never a mix.
#[btf_map]
pub static XLB_MAGLEV: btf_maps::HashOfMaps<u32, MaglevTable, { map_sizes::MAGLEV as usize }> =
    btf_maps::HashOfMaps::new();

/// This node's IPv4 addresses (value unused): NodePort frontends answer on these.
#[map(name = "XLB_NODE_IPS")]
pub static NODE_IPS: HashMap<u32, u32> = HashMap::with_max_entries(map_sizes::NODE_IPS, 0);

/// The host's network namespace cookie (0: not written yet), written by the agent before it
/// attaches the socket hooks.
#[map(name = "XLB_HOST_NETNS")]
pub static HOST_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// Service id → Service port name, written by the agent for the read commands. Not read
/// by any program; declared here so it is created (and pinned) with the others.
#[map(name = "XLB_SVC_NAMES")]
pub static SERVICE_NAMES: HashMap<u32, ServiceName> =
    HashMap::with_max_entries(map_sizes::SERVICE_STATS, BPF_F_NO_PREALLOC);

/// The node's conntrack lifetimes (zeros: the defaults), written by the agent at start.
#[map(name = "XLB_CT_TIMEOUTS")]
pub static CT_TIMEOUTS: Array<CtTimeouts> = Array::with_max_entries(1, 0);

/// Node-wide settings, written by the agent at start.
#[map(name = "XLB_CONFIG")]
pub static CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// loadBalancerSourceRanges of every service that has them.
#[map(name = "XLB_SRC_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(map_sizes::SOURCE_RANGES, 0);

/// Node processes' sockets connected through a frontend (LRU: closed sockets age out).
#[map(name = "XLB_SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<SockKey, SockFrontend> =
    LruHashMap::with_max_entries(map_sizes::SOCK_REVNAT, 0);

/// Host ends of pod interfaces (ifindex → 1): forwarding into these uses
/// `bpf_redirect_peer`, which hands the packet to the pod's end without a second pass
/// through the node's backlog queue.
#[map(name = "XLB_POD_IFACES")]
pub static POD_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(map_sizes::POD_IFACES, 0);

// IPv6 twins of the address-keyed maps above, same capacities. Separate maps rather than
// 16-byte addresses in the IPv4 ones: IPv4 keys stay 12-16 bytes (hashing and comparing a
// key costs per byte), and an IPv4 node never touches the IPv6 tables.

#[map(name = "XLB_SERVICES6")]
pub static SERVICES6: HashMap<ServiceKey<Ip6>, ServiceValue> =
    HashMap::with_max_entries(map_sizes::SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "XLB_BACKENDS6")]
pub static BACKENDS6: Array<Backend<Ip6>> =
    Array::with_max_entries(map_sizes::BACKENDS, BPF_F_MMAPABLE);

#[map(name = "XLB_CT6")]
pub static CONNTRACK6: LruHashMap<CtKey<Ip6>, CtValue<Ip6>> =
    LruHashMap::with_max_entries(map_sizes::CONNTRACK, 0);

#[map(name = "XLB_AFFINITY6")]
pub static AFFINITY6: LruHashMap<AffinityKey<Ip6>, AffinityValue> =
    LruHashMap::with_max_entries(map_sizes::AFFINITY, 0);

#[map(name = "XLB_NODE_IPS6")]
pub static NODE_IPS6: HashMap<Ip6, u32> = HashMap::with_max_entries(map_sizes::NODE_IPS, 0);

#[map(name = "XLB_CONFIG6")]
pub static CONFIG6: Array<NodeConfig<Ip6>> = Array::with_max_entries(1, 0);

#[map(name = "XLB_SRC_RANGES6")]
pub static SOURCE_RANGES6: LpmTrie<SourceRangeKey<Ip6>, u8> =
    LpmTrie::with_max_entries(map_sizes::SOURCE_RANGES, 0);

#[map(name = "XLB_SOCK_REVNAT6")]
pub static SOCK_REVNAT6: LruHashMap<SockKey6, SockFrontend<Ip6>> =
    LruHashMap::with_max_entries(map_sizes::SOCK_REVNAT, 0);

/// Per-CPU slots for building conntrack entries (`ct::CtScratch`). Private to each loaded
/// object: not pinned, nothing in them outlives a program run.
#[map(name = "XLB_CT_SCRATCH")]
pub static CT_SCRATCH: PerCpuArray<crate::ct::CtScratch<u32>> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "XLB_CT_SCRATCH6")]
pub static CT_SCRATCH6: PerCpuArray<crate::ct::CtScratch<Ip6>> =
    PerCpuArray::with_max_entries(1, 0);

/// The IPv6 programs (`pod::Stage6`), tail-called by the IPv4 ones; filled by the agent
/// after loading (and pinned: see `map_names::PROGS6`).
#[map(name = "XLB_PROGS6")]
pub static PROGS6: ProgramArray = ProgramArray::with_max_entries(4, 0);

/// The IPv6 XDP stages (`xdp6::Stage`), tail-called by `xlb_external` (a program array
/// serves one program type, so XDP has its own); pinned, as `PROGS6`.
#[map(name = "XLB_PROGS6_XDP")]
pub static PROGS6_XDP: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Bits of the addresses that may be a frontend's or this node's (`lb_common::addr_filter`),
/// written by the agent; read by `filter`.
#[map(name = "XLB_ADDR_FILTER")]
pub static ADDR_FILTER: Array<u64> = Array::with_max_entries(lb_common::addr_filter::ENTRIES, 0);

/// The reply filter (`map_names::REPLY_FILTER`): bits of backends' (address, port,
/// protocol), set by the agent; pinned.
#[map(name = "XLB_REPLY_FILTER")]
pub static REPLY_FILTER: Array<u64> = Array::with_max_entries(lb_common::addr_filter::ENTRIES, 0);

/// The routing generation (`map_names::ROUTE_GEN`), raised by the agent; pinned, so the
/// attached programs and every agent see one value.
#[map(name = "XLB_ROUTE_GEN")]
pub static ROUTE_GEN: Array<u64> = Array::with_max_entries(1, 0);

/// Cached FIB results (`hop`), per CPU. A cache: private to each loaded object, not pinned.
#[map(name = "XLB_NEXT_HOPS")]
pub static NEXT_HOPS: PerCpuArray<lb_common::HopSlot> =
    PerCpuArray::with_max_entries(lb_common::next_hops::SLOTS, 0);

#[map(name = "XLB_NEXT_HOPS6")]
pub static NEXT_HOPS6: PerCpuArray<lb_common::HopSlot6> =
    PerCpuArray::with_max_entries(lb_common::next_hops::SLOTS, 0);

/// What an IPv6 XDP stage tells the stage it tail-calls (`xdp6::Bounce`), per CPU: a tail
/// call carries no arguments. Private to each loaded object.
#[map(name = "XLB_XDP6_BOUNCE")]
pub static XDP6_BOUNCE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU slot of `hop::HopScratch` (private to each loaded object).
#[map(name = "XLB_HOP_SCRATCH")]
pub static HOP_SCRATCH: PerCpuArray<crate::hop::HopScratch> = PerCpuArray::with_max_entries(1, 0);

/// Reverse entries as claims (`ReplyClaim`, see `ct`): a slot taken per new flow with one
/// compare-and-swap, where a second conntrack insert cost an LRU element and its list
/// upkeep. Mmapable: the agent scans it as memory (reply filter on start, `xlb stats`).
#[map(name = "XLB_REPLY_CLAIMS")]
pub static REPLY_CLAIMS: Array<ReplyClaim> =
    Array::with_max_entries(map_sizes::REPLY_CLAIMS, BPF_F_MMAPABLE);

/// IPv4 flows' forward entries as claims (`ct::record_forward`): an array of its own,
/// so they do not crowd the runs of reply slots SNAT ports are searched in.
#[map(name = "XLB_FLOW_CLAIMS")]
pub static FLOW_CLAIMS: Array<ReplyClaim> =
    Array::with_max_entries(map_sizes::FLOW_CLAIMS, BPF_F_MMAPABLE);

#[map(name = "XLB_REPLY_CLAIMS6")]
pub static REPLY_CLAIMS6: Array<ReplyClaim<Ip6>> =
    Array::with_max_entries(map_sizes::REPLY_CLAIMS, BPF_F_MMAPABLE);
