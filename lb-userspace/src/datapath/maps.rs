//! The pinned BPF maps, opened by path: used by the agent to sync and by the read commands.
use aya::maps::{
    Array, HashMap, HashOfMaps, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
    lpm_trie::Key,
};
use lb_common::{
    AffinityKey, AffinityValue, BPF_F_INNER_MAP, Backend, CtKey, CtTimeouts, CtValue, Ip6, MapAddr,
    NodeConfig, ReplyClaim, ServiceKey, ServiceName, ServiceValue, SockFrontend, SockKey, SockKey6,
    SourceRangeKey, TrafficCounter, addr_filter, map_names,
};

use crate::{
    datapath::{
        addr_filter::{AddrFilter, ReplyFilter, WordWrite},
        id_arrays,
        pins::PinLayout,
    },
    model::{Family, IpNet},
    sync::{
        BackendEntry, MapStore, SlotKey, StoreError,
        keys::{from_map_v4, from_map_v6, map_v4, map_v6},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error(
        "cannot open pinned map {path}: {source}; is the agent running with this --bpffs \
         (or has it run since the last `xlb cleanup`)?"
    )]
    Open {
        path: std::path::PathBuf,
        source: MapError,
    },
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout {
        name: &'static str,
        source: MapError,
    },
    #[error("writing map {map}: {source}")]
    Write { map: &'static str, source: MapError },
    #[error(
        "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+) failed: \
         {source}; the socket hooks need it to leave pods' sockets to the TC path"
    )]
    HostNetns { source: std::io::Error },
}

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h; not in the libc crate yet).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace, as `bpf_get_netns_cookie` reports
/// it for sockets created there.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

pub struct PinnedMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: Array<MapData, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub stats: PerCpuArray<MapData, u64>,
    pub service_stats: PerCpuArray<MapData, TrafficCounter>,
    pub backend_stats: PerCpuArray<MapData, TrafficCounter>,
    pub round_robin: HashMap<MapData, u32, u64>,
    pub connections: Array<MapData, u64>,
    pub maglev: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    pub node_ips: HashMap<MapData, u32, u32>,
    pub config: Array<MapData, NodeConfig>,
    pub host_netns: Array<MapData, u64>,
    pub ct_timeouts: Array<MapData, CtTimeouts>,
    pub service_names: HashMap<MapData, u32, ServiceName>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub sock_revnat: HashMap<MapData, SockKey, SockFrontend>,
    pub addr_filter: Array<MapData, u64>,
    pub reply_filter: Array<MapData, u64>,
    pub reply_claims: Array<MapData, ReplyClaim>,
    /// IPv4 flows' forward entries held as claims (`XLB_FLOW_CLAIMS`).
    pub flow_claims: Array<MapData, ReplyClaim>,
    pub v6: PinnedMaps6,
    /// What `addr_filter` must hold; built from the maps on the first write.
    filter: Option<AddrFilter>,
    /// What `reply_filter` must hold; likewise.
    replies: Option<ReplyFilter>,
}

/// The IPv6 twins of the address-keyed maps.
pub struct PinnedMaps6 {
    pub services: HashMap<MapData, ServiceKey<Ip6>, ServiceValue>,
    pub backends: Array<MapData, Backend<Ip6>>,
    pub conntrack: HashMap<MapData, CtKey<Ip6>, CtValue<Ip6>>,
    pub affinity: HashMap<MapData, AffinityKey<Ip6>, AffinityValue>,
    pub node_ips: HashMap<MapData, Ip6, u32>,
    pub config: Array<MapData, NodeConfig<Ip6>>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey<Ip6>, u8>,
    pub sock_revnat: HashMap<MapData, SockKey6, SockFrontend<Ip6>>,
    pub stats: PerCpuArray<MapData, u64>,
    pub reply_claims: Array<MapData, ReplyClaim<Ip6>>,
}

fn open(layout: &PinLayout, name: &'static str) -> Result<Map, MapsError> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| MapsError::Layout { name, source })
}

macro_rules! typed {
    ($layout:expr, $name:expr, $ty:ident) => {
        $ty::try_from(open($layout, $name)?).map_err(|source| MapsError::Layout {
            name: $name,
            source,
        })?
    };
}

impl PinnedMaps {
    pub fn open(layout: &PinLayout) -> Result<Self, MapsError> {
        Ok(Self {
            services: typed!(layout, map_names::SERVICES, HashMap),
            backends: typed!(layout, map_names::BACKENDS, Array),
            conntrack: typed!(layout, map_names::CONNTRACK, HashMap),
            affinity: typed!(layout, map_names::AFFINITY, HashMap),
            stats: typed!(layout, map_names::STATS, PerCpuArray),
            service_stats: typed!(layout, map_names::SERVICE_STATS, PerCpuArray),
            backend_stats: typed!(layout, map_names::BACKEND_STATS, PerCpuArray),
            round_robin: typed!(layout, map_names::ROUND_ROBIN, HashMap),
            connections: typed!(layout, map_names::CONNECTIONS, Array),
            maglev: typed!(layout, map_names::MAGLEV, HashOfMaps),
            node_ips: typed!(layout, map_names::NODE_IPS, HashMap),
            config: typed!(layout, map_names::CONFIG, Array),
            host_netns: typed!(layout, map_names::HOST_NETNS, Array),
            ct_timeouts: typed!(layout, map_names::CT_TIMEOUTS, Array),
            service_names: typed!(layout, map_names::SERVICE_NAMES, HashMap),
            source_ranges: typed!(layout, map_names::SOURCE_RANGES, LpmTrie),
            sock_revnat: typed!(layout, map_names::SOCK_REVNAT, HashMap),
            addr_filter: typed!(layout, map_names::ADDR_FILTER, Array),
            reply_filter: typed!(layout, map_names::REPLY_FILTER, Array),
            reply_claims: typed!(layout, map_names::REPLY_CLAIMS, Array),
            flow_claims: typed!(layout, map_names::FLOW_CLAIMS, Array),
            filter: None,
            replies: None,
            v6: PinnedMaps6 {
                services: typed!(layout, map_names::SERVICES6, HashMap),
                backends: typed!(layout, map_names::BACKENDS6, Array),
                conntrack: typed!(layout, map_names::CONNTRACK6, HashMap),
                affinity: typed!(layout, map_names::AFFINITY6, HashMap),
                node_ips: typed!(layout, map_names::NODE_IPS6, HashMap),
                config: typed!(layout, map_names::CONFIG6, Array),
                source_ranges: typed!(layout, map_names::SOURCE_RANGES6, LpmTrie),
                sock_revnat: typed!(layout, map_names::SOCK_REVNAT6, HashMap),
                stats: typed!(layout, map_names::STATS6, PerCpuArray),
                reply_claims: typed!(layout, map_names::REPLY_CLAIMS6, Array),
            },
        })
    }

    /// Destroys node processes' UDP sockets connected to one of `backend_ids` (removed
    /// backends) and forgets them; returns how many sockets were destroyed.
    pub fn release_sockets(&mut self, backend_ids: &std::collections::BTreeSet<u32>) -> usize {
        if backend_ids.is_empty() {
            return 0;
        }
        let stale: Vec<SockKey> = self
            .sock_revnat
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, shown)| backend_ids.contains(&shown.backend_id))
            .map(|(key, _)| key)
            .collect();
        let stale6: Vec<SockKey6> = self
            .v6
            .sock_revnat
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, shown)| backend_ids.contains(&shown.backend_id))
            .map(|(key, _)| key)
            .collect();
        let cookies = stale
            .iter()
            .map(|k| k.cookie)
            .chain(stale6.iter().map(|k| k.cookie))
            .collect();
        let destroyed = crate::datapath::sockets::destroy_udp(&cookies).unwrap_or_else(|e| {
            log::warn!("destroying UDP sockets of removed backends: {e}");
            0
        });
        for key in stale {
            let _ = self.sock_revnat.remove(&key);
        }
        for key in stale6 {
            let _ = self.v6.sock_revnat.remove(&key);
        }
        destroyed
    }

    /// Makes `addresses` the node's addresses (NodePorts answer on them) and writes the
    /// node-wide settings.
    /// `addresses` of both families; each family's SNAT source is its first address.
    pub fn set_node(
        &mut self,
        addresses: &[std::net::IpAddr],
        snat_ports: (u16, u16),
    ) -> Result<(), MapError> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for a in addresses {
            match a {
                std::net::IpAddr::V4(a) => v4.push(map_v4(*a)),
                std::net::IpAddr::V6(a) => v6.push(map_v6(*a)),
            }
        }
        let (before, after) = self.filter()?.set_node(addresses);
        self.write_filter(before)?;
        set_addresses(&mut self.node_ips, &v4)?;
        set_addresses(&mut self.v6.node_ips, &v6)?;
        self.write_filter(after)?;
        fn config<A: MapAddr>(first: Option<&A>, (min, max): (u16, u16)) -> NodeConfig<A> {
            NodeConfig {
                snat_addr: first.copied().unwrap_or_default(),
                snat_port_min: min,
                snat_port_max: max,
            }
        }
        self.config.set(0, config(v4.first(), snat_ports), 0)?;
        self.v6.config.set(0, config(v6.first(), snat_ports), 0)
    }

    /// The address filter's mirror. Built on first use from the frontends and node
    /// addresses the maps hold (a restarted agent's predecessor's), after which the map is
    /// made to match it (bits nothing needs any more cleared) and armed.
    fn filter(&mut self) -> Result<&mut AddrFilter, MapError> {
        if self.filter.is_none() {
            let mut filter = AddrFilter::default();
            for (key, _) in self.service_slots() {
                filter.add_frontend(&key);
            }
            let node: Vec<std::net::IpAddr> = self
                .node_ips
                .keys()
                .filter_map(Result::ok)
                .map(|a| from_map_v4(a).into())
                .chain(
                    self.v6
                        .node_ips
                        .keys()
                        .filter_map(Result::ok)
                        .map(|a| from_map_v6(a).into()),
                )
                .collect();
            filter.set_node(&node);
            fill_and_arm(&mut self.addr_filter, |index| filter.word(index))?;
            self.filter = Some(filter);
        }
        Ok(self.filter.as_mut().expect("built above"))
    }

    fn write_filter(&mut self, words: impl IntoIterator<Item = WordWrite>) -> Result<(), MapError> {
        write_words(&mut self.addr_filter, words)
    }

    /// The reply filter's mirror, built on first use from the backends the maps hold, as
    /// `filter`.
    fn replies(&mut self) -> Result<&mut ReplyFilter, MapError> {
        if self.replies.is_none() {
            let now = std::time::Instant::now();
            let mut replies = ReplyFilter::default();
            for (id, entry) in self.all_backends() {
                replies.set_backend(id, &entry, now);
            }
            // Removed backends' flows a predecessor left: their replies keep their bits
            // for the hold, as if removed now.
            hold_reply_sources(&mut replies, &self.conntrack, &self.reply_claims, now);
            hold_reply_sources(&mut replies, &self.v6.conntrack, &self.v6.reply_claims, now);
            fill_and_arm(&mut self.reply_filter, |index| replies.word(index))?;
            self.replies = Some(replies);
        }
        Ok(self.replies.as_mut().expect("built above"))
    }

    /// Records the network namespace whose sockets the socket hooks balance: the calling
    /// process's (the agent runs in the host's).
    pub fn set_host_netns(&mut self) -> Result<u64, MapsError> {
        let cookie = own_netns_cookie().map_err(|source| MapsError::HostNetns { source })?;
        self.host_netns
            .set(0, cookie, 0)
            .map_err(|source| MapsError::Write {
                map: map_names::HOST_NETNS,
                source,
            })?;
        Ok(cookie)
    }

    /// The node's conntrack lifetimes (the defaults where unset).
    pub fn ct_timeouts(&self) -> CtTimeouts {
        self.ct_timeouts.get(&0, 0).unwrap_or_default()
    }

    pub fn set_ct_timeouts(&mut self, timeouts: &CtTimeouts) -> Result<(), MapsError> {
        self.ct_timeouts
            .set(0, timeouts, 0)
            .map_err(|source| MapsError::Write {
                map: map_names::CT_TIMEOUTS,
                source,
            })
    }

    /// The Service port a service id serves, as the agent recorded it.
    pub fn service_name(&self, service_id: u32) -> Option<String> {
        self.service_names
            .get(&service_id, 0)
            .ok()
            .map(|n| n.as_str().to_string())
    }

    /// Service ids that have a Maglev table.
    pub fn maglev_tables(&self) -> Vec<u32> {
        self.maglev.keys().filter_map(Result::ok).collect()
    }

    /// The Maglev table of a frontend (M backend ids), if it has one.
    pub fn maglev_table(&self, service_id: u32) -> Option<Vec<u32>> {
        let table = self.maglev.get(&service_id, 0).ok()?;
        let size = table.get(&0, 0).ok()?;
        (1..=size).map(|i| table.get(&i, 0).ok()).collect()
    }

    /// Every `SERVICES` and `SERVICES6` entry (entries that vanish while iterating are
    /// skipped).
    pub fn service_slots(&self) -> Vec<(SlotKey, ServiceValue)> {
        let v4 = self.services.iter().filter_map(Result::ok);
        let v6 = self.v6.services.iter().filter_map(Result::ok);
        v4.map(|(k, v)| (SlotKey::V4(k), v))
            .chain(v6.map(|(k, v)| (SlotKey::V6(k), v)))
            .collect()
    }

    /// The backend with `id`, from the map of whichever family holds it.
    pub fn backend(&self, id: u32) -> Option<BackendEntry> {
        match id_arrays::get(&self.backends, id) {
            Some(b) => Some(BackendEntry::V4(b)),
            None => id_arrays::get(&self.v6.backends, id).map(BackendEntry::V6),
        }
    }

    /// Every backend of both families. A table that cannot be read (logged) counts as empty.
    pub fn all_backends(&self) -> Vec<(u32, BackendEntry)> {
        fn logged<T>(name: &str, table: std::io::Result<Vec<T>>) -> Vec<T> {
            table.unwrap_or_else(|e| {
                log::warn!("reading {name}: {e}");
                Vec::new()
            })
        }
        let v4 = logged(map_names::BACKENDS, id_arrays::scan(&self.backends));
        let v6 = logged(map_names::BACKENDS6, id_arrays::scan(&self.v6.backends));
        v4.into_iter()
            .map(|(id, b)| (id, BackendEntry::V4(b)))
            .chain(v6.into_iter().map(|(id, b)| (id, BackendEntry::V6(b))))
            .collect()
    }

    /// Deletes dead conntrack and affinity entries (see `gc`); says how many, and how many
    /// remain. `now_ns`: CLOCK_MONOTONIC, read before this call.
    pub fn collect_garbage(&mut self, now_ns: u64) -> Collected {
        // Without the live backends every flow would look orphaned: skip this round.
        let live = match (
            id_arrays::scan(&self.backends),
            id_arrays::scan(&self.v6.backends),
        ) {
            (Ok(v4), Ok(v6)) => {
                let v6 = v6.into_iter().map(|(id, _)| id);
                v4.into_iter().map(|(id, _)| id).chain(v6).collect()
            }
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("garbage collection skipped: reading the backend maps: {e}");
                return Collected::default();
            }
        };
        let timeouts = self.ct_timeouts();
        let v4 = collect_family(
            &mut self.conntrack,
            Some(&mut self.flow_claims),
            &mut self.affinity,
            &live,
            &timeouts,
            now_ns,
        );
        let v6 = collect_family(
            &mut self.v6.conntrack,
            None,
            &mut self.v6.affinity,
            &live,
            &timeouts,
            now_ns,
        );
        let mut open = v4.open;
        for (id, n) in v6.open {
            *open.entry(id).or_insert(0) += n;
        }
        match id_arrays::open_flows(&self.connections) {
            Ok(counted) => {
                let counted: std::collections::BTreeMap<u32, u64> = counted.into_iter().collect();
                for id in counted.keys().filter(|id| !open.contains_key(id)) {
                    let _ = self.connections.set(*id, 0, 0);
                }
                for (id, n) in &open {
                    if counted.get(id) != Some(n) {
                        let _ = self.connections.set(*id, n, 0);
                    }
                }
            }
            Err(e) => log::warn!(
                "open flows not recounted: reading {}: {e}",
                map_names::CONNECTIONS
            ),
        }
        Collected {
            removed: v4.collected.removed + v6.collected.removed,
            conntrack: v4.collected.conntrack,
            affinity: v4.collected.affinity,
            conntrack6: v6.collected.conntrack,
            affinity6: v6.collected.affinity,
        }
    }
}

/// One family's garbage collection, and its open flows per backend.
struct FamilyCollected {
    collected: Collected,
    open: std::collections::BTreeMap<u32, u64>,
}

fn collect_family<A: MapAddr>(
    conntrack: &mut HashMap<MapData, CtKey<A>, CtValue<A>>,
    mut claims: Option<&mut Array<MapData, ReplyClaim<A>>>,
    affinity: &mut HashMap<MapData, AffinityKey<A>, AffinityValue>,
    live: &std::collections::BTreeSet<u32>,
    timeouts: &CtTimeouts,
    now_ns: u64,
) -> FamilyCollected
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
    AffinityKey<A>: aya::Pod,
    ReplyClaim<A>: aya::Pod,
{
    let flows: Vec<_> = conntrack.iter().filter_map(Result::ok).collect();
    let affinities: Vec<_> = affinity.iter().filter_map(Result::ok).collect();
    let mut removed = 0;
    for key in crate::datapath::gc::stale_flows(flows, live, timeouts, now_ns) {
        removed += usize::from(conntrack.remove(&key).is_ok());
    }
    // Forward claims (reply claims free themselves: replies of a gone backend stop).
    if let Some(claims) = claims.as_deref_mut() {
        let claimed = forward_claims(claims);
        let stale: std::collections::HashSet<CtKey<A>> =
            crate::datapath::gc::stale_flows(claimed.iter().copied(), live, timeouts, now_ns)
                .into_iter()
                .collect();
        for (key, value) in claimed.iter().filter(|(key, _)| stale.contains(key)) {
            removed += usize::from(free_claim(claims, key, value));
        }
    }
    let mut affinity_left = affinities.len();
    for key in crate::datapath::gc::stale_affinities(affinities, live, now_ns) {
        let gone = affinity.remove(&key).is_ok();
        removed += usize::from(gone);
        affinity_left -= usize::from(gone);
    }
    // Least-conn's counts, recounted from the flows that remain: corrects what the
    // datapath cannot see (expiry without FIN, LRU eviction, UDP).
    let in_conntrack: Vec<_> = conntrack.iter().filter_map(Result::ok).collect();
    let conntrack_left = in_conntrack.len();
    let claimed = claims.map_or_else(Vec::new, |claims| forward_claims(claims));
    let flows = crate::datapath::gc::forward_entries(claimed, in_conntrack);
    FamilyCollected {
        open: crate::datapath::gc::open_flows(flows, live, timeouts, now_ns),
        collected: Collected {
            removed,
            conntrack: conntrack_left,
            affinity: affinity_left,
            ..Collected::default()
        },
    }
}

/// The forward entries held as claims in `claims` (`XLB_FLOW_CLAIMS`: IPv4 flows', see
/// `lb-ebpf` `ct`); none if the array cannot be read (said in the log).
pub fn forward_claims<M: std::borrow::Borrow<MapData>, A: MapAddr>(
    claims: &Array<M, ReplyClaim<A>>,
) -> Vec<(CtKey<A>, CtValue<A>)>
where
    ReplyClaim<A>: aya::Pod,
{
    id_arrays::reply_claims(claims)
        .unwrap_or_else(|e| {
            log::warn!(
                "reading {} (forward entries left out): {e}",
                map_names::FLOW_CLAIMS
            );
            Vec::new()
        })
        .into_iter()
        .filter(|c| c.key.dir == lb_common::CT_FORWARD)
        .map(|c| (c.key, c.value))
        .collect()
}

/// Frees the claim of `key` if its slot still holds the one read (`value`, by its creation
/// stamp): a flow that took the slot since keeps it. Whether it freed it.
fn free_claim<A: MapAddr>(
    claims: &mut Array<MapData, ReplyClaim<A>>,
    key: &CtKey<A>,
    value: &CtValue<A>,
) -> bool
where
    ReplyClaim<A>: aya::Pod,
{
    let slot = lb_common::reply_claim_slot(key);
    let unchanged = claims
        .get(&slot, 0)
        .is_ok_and(|c| c.key == *key && c.value.created_ns == value.created_ns);
    unchanged && claims.set(slot, ReplyClaim::default(), 0).is_ok()
}

/// Makes `wanted` the addresses in a node-address map.
fn set_addresses<A: MapAddr + aya::Pod>(
    map: &mut HashMap<MapData, A, u32>,
    wanted: &[A],
) -> Result<(), MapError> {
    for addr in wanted {
        map.insert(addr, 1, 0)?;
    }
    let stale: Vec<A> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|a| !wanted.contains(a))
        .collect();
    for addr in stale {
        ignore_missing(map.remove(&addr))?;
    }
    Ok(())
}

/// What one garbage collection did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Collected {
    /// Entries deleted.
    pub removed: usize,
    /// Entries left in the conntrack and affinity maps, IPv4 then IPv6.
    pub conntrack: usize,
    pub affinity: usize,
    pub conntrack6: usize,
    pub affinity6: usize,
}

/// The LPM key of a service's source range: the service id always matched whole.
fn range_key<A: MapAddr>(service_id: u32, addr: A, prefix: u8) -> Key<SourceRangeKey<A>> {
    Key::new(
        32 + u32::from(prefix),
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr,
        },
    )
}

/// Sums a per-CPU counter.
pub fn sum_counter(values: &aya::maps::PerCpuValues<TrafficCounter>) -> TrafficCounter {
    values
        .iter()
        .fold(TrafficCounter::default(), |acc, v| TrafficCounter {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
            flows: acc.flows + v.flows,
        })
}

fn store_err(operation: &'static str, map: &'static str, e: MapError) -> StoreError {
    StoreError {
        operation,
        map,
        message: e.to_string(),
    }
}

/// Holds the reply bit of every reverse entry's source in `conntrack` and `claims` (one
/// family's).
fn hold_reply_sources<A: MapAddr>(
    replies: &mut ReplyFilter,
    conntrack: &HashMap<MapData, CtKey<A>, CtValue<A>>,
    claims: &Array<MapData, ReplyClaim<A>>,
    now: std::time::Instant,
) where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
    ReplyClaim<A>: aya::Pod,
{
    let claimed = id_arrays::reply_claims(claims).unwrap_or_else(|e| {
        log::warn!("reading the reply claims (their replies' sources stay unheld): {e}");
        Vec::new()
    });
    let reverse = conntrack
        .keys()
        .filter_map(Result::ok)
        .filter(|key| key.dir == lb_common::CT_REVERSE);
    let claimed = claimed
        .into_iter()
        .map(|c| c.key)
        .filter(|key| key.dir == lb_common::CT_REVERSE);
    for key in reverse.chain(claimed) {
        replies.hold(key.src, key.sport, key.proto, now);
    }
}

/// Makes a filter's words what `want` says (the bits of a predecessor's entries that nothing
/// needs any more cleared), then arms it: until then the programs filter nothing.
fn fill_and_arm(map: &mut Array<MapData, u64>, want: impl Fn(u32) -> u64) -> Result<(), MapError> {
    for index in 1..=addr_filter::WORDS {
        let want = want(index);
        if map.get(&index, 0)? != want {
            map.set(index, want, 0)?;
        }
    }
    map.set(0, addr_filter::ARMED, 0)
}

fn write_words(
    map: &mut Array<MapData, u64>,
    words: impl IntoIterator<Item = WordWrite>,
) -> Result<(), MapError> {
    for (index, value) in words {
        map.set(index, value, 0)?;
    }
    Ok(())
}

/// Deleting something already gone is success: sync must be idempotent.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl MapStore for PinnedMaps {
    fn set_backend(&mut self, id: u32, backend: &BackendEntry) -> Result<(), StoreError> {
        let filter_err = |e| store_err("write", map_names::REPLY_FILTER, e);
        // The backend's reply bit before the backend: no flow to it exists yet whose
        // replies the filter would turn away.
        let now = std::time::Instant::now();
        let replies = self.replies().map_err(filter_err)?;
        let before = replies.set_backend(id, backend, now);
        let after = replies.release_due(now);
        write_words(&mut self.reply_filter, before).map_err(filter_err)?;
        match backend {
            BackendEntry::V4(b) => id_arrays::set(&mut self.backends, id, b)
                .map_err(|e| store_err("write", map_names::BACKENDS, e)),
            BackendEntry::V6(b) => id_arrays::set(&mut self.v6.backends, id, b)
                .map_err(|e| store_err("write", map_names::BACKENDS6, e)),
        }?;
        write_words(&mut self.reply_filter, after).map_err(filter_err)
    }
    fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), StoreError> {
        match family {
            Family::V4 => id_arrays::clear(&mut self.backends, id)
                .map_err(|e| store_err("clear", map_names::BACKENDS, e)),
            Family::V6 => id_arrays::clear(&mut self.v6.backends, id)
                .map_err(|e| store_err("clear", map_names::BACKENDS6, e)),
        }?;
        let filter_err = |e| store_err("write", map_names::REPLY_FILTER, e);
        let now = std::time::Instant::now();
        let replies = self.replies().map_err(filter_err)?;
        replies.remove_backend(id, family == Family::V6, now);
        let after = replies.release_due(now);
        write_words(&mut self.reply_filter, after).map_err(filter_err)
    }
    fn set_slot(&mut self, key: &SlotKey, value: &ServiceValue) -> Result<(), StoreError> {
        let filter_err = |e| store_err("write", map_names::ADDR_FILTER, e);
        // The address's bit before the frontend: a packet never meets a frontend whose
        // address the filter would turn away.
        let write = self.filter().map_err(filter_err)?.add_frontend(key);
        self.write_filter(write).map_err(filter_err)?;
        match key {
            SlotKey::V4(k) => self
                .services
                .insert(k, value, 0)
                .map_err(|e| store_err("insert", map_names::SERVICES, e)),
            SlotKey::V6(k) => self
                .v6
                .services
                .insert(k, value, 0)
                .map_err(|e| store_err("insert", map_names::SERVICES6, e)),
        }
    }
    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), StoreError> {
        match key {
            SlotKey::V4(k) => ignore_missing(self.services.remove(k))
                .map_err(|e| store_err("delete", map_names::SERVICES, e)),
            SlotKey::V6(k) => ignore_missing(self.v6.services.remove(k))
                .map_err(|e| store_err("delete", map_names::SERVICES6, e)),
        }?;
        let filter_err = |e| store_err("write", map_names::ADDR_FILTER, e);
        let write = self.filter().map_err(filter_err)?.remove_frontend(key);
        self.write_filter(write).map_err(filter_err)
    }
    fn set_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), StoreError> {
        let err = |e| store_err("write table", map_names::MAGLEV, e);
        let size = table.len() as u32;
        // A fresh table, filled while no packet can see it, then swapped in at once.
        let mut inner = Array::<MapData, u32>::create(size + 1, BPF_F_INNER_MAP).map_err(err)?;
        inner.set(0, size, 0).map_err(err)?;
        for (i, id) in table.iter().enumerate() {
            inner.set(i as u32 + 1, id, 0).map_err(err)?;
        }
        self.maglev.insert(service_id, &inner, 0).map_err(err)
    }
    fn remove_maglev(&mut self, service_id: u32) -> Result<(), StoreError> {
        ignore_missing(self.maglev.remove(&service_id))
            .map_err(|e| store_err("delete", map_names::MAGLEV, e))
    }
    fn add_source_range(&mut self, service_id: u32, range: &IpNet) -> Result<(), StoreError> {
        match range.addr {
            std::net::IpAddr::V4(a) => self
                .source_ranges
                .insert(&range_key(service_id, map_v4(a), range.prefix), 1, 0)
                .map_err(|e| store_err("insert", map_names::SOURCE_RANGES, e)),
            std::net::IpAddr::V6(a) => self
                .v6
                .source_ranges
                .insert(&range_key(service_id, map_v6(a), range.prefix), 1, 0)
                .map_err(|e| store_err("insert", map_names::SOURCE_RANGES6, e)),
        }
    }
    fn remove_source_range(&mut self, service_id: u32, range: &IpNet) -> Result<(), StoreError> {
        match range.addr {
            std::net::IpAddr::V4(a) => ignore_missing(self.source_ranges.remove(&range_key(
                service_id,
                map_v4(a),
                range.prefix,
            )))
            .map_err(|e| store_err("delete", map_names::SOURCE_RANGES, e)),
            std::net::IpAddr::V6(a) => ignore_missing(self.v6.source_ranges.remove(&range_key(
                service_id,
                map_v6(a),
                range.prefix,
            )))
            .map_err(|e| store_err("delete", map_names::SOURCE_RANGES6, e)),
        }
    }
    fn set_service_name(&mut self, service_id: u32, name: &str) {
        if let Err(e) = self
            .service_names
            .insert(service_id, ServiceName::new(name), 0)
        {
            log::debug!("recording the name of service id {service_id} ({name}): {e}");
        }
    }
    fn forget_counters(&mut self, service_id: Option<u32>, backend_id: Option<u32>) {
        // The counter arrays keep their slots: zero them, or the id's next owner would
        // inherit the counts.
        let zero = |map: &mut PerCpuArray<MapData, TrafficCounter>, id: u32| {
            let cpus = aya::util::nr_cpus().unwrap_or(1);
            if let Ok(values) = PerCpuValues::try_from(vec![TrafficCounter::default(); cpus]) {
                let _ = map.set(id, values, 0);
            }
        };
        if let Some(id) = service_id {
            zero(&mut self.service_stats, id);
            let _ = self.round_robin.remove(&id);
            let _ = self.service_names.remove(&id);
        }
        if let Some(id) = backend_id {
            zero(&mut self.backend_stats, id);
            let _ = self.connections.set(id, 0, 0);
        }
    }
}
