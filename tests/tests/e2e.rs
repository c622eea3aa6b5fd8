//! End to end: real namespaces, the real agent, real TCP/UDP sockets. Needs root.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use xlb_tests::{
    cluster::{Cluster, wait_until},
    manifests::{service, slice},
    netns::{Netns, leftover},
    privilege::require_privileges,
    workload::{ring_whoami, serve, tcp_connect, tcp_hello},
};

const WEB_VIP: &str = "10.96.0.10";
const API_VIP: &str = "10.96.0.20";
const T: Duration = Duration::from_secs(2);

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("address")
}

/// Four backends (one of them unready in the slice) and a client.
fn web_cluster(affinity: Option<u32>) -> Cluster {
    let mut c = Cluster::new(&[
        ("client", "10.244.0.2"),
        ("be1", "10.244.0.11"),
        ("be2", "10.244.0.12"),
        ("be3", "10.244.0.13"),
        ("unready", "10.244.0.14"),
    ])
    .expect("topology");
    c.write_manifest("web.yaml", &service("web", WEB_VIP, affinity))
        .expect("write");
    c.write_manifest(
        "web-slice.yaml",
        &slice(
            "web",
            &[
                ("10.244.0.11", true),
                ("10.244.0.12", true),
                ("10.244.0.13", true),
                ("10.244.0.14", false),
            ],
        ),
    )
    .expect("write");
    c.start_agent().expect("agent");
    c.wait_attached(Duration::from_secs(10)).expect("attached");
    wait_until(Duration::from_secs(5), || {
        c.programmed("10.96.0.10:80/TCP")
            .is_some_and(|b| b.len() == 3)
    })
    .expect("service programmed");
    c
}

/// `n` TCP connections (or UDP requests) from `ns`, answers counted per backend.
fn spread(ns: &Netns, target: SocketAddr, n: usize, udp: bool) -> BTreeMap<String, usize> {
    xlb_tests::workload::spread(ns, target, n, udp, T)
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn clusterip_spreads_over_ready_backends_only() {
    require_privileges();
    let c = web_cluster(None);
    let client = &c.node.pod("client").ns;
    for (udp, target) in [(false, addr(WEB_VIP, 80)), (true, addr(WEB_VIP, 53))] {
        let counts = spread(client, target, 300, udp);
        let keys: Vec<&str> = counts.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["be1", "be2", "be3"],
            "udp={udp}: every ready backend, nothing else: {counts:?}"
        );
        for (backend, n) in &counts {
            // Uniform random over 3: expect 100 each; 50 is > 7 standard deviations away.
            assert!(
                *n >= 50,
                "udp={udp}: {backend} got only {n} of 300: {counts:?}"
            );
        }
    }
    // The read commands see the same traffic.
    let services = c.services().expect("services");
    let web = services
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["frontend"]["port"] == 80)
        .expect("web http");
    assert!(
        web["packets"].as_u64().expect("packets") >= 300 * 3,
        "{web}"
    );
    let ct = c.xlb(&["conntrack"]).expect("conntrack");
    assert!(ct.contains("dst=10.96.0.10:80"), "{ct}");
    let stats: serde_json::Value =
        serde_json::from_str(&c.xlb(&["stats", "--json"]).expect("stats")).expect("json");
    // A client port reused while its old flow is still tracked counts as established.
    assert!(
        stats["outcomes"]["dnat_new"].as_u64().expect("count") >= 500,
        "{stats}"
    );
    assert!(
        stats["outcomes"]["revnat"].as_u64().expect("count") >= 600,
        "{stats}"
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn translated_packets_enter_local_backends_without_the_node_stack() {
    require_privileges();
    let c = web_cluster(None);
    let backends = ["be1", "be2", "be3"];
    let counters = || -> Vec<(u64, u64)> {
        backends
            .iter()
            .map(|name| {
                let pod = c.node.pod(name);
                let (_, host_tx) = c.node.ns.link_packets(&pod.host_iface).expect("host end");
                let (pod_rx, _) = pod.ns.link_packets("eth0").expect("pod end");
                (host_tx, pod_rx)
            })
            .collect()
    };
    let before = counters();
    let n = 300;
    let counts = spread(&c.node.pod("client").ns, addr(WEB_VIP, 53), n, true);
    assert_eq!(counts.values().sum::<usize>(), n, "{counts:?}");
    assert!(counts.keys().all(|k| k.starts_with("be")), "{counts:?}");
    let after = counters();
    let (mut host_tx, mut pod_rx) = (0, 0);
    for (b, a) in before.iter().zip(&after) {
        host_tx += a.0 - b.0;
        pod_rx += a.1 - b.1;
    }
    // bpf_redirect_peer hands requests to the pod's end of the veth: it counts them, the
    // node's end never transmits them. Only a backend's first packet (neighbour not yet
    // resolved: bpf_redirect_neigh) and the neighbour probes themselves pass the node's end.
    assert!(pod_rx >= n as u64, "pods received {pod_rx} of {n}");
    assert!(
        host_tx <= 3 * backends.len() as u64,
        "the node's ends transmitted {host_tx} packets for {n} requests"
    );
}

/// A pod's datagrams from an AF_PACKET TX ring (trafgen): the kernel builds those skbs with
/// only the Ethernet header in the linear part, the IP and UDP headers in page fragments.
/// They are translated like socket traffic, and so are their replies.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_pods_packets_with_headers_in_page_fragments_are_translated() {
    require_privileges();
    let c = web_cluster(None);
    let sent = 20;
    let answers = ring_whoami(
        &c.node.pod("client").ns,
        addr("10.244.0.2", 40053),
        addr(WEB_VIP, 53),
        sent,
    )
    .expect("exchange");
    // One flow (one 5-tuple): every datagram to the same backend, which saw the client's
    // address; every answer from the frontend.
    assert_eq!(answers.len(), 1, "{answers:?}");
    let ((from, name, seen), n) = answers.into_iter().next().expect("one");
    assert_eq!((n, from), (sent, addr(WEB_VIP, 53)), "{name}");
    assert!(name.starts_with("be"), "{name}");
    assert_eq!(seen, "10.244.0.2");
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn session_affinity_pins_a_client_to_one_backend() {
    require_privileges();
    let c = web_cluster(Some(600));
    let client = &c.node.pod("client").ns;
    let counts = spread(client, addr(WEB_VIP, 80), 40, false);
    assert_eq!(
        counts.len(),
        1,
        "one backend for all connections: {counts:?}"
    );
    assert!(counts.keys().all(|k| k.starts_with("be")), "{counts:?}");
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn service_without_endpoints_refuses_connections_fast() {
    require_privileges();
    let mut c = Cluster::new(&[("client", "10.244.0.2")]).expect("topology");
    c.write_manifest("api.yaml", &service("api", API_VIP, None))
        .expect("write");
    c.write_manifest("api-slice.yaml", &slice("api", &[]))
        .expect("write");
    c.start_agent().expect("agent");
    c.wait_attached(Duration::from_secs(10)).expect("attached");
    wait_until(Duration::from_secs(5), || {
        c.programmed("10.96.0.20:80/TCP").is_some()
    })
    .expect("programmed");
    let started = Instant::now();
    let err = c
        .node
        .pod("client")
        .ns
        .enter(|| tcp_hello(addr(API_VIP, 80), Duration::from_secs(5)))
        .expect("thread")
        .expect_err("no endpoints");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    let udp_err = c
        .node
        .pod("client")
        .ns
        .enter(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.connect(addr(API_VIP, 53))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send(b"x")?;
            s.recv(&mut [0u8; 16])
        })
        .expect("thread")
        .expect_err("no endpoints");
    assert_eq!(
        udp_err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{udp_err}"
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn manifest_edits_take_effect_within_a_second() {
    require_privileges();
    let mut c = Cluster::new(&[
        ("client", "10.244.0.2"),
        ("be1", "10.244.0.11"),
        ("be2", "10.244.0.12"),
        ("be3", "10.244.0.13"),
        ("api1", "10.244.0.21"),
    ])
    .expect("topology");
    c.write_manifest("web.yaml", &service("web", WEB_VIP, None))
        .expect("write");
    c.write_manifest(
        "web-slice.yaml",
        &slice("web", &[("10.244.0.11", true), ("10.244.0.12", true)]),
    )
    .expect("write");
    c.write_manifest(
        "api.yaml",
        &format!(
            "{}---\n{}",
            service("api", API_VIP, None),
            slice("api", &[("10.244.0.21", true)])
        ),
    )
    .expect("write");
    c.start_agent().expect("agent");
    c.wait_attached(Duration::from_secs(10)).expect("attached");
    wait_until(Duration::from_secs(5), || {
        c.programmed("10.96.0.20:80/TCP").is_some()
    })
    .expect("programmed");
    let client = &c.node.pod("client").ns;
    let web = addr(WEB_VIP, 80);
    let api = addr(API_VIP, 80);

    // Keep talking to the other service the whole time: it must never fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let api_load = {
        let stop = std::sync::Arc::clone(&stop);
        client
            .spawn(move || {
                let mut failures = Vec::new();
                let mut ok = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok < 20_000 {
                    match tcp_hello(api, T) {
                        Ok(name) if name == "api1" => ok += 1,
                        other => failures.push(format!("{other:?}")),
                    }
                }
                (ok, failures)
            })
            .expect("thread")
    };

    // Time from the file change until 30 consecutive connections show the new state.
    let converge = |want: &'static [&'static str], forbid: &'static [&'static str]| {
        let started = Instant::now();
        let mut streak = 0;
        let mut seen = std::collections::BTreeSet::new();
        while streak < 30 {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "no convergence: {want:?}"
            );
            let who = client.enter(move || tcp_hello(web, T)).expect("thread");
            match who {
                Ok(name) if !forbid.contains(&name.as_str()) && want.contains(&name.as_str()) => {
                    streak += 1;
                    seen.insert(name);
                }
                _ => {
                    streak = 0;
                    seen.clear();
                }
            }
        }
        (started.elapsed(), seen)
    };

    // Add a backend.
    c.write_manifest(
        "web-slice.yaml",
        &slice(
            "web",
            &[
                ("10.244.0.11", true),
                ("10.244.0.12", true),
                ("10.244.0.13", true),
            ],
        ),
    )
    .expect("write");
    let started = Instant::now();
    wait_until(Duration::from_secs(1), || {
        c.programmed("10.96.0.10:80/TCP")
            .is_some_and(|b| b.len() == 3)
    })
    .unwrap_or_else(|_| panic!("added backend not programmed within 1 s; log:\n{}", c.log()));
    let (_, seen) = converge(&["be1", "be2", "be3"], &[]);
    assert!(started.elapsed() < Duration::from_secs(2));
    let _ = seen;
    let counts = spread(client, web, 60, false);
    assert!(
        counts.contains_key("be3"),
        "new backend receives traffic: {counts:?}"
    );

    // Remove a backend: within a second no new connection reaches it.
    c.write_manifest(
        "web-slice.yaml",
        &slice("web", &[("10.244.0.12", true), ("10.244.0.13", true)]),
    )
    .expect("write");
    let (took, _) = converge(&["be2", "be3"], &["be1"]);
    assert!(took < Duration::from_secs(1), "removal took {took:?}");
    let counts = spread(client, web, 60, false);
    assert!(!counts.contains_key("be1"), "{counts:?}");
    // Its conntrack entries are purged promptly too.
    wait_until(Duration::from_secs(2), || {
        c.xlb(&["conntrack", "--json"])
            .is_ok_and(|flows| !flows.contains("10.244.0.11:8080"))
    })
    .expect("flows to the removed backend purged");

    // A broken file changes nothing and is reported with its path and line.
    c.write_manifest(
        "web-slice.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nendpoints: [\n",
    )
    .expect("write");
    wait_until(Duration::from_secs(2), || {
        c.log().contains("web-slice.yaml:")
    })
    .expect("error logged");
    let log = c.log();
    let line = log
        .lines()
        .find(|l| l.contains("web-slice.yaml:"))
        .expect("line");
    assert!(
        line.contains("web-slice.yaml:4:") || line.contains("web-slice.yaml:3:"),
        "{line}"
    );
    let counts = spread(client, web, 30, false);
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["be2", "be3"],
        "{counts:?}"
    );

    // Delete the service: its VIP stops answering within a second.
    c.remove_manifest("web.yaml").expect("rm");
    let started = Instant::now();
    wait_until(Duration::from_secs(1), || {
        c.programmed("10.96.0.10:80/TCP").is_none()
    })
    .expect("service removed within 1 s");
    let refused = client
        .enter(move || tcp_hello(web, Duration::from_millis(500)))
        .expect("thread");
    assert!(refused.is_err(), "VIP of a deleted service must not answer");
    assert!(started.elapsed() < Duration::from_secs(2));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failures) = api_load.join().expect("api load");
    assert!(
        failures.is_empty(),
        "other service failed during edits: {failures:?}"
    );
    assert!(ok > 50, "other service kept serving ({ok} connections)");
}

fn exchange(stream: &mut std::net::TcpStream, round: u32) {
    let msg = format!("ping {round}\n");
    stream
        .write_all(msg.as_bytes())
        .expect("write on the long stream");
    let mut buf = vec![0u8; msg.len()];
    stream
        .read_exact(&mut buf)
        .expect("echo on the long stream");
    assert_eq!(buf, msg.as_bytes());
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn long_tcp_stream_survives_agent_restart_and_crash() {
    require_privileges();
    let mut c = web_cluster(None);
    let (mut stream, backend) = c
        .node
        .pod("client")
        .ns
        .enter(|| tcp_connect(addr(WEB_VIP, 80), T))
        .expect("thread")
        .expect("connect");
    let mut round = 0;
    let mut talk = |stream: &mut std::net::TcpStream, n: u32| {
        for _ in 0..n {
            exchange(stream, round);
            round += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    talk(&mut stream, 10);
    // UDP traffic all along, from one socket (one tracked flow): every request answered,
    // always by the same backend.
    let stop_udp = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let udp = {
        let stop = std::sync::Arc::clone(&stop_udp);
        c.node
            .pod("client")
            .ns
            .spawn(move || {
                let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
                socket.set_read_timeout(Some(T)).expect("timeout");
                let (mut sent, mut answers) = (0, BTreeMap::<String, usize>::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    socket.send_to(b"hi", addr(WEB_VIP, 53)).expect("send");
                    sent += 1;
                    let mut buf = [0u8; 64];
                    if let Ok((n, _)) = socket.recv_from(&mut buf) {
                        let who = String::from_utf8_lossy(&buf[..n]).into_owned();
                        *answers.entry(who).or_insert(0) += 1;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (sent, answers)
            })
            .expect("udp client")
    };

    // Graceful restart: the datapath keeps running while no agent is there.
    c.agent.take().expect("agent").stop().expect("clean stop");
    talk(&mut stream, 20);
    assert!(c.log().contains("stay pinned"));
    c.start_agent().expect("restart");
    wait_until(Duration::from_secs(10), || {
        c.log().contains("adopted 2 frontend(s)")
    })
    .expect("adopted");
    talk(&mut stream, 20);

    // Crash: kill -9, then start again.
    c.agent.take().expect("agent").crash();
    talk(&mut stream, 20);
    c.start_agent().expect("restart");
    wait_until(Duration::from_secs(10), || {
        c.log().matches("adopted 2 frontend(s)").count() == 2
    })
    .expect("adopted again");
    talk(&mut stream, 20);

    // The agent is healthy again and its metrics see the adopted state.
    wait_until(Duration::from_secs(5), || {
        c.http_get(10256, "/healthz")
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200") && r.contains("\"nodeEligible\":true"))
    })
    .expect("healthy after the restart");
    let metrics = c.metrics().expect("metrics");
    assert!(
        metrics.contains("xlb_frontends_programmed 2")
            && metrics.contains("xlb_backends_programmed 6"),
        "{metrics}"
    );
    stop_udp.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, answers) = udp.join().expect("udp thread");
    let answered: usize = answers.values().sum();
    assert_eq!(answers.len(), 1, "one UDP flow, one backend: {answers:?}");
    assert!(
        answered * 100 >= sent * 99,
        "{answered} of {sent} UDP requests answered across restart and kill -9"
    );

    // The stream's flow is still tracked to the same backend, and new connections work again.
    let flows: serde_json::Value =
        serde_json::from_str(&c.xlb(&["conntrack", "--json"]).expect("conntrack")).expect("json");
    let backend_addr = format!("{}:8080", c.node.pod(&backend).ip);
    let local = stream.local_addr().expect("local address").to_string();
    let flow = flows
        .as_array()
        .expect("array")
        .iter()
        .find(|f| f["client"] == local.as_str())
        .unwrap_or_else(|| panic!("flow {local} not tracked: {flows}"));
    assert_eq!(flow["backend"], backend_addr.as_str(), "{flow}");
    assert!(flow["packets"].as_u64().expect("packets") >= 90, "{flow}");
    let counts = spread(&c.node.pod("client").ns, addr(WEB_VIP, 80), 30, false);
    assert!(counts.keys().all(|k| k.starts_with("be")), "{counts:?}");
    drop(stream);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn nothing_is_left_behind() {
    require_privileges();
    let (tag, bpffs, scratch, pid) = {
        let c = web_cluster(None);
        let counts = spread(&c.node.pod("client").ns, addr(WEB_VIP, 80), 10, false);
        assert_eq!(counts.values().sum::<usize>(), 10);
        let pid = c.agent.as_ref().expect("agent").pid();
        (
            c.node.tag.clone(),
            c.pins.bpffs.clone(),
            c.scratch.path.clone(),
            pid,
        )
    };
    assert!(
        leftover(&tag).is_empty(),
        "namespaces left: {:?}",
        leftover(&tag)
    );
    assert!(!bpffs.exists(), "pins left under {}", bpffs.display());
    assert!(!scratch.exists());
    // SAFETY: signal 0 only checks whether the pid exists.
    let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
    assert!(!alive, "agent {pid} still running");
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn pod_interfaces_are_attached_and_detached_as_they_come_and_go() {
    require_privileges();
    let mut c = web_cluster(None);
    // A pod created after the agent started can use the service at once.
    let index = c.node.add_pod("late", "10.244.0.99").expect("late pod");
    let iface = c.node.pods[index].host_iface.clone();
    wait_until(Duration::from_secs(2), || {
        c.log().contains(&format!("attached to {iface} "))
    })
    .expect("late interface attached");
    let counts = spread(&c.node.pod("late").ns, addr(WEB_VIP, 80), 30, false);
    assert!(counts.keys().all(|k| k.starts_with("be")), "{counts:?}");

    // Deleting it detaches cleanly: log line, pins gone, nothing else disturbed.
    c.node.remove_pod("late");
    wait_until(Duration::from_secs(2), || {
        c.log().contains(&format!("detached from {iface} "))
    })
    .expect("detached");
    let links = c.pins.bpffs.join("links");
    let pins: Vec<String> = std::fs::read_dir(&links)
        .expect("links dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!pins.iter().any(|p| p.ends_with(&iface)), "{pins:?}");
    // Two per pod interface, plus the socket hooks on the node cgroup (four per family).
    let cgroup_pins = pins.iter().filter(|p| p.ends_with("@cgroup")).count();
    assert_eq!(cgroup_pins, 8, "{pins:?}");
    assert_eq!(pins.len() - cgroup_pins, 2 * c.node.pods.len(), "{pins:?}");
    let counts = spread(&c.node.pod("client").ns, addr(WEB_VIP, 80), 30, false);
    assert!(counts.keys().all(|k| k.starts_with("be")), "{counts:?}");
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn unreadable_manifests_dir_at_restart_keeps_the_pinned_state() {
    require_privileges();
    let mut c = web_cluster(None);
    c.agent.take().expect("agent").stop().expect("stop");
    // The directory is gone when the agent comes back (e.g. a volume not mounted yet).
    let dir = c.manifests_dir();
    let parked = c.scratch.path.join("parked");
    std::fs::rename(&dir, &parked).expect("park manifests");
    c.start_agent().expect("restart");
    wait_until(Duration::from_secs(10), || {
        c.log().contains("cannot read manifests directory")
    })
    .expect("error logged");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.programmed("10.96.0.10:80/TCP").map(|b| b.len()),
        Some(3),
        "state kept"
    );
    let counts = spread(&c.node.pod("client").ns, addr(WEB_VIP, 80), 30, false);
    assert!(counts.keys().all(|k| k.starts_with("be")), "{counts:?}");
    // Once it is back, the agent follows it again.
    std::fs::rename(&parked, &dir).expect("restore manifests");
    c.remove_manifest("web.yaml").expect("rm");
    wait_until(Duration::from_secs(2), || {
        c.programmed("10.96.0.10:80/TCP").is_none()
    })
    .expect("follows the directory again");
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn cleanup_removes_kube_proxy_leftovers_and_nothing_else() {
    require_privileges();
    let tag = xlb_tests::netns::unique_tag();
    let node = Netns::new(&tag, "node").expect("node ns");
    // What kube-proxy (iptables and nftables modes) leaves on a node, next to a rule of the
    // operator's own and kubelet's chain.
    let rules = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ABC - [0:0]\n\
                 :KUBE-SEP-XYZ - [0:0]\n:OWN - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n\
                 -A PREROUTING -j OWN\n-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp --dport 80 -j KUBE-SVC-ABC\n\
                 -A KUBE-SVC-ABC -j KUBE-SEP-XYZ\n\
                 -A KUBE-SEP-XYZ -p tcp -j DNAT --to-destination 10.244.1.2:8080\n\
                 -A OWN -p tcp --dport 8080 -j REDIRECT --to-ports 80\nCOMMIT\n\
                 *filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
    let netns = format!("--net={}", node.path());
    let shell = |script: &str| {
        let out = std::process::Command::new("nsenter")
            .args([netns.as_str(), "sh", "-c", script])
            .output()
            .expect("nsenter");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    shell(&format!(
        "printf '{}' | iptables-restore",
        rules.replace('\n', "\\n")
    ));
    shell("nft add table ip kube-proxy && nft add chain ip kube-proxy services");
    let xlb = xlb_tests::cluster::xlb_binary();
    let report = shell(&format!("{} cleanup --kube-proxy-rules", xlb.display()));
    assert!(
        report.contains("iptables-save: removed") && report.contains("table ip kube-proxy"),
        "{report}"
    );
    let left = shell("iptables-save");
    assert!(
        !left.contains("KUBE-SERVICES") && !left.contains("KUBE-SVC-"),
        "{left}"
    );
    assert!(
        left.contains("-A PREROUTING -j OWN") && left.contains("REDIRECT --to-ports 80"),
        "{left}"
    );
    assert!(
        left.contains("-A INPUT -j KUBE-FIREWALL"),
        "kubelet's chain stays: {left}"
    );
    assert!(!shell("nft list tables").contains("kube-proxy"));
    // Running it again finds nothing.
    assert!(
        shell(&format!("{} cleanup --kube-proxy-rules", xlb.display()))
            .contains("no kube-proxy rules")
    );
}

/// A stranger's idle connections and a slow-loris sender on the agent's `/healthz` port do
/// not keep kubelet's liveness probe from its answer.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn healthz_answers_while_strangers_hold_connections_open() {
    require_privileges();
    let c = web_cluster(None);
    wait_until(Duration::from_secs(5), || {
        c.http_get(10256, "/healthz")
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .expect("healthz up");
    let healthz = std::net::SocketAddr::from(([127, 0, 0, 1], 10256));
    let (idle, loris) = c
        .node
        .ns
        .enter(move || {
            let idle: Vec<std::net::TcpStream> = (0..200)
                .map(|_| std::net::TcpStream::connect(healthz).expect("idle connection"))
                .collect();
            let loris = std::net::TcpStream::connect(healthz).expect("slow connection");
            (idle, loris)
        })
        .expect("node thread");
    let drip = std::thread::spawn(move || {
        use std::io::Write as _;
        let mut loris = loris;
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n".iter().take(15) {
            if loris.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let started = Instant::now();
        let answer = c.http_get(10256, "/healthz").expect("healthz");
        let took = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(took < Duration::from_millis(100), "answered in {took:?}");
    }
    drip.join().expect("slow sender");
    drop(idle);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_backend_replaced_at_the_same_address_is_reached_at_once() {
    require_privileges();
    let mut c = web_cluster(None);
    let hello = |c: &Cluster| {
        c.node
            .pod("client")
            .ns
            .enter(|| {
                let started = Instant::now();
                tcp_hello(addr(WEB_VIP, 80), T).map(|name| (name, started.elapsed()))
            })
            .expect("client namespace")
    };
    // Flows from the client to every backend: their next hops are cached now.
    let counts = spread(&c.node.pod("client").ns, addr(WEB_VIP, 80), 30, false);
    assert_eq!(counts.len(), 3, "{counts:?}");
    // be1 and be2 leave for good, be3 is replaced by a new pod at its address (a new
    // interface, a new MAC): a next hop cached for the old one would send the SYN into a
    // deleted interface, and the client would wait a second for its retransmission.
    c.write_manifest("web-slice.yaml", &slice("web", &[("10.244.0.13", true)]))
        .expect("write");
    wait_until(Duration::from_secs(5), || {
        c.programmed("10.96.0.10:80/TCP")
            .is_some_and(|b| b.len() == 1)
    })
    .expect("one backend programmed");
    let old_index = c
        .node
        .pods
        .iter()
        .position(|p| p.name == "be3")
        .expect("be3");
    let iface = c.node.pods[old_index].host_iface.clone();
    let attached = |c: &Cluster| c.log().matches(&format!("attached to {iface} ")).count();
    let attached_before = attached(&c);
    // (Interface names follow pod indexes: with the last pod gone too, the new be3 gets
    // the old one's name, as a recreated pod's interface often does.)
    // The pods' servers go first: their sockets would keep the namespaces alive.
    let unready = c
        .node
        .pods
        .iter()
        .position(|p| p.name == "unready")
        .expect("unready");
    assert_eq!(
        (old_index, unready),
        (3, 4),
        "servers are kept in pod order"
    );
    c.servers.truncate(old_index);
    c.node.remove_pod("unready");
    c.node.remove_pod("be3");
    // The kernel tears a deleted namespace's veth down in the background.
    wait_until(Duration::from_secs(5), || {
        c.node.ns.link_packets(&iface).is_err()
    })
    .expect("the old interface gone");
    let index = c.node.add_pod("be3", "10.244.0.13").expect("new be3");
    assert_eq!(c.node.pods[index].host_iface, iface);
    c.servers
        .push(serve(&c.node.pods[index]).expect("servers of the new be3"));
    wait_until(Duration::from_secs(2), || attached(&c) > attached_before)
        .expect("the new interface attached");
    for round in 0..5 {
        let (name, took) = hello(&c).expect("the new be3 answers");
        assert_eq!(name, "be3");
        assert!(
            took < Duration::from_millis(500),
            "round {round}: connecting took {took:?} (a SYN lost to a stale next hop?)"
        );
    }
}

/// The agent tells the datapath whether next hops may be cached without the source
/// (`route_policy`): on with the node's default rules, off within a moment of a policy
/// rule appearing (and on again when it leaves), connections answered all along.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn the_agent_follows_the_nodes_routing_policy_for_the_next_hop_cache() {
    require_privileges();
    let c = web_cluster(None);
    let path =
        xlb::datapath::pins::PinLayout::new(&c.pins.bpffs).map(lb_common::map_names::ROUTE_GEN);
    let flags = || -> u64 {
        let data = aya::maps::MapData::from_pin(&path).expect("pinned routing generation");
        let map: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("array");
        map.get(&0, 0).expect("value") & !lb_common::route_gen::GENERATION
    };
    let both = lb_common::route_gen::SOURCE_FREE_V4 | lb_common::route_gen::SOURCE_FREE_V6;
    let answers = |c: &Cluster| spread(&c.node.pod("client").ns, addr(WEB_VIP, 80), 10, false);
    assert_eq!(
        flags(),
        both,
        "default rules: source-free for both families"
    );
    assert_eq!(answers(&c).values().sum::<usize>(), 10);
    let rule = [
        "rule",
        "add",
        "from",
        "10.244.0.0/24",
        "table",
        "main",
        "pref",
        "100",
    ];
    c.node.ns.ip(&rule).expect("policy rule");
    // Within the policy's recheck interval (1 s) and the agent's reaction.
    wait_until(Duration::from_secs(5), || {
        flags() == lb_common::route_gen::SOURCE_FREE_V6
    })
    .expect("IPv4 keyed by source again after the rule");
    assert!(
        c.log()
            .contains("next hops cached per IPv4 by source and destination"),
        "the agent says so: {}",
        c.log()
    );
    assert_eq!(answers(&c).values().sum::<usize>(), 10);
    let mut undo = rule;
    undo[1] = "del";
    c.node.ns.ip(&undo).expect("rule removed");
    wait_until(Duration::from_secs(5), || flags() == both).expect("source-free again");
    assert_eq!(answers(&c).values().sum::<usize>(), 10);
}
