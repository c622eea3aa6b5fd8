//! `cargo xtask run`: a single node in throw-away namespaces, the real agent with the example
//! manifests, bounded TCP/UDP traffic from two client pods (to a dual-stack Service over
//! both families) and from a client outside the node (NodePort and LoadBalancer IP through
//! XDP), live per-backend counters.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use xlb_tests::{
    cluster::{Cluster, wait_until},
    lan::Lan,
    netns::Netns,
    workload::{tcp_hello, udp_hello},
};

const NODE_IP: &str = "192.168.50.1";
const OUTSIDE_IP: &str = "192.168.50.100";
const LB_IP: &str = "192.0.2.10";

/// Dual-stack pods: `web` is a dual-stack Service (both families' ClusterIPs).
const PODS: [(&str, &str, Option<&str>); 8] = [
    ("client-a", "10.244.0.2", Some("fd00:10:244::2")),
    ("client-b", "10.244.0.3", Some("fd00:10:244::3")),
    ("web-1", "10.244.0.11", Some("fd00:10:244::11")),
    ("web-2", "10.244.0.12", Some("fd00:10:244::12")),
    ("web-3", "10.244.0.13", Some("fd00:10:244::13")),
    ("web-unready", "10.244.0.14", Some("fd00:10:244::14")),
    ("sticky-1", "10.244.0.21", None),
    ("sticky-2", "10.244.0.22", None),
];

type Tally = Arc<Mutex<BTreeMap<String, usize>>>;

pub fn run(xlb: &Path, root: &Path, seconds: u64) -> Result<()> {
    // SAFETY: sets XLB_BIN for the fixtures before any thread is started.
    unsafe { std::env::set_var("XLB_BIN", xlb) };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    println!(
        "building the demo node and {} pods in fresh namespaces...",
        PODS.len()
    );
    let mut cluster = Cluster::dual_stack(&PODS)?;
    // A client outside the cluster, on the node's external segment; the LB IP is routed to
    // the node, as a provider's load balancer would.
    let mut lan = Lan::new(&cluster.node.tag)?;
    let outside = Netns::new(&cluster.node.tag, "outside")?;
    lan.connect(&outside, "eth0", &format!("{OUTSIDE_IP}/24"))?;
    outside.ip(&["route", "add", LB_IP, "via", NODE_IP])?;
    lan.connect(&cluster.node.ns, "ext0", &format!("{NODE_IP}/24"))?;
    cluster.agent_args = [
        "--external-ifaces",
        "ext0",
        // veth: native XDP_TX would need NAPI on the bridge side (see the README).
        "--xdp-mode",
        "generic",
        "--node-name",
        "demo-node",
    ]
    .map(String::from)
    .to_vec();
    for entry in std::fs::read_dir(root.join("examples/manifests"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        cluster.write_manifest(&name, &std::fs::read_to_string(&path)?)?;
    }
    cluster.start_agent()?;
    cluster.wait_attached(Duration::from_secs(10))?;
    wait_until(Duration::from_secs(5), || {
        cluster
            .programmed("10.96.0.10:80/TCP")
            .is_some_and(|b| b.len() == 3)
            && cluster
                .programmed("[fd00:10:96::10]:80/TCP")
                .is_some_and(|b| b.len() == 3)
    })
    .context("services not programmed")?;
    println!(
        "agent running (node namespace {}, pins {}); manifests from examples/manifests\n",
        cluster.node.ns.name(),
        cluster.pins.bpffs.display()
    );

    let tally: Tally = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut clients = Vec::new();
    let outside_targets = [
        ("nodeport", "192.168.50.1:30080", false),
        ("lb-ip", "192.0.2.10:80", false),
    ];
    for (client, ns, targets) in [
        (
            "client-a",
            &cluster.node.pod("client-a").ns,
            vec![
                ("web tcp", "10.96.0.10:80", false),
                ("web udp", "10.96.0.10:53", true),
                ("web6 tcp", "[fd00:10:96::10]:80", false),
                ("web6 udp", "[fd00:10:96::10]:53", true),
            ],
        ),
        (
            "client-b",
            &cluster.node.pod("client-b").ns,
            vec![
                ("sticky tcp", "10.96.0.20:80", false),
                ("empty tcp", "10.96.0.30:80", false),
            ],
        ),
        ("outside", &outside, outside_targets.to_vec()),
    ] {
        let stop = Arc::clone(&stop);
        let tally = Arc::clone(&tally);
        clients.push(ns.spawn(move || {
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for &(label, target, udp) in &targets {
                    let target: SocketAddr = target.parse().expect("demo address");
                    let timeout = Duration::from_millis(500);
                    let who = if udp {
                        udp_hello(target, timeout)
                    } else {
                        tcp_hello(target, timeout)
                    };
                    let key = match who {
                        Ok(backend) => format!("{client} -> {label:<10} -> {backend}"),
                        Err(e) => format!("{client} -> {label:<10} -> {}", e.kind()),
                    };
                    *tally.lock().expect("tally").entry(key).or_insert(0) += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })?);
    }
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        println!(
            "---- {}s left ---- `xlb services` (counters from the BPF maps):",
            deadline.saturating_duration_since(Instant::now()).as_secs()
        );
        println!("{}", cluster.xlb(&["services"])?.trim_end());
        println!("client view (requests per answer):");
        for (key, n) in tally.lock().expect("tally").iter() {
            println!("  {key:<45} {n:>6}");
        }
        println!();
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    println!("{}", cluster.xlb(&["stats"])?.trim_end());
    println!("\ncleaning up: stopping the agent, removing pins and namespaces");
    if let Some(agent) = cluster.agent.take() {
        agent.stop()?;
    }
    drop(cluster);
    drop(outside);
    drop(lan);
    Ok(())
}
