//! The read commands (`xlb services`, `xlb conntrack`, `xlb stats`): reports built from the
//! pinned maps alone, so they work with or without a running agent.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use lb_common::{
    CT_FORWARD, CtKey, CtValue, MapAddr, SVC_FLAG_AFFINITY, map_names, map_sizes, outcome,
    outcome_name, scheduler_of,
};
use serde::Serialize;

use crate::{
    datapath::{
        clock::monotonic_ns,
        gc::forward_entries,
        id_arrays,
        maps::{Collected, PinnedMaps, forward_claims, sum_counter},
    },
    model::{Frontend, HostPort, Protocol, Scheduler},
    sync::{
        frontend_of,
        keys::{from_map_v4, from_map_v6},
    },
};

/// A map address as an `IpAddr`, for either family's maps.
pub trait ShowAddr: MapAddr {
    fn ip(self) -> IpAddr;
}

impl ShowAddr for u32 {
    fn ip(self) -> IpAddr {
        from_map_v4(self).into()
    }
}

impl ShowAddr for lb_common::Ip6 {
    fn ip(self) -> IpAddr {
        from_map_v6(self).into()
    }
}

/// `addr:port` (IPv6 in brackets) from map values (network byte order).
fn host_port<A: ShowAddr>(addr: A, port: u16) -> String {
    HostPort(addr.ip(), u16::from_be(port)).to_string()
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    /// New flows balanced to this backend since it was added.
    pub flows: u64,
    /// Flows open on this node now (what least-conn compares).
    pub open_flows: u64,
    /// Maglev table entries naming this backend (Maglev frontends only).
    pub maglev_entries: Option<usize>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceRow {
    pub frontend: Frontend,
    /// The Service port ("namespace/name:port"), as the agent recorded it.
    pub service: Option<String>,
    pub service_id: u32,
    /// The algorithm name; `unknown(N)` for a code this xlb does not know.
    pub scheduler: String,
    pub affinity_timeout_s: Option<u32>,
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendRow>,
}

/// Frontends with their backends and counters, like `ipvsadm -Ln --stats`.
pub fn services(maps: &PinnedMaps) -> Vec<ServiceRow> {
    let mut slots: BTreeMap<Frontend, BTreeMap<u16, lb_common::ServiceValue>> = BTreeMap::new();
    for (key, value) in maps.service_slots() {
        if let Some(frontend) = frontend_of(&key) {
            slots.entry(frontend).or_default().insert(key.slot(), value);
        }
    }
    let mut rows = Vec::new();
    for (frontend, slots) in slots {
        let Some(front) = slots.get(&0) else { continue };
        let counter = |map: &aya::maps::PerCpuArray<_, _>, id: u32| {
            map.get(&id, 0).map(|v| sum_counter(&v)).unwrap_or_default()
        };
        let svc = counter(&maps.service_stats, front.service_id);
        let code = scheduler_of(front.flags);
        let scheduler = Scheduler::from_code(code)
            .map(|s| s.name().to_string())
            .unwrap_or_else(|| format!("unknown({code})"));
        let table = (Scheduler::from_code(code) == Some(Scheduler::Maglev))
            .then(|| maps.maglev_table(front.service_id).unwrap_or_default());
        let backends = (1..=front.count)
            .filter_map(|slot| slots.get(&slot))
            .map(|s| {
                let address = maps
                    .backend(s.backend_id)
                    .map(|b| b.endpoint().to_string())
                    .unwrap_or_else(|| "(missing)".into());
                let c = counter(&maps.backend_stats, s.backend_id);
                BackendRow {
                    id: s.backend_id,
                    address,
                    flows: c.flows,
                    open_flows: maps.connections.get(&s.backend_id, 0).unwrap_or(0),
                    maglev_entries: table
                        .as_ref()
                        .map(|t| t.iter().filter(|id| **id == s.backend_id).count()),
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        rows.push(ServiceRow {
            frontend,
            service: maps.service_name(front.service_id),
            service_id: front.service_id,
            scheduler,
            affinity_timeout_s: (front.flags & SVC_FLAG_AFFINITY != 0)
                .then_some(front.affinity_timeout_s),
            flows: svc.flows,
            packets: svc.packets,
            bytes: svc.bytes,
            backends,
        });
    }
    rows
}

pub fn services_text(rows: &[ServiceRow]) -> String {
    let mut out = String::from(
        "FRONTEND                    SERVICE                        SVC-ID SCHEDULER      FLOWS  \
         PACKETS      BYTES  BACKENDS\n",
    );
    for row in rows {
        let affinity = row
            .affinity_timeout_s
            .map(|t| format!(" affinity=ClientIP/{t}s"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<27} {:<30} {:>6} {:<11} {:>8} {:>8} {:>10}  {}{}",
            row.frontend.to_string(),
            row.service.as_deref().unwrap_or("-"),
            row.service_id,
            row.scheduler,
            row.flows,
            row.packets,
            row.bytes,
            row.backends.len(),
            affinity
        );
        if row.backends.is_empty() {
            let _ = writeln!(
                out,
                "  -> (no usable endpoints: clients get ICMP port unreachable)"
            );
        }
        for b in &row.backends {
            let maglev = b
                .maglev_entries
                .map(|n| format!(" maglev={n}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  -> {:<22} id={:<6} flows={:<8} open={:<6} {:>8} pkts {:>10} bytes{maglev}",
                b.address, b.id, b.flows, b.open_flows, b.packets, b.bytes
            );
        }
    }
    out
}

#[derive(Debug, Serialize)]
pub struct FlowRow {
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    pub backend_id: u32,
    pub service_id: u32,
    /// The node address and port the client was SNATed to, if it was.
    pub snat: Option<String>,
    /// The flow entered from outside the node (XDP).
    pub external: bool,
    pub age_s: u64,
    pub idle_s: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// NATed flows (forward entries: claims and conntrack's) of both families, like
/// `conntrack -L`.
pub fn conntrack(maps: &PinnedMaps) -> Vec<FlowRow> {
    let now = monotonic_ns();
    let v4 = forward_entries(
        forward_claims(&maps.flow_claims),
        maps.conntrack.iter().filter_map(Result::ok).collect(),
    );
    let v6: Vec<_> = maps.v6.conntrack.iter().filter_map(Result::ok).collect();
    let mut rows: Vec<FlowRow> = v4
        .iter()
        .filter(|(k, _)| k.dir == CT_FORWARD)
        .map(|(k, v)| flow_row(k, v, now))
        .chain(
            v6.iter()
                .filter(|(k, _)| k.dir == CT_FORWARD)
                .map(|(k, v)| flow_row(k, v, now)),
        )
        .collect();
    rows.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    rows
}

fn flow_row<A: ShowAddr>(k: &CtKey<A>, v: &CtValue<A>, now: u64) -> FlowRow {
    FlowRow {
        protocol: Protocol::from_number(k.proto)
            .map(|p| p.to_string())
            .unwrap_or_else(|| k.proto.to_string()),
        client: host_port(k.src, k.sport),
        frontend: host_port(k.dst, k.dport),
        backend: host_port(v.nat_addr, v.nat_port),
        backend_id: v.backend_id,
        service_id: v.service_id,
        snat: (v.flags & lb_common::CT_FLAG_SNAT != 0).then(|| host_port(v.snat_addr, v.snat_port)),
        external: v.flags & lb_common::CT_FLAG_EXTERNAL != 0,
        age_s: now.saturating_sub(v.created_ns) / 1_000_000_000,
        idle_s: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        packets: v.packets,
        bytes: v.bytes,
    }
}

pub fn conntrack_text(rows: &[FlowRow]) -> String {
    let mut out = String::new();
    for r in rows {
        let snat = r
            .snat
            .as_ref()
            .map(|s| format!(" snat={s}"))
            .unwrap_or_default();
        let origin = if r.external { " [external]" } else { "" };
        let _ = writeln!(
            out,
            "{} src={} dst={} backend={}{snat} age={}s idle={}s packets={} bytes={}{origin}",
            r.protocol, r.client, r.frontend, r.backend, r.age_s, r.idle_s, r.packets, r.bytes
        );
    }
    let _ = writeln!(out, "{} flow(s)", rows.len());
    out
}

#[derive(Debug, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Debug, Default, Serialize)]
pub struct StatsReport {
    /// Packets per outcome, both families together.
    pub outcomes: BTreeMap<&'static str, u64>,
    /// The same per family ("IPv4", "IPv6").
    pub outcomes_by_family: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    pub maps: Vec<MapFill>,
}

/// Outcome counters and map fill levels.
pub fn stats(maps: &PinnedMaps) -> StatsReport {
    stats_with(maps, None)
}

/// [`stats`], with the conntrack and affinity entry counts given (`walked`, from the GC's
/// walk) instead of walked again.
pub fn stats_with(maps: &PinnedMaps, walked: Option<Collected>) -> StatsReport {
    let mut outcomes = BTreeMap::new();
    let mut outcomes_by_family = BTreeMap::new();
    for (family, counters) in [("IPv4", &maps.stats), ("IPv6", &maps.v6.stats)] {
        let mut of_family = BTreeMap::new();
        for code in 0..outcome::COUNT {
            let n: u64 = counters.get(&code, 0).map(|v| v.iter().sum()).unwrap_or(0);
            of_family.insert(outcome_name(code), n);
            *outcomes.entry(outcome_name(code)).or_insert(0) += n;
        }
        outcomes_by_family.insert(family, of_family);
    }
    let fill = |name, entries, capacity| MapFill {
        name,
        entries,
        capacity,
    };
    let maps = vec![
        fill(
            map_names::SERVICES,
            maps.services.keys().count(),
            map_sizes::SERVICES,
        ),
        fill(
            map_names::BACKENDS,
            slots_used(map_names::BACKENDS, id_arrays::scan(&maps.backends)),
            map_sizes::BACKENDS,
        ),
        fill(
            map_names::CONNTRACK,
            walked.map_or_else(|| maps.conntrack.keys().count(), |w| w.conntrack),
            map_sizes::CONNTRACK,
        ),
        fill(
            map_names::AFFINITY,
            walked.map_or_else(|| maps.affinity.keys().count(), |w| w.affinity),
            map_sizes::AFFINITY,
        ),
        fill(
            map_names::SERVICES6,
            maps.v6.services.keys().count(),
            map_sizes::SERVICES,
        ),
        fill(
            map_names::BACKENDS6,
            slots_used(map_names::BACKENDS6, id_arrays::scan(&maps.v6.backends)),
            map_sizes::BACKENDS,
        ),
        fill(
            map_names::CONNTRACK6,
            walked.map_or_else(|| maps.v6.conntrack.keys().count(), |w| w.conntrack6),
            map_sizes::CONNTRACK,
        ),
        fill(
            map_names::AFFINITY6,
            walked.map_or_else(|| maps.v6.affinity.keys().count(), |w| w.affinity6),
            map_sizes::AFFINITY,
        ),
        // Held or once held: an expired claim stays until a new flow takes its slot.
        fill(
            map_names::REPLY_CLAIMS,
            slots_used(
                map_names::REPLY_CLAIMS,
                id_arrays::reply_claims(&maps.reply_claims),
            ),
            map_sizes::REPLY_CLAIMS,
        ),
        fill(
            map_names::REPLY_CLAIMS6,
            slots_used(
                map_names::REPLY_CLAIMS6,
                id_arrays::reply_claims(&maps.v6.reply_claims),
            ),
            map_sizes::REPLY_CLAIMS,
        ),
        fill(
            map_names::FLOW_CLAIMS,
            slots_used(
                map_names::FLOW_CLAIMS,
                id_arrays::reply_claims(&maps.flow_claims),
            ),
            map_sizes::FLOW_CLAIMS,
        ),
        fill(
            map_names::ROUND_ROBIN,
            maps.round_robin.keys().count(),
            map_sizes::ROUND_ROBIN,
        ),
        fill(
            map_names::CONNECTIONS,
            slots_used(
                map_names::CONNECTIONS,
                id_arrays::open_flows(&maps.connections),
            ),
            map_sizes::CONNECTIONS,
        ),
        fill(
            map_names::MAGLEV,
            maps.maglev.keys().count(),
            map_sizes::MAGLEV,
        ),
    ];
    StatsReport {
        outcomes,
        outcomes_by_family,
        maps,
    }
}

pub fn stats_text(report: &StatsReport) -> String {
    let mut out = String::from("OUTCOME                    PACKETS      IPV4      IPV6\n");
    let of = |family: &str, name: &str| {
        report
            .outcomes_by_family
            .get(family)
            .and_then(|f| f.get(name))
            .copied()
            .unwrap_or(0)
    };
    for (name, count) in &report.outcomes {
        let _ = writeln!(
            out,
            "{name:<24} {count:>9} {:>9} {:>9}",
            of("IPv4", name),
            of("IPv6", name)
        );
    }
    out.push_str("\nMAP                  ENTRIES   CAPACITY  FILL\n");
    for m in &report.maps {
        let _ = writeln!(
            out,
            "{:<18} {:>9} {:>10} {:>5.1}%",
            m.name,
            m.entries,
            m.capacity,
            m.entries as f64 * 100.0 / f64::from(m.capacity)
        );
    }
    out
}

/// Slots in use of an array indexed by backend id (`id_arrays`; none if it cannot be read:
/// said on stderr).
fn slots_used<T>(name: &str, table: std::io::Result<Vec<T>>) -> usize {
    table.map_or_else(
        |e| {
            eprintln!("warning: reading {name}: {e}");
            0
        },
        |used| used.len(),
    )
}
