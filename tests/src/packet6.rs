//! IPv6 test packets and an independent check of their checksums (the twin of `packet`).
use std::net::Ipv6Addr;

use crate::packet::{CLIENT_MAC, NODE_MAC, PROTO_TCP, PROTO_UDP, checksum, transport};

pub const PROTO_ICMPV6: u8 = 58;
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_DEST: u8 = 60;
pub const ETH_HLEN: usize = 14;
pub const IP6_HLEN: usize = 40;

/// Offsets in a frame without extension headers.
pub const IP6_SRC: std::ops::Range<usize> = 22..38;
pub const IP6_DST: std::ops::Range<usize> = 38..54;
pub const HOP_LIMIT: usize = 21;
pub const L4: usize = ETH_HLEN + IP6_HLEN;

/// The IPv6 pseudo-header (RFC 8200 §8.1) for an upper-layer packet of `len` bytes.
fn pseudo_header(src: &[u8], dst: &[u8], next: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next]);
    p
}

/// The checksum of an upper-layer packet (its checksum field zeroed) from `src` to `dst`.
/// UDP's zero is sent as 0xffff (zero means "none", which IPv6 forbids).
pub fn upper_checksum(src: &[u8], dst: &[u8], next: u8, segment: &[u8]) -> u16 {
    let mut data = pseudo_header(src, dst, next, segment.len());
    data.extend_from_slice(segment);
    let c = checksum(&data);
    if next == PROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// Where the checksum of `next`'s header sits.
fn csum_at(next: u8) -> usize {
    match next {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => 2, // ICMPv6
    }
}

/// Builder for Ethernet + IPv6 (+ extension headers) + TCP/UDP frames with valid checksums.
#[derive(Debug, Clone)]
pub struct Frame6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// Extension headers in order: (type, body after the next-header and length bytes;
    /// padded to a multiple of 8 with the two).
    pub extensions: Vec<(u8, Vec<u8>)>,
}

impl Frame6 {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Frame6 {
        Frame6 {
            src: src.parse().expect("test address"),
            dst: dst.parse().expect("test address"),
            sport,
            dport,
            proto: PROTO_TCP,
            tcp_flags: flags,
            payload: b"hello".to_vec(),
            extensions: Vec::new(),
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Frame6 {
        Frame6 {
            proto: PROTO_UDP,
            tcp_flags: 0,
            ..Frame6::tcp(src, sport, dst, dport, 0)
        }
    }

    /// The same frame with an extension header of `kind` (6 bytes of options: PadN).
    pub fn with_extension(mut self, kind: u8) -> Frame6 {
        let body = if kind == NEXTHDR_FRAGMENT {
            vec![0, 0, 0, 0, 0, 1] // offset 0, more fragments, id 1
        } else {
            vec![1, 4, 0, 0, 0, 0] // PadN of 4
        };
        self.extensions.push((kind, body));
        self
    }

    pub fn l4(&self) -> Vec<u8> {
        let mut l4 = transport(
            self.proto,
            self.sport,
            self.dport,
            self.tcp_flags,
            &self.payload,
        );
        let c = upper_checksum(&self.src.octets(), &self.dst.octets(), self.proto, &l4);
        let at = csum_at(self.proto);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }

    pub fn build(&self) -> Vec<u8> {
        ipv6_frame(self.src, self.dst, self.proto, &self.extensions, &self.l4())
    }
}

/// Ethernet + IPv6 header + `extensions` around the upper-layer packet `l4` of protocol
/// `proto`.
pub fn ipv6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    extensions: &[(u8, Vec<u8>)],
    l4: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, (_, body)) in extensions.iter().enumerate() {
        let next = extensions.get(i + 1).map_or(proto, |(k, _)| *k);
        let mut h = vec![next, 0];
        h.extend_from_slice(body);
        while !h.len().is_multiple_of(8) {
            h.push(0);
        }
        h[1] = (h.len() / 8 - 1) as u8;
        chain.extend_from_slice(&h);
    }
    let first = extensions.first().map_or(proto, |(k, _)| *k);
    let mut f = Vec::with_capacity(L4 + chain.len() + l4.len());
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[first, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&chain);
    f.extend_from_slice(l4);
    f
}

/// An ICMPv6 error (`icmp_type`/`code`) from `src` to `dst` quoting the IPv6 packet in
/// `quoted_frame` (its first 48 bytes, as routers quote at least).
pub fn icmp6_error(src: &str, dst: &str, icmp_type: u8, code: u8, quoted_frame: &[u8]) -> Vec<u8> {
    let (src, dst): (Ipv6Addr, Ipv6Addr) = (
        src.parse().expect("test address"),
        dst.parse().expect("test address"),
    );
    let mut body = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&quoted_frame[ETH_HLEN..ETH_HLEN + 48]);
    let c = upper_checksum(&src.octets(), &dst.octets(), PROTO_ICMPV6, &body);
    body[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6_frame(src, dst, PROTO_ICMPV6, &[], &body)
}

/// An ICMPv6 message of `icmp_type` (echo, neighbour discovery, ...) with `body`.
pub fn icmp6(src: &str, dst: &str, icmp_type: u8, body: &[u8]) -> Vec<u8> {
    let (src, dst): (Ipv6Addr, Ipv6Addr) = (
        src.parse().expect("test address"),
        dst.parse().expect("test address"),
    );
    let mut msg = vec![icmp_type, 0, 0, 0];
    msg.extend_from_slice(body);
    let c = upper_checksum(&src.octets(), &dst.octets(), PROTO_ICMPV6, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let hop = if icmp_type >= 133 { 255 } else { 64 };
    let mut f = ipv6_frame(src, dst, PROTO_ICMPV6, &[], &msg);
    f[HOP_LIMIT] = hop;
    f
}

/// A parsed IPv6 frame, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6View {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// The upper-layer protocol after the extension headers, and where it starts.
    pub proto: u8,
    pub l4: usize,
    pub sport: u16,
    pub dport: u16,
    pub hop_limit: u8,
}

pub fn view6(frame: &[u8]) -> Ipv6View {
    assert_eq!(&frame[12..14], &[0x86, 0xdd], "not an IPv6 frame");
    let addr = |r: std::ops::Range<usize>| {
        Ipv6Addr::from(<[u8; 16]>::try_from(&frame[r]).expect("16 bytes"))
    };
    let mut next = frame[ETH_HLEN + 6];
    let mut at = L4;
    while matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST) {
        next = frame[at];
        at += (usize::from(frame[at + 1]) + 1) * 8;
    }
    let port = |i: usize| u16::from_be_bytes([frame[at + i], frame[at + i + 1]]);
    Ipv6View {
        src: addr(IP6_SRC),
        dst: addr(IP6_DST),
        proto: next,
        l4: at,
        sport: port(0),
        dport: port(2),
        hop_limit: frame[HOP_LIMIT],
    }
}

/// An IPv6 frame whose headers the checksum helpers can walk: version 6, the payload
/// inside the frame, extension headers (hop-by-hop, routing, destination options) inside
/// the datagram, then TCP, UDP or ICMPv6 with its header inside too.
pub fn well_formed6(frame: &[u8]) -> bool {
    if frame.len() < L4 || frame[12..14] != [0x86, 0xdd] || frame[ETH_HLEN] >> 4 != 6 {
        return false;
    }
    let end = L4 + usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    if end > frame.len() {
        return false;
    }
    let (mut next, mut at) = (frame[ETH_HLEN + 6], L4);
    for _ in 0..8 {
        if !matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST) {
            break;
        }
        if at + 2 > end {
            return false;
        }
        next = frame[at];
        at += (usize::from(frame[at + 1]) + 1) * 8;
    }
    let min = match next {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMPV6 => 8,
        _ => return false,
    };
    at + min <= end
}

/// Recomputes the upper-layer checksum of a [`well_formed6`] frame; leaves others alone.
pub fn fix_checksums6(frame: &mut [u8]) {
    if !well_formed6(frame) {
        return;
    }
    let v = view6(frame);
    let end = L4 + usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    let (src, dst) = (frame[IP6_SRC].to_vec(), frame[IP6_DST].to_vec());
    let at = csum_at(v.proto);
    let segment = &mut frame[v.l4..end];
    segment[at..at + 2].copy_from_slice(&[0, 0]);
    let c = upper_checksum(&src, &dst, v.proto, segment);
    segment[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The checksum problems of an IPv6 frame (TCP, UDP or ICMPv6), recomputed from scratch.
pub fn checksum_errors6(frame: &[u8]) -> Vec<String> {
    let v = view6(frame);
    let end = L4 + usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    if end > frame.len() || v.l4 > end {
        return vec!["payload length beyond the frame".to_string()];
    }
    let mut segment = frame[v.l4..end].to_vec();
    let at = csum_at(v.proto);
    let stored = u16::from_be_bytes([segment[at], segment[at + 1]]);
    segment[at..at + 2].copy_from_slice(&[0, 0]);
    let want = upper_checksum(&frame[IP6_SRC], &frame[IP6_DST], v.proto, &segment);
    if stored != want {
        return vec![format!(
            "L4 checksum {stored:#06x}, should be {want:#06x} (protocol {})",
            v.proto
        )];
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums_and_parse_back() {
        for f in [
            Frame6::tcp("fd00::1", 1234, "fd00:96::10", 80, 2),
            Frame6::udp("fd00::1", 1234, "fd00:96::10", 53)
                .with_extension(NEXTHDR_HOP)
                .with_extension(NEXTHDR_DEST),
        ] {
            let frame = f.build();
            assert!(checksum_errors6(&frame).is_empty(), "{f:?}");
            let v = view6(&frame);
            assert_eq!((v.proto, v.sport, v.dport), (f.proto, f.sport, f.dport));
        }
    }

    #[test]
    fn corrupted_checksum_is_detected() {
        let mut frame = Frame6::tcp("fd00::1", 1234, "fd00:96::10", 80, 2).build();
        frame[L4 + 16] ^= 0xff;
        assert_eq!(checksum_errors6(&frame).len(), 1);
    }

    #[test]
    fn icmp6_error_quotes_the_packet() {
        let orig = Frame6::udp("fd00::1", 1234, "fd00:244::5", 53).build();
        let err = icmp6_error("fd00:244::5", "fd00::1", 1, 4, &orig);
        assert!(checksum_errors6(&err).is_empty());
        assert_eq!(&err[L4 + 8..L4 + 8 + 48], &orig[ETH_HLEN..ETH_HLEN + 48]);
    }
}
