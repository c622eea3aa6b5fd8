//! One Service translated as if it were alone: its frontends (ClusterIPs, externalIPs,
//! LoadBalancer IPs, NodePorts, each port) with their endpoints and policies.
use std::net::IpAddr;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    DEFAULT_AFFINITY_TIMEOUT_S, HEADLESS_LABEL, Options, SCHEDULER_ANNOTATION,
    SERVICE_PROXY_NAME_LABEL, Translation,
    endpoints::{categorize, endpoints_of_port},
    namespace, protocol,
};
use crate::model::{Family, Frontend, FrontendSpec, HealthCheck, IpNet, Protocol, Scope};

/// One Service's frontends, translated as if it were alone (`merge` settles conflicts).
pub(super) fn translate_service(
    service: &Service,
    service_slices: &[&EndpointSlice],
    options: &Options,
    out: &mut Translation,
) {
    let ns = namespace(&service.metadata.namespace);
    let name = service.metadata.name.as_deref().unwrap_or("");
    let Some(spec) = &service.spec else { return };
    // kube-proxy's informer leaves out Services of another proxy and headless ones (the
    // label counts even when the Service has a ClusterIP).
    if service
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
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
    // Each address of the Service, by role, in the order the Service lists them.
    let lb_ips = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| ing.iter().filter_map(|i| i.ip.as_ref()).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut addresses: Vec<(IpAddr, Role)> = Vec::new();
    for (role, list) in [
        (Role::Cluster, cluster_ips),
        (Role::External, spec.external_ips.iter().flatten().collect()),
        (Role::LoadBalancer, lb_ips),
    ] {
        for ip in list {
            match ip.parse::<IpAddr>() {
                Ok(ip) => addresses.push((ip, role)),
                Err(_) => out
                    .warnings
                    .push(format!("service {ns}/{name}: invalid IP {ip:?} ignored")),
            }
        }
    }
    // The families the Service has a ClusterIP of (`ipFamilies`, as the API server
    // allocated them): kube-proxy's proxier of another family ignores the Service, so an
    // externalIP or LoadBalancer IP of that family is not served either.
    let families: Vec<Family> = Family::ALL
        .into_iter()
        .filter(|f| {
            addresses
                .iter()
                .any(|(ip, role)| *role == Role::Cluster && Family::of(*ip) == *f)
        })
        .collect();
    for (ip, role) in &addresses {
        if *role != Role::Cluster && !families.contains(&Family::of(*ip)) {
            out.warnings.push(format!(
                "service {ns}/{name}: {ip} ignored: the Service has no {} ClusterIP",
                Family::of(*ip)
            ));
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
        match range.parse::<IpNet>() {
            Ok(net) => source_ranges.push(net),
            Err(e) => out.warnings.push(format!(
                "service {ns}/{name}: loadBalancerSourceRanges: {e}; range ignored"
            )),
        }
    }
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
            .flat_map(|p| families.iter().map(move |f| (p, *f)))
            .map(|(p, family)| {
                let proto = protocol(&p.protocol).unwrap_or(Protocol::Tcp);
                let port_name = p.name.as_deref().unwrap_or("");
                categorize(
                    &endpoints_of_port(service_slices, family, port_name, proto, node),
                    node,
                    options.zone.as_deref(),
                )
                .local_ready
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
        for family in &families {
            let family = *family;
            let categorized = categorize(
                &endpoints_of_port(service_slices, family, port_name, proto, node),
                node,
                options.zone.as_deref(),
            );
            let all = categorized.cluster;
            let local = || categorized.local.clone();
            // A Local policy without local endpoints drops only while the Service has endpoints
            // elsewhere; with none anywhere it rejects, as a Cluster one does (kube-proxy).
            let drop_when_empty = categorized.any;
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
                drop_when_empty: external_local && drop_when_empty,
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
            let mut seen: Vec<IpAddr> = Vec::new();
            for (vip, role) in addresses.iter().filter(|(ip, _)| Family::of(*ip) == family) {
                // An address listed twice (a LoadBalancer IP that is also an externalIP) is one
                // frontend, of its first role.
                if seen.contains(vip) {
                    continue;
                }
                seen.push(*vip);
                let internal = Frontend::internal(*vip, number, proto);
                if *role == Role::Cluster {
                    // internalTrafficPolicy applies to ClusterIP traffic only.
                    let spec = if internal_local {
                        FrontendSpec {
                            endpoints: local(),
                            drop_when_empty,
                            ..base.clone()
                        }
                    } else {
                        base.clone()
                    };
                    // From outside the node (XDP on the external interfaces): the same
                    // endpoints, the client masqueraded to the node as kube-proxy marks it.
                    if options.masquerade_outside {
                        let outside = FrontendSpec {
                            snat: true,
                            ..spec.clone()
                        };
                        add(
                            Frontend {
                                scope: Scope::External,
                                ..internal
                            },
                            outside,
                        );
                    }
                    add(internal, spec);
                    continue;
                }
                // externalIPs and LoadBalancer IPs: pods reach every endpoint (kube-proxy's
                // short-circuit); outsiders get the external policy and the source ranges.
                add(internal, base.clone());
                let mut spec = external.clone();
                if *role == Role::LoadBalancer || addresses.contains(&(*vip, Role::LoadBalancer)) {
                    spec.source_ranges = source_ranges
                        .iter()
                        .filter(|r| r.family() == family)
                        .copied()
                        .collect();
                }
                add(
                    Frontend {
                        scope: Scope::External,
                        ..internal
                    },
                    spec,
                );
            }
            if node_ports
                && let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok())
            {
                let any = Frontend::internal(family.unspecified(), node_port, proto);
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
}

/// What an address of a Service is to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Cluster,
    External,
    LoadBalancer,
}
