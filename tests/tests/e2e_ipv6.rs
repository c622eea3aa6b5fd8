//! IPv6 and dual-stack end to end: pods with IPv6 addresses in namespaces, the real agent
//! (the DaemonSet's arguments), real TCP/UDP sockets over IPv6. Needs root.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use xlb_tests::{
    cluster::{Cluster, wait_until},
    manifests::{dual_stack_service, slice, slice6},
    netns::Netns,
    privilege::require_privileges,
    workload::{ring_whoami, tcp_connect, tcp_hello, udp_whoami},
};

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:10:96::10";
const EMPTY_VIP6: &str = "fd00:10:96::20";
const T: Duration = Duration::from_secs(2);

fn addr(ip: &str, port: u16) -> SocketAddr {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
    .parse()
    .expect("address")
}

/// A client and three backends with both families; `web` is dual-stack: its IPv4 slice
/// lists be1 and be2, its IPv6 slice be2 and be3 (so each family's answers show which
/// slice it used).
fn dual_stack_cluster() -> Cluster {
    let mut c = Cluster::dual_stack(&[
        ("client", "10.244.0.2", Some("fd00:10:244::2")),
        ("be1", "10.244.0.11", Some("fd00:10:244::11")),
        ("be2", "10.244.0.12", Some("fd00:10:244::12")),
        ("be3", "10.244.0.13", Some("fd00:10:244::13")),
    ])
    .expect("topology");
    c.write_manifest("web.yaml", &dual_stack_service("web", &[VIP4, VIP6]))
        .expect("write");
    c.write_manifest(
        "web-v4.yaml",
        &slice("web", &[("10.244.0.11", true), ("10.244.0.12", true)]),
    )
    .expect("write");
    c.write_manifest(
        "web-v6.yaml",
        &slice6(
            "web",
            &[("fd00:10:244::12", true), ("fd00:10:244::13", true)],
        ),
    )
    .expect("write");
    c.write_manifest("empty.yaml", &dual_stack_service("empty", &[EMPTY_VIP6]))
        .expect("write");
    c.write_manifest("empty-v6.yaml", &slice6("empty", &[]))
        .expect("write");
    c.start_agent().expect("agent");
    c.wait_attached(Duration::from_secs(10)).expect("attached");
    wait_until(Duration::from_secs(5), || {
        c.programmed(&format!("[{VIP6}]:80/TCP"))
            .is_some_and(|b| b.len() == 2)
            && c.programmed(&format!("{VIP4}:80/TCP"))
                .is_some_and(|b| b.len() == 2)
    })
    .unwrap_or_else(|e| panic!("programmed: {e}\n{}", c.log()));
    c
}

/// `n` TCP connections (or UDP requests) from `ns`, answers counted per backend.
fn spread(ns: &Netns, target: SocketAddr, n: usize, udp: bool) -> BTreeMap<String, usize> {
    xlb_tests::workload::spread(ns, target, n, udp, T)
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_dual_stack_service_answers_each_family_from_its_own_backends() {
    require_privileges();
    let c = dual_stack_cluster();
    let client = &c.node.pod("client").ns;
    for (family, vip, want) in [
        ("IPv4", VIP4, ["be1", "be2"]),
        ("IPv6", VIP6, ["be2", "be3"]),
    ] {
        for udp in [false, true] {
            let port = if udp { 53 } else { 80 };
            let counts = spread(client, addr(vip, port), 200, udp);
            let keys: Vec<&str> = counts.keys().map(String::as_str).collect();
            assert_eq!(keys, want, "{family} udp={udp}: {counts:?}\n{}", c.log());
            for (backend, n) in &counts {
                // Uniform random over 2: 100 each expected; 40 is > 8 standard deviations.
                assert!(
                    *n >= 40,
                    "{family} udp={udp}: {backend} got {n}: {counts:?}"
                );
            }
        }
    }
    // The backend sees the client's own IPv6 address (no SNAT for pods).
    let (_, seen) = client
        .enter(|| udp_whoami(addr(VIP6, 53), T))
        .expect("thread")
        .expect("whoami");
    assert_eq!(seen, "fd00:10:244::2");

    // The read commands show IPv6 frontends, backends and flows in [addr]:port notation.
    let services = c.xlb(&["services"]).expect("services");
    assert!(services.contains(&format!("[{VIP6}]:80/TCP")), "{services}");
    assert!(services.contains("[fd00:10:244::13]:8080"), "{services}");
    let ct = c.xlb(&["conntrack"]).expect("conntrack");
    assert!(ct.contains(&format!("dst=[{VIP6}]:80")), "{ct}");
    assert!(ct.contains("src=[fd00:10:244::2]:"), "{ct}");
    let metrics = c.metrics().expect("metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("xlb_frontend_info{")
            && l.contains(&format!("frontend=\"[{VIP6}]:80/TCP\""))
            && l.contains("family=\"IPv6\"")),
        "{metrics}"
    );
    let stats = c.xlb(&["stats"]).expect("stats");
    assert!(stats.contains("XLB_CT6"), "{stats}");
    // Outcomes per family: IPv6 new flows counted as IPv6.
    let stats: serde_json::Value =
        serde_json::from_str(&c.xlb(&["stats", "--json"]).expect("stats")).expect("json");
    let new6 = stats["outcomes_by_family"]["IPv6"]["dnat_new"]
        .as_u64()
        .expect("count");
    assert!(new6 >= 200, "{stats}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("xlb_packets_total{outcome=\"dnat_new\",family=\"IPv6\"}")),
        "{metrics}"
    );
    // `xlb explain` takes IPv6 addresses and reads the IPv6 maps.
    let explained = c
        .xlb(&[
            "explain",
            "--src",
            "fd00:10:244::2",
            "--dst",
            &format!("[{VIP6}]:80"),
        ])
        .expect("explain");
    assert!(
        explained.contains("DNAT to one of 2 backend(s) (Service default/web:http)")
            && explained.contains("[fd00:10:244::12]:8080"),
        "{explained}"
    );
    let mixed = c.xlb(&[
        "explain",
        "--src",
        "10.244.0.2",
        "--dst",
        &format!("[{VIP6}]:80"),
    ]);
    assert!(mixed.is_err(), "a family mix is refused: {mixed:?}");
}

/// IPv6 datagrams from an AF_PACKET TX ring (headers in page fragments, not in the skb's
/// linear part) are translated like socket traffic, and so are their replies.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn ipv6_packets_with_headers_in_page_fragments_are_translated() {
    require_privileges();
    let c = dual_stack_cluster();
    let sent = 20;
    let answers = ring_whoami(
        &c.node.pod("client").ns,
        addr("fd00:10:244::2", 40053),
        addr(VIP6, 53),
        sent,
    )
    .expect("exchange");
    assert_eq!(answers.len(), 1, "one flow, one backend: {answers:?}");
    let ((from, name, seen), n) = answers.into_iter().next().expect("one");
    assert_eq!((n, from), (sent, addr(VIP6, 53)), "{name}");
    assert!(["be2", "be3"].contains(&name.as_str()), "{name}");
    assert_eq!(seen, "fd00:10:244::2");
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn an_ipv6_service_without_endpoints_refuses_connections_fast() {
    require_privileges();
    let c = dual_stack_cluster();
    let client = &c.node.pod("client").ns;
    let started = Instant::now();
    let err = client
        .enter(|| tcp_hello(addr(EMPTY_VIP6, 80), Duration::from_secs(5)))
        .expect("thread")
        .expect_err("no endpoints");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // Refused, not timed out. The ICMPv6 error about the first SYN reaches the client while
    // its connect() still holds the socket (the reply is made in the same softirq pass), and
    // the kernel keeps such an error only as a soft one (TcpExtLockDroppedIcmps): the
    // refusal comes with the SYN's retransmission, after 1 s. (IPv4's error, in the same
    // race, ends the connect at once.)
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let err = client
        .enter(|| {
            let s = std::net::UdpSocket::bind("[::]:0")?;
            s.connect(addr(EMPTY_VIP6, 53))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send(b"x")?;
            s.recv(&mut [0u8; 16])
        })
        .expect("thread")
        .expect_err("no endpoints");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn ipv6_session_affinity_and_a_tcp_stream_across_an_agent_restart() {
    require_privileges();
    let mut c = dual_stack_cluster();
    c.write_manifest(
        "web.yaml",
        &dual_stack_service("web", &[VIP4, VIP6]).replace(
            "  ports:\n",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n  ports:\n",
        ),
    )
    .expect("write");
    // Affinity is written with the frontend: wait until a connection lands twice alike.
    let client = &c.node.pod("client").ns;
    wait_until(Duration::from_secs(5), || {
        let counts = spread(client, addr(VIP6, 80), 20, false);
        counts.len() == 1
    })
    .expect("one backend for one IPv6 client");
    let counts = spread(client, addr(VIP6, 80), 50, false);
    assert_eq!(counts.len(), 1, "{counts:?}");

    // An open IPv6 stream keeps its backend while the agent restarts (pinned CT6).
    let (mut stream, backend) = client
        .enter(|| tcp_connect(addr(VIP6, 80), T))
        .expect("thread")
        .expect("connect");
    let mut exchange = |round: u32| {
        let msg = format!("round {round}\n");
        stream.write_all(msg.as_bytes()).expect("write");
        let mut buf = vec![0u8; msg.len()];
        stream.read_exact(&mut buf).expect("echo");
        assert_eq!(buf, msg.as_bytes());
    };
    exchange(1);
    c.agent.take().expect("agent").stop().expect("stop");
    exchange(2);
    c.start_agent().expect("restart");
    c.wait_attached(Duration::from_secs(10)).expect("attached");
    exchange(3);
    assert!(["be2", "be3"].contains(&backend.as_str()), "{backend}");
}

/// A node process's TCP client over either family: prints the backend's greeting and the
/// peer its socket believes in. `--mapped`: a dual-stack IPv6 socket given an IPv4 address
/// as `::ffff:a.b.c.d`.
const TCP_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
if host.startswith("::ffff:"):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.settimeout(2)
    s.connect((host, port))
else:
    s = socket.create_connection((host, port), timeout=2)
name = s.makefile().readline().strip()
print(name, s.getpeername()[0], s.getpeername()[1])
"#;

/// A node process's unconnected UDP exchange over IPv6: the answer and where it came from.
const UDP_SENDTO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(b"whoami", (sys.argv[1], int(sys.argv[2])))
data, peer = s.recvfrom(64)
print(data.decode().split()[0], peer[0], peer[1])
"#;

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn node_processes_reach_ipv6_services_and_ipv4_through_mapped_addresses() {
    require_privileges();
    let c = dual_stack_cluster();
    // The node's own addresses (a real node has them on its uplink; here on lo, which
    // the agent does not take for NodePorts): sources for node processes' connections.
    c.node
        .ns
        .ip(&["-6", "addr", "add", "fd00:10:0:1::1/128", "dev", "lo"])
        .expect("node IPv6 address");
    c.node
        .ns
        .ip(&["addr", "add", "10.0.1.1/32", "dev", "lo"])
        .expect("node IPv4 address");
    let run = |script: &str, args: &[&str]| -> Vec<String> {
        let out = c
            .node_process(script, args)
            .expect("spawn")
            .wait_with_output()
            .expect("wait");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{args:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.split_whitespace().map(String::from).collect()
    };
    for (ip, port, backends) in [
        (VIP6, "80", ["be2", "be3"]),
        ("::ffff:10.96.0.10", "80", ["be1", "be2"]),
    ] {
        for _ in 0..4 {
            let fields = run(TCP_CLIENT, &[ip, port]);
            assert!(backends.contains(&fields[0].as_str()), "{ip}: {fields:?}");
            // The process sees the address it asked for as its peer, not the backend's.
            assert_eq!(&fields[1..], [ip, port], "{ip}");
        }
    }
    let fields = run(UDP_SENDTO, &[VIP6, "53"]);
    assert!(["be2", "be3"].contains(&fields[0].as_str()), "{fields:?}");
    assert_eq!(&fields[1..], [VIP6, "53"]);
}

const NODE1_6: &str = "fd00:192:168:50::1";
const NODE2_6: &str = "fd00:192:168:50::2";
const CLIENT_6: &str = "fd00:192:168:50::100";
const LB_IP6: &str = "2001:db8::10";

/// Two nodes and an outside client on one IPv6 segment, each node with the real agent
/// (XDP on its external interface) and a pod: `web` is an IPv6 NodePort Service (Cluster
/// policy, a backend on each node); `local` an IPv6 LoadBalancer Service (Local policy,
/// its only backend on node1), the client routing its address to node1.
struct Site6 {
    nodes: Vec<Cluster>,
    client: Netns,
    _lan: xlb_tests::lan::Lan,
}

fn site6() -> Site6 {
    use xlb_tests::netns::unique_tag;
    let manifests = [
        dual_stack_service("web", &["fd00:10:96::30"])
            .replace("  type: ClusterIP\n", "  type: NodePort\n")
            .replace(
                "targetPort: http\n",
                "targetPort: http\n    nodePort: 30080\n",
            )
            .replace(
                "targetPort: 5353\n",
                "targetPort: 5353\n    nodePort: 30053\n",
            ),
        slice6(
            "web",
            &[("fd00:10:244:1::11", true), ("fd00:10:244:2::11", true)],
        )
        .replace(
            "- addresses: [\"fd00:10:244:1::11\"]\n",
            "- addresses: [\"fd00:10:244:1::11\"]\n  nodeName: node1\n",
        )
        .replace(
            "- addresses: [\"fd00:10:244:2::11\"]\n",
            "- addresses: [\"fd00:10:244:2::11\"]\n  nodeName: node2\n",
        ),
        dual_stack_service("local", &["fd00:10:96::40"])
            .replace(
                "  type: ClusterIP\n",
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n",
            )
            .replace(
                "targetPort: http\n",
                "targetPort: http\n    nodePort: 30081\n",
            )
            .replace(
                "targetPort: 5353\n",
                "targetPort: 5353\n    nodePort: 30054\n",
            )
            + &format!("status:\n  loadBalancer:\n    ingress: [{{ip: '{LB_IP6}'}}]\n"),
        slice6("local", &[("fd00:10:244:1::12", true)]).replace(
            "- addresses: [\"fd00:10:244:1::12\"]\n",
            "- addresses: [\"fd00:10:244:1::12\"]\n  nodeName: node1\n",
        ),
    ]
    .join("---\n");
    let tag = unique_tag();
    let mut lan = xlb_tests::lan::Lan::new(&tag).expect("lan");
    let client = Netns::new(&tag, "client").expect("client ns");
    client
        .sysctl("net.ipv6.conf.default.accept_dad", "0")
        .expect("sysctl");
    lan.connect(&client, "eth0", &format!("{CLIENT_6}/64"))
        .expect("client on the lan");
    client
        .ip(&["-6", "route", "add", LB_IP6, "via", NODE1_6])
        .expect("route");
    let mut nodes = Vec::new();
    for (n, node_ip, pods) in [
        (
            1,
            NODE1_6,
            [
                ("web1", "10.244.1.11", Some("fd00:10:244:1::11")),
                ("local1", "10.244.1.12", Some("fd00:10:244:1::12")),
            ],
        ),
        (
            2,
            NODE2_6,
            [
                ("web2", "10.244.2.11", Some("fd00:10:244:2::11")),
                ("spare2", "10.244.2.12", Some("fd00:10:244:2::12")),
            ],
        ),
    ] {
        let mut c = Cluster::dual_stack(&pods).expect("node");
        lan.connect(&c.node.ns, "ext0", &format!("{node_ip}/64"))
            .expect("node on the lan");
        let (other_pods, other_ip) = if n == 1 {
            ("fd00:10:244:2::/64", NODE2_6)
        } else {
            ("fd00:10:244:1::/64", NODE1_6)
        };
        c.node
            .ns
            .ip(&["-6", "route", "add", other_pods, "via", other_ip])
            .expect("pod route");
        c.write_manifest("all.yaml", &manifests).expect("manifests");
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
        c.start_agent().expect("agent");
        c.wait_attached(Duration::from_secs(10)).expect("attached");
        wait_until(Duration::from_secs(5), || {
            c.log().contains("attached to ext0 ")
                && c.programmed("[::]:30080/TCP").is_some_and(|b| b.len() == 2)
        })
        .unwrap_or_else(|_| panic!("node{n} not programmed; log:\n{}", c.log()));
        nodes.push(c);
    }
    // Addresses usable (no duplicate address detection pending) before the first packet.
    for ns in std::iter::once(&client).chain(nodes.iter().map(|c| &c.node.ns)) {
        wait_until(Duration::from_secs(5), || {
            let ns_name = ns.name().to_string();
            std::process::Command::new("ip")
                .args(["-n", &ns_name, "-6", "addr", "show", "tentative"])
                .output()
                .map(|o| o.stdout.is_empty())
                .unwrap_or(false)
        })
        .expect("IPv6 addresses ready");
    }
    Site6 {
        nodes,
        client,
        _lan: lan,
    }
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn ipv6_node_ports_and_load_balancer_ips_from_outside_on_two_nodes() {
    require_privileges();
    let site = site6();
    let whoami = |target: SocketAddr, n: usize| -> BTreeMap<(String, String), usize> {
        site.client
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
    };
    // Cluster policy: both nodes' backends answer on either node's address; the backends
    // see the node the client used (SNAT), so replies come back through it.
    for node_ip in [NODE1_6, NODE2_6] {
        let seen = whoami(addr(node_ip, 30053), 60);
        let backends: Vec<&str> = seen.keys().map(|(b, _)| b.as_str()).collect();
        assert!(
            backends.contains(&"web1") && backends.contains(&"web2"),
            "{node_ip}: {seen:?}\n{}",
            site.nodes[0].log()
        );
        assert!(
            seen.keys().all(|(_, saw)| saw == node_ip),
            "{node_ip}: backends see the node: {seen:?}"
        );
        let tcp = site
            .client
            .enter(move || tcp_hello(addr(node_ip, 30080), T))
            .expect("thread")
            .expect("TCP over the NodePort");
        assert!(["web1", "web2"].contains(&tcp.as_str()), "{tcp}");
    }
    // Local policy LoadBalancer IP: node1's own backend, the client's address kept.
    let seen = whoami(addr(LB_IP6, 53), 20);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        [&("local1".to_string(), CLIENT_6.to_string())],
        "{seen:?}"
    );
    // node2 has no endpoint of `local`: its NodePort drops rather than forwards.
    let dropped = whoami(addr(NODE2_6, 30054), 3);
    assert!(
        dropped.keys().all(|(b, _)| b.starts_with("error")),
        "{dropped:?}"
    );
    let ct = site.nodes[0].xlb(&["conntrack"]).expect("conntrack");
    assert!(
        ct.contains("[external]") && ct.contains(&format!("src=[{CLIENT_6}]:")),
        "{ct}"
    );

    // Hairpin over IPv6: local1 reaching itself through its Service's ClusterIP is
    // SNATed to node1's IPv6 address (kube-proxy's masquerade), so its reply comes back.
    let answers = site.nodes[0]
        .node
        .pod("local1")
        .ns
        .enter(|| {
            let tcp = tcp_hello(addr("fd00:10:96::40", 80), T).unwrap_or_else(|e| format!("{e}"));
            let udp = udp_whoami(addr("fd00:10:96::40", 53), T)
                .unwrap_or_else(|e| (format!("{e}"), String::new()));
            (tcp, udp)
        })
        .expect("pod thread");
    assert_eq!(answers.0, "local1", "TCP hairpin");
    assert_eq!(
        answers.1,
        ("local1".to_string(), NODE1_6.to_string()),
        "UDP hairpin"
    );
}

/// The IPv6 rewrite's offloaded checksums, as `e2e_north_south`'s test checks IPv4's: a pod
/// on node1 to the `web` ClusterIP, node2's backend reached by `ext0`, replies by the
/// client's node-side interface, both with checksum offload off.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn offloaded_ipv6_pod_checksums_are_completed_right_after_translation() {
    require_privileges();
    let site = site6();
    let node1 = &site.nodes[0].node;
    xlb_tests::workload::assert_offloaded_checksums_come_out_right(
        &node1.ns,
        "ext0",
        node1.pod("local1"),
        &[&site.nodes[1].node.pod("web2").ns],
        "fd00:10:96::30".parse().expect("VIP"),
        &["web1", "web2"],
        40,
    );
}
