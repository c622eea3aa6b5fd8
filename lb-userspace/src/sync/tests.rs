//! Unit tests of sync: ordering invariants checked after every write, adoption, Maglev.
use std::net::Ipv4Addr;

use lb_common::{Backend, SVC_FLAG_AFFINITY, scheduler, scheduler_of};

use super::*;

/// In-memory maps that check, after every single write, that no frontend is exposed
/// half-written: slot 0's count never points at a missing slot or backend, and a Maglev
/// frontend's table exists and names only live backends of its own.
#[derive(Default)]
struct FakeMaps {
    slots: BTreeMap<SlotKey, ServiceValue>,
    backends: BTreeMap<u32, BackendEntry>,
    tables: BTreeMap<u32, Vec<u32>>,
    ranges: BTreeSet<(u32, IpNet)>,
    names: BTreeMap<u32, String>,
    writes: usize,
    fail_after: Option<usize>,
}

impl FakeMaps {
    fn check(&self) {
        for (key, front) in self.slots.iter().filter(|(k, _)| k.slot() == 0) {
            for slot in 1..=front.count {
                let slot_key = key.with_slot(slot);
                let id = self.slots.get(&slot_key).map(|v| v.backend_id);
                let id = id.unwrap_or_else(|| panic!("slot {slot} of {key:?} missing"));
                let b = self
                    .backends
                    .get(&id)
                    .unwrap_or_else(|| panic!("backend {id} missing"));
                assert_eq!(
                    b.service_id(),
                    front.service_id,
                    "backend {id} of another service"
                );
                assert_eq!(
                    matches!(key, SlotKey::V6(_)),
                    matches!(b, BackendEntry::V6(_)),
                    "backend {id} of the other family"
                );
            }
            if scheduler_of(front.flags) == scheduler::MAGLEV && front.count > 0 {
                let table = self
                    .tables
                    .get(&front.service_id)
                    .unwrap_or_else(|| panic!("Maglev table of {key:?} missing"));
                for id in table {
                    let b = self.backends.get(id);
                    assert!(
                        b.is_some_and(|b| b.service_id() == front.service_id),
                        "Maglev table of {key:?} names backend {id}, not live in it"
                    );
                }
            }
        }
    }
    fn op(&mut self) -> Result<(), StoreError> {
        self.writes += 1;
        if self.fail_after.is_some_and(|n| self.writes > n) {
            return Err(StoreError {
                operation: "insert",
                map: "fake",
                message: "injected failure".into(),
            });
        }
        Ok(())
    }
    fn endpoints_of(&self, frontend: &Frontend) -> Vec<Endpoint> {
        let front = self.slots[&service_key(frontend, 0)];
        (1..=front.count)
            .map(|s| {
                let id = self.slots[&service_key(frontend, s)].backend_id;
                self.backends[&id].endpoint()
            })
            .collect()
    }
}

impl MapStore for FakeMaps {
    fn set_backend(&mut self, id: u32, backend: &BackendEntry) -> Result<(), StoreError> {
        self.op()?;
        self.backends.insert(id, *backend);
        self.check();
        Ok(())
    }
    fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), StoreError> {
        self.op()?;
        if let Some(b) = self.backends.get(&id) {
            assert_eq!(
                b.family(),
                family,
                "backend {id} removed from the other map"
            );
        }
        self.backends.remove(&id);
        self.check();
        Ok(())
    }
    fn set_slot(&mut self, key: &SlotKey, value: &ServiceValue) -> Result<(), StoreError> {
        self.op()?;
        self.slots.insert(*key, *value);
        self.check();
        Ok(())
    }
    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), StoreError> {
        self.op()?;
        self.slots.remove(key);
        self.check();
        Ok(())
    }
    fn set_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), StoreError> {
        self.op()?;
        self.tables.insert(service_id, table.to_vec());
        self.check();
        Ok(())
    }
    fn remove_maglev(&mut self, service_id: u32) -> Result<(), StoreError> {
        self.op()?;
        self.tables.remove(&service_id);
        self.check();
        Ok(())
    }
    fn add_source_range(&mut self, id: u32, range: &IpNet) -> Result<(), StoreError> {
        self.op()?;
        self.ranges.insert((id, *range));
        self.check();
        Ok(())
    }
    fn remove_source_range(&mut self, id: u32, range: &IpNet) -> Result<(), StoreError> {
        self.op()?;
        self.ranges.remove(&(id, *range));
        self.check();
        Ok(())
    }
    fn set_service_name(&mut self, service_id: u32, name: &str) {
        self.names.insert(service_id, name.to_string());
    }
    fn forget_counters(&mut self, service_id: Option<u32>, _: Option<u32>) {
        if let Some(id) = service_id {
            self.names.remove(&id);
        }
    }
}

fn frontend(last: u8) -> Frontend {
    Frontend::internal(Ipv4Addr::new(10, 96, 0, last), 80, Protocol::Tcp)
}

fn spec(endpoints: &[u8]) -> FrontendSpec {
    FrontendSpec {
        service: "ns/svc:http".into(),
        endpoints: endpoints
            .iter()
            .map(|e| Endpoint {
                ip: Ipv4Addr::new(10, 244, 0, *e).into(),
                port: 8080,
            })
            .collect(),
        affinity_timeout_s: None,
        scheduler: Scheduler::Random,
        snat: false,
        drop_when_empty: false,
        source_ranges: Vec::new(),
    }
}

fn desired(list: &[(u8, &[u8])]) -> DesiredState {
    list.iter().map(|(f, e)| (frontend(*f), spec(e))).collect()
}

#[test]
fn add_change_remove_keeps_maps_consistent_at_every_write() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::new();
    let steps: Vec<DesiredState> = vec![
        desired(&[(1, &[1, 2, 3]), (2, &[4])]),
        desired(&[(1, &[2, 3, 5, 6]), (2, &[4])]), // grow, replace one
        desired(&[(1, &[6]), (2, &[])]),           // shrink, empty
        desired(&[(2, &[7, 8])]),                  // remove a service
        desired(&[]),
    ];
    for want in steps {
        syncer.apply(&want, &mut maps).expect("sync");
        for (f, s) in &want {
            assert_eq!(maps.endpoints_of(f), s.endpoints, "{f}");
        }
        let slot0 = maps.slots.keys().filter(|k| k.slot() == 0).count();
        assert_eq!(slot0, want.len(), "no stale frontends");
        let slots: usize = want.values().map(|s| s.endpoints.len() + 1).sum();
        assert_eq!(maps.slots.len(), slots, "no stale slots");
        let backends: usize = want.values().map(|s| s.endpoints.len()).sum();
        assert_eq!(maps.backends.len(), backends, "no stale backends");
    }
}

#[test]
fn syncing_only_the_changed_frontends_ends_where_a_full_sync_ends() {
    let steps: Vec<DesiredState> = vec![
        desired(&[(1, &[1, 2, 3]), (2, &[4]), (3, &[9])]),
        desired(&[(1, &[2, 3, 5, 6]), (2, &[4]), (3, &[9])]),
        desired(&[(1, &[6]), (2, &[]), (3, &[9])]),
        desired(&[(2, &[7, 8]), (3, &[9])]),
        desired(&[]),
    ];
    let (mut full_maps, mut full) = (FakeMaps::default(), Syncer::new());
    let (mut part_maps, mut part) = (FakeMaps::default(), Syncer::new());
    let mut before = DesiredState::new();
    for want in steps {
        // What a translator reports: frontends added, removed or changed.
        let changed: Vec<Frontend> = want
            .keys()
            .chain(before.keys())
            .filter(|f| want.get(f) != before.get(f))
            .copied()
            .collect();
        let a = full.apply(&want, &mut full_maps).expect("full");
        let b = part
            .apply_changes(&want, &changed, &mut part_maps)
            .expect("changed only");
        assert_eq!(a, b);
        assert_eq!(full_maps.slots, part_maps.slots);
        assert_eq!(full_maps.backends, part_maps.backends);
        before = want;
    }
}

#[test]
fn unchanged_state_writes_nothing_and_kept_endpoints_keep_ids() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::new();
    syncer
        .apply(&desired(&[(1, &[1, 2])]), &mut maps)
        .expect("sync");
    let ids_before = syncer.current()[&frontend(1)].backends.clone();
    let writes = maps.writes;
    let report = syncer
        .apply(&desired(&[(1, &[1, 2])]), &mut maps)
        .expect("sync");
    assert!(report.is_noop());
    assert_eq!(maps.writes, writes);

    syncer
        .apply(&desired(&[(1, &[1, 2, 3])]), &mut maps)
        .expect("sync");
    let ids_after = &syncer.current()[&frontend(1)].backends;
    assert_eq!(
        &ids_after[..2],
        &ids_before[..],
        "existing backends keep their ids"
    );
    // Exactly: one backend, one slot, the frontend.
    assert_eq!(maps.writes, writes + 3);
}

#[test]
fn a_change_to_one_service_touches_only_its_entries() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::new();
    let many: Vec<(u8, &[u8])> = (1..=50).map(|f| (f, &[1u8, 2][..])).collect();
    syncer.apply(&desired(&many), &mut maps).expect("sync");
    let writes = maps.writes;
    let mut changed = many.clone();
    changed[10].1 = &[1, 2, 3];
    let report = syncer.apply(&desired(&changed), &mut maps).expect("sync");
    assert_eq!(report.frontends_updated, 1);
    assert_eq!(maps.writes - writes, 3);
}

#[test]
fn adopt_after_restart_keeps_ids_and_cleans_half_written_state() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::new();
    let want = desired(&[(1, &[1, 2, 3]), (2, &[4])]);
    syncer.apply(&want, &mut maps).expect("sync");
    let before = syncer.current()[&frontend(1)].clone();

    // Simulate a crash mid-update: an extra slot past the count and an orphan backend.
    let extra = service_key(&frontend(1), 4);
    maps.slots.insert(
        extra,
        ServiceValue {
            backend_id: 999,
            ..Default::default()
        },
    );
    maps.backends.insert(
        999,
        BackendEntry::V4(Backend {
            service_id: 12345,
            ..Default::default()
        }),
    );

    let mut adopted = Syncer::adopt(
        maps.slots.iter().map(|(k, v)| (*k, *v)),
        maps.backends.iter().map(|(k, v)| (*k, *v)),
        maps.tables.keys().copied(),
    );
    assert_eq!(adopted.current()[&frontend(1)].backends, before.backends);
    adopted.apply(&want, &mut maps).expect("sync");
    assert_eq!(
        adopted.current()[&frontend(1)].service_id,
        before.service_id
    );
    assert_eq!(adopted.current()[&frontend(1)].backends, before.backends);
    assert!(!maps.slots.contains_key(&extra), "stale slot removed");
    assert!(!maps.backends.contains_key(&999), "orphan backend removed");
    // New ids do not collide with adopted ones.
    adopted
        .apply(
            &desired(&[(1, &[1, 2, 3]), (2, &[4]), (3, &[9])]),
            &mut maps,
        )
        .expect("sync");
    let mut ids: Vec<u32> = adopted
        .current()
        .values()
        .flat_map(|p| p.backends.iter().map(|(_, id)| *id))
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
}

#[test]
fn failed_write_is_reported_with_the_frontend_and_recovers_by_adoption() {
    let mut maps = FakeMaps {
        fail_after: Some(2),
        ..Default::default()
    };
    let mut syncer = Syncer::new();
    let want = desired(&[(1, &[1, 2, 3])]);
    let err = syncer
        .apply(&want, &mut maps)
        .expect_err("injected failure");
    assert!(err.to_string().contains("10.96.0.1:80/TCP"), "{err}");
    maps.fail_after = None;
    let mut syncer = Syncer::adopt(
        maps.slots.iter().map(|(k, v)| (*k, *v)),
        maps.backends.iter().map(|(k, v)| (*k, *v)),
        maps.tables.keys().copied(),
    );
    syncer.apply(&want, &mut maps).expect("sync");
    assert_eq!(
        maps.endpoints_of(&frontend(1)),
        want[&frontend(1)].endpoints
    );
    assert_eq!(
        maps.backends.len(),
        3,
        "backends written before the failure were adopted or removed"
    );
}

#[test]
fn affinity_and_too_many_backends() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::new();
    let mut s = spec(&[1]);
    s.affinity_timeout_s = Some(30);
    let mut want = DesiredState::new();
    want.insert(frontend(1), s);
    syncer.apply(&want, &mut maps).expect("sync");
    let front = maps.slots[&service_key(&frontend(1), 0)];
    assert_eq!(
        (front.flags, front.affinity_timeout_s),
        (SVC_FLAG_AFFINITY, 30)
    );

    let mut big = spec(&[]);
    big.endpoints = (0..MAX_BACKENDS as u32 + 10)
        .map(|i| Endpoint {
            ip: Ipv4Addr::from(0x0af4_0000 + i).into(),
            port: 1,
        })
        .collect();
    want.insert(frontend(2), big);
    let report = syncer.apply(&want, &mut maps).expect("sync");
    assert_eq!(report.truncated, 1);
    assert_eq!(
        maps.slots[&service_key(&frontend(2), 0)].count,
        MAX_BACKENDS
    );
}

fn with_scheduler_spec(endpoints: &[u8], scheduler: Scheduler) -> FrontendSpec {
    FrontendSpec {
        scheduler,
        ..spec(endpoints)
    }
}

#[test]
fn scheduler_is_in_the_frontend_flags() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::new();
    for scheduler in Scheduler::ALL {
        let want: DesiredState = [(frontend(1), with_scheduler_spec(&[1, 2], scheduler))].into();
        syncer.apply(&want, &mut maps).expect("sync");
        let front = maps.slots[&service_key(&frontend(1), 0)];
        assert_eq!(scheduler_of(front.flags), scheduler.code(), "{scheduler}");
    }
}

#[test]
fn maglev_tables_follow_the_backends_and_go_with_the_scheduler() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::new().with_maglev_size(251);
    let maglev = |e: &[u8]| -> DesiredState {
        [(frontend(1), with_scheduler_spec(e, Scheduler::Maglev))].into()
    };
    // FakeMaps checks after every write that the table exists before the frontend says
    // Maglev and never names a backend that is not live.
    for step in [&[1u8, 2, 3][..], &[2, 3, 4], &[4], &[], &[5, 6]] {
        syncer.apply(&maglev(step), &mut maps).expect("sync");
        let id = syncer.current()[&frontend(1)].service_id;
        if step.is_empty() {
            assert!(!maps.tables.contains_key(&id), "no table without backends");
            continue;
        }
        let table = &maps.tables[&id];
        assert_eq!(table.len(), 251);
        let mut named: Vec<u32> = table.clone();
        named.sort();
        named.dedup();
        assert_eq!(named.len(), step.len(), "every backend is in the table");
    }
    // Unchanged backends: the table is not rewritten.
    let writes = maps.writes;
    syncer.apply(&maglev(&[5, 6]), &mut maps).expect("sync");
    assert_eq!(maps.writes, writes);
    // Switching to round-robin drops the table, removing the service drops everything.
    let rr: DesiredState = [(
        frontend(1),
        with_scheduler_spec(&[5, 6], Scheduler::RoundRobin),
    )]
    .into();
    syncer.apply(&rr, &mut maps).expect("sync");
    assert!(maps.tables.is_empty());
    syncer.apply(&maglev(&[5, 6]), &mut maps).expect("sync");
    assert_eq!(maps.tables.len(), 1);
    syncer.apply(&DesiredState::new(), &mut maps).expect("sync");
    assert!(maps.tables.is_empty() && maps.slots.is_empty());
}

#[test]
fn adoption_rewrites_maglev_tables_and_drops_orphaned_ones() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::new().with_maglev_size(251);
    let want: DesiredState = [
        (frontend(1), with_scheduler_spec(&[1, 2], Scheduler::Maglev)),
        (frontend(2), with_scheduler_spec(&[3], Scheduler::Random)),
    ]
    .into();
    syncer.apply(&want, &mut maps).expect("sync");
    let table = maps.tables.values().next().cloned().expect("one table");
    // A table left by a crashed agent for a frontend that no longer uses Maglev.
    let random_id = syncer.current()[&frontend(2)].service_id;
    maps.tables.insert(random_id, vec![0; 251]);
    let mut adopted = Syncer::adopt(
        maps.slots.iter().map(|(k, v)| (*k, *v)),
        maps.backends.iter().map(|(k, v)| (*k, *v)),
        maps.tables.keys().copied(),
    )
    .with_maglev_size(251);
    adopted.apply(&want, &mut maps).expect("sync");
    assert_eq!(maps.tables.len(), 1, "orphaned table removed");
    assert_eq!(
        maps.tables.values().next(),
        Some(&table),
        "same backends, same table after a restart"
    );
}

/// A store that keeps per-id traffic counters as the datapath's arrays would (indexed by
/// id, so an id at or past the array's capacity counts nothing) and checks that a reused id
/// starts from zero.
#[derive(Default)]
struct CountingStore {
    backends: BTreeMap<u32, BackendEntry>,
    /// Packets counted per backend id since it was last forgotten.
    counters: BTreeMap<u32, u64>,
}

impl MapStore for CountingStore {
    fn set_backend(&mut self, id: u32, backend: &BackendEntry) -> Result<(), StoreError> {
        assert!(
            id > 0 && id < lb_common::map_sizes::BACKEND_STATS,
            "id {id}"
        );
        assert_eq!(
            self.counters.get(&id),
            None,
            "id {id} reused with old counts"
        );
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn remove_backend(&mut self, id: u32, _: Family) -> Result<(), StoreError> {
        self.backends.remove(&id);
        Ok(())
    }
    fn set_slot(&mut self, _: &SlotKey, _: &ServiceValue) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove_slot(&mut self, _: &SlotKey) -> Result<(), StoreError> {
        Ok(())
    }
    fn set_maglev(&mut self, _: u32, _: &[u32]) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove_maglev(&mut self, _: u32) -> Result<(), StoreError> {
        Ok(())
    }
    fn add_source_range(&mut self, _: u32, _: &IpNet) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove_source_range(&mut self, _: u32, _: &IpNet) -> Result<(), StoreError> {
        Ok(())
    }
    fn set_service_name(&mut self, _: u32, _: &str) {}
    fn forget_counters(&mut self, _: Option<u32>, backend_id: Option<u32>) {
        if let Some(id) = backend_id {
            self.counters.remove(&id);
        }
    }
}

#[test]
fn a_million_endpoint_replacements_keep_ids_inside_the_counter_arrays() {
    let mut store = CountingStore::default();
    let mut syncer = Syncer::new();
    let web = frontend(1);
    let mut peak_footprint = 0;
    // 100 000 rollouts of a 10-endpoint service: every endpoint replaced each time.
    for round in 0u32..100_000 {
        let endpoints: Vec<Endpoint> = (0..10u32)
            .map(|e| Endpoint {
                ip: Ipv4Addr::from(0x0af4_0000 + (round % 50_000) * 10 + e).into(),
                port: 8080,
            })
            .collect();
        let wanted: DesiredState = [(
            web,
            FrontendSpec {
                endpoints,
                ..spec(&[])
            },
        )]
        .into();
        syncer.apply(&wanted, &mut store).expect("sync");
        // Traffic to every backend of this round, counted under its id.
        for (_, id) in &syncer.current()[&web].backends {
            *store.counters.entry(*id).or_default() += 1;
        }
        peak_footprint = peak_footprint.max(syncer.backend_ids.footprint());
    }
    let backends = &syncer.current()[&web].backends;
    assert_eq!(backends.len(), 10);
    for (_, id) in backends {
        assert_eq!(
            store.counters[id], 1,
            "backend {id} counts only its own traffic"
        );
    }
    assert_eq!(store.backends.len(), 10, "removed backends left the map");
    // Memory stays flat: ids tracked never exceed the array they index.
    assert!(
        peak_footprint < lb_common::map_sizes::BACKEND_STATS as usize,
        "{peak_footprint}"
    );
}

#[test]
fn service_names_follow_the_frontends() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::new();
    let mut wanted = desired(&[(1, &[1]), (2, &[2])]);
    syncer.apply(&wanted, &mut maps).expect("sync");
    let id_of = |syncer: &Syncer, f| syncer.current()[&frontend(f)].service_id;
    assert_eq!(maps.names.len(), 2);
    assert_eq!(maps.names[&id_of(&syncer, 1)], "ns/svc:http");
    if let Some(spec) = wanted.get_mut(&frontend(1)) {
        spec.service = "ns/renamed:http".into();
    }
    wanted.remove(&frontend(2));
    syncer.apply(&wanted, &mut maps).expect("sync");
    assert_eq!(
        maps.names.values().collect::<Vec<_>>(),
        ["ns/renamed:http"],
        "renamed, and the removed frontend's name gone"
    );
}
