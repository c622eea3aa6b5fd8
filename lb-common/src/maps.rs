//! Map names, sizes, keys and values.

/// Names of the maps in the eBPF object; the agent pins each under `--bpffs` with this name.
pub mod map_names {
    pub const SERVICES: &str = "XLB_SERVICES";
    pub const BACKENDS: &str = "XLB_BACKENDS";
    pub const CONNTRACK: &str = "XLB_CT";
    pub const AFFINITY: &str = "XLB_AFFINITY";
    pub const STATS: &str = "XLB_STATS";
    pub const SERVICE_STATS: &str = "XLB_SVC_STATS";
    pub const BACKEND_STATS: &str = "XLB_BE_STATS";
    /// Round-robin cursor per frontend (service id → next turn).
    pub const ROUND_ROBIN: &str = "XLB_RR";
    /// Active flows per backend on this node, for least-conn.
    pub const CONNECTIONS: &str = "XLB_CONNS";
    /// Maglev lookup table per frontend (service id → inner array).
    pub const MAGLEV: &str = "XLB_MAGLEV";
    /// This node's addresses (NodePort destinations, SNAT source).
    pub const NODE_IPS: &str = "XLB_NODE_IPS";
    /// Node-wide settings of the datapath (one [`NodeConfig`]).
    pub const CONFIG: &str = "XLB_CONFIG";
    /// `loadBalancerSourceRanges`: (service id, client prefix) → allowed.
    pub const SOURCE_RANGES: &str = "XLB_SRC_RANGES";
    /// Sockets of node processes connected to a backend through a frontend: the frontend
    /// to show them as their peer.
    pub const SOCK_REVNAT: &str = "XLB_SOCK_REVNAT";
    /// Host ends of pod veths the agent attached to (ifindex → 1): translated packets for
    /// them go straight into the pod with `bpf_redirect_peer`.
    pub const POD_IFACES: &str = "XLB_POD_IFACES";
    /// The network namespace cookie of the host (the agent's): the socket hooks balance
    /// only sockets of that namespace; pods' sockets are balanced per packet on TC.
    pub const HOST_NETNS: &str = "XLB_HOST_NETNS";
    /// The node's conntrack lifetimes (one [`CtTimeouts`]).
    pub const CT_TIMEOUTS: &str = "XLB_CT_TIMEOUTS";
    /// Service id → the Service port it serves ("namespace/name:port"), for the read
    /// commands (`xlb services`, `xlb explain`); the programs never read it.
    pub const SERVICE_NAMES: &str = "XLB_SVC_NAMES";
    // IPv6 twins of the maps keyed or valued by addresses (Cilium's lb6 maps). Ids (service,
    // backend) are one space across families, so every id-keyed map serves both.
    pub const SERVICES6: &str = "XLB_SERVICES6";
    pub const BACKENDS6: &str = "XLB_BACKENDS6";
    pub const CONNTRACK6: &str = "XLB_CT6";
    pub const AFFINITY6: &str = "XLB_AFFINITY6";
    pub const NODE_IPS6: &str = "XLB_NODE_IPS6";
    pub const CONFIG6: &str = "XLB_CONFIG6";
    pub const SOURCE_RANGES6: &str = "XLB_SRC_RANGES6";
    pub const SOCK_REVNAT6: &str = "XLB_SOCK_REVNAT6";
    /// The IPv6 stages the IPv4 programs tail-call (`program_names::TC_IPV6`). Pinned like
    /// the rest: the kernel empties a program array when no process holds it, and the
    /// attached programs outlive the agent that loaded them.
    pub const PROGS6: &str = "XLB_PROGS6";
    /// The IPv6 XDP stages `xlb_external` tail-calls (`program_names::XDP_IPV6`).
    pub const PROGS6_XDP: &str = "XLB_PROGS6_XDP";
    /// Outcome counters of IPv6 packets (and of the IPv6 socket hooks), as `STATS`.
    pub const STATS6: &str = "XLB_STATS6";
    /// Bits of addresses that may be a frontend's or this node's, both families
    /// ([`addr_filter`](crate::addr_filter)): a packet to any other address skips every
    /// frontend and conntrack lookup a frontend needs.
    pub const ADDR_FILTER: &str = "XLB_ADDR_FILTER";
    /// The routing generation (one u64): the agent raises it on every route, rule,
    /// neighbour, link and address change it hears of; next hops cached under an older
    /// generation are looked up again.
    pub const ROUTE_GEN: &str = "XLB_ROUTE_GEN";
    /// Bits of (address, port, protocol) that may be a backend's, both families, in the
    /// address filter's layout ([`addr_filter::reply_slot`](crate::addr_filter::reply_slot)):
    /// a packet from any other source is no reply to a translated flow.
    pub const REPLY_FILTER: &str = "XLB_REPLY_FILTER";
    /// Reverse conntrack entries as claims ([`ReplyClaim`](crate::ReplyClaim)): an array
    /// indexed by the reply's tuple ([`reply_claim_slot`](crate::reply_claim_slot)), a slot
    /// claimed with a compare-and-swap instead of a second conntrack insert per flow. Every
    /// SNATed flow's reply state is here; IPv4 flows without SNAT go here unless a live
    /// flow holds their slot (then, and for IPv6 ones, the conntrack map holds it).
    pub const REPLY_CLAIMS: &str = "XLB_REPLY_CLAIMS";
    /// Forward conntrack entries of IPv4 flows as claims, as `REPLY_CLAIMS` (same
    /// slots by tuple; the conntrack map where a live flow holds the slot). An array of its
    /// own: in the reply claims' array they crowded the runs of slots a SNAT port is
    /// searched in.
    pub const FLOW_CLAIMS: &str = "XLB_FLOW_CLAIMS";
    pub const REPLY_CLAIMS6: &str = "XLB_REPLY_CLAIMS6";
    /// The datapath clock's line from jiffies, [nanoseconds per jiffy, offset]: a global's
    /// section (one entry of 16 bytes), which the agent writes after loading; private to
    /// each loaded object, not pinned.
    pub const CLOCK: &str = ".bss.xlb_clock";
    /// Every map the agent pins, in the order `xlb cleanup` removes them.
    pub const ALL: [&str; 35] = [
        SERVICES,
        BACKENDS,
        CONNTRACK,
        AFFINITY,
        STATS,
        SERVICE_STATS,
        BACKEND_STATS,
        ROUND_ROBIN,
        CONNECTIONS,
        MAGLEV,
        NODE_IPS,
        CONFIG,
        SOURCE_RANGES,
        SOCK_REVNAT,
        POD_IFACES,
        HOST_NETNS,
        SERVICE_NAMES,
        CT_TIMEOUTS,
        SERVICES6,
        BACKENDS6,
        CONNTRACK6,
        AFFINITY6,
        NODE_IPS6,
        CONFIG6,
        SOURCE_RANGES6,
        SOCK_REVNAT6,
        PROGS6,
        PROGS6_XDP,
        STATS6,
        ADDR_FILTER,
        ROUTE_GEN,
        REPLY_FILTER,
        REPLY_CLAIMS,
        REPLY_CLAIMS6,
        FLOW_CLAIMS,
    ];
}

/// How the TC programs read the one field of the kernel's `struct sk_buff` their context
/// does not show, `ip_summed` (is the L4 checksum complete, or only its pseudo-header part?),
/// and how the loader tells them where it is.
pub mod skb_access {
    /// Imm of the placeholder helper call in the object that the loader rewrites into a call
    /// of the kfunc `bpf_cast_to_kern_ctx` (or, on a kernel without it, into `r0 = 0`, on a
    /// path the programs then never take). No helper has this number.
    pub const CAST_TO_KERN_CTX_MARKER: u32 = 0x3a11_c0de;
    /// Read-only global: the bit offset of `ip_summed` in `struct sk_buff` (never 0: the
    /// struct starts with a pointer), 0 when unknown (the checksum helpers are used).
    pub const IP_SUMMED_BIT: &str = "XLB_SKB_IP_SUMMED_BIT";
}

/// Program names in the eBPF object.
pub mod program_names {
    /// Traffic entering the node from outside: NodePort, externalIPs, LoadBalancer IPs, and
    /// replies of SNATed flows (XDP on `--external-ifaces`).
    pub const XDP_EXTERNAL: &str = "xlb_external";
    /// Node processes' connect() to a frontend: the socket is connected to a backend.
    pub const SOCK_CONNECT: &str = "xlb_sock_connect";
    /// Node processes' unconnected UDP sends to a frontend.
    pub const SOCK_SENDMSG: &str = "xlb_sock_sendmsg";
    /// Node processes' UDP receives from a backend: the frontend is shown as the source.
    pub const SOCK_RECVMSG: &str = "xlb_sock_recvmsg";
    /// getpeername() of such sockets: the frontend, not the backend.
    pub const SOCK_GETPEERNAME: &str = "xlb_sock_getpeername";
    /// The IPv6 twins of the four socket hooks (IPv4-mapped addresses are balanced as IPv4).
    pub const SOCK_CONNECT6: &str = "xlb_sock_connect6";
    pub const SOCK_SENDMSG6: &str = "xlb_sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "xlb_sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "xlb_sock_getpeername6";
    /// Pod → service: DNAT, conntrack, affinity, reject (host side of pod interfaces, ingress).
    pub const TC_FROM_POD: &str = "xlb_from_pod";
    /// Service → pod: reverse NAT of replies and related ICMP errors (host side, egress).
    pub const TC_TO_POD: &str = "xlb_to_pod";
    /// Trivial programs (a verdict and nothing else) the bench measures as the floor of
    /// each hook; never attached.
    pub const FLOOR_TC: &str = "xlb_floor_tc";
    /// Samples jiffies and the coarse clock for the clock's calibration (XDP, run through
    /// BPF_PROG_TEST_RUN by the agent at load; never attached).
    pub const CLOCK_PROBE: &str = "xlb_clock_probe";
    pub const FLOOR_XDP: &str = "xlb_floor_xdp";
    /// The bench's cost probes (TC): one datapath step each (suffix: the step); never
    /// attached.
    pub const COST_PROBES: [&str; 9] = [
        "xlb_cost_parse",
        "xlb_cost_hash_miss",
        "xlb_cost_ct_miss",
        "xlb_cost_ct_insert",
        "xlb_cost_claim",
        "xlb_cost_clock",
        "xlb_cost_count",
        "xlb_cost_rewrite",
        "xlb_cost_fib",
    ];
    /// The IPv6 XDP stages, tail-called from `XDP_EXTERNAL` through `XLB_PROGS6_XDP`, in
    /// the order of their indexes there.
    pub const XDP_IPV6: [&str; 2] = ["xlb_external6", "xlb_external6_untracked"];
    /// The IPv6 stages, tail-called from the two above through the object's program array
    /// (`XLB_PROGS6`), in the order of their indexes there.
    pub const TC_IPV6: [&str; 4] = [
        "xlb_from_pod6",
        "xlb_to_pod6",
        "xlb_from_pod6_untracked",
        "xlb_from_pod6_rare",
    ];
}

/// The address filter (`XLB_ADDR_FILTER`): an array of 64-bit words, a bit per hash of an
/// address. The agent sets the bit of every frontend address (ClusterIPs, externalIPs,
/// LoadBalancer IPs) and of every node address before writing what uses them, and clears a
/// bit only after the last such address left, so the set bits are always a superset: a
/// clear bit proves a destination is neither (one array read, which the verifier inlines,
/// instead of the conntrack and frontend lookups), a set bit proves nothing (the full
/// lookups follow). Word 0 is the armed flag: until the agent filled the bits, nothing is
/// filtered.
pub mod addr_filter {
    /// 2^18 bits (32 KiB, small enough to stay in a CPU's cache, since every packet to a
    /// frontend reads it too): 1k frontend addresses set 0.4 % of them, 10k 3.7 %, 100k
    /// 32 % (a set bit only costs the full lookups).
    pub const BITS_LOG2: u32 = 18;
    /// Words of bits, after word 0.
    pub const WORDS: u32 = 1 << (BITS_LOG2 - 6);
    /// The array's entries: the armed flag, then the words.
    pub const ENTRIES: u32 = WORDS + 1;
    /// Word 0's value once the agent filled the bits.
    pub const ARMED: u64 = 1;

    /// The word (1..=WORDS) and the bit in it of an address, from its hash word
    /// ([`MapAddr::hash_word`](crate::MapAddr::hash_word)).
    #[inline(always)]
    pub const fn slot(hash_word: u32) -> (u32, u64) {
        let bit = crate::mix32(hash_word) & ((1 << BITS_LOG2) - 1);
        (1 + (bit >> 6), 1u64 << (bit & 63))
    }

    /// The word and bit of a backend's address (its hash word), port (network byte order)
    /// and protocol in the reply filter (`XLB_REPLY_FILTER`, same layout). Every reverse
    /// conntrack entry's key starts with its backend's triple, so a packet whose source
    /// triple has a clear bit is no reply to a translated flow.
    #[inline(always)]
    pub const fn reply_slot(hash_word: u32, port: u16, proto: u8) -> (u32, u64) {
        let tag = ((port as u32) << 8 | proto as u32).wrapping_mul(0x9e37_79b1);
        slot(hash_word ^ tag)
    }
}

/// The key of a cached FIB result (`XLB_NEXT_HOPS`, private to each loaded object): the
/// next hop of IPv4 packets from `src` to `dst` that arrived on interface `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopKey {
    pub dst: u32,
    pub src: u32,
    pub ifindex: u32,
}

const _: () = assert!(core::mem::size_of::<HopKey>() == 12);

/// `HopKey` for IPv6 packets (`XLB_NEXT_HOPS6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopKey6 {
    pub dst: Ip6,
    pub src: Ip6,
    pub ifindex: u32,
}

const _: () = assert!(core::mem::size_of::<HopKey6>() == 36);

/// `XLB_ROUTE_GEN`'s value: the routing generation in its low 32 bits, and above them
/// whether a family's FIB lookups cannot depend on the source address (the agent's
/// `route_policy`: default policy rules only, no multipath or source-specific route). Then
/// the next-hop cache keys entries by destination and ingress interface alone: every
/// client's flows to a backend share one entry.
pub mod route_gen {
    pub const GENERATION: u64 = 0xffff_ffff;
    pub const SOURCE_FREE_V4: u64 = 1 << 32;
    pub const SOURCE_FREE_V6: u64 = 1 << 33;

    /// The value after `current`: the generation raised (wrapping within its 32 bits, never
    /// into the flags) and the flags set to `flags`.
    pub const fn next(current: u64, flags: u64) -> u64 {
        (current.wrapping_add(1) & GENERATION) | flags
    }
}

/// `HopValue::flags`: the egress interface is a pod's (forward with `bpf_redirect_peer`).
pub const HOP_FLAG_POD: u16 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopValue {
    /// Destination then source MAC.
    pub macs: [u8; 12],
    /// The egress interface.
    pub ifindex: u32,
    /// The routing generation (`XLB_ROUTE_GEN`) the lookup was made under.
    pub generation: u32,
    /// The largest datagram length (IPv4 total length, IPv6 40 + payload length) a
    /// lookup found to fit the route's MTU (GSO packets,
    /// which the lookup does not check against the MTU, leave it as it was).
    pub max_len: u16,
    pub flags: u16,
    /// When the lookup was made (CLOCK_MONOTONIC, coarse).
    pub stamp_ns: u64,
}

const _: () = assert!(core::mem::size_of::<HopValue>() == 32);

/// A slot of the next-hop cache: a per-CPU array indexed by a hash of the key
/// ([`next_hops::index`]), each slot holding one key and its next hop. A miss overwrites
/// the slot: no allocation, no lock, no LRU list (an LRU insert costs more than the FIB
/// lookup it would save once).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopSlot {
    pub key: HopKey,
    pub _pad: u32,
    pub hop: HopValue,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopSlot6 {
    pub key: HopKey6,
    pub _pad: u32,
    pub hop: HopValue,
}

const _: () = assert!(core::mem::size_of::<HopSlot>() == 48);
const _: () = assert!(core::mem::size_of::<HopSlot6>() == 72);

/// The next-hop cache's slots.
pub mod next_hops {
    /// Slots per CPU (48 KiB for IPv4, 72 KiB for IPv6, per CPU): the (source,
    /// destination) pairs of long flows a CPU forwards at once.
    pub const SLOTS: u32 = 1024;

    /// The slot of a key, from its addresses' hash words and the ingress interface.
    #[inline(always)]
    pub const fn index(dst_word: u32, src_word: u32, ifindex: u32) -> u32 {
        crate::mix32(dst_word ^ crate::mix32(src_word ^ crate::mix32(ifindex))) & (SLOTS - 1)
    }
}

/// Map capacities, sized for real clusters (Cilium uses similar defaults).
pub mod map_sizes {
    /// Frontend slots plus backend slots of every service port: 100k services with 10
    /// endpoints each fit. Not preallocated (`BPF_F_NO_PREALLOC`): memory follows use.
    pub const SERVICES: u32 = 2_097_152;
    /// Indexed by backend id, as `BACKEND_STATS` (preallocated: 3 MiB, 6 MiB for IPv6).
    pub const BACKENDS: u32 = BACKEND_STATS;
    pub const CONNTRACK: u32 = 524_288;
    /// Reply claims per family: a power of two (the slot is a hash's low bits).
    /// Preallocated: 18 MiB for IPv4, 30 MiB for IPv6.
    pub const REPLY_CLAIMS: u32 = 262_144;
    pub const FLOW_CLAIMS: u32 = 262_144;
    pub const AFFINITY: u32 = 65_536;
    /// Counter arrays, indexed by service id and backend id (preallocated per CPU: 3 MiB
    /// and 6 MiB per CPU).
    pub const SERVICE_STATS: u32 = 131_072;
    pub const BACKEND_STATS: u32 = 262_144;
    pub const ROUND_ROBIN: u32 = 65_536;
    /// Open flows per backend id (preallocated: 2 MiB).
    pub const CONNECTIONS: u32 = BACKEND_STATS;
    /// Frontends that can use Maglev at the same time.
    pub const MAGLEV: u32 = 4_096;
    pub const NODE_IPS: u32 = 256;
    pub const SOURCE_RANGES: u32 = 16_384;
    pub const SOCK_REVNAT: u32 = 262_144;
    pub const POD_IFACES: u32 = 16_384;
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// An IPv6 address as the maps hold it: the 16 bytes in network order, as four words (so
/// keys stay 4-byte aligned and checksum updates can take words).
pub type Ip6 = [u32; 4];

/// The types a map address can be: `u32` (IPv4) or [`Ip6`]. Every address-carrying key and
/// value below is generic over it, with IPv4 the default, so both families share one
/// layout definition and the IPv4 maps keep their layout.
pub trait MapAddr: Copy + Default + Eq + core::fmt::Debug + core::hash::Hash + 'static {
    /// The address as one word for the schedulers' hashes: IPv4 as it is (so IPv4 hashes
    /// are those of the IPv4-only datapath), IPv6 folded by [`crate::fold_ip6`].
    fn hash_word(self) -> u32;
}
impl MapAddr for u32 {
    #[inline(always)]
    fn hash_word(self) -> u32 {
        self
    }
}
impl MapAddr for Ip6 {
    #[inline(always)]
    fn hash_word(self) -> u32 {
        crate::fold_ip6(self)
    }
}

/// `Ip6` from the 16 bytes of an address (`Ipv6Addr::octets`).
pub const fn ip6_from_octets(o: [u8; 16]) -> Ip6 {
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        words[i] = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
        i += 1;
    }
    words
}

/// The 16 bytes of an `Ip6`.
pub const fn ip6_octets(a: Ip6) -> [u8; 16] {
    let mut o = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = a[i].to_ne_bytes();
        o[4 * i] = w[0];
        o[4 * i + 1] = w[1];
        o[4 * i + 2] = w[2];
        o[4 * i + 3] = w[3];
        i += 1;
    }
    o
}

/// Most backends one service port can have (slots 1..=MAX_BACKENDS): above the 5,000 pods
/// behind one Service of Kubernetes' scalability thresholds, and slots are u16.
pub const MAX_BACKENDS: u16 = 16_384;

/// `SERVICES` key: one frontend (VIP, port, protocol) and a slot.
///
/// Slot 0 holds the frontend itself ([`ServiceValue`] with `count`); slot `i` in `1..=count`
/// holds the id of the service's i-th backend (Cilium's layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey<A: MapAddr = u32> {
    /// Virtual address, network byte order.
    pub vip: A,
    /// Service port, network byte order.
    pub port: u16,
    /// 0 for the frontend, 1..=count for backend slots.
    pub slot: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// `SCOPE_INTERNAL` (pods, host processes) or `SCOPE_EXTERNAL` (from outside, XDP).
    pub scope: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceKey<Ip6>>() == 24);

/// Frontend scope: traffic from pods and from the node's own processes.
pub const SCOPE_INTERNAL: u8 = 0;
/// Frontend scope: traffic entering the node from outside (externalTrafficPolicy applies).
pub const SCOPE_EXTERNAL: u8 = 1;
/// `ServiceKey::vip` of NodePort frontends: any of the node's addresses (`NODE_IPS`).
pub const VIP_ANY_NODE_IP: u32 = 0;

/// Service flag: `sessionAffinity: ClientIP`. Bits 8..12 hold the algorithm
/// (see [`crate::scheduler_of`]).
pub const SVC_FLAG_AFFINITY: u16 = 1;
/// Rewrite the client's address to the node's (externalTrafficPolicy: Cluster from outside).
pub const SVC_FLAG_SNAT: u16 = 2;
/// No usable endpoint: drop (traffic policy Local without local endpoints) instead of
/// rejecting with ICMP.
pub const SVC_FLAG_DROP_EMPTY: u16 = 4;
/// Clients are checked against `SOURCE_RANGES` (loadBalancerSourceRanges).
pub const SVC_FLAG_SOURCE_RANGES: u16 = 8;

/// `SERVICES` value. In slot 0: the frontend; in slot i: `backend_id` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Slot 0: unused (0). Slot i: the backend id (key of `BACKENDS`).
    pub backend_id: u32,
    /// Slot 0: id of the service port, used by affinity, counters and conntrack.
    pub service_id: u32,
    /// Slot 0: number of backend slots; 0 means "no usable endpoint: reject".
    pub count: u16,
    /// Slot 0: `SVC_FLAG_*`.
    pub flags: u16,
    /// Slot 0: session affinity timeout in seconds.
    pub affinity_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// `BACKENDS` value, keyed by backend id (u32). Ids are unique per (service port, endpoint), so
/// a backend that leaves a service disappears from this map and can never be chosen again
/// through a stale conntrack or affinity entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend<A: MapAddr = u32> {
    /// Endpoint address, network byte order.
    pub ip: A,
    /// Endpoint (target) port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    /// The service port this backend belongs to (checked on every conntrack/affinity hit).
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 12);
const _: () = assert!(core::mem::size_of::<Backend<Ip6>>() == 24);

/// Conntrack entry direction.
pub const CT_FORWARD: u8 = 0;
pub const CT_REVERSE: u8 = 1;

/// `CT` key: the 5-tuple as seen in the packet, plus the direction the entry serves.
///
/// Forward entries are keyed by the client's packet (client → VIP); reverse entries by the
/// backend's reply (backend → client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey<A: MapAddr = u32> {
    /// Source address, network byte order.
    pub src: A,
    /// Destination address, network byte order.
    pub dst: A,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    pub proto: u8,
    /// `CT_FORWARD` or `CT_REVERSE`.
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtKey<Ip6>>() == 40);

/// `CT` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue<A: MapAddr = u32> {
    /// Forward: the chosen backend. Reverse: the same backend (for counters).
    pub backend_id: u32,
    pub service_id: u32,
    /// Forward: backend address the flow is DNATed to. Reverse: the VIP to restore as source.
    /// Network byte order.
    pub nat_addr: A,
    /// Forward: backend port. Reverse: the service port. Network byte order.
    pub nat_port: u16,
    /// `CT_FLAG_*`: TCP state as far as lifetimes need it, and how the flow is NATed.
    pub flags: u16,
    /// Forward of a SNATed flow: the node address and port the client's source became.
    /// Reverse of a SNATed flow: the client's address and port to restore as destination.
    /// Network byte order; 0 when the flow is not SNATed.
    pub snat_addr: A,
    pub snat_port: u16,
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` at creation.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 56);
const _: () = assert!(core::mem::size_of::<CtValue<Ip6>>() == 80);

/// `REPLY_CLAIMS` value: a reverse conntrack entry (backend → client, or → the node's SNAT
/// address and port; in `FLOW_CLAIMS` a forward one, client → frontend), in the array slot
/// its key maps to ([`reply_claim_slot`]). A slot is free when `value.last_seen_ns` is 0
/// or the entry outlived its lifetime; a new flow claims it by a compare-and-swap of that
/// stamp (to a value with the top bit set until the entry is written: for a forward entry
/// with its key's [`claim_run`] below), so two CPUs never claim one slot. Readers match the
/// whole key, whose `dport` (the client's, SNAT or frontend port, never 0 in a claim) is
/// cleared first and written last whenever the slot changes hands. (A reply to an expired
/// claim racing its takeover may still write its stamp and TCP flags into the new claim.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplyClaim<A: MapAddr = u32> {
    pub key: CtKey<A>,
    pub value: CtValue<A>,
}
const _: () = assert!(core::mem::size_of::<ReplyClaim>() == 72);
const _: () = assert!(core::mem::size_of::<ReplyClaim<Ip6>>() == 120);

/// The `REPLY_CLAIMS` (and `FLOW_CLAIMS`) slot of a key (a reverse key's, as below; a
/// forward key's likewise, from client and frontend): a hash of the backend's address, port and
/// protocol and the reply's destination address (the client's, or the node's for a SNATed
/// flow) picks where a run of slots starts, and the destination port is the place in it.
/// A SNAT port claim tries neighbouring ports, so its tries read neighbouring slots (a
/// measured gain over slots hashed from the whole tuple); another run may overlap, and a
/// slot taken there only sends the claim on to the next port.
#[inline(always)]
pub fn reply_claim_slot<A: MapAddr>(key: &CtKey<A>) -> u32 {
    claim_slot_in_run(claim_run(key), key.dport)
}

/// Where `reply_claim_slot` starts `key`'s run: a hash of all but the destination port.
/// With the slot it names the whole key (the port is the slot's distance from the run's
/// start, and ports are fewer than slots): two keys of one slot with one run differ only
/// by a collision of this 32-bit hash, which is why a claim in flux carries it.
#[inline(always)]
pub fn claim_run<A: MapAddr>(key: &CtKey<A>) -> u32 {
    crate::flow_hash(
        key.src.hash_word(),
        key.dst.hash_word(),
        key.sport,
        0,
        key.proto,
    )
}

/// The slot of destination port `dport` (network byte order) in the run at `run`.
#[inline(always)]
pub fn claim_slot_in_run(run: u32, dport: u16) -> u32 {
    run.wrapping_add(u32::from(u16::from_be(dport))) & (map_sizes::REPLY_CLAIMS - 1)
}
const _: () = assert!(map_sizes::REPLY_CLAIMS > u16::MAX as u32);
const _: () = assert!(map_sizes::REPLY_CLAIMS.is_power_of_two());
// One slot function for both claim arrays.
const _: () = assert!(map_sizes::FLOW_CLAIMS == map_sizes::REPLY_CLAIMS);

/// TCP entry saw its handshake complete (forward: a client ACK; reverse: a reply).
pub const CT_FLAG_ESTABLISHED: u16 = 1;
/// TCP entry saw FIN or RST.
pub const CT_FLAG_CLOSING: u16 = 2;
/// The flow entered from outside (XDP): its replies are translated where they leave the
/// backend (pod interface ingress, or the external interface for remote backends).
pub const CT_FLAG_EXTERNAL: u16 = 4;
/// The flow's source was rewritten to a node address (`snat_addr`/`snat_port`).
pub const CT_FLAG_SNAT: u16 = 8;

/// `SOCK_REVNAT` key: a socket and the backend it was connected or sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub backend: u32,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 16);

/// `SOCK_REVNAT6` key: [`SockKey`] for an IPv6 backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey6 {
    pub cookie: u64,
    pub backend: Ip6,
    pub port: u16,
    pub _pad: [u16; 3],
}
const _: () = assert!(core::mem::size_of::<SockKey6>() == 32);

/// `SERVICE_NAMES` value: a Service port's name, UTF-8, `len` bytes of `bytes`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub len: u16,
    pub _pad: [u8; 6],
    /// "namespace/name:port" fits: 63 + 1 + 63 + 1 + 15 bytes at most.
    pub bytes: [u8; 248],
}
const _: () = assert!(core::mem::size_of::<ServiceName>() == 256);

impl ServiceName {
    /// `name`, cut at 248 bytes (on a character boundary).
    pub fn new(name: &str) -> Self {
        let mut end = name.len().min(248);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; 248];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        ServiceName {
            len: end as u16,
            _pad: [0; 6],
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        let len = usize::from(self.len).min(self.bytes.len());
        core::str::from_utf8(&self.bytes[..len]).unwrap_or("")
    }
}

/// `SOCK_REVNAT` value: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockFrontend<A: MapAddr = u32> {
    /// Frontend address and port, network byte order.
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockFrontend>() == 16);
const _: () = assert!(core::mem::size_of::<SockFrontend<Ip6>>() == 28);

/// Node-wide datapath settings (`CONFIG` map, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig<A: MapAddr = u32> {
    /// Source address of SNATed flows (the node's primary address of the family), network
    /// byte order.
    pub snat_addr: A,
    /// SNAT source ports, host byte order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 8);
const _: () = assert!(core::mem::size_of::<NodeConfig<Ip6>>() == 20);

/// `SOURCE_RANGES` key data (after the LPM prefix length): the service id (matched whole)
/// then the client address prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceRangeKey<A: MapAddr = u32> {
    /// Big-endian so the LPM trie compares it first, byte for byte.
    pub service_id_be: u32,
    /// Client address, network byte order.
    pub addr: A,
}
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 8);
const _: () = assert!(core::mem::size_of::<SourceRangeKey<Ip6>>() == 20);

/// Conntrack lifetimes after the last packet, in seconds (Cilium's defaults: short while
/// a TCP handshake is pending or the flow is closing, long once established).
pub mod ct_lifetime {
    pub const TCP_SYN_S: u64 = 60;
    pub const TCP_ESTABLISHED_S: u64 = 21_600;
    pub const TCP_CLOSING_S: u64 = 10;
    pub const OTHER_S: u64 = 60;
}

/// How long an entry lives after its last packet with the default lifetimes.
pub const fn ct_lifetime_ns(proto: u8, flags: u16) -> u64 {
    CtTimeouts::DEFAULT.lifetime_ns(proto, flags)
}

/// The window in which a flow's forward packets make sure, once, that the reply's entry
/// still exists (the LRU may evict one side of a flow alone): a flow's first packet in each
/// window looks it up.
pub const REVERSE_CHECK_NS: u64 = 100_000_000;

/// `CT_TIMEOUTS` value: the node's conntrack lifetimes in seconds (kube-proxy's
/// `conntrack` settings); 0 means the default of [`ct_lifetime`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtTimeouts {
    pub tcp_syn_s: u32,
    pub tcp_established_s: u32,
    pub tcp_closing_s: u32,
    /// UDP (and every other protocol).
    pub other_s: u32,
}
const _: () = assert!(core::mem::size_of::<CtTimeouts>() == 16);

impl CtTimeouts {
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn_s: ct_lifetime::TCP_SYN_S as u32,
        tcp_established_s: ct_lifetime::TCP_ESTABLISHED_S as u32,
        tcp_closing_s: ct_lifetime::TCP_CLOSING_S as u32,
        other_s: ct_lifetime::OTHER_S as u32,
    };

    /// How long an entry lives after its last packet, from its protocol and flags.
    #[inline(always)]
    pub const fn lifetime_ns(&self, proto: u8, flags: u16) -> u64 {
        let (set, default) = if proto != PROTO_TCP {
            (self.other_s, ct_lifetime::OTHER_S)
        } else if flags & CT_FLAG_CLOSING != 0 {
            (self.tcp_closing_s, ct_lifetime::TCP_CLOSING_S)
        } else if flags & CT_FLAG_ESTABLISHED != 0 {
            (self.tcp_established_s, ct_lifetime::TCP_ESTABLISHED_S)
        } else {
            (self.tcp_syn_s, ct_lifetime::TCP_SYN_S)
        };
        let seconds = if set == 0 { default } else { set as u64 };
        seconds * 1_000_000_000
    }

    /// Whether an entry last seen at `last_seen_ns` outlived its lifetime at `now_ns`: the
    /// flow is over, a new one may reuse the tuple. Saturating: a time stamp slightly ahead
    /// of `now_ns` (another clock's) counts as fresh.
    #[inline(always)]
    pub const fn outlived(&self, proto: u8, flags: u16, last_seen_ns: u64, now_ns: u64) -> bool {
        now_ns.saturating_sub(last_seen_ns) > self.lifetime_ns(proto, flags)
    }
}

/// `AFFINITY` key: client and service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey<A: MapAddr = u32> {
    /// Client address, network byte order.
    pub client: A,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityKey<Ip6>>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last new flow that used this entry.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// Per-service and per-backend counters (per-CPU hash maps keyed by id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
    /// New flows balanced to this service/backend (imbalance shows here first).
    pub flows: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounter>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, with explicit padding and no invalid bit patterns.
    use super::MapAddr;
    unsafe impl<A: MapAddr> aya::Pod for super::ServiceKey<A> {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl<A: MapAddr> aya::Pod for super::Backend<A> {}
    unsafe impl<A: MapAddr> aya::Pod for super::CtKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for super::CtValue<A> {}
    unsafe impl<A: MapAddr> aya::Pod for super::ReplyClaim<A> {}
    unsafe impl aya::Pod for super::HopKey {}
    unsafe impl aya::Pod for super::HopKey6 {}
    unsafe impl aya::Pod for super::HopValue {}
    unsafe impl aya::Pod for super::HopSlot {}
    unsafe impl aya::Pod for super::HopSlot6 {}
    unsafe impl<A: MapAddr> aya::Pod for super::AffinityKey<A> {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::TrafficCounter {}
    unsafe impl<A: MapAddr> aya::Pod for super::NodeConfig<A> {}
    unsafe impl<A: MapAddr> aya::Pod for super::SourceRangeKey<A> {}
    unsafe impl aya::Pod for super::ServiceName {}
    unsafe impl aya::Pod for super::CtTimeouts {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockKey6 {}
    unsafe impl<A: MapAddr> aya::Pod for super::SockFrontend<A> {}
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::*;

    /// One backend's flows on consecutive SNAT ports (what a claim loop tries) take
    /// consecutive slots, and every slot is inside the array.
    #[test]
    fn reply_claim_slots_spread_consecutive_ports() {
        let mut slots = [0u32; 256];
        for (slot, port) in slots.iter_mut().zip(61_000u16..) {
            *slot = reply_claim_slot(&CtKey {
                src: 0x0a_f4_02_05u32.to_be(),
                dst: 0xc0_a8_32_01u32.to_be(),
                sport: 8080u16.to_be(),
                dport: port.to_be(),
                proto: PROTO_TCP,
                dir: CT_REVERSE,
                _pad: [0; 2],
            });
        }
        for pair in slots.windows(2) {
            assert_eq!(pair[1], (pair[0] + 1) % map_sizes::REPLY_CLAIMS);
        }
        assert!(slots.iter().all(|s| *s < map_sizes::REPLY_CLAIMS));
    }

    /// The eBPF side reads these offsets; a reordering must be a conscious change.
    #[test]
    fn layouts_are_stable() {
        assert_eq!(
            (
                offset_of!(ServiceKey, vip),
                offset_of!(ServiceKey, port),
                offset_of!(ServiceKey, slot),
                offset_of!(ServiceKey, proto),
                offset_of!(ServiceKey, scope)
            ),
            (0, 4, 6, 8, 9)
        );
        assert_eq!(
            (
                offset_of!(ServiceValue, backend_id),
                offset_of!(ServiceValue, service_id),
                offset_of!(ServiceValue, count),
                offset_of!(ServiceValue, flags),
                offset_of!(ServiceValue, affinity_timeout_s)
            ),
            (0, 4, 8, 10, 12)
        );
        assert_eq!(
            (offset_of!(Backend, port), offset_of!(Backend, service_id)),
            (4, 8)
        );
        assert_eq!(
            (
                offset_of!(CtKey, sport),
                offset_of!(CtKey, proto),
                offset_of!(CtKey, dir)
            ),
            (8, 12, 13)
        );
        assert_eq!(
            (
                offset_of!(CtValue, nat_port),
                offset_of!(CtValue, snat_addr),
                offset_of!(CtValue, created_ns),
                offset_of!(CtValue, bytes)
            ),
            (12, 16, 24, 48)
        );
        assert_eq!(offset_of!(AffinityValue, last_used_ns), 8);
    }

    #[test]
    fn conntrack_lifetimes_by_protocol_and_state() {
        let s = 1_000_000_000;
        let table = [
            (PROTO_UDP, 0, 60 * s),
            (PROTO_UDP, CT_FLAG_CLOSING, 60 * s),
            (PROTO_TCP, 0, 60 * s),
            (PROTO_TCP, CT_FLAG_ESTABLISHED, 21_600 * s),
            (PROTO_TCP, CT_FLAG_ESTABLISHED | CT_FLAG_CLOSING, 10 * s),
            (PROTO_TCP, CT_FLAG_CLOSING, 10 * s),
        ];
        for (proto, flags, want) in table {
            assert_eq!(
                ct_lifetime_ns(proto, flags),
                want,
                "proto {proto} flags {flags}"
            );
        }
    }

    #[test]
    fn outcome_table_names_and_kinds_agree() {
        use crate::{OUTCOMES, OutcomeKind, is_drop, outcome, outcome_name};
        assert_eq!(OUTCOMES.len(), outcome::COUNT as usize);
        assert_eq!(outcome_name(outcome::REVNAT), "revnat");
        assert_eq!(outcome_name(outcome::COUNT), "unknown");
        for info in OUTCOMES {
            // A drop is recognisable from its name alone, and is_drop agrees with the table.
            assert_eq!(
                info.name.starts_with("drop_"),
                info.kind == OutcomeKind::Drop,
                "{info:?}"
            );
            assert_eq!(
                is_drop(info.code),
                info.kind == OutcomeKind::Drop,
                "{info:?}"
            );
        }
        assert!(!is_drop(outcome::COUNT) && !is_drop(u32::MAX));
    }
}
