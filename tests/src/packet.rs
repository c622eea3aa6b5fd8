//! Building test packets and checking their checksums independently of the datapath.
use std::net::Ipv4Addr;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// One's-complement sum folded to 16 bits (not inverted).
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !(sum16(data, 0) as u16)
}

fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// L4 checksum (TCP/UDP) over pseudo header + segment, with the checksum field zeroed.
fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let pseudo = pseudo_header(src, dst, proto, segment.len());
    let sum = sum16(&pseudo, 0);
    let c = !(sum16(segment, sum) as u16);
    if proto == PROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// A parsed view of an Ethernet/IPv4 frame, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4View {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

pub fn view(frame: &[u8]) -> Ipv4View {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let l4 = &ip[ihl..];
    Ipv4View {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto: ip[9],
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
    }
}

/// Recomputes every checksum of the frame from scratch and returns what is wrong, if anything:
/// the IPv4 header, the TCP/UDP checksum (a zero UDP checksum is valid), or for ICMP the ICMP
/// checksum and the embedded IPv4 header's.
pub fn checksum_errors(frame: &[u8]) -> Vec<String> {
    let mut errors = Vec::new();
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if checksum(&ip[..ihl]) != 0 {
        errors.push("IPv4 header checksum".into());
    }
    let src: [u8; 4] = ip[12..16].try_into().expect("4 bytes");
    let dst: [u8; 4] = ip[16..20].try_into().expect("4 bytes");
    let seg = &ip[ihl..tot];
    match ip[9] {
        PROTO_TCP | PROTO_UDP => {
            let csum_off = if ip[9] == PROTO_TCP { 16 } else { 6 };
            let stored = u16::from_be_bytes([seg[csum_off], seg[csum_off + 1]]);
            if !(ip[9] == PROTO_UDP && stored == 0) {
                let mut zeroed = seg.to_vec();
                zeroed[csum_off] = 0;
                zeroed[csum_off + 1] = 0;
                if l4_checksum(src, dst, ip[9], &zeroed) != stored {
                    errors.push("L4 checksum".into());
                }
            }
        }
        PROTO_ICMP => {
            if checksum(seg) != 0 {
                errors.push("ICMP checksum".into());
            }
            if seg.len() >= 28 && checksum(&seg[8..28]) != 0 {
                errors.push("embedded IPv4 header checksum".into());
            }
        }
        _ => {}
    }
    errors
}

/// Whether `frame` is Ethernet + option-less IPv4 + a whole TCP/UDP/ICMP header inside its
/// total length, so that [`checksum_errors`] and [`fix_checksums`] can read it.
pub fn well_formed(frame: &[u8]) -> bool {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] != 0x45 {
        return false;
    }
    let tot = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let l4_min = match frame[23] {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP => 8,
        _ => return false,
    };
    tot >= 20 + l4_min && 14 + tot <= frame.len()
}

/// Recomputes the IPv4 header and L4 (TCP, UDP, ICMP) checksums of a [`well_formed`] frame;
/// leaves other frames alone.
pub fn fix_checksums(frame: &mut [u8]) {
    if !well_formed(frame) {
        return;
    }
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    let tot = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let (src, dst): ([u8; 4], [u8; 4]) = (
        frame[26..30].try_into().expect("4 bytes"),
        frame[30..34].try_into().expect("4 bytes"),
    );
    let proto = frame[23];
    let seg = &mut frame[34..14 + tot];
    let at = match proto {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => 2,
    };
    seg[at..at + 2].copy_from_slice(&[0, 0]);
    let c = if proto == PROTO_ICMP {
        checksum(seg)
    } else {
        l4_checksum(src, dst, proto, seg)
    };
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Builder for Ethernet + IPv4 + TCP/UDP frames with valid checksums.
#[derive(Debug, Clone)]
pub struct Frame {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// UDP only: send a zero ("no checksum") checksum.
    pub zero_udp_checksum: bool,
}

impl Frame {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Frame {
        Frame {
            src: src.parse().expect("test address"),
            dst: dst.parse().expect("test address"),
            sport,
            dport,
            proto: PROTO_TCP,
            tcp_flags: flags,
            payload: b"hello".to_vec(),
            zero_udp_checksum: false,
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Frame {
        Frame {
            proto: PROTO_UDP,
            tcp_flags: 0,
            ..Frame::tcp(src, sport, dst, dport, 0)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = transport(
            self.proto,
            self.sport,
            self.dport,
            self.tcp_flags,
            &self.payload,
        );
        let csum_off = if self.proto == PROTO_TCP { 16 } else { 6 };
        if !(self.proto == PROTO_UDP && self.zero_udp_checksum) {
            let c = l4_checksum(self.src.octets(), self.dst.octets(), self.proto, &l4);
            l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
        }
        ipv4_frame(self.src, self.dst, self.proto, &l4)
    }
}

/// A TCP (20-byte header, sequence 1000, the given flags) or UDP header with `payload`,
/// checksum field zero: the L4 part of test frames of either family.
pub fn transport(proto: u8, sport: u16, dport: u16, tcp_flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = match proto {
        PROTO_TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..8].copy_from_slice(&1000u32.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = tcp_flags;
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            h
        }
        _ => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            let len = (8 + payload.len()) as u16;
            h[4..6].copy_from_slice(&len.to_be_bytes());
            h
        }
    };
    l4.extend_from_slice(payload);
    l4
}

/// Ethernet + option-less IPv4 header (valid checksum) around `l4`.
pub fn ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

/// An ICMP error (`icmp_type`/`code`) from `src` to `dst` quoting the first 28 bytes of the IPv4
/// packet inside `quoted_frame`.
pub fn icmp_error(src: &str, dst: &str, icmp_type: u8, code: u8, quoted_frame: &[u8]) -> Vec<u8> {
    let mut body = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&quoted_frame[14..14 + 28]);
    let c = checksum(&body);
    body[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(
        src.parse().expect("test address"),
        dst.parse().expect("test address"),
        PROTO_ICMP,
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums() {
        for f in [
            Frame::tcp("10.0.0.1", 1234, "10.96.0.10", 80, SYN),
            Frame::udp("10.0.0.1", 1234, "10.96.0.10", 53),
        ] {
            assert!(checksum_errors(&f.build()).is_empty());
        }
    }

    #[test]
    fn corrupted_checksum_is_detected() {
        let mut frame = Frame::tcp("10.0.0.1", 1234, "10.96.0.10", 80, SYN).build();
        frame[14 + 20 + 16] ^= 0xff;
        assert_eq!(checksum_errors(&frame), vec!["L4 checksum".to_string()]);
        frame[14 + 10] ^= 0x01;
        assert_eq!(checksum_errors(&frame).len(), 2);
    }

    #[test]
    fn icmp_error_quotes_original() {
        let orig = Frame::udp("10.0.0.1", 1234, "10.244.1.5", 53).build();
        let err = icmp_error("10.244.1.5", "10.0.0.1", 3, 3, &orig);
        assert!(checksum_errors(&err).is_empty());
        assert_eq!(&err[14 + 20 + 8..14 + 20 + 8 + 28], &orig[14..14 + 28]);
    }
}
