//! The netlink socket both hand-written netlink users open (sock_diag in `sockets`,
//! rtnetlink announcements in `route_watch`).
use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

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
