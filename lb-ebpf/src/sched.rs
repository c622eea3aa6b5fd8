//! The load-balancing algorithms. Each returns the backend id it picks, or `None` when it
//! cannot decide (the caller then falls back to random and counts it). Counters are u64:
//! the BPF target has 64-bit atomics only.
use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_loop};
use lb_common::{
    LEAST_CONN_SCAN, LeastLoaded, MapAddr, ServiceKey, ServiceValue, client_hash, flow_hash,
    scheduler, scheduler_of,
};

use crate::{
    atomic,
    family::Family,
    maps::{CONNECTIONS, ROUND_ROBIN, XLB_MAGLEV},
    parse::Flow,
};

/// The backend id in `slot` (1..=count) of a frontend.
#[inline(always)]
pub fn slot_backend<F: Family>(frontend_key: &ServiceKey<F::Addr>, slot: u16) -> Option<u32> {
    let key = ServiceKey {
        slot,
        ..*frontend_key
    };
    // SAFETY: value copied out immediately.
    unsafe { F::services().get(key) }.map(|s| s.backend_id)
}

/// Picks a backend for a new flow with the frontend's algorithm (`count` ≥ 1).
#[inline(always)]
pub fn pick<F: Family>(
    frontend_key: &ServiceKey<F::Addr>,
    frontend: &ServiceValue,
    flow: &Flow<F::Addr>,
) -> Option<u32> {
    let count = frontend.count as u32;
    match scheduler_of(frontend.flags) {
        scheduler::ROUND_ROBIN => {
            let turn = next_turn(frontend.service_id);
            slot_backend::<F>(frontend_key, (turn % u64::from(count)) as u16 + 1)
        }
        scheduler::SOURCE_HASH => slot_backend::<F>(
            frontend_key,
            (client_hash(flow.src.hash_word()) % count) as u16 + 1,
        ),
        scheduler::LEAST_CONN => least_conn::<F>(frontend_key, frontend.count),
        scheduler::MAGLEV => maglev(frontend.service_id, flow),
        _ => None,
    }
}

/// The frontend's turn counter, shared by all CPUs. Read, then advanced atomically: two CPUs
/// starting flows in the same instant may both get one turn (and the next one is skipped),
/// but the rotation never stalls or loses its place.
#[inline(always)]
fn next_turn(service_id: u32) -> u64 {
    match ROUND_ROBIN.get_ptr_mut(service_id) {
        // SAFETY: a pointer into the map value, valid for this run.
        Some(cursor) => unsafe {
            let turn = cursor.read_volatile();
            atomic::add(cursor, 1);
            turn
        },
        None => {
            // First flow of this frontend (or its cursor was evicted): start the rotation.
            let _ = ROUND_ROBIN.insert(service_id, 1, 0);
            0
        }
    }
}

/// Least-conn over the frontend's slots (all of them for services with up to
/// `LEAST_CONN_SCAN` backends; otherwise a window starting at a random slot), one slot per
/// `bpf_loop` step.
#[inline(always)]
fn least_conn<F: Family>(frontend_key: &ServiceKey<F::Addr>, count: u16) -> Option<u32> {
    let start = if count > LEAST_CONN_SCAN {
        // SAFETY: helper without side effects.
        (unsafe { bpf_get_prandom_u32() } % count as u32) as u16
    } else {
        0
    };
    let mut scan = LeastConnScan {
        key: *frontend_key,
        state: LeastLoaded::new(count, start),
    };
    // SAFETY: the callback only touches `scan`, which outlives the call.
    unsafe {
        bpf_loop(
            scan.state.steps(),
            least_conn_step::<F> as *const () as *mut c_void,
            (&mut scan as *mut LeastConnScan<F::Addr>).cast(),
            0,
        );
    }
    scan.state.best()
}

#[repr(C)]
struct LeastConnScan<A: MapAddr> {
    key: ServiceKey<A>,
    state: LeastLoaded,
}

/// One `bpf_loop` step: offers slot `index`'s backend and its open flows.
extern "C" fn least_conn_step<F: Family>(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `LeastConnScan` handed to `bpf_loop` by `least_conn`.
    let scan = unsafe { &mut *(ctx as *mut LeastConnScan<F::Addr>) };
    let slot = scan.state.slot(index as u32);
    if let Some(id) = slot_backend::<F>(&scan.key, slot) {
        let open = CONNECTIONS.get(id).copied().unwrap_or(0);
        scan.state.offer(id, open);
    }
    0
}

/// The backend id in the frontend's Maglev table at the flow's hash.
#[inline(always)]
fn maglev<A: MapAddr>(service_id: u32, flow: &Flow<A>) -> Option<u32> {
    // SAFETY: the agent never writes into a table the datapath can see (it swaps whole
    // tables), so one lookup gives a consistent table for size and entry alike.
    let table = unsafe { XLB_MAGLEV.get(&service_id) }?;
    let size = table.get(0).copied()?;
    if size == 0 {
        return None;
    }
    let hash = flow_hash(
        flow.src.hash_word(),
        flow.dst.hash_word(),
        flow.sport,
        flow.dport,
        flow.proto,
    );
    let id = table.get(hash % size + 1).copied()?;
    (id != 0).then_some(id)
}

/// A new flow to `backend_id` is open.
#[inline(always)]
pub fn flow_opened(backend_id: u32) {
    if let Some(open) = CONNECTIONS.get_ptr_mut(backend_id) {
        // SAFETY: map value pointer; atomic access only.
        unsafe { atomic::add(open, 1) };
    }
}

/// A flow to `backend_id` closed (FIN/RST seen) or expired.
#[inline(always)]
pub fn flow_closed(backend_id: u32) {
    if let Some(open) = CONNECTIONS.get_ptr_mut(backend_id) {
        // SAFETY: map value pointer; atomic access only. Never below zero: the agent's
        // recount can have lowered it already.
        unsafe {
            if open.read_volatile() > 0 {
                atomic::add(open, u64::MAX);
            }
        }
    }
}
