//! Header parsing. TCP/UDP headers in the skb's linear part are read in place (on TC they
//! are pulled into it first if they are not there); the rest is copied out with
//! `bpf_skb_load_bytes`, which works on non-linear skbs too and keeps bounds checks in one
//! place: a short packet fails the load.
use core::mem::size_of;

use aya_ebpf::{
    helpers::generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use lb_common::{Ip6, MapAddr, Outcome, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, outcome};

pub const ETH_HLEN: usize = 14;
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_HLEN: usize = 20;
pub const L4_OFF: usize = IP_OFF + IP_HLEN;
pub const ICMP_HLEN: usize = 8;
/// Embedded IPv4 header of an ICMP error.
pub const INNER_IP_OFF: usize = L4_OFF + ICMP_HLEN;
pub const INNER_L4_OFF: usize = INNER_IP_OFF + IP_HLEN;

pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
pub const TCP_FLAGS_OFF: usize = 13;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
pub const ICMP_CSUM_OFF: usize = 2;

const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IP6_HLEN: usize = 40;
pub const IP6_SRC_OFF: usize = 8;
pub const IP6_DST_OFF: usize = 24;
pub const IP6_HOP_LIMIT_OFF: usize = 7;
/// Extension headers walked to find the transport header; a longer chain is passed
/// (`IP_OPTIONS`), as no stack sends one to a service.
pub const IPV6_EXT_MAX: usize = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub src: u32,
    pub dst: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub src: Ip6,
    pub dst: Ip6,
}
const _: () = assert!(core::mem::size_of::<Ipv6Hdr>() == IP6_HLEN);

/// A frame the IPv6 parser reads with copying loads (`bpf_skb_load_bytes` on TC,
/// `bpf_xdp_load_bytes` on XDP): offsets past extension headers are variable, which a
/// load helper takes as a plain argument and a packet pointer would make the verifier track.
pub trait Frame {
    /// Copies `len` bytes at `offset` to `dst` with the context's load helper; 0 on
    /// success.
    ///
    /// # Safety
    /// `dst` is writable for `len` bytes.
    unsafe fn load_raw(&self, offset: usize, dst: *mut u8, len: u32) -> i64;
    /// Bytes in the frame.
    fn frame_len(&self) -> u32;
    /// Start and end of the bytes that may be read in place (the skb's linear part).
    fn linear(&self) -> (usize, usize);

    #[inline(always)]
    fn read<T>(&self, offset: usize) -> Result<T, Outcome> {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: `value` holds `size_of::<T>()` bytes; the helper fills them or fails.
        if unsafe { self.load_raw(offset, value.as_mut_ptr().cast(), size_of::<T>() as u32) } != 0 {
            return Err(outcome::MALFORMED);
        }
        // SAFETY: fully written by the helper.
        Ok(unsafe { value.assume_init() })
    }

    /// `read` into `dst` (a map value, say), without a copy on the stack.
    #[inline(always)]
    fn read_into<T>(&self, offset: usize, dst: &mut T) -> Result<(), Outcome> {
        // SAFETY: `dst` is a `T`; the helper overwrites its bytes or fails.
        if unsafe { self.load_raw(offset, (dst as *mut T).cast(), size_of::<T>() as u32) } != 0 {
            return Err(outcome::MALFORMED);
        }
        Ok(())
    }
}

impl Frame for TcContext {
    #[inline(always)]
    unsafe fn load_raw(&self, offset: usize, dst: *mut u8, len: u32) -> i64 {
        // SAFETY: the caller's `dst` is writable for `len` bytes.
        unsafe { bpf_skb_load_bytes(self.skb.skb.cast(), offset as u32, dst.cast(), len) }
    }
    #[inline(always)]
    fn frame_len(&self) -> u32 {
        self.len()
    }
    #[inline(always)]
    fn linear(&self) -> (usize, usize) {
        (self.data(), self.data_end())
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    unsafe fn load_raw(&self, offset: usize, dst: *mut u8, len: u32) -> i64 {
        // SAFETY: the caller's `dst` is writable for `len` bytes.
        unsafe { bpf_xdp_load_bytes(self.ctx, offset as u32, dst.cast(), len) }
    }
    #[inline(always)]
    fn frame_len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
    #[inline(always)]
    fn linear(&self) -> (usize, usize) {
        (self.data(), self.data_end())
    }
}

/// A TCP or UDP packet (or the flow an ICMP error is about). Addresses/ports network order.
#[derive(Clone, Copy)]
pub struct Flow<A = u32> {
    pub proto: u8,
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP and for embedded headers of ICMP errors).
    pub tcp_flags: u8,
    /// Where the L4 header starts in the frame: after the IPv6 extension headers (IPv4
    /// rewrites use the constant offsets of option-less headers).
    pub l4_off: u16,
}

impl<A: MapAddr> Flow<A> {
    /// The same flow seen from the other end.
    #[inline(always)]
    pub fn reversed(&self) -> Flow<A> {
        Flow {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            tcp_flags: 0,
            l4_off: self.l4_off,
        }
    }

    /// Offset of the L4 checksum for a flow whose L4 header starts at `l4_off`.
    #[inline(always)]
    pub fn csum_off(&self, l4_off: usize) -> usize {
        if self.proto == PROTO_TCP {
            l4_off + TCP_CSUM_OFF
        } else {
            l4_off + UDP_CSUM_OFF
        }
    }
}

pub enum Packet<A = u32> {
    /// TCP or UDP at `l4_off`.
    Flow(Flow<A>),
    /// ICMP error at `outer.l4_off` embedding the header of `inner` 8 bytes on (its L4
    /// header at `inner.l4_off`); `outer` has the ICMP packet's own addresses (ports unused).
    IcmpError { outer: Flow<A>, inner: Flow<A> },
}

/// What [`parse`] returns for an IPv6 packet, which the IPv6 programs parse (with
/// [`parse6`]). Not an outcome of the table: never counted. A sentinel rather than a variant
/// of the result, whose extra copy of the packet would cost the IPv4 path 48 bytes of stack.
pub const IPV6: Outcome = u32::MAX;

/// Parses Ethernet + IPv4 + TCP/UDP/ICMP-error. Anything else is a pass outcome.
/// Ethernet, IPv4 and the first 8 bytes of L4 (the ports), read with one helper call: the
/// shortest TCP or UDP packet has this much, and every load is a helper call (a copy that
/// also works on non-linear skbs).
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Head {
    macs: [u8; 12],
    ethertype: u16,
    ip: Ipv4Hdr,
    ports: [u16; 2],
    l4_rest: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Head>() == L4_OFF + 8);

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, Outcome> {
    linearize_headers(ctx);
    // Fastest path: TCP and UDP over IPv4 with the headers in the skb's linear part (as
    // nearly every packet has them), read in place. Each load helper call costs about as
    // much as a map lookup (the bench's `cost_parse` row).
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + size_of::<Head>() <= end {
        // SAFETY: the `Head` bytes (Ethernet, IPv4, ports) are inside the linear data.
        let (ethertype, ver_ihl, proto) = unsafe {
            (
                packet_read::<u16>(data + 12),
                packet_read::<u8>(data + IP_OFF),
                packet_read::<u8>(data + IP_OFF + 9),
            )
        };
        if ethertype == ETH_P_IP.to_be()
            && ver_ihl == 0x45
            && matches!(proto, PROTO_TCP | PROTO_UDP)
        {
            // SAFETY: as above.
            let (ip, ports) = unsafe {
                (
                    packet_read::<Ipv4Hdr>(data + IP_OFF),
                    packet_read::<[u16; 2]>(data + L4_OFF),
                )
            };
            let tcp_bytes = if proto == PROTO_TCP && data + L4_OFF + TCP_FLAGS_OFF < end {
                // SAFETY: checked just above.
                Some(unsafe { packet_read::<[u8; 2]>(data + L4_OFF + TCP_FLAGS_OFF - 1) })
            } else {
                None
            };
            return parse_flow(ctx, &ip, ports, tcp_bytes);
        }
        // An IPv6 frame goes on to `parse6` without the two loads below (helper calls).
        if ethertype == ETH_P_IPV6.to_be() {
            return Err(IPV6);
        }
    }
    // Fast path for the rest: TCP and UDP over IPv4, in one load (two for TCP's flags).
    if let Ok(head) = ctx.load::<Head>(0) {
        let (ethertype, ip, ports) = (head.ethertype, head.ip, head.ports);
        if ethertype == ETH_P_IP.to_be()
            && ip.ver_ihl == 0x45
            && matches!(ip.proto, PROTO_TCP | PROTO_UDP)
        {
            return parse_flow(ctx, &ip, ports, None);
        }
    }
    let ethertype: u16 = ctx.load(12).map_err(|_| outcome::MALFORMED)?;
    if ethertype == ETH_P_IPV6.to_be() {
        return Err(IPV6);
    }
    if ethertype != ETH_P_IP.to_be() {
        return Err(outcome::NOT_IP);
    }
    let ip = load_ipv4(ctx, IP_OFF)?;
    if matches!(ip.proto, PROTO_TCP | PROTO_UDP) {
        let ports: [u16; 2] = ctx.load(L4_OFF).map_err(|_| outcome::MALFORMED)?;
        return parse_flow(ctx, &ip, ports, None);
    }
    parse_other(ctx, &ip)
}

/// The frame bytes the in-place parsers read: Ethernet, the IPv6 fixed header and 20 bytes
/// of L4 (more than IPv4's headers need).
const HEADERS_MAX: u32 = (L4_DIRECT + 20) as u32;

/// Pulls the headers into the skb's linear part if they are not all there: AF_PACKET
/// senders with a TX ring (the skb's linear part is the Ethernet header, the rest page
/// fragments) and some drivers hand over such skbs. Without it every read and rewrite of
/// the packet is a helper call; the stack's own `ip_rcv` pulls the IP header all the same.
/// On failure (no memory) the copying paths still parse the packet. The IPv6 programs run
/// after this one (tail calls) on the same skb.
#[inline(always)]
fn linearize_headers(ctx: &TcContext) {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let want = ctx.len().min(HEADERS_MAX);
    if linear < want {
        let _ = ctx.pull_data(want);
    }
}

/// The start of the packet's data if its first `len` bytes are in the skb's linear part
/// (`linearize_headers` pulls them there), so they can be read and written in place: a
/// helper call per store costs about what a map lookup does. Direct writes make the
/// verifier unclone a cloned skb first, as the store helper would.
#[inline(always)]
pub fn headers_in_place(ctx: &TcContext, len: usize) -> Option<usize> {
    let (data, end) = (ctx.data(), ctx.data_end());
    (data + len <= end).then_some(data)
}

/// Reads a `T` at packet address `addr` with one load instruction per field. Headers need
/// not be aligned, but BPF loads need no alignment on the JITs the kernel runs us with
/// (x86-64, arm64); an unaligned read would be split into byte loads.
///
/// # Safety
/// `addr..addr + size_of::<T>()` was checked against `data_end`.
#[inline(always)]
pub(crate) unsafe fn packet_read<T: Copy>(addr: usize) -> T {
    // SAFETY: in bounds (the caller's check); see above for alignment.
    unsafe { core::ptr::read(addr as *const T) }
}

/// A TCP or UDP packet with an option-less IPv4 header `ip` and L4 ports `ports`;
/// `tcp_bytes`: TCP's data offset and flags bytes if already read.
#[inline(always)]
fn parse_flow(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    ports: [u16; 2],
    tcp_bytes: Option<[u8; 2]>,
) -> Result<Packet, Outcome> {
    let tot_len = u16::from_be(ip.tot_len) as u32;
    if ETH_HLEN as u32 + tot_len > ctx.len() {
        return Err(outcome::MALFORMED);
    }
    if u16::from_be(ip.frag_off) & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Err(outcome::FRAGMENT);
    }
    let min = if ip.proto == PROTO_TCP { 20 } else { 8 };
    if tot_len < (IP_HLEN + min) as u32 {
        return Err(outcome::MALFORMED);
    }
    let tcp_flags = if ip.proto == PROTO_TCP {
        // Data offset and flags, in one load.
        let [offset, flags]: [u8; 2] = match tcp_bytes {
            Some(bytes) => bytes,
            None => ctx
                .load(L4_OFF + TCP_FLAGS_OFF - 1)
                .map_err(|_| outcome::MALFORMED)?,
        };
        tcp_header_fits(offset, tot_len - IP_HLEN as u32)?;
        flags
    } else {
        0
    };
    Ok(Packet::Flow(Flow {
        proto: ip.proto,
        src: ip.src,
        dst: ip.dst,
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
        l4_off: L4_OFF as u16,
    }))
}

/// The parser contract's TCP part, shared by every hook: the data offset (high nibble of
/// `offset_byte`) is at least 5 words and the header lies inside the `l4_len` bytes from
/// the start of the TCP header to the end of the datagram.
#[inline(always)]
pub fn tcp_header_fits(offset_byte: u8, l4_len: u32) -> Result<(), Outcome> {
    let header = u32::from(offset_byte >> 4) * 4;
    if header < 20 || header > l4_len {
        return Err(outcome::MALFORMED);
    }
    Ok(())
}

/// Where the L4 header starts when no extension header precedes it, as in nearly every
/// packet. Such packets are read in place (and on XDP rewritten in place): each load or
/// store helper call costs about what a map lookup does, and an established packet on XDP
/// made fourteen.
pub const L4_DIRECT: usize = IP_OFF + IP6_HLEN;

/// A well-formed TCP or UDP packet right after the fixed header, read in place; `None` for
/// anything else, which the rest of `parse6` parses (and refuses, if it is malformed): this
/// path only accepts what `parse6` accepts, with the same flow.
#[inline(always)]
pub fn flow6_in_place(ctx: &impl Frame) -> Option<Flow<Ip6>> {
    let (data, end) = ctx.linear();
    // Twenty bytes of L4 for UDP too (shorter datagrams take `parse6`): a check for TCP
    // alone is merged by LLVM with the datagram's length check into a form the verifier
    // cannot follow.
    if data + L4_DIRECT + 20 > end {
        return None;
    }
    // SAFETY: the fixed header and 20 bytes of L4 are inside the frame (checked above).
    let (vtc_flow, payload_len, nexthdr) = unsafe {
        (
            packet_read::<u32>(data + IP_OFF),
            packet_read::<u16>(data + IP_OFF + 4),
            packet_read::<u8>(data + IP_OFF + 6),
        )
    };
    let l4_len = u16::from_be(payload_len) as usize;
    // The datagram must lie inside the frame, not inside its linear part: a TCP segment's
    // payload is in page fragments (only the headers are read here).
    if vtc_flow & 0xf0 != 0x60 || (L4_DIRECT + l4_len) as u32 > ctx.frame_len() {
        return None;
    }
    let tcp_flags = match nexthdr {
        PROTO_TCP => {
            if l4_len < 20 {
                return None;
            }
            // SAFETY: 20 bytes of L4 are inside the frame (checked first).
            let [offset, flags] = unsafe { packet_read::<[u8; 2]>(data + L4_DIRECT + 12) };
            tcp_header_fits(offset, l4_len as u32).ok()?;
            flags
        }
        // SAFETY: as above.
        PROTO_UDP if l4_len >= 8 && unsafe { packet_read::<u16>(data + L4_DIRECT + 6) } != 0 => 0,
        _ => return None,
    };
    // SAFETY: as above.
    let (src, dst, ports) = unsafe {
        (
            packet_read::<Ip6>(data + IP_OFF + IP6_SRC_OFF),
            packet_read::<Ip6>(data + IP_OFF + IP6_DST_OFF),
            packet_read::<[u16; 2]>(data + L4_DIRECT),
        )
    };
    Some(Flow {
        proto: nexthdr,
        src,
        dst,
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
        l4_off: L4_DIRECT as u16,
    })
}

/// IPv6: the fixed header, extension headers skipped (hop-by-hop, routing, destination
/// options; a fragment header is a fragment), then TCP, UDP or an ICMPv6 error. The same
/// contract as IPv4: the datagram (40 + payload length) lies inside the frame, every header
/// inside the datagram, or the packet is malformed.
#[inline(always)]
pub fn parse6(ctx: &impl Frame) -> Result<Packet<Ip6>, Outcome> {
    if let Some(flow) = flow6_in_place(ctx) {
        return Ok(Packet::Flow(flow));
    }
    let ip: Ipv6Hdr = ctx.read(IP_OFF)?;
    // The version is the high nibble of the first byte (lowest in memory).
    if (ip.vtc_flow & 0xf0) != 0x60 {
        return Err(outcome::MALFORMED);
    }
    let end = (IP_OFF + IP6_HLEN) as u32 + u16::from_be(ip.payload_len) as u32;
    if end > ctx.frame_len() {
        return Err(outcome::MALFORMED);
    }
    let (proto, l4_off) = skip_extensions(ctx, ip.nexthdr, (IP_OFF + IP6_HLEN) as u32, end)?;
    match proto {
        PROTO_TCP | PROTO_UDP => flow6(ctx, proto, &ip.src, &ip.dst, l4_off, end).map(Packet::Flow),
        PROTO_ICMPV6 => icmp6_error(ctx, &ip, l4_off, end),
        _ => Err(outcome::OTHER_PROTOCOL),
    }
}

/// Walks up to `IPV6_EXT_MAX` extension headers from `off`; returns the transport protocol
/// and where its header starts.
#[inline(always)]
fn skip_extensions(
    ctx: &impl Frame,
    first: u8,
    mut off: u32,
    end: u32,
) -> Result<(u8, u32), Outcome> {
    let mut next = first;
    for _ in 0..IPV6_EXT_MAX {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let [nh, len]: [u8; 2] = ctx.read(off as usize)?;
                next = nh;
                off += (len as u32 + 1) * 8;
                if off > end {
                    return Err(outcome::MALFORMED);
                }
            }
            NEXTHDR_FRAGMENT => return Err(outcome::FRAGMENT),
            _ => return Ok((next, off)),
        }
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT => Err(outcome::IP_OPTIONS),
        _ => Ok((next, off)),
    }
}

/// TCP or UDP over IPv6 with its header at `l4_off` of a datagram ending at `end`. A zero
/// UDP checksum is invalid over IPv6 (RFC 8200): malformed, left for the stack to discard.
#[inline(always)]
fn flow6(
    ctx: &impl Frame,
    proto: u8,
    src: &Ip6,
    dst: &Ip6,
    l4_off: u32,
    end: u32,
) -> Result<Flow<Ip6>, Outcome> {
    let min = if proto == PROTO_TCP { 20 } else { 8 };
    if l4_off + min > end {
        return Err(outcome::MALFORMED);
    }
    // Ports, then UDP's length and checksum (TCP's sequence number).
    let [sport, dport, _, udp_csum]: [u16; 4] = ctx.read(l4_off as usize)?;
    let tcp_flags = if proto == PROTO_TCP {
        let [offset, flags]: [u8; 2] = ctx.read(l4_off as usize + TCP_FLAGS_OFF - 1)?;
        tcp_header_fits(offset, end - l4_off)?;
        flags
    } else {
        if udp_csum == 0 {
            return Err(outcome::MALFORMED);
        }
        0
    };
    Ok(Flow {
        proto,
        src: *src,
        dst: *dst,
        sport,
        dport,
        tcp_flags,
        l4_off: l4_off as u16,
    })
}

/// An ICMPv6 error (destination unreachable, packet too big, time exceeded, parameter
/// problem) quoting a TCP or UDP packet; other ICMPv6 (neighbour discovery, echo) passes.
#[inline(always)]
fn icmp6_error(
    ctx: &impl Frame,
    ip: &Ipv6Hdr,
    l4_off: u32,
    end: u32,
) -> Result<Packet<Ip6>, Outcome> {
    let icmp_type: u8 = ctx.read(l4_off as usize)?;
    if !matches!(
        icmp_type,
        ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB
    ) {
        return Err(outcome::PASS_NOT_SERVICE);
    }
    let inner_ip_off = l4_off + ICMP_HLEN as u32;
    let inner_l4_off = inner_ip_off + IP6_HLEN as u32;
    // The quoted header and the 8 bytes of L4 translated must lie inside this datagram.
    if inner_l4_off + 8 > end {
        return Err(outcome::MALFORMED);
    }
    let inner: Ipv6Hdr = ctx.read(inner_ip_off as usize)?;
    if (inner.vtc_flow & 0xf0) != 0x60 {
        return Err(outcome::MALFORMED);
    }
    if !matches!(inner.nexthdr, PROTO_TCP | PROTO_UDP) {
        return Err(outcome::PASS_NOT_SERVICE);
    }
    let ports: [u16; 2] = ctx.read(inner_l4_off as usize)?;
    Ok(Packet::IcmpError {
        outer: Flow {
            proto: PROTO_ICMPV6,
            src: ip.src,
            dst: ip.dst,
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            l4_off: l4_off as u16,
        },
        inner: Flow {
            proto: inner.nexthdr,
            src: inner.src,
            dst: inner.dst,
            sport: ports[0],
            dport: ports[1],
            tcp_flags: 0,
            l4_off: inner_l4_off as u16,
        },
    })
}

/// Anything but TCP and UDP over option-less IPv4: ICMP errors about flows, or passed.
#[inline(always)]
fn parse_other(ctx: &TcContext, ip: &Ipv4Hdr) -> Result<Packet, Outcome> {
    let tot_len = u16::from_be(ip.tot_len) as u32;
    if tot_len < IP_HLEN as u32 || ETH_HLEN as u32 + tot_len > ctx.len() {
        return Err(outcome::MALFORMED);
    }
    if u16::from_be(ip.frag_off) & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Err(outcome::FRAGMENT);
    }
    match ip.proto {
        PROTO_ICMP => {
            let icmp_type: u8 = ctx.load(L4_OFF).map_err(|_| outcome::MALFORMED)?;
            if !matches!(
                icmp_type,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB
            ) {
                return Err(outcome::PASS_NOT_SERVICE);
            }
            // The quoted IPv4 header and the 8 bytes of L4 translated below must lie inside
            // this datagram, not in what follows it in the frame.
            if tot_len < (INNER_L4_OFF + 8 - IP_OFF) as u32 {
                return Err(outcome::MALFORMED);
            }
            let inner_ip = load_ipv4(ctx, INNER_IP_OFF)?;
            if !matches!(inner_ip.proto, PROTO_TCP | PROTO_UDP) {
                return Err(outcome::PASS_NOT_SERVICE);
            }
            let ports: [u16; 2] = ctx.load(INNER_L4_OFF).map_err(|_| outcome::MALFORMED)?;
            Ok(Packet::IcmpError {
                outer: Flow {
                    proto: PROTO_ICMP,
                    src: ip.src,
                    dst: ip.dst,
                    sport: 0,
                    dport: 0,
                    tcp_flags: 0,
                    l4_off: L4_OFF as u16,
                },
                inner: Flow {
                    proto: inner_ip.proto,
                    src: inner_ip.src,
                    dst: inner_ip.dst,
                    sport: ports[0],
                    dport: ports[1],
                    tcp_flags: 0,
                    l4_off: INNER_L4_OFF as u16,
                },
            })
        }
        _ => Err(outcome::OTHER_PROTOCOL),
    }
}

/// Loads an option-less IPv4 header at `off`.
#[inline(always)]
fn load_ipv4(ctx: &TcContext, off: usize) -> Result<Ipv4Hdr, Outcome> {
    let ip: Ipv4Hdr = ctx.load(off).map_err(|_| outcome::MALFORMED)?;
    if ip.ver_ihl >> 4 != 4 {
        return Err(outcome::MALFORMED);
    }
    match ip.ver_ihl & 0x0f {
        5 => Ok(ip),
        0..=4 => Err(outcome::MALFORMED),
        _ => Err(outcome::IP_OPTIONS),
    }
}
