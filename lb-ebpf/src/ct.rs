//! Connection tracking: a forward entry (client → frontend) pins the flow to its backend, a
//! reverse entry (backend → client, or backend → node address for SNATed flows) restores the
//! frontend on replies.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_get_prandom_u32};
use lb_common::{
    Backend, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FLAG_SNAT, CT_FORWARD, CT_REVERSE, CtKey,
    CtValue, NodeConfig, Outcome, PROTO_TCP, outcome,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// SNAT ports tried per new flow before giving up (a random start, then its neighbours).
const SNAT_TRIES: u32 = 16;

use crate::{
    maps::{CONNTRACK, CT_TIMEOUTS},
    parse::Flow,
};

/// How a flow is translated besides DNAT.
#[derive(Clone, Copy)]
pub struct Nat {
    /// `CT_FLAG_EXTERNAL` and/or `CT_FLAG_SNAT`.
    pub flags: u16,
    /// With `CT_FLAG_SNAT`: the client's new source, network byte order.
    pub snat_addr: u32,
    pub snat_port: u16,
}

impl Nat {
    pub const NONE: Nat = Nat {
        flags: 0,
        snat_addr: 0,
        snat_port: 0,
    };
    #[inline(always)]
    fn snat(&self) -> bool {
        self.flags & CT_FLAG_SNAT != 0
    }
}

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

/// Records a new flow from `client` (its packet to a frontend). For SNATed flows the
/// reverse entry already exists: `claim_snat_port` made it.
#[inline(always)]
pub fn create(
    client: &Flow,
    backend_id: u32,
    backend: &Backend,
    service_id: u32,
    now: u64,
    bytes: u32,
    nat: Nat,
) -> Result<(), Outcome> {
    let forward = CtValue {
        backend_id,
        service_id,
        nat_addr: backend.ip,
        nat_port: backend.port,
        flags: tcp_flags_update(client, nat.flags),
        snat_addr: nat.snat_addr,
        snat_port: nat.snat_port,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: bytes as u64,
    };
    CONNTRACK
        .insert(forward_key(client), forward, 0)
        .map_err(|_| outcome::DROP_CT_FULL)?;
    if nat.snat() {
        return Ok(());
    }
    let (key, mut value) = reverse_entry(client, backend_id, backend, service_id, now, nat);
    clear_counters(&mut value);
    insert(&key, &value, 0).map_err(|_| outcome::DROP_CT_FULL)
}

/// The reply direction of `client`'s flow once translated to `backend`: backend → client,
/// or backend → the SNAT address.
#[inline(always)]
fn reply_flow(client: &Flow, backend: &Backend, nat: &Nat) -> Flow {
    let (dst, dport) = if nat.snat() {
        (nat.snat_addr, nat.snat_port)
    } else {
        (client.src, client.sport)
    };
    Flow {
        proto: client.proto,
        src: backend.ip,
        dst,
        sport: backend.port,
        dport,
        tcp_flags: 0,
    }
}

/// Inserts by reference: handing the entry over by value made a copy, and LLVM turned the
/// copy of its zeroed counters into a memset call.
#[inline(always)]
fn insert(key: &CtKey, value: &CtValue, flags: u64) -> Result<(), ()> {
    CONNTRACK.insert(key, value, flags).map_err(|_| ())
}

/// Zeroes a new entry's counters in place, right before it is inserted. Zero words written
/// with the rest of the entry become, once LLVM merges them, a call to a byte-at-a-time
/// memset (no inline expansion on this target): volatile writes stay two stores.
#[inline(always)]
fn clear_counters(value: &mut CtValue) {
    // SAFETY: plain writes to fields of a local.
    unsafe {
        core::ptr::write_volatile(&raw mut value.packets, 0);
        core::ptr::write_volatile(&raw mut value.bytes, 0);
    }
}

/// The reply side's entry of `client`'s flow; its counters are placeholders until
/// `clear_counters`.
#[inline(always)]
fn reverse_entry(
    client: &Flow,
    backend_id: u32,
    backend: &Backend,
    service_id: u32,
    now: u64,
    nat: Nat,
) -> (CtKey, CtValue) {
    let (snat_addr, snat_port) = if nat.snat() {
        (client.src, client.sport)
    } else {
        (0, 0)
    };
    let value = CtValue {
        backend_id,
        service_id,
        nat_addr: client.dst,
        nat_port: client.dport,
        flags: nat.flags,
        snat_addr,
        snat_port,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        // Placeholders: see `clear_counters`.
        packets: u64::MAX,
        bytes: u64::MAX,
    };
    (reverse_key(&reply_flow(client, backend, &nat)), value)
}

/// Recreates the reverse entry of a known flow if it is missing: LRU eviction can take one
/// side of a flow alone. `known` is the flow's forward entry.
#[inline(always)]
pub fn ensure_reverse(
    client: &Flow,
    known: &CtValue,
    backend: &Backend,
    now: u64,
) -> Result<(), Outcome> {
    let nat = Nat {
        flags: known.flags & (lb_common::CT_FLAG_EXTERNAL | CT_FLAG_SNAT),
        snat_addr: known.snat_addr,
        snat_port: known.snat_port,
    };
    let (key, mut value) = reverse_entry(
        client,
        known.backend_id,
        backend,
        known.service_id,
        now,
        nat,
    );
    if CONNTRACK.get_ptr(key).is_some() {
        return Ok(());
    }
    clear_counters(&mut value);
    insert(&key, &value, 0).map_err(|_| outcome::DROP_CT_FULL)
}

/// Picks a free source port on `snat_addr` for `client`'s flow to `backend` and claims it by
/// creating the flow's reverse entry. A port is free when no live flow from that backend
/// port already replies to it; expired claims are taken over.
#[inline(always)]
pub fn claim_snat_port(
    client: &Flow,
    backend_id: u32,
    backend: &Backend,
    service_id: u32,
    config: &NodeConfig,
    nat_flags: u16,
    now: u64,
) -> Result<Nat, Outcome> {
    let min = config.snat_port_min as u32;
    let span = (config.snat_port_max as u32).saturating_sub(min) + 1;
    // SAFETY: helper without side effects.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    for i in 0..SNAT_TRIES {
        if i >= span {
            break;
        }
        let port = (min + (start + i) % span) as u16;
        let nat = Nat {
            flags: nat_flags | CT_FLAG_SNAT,
            snat_addr: config.snat_addr,
            snat_port: port.to_be(),
        };
        let (key, mut value) = reverse_entry(client, backend_id, backend, service_id, now, nat);
        clear_counters(&mut value);
        if insert(&key, &value, BPF_NOEXIST as u64).is_ok() {
            return Ok(nat);
        }
        // SAFETY: copy of a map value.
        let stale =
            unsafe { CONNTRACK.get(key) }.is_some_and(|held| expired(held, client.proto, now));
        if stale && insert(&key, &value, 0).is_ok() {
            return Ok(nat);
        }
    }
    Err(outcome::DROP_SNAT_EXHAUSTED)
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
    let timeouts = CT_TIMEOUTS.get(0).copied().unwrap_or_default();
    now.saturating_sub(entry.last_seen_ns) > timeouts.lifetime_ns(proto, entry.flags)
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
