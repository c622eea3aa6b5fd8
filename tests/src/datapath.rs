//! Harness of the datapath tables (and the bench): the real eBPF object with private maps,
//! run through BPF_PROG_TEST_RUN (aya's `TestRun`), and helpers to set map state and compare
//! packets.
use std::{net::Ipv4Addr, os::fd::AsRawFd as _, time::Duration};

use aya::programs::TestRunOptions;
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, HopKey, HopKey6, HopSlot, HopSlot6,
    HopValue, Ip6, MapAddr, NodeConfig, Outcome, SCOPE_INTERNAL, ServiceKey, ServiceValue,
    SourceRangeKey, addr_filter, ip6_from_octets, map_names, next_hops, program_names,
};
use xlb::datapath::{clock::before, load, skb_access::SkbAccess};

use crate::{
    netns::{Netns, unique_tag},
    packet::checksum_errors,
};

/// What one BPF_PROG_TEST_RUN call produced.
#[derive(Debug, Clone)]
pub struct TestRunOutput {
    /// The program's return value (TC or XDP verdict), as the kernel reports it.
    pub retval: i32,
    /// The packet after the program ran.
    pub packet: Vec<u8>,
    /// Average run time per repetition in nanoseconds.
    pub duration_ns: u64,
}

/// Runs a loaded TC or XDP program `repeat` times (at least once) on `packet`.
pub fn test_run(
    program: &impl for<'a> aya::programs::TestRun<
        Opts<'a> = TestRunOptions<'a>,
        Result = aya::programs::TestRunResult,
    >,
    packet: &[u8],
    repeat: u32,
) -> Result<TestRunOutput, aya::programs::ProgramError> {
    // Room for programs that grow the packet (an ICMP error adds at most 70 bytes).
    let mut out = vec![0u8; packet.len() + 512];
    let result = program.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat: repeat.max(1),
        ..TestRunOptions::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput {
        retval: result.return_value as i32,
        packet: out,
        duration_ns: u64::try_from(result.duration.as_nanos()).unwrap_or(u64::MAX),
    })
}

/// Runs the named TC program of `ebpf` once on `frame`.
pub fn run_tc(ebpf: &mut Ebpf, program: &'static str, frame: &[u8], repeat: u32) -> TestRunOutput {
    let prog = load::program(ebpf, program).expect("program");
    test_run(prog, frame, repeat).expect("test run")
}

/// Runs the XDP program of `ebpf` once on `frame`.
pub fn run_xdp(ebpf: &mut Ebpf, frame: &[u8]) -> TestRunOutput {
    let prog = load::xdp_program(ebpf).expect("program");
    test_run(prog, frame, 1).expect("test run")
}

/// A frontend as the maps hold it: the key fields and the slot-0 value's.
#[derive(Debug, Clone, Copy)]
pub struct FrontendEntry<A = u32> {
    /// Network byte order (0 / `::`: a NodePort on every node address).
    pub vip: A,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub service_id: u32,
    pub flags: u16,
    pub affinity_timeout_s: u32,
}

/// Writes `frontend` with `backends` (`(id, address in network byte order, port)`) in slots
/// 1..=n: backends, then slots, then slot 0, as the agent's sync orders them.
pub fn put_frontend(ebpf: &mut Ebpf, frontend: FrontendEntry, backends: &[(u32, u32, u16)]) {
    put_frontend_in(
        ebpf,
        (map_names::SERVICES, map_names::BACKENDS),
        frontend,
        backends,
    );
}

/// `put_frontend` for an IPv6 frontend (the IPv6 maps).
pub fn put_frontend6(ebpf: &mut Ebpf, frontend: FrontendEntry<Ip6>, backends: &[(u32, Ip6, u16)]) {
    put_frontend_in(
        ebpf,
        (map_names::SERVICES6, map_names::BACKENDS6),
        frontend,
        backends,
    );
}

fn put_frontend_in<A: MapAddr>(
    ebpf: &mut Ebpf,
    (services, backends_map): (&str, &str),
    frontend: FrontendEntry<A>,
    backends: &[(u32, A, u16)],
) where
    ServiceKey<A>: aya::Pod,
    Backend<A>: aya::Pod,
{
    mark_local(ebpf, frontend.vip);
    let key = |slot| ServiceKey {
        vip: frontend.vip,
        port: frontend.port.to_be(),
        slot,
        proto: frontend.proto,
        scope: frontend.scope,
        _pad: [0; 2],
    };
    {
        let mut be: Array<_, Backend<A>> =
            Array::try_from(ebpf.map_mut(backends_map).expect("map")).expect("map type");
        for (id, addr, port) in backends {
            let b = Backend {
                ip: *addr,
                port: port.to_be(),
                proto: frontend.proto,
                _pad: 0,
                service_id: frontend.service_id,
            };
            be.set(*id, b, 0).expect("write backend");
        }
    }
    for (_, addr, port) in backends {
        set_reply_bit(ebpf, *addr, *port, frontend.proto, true);
    }
    let mut svc: HashMap<_, ServiceKey<A>, ServiceValue> =
        HashMap::try_from(ebpf.map_mut(services).expect("map")).expect("map type");
    for (slot, (id, _, _)) in backends.iter().enumerate() {
        let v = ServiceValue {
            backend_id: *id,
            ..Default::default()
        };
        svc.insert(key(slot as u16 + 1), v, 0).expect("insert slot");
    }
    let front = ServiceValue {
        backend_id: 0,
        service_id: frontend.service_id,
        count: backends.len() as u16,
        flags: frontend.flags,
        affinity_timeout_s: frontend.affinity_timeout_s,
    };
    svc.insert(key(0), front, 0).expect("insert frontend");
}

/// Sets `addr`'s bit in the address filter (none for the unspecified address, where
/// NodePorts live) and arms the filter, as the agent does before it writes a frontend or a
/// node address.
pub fn mark_local<A: MapAddr>(ebpf: &mut Ebpf, addr: A) {
    let slot = (addr != A::default()).then(|| addr_filter::slot(addr.hash_word()));
    write_filter_bit(ebpf, map_names::ADDR_FILTER, slot, true, true);
}

/// Sets (`on`) or clears the bit at `slot` (if any) of the filter `map`, arming it if `arm`.
fn write_filter_bit(ebpf: &mut Ebpf, map: &str, slot: Option<(u32, u64)>, on: bool, arm: bool) {
    let mut filter: Array<_, u64> =
        Array::try_from(ebpf.map_mut(map).expect("map")).expect("map type");
    if let Some((index, bit)) = slot {
        let word = filter.get(&index, 0).expect("filter word");
        let word = if on { word | bit } else { word & !bit };
        filter.set(index, word, 0).expect("filter word");
    }
    if arm {
        filter
            .set(0, addr_filter::ARMED, 0)
            .expect("arm the filter");
    }
}

/// Sets (or clears) the reply filter's bit of a backend's `addr`, `port` (host order) and
/// `proto` and arms the filter, as the agent does before it writes a backend.
pub fn set_reply_bit<A: MapAddr>(ebpf: &mut Ebpf, addr: A, port: u16, proto: u8, on: bool) {
    let slot = addr_filter::reply_slot(addr.hash_word(), port.to_be(), proto);
    write_filter_bit(ebpf, map_names::REPLY_FILTER, Some(slot), on, true);
}

/// Clears `addr`'s bit in the address filter (a test's way to show the programs read it).
pub fn unmark_local<A: MapAddr>(ebpf: &mut Ebpf, addr: A) {
    let slot = addr_filter::slot(addr.hash_word());
    write_filter_bit(ebpf, map_names::ADDR_FILTER, Some(slot), false, false);
}

/// A slot type of the next-hop caches (`HopSlot`, `HopSlot6`).
pub trait CacheSlot: aya::Pod {
    type Key: Copy + PartialEq;
    const MAP: &'static str;
    fn new(key: Self::Key, hop: HopValue) -> Self;
    fn parts(&self) -> (Self::Key, HopValue);
    /// The key's slot index, as the programs compute it.
    fn index(key: &Self::Key) -> u32;
}

impl CacheSlot for HopSlot {
    type Key = HopKey;
    const MAP: &'static str = "XLB_NEXT_HOPS";
    fn new(key: HopKey, hop: HopValue) -> Self {
        HopSlot { key, _pad: 0, hop }
    }
    fn parts(&self) -> (HopKey, HopValue) {
        (self.key, self.hop)
    }
    fn index(key: &HopKey) -> u32 {
        next_hops::index(key.dst, key.src, key.ifindex)
    }
}

impl CacheSlot for HopSlot6 {
    type Key = HopKey6;
    const MAP: &'static str = "XLB_NEXT_HOPS6";
    fn new(key: HopKey6, hop: HopValue) -> Self {
        HopSlot6 { key, _pad: 0, hop }
    }
    fn parts(&self) -> (HopKey6, HopValue) {
        (self.key, self.hop)
    }
    fn index(key: &HopKey6) -> u32 {
        next_hops::index(key.dst.hash_word(), key.src.hash_word(), key.ifindex)
    }
}

/// The used slots (an egress interface set) of a next-hop cache, every CPU's (repeats of
/// one entry on several CPUs once).
fn cache_entries<S: CacheSlot>(ebpf: &Ebpf) -> Vec<(S::Key, HopValue)> {
    let map: PerCpuArray<_, S> =
        PerCpuArray::try_from(ebpf.map(S::MAP).expect("map")).expect("map type");
    let mut used: Vec<(S::Key, HopValue)> = Vec::new();
    for index in 0..next_hops::SLOTS {
        for slot in map.get(&index, 0).expect("slot").iter() {
            let entry = slot.parts();
            if entry.1.ifindex != 0 && !used.contains(&entry) {
                used.push(entry);
            }
        }
    }
    used
}

/// Writes `hop` for `key` into its slot on every CPU.
fn put_cache_entry<S: CacheSlot>(ebpf: &mut Ebpf, key: S::Key, hop: HopValue) {
    let mut map: PerCpuArray<_, S> =
        PerCpuArray::try_from(ebpf.map_mut(S::MAP).expect("map")).expect("map type");
    let cpus = aya::util::nr_cpus().expect("CPU count");
    let values =
        aya::maps::PerCpuValues::try_from(vec![S::new(key, hop); cpus]).expect("per-CPU values");
    map.set(S::index(&key), values, 0).expect("next hop");
}

/// Whether `addr`'s bit is set in the address filter.
pub fn marked<A: MapAddr>(ebpf: &Ebpf, addr: A) -> bool {
    let filter: Array<_, u64> =
        Array::try_from(ebpf.map(map_names::ADDR_FILTER).expect("map")).expect("map type");
    let (index, bit) = addr_filter::slot(addr.hash_word());
    filter.get(&index, 0).expect("filter word") & bit != 0
}

/// Node addresses (network byte order; NodePorts answer on them, the first is the SNAT
/// source) and the SNAT port range.
pub fn put_node(ebpf: &mut Ebpf, addresses: &[u32], ports: (u16, u16)) {
    put_node_in(
        ebpf,
        (map_names::NODE_IPS, map_names::CONFIG),
        addresses,
        ports,
    );
}

/// IPv6 node addresses and the SNAT port range (`put_node` for the IPv6 maps).
pub fn put_node6(ebpf: &mut Ebpf, addresses: &[Ip6], ports: (u16, u16)) {
    put_node_in(
        ebpf,
        (map_names::NODE_IPS6, map_names::CONFIG6),
        addresses,
        ports,
    );
}

fn put_node_in<A: MapAddr + aya::Pod>(
    ebpf: &mut Ebpf,
    (node_ips, config_map): (&str, &str),
    addresses: &[A],
    ports: (u16, u16),
) where
    NodeConfig<A>: aya::Pod,
{
    for a in addresses {
        mark_local(ebpf, *a);
    }
    {
        let mut ips: HashMap<_, A, u32> =
            HashMap::try_from(ebpf.map_mut(node_ips).expect("map")).expect("map type");
        for a in addresses {
            ips.insert(a, 1, 0).expect("node ip");
        }
    }
    let mut config: Array<_, NodeConfig<A>> =
        Array::try_from(ebpf.map_mut(config_map).expect("map")).expect("map type");
    let node = NodeConfig {
        snat_addr: addresses.first().copied().unwrap_or_default(),
        snat_port_min: ports.0,
        snat_port_max: ports.1,
    };
    config.set(0, node, 0).expect("config");
}

/// Packets counted under `o` in both families' counters.
pub fn outcome_count(ebpf: &Ebpf, o: Outcome) -> u64 {
    family_count(ebpf, map_names::STATS, o) + family_count(ebpf, map_names::STATS6, o)
}

fn family_count(ebpf: &Ebpf, map: &str, o: Outcome) -> u64 {
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(map).expect("map")).expect("map type");
    stats.get(&o, 0).expect("stat").iter().sum()
}

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_REDIRECT: i32 = 7;
pub const TC_ACT_SHOT: i32 = 2;
pub const PASS: i32 = -1; // TC_ACT_UNSPEC: continue untouched
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub const CLIENT: &str = "10.244.0.5";
pub const VIP: &str = "10.96.0.10";
pub const SERVICE_ID: u32 = 7;

pub fn ip(s: &str) -> u32 {
    u32::from_ne_bytes(s.parse::<Ipv4Addr>().expect("test address").octets())
}

pub const CLIENT6: &str = "fd00:10:244::5";
pub const VIP6: &str = "fd00:10:96::10";

/// An IPv6 address as the maps hold it.
pub fn ip6(s: &str) -> Ip6 {
    ip6_from_octets(
        s.parse::<std::net::Ipv6Addr>()
            .expect("test address")
            .octets(),
    )
}

/// A freshly loaded object with private (unpinned) maps: every test starts from empty maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    _netns: Netns,
    /// The other end of `route_out`'s interface.
    _peer: Option<Netns>,
}

#[derive(Clone, Copy)]
pub enum Hook {
    FromPod,
    ToPod,
}

impl Datapath {
    /// Loads the object, and moves the calling test's thread into an empty network
    /// namespace of its own: the programs' FIB lookups then find no route whatever the
    /// machine's routing, so verdicts do not depend on the host.
    #[expect(
        clippy::new_without_default,
        reason = "loading programs and entering a namespace is no default value"
    )]
    pub fn new() -> Datapath {
        Self::with_skb_access(SkbAccess::probe())
    }

    /// [`Datapath::new`] with the TC programs reading the skb's checksum state as `access`
    /// says ([`SkbAccess::Helpers`]: as on a kernel without the kfunc).
    pub fn with_skb_access(access: SkbAccess) -> Datapath {
        let netns = Netns::new(&unique_tag(), "dp").expect("test namespace");
        let file = std::fs::File::open(netns.path()).expect("open namespace");
        // SAFETY: setns on an open netns fd only moves this (test) thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Datapath {
            ebpf: load::load_with(None, access).expect("eBPF object loads and passes the verifier"),
            _netns: netns,
            _peer: None,
        }
    }

    /// Programs `VIP:port/proto` for pods with backends `(id, ip, port)` in slots 1..=n.
    pub fn service(&mut self, proto: u8, port: u16, backends: &[(u32, &str, u16)], flags: u16) {
        self.frontend(ip(VIP), SCOPE_INTERNAL, proto, port, backends, flags);
    }

    /// Programs frontend `vip:port/proto` in `scope` (vip 0: NodePort on any node address).
    pub fn frontend(
        &mut self,
        vip: u32,
        scope: u8,
        proto: u8,
        port: u16,
        backends: &[(u32, &str, u16)],
        flags: u16,
    ) {
        let backends: Vec<(u32, u32, u16)> = backends
            .iter()
            .map(|(id, addr, port)| (*id, ip(addr), *port))
            .collect();
        let frontend = FrontendEntry {
            vip,
            port,
            proto,
            scope,
            service_id: SERVICE_ID,
            flags,
            affinity_timeout_s: 10,
        };
        put_frontend(&mut self.ebpf, frontend, &backends);
    }

    /// `service` for `VIP6` (the IPv6 maps), backends `(id, IPv6 address, port)`.
    pub fn service6(&mut self, proto: u8, port: u16, backends: &[(u32, &str, u16)], flags: u16) {
        self.frontend6(ip6(VIP6), SCOPE_INTERNAL, proto, port, backends, flags);
    }

    /// `frontend` for an IPv6 frontend (vip `::`: NodePort on any node address).
    pub fn frontend6(
        &mut self,
        vip: Ip6,
        scope: u8,
        proto: u8,
        port: u16,
        backends: &[(u32, &str, u16)],
        flags: u16,
    ) {
        let backends: Vec<(u32, Ip6, u16)> = backends
            .iter()
            .map(|(id, addr, port)| (*id, ip6(addr), *port))
            .collect();
        let frontend = FrontendEntry {
            vip,
            port,
            proto,
            scope,
            service_id: SERVICE_ID,
            flags,
            affinity_timeout_s: 10,
        };
        put_frontend6(&mut self.ebpf, frontend, &backends);
    }

    /// IPv6 node addresses (the first is the SNAT source) and the SNAT port range.
    pub fn set_node6(&mut self, addresses: &[&str], ports: (u16, u16)) {
        let addresses: Vec<Ip6> = addresses.iter().map(|a| ip6(a)).collect();
        put_node6(&mut self.ebpf, &addresses, ports);
    }

    /// Allows `cidr` (IPv6) for the test service's source ranges.
    pub fn allow_source6(&mut self, cidr: &str) {
        let (addr, prefix) = cidr.split_once('/').expect("cidr");
        let mut ranges: LpmTrie<_, SourceRangeKey<Ip6>, u8> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::SOURCE_RANGES6).expect("map"))
                .expect("map type");
        let key = Key::new(
            32 + prefix.parse::<u32>().expect("prefix"),
            SourceRangeKey {
                service_id_be: SERVICE_ID.to_be(),
                addr: ip6(addr),
            },
        );
        ranges.insert(&key, 1, 0).expect("range");
    }

    /// The IPv6 conntrack entries, claims included (see `ct`).
    pub fn ct6(&self) -> Vec<(CtKey<Ip6>, CtValue<Ip6>)> {
        let ct: HashMap<_, CtKey<Ip6>, CtValue<Ip6>> =
            HashMap::try_from(self.ebpf.map(map_names::CONNTRACK6).expect("map"))
                .expect("map type");
        let mut entries: Vec<_> = ct.iter().map(|r| r.expect("ct entry")).collect();
        entries.extend(self.claims::<Ip6>(map_names::REPLY_CLAIMS6));
        entries
    }

    /// The claims in the array `name`, as the conntrack entries they are.
    pub fn claims<A: MapAddr>(&self, name: &str) -> Vec<(CtKey<A>, CtValue<A>)>
    where
        lb_common::ReplyClaim<A>: aya::Pod,
    {
        let claims: Array<_, lb_common::ReplyClaim<A>> =
            Array::try_from(self.ebpf.map(name).expect("map")).expect("map type");
        xlb::datapath::id_arrays::reply_claims(&claims)
            .expect("scanning the reply claims")
            .into_iter()
            .map(|c| (c.key, c.value))
            .collect()
    }

    pub fn remove_backend(&mut self, id: u32) {
        let mut be: Array<_, Backend> =
            Array::try_from(self.ebpf.map_mut(map_names::BACKENDS).expect("map"))
                .expect("map type");
        assert_ne!(
            be.get(&id, 0).expect("slot").service_id,
            0,
            "backend present"
        );
        be.set(id, Backend::default(), 0).expect("free the slot");
    }

    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> (i32, Vec<u8>) {
        let name = match hook {
            Hook::FromPod => program_names::TC_FROM_POD,
            Hook::ToPod => program_names::TC_TO_POD,
        };
        let out = run_tc(&mut self.ebpf, name, frame, 1);
        (out.retval, out.packet)
    }

    /// Routes `prefix` out of a veth (`dp0`, its peer in a namespace of its own) via a
    /// gateway whose MAC is `gateway_mac` (a permanent neighbour), with forwarding on, so
    /// the programs' FIB lookups succeed; returns the veth's ifindex.
    pub fn route_out(&mut self, prefix: &str, gateway_mac: &str) -> u32 {
        let peer = Netns::new(&unique_tag(), "dppeer").expect("peer namespace");
        let ns = &self._netns;
        ns.sysctl("net.ipv4.conf.all.forwarding", "1")
            .expect("forwarding");
        ns.add_veth("dp0", None, &peer).expect("veth");
        ns.ip(&["link", "set", "dp0", "up"]).expect("link up");
        peer.ip(&["link", "set", "eth0", "up"]).expect("peer up");
        ns.route_via("dp0", prefix, "169.254.3.3", gateway_mac)
            .expect("route");
        self._peer = Some(peer);
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"dp0".as_ptr()) };
        assert_ne!(ifindex, 0, "ifindex of dp0");
        ifindex
    }

    /// `route_out` for IPv6 (after it: the same interface): `prefix` via a link-local
    /// gateway whose MAC is `gateway_mac`.
    pub fn route_out6(&mut self, prefix: &str, gateway_mac: &str) {
        let ns = &self._netns;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")
            .expect("forwarding");
        ns.route_via("dp0", prefix, "fe80::303", gateway_mac)
            .expect("route");
    }

    /// The IPv6 next-hop cache's entries (of every CPU's slots).
    pub fn next_hops6(&self) -> Vec<(HopKey6, HopValue)> {
        cache_entries::<HopSlot6>(&self.ebpf)
    }

    /// Writes `value` for `key` into its slot on every CPU.
    pub fn put_next_hop6(&mut self, key: HopKey6, value: HopValue) {
        put_cache_entry::<HopSlot6>(&mut self.ebpf, key, value);
    }

    /// The next-hop cache's entries (of every CPU's slots).
    pub fn next_hops(&self) -> Vec<(HopKey, HopValue)> {
        cache_entries::<HopSlot>(&self.ebpf)
    }

    pub fn put_next_hop(&mut self, key: HopKey, value: HopValue) {
        put_cache_entry::<HopSlot>(&mut self.ebpf, key, value);
    }

    /// Raises the routing generation with the source-free flags `flags`
    /// (`lb_common::route_gen`), as the agent's route watcher does.
    pub fn set_route_policy(&mut self, flags: u64) {
        self.update_route_gen(|_| flags);
    }

    /// Raises the routing generation, as the agent does on a routing change (flags kept).
    pub fn raise_route_generation(&mut self) {
        self.update_route_gen(|now| now & !lb_common::route_gen::GENERATION);
    }

    /// Writes `XLB_ROUTE_GEN` as the agent does (`route_gen::next`), with the flags `flags`
    /// makes of the current value.
    fn update_route_gen(&mut self, flags: impl FnOnce(u64) -> u64) {
        let mut map: Array<_, u64> =
            Array::try_from(self.ebpf.map_mut(map_names::ROUTE_GEN).expect("map"))
                .expect("map type");
        let now = map.get(&0, 0).expect("generation");
        map.set(0, lb_common::route_gen::next(now, flags(now)), 0)
            .expect("generation");
    }

    /// Runs the XDP program (traffic from outside) on `frame`.
    pub fn run_external(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let out = run_xdp(&mut self.ebpf, frame);
        (out.retval as u32, out.packet)
    }

    /// Node addresses (NodePorts answer on them; the first is the SNAT source) and the SNAT
    /// port range.
    pub fn set_node(&mut self, addresses: &[&str], ports: (u16, u16)) {
        let addresses: Vec<u32> = addresses.iter().map(|a| ip(a)).collect();
        put_node(&mut self.ebpf, &addresses, ports);
    }

    /// Allows `cidr` ("a.b.c.d/n") for the test service's source ranges.
    pub fn allow_source(&mut self, cidr: &str) {
        let (addr, prefix) = cidr.split_once('/').expect("cidr");
        let mut ranges: LpmTrie<_, SourceRangeKey, u8> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::SOURCE_RANGES).expect("map"))
                .expect("map type");
        let key = Key::new(
            32 + prefix.parse::<u32>().expect("prefix"),
            SourceRangeKey {
                service_id_be: SERVICE_ID.to_be(),
                addr: ip(addr),
            },
        );
        ranges.insert(&key, 1, 0).expect("range");
    }

    /// Packets counted under `o`, both families together.
    pub fn stat(&self, o: Outcome) -> u64 {
        outcome_count(&self.ebpf, o)
    }

    /// Packets counted under `o` by the IPv6 programs.
    pub fn stat6(&self, o: Outcome) -> u64 {
        family_count(&self.ebpf, map_names::STATS6, o)
    }

    /// The conntrack entries, with the claims as the entries they are (kept in arrays of
    /// their own: `XLB_REPLY_CLAIMS`, `XLB_FLOW_CLAIMS`).
    pub fn ct(&self) -> Vec<(CtKey, CtValue)> {
        let ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map(map_names::CONNTRACK).expect("map")).expect("map type");
        let mut entries: Vec<_> = ct.iter().map(|r| r.expect("ct entry")).collect();
        entries.extend(self.claims::<u32>(map_names::REPLY_CLAIMS));
        entries.extend(self.claims::<u32>(map_names::FLOW_CLAIMS));
        entries
    }

    /// Frees every IPv4 reply claim (zeroes the held slots of `XLB_REPLY_CLAIMS`; flows
    /// keep their forward claims), quickly: a test may need it inside one conntrack check
    /// window.
    pub fn clear_reply_claims(&mut self) {
        let held = self.claims::<u32>(map_names::REPLY_CLAIMS);
        let mut slots: Array<_, lb_common::ReplyClaim> =
            Array::try_from(self.ebpf.map_mut(map_names::REPLY_CLAIMS).expect("map"))
                .expect("map type");
        for (key, _) in held {
            let slot = lb_common::reply_claim_slot(&key);
            slots
                .set(slot, lb_common::ReplyClaim::default(), 0)
                .expect("claim slot");
        }
    }

    /// Writes an IPv4 claim into its key's slot of the claim array `name` (as another
    /// flow's, to take the slot).
    pub fn put_claim(&mut self, name: &str, key: CtKey, value: CtValue) {
        let mut slots: Array<_, lb_common::ReplyClaim> =
            Array::try_from(self.ebpf.map_mut(name).expect("map")).expect("map type");
        let claim = lb_common::ReplyClaim { key, value };
        slots
            .set(lb_common::reply_claim_slot(&key), claim, 0)
            .expect("claim slot");
    }

    /// Frees the slot of `key` in the IPv4 claim array `name` (zeroes it).
    pub fn free_claim(&mut self, name: &str, key: CtKey) {
        let mut slots: Array<_, lb_common::ReplyClaim> =
            Array::try_from(self.ebpf.map_mut(name).expect("map")).expect("map type");
        slots
            .set(
                lb_common::reply_claim_slot(&key),
                lb_common::ReplyClaim::default(),
                0,
            )
            .expect("claim slot");
    }

    /// Removes an IPv4 reverse entry wherever it is: its claim (if its slot holds it) and
    /// its conntrack entry (if any), in a few system calls.
    pub fn remove_reverse(&mut self, key: CtKey) {
        let mut slots: Array<_, lb_common::ReplyClaim> =
            Array::try_from(self.ebpf.map_mut(map_names::REPLY_CLAIMS).expect("map"))
                .expect("map type");
        let slot = lb_common::reply_claim_slot(&key);
        if slots.get(&slot, 0).expect("claim slot").key == key {
            slots
                .set(slot, lb_common::ReplyClaim::default(), 0)
                .expect("claim slot");
        }
        let mut ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK).expect("map"))
                .expect("map type");
        let _ = ct.remove(&key);
    }

    /// Removes an IPv4 conntrack entry.
    pub fn remove_ct(&mut self, key: CtKey) {
        let mut ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK).expect("map"))
                .expect("map type");
        ct.remove(&key).expect("conntrack entry");
    }

    /// Writes a conntrack entry as given (to plant states a test cannot reach by packets).
    pub fn put_ct(&mut self, key: CtKey, value: CtValue) {
        let mut ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK).expect("map"))
                .expect("map type");
        ct.insert(key, value, 0).expect("conntrack entry");
    }

    /// Sets the node's conntrack lifetimes (0: the default), as the agent writes them.
    pub fn set_ct_timeouts(&mut self, timeouts: lb_common::CtTimeouts) {
        let mut map: Array<_, lb_common::CtTimeouts> =
            Array::try_from(self.ebpf.map_mut(map_names::CT_TIMEOUTS).expect("map"))
                .expect("map type");
        map.set(0, timeouts, 0).expect("conntrack lifetimes");
    }

    /// The IPv4 affinity entries: client address (network byte order) → backend id.
    pub fn affinities(&self) -> std::collections::BTreeMap<u32, u32> {
        let aff: HashMap<_, AffinityKey, AffinityValue> =
            HashMap::try_from(self.ebpf.map(map_names::AFFINITY).expect("map")).expect("map type");
        aff.iter()
            .map(|r| r.expect("affinity entry"))
            .map(|(k, v)| (k.client, v.backend_id))
            .collect()
    }

    pub fn set_affinity(&mut self, client: &str, backend_id: u32, last_used_ns: u64) {
        let mut aff: HashMap<_, AffinityKey, AffinityValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::AFFINITY).expect("map"))
                .expect("map type");
        let key = AffinityKey {
            client: ip(client),
            service_id: SERVICE_ID,
        };
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns,
        };
        aff.insert(key, value, 0).expect("affinity");
    }
}

impl Datapath {
    /// Moves every IPv4 conntrack entry's last-seen time `seconds` into the past.
    pub fn age_conntrack(&mut self, seconds: u64) {
        self.age_table::<u32>(
            map_names::CONNTRACK,
            &[map_names::REPLY_CLAIMS, map_names::FLOW_CLAIMS],
            seconds,
        );
    }

    /// `age_conntrack` for the IPv6 table.
    pub fn age_conntrack6(&mut self, seconds: u64) {
        self.age_table::<Ip6>(map_names::CONNTRACK6, &[map_names::REPLY_CLAIMS6], seconds);
    }

    /// Ages every entry of a family's conntrack (`name`) and claim arrays (`claims`).
    fn age_table<A: MapAddr + aya::Pod>(&mut self, name: &str, claims: &[&str], seconds: u64)
    where
        CtKey<A>: aya::Pod,
        CtValue<A>: aya::Pod,
        lb_common::ReplyClaim<A>: aya::Pod,
    {
        // Saturating: the clock starts at boot, and a machine may be up for less (a claim
        // stamped 0 is free, as an outlived one is).
        let aged = |t| before(t, Duration::from_secs(seconds));
        let mut ct: HashMap<_, CtKey<A>, CtValue<A>> =
            HashMap::try_from(self.ebpf.map_mut(name).expect("map")).expect("map type");
        let entries: Vec<(CtKey<A>, CtValue<A>)> = ct.iter().map(|r| r.expect("entry")).collect();
        for (k, mut v) in entries {
            v.last_seen_ns = aged(v.last_seen_ns);
            ct.insert(k, v, 0).expect("update");
        }
        for claims in claims {
            let mut slots: Array<_, lb_common::ReplyClaim<A>> =
                Array::try_from(self.ebpf.map_mut(claims).expect("map")).expect("map type");
            for i in 0..slots.len() {
                let mut claim = slots.get(&i, 0).expect("claim slot");
                if claim.value.last_seen_ns != 0 {
                    claim.value.last_seen_ns = aged(claim.value.last_seen_ns);
                    slots.set(i, claim, 0).expect("update");
                }
            }
        }
    }
}

/// Asserts `out` equals `input` except for the given byte ranges, and that checksums hold.
pub fn assert_only_changed(input: &[u8], out: &[u8], allowed: &[std::ops::Range<usize>]) {
    assert_eq!(input.len(), out.len(), "length changed");
    for (i, (a, b)) in input.iter().zip(out).enumerate() {
        if a != b {
            assert!(
                allowed.iter().any(|r| r.contains(&i)),
                "byte {i} changed ({a:#04x} -> {b:#04x}) outside the NAT fields"
            );
        }
    }
    assert_eq!(checksum_errors(out), Vec::<String>::new());
}

pub const IP_CSUM: std::ops::Range<usize> = 24..26;
pub const IP_SRC: std::ops::Range<usize> = 26..30;
pub const IP_DST: std::ops::Range<usize> = 30..34;
pub const SPORT: std::ops::Range<usize> = 34..36;
pub const DPORT: std::ops::Range<usize> = 36..38;
pub const TCP_CSUM: std::ops::Range<usize> = 50..52;
pub const UDP_CSUM: std::ops::Range<usize> = 40..42;

/// One step of a table test, Katran's fixture style: a description, the hook and packet
/// in, the verdict and the packet out (exact bytes outside the NAT fields, checksums valid).
pub struct Step {
    pub name: &'static str,
    pub hook: Hook,
    pub input: Vec<u8>,
    pub verdict: i32,
    pub out: Out,
}

/// What a step's output packet must be.
pub enum Out {
    /// Byte for byte the input.
    Unchanged,
    /// The input with only `changed` byte ranges rewritten, these addresses and ports in
    /// it, and the UDP checksum zero or not.
    Rewritten {
        changed: Vec<std::ops::Range<usize>>,
        src: (&'static str, u16),
        dst: (&'static str, u16),
        udp_checksum_zero: Option<bool>,
    },
}

impl Datapath {
    /// Runs `steps` in order on this datapath (state carries over, as packets of a flow do).
    pub fn run_steps(&mut self, steps: &[Step]) {
        for step in steps {
            let (verdict, out) = self.run(step.hook, &step.input);
            assert_eq!(verdict, step.verdict, "{}: verdict", step.name);
            match &step.out {
                Out::Unchanged => assert_eq!(out, step.input, "{}: packet changed", step.name),
                Out::Rewritten {
                    changed,
                    src,
                    dst,
                    udp_checksum_zero,
                } => {
                    assert_only_changed(&step.input, &out, changed);
                    let v = crate::packet::view(&out);
                    assert_eq!(
                        ((v.src.to_string(), v.sport), (v.dst.to_string(), v.dport)),
                        ((src.0.to_string(), src.1), (dst.0.to_string(), dst.1)),
                        "{}: addresses",
                        step.name
                    );
                    if let Some(zero) = udp_checksum_zero {
                        assert_eq!(out[40..42] == [0, 0], *zero, "{}: UDP checksum", step.name);
                    }
                }
            }
        }
    }
}

/// The SNAT ports one CPU's new flows get, for either family: `dp` has one NodePort with
/// SNAT to one backend and the node's SNAT ports 50000..=50007; `syn(i)` is client `i`'s
/// SYN to it, `sport` the source port of a translated packet, `exhausted` the family's
/// `DROP_SNAT_EXHAUSTED` count and `expire` ages the family's conntrack past a SYN's
/// lifetime. Asserts that each port is one past the last (wrapping in the range), that a
/// ninth flow is refused and counted, and that after expiry the search goes on where it
/// stopped, at the oldest port.
pub fn assert_snat_ports_follow_each_other(
    dp: &mut Datapath,
    syn: impl Fn(u16) -> Vec<u8>,
    sport: impl Fn(&[u8]) -> u16,
    exhausted: impl Fn(&Datapath) -> u64,
    expire: impl FnOnce(&mut Datapath),
) {
    // One CPU's: the cursor is per CPU (the test thread would otherwise wander).
    crate::race::pin_to(0);
    let (min, count) = (50_000u16, 8u16);
    let port = |dp: &mut Datapath, client: u16| {
        let (verdict, out) = dp.run_external(&syn(client));
        assert_eq!(verdict, XDP_PASS, "client {client}");
        sport(&out)
    };
    let ports: Vec<u16> = (1..=count).map(|i| port(dp, i)).collect();
    let first = ports[0] - min;
    let expected: Vec<u16> = (0..count).map(|i| min + (first + i) % count).collect();
    assert_eq!(ports, expected, "each port one past the last, wrapping");
    // All eight taken: the next flow is refused ...
    let ninth = syn(count + 1);
    assert_eq!(dp.run_external(&ninth), (XDP_DROP, ninth.clone()));
    assert_eq!(exhausted(dp), 1);
    // ... until they expire; then the search goes on where it stopped, at the oldest.
    expire(dp);
    assert_eq!(port(dp, count + 2), ports[0]);
}
