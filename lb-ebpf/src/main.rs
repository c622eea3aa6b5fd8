//! xlb datapath programs. Each entry point is one line: run the job, count the outcome.
// Built for real only for the BPF target; on the host (clippy, `cargo test --workspace`) it is
// an ordinary binary so that workspace-wide commands work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod atomic;
mod csum;
mod ct;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod route;
mod sched;
mod stats;
mod svc;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// Pod → service (ingress on the host side of a pod interface).
#[classifier]
pub fn xlb_from_pod(ctx: TcContext) -> i32 {
    let (verdict, outcome) = lb::from_pod(&ctx);
    stats::count(outcome);
    verdict
}

/// Service → pod (egress on the host side of a pod interface): reverse NAT.
#[classifier]
pub fn xlb_to_pod(ctx: TcContext) -> i32 {
    let (verdict, outcome) = lb::to_pod(&ctx);
    stats::count(outcome);
    verdict
}

/// From outside (XDP on the node's external interfaces): NodePort, externalIPs,
/// LoadBalancer IPs, and replies of SNATed flows.
#[xdp]
pub fn xlb_external(ctx: XdpContext) -> u32 {
    let (verdict, outcome) = xdp::external(&ctx);
    stats::count(outcome);
    verdict
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
