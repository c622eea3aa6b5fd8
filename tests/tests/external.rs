//! XDP tables for traffic from outside: packet in + map state → verdict, packet out (exact
//! bytes, checksums), counters. BPF_PROG_TEST_RUN on the real program; needs root.
use std::net::Ipv4Addr;

use lb_common::{
    CT_FLAG_EXTERNAL, CT_FLAG_SNAT, CT_REVERSE, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SVC_FLAG_DROP_EMPTY, SVC_FLAG_SNAT, SVC_FLAG_SOURCE_RANGES, VIP_ANY_NODE_IP, outcome,
};
use xlb_tests::datapath::*;
use xlb_tests::{
    packet::{ACK, Frame, PROTO_ICMP, PROTO_TCP, PROTO_UDP, RST, SYN, checksum_errors, view},
    privilege::require_privileges,
    race,
};

const NODE_A: &str = "192.168.50.1";
const NODE_B: &str = "192.168.60.1";
const OUTSIDER: &str = "203.0.113.9";
const BACKEND: (u32, &str, u16) = (1, "10.244.2.5", 8080);
const LB_IP: &str = "192.0.2.10";

fn addr(s: &str) -> Ipv4Addr {
    s.parse().expect("address")
}

/// A node with two addresses, SNAT ports 61000..=61002, and NodePort 30080/TCP (+UDP).
fn node(flags: u16, backends: &[(u32, &str, u16)]) -> Datapath {
    let mut dp = Datapath::new();
    dp.set_node(&[NODE_A, NODE_B], (61_000, 61_002));
    for proto in [PROTO_TCP, PROTO_UDP] {
        dp.frontend(
            VIP_ANY_NODE_IP,
            SCOPE_EXTERNAL,
            proto,
            30080,
            backends,
            flags,
        );
    }
    dp
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn nodeport_on_every_node_address_is_snated_and_replies_go_back() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    for (i, node_ip) in [NODE_A, NODE_B].into_iter().enumerate() {
        let client_port = 40_000 + i as u16;
        let syn = Frame::tcp(OUTSIDER, client_port, node_ip, 30080, SYN).build();
        let (verdict, out) = dp.run_external(&syn);
        // No route to the backend in the test's namespace: handed to the kernel.
        assert_eq!(verdict, XDP_PASS, "{node_ip}");
        assert_eq!(checksum_errors(&out), Vec::<String>::new());
        let v = view(&out);
        assert_eq!((v.dst, v.dport), (addr(BACKEND.1), BACKEND.2), "{node_ip}");
        // Source: the node's SNAT address (the first one), a port from the range.
        assert_eq!(v.src, addr(NODE_A));
        assert!((61_000..=61_002).contains(&v.sport), "{}", v.sport);
        // Everything else is the client's packet.
        assert_eq!(out.len(), syn.len());
        assert_eq!(&out[..14], &syn[..14], "Ethernet header untouched on PASS");
        assert_eq!(&out[38..50], &syn[38..50], "TCP sequence numbers and flags");

        // The backend's reply, arriving from another node: back to the client, from the
        // node address it used.
        let reply = Frame::tcp(BACKEND.1, BACKEND.2, NODE_A, v.sport, SYN | ACK).build();
        let (verdict, back) = dp.run_external(&reply);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(checksum_errors(&back), Vec::<String>::new());
        let b = view(&back);
        assert_eq!(
            (b.src, b.sport, b.dst, b.dport),
            (addr(node_ip), 30080, addr(OUTSIDER), client_port)
        );
    }
    assert_eq!(dp.stat(outcome::EXTERNAL_NEW), 2);
    assert_eq!(dp.stat(outcome::EXTERNAL_REPLY), 2);

    // Later packets of a flow keep backend and SNAT port.
    let first = dp
        .ct()
        .into_iter()
        .find(|(k, _)| k.dir == CT_REVERSE && k.dport != 0)
        .expect("reverse entry");
    assert_eq!(
        first.1.flags & (CT_FLAG_EXTERNAL | CT_FLAG_SNAT),
        CT_FLAG_EXTERNAL | CT_FLAG_SNAT
    );
    let ack = Frame::tcp(OUTSIDER, 40_000, NODE_A, 30080, ACK).build();
    let (_, out) = dp.run_external(&ack);
    let (_, again) = dp.run_external(&ack);
    assert_eq!(out, again);
    assert_eq!(dp.stat(outcome::EXTERNAL_ESTABLISHED), 2);
}

/// A SNATed flow's reply state is its SNAT port's claim, in the claims array, not a second
/// conntrack entry; a flow an earlier agent recorded with a reverse conntrack entry keeps
/// its replies translated after an upgrade, and a claim freed while its flow goes on is
/// claimed again by the flow's next packet in a new window.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn snat_reply_state_is_a_claim_and_older_reverse_entries_still_translate() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    let syn = Frame::tcp(OUTSIDER, 40_000, NODE_A, 30080, SYN).build();
    let (_, out) = dp.run_external(&syn);
    let port = view(&out).sport;
    let reply_claims = |dp: &Datapath| {
        let mut claims = dp.claims::<u32>(lb_common::map_names::REPLY_CLAIMS);
        claims.retain(|(k, _)| k.dir == CT_REVERSE);
        claims
    };
    let claims = reply_claims(&dp);
    assert_eq!(claims.len(), 1, "{claims:?}");
    let (key, value) = claims[0];
    assert_eq!(u16::from_be(key.dport), port);
    assert_eq!(
        dp.claims::<u32>(lb_common::map_names::REPLY_CLAIMS).len(),
        1,
        "{claims:?}"
    );
    assert_eq!(
        dp.ct().len(),
        2,
        "the forward entry's claim and the reply's"
    );
    let reply = Frame::tcp(BACKEND.1, BACKEND.2, NODE_A, port, SYN | ACK).build();
    let (_, back) = dp.run_external(&reply);
    let expected = (addr(NODE_A), 30080, addr(OUTSIDER), 40_000);
    let b = view(&back);
    assert_eq!((b.src, b.sport, b.dst, b.dport), expected);

    // As an earlier agent left it: the claim a reverse conntrack entry.
    dp.clear_reply_claims();
    dp.put_ct(key, value);
    let (verdict, again) = dp.run_external(&reply);
    assert_eq!((verdict, again), (XDP_PASS, back.clone()));
    assert_eq!(dp.stat(outcome::EXTERNAL_REPLY), 2);

    // Claim freed (as by another flow taking it over once expired), old entry gone: the
    // flow's next packet in a later window claims its port again.
    dp.clear_reply_claims();
    let mut reverse = dp.ct();
    reverse.retain(|(k, _)| k.dir == CT_REVERSE);
    for (k, _) in reverse {
        dp.remove_ct(k);
    }
    assert_eq!(dp.run_external(&reply).0, XDP_PASS);
    assert_eq!(
        dp.stat(outcome::EXTERNAL_REPLY),
        2,
        "no state: untranslated"
    );
    std::thread::sleep(std::time::Duration::from_nanos(
        lb_common::REVERSE_CHECK_NS + lb_common::REVERSE_CHECK_NS / 10,
    ));
    let ack = Frame::tcp(OUTSIDER, 40_000, NODE_A, 30080, ACK).build();
    let (_, forward) = dp.run_external(&ack);
    assert_eq!(view(&forward).sport, port);
    assert_eq!(reply_claims(&dp).len(), 1);
    let (_, back) = dp.run_external(&reply);
    let b = view(&back);
    assert_eq!((b.src, b.sport, b.dst, b.dport), expected);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn udp_nodeport_and_local_reply_through_the_pod_interface() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    let dgram = Frame::udp(OUTSIDER, 5000, NODE_B, 30080).build();
    let (verdict, out) = dp.run_external(&dgram);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(checksum_errors(&out), Vec::<String>::new());
    let v = view(&out);
    assert_eq!(
        (v.dst, v.dport, v.src),
        (addr(BACKEND.1), 8080, addr(NODE_A))
    );
    // A local backend's reply leaves through its pod interface (TC ingress).
    let reply = Frame::udp(BACKEND.1, 8080, NODE_A, v.sport).build();
    let (verdict, back) = dp.run(Hook::FromPod, &reply);
    assert_eq!(verdict, 0, "TC_ACT_OK: routed on by the kernel");
    assert_eq!(checksum_errors(&back), Vec::<String>::new());
    let b = view(&back);
    assert_eq!(
        (b.src, b.sport, b.dst, b.dport),
        (addr(NODE_B), 30080, addr(OUTSIDER), 5000)
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn external_ips_and_lb_ips_with_source_ranges() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    dp.frontend(
        ip(LB_IP),
        SCOPE_EXTERNAL,
        PROTO_TCP,
        80,
        &[BACKEND],
        SVC_FLAG_SNAT | SVC_FLAG_SOURCE_RANGES,
    );
    dp.allow_source("203.0.113.0/24");
    let allowed = Frame::tcp(OUTSIDER, 1234, LB_IP, 80, SYN).build();
    let (verdict, out) = dp.run_external(&allowed);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(view(&out).dst, addr(BACKEND.1));

    let denied = Frame::tcp("198.51.100.1", 1234, LB_IP, 80, SYN).build();
    assert_eq!(dp.run_external(&denied), (XDP_DROP, denied.clone()));
    assert_eq!(dp.stat(outcome::DROP_SOURCE_RANGE), 1);

    // A pod-side frontend of the same address is not used for outsiders.
    let other = Frame::tcp(OUTSIDER, 1234, VIP, 80, SYN).build();
    dp.frontend(ip(VIP), SCOPE_INTERNAL, PROTO_TCP, 80, &[BACKEND], 0);
    assert_eq!(dp.run_external(&other), (XDP_PASS, other.clone()));
    assert_eq!(dp.stat(outcome::PASS_NOT_SERVICE), 1);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn local_policy_keeps_the_client_address_or_drops() {
    require_privileges();
    let mut dp = node(SVC_FLAG_DROP_EMPTY, &[BACKEND]);
    let syn = Frame::tcp(OUTSIDER, 7000, NODE_A, 30080, SYN).build();
    let (verdict, out) = dp.run_external(&syn);
    assert_eq!(verdict, XDP_PASS);
    let v = view(&out);
    assert_eq!(
        (v.src, v.sport),
        (addr(OUTSIDER), 7000),
        "client address kept"
    );
    assert_eq!((v.dst, v.dport), (addr(BACKEND.1), 8080));
    // The local backend answers the client directly; its pod interface restores the node.
    let reply = Frame::tcp(BACKEND.1, 8080, OUTSIDER, 7000, SYN | ACK).build();
    let (_, back) = dp.run(Hook::FromPod, &reply);
    let b = view(&back);
    assert_eq!(
        (b.src, b.sport, b.dst),
        (addr(NODE_A), 30080, addr(OUTSIDER))
    );
    assert_eq!(checksum_errors(&back), Vec::<String>::new());

    // No local endpoint: dropped and counted, never rejected.
    let mut empty = node(SVC_FLAG_DROP_EMPTY, &[]);
    assert_eq!(empty.run_external(&syn), (XDP_DROP, syn.clone()));
    assert_eq!(empty.stat(outcome::DROP_NO_LOCAL_ENDPOINT), 1);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn cluster_policy_without_endpoints_rejects_with_icmp() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[]);
    let syn = Frame::tcp(OUTSIDER, 7001, NODE_A, 30080, SYN).build();
    let (verdict, out) = dp.run_external(&syn);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), 70);
    assert_eq!(&out[0..6], &syn[6..12], "back to the sender's MAC");
    assert_eq!(&out[6..12], &syn[0..6]);
    let v = view(&out);
    assert_eq!(
        (v.src, v.dst, v.proto),
        (addr(NODE_A), addr(OUTSIDER), PROTO_ICMP)
    );
    assert_eq!((out[34], out[35]), (3, 3), "port unreachable");
    assert_eq!(&out[42..70], &syn[14..42], "quotes the offending header");
    assert_eq!(checksum_errors(&out), Vec::<String>::new());
    assert_eq!(dp.stat(outcome::REJECT_NO_BACKEND), 1);
    // A frame shorter than its IPv4 total length is malformed: passed, never answered.
    let mut cut = syn.clone();
    cut.truncate(cut.len() - 3);
    assert_eq!(dp.run_external(&cut), (XDP_PASS, cut.clone()));
    assert_eq!(
        dp.stat(outcome::REJECT_NO_BACKEND),
        1,
        "no ICMP for a cut frame"
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn snat_ports_are_claimed_once_and_exhaustion_is_counted() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    let mut ports = Vec::new();
    for client in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        // Same client port everywhere: only the SNAT port tells the flows apart.
        let syn = Frame::tcp(client, 5555, NODE_A, 30080, SYN).build();
        let (verdict, out) = dp.run_external(&syn);
        assert_eq!(verdict, XDP_PASS, "{client}");
        ports.push(view(&out).sport);
    }
    ports.sort();
    assert_eq!(ports, [61_000, 61_001, 61_002], "three flows, three ports");
    let fourth = Frame::tcp("203.0.113.4", 5555, NODE_A, 30080, SYN).build();
    assert_eq!(dp.run_external(&fourth), (XDP_DROP, fourth.clone()));
    assert_eq!(dp.stat(outcome::DROP_SNAT_EXHAUSTED), 1);
    // Every reply maps back to its own client.
    for (i, port) in ports.iter().enumerate() {
        let reply = Frame::tcp(BACKEND.1, 8080, NODE_A, *port, ACK).build();
        let (_, back) = dp.run_external(&reply);
        assert!(view(&back).dst.to_string().starts_with("203.0.113."), "{i}");
    }
    let clients: std::collections::BTreeSet<Ipv4Addr> = ports
        .iter()
        .map(|p| {
            view(
                &dp.run_external(&Frame::tcp(BACKEND.1, 8080, NODE_A, *p, ACK).build())
                    .1,
            )
            .dst
        })
        .collect();
    assert_eq!(clients.len(), 3);
}

/// A CPU's SNAT port search starts past the port it claimed last (wrapping in the range):
/// a burst of new flows claims neighbouring slots, and ports come round oldest first.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_cpus_snat_ports_follow_each_other_round_the_range() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.set_node(&[NODE_A], (50_000, 50_007));
    let (any, tcp) = (VIP_ANY_NODE_IP, PROTO_TCP);
    dp.frontend(any, SCOPE_EXTERNAL, tcp, 30080, &[BACKEND], SVC_FLAG_SNAT);
    assert_snat_ports_follow_each_other(
        &mut dp,
        |i| Frame::tcp(&format!("203.0.113.{i}"), 5555, NODE_A, 30080, SYN).build(),
        |out| view(out).sport,
        |dp| dp.stat(outcome::DROP_SNAT_EXHAUSTED),
        |dp| dp.age_conntrack(lb_common::ct_lifetime::TCP_SYN_S + 1),
    );
}

/// The cursor is per backend: new flows to two backends taken in turn each get ports that
/// follow each other (one cursor for both gave every other port to each, and each claim a
/// fresh cache line of the backend's run).
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn each_backends_snat_ports_follow_each_other() {
    require_privileges();
    race::pin_to(0);
    let mut dp = Datapath::new();
    let (min, span) = (50_000u16, 100u16);
    dp.set_node(&[NODE_A], (min, min + span - 1));
    let (any, tcp) = (VIP_ANY_NODE_IP, PROTO_TCP);
    let other = (2, "10.244.2.6", 8080);
    dp.frontend(any, SCOPE_EXTERNAL, tcp, 30080, &[BACKEND], SVC_FLAG_SNAT);
    dp.frontend(any, SCOPE_EXTERNAL, tcp, 30081, &[other], SVC_FLAG_SNAT);
    let mut ports: [Vec<u16>; 2] = [Vec::new(), Vec::new()];
    for i in 0..12u16 {
        let to = usize::from(i % 2);
        let syn = Frame::tcp(
            &format!("203.0.113.{}", i + 1),
            5555,
            NODE_A,
            30080 + to as u16,
            SYN,
        );
        let (verdict, out) = dp.run_external(&syn.build());
        assert_eq!(verdict, XDP_PASS, "flow {i}");
        ports[to].push(view(&out).sport);
    }
    for (backend, ports) in ports.iter().enumerate() {
        for pair in ports.windows(2) {
            let step = (pair[1] + span - pair[0]) % span;
            assert_eq!(step, 1, "backend {backend}: ports {ports:?}");
        }
    }
}

/// A reply is looked up only where one can be (a miss on a cold table costs about what an
/// insert does): never for a bare SYN, and to a node address only at a SNAT port.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn only_what_can_be_a_reply_is_looked_up_as_one() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    let syn = Frame::tcp(OUTSIDER, 40_000, NODE_A, 30080, SYN).build();
    let port = view(&dp.run_external(&syn).1).sport;
    // From the backend to the claimed port, a bare SYN opens something new: no reply.
    let bare = Frame::tcp(BACKEND.1, BACKEND.2, NODE_A, port, SYN).build();
    assert_eq!(dp.run_external(&bare), (XDP_PASS, bare.clone()));
    // The same flow's entry planted for a port outside the SNAT range is not looked for.
    let (mut key, value) = dp
        .ct()
        .into_iter()
        .find(|(k, _)| k.dir == CT_REVERSE)
        .expect("reverse entry");
    key.dport = 22u16.to_be();
    dp.put_ct(key, value);
    let off_range = Frame::tcp(BACKEND.1, BACKEND.2, NODE_A, 22, ACK).build();
    assert_eq!(dp.run_external(&off_range), (XDP_PASS, off_range.clone()));
    assert_eq!(dp.stat(outcome::EXTERNAL_REPLY), 0);
    // A reset without ACK is a reply all the same.
    let reset = Frame::tcp(BACKEND.1, BACKEND.2, NODE_A, port, RST).build();
    let b = view(&dp.run_external(&reset).1);
    assert_eq!((b.dst, b.dport), (addr(OUTSIDER), 40_000));
    assert_eq!(dp.stat(outcome::EXTERNAL_REPLY), 1);

    // On a pod interface: a local backend's reply to a client outside (no SNAT).
    let mut dp = node(SVC_FLAG_DROP_EMPTY, &[BACKEND]);
    let syn = Frame::tcp(OUTSIDER, 7000, NODE_A, 30080, SYN).build();
    assert_eq!(dp.run_external(&syn).0, XDP_PASS);
    let bare = Frame::tcp(BACKEND.1, 8080, OUTSIDER, 7000, SYN).build();
    assert_eq!(dp.run(Hook::FromPod, &bare), (PASS, bare.clone()));
    let reply = Frame::tcp(BACKEND.1, 8080, OUTSIDER, 7000, SYN | ACK).build();
    // A source whose reply bit is clear is no backend: its packets are not looked up.
    set_reply_bit(&mut dp.ebpf, ip(BACKEND.1), 8080, PROTO_TCP, false);
    assert_eq!(dp.run(Hook::FromPod, &reply), (PASS, reply.clone()));
    set_reply_bit(&mut dp.ebpf, ip(BACKEND.1), 8080, PROTO_TCP, true);
    let b = view(&dp.run(Hook::FromPod, &reply).1);
    assert_eq!((b.src, b.sport), (addr(NODE_A), 30080));
    assert_eq!(dp.stat(outcome::EXTERNAL_REPLY), 1);
    // Nor on XDP: a SNATed flow's reply from a source with a clear bit stays untouched.
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    let syn = Frame::tcp(OUTSIDER, 40_001, NODE_A, 30080, SYN).build();
    let port = view(&dp.run_external(&syn).1).sport;
    let reply = Frame::tcp(BACKEND.1, BACKEND.2, NODE_A, port, SYN | ACK).build();
    set_reply_bit(&mut dp.ebpf, ip(BACKEND.1), BACKEND.2, PROTO_TCP, false);
    assert_eq!(dp.run_external(&reply), (XDP_PASS, reply.clone()));
    set_reply_bit(&mut dp.ebpf, ip(BACKEND.1), BACKEND.2, PROTO_TCP, true);
    let b = view(&dp.run_external(&reply).1);
    assert_eq!((b.dst, b.dport), (addr(OUTSIDER), 40_001));
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn other_traffic_passes_untouched_and_is_counted() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    let not_node = Frame::tcp(OUTSIDER, 1, "10.1.1.1", 30080, SYN).build();
    let other_port = Frame::tcp(OUTSIDER, 1, NODE_A, 22, SYN).build();
    let stray_reply = Frame::tcp(BACKEND.1, 8080, NODE_A, 61_001, ACK).build();
    // 0.0.0.0 is where NodePorts are stored, not a node address: it reaches none.
    let wildcard = Frame::tcp(OUTSIDER, 1, "0.0.0.0", 30080, SYN).build();
    for frame in [&not_node, &other_port, &stray_reply, &wildcard] {
        assert_eq!(dp.run_external(frame), (XDP_PASS, frame.clone()));
    }
    assert_eq!(dp.stat(outcome::PASS_NOT_SERVICE), 4);
    // Nor from a pod (TC), where the pods' NodePort entry is.
    dp.frontend(
        VIP_ANY_NODE_IP,
        SCOPE_INTERNAL,
        PROTO_TCP,
        30080,
        &[BACKEND],
        0,
    );
    let from_pod = Frame::tcp("10.244.0.5", 1, "0.0.0.0", 30080, SYN).build();
    assert_eq!(dp.run(Hook::FromPod, &from_pod), (PASS, from_pod.clone()));
    let mut arp = not_node.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut fragment = Frame::tcp(OUTSIDER, 1, NODE_A, 30080, SYN).build();
    fragment[20] |= 0x20; // more fragments
    let mut options = Frame::tcp(OUTSIDER, 1, NODE_A, 30080, SYN).build();
    options[14] = 0x46;
    let short = not_node[..40].to_vec();
    let icmp = Frame::tcp(OUTSIDER, 1, NODE_A, 30080, SYN).build();
    let mut icmp = icmp;
    icmp[23] = PROTO_ICMP;
    // The parser contract every hook shares (the NodePort here has a backend, so any
    // packet let through would be translated, not passed).
    let to_nodeport = || Frame::tcp(OUTSIDER, 1, NODE_A, 30080, SYN).build();
    let with = |change: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = to_nodeport();
        change(&mut frame);
        frame
    };
    let cut_below_total_length = with(&|f| f.truncate(f.len() - 3));
    let ihl_below_5 = with(&|f| f[14] = 0x44);
    let version_6 = with(&|f| f[14] = 0x65);
    let tcp_offset_below_5 = with(&|f| f[46] = 0x40);
    let tcp_offset_past_datagram = with(&|f| f[46] = 0xf0);
    for (frame, counter) in [
        (arp, outcome::NOT_IP),
        (fragment, outcome::FRAGMENT),
        (options, outcome::IP_OPTIONS),
        (short, outcome::MALFORMED),
        (icmp, outcome::OTHER_PROTOCOL),
        (cut_below_total_length, outcome::MALFORMED),
        (ihl_below_5, outcome::MALFORMED),
        (version_6, outcome::MALFORMED),
        (tcp_offset_below_5, outcome::MALFORMED),
        (tcp_offset_past_datagram, outcome::MALFORMED),
    ] {
        let before = dp.stat(counter);
        assert_eq!(dp.run_external(&frame), (XDP_PASS, frame.clone()));
        assert_eq!(dp.stat(counter), before + 1, "counter {counter}");
    }
}

/// Conntrack keys carry no hook: a packet from outside that copies a pod's 5-tuple (the
/// pod's address spoofed) must not ride the pod's flow to its backend.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn an_outside_packet_cannot_ride_a_pods_flow() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    dp.frontend(
        ip("10.96.0.10"),
        SCOPE_INTERNAL,
        PROTO_TCP,
        80,
        &[BACKEND],
        0,
    );
    let syn = Frame::tcp("10.244.0.5", 40000, "10.96.0.10", 80, SYN).build();
    let (verdict, _) = dp.run(Hook::FromPod, &syn);
    assert_eq!(verdict, TC_ACT_OK, "the pod's flow is tracked");
    let spoofed = Frame::tcp("10.244.0.5", 40000, "10.96.0.10", 80, ACK).build();
    assert_eq!(dp.run_external(&spoofed), (XDP_PASS, spoofed.clone()));
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn the_address_filter_turns_away_only_what_is_no_frontend_and_no_node_address() {
    require_privileges();
    let mut dp = node(SVC_FLAG_DROP_EMPTY, &[BACKEND]);
    dp.frontend(
        ip(LB_IP),
        SCOPE_EXTERNAL,
        PROTO_TCP,
        443,
        &[BACKEND],
        SVC_FLAG_DROP_EMPTY,
    );
    for a in [NODE_A, NODE_B, LB_IP] {
        assert!(marked(&dp.ebpf, ip(a)), "{a} is marked");
    }
    assert!(!marked(&dp.ebpf, ip(OUTSIDER)), "the client's bit is clear");
    // A flow through the LoadBalancer IP, client address kept; the local backend's reply
    // to the client (an address of no bit) is still found and translated on TC.
    let syn = Frame::tcp(OUTSIDER, 7100, LB_IP, 443, SYN).build();
    let (_, out) = dp.run_external(&syn);
    assert_eq!(view(&out).dst, addr(BACKEND.1));
    let reply = Frame::tcp(BACKEND.1, 8080, OUTSIDER, 7100, SYN | ACK).build();
    let (_, back) = dp.run(Hook::FromPod, &reply);
    let b = view(&back);
    assert_eq!((b.src, b.sport, b.dst), (addr(LB_IP), 443, addr(OUTSIDER)));
    assert_eq!(dp.stat(outcome::EXTERNAL_REPLY), 1);

    // The programs read the filter: with the LB IP's bit cleared, its tracked flow and a
    // new one pass untouched on XDP; with it set again, the flow goes on.
    unmark_local(&mut dp.ebpf, ip(LB_IP));
    let ack = Frame::tcp(OUTSIDER, 7100, LB_IP, 443, ACK).build();
    assert_eq!(dp.run_external(&ack), (XDP_PASS, ack.clone()));
    let other = Frame::tcp(OUTSIDER, 7101, LB_IP, 443, SYN).build();
    assert_eq!(dp.run_external(&other), (XDP_PASS, other.clone()));
    assert_eq!(dp.stat(outcome::PASS_NOT_SERVICE), 2);
    mark_local(&mut dp.ebpf, ip(LB_IP));
    let (_, out) = dp.run_external(&ack);
    assert_eq!(view(&out).dst, addr(BACKEND.1));
    assert_eq!(dp.stat(outcome::EXTERNAL_ESTABLISHED), 1);

    // The same on TC for a pod's packet to a ClusterIP.
    dp.service(PROTO_TCP, 80, &[BACKEND], 0);
    let to_vip = Frame::tcp(CLIENT, 7200, VIP, 80, SYN).build();
    unmark_local(&mut dp.ebpf, ip(VIP));
    assert_eq!(dp.run(Hook::FromPod, &to_vip), (PASS, to_vip.clone()));
    assert_eq!(dp.stat(outcome::PASS_NOT_SERVICE), 3);
    mark_local(&mut dp.ebpf, ip(VIP));
    let (_, out) = dp.run(Hook::FromPod, &to_vip);
    assert_eq!(view(&out).dst, addr(BACKEND.1));
    assert_eq!(dp.stat(outcome::DNAT_NEW), 1);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn xdp_sends_back_out_by_the_cached_next_hop_of_the_ingress_interface() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    // No route in the test's namespace: the translated packet goes to the kernel ...
    let syn = Frame::tcp(OUTSIDER, 7300, NODE_A, 30080, SYN).build();
    let (verdict, out) = dp.run_external(&syn);
    assert_eq!(verdict, XDP_PASS);
    assert!(dp.next_hops().is_empty(), "nothing cached without a route");
    // ... unless a next hop is cached for it, back out of the interface it came in on
    // (BPF_PROG_TEST_RUN's: loopback, ifindex 1): then it leaves with that hop's MACs.
    let macs = [
        2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 2, 0x11, 0x22, 0x33, 0x44, 0x55,
    ];
    let key = lb_common::HopKey {
        dst: ip(BACKEND.1),
        src: ip(NODE_A),
        ifindex: 1,
    };
    dp.put_next_hop(
        key,
        lb_common::HopValue {
            macs,
            ifindex: 1,
            generation: 0,
            max_len: 1500,
            flags: 0,
            stamp_ns: xlb::datapath::clock::monotonic_ns(),
        },
    );
    let ack = Frame::tcp(OUTSIDER, 7300, NODE_A, 30080, ACK).build();
    let (verdict, out2) = dp.run_external(&ack);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(&out2[..12], &macs);
    assert_eq!(out2[22], ack[22] - 1, "TTL decremented");
    assert_eq!(checksum_errors(&out2), Vec::<String>::new());
    assert_eq!(view(&out2).dst, view(&out).dst);
}

/// A retransmitted SYN keeps its flow's backend and SNAT port and claims no other port
/// (the one its balancing claimed before finding the flow is freed again), also when
/// every port of the range is taken.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_retransmitted_syn_keeps_its_snat_port_and_claims_no_other() {
    require_privileges();
    let mut dp = node(SVC_FLAG_SNAT, &[BACKEND]);
    let syn = Frame::tcp(OUTSIDER, 5555, NODE_A, 30080, SYN).build();
    let (verdict, first) = dp.run_external(&syn);
    assert_eq!(verdict, XDP_PASS);
    for _ in 0..10 {
        assert_eq!(dp.run_external(&syn), (XDP_PASS, first.clone()));
    }
    assert_eq!(dp.stat(outcome::EXTERNAL_NEW), 1);
    assert_eq!(dp.stat(outcome::EXTERNAL_ESTABLISHED), 10);
    assert_eq!(dp.ct().len(), 2, "one flow, one claim: {:?}", dp.ct());

    // The other two ports are still free for two more flows, and no third.
    let mut ports = vec![view(&first).sport];
    for client in ["203.0.113.1", "203.0.113.2"] {
        let (verdict, out) = dp.run_external(&Frame::tcp(client, 5555, NODE_A, 30080, SYN).build());
        assert_eq!(verdict, XDP_PASS, "{client}");
        ports.push(view(&out).sport);
    }
    ports.sort();
    assert_eq!(ports, [61_000, 61_001, 61_002]);
    let fourth = Frame::tcp("203.0.113.3", 5555, NODE_A, 30080, SYN).build();
    assert_eq!(dp.run_external(&fourth).0, XDP_DROP);
    // With the range full, the first flow's SYN still goes through on its port.
    assert_eq!(dp.run_external(&syn), (XDP_PASS, first));
    assert_eq!(dp.stat(outcome::DROP_SNAT_EXHAUSTED), 1);
    assert_eq!(dp.stat(outcome::EXTERNAL_ESTABLISHED), 11);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn first_packets_of_one_snated_udp_flow_on_two_cpus_take_one_backend_and_port() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.set_node(&[NODE_A], (40_000, 60_000));
    let backends = race::Backends::ten(|i| format!("10.244.{i}.5"), 8080);
    let (any, udp, snat) = (VIP_ANY_NODE_IP, PROTO_UDP, SVC_FLAG_SNAT);
    dp.frontend(any, SCOPE_EXTERNAL, udp, 30080, &backends.entries(), snat);
    let frames: Vec<Vec<u8>> = (0..race::FLOWS)
        .map(|i| Frame::udp(OUTSIDER, 10_000 + i, NODE_A, 30080).build())
        .collect();
    // Both CPUs' packets of a flow leave with one backend and one SNAT port: the port the
    // CPU that lost the insert claimed goes back (one reply entry per flow, no leak).
    let Some(stalled) =
        race::assert_one_destination_each(&mut dp, race::Hook::External, &frames, |out| {
            let v = view(out);
            (v.src, v.sport, v.dst, v.dport)
        })
    else {
        return;
    };
    let ct = dp.ct();
    let replies = ct.iter().filter(|(k, _)| k.dir == CT_REVERSE).count();
    assert_eq!((replies, ct.len()), (frames.len(), 2 * frames.len()));
    assert_eq!(dp.stat(outcome::EXTERNAL_NEW), frames.len() as u64);
    assert_eq!(
        dp.stat(outcome::EXTERNAL_ESTABLISHED) + stalled,
        frames.len() as u64
    );
}
