//! Service balancing shared by every hook: find the frontend, follow a tracked flow or pick
//! a backend for a new one, record it. The hooks only parse and rewrite packets.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_get_prandom_u32};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CT_FLAG_CLOSING, CT_FLAG_EXTERNAL, CT_FLAG_SNAT, MapAddr,
    Outcome, REVERSE_CHECK_NS, SCOPE_EXTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY,
    SVC_FLAG_SNAT, SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue, outcome,
};

use crate::{
    ct::{self, Insert, Nat, Picked},
    family::Family,
    filter,
    parse::Flow,
    read::Read,
    sched, stats,
};

/// What to do with a packet to a frontend.
pub enum Decision<A> {
    /// Rewrite the destination to `dst` (and the source to `src` if set).
    Translate {
        dst: Addr<A>,
        src: Option<Addr<A>>,
        outcome: Outcome,
    },
    /// No usable endpoint: answer with ICMP port unreachable.
    Reject,
}

/// The datapath clock (CLOCK_MONOTONIC at tick resolution, from jiffies), by the name the
/// hooks know it.
pub use crate::clock::now_ns;

/// A backend that still belongs to `service_id` (ids are never shared between services; a
/// free id's slot holds service id 0, which no service has).
#[inline(always)]
pub fn live_backend<F: Family>(backend_id: u32, service_id: u32) -> Option<Backend<F::Addr>> {
    let backend = F::backends().get(backend_id).copied()?;
    (service_id != 0 && backend.service_id == service_id).then_some(backend)
}

#[inline(always)]
pub fn is_node_ip<F: Family>(addr: F::Addr) -> bool {
    // SAFETY: presence check only.
    unsafe { F::node_ips().get(addr) }.is_some()
}

/// The frontend `flow` is addressed to in `scope`: its exact VIP, else a NodePort when the
/// destination is one of this node's addresses (or, for node processes, loopback).
#[inline(always)]
pub fn find_frontend<F: Family>(
    flow: &Flow<F::Addr>,
    scope: u8,
    loopback_is_node: bool,
) -> Option<(ServiceKey<F::Addr>, ServiceValue)> {
    // 0.0.0.0 (::) is where NodePorts are stored, not an address a packet may ask for: only
    // real node addresses (and loopback for node processes) reach them, below.
    let any = F::Addr::default();
    if flow.dst == any {
        return None;
    }
    let key = ServiceKey {
        vip: flow.dst,
        port: flow.dport,
        slot: 0,
        proto: flow.proto,
        scope,
        _pad: [0; 2],
    };
    // SAFETY: values copied out immediately.
    if let Some(value) = unsafe { F::services().get(key) } {
        return Some((key, *value));
    }
    let loopback = loopback_is_node && F::is_loopback(flow.dst);
    if !loopback && !is_node_ip::<F>(flow.dst) {
        return None;
    }
    let key = ServiceKey { vip: any, ..key };
    unsafe { F::services().get(key) }.map(|value| (key, *value))
}

/// Whether `follow` is a packet's first look at its flow's entry or a second one (after an
/// insert found the tuple taken): an expired entry is counted closed on the first only.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Look {
    First,
    Again,
}

/// The tracked backend of a known, live flow (`None`: not tracked, expired, or its backend
/// left: balance it as a new flow). Hooks check this first: most packets belong to one.
#[inline(always)]
pub fn follow<F: Family>(
    flow: &Flow<F::Addr>,
    scope: u8,
    bytes: u32,
    now: u64,
    look: Look,
) -> Option<Result<Decision<F::Addr>, Outcome>> {
    let entry = ct::forward_entry::<F>(flow)?;
    // SAFETY: copy of a map value from this run's lookup.
    let known = ct::known(entry);
    // Conntrack keys carry no hook: a packet from outside with a pod's 5-tuple (spoofed)
    // must not ride that pod's flow into the cluster, nor a pod's packet an outside one.
    if (known.flags & CT_FLAG_EXTERNAL != 0) != (scope == SCOPE_EXTERNAL) {
        return None;
    }
    // A flow whose backend left the service, or whose entry outlived its lifetime (the
    // tuple is being reused), is balanced again as a new flow.
    let expired = ct::aged_out(known.last_seen_ns, known.flags, flow.proto, now);
    if !expired && let Some(backend) = live_backend::<F>(known.backend_id, known.service_id) {
        let flags = ct::touch(entry, flow, now, bytes);
        if flags & CT_FLAG_CLOSING != 0 && known.flags & CT_FLAG_CLOSING == 0 {
            sched::flow_closed(known.backend_id);
        }
        // The reply's entry is re-created if the LRU evicted it; checking on every packet
        // would cost a lookup each, so only on the first packet of each REVERSE_CHECK_NS
        // window (a busy flow is still checked every window, an idle one on its return).
        if now / REVERSE_CHECK_NS != known.last_seen_ns / REVERSE_CHECK_NS
            && let Err(o) = ct::ensure_reverse::<F>(flow, &known, &backend, now)
        {
            return Some(Err(o));
        }
        stats::count_traffic(known.service_id, known.backend_id, bytes, false);
        let src = (known.flags & CT_FLAG_SNAT != 0).then_some((known.snat_addr, known.snat_port));
        let outcome = if scope == SCOPE_EXTERNAL {
            outcome::EXTERNAL_ESTABLISHED
        } else {
            outcome::DNAT_ESTABLISHED
        };
        return Some(Ok(Decision::Translate {
            dst: (backend.ip, backend.port),
            src,
            outcome,
        }));
    }
    if expired && known.flags & CT_FLAG_CLOSING == 0 && look == Look::First {
        sched::flow_closed(known.backend_id);
    }
    None
}

/// Whether a new flow's packet was looked up before it is balanced (`new_flow`). Its entry
/// is written only if the tuple has none (`Insert::Exclusive`), but for `Final`: the first
/// packets of one flow on two CPUs may both miss its entry, and the one whose insert finds
/// the other's follows it (netfilter's clash resolution may send them apart).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The hook looked the flow up (`follow`) and found nothing to follow; the entry an
    /// insert finds is looked at again (another CPU's, or the one found before).
    Done,
    /// Not looked up (a packet that `ct::opens` a connection): a flow that owns the tuple
    /// is followed by `new_flow`.
    Skipped,
    /// Looked up or not, a packet not recorded (its tuple taken, or refused) is left to the
    /// caller to follow: `Err(MAY_BE_TRACKED)`, nothing recorded, nothing held. For a stage
    /// without the stack for `follow` (`xdp6`); the caller follows, and comes back with
    /// `Final` if it found nothing to follow.
    Deferred,
    /// The caller followed the flow after `Deferred` and found nothing to follow: the
    /// entry is replaced.
    Final,
}

impl Lookup {
    #[inline(always)]
    pub fn after(followed: bool) -> Self {
        if followed {
            Lookup::Done
        } else {
            Lookup::Skipped
        }
    }
}

/// What `new_flow` returns for `Lookup::Deferred` when the flow may be tracked. Not an
/// outcome of the table: the caller follows the flow and never counts it.
pub const MAY_BE_TRACKED: Outcome = u32::MAX - 1;

/// Picks a backend for a flow that is not (or no longer) tracked and records the flow.
/// `Err` carries the outcome of packets that are not translated (passed or dropped).
#[inline(always)]
pub fn balance_new<F: Family>(
    flow: &Flow<F::Addr>,
    scope: u8,
    bytes: u32,
    now: u64,
    lookup: Lookup,
) -> Result<Decision<F::Addr>, Outcome> {
    let found = find_frontend::<F>(flow, scope, false).ok_or(outcome::PASS_NOT_SERVICE)?;
    new_flow::<F>(flow, scope, found, bytes, now, lookup)
}

/// Picks a backend of `frontend` (found for `flow`) and records the flow, unless its tuple
/// has an entry by then (`Lookup`): a flow that owns the tuple (a retransmitted SYN, or the
/// flow's first packet on another CPU) is followed, as a lookup would have. Hooks balance a
/// packet that `ct::opens` a connection so, without the lookup: on a cold table its miss
/// costs about what the insert after it does, and the insert finds a tracked flow as well.
#[inline(always)]
pub fn new_flow<F: Family>(
    flow: &Flow<F::Addr>,
    scope: u8,
    (frontend_key, frontend): (ServiceKey<F::Addr>, ServiceValue),
    bytes: u32,
    now: u64,
    lookup: Lookup,
) -> Result<Decision<F::Addr>, Outcome> {
    let how = if lookup == Lookup::Final {
        Insert::Replace
    } else {
        Insert::Exclusive
    };
    let picked = pick::<F>(flow, scope, &frontend_key, &frontend, now);
    let mut taken = false;
    if let Ok(Some(p)) = &picked {
        match ct::create::<F>(flow, p, now, bytes, how)? {
            Ok(()) => return Ok(translated(scope, p, bytes)),
            Err(ct::Exists) => taken = true,
        }
    }
    // Refused (`picked`), or the tuple has an entry: the flow that owns it, if any, goes on.
    // A looked-up packet's refusal stands: its lookup found nothing to follow.
    let decision = match lookup {
        Lookup::Done if taken => follow::<F>(flow, scope, bytes, now, Look::Again),
        Lookup::Skipped => follow::<F>(flow, scope, bytes, now, Look::First),
        Lookup::Deferred => Some(Err(MAY_BE_TRACKED)),
        Lookup::Done | Lookup::Final => None,
    };
    if let Some(decision) = decision {
        if let Ok(Some(p)) = &picked {
            ct::release_claim::<F>(flow, &p.backend, &p.nat);
        }
        return decision;
    }
    match picked? {
        // An entry nothing follows (expired, or from the other side of the node): replaced,
        // as after a lookup.
        Some(p) => {
            ct::create::<F>(flow, &p, now, bytes, Insert::Replace)?
                .map_err(|_| outcome::DROP_CT_FULL)?;
            Ok(translated(scope, &p, bytes))
        }
        None => Ok(Decision::Reject),
    }
}

/// Checks a new flow against its frontend and picks its backend (and SNAT port); `None`:
/// the frontend has no endpoint to reject with.
#[inline(always)]
fn pick<F: Family>(
    flow: &Flow<F::Addr>,
    scope: u8,
    frontend_key: &ServiceKey<F::Addr>,
    frontend: &ServiceValue,
    now: u64,
) -> Result<Option<Picked<F::Addr>>, Outcome> {
    if frontend.flags & SVC_FLAG_SOURCE_RANGES != 0
        && !F::source_allowed(frontend.service_id, flow.src)
    {
        return Err(outcome::DROP_SOURCE_RANGE);
    }
    if frontend.count == 0 {
        if frontend.flags & SVC_FLAG_DROP_EMPTY != 0 {
            return Err(outcome::DROP_NO_LOCAL_ENDPOINT);
        }
        return Ok(None);
    }
    let (backend_id, backend) = select_backend::<F>(frontend_key, frontend, flow, now)?;
    let unset = F::Addr::default();
    let mut nat = Nat::none();
    if scope != SCOPE_EXTERNAL && backend.ip == flow.src {
        // Hairpin: a pod reaching itself through its service. Its kernel would drop a
        // packet from its own address, so the source becomes the node's (kube-proxy
        // masquerades these too) and the reply comes back through us.
        let config = F::config();
        if config.snat_addr != unset {
            nat = ct::claim_snat_port::<F>(
                flow,
                backend_id,
                &backend,
                frontend.service_id,
                &config,
                0,
                now,
            )?;
        }
    } else if scope == SCOPE_EXTERNAL {
        nat.flags = CT_FLAG_EXTERNAL;
        if frontend.flags & SVC_FLAG_SNAT != 0 {
            let config = F::config();
            if config.snat_addr == unset {
                return Err(outcome::DROP_SNAT_EXHAUSTED);
            }
            nat = ct::claim_snat_port::<F>(
                flow,
                backend_id,
                &backend,
                frontend.service_id,
                &config,
                CT_FLAG_EXTERNAL,
                now,
            )?;
        }
    }
    Ok(Some(Picked {
        service_id: frontend.service_id,
        backend_id,
        backend,
        nat,
    }))
}

/// A recorded new flow's translation, counted.
#[inline(always)]
fn translated<A: MapAddr>(scope: u8, p: &Picked<A>, bytes: u32) -> Decision<A> {
    sched::flow_opened(p.backend_id);
    stats::count_traffic(p.service_id, p.backend_id, bytes, true);
    let nat = &p.nat;
    let src = (nat.flags & CT_FLAG_SNAT != 0).then_some((nat.snat_addr, nat.snat_port));
    let outcome = if scope == SCOPE_EXTERNAL {
        outcome::EXTERNAL_NEW
    } else {
        outcome::DNAT_NEW
    };
    Decision::Translate {
        dst: (p.backend.ip, p.backend.port),
        src,
        outcome,
    }
}

/// An address and port, network byte order.
pub type Addr<A> = (A, u16);

/// How to translate the reply of a flow whose reply does not simply retrace a pod's path:
/// flows from outside, and SNATed (hairpin) flows.
pub struct Reply<A> {
    /// The new source: the frontend the client used.
    pub src: Addr<A>,
    /// For SNATed flows, the new destination: the client.
    pub dst: Option<Addr<A>>,
    pub outcome: Outcome,
    /// The clock reading the flow's entry was stamped with, for the rest of the packet's
    /// path (one reading per packet).
    pub now: u64,
}

/// Whether `flow` can be the reply of a flow this node translated, before its conntrack
/// lookup (on a cold table, a miss costs about as much as an insert): a reply never opens a
/// connection (a TCP SYN without ACK), comes from a backend (the reply filter), and one to
/// a node address (`to_node`) is a SNATed flow's, so its port is in the node's SNAT range
/// (kube-proxy's NodePorts are not, with the agent's default range). `read`: the hook's way
/// to the reply filter.
#[inline(always)]
pub fn may_be_reply<F: Family>(flow: &Flow<F::Addr>, to_node: bool, read: Read) -> bool {
    if ct::opens(flow) {
        return false;
    }
    if !filter::may_be_backend(flow.src, flow.sport, flow.proto, read) {
        return false;
    }
    if !to_node {
        return true;
    }
    let (min, max) = F::snat_ports();
    (min..=max).contains(&u16::from_be(flow.dport))
}

/// The reply of a flow from outside or of a SNATed flow, or `None` if `flow` is no such
/// reply. `to_node`: `flow` is addressed to a node address; `read` as for `may_be_reply`.
#[inline(always)]
pub fn routed_reply<F: Family>(
    flow: &Flow<F::Addr>,
    to_node: bool,
    bytes: u32,
    read: Read,
) -> Option<Reply<F::Addr>> {
    if !may_be_reply::<F>(flow, to_node, read) {
        return None;
    }
    // A reply to a node address may be a SNATed flow's: its entry is the SNAT port's claim.
    let entry =
        ct::reverse_entry::<F>(&ct::reverse_key(flow), F::CLAIMED_REPLIES || to_node, read)?;
    // SAFETY: copy of a map value from this run's lookup.
    let known = ct::known(entry);
    if known.flags & (CT_FLAG_EXTERNAL | CT_FLAG_SNAT) == 0 {
        return None;
    }
    let outcome = if known.flags & CT_FLAG_EXTERNAL != 0 {
        outcome::EXTERNAL_REPLY
    } else {
        outcome::REVNAT
    };
    let now = now_ns();
    ct::touch(entry, flow, now, bytes);
    let dst = (known.flags & CT_FLAG_SNAT != 0).then_some((known.snat_addr, known.snat_port));
    // SAFETY: the entry from this run's lookup.
    let src = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
    Some(Reply {
        src,
        dst,
        outcome,
        now,
    })
}

/// Session affinity first (if set and fresh), else the frontend's algorithm. A client
/// without a pin is pinned only if no other CPU pinned it meanwhile; if one did, its pick
/// is taken instead, so two first flows (or two first packets of one flow) of a client on
/// two CPUs at once go to one backend, and the client stays pinned where its flows went.
#[inline(always)]
pub fn select_backend<F: Family>(
    frontend_key: &ServiceKey<F::Addr>,
    frontend: &ServiceValue,
    flow: &Flow<F::Addr>,
    now: u64,
) -> Result<(u32, Backend<F::Addr>), Outcome> {
    let affinity = frontend.flags & SVC_FLAG_AFFINITY != 0;
    let affinity_key = AffinityKey {
        client: flow.src,
        service_id: frontend.service_id,
    };
    // The client has a pin that no longer holds (timed out, or its backend left).
    let mut stale = false;
    if affinity {
        // SAFETY: value copied out immediately.
        if let Some(pinned) = unsafe { F::affinity().get(affinity_key) }.copied() {
            if let Some(hit) = pinned_backend::<F>(frontend, &pinned, now) {
                let _ = pin::<F>(&affinity_key, pinned.backend_id, now, 0);
                stats::count_family::<F>(outcome::AFFINITY_HIT);
                return Ok(hit);
            }
            stale = true;
        }
    }
    let (backend_id, backend) = match sched::pick::<F>(frontend_key, frontend, flow) {
        Some(id) => match live_backend::<F>(id, frontend.service_id) {
            Some(backend) => (id, backend),
            None => random_backend::<F>(frontend_key, frontend)?,
        },
        None => random_backend::<F>(frontend_key, frontend)?,
    };
    if affinity {
        let flags = if stale { 0 } else { BPF_NOEXIST as u64 };
        if pin::<F>(&affinity_key, backend_id, now, flags).is_err()
            // SAFETY: value copied out immediately.
            && let Some(pinned) = unsafe { F::affinity().get(affinity_key) }.copied()
            && let Some(theirs) = pinned_backend::<F>(frontend, &pinned, now)
        {
            return Ok(theirs);
        }
    }
    Ok((backend_id, backend))
}

/// The backend `pinned` names, if the pin is fresh and the backend still in the service.
#[inline(always)]
fn pinned_backend<F: Family>(
    frontend: &ServiceValue,
    pinned: &AffinityValue,
    now: u64,
) -> Option<(u32, Backend<F::Addr>)> {
    let timeout_ns = frontend.affinity_timeout_s as u64 * 1_000_000_000;
    if now.saturating_sub(pinned.last_used_ns) >= timeout_ns {
        return None;
    }
    let backend = live_backend::<F>(pinned.backend_id, frontend.service_id)?;
    Some((pinned.backend_id, backend))
}

/// Uniform random over the slots, as kube-proxy's iptables mode does with
/// `statistic --mode random`; also the fallback when an algorithm cannot decide.
#[inline(always)]
fn random_backend<F: Family>(
    frontend_key: &ServiceKey<F::Addr>,
    frontend: &ServiceValue,
) -> Result<(u32, Backend<F::Addr>), Outcome> {
    if lb_common::scheduler_of(frontend.flags) != lb_common::scheduler::RANDOM {
        stats::count_family::<F>(outcome::SCHED_FALLBACK);
    }
    // SAFETY: helper without side effects.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = (random % frontend.count as u32) as u16 + 1;
    let backend_id =
        sched::slot_backend::<F>(frontend_key, slot).ok_or(outcome::DROP_BACKEND_MISSING)?;
    let backend =
        live_backend::<F>(backend_id, frontend.service_id).ok_or(outcome::DROP_BACKEND_MISSING)?;
    Ok((backend_id, backend))
}

/// Writes the client's pin (`flags`: `BPF_NOEXIST` for a client without one); `Err`: not
/// written. Losing a pin to a full map only costs stickiness, never the packet.
#[inline(always)]
fn pin<F: Family>(
    key: &AffinityKey<F::Addr>,
    backend_id: u32,
    now: u64,
    flags: u64,
) -> Result<(), i32> {
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    F::affinity().insert(key, value, flags)
}
