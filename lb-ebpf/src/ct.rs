//! Connection tracking: a forward entry (client → VIP) pins the flow to its backend, a reverse
//! entry (backend → client) restores the VIP on replies.
use lb_common::{Backend, CT_FORWARD, CT_REVERSE, CtKey, CtValue, Outcome, outcome};

use crate::{maps::CONNTRACK, parse::Flow};

#[inline(always)]
pub fn forward_key(flow: &Flow) -> CtKey {
    CtKey {
        src: flow.src,
        dst: flow.dst,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        dir: CT_FORWARD,
        _pad: [0; 2],
    }
}

#[inline(always)]
pub fn reverse_key(flow: &Flow) -> CtKey {
    CtKey {
        dir: CT_REVERSE,
        ..forward_key(flow)
    }
}

/// Records both directions of a new flow from `client` (a pod's packet to a VIP).
#[inline(always)]
pub fn create(
    client: &Flow,
    backend_id: u32,
    backend: &Backend,
    service_id: u32,
    now: u64,
    bytes: u32,
) -> Result<(), Outcome> {
    let forward = CtValue {
        backend_id,
        service_id,
        nat_addr: backend.ip,
        nat_port: backend.port,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: bytes as u64,
    };
    CONNTRACK
        .insert(forward_key(client), forward, 0)
        .map_err(|_| outcome::DROP_CT_FULL)?;
    insert_reverse(client, backend_id, backend, service_id, now)
}

/// (Re)creates the reverse entry of a forward flow; LRU eviction can take one side alone.
#[inline(always)]
pub fn insert_reverse(
    client: &Flow,
    backend_id: u32,
    backend: &Backend,
    service_id: u32,
    now: u64,
) -> Result<(), Outcome> {
    let reply = Flow {
        proto: client.proto,
        src: backend.ip,
        dst: client.src,
        sport: backend.port,
        dport: client.sport,
    };
    let reverse = CtValue {
        backend_id,
        service_id,
        nat_addr: client.dst,
        nat_port: client.dport,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
    };
    CONNTRACK
        .insert(reverse_key(&reply), reverse, 0)
        .map_err(|_| outcome::DROP_CT_FULL)
}

/// Bumps an entry's last-seen time and counters.
#[inline(always)]
pub fn touch(entry: *mut CtValue, now: u64, bytes: u32) {
    // SAFETY: `entry` comes from a map lookup in this program run. Racing updates from
    // another CPU can only lose a counter increment.
    unsafe {
        (*entry).last_seen_ns = now;
        (*entry).packets += 1;
        (*entry).bytes += bytes as u64;
    }
}
