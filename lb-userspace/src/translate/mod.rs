//! Kubernetes Services and EndpointSlices → desired frontends, following kube-proxy's rules.
//! Pure: no I/O, no BPF; every rule is table-tested (`tests.rs`).
//!
//! This module tracks changes (which Services to translate again, who owns a frontend two
//! Services claim); `service` translates one Service, `endpoints` picks its endpoints.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use service::translate_service;

use crate::model::{DesiredState, Frontend, FrontendSpec, HealthCheck, Protocol, Scheduler};

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
    /// ClusterIPs reached from outside the node are balanced and masqueraded to the node
    /// (kube-proxy with `clusterCIDR` or `masqueradeAll`: `! -s CLUSTER_CIDR -d CLUSTER_IP`
    /// → KUBE-MARK-MASQ).
    pub masquerade_outside: bool,
}

/// Services with this label are headless for kube-proxy, whatever their ClusterIP.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// All objects from a source.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Shared, not copied: the kube source's reflector stores hand out `Arc`s, and the
    /// manifests source keeps every file's objects while a snapshot of all of them is in use.
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// Nodes a manifests directory holds (for this node's zone label); the API source
    /// watches its own Node instead. Not read by the translation.
    pub nodes: Vec<Arc<k8s_openapi::api::core::v1::Node>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    pub desired: DesiredState,
    /// healthCheckNodePort → what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Objects or fields skipped for a reason an operator should know about.
    pub warnings: Vec<String>,
}

pub(super) fn namespace(ns: &Option<String>) -> &str {
    ns.as_deref().unwrap_or("default")
}

pub(super) fn protocol(p: &Option<String>) -> Option<Protocol> {
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
    /// it belongs to (`None`: no service label, or FQDN).
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
                .filter(|_| matches!(slice.address_type.as_str(), "IPv4" | "IPv6"))
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

mod endpoints;
mod service;

#[cfg(test)]
mod tests;
