//! A bounded, seeded mutation fuzzer over the packet programs (TC from-pod, TC to-pod, XDP),
//! run through BPF_PROG_TEST_RUN with map state from a real translation and sync. Oracles
//! per run: the verdict is one the hook may return; a TC packet left to the stack is byte
//! for byte the input; a rewritten packet that came in with valid checksums leaves with
//! valid ones (a zero UDP checksum stays zero); and at the end every run was counted under
//! exactly one outcome. IPv4 and IPv6 frames alike (a dual-stack Service, IPv6 seeds with
//! extension headers and ICMPv6, IPv6 edge values). A failure names the seed and the packet as hex, for a table case.
use std::{net::Ipv4Addr, path::PathBuf, time::Instant};

use aya::Ebpf;
use lb_common::{OUTCOMES, OutcomeKind, program_names};
use xlb::{
    datapath::{bpffs, load, maps::PinnedMaps, pins},
    source::manifests::parse_file_text,
    sync::Syncer,
    translate::{Options, translate},
};

use crate::{
    datapath::{TestRunOutput, run_tc, run_xdp},
    netns::{Netns, unique_tag},
    packet::{ACK, FIN, Frame, SYN, checksum_errors, fix_checksums, icmp_error, well_formed},
    packet6::{
        Frame6, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING, checksum_errors6,
        fix_checksums6, icmp6, icmp6_error, well_formed6,
    },
};

const NODE_IP6: &str = "fd00:192:168:50::1";
const CLIENT6: &str = "fd00:10:244::5";
const OUTSIDER6: &str = "2001:db8:9::9";

const NODE_IP: &str = "192.168.50.1";
const CLIENT: &str = "10.244.0.5";
const OUTSIDER: &str = "203.0.113.9";

/// The cluster the fuzzed datapath serves: ClusterIPs with and without endpoints, affinity,
/// a NodePort (Cluster and Local), an externalIP.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: fuzz}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalIPs: [198.51.100.7, "2001:db8:7::7"]
  ports:
  - {name: http, port: 80, protocol: TCP, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: fuzz, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.2], nodeName: fuzz-node}
- {addresses: [10.244.2.3], nodeName: other}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: fuzz, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: ["fd00:10:244:1::2"], nodeName: fuzz-node}
- {addresses: ["fd00:10:244:2::3"], nodeName: other}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: fuzz}
spec:
  clusterIP: 10.96.0.20
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: fuzz, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.1.4]}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: fuzz}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80, protocol: TCP}]
"#;

/// A small, fast, seeded generator (xorshift64*): the same seed, the same packets.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    FromPod,
    ToPod,
    External,
}

/// What a fuzzing run did.
#[derive(Debug, Default)]
pub struct FuzzReport {
    pub packets: u64,
    pub runs: u64,
    /// Runs whose packet came back rewritten (translated, or an ICMP answer).
    pub rewritten: u64,
    /// Runs whose checksums were checked after a rewrite.
    pub checksums_checked: u64,
    /// Packets that broke the parser contract (and were checked to pass untouched).
    pub contract_breaking: u64,
    pub seconds: f64,
}

/// A broken oracle: everything needed to turn it into a table case.
#[derive(Debug)]
pub struct FuzzFailure {
    pub seed: u64,
    pub packet: u64,
    pub program: Program,
    pub input_hex: String,
    pub output_hex: String,
    pub reason: String,
}

impl std::fmt::Display for FuzzFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} packet {} ({:?}): {}\n  in:  {}\n  out: {}",
            self.seed, self.packet, self.program, self.reason, self.input_hex, self.output_hex
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Valid frames of every kind the programs meet: the starting points of mutations.
fn seeds() -> Vec<Vec<u8>> {
    let mut udp_no_checksum = Frame::udp(CLIENT, 5001, "10.96.0.10", 53);
    udp_no_checksum.zero_udp_checksum = true;
    let dnated = Frame::udp(CLIENT, 5000, "10.244.1.2", 5353).build();
    let mut arp = Frame::tcp(CLIENT, 1, "10.96.0.10", 80, SYN).build();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut seeds = vec![
        Frame::tcp(CLIENT, 40000, "10.96.0.10", 80, SYN).build(),
        Frame::tcp(CLIENT, 40000, "10.96.0.10", 80, ACK).build(),
        Frame::tcp(CLIENT, 40000, "10.96.0.10", 80, FIN | ACK).build(),
        Frame::tcp(CLIENT, 40001, "10.96.0.20", 80, SYN).build(),
        Frame::tcp(CLIENT, 40002, "10.96.0.30", 80, SYN).build(),
        Frame::udp(CLIENT, 5000, "10.96.0.10", 53).build(),
        udp_no_checksum.build(),
        Frame::tcp("10.244.1.2", 8080, CLIENT, 40000, SYN | ACK).build(),
        Frame::udp("10.244.1.2", 5353, CLIENT, 5000).build(),
        Frame::tcp(OUTSIDER, 50000, NODE_IP, 30080, SYN).build(),
        Frame::udp(OUTSIDER, 50001, NODE_IP, 30053).build(),
        Frame::tcp(OUTSIDER, 50002, "198.51.100.7", 80, SYN).build(),
        Frame::tcp(OUTSIDER, 50003, "0.0.0.0", 30080, SYN).build(),
        Frame::tcp(CLIENT, 1234, "10.250.0.1", 80, SYN).build(),
        icmp_error("10.244.1.2", CLIENT, 3, 3, &dnated),
        arp,
    ];
    let dnated6 = Frame6::udp(CLIENT6, 5000, "fd00:10:244:1::2", 5353).build();
    seeds.extend([
        Frame6::tcp(CLIENT6, 40000, "fd00:10:96::10", 80, SYN).build(),
        Frame6::tcp(CLIENT6, 40000, "fd00:10:96::10", 80, ACK).build(),
        Frame6::udp(CLIENT6, 5000, "fd00:10:96::10", 53).build(),
        Frame6::udp(CLIENT6, 5002, "fd00:10:96::10", 53)
            .with_extension(NEXTHDR_HOP)
            .with_extension(NEXTHDR_ROUTING)
            .with_extension(NEXTHDR_DEST)
            .build(),
        Frame6::tcp(CLIENT6, 40003, "fd00:10:96::10", 80, SYN)
            .with_extension(NEXTHDR_FRAGMENT)
            .build(),
        Frame6::tcp("fd00:10:244:1::2", 8080, CLIENT6, 40000, SYN | ACK).build(),
        Frame6::tcp(OUTSIDER6, 50000, NODE_IP6, 30080, SYN).build(),
        Frame6::udp(OUTSIDER6, 50001, NODE_IP6, 30053).build(),
        Frame6::tcp(OUTSIDER6, 50002, "2001:db8:7::7", 80, SYN).build(),
        Frame6::tcp(OUTSIDER6, 50003, "::", 30080, SYN).build(),
        icmp6_error("fd00:10:244:1::2", CLIENT6, 1, 4, &dnated6),
        icmp6("fe80::1", "ff02::1:ff00:5", 135, &[0; 20]),
    ]);
    seeds
}

/// One mutation of `frame`: byte flips and sets (weighted towards the headers), length
/// changes, and header fields set to edge values.
fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        let len = frame.len();
        match rng.below(10) {
            0 | 1 => {
                let at = rng.below(len.min(70));
                frame[at] ^= 1 << rng.below(8);
            }
            2 | 3 => {
                let at = rng.below(len.min(70));
                frame[at] = rng.next_u64() as u8;
            }
            4 => {
                // Never below Ethernet + the IP header: BPF_PROG_TEST_RUN refuses those.
                let floor = if is_ipv6(frame) { 54 } else { 34 };
                let keep = floor + rng.below(len.saturating_sub(floor).max(1));
                frame.truncate(keep.min(len));
            }
            5 => {
                let extra = rng.below(64);
                frame.extend((0..extra).map(|_| rng.next_u64() as u8));
            }
            6 if is_ipv6(frame) => {
                // Payload length.
                let len = [0u16, 7, 8, 19, 20, 40, 1500, 65535][rng.below(8)];
                frame[18..20].copy_from_slice(&len.to_be_bytes());
            }
            6 => {
                let tot = [0u16, 19, 20, 27, 28, 40, 1500, 65535][rng.below(8)];
                frame[16..18].copy_from_slice(&tot.to_be_bytes());
            }
            7 if is_ipv6(frame) => frame[14] = [0x60, 0x40, 0x70, 0x6f][rng.below(4)],
            7 => frame[14] = [0x45, 0x44, 0x46, 0x4f, 0x65, 0x40][rng.below(6)],
            // IPv6 next header: the transport protocols, extension headers, none.
            8 if is_ipv6(frame) => frame[20] = [0, 6, 17, 43, 44, 58, 59, 60][rng.below(8)],
            8 => frame[23] = [1, 6, 17, 47, 0][rng.below(5)],
            _ => {
                if len > 46 {
                    frame[46] = [0x00, 0x40, 0x50, 0xf0][rng.below(4)];
                }
            }
        }
    }
}

fn is_ipv6(frame: &[u8]) -> bool {
    frame.len() >= 14 && frame[12..14] == [0x86, 0xdd]
}

/// Whether a destination address is one the XDP program serves: the node's address or the
/// externalIP of [`MANIFESTS`], of either family.
fn is_ours_from_outside(dst: &[u8]) -> bool {
    let ours: [std::net::IpAddr; 4] = [
        [192, 168, 50, 1].into(),
        [198, 51, 100, 7].into(),
        NODE_IP6.parse().expect("address"),
        "2001:db8:7::7".parse().expect("address"),
    ];
    ours.iter().any(|ip| match ip {
        std::net::IpAddr::V4(v4) => dst == v4.octets(),
        std::net::IpAddr::V6(v6) => dst == v6.octets(),
    })
}

/// `contract_violation` for IPv6: the same rules over the IPv6 header and the extension
/// headers the programs walk.
fn contract_violation6(frame: &[u8]) -> Option<&'static str> {
    if frame[14] >> 4 != 6 {
        return Some("IPv6 version");
    }
    let end = 54 + usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    if end > frame.len() {
        return Some("payload length");
    }
    let (mut next, mut at) = (frame[20], 54);
    for _ in 0..6 {
        if !matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST) {
            break;
        }
        if at + 2 > frame.len() {
            return Some("extension header past the frame");
        }
        next = frame[at];
        at += (usize::from(frame[at + 1]) + 1) * 8;
        if at > end {
            return Some("extension header past the datagram");
        }
    }
    match next {
        6 if at + 20 > end => Some("TCP header past the datagram"),
        6 => {
            let header = usize::from(frame[at + 12] >> 4) * 4;
            (header < 20 || header > end - at).then_some("TCP data offset")
        }
        17 if at + 8 > end => Some("UDP header past the datagram"),
        17 if frame[at + 6..at + 8] == [0, 0] => Some("zero UDP checksum"),
        _ => None,
    }
}

/// Which rule of the parser contract `frame` breaks, if any (worked out here, not by the
/// programs): such a frame must pass every hook untouched.
pub fn contract_violation(frame: &[u8]) -> Option<&'static str> {
    if frame.len() >= 54 && is_ipv6(frame) {
        return contract_violation6(frame);
    }
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let (version, ihl) = (frame[14] >> 4, usize::from(frame[14] & 0x0f));
    if version != 4 || ihl < 5 {
        return Some("IPv4 version or IHL");
    }
    let tot = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    if tot < ihl * 4 || 14 + tot > frame.len() {
        return Some("total length");
    }
    let fragment = u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0;
    if ihl != 5 || fragment {
        return None;
    }
    match frame[23] {
        6 if tot < 40 => Some("TCP header past the datagram"),
        6 => {
            let header = usize::from(frame[46] >> 4) * 4;
            (header < 20 || 20 + header > tot).then_some("TCP data offset")
        }
        17 if tot < 28 => Some("UDP header past the datagram"),
        _ => None,
    }
}

/// Valid verdicts per program: TC unspec/ok/shot/redirect; XDP drop/pass/tx/redirect.
fn valid_verdict(program: Program, verdict: i32) -> bool {
    match program {
        Program::FromPod | Program::ToPod => matches!(verdict, -1 | 0 | 2 | 7),
        Program::External => matches!(verdict, 1..=4),
    }
}

/// Removes the fuzzer's pins on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        pins::cleanup(&pins::PinLayout::new(&self.0));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads the programs with pinned maps and programs them as the agent would, from
/// [`MANIFESTS`] through the real translation and sync.
fn datapath(dir: &PathBuf) -> anyhow::Result<Ebpf> {
    bpffs::ensure_pin_dir(dir)?;
    let layout = pins::PinLayout::new(dir);
    std::fs::create_dir_all(layout.maps_dir())?;
    let ebpf = load::load(Some(&layout))?;
    let mut maps = PinnedMaps::open(&layout)?;
    let objects = parse_file_text(MANIFESTS, std::path::Path::new("fuzz.yaml"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let options = Options {
        node_name: Some("fuzz-node".into()),
        ..Options::default()
    };
    let translation = translate(&objects, &options);
    Syncer::new().apply(&translation.desired, &mut maps)?;
    let node = NODE_IP.parse::<Ipv4Addr>()?;
    let node6 = NODE_IP6.parse::<std::net::Ipv6Addr>()?;
    maps.set_node(&[node.into(), node6.into()], (61000, 65535))?;
    Ok(ebpf)
}

/// Runs `packets` mutated packets from `seed` through every packet program.
pub fn run(packets: u64, seed: u64) -> anyhow::Result<Result<FuzzReport, FuzzFailure>> {
    let netns = Netns::new(&unique_tag(), "fuzz")?;
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/xlb-fuzz-{}-{seed}",
        std::process::id()
    )));
    let dir = pins.0.clone();
    // The programs' FIB lookups then depend on nothing but this empty namespace.
    let result = netns.enter(move || -> anyhow::Result<Result<FuzzReport, FuzzFailure>> {
        let mut ebpf = datapath(&dir)?;
        Ok(fuzz(&mut ebpf, packets, seed))
    })??;
    drop(pins);
    Ok(result)
}

fn fuzz(ebpf: &mut Ebpf, packets: u64, seed: u64) -> Result<FuzzReport, FuzzFailure> {
    let started = Instant::now();
    let seeds = seeds();
    let mut rng = Rng::new(seed);
    let mut report = FuzzReport::default();
    let counted_before = counted(ebpf);
    for packet in 0..packets {
        let mut input = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut input);
        // Half the packets keep consistent checksums, so the rewrite oracle has work.
        if rng.below(2) == 0 {
            fix_checksums(&mut input);
            fix_checksums6(&mut input);
        }
        let checksums_valid = if is_ipv6(&input) {
            well_formed6(&input) && checksum_errors6(&input).is_empty()
        } else {
            well_formed(&input) && checksum_errors(&input).is_empty()
        };
        report.contract_breaking += u64::from(contract_violation(&input).is_some());
        for program in [Program::FromPod, Program::ToPod, Program::External] {
            let out: TestRunOutput = match program {
                Program::FromPod => run_tc(ebpf, program_names::TC_FROM_POD, &input, 1),
                Program::ToPod => run_tc(ebpf, program_names::TC_TO_POD, &input, 1),
                Program::External => run_xdp(ebpf, &input),
            };
            report.runs += 1;
            let fail = |reason: String| FuzzFailure {
                seed,
                packet,
                program,
                input_hex: hex(&input),
                output_hex: hex(&out.packet),
                reason,
            };
            if !valid_verdict(program, out.retval) {
                return Err(fail(format!(
                    "verdict {} is not one of this hook's",
                    out.retval
                )));
            }
            let untouched = out.packet == input;
            let passed = match program {
                Program::External => out.retval == 2,
                _ => out.retval == -1,
            };
            if let Some(rule) = contract_violation(&input)
                && !(passed && untouched)
            {
                return Err(fail(format!(
                    "breaks the parser contract ({rule}) but was not passed untouched \
                     (verdict {})",
                    out.retval
                )));
            }
            // From outside, only node addresses and the externalIP are anyone's business.
            let dst = match &input {
                f if f.len() >= 34 && f[12..14] == [0x08, 0x00] => Some(&f[30..34]),
                f if f.len() >= 54 && is_ipv6(f) => Some(&f[38..54]),
                _ => None,
            };
            if program == Program::External
                && let Some(dst) = dst
                && !is_ours_from_outside(dst)
                && !(passed && untouched)
            {
                return Err(fail(format!(
                    "to {dst:02x?}, no node address or externalIP, but not passed untouched \
                     (verdict {})",
                    out.retval
                )));
            }
            if out.retval == -1 && !untouched {
                return Err(fail(
                    "left to the stack (TC_ACT_UNSPEC) but rewritten".into(),
                ));
            }
            if untouched {
                continue;
            }
            report.rewritten += 1;
            if checksums_valid && is_ipv6(&out.packet) && well_formed6(&out.packet) {
                report.checksums_checked += 1;
                let errors = checksum_errors6(&out.packet);
                if !errors.is_empty() {
                    return Err(fail(format!("rewritten with bad checksums: {errors:?}")));
                }
            } else if checksums_valid && well_formed(&out.packet) {
                report.checksums_checked += 1;
                let errors = checksum_errors(&out.packet);
                if !errors.is_empty() {
                    return Err(fail(format!("rewritten with bad checksums: {errors:?}")));
                }
                let udp = |f: &[u8]| f[23] == 17 && f.len() >= 42;
                if udp(&input)
                    && udp(&out.packet)
                    && input[40..42] == [0, 0]
                    && out.packet[40..42] != [0, 0]
                {
                    return Err(fail("a zero UDP checksum became non-zero".into()));
                }
            }
        }
        report.packets += 1;
    }
    let counted = counted(ebpf) - counted_before;
    if counted != report.runs {
        return Err(FuzzFailure {
            seed,
            packet: packets,
            program: Program::External,
            input_hex: String::new(),
            output_hex: String::new(),
            reason: format!("{} runs but {counted} outcomes counted", report.runs),
        });
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Runs counted so far: every outcome but the extra ones (counted on top of another).
fn counted(ebpf: &Ebpf) -> u64 {
    // Both families: a mutated ethertype can make any frame an IPv6 one.
    OUTCOMES
        .iter()
        .filter(|o| o.kind != OutcomeKind::Extra)
        .map(|o| crate::datapath::outcome_count(ebpf, o.code))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_packets() {
        let packets = |seed| {
            let mut rng = Rng::new(seed);
            let seeds = seeds();
            (0..50)
                .map(|_| {
                    let mut p = seeds[rng.below(seeds.len())].clone();
                    mutate(&mut rng, &mut p);
                    p
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(packets(7), packets(7));
        assert_ne!(packets(7), packets(8));
        assert!(packets(7).iter().all(|p| p.len() >= 34));
    }

    #[test]
    fn fixed_checksums_are_valid() {
        let mut frame = Frame::tcp(CLIENT, 1, "10.96.0.10", 80, SYN).build();
        frame[38] ^= 0xff;
        assert!(!checksum_errors(&frame).is_empty());
        fix_checksums(&mut frame);
        assert_eq!(checksum_errors(&frame), Vec::<String>::new());
    }
}
