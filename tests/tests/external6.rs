//! XDP tables for IPv6 traffic from outside: packet in + map state → verdict, packet out
//! (exact bytes, checksums recomputed independently), counters. The IPv4 XDP entry point
//! tail-calls the IPv6 stages. BPF_PROG_TEST_RUN on the real programs; needs root.
use lb_common::{CT_REVERSE, SCOPE_EXTERNAL, SVC_FLAG_DROP_EMPTY, SVC_FLAG_SNAT, outcome};
use xlb_tests::datapath::*;
use xlb_tests::{
    packet::{ACK, PROTO_TCP, PROTO_UDP, SYN},
    packet6::{Frame6, L4, NEXTHDR_DEST, PROTO_ICMPV6, checksum_errors6, view6},
    privilege::require_privileges,
    race,
};

const NODE_A: &str = "fd00:192:168:50::1";
const NODE_B: &str = "fd00:192:168:60::1";
const OUTSIDER: &str = "2001:db8:9::9";
const BACKEND: (u32, &str, u16) = (1, "fd00:10:244:2::5", 8080);

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

/// A node with two IPv6 addresses, SNAT ports 61000..=61002, and NodePort 30080 (TCP, UDP)
/// on `[::]`.
fn node(flags: u16, backends: &[(u32, &str, u16)]) -> Datapath {
    let mut dp = Datapath::new();
    dp.set_node6(&[NODE_A, NODE_B], (61_000, 61_002));
    for proto in [PROTO_TCP, PROTO_UDP] {
        dp.frontend6([0; 4], SCOPE_EXTERNAL, proto, 30080, backends, flags);
    }
    dp
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn nodeport_on_every_ipv6_node_address_is_snated_and_replies_go_back() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    for (i, node_ip) in [NODE_A, NODE_B].into_iter().enumerate() {
        let client_port = 40_000 + i as u16;
        let syn = Frame6::tcp(OUTSIDER, client_port, node_ip, 30080, SYN).build();
        let (verdict, out) = dp.run_external(&syn);
        // No route to the backend in the test's namespace: handed to the kernel.
        assert_eq!(verdict, XDP_PASS, "{node_ip}");
        assert_eq!(checksum_errors6(&out), Vec::<String>::new(), "{node_ip}");
        let ((src, sport), dst) = ends(&out);
        assert_eq!(dst, end(BACKEND.1, BACKEND.2), "{node_ip}");
        // Source: the node's IPv6 SNAT address (the first one), a port from the range.
        assert_eq!(src, end(NODE_A, 0).0);
        assert!((61_000..=61_002).contains(&sport), "{sport}");
        assert_eq!(out.len(), syn.len());
        assert_eq!(&out[..14], &syn[..14], "Ethernet header untouched on PASS");
        assert_eq!(
            out[21], syn[21],
            "hop limit: the kernel forwards and decrements"
        );
        assert_eq!(
            &out[L4 + 4..L4 + 16],
            &syn[L4 + 4..L4 + 16],
            "TCP sequence and flags"
        );

        // The backend's reply, from another node: back to the client, from its address.
        let reply = Frame6::tcp(BACKEND.1, BACKEND.2, NODE_A, sport, SYN | ACK).build();
        let (verdict, back) = dp.run_external(&reply);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(checksum_errors6(&back), Vec::<String>::new());
        assert_eq!(
            ends(&back),
            (end(node_ip, 30080), end(OUTSIDER, client_port))
        );
    }
    assert_eq!(dp.stat(outcome::EXTERNAL_NEW), 2);
    assert_eq!(dp.stat(outcome::EXTERNAL_REPLY), 2);
    assert_eq!(
        dp.ct6().len(),
        4,
        "forward and reverse entries of two flows"
    );
    assert!(dp.ct().is_empty(), "nothing in the IPv4 table");

    // Later packets of a flow keep backend and SNAT port.
    let ack = Frame6::tcp(OUTSIDER, 40_000, NODE_A, 30080, ACK).build();
    let (_, out) = dp.run_external(&ack);
    let (_, again) = dp.run_external(&ack);
    assert_eq!(out, again);
    assert_eq!(checksum_errors6(&out), Vec::<String>::new());
    assert_eq!(dp.stat(outcome::EXTERNAL_ESTABLISHED), 2);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn udp_and_extension_headers_and_a_local_policy_keep_the_client() {
    require_privileges();
    // Local: no SNAT, the client's address reaches the backend.
    let mut dp = node(0, &[BACKEND]);
    let dgram = Frame6::udp(OUTSIDER, 5000, NODE_B, 30080)
        .with_extension(NEXTHDR_DEST)
        .build();
    let (verdict, out) = dp.run_external(&dgram);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(checksum_errors6(&out), Vec::<String>::new());
    assert_eq!(ends(&out), (end(OUTSIDER, 5000), end(BACKEND.1, 8080)));
    assert_ne!(
        &out[L4 + 8 + 6..L4 + 8 + 8],
        &[0, 0],
        "UDP checksum never zero"
    );
    // A bare SYN from the backend to the client opens something new: not the reply.
    let tcp = Frame6::tcp(OUTSIDER, 5001, NODE_B, 30080, SYN).build();
    assert_eq!(dp.run_external(&tcp).0, XDP_PASS);
    let bare = Frame6::tcp(BACKEND.1, 8080, OUTSIDER, 5001, SYN).build();
    assert_eq!(dp.run(Hook::FromPod, &bare), (PASS, bare.clone()));
    assert_eq!(dp.stat(outcome::EXTERNAL_REPLY), 0);
    // A local backend's reply leaves through its pod interface (TC), source restored;
    // not while its reply bit is clear (the source is then no backend's).
    let reply = Frame6::udp(BACKEND.1, 8080, OUTSIDER, 5000).build();
    let backend = ip6(BACKEND.1);
    set_reply_bit(&mut dp.ebpf, backend, 8080, PROTO_UDP, false);
    assert_eq!(dp.run(Hook::FromPod, &reply), (PASS, reply.clone()));
    set_reply_bit(&mut dp.ebpf, backend, 8080, PROTO_UDP, true);
    let (verdict, back) = dp.run(Hook::FromPod, &reply);
    assert_eq!(verdict, TC_ACT_OK, "routed on by the kernel");
    assert_eq!(checksum_errors6(&back), Vec::<String>::new());
    assert_eq!(ends(&back), (end(NODE_B, 30080), end(OUTSIDER, 5000)));
    assert_eq!(dp.stat(outcome::EXTERNAL_REPLY), 1);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn rejects_drops_and_strangers_from_outside() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[]);
    // No endpoints anywhere: ICMPv6 port unreachable back out of the same interface.
    let syn = Frame6::tcp(OUTSIDER, 40_000, NODE_A, 30080, SYN).build();
    let (verdict, out) = dp.run_external(&syn);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), L4 + 8 + 48);
    assert_eq!(&out[0..6], &syn[6..12], "to the sender's MAC");
    assert_eq!(&out[6..12], &syn[0..6]);
    let v = view6(&out);
    assert_eq!(
        (v.src.to_string(), v.dst.to_string(), v.proto),
        (end(NODE_A, 0).0, end(OUTSIDER, 0).0, PROTO_ICMPV6)
    );
    assert_eq!((out[L4], out[L4 + 1]), (1, 4));
    assert_eq!(&out[L4 + 8..], &syn[14..14 + 48]);
    assert_eq!(checksum_errors6(&out), Vec::<String>::new());

    // Local policy without local endpoints: dropped.
    let mut dp = node(SVC_FLAG_DROP_EMPTY, &[]);
    let (verdict, _) = dp.run_external(&syn);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(dp.stat(outcome::DROP_NO_LOCAL_ENDPOINT), 1);

    // Not a node address, nor a frontend: passed untouched; `::` is no address either.
    for dst in ["2001:db8:1::1", "::"] {
        let stranger = Frame6::tcp(OUTSIDER, 40_001, dst, 30080, SYN).build();
        let (verdict, out) = dp.run_external(&stranger);
        assert_eq!((verdict, out), (XDP_PASS, stranger), "{dst}");
    }
    assert_eq!(dp.stat(outcome::PASS_NOT_SERVICE), 2);
}

/// A retransmitted SYN keeps its flow's backend and SNAT port and claims no other port,
/// also when every port of the range is taken, and a SYN on the tuple of a flow that
/// expired is a new flow. (The second stage balances a SYN before any lookup and hands one
/// whose tuple has an entry back to the first, which follows it or hands it on again.)
/// A CPU's SNAT port search starts past the port it claimed last, as on IPv4 (external.rs).
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_cpus_ipv6_snat_ports_follow_each_other_round_the_range() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.set_node6(&[NODE_A], (50_000, 50_007));
    dp.frontend6(
        [0; 4],
        SCOPE_EXTERNAL,
        PROTO_TCP,
        30080,
        &[BACKEND],
        SVC_FLAG_SNAT,
    );
    assert_snat_ports_follow_each_other(
        &mut dp,
        |i| Frame6::tcp(&format!("2001:db8:9::{i:x}"), 5555, NODE_A, 30080, SYN).build(),
        |out| view6(out).sport,
        |dp| dp.stat6(outcome::DROP_SNAT_EXHAUSTED),
        |dp| dp.age_conntrack6(lb_common::ct_lifetime::TCP_SYN_S + 1),
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_retransmitted_ipv6_syn_keeps_its_snat_port_and_claims_no_other() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    let syn = Frame6::tcp(OUTSIDER, 5555, NODE_A, 30080, SYN).build();
    let (verdict, first) = dp.run_external(&syn);
    assert_eq!(verdict, XDP_PASS);
    for _ in 0..10 {
        assert_eq!(dp.run_external(&syn), (XDP_PASS, first.clone()));
    }
    assert_eq!(dp.stat6(outcome::EXTERNAL_NEW), 1);
    assert_eq!(dp.stat6(outcome::EXTERNAL_ESTABLISHED), 10);
    assert_eq!(dp.ct6().len(), 2, "one flow, one claim: {:?}", dp.ct6());

    // The other two ports are still free for two more flows, and no third.
    let mut ports = vec![view6(&first).sport];
    for client in ["2001:db8:9::1", "2001:db8:9::2"] {
        let (verdict, out) =
            dp.run_external(&Frame6::tcp(client, 5555, NODE_A, 30080, SYN).build());
        assert_eq!(verdict, XDP_PASS, "{client}");
        ports.push(view6(&out).sport);
    }
    ports.sort();
    assert_eq!(ports, [61_000, 61_001, 61_002]);
    let fourth = Frame6::tcp("2001:db8:9::3", 5555, NODE_A, 30080, SYN).build();
    assert_eq!(dp.run_external(&fourth).0, XDP_DROP);
    // With the range full, the first flow's SYN still goes through on its port.
    assert_eq!(dp.run_external(&syn), (XDP_PASS, first.clone()));
    assert_eq!(dp.stat6(outcome::DROP_SNAT_EXHAUSTED), 1);
    assert_eq!(dp.stat6(outcome::EXTERNAL_ESTABLISHED), 11);

    // Every flow expired: the same SYN opens a new flow, on a port taken over.
    dp.age_conntrack6(3600);
    let (verdict, again) = dp.run_external(&syn);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(checksum_errors6(&again), Vec::<String>::new());
    assert_eq!(ends(&again).1, end(BACKEND.1, BACKEND.2));
    assert_eq!(dp.stat6(outcome::EXTERNAL_NEW), 4);
    assert_eq!(dp.stat6(outcome::EXTERNAL_ESTABLISHED), 11);
    // Aged entries were last seen an hour before they were created.
    let fresh: Vec<_> = dp
        .ct6()
        .into_iter()
        .filter(|(_, v)| v.last_seen_ns >= v.created_ns)
        .collect();
    assert_eq!(fresh.len(), 2, "the new flow's two entries only: {fresh:?}");
    let reverse = fresh
        .iter()
        .find(|(k, _)| k.dir == CT_REVERSE)
        .expect("a reverse entry");
    assert_eq!(u16::from_be(reverse.0.dport), view6(&again).sport);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn first_packets_of_one_snated_ipv6_udp_flow_on_two_cpus_take_one_backend_and_port() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.set_node6(&[NODE_A], (40_000, 60_000));
    let backends = race::Backends::ten(|i| format!("fd00:10:244:{i}::5"), 8080);
    let (any, udp, snat) = ([0; 4], PROTO_UDP, SVC_FLAG_SNAT);
    dp.frontend6(any, SCOPE_EXTERNAL, udp, 30080, &backends.entries(), snat);
    let frames: Vec<Vec<u8>> = (0..race::FLOWS)
        .map(|i| Frame6::udp(OUTSIDER, 10_000 + i, NODE_A, 30080).build())
        .collect();
    // The stage that records a flow has no stack to follow one: the packet whose insert
    // finds the tuple taken goes back to the first stage to follow it (`Bounce::Follow`).
    let Some(stalled) =
        race::assert_one_destination_each(&mut dp, race::Hook::External, &frames, ends)
    else {
        return;
    };
    let ct = dp.ct6();
    let replies = ct.iter().filter(|(k, _)| k.dir == CT_REVERSE).count();
    assert_eq!((replies, ct.len()), (frames.len(), 2 * frames.len()));
    assert_eq!(dp.stat6(outcome::EXTERNAL_NEW), frames.len() as u64);
    assert_eq!(
        dp.stat6(outcome::EXTERNAL_ESTABLISHED) + stalled,
        frames.len() as u64
    );
}
