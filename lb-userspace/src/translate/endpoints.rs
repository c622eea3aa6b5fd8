//! Which endpoints of a Service port serve which traffic, as kube-proxy's
//! `CategorizeEndpoints` (pkg/proxy/topology.go) decides it: first the facts of each
//! endpoint ([`endpoints_of_port`], as the endpoint-slice cache builds them), then one pure
//! decision over them ([`categorize`]).
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::protocol;
use crate::model::{Endpoint, Family, Protocol};

/// What the translation needs to know of one endpoint of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub endpoint: Endpoint,
    /// `conditions.ready` (unset: true). Counts even when terminating: the EndpointSlice
    /// controller sets it for terminating pods of `publishNotReadyAddresses` Services.
    pub ready: bool,
    /// `conditions.serving` (unset: true, as kube-proxy reads it).
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName`).
    pub local: bool,
    /// `hints.forZones` names; empty: no zone hints.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes` names; empty: no node hints.
    pub node_hints: Vec<String>,
}

/// Every endpoint of `family` in `slices` for the Service port named `port_name`, with the
/// target port the slices resolved (EndpointSlices name their ports after the Service's
/// ports). Only slices of the family's `addressType` count (the EndpointSlice controller
/// writes one per family, and kube-proxy's proxier of a family reads only its own). An
/// endpoint in several slices counts once: the first, unless a later copy is local.
pub fn endpoints_of_port(
    slices: &[&EndpointSlice],
    family: Family,
    port_name: &str,
    proto: Protocol,
    node: Option<&str>,
) -> Vec<EndpointInfo> {
    let mut out: Vec<EndpointInfo> = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == family.name()) {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name && protocol(&p.protocol) == Some(proto)
        }) else {
            continue;
        };
        let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // An endpoint's addresses are one pod: the first one is used (as kube-proxy does).
            let Some(Ok(ip)) = endpoint.addresses.first().map(|a| a.parse::<IpAddr>()) else {
                continue;
            };
            if Family::of(ip) != family {
                continue;
            }
            let conditions = endpoint.conditions.as_ref();
            let hints = endpoint.hints.as_ref();
            let info = EndpointInfo {
                endpoint: Endpoint { ip, port },
                ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                local: node.is_some() && endpoint.node_name.as_deref() == node,
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect())
                    .unwrap_or_default(),
            };
            match out.iter_mut().find(|e| e.endpoint == info.endpoint) {
                Some(existing) if info.local => *existing = info,
                Some(_) => {}
                None => out.push(info),
            }
        }
    }
    out
}

/// The topology a Service port's traffic from this node follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    /// Every usable endpoint.
    Any,
    /// Endpoints hinted for this node (`trafficDistribution: PreferSameNode`).
    SameNode,
    /// Endpoints hinted for this node's zone (topology-aware routing, `PreferSameZone`).
    SameZone,
}

/// kube-proxy's `topologyModeFromHints`: same-node when every ready endpoint has node hints
/// and one names this node; else same-zone when every ready endpoint has zone hints and one
/// names this node's zone; else none. Hints alone decide (no annotation is consulted).
pub fn topology_mode(
    endpoints: &[EndpointInfo],
    node: Option<&str>,
    zone: Option<&str>,
) -> TopologyMode {
    let ready: Vec<&EndpointInfo> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return TopologyMode::Any;
    }
    let names =
        |hints: &[String], name: Option<&str>| name.is_some_and(|n| hints.iter().any(|h| h == n));
    if ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| names(&e.node_hints, node))
    {
        return TopologyMode::SameNode;
    }
    if ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| names(&e.zone_hints, zone))
    {
        return TopologyMode::SameZone;
    }
    TopologyMode::Any
}

/// The endpoints each kind of traffic may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categorized {
    /// For Cluster traffic policies: ready endpoints the topology allows; without any,
    /// serving+terminating ones (topology ignored), so connections drain during rollouts.
    pub cluster: Vec<Endpoint>,
    /// For Local traffic policies: this node's ready endpoints, else its serving+terminating.
    pub local: Vec<Endpoint>,
    /// Whether the Service has a usable endpoint anywhere: a Local policy without local
    /// endpoints drops when it has, and rejects (like Cluster) when it has not.
    pub any: bool,
    /// This node's ready endpoints (what a healthCheckNodePort reports).
    pub local_ready: usize,
}

/// kube-proxy's `CategorizeEndpoints` for a port of a Service, on node `node` in `zone`.
pub fn categorize(
    endpoints: &[EndpointInfo],
    node: Option<&str>,
    zone: Option<&str>,
) -> Categorized {
    let mode = topology_mode(endpoints, node, zone);
    let for_topology = |e: &EndpointInfo| match mode {
        TopologyMode::Any => true,
        TopologyMode::SameNode => node.is_some_and(|n| e.node_hints.iter().any(|h| h == n)),
        TopologyMode::SameZone => zone.is_some_and(|z| e.zone_hints.iter().any(|h| h == z)),
    };
    let serving_terminating = |e: &EndpointInfo| e.serving && e.terminating;
    let mut cluster = pick(endpoints, |e| e.ready && for_topology(e));
    if cluster.is_empty() {
        cluster = pick(endpoints, serving_terminating);
    }
    let mut local = pick(endpoints, |e| e.local && e.ready);
    if local.is_empty() {
        local = pick(endpoints, |e| e.local && serving_terminating(e));
    }
    Categorized {
        any: endpoints.iter().any(|e| e.ready || serving_terminating(e)),
        local_ready: endpoints.iter().filter(|e| e.local && e.ready).count(),
        cluster,
        local,
    }
}

/// The endpoints `keep` accepts, sorted (a stable order for slots and Maglev input).
fn pick(endpoints: &[EndpointInfo], keep: impl Fn(&EndpointInfo) -> bool) -> Vec<Endpoint> {
    let mut chosen: Vec<Endpoint> = endpoints
        .iter()
        .filter(|e| keep(e))
        .map(|e| e.endpoint)
        .collect();
    chosen.sort();
    chosen
}
