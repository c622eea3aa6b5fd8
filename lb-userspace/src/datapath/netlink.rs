//! The netlink plumbing the hand-written netlink users share (sock_diag in `sockets`,
//! rtnetlink announcements in `route_watch`, rule and route dumps in `route_policy`).
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
/// rtnetlink message types (`rtnetlink.h`).
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;
pub const RTM_NEWRULE: u16 = 32;
pub const RTM_DELRULE: u16 = 33;
pub const RTM_GETRULE: u16 = 34;
pub const RTM_NEWNEXTHOP: u16 = 104;
pub const RTM_DELNEXTHOP: u16 = 105;

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct NlMsgHdr {
    pub len: u32,
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

/// A raw netlink socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_SOCK_DIAG`, …).
pub fn socket(protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one message: a header of `kind` and `flags` (`NLM_F_REQUEST` added), then `body`.
pub fn send(socket: &OwnedFd, kind: u16, flags: u16, seq: u32, body: &[u8]) -> io::Result<()> {
    let header = NlMsgHdr {
        len: (size_of::<NlMsgHdr>() + body.len()) as u32,
        kind,
        flags: NLM_F_REQUEST | flags,
        seq,
        pid: 0,
    };
    let mut message = Vec::with_capacity(header.len as usize);
    // SAFETY: a fully initialised repr(C) struct, viewed as its bytes.
    message.extend_from_slice(unsafe {
        std::slice::from_raw_parts((&header as *const NlMsgHdr).cast(), size_of::<NlMsgHdr>())
    });
    message.extend_from_slice(body);
    // SAFETY: sending our own buffer of the given length.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The messages of one `recv`'s worth of bytes: each header and its payload.
pub fn messages(buf: &[u8]) -> io::Result<Vec<(NlMsgHdr, &[u8])>> {
    let mut found = Vec::new();
    let mut offset = 0usize;
    while offset + size_of::<NlMsgHdr>() <= buf.len() {
        // SAFETY: bounds checked; read_unaligned copies the header out.
        let header: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf[offset..].as_ptr().cast()) };
        let len = header.len as usize;
        if len < size_of::<NlMsgHdr>() || offset + len > buf.len() {
            return Err(io::Error::other("truncated netlink message"));
        }
        found.push((header, &buf[offset + size_of::<NlMsgHdr>()..offset + len]));
        offset += (len + 3) & !3;
    }
    Ok(found)
}

/// The error code of an `NLMSG_ERROR` payload (0: an acknowledgement).
pub fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// Dumps (`NLM_F_DUMP`) what a `kind` request with `body` asks for: the payloads of every
/// message of the answer's type, until `NLMSG_DONE`.
pub fn dump(socket: &OwnedFd, kind: u16, body: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
    send(socket, kind, NLM_F_DUMP, 1, body)?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into our own buffer of the given length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (header, payload) in messages(&buf[..n as usize])? {
            match header.kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    return Err(io::Error::from_raw_os_error(-error_code(payload)));
                }
                kind => found.push((kind, payload.to_vec())),
            }
        }
    }
}

/// The attributes (type without its flag bits, value) of a message's attribute area.
pub fn attributes(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut found = Vec::new();
    while bytes.len() >= 4 {
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff;
        if len < 4 || len > bytes.len() {
            break;
        }
        found.push((kind, &bytes[4..len]));
        bytes = &bytes[((len + 3) & !3).min(bytes.len())..];
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_are_walked_with_their_padding() {
        // Two messages: 16-byte header + 6-byte payload (padded to 24), then a bare header.
        let mut buf = Vec::new();
        for (kind, payload) in [(24u16, &[1u8, 2, 3, 4, 5, 6][..]), (NLMSG_DONE, &[][..])] {
            let len = (16 + payload.len()) as u32;
            buf.extend_from_slice(&len.to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(payload);
            buf.resize(buf.len().next_multiple_of(4), 0);
        }
        let found = messages(&buf).expect("well formed");
        assert_eq!(found.len(), 2);
        assert_eq!((found[0].0.kind, found[0].1), (24, &[1, 2, 3, 4, 5, 6][..]));
        assert_eq!(found[1].0.kind, NLMSG_DONE);
        assert!(messages(&buf[..20]).is_err(), "a cut message is an error");

        // Attributes: a 5-byte one (padded to 8) and a 4-byte empty one, nested flag cleared.
        let attrs = [5u16.to_ne_bytes(), 9u16.to_ne_bytes(), [7, 0], [0, 0]].concat();
        let attrs = [
            attrs,
            [4u16.to_ne_bytes(), (0x8000u16 | 30).to_ne_bytes()].concat(),
        ]
        .concat();
        assert_eq!(attributes(&attrs), vec![(9, &[7][..]), (30, &[][..])]);
    }

    /// The kernel's struct size (netlink.h): a mismatch would garble every message.
    #[test]
    fn the_header_matches_the_kernel_abi() {
        assert_eq!(size_of::<NlMsgHdr>(), 16);
    }
}
