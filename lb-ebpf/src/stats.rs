//! Outcome and traffic counters.
use aya_ebpf::maps::PerCpuArray;
use lb_common::{Outcome, TrafficCounter};

use crate::{
    family::Family,
    maps::{BACKEND_STATS, SERVICE_STATS, STATS, STATS6},
};

/// Counts an outcome of an IPv4 program run.
#[inline(always)]
pub fn count(outcome: Outcome) {
    count_in(&STATS, outcome);
}

/// Counts an outcome of an IPv6 program run.
#[inline(always)]
pub fn count6(outcome: Outcome) {
    count_in(&STATS6, outcome);
}

/// Counts an outcome in family `F`'s counters.
#[inline(always)]
pub fn count_family<F: Family>(outcome: Outcome) {
    count_in(F::stats(), outcome);
}

#[inline(always)]
fn count_in(map: &PerCpuArray<u64>, outcome: Outcome) {
    if let Some(counter) = map.get_ptr_mut(outcome) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *counter += 1 };
    }
}

/// Adds one packet of `bytes` (the first of a new flow if `new_flow`) to the service's and
/// the backend's counters.
#[inline(always)]
pub fn count_traffic(service_id: u32, backend_id: u32, bytes: u32, new_flow: bool) {
    add(&SERVICE_STATS, service_id, bytes, new_flow);
    add(&BACKEND_STATS, backend_id, bytes, new_flow);
}

#[inline(always)]
fn add(map: &PerCpuArray<TrafficCounter>, id: u32, bytes: u32, new_flow: bool) {
    if let Some(counter) = map.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(bytes);
            (*counter).flows += u64::from(new_flow);
        }
    }
}
