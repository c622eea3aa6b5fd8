//! `xlb explain`: what the datapath would do with a packet, and why, from the live maps.
//! The decision itself (`decide`) is pure over a snapshot of the relevant map entries, so
//! it is table-tested; `snapshot` reads those entries from the pinned maps.
use std::{fmt::Write as _, net::IpAddr};

use aya::maps::{Array, HashMap, LpmTrie, MapData};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CT_FLAG_CLOSING, CT_FLAG_EXTERNAL, CT_FLAG_SNAT,
    CT_FORWARD, CtKey, CtTimeouts, CtValue, MapAddr, NodeConfig, ReplyClaim, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_SNAT, SVC_FLAG_SOURCE_RANGES,
    ServiceKey, ServiceValue, SourceRangeKey, client_hash, flow_hash, scheduler, scheduler_of,
};
use serde::Serialize;

use crate::{
    datapath::{id_arrays, maps::PinnedMaps},
    model::{HostPort, Protocol},
    report::inspect::ShowAddr,
    sync::keys::{map_v4, map_v6},
};

/// Where the packet comes from: decides the hook and the frontend scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A pod on this node (TC on its interface).
    Pod,
    /// Outside the node, through an external interface (XDP).
    Outside,
    /// A process on the node (socket hooks).
    Node,
}

#[derive(Debug, Clone, Copy)]
pub struct Query {
    pub src: IpAddr,
    pub sport: Option<u16>,
    /// Of the family of `src` (the CLI refuses a mix).
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: Protocol,
    pub origin: Origin,
}

/// The map entries a decision reads.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The forward conntrack entry of the exact 5-tuple, if a source port was given.
    pub tracked: Option<Tracked>,
    pub frontend: Option<SnapshotFrontend>,
    /// The frontend's Service port ("namespace/name:port"), as the agent recorded it.
    pub service: Option<String>,
    /// In slot order (slot i+1 is `backends[i]`).
    pub backends: Vec<SnapshotBackend>,
    pub source_allowed: bool,
    /// The client's affinity entry for this frontend's service.
    pub affinity: Option<AffinityPin>,
    pub round_robin_next: Option<u64>,
    /// The Maglev table of the frontend.
    pub maglev: Option<Vec<u32>>,
    /// The node's addresses of the query's family, and that family's SNAT address.
    pub node_ips: Vec<IpAddr>,
    pub snat_addr: Option<IpAddr>,
    /// The node's conntrack lifetimes.
    pub timeouts: CtTimeouts,
    pub now_ns: u64,
}

/// What a tracked flow's forward entry says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tracked {
    pub backend_id: u32,
    pub flags: u16,
    pub last_seen_ns: u64,
    /// The source the client was SNATed to, if it was.
    pub snat: Option<(IpAddr, u16)>,
}

impl<A: ShowAddr> From<&CtValue<A>> for Tracked {
    fn from(v: &CtValue<A>) -> Tracked {
        Tracked {
            backend_id: v.backend_id,
            flags: v.flags,
            last_seen_ns: v.last_seen_ns,
            snat: (v.flags & CT_FLAG_SNAT != 0)
                .then(|| (v.snat_addr.ip(), u16::from_be(v.snat_port))),
        }
    }
}

/// The frontend that matched (its slot 0): address (unspecified for a NodePort), port
/// (host order), scope, value.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotFrontend {
    pub vip: IpAddr,
    pub port: u16,
    pub scope: u8,
    pub value: ServiceValue,
}

#[derive(Debug, Clone, Copy)]
pub struct SnapshotBackend {
    pub id: u32,
    pub ip: IpAddr,
    pub port: u16,
    /// Flows open to it on this node (least-conn's count).
    pub open_flows: u64,
}

impl SnapshotBackend {
    fn endpoint(&self) -> String {
        HostPort(self.ip, self.port).to_string()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AffinityPin {
    pub backend_id: u32,
    /// Seconds since the pin was last used.
    pub idle_s: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Explanation {
    /// What happens, in one line.
    pub verdict: String,
    /// The Service port whose frontend matched ("namespace/name:port").
    pub service: Option<String>,
    /// Backends a new flow could go to ("addr:port").
    pub candidates: Vec<String>,
    /// The backend chosen, when the decision is certain.
    pub backend: Option<String>,
    /// Every step, in the order the datapath takes them.
    pub steps: Vec<String>,
}

/// An address as the schedulers' hashes take it (`MapAddr::hash_word` of the map form).
fn hash_word(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(ip) => map_v4(ip).hash_word(),
        IpAddr::V6(ip) => map_v6(ip).hash_word(),
    }
}

/// Node processes reach NodePorts on loopback too.
fn is_node_address(q: &Query, s: &Snapshot) -> bool {
    s.node_ips.contains(&q.dst) || (q.origin == Origin::Node && q.dst.is_loopback())
}

/// The decision, as the programs would take it: a tracked flow, else the frontend, its
/// gates (source ranges, endpoints), the backend pick, then the address translation.
pub fn decide(q: &Query, s: &Snapshot) -> Explanation {
    let mut steps = Vec::new();
    if let Some(done) = tracked_flow(q, s, &mut steps) {
        return done;
    }
    let Some(front) = s.frontend else {
        steps.push(no_frontend(q, s));
        return refused("not a service: passed untouched", steps);
    };
    steps.push(describe_frontend(q, &front, s.service.as_deref()));
    if let Some(verdict) = gate(q, s, &front.value, &mut steps) {
        return Explanation {
            service: s.service.clone(),
            ..refused(verdict, steps)
        };
    }
    let candidates: Vec<String> = s.backends.iter().map(SnapshotBackend::endpoint).collect();
    let chosen = pick(q, s, &front.value, &mut steps);
    if let Some(note) = translation(q, s, &front.value, chosen.as_deref()) {
        steps.push(note);
    }
    let verdict = match &chosen {
        Some(b) => format!("DNAT to {b}"),
        None => format!("DNAT to one of {} backend(s)", candidates.len()),
    };
    Explanation {
        verdict,
        service: s.service.clone(),
        candidates,
        backend: chosen,
        steps,
    }
}

fn refused(verdict: &str, steps: Vec<String>) -> Explanation {
    Explanation {
        verdict: verdict.into(),
        service: None,
        candidates: vec![],
        backend: None,
        steps,
    }
}

/// The live backend `id` of the snapshot, as "addr:port".
fn endpoint(s: &Snapshot, id: u32) -> Option<String> {
    s.backends
        .iter()
        .find(|b| b.id == id)
        .map(SnapshotBackend::endpoint)
}

/// A known, live flow goes to its backend; an expired one or one whose backend went is
/// balanced again (a step says which).
fn tracked_flow(q: &Query, s: &Snapshot, steps: &mut Vec<String>) -> Option<Explanation> {
    let Some(ct) = &s.tracked else {
        if q.sport.is_some() {
            steps.push("conntrack: no entry for this 5-tuple (a new flow)".into());
        }
        return None;
    };
    let idle = s.now_ns.saturating_sub(ct.last_seen_ns);
    let expired = idle > s.timeouts.lifetime_ns(q.proto.number(), ct.flags);
    let state = if ct.flags & CT_FLAG_CLOSING != 0 {
        "closing"
    } else {
        "open"
    };
    match (expired, endpoint(s, ct.backend_id)) {
        (false, Some(backend)) => {
            let snat = ct
                .snat
                .map(|(ip, port)| format!(", SNATed to {}", HostPort(ip, port)))
                .unwrap_or_default();
            steps.push(format!(
                "conntrack: known flow ({state}, idle {}s) to backend {backend}{snat}",
                idle / 1_000_000_000,
            ));
            Some(Explanation {
                verdict: format!("DNAT to {backend} (tracked flow)"),
                service: s.service.clone(),
                candidates: vec![backend.clone()],
                backend: Some(backend),
                steps: std::mem::take(steps),
            })
        }
        (true, _) => {
            steps.push("conntrack: entry expired; balanced as a new flow".into());
            None
        }
        (false, None) => {
            steps.push("conntrack: its backend was removed; balanced as a new flow".into());
            None
        }
    }
}

fn no_frontend(q: &Query, s: &Snapshot) -> String {
    let nodeport = is_node_address(q, s);
    format!(
        "no frontend {}/{} for {:?} traffic{}",
        HostPort(q.dst, q.dport),
        q.proto,
        q.origin,
        if nodeport {
            " (and no NodePort on this node address)"
        } else {
            ""
        }
    )
}

fn describe_frontend(q: &Query, front: &SnapshotFrontend, service: Option<&str>) -> String {
    let value = &front.value;
    let shown = match front.vip {
        IpAddr::V4(ip) if ip.is_unspecified() => format!("NodePort *:{}/{}", front.port, q.proto),
        IpAddr::V6(ip) if ip.is_unspecified() => {
            format!("NodePort [*]:{}/{}", front.port, q.proto)
        }
        vip => format!("{}/{}", HostPort(vip, front.port), q.proto),
    };
    let algorithm = scheduler::NAMES
        .get(scheduler_of(value.flags) as usize)
        .copied()
        .unwrap_or("unknown");
    let named = service
        .map(|s| format!(" of Service {s}"))
        .unwrap_or_default();
    format!(
        "frontend {shown}{named} ({} scope), service id {}, {} backend(s), scheduler {algorithm}",
        if front.scope == SCOPE_EXTERNAL {
            "external"
        } else {
            "internal"
        },
        value.service_id,
        value.count
    )
}

/// Source ranges and the no-endpoint cases: the verdict when the packet goes no further.
fn gate(
    q: &Query,
    s: &Snapshot,
    front: &ServiceValue,
    steps: &mut Vec<String>,
) -> Option<&'static str> {
    if front.flags & SVC_FLAG_SOURCE_RANGES != 0 && q.origin != Origin::Node {
        if !s.source_allowed {
            steps.push(format!("loadBalancerSourceRanges: {} is outside", q.src));
            return Some("dropped: client outside loadBalancerSourceRanges");
        }
        steps.push(format!("loadBalancerSourceRanges: {} is inside", q.src));
    }
    let local_only = front.flags & SVC_FLAG_DROP_EMPTY != 0;
    if front.count == 0 {
        return Some(if local_only {
            steps.push("Local traffic policy and no endpoint on this node".into());
            "dropped: no local endpoint"
        } else if q.origin == Origin::Node {
            steps.push("no usable endpoint".into());
            "connect() refused (ECONNREFUSED)"
        } else {
            steps.push("no usable endpoint".into());
            "rejected: ICMP port unreachable"
        });
    }
    if local_only {
        steps.push("Local traffic policy: candidates are this node's endpoints only".into());
    }
    None
}

/// Session affinity, then the service's algorithm; `None` when the pick is random or
/// depends on what the query does not say.
fn pick(q: &Query, s: &Snapshot, front: &ServiceValue, steps: &mut Vec<String>) -> Option<String> {
    if front.flags & SVC_FLAG_AFFINITY != 0
        && let Some(pin) = s.affinity
    {
        let pinned = endpoint(s, pin.backend_id);
        if pin.idle_s < u64::from(front.affinity_timeout_s) && pinned.is_some() {
            steps.push(format!(
                "session affinity: client pinned to {} (used {}s ago)",
                pinned.clone().unwrap_or_default(),
                pin.idle_s
            ));
            return pinned;
        }
        steps.push("session affinity: pin expired or its backend is gone".into());
    }
    let count = s.backends.len().max(1) as u64;
    let slot = |i: u64| s.backends.get(i as usize).map(SnapshotBackend::endpoint);
    match scheduler_of(front.flags) {
        scheduler::ROUND_ROBIN => {
            let turn = s.round_robin_next.unwrap_or(0) % count;
            steps.push(format!("round-robin: next turn is slot {}", turn + 1));
            slot(turn)
        }
        scheduler::SOURCE_HASH => {
            steps.push(format!("source-hash of {}", q.src));
            slot(u64::from(client_hash(hash_word(q.src))) % count)
        }
        scheduler::LEAST_CONN => {
            let counts: Vec<String> = s
                .backends
                .iter()
                .map(|b| format!("{}={}", b.endpoint(), b.open_flows))
                .collect();
            steps.push(format!("least-conn over open flows: {}", counts.join(", ")));
            s.backends
                .iter()
                .min_by_key(|b| b.open_flows)
                .map(SnapshotBackend::endpoint)
        }
        scheduler::MAGLEV => match (&s.maglev, q.sport) {
            (Some(table), Some(sport)) if !table.is_empty() => {
                let hash = flow_hash(
                    hash_word(q.src),
                    hash_word(q.dst),
                    sport.to_be(),
                    q.dport.to_be(),
                    q.proto.number(),
                );
                let entry = hash % table.len() as u32;
                steps.push(format!(
                    "maglev: entry {entry} of {} for this 5-tuple",
                    table.len()
                ));
                endpoint(s, table[entry as usize])
            }
            (Some(_), None) => {
                steps.push(
                    "maglev: the pick depends on the source port (give --src IP:PORT)".into(),
                );
                None
            }
            _ => {
                steps.push("maglev: no table yet; random fallback".into());
                None
            }
        },
        _ => {
            steps.push(format!("random: any of {count} with equal chance"));
            None
        }
    }
}

/// What happens to the source address (SNAT, hairpin, socket connect).
fn translation(
    q: &Query,
    s: &Snapshot,
    front: &ServiceValue,
    chosen: Option<&str>,
) -> Option<String> {
    match q.origin {
        Origin::Outside if front.flags & SVC_FLAG_SNAT != 0 => s
            .snat_addr
            .map(|a| format!("source SNATed to {a} (externalTrafficPolicy Cluster)")),
        Origin::Outside => Some("client address kept (externalTrafficPolicy Local)".into()),
        Origin::Pod
            if chosen.is_some_and(|c| {
                s.backends
                    .iter()
                    .any(|b| b.ip == q.src && b.endpoint() == c)
            }) =>
        {
            s.snat_addr
                .map(|a| format!("hairpin: the pod reaches itself, source SNATed to {a}"))
        }
        Origin::Node => Some("socket connected straight to the backend (no per-packet NAT)".into()),
        Origin::Pod => None,
    }
}

/// The maps of one family that a snapshot reads.
struct FamilyMaps<'a, A: MapAddr> {
    services: &'a HashMap<MapData, ServiceKey<A>, ServiceValue>,
    backends: &'a Array<MapData, Backend<A>>,
    conntrack: &'a HashMap<MapData, CtKey<A>, CtValue<A>>,
    /// Forward entries as claims (IPv4: `XLB_FLOW_CLAIMS`), looked at first, as the datapath
    /// does.
    claims: Option<&'a Array<MapData, ReplyClaim<A>>>,
    affinity: &'a HashMap<MapData, AffinityKey<A>, AffinityValue>,
    node_ips: &'a HashMap<MapData, A, u32>,
    config: &'a Array<MapData, NodeConfig<A>>,
    source_ranges: &'a LpmTrie<MapData, SourceRangeKey<A>, u8>,
}

/// Reads the entries `decide` needs from the pinned maps of the query's family.
pub fn snapshot(maps: &PinnedMaps, q: &Query) -> Snapshot {
    let s = Snapshot {
        now_ns: crate::datapath::clock::monotonic_ns(),
        timeouts: maps.ct_timeouts(),
        ..Default::default()
    };
    match (q.src, q.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let family = FamilyMaps {
                services: &maps.services,
                backends: &maps.backends,
                conntrack: &maps.conntrack,
                claims: Some(&maps.flow_claims),
                affinity: &maps.affinity,
                node_ips: &maps.node_ips,
                config: &maps.config,
                source_ranges: &maps.source_ranges,
            };
            snapshot_in(maps, &family, q, (map_v4(src), map_v4(dst)), s)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let v6 = &maps.v6;
            let family = FamilyMaps {
                services: &v6.services,
                backends: &v6.backends,
                conntrack: &v6.conntrack,
                claims: None,
                affinity: &v6.affinity,
                node_ips: &v6.node_ips,
                config: &v6.config,
                source_ranges: &v6.source_ranges,
            };
            snapshot_in(maps, &family, q, (map_v6(src), map_v6(dst)), s)
        }
        // A client of one family never reaches a frontend of the other (no NAT46/64).
        _ => s,
    }
}

fn snapshot_in<A: ShowAddr + aya::Pod>(
    maps: &PinnedMaps,
    family: &FamilyMaps<'_, A>,
    q: &Query,
    (src, dst): (A, A),
    mut s: Snapshot,
) -> Snapshot
where
    ServiceKey<A>: aya::Pod,
    Backend<A>: aya::Pod,
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
    AffinityKey<A>: aya::Pod,
    NodeConfig<A>: aya::Pod,
    SourceRangeKey<A>: aya::Pod,
{
    s.node_ips = family
        .node_ips
        .keys()
        .filter_map(Result::ok)
        .map(ShowAddr::ip)
        .collect();
    s.snat_addr = family
        .config
        .get(&0, 0)
        .ok()
        .filter(|c| c.snat_addr != A::default())
        .map(|c| c.snat_addr.ip());
    if let Some(sport) = q.sport {
        let key = CtKey {
            src,
            dst,
            sport: sport.to_be(),
            dport: q.dport.to_be(),
            proto: q.proto.number(),
            dir: CT_FORWARD,
            _pad: [0; 2],
        };
        let claim = family
            .claims
            .and_then(|claims| claims.get(&lb_common::reply_claim_slot(&key), 0).ok())
            .filter(|c| c.key == key)
            .map(|c| c.value);
        s.tracked = claim
            .or_else(|| family.conntrack.get(&key, 0).ok())
            // Another hook's flow is not followed by this one.
            .filter(|ct| (ct.flags & CT_FLAG_EXTERNAL != 0) == (q.origin == Origin::Outside))
            .map(|ct| Tracked::from(&ct));
    }
    let scope = if q.origin == Origin::Outside {
        SCOPE_EXTERNAL
    } else {
        SCOPE_INTERNAL
    };
    let exact = ServiceKey {
        vip: dst,
        port: q.dport.to_be(),
        slot: 0,
        proto: q.proto.number(),
        scope,
        _pad: [0; 2],
    };
    let node_address = is_node_address(q, &s);
    let found = family
        .services
        .get(&exact, 0)
        .ok()
        .map(|value| (exact, value))
        .or_else(|| {
            let any = ServiceKey {
                vip: A::default(),
                ..exact
            };
            node_address
                .then(|| family.services.get(&any, 0).ok().map(|value| (any, value)))
                .flatten()
        });
    let Some((key, front)) = found else {
        return s;
    };
    s.frontend = Some(SnapshotFrontend {
        vip: key.vip.ip(),
        port: q.dport,
        scope,
        value: front,
    });
    s.service = maps.service_name(front.service_id);
    for slot in 1..=front.count {
        let Ok(v) = family.services.get(&ServiceKey { slot, ..key }, 0) else {
            continue;
        };
        if let Some(b) = id_arrays::get(family.backends, v.backend_id) {
            let open = maps.connections.get(&v.backend_id, 0).unwrap_or(0);
            s.backends.push(SnapshotBackend {
                id: v.backend_id,
                ip: b.ip.ip(),
                port: u16::from_be(b.port),
                open_flows: open,
            });
        }
    }
    s.source_allowed = {
        let bits = 8 * std::mem::size_of::<A>() as u32;
        let range_key = aya::maps::lpm_trie::Key::new(
            32 + bits,
            SourceRangeKey {
                service_id_be: front.service_id.to_be(),
                addr: src,
            },
        );
        family.source_ranges.get(&range_key, 0).is_ok()
    };
    let affinity_key = AffinityKey {
        client: src,
        service_id: front.service_id,
    };
    s.affinity = family
        .affinity
        .get(&affinity_key, 0)
        .ok()
        .map(|a| AffinityPin {
            backend_id: a.backend_id,
            idle_s: s.now_ns.saturating_sub(a.last_used_ns) / 1_000_000_000,
        });
    s.round_robin_next = maps.round_robin.get(&front.service_id, 0).ok();
    s.maglev = maps.maglev_table(front.service_id);
    s
}

pub fn text(e: &Explanation) -> String {
    let mut out = match &e.service {
        Some(service) => format!("{} (Service {service})\n", e.verdict),
        None => format!("{}\n", e.verdict),
    };
    for (i, step) in e.steps.iter().enumerate() {
        let _ = writeln!(out, "  {}. {step}", i + 1);
    }
    if !e.candidates.is_empty() {
        let _ = writeln!(out, "  candidates: {}", e.candidates.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use lb_common::{SVC_FLAG_AFFINITY, with_scheduler};

    use super::*;

    fn query(origin: Origin) -> Query {
        Query {
            src: Ipv4Addr::new(10, 244, 0, 2).into(),
            sport: Some(40000),
            dst: Ipv4Addr::new(10, 96, 0, 10).into(),
            dport: 80,
            proto: Protocol::Tcp,
            origin,
        }
    }

    fn snap(flags: u16, count: u16) -> Snapshot {
        Snapshot {
            frontend: Some(SnapshotFrontend {
                vip: Ipv4Addr::new(10, 96, 0, 10).into(),
                port: 80,
                scope: SCOPE_INTERNAL,
                value: ServiceValue {
                    service_id: 7,
                    count,
                    flags,
                    affinity_timeout_s: 60,
                    ..Default::default()
                },
            }),
            backends: (0..count)
                .map(|i| SnapshotBackend {
                    id: i as u32 + 1,
                    ip: Ipv4Addr::new(10, 244, 1, i as u8 + 1).into(),
                    port: 8080,
                    open_flows: i as u64,
                })
                .collect(),
            snat_addr: Some(Ipv4Addr::new(192, 168, 50, 1).into()),
            ..Default::default()
        }
    }

    #[test]
    fn decisions_follow_the_datapath_rules() {
        let q = query(Origin::Pod);
        // Tracked flow wins.
        let mut s = snap(0, 2);
        s.tracked = Some(Tracked {
            backend_id: 2,
            last_seen_ns: 0,
            ..Default::default()
        });
        assert_eq!(decide(&q, &s).backend.as_deref(), Some("10.244.1.2:8080"));
        // Round-robin names the next slot; least-conn the least loaded.
        let mut s = snap(with_scheduler(0, scheduler::ROUND_ROBIN), 3);
        s.round_robin_next = Some(4);
        assert_eq!(decide(&q, &s).backend.as_deref(), Some("10.244.1.2:8080"));
        let s = snap(with_scheduler(0, scheduler::LEAST_CONN), 3);
        assert_eq!(decide(&q, &s).backend.as_deref(), Some("10.244.1.1:8080"));
        // Source-hash: the same rule as the datapath.
        let s = snap(with_scheduler(0, scheduler::SOURCE_HASH), 3);
        let want = client_hash(hash_word(q.src)) % 3 + 1;
        assert_eq!(
            decide(&q, &s).backend,
            Some(format!("10.244.1.{want}:8080"))
        );
        // Affinity pins; random only lists candidates.
        let mut s = snap(SVC_FLAG_AFFINITY, 3);
        s.affinity = Some(AffinityPin {
            backend_id: 3,
            idle_s: 5,
        });
        assert_eq!(decide(&q, &s).backend.as_deref(), Some("10.244.1.3:8080"));
        let e = decide(&q, &snap(0, 3));
        assert_eq!((e.backend, e.candidates.len()), (None, 3));
        // The Service is named, in the answer and in its frontend step.
        let mut s = snap(0, 3);
        s.service = Some("shop/web:http".into());
        let e = decide(&q, &s);
        assert_eq!(e.service.as_deref(), Some("shop/web:http"));
        assert!(text(&e).starts_with("DNAT to one of 3 backend(s) (Service shop/web:http)"));
        assert!(
            e.steps
                .iter()
                .any(|s| s.contains("of Service shop/web:http")),
            "{e:?}"
        );
    }

    #[test]
    fn refusals_drops_and_passes_are_explained() {
        assert!(
            decide(&query(Origin::Pod), &snap(0, 0))
                .verdict
                .contains("ICMP")
        );
        assert!(
            decide(&query(Origin::Node), &snap(0, 0))
                .verdict
                .contains("ECONNREFUSED")
        );
        let local = snap(SVC_FLAG_DROP_EMPTY, 0);
        assert!(
            decide(&query(Origin::Outside), &local)
                .verdict
                .contains("no local endpoint")
        );
        let ranged = snap(SVC_FLAG_SOURCE_RANGES | SVC_FLAG_SNAT, 2);
        let e = decide(&query(Origin::Outside), &ranged);
        assert!(e.verdict.contains("loadBalancerSourceRanges"), "{e:?}");
        let e = decide(&query(Origin::Pod), &Snapshot::default());
        assert!(e.verdict.contains("not a service"));
        let mut allowed = ranged;
        allowed.source_allowed = true;
        let e = decide(&query(Origin::Outside), &allowed);
        assert!(
            e.steps.iter().any(|s| s.contains("SNATed to 192.168.50.1")),
            "{e:?}"
        );
    }

    #[test]
    fn ipv6_queries_are_explained_with_bracketed_addresses_and_ipv6_hashes() {
        let vip: IpAddr = "fd00:10:96::10".parse().expect("ip");
        let client: IpAddr = "fd00:10:244::2".parse().expect("ip");
        let q = Query {
            src: client,
            dst: vip,
            ..query(Origin::Pod)
        };
        let mut s = snap(with_scheduler(0, scheduler::SOURCE_HASH), 3);
        s.frontend = s.frontend.map(|f| SnapshotFrontend { vip, ..f });
        for (i, b) in s.backends.iter_mut().enumerate() {
            b.ip = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, i as u16 + 1));
        }
        let e = decide(&q, &s);
        // The datapath's IPv6 hash: the folded address (lb_common::fold_ip6).
        let want = client_hash(map_v6("fd00:10:244::2".parse().expect("ip")).hash_word()) % 3 + 1;
        assert_eq!(e.backend, Some(format!("[fd00:10:244:1::{want}]:8080")));
        assert!(
            e.steps
                .iter()
                .any(|s| s.contains("[fd00:10:96::10]:80/TCP")),
            "{e:?}"
        );
        let none = decide(&q, &Snapshot::default());
        assert!(
            none.steps
                .iter()
                .any(|s| s.contains("no frontend [fd00:10:96::10]:80/TCP")),
            "{none:?}"
        );
    }
}
