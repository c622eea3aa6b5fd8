//! Datapath tables: packet in + map state → verdict, packet out (exact bytes), counters.
//! Runs the real programs through BPF_PROG_TEST_RUN; needs root (see `privilege`).
use std::net::Ipv4Addr;

use aya::maps::Array;
use lb_common::{
    Backend, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FORWARD, CT_REVERSE, CtKey, HopValue,
    Outcome, SVC_FLAG_AFFINITY, SVC_FLAG_SOURCE_RANGES, map_names, outcome,
};
use xlb::datapath::{
    clock::{before, coarse_ns, monotonic_ns},
    load, pins,
    skb_access::SkbAccess,
};
use xlb_tests::datapath::*;
use xlb_tests::{
    packet::{
        ACK, FIN, Frame, PROTO_ICMP, PROTO_TCP, PROTO_UDP, SYN, checksum_errors, icmp_error,
        ipv4_frame, view,
    },
    privilege::require_privileges,
    race,
};

/// A ClusterIP's three backends (ids 1-3), all on port 8080.
const THREE_BACKENDS: [(u32, &str, u16); 3] = [
    (1, "10.244.1.2", 8080),
    (2, "10.244.2.3", 8080),
    (3, "10.244.3.4", 8080),
];

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn tcp_syn_established_and_reply() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_TCP, 80, &THREE_BACKENDS, 0);
    let syn = Frame::tcp(CLIENT, 40000, VIP, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_only_changed(&syn, &out, &[IP_CSUM, IP_DST, DPORT, TCP_CSUM]);
    let chosen = view(&out).dst;
    assert!(["10.244.1.2", "10.244.2.3", "10.244.3.4"].contains(&chosen.to_string().as_str()));
    assert_eq!(view(&out).dport, 8080);
    assert_eq!(dp.stat(outcome::DNAT_NEW), 1);

    let ct = dp.ct();
    assert_eq!(ct.len(), 2, "forward and reverse entries: {ct:?}");
    let fwd = ct
        .iter()
        .find(|(k, _)| k.dir == CT_FORWARD)
        .expect("forward");
    assert_eq!((fwd.0.src, fwd.0.dst), (ip(CLIENT), ip(VIP)));
    assert_eq!(fwd.1.nat_addr, u32::from_ne_bytes(chosen.octets()));
    let rev = ct
        .iter()
        .find(|(k, _)| k.dir == CT_REVERSE)
        .expect("reverse");
    assert_eq!(
        (rev.0.src, rev.0.dst, rev.1.nat_addr),
        (fwd.1.nat_addr, ip(CLIENT), ip(VIP))
    );

    // Every later packet of the flow sticks to the same backend.
    for _ in 0..20 {
        let ack = Frame::tcp(CLIENT, 40000, VIP, 80, ACK).build();
        let (verdict, out) = dp.run(Hook::FromPod, &ack);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(view(&out).dst, chosen);
        assert_only_changed(&ack, &out, &[IP_CSUM, IP_DST, DPORT, TCP_CSUM]);
    }
    assert_eq!(dp.stat(outcome::DNAT_ESTABLISHED), 20);

    // The backend's reply goes back to the client from the VIP; not a bare SYN, nor
    // anything while the backend's reply bit is clear (its source is then no backend's).
    let reply = Frame::tcp(&chosen.to_string(), 8080, CLIENT, 40000, SYN | ACK).build();
    let bare = Frame::tcp(&chosen.to_string(), 8080, CLIENT, 40000, SYN).build();
    assert_eq!(dp.run(Hook::ToPod, &bare), (PASS, bare.clone()));
    let backend = u32::from_ne_bytes(chosen.octets());
    set_reply_bit(&mut dp.ebpf, backend, 8080, PROTO_TCP, false);
    assert_eq!(dp.run(Hook::ToPod, &reply), (PASS, reply.clone()));
    set_reply_bit(&mut dp.ebpf, backend, 8080, PROTO_TCP, true);
    let (verdict, out) = dp.run(Hook::ToPod, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_only_changed(&reply, &out, &[IP_CSUM, IP_SRC, SPORT, TCP_CSUM]);
    assert_eq!(view(&out).src, VIP.parse::<Ipv4Addr>().expect("vip"));
    assert_eq!(view(&out).sport, 80);
    assert_eq!(dp.stat(outcome::REVNAT), 1);

    // A reply-looking packet from a backend to an unknown client port is not touched.
    let stray = Frame::tcp(&chosen.to_string(), 8080, CLIENT, 40001, ACK).build();
    assert_eq!(dp.run(Hook::ToPod, &stray), (PASS, stray.clone()));
}

/// The programs' clock is jiffies along the line the loader measured (`XLB_CLOCK`), which
/// must read CLOCK_MONOTONIC at tick resolution as the coarse clock helper did: each flow's
/// stamp lies between the coarse clock a tick before its first packet and the precise clock
/// after it, over a quarter second of flows. Without a line (the loader could not measure
/// one) the programs call the helper: the same stamps.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn the_datapath_clock_is_the_monotonic_clock_at_tick_resolution() {
    require_privileges();
    let mut dp = Datapath::new();
    let line = |dp: &Datapath| {
        let clock: Array<_, [u64; 2]> =
            Array::try_from(dp.ebpf.map(map_names::CLOCK).expect("map")).expect("map type");
        clock.get(&0, 0).expect("calibration")
    };
    let tick = xlb::datapath::clock::coarse_tick_ns();
    assert_eq!(line(&dp)[0], tick, "calibrated");
    dp.service(PROTO_UDP, 53, &[(1, "10.244.1.2", 5353)], 0);
    let stamps_match = |dp: &mut Datapath, ports: std::ops::Range<u16>| {
        for port in ports {
            let coarse = coarse_ns();
            assert!(coarse > 0, "the coarse clock reads");
            let earliest = coarse.saturating_sub(tick);
            let (verdict, _) = dp.run(Hook::FromPod, &Frame::udp(CLIENT, port, VIP, 53).build());
            let latest = monotonic_ns();
            assert_eq!(verdict, TC_ACT_OK);
            let stamp = dp
                .ct()
                .into_iter()
                .find(|(k, _)| k.dir == CT_FORWARD && k.sport == port.to_be())
                .expect("the flow's entry")
                .1
                .last_seen_ns;
            assert!(
                (earliest..=latest).contains(&stamp),
                "port {port}: stamp {stamp} outside [{earliest}, {latest}]"
            );
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    };
    stamps_match(&mut dp, 6000..6010);
    let mut clock: Array<_, [u64; 2]> =
        Array::try_from(dp.ebpf.map_mut(map_names::CLOCK).expect("map")).expect("map type");
    clock.set(0, [0, 0], 0).expect("line cleared");
    assert_eq!(line(&dp), [0, 0]);
    stamps_match(&mut dp, 6010..6014);
}

/// The TC programs update L4 checksums inline where the loader found the kfunc that shows
/// them `ip_summed` (test runs' skbs are CHECKSUM_NONE: the whole-checksum update), and
/// through the kernel's helpers where it did not (kernels before 6.2, no BTF). Both give
/// the same bytes: DNAT and reverse NAT of TCP, of UDP with and without a checksum.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn checksums_come_out_the_same_inline_and_through_the_helpers() {
    require_privileges();
    let inline = SkbAccess::probe();
    assert!(
        matches!(inline, SkbAccess::KernCtx { .. }),
        "this kernel (6.18, BTF) has the kfunc: {inline:?}"
    );
    let zero_udp = |mut frame: Frame| {
        frame.zero_udp_checksum = true;
        frame.build()
    };
    let steps = [
        (
            Hook::FromPod,
            Frame::tcp(CLIENT, 40000, VIP, 80, SYN).build(),
        ),
        (
            Hook::FromPod,
            Frame::tcp(CLIENT, 40000, VIP, 80, ACK).build(),
        ),
        (
            Hook::ToPod,
            Frame::tcp("10.244.1.2", 8080, CLIENT, 40000, SYN | ACK).build(),
        ),
        (Hook::FromPod, Frame::udp(CLIENT, 5000, VIP, 53).build()),
        (
            Hook::ToPod,
            Frame::udp("10.244.1.2", 5353, CLIENT, 5000).build(),
        ),
        (Hook::FromPod, zero_udp(Frame::udp(CLIENT, 5001, VIP, 53))),
        (
            Hook::ToPod,
            zero_udp(Frame::udp("10.244.1.2", 5353, CLIENT, 5001)),
        ),
    ];
    let outputs = |access| {
        let mut dp = Datapath::with_skb_access(access);
        dp.service(PROTO_TCP, 80, &[(1, "10.244.1.2", 8080)], 0);
        dp.service(PROTO_UDP, 53, &[(2, "10.244.1.2", 5353)], 0);
        let out: Vec<(i32, Vec<u8>)> = steps.iter().map(|(hook, f)| dp.run(*hook, f)).collect();
        assert_eq!(dp.stat(outcome::DNAT_NEW), 3, "{access:?}");
        assert_eq!(dp.stat(outcome::REVNAT), 3, "{access:?}");
        let info = load::program(&mut dp.ebpf, lb_common::program_names::TC_FROM_POD)
            .expect("program")
            .info()
            .expect("program info");
        (out, info.verified_instruction_count())
    };
    let ((inline, walked_inline), (helpers, walked_helpers)) =
        (outputs(inline), outputs(SkbAccess::Helpers));
    // Two programs: without the kfunc, the verifier skips the inline update as dead code.
    assert!(
        walked_helpers < walked_inline,
        "instructions verified: {walked_helpers:?} without the kfunc, {walked_inline:?} with"
    );
    for (((_, input), inline), helpers) in steps.iter().zip(&inline).zip(&helpers) {
        assert_eq!(inline.0, TC_ACT_OK);
        assert_ne!(&inline.1, input, "translated");
        assert_eq!(checksum_errors(&inline.1), Vec::<String>::new());
        assert_eq!(
            inline, helpers,
            "inline (left) and through the helpers (right)"
        );
    }
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn udp_with_and_without_checksum() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_UDP, 53, &[(1, "10.244.1.2", 5353)], 0);
    let zero_checksum = |mut frame: Frame| {
        frame.zero_udp_checksum = true;
        frame.build()
    };
    dp.run_steps(&[
        Step {
            name: "UDP with a checksum: DNAT, checksum updated",
            hook: Hook::FromPod,
            input: Frame::udp(CLIENT, 5000, VIP, 53).build(),
            verdict: TC_ACT_OK,
            out: Out::Rewritten {
                changed: vec![IP_CSUM, IP_DST, DPORT, UDP_CSUM],
                src: (CLIENT, 5000),
                dst: ("10.244.1.2", 5353),
                udp_checksum_zero: Some(false),
            },
        },
        Step {
            name: "UDP without a checksum: DNAT, checksum stays zero",
            hook: Hook::FromPod,
            input: zero_checksum(Frame::udp(CLIENT, 5001, VIP, 53)),
            verdict: TC_ACT_OK,
            out: Out::Rewritten {
                changed: vec![IP_CSUM, IP_DST, DPORT],
                src: (CLIENT, 5001),
                dst: ("10.244.1.2", 5353),
                udp_checksum_zero: Some(true),
            },
        },
        Step {
            name: "its reply without a checksum: reverse NAT, still zero",
            hook: Hook::ToPod,
            input: zero_checksum(Frame::udp("10.244.1.2", 5353, CLIENT, 5001)),
            verdict: TC_ACT_OK,
            out: Out::Rewritten {
                changed: vec![IP_CSUM, IP_SRC, SPORT],
                src: (VIP, 53),
                dst: (CLIENT, 5001),
                udp_checksum_zero: Some(true),
            },
        },
        Step {
            name: "a datagram from the backend to a client port without a flow: untouched",
            hook: Hook::ToPod,
            input: Frame::udp("10.244.1.2", 5353, CLIENT, 5999).build(),
            verdict: PASS,
            out: Out::Unchanged,
        },
    ]);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn non_service_traffic_passes_untouched() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_TCP, 80, &[(1, "10.244.1.2", 8080)], 0);
    let cases = [
        Frame::tcp(CLIENT, 1000, "10.244.1.2", 8080, SYN).build(), // pod IP directly
        Frame::tcp(CLIENT, 1000, VIP, 81, SYN).build(),            // other port
        Frame::udp(CLIENT, 1000, VIP, 80).build(),                 // other protocol
    ];
    for frame in &cases {
        assert_eq!(dp.run(Hook::FromPod, frame), (PASS, frame.clone()));
        assert_eq!(dp.run(Hook::ToPod, frame), (PASS, frame.clone()));
    }
    assert_eq!(dp.stat(outcome::PASS_NOT_SERVICE), 6);
    assert!(dp.ct().is_empty());
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn no_endpoints_rejects_with_icmp_port_unreachable() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_TCP, 80, &[], 0);
    let syn = Frame::tcp(CLIENT, 40000, VIP, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &syn);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "sent back out of the pod's interface"
    );
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    assert_eq!(&out[0..6], &syn[6..12], "to the client's MAC");
    assert_eq!(&out[6..12], &syn[0..6]);
    let v = view(&out);
    assert_eq!(
        (v.src.to_string(), v.dst.to_string(), v.proto),
        (VIP.into(), CLIENT.into(), PROTO_ICMP)
    );
    assert_eq!(
        (out[34], out[35]),
        (3, 3),
        "destination unreachable / port unreachable"
    );
    assert_eq!(
        &out[42..70],
        &syn[14..42],
        "quotes the IPv4 header and 8 bytes of TCP"
    );
    assert_eq!(checksum_errors(&out), Vec::<String>::new());
    assert_eq!(dp.stat(outcome::REJECT_NO_BACKEND), 1);
    assert!(dp.ct().is_empty());

    // UDP gets the same; a short datagram grows to the ICMP size.
    dp.service(PROTO_UDP, 53, &[], 0);
    let mut small = Frame::udp(CLIENT, 5000, VIP, 53);
    small.payload.clear();
    let frame = small.build();
    let (verdict, out) = dp.run(Hook::FromPod, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 70);
    assert_eq!(&out[42..70], &frame[14..42]);
    assert_eq!(checksum_errors(&out), Vec::<String>::new());
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn session_affinity_pins_expires_and_skips_deleted_backends() {
    require_privileges();
    let mut dp = Datapath::new();
    let backends = [
        (1, "10.244.1.1", 80),
        (2, "10.244.1.2", 80),
        (3, "10.244.1.3", 80),
        (4, "10.244.1.4", 80),
    ];
    dp.service(PROTO_TCP, 80, &backends, SVC_FLAG_AFFINITY);
    let first = view(
        &dp.run(
            Hook::FromPod,
            &Frame::tcp(CLIENT, 30000, VIP, 80, SYN).build(),
        )
        .1,
    )
    .dst;
    for port in 30001..30040 {
        let (_, out) = dp.run(
            Hook::FromPod,
            &Frame::tcp(CLIENT, port, VIP, 80, SYN).build(),
        );
        assert_eq!(
            view(&out).dst,
            first,
            "new flow {port} from the same client"
        );
    }
    assert_eq!(dp.stat(outcome::AFFINITY_HIT), 39);

    // Entry pointing at backend 9, which exists but is in no slot: a fresh entry is honoured...
    dp.service(
        PROTO_TCP,
        80,
        &[(1, "10.244.1.1", 80), (9, "10.244.9.9", 80)],
        SVC_FLAG_AFFINITY,
    );
    dp.set_affinity(CLIENT, 9, monotonic_ns());
    let (_, out) = dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 31000, VIP, 80, SYN).build(),
    );
    assert_eq!(view(&out).dst.to_string(), "10.244.9.9");
    // ...an expired one (timeout 10 s) is not: only slot backends 1 and 9 can be picked, so
    // make the slots hold backend 1 only.
    dp.service(PROTO_TCP, 80, &[(1, "10.244.1.1", 80)], SVC_FLAG_AFFINITY);
    dp.set_affinity(
        CLIENT,
        9,
        before(monotonic_ns(), std::time::Duration::from_secs(11)),
    );
    let (_, out) = dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 31001, VIP, 80, SYN).build(),
    );
    assert_eq!(
        view(&out).dst.to_string(),
        "10.244.1.1",
        "expired affinity ignored"
    );
    // A deleted backend is never chosen again, even with a fresh entry.
    dp.set_affinity(CLIENT, 9, monotonic_ns());
    dp.remove_backend(9);
    let (_, out) = dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 31002, VIP, 80, SYN).build(),
    );
    assert_eq!(
        view(&out).dst.to_string(),
        "10.244.1.1",
        "deleted backend skipped"
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn flow_to_deleted_backend_is_rebalanced() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_UDP, 53, &[(1, "10.244.1.1", 53)], 0);
    let frame = Frame::udp(CLIENT, 5000, VIP, 53).build();
    assert_eq!(
        view(&dp.run(Hook::FromPod, &frame).1).dst.to_string(),
        "10.244.1.1"
    );
    dp.remove_backend(1);
    dp.service(PROTO_UDP, 53, &[(2, "10.244.2.2", 53)], 0);
    let (verdict, out) = dp.run(Hook::FromPod, &frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(view(&out).dst.to_string(), "10.244.2.2");
    assert_eq!(dp.stat(outcome::DNAT_NEW), 2);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn icmp_errors_about_nated_flows_are_translated() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_UDP, 53, &[(1, "10.244.1.2", 5353)], 0);
    let request = Frame::udp(CLIENT, 5000, VIP, 53).build();
    let (_, dnated) = dp.run(Hook::FromPod, &request);

    // Backend answers with port unreachable about the DNATed datagram.
    let err = icmp_error("10.244.1.2", CLIENT, 3, 3, &dnated);
    let (verdict, out) = dp.run(Hook::ToPod, &err);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(view(&out).src.to_string(), VIP, "outer source is the VIP");
    assert_eq!(
        &out[42..42 + 28],
        &{
            // The client must see an error about exactly the packet it sent.
            let mut quoted = request[14..42].to_vec();
            // UDP checksum inside the quote is left as the backend saw it (not checked by receivers).
            quoted[26..28].copy_from_slice(&dnated[40..42]);
            quoted
        }[..]
    );
    assert_eq!(checksum_errors(&out), Vec::<String>::new());

    // A router on the way says "fragmentation needed": outer source stays the router's.
    let err = icmp_error("10.0.0.1", CLIENT, 3, 4, &dnated);
    let (verdict, out) = dp.run(Hook::ToPod, &err);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(view(&out).src.to_string(), "10.0.0.1");
    assert_eq!(
        &out[42 + 16..42 + 20],
        &request[14 + 16..14 + 20],
        "embedded dst is the VIP"
    );
    assert_eq!(checksum_errors(&out), Vec::<String>::new());

    // The client's own error about a reply from the VIP goes to the backend.
    let reply_seen = Frame::udp(VIP, 53, CLIENT, 5000).build();
    let err = icmp_error(CLIENT, VIP, 3, 3, &reply_seen);
    let (verdict, out) = dp.run(Hook::FromPod, &err);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(view(&out).dst.to_string(), "10.244.1.2");
    assert_eq!(&out[42 + 12..42 + 16], &[10, 244, 1, 2]);
    assert_eq!(&out[62..64], &5353u16.to_be_bytes());
    assert_eq!(checksum_errors(&out), Vec::<String>::new());
    assert_eq!(dp.stat(outcome::ICMP_ERROR_XLATE), 3);

    // An error about an unknown flow passes untouched.
    let other = Frame::udp(CLIENT, 5999, "10.244.1.2", 5353).build();
    let err = icmp_error("10.244.1.2", CLIENT, 3, 3, &other);
    assert_eq!(dp.run(Hook::ToPod, &err), (PASS, err.clone()));

    // A quote lying past the outer datagram's total length (in trailing frame bytes) is
    // malformed: passed untouched, never translated from fixed offsets.
    let mut beyond = icmp_error("10.244.1.2", CLIENT, 3, 3, &dnated);
    let total = u16::from_be_bytes([beyond[16], beyond[17]]) - 16;
    beyond[16..18].copy_from_slice(&total.to_be_bytes());
    beyond[24..26].copy_from_slice(&[0, 0]);
    let header = xlb_tests::packet::checksum(&beyond[14..34]);
    beyond[24..26].copy_from_slice(&header.to_be_bytes());
    let malformed = dp.stat(outcome::MALFORMED);
    assert_eq!(dp.run(Hook::ToPod, &beyond), (PASS, beyond.clone()));
    assert_eq!(dp.stat(outcome::MALFORMED), malformed + 1);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn odd_packets_pass_untouched_and_are_counted() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_TCP, 80, &[(1, "10.244.1.2", 8080)], 0);
    dp.service(PROTO_UDP, 80, &[(2, "10.244.1.2", 8080)], 0);
    let syn = Frame::tcp(CLIENT, 1, VIP, 80, SYN).build();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = syn.clone();
        f(&mut p);
        p
    };
    let ipv6 = {
        let mut p = syn[..14].to_vec();
        p[12..14].copy_from_slice(&[0x86, 0xdd]);
        p.extend_from_slice(&[0x60; 40]);
        p
    };
    let arp = {
        let mut p = syn[..14].to_vec();
        p[12..14].copy_from_slice(&[0x08, 0x06]);
        p.extend_from_slice(&[0; 28]);
        p
    };
    let gre = ipv4_frame(
        CLIENT.parse().expect("ip"),
        VIP.parse().expect("ip"),
        47,
        &[0; 24],
    );
    let options = {
        // IHL 6 with a NOP option word; lengths and checksum kept consistent.
        let mut p = syn[..34].to_vec();
        p[14] = 0x46;
        p.extend_from_slice(&[1, 1, 1, 1]);
        p.extend_from_slice(&syn[34..]);
        let tot = (p.len() - 14) as u16;
        p[16..18].copy_from_slice(&tot.to_be_bytes());
        p
    };
    let cases: Vec<(&str, Vec<u8>, Outcome)> = vec![
        // BPF_PROG_TEST_RUN refuses IPv4 frames shorter than an IPv4 header (EINVAL), so a
        // cut IPv4 header is covered by "ihl below 5" and the tot_len cases instead.
        (
            "tcp header cut",
            with(&|p| p.truncate(40)),
            outcome::MALFORMED,
        ),
        (
            "tot_len beyond frame",
            with(&|p| p[16..18].copy_from_slice(&500u16.to_be_bytes())),
            outcome::MALFORMED,
        ),
        (
            "tot_len too small for tcp",
            with(&|p| p[16..18].copy_from_slice(&24u16.to_be_bytes())),
            outcome::MALFORMED,
        ),
        ("ihl below 5", with(&|p| p[14] = 0x44), outcome::MALFORMED),
        ("not version 4", with(&|p| p[14] = 0x65), outcome::MALFORMED),
        ("first fragment", with(&|p| p[20] = 0x20), outcome::FRAGMENT),
        ("later fragment", with(&|p| p[21] = 0x10), outcome::FRAGMENT),
        ("ip options", options, outcome::IP_OPTIONS),
        ("ipv6 payload beyond the frame", ipv6, outcome::MALFORMED),
        ("arp", arp, outcome::NOT_IP),
        ("gre", gre, outcome::OTHER_PROTOCOL),
        (
            "tcp data offset below 5",
            with(&|p| p[46] = 0x40),
            outcome::MALFORMED,
        ),
        (
            "tcp data offset past the datagram",
            with(&|p| p[46] = 0xf0),
            outcome::MALFORMED,
        ),
        (
            "udp header cut",
            Frame::udp(CLIENT, 1, VIP, 80).build()[..38].to_vec(),
            outcome::MALFORMED,
        ),
    ];
    for (name, frame, expected) in cases {
        for hook in [Hook::FromPod, Hook::ToPod] {
            let before = dp.stat(expected);
            let (verdict, out) = dp.run(hook, &frame);
            assert_eq!(verdict, PASS, "{name}: verdict");
            assert_eq!(out, frame, "{name}: packet must not be mangled");
            assert_eq!(dp.stat(expected), before + 1, "{name}: counted");
        }
    }
    assert!(dp.ct().is_empty());
    assert_eq!(dp.stat(outcome::DROP_REWRITE_FAILED), 0);
}

/// Removes a test pin directory on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        pins::cleanup(&pins::PinLayout::new(&self.0));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn pinned_maps_are_reused_migrated_and_incompatible_pins_refused() {
    require_privileges();
    let dir = PinDir(format!("/sys/fs/bpf/xlb-test-layout-{}", std::process::id()).into());
    xlb::datapath::bpffs::ensure_pin_dir(&dir.0).expect("bpffs");
    let layout = pins::PinLayout::new(&dir.0);
    std::fs::create_dir_all(layout.maps_dir()).expect("maps dir");
    let bpftool = |args: &[&str]| xlb_tests::netns::run("bpftool", args).expect("bpftool");

    let backend = Backend {
        ip: ip("10.244.1.2"),
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
        service_id: 1,
    };
    let backend_at = |ebpf: &aya::Ebpf, id: u32| {
        let be: Array<_, Backend> =
            Array::try_from(ebpf.map(map_names::BACKENDS).expect("map")).expect("type");
        be.get(&id, 0).expect("slot")
    };
    {
        let mut ebpf = load::load(Some(&layout)).expect("first load pins maps");
        let mut be: Array<_, Backend> =
            Array::try_from(ebpf.map_mut(map_names::BACKENDS).expect("map")).expect("type");
        be.set(42, backend, 0).expect("write");
    }
    {
        // An agent restart: the same maps, with their content, are handed to the programs.
        let ebpf = load::load(Some(&layout)).expect("second load reuses pins");
        assert_eq!(backend_at(&ebpf, 42), backend, "entry survived");
    }

    // An upgrade from the hash-map layout of the backends: converted, ids kept (conntrack
    // entries name backends by id), the old pin gone afterwards.
    let path = layout.map(map_names::BACKENDS);
    let path_str = path.to_string_lossy().to_string();
    std::fs::remove_file(&path).expect("unpin");
    bpftool(&[
        "map",
        "create",
        &path_str,
        "type",
        "hash",
        "key",
        "4",
        "value",
        "12",
        "entries",
        "1048576",
        "name",
        "XLB_BACKENDS",
        "flags",
        "1",
    ]);
    // Backend 7 (10.244.1.2:80/TCP of service 1), as the old agent wrote it.
    bpftool(&[
        "map", "update", "pinned", &path_str, "key", "7", "0", "0", "0", "value", "10", "244", "1",
        "2", "0", "80", "6", "0", "1", "0", "0", "0",
    ]);
    {
        let ebpf = load::load(Some(&layout)).expect("old backend layout migrated");
        assert_eq!(backend_at(&ebpf, 7), backend, "backend 7 kept its id");
        assert_eq!(
            backend_at(&ebpf, 42).service_id,
            0,
            "nothing else in the array"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(layout.maps_dir())
        .expect("maps dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .filter(|name| {
            name.starts_with("XLB_BACKENDS") && name != "XLB_BACKENDS" && name != "XLB_BACKENDS6"
        })
        .collect();
    assert!(leftovers.is_empty(), "old pins left: {leftovers:?}");
    // The open-flow counts were an LRU map: replaced (the GC recounts them).
    let conns = layout.map(map_names::CONNECTIONS);
    let conns_str = conns.to_string_lossy().to_string();
    std::fs::remove_file(&conns).expect("unpin");
    bpftool(&[
        "map",
        "create",
        &conns_str,
        "type",
        "lru_hash",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "262144",
        "name",
        "XLB_CONNS",
    ]);
    load::load(Some(&layout)).expect("old open-flow counts replaced");
    let info = aya::maps::MapData::from_pin(&conns)
        .and_then(|m| m.info())
        .expect("pin");
    assert!(
        matches!(info.map_type(), Ok(aya::maps::MapType::Array)),
        "XLB_CONNS is an array now"
    );

    // A map left by an xlb with another layout is refused with a clear error.
    let path = layout.map(map_names::NODE_IPS);
    let path_str = path.to_string_lossy().to_string();
    let replace = |args: &[&str]| {
        std::fs::remove_file(&path).expect("unpin");
        let mut all = vec!["map", "create", &path_str, "type"];
        all.extend(args);
        all.extend(["name", "XLB_NODE_IPS"]);
        bpftool(&all);
    };
    replace(&["hash", "key", "4", "value", "8", "entries", "16"]);
    let text = load::load(Some(&layout))
        .expect_err("incompatible pin")
        .to_string();
    assert!(
        text.contains(&path_str) && text.contains("xlb cleanup"),
        "{text}"
    );
    assert!(
        text.contains("key 4 B, value 8 B, 16 entries")
            && text.contains("key 4 B, value 4 B, 256 entries"),
        "{text}"
    );

    // Same key and value sizes but another capacity (an older, smaller map) is refused too.
    replace(&["hash", "key", "4", "value", "4", "entries", "16"]);
    let text = load::load(Some(&layout))
        .expect_err("pin of another capacity")
        .to_string();
    assert!(text.contains("key 4 B, value 4 B, 16 entries"), "{text}");

    // Same sizes and capacity but another map type is refused too: the programs would index
    // it as the other type.
    replace(&["array", "key", "4", "value", "4", "entries", "256"]);
    let text = load::load(Some(&layout))
        .expect_err("pin of another type")
        .to_string();
    assert!(
        text.contains("is Array, key 4 B") && text.contains("expects Hash, key 4 B"),
        "{text}"
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn conntrack_tracks_tcp_state_and_rebalances_expired_flows() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_TCP, 80, &[(1, "10.244.1.1", 80)], 0);
    let flags_of = |dp: &Datapath, dir| {
        dp.ct()
            .iter()
            .find(|(k, _)| k.dir == dir)
            .map(|(_, v)| v.flags)
            .expect("entry")
    };
    dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 2000, VIP, 80, SYN).build(),
    );
    assert_eq!(flags_of(&dp, CT_FORWARD), 0, "handshake pending");
    dp.run(
        Hook::ToPod,
        &Frame::tcp("10.244.1.1", 80, CLIENT, 2000, SYN | ACK).build(),
    );
    assert_eq!(flags_of(&dp, CT_REVERSE), CT_FLAG_ESTABLISHED);
    dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 2000, VIP, 80, ACK).build(),
    );
    assert_eq!(flags_of(&dp, CT_FORWARD), CT_FLAG_ESTABLISHED);
    dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 2000, VIP, 80, ACK | FIN).build(),
    );
    assert_eq!(
        flags_of(&dp, CT_FORWARD),
        CT_FLAG_ESTABLISHED | CT_FLAG_CLOSING
    );

    // Closing TCP flows live 10 s: after 11 s the tuple is a new flow, balanced again
    // (backend 1 still exists but left the slots, so only a new selection can pick 2).
    dp.service(PROTO_TCP, 80, &[(2, "10.244.2.2", 80)], 0);
    dp.age_conntrack(11);
    let (_, out) = dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 2000, VIP, 80, SYN).build(),
    );
    assert_eq!(view(&out).dst.to_string(), "10.244.2.2");
    assert_eq!(dp.stat(outcome::DNAT_NEW), 2);

    // An established flow idle for an hour still sticks to its backend.
    dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 2000, VIP, 80, ACK).build(),
    );
    dp.service(PROTO_TCP, 80, &[(3, "10.244.3.3", 80)], 0);
    dp.age_conntrack(3600);
    let (_, out) = dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 2000, VIP, 80, ACK).build(),
    );
    assert_eq!(view(&out).dst.to_string(), "10.244.2.2");

    // UDP lives 60 s.
    dp.service(PROTO_UDP, 53, &[(4, "10.244.4.4", 53)], 0);
    dp.run(Hook::FromPod, &Frame::udp(CLIENT, 3000, VIP, 53).build());
    dp.service(PROTO_UDP, 53, &[(5, "10.244.5.5", 53)], 0);
    dp.age_conntrack(30);
    let (_, out) = dp.run(Hook::FromPod, &Frame::udp(CLIENT, 3000, VIP, 53).build());
    assert_eq!(
        view(&out).dst.to_string(),
        "10.244.4.4",
        "30 s idle: same flow"
    );
    dp.age_conntrack(61);
    let (_, out) = dp.run(Hook::FromPod, &Frame::udp(CLIENT, 3000, VIP, 53).build());
    assert_eq!(
        view(&out).dst.to_string(),
        "10.244.5.5",
        "61 s idle: new flow"
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn hairpin_pod_reaching_itself_is_snated_to_the_node() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.set_node(&["192.168.50.1"], (61_000, 61_010));
    dp.service(PROTO_TCP, 80, &[(1, CLIENT, 8080)], 0);
    let syn = Frame::tcp(CLIENT, 45_000, VIP, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &syn);
    // Forwarded by FIB lookup: redirected, or to the stack where the test has no route.
    assert!([TC_ACT_OK, TC_ACT_REDIRECT].contains(&verdict), "{verdict}");
    assert_eq!(checksum_errors(&out), Vec::<String>::new());
    let v = view(&out);
    assert_eq!((v.dst.to_string(), v.dport), (CLIENT.to_string(), 8080));
    assert_eq!(
        v.src.to_string(),
        "192.168.50.1",
        "source is the node, not the pod"
    );
    assert!((61_000..=61_010).contains(&v.sport));

    // The pod's reply to the node comes back as the service's answer to itself.
    let reply = Frame::tcp(CLIENT, 8080, "192.168.50.1", v.sport, SYN | ACK).build();
    let (verdict, back) = dp.run(Hook::FromPod, &reply);
    assert!([TC_ACT_OK, TC_ACT_REDIRECT].contains(&verdict), "{verdict}");
    assert_eq!(checksum_errors(&back), Vec::<String>::new());
    let b = view(&back);
    assert_eq!(
        (b.src.to_string(), b.sport, b.dst.to_string(), b.dport),
        (VIP.to_string(), 80, CLIENT.to_string(), 45_000)
    );
    // Another pod of the same service keeps its own address (no SNAT).
    let other = Frame::tcp("10.244.0.77", 45_001, VIP, 80, SYN).build();
    let (_, out) = dp.run(Hook::FromPod, &other);
    assert_eq!(view(&out).src.to_string(), "10.244.0.77");
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn an_evicted_reply_entry_comes_back_with_the_flows_next_window() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_TCP, 80, &[(1, "10.244.1.1", 80)], 0);
    dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 41000, VIP, 80, SYN).build(),
    );
    let reverse: Vec<CtKey> = dp
        .ct()
        .into_iter()
        .filter(|(k, _)| k.dir == CT_REVERSE)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(reverse.len(), 1, "one reply entry");
    // A few system calls: the last check below must stay inside one window.
    let drop_reverse = |dp: &mut Datapath| dp.remove_reverse(reverse[0]);
    let reverse_count = |dp: &Datapath| dp.ct().iter().filter(|(k, _)| k.dir == CT_REVERSE).count();
    // As if the LRU took the reply side alone (or another flow its expired claim). A busy
    // flow (a packet every 10 ms, never idle) puts it back within a window or two...
    drop_reverse(&mut dp);
    assert_eq!(reverse_count(&dp), 0, "evicted");
    for _ in 0..30 {
        dp.run(
            Hook::FromPod,
            &Frame::tcp(CLIENT, 41000, VIP, 80, ACK).build(),
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(reverse_count(&dp), 1, "reply entry restored while busy");
    // ...and so does one coming back after a pause.
    drop_reverse(&mut dp);
    dp.age_conntrack(1);
    dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 41000, VIP, 80, ACK).build(),
    );
    assert_eq!(reverse_count(&dp), 1, "reply entry restored");
    // Within one window the check is done once, not per packet. (Two packets microseconds
    // apart can still straddle a window boundary: a few tries make that irrelevant.)
    let throttled = (0..3).any(|_| {
        dp.run(
            Hook::FromPod,
            &Frame::tcp(CLIENT, 41000, VIP, 80, ACK).build(),
        );
        drop_reverse(&mut dp);
        dp.run(
            Hook::FromPod,
            &Frame::tcp(CLIENT, 41000, VIP, 80, ACK).build(),
        );
        reverse_count(&dp) == 0
    });
    assert!(throttled, "looked up again in the same window");
}

/// A flow's reply side is a claim in the claims array; where a live flow holds the slot it
/// maps to (the slot is shared by neighbouring client ports of another client), the reply
/// side goes into conntrack instead, and replies are translated either way.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_reply_entry_whose_claim_slot_is_taken_goes_to_conntrack() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.service(PROTO_TCP, 80, &[(1, "10.244.1.1", 8080)], 0);
    let backend = ip("10.244.1.1");
    let reverse = |client: &str, port: u16| CtKey {
        src: backend,
        dst: ip(client),
        sport: 8080u16.to_be(),
        dport: port.to_be(),
        proto: PROTO_TCP,
        dir: CT_REVERSE,
        _pad: [0; 2],
    };
    // The first flow's reply side: a claim, nothing in conntrack.
    dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 41_000, VIP, 80, SYN).build(),
    );
    let mut claims = dp.claims::<u32>(map_names::REPLY_CLAIMS);
    claims.retain(|(k, _)| k.dir == CT_REVERSE);
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(claims[0].0, reverse(CLIENT, 41_000));
    let in_conntrack = |dp: &Datapath| {
        let claimed = dp.claims::<u32>(map_names::REPLY_CLAIMS);
        dp.ct()
            .into_iter()
            .filter(|(k, _)| k.dir == CT_REVERSE && !claimed.iter().any(|(c, _)| c == k))
            .count()
    };
    assert_eq!(in_conntrack(&dp), 0);

    // Another live flow holds the slot the second flow's reply maps to.
    // (Its run starts elsewhere: the port that lands on the slot exists for about one
    // client address in four.)
    let second = reverse(CLIENT, 41_001);
    let target = lb_common::reply_claim_slot(&second);
    let squatter = (1..=255u8)
        .find_map(|last| {
            let mut k = reverse(&format!("10.244.9.{last}"), 0);
            let offset = target.wrapping_sub(lb_common::reply_claim_slot(&k))
                % lb_common::map_sizes::REPLY_CLAIMS;
            k.dport = u16::try_from(offset).ok().filter(|p| *p != 0)?.to_be();
            Some(k)
        })
        .expect("a client address whose run reaches the slot");
    assert_eq!(lb_common::reply_claim_slot(&squatter), target);
    let value = lb_common::CtValue {
        backend_id: 1,
        service_id: 1,
        nat_addr: ip(VIP),
        nat_port: 80u16.to_be(),
        last_seen_ns: monotonic_ns(),
        created_ns: monotonic_ns(),
        ..Default::default()
    };
    dp.put_claim(map_names::REPLY_CLAIMS, squatter, value);
    dp.run(
        Hook::FromPod,
        &Frame::tcp(CLIENT, 41_001, VIP, 80, SYN).build(),
    );
    assert_eq!(
        in_conntrack(&dp),
        1,
        "the second flow's reply side in conntrack"
    );
    let claims = dp.claims::<u32>(map_names::REPLY_CLAIMS);
    assert!(
        claims.iter().any(|(k, _)| *k == squatter),
        "the holder keeps its slot"
    );
    for port in [41_000, 41_001] {
        let reply = Frame::tcp("10.244.1.1", 8080, CLIENT, port, ACK).build();
        let (verdict, out) = dp.run(Hook::ToPod, &reply);
        assert_eq!(verdict, TC_ACT_OK, "{port}");
        let v = view(&out);
        assert_eq!(
            (v.src.to_string(), v.sport),
            (VIP.to_string(), 80),
            "{port}"
        );
    }
    assert_eq!(dp.stat(outcome::REVNAT), 2);
}

/// An IPv4 flow's forward entry is a claim too (slot by the client → frontend tuple); where
/// a live flow of another tuple holds that slot it goes into conntrack instead. Either way
/// the flow's next packets follow it, a retransmitted SYN included, and a flow recorded in
/// conntrack by an earlier agent is still followed.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_forward_entry_is_a_claim_and_goes_to_conntrack_where_its_slot_is_taken() {
    require_privileges();
    let mut dp = Datapath::new();
    let backends = THREE_BACKENDS;
    dp.service(PROTO_TCP, 80, &backends, 0);
    let forward = |client: &str, port: u16| CtKey {
        src: ip(client),
        dst: ip(VIP),
        sport: port.to_be(),
        dport: 80u16.to_be(),
        proto: PROTO_TCP,
        dir: CT_FORWARD,
        _pad: [0; 2],
    };
    let forward_in_conntrack = |dp: &Datapath| {
        let claimed = dp.claims::<u32>(map_names::FLOW_CLAIMS);
        dp.ct()
            .into_iter()
            .filter(|(k, _)| k.dir == CT_FORWARD && !claimed.iter().any(|(c, _)| c == k))
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    };
    let syn = Frame::tcp(CLIENT, 41_000, VIP, 80, SYN).build();
    let (_, first) = dp.run(Hook::FromPod, &syn);
    let claims = dp.claims::<u32>(map_names::FLOW_CLAIMS);
    assert!(
        claims.iter().any(|(k, _)| *k == forward(CLIENT, 41_000)),
        "the forward entry claimed: {claims:?}"
    );
    assert_eq!(forward_in_conntrack(&dp), []);
    // A retransmitted SYN finds the claim and follows it.
    assert_eq!(dp.run(Hook::FromPod, &syn), (TC_ACT_OK, first.clone()));

    // Another live flow holds the slot the second flow's forward entry maps to.
    let second = forward(CLIENT, 41_001);
    let target = lb_common::reply_claim_slot(&second);
    let squatter = (1..=255u8)
        .find_map(|last| {
            let mut k = forward(&format!("10.244.9.{last}"), 41_001);
            k.dport = 0;
            let offset = target.wrapping_sub(lb_common::reply_claim_slot(&k))
                % lb_common::map_sizes::REPLY_CLAIMS;
            k.dport = u16::try_from(offset).ok().filter(|p| *p != 0)?.to_be();
            Some(k)
        })
        .expect("a client address whose run reaches the slot");
    assert_eq!(lb_common::reply_claim_slot(&squatter), target);
    let value = lb_common::CtValue {
        backend_id: 1,
        service_id: 1,
        nat_addr: ip("10.244.1.2"),
        nat_port: 8080u16.to_be(),
        last_seen_ns: monotonic_ns(),
        created_ns: monotonic_ns(),
        ..Default::default()
    };
    dp.put_claim(map_names::FLOW_CLAIMS, squatter, value);
    let syn2 = Frame::tcp(CLIENT, 41_001, VIP, 80, SYN).build();
    let (_, first2) = dp.run(Hook::FromPod, &syn2);
    assert_eq!(forward_in_conntrack(&dp), [second]);
    assert!(
        dp.claims::<u32>(map_names::FLOW_CLAIMS)
            .iter()
            .any(|(k, _)| *k == squatter),
        "the holder keeps its slot"
    );
    assert_eq!(dp.run(Hook::FromPod, &syn2), (TC_ACT_OK, first2.clone()));

    // As an earlier agent left a flow: its forward entry in conntrack only.
    let third = Frame::tcp(CLIENT, 41_002, VIP, 80, SYN).build();
    let (_, first3) = dp.run(Hook::FromPod, &third);
    let (key, entry) = dp
        .claims::<u32>(map_names::FLOW_CLAIMS)
        .into_iter()
        .find(|(k, _)| *k == forward(CLIENT, 41_002))
        .expect("third flow claimed");
    dp.free_claim(map_names::FLOW_CLAIMS, key);
    dp.put_ct(key, entry);

    // Each flow's next packet goes where its SYN went, as an established packet.
    let before = dp.stat(outcome::DNAT_ESTABLISHED);
    for (port, syn_out) in [(41_000, &first), (41_001, &first2), (41_002, &first3)] {
        let ack = Frame::tcp(CLIENT, port, VIP, 80, ACK).build();
        let (verdict, out) = dp.run(Hook::FromPod, &ack);
        assert_eq!(verdict, TC_ACT_OK, "{port}");
        let (a, b) = (view(&out), view(syn_out));
        assert_eq!((a.dst, a.dport), (b.dst, b.dport), "{port}");
    }
    assert_eq!(dp.stat(outcome::DNAT_ESTABLISHED), before + 3);
    assert_eq!(dp.stat(outcome::DNAT_NEW), 3);
}

/// A client port used again for another Service with the same backend (two Services
/// selecting one pod; the first connection closing or closed): both flows' replies share
/// one reverse tuple, and the newer flow's translation is the one replies get, as a
/// conntrack entry replaced by the newer flow gave it before reply claims.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_reply_tuple_used_again_by_a_newer_flow_translates_to_that_flow() {
    require_privileges();
    let mut dp = Datapath::new();
    const OTHER_VIP: &str = "10.96.0.20";
    dp.service(PROTO_TCP, 80, &[(1, "10.244.1.1", 8080)], 0);
    dp.frontend(
        ip(OTHER_VIP),
        lb_common::SCOPE_INTERNAL,
        PROTO_TCP,
        80,
        &[(1, "10.244.1.1", 8080)],
        0,
    );
    for vip in [VIP, OTHER_VIP] {
        let syn = Frame::tcp(CLIENT, 41_000, vip, 80, SYN).build();
        let (verdict, out) = dp.run(Hook::FromPod, &syn);
        assert_ne!(verdict, TC_ACT_SHOT, "{vip}");
        assert_eq!(view(&out).dst.to_string(), "10.244.1.1", "{vip}");
        let reply = Frame::tcp("10.244.1.1", 8080, CLIENT, 41_000, SYN | ACK).build();
        let (_, out) = dp.run(Hook::ToPod, &reply);
        let v = view(&out);
        assert_eq!(
            (v.src.to_string(), v.sport),
            (vip.to_string(), 80),
            "the reply to the newest flow, to {vip}"
        );
        assert_eq!(checksum_errors(&out), Vec::<String>::new());
    }
}

/// A Service port with 5,000 endpoints (Kubernetes' scalability threshold): one frontend
/// holds them all, and new flows reach slots past the old 4,096 limit.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_frontend_with_five_thousand_backends() {
    require_privileges();
    let mut dp = Datapath::new();
    let addresses: Vec<String> = (0..5000u32)
        .map(|i| Ipv4Addr::from(0x0af4_0000 + i).to_string())
        .collect();
    let backends: Vec<(u32, &str, u16)> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u32 + 1, a.as_str(), 8080))
        .collect();
    dp.service(PROTO_TCP, 80, &backends, 0);
    let mut past_old_limit = 0;
    for port in 0..200u16 {
        let syn = Frame::tcp(CLIENT, 20_000 + port, VIP, 80, SYN).build();
        let (verdict, out) = dp.run(Hook::FromPod, &syn);
        assert_eq!(verdict, TC_ACT_OK);
        let index = u32::from(view(&out).dst) - 0x0af4_0000;
        assert!(index < 5000, "a programmed backend");
        past_old_limit += usize::from(index >= 4096);
    }
    assert!(past_old_limit > 0, "no new flow reached a slot past 4,096");
}

/// The node's conntrack lifetimes (kube-proxy's conntrack settings) replace the defaults.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn conntrack_lifetimes_follow_the_node_setting() {
    require_privileges();
    let mut dp = Datapath::new();
    dp.set_ct_timeouts(lb_common::CtTimeouts {
        other_s: 5,
        ..Default::default()
    });
    dp.service(PROTO_UDP, 53, &[(1, "10.244.1.1", 53)], 0);
    dp.run(Hook::FromPod, &Frame::udp(CLIENT, 3000, VIP, 53).build());
    dp.service(PROTO_UDP, 53, &[(2, "10.244.2.2", 53)], 0);
    dp.age_conntrack(4);
    let (_, out) = dp.run(Hook::FromPod, &Frame::udp(CLIENT, 3000, VIP, 53).build());
    assert_eq!(
        view(&out).dst.to_string(),
        "10.244.1.1",
        "4 s idle: same flow"
    );
    dp.age_conntrack(6);
    let (_, out) = dp.run(Hook::FromPod, &Frame::udp(CLIENT, 3000, VIP, 53).build());
    assert_eq!(
        view(&out).dst.to_string(),
        "10.244.2.2",
        "6 s idle with a 5 s UDP lifetime (default 60 s): a new flow"
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn forwarded_packets_take_the_cached_next_hop_until_routing_changes() {
    require_privileges();
    let mut dp = Datapath::new();
    let gateway = [0x02, 0, 0, 0, 3, 3];
    let egress = dp.route_out("10.244.0.0/16", "02:00:00:00:03:03");
    dp.service(PROTO_TCP, 80, &[(1, "10.244.1.2", 8080)], 0);
    let syn = Frame::tcp(CLIENT, 40000, VIP, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed out of dp0");
    assert_eq!(&out[0..6], &gateway, "to the gateway's MAC");
    assert_eq!(out[22], syn[22] - 1, "TTL decremented");
    assert_eq!(checksum_errors(&out), Vec::<String>::new());
    assert!(
        dp.next_hops().is_empty(),
        "a flow's first packet caches nothing"
    );
    let ack = Frame::tcp(CLIENT, 40000, VIP, 80, ACK).build();
    let (verdict, out) = dp.run(Hook::FromPod, &ack);
    assert_eq!((verdict, &out[0..6]), (TC_ACT_REDIRECT, &gateway[..]));
    let hops = dp.next_hops();
    assert_eq!(hops.len(), 1, "its next packet does: {hops:?}");
    let (key, hop) = hops[0];
    assert_eq!((key.dst, key.src), (ip("10.244.1.2"), ip(CLIENT)));
    assert_eq!((hop.ifindex, &hop.macs[..6]), (egress, &gateway[..]));
    assert_eq!(
        hop.max_len as usize,
        ack.len() - 14,
        "the looked-up packet's length"
    );

    // The cached entry is what the flow's next packets take (other MACs in it show it).
    let marked = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
    let mut planted = hop;
    planted.macs[..6].copy_from_slice(&marked);
    dp.put_next_hop(key, planted);
    let (verdict, out) = dp.run(Hook::FromPod, &ack);
    assert_eq!((verdict, &out[0..6]), (TC_ACT_REDIRECT, &marked[..]));
    assert_eq!(checksum_errors(&out), Vec::<String>::new());

    // A longer packet than any the lookup passed is looked up again (the MTU check).
    let mut long = Frame::tcp(CLIENT, 40000, VIP, 80, ACK);
    long.payload = vec![7; 200];
    let (_, out) = dp.run(Hook::FromPod, &long.build());
    assert_eq!(&out[0..6], &gateway, "looked up again");
    // (The cache is per CPU: the slot of the CPU that ran the packet holds the new bound.)
    let bounds: Vec<u16> = dp.next_hops().iter().map(|(_, h)| h.max_len).collect();
    assert!(
        bounds.contains(&(20 + 20 + 200)),
        "the bound rose: {bounds:?}"
    );

    // A routing change (the agent raises the generation) makes every entry stale.
    dp.put_next_hop(
        key,
        HopValue {
            max_len: 1500,
            ..planted
        },
    );
    dp.raise_route_generation();
    let (_, out) = dp.run(Hook::FromPod, &ack);
    assert_eq!(&out[0..6], &gateway, "stale after a routing change");
    assert!(dp.next_hops().iter().any(|(_, h)| h.generation == 1));
    // So does age (a second), for the time no agent watches.
    dp.put_next_hop(
        key,
        HopValue {
            stamp_ns: before(monotonic_ns(), std::time::Duration::from_secs(2)),
            generation: 1,
            ..planted
        },
    );
    let (_, out) = dp.run(Hook::FromPod, &ack);
    assert_eq!(&out[0..6], &gateway, "stale after a second");
}

/// Where the agent found that lookups cannot depend on the source address
/// (`route_policy`), the cache keys entries by destination and ingress interface: a flow's
/// first packet stores one, and another client's new flow to that backend takes it.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn source_free_routing_shares_a_next_hop_between_clients() {
    require_privileges();
    let mut dp = Datapath::new();
    let gateway = [0x02, 0, 0, 0, 3, 3];
    dp.route_out("10.244.0.0/16", "02:00:00:00:03:03");
    dp.service(PROTO_TCP, 80, &[(1, "10.244.1.2", 8080)], 0);
    dp.set_route_policy(lb_common::route_gen::SOURCE_FREE_V4);
    let syn = Frame::tcp(CLIENT, 40000, VIP, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &syn);
    assert_eq!((verdict, &out[0..6]), (TC_ACT_REDIRECT, &gateway[..]));
    let hops = dp.next_hops();
    assert_eq!(
        hops.len(),
        1,
        "a first packet stores a source-free entry: {hops:?}"
    );
    let (key, hop) = hops[0];
    assert_eq!((key.dst, key.src), (ip("10.244.1.2"), 0));

    let marked = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
    let mut planted = hop;
    planted.macs[..6].copy_from_slice(&marked);
    dp.put_next_hop(key, planted);
    let other = Frame::tcp("10.244.0.9", 41000, VIP, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &other);
    assert_eq!(
        (verdict, &out[0..6]),
        (TC_ACT_REDIRECT, &marked[..]),
        "another client's flow takes the entry"
    );
    assert_eq!(checksum_errors(&out), Vec::<String>::new());

    // Policy routing appears (the watcher clears the flag and raises the generation): keys
    // carry the source again, and a first packet stores nothing.
    dp.set_route_policy(0);
    let third = Frame::tcp("10.244.0.11", 42000, VIP, 80, SYN).build();
    let (verdict, out) = dp.run(Hook::FromPod, &third);
    assert_eq!((verdict, &out[0..6]), (TC_ACT_REDIRECT, &gateway[..]));
    assert!(
        dp.next_hops().iter().all(|(k, _)| k.src == 0),
        "nothing stored for the sourced key: {:?}",
        dp.next_hops()
    );
}

/// The agent's policy check (`route_policy`) against a real namespace's rules and routes:
/// source-free with the kernel's defaults, not with a source rule, a multipath route, a
/// nexthop object or an IPv6 source-specific route, and source-free again once they left.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn the_routing_policy_check_reads_rules_and_routes_of_both_families() {
    use xlb::datapath::route_policy::{self, SourceFree};
    require_privileges();
    let ns = xlb_tests::netns::Netns::new(&xlb_tests::netns::unique_tag(), "rp").expect("netns");
    let source_free = || {
        ns.enter(route_policy::source_free)
            .expect("in the namespace")
    };
    let both = SourceFree { v4: true, v6: true };
    assert_eq!(source_free().expect("dump"), both, "a fresh namespace");
    ns.ip(&["link", "add", "rp0", "type", "veth", "peer", "name", "rp1"])
        .expect("veth");
    for link in ["rp0", "rp1"] {
        ns.ip(&["link", "set", link, "up"]).expect("up");
    }
    ns.ip(&["addr", "add", "10.5.0.10/24", "dev", "rp0"])
        .expect("address");
    assert_eq!(source_free().expect("dump"), both, "plain routes");
    let cases: [(&[&str], &[&str], SourceFree); 4] = [
        (
            &["-4", "rule", "add", "from", "10.9.0.0/16", "table", "100"],
            &["-4", "rule", "del", "from", "10.9.0.0/16", "table", "100"],
            SourceFree {
                v4: false,
                v6: true,
            },
        ),
        (
            &[
                "-4",
                "route",
                "add",
                "10.6.0.0/16",
                "nexthop",
                "via",
                "10.5.0.1",
                "nexthop",
                "via",
                "10.5.0.2",
            ],
            &["-4", "route", "del", "10.6.0.0/16"],
            SourceFree {
                v4: false,
                v6: true,
            },
        ),
        (
            &[
                "-6",
                "route",
                "add",
                "fd00:5::/64",
                "from",
                "fd00:4::/64",
                "dev",
                "rp0",
            ],
            &[
                "-6",
                "route",
                "del",
                "fd00:5::/64",
                "from",
                "fd00:4::/64",
                "dev",
                "rp0",
            ],
            SourceFree {
                v4: true,
                v6: false,
            },
        ),
        (
            &["-6", "rule", "add", "fwmark", "7", "table", "100"],
            &["-6", "rule", "del", "fwmark", "7", "table", "100"],
            SourceFree {
                v4: true,
                v6: false,
            },
        ),
    ];
    for (add, del, expected) in cases {
        ns.ip(add).expect("routing change");
        assert_eq!(
            source_free().expect("dump"),
            expected,
            "after `ip {}`",
            add.join(" ")
        );
        ns.ip(del).expect("undo");
        assert_eq!(
            source_free().expect("dump"),
            both,
            "after `ip {}`",
            del.join(" ")
        );
    }
    ns.ip(&["nexthop", "add", "id", "7", "via", "10.5.0.1", "dev", "rp0"])
        .expect("nexthop");
    ns.ip(&["route", "add", "10.4.0.0/16", "nhid", "7"])
        .expect("route");
    assert_eq!(
        source_free().expect("dump"),
        SourceFree {
            v4: false,
            v6: true
        },
        "a route through a nexthop object"
    );
}

/// The agent's routing watcher (`route_watch`) hears every kind of change a cached next hop
/// may depend on: routes, rules and neighbours of both families, and nexthop objects (a
/// route using one is not announced again when the object changes).
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn the_routing_watcher_hears_rules_routes_and_nexthop_objects_of_both_families() {
    use std::os::fd::AsRawFd as _;
    require_privileges();
    let ns = xlb_tests::netns::Netns::new(&xlb_tests::netns::unique_tag(), "rw").expect("netns");
    // A socket hears its own namespace's announcements, wherever it is read.
    let socket = ns
        .enter(xlb::datapath::route_watch::subscribe)
        .expect("in the namespace")
        .expect("subscribe");
    ns.ip(&["link", "add", "rw0", "type", "veth", "peer", "name", "rw1"])
        .expect("veth");
    ns.ip(&["link", "set", "rw0", "up"]).expect("up");
    let changes: [&[&str]; 6] = [
        &["-4", "rule", "add", "from", "10.9.0.0/16", "table", "100"],
        &["-6", "rule", "add", "from", "fd00:9::/64", "table", "100"],
        &["-4", "route", "add", "blackhole", "10.8.0.0/16"],
        &["-6", "route", "add", "blackhole", "fd00:8::/64"],
        &[
            "-4",
            "neigh",
            "add",
            "10.7.0.1",
            "lladdr",
            "02:00:00:00:07:01",
            "dev",
            "rw0",
        ],
        &["nexthop", "add", "id", "7", "blackhole"],
    ];
    let mut buf = vec![0u8; 64 * 1024];
    for change in changes {
        // What earlier changes announced is read first (MSG_DONTWAIT: until none is left).
        // SAFETY: `buf` is writable for its length.
        while unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
        ns.ip(change).expect("routing change");
        let mut poll = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, as passed.
        let ready = unsafe { libc::poll(&mut poll, 1, 2_000) };
        assert_eq!(
            ready,
            1,
            "no announcement within 2 s of `ip {}`",
            change.join(" ")
        );
    }
}

/// A packet that opens a connection is balanced before any lookup (`svc::opens`), its
/// forward entry written only if the tuple has none: a retransmitted SYN still follows the
/// flow it belongs to, whatever changed since (as kube-proxy's rules see only a
/// connection's first packet), and writes nothing new.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_retransmitted_syn_keeps_its_flow() {
    require_privileges();
    let mut dp = Datapath::new();
    let backends = THREE_BACKENDS;
    dp.service(PROTO_TCP, 80, &backends, 0);
    let syn = Frame::tcp(CLIENT, 40000, VIP, 80, SYN).build();
    let (_, first) = dp.run(Hook::FromPod, &syn);
    for _ in 0..30 {
        assert_eq!(dp.run(Hook::FromPod, &syn), (TC_ACT_OK, first.clone()));
    }
    assert_eq!(dp.stat(outcome::DNAT_NEW), 1);
    assert_eq!(dp.stat(outcome::DNAT_ESTABLISHED), 30);
    assert_eq!(dp.ct().len(), 2, "one flow: {:?}", dp.ct());

    // The client's address leaves the service's source ranges: the tracked SYN goes on,
    // a new connection from it is dropped.
    dp.service(PROTO_TCP, 80, &backends, SVC_FLAG_SOURCE_RANGES);
    dp.allow_source("10.99.0.0/16");
    assert_eq!(dp.run(Hook::FromPod, &syn), (TC_ACT_OK, first.clone()));
    let other = Frame::tcp(CLIENT, 40001, VIP, 80, SYN).build();
    assert_eq!(dp.run(Hook::FromPod, &other).0, TC_ACT_SHOT);
    assert_eq!(dp.stat(outcome::DROP_SOURCE_RANGE), 1);
    assert_eq!(dp.stat(outcome::DNAT_ESTABLISHED), 31);
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn first_packets_of_one_udp_flow_on_two_cpus_take_one_backend() {
    require_privileges();
    let mut dp = Datapath::new();
    let backends = race::Backends::ten(|i| format!("10.244.{i}.2"), 5353);
    dp.service(PROTO_UDP, 53, &backends.entries(), 0);
    // One new flow per round: both CPUs miss its entry in the same instant, and both must
    // send it to the backend one of them recorded.
    let frames: Vec<Vec<u8>> = (0..race::FLOWS)
        .map(|i| Frame::udp(CLIENT, 10_000 + i, VIP, 53).build())
        .collect();
    let Some(stalled) =
        race::assert_one_destination_each(&mut dp, race::Hook::FromPod, &frames, |out| {
            let v = view(out);
            (v.dst, v.dport)
        })
    else {
        return;
    };
    // Each flow recorded once (its forward and reply entries), its other packet followed.
    let ct = dp.ct();
    let forward = ct.iter().filter(|(k, _)| k.dir == CT_FORWARD).count();
    assert_eq!((forward, ct.len()), (frames.len(), 2 * frames.len()));
    assert_eq!(dp.stat(outcome::DNAT_NEW), frames.len() as u64);
    assert_eq!(
        dp.stat(outcome::DNAT_ESTABLISHED) + stalled,
        frames.len() as u64
    );
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn a_new_clients_first_packets_on_two_cpus_pin_it_to_the_backend_its_flow_took() {
    require_privileges();
    let mut dp = Datapath::new();
    let backends = race::Backends::ten(|i| format!("10.244.{i}.2"), 5353);
    dp.service(PROTO_UDP, 53, &backends.entries(), SVC_FLAG_AFFINITY);
    // One new client per flow: its affinity entry is written by the packet that records
    // the flow, so the client's next connections go where this one went.
    let client = |i: u16| format!("10.245.{}.{}", i / 250, i % 250 + 1);
    let frames: Vec<Vec<u8>> = (0..race::FLOWS)
        .map(|i| Frame::udp(&client(i), 10_000, VIP, 53).build())
        .collect();
    // A first packet dropped as stalled (counted; checked there) records nothing.
    let raced = race::assert_one_destination_each(&mut dp, race::Hook::FromPod, &frames, |out| {
        let v = view(out);
        (v.dst, v.dport)
    });
    if raced.is_none() {
        return;
    }
    let flows: std::collections::BTreeMap<u32, u32> = dp
        .ct()
        .into_iter()
        .filter(|(k, _)| k.dir == CT_FORWARD)
        .map(|(k, v)| (k.src, v.backend_id))
        .collect();
    let pinned = dp.affinities();
    let apart: Vec<_> = flows
        .iter()
        .filter(|(client, backend)| pinned.get(client) != Some(backend))
        .map(|(client, backend)| {
            (
                Ipv4Addr::from(u32::from_be(*client)),
                *backend,
                pinned.get(client),
            )
        })
        .collect();
    assert_eq!(flows.len(), frames.len());
    assert_eq!(apart, vec![], "clients pinned elsewhere than their flow");
}
