//! End to end: kube-proxy's behaviours that xlb used to differ from (the scenarios of the
//! conformance issue, from kube-proxy's topology and proxier tests), with real connections
//! from a client pod through the real agent. Needs root.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use xlb_tests::{
    cluster::{Cluster, wait_until},
    privilege::require_privileges,
    workload::tcp_hello,
};

const NODE: &str = "conformance-node";

fn addr(ip: &str) -> SocketAddr {
    format!("{ip}:80").parse().expect("address")
}

fn service(name: &str, vip: &str, extra_spec: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{{labels}}}\n\
         spec:\n  clusterIP: {vip}\n{extra_spec}  ports:\n  - {{name: http, port: 80, protocol: TCP}}\n---\n"
    )
}

/// An EndpointSlice of `service` with raw endpoint entries (YAML flow mappings).
fn slice(service: &str, endpoints: &[String]) -> String {
    let list = if endpoints.is_empty() {
        " []".to_string()
    } else {
        endpoints.iter().map(|e| format!("\n- {e}")).collect()
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:{list}\n---\n"
    )
}

fn endpoint(ip: &str, node: &str, conditions: &str, hints: &str) -> String {
    format!(
        "{{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{{conditions}}}, hints: {{{hints}}}}}"
    )
}

/// Which backends answer 20 connections from the client (errors as "error").
fn answers(c: &Cluster, vip: &str) -> BTreeSet<String> {
    let target = addr(vip);
    c.node
        .pod("client")
        .ns
        .enter(move || {
            (0..20)
                .map(|_| {
                    tcp_hello(target, Duration::from_secs(1)).unwrap_or_else(|_| "error".into())
                })
                .collect()
        })
        .expect("client thread")
}

/// How a connection to `vip` ends: the backend's name, "refused" (at once) or "silence".
fn outcome(c: &Cluster, vip: &str) -> String {
    let target = addr(vip);
    c.node
        .pod("client")
        .ns
        .enter(move || {
            let started = Instant::now();
            match tcp_hello(target, Duration::from_millis(800)) {
                Ok(name) => name,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    assert!(
                        started.elapsed() < Duration::from_millis(500),
                        "slow refusal"
                    );
                    "refused".into()
                }
                Err(_) => "silence".into(),
            }
        })
        .expect("client thread")
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn kube_proxy_behaviours_with_real_connections() {
    require_privileges();
    let mut c = Cluster::new(&[
        ("client", "10.244.0.2"),
        ("be1", "10.244.0.11"),
        ("be2", "10.244.0.12"),
    ])
    .expect("topology");
    let ready = "ready: true";
    let manifests = [
        // This node, in zone-a (the manifests source reads its Node for topology).
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n  labels: {{topology.kubernetes.io/zone: zone-a}}\n---\n"
        ),
        // Headless by label, though it has a ClusterIP: not proxied.
        service("labelled", "10.96.0.50", "", "service.kubernetes.io/headless: ''"),
        slice("labelled", &[endpoint("10.244.0.11", NODE, ready, "")]),
        // internalTrafficPolicy Local, endpoints only on another node: dropped.
        service("elsewhere", "10.96.0.51", "  internalTrafficPolicy: Local\n", ""),
        slice("elsewhere", &[endpoint("10.244.0.12", "other-node", ready, "")]),
        // internalTrafficPolicy Local, no endpoints at all: rejected like a Cluster one.
        service("nowhere", "10.96.0.52", "  internalTrafficPolicy: Local\n", ""),
        slice("nowhere", &[]),
        // A pod that is ready while terminating (publishNotReadyAddresses) keeps serving.
        service("draining", "10.96.0.53", "  publishNotReadyAddresses: true\n", ""),
        slice(
            "draining",
            &[endpoint("10.244.0.11", NODE, "ready: true, serving: true, terminating: true", "")],
        ),
        // Zone hints, no annotation: only zone-a's endpoint.
        service("zoned", "10.96.0.54", "", ""),
        slice(
            "zoned",
            &[
                endpoint("10.244.0.11", NODE, ready, "forZones: [{name: zone-a}]"),
                endpoint("10.244.0.12", "other-node", ready, "forZones: [{name: zone-b}]"),
            ],
        ),
        // PreferSameNode: node hints keep traffic on this node.
        service("same-node", "10.96.0.55", "  trafficDistribution: PreferSameNode\n", ""),
        slice(
            "same-node",
            &[
                endpoint("10.244.0.12", NODE, ready, &format!("forNodes: [{{name: {NODE}}}]")),
                endpoint("10.244.0.11", "other-node", ready, "forNodes: [{name: other-node}]"),
            ],
        ),
    ]
    .concat();
    c.write_manifest("all.yaml", &manifests).expect("write");
    c.agent_args = ["--node-name", NODE].map(String::from).to_vec();
    c.start_agent().expect("agent");
    c.wait_attached(Duration::from_secs(10)).expect("attached");
    wait_until(Duration::from_secs(5), || {
        c.programmed("10.96.0.55:80/TCP")
            .is_some_and(|b| b.len() == 1)
    })
    .unwrap_or_else(|_| panic!("not programmed; log:\n{}", c.log()));

    assert_eq!(
        c.programmed("10.96.0.50:80/TCP"),
        None,
        "headless label honoured"
    );
    assert_eq!(outcome(&c, "10.96.0.50"), "silence", "no proxying for it");
    assert_eq!(
        outcome(&c, "10.96.0.51"),
        "silence",
        "Local, endpoints elsewhere: drop"
    );
    assert_eq!(
        outcome(&c, "10.96.0.52"),
        "refused",
        "Local, none anywhere: reject"
    );
    assert_eq!(
        answers(&c, "10.96.0.53"),
        ["be1".to_string()].into(),
        "ready+terminating"
    );
    assert_eq!(
        answers(&c, "10.96.0.54"),
        ["be1".to_string()].into(),
        "zone hints"
    );
    assert_eq!(
        answers(&c, "10.96.0.55"),
        ["be2".to_string()].into(),
        "node hints"
    );
}
