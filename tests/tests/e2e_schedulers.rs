//! End to end: the `xlb.io/scheduler` annotation changes how real connections spread.
//! Needs root (see `privilege`).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use xlb::datapath::{maps::PinnedMaps, pins::PinLayout};
use xlb_tests::{
    cluster::{Cluster, wait_until},
    manifests::{service, slice, with_scheduler},
    netns::Netns,
    privilege::require_privileges,
    workload::{tcp_connect, tcp_hello},
};

const VIP: &str = "10.96.0.10";
const T: Duration = Duration::from_secs(2);
const BACKENDS: [(&str, bool); 3] = [
    ("10.244.0.11", true),
    ("10.244.0.12", true),
    ("10.244.0.13", true),
];

fn addr(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().expect("address")
}

fn cluster(scheduler: &str) -> Cluster {
    let mut c = Cluster::new(&[
        ("client1", "10.244.0.2"),
        ("client2", "10.244.0.3"),
        ("client3", "10.244.0.4"),
        ("be1", "10.244.0.11"),
        ("be2", "10.244.0.12"),
        ("be3", "10.244.0.13"),
        ("be4", "10.244.0.14"),
    ])
    .expect("topology");
    c.write_manifest(
        "web.yaml",
        &with_scheduler(&service("web", VIP, None), scheduler),
    )
    .expect("write");
    c.write_manifest("web-slice.yaml", &slice("web", &BACKENDS))
        .expect("write");
    c.start_agent().expect("agent");
    c.wait_attached(Duration::from_secs(10)).expect("attached");
    wait_for_scheduler(&c, scheduler);
    c
}

/// Waits until both frontends of the service run `scheduler` with three backends.
fn wait_for_scheduler(c: &Cluster, scheduler: &str) {
    wait_until(Duration::from_secs(5), || {
        c.services().is_ok_and(|rows| {
            let rows = rows.as_array().cloned().unwrap_or_default();
            rows.len() == 2
                && rows.iter().all(|r| {
                    r["scheduler"] == scheduler && r["backends"].as_array().map(Vec::len) == Some(3)
                })
        })
    })
    .unwrap_or_else(|_| panic!("scheduler {scheduler} not programmed; log:\n{}", c.log()));
}

/// `n` TCP connections from `ns`, in turn: which backend answered each.
fn connections(ns: &Netns, n: usize) -> Vec<String> {
    ns.enter(move || {
        (0..n)
            .map(|_| tcp_hello(addr(80), T).unwrap_or_else(|e| format!("error: {e}")))
            .collect()
    })
    .expect("client thread")
}

fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name.clone()).or_insert(0) += 1;
    }
    counts
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn annotation_changes_the_spread_of_real_connections() {
    require_privileges();
    let c = cluster("round-robin");
    let client1 = &c.node.pod("client1").ns;
    // Round-robin: 30 connections in turn, exactly 10 each.
    let picks = connections(client1, 30);
    assert_eq!(
        tally(&picks),
        [("be1".into(), 10), ("be2".into(), 10), ("be3".into(), 10)].into(),
        "{picks:?}"
    );

    // Operators see the spread in the metrics: new flows per backend.
    let metrics = c.metrics().expect("metrics");
    for be in ["10.244.0.11", "10.244.0.12", "10.244.0.13"] {
        let line = format!(
            "xlb_backend_new_flows_total{{frontend=\"10.96.0.10:80/TCP\",\
             service=\"default/web:http\",family=\"IPv4\",backend=\"{be}:8080\"}} 10"
        );
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    assert!(
        metrics.contains(
            "xlb_frontend_info{frontend=\"10.96.0.10:80/TCP\",service=\"default/web:http\",\
             family=\"IPv4\",scheduler=\"round-robin\"} 1"
        ),
        "{metrics}"
    );

    // Source-hash: each client always lands on one backend.
    c.write_manifest(
        "web.yaml",
        &with_scheduler(&service("web", VIP, None), "source-hash"),
    )
    .expect("write");
    wait_for_scheduler(&c, "source-hash");
    for client in ["client1", "client2", "client3"] {
        let picks = connections(&c.node.pod(client).ns, 10);
        let counts = tally(&picks);
        assert_eq!(counts.len(), 1, "{client}: one backend: {counts:?}");
        assert!(counts.keys().all(|k| k.starts_with("be")), "{counts:?}");
    }

    // `xlb explain` names, from the maps alone, the backend each client actually reached.
    let backend_of = |name: &str| format!("10.244.0.1{}:8080", &name[2..]);
    for (client, ip) in [("client1", "10.244.0.2"), ("client2", "10.244.0.3")] {
        let answered = connections(&c.node.pod(client).ns, 1).remove(0);
        let explained: serde_json::Value = serde_json::from_str(
            &c.xlb(&["explain", "--src", ip, "--dst", "10.96.0.10:80", "--json"])
                .expect("explain"),
        )
        .expect("json");
        assert_eq!(
            explained["backend"],
            backend_of(&answered),
            "{client}: {explained}"
        );
    }
    // ... and follows a live flow through conntrack.
    let (stream, port, answered) = c
        .node
        .pod("client3")
        .ns
        .enter(|| {
            let (stream, name) = tcp_connect(addr(80), T).expect("connect");
            let port = stream.local_addr().expect("local").port();
            (stream, port, name)
        })
        .expect("client thread");
    let src = format!("10.244.0.4:{port}");
    let explained = c
        .xlb(&["explain", "--src", &src, "--dst", "10.96.0.10:80"])
        .expect("explain");
    assert!(
        explained.contains("tracked flow") && explained.contains(&backend_of(&answered)),
        "{explained}"
    );
    drop(stream);

    // An unknown name is refused, with the service named, and the node default applies.
    c.write_manifest(
        "web.yaml",
        &with_scheduler(&service("web", VIP, None), "fastest"),
    )
    .expect("write");
    wait_for_scheduler(&c, "random");
    let log = c.log();
    assert!(
        log.contains("service default/web")
            && log.contains("unknown scheduler \"fastest\"")
            && log.contains("using the node default random"),
        "{log}"
    );
    let counts = tally(&connections(client1, 60));
    assert_eq!(counts.len(), 3, "random reaches every backend: {counts:?}");
}

/// Forgets every tracked flow, so the next packets are balanced afresh by the algorithm.
fn forget_flows(c: &Cluster) {
    let maps = PinnedMaps::open(&PinLayout::new(&c.pins.bpffs)).expect("pinned maps");
    let mut conntrack = maps.conntrack;
    let keys: Vec<_> = conntrack.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = conntrack.remove(&key);
    }
    // IPv4 flows' entries held as claims.
    for mut claims in [maps.reply_claims, maps.flow_claims] {
        let held = xlb::datapath::id_arrays::reply_claims(&claims).expect("claims");
        for claim in held {
            let slot = lb_common::reply_claim_slot(&claim.key);
            claims
                .set(slot, lb_common::ReplyClaim::default(), 0)
                .expect("claim slot");
        }
    }
}

/// One UDP request from each of `ports` (the same 5-tuple every time): who answered.
fn udp_from_ports(ns: &Netns, ports: std::ops::Range<u16>) -> Vec<String> {
    ns.enter(move || {
        ports
            .map(|port| {
                let answer = (|| {
                    let socket = UdpSocket::bind(("0.0.0.0", port))?;
                    socket.set_read_timeout(Some(T))?;
                    socket.send_to(b"hello", addr(53))?;
                    let mut buf = [0u8; 64];
                    let n = socket.recv(&mut buf)?;
                    Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
                })();
                answer.unwrap_or_else(|e| format!("error: {e}"))
            })
            .collect()
    })
    .expect("client thread")
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn maglev_keeps_each_tuple_on_its_backend_across_restart_and_growth() {
    require_privileges();
    let mut c = cluster("maglev");
    let ports = 21_000..21_060;
    let first = udp_from_ports(&c.node.pod("client1").ns, ports.clone());
    let spread = tally(&first);
    assert_eq!(
        spread.keys().filter(|k| k.starts_with("be")).count(),
        3,
        "{spread:?}"
    );

    // Same tuples after the flows are forgotten and the agent restarted: same backends.
    c.agent.take().expect("agent").stop().expect("clean stop");
    forget_flows(&c);
    c.start_agent().expect("agent restart");
    wait_until(Duration::from_secs(5), || {
        c.log().matches("adopted").count() >= 1
    })
    .expect("restarted agent adopted the pinned state");
    assert_eq!(
        udp_from_ports(&c.node.pod("client1").ns, ports.clone()),
        first,
        "after restart"
    );

    // A fourth backend takes about a quarter of the tuples; the others stay where they were.
    let mut four = BACKENDS.to_vec();
    four.push(("10.244.0.14", true));
    c.write_manifest("web-slice.yaml", &slice("web", &four))
        .expect("write");
    wait_until(Duration::from_secs(5), || {
        c.programmed("10.96.0.10:53/UDP")
            .is_some_and(|b| b.len() == 4)
    })
    .expect("fourth backend programmed");
    forget_flows(&c);
    let grown = udp_from_ports(&c.node.pod("client1").ns, ports.clone());
    let moved: Vec<(&String, &String)> = first.iter().zip(&grown).filter(|(a, b)| a != b).collect();
    let to_old: BTreeSet<&String> = moved
        .iter()
        .map(|(_, b)| *b)
        .filter(|b| *b != "be4")
        .collect();
    assert!(
        moved.len() <= first.len() * 2 / 5,
        "{} of {} tuples moved: {moved:?}",
        moved.len(),
        first.len()
    );
    assert!(
        moved.iter().filter(|(_, b)| *b != "be4").count() <= 2,
        "tuples moved between the old backends {to_old:?}: {moved:?}"
    );
    assert!(
        grown.iter().any(|b| b == "be4"),
        "the new backend gets tuples"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&c.xlb(&["stats", "--json"]).expect("stats")).expect("json");
    assert_eq!(
        stats["outcomes"]["sched_fallback"], 0,
        "every new flow was placed by its Maglev table: {stats}"
    );
    eprintln!(
        "maglev: {} of {} tuples moved to the new backend",
        moved.len(),
        first.len()
    );
}

/// Pods' processes live below the node cgroup (the socket hooks' attach point), as on a real
/// node: their connections are still balanced per client on the TC path. Least-conn counts
/// every open connection; session affinity pins each client pod on its own.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn per_client_semantics_hold_for_pods_below_the_node_cgroup() {
    require_privileges();
    let c = cluster("least-conn");
    // Six connections held open, two from each client pod: least-conn puts two on each
    // backend, seeing the connections of every pod.
    let mut held = Vec::new();
    let mut picks = Vec::new();
    for client in [
        "client1", "client2", "client3", "client1", "client2", "client3",
    ] {
        let (stream, name) = c
            .node
            .pod(client)
            .ns
            .enter(|| tcp_connect(addr(80), T))
            .expect("client thread")
            .expect("connect");
        held.push(stream);
        picks.push(name);
    }
    assert_eq!(
        tally(&picks),
        [("be1".into(), 2), ("be2".into(), 2), ("be3".into(), 2)].into(),
        "{picks:?}"
    );
    let rows = c.services().expect("services");
    let open: Vec<u64> = rows
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["frontend"]["port"] == 80)
        .flat_map(|r| r["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| b["open_flows"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(open, [2, 2, 2], "open flows per backend: {rows}");
    drop(held);

    // Session affinity (random algorithm underneath): each client pod keeps its backend.
    c.write_manifest("web.yaml", &service("web", VIP, Some(600)))
        .expect("write");
    wait_for_scheduler(&c, "random");
    wait_until(Duration::from_secs(5), || {
        c.services().is_ok_and(|rows| {
            rows.as_array()
                .is_some_and(|r| r.iter().all(|r| r["affinity_timeout_s"] == 600))
        })
    })
    .expect("affinity programmed");
    for client in ["client1", "client2", "client3"] {
        let counts = tally(&connections(&c.node.pod(client).ns, 12));
        assert_eq!(
            counts.len(),
            1,
            "{client} pinned to one backend: {counts:?}"
        );
    }
}
