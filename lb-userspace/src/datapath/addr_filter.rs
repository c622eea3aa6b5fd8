//! The agent's side of the address filter (`lb_common::addr_filter`) and of the reply
//! filter (same layout, `XLB_REPLY_FILTER`): which bits must be set, kept as reference
//! counts so a bit is cleared only when nothing that needs it hashes to it any more. The
//! store writes the words these return: a set bit before the entry that needs it, a
//! cleared one after the last entry left.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{MapAddr, addr_filter};

use crate::sync::keys::{BackendEntry, SlotKey, from_map_v4, from_map_v6, map_v4, map_v6};

/// A filter word to write: its index and its new value.
pub type WordWrite = (u32, u64);

/// Reference-counted bits of one filter, keyed by what sets them.
#[derive(Debug)]
struct Bits<K> {
    /// Per key: how many entries need it.
    refs: HashMap<K, u32>,
    /// Per bit: the distinct keys on it.
    per_bit: HashMap<(u32, u64), u32>,
    /// The words that are not zero.
    words: HashMap<u32, u64>,
}

impl<K> Default for Bits<K> {
    fn default() -> Self {
        Bits {
            refs: HashMap::new(),
            per_bit: HashMap::new(),
            words: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash> Bits<K> {
    fn word(&self, index: u32) -> u64 {
        self.words.get(&index).copied().unwrap_or(0)
    }

    /// One more entry needs `key` (on `slot`): the word to write if its bit was clear.
    fn add(&mut self, key: K, (index, bit): (u32, u64)) -> Option<WordWrite> {
        let refs = self.refs.entry(key).or_insert(0);
        *refs += 1;
        if *refs > 1 {
            return None;
        }
        let on_bit = self.per_bit.entry((index, bit)).or_insert(0);
        *on_bit += 1;
        if *on_bit > 1 {
            return None;
        }
        let word = self.words.entry(index).or_insert(0);
        *word |= bit;
        Some((index, *word))
    }

    /// One entry less needs `key`: the word to write if its bit cleared.
    fn drop(&mut self, key: &K, (index, bit): (u32, u64)) -> Option<WordWrite> {
        let refs = self.refs.get_mut(key)?;
        *refs -= 1;
        if *refs > 0 {
            return None;
        }
        self.refs.remove(key);
        let on_bit = self.per_bit.get_mut(&(index, bit))?;
        *on_bit -= 1;
        if *on_bit > 0 {
            return None;
        }
        self.per_bit.remove(&(index, bit));
        let word = self.words.get_mut(&index)?;
        *word &= !bit;
        let value = *word;
        if value == 0 {
            self.words.remove(&index);
        }
        Some((index, value))
    }
}

#[derive(Debug, Default)]
pub struct AddrFilter {
    /// Frontends (their slot-0 keys) counted in `bits`.
    frontends: HashSet<SlotKey>,
    node: Vec<IpAddr>,
    /// Per address: the frontends on it, plus one if it is a node address.
    bits: Bits<IpAddr>,
}

/// The word and bit of `addr`, as the programs compute them.
pub fn slot_of(addr: IpAddr) -> (u32, u64) {
    let hash = match addr {
        IpAddr::V4(a) => map_v4(a).hash_word(),
        IpAddr::V6(a) => map_v6(a).hash_word(),
    };
    addr_filter::slot(hash)
}

/// The address a frontend's slot-0 key asks for; `None` for other slots and for NodePorts
/// (stored on the unspecified address: the node's addresses stand for them).
fn frontend_addr(key: &SlotKey) -> Option<IpAddr> {
    if key.slot() != 0 {
        return None;
    }
    let addr = match key {
        SlotKey::V4(k) => IpAddr::V4(from_map_v4(k.vip)),
        SlotKey::V6(k) => IpAddr::V6(from_map_v6(k.vip)),
    };
    (!addr.is_unspecified()).then_some(addr)
}

impl AddrFilter {
    /// The frontend of `key` (a slot-0 key; other slots are ignored) is about to be
    /// written: the word to write first, if its bit was clear.
    pub fn add_frontend(&mut self, key: &SlotKey) -> Option<WordWrite> {
        let addr = frontend_addr(key)?;
        if !self.frontends.insert(*key) {
            return None;
        }
        self.add_ref(addr)
    }

    /// The frontend of `key` was removed: the word to write after, if its bit cleared.
    pub fn remove_frontend(&mut self, key: &SlotKey) -> Option<WordWrite> {
        let addr = frontend_addr(key)?;
        if !self.frontends.remove(key) {
            return None;
        }
        self.drop_ref(addr)
    }

    /// The node's addresses become `addresses`: the words to write before the node map
    /// changes (bits of new addresses), and those to write after (bits that cleared).
    pub fn set_node(&mut self, addresses: &[IpAddr]) -> (Vec<WordWrite>, Vec<WordWrite>) {
        let old = std::mem::take(&mut self.node);
        let mut node: Vec<IpAddr> = Vec::new();
        for a in addresses {
            if !a.is_unspecified() && !node.contains(a) {
                node.push(*a);
            }
        }
        let before = node
            .iter()
            .filter(|a| !old.contains(a))
            .filter_map(|a| self.add_ref(*a))
            .collect::<Vec<_>>();
        let after = old
            .iter()
            .filter(|a| !node.contains(a))
            .filter_map(|a| self.drop_ref(*a))
            .collect();
        self.node = node;
        (before, after)
    }

    /// The value word `index` must hold.
    pub fn word(&self, index: u32) -> u64 {
        self.bits.word(index)
    }

    fn add_ref(&mut self, addr: IpAddr) -> Option<WordWrite> {
        self.bits.add(addr, slot_of(addr))
    }

    fn drop_ref(&mut self, addr: IpAddr) -> Option<WordWrite> {
        self.bits.drop(&addr, slot_of(addr))
    }
}

/// A backend's (address, port, protocol) as the reply filter hashes it: the address's hash
/// word (addresses of either family on one word share the bit anyway), port in network
/// byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source(u32, u16, u8);

impl Source {
    fn new<A: MapAddr>(addr: A, port: u16, proto: u8) -> Source {
        Source(addr.hash_word(), port, proto)
    }

    fn of(entry: &BackendEntry) -> Source {
        match entry {
            BackendEntry::V4(b) => Source::new(b.ip, b.port, b.proto),
            BackendEntry::V6(b) => Source::new(b.ip, b.port, b.proto),
        }
    }

    /// The word and bit, as the programs compute them.
    fn slot(&self) -> (u32, u64) {
        addr_filter::reply_slot(self.0, self.1, self.2)
    }
}

/// How long a removed backend's bit outlives it: its flows' replies (a handshake in flight)
/// are still translated until the conntrack collector purged its entries, which it does
/// within seconds of the removal (`agent::gc`: asked at once, a grace of one second, a
/// second pass). A bit kept longer only costs that source the lookups.
pub const RETIRED_HOLD: Duration = Duration::from_secs(15);

/// The reply filter's mirror: a bit per backend's (address, port, protocol), counted over
/// the backend ids of both families that have it, and over removed backends whose flows
/// may still have replies (`RETIRED_HOLD`).
#[derive(Debug, Default)]
pub struct ReplyFilter {
    /// Per backend id and family (true: IPv6): what it counts in `bits`.
    backends: HashMap<(u32, bool), Source>,
    /// Sources counted in `bits` until the time given.
    retired: Vec<(Source, Instant)>,
    bits: Bits<Source>,
}

impl ReplyFilter {
    /// Backend `id` becomes `entry`: the word to write before the backend map changes (its
    /// bit, if it was clear). What it was before is retired.
    pub fn set_backend(
        &mut self,
        id: u32,
        entry: &BackendEntry,
        now: Instant,
    ) -> Option<WordWrite> {
        let source = Source::of(entry);
        let v6 = matches!(entry, BackendEntry::V6(_));
        match self.backends.insert((id, v6), source) {
            Some(old) if old == source => None,
            old => {
                let write = self.bits.add(source, source.slot());
                if let Some(old) = old {
                    self.retired.push((old, now + RETIRED_HOLD));
                }
                write
            }
        }
    }

    /// Backend `id` (`v6`: of the IPv6 map) was removed: its bit is retired, not cleared.
    pub fn remove_backend(&mut self, id: u32, v6: bool, now: Instant) {
        if let Some(old) = self.backends.remove(&(id, v6)) {
            self.retired.push((old, now + RETIRED_HOLD));
        }
    }

    /// Keeps the bit of a reverse conntrack entry's source (`addr`, `port` in network byte
    /// order, `proto`) for `RETIRED_HOLD`: what a restarted agent finds in the table.
    pub fn hold<A: MapAddr>(
        &mut self,
        addr: A,
        port: u16,
        proto: u8,
        now: Instant,
    ) -> Option<WordWrite> {
        let source = Source::new(addr, port, proto);
        let write = self.bits.add(source, source.slot());
        self.retired.push((source, now + RETIRED_HOLD));
        write
    }

    /// The words to write once retired sources' holds ended (bits that cleared).
    pub fn release_due(&mut self, now: Instant) -> Vec<WordWrite> {
        let (due, kept): (Vec<_>, Vec<_>) = self.retired.drain(..).partition(|(_, at)| *at <= now);
        self.retired = kept;
        due.iter()
            .filter_map(|(source, _)| self.bits.drop(source, source.slot()))
            .collect()
    }

    /// The value word `index` must hold.
    pub fn word(&self, index: u32) -> u64 {
        self.bits.word(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::ServiceKey;
    use std::net::Ipv4Addr;

    fn key(vip: &str, port: u16, slot: u16) -> SlotKey {
        let vip: Ipv4Addr = vip.parse().expect("address");
        SlotKey::V4(ServiceKey {
            vip: map_v4(vip),
            port: port.to_be(),
            slot,
            proto: 6,
            scope: 0,
            _pad: [0; 2],
        })
    }

    fn bit_set(f: &AddrFilter, addr: &str) -> bool {
        let (index, bit) = slot_of(addr.parse().expect("address"));
        f.word(index) & bit != 0
    }

    #[test]
    fn a_bit_stays_while_any_frontend_or_node_address_needs_it() {
        let mut f = AddrFilter::default();
        let (index, bit) = slot_of("10.96.0.10".parse().expect("address"));
        assert_eq!(
            f.add_frontend(&key("10.96.0.10", 80, 0)),
            Some((index, bit))
        );
        // A second port on the same address, a backend slot, a repeated write: no write.
        assert_eq!(f.add_frontend(&key("10.96.0.10", 443, 0)), None);
        assert_eq!(f.add_frontend(&key("10.96.0.10", 80, 1)), None);
        assert_eq!(f.add_frontend(&key("10.96.0.10", 80, 0)), None);
        let (before, after) = f.set_node(&["10.96.0.10".parse().expect("address")]);
        assert!(before.is_empty() && after.is_empty());
        assert_eq!(f.remove_frontend(&key("10.96.0.10", 80, 0)), None);
        assert_eq!(f.remove_frontend(&key("10.96.0.10", 443, 0)), None);
        assert!(bit_set(&f, "10.96.0.10"), "still a node address");
        let (before, after) = f.set_node(&[]);
        assert!(before.is_empty());
        assert_eq!(after, vec![(index, 0)]);
        assert!(!bit_set(&f, "10.96.0.10"));
        // Removing what was never added writes nothing.
        assert_eq!(f.remove_frontend(&key("10.96.0.11", 80, 0)), None);
    }

    #[test]
    fn nodeports_and_other_slots_set_no_bit() {
        let mut f = AddrFilter::default();
        assert_eq!(f.add_frontend(&key("0.0.0.0", 30080, 0)), None);
        assert_eq!(f.add_frontend(&key("10.96.0.1", 80, 3)), None);
        assert!(f.bits.words.is_empty());
    }

    #[test]
    fn addresses_sharing_a_bit_keep_it_until_the_last_leaves() {
        // Find two IPv4 addresses on one bit.
        let mut seen: HashMap<(u32, u64), Ipv4Addr> = HashMap::new();
        let (a, b) = (0u32..)
            .map(|i| Ipv4Addr::from(0x0a60_0000 + i))
            .find_map(|ip| {
                let slot = slot_of(ip.into());
                seen.insert(slot, ip).map(|other| (other, ip))
            })
            .expect("two addresses on one bit");
        let mut f = AddrFilter::default();
        assert!(f.add_frontend(&key(&a.to_string(), 80, 0)).is_some());
        assert_eq!(f.add_frontend(&key(&b.to_string(), 80, 0)), None);
        assert_eq!(f.remove_frontend(&key(&a.to_string(), 80, 0)), None);
        assert!(bit_set(&f, &b.to_string()));
        let (index, _) = slot_of(b.into());
        assert_eq!(
            f.remove_frontend(&key(&b.to_string(), 80, 0)),
            Some((index, 0))
        );
    }

    #[test]
    fn ipv6_addresses_are_filtered_too() {
        let mut f = AddrFilter::default();
        let node: IpAddr = "fd00::1".parse().expect("address");
        let (before, _) = f.set_node(&[node, "0.0.0.0".parse().expect("address")]);
        assert_eq!(before.len(), 1);
        assert!(bit_set(&f, "fd00::1"));
    }
}

#[cfg(test)]
mod reply_tests {
    use super::*;
    use lb_common::Backend;

    fn backend(ip: &str, port: u16, service_id: u32) -> BackendEntry {
        let ip: std::net::Ipv4Addr = ip.parse().expect("address");
        BackendEntry::V4(Backend {
            ip: map_v4(ip),
            port: port.to_be(),
            proto: 6,
            _pad: 0,
            service_id,
        })
    }

    fn set(f: &ReplyFilter, entry: &BackendEntry) -> bool {
        let (index, bit) = Source::of(entry).slot();
        f.word(index) & bit != 0
    }

    #[test]
    fn a_removed_backends_bit_outlives_it_by_the_hold_then_clears() {
        let t0 = Instant::now();
        let mut f = ReplyFilter::default();
        let pod = backend("10.244.1.5", 8080, 1);
        let (index, bit) = Source::of(&pod).slot();
        assert_eq!(f.set_backend(1, &pod, t0), Some((index, bit)));
        // The same endpoint behind another service port: one more reference, no write;
        // rewriting an id unchanged writes nothing.
        assert_eq!(f.set_backend(2, &backend("10.244.1.5", 8080, 2), t0), None);
        assert_eq!(f.set_backend(1, &pod, t0), None);
        f.remove_backend(1, false, t0);
        f.remove_backend(2, false, t0);
        // Its flows' replies are still translated until the hold ends.
        assert!(f.release_due(t0 + RETIRED_HOLD / 2).is_empty());
        assert!(set(&f, &pod));
        assert_eq!(f.release_due(t0 + RETIRED_HOLD), vec![(index, 0)]);
        assert!(!set(&f, &pod));
        // Removing what was never there, or the other family's id: nothing.
        f.remove_backend(7, false, t0);
        f.set_backend(3, &pod, t0);
        f.remove_backend(3, true, t0);
        assert!(f.release_due(t0 + RETIRED_HOLD * 2).is_empty());
        assert!(set(&f, &pod), "id 3 of IPv4 still has it");
    }

    #[test]
    fn a_backend_that_moves_keeps_the_old_bit_for_the_hold() {
        let t0 = Instant::now();
        let mut f = ReplyFilter::default();
        let old = backend("10.244.1.5", 8080, 1);
        let new = backend("10.244.1.6", 8080, 1);
        f.set_backend(1, &old, t0);
        let (new_index, new_bit) = Source::of(&new).slot();
        let write = f.set_backend(1, &new, t0);
        assert_eq!(
            write.map(|(i, w)| (i, w & new_bit != 0)),
            Some((new_index, true))
        );
        assert!(set(&f, &new) && set(&f, &old));
        let (old_index, _) = Source::of(&old).slot();
        let cleared = f.release_due(t0 + RETIRED_HOLD);
        assert_eq!(
            cleared.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![old_index]
        );
        assert!(set(&f, &new) && !set(&f, &old));
        // Another port of the same address is another bit.
        assert_ne!(
            Source::of(&backend("10.244.1.6", 9090, 1)).slot(),
            Source::of(&new).slot()
        );
    }

    #[test]
    fn sources_found_in_conntrack_are_held_as_retired() {
        let t0 = Instant::now();
        let mut f = ReplyFilter::default();
        let pod = backend("10.244.1.9", 53, 4);
        let BackendEntry::V4(b) = pod else {
            unreachable!()
        };
        assert!(f.hold(b.ip, b.port, b.proto, t0).is_some());
        assert!(set(&f, &pod));
        assert_eq!(f.release_due(t0 + RETIRED_HOLD).len(), 1);
        assert!(!set(&f, &pod));
    }
}
