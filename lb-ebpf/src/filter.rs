//! The early exits for packets a service cannot concern, each one array read instead of the
//! lookups such a packet would otherwise miss one by one: the address filter
//! (`lb_common::addr_filter`) for destinations that are no frontend and no node address,
//! the reply filter for sources that are no backend (so no reply to a translated flow).
use aya_ebpf::maps::Array;
use lb_common::{MapAddr, addr_filter};

use crate::{
    maps::{ADDR_FILTER, REPLY_FILTER},
    read::Read,
};

/// Whether `addr` may be a frontend's or this node's address: `false` is certain (the
/// agent sets an address's bit before anything uses it), `true` is not. Also `true` until
/// the agent armed the filter.
#[inline(always)]
pub fn may_be_local<A: MapAddr>(addr: A) -> bool {
    may_hold(&ADDR_FILTER, addr_filter::slot(addr.hash_word()))
}

/// Whether `addr`, `port` (network byte order) and `proto` may be a backend's, i.e. a
/// packet from there may answer a translated flow; `false` is certain, as above. `read`:
/// the hook's way to the filter (`crate::read`).
#[inline(always)]
pub fn may_be_backend<A: MapAddr>(addr: A, port: u16, proto: u8, read: Read) -> bool {
    let word = addr.hash_word();
    match read {
        Read::Inline => may_hold(&REPLY_FILTER, addr_filter::reply_slot(word, port, proto)),
        Read::Call => may_be_backend_word(word, port, proto),
    }
}

/// `may_be_backend` of an address's hash word, as a subprogram (`Read::Call`). It takes the
/// word, not the address: an IPv6 address by value gave it a 40-byte frame, on top of the
/// largest stage's.
#[inline(never)]
fn may_be_backend_word(word: u32, port: u16, proto: u8) -> bool {
    may_hold(&REPLY_FILTER, addr_filter::reply_slot(word, port, proto))
}

#[inline(always)]
fn may_hold(filter: &Array<u64>, (word, bit): (u32, u64)) -> bool {
    let armed = filter.get(0).is_some_and(|&w| w == addr_filter::ARMED);
    if !armed {
        return true;
    }
    filter.get(word).is_none_or(|&w| w & bit != 0)
}
