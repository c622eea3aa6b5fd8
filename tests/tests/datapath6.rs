//! IPv6 datapath tables (TC, pod interfaces): packet in + map state → verdict, packet out
//! (exact bytes outside the NAT fields, checksums recomputed independently), counters.
//! Runs the real programs (the IPv4 entry points tail-call the IPv6 stages) through
//! BPF_PROG_TEST_RUN; needs root.
use std::ops::Range;

use lb_common::{CT_FORWARD, SVC_FLAG_AFFINITY, SVC_FLAG_SOURCE_RANGES, outcome};
use xlb_tests::datapath::*;
use xlb_tests::{
    packet::{ACK, PROTO_TCP, PROTO_UDP, SYN},
    packet6::{
        Frame6, IP6_DST, IP6_SRC, L4, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING,
        PROTO_ICMPV6, checksum_errors6, icmp6, icmp6_error, view6,
    },
    privilege::require_privileges,
    race,
};

const BACKEND_A: &str = "fd00:10:244:1::2";
const BACKEND_B: &str = "fd00:10:244:1::3";
const NODE6: &str = "fd00:10:0:1::1";

const SPORT: Range<usize> = L4..L4 + 2;
const DPORT: Range<usize> = L4 + 2..L4 + 4;
const TCP_CSUM: Range<usize> = L4 + 16..L4 + 18;
const UDP_CSUM: Range<usize> = L4 + 6..L4 + 8;

/// `out` is `input` but for the `allowed` byte ranges, and its checksum holds.
fn assert_only_changed6(name: &str, input: &[u8], out: &[u8], allowed: &[Range<usize>]) {
    assert_eq!(input.len(), out.len(), "{name}: length changed");
    for (i, (a, b)) in input.iter().zip(out).enumerate() {
        assert!(
            a == b || allowed.iter().any(|r| r.contains(&i)),
            "{name}: byte {i} changed ({a:#04x} -> {b:#04x}) outside the NAT fields"
        );
    }
    assert_eq!(checksum_errors6(out), Vec::<String>::new(), "{name}");
}

/// The source and destination (address, port) of an IPv6 frame.
fn ends(frame: &[u8]) -> ((String, u16), (String, u16)) {
    let v = view6(frame);
    ((v.src.to_string(), v.sport), (v.dst.to_string(), v.dport))
}

fn end(addr: &str, port: u16) -> (String, u16) {
    (
        addr.parse::<std::net::Ipv6Addr>()
            .expect("address")
            .to_string(),
        port,
    )
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn tcp_flow_is_dnated_tracked_and_its_replies_reverse_natted() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service6(PROTO_TCP, 80, &[(1, BACKEND_A, 8080)], 0);

    let syn = Frame6::tcp(CLIENT6, 40000, VIP6, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &syn);
    // No route in the test's namespace: handed to the stack translated.
    assert_eq!(verdict, TC_ACT_OK, "syn");
    assert_only_changed6("syn", &syn, &out, &[IP6_DST, DPORT, TCP_CSUM]);
    assert_eq!(ends(&out), (end(CLIENT6, 40000), end(BACKEND_A, 8080)));
    assert_eq!(dp.stat(outcome::DNAT_NEW), 1);
    assert_eq!(dp.stat6(outcome::DNAT_NEW), 1, "counted as IPv6");
    assert_eq!(dp.ct6().len(), 2, "forward and reverse entries");

    let ack = Frame6::tcp(CLIENT6, 40000, VIP6, 80, ACK).build();
    let (verdict, out) = dp.run(Hook::FromPod, &ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_only_changed6("ack", &ack, &out, &[IP6_DST, DPORT, TCP_CSUM]);
    assert_eq!(ends(&out).1, end(BACKEND_A, 8080));
    assert_eq!(dp.stat(outcome::DNAT_ESTABLISHED), 1);

    let reply = Frame6::tcp(BACKEND_A, 8080, CLIENT6, 40000, SYN | ACK).build();
    let (verdict, out) = dp.run(Hook::ToPod, &reply);
    assert_eq!(verdict, TC_ACT_OK, "reply");
    assert_only_changed6("reply", &reply, &out, &[IP6_SRC, SPORT, TCP_CSUM]);
    assert_eq!(ends(&out), (end(VIP6, 80), end(CLIENT6, 40000)));
    assert_eq!(dp.stat(outcome::REVNAT), 1);

    // An IPv4 client of the same numbers never reaches the IPv6 service (no NAT46).
    assert!(dp.ct().is_empty(), "nothing in the IPv4 table");
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn udp_checksums_are_updated_and_a_zero_checksum_is_malformed() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service6(PROTO_UDP, 53, &[(1, BACKEND_A, 5353)], 0);
    let query = Frame6::udp(CLIENT6, 5000, VIP6, 53).build();
    let (verdict, out) = dp.run(Hook::FromPod, &query);
    assert_eq!(verdict, TC_ACT_OK);
    assert_only_changed6("udp", &query, &out, &[IP6_DST, DPORT, UDP_CSUM]);
    assert_ne!(
        &out[UDP_CSUM],
        &[0, 0],
        "IPv6 UDP never carries a zero checksum"
    );

    // Zero means "no checksum", which IPv6 forbids (RFC 8200): left for the stack to drop.
    let mut zero = Frame6::udp(CLIENT6, 5001, VIP6, 53).build();
    zero[UDP_CSUM].copy_from_slice(&[0, 0]);
    let (verdict, out) = dp.run(Hook::FromPod, &zero);
    assert_eq!((verdict, out), (PASS, zero));
    assert_eq!(dp.stat(outcome::MALFORMED), 1);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn extension_headers_are_skipped_and_odd_chains_pass_untouched() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service6(PROTO_TCP, 80, &[(1, BACKEND_A, 8080)], 0);

    // Hop-by-hop, routing and destination options before TCP: translated at the TCP header.
    let frame = Frame6::tcp(CLIENT6, 40001, VIP6, 80, SYN)
        .with_extension(NEXTHDR_HOP)
        .with_extension(NEXTHDR_ROUTING)
        .with_extension(NEXTHDR_DEST)
        .build();
    let (verdict, out) = dp.run(Hook::FromPod, &frame);
    assert_eq!(verdict, TC_ACT_OK);
    let tcp = L4 + 24;
    assert_only_changed6(
        "extension headers",
        &frame,
        &out,
        &[IP6_DST, tcp + 2..tcp + 4, tcp + 16..tcp + 18],
    );
    assert_eq!(ends(&out).1, end(BACKEND_A, 8080));

    let syn = Frame6::tcp(CLIENT6, 40002, VIP6, 80, SYN);
    let mut seven = syn.clone();
    for _ in 0..7 {
        seven = seven.with_extension(NEXTHDR_DEST);
    }
    let beyond = {
        // A destination-options header claiming 2 KiB.
        let mut f = syn.clone().with_extension(NEXTHDR_DEST).build();
        f[L4 + 1] = 255;
        f
    };
    let cut = {
        let mut f = syn.build();
        f.truncate(L4 + 12);
        f
    };
    let payload_beyond = {
        let mut f = syn.build();
        f[18..20].copy_from_slice(&500u16.to_be_bytes());
        f
    };
    let not_six = {
        let mut f = syn.build();
        f[14] = 0x40;
        f
    };
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "fragment header",
            syn.clone().with_extension(NEXTHDR_FRAGMENT).build(),
            outcome::FRAGMENT,
        ),
        (
            "seven extension headers",
            seven.build(),
            outcome::IP_OPTIONS,
        ),
        ("extension beyond the datagram", beyond, outcome::MALFORMED),
        ("tcp header cut", cut, outcome::MALFORMED),
        (
            "payload beyond the frame",
            payload_beyond,
            outcome::MALFORMED,
        ),
        ("version not 6", not_six, outcome::MALFORMED),
        (
            "neighbour solicitation",
            icmp6("fe80::1", "ff02::1:ff00:10", 135, &[0; 20]),
            outcome::PASS_NOT_SERVICE,
        ),
        (
            "echo request to the service",
            icmp6(CLIENT6, VIP6, 128, &[0, 1, 0, 1]),
            outcome::PASS_NOT_SERVICE,
        ),
        (
            "not a service",
            Frame6::tcp(CLIENT6, 40003, "fd00:10:96::99", 80, SYN).build(),
            outcome::PASS_NOT_SERVICE,
        ),
        // Let go by the IPv4 program (no tail call): counted all the same, as IPv6.
        (
            "not a service, no reply",
            Frame6::tcp(CLIENT6, 40003, "fd00:10:96::99", 80, ACK).build(),
            outcome::PASS_NOT_SERVICE,
        ),
        (
            "not a service, udp",
            Frame6::udp(CLIENT6, 40003, "fd00:10:96::99", 53).build(),
            outcome::PASS_NOT_SERVICE,
        ),
        (
            "esp",
            xlb_tests::packet6::ipv6_frame(
                CLIENT6.parse().expect("address"),
                VIP6.parse().expect("address"),
                50,
                &[],
                &[0; 16],
            ),
            outcome::OTHER_PROTOCOL,
        ),
    ];
    for (name, frame, expected) in cases {
        for hook in [Hook::FromPod, Hook::ToPod] {
            let (before, before6) = (dp.stat(expected), dp.stat6(expected));
            let (verdict, out) = dp.run(hook, &frame);
            assert_eq!(verdict, PASS, "{name}: verdict");
            assert_eq!(out, frame, "{name}: packet changed");
            assert_eq!(
                (dp.stat(expected), dp.stat6(expected)),
                (before + 1, before6 + 1),
                "{name}: counted once as {expected}, with the IPv6 counters"
            );
        }
    }
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn no_endpoints_rejects_with_icmpv6_port_unreachable() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service6(PROTO_TCP, 80, &[], 0);
    let syn = Frame6::tcp(CLIENT6, 40000, VIP6, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &syn);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "sent back out of the pod's interface"
    );
    assert_eq!(out.len(), L4 + 8 + 48);
    assert_eq!(&out[0..6], &syn[6..12], "to the client's MAC");
    assert_eq!(&out[6..12], &syn[0..6]);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    let v = view6(&out);
    assert_eq!(
        (v.src.to_string(), v.dst.to_string(), v.proto),
        (end(VIP6, 0).0, end(CLIENT6, 0).0, PROTO_ICMPV6)
    );
    assert_eq!(
        (out[L4], out[L4 + 1]),
        (1, 4),
        "destination unreachable / port"
    );
    assert_eq!(
        &out[L4 + 8..],
        &syn[14..14 + 48],
        "quotes the packet's first 48 bytes"
    );
    assert_eq!(checksum_errors6(&out), Vec::<String>::new());
    assert_eq!(dp.stat(outcome::REJECT_NO_BACKEND), 1);
    assert!(dp.ct6().is_empty());
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn icmpv6_errors_about_nated_flows_are_translated() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service6(PROTO_UDP, 53, &[(1, BACKEND_A, 5353)], 0);
    let query = Frame6::udp(CLIENT6, 5000, VIP6, 53).build();
    let (_, dnated) = dp.run(Hook::FromPod, &query);

    // The backend's port unreachable about the DNATed query, on its way to the client:
    // the client must see it come from the VIP, about its own packet to the VIP.
    let error = icmp6_error(BACKEND_A, CLIENT6, 1, 4, &dnated);
    let (verdict, out) = dp.run(Hook::ToPod, &error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(view6(&out).src.to_string(), end(VIP6, 0).0, "outer source");
    let inner = L4 + 8;
    assert_eq!(
        &out[inner + 24..inner + 40],
        &query[38..54],
        "quoted destination"
    );
    assert_eq!(
        &out[inner + 42..inner + 44],
        &53u16.to_be_bytes(),
        "quoted port"
    );
    assert_eq!(checksum_errors6(&out), Vec::<String>::new());
    assert_eq!(dp.stat(outcome::ICMP_ERROR_XLATE), 1);

    // A router's error (packet too big) keeps its own source; only the quote changes.
    let too_big = icmp6_error("fd00:10:0:9::1", CLIENT6, 2, 0, &dnated);
    let (_, out) = dp.run(Hook::ToPod, &too_big);
    assert_eq!(view6(&out).src.to_string(), "fd00:10:0:9::1");
    assert_eq!(&out[inner + 24..inner + 40], &query[38..54]);
    assert_eq!(checksum_errors6(&out), Vec::<String>::new());

    // An error about a flow nobody NATed passes untouched.
    let stranger = Frame6::udp(CLIENT6, 6000, "fd00:10:244:1::9", 53).build();
    let error = icmp6_error("fd00:10:244:1::9", CLIENT6, 1, 4, &stranger);
    let (verdict, out) = dp.run(Hook::ToPod, &error);
    assert_eq!((verdict, out), (PASS, error));
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn hairpin_pod_reaching_itself_is_snated_to_the_node_address() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.set_node6(&[NODE6], (40000, 40010));
    dp.service6(PROTO_TCP, 80, &[(1, CLIENT6, 8080)], 0);
    let syn = Frame6::tcp(CLIENT6, 33000, VIP6, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_only_changed6(
        "hairpin",
        &syn,
        &out,
        &[IP6_SRC, SPORT, IP6_DST, DPORT, TCP_CSUM],
    );
    let ((src, sport), dst) = ends(&out);
    assert_eq!((src, dst), (end(NODE6, 0).0, end(CLIENT6, 8080)));
    assert!((40000..=40010).contains(&sport), "SNAT port {sport}");

    // The pod's answer to the node address goes back as the VIP to the pod's own port.
    let reply = Frame6::tcp(CLIENT6, 8080, NODE6, sport, SYN | ACK).build();
    let (verdict, out) = dp.run(Hook::FromPod, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(ends(&out), (end(VIP6, 80), end(CLIENT6, 33000)));
    assert_eq!(checksum_errors6(&out), Vec::<String>::new());
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn affinity_and_source_ranges_work_per_ipv6_client() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service6(
        PROTO_TCP,
        80,
        &[(1, BACKEND_A, 8080), (2, BACKEND_B, 8080)],
        SVC_FLAG_AFFINITY | SVC_FLAG_SOURCE_RANGES,
    );
    dp.allow_source6("fd00:10:244::/64");
    let mut seen = std::collections::BTreeSet::new();
    for sport in 41000..41016 {
        let (_, out) = dp.run(
            Hook::FromPod,
            &Frame6::tcp(CLIENT6, sport, VIP6, 80, SYN).build(),
        );
        seen.insert(ends(&out).1);
    }
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
    assert_eq!(dp.stat(outcome::AFFINITY_HIT), 15);

    // A client outside the allowed /64 is dropped.
    let outsider = Frame6::tcp("fd00:10:245::5", 41000, VIP6, 80, SYN).build();
    let (verdict, _) = dp.run(Hook::FromPod, &outsider);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(outcome::DROP_SOURCE_RANGE), 1);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn ipv6_forwarding_takes_the_cached_next_hop_and_the_filter_turns_strangers_away() {
    require_privileges();
    let mut dp = Datapath::new();
    let gateway = [0x02, 0, 0, 0, 3, 3];
    let egress = dp.route_out("10.244.0.0/16", "02:00:00:00:03:03");
    dp.route_out6("fd00:10:244::/48", "02:00:00:00:03:03");
    dp.service6(PROTO_TCP, 80, &[(1, BACKEND_A, 8080)], 0);
    let syn = Frame6::tcp(CLIENT6, 40000, VIP6, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed out of dp0");
    assert_eq!(&out[0..6], &gateway);
    assert_eq!(out[21], syn[21] - 1, "hop limit decremented");
    assert!(
        dp.next_hops6().is_empty(),
        "a flow's first packet caches nothing"
    );
    let ack = Frame6::tcp(CLIENT6, 40000, VIP6, 80, ACK).build();
    let (_, out) = dp.run(Hook::FromPod, &ack);
    assert_eq!(&out[0..6], &gateway);
    let hops = dp.next_hops6();
    assert_eq!(hops.len(), 1, "{hops:?}");
    let (key, hop) = hops[0];
    assert_eq!((key.dst, key.src), (ip6(BACKEND_A), ip6(CLIENT6)));
    assert_eq!(hop.ifindex, egress);
    assert_eq!(hop.max_len as usize, ack.len() - 14);
    // The flow's next packet takes the entry (planted MACs show it) ...
    let marked = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
    let mut planted = hop;
    planted.macs[..6].copy_from_slice(&marked);
    dp.put_next_hop6(key, planted);
    let (_, out) = dp.run(Hook::FromPod, &ack);
    assert_eq!(&out[0..6], &marked[..]);
    assert_eq!(checksum_errors6(&out), Vec::<String>::new());
    // ... until routing changes.
    dp.raise_route_generation();
    let (_, out) = dp.run(Hook::FromPod, &ack);
    assert_eq!(&out[0..6], &gateway);

    // Without the VIP's bit in the address filter, the flow's packets pass untouched.
    unmark_local(&mut dp.ebpf, ip6(VIP6));
    assert_eq!(dp.run(Hook::FromPod, &ack), (PASS, ack.clone()));
    assert_eq!(dp.stat6(outcome::PASS_NOT_SERVICE), 1);
    mark_local(&mut dp.ebpf, ip6(VIP6));
    let (_, out) = dp.run(Hook::FromPod, &ack);
    assert_eq!(ends(&out).1, (BACKEND_A.to_string(), 8080));
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn first_packets_of_one_ipv6_udp_flow_on_two_cpus_take_one_backend() {
    require_privileges();
    let mut dp = Datapath::new();
    let backends = race::Backends::ten(|i| format!("fd00:10:244:{i}::2"), 5353);
    dp.service6(PROTO_UDP, 53, &backends.entries(), 0);
    let frames: Vec<Vec<u8>> = (0..race::FLOWS)
        .map(|i| Frame6::udp(CLIENT6, 10_000 + i, VIP6, 53).build())
        .collect();
    let Some(stalled) =
        race::assert_one_destination_each(&mut dp, race::Hook::FromPod, &frames, |out| ends(out).1)
    else {
        return;
    };
    let ct = dp.ct6();
    let forward = ct.iter().filter(|(k, _)| k.dir == CT_FORWARD).count();
    assert_eq!((forward, ct.len()), (frames.len(), 2 * frames.len()));
    assert_eq!(dp.stat6(outcome::DNAT_NEW), frames.len() as u64);
    assert_eq!(
        dp.stat6(outcome::DNAT_ESTABLISHED) + stalled,
        frames.len() as u64
    );
}
