//! Which endpoints of a Service port serve which traffic, as kube-proxy's
//! `CategorizeEndpoints` decides it: first the facts of each endpoint
//! ([`endpoints_of_port`]), then one pure decision over them ([`categorize`]).
use std::net::Ipv4Addr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::protocol;
use crate::model::{Endpoint, Protocol};

/// What the translation needs to know of one endpoint of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub endpoint: Endpoint,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The node the endpoint runs on (`nodeName`).
    pub node: Option<String>,
    /// Zones it is hinted for (`hints.forZones`); empty: no hints.
    pub zone_hints: Vec<String>,
}

/// Every IPv4 endpoint of `slices` for the Service port named `port_name`, with the target
/// port the slices resolved (EndpointSlices name their ports after the Service's ports).
pub fn endpoints_of_port(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: Protocol,
) -> Vec<EndpointInfo> {
    let mut out = Vec::new();
    for slice in slices {
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
            let Some(Ok(ip)) = endpoint.addresses.first().map(|a| a.parse::<Ipv4Addr>()) else {
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            // API semantics: unset `ready` means ready; unset `serving` means as `ready`.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let zone_hints = endpoint
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default();
            out.push(EndpointInfo {
                endpoint: Endpoint { ip, port },
                ready,
                serving,
                terminating,
                node: endpoint.node_name.clone(),
                zone_hints,
            });
        }
    }
    out
}

/// The endpoints each kind of traffic may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categorized {
    /// For Cluster traffic policies: every usable endpoint (topology-filtered when asked).
    pub cluster: Vec<Endpoint>,
    /// For Local traffic policies: this node's usable endpoints.
    pub local: Vec<Endpoint>,
    /// This node's ready endpoints (what a healthCheckNodePort reports).
    pub local_ready: usize,
}

/// Ready endpoints; when none is ready, serving+terminating ones (kube-proxy's fallback, so
/// connections drain gracefully during rollouts), among all endpoints and among this node's.
/// With `zone` (the Service asked for topology-aware routing and the node has a zone), the
/// cluster set keeps the endpoints hinted for that zone, if every one carries hints and at
/// least one names it. `node`: this node's name; `None`: no endpoint is local.
pub fn categorize(
    endpoints: &[EndpointInfo],
    node: Option<&str>,
    zone: Option<&str>,
) -> Categorized {
    let is_local = |e: &EndpointInfo| node.is_some() && e.node.as_deref() == node;
    let mut cluster = usable(endpoints.iter());
    if let Some(zone) = zone {
        cluster = for_zone(endpoints, cluster, zone);
    }
    let local_ready = endpoints
        .iter()
        .filter(|e| is_local(e) && e.ready && !e.terminating)
        .count();
    Categorized {
        cluster,
        local: usable(endpoints.iter().filter(|e| is_local(e))),
        local_ready,
    }
}

/// Ready endpoints, or serving+terminating ones when none is ready; sorted, duplicates gone.
fn usable<'a>(endpoints: impl Iterator<Item = &'a EndpointInfo> + Clone) -> Vec<Endpoint> {
    let pick = |keep: fn(&EndpointInfo) -> bool| {
        endpoints
            .clone()
            .filter(|e| keep(e))
            .map(|e| e.endpoint)
            .collect::<Vec<_>>()
    };
    let mut chosen = pick(|e| e.ready && !e.terminating);
    if chosen.is_empty() {
        chosen = pick(|e| e.serving && e.terminating);
    }
    chosen.sort();
    chosen.dedup();
    chosen
}

/// kube-proxy's topology filter: the endpoints hinted for `zone`, if every endpoint carries
/// hints and at least one is for this zone; otherwise all of them (hints missing or stale).
fn for_zone(all: &[EndpointInfo], usable: Vec<Endpoint>, zone: &str) -> Vec<Endpoint> {
    let mut hinted = Vec::new();
    for endpoint in &usable {
        let zones = all
            .iter()
            .find(|e| e.endpoint.ip == endpoint.ip)
            .map(|e| e.zone_hints.as_slice())
            .unwrap_or_default();
        if zones.is_empty() {
            return usable;
        }
        if zones.iter().any(|z| z == zone) {
            hinted.push(*endpoint);
        }
    }
    if hinted.is_empty() { usable } else { hinted }
}
