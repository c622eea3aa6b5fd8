//! Forwarding a translated packet from TC straight to its egress interface (FIB lookup and
//! redirect), as a router would, instead of handing it back to the stack: a reply whose
//! source became a node address would be dropped there as a martian.
use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use core::mem::MaybeUninit;

use lb_common::{HOP_FLAG_POD, HopValue, Outcome, outcome};

use crate::{
    csum::{TTL_ONE, replace2},
    hop::{self, Cached},
    maps::POD_IFACES,
    parse::{
        Frame, IP_CSUM_OFF, IP_HLEN, IP_OFF, IP6_HLEN, IP6_HOP_LIMIT_OFF, Ipv4Hdr, Ipv6Hdr,
        headers_in_place,
    },
    verdict::{TC_ACT_OK, TC_ACT_REDIRECT},
    words,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const TTL_OFF: usize = 8;

/// FIB lookup parameters for `ip`'s packet arriving on `ifindex` (shared with XDP), built in
/// `storage` (no copy: the stack is tight).
#[inline(always)]
pub fn fib_params<'a>(
    storage: &'a mut MaybeUninit<FibParams>,
    ip: &Ipv4Hdr,
    ifindex: u32,
) -> &'a mut FibParams {
    let fib = zeroed(storage);
    fib.family = AF_INET;
    fib.l4_protocol = ip.proto;
    fib.__bindgen_anon_1.tot_len = u16::from_be(ip.tot_len);
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = ip.src;
    fib.__bindgen_anon_4.ipv4_dst = ip.dst;
    fib.ifindex = ifindex;
    fib
}

/// The same for an IPv6 packet (`l4_protocol` is the first next-header: the lookup only
/// uses it for policy routing on ports, which extension headers hide anyway).
#[inline(always)]
pub fn fib_params6<'a>(
    storage: &'a mut MaybeUninit<FibParams>,
    ip: &Ipv6Hdr,
    ifindex: u32,
) -> &'a mut FibParams {
    let fib = zeroed(storage);
    fib.family = AF_INET6;
    fib.l4_protocol = ip.nexthdr;
    fib.__bindgen_anon_1.tot_len = IP6_HLEN as u16 + u16::from_be(ip.payload_len);
    // Traffic class and flow label: the first word without the version nibble.
    fib.__bindgen_anon_2.flowinfo = ip.vtc_flow & 0x0fff_ffffu32.to_be();
    fib.__bindgen_anon_3.ipv6_src = ip.src;
    fib.__bindgen_anon_4.ipv6_dst = ip.dst;
    fib.ifindex = ifindex;
    fib
}

/// `bpf_fib_lookup` on `params` for the packet of `ctx` (an skb or an xdp_md), flags 0:
/// the lookup as a router's forwarding path makes it.
#[inline(always)]
pub fn fib_lookup(ctx: *mut core::ffi::c_void, params: &mut FibParams) -> i64 {
    // SAFETY: the helper reads and writes `params` only.
    unsafe {
        bpf_fib_lookup(
            ctx.cast(),
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    }
}

#[inline(always)]
fn zeroed(storage: &mut MaybeUninit<FibParams>) -> &mut FibParams {
    // Zeroed word by word: `mem::zeroed` becomes a call to a byte-at-a-time memset on
    // this target (64 iterations on every forwarded packet).
    const WORDS: usize = core::mem::size_of::<FibParams>() / 8;
    const _: () = assert!(core::mem::size_of::<FibParams>().is_multiple_of(8));
    let words = storage.as_mut_ptr().cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: within `storage`; volatile so LLVM cannot fold the stores into a memset.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was written; all-zero is a valid value of this plain C struct.
    unsafe { storage.assume_init_mut() }
}

/// Sends the (already rewritten) packet out of the interface its destination routes to.
/// Without a route it goes to the stack (`TC_ACT_OK`), which answers as it would. The
/// route comes from the next-hop cache (`hop`) or, failing that, a FIB lookup.
#[inline(always)]
pub fn forward(ctx: &TcContext, keep: bool, now: u64) -> Result<i32, Outcome> {
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    // What the cache needs of the header, read in place (or copied when the headers are
    // not linear). No whole copy on the stack: the deepest call chain (`route_reply`)
    // cannot spare it.
    let (ttl, src, dst, tot_len) = match headers_in_place(ctx, IP_OFF + IP_HLEN) {
        // SAFETY: the header lies inside the linear data (checked).
        Some(data) => unsafe {
            let ip = (data + IP_OFF) as *const Ipv4Hdr;
            ((*ip).ttl, (*ip).src, (*ip).dst, (*ip).tot_len)
        },
        None => {
            let ip: Ipv4Hdr = ctx.load(IP_OFF).map_err(failed)?;
            (ip.ttl, ip.src, ip.dst, ip.tot_len)
        }
    };
    if ttl <= 1 {
        return Ok(TC_ACT_OK); // the stack sends time-exceeded
    }
    // SAFETY: reading the skb's own fields.
    let (ingress, gso) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size != 0) };
    let (key, free) = hop::key(dst, src, ingress);
    // A source-free entry serves every client's flows: worth storing for a first packet.
    let keep = keep | free;
    let len = u16::from_be(tot_len);
    let hop = match hop::lookup(&key, len, gso, now) {
        Cached::Hit(hop) => hop,
        Cached::Miss { max_len } => {
            // SAFETY: this run's per-CPU slot.
            let s = unsafe { &mut *hop::scratch().ok_or(outcome::DROP_REWRITE_FAILED)? };
            s.ip = ctx.load(IP_OFF).map_err(failed)?;
            let fib = fib_params(as_storage(&mut s.fib), &s.ip, ingress);
            let rc = fib_lookup(ctx.skb.skb.cast(), fib);
            if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
                decrement_ttl(ctx, ttl)?;
                return redirect_neigh(fib.ifindex);
            }
            if rc != BPF_FIB_LKUP_RET_SUCCESS {
                return Ok(TC_ACT_OK);
            }
            // SAFETY: the map value is not used, only its presence.
            let pod = unsafe { POD_IFACES.get(s.fib.ifindex) }.is_some();
            let max_len = if gso { max_len } else { max_len.max(len) };
            hop::remember(s, &key, keep, pod, max_len, now);
            &s.hop as *const HopValue
        }
    };
    // SAFETY: the cache's entry or this run's slot, both valid for this run.
    let (macs, ifindex, flags) = unsafe { (&(*hop).macs, (*hop).ifindex, (*hop).flags) };
    if let Some(data) = headers_in_place(ctx, IP_OFF + IP_HLEN) {
        // SAFETY: Ethernet and IPv4 headers lie inside the linear data (checked).
        unsafe {
            ((data + IP_OFF + TTL_OFF) as *mut u8).write(ttl - 1);
            let csum = (data + IP_OFF + IP_CSUM_OFF) as *mut u16;
            csum.write_unaligned(replace2(csum.read_unaligned(), TTL_ONE, 0));
            write_macs(data, macs);
        }
    } else {
        decrement_ttl(ctx, ttl)?;
        ctx.store(0, macs, 0).map_err(failed)?;
    }
    redirect(ifindex, flags & HOP_FLAG_POD != 0)
}

/// The FIB parameters of a per-CPU slot as the storage `fib_params` fills.
#[inline(always)]
pub fn as_storage(fib: &mut FibParams) -> &mut MaybeUninit<FibParams> {
    // SAFETY: same layout; `fib_params` writes every byte before reading any.
    unsafe { &mut *(fib as *mut FibParams).cast::<MaybeUninit<FibParams>>() }
}

/// Writes the 12 bytes of MAC addresses at the start of the packet at `data`, a word at a
/// time: a 12-byte copy becomes a call to `memmove`, whose stack frame the deepest call
/// chain cannot spare.
///
/// # Safety
/// The packet's first 12 bytes lie inside the linear data.
#[inline(always)]
pub unsafe fn write_macs(data: usize, macs: &[u8; 12]) {
    let from = macs.as_ptr().cast::<u32>();
    for i in 0..3 {
        // SAFETY: within `macs` and (per the caller) the packet.
        unsafe {
            (data as *mut u32)
                .add(i)
                .write_unaligned(from.add(i).read_unaligned())
        };
    }
}

/// A router decrements the TTL (through helpers: the headers are not in the linear part).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, ttl: u8) -> Result<(), Outcome> {
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    ctx.store(IP_OFF + TTL_OFF, &(ttl - 1), 0).map_err(failed)?;
    ctx.l3_csum_replace(IP_OFF + IP_CSUM_OFF, TTL_ONE as u64, 0, 2)
        .map_err(failed)
}

/// `forward` for IPv6: the hop limit is decremented (no header checksum to fix).
#[inline(always)]
pub fn forward6(ctx: &TcContext, keep: bool, now: u64) -> Result<i32, Outcome> {
    let failed = |_| outcome::DROP_REWRITE_FAILED;
    // SAFETY: this run's per-CPU slot.
    let s = unsafe { &mut *hop::scratch().ok_or(outcome::DROP_REWRITE_FAILED)? };
    match headers_in_place(ctx, IP_OFF + IP6_HLEN) {
        // SAFETY: the header lies inside the linear data (checked).
        Some(data) => unsafe { words::copy(&raw mut s.ip6, (data + IP_OFF) as *const _) },
        None => ctx
            .read_into(IP_OFF, &mut s.ip6)
            .map_err(|_| outcome::DROP_REWRITE_FAILED)?,
    }
    if s.ip6.hop_limit <= 1 {
        return Ok(TC_ACT_OK); // the stack sends time-exceeded
    }
    // SAFETY: reading the skb's own fields.
    let (ingress, gso) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size != 0) };
    // A source-free entry serves every client's flows: worth storing for a first packet.
    let keep = hop::key6_of(s, ingress) | keep;
    let hop_limit = s.ip6.hop_limit;
    let len = u16::from_be(s.ip6.payload_len).saturating_add(IP6_HLEN as u16);
    let hop = match hop::lookup(&s.key6, len, gso, now) {
        Cached::Hit(hop) => hop,
        Cached::Miss { max_len } => {
            let fib = fib_params6(as_storage(&mut s.fib), &s.ip6, ingress);
            let rc = fib_lookup(ctx.skb.skb.cast(), fib);
            if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
                ctx.store(IP_OFF + IP6_HOP_LIMIT_OFF, &(hop_limit - 1), 0)
                    .map_err(failed)?;
                return redirect_neigh(fib.ifindex);
            }
            if rc != BPF_FIB_LKUP_RET_SUCCESS {
                return Ok(TC_ACT_OK);
            }
            // SAFETY: the map value is not used, only its presence.
            let pod = unsafe { POD_IFACES.get(s.fib.ifindex) }.is_some();
            let max_len = if gso { max_len } else { max_len.max(len) };
            hop::remember6(s, keep, pod, max_len, now);
            &s.hop as *const HopValue
        }
    };
    // SAFETY: the cache's entry or this run's slot, both valid for this run.
    let (macs, ifindex, flags) = unsafe { (&(*hop).macs, (*hop).ifindex, (*hop).flags) };
    if let Some(data) = headers_in_place(ctx, IP_OFF + IP6_HLEN) {
        // SAFETY: Ethernet and IPv6 headers lie inside the linear data (checked).
        unsafe {
            ((data + IP_OFF + IP6_HOP_LIMIT_OFF) as *mut u8).write(hop_limit - 1);
            write_macs(data, macs);
        }
    } else {
        ctx.store(IP_OFF + IP6_HOP_LIMIT_OFF, &(hop_limit - 1), 0)
            .map_err(failed)?;
        ctx.store(0, macs, 0).map_err(failed)?;
    }
    redirect(ifindex, flags & HOP_FLAG_POD != 0)
}

/// Sends the packet (its MACs already written) out of `ifindex`.
#[inline(always)]
fn redirect(ifindex: u32, pod: bool) -> Result<i32, Outcome> {
    let verdict = if pod {
        // Into a local pod: the veth's peer receives it directly (ingress of the pod's
        // end), skipping the veth transmit and the backlog queue a plain redirect takes
        // (Cilium's BPF host routing). We run at TC ingress, as the helper requires.
        // SAFETY: plain helper call.
        unsafe { bpf_redirect_peer(ifindex, 0) }
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(ifindex, 0) }
    };
    redirected(verdict)
}

/// The neighbour is not resolved yet: the kernel resolves it and sends.
#[inline(always)]
fn redirect_neigh(ifindex: u32) -> Result<i32, Outcome> {
    // SAFETY: plain helper call; no explicit next hop.
    redirected(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) })
}

#[inline(always)]
fn redirected(verdict: i64) -> Result<i32, Outcome> {
    if verdict as i32 == TC_ACT_REDIRECT {
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(outcome::DROP_REWRITE_FAILED)
    }
}
