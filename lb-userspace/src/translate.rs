//! Kubernetes Services and EndpointSlices → desired frontends, following kube-proxy's rules.
//! Pure: no I/O, no BPF; every rule is table-tested below.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::model::{
    DesiredState, Endpoint, Frontend, FrontendSpec, HealthCheck, Ipv4Net, Protocol, Scheduler,
    Scope,
};

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Services with this label belong to another proxy (kube-proxy skips them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// EndpointSlices name their Service with this label.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Per-service load-balancing algorithm (overrides `xlb agent --scheduler`).
pub const SCHEDULER_ANNOTATION: &str = "xlb.io/scheduler";

/// Node-wide settings the translation depends on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// Algorithm of services without a (valid) `xlb.io/scheduler` annotation.
    pub default_scheduler: Scheduler,
    /// This node's name, matched against endpoints' `nodeName` for Local traffic policies.
    /// `None`: no endpoint is local.
    pub node_name: Option<String>,
    /// This node's `topology.kubernetes.io/zone`, for topology-aware routing hints.
    pub zone: Option<String>,
}

/// Services opt into topology-aware routing with this annotation (value `Auto`) ...
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// ... or its older name.
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";

/// All objects from a source.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Shared, not copied: the kube source's reflector stores hand out `Arc`s, and the
    /// manifests source keeps every file's objects while a snapshot of all of them is in use.
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    pub desired: DesiredState,
    /// healthCheckNodePort → what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Objects or fields skipped for a reason an operator should know about.
    pub warnings: Vec<String>,
}

fn namespace(ns: &Option<String>) -> &str {
    ns.as_deref().unwrap_or("default")
}

fn protocol(p: &Option<String>) -> Option<Protocol> {
    match p.as_deref().unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// Translates every Service port into frontends with their usable endpoints.
pub fn translate(objects: &Objects, options: &Options) -> Translation {
    let mut translator = Translator::default();
    translator.translate(objects, options);
    translator.merged
}

/// A Service by (namespace, name): the order in which Services win a frontend they share.
/// Shared: one allocation however many maps name the Service.
type ServiceName = Arc<(String, String)>;

/// Translation that remembers each Service's result, keyed by the identity of the objects
/// it came from: the sources hand out the same `Arc` for an object that did not change, so
/// when one Service among 10 000 changes, it alone is translated again and only its
/// frontends are merged anew.
#[derive(Default)]
pub struct Translator {
    options: Option<Options>,
    /// Each Service's own translation, by the address of its object (kept alive here, so
    /// the address names this object only).
    cache: ByAddress<Cached>,
    /// The object each Service name was translated from, in Service order.
    names: BTreeMap<ServiceName, usize>,
    /// The Services claiming each frontend; the first one has it.
    claims: HashMap<Frontend, Claims>,
    /// Every EndpointSlice by the address of its object (kept alive here), with the Service
    /// it belongs to (`None`: no service label, or not IPv4).
    slices: ByAddress<(Arc<EndpointSlice>, Option<ServiceName>)>,
    /// The slices of each Service name.
    slices_of: HashMap<ServiceName, Vec<usize>>,
    /// Everything merged.
    merged: Translation,
    /// Frontends whose spec may differ from the last call's (see [`Translator::take_changed`]).
    changed: Vec<Frontend>,
}

/// Hashes object addresses (aligned, unique while the object lives, not chosen by
/// users): a multiply is enough, and cheaper than the default SipHash on every lookup.
#[derive(Default)]
struct AddressHasher(u64);

impl std::hash::Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = ((n as u64) >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0.rotate_left(32)
    }
}

type ByAddress<V> = HashMap<usize, V, std::hash::BuildHasherDefault<AddressHasher>>;
type AddressSet = HashSet<usize, std::hash::BuildHasherDefault<AddressHasher>>;

struct Cached {
    name: ServiceName,
    /// Held, not only compared: a freed object's address could be reused by a new one.
    _service: Arc<Service>,
    result: Fragment,
}

/// One Service's translation, kept small: a Service has a few frontends, and a map per
/// Service would cost a whole tree node each.
struct Fragment {
    desired: Vec<(Frontend, FrontendSpec)>,
    health_checks: Vec<(u16, HealthCheck)>,
    warnings: Vec<String>,
}

impl Fragment {
    fn new(t: Translation) -> Fragment {
        Fragment {
            desired: t.desired.into_iter().collect(),
            health_checks: t.health_checks.into_iter().collect(),
            warnings: t.warnings,
        }
    }

    fn frontends(&self) -> impl Iterator<Item = &Frontend> {
        self.desired.iter().map(|(f, _)| f)
    }

    fn spec(&self, frontend: &Frontend) -> Option<&FrontendSpec> {
        self.desired
            .iter()
            .find(|(f, _)| f == frontend)
            .map(|(_, s)| s)
    }
}

/// The Services claiming one frontend, in Service order (usually just one).
#[derive(Default)]
struct Claims(Vec<ServiceName>);

impl Claims {
    fn insert(&mut self, name: ServiceName) {
        if let Err(at) = self.0.binary_search(&name) {
            self.0.insert(at, name);
        }
    }

    fn remove(&mut self, name: &ServiceName) {
        self.0.retain(|n| n != name);
    }

    fn first(&self) -> Option<&ServiceName> {
        self.0.first()
    }
}

fn address<T>(object: &Arc<T>) -> usize {
    Arc::as_ptr(object) as usize
}

impl Translator {
    pub fn translate(&mut self, objects: &Objects, options: &Options) -> &Translation {
        if self.options.as_ref() != Some(options) {
            // Start over; every frontend known so far may change or go.
            let mut changed = std::mem::take(&mut self.changed);
            changed.extend(self.merged.desired.keys().copied());
            *self = Translator {
                options: Some(options.clone()),
                changed,
                ..Translator::default()
            };
        }
        // Slices new or gone since the last call make their Services due again.
        let mut dirty: HashSet<ServiceName> = HashSet::new();
        let mut seen_slices = AddressSet::default();
        seen_slices.reserve(objects.slices.len());
        for slice in &objects.slices {
            let object = address(slice);
            seen_slices.insert(object);
            if self.slices.contains_key(&object) {
                continue;
            }
            let owner = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .filter(|_| slice.address_type == "IPv4")
                .map(|service| {
                    Arc::new((
                        namespace(&slice.metadata.namespace).to_string(),
                        service.clone(),
                    ))
                });
            if let Some(owner) = &owner {
                self.slices_of
                    .entry(owner.clone())
                    .or_default()
                    .push(object);
                dirty.insert(owner.clone());
            }
            self.slices.insert(object, (Arc::clone(slice), owner));
        }
        if self.slices.len() > seen_slices.len() {
            let gone: Vec<usize> = self
                .slices
                .keys()
                .filter(|a| !seen_slices.contains(a))
                .copied()
                .collect();
            for object in gone {
                if let Some((_, Some(owner))) = self.slices.remove(&object) {
                    if let Some(list) = self.slices_of.get_mut(&owner) {
                        list.retain(|a| *a != object);
                        if list.is_empty() {
                            self.slices_of.remove(&owner);
                        }
                    }
                    dirty.insert(owner);
                }
            }
        }
        let mut seen = AddressSet::default();
        seen.reserve(objects.services.len());
        let mut duplicates = Vec::new();
        // Frontends whose owner may have changed.
        let mut affected: BTreeSet<Frontend> = BTreeSet::new();
        for service in &objects.services {
            let object = address(service);
            if let Some(cached) = self.cache.get(&object)
                && (dirty.is_empty() || !dirty.contains(&cached.name))
            {
                seen.insert(object);
                continue;
            }
            let ns = namespace(&service.metadata.namespace);
            let name = service.metadata.name.as_deref().unwrap_or("");
            let key: ServiceName = Arc::new((ns.to_string(), name.to_string()));
            if let Some(&previous) = self.names.get(&key)
                && previous != object
                && seen.contains(&previous)
            {
                duplicates.push(format!(
                    "service {ns}/{name} is defined twice; the second definition is ignored"
                ));
                continue;
            }
            seen.insert(object);
            let mut result = Translation::default();
            let own: Vec<&EndpointSlice> = self
                .slices_of
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|a| self.slices.get(a).map(|(slice, _)| &**slice))
                .collect();
            translate_service(service, &own, options, &mut result);
            if let Some(previous) = self.names.insert(key.clone(), object)
                && let Some(old) = self.cache.remove(&previous)
            {
                self.release(&old, &mut affected);
            }
            let result = Fragment::new(result);
            for frontend in result.frontends() {
                self.claims
                    .entry(*frontend)
                    .or_default()
                    .insert(key.clone());
                affected.insert(*frontend);
            }
            let cached = Cached {
                name: key,
                _service: Arc::clone(service),
                result,
            };
            self.cache.insert(object, cached);
        }
        // Services that are gone.
        let gone: Vec<usize> = self
            .cache
            .keys()
            .filter(|a| !seen.contains(a))
            .copied()
            .collect();
        for object in gone {
            if let Some(old) = self.cache.remove(&object) {
                self.names.remove(&old.name);
                self.release(&old, &mut affected);
            }
        }
        self.changed.extend(affected.iter().copied());
        for frontend in affected {
            let owner = self.claims.get(&frontend).and_then(|c| c.first());
            let spec = owner
                .and_then(|name| self.names.get(name))
                .and_then(|object| self.cache.get(object))
                .and_then(|c| c.result.spec(&frontend));
            match spec {
                Some(spec) => {
                    self.merged.desired.insert(frontend, spec.clone());
                }
                None => {
                    self.merged.desired.remove(&frontend);
                }
            }
        }
        // Health checks and warnings are few: gathered anew, in Service order.
        self.merged.health_checks.clear();
        self.merged.warnings = duplicates;
        for object in self.names.values() {
            let Some(cached) = self.cache.get(object) else {
                continue;
            };
            for (port, check) in &cached.result.health_checks {
                self.merged.health_checks.insert(*port, check.clone());
            }
            self.merged
                .warnings
                .extend(cached.result.warnings.iter().cloned());
        }
        let mut conflicts: Vec<String> = Vec::new();
        for (frontend, claims) in self.claims.iter().filter(|(_, c)| c.0.len() > 1) {
            let Some(owner) = self.merged.desired.get(frontend) else {
                continue;
            };
            for claimant in claims.0.iter().skip(1) {
                let (ns, name) = &**claimant;
                conflicts.push(format!(
                    "service {ns}/{name}: {frontend} already used by {}, skipped",
                    owner.service
                ));
            }
        }
        conflicts.sort();
        self.merged.warnings.extend(conflicts);
        &self.merged
    }

    /// The last result.
    pub fn current(&self) -> &Translation {
        &self.merged
    }

    /// Frontends that may have changed since the last call (added, removed or changed),
    /// for a sync of just those. After options changed, every frontend is in it.
    pub fn take_changed(&mut self) -> Vec<Frontend> {
        let mut changed = std::mem::take(&mut self.changed);
        changed.sort_unstable();
        changed.dedup();
        changed
    }

    /// Drops the claims of an earlier translation `old` on its frontends.
    fn release(&mut self, old: &Cached, affected: &mut BTreeSet<Frontend>) {
        for frontend in old.result.frontends() {
            if let Some(claims) = self.claims.get_mut(frontend) {
                claims.remove(&old.name);
                if claims.0.is_empty() {
                    self.claims.remove(frontend);
                }
            }
            affected.insert(*frontend);
        }
    }
}

/// One Service's frontends, translated as if it were alone (`merge` settles conflicts).
fn translate_service(
    service: &Service,
    service_slices: &[&EndpointSlice],
    options: &Options,
    out: &mut Translation,
) {
    let ns = namespace(&service.metadata.namespace);
    let name = service.metadata.name.as_deref().unwrap_or("");
    let Some(spec) = &service.spec else { return };
    if service
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        return;
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let cluster_ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
        (_, Some(ip)) => vec![ip],
        _ => vec![],
    };
    if cluster_ips.iter().any(|ip| ip.as_str() == "None") || cluster_ips.is_empty() {
        return; // headless, or not allocated yet
    }
    let mut vips: Vec<Ipv4Addr> = Vec::new();
    let mut cluster_vips: Vec<Ipv4Addr> = Vec::new();
    let mut lb_ips_v4: Vec<Ipv4Addr> = Vec::new();
    let lb_ips = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| ing.iter().filter_map(|i| i.ip.as_ref()).collect::<Vec<_>>())
        .unwrap_or_default();
    let n_cluster = cluster_ips.len();
    let n_external = spec.external_ips.iter().flatten().count();
    let external = spec.external_ips.iter().flatten();
    for (i, ip) in cluster_ips
        .into_iter()
        .chain(external)
        .chain(lb_ips)
        .enumerate()
    {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => {
                if i < n_cluster {
                    cluster_vips.push(v4);
                } else if i >= n_cluster + n_external {
                    lb_ips_v4.push(v4);
                }
                if !vips.contains(&v4) {
                    vips.push(v4)
                }
            }
            Ok(std::net::IpAddr::V6(_)) => out.warnings.push(format!(
                "service {ns}/{name}: IPv6 address {ip} skipped (IPv6 is not supported yet)"
            )),
            Err(_) => out
                .warnings
                .push(format!("service {ns}/{name}: invalid IP {ip:?} ignored")),
        }
    }
    let affinity_timeout_s = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    });
    let scheduler = match service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SCHEDULER_ANNOTATION))
    {
        None => options.default_scheduler,
        Some(value) => value.trim().parse().unwrap_or_else(|e| {
            out.warnings.push(format!(
                "service {ns}/{name}: annotation {SCHEDULER_ANNOTATION}: {e}; using the node \
                 default {}",
                options.default_scheduler
            ));
            options.default_scheduler
        }),
    };
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
    let mut source_ranges = Vec::new();
    for range in spec.load_balancer_source_ranges.iter().flatten() {
        match range.parse::<Ipv4Net>() {
            Ok(net) => source_ranges.push(net),
            Err(_) if range.contains(':') => {} // IPv6 range: no IPv6 clients yet
            Err(e) => out.warnings.push(format!(
                "service {ns}/{name}: loadBalancerSourceRanges: {e}; range ignored"
            )),
        }
    }
    let lb_ips: Vec<Ipv4Addr> = vips
        .iter()
        .copied()
        .filter(|ip| lb_ips_v4.contains(ip))
        .collect();
    let node = options.node_name.as_deref();
    if external_local
        && type_ == "LoadBalancer"
        && let Some(port) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
    {
        let local_endpoints = spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                let proto = protocol(&p.protocol).unwrap_or(Protocol::Tcp);
                let port_name = p.name.as_deref().unwrap_or("");
                ready_local(service_slices, port_name, proto, node)
            })
            .max()
            .unwrap_or(0);
        out.health_checks.insert(
            port,
            HealthCheck {
                namespace: ns.to_string(),
                name: name.to_string(),
                local_endpoints,
            },
        );
    }
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.as_deref().unwrap_or("");
        let Some(proto) = protocol(&port.protocol) else {
            out.warnings.push(format!(
                "service {ns}/{name} port {port_name:?}: protocol {} not supported, skipped",
                port.protocol.as_deref().unwrap_or("")
            ));
            continue;
        };
        let Ok(number) = u16::try_from(port.port) else {
            out.warnings.push(format!(
                "service {ns}/{name} port {port_name:?}: port {} out of range, skipped",
                port.port
            ));
            continue;
        };
        let mut all = usable_endpoints(service_slices, port_name, proto, None);
        if uses_topology(service)
            && let Some(zone) = options.zone.as_deref()
        {
            all = zone_endpoints(service_slices, &all, zone);
        }
        let local = || usable_endpoints(service_slices, port_name, proto, Some(node));
        let base = FrontendSpec {
            service: format!("{ns}/{name}:{port_name}"),
            endpoints: all.clone(),
            affinity_timeout_s,
            scheduler,
            snat: false,
            drop_when_empty: false,
            source_ranges: Vec::new(),
        };
        // From outside: only this node's endpoints with the client address kept (Local), or
        // any endpoint with the client SNATed to the node (Cluster).
        let external = FrontendSpec {
            endpoints: if external_local { local() } else { all.clone() },
            snat: !external_local,
            drop_when_empty: external_local,
            ..base.clone()
        };
        let mut add = |frontend: Frontend, spec: FrontendSpec| {
            if let Some(existing) = out.desired.get(&frontend) {
                out.warnings.push(format!(
                    "service {ns}/{name}: {frontend} already used by {}, skipped",
                    existing.service
                ));
                return;
            }
            out.desired.insert(frontend, spec);
        };
        for vip in &vips {
            let internal = Frontend::internal(*vip, number, proto);
            if cluster_vips.contains(vip) {
                // internalTrafficPolicy applies to ClusterIP traffic only.
                let spec = if internal_local {
                    FrontendSpec {
                        endpoints: local(),
                        drop_when_empty: true,
                        ..base.clone()
                    }
                } else {
                    base.clone()
                };
                add(internal, spec);
                continue;
            }
            // externalIPs and LoadBalancer IPs: pods reach every endpoint (kube-proxy's
            // short-circuit); outsiders get the external policy and the source ranges.
            add(internal, base.clone());
            let mut spec = external.clone();
            if lb_ips.contains(vip) {
                spec.source_ranges = source_ranges.clone();
            }
            add(
                Frontend {
                    scope: Scope::External,
                    ..internal
                },
                spec,
            );
        }
        if node_ports && let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
            let any = Frontend::internal(Ipv4Addr::UNSPECIFIED, node_port, proto);
            add(any, base.clone());
            add(
                Frontend {
                    scope: Scope::External,
                    ..any
                },
                external.clone(),
            );
        }
    }
}

/// Whether the service asked for topology-aware routing (annotation or trafficDistribution).
fn uses_topology(service: &Service) -> bool {
    let annotated = service.metadata.annotations.as_ref().is_some_and(|a| {
        [TOPOLOGY_MODE_ANNOTATION, TOPOLOGY_HINTS_ANNOTATION]
            .iter()
            .any(|k| a.get(*k).is_some_and(|v| v.eq_ignore_ascii_case("auto")))
    });
    let distribution = service
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref())
        .is_some();
    annotated || distribution
}

/// kube-proxy's topology filter: the endpoints hinted for `zone`, if every endpoint carries
/// hints and at least one is for this zone; otherwise all of them (hints missing or stale).
fn zone_endpoints(slices: &[&EndpointSlice], usable: &[Endpoint], zone: &str) -> Vec<Endpoint> {
    let mut for_zone = Vec::new();
    for endpoint in usable {
        let hinted = slices.iter().flat_map(|s| &s.endpoints).find(|e| {
            e.addresses.first().and_then(|a| a.parse::<Ipv4Addr>().ok()) == Some(endpoint.ip)
        });
        let zones: Vec<&str> = hinted
            .and_then(|e| e.hints.as_ref())
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| z.iter().map(|z| z.name.as_str()).collect())
            .unwrap_or_default();
        if zones.is_empty() {
            return usable.to_vec();
        }
        if zones.contains(&zone) {
            for_zone.push(*endpoint);
        }
    }
    if for_zone.is_empty() {
        usable.to_vec()
    } else {
        for_zone
    }
}

/// Local ready endpoints of one port (what a healthCheckNodePort reports).
fn ready_local(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: Protocol,
    node: Option<&str>,
) -> usize {
    let (ready, _) = classify(slices, port_name, proto, Some(node));
    ready.len()
}

/// Ready endpoints; if none is ready, serving+terminating ones (kube-proxy's fallback so
/// connections drain gracefully during rollouts). Ports are matched by the Service port name,
/// which is how EndpointSlices carry the resolved (possibly named) target port. With
/// `only_node`, just the endpoints on that node (`Some(None)`: no node known, none local),
/// the fallback applying among them, as kube-proxy does for Local policies.
fn usable_endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: Protocol,
    only_node: Option<Option<&str>>,
) -> Vec<Endpoint> {
    let (ready, terminating) = classify(slices, port_name, proto, only_node);
    let mut chosen = if ready.is_empty() { terminating } else { ready };
    chosen.sort();
    chosen.dedup();
    chosen
}

/// (ready, serving+terminating) endpoints of a port, optionally of one node only.
fn classify(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: Protocol,
    only_node: Option<Option<&str>>,
) -> (Vec<Endpoint>, Vec<Endpoint>) {
    let mut ready = Vec::new();
    let mut terminating = Vec::new();
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
            if let Some(node) = only_node
                && (node.is_none() || endpoint.node_name.as_deref() != node)
            {
                continue;
            }
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            // API semantics: unset `ready` means ready; unset `serving` means as `ready`.
            let is_ready = conditions.ready.unwrap_or(true);
            let is_serving = conditions.serving.unwrap_or(is_ready);
            let is_terminating = conditions.terminating.unwrap_or(false);
            let target = if is_ready && !is_terminating {
                &mut ready
            } else if is_serving && is_terminating {
                &mut terminating
            } else {
                continue;
            };
            // An endpoint's addresses are one pod: the first one is used (as kube-proxy does).
            if let Some(Ok(ip)) = endpoint.addresses.first().map(|a| a.parse::<Ipv4Addr>()) {
                target.push(Endpoint { ip, port });
            }
        }
    }
    (ready, terminating)
}

#[cfg(test)]
mod tests;
