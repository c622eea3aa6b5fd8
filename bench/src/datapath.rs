//! Per-packet cost of the programs, in the kernel's own measure (BPF_PROG_TEST_RUN's
//! duration), at a given number of services with 10 endpoints each (fewer at 100k:
//! `endpoints_at`), in a namespace of the bench's own whose routes make the programs' FIB
//! lookups succeed (as on a node).
//!
//! Two methods:
//! - *warm*: one call runs the same packet `WARM_REPEAT` times (the kernel's repetitions);
//!   the result is the median over calls of the per-packet average. The kernel hands a
//!   translated packet to the next repetition, so every backend address of the measured
//!   service also gets a "mirror" frontend leading back to the service: each repetition is
//!   another established-flow translation, alternating between the two tuples. The TTL
//!   starts at 255 (forwarding decrements it).
//! - *cold*: one fresh packet per call, each to another service: new flows (which cannot
//!   repeat) and the spread over many services, cache misses and call overhead included
//!   (the `floor_non_ip` row is that overhead).
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use lb_common::{
    Ip6, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_SNAT, VIP_ANY_NODE_IP, ip6_from_octets,
    map_sizes, program_names,
};
use serde::Serialize;
use xlb::{
    cli::DEFAULT_SNAT_PORTS,
    datapath::{attach, load},
};
use xlb_tests::{
    datapath::{
        FrontendEntry, TC_ACT_REDIRECT, TestRunOutput, put_frontend, put_frontend6, put_node,
        put_node6, test_run,
    },
    netns::{Netns, unique_tag},
    packet::{ACK, Frame, SYN},
    packet6::Frame6,
};

pub const ENDPOINTS: u32 = 10;
const NODE_IP: &str = "192.168.50.1";
const NODE_PORT: u16 = 30080;

/// Repetitions per warm call: below the TTL of 255 the translated packets start with.
const WARM_REPEAT: u32 = 250;
/// Mirror frontends and their backends get ids above every generated one, at the top of the
/// backend id space (both families' mirrors).
const MIRROR_ID_BASE: u32 = map_sizes::BACKENDS - 2 * ENDPOINTS - 1;
const _: () = assert!(MIRROR_ID_BASE + 2 * ENDPOINTS < map_sizes::BACKENDS);

/// Endpoints per service at `services` services: `ENDPOINTS`, or fewer where that many would
/// not fit the backend ids (`map_sizes::BACKENDS`, the agent's limit too): 2 at 100k. Each
/// family's backends are numbered from 1 (their arrays are separate; the agent's ids are
/// unique across families, so the bench's IPv6 backends share counter slots with IPv4's).
pub fn endpoints_at(services: u32) -> u32 {
    ((MIRROR_ID_BASE - 1) / (services + 1)).clamp(1, ENDPOINTS)
}

#[derive(Debug, Clone, Serialize)]
pub struct PacketCost {
    pub scenario: &'static str,
    /// "tc" or "xdp": the hook whose floor this scenario is compared with.
    pub hook: &'static str,
    /// "warm" (repetitions of one packet) or "cold" (one packet per call).
    pub method: &'static str,
    pub services: u32,
    /// Median and 90th percentile of the per-packet program time, ns.
    pub median_ns: u64,
    pub p90_ns: u64,
    pub samples: usize,
}

fn vip(i: u32) -> Ipv4Addr {
    // 10.96.0.0/12 holds a million services.
    Ipv4Addr::from(0x0a60_0000 + i)
}

fn backend_ip(service: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0af4_0000 + service * ENDPOINTS + e)
}

pub(crate) fn ne(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

const NODE_IP6: &str = "fd00:192:168:50::1";

pub fn vip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(0xfd00_0010_0096_0000_0000_0000_0000_0000u128 + u128::from(i))
}

pub fn backend_ip6(service: u32, e: u32) -> Ipv6Addr {
    Ipv6Addr::from(
        0xfd00_0010_0244_0000_0000_0000_0000_0000u128 + u128::from(service * ENDPOINTS + e),
    )
}

fn ne6(ip: Ipv6Addr) -> Ip6 {
    ip6_from_octets(ip.octets())
}

/// The IPv6 twin of `populate`: `services` IPv6 ClusterIPs and one IPv6 NodePort, service
/// ids after the IPv4 ones, backend ids from 1 as IPv4's (see `endpoints_at`).
pub fn populate6(ebpf: &mut Ebpf, services: u32, proto: u8) -> Result<()> {
    let service_base = services + 1;
    let endpoints = endpoints_at(services);
    for s in 0..=services {
        let (vip, port, scope, flags) = if s == services {
            ([0; 4], NODE_PORT, SCOPE_EXTERNAL, SVC_FLAG_SNAT)
        } else {
            (ne6(vip6(s)), 80, SCOPE_INTERNAL, 0)
        };
        let backends: Vec<(u32, Ip6, u16)> = (0..endpoints)
            .map(|e| (s * endpoints + e + 1, ne6(backend_ip6(s, e)), 8080))
            .collect();
        let frontend = FrontendEntry {
            vip,
            port,
            proto,
            scope,
            service_id: service_base + s + 1,
            flags,
            affinity_timeout_s: 0,
        };
        put_frontend6(ebpf, frontend, &backends);
    }
    put_node6(ebpf, &[ne6(NODE_IP6.parse()?)], DEFAULT_SNAT_PORTS);
    Ok(())
}

/// Fills the maps with `services` ClusterIPs (port 80 → 8080 of protocol `proto`) of
/// `endpoints_at(services)` endpoints, plus one NodePort (external scope, SNAT) with as many.
pub fn populate(ebpf: &mut Ebpf, services: u32, proto: u8) -> Result<()> {
    let endpoints = endpoints_at(services);
    for s in 0..=services {
        // Service `services` is the NodePort.
        let (vip, port, scope, flags) = if s == services {
            (VIP_ANY_NODE_IP, NODE_PORT, SCOPE_EXTERNAL, SVC_FLAG_SNAT)
        } else {
            (ne(vip(s)), 80, SCOPE_INTERNAL, 0)
        };
        let backends: Vec<(u32, u32, u16)> = (0..endpoints)
            .map(|e| (s * endpoints + e + 1, ne(backend_ip(s, e)), 8080))
            .collect();
        let frontend = FrontendEntry {
            vip,
            port,
            proto,
            scope,
            service_id: s + 1,
            flags,
            affinity_timeout_s: 0,
        };
        put_frontend(ebpf, frontend, &backends);
    }
    let node = ne(NODE_IP.parse()?);
    put_node(ebpf, &[node], DEFAULT_SNAT_PORTS);
    Ok(())
}

#[derive(Clone, Copy)]
enum Hook {
    FromPod,
    ToPod,
    External,
}

fn run(ebpf: &mut Ebpf, hook: Hook, frame: &[u8]) -> Result<(i32, u64)> {
    let out = run_repeated(ebpf, hook, frame, 1)?;
    Ok((out.retval, out.duration_ns))
}

fn run_repeated(ebpf: &mut Ebpf, hook: Hook, frame: &[u8], repeat: u32) -> Result<TestRunOutput> {
    Ok(match hook {
        Hook::FromPod => test_run(
            load::program(ebpf, program_names::TC_FROM_POD)?,
            frame,
            repeat,
        )?,
        Hook::ToPod => test_run(
            load::program(ebpf, program_names::TC_TO_POD)?,
            frame,
            repeat,
        )?,
        Hook::External => test_run(load::xdp_program(ebpf)?, frame, repeat)?,
    })
}

pub(crate) fn summarize(scenario: &'static str, services: u32, ns: Vec<u64>) -> PacketCost {
    summarize_as(scenario, "cold", services, ns)
}

fn summarize_as(
    scenario: &'static str,
    method: &'static str,
    services: u32,
    mut ns: Vec<u64>,
) -> PacketCost {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize];
    PacketCost {
        scenario,
        hook: if ["nodeport_", "external_", "katran_", "floor_trivial_xdp"]
            .iter()
            .any(|p| scenario.starts_with(p))
        {
            "xdp"
        } else {
            "tc"
        },
        method,
        services,
        median_ns: at(0.5),
        p90_ns: at(0.9),
        samples: ns.len(),
    }
}

/// Lets the packets of the warm runs come back: every backend address of service `target`
/// (port 8080) is also a frontend whose one backend is the service's VIP:80.
fn add_mirrors(ebpf: &mut Ebpf, target: u32, endpoints: u32) -> Result<()> {
    for e in 0..endpoints {
        let id = MIRROR_ID_BASE + e;
        let frontend = FrontendEntry {
            vip: ne(backend_ip(target, e)),
            port: 8080,
            proto: 6,
            scope: SCOPE_INTERNAL,
            service_id: id,
            flags: 0,
            affinity_timeout_s: 0,
        };
        put_frontend(ebpf, frontend, &[(id, ne(vip(target)), 80)]);
    }
    Ok(())
}

/// `frame` with TTL 255 (and its IPv4 checksum redone).
fn with_max_ttl(mut frame: Vec<u8>) -> Vec<u8> {
    frame[22] = 255;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = xlb_tests::packet::checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    frame
}

/// Median over `calls` calls of the per-packet time of `WARM_REPEAT` repetitions.
fn warm(ebpf: &mut Ebpf, hook: Hook, frame: &[u8], calls: u32) -> Result<Vec<u64>> {
    if let Hook::External = hook {
        bail!("XDP packets cannot be bounced back: measured cold only");
    }
    let mut ns = Vec::new();
    for _ in 0..calls {
        ns.push(run_repeated(ebpf, hook, frame, WARM_REPEAT)?.duration_ns);
    }
    Ok(ns)
}

/// The bench's node: forwarding on, every 10.0.0.0/8 address routed out of a veth whose
/// peer lives in a second namespace, the neighbour known, the veth marked as a pod
/// interface (so forwarding takes the same bpf_redirect_peer branch as on a node).
struct Node {
    ns: Netns,
    _peer: Netns,
}

impl Node {
    fn new() -> Result<Node> {
        let tag = unique_tag();
        let (ns, peer) = (Netns::new(&tag, "bdp")?, Netns::new(&tag, "bdpeer")?);
        ns.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        ns.add_veth("bd0", None, &peer)?;
        ns.ip(&["link", "set", "bd0", "up"])?;
        peer.ip(&["link", "set", "eth0", "up"])?;
        ns.route_via("bd0", "10.0.0.0/8", "169.254.3.3", "02:00:00:00:03:03")?;
        // The same for IPv6: every fd00::/16 address behind a permanent neighbour.
        ns.route_via("bd0", "fd00::/16", "fe80::303", "02:00:00:00:03:03")?;
        Ok(Node { ns, _peer: peer })
    }
}

/// Measures every scenario at `services` services, `samples` packets each (cold) and
/// `samples / 100` calls of `WARM_REPEAT` repetitions (warm).
pub fn measure(services: u32, samples: u32, katran: Option<&Path>) -> Result<Vec<PacketCost>> {
    let node = Node::new()?;
    let katran = katran.map(Path::to_path_buf);
    node.ns
        .enter(move || measure_here(services, samples, katran.as_deref()))?
}

fn measure_here(services: u32, samples: u32, katran: Option<&Path>) -> Result<Vec<PacketCost>> {
    let mut ebpf = load::load(None).context("loading the datapath")?;
    populate(&mut ebpf, services, 6)?;
    let bd0 = nix::net::if_::if_nametoindex("bd0").context("ifindex of bd0")?;
    attach::mark_pod_iface(&mut ebpf, "bd0", bd0, true)?;
    // The routing policy, as the agent's route watcher sets it at start.
    let free = xlb::datapath::route_policy::source_free().context("routing policy")?;
    let mut generation = aya::maps::Array::<_, u64>::try_from(
        ebpf.map_mut(lb_common::map_names::ROUTE_GEN)
            .context("routing generation map")?,
    )?;
    let next = lb_common::route_gen::next(generation.get(&0, 0)?, free.bits());
    generation.set(0, next, 0)?;
    let target_service = services / 2;
    add_mirrors(&mut ebpf, target_service, endpoints_at(services))?;
    let client = |i: u32| Ipv4Addr::from(0x0af0_0000 + (i % 60_000) + 1).to_string();
    let target = |i: u32| vip((i.wrapping_mul(2_654_435_761)) % services).to_string();
    let mut results = Vec::new();

    // New TCP flows to ClusterIPs spread over all services, and each one's next packet
    // right after it (as the NodePort and Katran rows measure it).
    let (mut ns, mut est) = (Vec::new(), Vec::new());
    let opened = std::time::Instant::now();
    for i in 0..samples {
        let (c, port, t) = (client(i), 10_000 + (i / 60_000) as u16, target(i));
        let syn = Frame::tcp(&c, port, &t, 80, SYN);
        ns.push(run(&mut ebpf, Hook::FromPod, &syn.build())?.1);
        let ack = Frame::tcp(&c, port, &t, 80, ACK).build();
        est.push(run(&mut ebpf, Hook::FromPod, &ack)?.1);
    }
    results.push(summarize("clusterip_new_flow", services, ns));
    results.push(summarize("clusterip_established", services, est));

    // The same flows' packets again, each more than a `REVERSE_CHECK_NS` window after its
    // last one: a flow's first packet in a window also makes sure its reply entry still
    // exists (a sparse flow pays that on every packet, a busy one once per window). And
    // replies.
    let window = std::time::Duration::from_nanos(lb_common::REVERSE_CHECK_NS);
    std::thread::sleep((window + window / 10).saturating_sub(opened.elapsed()));
    let (mut est, mut reply) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let (c, port, t) = (client(i), 10_000 + (i / 60_000) as u16, target(i));
        let ack = Frame::tcp(&c, port, &t, 80, ACK).build();
        let (_, cost) = run(&mut ebpf, Hook::FromPod, &ack)?;
        est.push(cost);
        // The reply comes from whichever backend was chosen: read it from the ACK's DNAT.
        let out = run_repeated(&mut ebpf, Hook::FromPod, &ack, 1)?;
        let v = xlb_tests::packet::view(&out.packet);
        let back = Frame::tcp(&v.dst.to_string(), 8080, &c, port, ACK).build();
        reply.push(run(&mut ebpf, Hook::ToPod, &back)?.1);
    }
    results.push(summarize("clusterip_established_sparse", services, est));
    results.push(summarize("reply_revnat", services, reply));

    // NodePort from outside with SNAT: new flows, then established.
    let outsider = |i: u32| Ipv4Addr::from(0xcb00_7100 + (i % 60_000) + 1).to_string();
    let (mut new, mut est) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let port = 20_000 + (i / 60_000) as u16;
        let syn = Frame::tcp(&outsider(i), port, NODE_IP, NODE_PORT, SYN).build();
        new.push(run(&mut ebpf, Hook::External, &syn)?.1);
        let ack = Frame::tcp(&outsider(i), port, NODE_IP, NODE_PORT, ACK).build();
        est.push(run(&mut ebpf, Hook::External, &ack)?.1);
    }
    results.push(summarize("nodeport_snat_new_flow", services, new));
    results.push(summarize("nodeport_snat_established", services, est));
    // From outside to no frontend and no node address (Katran's non-VIP packet).
    let mut pass = Vec::new();
    for i in 0..samples {
        let frame = Frame::tcp(&outsider(i), 20_000, "10.250.0.1", 80, ACK).build();
        pass.push(run(&mut ebpf, Hook::External, &frame)?.1);
    }
    results.push(summarize("external_passthrough", services, pass));
    if let Some(object) = katran {
        results.extend(crate::katran::measure(object, services, samples)?.unwrap_or_default());
    }

    // The floor: a non-IP frame leaves the program at once. Every number above includes
    // this much of test-run and timer overhead.
    let mut floor = Vec::new();
    let mut arp = Frame::tcp(&client(0), 1, "10.250.0.1", 80, ACK).build();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    for _ in 0..samples {
        floor.push(run(&mut ebpf, Hook::FromPod, &arp)?.1);
    }
    results.push(summarize("floor_non_ip", services, floor));

    // Traffic to no service at all (pod to pod): what everything else pays.
    let mut pass = Vec::new();
    for i in 0..samples {
        let frame = Frame::tcp(&client(i), 30_000, "10.250.0.1", 80, ACK).build();
        pass.push(run(&mut ebpf, Hook::FromPod, &frame)?.1);
    }
    results.push(summarize("passthrough", services, pass));
    // And its way into the receiving pod (a pod's reply to it, on the to-pod hook).
    let mut pass = Vec::new();
    for i in 0..samples {
        let frame = Frame::tcp("10.250.0.1", 80, &client(i), 30_000, ACK).build();
        pass.push(run(&mut ebpf, Hook::ToPod, &frame)?.1);
    }
    results.push(summarize("passthrough_to_pod", services, pass));

    // Warm: an established flow to the middle service, bounced through its mirror.
    let calls = (samples / 100).max(20);
    let client_ip = "10.240.255.1";
    let ack = with_max_ttl(
        Frame::tcp(client_ip, 55_555, &vip(target_service).to_string(), 80, ACK).build(),
    );
    // Three passes: the flow and its mirror start, then the flow is established.
    let primed = run_repeated(&mut ebpf, Hook::FromPod, &ack, 3)?;
    let backend = xlb_tests::packet::view(&primed.packet).dst;
    if primed.retval != TC_ACT_REDIRECT {
        bail!(
            "the warm established flow was not forwarded (verdict {}): FIB lookup failed?",
            primed.retval
        );
    }
    let est = warm(&mut ebpf, Hook::FromPod, &ack, calls)?;
    results.push(summarize_as("clusterip_established", "warm", services, est));
    let reply =
        with_max_ttl(Frame::tcp(&backend.to_string(), 8080, client_ip, 55_555, ACK).build());
    let rev = warm(&mut ebpf, Hook::ToPod, &reply, calls)?;
    results.push(summarize_as("reply_revnat", "warm", services, rev));
    let other = Frame::tcp(client_ip, 30_000, "10.250.0.1", 80, ACK).build();
    let pass = warm(&mut ebpf, Hook::FromPod, &other, calls)?;
    results.push(summarize_as("passthrough", "warm", services, pass));
    let pass = warm(&mut ebpf, Hook::FromPod, &arp, calls)?;
    results.push(summarize_as("floor_non_ip", "warm", services, pass));
    results.extend(measure_floors(&mut ebpf, services, samples, calls)?);
    results.extend(measure_ipv6(&mut ebpf, services, samples, calls)?);
    Ok(results)
}

/// The floors: a trivial TC and a trivial XDP program (a verdict and nothing else) run on
/// a TCP frame, cold and warm, in the same run as everything else. Every scenario is also
/// reported as a multiple of its hook's floor, which compares across machines. Then the
/// cost probes (`cost_*`: one datapath step each, TC) on the same frame: each minus the TC
/// floor is what that step costs a packet.
fn measure_floors(
    ebpf: &mut Ebpf,
    services: u32,
    samples: u32,
    calls: u32,
) -> Result<Vec<PacketCost>> {
    let xdp: &mut aya::programs::Xdp = ebpf
        .program_mut(program_names::FLOOR_XDP)
        .context("the XDP floor program")?
        .try_into()?;
    xdp.load()?;
    let frame = Frame::tcp("10.240.0.1", 40_000, "10.250.0.1", 80, ACK).build();
    let mut results = Vec::new();
    let tc_programs = std::iter::once(program_names::FLOOR_TC).chain(program_names::COST_PROBES);
    for program in tc_programs.chain([program_names::FLOOR_XDP]) {
        let name = match program {
            program_names::FLOOR_TC => "floor_trivial_tc",
            program_names::FLOOR_XDP => "floor_trivial_xdp",
            probe => probe.strip_prefix("xlb_").unwrap_or(probe),
        };
        if program != program_names::FLOOR_XDP {
            let tc: &mut aya::programs::SchedClassifier = ebpf
                .program_mut(program)
                .with_context(|| format!("the bench program {program}"))?
                .try_into()?;
            tc.load()
                .with_context(|| format!("loading the bench program {program}"))?;
        }
        let run = |ebpf: &mut Ebpf, repeat: u32| -> Result<u64> {
            let out = if program == program_names::FLOOR_XDP {
                let xdp: &mut aya::programs::Xdp = ebpf
                    .program_mut(program)
                    .context("the XDP floor program")?
                    .try_into()?;
                test_run(xdp, &frame, repeat)?
            } else {
                test_run(load::program(ebpf, program)?, &frame, repeat)?
            };
            Ok(out.duration_ns)
        };
        let cold = (0..samples)
            .map(|_| run(ebpf, 1))
            .collect::<Result<Vec<u64>>>()?;
        results.push(summarize(name, services, cold));
        let warm = (0..calls)
            .map(|_| run(ebpf, WARM_REPEAT))
            .collect::<Result<Vec<u64>>>()?;
        results.push(summarize_as(name, "warm", services, warm));
    }
    Ok(results)
}

/// The same scenarios over IPv6 (the IPv4 programs tail-call the IPv6 stages), beside the
/// IPv4 ones in the same run.
fn measure_ipv6(
    ebpf: &mut Ebpf,
    services: u32,
    samples: u32,
    calls: u32,
) -> Result<Vec<PacketCost>> {
    populate6(ebpf, services, 6)?;
    let target_service = services / 2;
    // Mirrors of the middle service's backends, as for IPv4.
    for e in 0..endpoints_at(services) {
        let id = MIRROR_ID_BASE + ENDPOINTS + e;
        let frontend = FrontendEntry {
            vip: ne6(backend_ip6(target_service, e)),
            port: 8080,
            proto: 6,
            scope: SCOPE_INTERNAL,
            service_id: id,
            flags: 0,
            affinity_timeout_s: 0,
        };
        put_frontend6(ebpf, frontend, &[(id, ne6(vip6(target_service)), 80)]);
    }
    let client = |i: u32| {
        Ipv6Addr::from(0xfd00_0010_0240_0000_0000_0000_0000_0000u128 + u128::from(i % 60_000 + 1))
            .to_string()
    };
    let target = |i: u32| vip6((i.wrapping_mul(2_654_435_761)) % services).to_string();
    let mut results = Vec::new();
    let (mut new, mut est, mut reply) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let (c, port, t) = (client(i), 10_000 + (i / 60_000) as u16, target(i));
        new.push(
            run(
                ebpf,
                Hook::FromPod,
                &Frame6::tcp(&c, port, &t, 80, SYN).build(),
            )?
            .1,
        );
        let ack = Frame6::tcp(&c, port, &t, 80, ACK).build();
        let out = run_repeated(ebpf, Hook::FromPod, &ack, 1)?;
        est.push(out.duration_ns);
        let backend = xlb_tests::packet6::view6(&out.packet).dst;
        let back = Frame6::tcp(&backend.to_string(), 8080, &c, port, ACK).build();
        reply.push(run(ebpf, Hook::ToPod, &back)?.1);
    }
    results.push(summarize("clusterip_new_flow_ipv6", services, new));
    results.push(summarize("clusterip_established_ipv6", services, est));
    results.push(summarize("reply_revnat_ipv6", services, reply));

    let outsider = |i: u32| {
        Ipv6Addr::from(0x2001_0db8_0071_0000_0000_0000_0000_0000u128 + u128::from(i % 60_000 + 1))
            .to_string()
    };
    let (mut new, mut est) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let port = 20_000 + (i / 60_000) as u16;
        let syn = Frame6::tcp(&outsider(i), port, NODE_IP6, NODE_PORT, SYN).build();
        new.push(run(ebpf, Hook::External, &syn)?.1);
        let ack = Frame6::tcp(&outsider(i), port, NODE_IP6, NODE_PORT, ACK).build();
        est.push(run(ebpf, Hook::External, &ack)?.1);
    }
    results.push(summarize("nodeport_snat_new_flow_ipv6", services, new));
    results.push(summarize("nodeport_snat_established_ipv6", services, est));

    let mut pass = Vec::new();
    for i in 0..samples {
        let frame = Frame6::tcp(&client(i), 30_000, "fd00:250::1", 80, ACK).build();
        pass.push(run(ebpf, Hook::FromPod, &frame)?.1);
    }
    results.push(summarize("passthrough_ipv6", services, pass));

    // Warm, as for IPv4: hop limit 255 (no header checksum to redo).
    let max_hops = |mut f: Vec<u8>| {
        f[21] = 255;
        f
    };
    let client_ip = "fd00:10:240:ffff::1";
    let ack = max_hops(
        Frame6::tcp(
            client_ip,
            55_555,
            &vip6(target_service).to_string(),
            80,
            ACK,
        )
        .build(),
    );
    let primed = run_repeated(ebpf, Hook::FromPod, &ack, 3)?;
    if primed.retval != TC_ACT_REDIRECT {
        bail!(
            "the warm IPv6 established flow was not forwarded (verdict {}): FIB lookup failed?",
            primed.retval
        );
    }
    let backend = xlb_tests::packet6::view6(&primed.packet).dst;
    let est = warm(ebpf, Hook::FromPod, &ack, calls)?;
    results.push(summarize_as(
        "clusterip_established_ipv6",
        "warm",
        services,
        est,
    ));
    let reply = max_hops(Frame6::tcp(&backend.to_string(), 8080, client_ip, 55_555, ACK).build());
    let rev = warm(ebpf, Hook::ToPod, &reply, calls)?;
    results.push(summarize_as("reply_revnat_ipv6", "warm", services, rev));
    let other = Frame6::tcp(client_ip, 30_000, "fd00:250::1", 80, ACK).build();
    let pass = warm(ebpf, Hook::FromPod, &other, calls)?;
    results.push(summarize_as("passthrough_ipv6", "warm", services, pass));
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scale's services, the NodePort and the mirrors get backend ids the agent could
    /// hand out (below `map_sizes::BACKENDS`), as many endpoints each as fit, at most 10.
    #[test]
    fn every_scale_fits_the_backend_ids() {
        for services in [1, 1_000, 10_000, 26_000, 100_000, 200_000] {
            let per = endpoints_at(services);
            assert!((1..=ENDPOINTS).contains(&per), "{services}: {per}");
            let highest_generated = (services + 1) * per;
            assert!(highest_generated < MIRROR_ID_BASE, "{services} services");
        }
        assert_eq!(endpoints_at(10_000), 10);
        assert_eq!(endpoints_at(100_000), 2);
    }
}
