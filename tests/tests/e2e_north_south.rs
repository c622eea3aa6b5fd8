//! End to end from outside: an external client and two nodes on one L2 segment, each node
//! running the real agent with XDP on its external interface and backends of its own.
//! Needs root (see `privilege`).
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::Duration,
};

use xlb_tests::{
    cluster::{Cluster, wait_until},
    lan::Lan,
    netns::{Netns, unique_tag},
    privilege::require_privileges,
    workload::{assert_offloaded_checksums_come_out_right, tcp_hello, udp_whoami},
};

const T: Duration = Duration::from_secs(1);
const NODE1: &str = "192.168.50.1";
const NODE2: &str = "192.168.50.2";
const CLIENT: &str = "192.168.50.100";
const LB_IP: &str = "192.0.2.10";
const EXTERNAL_IP: &str = "198.51.100.7";

/// Services of the test, the same files on both nodes:
/// - `web`: NodePort 30080 (TCP) / 30053 (UDP), externalTrafficPolicy Cluster, an endpoint
///   on each node, externalIP 198.51.100.7;
/// - `local`: LoadBalancer 192.0.2.10, externalTrafficPolicy Local, NodePort 30081/30054,
///   healthCheckNodePort 32001, its only endpoint on node1, source range limited to the
///   client's /32 — and a second source range that the test edits.
fn manifests() -> String {
    let service = |name: &str, extra: &str, ports: (u16, u16)| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  clusterIP: 10.96.0.{}\n{extra}  ports:\n\
             \x20 - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: {}}}\n\
             \x20 - {{name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: {}}}\n",
            if name == "web" { 10 } else { 20 },
            ports.0,
            ports.1
        )
    };
    let slice = |name: &str, endpoints: &[(&str, &str)]| {
        let mut out = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n\
             \x20 namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
             - {{name: dns, port: 5353, protocol: UDP}}\nendpoints:\n"
        );
        for (ip, node) in endpoints {
            out.push_str(&format!("- {{addresses: [\"{ip}\"], nodeName: {node}}}\n"));
        }
        out
    };
    [
        service(
            "web",
            &format!("  type: NodePort\n  externalIPs: [{EXTERNAL_IP}]\n"),
            (30080, 30053),
        ),
        slice("web", &[("10.244.1.11", "node1"), ("10.244.2.11", "node2")]),
        service(
            "local",
            &format!(
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n\
                 \x20 loadBalancerSourceRanges: [{CLIENT}/32]\n"
            ),
            (30081, 30054),
        ) + &format!("status:\n  loadBalancer:\n    ingress: [{{ip: {LB_IP}}}]\n"),
        slice("local", &[("10.244.1.12", "node1")]),
    ]
    .join("---\n")
}

struct Site {
    /// node1, node2.
    nodes: Vec<Cluster>,
    client: Netns,
    _lan: Lan,
}

impl Site {
    fn new() -> Site {
        Site::with_config(None)
    }

    /// Both nodes' agents also get `--config` with this kube-proxy configuration.
    fn with_config(kube_proxy_config: Option<&str>) -> Site {
        let tag = unique_tag();
        let mut lan = Lan::new(&tag).expect("lan");
        let client = Netns::new(&tag, "client").expect("client ns");
        lan.connect(&client, "eth0", &format!("{CLIENT}/24"))
            .expect("client on the lan");
        // The provider's routers would send these to the nodes.
        for (ip, via) in [(LB_IP, NODE1), (EXTERNAL_IP, NODE2)] {
            client.ip(&["route", "add", ip, "via", via]).expect("route");
        }
        let mut nodes = Vec::new();
        for (n, node_ip, pods) in [
            (
                1,
                NODE1,
                [("web1", "10.244.1.11"), ("local1", "10.244.1.12")],
            ),
            (
                2,
                NODE2,
                [("web2", "10.244.2.11"), ("spare2", "10.244.2.12")],
            ),
        ] {
            let mut c = Cluster::new(&pods).expect("node");
            lan.connect(&c.node.ns, "ext0", &format!("{node_ip}/24"))
                .expect("node on the lan");
            let (other_pods, other_ip) = if n == 1 {
                ("10.244.2.0/24", NODE2)
            } else {
                ("10.244.1.0/24", NODE1)
            };
            c.node
                .ns
                .ip(&["route", "add", other_pods, "via", other_ip])
                .expect("pod route");
            c.write_manifest("all.yaml", &manifests())
                .expect("manifests");
            // Generic XDP: native XDP_TX on a veth needs NAPI on its peer (a bridge port
            // here), which NICs do not; the program is the same in both modes.
            c.agent_args = [
                "--external-ifaces",
                "ext0",
                "--xdp-mode",
                "generic",
                "--node-name",
                &format!("node{n}"),
            ]
            .map(String::from)
            .to_vec();
            if let Some(config) = kube_proxy_config {
                let path = c.scratch.path.join("kube-proxy.conf");
                std::fs::write(&path, config).expect("write the kube-proxy configuration");
                c.agent_args
                    .extend(["--config".to_string(), path.display().to_string()]);
            }
            c.start_agent().expect("agent");
            c.wait_attached(Duration::from_secs(10)).expect("attached");
            wait_until(Duration::from_secs(5), || {
                c.log().contains("attached to ext0 ")
                    && c.programmed("0.0.0.0:30080/TCP")
                        .is_some_and(|b| b.len() == 2)
            })
            .unwrap_or_else(|_| panic!("node{n} not programmed; log:\n{}", c.log()));
            nodes.push(c);
        }
        Site {
            nodes,
            client,
            _lan: lan,
        }
    }

    /// `n` UDP whoami requests from the client: (backend, address it saw) → count.
    fn whoami(&self, target: SocketAddr, n: usize) -> BTreeMap<(String, String), usize> {
        self.client
            .enter(move || {
                let mut seen = BTreeMap::new();
                for _ in 0..n {
                    let answer = udp_whoami(target, T)
                        .unwrap_or_else(|e| (format!("error: {e}"), String::new()));
                    *seen.entry(answer).or_insert(0) += 1;
                }
                seen
            })
            .expect("client thread")
    }

    fn tcp(&self, target: SocketAddr, n: usize) -> BTreeMap<String, usize> {
        self.client
            .enter(move || {
                let mut seen = BTreeMap::new();
                for _ in 0..n {
                    let who = tcp_hello(target, T).unwrap_or_else(|e| format!("error: {e}"));
                    *seen.entry(who).or_insert(0) += 1;
                }
                seen
            })
            .expect("client thread")
    }
}

/// GET http://ip:port/ from the client (as a cloud load balancer's health checker would):
/// (status code, body).
fn http_get(client: &Netns, ip: &str, port: u16) -> (u16, String) {
    let target = addr(ip, port);
    client
        .enter(move || {
            let mut conn = std::net::TcpStream::connect_timeout(&target, T).expect("connect");
            conn.set_read_timeout(Some(T)).expect("timeout");
            conn.write_all(b"GET / HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
                .expect("request");
            let mut response = String::new();
            let _ = conn.read_to_string(&mut response);
            let status = response
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            (status, body)
        })
        .expect("client thread")
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("address")
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn nodeport_cluster_reaches_both_nodes_and_backends_see_the_node() {
    require_privileges();
    let site = Site::new();
    for node in [NODE1, NODE2] {
        let seen = site.whoami(addr(node, 30053), 30);
        let backends: Vec<&str> = seen.keys().map(|(b, _)| b.as_str()).collect();
        assert!(
            backends.contains(&"web1") && backends.contains(&"web2"),
            "via {node}: {seen:?}"
        );
        for (backend, client_seen) in seen.keys() {
            assert_eq!(
                client_seen, node,
                "{backend} via {node} sees the node's address"
            );
        }
        let tcp = site.tcp(addr(node, 30080), 40);
        assert_eq!(
            tcp.keys().map(String::as_str).collect::<Vec<_>>(),
            ["web1", "web2"],
            "TCP via {node}"
        );
    }
    // externalIP (routed to node2) works the same way.
    let tcp = site.tcp(addr(EXTERNAL_IP, 80), 40);
    assert_eq!(
        tcp.keys().map(String::as_str).collect::<Vec<_>>(),
        ["web1", "web2"]
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn local_policy_keeps_the_client_address_and_health_checks_follow_endpoints() {
    require_privileges();
    let site = Site::new();
    // node1 has the endpoint: the backend sees the client itself, through NodePort and LB IP.
    for target in [addr(NODE1, 30054), addr(LB_IP, 53)] {
        let seen = site.whoami(target, 10);
        assert_eq!(
            seen,
            [(("local1".to_string(), CLIENT.to_string()), 10)].into(),
            "{target}"
        );
    }
    // node2 has none: it does not answer (dropped, not rejected) ...
    let seen = site.whoami(addr(NODE2, 30054), 3);
    assert!(
        seen.keys().all(|(answer, _)| answer.starts_with("error")),
        "{seen:?}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&site.nodes[1].xlb(&["stats", "--json"]).expect("stats"))
            .expect("json");
    assert!(
        stats["outcomes"]["drop_no_local_endpoint"].as_u64() >= Some(3),
        "{stats}"
    );
    // ... and its health check says so, while node1's says 200 with its endpoint count.
    let (status, body) = http_get(&site.client, NODE1, 32001);
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(json["localEndpoints"], 1);
    assert_eq!(json["service"]["name"], "local");
    let (status, body) = http_get(&site.client, NODE2, 32001);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn source_ranges_deny_clients_outside_them() {
    require_privileges();
    let site = Site::new();
    assert_eq!(site.whoami(addr(LB_IP, 53), 2).len(), 1, "allowed at first");
    for node in &site.nodes {
        let narrowed = manifests().replace(&format!("[{CLIENT}/32]"), "[192.168.50.200/32]");
        node.write_manifest("all.yaml", &narrowed).expect("write");
    }
    let stats = || -> serde_json::Value {
        serde_json::from_str(&site.nodes[0].xlb(&["stats", "--json"]).expect("stats"))
            .expect("json")
    };
    wait_until(Duration::from_secs(5), || {
        site.whoami(addr(LB_IP, 53), 1)
            .keys()
            .all(|(answer, _)| answer.starts_with("error"))
    })
    .expect("the client is outside the ranges now");
    assert!(stats()["outcomes"]["drop_source_range"].as_u64() >= Some(1));
    // The ranges guard the LoadBalancer IP only, as kube-proxy's do.
    let seen = site.whoami(addr(NODE1, 30054), 2);
    assert!(
        seen.keys().all(|(answer, _)| answer == "local1"),
        "{seen:?}"
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn hairpin_a_pod_reaching_itself_through_its_service() {
    require_privileges();
    let site = Site::new();
    // `local`'s only endpoint is local1 itself: its ClusterIP leads back to it.
    let answers = site.nodes[0]
        .node
        .pod("local1")
        .ns
        .enter(|| {
            let tcp = tcp_hello(addr("10.96.0.20", 80), T).unwrap_or_else(|e| format!("{e}"));
            let udp = udp_whoami(addr("10.96.0.20", 53), T)
                .unwrap_or_else(|e| (format!("{e}"), String::new()));
            (tcp, udp)
        })
        .expect("pod thread");
    assert_eq!(answers.0, "local1", "TCP hairpin");
    // kube-proxy's rule: the pod sees the connection come from the node, not from itself.
    assert_eq!(
        answers.1,
        ("local1".to_string(), NODE1.to_string()),
        "UDP hairpin"
    );
}

/// Offloaded (CHECKSUM_PARTIAL) checksums of a pod's packets, translated: requests to
/// node2's backend (DNAT on `xlb_from_pod`) leave node1 by `ext0`, replies to the client
/// (reverse NAT on `xlb_to_pod`) by the client's node-side interface, both with checksum
/// offload off, so the receivers check what the programs left (see the helper).
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn offloaded_pod_checksums_are_completed_right_after_translation() {
    require_privileges();
    let site = Site::new();
    let node1 = &site.nodes[0].node;
    assert_offloaded_checksums_come_out_right(
        &node1.ns,
        "ext0",
        node1.pod("local1"),
        &[&site.nodes[1].node.pod("web2").ns],
        "10.96.0.10".parse().expect("VIP"),
        &["web1", "web2"],
        40,
    );
}

/// A node process's TCP client: prints the backend's greeting and the peer it believes in.
const TCP_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
name = s.makefile().readline().strip()
print(name, s.getpeername()[0], s.getpeername()[1])
"#;

/// A node process's connected UDP client, as DNS stub resolvers are: on an error it opens a
/// new socket. Prints "backend peer-address" per answer, or "error".
const UDP_CLIENT: &str = r#"
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = None
for i in range(n):
    try:
        if s is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(0.5)
            s.connect((host, port))
        s.send(b"whoami")
        data, peer = s.recvfrom(64)
        print(data.decode().split()[0], peer[0], flush=True)
    except OSError as e:
        print("error", e, flush=True)
        s = None
    time.sleep(0.1)
"#;

/// A node process's unconnected UDP exchange: prints the answer and where it came from.
const UDP_SENDTO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(b"whoami", (sys.argv[1], int(sys.argv[2])))
data, peer = s.recvfrom(64)
print(data.decode().split()[0], peer[0], peer[1])
"#;

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn node_processes_reach_cluster_ips_and_node_ports() {
    require_privileges();
    let site = Site::new();
    let node1 = &site.nodes[0];
    for (ip, port) in [
        ("10.96.0.10", "80"),
        ("127.0.0.1", "30080"),
        (NODE1, "30080"),
    ] {
        let out = node1
            .node_process(TCP_CLIENT, &[ip, port])
            .expect("spawn")
            .wait_with_output()
            .expect("wait");
        let text = String::from_utf8_lossy(&out.stdout);
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert!(
            out.status.success() && matches!(fields.first(), Some(&"web1" | &"web2")),
            "{ip}:{port}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The process sees the address it asked for as its peer, not the backend's.
        assert_eq!(&fields[1..], [ip, port], "{ip}:{port}");
    }
    // Unconnected UDP: each datagram is balanced, the answer appears to come from the VIP.
    for (ip, port) in [("10.96.0.10", "53"), ("127.0.0.1", "30053")] {
        let out = node1
            .node_process(UDP_SENDTO, &[ip, port])
            .expect("spawn")
            .wait_with_output()
            .expect("wait");
        let text = String::from_utf8_lossy(&out.stdout);
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert!(
            matches!(fields.first(), Some(&"web1" | &"web2")),
            "{ip}:{port}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&fields[1..], [ip, port], "{ip}:{port}");
    }
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn connected_udp_socket_moves_off_a_removed_backend() {
    require_privileges();
    let site = Site::new();
    let node1 = &site.nodes[0];
    let mut child = node1
        .node_process(UDP_CLIENT, &["10.96.0.10", "53", "50"])
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                lines.lock().expect("lines").push(line);
            }
        })
    };
    wait_until(Duration::from_secs(5), || {
        lines.lock().expect("lines").len() >= 5
    })
    .expect("first answers");
    let first: Vec<String> = lines.lock().expect("lines").clone();
    let backend = first[0].split_whitespace().next().unwrap_or("").to_string();
    assert!(
        first
            .iter()
            .all(|l| l.starts_with(&format!("{backend} 10.96.0.10"))),
        "a connected socket stays on one backend, seen as the ClusterIP: {first:?}"
    );
    // Remove that backend's endpoint (the pod keeps running and would keep answering).
    let (gone, kept) = if backend == "web1" {
        ("10.244.1.11", "web2")
    } else {
        ("10.244.2.11", "web1")
    };
    for node in &site.nodes {
        let without = manifests().replace(&format!("- {{addresses: [\"{gone}\"]"), "# - ");
        node.write_manifest("all.yaml", &without).expect("write");
    }
    let removed_at = lines.lock().expect("lines").len();
    let status = child.wait().expect("client exits");
    reader.join().expect("reader");
    assert!(status.success());
    let after: Vec<String> = lines.lock().expect("lines")[removed_at..].to_vec();
    // Within a few answers (the agent syncs within 100 ms), only the kept backend answers.
    let settled: Vec<&String> = after.iter().skip(10).collect();
    assert!(settled.len() >= 20, "{after:?}");
    assert!(
        settled
            .iter()
            .all(|l| l.starts_with(&format!("{kept} 10.96.0.10"))),
        "after removing {backend}: {after:?}"
    );
    assert!(
        node1.log().contains("closed 1 node UDP socket(s)"),
        "{}",
        node1.log()
    );
}

/// With kube-proxy's clusterCIDR (read from its configuration file), a ClusterIP reached
/// from outside the pod network through a node is balanced and masqueraded to that node,
/// as kube-proxy's `! -s CLUSTER_CIDR -d CLUSTER_IP -j KUBE-MARK-MASQ` does; the ignored
/// fields are reported.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn cluster_ips_from_outside_are_masqueraded_with_kube_proxys_cluster_cidr() {
    require_privileges();
    let site = Site::with_config(Some(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         clusterCIDR: 10.244.0.0/16\nmode: nftables\nconntrack: {udpTimeout: 30s, maxPerCore: 0}\n",
    ));
    site.client
        .ip(&["route", "add", "10.96.0.10", "via", NODE1])
        .expect("route the ClusterIP to node1");
    let seen = site.whoami(addr("10.96.0.10", 53), 20);
    let backends: std::collections::BTreeSet<&str> = seen.keys().map(|(b, _)| b.as_str()).collect();
    assert!(
        seen.keys()
            .all(|(b, from)| b.starts_with("web") && from == NODE1),
        "every answer from a web backend, which saw node1: {seen:?}"
    );
    assert_eq!(backends.len(), 2, "both nodes' backends: {seen:?}");
    let log = site.nodes[0].log();
    assert!(
        log.contains("kube-proxy configuration: mode nftables")
            && log.contains("conntrack.maxPerCore"),
        "{log}"
    );
}
