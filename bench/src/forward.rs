//! Packets per second through a real namespace topology — client pod → node → backend pod —
//! counted where they arrive (the backend's interface), for xlb (TC on the client's
//! interface), kube-proxy's iptables and nftables rulesets, and plain routing to the pod
//! address (no service at all). trafgen sends a bounded count of UDP packets; `new` gives
//! every packet a new source port (a new flow), `established` keeps one 5-tuple. The
//! services are UDP here: a TCP flow would need a real handshake for netfilter's conntrack.
use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::program_names;
use serde::Serialize;
use xlb::datapath::{
    attach, load,
    pins::{self, PinLayout},
    route_policy,
    route_watch::RouteGeneration,
};
use xlb_tests::netns::{Netns, unique_tag};

use crate::{control, datapath};

const CLIENT: &str = "10.250.0.2";
const GATEWAY: &str = "169.254.1.1";
const NODE_MAC: &str = "ee:ee:ee:ee:ee:ee";
const BACKEND_GW: &str = "169.254.2.2";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Xlb,
    Iptables,
    Nftables,
    Routing,
    /// The same client → backend path over IPv6: xlb, and plain routing to the pod.
    Xlb6,
    Routing6,
}

const CLIENT6: &str = "fd00:250::2";
const GATEWAY6: &str = "fe80::1";
const BACKEND_GW6: &str = "fe80::2:2";
/// Sources of the IPv6 new flows (trafgen counts up the last 4 bytes).
const NEW_FLOW_BASE6: &str = "fd00:128::1";
const NEW_FLOW_NET6: &str = "fd00:128::/64";

#[derive(Debug, Clone, Serialize)]
pub struct Forwarding {
    pub mode: Mode,
    pub flows: &'static str,
    pub services: u32,
    pub sent: u64,
    pub delivered: u64,
    /// Delivered packets per second.
    pub pps: f64,
    /// CPU time of the whole machine per delivered packet, µs.
    pub cpu_us_per_packet: f64,
    /// xlb only: the from-pod program's own time per packet in this run, from the kernel's
    /// BPF run-time statistics (`kernel.bpf_stats_enabled`), ns.
    pub program_ns_per_packet: Option<f64>,
}

/// One scenario over the passes of a run: medians, and the rate against plain routing of
/// the same family measured in the same pass (passes alternate which of the two goes
/// first, so a drift of the machine between them cancels out over the passes).
#[derive(Debug, Clone, Serialize)]
pub struct Forwarded {
    #[serde(flatten)]
    pub median: Forwarding,
    pub passes: usize,
    pub pps_min: f64,
    pub pps_max: f64,
    /// Median over the passes of this pass's pps / plain routing's pps (not for routing).
    pub vs_routing: Option<f64>,
    pub vs_routing_min: Option<f64>,
    pub vs_routing_max: Option<f64>,
}

/// Run time and run count of the loaded program with id `id`.
fn program_runs(id: u32) -> Option<(u64, u64)> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .map(|p| (p.run_time().as_nanos() as u64, p.run_count()))
}

/// client ns — veth — node ns — veth — backend ns; removed on drop (namespaces own links).
struct Topology {
    client: Netns,
    node: Netns,
    backend: Netns,
    client_host_iface: String,
    backend_host_iface: String,
}

fn ip(ns: &Netns, args: &[&str]) -> Result<()> {
    ns.ip(args)
}

impl Topology {
    fn new() -> Result<Topology> {
        let tag = unique_tag();
        let (client, node, backend) = (
            Netns::new(&tag, "bclient")?,
            Netns::new(&tag, "bnode")?,
            Netns::new(&tag, "bbackend")?,
        );
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for ns in [&client, &node, &backend] {
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        let host_c: String = format!("bc{tag}").chars().take(15).collect();
        let host_b: String = format!("bb{tag}").chars().take(15).collect();
        node.add_veth(&host_c, Some(NODE_MAC), &client)?;
        node.add_veth(&host_b, None, &backend)?;
        ip(
            &client,
            &["addr", "add", &format!("{CLIENT}/32"), "dev", "eth0"],
        )?;
        ip(&client, &["link", "set", "eth0", "up"])?;
        ip(
            &client,
            &["route", "add", GATEWAY, "dev", "eth0", "scope", "link"],
        )?;
        ip(&client, &["route", "add", "default", "via", GATEWAY])?;
        ip(
            &client,
            &[
                "neigh",
                "add",
                GATEWAY,
                "lladdr",
                NODE_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
        ip(&backend, &["link", "set", "eth0", "up"])?;
        // Every endpoint address lives behind the backend's interface (10.0.0.0/8: at 100k
        // services the generated endpoints run past 10.244.0.0/14; the client's /32 wins).
        let backend_mac = mac_of(&backend, "eth0")?;
        ip(&node, &["link", "set", &host_c, "up"])?;
        ip(&node, &["link", "set", &host_b, "up"])?;
        ip(
            &node,
            &["route", "add", &format!("{CLIENT}/32"), "dev", &host_c],
        )?;
        ip(
            &node,
            &["route", "add", BACKEND_GW, "dev", &host_b, "scope", "link"],
        )?;
        ip(&node, &["route", "add", "10.0.0.0/8", "via", BACKEND_GW])?;
        // The new flows' sources live behind the client (strict reverse-path filters agree).
        ip(&node, &["route", "add", NEW_FLOW_NET, "dev", &host_c])?;
        ip(
            &node,
            &[
                "neigh",
                "add",
                BACKEND_GW,
                "lladdr",
                &backend_mac,
                "dev",
                &host_b,
                "nud",
                "permanent",
            ],
        )?;
        // IPv6, the same way: the client's /128 behind a link-local gateway, every fd00::/16
        // endpoint behind the backend's interface.
        ip(
            &client,
            &[
                "-6",
                "addr",
                "add",
                &format!("{CLIENT6}/128"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        ip(&client, &["-6", "route", "add", GATEWAY6, "dev", "eth0"])?;
        ip(
            &client,
            &[
                "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
            ],
        )?;
        ip(
            &client,
            &[
                "-6",
                "neigh",
                "add",
                GATEWAY6,
                "lladdr",
                NODE_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
        ip(
            &node,
            &[
                "-6",
                "route",
                "add",
                &format!("{CLIENT6}/128"),
                "dev",
                &host_c,
            ],
        )?;
        ip(
            &node,
            &["-6", "route", "add", NEW_FLOW_NET6, "dev", &host_c],
        )?;
        ip(&node, &["-6", "route", "add", BACKEND_GW6, "dev", &host_b])?;
        ip(
            &node,
            &[
                "-6",
                "route",
                "add",
                "fd00:10::/32",
                "via",
                BACKEND_GW6,
                "dev",
                &host_b,
            ],
        )?;
        ip(
            &node,
            &[
                "-6",
                "neigh",
                "add",
                BACKEND_GW6,
                "lladdr",
                &backend_mac,
                "dev",
                &host_b,
                "nud",
                "permanent",
            ],
        )?;
        Ok(Topology {
            client,
            node,
            backend,
            client_host_iface: host_c,
            backend_host_iface: host_b,
        })
    }
}

fn mac_of(ns: &Netns, iface: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-j", "link", "show", iface])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["address"]
        .as_str()
        .map(String::from)
        .context("interface MAC")
}

/// Busy jiffies of all CPUs (user+nice+system+irq+softirq).
fn busy_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6))
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0)
}

/// UDP (its conntrack has no handshake to fake). New flows: every packet from the next
/// source address (10.128.0.1, .2, …), so each one is a flow nobody has seen — a random
/// source port alone repeats after 65 536 packets and most "new" packets would hit
/// conntrack. Established: one 5-tuple throughout.
fn trafgen_config(dst: IpAddr, dport: u16, new_flows: bool, dst_mac: &str) -> String {
    let ip = match dst {
        IpAddr::V4(dst) => {
            let saddr = if new_flows {
                format!("saddr={NEW_FLOW_BASE}, saddr=dinc()")
            } else {
                format!("saddr={CLIENT}")
            };
            format!("ipv4({saddr}, daddr={dst}, ttl=64)")
        }
        IpAddr::V6(dst) => {
            let saddr = if new_flows {
                format!("sa={NEW_FLOW_BASE6}, sa=dinc()")
            } else {
                format!("sa={CLIENT6}")
            };
            format!("ip6({saddr}, da={dst}, hl=64)")
        }
    };
    format!(
        "{{\n  eth(da={dst_mac}, sa=02:00:00:00:00:01),\n  {ip},\n  udp(sp=40000, dp={dport}),\n  \"xlb-bench-payload\"\n}}\n"
    )
}

/// Sources of the new flows, counting up (routed back to the client).
const NEW_FLOW_BASE: &str = "10.128.0.1";
const NEW_FLOW_NET: &str = "10.128.0.0/12";

/// New flows per measurement at most: each stays in conntrack (netfilter's table holds
/// 262 144 here, xlb's two entries per flow in 524 288), and a full table would measure
/// eviction or drops instead of the rules.
const NEW_FLOWS_MAX: u64 = 200_000;

/// Sends `count` packets and measures what arrives at the backend.
fn blast(
    t: &Topology,
    dst: IpAddr,
    dport: u16,
    new_flows: bool,
    count: u64,
) -> Result<(u64, f64, f64)> {
    let conf = std::env::temp_dir().join(format!("xlb-trafgen-{}.cfg", std::process::id()));
    std::fs::write(&conf, trafgen_config(dst, dport, new_flows, NODE_MAC))?;
    let (before, _) = t.backend.link_packets("eth0")?;
    let cpu_before = busy_jiffies();
    let started = Instant::now();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            t.client.name(),
            "trafgen",
            "-o",
            "eth0",
            "-q",
            "-n",
        ])
        .arg(count.to_string())
        .arg("-i")
        .arg(&conf)
        .output()
        .context("running trafgen")?;
    // Let queued packets drain before counting.
    std::thread::sleep(Duration::from_millis(200));
    let elapsed = started.elapsed().as_secs_f64() - 0.2;
    let _ = std::fs::remove_file(&conf);
    if !out.status.success() {
        bail!("trafgen: {}", String::from_utf8_lossy(&out.stderr));
    }
    let delivered = t.backend.link_packets("eth0")?.0 - before;
    let ticks = (busy_jiffies() - cpu_before) as f64;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_us = if delivered > 0 {
        ticks / hz * 1e6 / delivered as f64
    } else {
        f64::NAN
    };
    Ok((delivered, delivered as f64 / elapsed.max(1e-6), cpu_us))
}

fn in_ns(ns: &Netns, program: &str, args: &[&str], input: Option<&str>) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), program])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Removes the bench's pins (and so its links) on drop.
struct Pins(std::path::PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        pins::cleanup(&PinLayout::new(&self.0));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The largest service count whose kube-proxy rulesets the bench loads.
pub const KUBE_PROXY_MAX: u32 = 10_000;

/// Every mode at `services` services, new flows and established, `count` packets each;
/// plain routing and xlb (both families) `passes` times, interleaved, kube-proxy's rulesets
/// once (loading them takes minutes at scale).
pub fn measure(services: u32, count: u64, passes: usize) -> Result<Vec<Forwarded>> {
    let mut samples: Vec<(usize, Forwarding)> = Vec::new();
    for pass in 0..passes.max(1) {
        let modes: &[Mode] = match pass {
            0 => &[
                Mode::Routing,
                Mode::Xlb,
                Mode::Iptables,
                Mode::Nftables,
                Mode::Routing6,
                Mode::Xlb6,
            ],
            odd if odd % 2 == 1 => &[Mode::Xlb, Mode::Routing, Mode::Xlb6, Mode::Routing6],
            _ => &[Mode::Routing, Mode::Xlb, Mode::Routing6, Mode::Xlb6],
        };
        for &mode in modes {
            if matches!(mode, Mode::Iptables | Mode::Nftables) && services > KUBE_PROXY_MAX {
                eprintln!(
                    "   {mode:?} skipped above {KUBE_PROXY_MAX} services (loading its ruleset takes many minutes)"
                );
                continue;
            }
            for f in measure_mode(mode, services, count)? {
                samples.push((pass, f));
            }
        }
    }
    Ok(summarize(&samples))
}

/// Per (mode, flows), in the order first measured: medians over the passes and the
/// per-pass ratio to routing of the same family.
fn summarize(samples: &[(usize, Forwarding)]) -> Vec<Forwarded> {
    let mut out: Vec<Forwarded> = Vec::new();
    for (_, first) in samples {
        if out
            .iter()
            .any(|o| o.median.mode == first.mode && o.median.flows == first.flows)
        {
            continue;
        }
        let of = |mode: Mode| -> Vec<&(usize, Forwarding)> {
            samples
                .iter()
                .filter(|(_, f)| f.mode == mode && f.flows == first.flows)
                .collect()
        };
        let mine = of(first.mode);
        let median = |values: Vec<f64>| crate::percentile(values, 0.5);
        let pps: Vec<f64> = mine.iter().map(|(_, f)| f.pps).collect();
        let baseline = match first.mode {
            Mode::Routing | Mode::Routing6 => None,
            Mode::Xlb6 => Some(Mode::Routing6),
            _ => Some(Mode::Routing),
        };
        let ratios: Vec<f64> = baseline
            .map(|b| {
                let base = of(b);
                mine.iter()
                    .filter_map(|(pass, f)| {
                        base.iter()
                            .find(|(p, _)| p == pass)
                            .map(|(_, r)| f.pps / r.pps.max(1.0))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let programs: Vec<f64> = mine
            .iter()
            .filter_map(|(_, f)| f.program_ns_per_packet)
            .collect();
        let range = |v: &[f64]| {
            (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )
        };
        let (pps_min, pps_max) = range(&pps);
        let (vs_min, vs_max) = range(&ratios);
        let measured = !ratios.is_empty();
        out.push(Forwarded {
            median: Forwarding {
                delivered: median(mine.iter().map(|(_, f)| f.delivered as f64).collect()) as u64,
                pps: median(pps),
                cpu_us_per_packet: median(mine.iter().map(|(_, f)| f.cpu_us_per_packet).collect()),
                program_ns_per_packet: (!programs.is_empty()).then(|| median(programs)),
                ..first.clone()
            },
            passes: mine.len(),
            pps_min,
            pps_max,
            vs_routing: measured.then(|| median(ratios)),
            vs_routing_min: measured.then_some(vs_min),
            vs_routing_max: measured.then_some(vs_max),
        });
    }
    out
}

/// One mode in a fresh topology: its new-flow and established measurements.
fn measure_mode(mode: Mode, services: u32, count: u64) -> Result<Vec<Forwarding>> {
    let mut results = Vec::new();
    let target = services / 2;
    let vip = Ipv4Addr::from(0x0a60_0000 + target);
    let endpoint = Ipv4Addr::from(0x0af4_0000 + target * datapath::ENDPOINTS);
    let (vip6, endpoint6) = (datapath::vip6(target), datapath::backend_ip6(target, 0));
    let t = Topology::new()?;
    let mut from_pod_id = None;
    let _pins = match mode {
        Mode::Xlb | Mode::Xlb6 => {
            let pins = Pins(std::path::PathBuf::from(format!(
                "/sys/fs/bpf/xlb-bench-fwd-{}",
                std::process::id()
            )));
            xlb::datapath::bpffs::ensure_pin_dir(&pins.0)?;
            let layout = PinLayout::new(&pins.0);
            std::fs::create_dir_all(layout.maps_dir())?;
            // Both are pod interfaces, as the agent would see them: the backend's one
            // receives translated packets with bpf_redirect_peer.
            let ifaces = [t.client_host_iface.clone(), t.backend_host_iface.clone()];
            let path = pins.0.clone();
            let id = t.node.enter(move || -> Result<u32> {
                let layout = PinLayout::new(&path);
                let mut ebpf = load::load(Some(&layout))?;
                datapath::populate(&mut ebpf, services, 17)?;
                datapath::populate6(&mut ebpf, services, 17)?;
                for iface in &ifaces {
                    attach::attach(&mut ebpf, iface, &layout)?;
                }
                // The routing generation and policy, as the agent's route watcher sets them
                // at start (this node's routing does not change during the run).
                RouteGeneration::open(&layout)?.raise(route_policy::source_free()?)?;
                let from_pod = load::program(&mut ebpf, program_names::TC_FROM_POD)?;
                Ok(from_pod.info()?.id())
            })??;
            from_pod_id = Some(id);
            Some(pins)
        }
        Mode::Iptables => {
            let (rules, _) = control::iptables_ruleset(services, "udp");
            in_ns(&t.node, "iptables-restore", &[], Some(&rules))?;
            None
        }
        Mode::Nftables => {
            let (rules, _) = control::nft_ruleset(services, "udp");
            in_ns(&t.node, "nft", &["-f", "-"], Some(&rules))?;
            None
        }
        Mode::Routing | Mode::Routing6 => None,
    };
    let (dst, dport): (IpAddr, u16) = match mode {
        Mode::Routing => (endpoint.into(), 8080),
        Mode::Routing6 => (endpoint6.into(), 8080),
        Mode::Xlb6 => (vip6.into(), 80),
        _ => (vip.into(), 80),
    };
    // Counts run time only while this descriptor is open.
    let _stats = from_pod_id
        .map(|_| aya::sys::enable_stats(aya::sys::Stats::RunTime))
        .transpose()
        .context("enabling BPF run-time statistics")?;
    // A first, unmeasured blast: the first run in a fresh topology pays for page
    // faults and first-time allocations (seen as a routing outlier at 1 service).
    blast(&t, dst, dport, false, count / 10)?;
    for (flows, new) in [("new", true), ("established", false)] {
        let runs_before = from_pod_id.and_then(program_runs);
        let sent = if new { count.min(NEW_FLOWS_MAX) } else { count };
        let (delivered, pps, cpu) = blast(&t, dst, dport, new, sent)?;
        let program_ns_per_packet = match (runs_before, from_pod_id.and_then(program_runs)) {
            (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => {
                Some((t1 - t0) as f64 / (n1 - n0) as f64)
            }
            _ => None,
        };
        results.push(Forwarding {
            mode,
            flows,
            services,
            sent,
            delivered,
            pps,
            cpu_us_per_packet: cpu,
            program_ns_per_packet,
        });
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: Mode, pps: f64) -> Forwarding {
        Forwarding {
            mode,
            flows: "new",
            services: 1,
            sent: 10,
            delivered: 10,
            pps,
            cpu_us_per_packet: 1.0,
            program_ns_per_packet: None,
        }
    }

    #[test]
    fn ratios_to_routing_pair_the_same_pass_and_family() {
        let samples = [
            (0, sample(Mode::Routing, 100.0)),
            (0, sample(Mode::Xlb, 90.0)),
            (0, sample(Mode::Iptables, 50.0)),
            (0, sample(Mode::Routing6, 10.0)),
            (0, sample(Mode::Xlb6, 20.0)),
            (1, sample(Mode::Xlb, 300.0)),
            (1, sample(Mode::Routing, 200.0)),
            (2, sample(Mode::Routing, 400.0)),
            (2, sample(Mode::Xlb, 440.0)),
        ];
        let out = summarize(&samples);
        let row = |mode| out.iter().find(|o| o.median.mode == mode).expect("row");
        let xlb = row(Mode::Xlb);
        // Per pass 0.9, 1.5, 1.1: the median is 1.1, not the ratio of the medians (300/200).
        assert_eq!(xlb.vs_routing, Some(1.1));
        assert_eq!(
            (xlb.vs_routing_min, xlb.vs_routing_max),
            (Some(0.9), Some(1.5))
        );
        assert_eq!(
            (xlb.passes, xlb.median.pps, xlb.pps_min, xlb.pps_max),
            (3, 300.0, 90.0, 440.0)
        );
        assert_eq!(row(Mode::Iptables).vs_routing, Some(0.5));
        assert_eq!(row(Mode::Xlb6).vs_routing, Some(2.0));
        assert_eq!(row(Mode::Routing).vs_routing, None);
        assert_eq!(out.len(), 5);
    }
}
