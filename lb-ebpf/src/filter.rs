//! The early exit for packets to no frontend and no node address: one read of the address
//! filter (`lb_common::addr_filter`) instead of the conntrack and frontend lookups such a
//! packet would otherwise miss, one by one.
use lb_common::{MapAddr, addr_filter};

use crate::maps::ADDR_FILTER;

/// Whether `addr` may be a frontend's or this node's address: `false` is certain (the
/// agent sets an address's bit before anything uses it), `true` is not. Also `true` until
/// the agent armed the filter.
#[inline(always)]
pub fn may_be_local<A: MapAddr>(addr: A) -> bool {
    let armed = ADDR_FILTER.get(0).is_some_and(|&w| w == addr_filter::ARMED);
    if !armed {
        return true;
    }
    let (word, bit) = addr_filter::slot(addr.hash_word());
    ADDR_FILTER.get(word).is_none_or(|&w| w & bit != 0)
}
