//! The Kubernetes API's validation rules for the fields xlb reads, applied to every object as
//! it arrives from either source: a manifests directory has no API server in front of it,
//! and the API can hand out objects of newer versions. An invalid field is dropped (the rest
//! of the object is used); an object the API server would refuse as a whole is neutralised
//! (a Service loses its spec, an EndpointSlice its endpoints). Every rejection is reported
//! once, at WARN, with where it came from, and counted (`xlb_objects_rejected_total`).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// One field (or object) refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: &'static str,
    /// The field's path, e.g. `spec.ports[0].port`.
    pub field: String,
    /// A short name for the metric label, e.g. `port_range`.
    pub reason: &'static str,
    pub message: String,
    /// The whole object was refused, not just the field.
    pub object: bool,
}

pub trait Validate {
    /// Drops invalid fields (or neutralises the object) and says what was refused.
    fn validate(&mut self) -> Vec<Rejection>;
}

fn port_ok(port: i32) -> bool {
    (1..=65535).contains(&port)
}

fn protocol_ok(protocol: &Option<String>) -> bool {
    matches!(protocol.as_deref(), None | Some("TCP" | "UDP" | "SCTP"))
}

/// The first problem of a port entry (Service or EndpointSlice): its number outside
/// 1-65535, or a protocol the API does not know. (field name, metric reason, message)
fn port_problem(
    port: Option<i32>,
    protocol: &Option<String>,
) -> Option<(&'static str, &'static str, String)> {
    if let Some(n) = port.filter(|n| !port_ok(*n)) {
        return Some(("port", "port_range", format!("{n} is not in 1-65535")));
    }
    (!protocol_ok(protocol)).then(|| {
        (
            "protocol",
            "protocol",
            format!(
                "{:?} is not TCP, UDP or SCTP",
                protocol.as_deref().unwrap_or("")
            ),
        )
    })
}

/// A CIDR as the API accepts it for loadBalancerSourceRanges: `address/prefix`.
fn cidr_ok(text: &str) -> bool {
    let Some((addr, prefix)) = text.trim().split_once('/') else {
        return false;
    };
    match (addr.parse::<IpAddr>(), prefix.parse::<u8>()) {
        (Ok(IpAddr::V4(_)), Ok(p)) => p <= 32,
        (Ok(IpAddr::V6(_)), Ok(p)) => p <= 128,
        _ => false,
    }
}

fn rejection(
    kind: &'static str,
    field: String,
    reason: &'static str,
    message: String,
) -> Rejection {
    Rejection {
        kind,
        field,
        reason,
        message,
        object: false,
    }
}

impl Validate for Service {
    fn validate(&mut self) -> Vec<Rejection> {
        let mut out = Vec::new();
        let Some(spec) = self.spec.as_mut() else {
            return out;
        };
        let reject = |field: &str, reason, message: String| Rejection {
            object: true,
            ..rejection("Service", field.to_string(), reason, message)
        };
        let mut whole = None;
        for (i, ip) in spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .enumerate()
        {
            if ip != "None" && !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
                whole = Some(reject(
                    &format!("spec.clusterIPs[{i}]"),
                    "ip",
                    format!("{ip:?} is not an IP address"),
                ));
            }
        }
        if let Some(t) = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            && !(1..=86_400).contains(&t)
        {
            whole = Some(reject(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                "timeout_seconds",
                format!("{t} is not in 1-86400"),
            ));
        }
        if let Some(r) = whole {
            // The API server refuses such a Service outright: so does xlb.
            self.spec = None;
            return vec![r];
        }
        if let Some(ports) = spec.ports.as_mut() {
            let mut index = 0;
            ports.retain(|p| {
                let field = |name: &str| format!("spec.ports[{index}].{name}");
                let problem = match port_problem(Some(p.port), &p.protocol) {
                    Some((name, reason, message)) => Some((field(name), reason, message)),
                    None => p.node_port.filter(|n| !port_ok(*n)).map(|n| {
                        (
                            field("nodePort"),
                            "port_range",
                            format!("{n} is not in 1-65535"),
                        )
                    }),
                };
                index += 1;
                match problem {
                    Some((field, reason, message)) => {
                        out.push(rejection(
                            "Service",
                            field,
                            reason,
                            format!("{message}; port ignored"),
                        ));
                        false
                    }
                    None => true,
                }
            });
        }
        if let Some(n) = spec.health_check_node_port.filter(|n| !port_ok(*n)) {
            out.push(rejection(
                "Service",
                "spec.healthCheckNodePort".into(),
                "port_range",
                format!("{n} is not in 1-65535; no health check served"),
            ));
            spec.health_check_node_port = None;
        }
        if let Some(ips) = spec.external_ips.as_mut() {
            retain_logged(ips, "spec.externalIPs", &mut out, |ip| {
                ip.parse::<IpAddr>()
                    .err()
                    .map(|_| ("ip", format!("{ip:?} is not an IP address")))
            });
        }
        if let Some(ranges) = spec.load_balancer_source_ranges.as_mut() {
            retain_logged(ranges, "spec.loadBalancerSourceRanges", &mut out, |r| {
                (!cidr_ok(r)).then(|| ("cidr", format!("{r:?} is not a CIDR")))
            });
        }
        if let Some(ingress) = self
            .status
            .as_mut()
            .and_then(|s| s.load_balancer.as_mut())
            .and_then(|lb| lb.ingress.as_mut())
        {
            let mut index = 0;
            ingress.retain(|i| {
                let bad = i.ip.as_ref().filter(|ip| ip.parse::<IpAddr>().is_err());
                if let Some(ip) = bad {
                    out.push(rejection(
                        "Service",
                        format!("status.loadBalancer.ingress[{index}].ip"),
                        "ip",
                        format!("{ip:?} is not an IP address; ignored"),
                    ));
                }
                index += 1;
                bad.is_none()
            });
        }
        out
    }
}

/// Keeps the entries of `list` that `problem` finds nothing wrong with, reporting the rest.
fn retain_logged(
    list: &mut Vec<String>,
    field: &str,
    out: &mut Vec<Rejection>,
    problem: impl Fn(&str) -> Option<(&'static str, String)>,
) {
    let mut index = 0;
    list.retain(|entry| {
        let found = problem(entry);
        if let Some((reason, message)) = &found {
            out.push(rejection(
                "Service",
                format!("{field}[{index}]"),
                reason,
                format!("{message}; ignored"),
            ));
        }
        index += 1;
        found.is_none()
    });
}

impl Validate for EndpointSlice {
    fn validate(&mut self) -> Vec<Rejection> {
        let mut out = Vec::new();
        let family = self.address_type.clone();
        if !matches!(family.as_str(), "IPv4" | "IPv6" | "FQDN") {
            self.endpoints.clear();
            return vec![Rejection {
                object: true,
                ..rejection(
                    "EndpointSlice",
                    "addressType".into(),
                    "address_type",
                    format!("{family:?} is not IPv4, IPv6 or FQDN; no endpoints used"),
                )
            }];
        }
        if let Some(ports) = self.ports.as_mut() {
            let mut index = 0;
            ports.retain(|p| {
                let problem = port_problem(p.port, &p.protocol);
                if let Some((name, reason, message)) = &problem {
                    out.push(rejection(
                        "EndpointSlice",
                        format!("ports[{index}].{name}"),
                        reason,
                        format!("{message}; port ignored"),
                    ));
                }
                index += 1;
                problem.is_none()
            });
        }
        let valid = |a: &str| match family.as_str() {
            "IPv4" => a.parse::<Ipv4Addr>().is_ok(),
            "IPv6" => a.parse::<Ipv6Addr>().is_ok(),
            _ => true,
        };
        let mut index = 0;
        self.endpoints.retain(|e| {
            let bad = e.addresses.iter().find(|a| !valid(a));
            if let Some(a) = bad {
                out.push(rejection(
                    "EndpointSlice",
                    format!("endpoints[{index}].addresses"),
                    "address",
                    format!("{a:?} is not an {family} address; endpoint ignored"),
                ));
            }
            index += 1;
            bad.is_none()
        });
        out
    }
}

/// Nodes are read for their zone label only.
impl Validate for k8s_openapi::api::core::v1::Node {
    fn validate(&mut self) -> Vec<Rejection> {
        Vec::new()
    }
}

/// Rejections reported so far (each once) and counts by (kind, reason).
struct Ledger {
    reported: BTreeSet<String>,
    counts: BTreeMap<(&'static str, &'static str), u64>,
}

static LEDGER: Mutex<Ledger> = Mutex::new(Ledger {
    reported: BTreeSet::new(),
    counts: BTreeMap::new(),
});

/// Validates `object` (from `origin`: a file, or "the API"), reports what it refused once at
/// WARN and counts it.
pub fn check<T: Validate + kube::Resource>(object: &mut T, origin: &str) {
    let rejections = object.validate();
    if rejections.is_empty() {
        return;
    }
    let meta = object.meta();
    let name = format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    );
    for r in rejections {
        record(origin, &name, &r);
    }
}

/// Reports `rejection` of object `name` (namespace/name) from `origin` once, and counts it.
pub fn record(origin: &str, name: &str, r: &Rejection) {
    let line = format!("{origin}: {} {name}: {}: {}", r.kind, r.field, r.message);
    let mut ledger = LEDGER.lock().unwrap_or_else(|e| e.into_inner());
    *ledger.counts.entry((r.kind, r.reason)).or_default() += 1;
    if ledger.reported.insert(line.clone()) {
        log::warn!("{line}");
    }
}

/// Objects and fields refused since start, by (kind, reason).
pub fn rejected_counts() -> BTreeMap<(&'static str, &'static str), u64> {
    LEDGER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .counts
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(spec: &str) -> Service {
        serde_saphyr::from_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n{spec}"
        ))
        .expect("Service YAML")
    }

    fn slice(body: &str) -> EndpointSlice {
        serde_saphyr::from_str(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1}}\n{body}"
        ))
        .expect("EndpointSlice YAML")
    }

    #[test]
    fn services_lose_invalid_fields_or_are_refused_whole() {
        let mut s = service(
            "  clusterIP: 10.96.0.1\n  ports:\n  - {name: a, port: 0}\n  - {name: b, port: 80, nodePort: 70000}\n\
             \x20 - {name: c, port: 81, protocol: ICMP}\n  - {name: d, port: 82}\n\
             \x20 externalIPs: [198.51.100.7, 198.51.100.300]\n\
             \x20 loadBalancerSourceRanges: [10.0.0.0/8, 10.0.0.1, '2001:db8::/32']\n",
        );
        let found = s.validate();
        let fields: Vec<&str> = found.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ports[0].port",
                "spec.ports[1].nodePort",
                "spec.ports[2].protocol",
                "spec.externalIPs[1]",
                "spec.loadBalancerSourceRanges[1]"
            ]
        );
        let spec = s.spec.expect("kept");
        let ports: Vec<&str> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.as_deref())
            .collect();
        assert_eq!(ports, ["d"]);
        assert_eq!(spec.external_ips, Some(vec!["198.51.100.7".to_string()]));
        assert_eq!(spec.load_balancer_source_ranges.map(|r| r.len()), Some(2));

        for bad in [
            "  clusterIP: 10.96.0.300\n  ports: [{port: 80}]\n",
            "  clusterIP: 10.96.0.1\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: -5}}\n  ports: [{port: 80}]\n",
            "  clusterIP: 10.96.0.1\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n  ports: [{port: 80}]\n",
        ] {
            let mut s = service(bad);
            let found = s.validate();
            assert!(found.len() == 1 && found[0].object, "{bad}: {found:?}");
            assert!(s.spec.is_none(), "{bad}: refused whole");
        }
        let mut fine = service(
            "  clusterIP: None\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}\n  ports: [{port: 65535}]\n",
        );
        assert_eq!(fine.validate(), vec![]);
    }

    #[test]
    fn slices_lose_endpoints_of_another_family_and_bad_ports() {
        let mut s = slice(
            "addressType: IPv4\nports: [{name: a, port: 70000}, {name: b, port: 8080}]\n\
             endpoints:\n- {addresses: ['::1']}\n- {addresses: [10.244.1.300]}\n- {addresses: [10.244.1.3]}\n",
        );
        let found = s.validate();
        let fields: Vec<&str> = found.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "ports[0].port",
                "endpoints[0].addresses",
                "endpoints[1].addresses"
            ]
        );
        assert_eq!(s.endpoints.len(), 1);
        assert_eq!(s.ports.map(|p| p.len()), Some(1));
        let mut s = slice("addressType: Other\nendpoints:\n- {addresses: [10.244.1.3]}\n");
        assert!(s.validate()[0].object);
        assert!(s.endpoints.is_empty());
    }

    #[test]
    fn rejections_are_reported_once_and_counted() {
        let before = rejected_counts()
            .get(&("EndpointSlice", "address"))
            .copied()
            .unwrap_or(0);
        for _ in 0..3 {
            let mut s = slice("addressType: IPv4\nendpoints:\n- {addresses: ['fd00::9']}\n");
            check(&mut s, "test.yaml");
        }
        let after = rejected_counts()[&("EndpointSlice", "address")];
        assert_eq!(after - before, 3, "every rejection counted");
        let ledger = LEDGER.lock().expect("ledger");
        let lines = ledger
            .reported
            .iter()
            .filter(|l| l.contains("fd00::9"))
            .count();
        assert_eq!(lines, 1, "reported once");
    }
}
