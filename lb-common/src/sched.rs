//! Load-balancing algorithms: their codes in the frontend's flags, and the hashes the
//! datapath computes (shared here so the agent and the tests compute the very same values).

/// Algorithm codes, stored in bits 8..12 of the frontend's `ServiceValue::flags`.
pub mod scheduler {
    /// Uniform random over the backends (kube-proxy's iptables mode).
    pub const RANDOM: u8 = 0;
    /// Next backend in turn, one shared cursor per frontend.
    pub const ROUND_ROBIN: u8 = 1;
    /// Fewest active flows on this node (`XLB_CONNS`).
    pub const LEAST_CONN: u8 = 2;
    /// Hash of the client address: a client always lands on the same backend.
    pub const SOURCE_HASH: u8 = 3;
    /// Maglev consistent hashing of the 5-tuple over the frontend's lookup table.
    pub const MAGLEV: u8 = 4;
    /// Names as users write them (`--scheduler`, `xlb.io/scheduler`), indexed by code.
    pub const NAMES: [&str; 5] = [
        "random",
        "round-robin",
        "least-conn",
        "source-hash",
        "maglev",
    ];
}

const SCHED_SHIFT: u16 = 8;
const SCHED_MASK: u16 = 0x0f << SCHED_SHIFT;

/// The algorithm code of a frontend, from its flags.
#[inline(always)]
pub const fn scheduler_of(flags: u16) -> u8 {
    ((flags & SCHED_MASK) >> SCHED_SHIFT) as u8
}

/// Flags with the algorithm code set to `scheduler`.
#[inline(always)]
pub const fn with_scheduler(flags: u16, scheduler: u8) -> u16 {
    (flags & !SCHED_MASK) | (((scheduler as u16) << SCHED_SHIFT) & SCHED_MASK)
}

/// Least-conn compares at most this many backends per new flow (a window starting at a
/// random slot when the service has more): the verifier needs a bound, and 64 samples find a
/// near-least-loaded backend in any realistic spread.
pub const LEAST_CONN_SCAN: u16 = 64;

/// Least-conn's scan: among up to `LEAST_CONN_SCAN` slots of `1..=count`, starting at
/// 0-based `start` and wrapping, the backend id with the fewest open flows; ties go to the
/// earliest in the window. The datapath drives it one slot per `bpf_loop` step (so the
/// verifier checks one step, not 64); `least_loaded` drives it in a plain loop for tests.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LeastLoaded {
    pub count: u32,
    pub start: u32,
    /// Backend id with the fewest open flows so far; 0 = none (ids are never 0).
    pub best: u32,
    pub best_open: u64,
}

impl LeastLoaded {
    #[inline(always)]
    pub const fn new(count: u16, start: u16) -> Self {
        Self {
            count: count as u32,
            start: start as u32,
            best: 0,
            best_open: u64::MAX,
        }
    }
    /// How many slots the scan visits.
    #[inline(always)]
    pub const fn steps(&self) -> u32 {
        if self.count < LEAST_CONN_SCAN as u32 {
            self.count
        } else {
            LEAST_CONN_SCAN as u32
        }
    }
    /// The slot (1..=count) visited at step `i`.
    #[inline(always)]
    pub const fn slot(&self, i: u32) -> u16 {
        if self.count == 0 {
            return 0;
        }
        ((self.start + i) % self.count) as u16 + 1
    }
    /// Considers backend `id` with `open` flows.
    #[inline(always)]
    pub fn offer(&mut self, id: u32, open: u64) {
        if open < self.best_open {
            self.best_open = open;
            self.best = id;
        }
    }
    #[inline(always)]
    pub const fn best(&self) -> Option<u32> {
        if self.best == 0 {
            None
        } else {
            Some(self.best)
        }
    }
}

/// Least-conn's choice in one call; `open_of(slot)` gives a slot's backend id and its open
/// flows, `None` if the slot is unusable.
pub fn least_loaded(
    count: u16,
    start: u16,
    mut open_of: impl FnMut(u16) -> Option<(u32, u64)>,
) -> Option<u32> {
    let mut scan = LeastLoaded::new(count, start);
    for i in 0..scan.steps() {
        if let Some((id, open)) = open_of(scan.slot(i)) {
            scan.offer(id, open);
        }
    }
    scan.best()
}

/// Default Maglev lookup table size (a prime, as Maglev needs; Cilium's default too).
pub const MAGLEV_DEFAULT_SIZE: u32 = 16_381;
/// Largest table size accepted (a prime; 64 Ki entries = 256 KiB per frontend).
pub const MAGLEV_MAX_SIZE: u32 = 65_521;
/// `BPF_F_INNER_MAP`: lets the Maglev tables differ in size from the template.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;

/// murmur3's 32-bit finaliser: every input bit affects every output bit.
#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a client address as it sits in the packet (network byte order), for source-hash.
#[inline(always)]
pub const fn client_hash(src: u32) -> u32 {
    mix32(src ^ 0x9e37_79b9)
}

/// An IPv6 address (as [`crate::Ip6`] words) folded into one word for the hashes above:
/// every bit of every word reaches the result.
#[inline(always)]
pub const fn fold_ip6(a: [u32; 4]) -> u32 {
    let mut h = mix32(a[0] ^ 0x7f4a_7c15);
    h = mix32(h ^ a[1]);
    h = mix32(h ^ a[2]);
    mix32(h ^ a[3])
}

/// Hash of a flow's 5-tuple (addresses and ports in network byte order), for Maglev.
#[inline(always)]
pub const fn flow_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let ports = ((sport as u32) << 16) | dport as u32;
    let mut h = mix32(src ^ 0x9e37_79b9);
    h = mix32(h ^ dst);
    h = mix32(h ^ ports);
    mix32(h ^ proto as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_code_round_trips_without_touching_other_flags() {
        for code in 0..scheduler::NAMES.len() as u8 {
            let flags = with_scheduler(crate::SVC_FLAG_AFFINITY, code);
            assert_eq!(scheduler_of(flags), code);
            assert_eq!(flags & crate::SVC_FLAG_AFFINITY, crate::SVC_FLAG_AFFINITY);
        }
        assert_eq!(scheduler_of(0), scheduler::RANDOM);
    }

    #[test]
    fn least_conn_choice_from_a_given_state() {
        let open = [5u64, 1, 3, 1]; // slots 1..=4
        let pick = |count, start| {
            least_loaded(count, start, |slot| {
                Some((u32::from(slot), open[slot as usize - 1]))
            })
        };
        assert_eq!(pick(4, 0), Some(2), "fewest, earliest of the tie 2/4");
        assert_eq!(
            pick(4, 3),
            Some(4),
            "window starting at slot 4 meets 4 first"
        );
        assert_eq!(pick(1, 0), Some(1));
        assert_eq!(pick(0, 0), None);
        // Unusable slots are skipped; none usable: no choice.
        assert_eq!(
            least_loaded(4, 0, |slot| (slot != 2)
                .then(|| (u32::from(slot), open[slot as usize - 1]))),
            Some(4)
        );
        assert_eq!(least_loaded(4, 0, |_| None), None);
        // Large services compare a window of LEAST_CONN_SCAN slots only.
        let big = |slot: u16| Some((u32::from(slot), if slot == 100 { 0 } else { 7 }));
        assert_eq!(
            least_loaded(1000, 0, big),
            Some(1),
            "slot 100 is outside the window"
        );
        assert_eq!(least_loaded(1000, 90, big), Some(100));
    }

    #[test]
    fn source_hash_is_stable_and_spreads() {
        // Pinned values: nodes running different xlb versions must send a client to the same
        // slot, so the hash may never change silently.
        // (Computed independently: murmur3 fmix32 of the input xor 0x9e3779b9.)
        assert_eq!(client_hash(0), 0x92ca_2f0e);
        assert_eq!(flow_hash(1, 2, 3, 4, 6), 0x8a1b_9fc1);
        assert_eq!(
            client_hash(u32::from_ne_bytes([10, 244, 0, 2])),
            client_hash(u32::from_ne_bytes([10, 244, 0, 2]))
        );
        let mut per_slot = [0u32; 4];
        for host in 0..4000u32 {
            let client = u32::from_ne_bytes([10, 244, (host >> 8) as u8, host as u8]);
            per_slot[(client_hash(client) % 4) as usize] += 1;
        }
        for n in per_slot {
            assert!((850..=1150).contains(&n), "uneven spread {per_slot:?}");
        }
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = flow_hash(1, 2, 3, 4, 6);
        for other in [
            flow_hash(9, 2, 3, 4, 6),
            flow_hash(1, 9, 3, 4, 6),
            flow_hash(1, 2, 9, 4, 6),
            flow_hash(1, 2, 3, 9, 6),
            flow_hash(1, 2, 3, 4, 17),
            flow_hash(1, 2, 4, 3, 6),
        ] {
            assert_ne!(base, other);
        }
    }
}
