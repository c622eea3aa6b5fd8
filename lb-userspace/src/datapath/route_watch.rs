//! Raises the routing generation (`XLB_ROUTE_GEN`) whenever the kernel announces a change
//! a FIB lookup's result may depend on (routes, rules, nexthop objects, neighbours, links,
//! addresses; both families), so
//! the programs look up again instead of using a next hop they cached before it
//! (`lb-ebpf/src/hop.rs`). Raised once at start too: changes made while no agent listened
//! count as well. Each raise also says whether lookups may depend on the source address
//! (`route_policy`).
use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData};
use lb_common::map_names;

use super::{
    netlink,
    pins::PinLayout,
    route_policy::{self, SourceFree},
};
use lb_common::route_gen;

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV4_RULE: u32 = 0x80;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
/// `RTNLGRP_IPV6_RULE` (19): IPv6 policy routing rules.
const RTMGRP_IPV6_RULE: u32 = 1 << (19 - 1);
/// `RTNLGRP_NEXTHOP`: nexthop objects (`ip nexthop`). A route using one is not announced
/// again when the object changes. Beyond the 32 bits of `nl_groups`: joined by socket
/// option.
const RTNLGRP_NEXTHOP: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum RouteWatchError {
    #[error("opening pinned map {path}: {message}")]
    Map { path: PathBuf, message: String },
    #[error("subscribing to routing changes (rtnetlink): {0}; the agent needs CAP_NET_ADMIN")]
    Netlink(io::Error),
}

/// The routing generation in the pinned map.
pub struct RouteGeneration {
    map: Array<MapData, u64>,
}

impl RouteGeneration {
    pub fn open(pins: &PinLayout) -> Result<Self, RouteWatchError> {
        let path = pins.map(map_names::ROUTE_GEN);
        let fail = |message: String| RouteWatchError::Map {
            path: path.clone(),
            message,
        };
        let data = MapData::from_pin(&path).map_err(|e| fail(e.to_string()))?;
        let map = Array::try_from(aya::maps::Map::Array(data)).map_err(|e| fail(e.to_string()))?;
        Ok(Self { map })
    }

    /// Raises the generation and sets the source-free flags (`lb_common::route_gen`) in one
    /// write; returns the new value.
    pub fn raise(&mut self, free: SourceFree) -> Result<u64, aya::maps::MapError> {
        let next = route_gen::next(self.map.get(&0, 0)?, free.bits());
        self.map.set(0, next, 0)?;
        Ok(next)
    }
}

/// `route_policy::source_free`, or "may depend" (the safe answer) if it cannot be told.
fn current_policy() -> SourceFree {
    route_policy::source_free().unwrap_or_else(|e| {
        log::warn!(
            "reading the routing policy (rules and routes): {e}; next hops are cached per \
             source address"
        );
        SourceFree::default()
    })
}

/// Subscribes to the kernel's routing announcements and raises the generation on each,
/// from a thread of its own, for the agent's lifetime.
pub fn spawn(pins: &PinLayout) -> Result<(), RouteWatchError> {
    let mut generation = RouteGeneration::open(pins)?;
    let socket = subscribe().map_err(RouteWatchError::Netlink)?;
    let policy = current_policy();
    log::info!("{}", policy.describe());
    generation.raise(policy).map_err(|e| RouteWatchError::Map {
        path: pins.map(map_names::ROUTE_GEN),
        message: e.to_string(),
    })?;
    std::thread::Builder::new()
        .name("route-watch".into())
        .spawn(move || watch(socket, generation, policy))
        .map_err(RouteWatchError::Netlink)?;
    Ok(())
}

/// A socket that receives the announcements `watch` reacts to (of the calling thread's
/// network namespace).
pub fn subscribe() -> io::Result<OwnedFd> {
    let socket = super::netlink::socket(libc::NETLINK_ROUTE)?;
    // SAFETY: all-zero is a valid sockaddr_nl.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = RTMGRP_LINK
        | RTMGRP_NEIGH
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV4_RULE
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV6_ROUTE
        | RTMGRP_IPV6_RULE;
    // SAFETY: `addr` is a sockaddr_nl of the size passed.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setsockopt with a u32 option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            (&RTNLGRP_NEXTHOP as *const u32).cast(),
            std::mem::size_of::<u32>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// The least time between two dumps of the routing policy: on a node whose routes churn
/// (a BGP full table) each burst of announcements would otherwise dump every route.
const POLICY_RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// When the policy is dumped again after a burst that may have changed it: at once if the
/// last dump is `POLICY_RECHECK_INTERVAL` old, else when it is; meanwhile the programs are
/// told that lookups may depend on the source (always right, only slower).
#[derive(Debug)]
struct Recheck {
    last: Instant,
    due: Option<Instant>,
}

impl Recheck {
    fn new(now: Instant) -> Self {
        Recheck {
            last: now,
            due: None,
        }
    }

    /// After a burst (`changed`: it may have changed the policy), or with `changed` false
    /// when woken for a due dump: whether to dump now. Otherwise a change leaves a dump due.
    fn dump_now(&mut self, changed: bool, now: Instant) -> bool {
        let wanted = changed || self.due.is_some_and(|due| due <= now);
        if !wanted {
            return false;
        }
        let next = self.last + POLICY_RECHECK_INTERVAL;
        if now >= next {
            self.last = now;
            self.due = None;
            return true;
        }
        self.due = Some(next);
        false
    }

    /// Whether a dump is due (a change was heard since the last).
    fn pending(&self) -> bool {
        self.due.is_some()
    }

    /// How long to wait for announcements before a due dump (`None`: no dump due).
    fn wait(&self, now: Instant) -> Option<Duration> {
        self.due.map(|due| due.saturating_duration_since(now))
    }
}

/// Waits up to `timeout` (`None`: for ever) for `socket` to be readable; whether it is.
fn readable(socket: &OwnedFd, timeout: Option<Duration>) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up: a due dump is never woken for early and found not due.
    let ms = timeout.map_or(-1, |t| {
        i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
    });
    // SAFETY: one pollfd, as passed.
    match unsafe { libc::poll(&mut fd, 1, ms) } {
        n if n < 0 => Err(io::Error::last_os_error()),
        n => Ok(n > 0),
    }
}

fn watch(socket: OwnedFd, mut generation: RouteGeneration, mut dumped: SourceFree) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut recheck = Recheck::new(Instant::now());
    loop {
        // Not readable: woken for a due dump.
        let heard = match readable(&socket, recheck.wait(Instant::now())) {
            Ok(heard) => heard,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return stopped(&e),
        };
        let changed = if heard {
            match read_burst(&socket, &mut buf) {
                Ok(changed) => changed,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return stopped(&e),
            }
        } else {
            false
        };
        let dumps = recheck.dump_now(changed, Instant::now());
        if dumps {
            dumped = dump_policy(dumped);
        } else if !heard {
            continue; // woken before the dump was due: nothing to tell the programs
        }
        // While a dump is due, the programs are told lookups may depend on the source.
        let policy = if recheck.pending() {
            SourceFree::default()
        } else {
            dumped
        };
        if let Err(e) = generation.raise(policy) {
            log::warn!("raising the routing generation: {e}");
        }
    }
}

/// Reads a burst of announcements (the socket is readable); whether they may have changed
/// the policy (`changes_policy`). Announcements come in bursts (a link going down takes its
/// routes, addresses and neighbours): the rest of the burst is read first, so the policy is
/// checked once per burst, only if a rule, route or nexthop object changed (neighbours
/// change all the time on a busy node; a dump of every route each time would cost), and at
/// most once per `POLICY_RECHECK_INTERVAL` (`Recheck`).
fn read_burst(socket: &OwnedFd, buf: &mut [u8]) -> io::Result<bool> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let mut changed = if n < 0 {
        let e = io::Error::last_os_error();
        // Lost announcements (the socket's buffer overran) may have been anything.
        if e.raw_os_error() != Some(libc::ENOBUFS) {
            return Err(e);
        }
        true
    } else {
        changes_policy(&buf[..n as usize])
    };
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return Ok(changed);
        }
        changed |= changes_policy(&buf[..n as usize]);
    }
}

fn stopped(e: &io::Error) {
    log::error!(
        "routing announcements stopped ({e}); cached next hops now expire within a second \
         instead of at once"
    );
}

/// Dumps the policy; logs it if it differs from the last dump's (`last`).
fn dump_policy(last: SourceFree) -> SourceFree {
    let now = current_policy();
    if now != last {
        log::info!("{}", now.describe());
    }
    now
}

/// Whether announcements in `buf` may change `route_policy`'s answer: rules, routes and
/// nexthop objects (or anything unreadable).
fn changes_policy(buf: &[u8]) -> bool {
    use netlink::{
        RTM_DELNEXTHOP, RTM_DELROUTE, RTM_DELRULE, RTM_NEWNEXTHOP, RTM_NEWROUTE, RTM_NEWRULE,
    };
    netlink::messages(buf).map_or(true, |messages| {
        messages.iter().any(|(header, _)| {
            matches!(
                header.kind,
                RTM_NEWROUTE
                    | RTM_DELROUTE
                    | RTM_NEWRULE
                    | RTM_DELRULE
                    | RTM_NEWNEXTHOP
                    | RTM_DELNEXTHOP
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(kind: u16) -> Vec<u8> {
        let mut message = 20u32.to_ne_bytes().to_vec();
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&[0; 14]);
        message
    }

    #[test]
    fn only_rules_routes_and_nexthop_objects_send_the_policy_to_be_checked_again() {
        const RTM_NEWNEIGH: u16 = 28;
        const RTM_NEWADDR: u16 = 20;
        let quiet = [announcement(RTM_NEWNEIGH), announcement(RTM_NEWADDR)].concat();
        assert!(!changes_policy(&quiet));
        for kind in [24, 25, 32, 33, 104, 105] {
            let burst = [announcement(RTM_NEWNEIGH), announcement(kind)].concat();
            assert!(changes_policy(&burst), "message type {kind}");
        }
        assert!(changes_policy(&quiet[..18]), "unreadable: checked again");
    }

    #[test]
    fn the_policy_is_dumped_at_most_once_per_interval_and_a_change_heard_sooner_waits() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut recheck = Recheck::new(start);
        assert_eq!(
            recheck.wait(start),
            None,
            "nothing due after the start's dump"
        );
        assert!(!recheck.dump_now(false, at(100)), "no change, nothing due");
        // A change 300 ms after the last dump: due at the interval's end.
        assert!(!recheck.dump_now(true, at(300)));
        assert_eq!(recheck.wait(at(300)), Some(Duration::from_millis(700)));
        assert!(
            !recheck.dump_now(true, at(600)),
            "still inside the interval"
        );
        assert!(!recheck.dump_now(false, at(999)), "woken early: not yet");
        assert!(recheck.pending());
        assert!(recheck.dump_now(false, at(1_000)), "due");
        assert_eq!(recheck.wait(at(1_000)), None);
        assert!(!recheck.pending());
        // Quiet for longer than the interval: the next change is dumped at once.
        assert!(!recheck.dump_now(false, at(2_500)));
        assert!(recheck.dump_now(true, at(2_500)));
        assert!(!recheck.dump_now(true, at(2_600)));
        assert_eq!(recheck.wait(at(2_600)), Some(Duration::from_millis(900)));
    }
}
