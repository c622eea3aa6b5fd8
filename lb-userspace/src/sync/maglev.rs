//! Maglev lookup tables (Eisenbud et al., NSDI 2016, §3.4): each backend walks its own
//! permutation of the table's slots, claiming free ones. Every backend ends up with ⌊M/N⌋ or
//! ⌈M/N⌉ slots, and a backend set change moves few slots, so few new flows change backend.
//!
//! Permutations come from the backend's address, never from its id or its position in a
//! list: the same backend set gives the same table on every node, in every order, across
//! agent restarts.
use crate::model::Endpoint;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableSizeError {
    #[error("Maglev table size {0} is not a prime (Maglev needs one; the default is 16381)")]
    NotPrime(u32),
    #[error("Maglev table size {size} is outside {min}..={max}")]
    OutOfRange { size: u32, min: u32, max: u32 },
}

/// Smallest accepted table size (a prime).
pub const MIN_SIZE: u32 = 251;

/// Checks a `--maglev-table-size` value.
pub fn check_size(size: u32) -> Result<u32, TableSizeError> {
    let max = lb_common::MAGLEV_MAX_SIZE;
    if !(MIN_SIZE..=max).contains(&size) {
        return Err(TableSizeError::OutOfRange {
            size,
            min: MIN_SIZE,
            max,
        });
    }
    if !is_prime(size) {
        return Err(TableSizeError::NotPrime(size));
    }
    Ok(size)
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// 64-bit FNV-1a, finished with a strong mixer: stable across Rust releases (unlike std's
/// hasher), which keeps tables identical across agent versions.
fn hash(seed: u64, endpoint: &Endpoint) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    // IPv4 hashes its 4 bytes, as before there was IPv6: the tables of IPv4 frontends stay.
    let octets: Vec<u8> = match endpoint.ip {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    for byte in octets.into_iter().chain(endpoint.port.to_be_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The table of size `size` (a prime) for `backends` (endpoint, backend id): `size` backend
/// ids. Empty when there are no backends.
///
/// Backends walk their permutations in lockstep (step t: every backend looks at the t-th slot
/// of its permutation and takes it if free) until each holds its quota, ⌊M/N⌋ or ⌈M/N⌉.
/// Classic Maglev lets backends take turns claiming their next free slot instead; with
/// quotas the same permutations give exact balance and about half the extra churn when
/// a backend leaves (≤ 1 point above 1/N where turn-taking reaches 1.8 at M = 16381).
pub fn build(backends: &[(Endpoint, u32)], size: u32) -> Vec<u32> {
    let mut unique: Vec<(Endpoint, u32)> = backends.to_vec();
    unique.sort_by_key(|(endpoint, _)| *endpoint);
    unique.dedup_by_key(|(endpoint, _)| *endpoint);
    let n = unique.len();
    if n == 0 || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    // Order (and who gets the ⌈M/N⌉ quotas) from the address hash alone: independent of
    // the input order, and stable for the backends that stay when one leaves.
    let mut walkers: Vec<Walker> = unique
        .iter()
        .map(|(endpoint, id)| Walker {
            rank: hash(0x6d61_676c_6576_3030, endpoint),
            offset: hash(0x6d61_676c_6576_3031, endpoint) % m,
            skip: hash(0x6d61_676c_6576_3032, endpoint) % (m - 1) + 1,
            id: *id,
            quota: 0,
        })
        .collect();
    walkers.sort_by_key(|w| (w.rank, w.id));
    let (base, extra) = (size as usize / n, size as usize % n);
    for (i, w) in walkers.iter_mut().enumerate() {
        w.quota = base + usize::from(i < extra);
    }
    let mut table: Vec<u32> = vec![0; size as usize];
    let mut taken = vec![false; size as usize];
    // `size` is prime and every skip is in 1..size, so each walk visits every slot within M
    // steps; the quotas sum to M, so a walker short of its quota always finds a free slot.
    let mut active: Vec<Walker> = walkers.into_iter().filter(|w| w.quota > 0).collect();
    let mut step: u64 = 0;
    while !active.is_empty() {
        active.retain_mut(|w| {
            let slot = ((w.offset + step * w.skip) % m) as usize;
            if !taken[slot] {
                taken[slot] = true;
                table[slot] = w.id;
                w.quota -= 1;
            }
            w.quota > 0
        });
        step += 1;
    }
    table
}

struct Walker {
    rank: u64,
    offset: u64,
    skip: u64,
    id: u32,
    quota: usize,
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use lb_common::MAGLEV_DEFAULT_SIZE;

    use super::*;

    fn backends(n: u32) -> Vec<(Endpoint, u32)> {
        (0..n)
            .map(|i| {
                let ip = Ipv4Addr::from(0x0a00_0000 + i * 7 + 1);
                (
                    Endpoint {
                        ip: ip.into(),
                        port: 8080,
                    },
                    1000 + i,
                )
            })
            .collect()
    }

    fn shares(table: &[u32]) -> BTreeMap<u32, usize> {
        let mut counts = BTreeMap::new();
        for id in table {
            *counts.entry(*id).or_default() += 1;
        }
        counts
    }

    #[test]
    fn every_backend_holds_floor_or_ceil_of_m_over_n() {
        let m = MAGLEV_DEFAULT_SIZE as usize;
        for n in [1, 2, 3, 7, 10, 100, 333, 1000] {
            let set = backends(n);
            let table = build(&set, MAGLEV_DEFAULT_SIZE);
            assert_eq!(table.len(), m);
            let counts = shares(&table);
            assert_eq!(counts.len(), n as usize, "n={n}: every backend appears");
            let (lo, hi) = (m / n as usize, m.div_ceil(n as usize));
            for (id, c) in counts {
                assert!((lo..=hi).contains(&c), "n={n}: backend {id} holds {c}");
            }
        }
    }

    #[test]
    fn removing_one_backend_moves_about_one_nth() {
        let m = MAGLEV_DEFAULT_SIZE as f64;
        for n in [3, 10, 50, 100, 200, 1000] {
            let set = backends(n);
            let before = build(&set, MAGLEV_DEFAULT_SIZE);
            for removed in [0, n as usize / 3, n as usize / 2, n as usize - 1] {
                let mut fewer = set.clone();
                fewer.remove(removed);
                let after = build(&fewer, MAGLEV_DEFAULT_SIZE);
                let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                let bound = m / f64::from(n) + 0.01 * m;
                assert!(
                    changed as f64 <= bound,
                    "n={n}, removed #{removed}: {changed} of {m} entries changed (bound {bound:.0})"
                );
                // The removed backend's entries all moved; nothing points at it any more.
                assert!(!after.contains(&set[removed].1));
            }
        }
    }

    #[test]
    fn table_is_the_same_whatever_the_order() {
        let set = backends(50);
        let mut reversed = set.clone();
        reversed.reverse();
        let mut shuffled = set.clone();
        shuffled.rotate_left(17);
        shuffled.swap(3, 40);
        let table = build(&set, MAGLEV_DEFAULT_SIZE);
        assert_eq!(build(&reversed, MAGLEV_DEFAULT_SIZE), table);
        assert_eq!(build(&shuffled, MAGLEV_DEFAULT_SIZE), table);
    }

    #[test]
    fn empty_and_small_tables() {
        assert!(build(&[], MAGLEV_DEFAULT_SIZE).is_empty());
        let table = build(&backends(3), 251);
        assert_eq!(table.len(), 251);
        assert!(table.iter().all(|id| (1000..1003).contains(id)));
    }

    #[test]
    fn table_sizes_are_checked() {
        assert_eq!(check_size(16_381), Ok(16_381));
        assert_eq!(check_size(65_521), Ok(65_521));
        assert_eq!(check_size(16_383), Err(TableSizeError::NotPrime(16_383)));
        assert!(matches!(
            check_size(7),
            Err(TableSizeError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_size(65_537),
            Err(TableSizeError::OutOfRange { .. })
        ));
    }
}
