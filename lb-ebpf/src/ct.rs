//! Connection tracking: a forward entry (client → frontend) pins the flow to its backend, a
//! reverse entry (backend → client, or backend → node address for SNATed flows) restores the
//! frontend on replies. Entries are claims in arrays (`ReplyClaim`, slot by the entry's
//! tuple; reverse entries in `XLB_REPLY_CLAIMS`, IPv4 flows' forward ones in
//! `XLB_FLOW_CLAIMS`) where that costs less than a conntrack insert: taking a free slot is
//! a compare-and-swap and a store, where an LRU insert pops, fills and links an element
//! (bench rows `cost_claim` and `cost_ct_insert`). A SNATed flow picks its port so that its
//! reply's slot is free; an entry whose slot a live flow of another tuple holds, and IPv6
//! flows' forward entries and reverse ones without SNAT
//! (`Family::CLAIMED_FLOWS`, `CLAIMED_REPLIES`), go to the conntrack LRU. Lookups read the
//! claim first.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_prandom_u32, bpf_loop},
    maps::Array,
};
use lb_common::{
    Backend, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FLAG_SNAT, CT_FORWARD, CT_REVERSE, CtKey,
    CtTimeouts, CtValue, MapAddr, NodeConfig, Outcome, PROTO_TCP, ReplyClaim, claim_run,
    claim_slot_in_run, outcome, reply_claim_slot,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The errno of an exclusive insert whose key exists.
const EEXIST: i32 = 17;

/// SNAT ports tried per new flow before giving up (a random start, then its neighbours).
const SNAT_TRIES: u32 = 16;

use crate::{family::Family, maps::CT_TIMEOUTS, parse::Flow, read::Read};

/// How a flow is translated besides DNAT.
#[derive(Clone, Copy)]
pub struct Nat<A> {
    /// `CT_FLAG_EXTERNAL` and/or `CT_FLAG_SNAT`.
    pub flags: u16,
    /// With `CT_FLAG_SNAT`: the client's new source, network byte order.
    pub snat_addr: A,
    pub snat_port: u16,
}

impl<A: MapAddr> Nat<A> {
    #[inline(always)]
    pub fn none() -> Self {
        Nat {
            flags: 0,
            snat_addr: A::default(),
            snat_port: 0,
        }
    }
    #[inline(always)]
    fn snat(&self) -> bool {
        self.flags & CT_FLAG_SNAT != 0
    }
}

#[inline(always)]
pub fn forward_key<A: MapAddr>(flow: &Flow<A>) -> CtKey<A> {
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
pub fn reverse_key<A: MapAddr>(flow: &Flow<A>) -> CtKey<A> {
    CtKey {
        dir: CT_REVERSE,
        ..forward_key(flow)
    }
}

/// The forward entry of `flow`: its claim, else its conntrack entry. The claim's lookup is
/// inlined, unlike `claimed`: as a subprogram call on this path (every packet of a flow
/// goes through it) the verifier walked `xlb_from_pod` and `xlb_external` at 125k and 134k
/// instructions instead of 72k and 60k.
#[inline(always)]
pub fn forward_entry<F: Family>(flow: &Flow<F::Addr>) -> Option<*mut CtValue<F::Addr>> {
    let key = forward_key(flow);
    if F::CLAIMED_FLOWS
        && let Some(slot) = held_slot(F::flow_claims(), &key)
    {
        // SAFETY: a slot of the array, valid for this program run.
        return Some(unsafe { &raw mut (*slot).value });
    }
    // By reference, the key the claim was compared with: a copy moved into the call sent
    // the verifier from 72k to 118k instructions in `xlb_from_pod`.
    #[allow(clippy::needless_borrows_for_generic_args)]
    F::conntrack().get_ptr_mut(&key)
}

/// The slot of `claims` that holds `key`'s claim, if one does: the read every claim lookup
/// makes, inlined where it stands (`claimed` is its subprogram).
#[inline(always)]
fn held_slot<A: MapAddr>(
    claims: &Array<ReplyClaim<A>>,
    key: &CtKey<A>,
) -> Option<*mut ReplyClaim<A>> {
    let slot = claims.get_ptr_mut(reply_claim_slot(key))?;
    holds(slot, key).then_some(slot)
}

/// Whether `slot` holds `key`'s claim. The key's port is read first: it is 0 while the slot
/// changes hands (`publish`).
#[inline(always)]
fn holds<A: MapAddr>(slot: *const ReplyClaim<A>, key: &CtKey<A>) -> bool {
    use core::ptr::read_volatile as read;
    // SAFETY: per the callers, a slot of the array, valid for this program run. Volatile
    // reads, so the compiler keeps the port's read first (plain ones may be hoisted above
    // it, and a claim being published would be read half old).
    unsafe {
        let held = &raw const (*slot).key;
        read(&raw const (*held).dport) == key.dport
            && read(&raw const (*held).src) == key.src
            && read(&raw const (*held).dst) == key.dst
            && read(&raw const (*held).sport) == key.sport
            && read(&raw const (*held).proto) == key.proto
            && read(&raw const (*held).dir) == key.dir
    }
}

/// Whether `flow` (a reply) has a reverse entry.
#[inline(always)]
pub fn has_reverse<F: Family>(flow: &Flow<F::Addr>) -> bool {
    reverse_entry::<F>(&reverse_key(flow), F::CLAIMED_REPLIES, Read::Call).is_some()
}

/// The reverse entry with `key`: its claim if it may have one (`claims`: every flow's where
/// `Family::CLAIMED_REPLIES`, else only SNATed flows', whose replies are addressed to a node
/// address), else (its slot was taken, or an earlier agent recorded the flow) the conntrack
/// entry. `read`: the claim read inline or through `claimed` (`crate::read`; a family
/// without `Family::INLINE_CLAIM_READS` always calls).
#[inline(always)]
pub fn reverse_entry<F: Family>(
    key: &CtKey<F::Addr>,
    claims: bool,
    read: Read,
) -> Option<*mut CtValue<F::Addr>> {
    if claims {
        let slot = if F::INLINE_CLAIM_READS && read == Read::Inline {
            held_slot(F::reply_claims(), key)
        } else {
            claimed::<F>(key)
        };
        if let Some(slot) = slot {
            // SAFETY: a slot of the array, valid for this program run.
            return Some(unsafe { &raw mut (*slot).value });
        }
    }
    F::conntrack().get_ptr_mut(key)
}

/// The claim slot of `key` (a reverse key), if it holds that claim. A BPF
/// subprogram: inlined into `xlb_from_pod6_untracked`, it crashed LLVM 22 (post-RA pseudo
/// instruction expansion).
#[inline(never)]
fn claimed<F: Family>(key: &CtKey<F::Addr>) -> Option<*mut ReplyClaim<F::Addr>> {
    held_slot(F::reply_claims(), key)
}

/// Claims `slot` for the entry in `s` if no live flow holds it: free (stamp 0) or
/// outlived at the entry's time (its `last_seen_ns`) — or, with `renew`, held for the very
/// same tuple: for a reverse entry an older flow's whose client port the client used again
/// for another frontend with the same backend, and the newer flow's translation is the one
/// replies get (as the conntrack entry it replaces would give it). Never for a SNAT port's
/// claim: the same tuple there is a live flow's port. The stamp's compare-and-swap to
/// `in_flux` (`IN_FLUX`, with the key's run for a forward entry) decides between CPUs
/// claiming at once. A BPF subprogram: one copy for the claim loop's step and the others.
#[inline(never)]
fn claim_slot<A: MapAddr>(
    slot: *mut ReplyClaim<A>,
    s: &CtScratch<A>,
    timeouts: &CtTimeouts,
    renew: bool,
    in_flux: u64,
) -> bool {
    // SAFETY: a slot of the array, valid for this program run.
    unsafe {
        let stamp = &raw mut (*slot).value.last_seen_ns;
        let held_since = core::ptr::read_volatile(stamp);
        if held_since != 0
            && !timeouts.outlived(
                (*slot).key.proto,
                (*slot).value.flags,
                held_since,
                s.value.last_seen_ns,
            )
            && !(renew && (*slot).key == s.key)
        {
            return false;
        }
        if !crate::atomic::compare_exchange(stamp, held_since, in_flux) {
            return false;
        }
        publish(slot, s);
    }
    true
}

/// The stamp's top bit marks a slot from its claim's compare-and-swap until its entry is
/// written (the entry's own stamp, a clock reading far below it, replaces it): live, never
/// outlived, and what `published_holder` waits on, as the key's port cleared after it. A
/// forward claim's carries its key's run (`claim_run`) in the low half: the first packet of
/// the same flow on another CPU knows to wait for it, one of another flow need not.
const IN_FLUX: u64 = 1 << 63;

/// Writes the entry in `s` into a slot this program run claimed (`IN_FLUX`): the key's port
/// (the client's, the SNAT port, or the frontend's) is cleared first and written last, so a
/// reader matching the key never takes a mix of the old holder's fields and the new one's
/// for a claim.
#[inline(always)]
unsafe fn publish<A: MapAddr>(slot: *mut ReplyClaim<A>, s: &CtScratch<A>) {
    use core::ptr::write_volatile as write;
    // SAFETY: per the caller, a claimed slot of the array. Every store volatile, so the
    // compiler keeps their order (plain ones may move past the port's): the entry, the key,
    // then the stamp (leaving `IN_FLUX`) and the port.
    unsafe {
        write(&raw mut (*slot).key.dport, 0);
        let (v, from) = (&raw mut (*slot).value, &s.value);
        write(&raw mut (*v).backend_id, from.backend_id);
        write(&raw mut (*v).service_id, from.service_id);
        write(&raw mut (*v).nat_addr, from.nat_addr);
        write(&raw mut (*v).nat_port, from.nat_port);
        write(&raw mut (*v).flags, from.flags);
        write(&raw mut (*v).snat_addr, from.snat_addr);
        write(&raw mut (*v).snat_port, from.snat_port);
        write(&raw mut (*v)._pad, 0);
        write(&raw mut (*v).created_ns, from.created_ns);
        write(&raw mut (*v).packets, from.packets);
        write(&raw mut (*v).bytes, from.bytes);
        let key = &raw mut (*slot).key;
        write(&raw mut (*key).src, s.key.src);
        write(&raw mut (*key).dst, s.key.dst);
        write(&raw mut (*key).sport, s.key.sport);
        write(&raw mut (*key).proto, s.key.proto);
        write(&raw mut (*key).dir, s.key.dir);
        write(&raw mut (*key)._pad, [0; 2]);
        write(&raw mut (*v).last_seen_ns, from.last_seen_ns);
        write(&raw mut (*key).dport, s.key.dport);
    }
}

/// Frees a claim this flow holds: the key's port first (readers stop matching), then the
/// stamp (claimers may take it).
#[inline(always)]
fn unclaim<F: Family>(key: &CtKey<F::Addr>) {
    if let Some(slot) = claimed::<F>(key) {
        // SAFETY: a slot of the array, valid for this program run.
        unsafe {
            core::ptr::write_volatile(&raw mut (*slot).key.dport, 0);
            core::ptr::write_volatile(&raw mut (*slot).value.last_seen_ns, 0);
        }
    }
}

/// A conntrack entry being built: entries are written into this per-CPU slot and inserted
/// from there. Built on the stack, an IPv6 flow's two entries (240 bytes with their keys,
/// and LLVM keeps copies) overflow the 512-byte BPF stack.
#[repr(C)]
pub struct CtScratch<A: MapAddr> {
    pub key: CtKey<A>,
    pub value: CtValue<A>,
    /// Where this CPU's next SNAT port search for a backend starts, per backend id modulo
    /// `SNAT_CURSORS`: one past the port it claimed last for it, as an offset into the
    /// range plus one (0: none yet, start at random). Read by `claim_step`, written by
    /// `claim_snat_port`.
    pub snat_next: [u32; SNAT_CURSORS],
}

/// SNAT port cursors per CPU. A backend's claim slots lie in a run of their own, so one
/// cursor per backend makes its claims follow each other in memory (a stream the CPU's
/// prefetcher reads ahead); one cursor for all backends put each claim a few slots past the
/// backend's previous one, a cache miss each (NodePort+SNAT new flow, ten backends: 801 ->
/// 661 ns). Backends whose ids share a cursor only lose that.
pub const SNAT_CURSORS: usize = 16;

/// A new flow's backend and translation, picked (`svc`) and not yet recorded.
pub struct Picked<A: MapAddr> {
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: Backend<A>,
    /// Its SNAT port claimed, if it has one.
    pub nat: Nat<A>,
}

/// How `create` writes a flow's forward entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Over any entry of the tuple: the flow's lookup found none it could follow.
    Replace,
    /// Only if the tuple has no entry yet: the packet opens a connection and was not looked
    /// up first (`opens`, `svc::new_flow`).
    Exclusive,
}

/// The tuple already had a forward entry (`Insert::Exclusive`); nothing was written.
pub struct Exists;

/// Records a new flow from `client` (its packet to a frontend). For SNATed flows the
/// reverse entry already exists: `claim_snat_port` made it (and it stays if the forward
/// entry is not written: `Ok(Err(Exists))`).
#[inline(always)]
pub fn create<F: Family>(
    client: &Flow<F::Addr>,
    picked: &Picked<F::Addr>,
    now: u64,
    bytes: u32,
    how: Insert,
) -> Result<Result<(), Exists>, Outcome> {
    let Picked {
        service_id,
        backend_id,
        ref backend,
        nat,
    } = *picked;
    // SAFETY: the per-CPU slot is this program run's alone (BPF programs do not nest on a
    // CPU for the same hook); it is fully written before each insert.
    let s = unsafe { &mut *F::ct_scratch().ok_or(outcome::DROP_CT_FULL)? };
    s.key = forward_key(client);
    let v = &mut s.value;
    v.backend_id = backend_id;
    v.service_id = service_id;
    v.nat_addr = backend.ip;
    v.nat_port = backend.port;
    v.flags = tcp_flags_update(client, nat.flags);
    v.snat_addr = nat.snat_addr;
    v.snat_port = nat.snat_port;
    v._pad = 0;
    v.created_ns = now;
    v.last_seen_ns = now;
    v.packets = 1;
    v.bytes = bytes as u64;
    match record_forward::<F>(s, how == Insert::Replace) {
        Recorded::Done => {}
        Recorded::Exists => return Ok(Err(Exists)),
        Recorded::Full => return Err(outcome::DROP_CT_FULL),
        // The SNAT port claimed for this packet goes back: it leaves with nothing.
        Recorded::Stalled => {
            if F::CLAIMED_FLOWS {
                release_claim::<F>(client, backend, &nat);
            }
            return Err(outcome::DROP_FLOW_STALLED);
        }
    }
    if nat.snat() {
        return Ok(Ok(()));
    }
    fill_reverse(s, client, backend_id, backend, service_id, now, &nat);
    record_reverse::<F>(s)?;
    Ok(Ok(()))
}

/// Where `record_forward` put a flow's forward entry.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recorded {
    Done,
    /// The tuple had a forward entry (`Insert::Exclusive`); nothing was written.
    Exists,
    Full,
    /// Another CPU's claim for the tuple stayed unpublished past the wait; nothing written.
    Stalled,
}

/// Records the forward entry in `s`: in its claim slot if the family claims flows and no
/// live flow of another tuple holds the slot, else in conntrack. `Insert::Exclusive` finds
/// a slot held for the very tuple (a retransmitted SYN, or the flow's first packet on
/// another CPU, whose claim may still be being written: `published_holder` waits for it)
/// taken, as the exclusive insert finds its entry; `Insert::Replace` renews such a claim.
/// A BPF subprogram: inlined, its outcomes multiplied the paths of the rest of the
/// program (from_pod verified 134k instructions instead of 60k).
#[inline(never)]
fn record_forward<F: Family>(s: &CtScratch<F::Addr>, replace: bool) -> Recorded {
    if F::CLAIMED_FLOWS {
        let Some(timeouts) = CT_TIMEOUTS.get(0) else {
            return Recorded::Full;
        };
        let run = claim_run(&s.key);
        if let Some(slot) = F::flow_claims().get_ptr_mut(claim_slot_in_run(run, s.key.dport)) {
            let in_flux = IN_FLUX | u64::from(run);
            if claim_slot(slot, s, timeouts, replace, in_flux) {
                return Recorded::Done;
            }
            if !replace {
                match published_holder(slot, &s.key, in_flux) {
                    Holder::This => return Recorded::Exists,
                    Holder::Stalled => return Recorded::Stalled,
                    Holder::Other => {}
                }
            }
        }
    }
    let flags = if replace { 0 } else { BPF_NOEXIST as u64 };
    match insert::<F>(&s.key, &s.value, flags) {
        Ok(()) => Recorded::Done,
        Err(e) if !replace && e == -EEXIST => Recorded::Exists,
        Err(_) => Recorded::Full,
    }
}

/// Steps `published_holder` waits at most for another CPU's claim of the same tuple to be
/// published: that CPU is between its compare-and-swap and its last store, a few dozen
/// instructions, unless something stalls it (an interrupt; a hypervisor descheduling its
/// vCPU; a preempted `BPF_PROG_TEST_RUN`). A step is a few nanoseconds: a few milliseconds
/// in all, spent only by a flow's first packet racing its twin.
const PUBLISH_WAIT_STEPS: u32 = 1 << 20;

/// Whose entry a slot that refused a forward claim holds.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// The key's: follow it.
    This,
    /// Another tuple's, or nobody's.
    Other,
    /// Still being written for the key's run (its stamp `in_flux`) after the wait: the
    /// packet is dropped, since it cannot know the backend that CPU chose.
    Stalled,
}

/// Who holds `slot` once a claim being written into it for `key`'s run (its stamp
/// `in_flux`) is published. A claim in flux for another run is another tuple's: no wait.
/// A BPF subprogram (its loop is verified once).
#[inline(never)]
fn published_holder<A: MapAddr>(slot: *mut ReplyClaim<A>, key: &CtKey<A>, in_flux: u64) -> Holder {
    // SAFETY: a slot of the array, valid for this program run.
    let (stamp, port) = unsafe {
        (
            &raw const (*slot).value.last_seen_ns,
            &raw const (*slot).key.dport,
        )
    };
    let mut wait = PublishWait {
        stamp,
        port,
        in_flux,
    };
    let ctx = (&mut wait as *mut PublishWait).cast();
    // Most slots that refuse a claim are another live flow's: no wait (a helper call).
    if publish_wait_step(0, ctx) == 0 {
        // SAFETY: the callback only reads the slot through `wait`, which outlives the call.
        unsafe {
            bpf_loop(
                PUBLISH_WAIT_STEPS,
                publish_wait_step as *const () as *mut c_void,
                ctx,
                0,
            );
        }
    }
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(stamp) } == in_flux {
        Holder::Stalled
    } else if holds(slot, key) {
        Holder::This
    } else {
        Holder::Other
    }
}

/// The slot `published_holder` waits on: its stamp and its key's port, and the stamp of a
/// claim in flux for the waiter's run.
#[repr(C)]
struct PublishWait {
    stamp: *const u64,
    port: *const u16,
    in_flux: u64,
}

/// Stops the wait (1) unless the slot is being written for the waiter's run, or its stamp
/// is written and its key's port not yet (the last two stores of `publish`).
extern "C" fn publish_wait_step(_: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `PublishWait` handed to `bpf_loop` by `published_holder`; its
    // pointers are into a slot of the array, valid for this program run.
    unsafe {
        let wait = &*(ctx as *const PublishWait);
        let stamp = core::ptr::read_volatile(wait.stamp);
        let writing = stamp == wait.in_flux
            || (stamp != 0 && stamp & IN_FLUX == 0 && core::ptr::read_volatile(wait.port) == 0);
        i64::from(!writing)
    }
}

/// Records the reverse entry in `s` (of a flow without SNAT): in its claim slot if the
/// family claims them and no live flow of another tuple holds it, else in conntrack
/// (replacing an entry with its key: the reply's tuple is this flow's now).
#[inline(always)]
fn record_reverse<F: Family>(s: &CtScratch<F::Addr>) -> Result<(), Outcome> {
    if F::CLAIMED_REPLIES && try_claim::<F>(s)? {
        return Ok(());
    }
    insert::<F>(&s.key, &s.value, 0).map_err(|_| outcome::DROP_CT_FULL)
}

/// Claims the slot of the reverse entry in `s` if no live flow of another tuple holds it
/// (`claim_slot` with `renew`); whether it did.
#[inline(always)]
fn try_claim<F: Family>(s: &CtScratch<F::Addr>) -> Result<bool, Outcome> {
    let timeouts = CT_TIMEOUTS.get(0).ok_or(outcome::DROP_CT_FULL)?;
    let Some(slot) = F::reply_claims().get_ptr_mut(reply_claim_slot(&s.key)) else {
        return Ok(false);
    };
    Ok(claim_slot(slot, s, timeouts, true, IN_FLUX))
}

/// Frees the SNAT port `claim_snat_port` claimed for `client`'s flow (its reverse entry),
/// if `nat` has one.
#[inline(always)]
pub fn release_claim<F: Family>(
    client: &Flow<F::Addr>,
    backend: &Backend<F::Addr>,
    nat: &Nat<F::Addr>,
) {
    if !nat.snat() {
        return;
    }
    let Some(s) = F::ct_scratch() else {
        return;
    };
    // SAFETY: as in `create`.
    let s = unsafe { &mut *s };
    s.key = reverse_key(&reply_flow(client, backend, nat));
    unclaim::<F>(&s.key);
}

/// The reply direction of `client`'s flow once translated to `backend`: backend → client,
/// or backend → the SNAT address.
#[inline(always)]
fn reply_flow<A: MapAddr>(client: &Flow<A>, backend: &Backend<A>, nat: &Nat<A>) -> Flow<A> {
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
        l4_off: client.l4_off,
    }
}

/// Inserts from the scratch slot (map memory: no copy on the stack); `Err`: the errno.
#[inline(always)]
fn insert<F: Family>(
    key: &CtKey<F::Addr>,
    value: &CtValue<F::Addr>,
    flags: u64,
) -> Result<(), i32> {
    F::conntrack().insert(key, value, flags)
}

/// Writes the reply side's entry of `client`'s flow into `s`, field by field (an assigned
/// struct would be built on the stack first, and its zero words become a memset call).
#[inline(always)]
fn fill_reverse<A: MapAddr>(
    s: &mut CtScratch<A>,
    client: &Flow<A>,
    backend_id: u32,
    backend: &Backend<A>,
    service_id: u32,
    now: u64,
    nat: &Nat<A>,
) {
    s.key = reverse_key(&reply_flow(client, backend, nat));
    let v = &mut s.value;
    if nat.snat() {
        v.snat_addr = client.src;
        v.snat_port = client.sport;
    } else {
        v.snat_addr = A::default();
        v.snat_port = 0;
    }
    v.backend_id = backend_id;
    v.service_id = service_id;
    v.nat_addr = client.dst;
    v.nat_port = client.dport;
    v.flags = nat.flags;
    v._pad = 0;
    v.created_ns = now;
    v.last_seen_ns = now;
    // SAFETY: plain writes to fields of the slot; volatile keeps them two stores.
    unsafe {
        core::ptr::write_volatile(&raw mut v.packets, 0);
        core::ptr::write_volatile(&raw mut v.bytes, 0);
    }
}

/// The fields of a forward entry that following its flow needs, read out of the map value
/// (a copy of the whole entry is 80 bytes of stack for IPv6).
#[derive(Clone, Copy)]
pub struct Known<A> {
    pub flags: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub last_seen_ns: u64,
    pub snat_addr: A,
    pub snat_port: u16,
}

#[inline(always)]
pub fn known<A: MapAddr>(entry: *const CtValue<A>) -> Known<A> {
    // SAFETY: `entry` comes from a map lookup in this program run.
    unsafe {
        Known {
            flags: (*entry).flags,
            backend_id: (*entry).backend_id,
            service_id: (*entry).service_id,
            last_seen_ns: (*entry).last_seen_ns,
            snat_addr: (*entry).snat_addr,
            snat_port: (*entry).snat_port,
        }
    }
}

/// Recreates the reverse entry of a known flow if it is missing: LRU eviction can take one
/// side of a flow alone, and a flow without replies outlives its claim, which another flow
/// may take. `known` is from the flow's forward entry.
#[inline(always)]
pub fn ensure_reverse<F: Family>(
    client: &Flow<F::Addr>,
    known: &Known<F::Addr>,
    backend: &Backend<F::Addr>,
    now: u64,
) -> Result<(), Outcome> {
    let nat = Nat {
        flags: known.flags & (lb_common::CT_FLAG_EXTERNAL | CT_FLAG_SNAT),
        snat_addr: known.snat_addr,
        snat_port: known.snat_port,
    };
    // SAFETY: as in `create`.
    let s = unsafe { &mut *F::ct_scratch().ok_or(outcome::DROP_CT_FULL)? };
    fill_reverse(
        s,
        client,
        known.backend_id,
        backend,
        known.service_id,
        now,
        &nat,
    );
    if reverse_entry::<F>(&s.key, F::CLAIMED_REPLIES || nat.snat(), Read::Call).is_some() {
        return Ok(());
    }
    if nat.snat() {
        // A SNATed flow's port is its claim: taken by another flow since (it outlived it,
        // without replies), it is not claimed beside it in conntrack.
        try_claim::<F>(s)?;
        return Ok(());
    }
    record_reverse::<F>(s)
}

/// Picks a free source port on `snat_addr` for `client`'s flow to `backend` and claims it:
/// the flow's reverse entry goes into the port's claim slot. A port is free when its slot
/// holds no live flow (expired claims are taken over); a slot is per backend address, port
/// and SNAT port, so one SNAT port serves flows to several backends, as netfilter's
/// masquerading does (a slot shared with another such tuple only sends the claim on to
/// the next port).
#[inline(always)]
pub fn claim_snat_port<F: Family>(
    client: &Flow<F::Addr>,
    backend_id: u32,
    backend: &Backend<F::Addr>,
    service_id: u32,
    config: &NodeConfig<F::Addr>,
    nat_flags: u16,
    now: u64,
) -> Result<Nat<F::Addr>, Outcome> {
    let min = config.snat_port_min as u32;
    let span = (config.snat_port_max as u32).saturating_sub(min) + 1;
    // SAFETY: as in `create`.
    let s = unsafe { &mut *F::ct_scratch().ok_or(outcome::DROP_CT_FULL)? };
    let mut nat = Nat {
        flags: nat_flags | CT_FLAG_SNAT,
        snat_addr: config.snat_addr,
        snat_port: 0,
    };
    // The entry is the same for every port tried but for its key's destination port.
    fill_reverse(s, client, backend_id, backend, service_id, now, &nat);
    let timeouts = CT_TIMEOUTS.get_ptr(0).ok_or(outcome::DROP_CT_FULL)?;
    let mut claim = Claim {
        scratch: (s as *mut CtScratch<F::Addr>).cast(),
        timeouts,
        min,
        span,
        start: 0,
        found: 0,
        port: 0,
    };
    // One `bpf_loop` step per port: the verifier checks one step, not every exit of an
    // unrolled loop followed each by the rest of the program (eight times the instructions).
    // SAFETY: the callback only touches `claim` (outliving the call) and the scratch slot.
    unsafe {
        bpf_loop(
            SNAT_TRIES.min(span),
            claim_step::<F> as *const () as *mut c_void,
            (&mut claim as *mut Claim).cast(),
            0,
        );
    }
    if claim.found == 0 {
        return Err(outcome::DROP_SNAT_EXHAUSTED);
    }
    nat.snat_port = claim.port;
    s.snat_next[backend_id as usize % SNAT_CURSORS] =
        u32::from(u16::from_be(claim.port)).wrapping_sub(min) + 1;
    Ok(nat)
}

/// The state of a SNAT port claim, for `claim_step`.
#[repr(C)]
struct Claim {
    /// The scratch slot with the reverse entry (a `CtScratch` of the family): handed over
    /// rather than looked up again in each step, whose stack frame adds to the caller's.
    scratch: *mut u8,
    /// The node's lifetimes (`CT_TIMEOUTS`), likewise.
    timeouts: *const CtTimeouts,
    min: u32,
    span: u32,
    /// Where the search starts (offset in the range), set by the first step.
    start: u32,
    found: u8,
    /// Network byte order.
    port: u16,
}

/// Tries port `start + i` (wrapping in the range) for the reverse entry in the scratch
/// slot; stops the loop (1) once its claim slot is taken.
extern "C" fn claim_step<F: Family>(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Claim` handed to `bpf_loop` by `claim_snat_port`.
    let claim = unsafe { &mut *(ctx as *mut Claim) };
    // SAFETY: this CPU's slot, filled by `claim_snat_port` before the loop.
    let s = unsafe { &mut *claim.scratch.cast::<CtScratch<F::Addr>>() };
    // Read once: the helper call below may change memory, as far as LLVM knows, and a
    // second read's `%` would need a panic path.
    let span = claim.span;
    if span == 0 {
        return 1; // never: the range has at least one port (and `%` would need a panic path)
    }
    // Past where this CPU's last search for the backend ended: its new flows claim slots
    // that follow each other in its run rather than each a random cache line (and the
    // random number's helper call goes). Ports come round in the order they were taken,
    // so the one reused is the longest free; only the backend sees them. Read here in the
    // step, not before the loop: there the IPv6 untracked XDP stage had no stack left for
    // it (16 bytes over).
    if i == 0 {
        claim.start = match s.snat_next[s.value.backend_id as usize % SNAT_CURSORS] {
            next if next != 0 => next,
            // SAFETY: helper without side effects.
            _ => unsafe { bpf_get_prandom_u32() },
        } % span;
    }
    let offset = (claim.start + i as u32) % span;
    let port = ((claim.min + offset) as u16).to_be();
    s.key.dport = port;
    let Some(slot) = F::reply_claims().get_ptr_mut(reply_claim_slot(&s.key)) else {
        return 0;
    };
    // SAFETY: `timeouts` points into `CT_TIMEOUTS`, valid for this program run.
    let claimed = claim_slot(slot, s, unsafe { &*claim.timeouts }, false, IN_FLUX);
    if claimed {
        claim.found = 1;
        claim.port = port;
        return 1;
    }
    0
}

/// Whether `flow`'s packet opens a connection: a TCP SYN without ACK.
#[inline(always)]
pub fn opens<A>(flow: &Flow<A>) -> bool {
    flow.proto == PROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// An entry's flags after seeing `flow`'s packet. Forward entries become established on the
/// client's first ACK without SYN, reverse entries on any reply; FIN or RST mean closing.
#[inline(always)]
pub fn tcp_flags_update<A>(flow: &Flow<A>, flags: u16) -> u16 {
    if flow.proto != PROTO_TCP {
        return flags;
    }
    let mut flags = flags;
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flags |= CT_FLAG_CLOSING;
    } else if !opens(flow) {
        flags |= CT_FLAG_ESTABLISHED;
    }
    flags
}

/// True if an entry (its last-seen time and flags) outlived its lifetime: the flow is over,
/// a new one may reuse the tuple.
#[inline(always)]
pub fn aged_out(last_seen_ns: u64, flags: u16, proto: u8, now: u64) -> bool {
    let timeouts = CT_TIMEOUTS.get(0).copied().unwrap_or_default();
    timeouts.outlived(proto, flags, last_seen_ns, now)
}

/// Bumps an entry's last-seen time, TCP state and counters; returns the new flags.
#[inline(always)]
pub fn touch<A: MapAddr>(entry: *mut CtValue<A>, flow: &Flow<A>, now: u64, bytes: u32) -> u16 {
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
