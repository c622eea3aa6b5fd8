//! Writes the difference between the desired state and what the maps hold, in an order that
//! never exposes a half-written service: backends first, then backend slots, then the
//! frontend (slot 0) with its count; removals in reverse.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    Backend, MAGLEV_DEFAULT_SIZE, MAX_BACKENDS, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY,
    SVC_FLAG_SNAT, SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue, scheduler, scheduler_of,
    with_scheduler,
};

use crate::{
    maglev,
    model::{DesiredState, Endpoint, Frontend, FrontendSpec, Ipv4Net, Protocol, Scheduler, Scope},
};

/// The map operations sync needs; implemented by the real BPF maps and by test fakes.
pub trait MapStore {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), StoreError>;
    fn remove_backend(&mut self, id: u32) -> Result<(), StoreError>;
    fn set_slot(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), StoreError>;
    fn remove_slot(&mut self, key: &ServiceKey) -> Result<(), StoreError>;
    /// Replaces the frontend's Maglev table as a whole (`table`: M backend ids).
    fn set_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), StoreError>;
    fn remove_maglev(&mut self, service_id: u32) -> Result<(), StoreError>;
    fn add_source_range(&mut self, service_id: u32, range: &Ipv4Net) -> Result<(), StoreError>;
    fn remove_source_range(&mut self, service_id: u32, range: &Ipv4Net) -> Result<(), StoreError>;
    /// Drops the counters and scheduler state of a removed service or backend id (ids get
    /// reused).
    fn forget_counters(&mut self, service_id: Option<u32>, backend_id: Option<u32>);
}

#[derive(Debug, thiserror::Error)]
#[error("{operation} in map {map} failed: {message}")]
pub struct StoreError {
    pub operation: &'static str,
    pub map: &'static str,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("syncing {frontend} ({service}): {source}")]
    Store {
        frontend: Frontend,
        service: String,
        source: StoreError,
    },
    #[error("no free {0} id left")]
    IdsExhausted(&'static str),
}

/// What one frontend looks like in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programmed {
    pub service: String,
    pub service_id: u32,
    pub frontend_value: ServiceValue,
    /// Slot i+1 holds backends[i].
    pub backends: Vec<(Endpoint, u32)>,
    /// Highest slot number present in the map (more than `backends.len()` only for state
    /// adopted after a crash mid-update).
    pub slot_count: usize,
    /// The Maglev table written for this frontend, if it has one (empty: present in the
    /// maps with unknown content, after adoption).
    pub maglev: Option<Vec<u32>>,
    /// loadBalancerSourceRanges written for this frontend.
    pub source_ranges: Vec<Ipv4Net>,
}

/// Whether the maps already hold `spec` as `old` records it (`endpoints` are `spec`'s after
/// truncation): same backends in the same slots, same frontend value, same source ranges,
/// and a Maglev table only if, and as, wanted. A Maglev table adopted with unknown content
/// (empty) is rewritten.
fn unchanged(old: &Programmed, spec: &FrontendSpec, endpoints: &[Endpoint]) -> bool {
    let wants_table = spec.scheduler == Scheduler::Maglev && !endpoints.is_empty();
    old.slot_count == endpoints.len()
        && old.backends.len() == endpoints.len()
        && old
            .backends
            .iter()
            .zip(endpoints)
            .all(|((e, _), want)| e == want)
        && old.frontend_value == frontend_value(old.service_id, endpoints.len(), spec)
        && old.source_ranges == spec.source_ranges
        && old.service == spec.service
        && match &old.maglev {
            None => !wants_table,
            Some(table) => wants_table && !table.is_empty(),
        }
}

/// Counts of what a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub frontends_added: usize,
    pub frontends_updated: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub truncated: usize,
}

impl SyncReport {
    pub fn is_noop(&self) -> bool {
        *self == SyncReport::default()
    }
}

/// Allocates small non-zero ids, preferring ones not used recently (a freed id is only
/// reused after the counter wraps), so stale conntrack entries rarely meet a reused id.
#[derive(Debug, Default)]
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn allocate(&mut self, what: &'static str) -> Result<u32, SyncError> {
        for _ in 0..=u32::MAX {
            self.next = self.next.wrapping_add(1).max(1);
            if self.used.insert(self.next) {
                return Ok(self.next);
            }
        }
        Err(SyncError::IdsExhausted(what))
    }
    fn adopt(&mut self, id: u32) {
        self.used.insert(id);
        self.next = self.next.max(id);
    }
    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// Tracks what is programmed and brings it to the desired state.
#[derive(Debug)]
pub struct Syncer {
    current: BTreeMap<Frontend, Programmed>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    /// Adopted backends no frontend references; removed by the next apply.
    orphans: Vec<u32>,
    /// Adopted Maglev tables of frontends that do not use Maglev; removed by the next apply.
    orphan_tables: Vec<u32>,
    /// Backend ids freed since the last [`Syncer::take_removed_backends`].
    removed_backends: Vec<u32>,
    /// See [`Syncer::take_names_changed`].
    names_changed: bool,
    maglev_size: u32,
}

impl Default for Syncer {
    fn default() -> Self {
        Self {
            current: BTreeMap::new(),
            service_ids: IdAllocator::default(),
            backend_ids: IdAllocator::default(),
            orphans: Vec::new(),
            orphan_tables: Vec::new(),
            removed_backends: Vec::new(),
            names_changed: true,
            maglev_size: MAGLEV_DEFAULT_SIZE,
        }
    }
}

pub fn service_key(frontend: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey {
        vip: u32::from_ne_bytes(frontend.ip.octets()),
        port: frontend.port.to_be(),
        slot,
        proto: frontend.protocol.number(),
        scope: frontend.scope.code(),
        _pad: [0; 2],
    }
}

pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        ip: key.vip.to_ne_bytes().into(),
        port: u16::from_be(key.port),
        protocol: Protocol::from_number(key.proto)?,
        scope: Scope::from_code(key.scope)?,
    })
}

fn frontend_value(service_id: u32, count: usize, spec: &FrontendSpec) -> ServiceValue {
    let mut flags = 0;
    for (set, flag) in [
        (spec.affinity_timeout_s.is_some(), SVC_FLAG_AFFINITY),
        (spec.snat, SVC_FLAG_SNAT),
        (spec.drop_when_empty, SVC_FLAG_DROP_EMPTY),
        (!spec.source_ranges.is_empty(), SVC_FLAG_SOURCE_RANGES),
    ] {
        if set {
            flags |= flag;
        }
    }
    ServiceValue {
        backend_id: 0,
        service_id,
        count: count as u16,
        flags: with_scheduler(flags, spec.scheduler.code()),
        affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
    }
}

impl Syncer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Size of the Maglev tables written from now on (a prime, see `maglev::check_size`).
    pub fn with_maglev_size(mut self, size: u32) -> Self {
        self.maglev_size = size;
        self
    }

    /// Rebuilds the tracked state from existing map contents (agent restart), so ids of
    /// services and backends stay the same and established flows keep their backend.
    /// Incomplete frontends (slot 0 missing, or a slot pointing nowhere) are left out and
    /// get rewritten by the next sync.
    pub fn adopt(
        slots: impl IntoIterator<Item = (ServiceKey, ServiceValue)>,
        backends: impl IntoIterator<Item = (u32, Backend)>,
        maglev_tables: impl IntoIterator<Item = u32>,
    ) -> Self {
        let backends: BTreeMap<u32, Backend> = backends.into_iter().collect();
        let mut by_frontend: BTreeMap<Frontend, BTreeMap<u16, ServiceValue>> = BTreeMap::new();
        for (key, value) in slots {
            if let Some(frontend) = frontend_of(&key) {
                by_frontend
                    .entry(frontend)
                    .or_default()
                    .insert(key.slot, value);
            }
        }
        let mut syncer = Syncer::new();
        for (frontend, slots) in by_frontend {
            let Some(front) = slots.get(&0) else { continue };
            let mut list = Vec::new();
            for slot in 1..=front.count {
                let Some(id) = slots.get(&slot).map(|s| s.backend_id) else {
                    break;
                };
                let Some(b) = backends.get(&id) else { break };
                list.push((
                    Endpoint {
                        ip: b.ip.to_ne_bytes().into(),
                        port: u16::from_be(b.port),
                    },
                    id,
                ));
            }
            let highest_slot = slots.keys().copied().max().unwrap_or(0) as usize;
            syncer.service_ids.adopt(front.service_id);
            for (_, id) in &list {
                syncer.backend_ids.adopt(*id);
            }
            let mut programmed = Programmed {
                service: String::from("(adopted)"),
                service_id: front.service_id,
                frontend_value: *front,
                backends: list,
                slot_count: highest_slot,
                maglev: None,
                // Unknown after a restart: the next sync rewrites the wanted ones.
                source_ranges: Vec::new(),
            };
            if programmed.backends.len() != front.count as usize
                || highest_slot > front.count as usize
            {
                // Force a rewrite of this frontend on the next sync.
                programmed.frontend_value.count = u16::MAX;
            }
            syncer.current.insert(frontend, programmed);
        }
        // Backends no frontend references (crash between writes) must not leak forever.
        let referenced: BTreeSet<u32> = syncer.backend_ids.used.clone();
        syncer.orphans = backends
            .keys()
            .copied()
            .filter(|id| !referenced.contains(id))
            .collect();
        for id in &syncer.orphans {
            syncer.backend_ids.adopt(*id);
        }
        // Tables are rewritten by the next sync (their content is not read back); tables of
        // frontends that are gone or no longer use Maglev are removed by it.
        let maglev_frontends: BTreeMap<u32, Frontend> = syncer
            .current
            .iter()
            .filter(|(_, p)| scheduler_of(p.frontend_value.flags) == scheduler::MAGLEV)
            .map(|(f, p)| (p.service_id, *f))
            .collect();
        for service_id in maglev_tables {
            match maglev_frontends.get(&service_id) {
                Some(frontend) => {
                    if let Some(p) = syncer.current.get_mut(frontend) {
                        p.maglev = Some(Vec::new());
                    }
                }
                None => syncer.orphan_tables.push(service_id),
            }
        }
        syncer
    }

    /// What is programmed now.
    pub fn current(&self) -> &BTreeMap<Frontend, Programmed> {
        &self.current
    }

    /// Backend ids removed from the maps since the last call (their flows and sockets are
    /// to be let go).
    pub fn take_removed_backends(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.removed_backends)
    }

    /// Applies `desired` to `store`. On error the tracked state may be ahead of the maps for
    /// the failing frontend; callers re-adopt from the maps before retrying.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        store: &mut impl MapStore,
    ) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        self.remove_orphans(store)?;
        let gone: Vec<Frontend> = self
            .current
            .keys()
            .filter(|f| !desired.contains_key(f))
            .copied()
            .collect();
        for frontend in gone {
            self.drop_frontend(&frontend, store, &mut report)?;
        }
        for (frontend, spec) in desired {
            self.apply_frontend(frontend, spec, store, &mut report)?;
        }
        Ok(report)
    }

    /// Like [`Syncer::apply`], but only for `changed` frontends: the caller knows every
    /// other one is programmed as `desired` has it (the translator's record of what it
    /// changed since the last successful sync).
    pub fn apply_changes(
        &mut self,
        desired: &DesiredState,
        changed: &[Frontend],
        store: &mut impl MapStore,
    ) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        self.remove_orphans(store)?;
        for frontend in changed {
            match desired.get(frontend) {
                Some(spec) => self.apply_frontend(frontend, spec, store, &mut report)?,
                None => self.drop_frontend(frontend, store, &mut report)?,
            }
        }
        Ok(report)
    }

    /// Whether the set of frontends or their services' names changed since the last call.
    pub fn take_names_changed(&mut self) -> bool {
        std::mem::take(&mut self.names_changed)
    }

    fn remove_orphans(&mut self, store: &mut impl MapStore) -> Result<(), SyncError> {
        // Unreferenced backends first: nothing can reach them, and their ids must not be
        // handed out again while they still exist.
        for id in std::mem::take(&mut self.orphans) {
            let wrap = |source| SyncError::Store {
                frontend: Frontend::internal([0, 0, 0, 0].into(), 0, Protocol::Tcp),
                service: "(orphaned backend)".into(),
                source,
            };
            if let Err(e) = store.remove_backend(id).map_err(wrap) {
                self.orphans.push(id);
                return Err(e);
            }
            store.forget_counters(None, Some(id));
            self.backend_ids.free(id);
            self.removed_backends.push(id);
        }
        for service_id in std::mem::take(&mut self.orphan_tables) {
            if let Err(source) = store.remove_maglev(service_id) {
                self.orphan_tables.push(service_id);
                return Err(SyncError::Store {
                    frontend: Frontend::internal([0, 0, 0, 0].into(), 0, Protocol::Tcp),
                    service: "(orphaned Maglev table)".into(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Removes `frontend` if it is programmed, counting it in `report`.
    fn drop_frontend(
        &mut self,
        frontend: &Frontend,
        store: &mut impl MapStore,
        report: &mut SyncReport,
    ) -> Result<(), SyncError> {
        if let Some(old) = self.current.remove(frontend) {
            self.remove_frontend(frontend, &old, store)?;
            report.frontends_removed += 1;
            report.backends_removed += old.backends.len();
        }
        Ok(())
    }

    fn remove_frontend(
        &mut self,
        frontend: &Frontend,
        old: &Programmed,
        store: &mut impl MapStore,
    ) -> Result<(), SyncError> {
        let wrap = |source| SyncError::Store {
            frontend: *frontend,
            service: old.service.clone(),
            source,
        };
        // Frontend first: from then on no new flow can pick these slots.
        store.remove_slot(&service_key(frontend, 0)).map_err(wrap)?;
        if old.maglev.is_some() {
            store.remove_maglev(old.service_id).map_err(wrap)?;
        }
        for range in &old.source_ranges {
            store
                .remove_source_range(old.service_id, range)
                .map_err(wrap)?;
        }
        for slot in 1..=old.slot_count {
            store
                .remove_slot(&service_key(frontend, slot as u16))
                .map_err(wrap)?;
        }
        for (_, id) in &old.backends {
            store.remove_backend(*id).map_err(wrap)?;
            store.forget_counters(None, Some(*id));
            self.backend_ids.free(*id);
            self.removed_backends.push(*id);
        }
        store.forget_counters(Some(old.service_id), None);
        self.service_ids.free(old.service_id);
        self.names_changed = true;
        Ok(())
    }

    fn apply_frontend(
        &mut self,
        frontend: &Frontend,
        spec: &FrontendSpec,
        store: &mut impl MapStore,
        report: &mut SyncReport,
    ) -> Result<(), SyncError> {
        let wrap = |source| SyncError::Store {
            frontend: *frontend,
            service: spec.service.clone(),
            source,
        };
        let endpoints = if spec.endpoints.len() > MAX_BACKENDS as usize {
            report.truncated += 1;
            &spec.endpoints[..MAX_BACKENDS as usize]
        } else {
            &spec.endpoints[..]
        };
        if self
            .current
            .get(frontend)
            .is_some_and(|old| unchanged(old, spec, endpoints))
        {
            // Nothing to write: the common case when one service among thousands changed.
            return Ok(());
        }
        let old = self.current.get(frontend).cloned();
        if old.as_ref().is_none_or(|o| o.service != spec.service) {
            self.names_changed = true;
        }
        let service_id = match &old {
            Some(old) => old.service_id,
            None => self.service_ids.allocate("service")?,
        };
        let old_ids: BTreeMap<Endpoint, u32> = old
            .as_ref()
            .map(|o| o.backends.iter().copied().collect())
            .unwrap_or_default();

        // 1. Backends: keep ids of endpoints that stay, allocate for new ones.
        let mut backends = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let id = match old_ids.get(endpoint) {
                Some(id) => *id,
                None => {
                    let id = self.backend_ids.allocate("backend")?;
                    let backend = Backend {
                        ip: u32::from_ne_bytes(endpoint.ip.octets()),
                        port: endpoint.port.to_be(),
                        proto: frontend.protocol.number(),
                        _pad: 0,
                        service_id,
                    };
                    store.set_backend(id, &backend).map_err(wrap)?;
                    report.backends_added += 1;
                    id
                }
            };
            backends.push((*endpoint, id));
        }
        // 2. Slots whose content changes. Until slot 0 is rewritten the old count applies,
        // and every slot below it holds a live backend of this service (old or new).
        let old_backends = old.as_ref().map(|o| o.backends.as_slice()).unwrap_or(&[]);
        for (i, (_, id)) in backends.iter().enumerate() {
            if old_backends.get(i).map(|(_, old_id)| old_id) != Some(id) {
                let value = ServiceValue {
                    backend_id: *id,
                    ..Default::default()
                };
                store
                    .set_slot(&service_key(frontend, i as u16 + 1), &value)
                    .map_err(wrap)?;
            }
        }
        // 3. The Maglev table (whole, swapped in one update) before the frontend that uses
        // it, then the frontend itself; a table no longer used goes after the frontend.
        let old_table = old.as_ref().and_then(|o| o.maglev.clone());
        let table = (spec.scheduler == Scheduler::Maglev && !backends.is_empty())
            .then(|| maglev::build(&backends, self.maglev_size));
        if let Some(table) = &table
            && old_table.as_ref() != Some(table)
        {
            store.set_maglev(service_id, table).map_err(wrap)?;
        }
        // Source ranges are added before the frontend enforces them and removed after, so a
        // change never drops a client both the old and the new ranges allow.
        let old_ranges = old
            .as_ref()
            .map(|o| o.source_ranges.clone())
            .unwrap_or_default();
        for range in spec
            .source_ranges
            .iter()
            .filter(|r| !old_ranges.contains(r))
        {
            store.add_source_range(service_id, range).map_err(wrap)?;
        }
        let value = frontend_value(service_id, backends.len(), spec);
        if old.as_ref().map(|o| o.frontend_value) != Some(value) {
            store
                .set_slot(&service_key(frontend, 0), &value)
                .map_err(wrap)?;
        }
        if table.is_none() && old_table.is_some() {
            store.remove_maglev(service_id).map_err(wrap)?;
        }
        for range in old_ranges
            .iter()
            .filter(|r| !spec.source_ranges.contains(r))
        {
            store.remove_source_range(service_id, range).map_err(wrap)?;
        }
        // 4. Slots past the new count, then backends that left.
        let old_slot_count = old.as_ref().map(|o| o.slot_count).unwrap_or(0);
        for slot in backends.len() + 1..=old_slot_count {
            store
                .remove_slot(&service_key(frontend, slot as u16))
                .map_err(wrap)?;
        }
        let kept: BTreeSet<u32> = backends.iter().map(|(_, id)| *id).collect();
        for (_, id) in old_backends {
            if !kept.contains(id) {
                store.remove_backend(*id).map_err(wrap)?;
                store.forget_counters(None, Some(*id));
                self.backend_ids.free(*id);
                self.removed_backends.push(*id);
                report.backends_removed += 1;
            }
        }
        let programmed = Programmed {
            service: spec.service.clone(),
            service_id,
            frontend_value: value,
            slot_count: backends.len(),
            backends,
            maglev: table,
            source_ranges: spec.source_ranges.clone(),
        };
        match &old {
            None => report.frontends_added += 1,
            Some(o)
                if (
                    o.frontend_value,
                    &o.backends,
                    o.slot_count,
                    &o.maglev,
                    &o.source_ranges,
                ) != (
                    programmed.frontend_value,
                    &programmed.backends,
                    programmed.slot_count,
                    &programmed.maglev,
                    &programmed.source_ranges,
                ) =>
            {
                report.frontends_updated += 1
            }
            Some(_) => {}
        }
        self.current.insert(*frontend, programmed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// In-memory maps that check, after every single write, that no frontend is exposed
    /// half-written: slot 0's count never points at a missing slot or backend, and a Maglev
    /// frontend's table exists and names only live backends of its own.
    #[derive(Default)]
    struct FakeMaps {
        slots: BTreeMap<ServiceKey, ServiceValue>,
        backends: BTreeMap<u32, Backend>,
        tables: BTreeMap<u32, Vec<u32>>,
        ranges: BTreeSet<(u32, Ipv4Net)>,
        writes: usize,
        fail_after: Option<usize>,
    }

    impl FakeMaps {
        fn check(&self) {
            for (key, front) in self.slots.iter().filter(|(k, _)| k.slot == 0) {
                for slot in 1..=front.count {
                    let slot_key = ServiceKey { slot, ..*key };
                    let id = self.slots.get(&slot_key).map(|v| v.backend_id);
                    let id = id.unwrap_or_else(|| panic!("slot {slot} of {key:?} missing"));
                    let b = self
                        .backends
                        .get(&id)
                        .unwrap_or_else(|| panic!("backend {id} missing"));
                    assert_eq!(
                        b.service_id, front.service_id,
                        "backend {id} of another service"
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
                            b.is_some_and(|b| b.service_id == front.service_id),
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
                    let b = self.backends[&id];
                    Endpoint {
                        ip: b.ip.to_ne_bytes().into(),
                        port: u16::from_be(b.port),
                    }
                })
                .collect()
        }
    }

    impl MapStore for FakeMaps {
        fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), StoreError> {
            self.op()?;
            self.backends.insert(id, *backend);
            self.check();
            Ok(())
        }
        fn remove_backend(&mut self, id: u32) -> Result<(), StoreError> {
            self.op()?;
            self.backends.remove(&id);
            self.check();
            Ok(())
        }
        fn set_slot(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), StoreError> {
            self.op()?;
            self.slots.insert(*key, *value);
            self.check();
            Ok(())
        }
        fn remove_slot(&mut self, key: &ServiceKey) -> Result<(), StoreError> {
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
        fn add_source_range(&mut self, id: u32, range: &Ipv4Net) -> Result<(), StoreError> {
            self.op()?;
            self.ranges.insert((id, *range));
            self.check();
            Ok(())
        }
        fn remove_source_range(&mut self, id: u32, range: &Ipv4Net) -> Result<(), StoreError> {
            self.op()?;
            self.ranges.remove(&(id, *range));
            self.check();
            Ok(())
        }
        fn forget_counters(&mut self, _: Option<u32>, _: Option<u32>) {}
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
                    ip: Ipv4Addr::new(10, 244, 0, *e),
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
            let slot0 = maps.slots.keys().filter(|k| k.slot == 0).count();
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
        let mut extra = service_key(&frontend(1), 4);
        extra.slot = 4;
        maps.slots.insert(
            extra,
            ServiceValue {
                backend_id: 999,
                ..Default::default()
            },
        );
        maps.backends.insert(
            999,
            Backend {
                service_id: 12345,
                ..Default::default()
            },
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
                ip: Ipv4Addr::from(0x0af4_0000 + i),
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
            let want: DesiredState =
                [(frontend(1), with_scheduler_spec(&[1, 2], scheduler))].into();
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
}
