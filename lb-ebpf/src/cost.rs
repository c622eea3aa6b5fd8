//! The bench's cost probes: TC programs that each do one thing the datapath does per packet
//! (a hash lookup that misses, a conntrack insert, the FIB lookup, a NAT rewrite, the
//! clock, an outcome count) and nothing else, so the bench can say where a packet's
//! nanoseconds go (each probe minus the floor, in the same run). Never attached.
use aya_ebpf::{helpers::generated::bpf_get_prandom_u32, programs::TcContext};
use core::mem::MaybeUninit;
use lb_common::{CtKey, CtValue, ServiceKey, outcome};

use crate::{
    maps::{CONNTRACK, SERVICES},
    nat,
    parse::{self, IP_OFF, Ipv4Hdr, Packet},
    route, stats, svc,
    verdict::TC_ACT_UNSPEC,
};

/// A SERVICES lookup that misses (the key of no frontend).
#[inline(always)]
pub fn hash_miss() -> i32 {
    let key = ServiceKey {
        vip: 0xffff_fffe,
        port: 1,
        slot: 0,
        proto: 6,
        scope: 0,
        _pad: [0; 2],
    };
    // SAFETY: presence check only.
    let hit = unsafe { SERVICES.get(key) }.is_some();
    hit as i32 + TC_ACT_UNSPEC
}

/// A CT lookup that misses (the LRU's hash walk, 16-byte key).
#[inline(always)]
pub fn ct_miss() -> i32 {
    let key = ct_key(0xffff_fffe);
    // SAFETY: presence check only.
    let hit = unsafe { CONNTRACK.get(key) }.is_some();
    hit as i32 + TC_ACT_UNSPEC
}

/// One conntrack insert of a new key (a new flow makes two).
#[inline(always)]
pub fn ct_insert() -> i32 {
    // SAFETY: helper without side effects.
    let key = ct_key(unsafe { bpf_get_prandom_u32() });
    // SAFETY: all-zero is a valid value of this plain struct.
    let value: CtValue = unsafe { core::mem::zeroed() };
    let _ = CONNTRACK.insert(key, value, 0);
    TC_ACT_UNSPEC
}

/// The FIB lookup of the packet, filled as `route::forward` fills it.
#[inline(always)]
pub fn fib(ctx: &TcContext) -> i32 {
    let Ok(ip) = ctx.load::<Ipv4Hdr>(IP_OFF) else {
        return TC_ACT_UNSPEC;
    };
    let mut storage = MaybeUninit::uninit();
    // SAFETY: reading the skb's own ifindex field.
    let params = route::fib_params(&mut storage, &ip, unsafe { (*ctx.skb.skb).ifindex });
    let rc = route::fib_lookup(ctx.skb.skb.cast(), params);
    rc as i32 & 1 | TC_ACT_UNSPEC
}

/// The DNAT rewrite of the packet's destination (to itself: the same helper calls and
/// stores, the packet unchanged).
#[inline(always)]
pub fn rewrite(ctx: &TcContext) -> i32 {
    if let Ok(Packet::Flow(flow)) = parse::parse(ctx) {
        let _ = nat::rewrite_dst(ctx, &flow, flow.dst ^ 1, flow.dport ^ 1);
    }
    TC_ACT_UNSPEC
}

/// Parsing the packet (Ethernet, IPv4, TCP) and nothing else.
#[inline(always)]
pub fn parse_only(ctx: &TcContext) -> i32 {
    match parse::parse(ctx) {
        Ok(_) => TC_ACT_UNSPEC,
        Err(_) => TC_ACT_UNSPEC + 1,
    }
}

/// The clock read every tracked packet makes.
#[inline(always)]
pub fn clock() -> i32 {
    (svc::now_ns() & 1) as i32 + TC_ACT_UNSPEC
}

/// Counting one outcome (per-CPU array).
#[inline(always)]
pub fn count() -> i32 {
    stats::count(outcome::PASS_NOT_SERVICE);
    TC_ACT_UNSPEC
}

fn ct_key(src: u32) -> CtKey {
    CtKey {
        src,
        dst: 0x0a60_0001,
        sport: 1,
        dport: 80,
        proto: 6,
        dir: 0,
        _pad: [0; 2],
    }
}

/// A reverse entry's claim: a compare-and-swap on a random slot of `XLB_REPLY_CLAIMS` (its
/// stamp), as `ct` takes a free one.
#[inline(always)]
pub fn claim() -> i32 {
    // SAFETY: helper without side effects.
    let i = unsafe { bpf_get_prandom_u32() } & (lb_common::map_sizes::REPLY_CLAIMS - 1);
    if let Some(slot) = crate::maps::REPLY_CLAIMS.get_ptr_mut(i) {
        // SAFETY: a slot of the array, valid for this run.
        unsafe {
            let stamp = &raw mut (*slot).value.last_seen_ns;
            let _ = crate::atomic::compare_exchange(stamp, *stamp, *stamp + 1);
        }
    }
    TC_ACT_UNSPEC
}
