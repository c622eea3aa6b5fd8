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
