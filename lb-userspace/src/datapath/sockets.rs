//! Node processes' UDP sockets connected (through a frontend) to a backend that was removed:
//! destroyed with `SOCK_DESTROY` (sock_diag netlink), so the process gets an error and, when
//! it connects again, a live backend — instead of sending into a deleted pod forever.
//! (A connected UDP socket never passes the sendmsg hook again, so it cannot be re-pointed.)
//!
//! Hand-written netlink: the netlink crates (netlink-packet-sock-diag) build
//! SOCK_DIAG_BY_FAMILY dump requests only, not SOCK_DESTROY.
use std::{
    collections::BTreeSet,
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, OwnedFd},
};

use super::netlink::{self, NLM_F_ACK, NLM_F_DUMP, NLMSG_DONE, NLMSG_ERROR};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

struct Netlink(OwnedFd);

impl Netlink {
    fn open() -> io::Result<Netlink> {
        netlink::socket(NETLINK_SOCK_DIAG).map(Netlink)
    }

    fn send(&self, kind: u16, flags: u16, id: SockId, seq: u32) -> io::Result<()> {
        let body = ReqV2 {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_UDP as u8,
            states: u32::MAX,
            id,
            ..Default::default()
        };
        // SAFETY: a fully initialised repr(C) struct without padding, viewed as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&body as *const ReqV2).cast::<u8>(), size_of::<ReqV2>())
        };
        netlink::send(&self.0, kind, flags, seq, bytes)
    }

    /// Reads messages until NLMSG_DONE or an error/ack; returns the diag messages seen and
    /// the error code of an NLMSG_ERROR (0 = ack).
    fn receive(&self) -> io::Result<(Vec<DiagMsg>, Option<i32>)> {
        let mut found = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receiving into our own buffer of the given length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for (header, payload) in netlink::messages(&buf[..n as usize])? {
                match header.kind {
                    NLMSG_DONE => return Ok((found, None)),
                    NLMSG_ERROR => return Ok((found, Some(netlink::error_code(payload)))),
                    SOCK_DIAG_BY_FAMILY if payload.len() >= size_of::<DiagMsg>() => {
                        // SAFETY: length checked; read_unaligned copies the message out.
                        found.push(unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) });
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Destroys this network namespace's UDP sockets whose cookie is in `cookies`; returns how
/// many were destroyed.
pub fn destroy_udp(cookies: &BTreeSet<u64>) -> io::Result<usize> {
    if cookies.is_empty() {
        return Ok(0);
    }
    let netlink = Netlink::open()?;
    netlink.send(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, SockId::default(), 1)?;
    let (sockets, _) = netlink.receive()?;
    let mut destroyed = 0;
    for (seq, socket) in sockets.iter().enumerate() {
        let cookie = u64::from(socket.id.cookie[0]) | (u64::from(socket.id.cookie[1]) << 32);
        if !cookies.contains(&cookie) {
            continue;
        }
        netlink.send(SOCK_DESTROY, NLM_F_ACK, socket.id, seq as u32 + 2)?;
        match netlink.receive()? {
            (_, Some(0)) => destroyed += 1,
            (_, Some(code)) => log::warn!(
                "destroying UDP socket {cookie:#x}: {}",
                io::Error::from_raw_os_error(-code)
            ),
            (_, None) => {}
        }
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's struct sizes (inet_diag.h): a mismatch would garble every message.
    #[test]
    fn netlink_structs_match_the_kernel_abi() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<ReqV2>(), 56);
        assert_eq!(size_of::<DiagMsg>(), 72);
    }
}
