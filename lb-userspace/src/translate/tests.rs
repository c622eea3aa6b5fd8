//! Table tests: real YAML in, frontends out.
use std::path::Path;

use super::*;
use crate::model::{Endpoint, Family, Scope};
use crate::source::manifests::parse_file_text;

fn objects(yaml: &str) -> Objects {
    parse_file_text(yaml, Path::new("test.yaml"), false).expect("test YAML parses")
}

fn fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend::internal(ip.parse::<std::net::IpAddr>().expect("ip"), port, protocol)
}

fn eps(list: &[(&str, u16)]) -> Vec<Endpoint> {
    list.iter()
        .map(|(ip, port)| Endpoint {
            ip: ip.parse().expect("ip"),
            port: *port,
        })
        .collect()
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

fn slice(name: &str, endpoints: &str) -> String {
    format!(
        r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:
{endpoints}
"#
    )
}

struct Case {
    name: &'static str,
    yaml: String,
    /// (frontend, endpoints, affinity) expected; frontends not listed must be absent.
    expect: Vec<(Frontend, Vec<Endpoint>, Option<u32>)>,
}

fn cases() -> Vec<Case> {
    let http = fe("10.96.0.10", 80, Protocol::Tcp);
    let dns = fe("10.96.0.10", 53, Protocol::Udp);
    let ready_two = slice(
        "web-1",
        "- {addresses: [10.244.1.2], conditions: {ready: true}}\n- {addresses: [10.244.2.3]}",
    );
    vec![
        Case {
            name: "ready endpoints, named target port resolved through the slice, two ports",
            yaml: format!("{WEB}{ready_two}"),
            expect: vec![
                (http, eps(&[("10.244.1.2", 8080), ("10.244.2.3", 8080)]), None),
                (dns, eps(&[("10.244.1.2", 5353), ("10.244.2.3", 5353)]), None),
            ],
        },
        Case {
            name: "unready endpoints are not used, ready ones are",
            yaml: format!(
                "{WEB}{}",
                slice(
                    "web-1",
                    "- {addresses: [10.244.1.2], conditions: {ready: false, serving: false}}\n\
                     - {addresses: [10.244.2.3], conditions: {ready: true}}"
                )
            ),
            expect: vec![
                (http, eps(&[("10.244.2.3", 8080)]), None),
                (dns, eps(&[("10.244.2.3", 5353)]), None),
            ],
        },
        Case {
            name: "no ready endpoint: serving+terminating fallback",
            yaml: format!(
                "{WEB}{}",
                slice(
                    "web-1",
                    "- {addresses: [10.244.1.2], conditions: {ready: false, serving: true, terminating: true}}\n\
                     - {addresses: [10.244.2.3], conditions: {ready: false, serving: false, terminating: true}}"
                )
            ),
            expect: vec![
                (http, eps(&[("10.244.1.2", 8080)]), None),
                (dns, eps(&[("10.244.1.2", 5353)]), None),
            ],
        },
        Case {
            name: "terminating endpoints are ignored while a ready one exists",
            yaml: format!(
                "{WEB}{}",
                slice(
                    "web-1",
                    "- {addresses: [10.244.1.2], conditions: {ready: false, serving: true, terminating: true}}\n\
                     - {addresses: [10.244.2.3], conditions: {ready: true}}"
                )
            ),
            expect: vec![
                (http, eps(&[("10.244.2.3", 8080)]), None),
                (dns, eps(&[("10.244.2.3", 5353)]), None),
            ],
        },
        Case {
            name: "endpoints spread over several slices are merged and deduplicated",
            yaml: format!(
                "{WEB}{}{}",
                slice("web-1", "- {addresses: [10.244.1.2]}"),
                slice("web-2", "- {addresses: [10.244.3.4]}\n- {addresses: [10.244.1.2]}")
            ),
            expect: vec![
                (http, eps(&[("10.244.1.2", 8080), ("10.244.3.4", 8080)]), None),
                (dns, eps(&[("10.244.1.2", 5353), ("10.244.3.4", 5353)]), None),
            ],
        },
        Case {
            name: "service without endpoints is kept with none (clients get rejected)",
            yaml: WEB.to_string(),
            expect: vec![(http, vec![], None), (dns, vec![], None)],
        },
        Case {
            name: "session affinity with explicit and default timeout",
            yaml: format!(
                "{}{ready_two}\n---\n{}",
                WEB.replace(
                    "  clusterIP: 10.96.0.10\n",
                    "  clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n"
                ),
                "apiVersion: v1\nkind: Service\nmetadata: {name: other}\nspec: {clusterIP: 10.96.0.20, sessionAffinity: ClientIP, ports: [{port: 443}]}\n"
            ),
            expect: vec![
                (http, eps(&[("10.244.1.2", 8080), ("10.244.2.3", 8080)]), Some(60)),
                (dns, eps(&[("10.244.1.2", 5353), ("10.244.2.3", 5353)]), Some(60)),
                (fe("10.96.0.20", 443, Protocol::Tcp), vec![], Some(DEFAULT_AFFINITY_TIMEOUT_S)),
            ],
        },
        Case {
            name: "headless, ExternalName and other proxies' services are ignored",
            yaml: [
                "apiVersion: v1\nkind: Service\nmetadata: {name: headless}\nspec: {clusterIP: None, ports: [{port: 80}]}",
                "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: example.org, ports: [{port: 80}]}",
                "apiVersion: v1\nkind: Service\nmetadata: {name: mine, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}",
            ]
            .join("\n---\n"),
            expect: vec![],
        },
        Case {
            name: "endpoints without a Service, of another namespace, or of FQDN type are ignored",
            yaml: format!(
                "{}\n---\n{}\n---\n{}",
                slice("orphan", "- {addresses: [10.244.9.9]}"),
                WEB.replace("namespace: shop", "namespace: other"),
                slice("fqdn", "- {addresses: [example.org]}").replace("IPv4", "FQDN"),
            ),
            expect: vec![(http, vec![], None), (dns, vec![], None)],
        },
        Case {
            name: "externalIPs and LoadBalancer ingress IPs become frontends too, of each family; IPv6 ones have IPv6 endpoints only (none here)",
            yaml: format!(
                "{}status:\n  loadBalancer:\n    ingress: [{{ip: 192.0.2.10}}, {{ip: '2001:db8::1'}}]\n{ready_two}",
                WEB.replace(
                    "  clusterIP: 10.96.0.10\n",
                    "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00::10']\n  type: LoadBalancer\n  externalIPs: [198.51.100.7]\n"
                )
            ),
            expect: ["10.96.0.10", "198.51.100.7", "192.0.2.10"]
                .iter()
                .flat_map(|ip| {
                    [
                        (fe(ip, 80, Protocol::Tcp), eps(&[("10.244.1.2", 8080), ("10.244.2.3", 8080)]), None),
                        (fe(ip, 53, Protocol::Udp), eps(&[("10.244.1.2", 5353), ("10.244.2.3", 5353)]), None),
                    ]
                })
                .chain(["fd00::10", "2001:db8::1"].iter().flat_map(|ip| {
                    [(fe(ip, 80, Protocol::Tcp), vec![], None), (fe(ip, 53, Protocol::Udp), vec![], None)]
                }))
                .collect(),
        },
        Case {
            name: "slice port matched by name and protocol; unnamed single port",
            yaml: "apiVersion: v1\nkind: Service\nmetadata: {name: one}\nspec: {clusterIP: 10.96.0.40, ports: [{port: 80, targetPort: 9376}]}\n---\n\
                   apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: one-x, labels: {kubernetes.io/service-name: one}}\naddressType: IPv4\n\
                   ports: [{port: 9376}, {name: other, port: 1}]\nendpoints: [{addresses: [10.244.5.5]}]\n"
                .to_string(),
            expect: vec![(fe("10.96.0.40", 80, Protocol::Tcp), eps(&[("10.244.5.5", 9376)]), None)],
        },
        Case {
            name: "SCTP ports are skipped, other ports kept",
            yaml: "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.50, ports: [{name: a, port: 80}, {name: b, port: 90, protocol: SCTP}]}\n".to_string(),
            expect: vec![(fe("10.96.0.50", 80, Protocol::Tcp), vec![], None)],
        },
    ]
}

#[test]
fn translation_table() {
    for case in cases() {
        let t = translate(&objects(&case.yaml), &Options::default());
        // Pod-side frontends here; the external scope has its own table.
        let got: Vec<(Frontend, Vec<Endpoint>, Option<u32>)> = t
            .desired
            .iter()
            .filter(|(f, _)| f.scope == Scope::Internal && !f.is_node_port())
            .map(|(f, s)| (*f, s.endpoints.clone(), s.affinity_timeout_s))
            .collect();
        let mut want = case.expect;
        want.sort_by_key(|(f, _, _)| *f);
        assert_eq!(got, want, "case: {}", case.name);
    }
}

#[test]
fn duplicate_frontend_keeps_first_service_and_warns() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
                apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    let t = translate(&objects(yaml), &Options::default());
    assert_eq!(t.desired.len(), 1);
    assert_eq!(
        t.desired.values().next().map(|s| s.service.as_str()),
        Some("default/a:")
    );
    assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
    assert!(t.warnings[0].contains("default/b"));
}

#[test]
fn service_names_are_recorded() {
    let t = translate(&objects(WEB), &Options::default());
    let names: Vec<&str> = t.desired.values().map(|s| s.service.as_str()).collect();
    assert!(t.health_checks.is_empty());
    assert_eq!(names, vec!["shop/web:dns", "shop/web:http"]);
}

const LB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.60
  externalIPs: [198.51.100.7]
  externalTrafficPolicy: POLICY
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [203.0.113.0/24, "192.0.2.9/32", "2001:db8::/32"]
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.10}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-1
  namespace: shop
  labels: {kubernetes.io/service-name: lb}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- {addresses: [10.244.1.2], nodeName: n1}
- {addresses: [10.244.1.3], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.2], nodeName: n2}
"#;

fn on_node(node: &str) -> Options {
    Options {
        node_name: Some(node.into()),
        ..Options::default()
    }
}

fn external(ip: &str, port: u16) -> Frontend {
    Frontend {
        scope: Scope::External,
        ..fe(ip, port, Protocol::Tcp)
    }
}

/// (endpoints, snat, drop_when_empty, number of source ranges) of a frontend.
fn shape(t: &Translation, f: Frontend) -> (Vec<Endpoint>, bool, bool, usize) {
    let s = t.desired.get(&f).unwrap_or_else(|| panic!("{f} missing"));
    (
        s.endpoints.clone(),
        s.snat,
        s.drop_when_empty,
        s.source_ranges.len(),
    )
}

#[test]
fn north_south_frontends_follow_the_traffic_policies() {
    let all = eps(&[("10.244.1.2", 8080), ("10.244.2.2", 8080)]);
    let n1 = eps(&[("10.244.1.2", 8080)]);

    // Cluster: outsiders reach every endpoint through SNAT; pods reach every endpoint.
    let t = translate(&objects(&LB.replace("POLICY", "Cluster")), &on_node("n1"));
    // Pods: ClusterIP, externalIP, LB IP, NodePort; outsiders: externalIP, LB IP, NodePort.
    assert_eq!(
        t.desired.len(),
        7,
        "{:#?}",
        t.desired.keys().collect::<Vec<_>>()
    );
    for f in [
        fe("10.96.0.60", 80, Protocol::Tcp),
        fe("198.51.100.7", 80, Protocol::Tcp),
        fe("192.0.2.10", 80, Protocol::Tcp),
        fe("0.0.0.0", 30080, Protocol::Tcp),
    ] {
        assert_eq!(shape(&t, f), (all.clone(), false, false, 0), "{f}");
    }
    assert_eq!(
        shape(&t, external("198.51.100.7", 80)),
        (all.clone(), true, false, 0)
    );
    assert_eq!(
        shape(&t, external("0.0.0.0", 30080)),
        (all.clone(), true, false, 0)
    );
    // Source ranges guard the LoadBalancer IP only (IPv6 ranges skipped, bare IP = /32).
    assert_eq!(
        shape(&t, external("192.0.2.10", 80)),
        (all.clone(), true, false, 2)
    );
    let ranges: Vec<String> = t.desired[&external("192.0.2.10", 80)]
        .source_ranges
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ranges, ["203.0.113.0/24", "192.0.2.9/32"]);
    assert!(
        t.health_checks.is_empty(),
        "health checks are for Local only"
    );

    // Local on n1: outsiders reach n1's endpoint with their address kept; pods still reach all.
    let t = translate(&objects(&LB.replace("POLICY", "Local")), &on_node("n1"));
    assert_eq!(
        shape(&t, external("192.0.2.10", 80)),
        (n1.clone(), false, true, 2)
    );
    assert_eq!(
        shape(&t, external("0.0.0.0", 30080)),
        (n1.clone(), false, true, 0)
    );
    assert_eq!(
        shape(&t, fe("192.0.2.10", 80, Protocol::Tcp)),
        (all.clone(), false, false, 0)
    );
    assert_eq!(t.health_checks[&32000].local_endpoints, 1);
    assert_eq!(t.health_checks[&32000].name, "lb");

    // Local on a node without endpoints: outsiders are dropped, the health check says 0.
    let t = translate(&objects(&LB.replace("POLICY", "Local")), &on_node("n3"));
    assert_eq!(
        shape(&t, external("0.0.0.0", 30080)),
        (vec![], false, true, 0)
    );
    assert_eq!(t.health_checks[&32000].local_endpoints, 0);

    // n1's only ready endpoint gone: its serving+terminating one takes over locally.
    let yaml = LB
        .replace("POLICY", "Local")
        .replace("- {addresses: [10.244.1.2], nodeName: n1}\n", "");
    let t = translate(&objects(&yaml), &on_node("n1"));
    assert_eq!(
        shape(&t, external("0.0.0.0", 30080)).0,
        eps(&[("10.244.1.3", 8080)])
    );
    assert_eq!(
        t.health_checks[&32000].local_endpoints, 0,
        "terminating is not ready"
    );
}

#[test]
fn internal_traffic_policy_local_limits_clusterip_to_this_node() {
    let yaml = LB.replace("POLICY", "Cluster").replace(
        "  externalTrafficPolicy",
        "  internalTrafficPolicy: Local\n  externalTrafficPolicy",
    );
    let t = translate(&objects(&yaml), &on_node("n2"));
    assert_eq!(
        shape(&t, fe("10.96.0.60", 80, Protocol::Tcp)),
        (eps(&[("10.244.2.2", 8080)]), false, true, 0)
    );
    // Not the external addresses: internalTrafficPolicy is about ClusterIP traffic.
    assert_eq!(shape(&t, fe("192.0.2.10", 80, Protocol::Tcp)).0.len(), 2);
}

#[test]
fn bad_source_range_is_reported_and_ignored() {
    let before = crate::source::validate::rejected_counts()
        .get(&("Service", "cidr"))
        .copied()
        .unwrap_or(0);
    let yaml = LB
        .replace("POLICY", "Cluster")
        .replace("\"192.0.2.9/32\"", "\"192.0.2.300/8\"");
    let t = translate(&objects(&yaml), &on_node("n1"));
    assert_eq!(shape(&t, external("192.0.2.10", 80)).3, 1);
    // Refused where the object is read (named with its file), as the API server would.
    let after = crate::source::validate::rejected_counts()[&("Service", "cidr")];
    assert!(after > before, "counted as a rejection");
}

/// A dual-stack `web` (ClusterIPs of both families) with one slice per family, as the
/// EndpointSlice controller writes them.
fn dual_stack(policy: &str, extra_spec: &str, status: &str) -> String {
    let service = WEB.replace(
        "  clusterIP: 10.96.0.10\n",
        &format!(
            "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00:10:96::10']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: {policy}\n{extra_spec}"
        ),
    );
    let v4 = slice(
        "web-v4",
        "- {addresses: [10.244.1.2], nodeName: node-a}\n- {addresses: [10.244.2.3], nodeName: node-b}",
    );
    let v6 = slice(
        "web-v6",
        "- {addresses: ['fd00:10:244:1::2'], nodeName: node-a}\n- {addresses: ['fd00:10:244:2::3'], nodeName: node-b}",
    )
    .replace("addressType: IPv4", "addressType: IPv6");
    format!("{service}{status}{v4}{v6}")
}

#[test]
fn dual_stack_services_balance_each_family_to_its_own_endpoints() {
    for policy in ["PreferDualStack", "RequireDualStack"] {
        let t = translate(&objects(&dual_stack(policy, "", "")), &Options::default());
        let got: Vec<(Frontend, Vec<Endpoint>)> = t
            .desired
            .iter()
            .map(|(f, s)| (*f, s.endpoints.clone()))
            .collect();
        let mut want = vec![
            (
                fe("10.96.0.10", 80, Protocol::Tcp),
                eps(&[("10.244.1.2", 8080), ("10.244.2.3", 8080)]),
            ),
            (
                fe("10.96.0.10", 53, Protocol::Udp),
                eps(&[("10.244.1.2", 5353), ("10.244.2.3", 5353)]),
            ),
            (
                fe("fd00:10:96::10", 80, Protocol::Tcp),
                eps(&[("fd00:10:244:1::2", 8080), ("fd00:10:244:2::3", 8080)]),
            ),
            (
                fe("fd00:10:96::10", 53, Protocol::Udp),
                eps(&[("fd00:10:244:1::2", 5353), ("fd00:10:244:2::3", 5353)]),
            ),
        ];
        want.sort();
        assert_eq!(got, want, "{policy}");
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    // SingleStack IPv6: only IPv6 frontends; the IPv4 slice is not read.
    let yaml = dual_stack("SingleStack", "", "").replace(
        "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00:10:96::10']\n  ipFamilies: [IPv4, IPv6]",
        "clusterIP: 'fd00:10:96::10'\n  clusterIPs: ['fd00:10:96::10']\n  ipFamilies: [IPv6]",
    );
    let t = translate(&objects(&yaml), &Options::default());
    assert!(!t.desired.is_empty());
    for (frontend, spec) in &t.desired {
        assert_eq!(frontend.family(), Family::V6, "{frontend}");
        assert!(spec.endpoints.iter().all(|e| e.ip.is_ipv6()), "{frontend}");
    }
}

#[test]
fn dual_stack_node_ports_policies_and_source_ranges_are_per_family() {
    let extra = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [203.0.113.0/24, '2001:db8:1::/48']\n";
    let status = "status:\n  loadBalancer:\n    ingress: [{ip: 192.0.2.10}, {ip: '2001:db8::1'}]\n";
    let yaml = dual_stack("RequireDualStack", extra, status).replace(
        "- {name: http, port: 80, targetPort: http}",
        "- {name: http, port: 80, targetPort: http, nodePort: 30080}",
    );
    let options = Options {
        node_name: Some("node-a".into()),
        ..Options::default()
    };
    let t = translate(&objects(&yaml), &options);
    let external = |ip: &str, port| {
        let frontend = Frontend {
            scope: Scope::External,
            ..fe(ip, port, Protocol::Tcp)
        };
        t.desired
            .get(&frontend)
            .unwrap_or_else(|| panic!("{frontend} missing: {:?}", t.desired.keys()))
    };
    // NodePorts on the node's addresses of both families, Local: this node's endpoint only,
    // of the family.
    assert_eq!(
        external("0.0.0.0", 30080).endpoints,
        eps(&[("10.244.1.2", 8080)])
    );
    assert_eq!(
        external("::", 30080).endpoints,
        eps(&[("fd00:10:244:1::2", 8080)])
    );
    // Each LoadBalancer IP checks the ranges of its family only.
    let ranges = |ip: &str| -> Vec<String> {
        external(ip, 80)
            .source_ranges
            .iter()
            .map(|r| r.to_string())
            .collect()
    };
    assert_eq!(ranges("192.0.2.10"), ["203.0.113.0/24"]);
    assert_eq!(ranges("2001:db8::1"), ["2001:db8:1::/48"]);
    assert!(
        !external("2001:db8::1", 80).snat,
        "Local keeps the client address"
    );
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
}

#[test]
fn addresses_of_a_family_the_service_lacks_are_ignored_with_a_warning() {
    // An IPv4-only Service with an IPv6 externalIP: kube-proxy's IPv6 proxier does not
    // know the Service at all.
    let yaml = WEB.replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  externalIPs: ['2001:db8::7']\n",
    );
    let t = translate(&objects(&yaml), &Options::default());
    assert!(t.desired.keys().all(|f| f.family() == Family::V4));
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("shop/web") && w.contains("2001:db8::7")),
        "{:?}",
        t.warnings
    );
}

#[test]
fn a_remembering_translator_gives_what_a_fresh_translation_gives() {
    // Every table case, one after another and twice each, through one translator: whatever
    // it remembers from the case before must not leak into the next.
    let mut translator = Translator::default();
    for case in cases().iter().chain(cases().iter()) {
        let objects = objects(&case.yaml);
        let options = Options::default();
        assert_eq!(
            translator.translate(&objects, &options).clone(),
            translate(&objects, &options),
            "{}",
            case.name
        );
    }
}

#[test]
fn only_changed_services_are_translated_again() {
    let first = objects(&format!(
        "{WEB}{}",
        slice("web-1", "- {addresses: [10.244.1.2]}")
    ));
    let mut translator = Translator::default();
    let options = Options::default();
    let before = translator.translate(&first, &options).clone();
    // The same Service object, a new slice: the new endpoint shows up.
    let changed = objects(&slice("web-1", "- {addresses: [10.244.9.9]}"));
    let second = Objects {
        services: first.services.clone(),
        slices: changed.slices.clone(),
        ..Objects::default()
    };
    let after = translator.translate(&second, &options).clone();
    assert_eq!(after, translate(&second, &options));
    assert_ne!(after, before);
    let http = fe("10.96.0.10", 80, Protocol::Tcp);
    assert_eq!(after.desired[&http].endpoints, eps(&[("10.244.9.9", 8080)]));
    // Both ports' frontends changed (the new slice carries both); nothing else was there.
    let dns = fe("10.96.0.10", 53, Protocol::Udp);
    let mut changed = vec![http, dns];
    changed.sort();
    assert_eq!(translator.take_changed(), changed);
    translator.translate(&second, &options);
    assert_eq!(
        translator.take_changed(),
        [],
        "same objects: nothing changed"
    );
    // Other options (here the zone) translate everything again.
    let zoned = Options {
        zone: Some("a".into()),
        ..Options::default()
    };
    assert_eq!(
        translator.translate(&second, &zoned).clone(),
        translate(&second, &zoned)
    );
}

#[test]
fn a_shared_frontend_passes_to_the_next_service_when_its_owner_goes() {
    let svc = |name: &str, ep: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{clusterIP: 10.96.0.77, ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{ep}]}}]\n"
        )
    };
    let both = objects(&format!(
        "{}{}",
        svc("a", "10.244.0.1"),
        svc("b", "10.244.0.2")
    ));
    let only_b = Objects {
        services: both.services[1..].to_vec(),
        slices: both.slices[1..].to_vec(),
        ..Objects::default()
    };
    let http = fe("10.96.0.77", 80, Protocol::Tcp);
    let options = Options::default();
    let mut translator = Translator::default();
    for (objects, owner) in [
        (&both, "10.244.0.1"),
        (&only_b, "10.244.0.2"),
        (&both, "10.244.0.1"),
    ] {
        let got = translator.translate(objects, &options).clone();
        assert_eq!(got, translate(objects, &options));
        assert_eq!(got.desired[&http].endpoints, eps(&[(owner, 8080)]));
    }
    let warnings = &translate(&both, &options).warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("shop/b") && w.contains("already used by shop/a")),
        "{warnings:?}"
    );
}

/// Cases of kube-proxy's `TestCategorizeEndpoints` (pkg/proxy/topology_test.go), as
/// kube-proxy 1.34 decides them: hints alone choose the topology (the annotation is gone),
/// node hints before zone hints, the terminating fallback ignoring topology.
mod categorize_table {
    use super::super::endpoints::{Categorized, EndpointInfo, categorize};
    use crate::model::Endpoint;

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            ip: [10, 1, 2, last].into(),
            port: 80,
        }
    }

    /// (last octet, ready, serving, terminating, local, zone hints, node hints)
    type Row = (
        u8,
        bool,
        bool,
        bool,
        bool,
        &'static [&'static str],
        &'static [&'static str],
    );

    fn infos(rows: &[Row]) -> Vec<EndpointInfo> {
        rows.iter()
            .map(
                |&(last, ready, serving, terminating, local, zones, nodes)| EndpointInfo {
                    endpoint: ep(last),
                    ready,
                    serving,
                    terminating,
                    local,
                    zone_hints: zones.iter().map(|z| z.to_string()).collect(),
                    node_hints: nodes.iter().map(|n| n.to_string()).collect(),
                },
            )
            .collect()
    }

    const R: (bool, bool, bool) = (true, true, false); // ready
    const U: (bool, bool, bool) = (false, false, false); // unready, not serving
    const T: (bool, bool, bool) = (false, true, true); // serving, terminating
    const RT: (bool, bool, bool) = (true, true, true); // ready while terminating

    fn row(
        last: u8,
        (ready, serving, terminating): (bool, bool, bool),
        local: bool,
        zones: &'static [&'static str],
        nodes: &'static [&'static str],
    ) -> Row {
        (last, ready, serving, terminating, local, zones, nodes)
    }

    struct Case {
        name: &'static str,
        zone: Option<&'static str>,
        endpoints: Vec<Row>,
        cluster: Vec<u8>,
        local: Vec<u8>,
        any: bool,
    }

    #[test]
    fn as_kube_proxy_categorizes() {
        let a: &[&str] = &["zone-a"];
        let b: &[&str] = &["zone-b"];
        let c: &[&str] = &["zone-c"];
        let none: &[&str] = &[];
        let cases = vec![
            Case {
                name: "zone hints, some for this zone: only those",
                zone: Some("zone-a"),
                endpoints: vec![
                    row(3, R, false, a, none),
                    row(4, R, false, b, none),
                    row(5, R, false, c, none),
                    row(6, R, false, a, none),
                ],
                cluster: vec![3, 6],
                local: vec![],
                any: true,
            },
            Case {
                name: "Local policies ignore topology (local endpoints of every zone)",
                zone: Some("zone-a"),
                endpoints: vec![
                    row(3, R, true, a, none),
                    row(4, R, true, b, none),
                    row(5, R, false, c, none),
                    row(6, R, false, a, none),
                ],
                cluster: vec![3, 6],
                local: vec![3, 4],
                any: true,
            },
            Case {
                name: "node without a zone label: no filtering",
                zone: None,
                endpoints: vec![row(3, R, false, a, none)],
                cluster: vec![3],
                local: vec![],
                any: true,
            },
            Case {
                name: "node in another zone than every hint: no filtering",
                zone: Some("zone-b"),
                endpoints: vec![row(3, R, false, a, none)],
                cluster: vec![3],
                local: vec![],
                any: true,
            },
            Case {
                name: "unready endpoint of this zone is not used",
                zone: Some("zone-a"),
                endpoints: vec![
                    row(3, R, false, a, none),
                    row(4, R, false, b, none),
                    row(5, R, false, c, none),
                    row(6, U, false, a, none),
                ],
                cluster: vec![3],
                local: vec![],
                any: true,
            },
            Case {
                name: "only unready endpoints in this zone: no filtering",
                zone: Some("zone-a"),
                endpoints: vec![
                    row(3, U, false, a, none),
                    row(4, R, false, b, none),
                    row(5, R, false, c, none),
                    row(6, U, false, a, none),
                ],
                cluster: vec![4, 5],
                local: vec![],
                any: true,
            },
            Case {
                name: "an endpoint without hints: no filtering",
                zone: Some("zone-a"),
                endpoints: vec![
                    row(3, R, false, a, none),
                    row(4, R, false, b, none),
                    row(5, R, false, none, none),
                    row(6, R, false, a, none),
                ],
                cluster: vec![3, 4, 5, 6],
                local: vec![],
                any: true,
            },
            Case {
                name: "several hints per endpoint: any naming this zone",
                zone: Some("zone-c"),
                endpoints: vec![
                    row(3, R, false, &["zone-a", "zone-b", "zone-c"], none),
                    row(4, R, false, &["zone-b", "zone-c"], none),
                    row(5, R, false, &["zone-b", "zone-d"], none),
                    row(6, R, false, c, none),
                ],
                cluster: vec![3, 4, 6],
                local: vec![],
                any: true,
            },
            Case {
                name: "PreferSameNode: node hints naming this node win over zone hints",
                zone: Some("zone-a"),
                endpoints: vec![
                    row(3, R, true, a, &["node1"]),
                    row(4, R, false, a, &["node2"]),
                    row(5, R, false, b, &["node3"]),
                ],
                cluster: vec![3],
                local: vec![3],
                any: true,
            },
            Case {
                name: "node hints, none for this node: zone hints decide",
                zone: Some("zone-a"),
                endpoints: vec![
                    row(4, R, false, a, &["node2"]),
                    row(5, R, false, b, &["node3"]),
                ],
                cluster: vec![4],
                local: vec![],
                any: true,
            },
            Case {
                name: "no endpoints: none anywhere (Local policies reject)",
                zone: None,
                endpoints: vec![],
                cluster: vec![],
                local: vec![],
                any: false,
            },
            Case {
                name: "all endpoints remote: none local but some anywhere (Local drops)",
                zone: None,
                endpoints: vec![row(0, R, false, none, none), row(1, R, false, none, none)],
                cluster: vec![0, 1],
                local: vec![],
                any: true,
            },
            Case {
                name: "endpoints not ready: none usable",
                zone: None,
                endpoints: vec![row(0, U, false, none, none), row(1, U, false, none, none)],
                cluster: vec![],
                local: vec![],
                any: false,
            },
            Case {
                name: "all terminating: the serving ones, local and remote",
                zone: None,
                endpoints: vec![row(0, T, true, none, none), row(1, T, false, none, none)],
                cluster: vec![0, 1],
                local: vec![0],
                any: true,
            },
            Case {
                name: "all remote and terminating: Local has none but there are some (drop)",
                zone: None,
                endpoints: vec![row(0, T, false, none, none), row(1, T, false, none, none)],
                cluster: vec![0, 1],
                local: vec![],
                any: true,
            },
            Case {
                name: "local serving-terminating endpoint for Local when no local one is ready",
                zone: None,
                endpoints: vec![
                    row(0, R, false, none, none),
                    row(1, U, true, none, none),
                    row(2, T, true, none, none),
                    row(3, T, false, none, none),
                ],
                cluster: vec![0],
                local: vec![2],
                any: true,
            },
            Case {
                name: "ready while terminating (publishNotReadyAddresses) counts as ready",
                zone: None,
                endpoints: vec![row(0, RT, false, none, none), row(1, T, false, none, none)],
                cluster: vec![0],
                local: vec![],
                any: true,
            },
            Case {
                name: "the terminating fallback ignores topology",
                zone: Some("zone-a"),
                endpoints: vec![row(0, T, false, b, none), row(1, T, false, c, none)],
                cluster: vec![0, 1],
                local: vec![],
                any: true,
            },
        ];
        for case in cases {
            let got = categorize(&infos(&case.endpoints), Some("node1"), case.zone);
            let want = Categorized {
                cluster: case.cluster.iter().map(|l| ep(*l)).collect(),
                local: case.local.iter().map(|l| ep(*l)).collect(),
                any: case.any,
                local_ready: got.local_ready,
            };
            assert_eq!(got, want, "case: {}", case.name);
        }
    }
}

/// kube-proxy behaviours the conformance issue lists, at the Service level.
#[test]
fn kube_proxy_conformance_cases() {
    let http = fe("10.96.0.10", 80, Protocol::Tcp);
    // The headless label is honoured even with a ClusterIP.
    let headless = WEB.replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, labels: {service.kubernetes.io/headless: ''}}",
    );
    let t = translate(
        &objects(&format!(
            "{headless}{}",
            slice("web-1", "- {addresses: [10.244.1.2]}")
        )),
        &Options::default(),
    );
    assert!(t.desired.is_empty(), "{:?}", t.desired.keys());

    // ready: true counts even while terminating (publishNotReadyAddresses Services).
    let t = translate(
        &objects(&format!(
            "{WEB}{}",
            slice(
                "web-1",
                "- {addresses: [10.244.1.2], conditions: {ready: true, serving: true, terminating: true}}\n\
                 - {addresses: [10.244.2.3], conditions: {ready: false, serving: true, terminating: true}}"
            )
        )),
        &Options::default(),
    );
    assert_eq!(t.desired[&http].endpoints, eps(&[("10.244.1.2", 8080)]));

    // Zone hints apply without any annotation or trafficDistribution.
    let hinted = slice(
        "web-1",
        "- {addresses: [10.244.1.2], nodeName: n1, hints: {forZones: [{name: zone-a}]}}\n\
         - {addresses: [10.244.2.3], nodeName: n2, hints: {forZones: [{name: zone-b}]}}",
    );
    let in_zone_a = Options {
        node_name: Some("n1".into()),
        zone: Some("zone-a".into()),
        ..Options::default()
    };
    let t = translate(&objects(&format!("{WEB}{hinted}")), &in_zone_a);
    assert_eq!(t.desired[&http].endpoints, eps(&[("10.244.1.2", 8080)]));

    // PreferSameNode: node hints for this node keep traffic on it.
    let node_hinted = slice(
        "web-1",
        "- {addresses: [10.244.1.2], nodeName: n1, hints: {forNodes: [{name: n1}], forZones: [{name: zone-a}]}}\n\
         - {addresses: [10.244.1.3], nodeName: n3, hints: {forNodes: [{name: n3}], forZones: [{name: zone-a}]}}",
    );
    let t = translate(&objects(&format!("{WEB}{node_hinted}")), &in_zone_a);
    assert_eq!(t.desired[&http].endpoints, eps(&[("10.244.1.2", 8080)]));

    // endpointslicecache.go: an unset `serving` is true, so a terminating endpoint without
    // it still serves in the fallback.
    let t = translate(
        &objects(&format!(
            "{WEB}{}",
            slice(
                "web-1",
                "- {addresses: [10.244.1.2], conditions: {ready: false, terminating: true}}"
            )
        )),
        &Options::default(),
    );
    assert_eq!(t.desired[&http].endpoints, eps(&[("10.244.1.2", 8080)]));

    // endpointslicecache.go: an endpoint in two slices counts once, the local copy winning,
    // so a Local policy finds it.
    let itp_local = WEB.replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n",
    );
    let twice = format!(
        "{itp_local}{}{}",
        slice("web-1", "- {addresses: [10.244.1.2], nodeName: n2}"),
        slice("web-2", "- {addresses: [10.244.1.2], nodeName: n1}")
    );
    let t = translate(&objects(&twice), &on_node("n1"));
    assert_eq!(t.desired[&http].endpoints, eps(&[("10.244.1.2", 8080)]));

    // internalTrafficPolicy Local: no endpoint anywhere rejects (like Cluster); endpoints
    // only on other nodes drop.
    let t = translate(&objects(&itp_local), &on_node("n1"));
    assert_eq!(
        shape(&t, http),
        (vec![], false, false, 0),
        "none anywhere: reject"
    );
    let remote = slice("web-1", "- {addresses: [10.244.2.3], nodeName: n2}");
    let t = translate(&objects(&format!("{itp_local}{remote}")), &on_node("n1"));
    assert_eq!(
        shape(&t, http),
        (vec![], false, true, 0),
        "elsewhere only: drop"
    );
}

#[test]
fn external_local_policy_rejects_without_endpoints_anywhere() {
    // The LB fixture without its slice: no endpoints at all.
    let lb = LB.replace("POLICY", "Local");
    let service_only = &lb[..lb.find("---").expect("slice separator")];
    let t = translate(&objects(service_only), &on_node("n1"));
    // (frontend, source ranges it carries): the LB IP has the two IPv4 ranges.
    for (f, ranges) in [
        (external("192.0.2.10", 80), 2),
        (external("0.0.0.0", 30080), 0),
    ] {
        assert_eq!(shape(&t, f), (vec![], false, false, ranges), "{f}");
    }
}

#[test]
fn cluster_ips_from_outside_are_masqueraded_with_a_cluster_cidr() {
    let http = fe("10.96.0.10", 80, Protocol::Tcp);
    let outside = Frontend {
        scope: Scope::External,
        ..http
    };
    let yaml = format!("{WEB}{}", slice("web-1", "- {addresses: [10.244.1.2]}"));
    let plain = translate(&objects(&yaml), &Options::default());
    assert!(
        !plain.desired.contains_key(&outside),
        "kube-proxy without clusterCIDR"
    );
    let masq = Options {
        masquerade_outside: true,
        ..Options::default()
    };
    let t = translate(&objects(&yaml), &masq);
    assert_eq!(
        shape(&t, outside),
        (eps(&[("10.244.1.2", 8080)]), true, false, 0)
    );
    assert_eq!(
        shape(&t, http),
        (eps(&[("10.244.1.2", 8080)]), false, false, 0)
    );
}
