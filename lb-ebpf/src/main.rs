//! xlb datapath programs. Each entry point is one line: run the job, count the outcome.
//! Each is `#[inline(always)]`: the attribute macros wrap it in the section's function, and
//! without it LLVM kept the body a BPF subprogram, so every packet paid a call and its
//! return (about 8 ns on the bench's AMD EPYC, whose kernel returns through the Safe-RET
//! thunk: a third of the TC floor).
// Built for real only for the BPF target; on the host (clippy, `cargo test --workspace`) it is
// an ordinary binary so that workspace-wide commands work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod atomic;
mod clock;
mod cost;
mod csum;
mod ct;
mod family;
mod filter;
mod hop;
mod icmp;
mod maps;
mod nat;
mod parse;
mod pod;
mod read;
mod route;
mod sched;
mod skb;
mod sock;
mod stats;
mod svc;
mod verdict;
mod words;
mod xdp;
mod xdp6;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// Pod → service (ingress on the host side of a pod interface).
#[classifier]
#[inline(always)]
pub fn xlb_from_pod(ctx: TcContext) -> i32 {
    let (verdict, outcome) = pod::from_pod(&ctx);
    stats::count(outcome);
    verdict
}

/// Service → pod (egress on the host side of a pod interface): reverse NAT.
#[classifier]
#[inline(always)]
pub fn xlb_to_pod(ctx: TcContext) -> i32 {
    let (verdict, outcome) = pod::to_pod(&ctx);
    stats::count(outcome);
    verdict
}

/// Pod → service, IPv6 (tail-called by `xlb_from_pod`).
#[classifier]
#[inline(always)]
pub fn xlb_from_pod6(ctx: TcContext) -> i32 {
    let (verdict, outcome) = pod::from_pod6(&ctx);
    stats::count6(outcome);
    verdict
}

/// Pod → service, IPv6 packets of no tracked flow (tail-called by `xlb_from_pod6`).
#[classifier]
#[inline(always)]
pub fn xlb_from_pod6_untracked(ctx: TcContext) -> i32 {
    let (verdict, outcome) = pod::from_pod6_untracked(&ctx);
    stats::count6(outcome);
    verdict
}

/// A pod's ICMPv6 error about a flow, or the ICMPv6 port unreachable for a pod's packet to
/// a frontend without endpoints (tail-called by the two above).
#[classifier]
#[inline(always)]
pub fn xlb_from_pod6_rare(ctx: TcContext) -> i32 {
    let (verdict, outcome) = pod::from_pod6_rare(&ctx);
    stats::count6(outcome);
    verdict
}

/// Service → pod, IPv6 (tail-called by `xlb_to_pod`).
#[classifier]
#[inline(always)]
pub fn xlb_to_pod6(ctx: TcContext) -> i32 {
    let (verdict, outcome) = pod::to_pod6(&ctx);
    stats::count6(outcome);
    verdict
}

/// From outside (XDP on the node's external interfaces): NodePort, externalIPs,
/// LoadBalancer IPs, and replies of SNATed flows.
#[xdp]
#[inline(always)]
pub fn xlb_external(ctx: XdpContext) -> u32 {
    let (verdict, outcome) = xdp::external(&ctx);
    stats::count(outcome);
    verdict
}

/// IPv6 from outside (tail-called by `xlb_external`): tracked flows.
#[xdp]
#[inline(always)]
pub fn xlb_external6(ctx: XdpContext) -> u32 {
    let (verdict, outcome) = xdp6::external6(&ctx);
    stats::count6(outcome);
    verdict
}

/// IPv6 from outside, packets of no tracked flow (tail-called by `xlb_external6`).
#[xdp]
#[inline(always)]
pub fn xlb_external6_untracked(ctx: XdpContext) -> u32 {
    let (verdict, outcome) = xdp6::external6_untracked(&ctx);
    stats::count6(outcome);
    verdict
}

/// A node process connects (TCP, connected UDP) to a frontend.
#[cgroup_sock_addr(connect4)]
#[inline(always)]
pub fn xlb_sock_connect(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock::connect(&ctx))
}

/// A node process sends an unconnected UDP datagram to a frontend.
#[cgroup_sock_addr(sendmsg4)]
#[inline(always)]
pub fn xlb_sock_sendmsg(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock::connect(&ctx))
}

/// A node process receives a UDP datagram from a backend it sent to through a frontend.
#[cgroup_sock_addr(recvmsg4)]
#[inline(always)]
pub fn xlb_sock_recvmsg(ctx: SockAddrContext) -> i32 {
    sock_verdict((sock::ALLOW, sock::revnat(&ctx)))
}

/// A node process asks for its peer.
#[cgroup_sock_addr(getpeername4)]
#[inline(always)]
pub fn xlb_sock_getpeername(ctx: SockAddrContext) -> i32 {
    sock_verdict((sock::ALLOW, sock::revnat(&ctx)))
}

/// The IPv6 twins of the four hooks above (IPv4-mapped addresses balanced as IPv4).
/// Counted as IPv6: the hooks of IPv6 sockets (IPv4-mapped addresses included).
#[cgroup_sock_addr(connect6)]
#[inline(always)]
pub fn xlb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock_verdict6(sock::connect6(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
#[inline(always)]
pub fn xlb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_verdict6(sock::connect6(&ctx))
}

#[cgroup_sock_addr(recvmsg6)]
#[inline(always)]
pub fn xlb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_verdict6((sock::ALLOW, sock::revnat6(&ctx)))
}

#[cgroup_sock_addr(getpeername6)]
#[inline(always)]
pub fn xlb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_verdict6((sock::ALLOW, sock::revnat6(&ctx)))
}

#[inline(always)]
fn sock_verdict6((verdict, outcome): (i32, Option<lb_common::Outcome>)) -> i32 {
    if let Some(outcome) = outcome {
        stats::count6(outcome);
    }
    verdict
}

#[inline(always)]
fn sock_verdict((verdict, outcome): (i32, Option<lb_common::Outcome>)) -> i32 {
    if let Some(outcome) = outcome {
        stats::count(outcome);
    }
    verdict
}

/// Samples jiffies and the coarse clock for the agent's calibration of the datapath's
/// clock (`clock`). Run through BPF_PROG_TEST_RUN only, never attached.
#[xdp]
#[inline(always)]
pub fn xlb_clock_probe(ctx: XdpContext) -> u32 {
    clock::probe(&ctx)
}

/// The bench's floor: a TC program that does nothing, so every scenario can be reported
/// as a multiple of what running any TC program costs in the same run. Never attached.
#[classifier]
#[inline(always)]
pub fn xlb_floor_tc(_ctx: TcContext) -> i32 {
    verdict::TC_ACT_UNSPEC
}

/// The bench's XDP floor (see `xlb_floor_tc`).
#[xdp]
#[inline(always)]
pub fn xlb_floor_xdp(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// The bench's cost probes (`cost`): one datapath step each. Never attached.
/// A SERVICES lookup that misses.
#[classifier]
#[inline(always)]
pub fn xlb_cost_hash_miss(_ctx: TcContext) -> i32 {
    cost::hash_miss()
}

/// A conntrack lookup that misses.
#[classifier]
#[inline(always)]
pub fn xlb_cost_ct_miss(_ctx: TcContext) -> i32 {
    cost::ct_miss()
}

/// One conntrack insert.
#[classifier]
#[inline(always)]
pub fn xlb_cost_ct_insert(_ctx: TcContext) -> i32 {
    cost::ct_insert()
}

/// A reverse entry's claim in an array slot (compare-and-swap).
#[classifier]
#[inline(always)]
pub fn xlb_cost_claim(_ctx: TcContext) -> i32 {
    cost::claim()
}

/// The FIB lookup of a forwarded packet.
#[classifier]
#[inline(always)]
pub fn xlb_cost_fib(ctx: TcContext) -> i32 {
    cost::fib(&ctx)
}

/// A DNAT rewrite (parse included).
#[classifier]
#[inline(always)]
pub fn xlb_cost_rewrite(ctx: TcContext) -> i32 {
    cost::rewrite(&ctx)
}

/// Parsing alone.
#[classifier]
#[inline(always)]
pub fn xlb_cost_parse(ctx: TcContext) -> i32 {
    cost::parse_only(&ctx)
}

/// The clock read.
#[classifier]
#[inline(always)]
pub fn xlb_cost_clock(_ctx: TcContext) -> i32 {
    cost::clock()
}

/// An outcome count.
#[classifier]
#[inline(always)]
pub fn xlb_cost_count(_ctx: TcContext) -> i32 {
    cost::count()
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
