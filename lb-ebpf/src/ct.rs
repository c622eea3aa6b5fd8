//! Connection tracking: a forward entry (client → VIP) pins the flow to its backend, a reverse
//! entry (backend → client) restores the VIP on replies.
use lb_common::{
    Backend, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FORWARD, CT_REVERSE, CtKey, CtValue, Outcome,
    PROTO_TCP, ct_lifetime_ns, outcome,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

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
        flags: tcp_flags_update(client, 0),
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

/// The reply direction of `client`'s flow once DNATed to `backend`.
#[inline(always)]
fn reply_flow(client: &Flow, backend: &Backend) -> Flow {
    Flow {
        proto: client.proto,
        src: backend.ip,
        dst: client.src,
        sport: backend.port,
        dport: client.sport,
        tcp_flags: 0,
    }
}

/// Recreates the reverse entry of a known flow if it is missing: LRU eviction can take one
/// side of a flow alone.
#[inline(always)]
pub fn ensure_reverse(
    client: &Flow,
    backend_id: u32,
    backend: &Backend,
    service_id: u32,
    now: u64,
) -> Result<(), Outcome> {
    if CONNTRACK
        .get_ptr(reverse_key(&reply_flow(client, backend)))
        .is_some()
    {
        return Ok(());
    }
    insert_reverse(client, backend_id, backend, service_id, now)
}

#[inline(always)]
fn insert_reverse(
    client: &Flow,
    backend_id: u32,
    backend: &Backend,
    service_id: u32,
    now: u64,
) -> Result<(), Outcome> {
    let reply = reply_flow(client, backend);
    let reverse = CtValue {
        backend_id,
        service_id,
        nat_addr: client.dst,
        nat_port: client.dport,
        flags: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
    };
    CONNTRACK
        .insert(reverse_key(&reply), reverse, 0)
        .map_err(|_| outcome::DROP_CT_FULL)
}

/// An entry's flags after seeing `flow`'s packet. Forward entries become established on the
/// client's first ACK without SYN, reverse entries on any reply; FIN or RST mean closing.
#[inline(always)]
pub fn tcp_flags_update(flow: &Flow, flags: u16) -> u16 {
    if flow.proto != PROTO_TCP {
        return flags;
    }
    let mut flags = flags;
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flags |= CT_FLAG_CLOSING;
    } else if flow.tcp_flags & TCP_SYN == 0 || flow.tcp_flags & TCP_ACK != 0 {
        flags |= CT_FLAG_ESTABLISHED;
    }
    flags
}

/// True if the entry outlived its lifetime: the flow is over, a new one may reuse the tuple.
#[inline(always)]
pub fn expired(entry: &CtValue, proto: u8, now: u64) -> bool {
    now.wrapping_sub(entry.last_seen_ns) > ct_lifetime_ns(proto, entry.flags)
}

/// Bumps an entry's last-seen time, TCP state and counters; returns the new flags.
#[inline(always)]
pub fn touch(entry: *mut CtValue, flow: &Flow, now: u64, bytes: u32) -> u16 {
    // SAFETY: `entry` comes from a map lookup in this program run. Racing updates from
    // another CPU can only lose a counter increment.
    unsafe {
        let flags = tcp_flags_update(flow, (*entry).flags);
        (*entry).last_seen_ns = now;
        (*entry).flags = flags;
        (*entry).packets += 1;
        (*entry).bytes += bytes as u64;
        flags
    }
}
