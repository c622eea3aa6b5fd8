//! Conntrack and affinity garbage collection: the datapath only ignores dead entries, the
//! agent deletes them so the LRU maps hold live flows, and flows to removed backends vanish
//! promptly from `xlb conntrack` and the maps.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    AffinityKey, AffinityValue, CT_FLAG_CLOSING, CT_FORWARD, CtKey, CtTimeouts, CtValue, MapAddr,
};

/// A backend added after the live set was read is missing from it: flows and affinities
/// younger than this (by their own stamp, the datapath's coarse clock) are never taken for
/// ones of a removed backend. The GC runs next to the syncer, not in step with it.
pub const LIVE_SET_GRACE_NS: u64 = 1_000_000_000;

/// Entries to delete: idle past their lifetime, or pointing at a backend that is gone.
/// `now_ns` is when `live_backends` was read.
pub fn stale_flows<A: MapAddr>(
    entries: impl IntoIterator<Item = (CtKey<A>, CtValue<A>)>,
    live_backends: &BTreeSet<u32>,
    timeouts: &CtTimeouts,
    now_ns: u64,
) -> Vec<CtKey<A>> {
    entries
        .into_iter()
        .filter(|(key, value)| {
            timeouts.outlived(key.proto, value.flags, value.last_seen_ns, now_ns)
                || (!live_backends.contains(&value.backend_id)
                    && value.created_ns.saturating_add(LIVE_SET_GRACE_NS) < now_ns)
        })
        .map(|(key, _)| key)
        .collect()
}

/// Open flows per live backend: forward entries neither closing nor idle past their
/// lifetime (what least-conn compares).
pub fn open_flows<A: MapAddr>(
    entries: impl IntoIterator<Item = (CtKey<A>, CtValue<A>)>,
    live_backends: &BTreeSet<u32>,
    timeouts: &CtTimeouts,
    now_ns: u64,
) -> BTreeMap<u32, u64> {
    let mut open = BTreeMap::new();
    for (key, value) in entries {
        if key.dir == CT_FORWARD
            && value.flags & CT_FLAG_CLOSING == 0
            && !timeouts.outlived(key.proto, value.flags, value.last_seen_ns, now_ns)
            && live_backends.contains(&value.backend_id)
        {
            *open.entry(value.backend_id).or_insert(0) += 1;
        }
    }
    open
}

/// A family's forward entries: its flows' claims, and its conntrack's forward entries but
/// those of tuples that also hold a claim (an entry the datapath no longer reads: it
/// looks at the claim first). Other entries of `in_conntrack` pass through.
pub fn forward_entries<A: MapAddr>(
    claims: Vec<(CtKey<A>, CtValue<A>)>,
    in_conntrack: Vec<(CtKey<A>, CtValue<A>)>,
) -> Vec<(CtKey<A>, CtValue<A>)>
where
    CtKey<A>: std::hash::Hash,
{
    let claimed: std::collections::HashSet<CtKey<A>> = claims.iter().map(|(k, _)| *k).collect();
    let mut entries = claims;
    entries.extend(
        in_conntrack
            .into_iter()
            .filter(|(k, _)| k.dir != CT_FORWARD || !claimed.contains(k)),
    );
    entries
}

/// Affinity entries whose backend is gone (expiry by time is checked by the datapath).
pub fn stale_affinities<A: MapAddr>(
    entries: impl IntoIterator<Item = (AffinityKey<A>, AffinityValue)>,
    live_backends: &BTreeSet<u32>,
    now_ns: u64,
) -> Vec<AffinityKey<A>> {
    entries
        .into_iter()
        .filter(|(_, value)| {
            !live_backends.contains(&value.backend_id)
                && value.last_used_ns.saturating_add(LIVE_SET_GRACE_NS) < now_ns
        })
        .map(|(key, _)| key)
        .collect()
}

#[cfg(test)]
mod tests {
    use lb_common::{CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, PROTO_TCP, PROTO_UDP};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(
        n: u32,
        proto: u8,
        flags: u16,
        backend_id: u32,
        idle_s: u64,
        now: u64,
    ) -> (CtKey, CtValue) {
        (
            CtKey {
                src: n,
                proto,
                ..Default::default()
            },
            CtValue {
                backend_id,
                flags,
                last_seen_ns: now - idle_s * S,
                ..Default::default()
            },
        )
    }

    #[test]
    fn expired_and_orphaned_flows_are_collected() {
        let now = 100_000 * S;
        let live: BTreeSet<u32> = [1, 2].into();
        let entries = vec![
            flow(1, PROTO_UDP, 0, 1, 30, now),                     // fresh UDP
            flow(2, PROTO_UDP, 0, 1, 61, now),                     // idle UDP
            flow(3, PROTO_TCP, 0, 1, 61, now),                     // handshake never finished
            flow(4, PROTO_TCP, CT_FLAG_ESTABLISHED, 2, 3600, now), // idle but established
            flow(
                5,
                PROTO_TCP,
                CT_FLAG_ESTABLISHED | CT_FLAG_CLOSING,
                2,
                11,
                now,
            ), // closed
            flow(6, PROTO_TCP, CT_FLAG_ESTABLISHED, 9, 0, now),    // backend removed
            {
                // Backend missing from the live set, but the flow is younger than the set
                // (the backend may have been added since): kept.
                let mut young = flow(8, PROTO_TCP, CT_FLAG_ESTABLISHED, 9, 0, now);
                young.1.created_ns = now - S / 2;
                young
            },
        ];
        let stale: Vec<u32> = stale_flows(entries, &live, &CtTimeouts::DEFAULT, now)
            .iter()
            .map(|k| k.src)
            .collect();
        assert_eq!(stale, [2, 3, 5, 6]);
    }

    #[test]
    fn affinity_to_removed_backends_is_collected() {
        let live: BTreeSet<u32> = [1].into();
        let entry = |client, backend_id| {
            (
                AffinityKey {
                    client,
                    service_id: 1,
                },
                AffinityValue {
                    backend_id,
                    ..Default::default()
                },
            )
        };
        let now = 100 * S;
        let mut young = entry(12, 2);
        young.1.last_used_ns = now - S / 2;
        let stale = stale_affinities([entry(10, 1), entry(11, 2), young], &live, now);
        assert_eq!(stale.iter().map(|k| k.client).collect::<Vec<_>>(), [11]);
    }

    #[test]
    fn open_flows_count_live_forward_entries_only() {
        let now = 100_000 * S;
        let live: BTreeSet<u32> = [1, 2].into();
        let mut reverse = flow(7, PROTO_TCP, CT_FLAG_ESTABLISHED, 1, 0, now);
        reverse.0.dir = lb_common::CT_REVERSE;
        let entries = vec![
            flow(1, PROTO_TCP, CT_FLAG_ESTABLISHED, 1, 10, now), // open
            flow(2, PROTO_UDP, 0, 1, 30, now),                   // open
            flow(3, PROTO_UDP, 0, 1, 61, now),                   // expired
            flow(
                4,
                PROTO_TCP,
                CT_FLAG_ESTABLISHED | CT_FLAG_CLOSING,
                2,
                1,
                now,
            ), // closing
            flow(5, PROTO_TCP, 0, 2, 5, now),                    // handshake: open
            flow(6, PROTO_TCP, CT_FLAG_ESTABLISHED, 9, 0, now),  // backend gone
            reverse,                                             // the other direction
        ];
        let open = open_flows(entries, &live, &CtTimeouts::DEFAULT, now);
        assert_eq!(open, [(1, 2), (2, 1)].into());
    }

    #[test]
    fn a_claimed_flow_counts_once_and_its_claim_wins_over_a_stale_conntrack_entry() {
        let now = 100_000 * S;
        let live: BTreeSet<u32> = [1, 2].into();
        let claim = flow(1, PROTO_TCP, CT_FLAG_ESTABLISHED, 2, 0, now);
        // The same tuple recorded in conntrack before its slot was free: shadowed.
        let shadowed = flow(1, PROTO_TCP, CT_FLAG_ESTABLISHED, 1, 0, now);
        let other = flow(2, PROTO_TCP, CT_FLAG_ESTABLISHED, 1, 0, now);
        let mut reverse = flow(1, PROTO_TCP, CT_FLAG_ESTABLISHED, 2, 0, now);
        reverse.0.dir = lb_common::CT_REVERSE;
        let entries = forward_entries(vec![claim], vec![shadowed, other, reverse]);
        assert_eq!(entries, [claim, other, reverse]);
        let open = open_flows(entries, &live, &CtTimeouts::DEFAULT, now);
        assert_eq!(open, [(1, 1), (2, 1)].into());
    }
}
