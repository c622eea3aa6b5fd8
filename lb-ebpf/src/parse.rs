//! Header parsing. Headers are copied out with `bpf_skb_load_bytes`, which works on
//! non-linear skbs too and keeps bounds checks in one place: a short packet fails the load.
use aya_ebpf::programs::TcContext;
use lb_common::{Outcome, PROTO_ICMP, PROTO_TCP, PROTO_UDP, outcome};

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

/// A TCP or UDP packet (or the flow an ICMP error is about). Addresses/ports network order.
#[derive(Clone, Copy)]
pub struct Flow {
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP and for embedded headers of ICMP errors).
    pub tcp_flags: u8,
}

impl Flow {
    /// The same flow seen from the other end.
    #[inline(always)]
    pub fn reversed(&self) -> Flow {
        Flow {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            tcp_flags: 0,
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

pub enum Packet {
    /// TCP or UDP at `L4_OFF`.
    Flow(Flow),
    /// ICMP error at `L4_OFF` embedding the header of `inner` at `INNER_IP_OFF`; `outer` has
    /// the ICMP packet's own addresses (ports unused).
    IcmpError { outer: Flow, inner: Flow },
}

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
    // Fast path: TCP and UDP, in one load (two for TCP's flags).
    if let Ok(head) = ctx.load::<Head>(0) {
        let (ethertype, ip, ports) = (head.ethertype, head.ip, head.ports);
        if ethertype == ETH_P_IP.to_be()
            && ip.ver_ihl == 0x45
            && matches!(ip.proto, PROTO_TCP | PROTO_UDP)
        {
            return parse_flow(ctx, &ip, ports);
        }
    }
    let ethertype: u16 = ctx.load(12).map_err(|_| outcome::MALFORMED)?;
    if ethertype != ETH_P_IP.to_be() {
        return Err(outcome::NOT_IPV4);
    }
    let ip = load_ipv4(ctx, IP_OFF)?;
    if matches!(ip.proto, PROTO_TCP | PROTO_UDP) {
        let ports: [u16; 2] = ctx.load(L4_OFF).map_err(|_| outcome::MALFORMED)?;
        return parse_flow(ctx, &ip, ports);
    }
    parse_other(ctx, &ip)
}

/// A TCP or UDP packet with an option-less IPv4 header `ip` and L4 ports `ports`.
#[inline(always)]
fn parse_flow(ctx: &TcContext, ip: &Ipv4Hdr, ports: [u16; 2]) -> Result<Packet, Outcome> {
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
        let [offset, flags]: [u8; 2] = ctx
            .load(L4_OFF + TCP_FLAGS_OFF - 1)
            .map_err(|_| outcome::MALFORMED)?;
        tcp_header_fits(offset, tot_len)?;
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
    }))
}

/// The parser contract's TCP part, shared by every hook: the data offset (high nibble of
/// `offset_byte`) is at least 5 words and the header lies inside the datagram of `tot_len`.
#[inline(always)]
pub fn tcp_header_fits(offset_byte: u8, tot_len: u32) -> Result<(), Outcome> {
    let header = u32::from(offset_byte >> 4) * 4;
    if header < 20 || IP_HLEN as u32 + header > tot_len {
        return Err(outcome::MALFORMED);
    }
    Ok(())
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
                },
                inner: Flow {
                    proto: inner_ip.proto,
                    src: inner_ip.src,
                    dst: inner_ip.dst,
                    sport: ports[0],
                    dport: ports[1],
                    tcp_flags: 0,
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
