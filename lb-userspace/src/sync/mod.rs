//! Writes the difference between the desired state and what the maps hold, in an order that
//! never exposes a half-written service: backends first, then backend slots, then the
//! frontend (slot 0) with its count; removals in reverse.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{MAGLEV_DEFAULT_SIZE, MAX_BACKENDS, ServiceValue};

mod adopt;
mod ids;
pub mod keys;
pub mod maglev;
mod store;

use ids::IdAllocator;
use keys::frontend_value;
pub use keys::{BackendEntry, SlotKey, frontend_of, service_key};
pub use store::{MapStore, StoreError};

use crate::model::{
    DesiredState, Endpoint, Family, Frontend, FrontendSpec, IpNet, Protocol, Scheduler,
};

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
    pub source_ranges: Vec<IpNet>,
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

/// Tracks what is programmed and brings it to the desired state.
#[derive(Debug)]
pub struct Syncer {
    current: BTreeMap<Frontend, Programmed>,
    pub(super) service_ids: IdAllocator,
    pub(super) backend_ids: IdAllocator,
    /// Adopted backends no frontend references (with the family of the map holding them);
    /// removed by the next apply.
    orphans: Vec<(u32, Family)>,
    /// Adopted Maglev tables of frontends that do not use Maglev; removed by the next apply.
    orphan_tables: Vec<u32>,
    /// Backend ids freed since the last [`Syncer::take_removed_backends`].
    removed_backends: Vec<u32>,
    maglev_size: u32,
}

impl Default for Syncer {
    fn default() -> Self {
        Self {
            current: BTreeMap::new(),
            service_ids: IdAllocator::services(),
            backend_ids: IdAllocator::backends(),
            orphans: Vec::new(),
            orphan_tables: Vec::new(),
            removed_backends: Vec::new(),
            maglev_size: MAGLEV_DEFAULT_SIZE,
        }
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

    fn remove_orphans(&mut self, store: &mut impl MapStore) -> Result<(), SyncError> {
        // Unreferenced backends first: nothing can reach them, and their ids must not be
        // handed out again while they still exist.
        for (id, family) in std::mem::take(&mut self.orphans) {
            let wrap = |source| SyncError::Store {
                frontend: Frontend::internal(family.unspecified(), 0, Protocol::Tcp),
                service: "(orphaned backend)".into(),
                source,
            };
            if let Err(e) = store.remove_backend(id, family).map_err(wrap) {
                self.orphans.push((id, family));
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
                    frontend: Frontend::internal(Family::V4.unspecified(), 0, Protocol::Tcp),
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
            store.remove_backend(*id, frontend.family()).map_err(wrap)?;
            store.forget_counters(None, Some(*id));
            self.backend_ids.free(*id);
            self.removed_backends.push(*id);
        }
        store.forget_counters(Some(old.service_id), None);
        self.service_ids.free(old.service_id);
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
            log::warn!(
                "service {}: {} endpoints, more than one frontend holds; {frontend} gets the \
                 first {MAX_BACKENDS}",
                spec.service,
                spec.endpoints.len()
            );
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
        let renamed = old.as_ref().is_none_or(|o| o.service != spec.service);
        let service_id = match &old {
            Some(old) => old.service_id,
            None => self.service_ids.allocate("service")?,
        };
        let old_backends = old.as_ref().map(|o| o.backends.as_slice()).unwrap_or(&[]);
        let backends = self.write_backends(
            (frontend, &spec.service),
            service_id,
            endpoints,
            old_backends,
            store,
            report,
        )?;
        write_slots(frontend, &backends, old_backends, store).map_err(wrap)?;
        let value = frontend_value(service_id, backends.len(), spec);
        let table = (spec.scheduler == Scheduler::Maglev && !backends.is_empty())
            .then(|| maglev::build(&backends, self.maglev_size));
        write_frontend(
            frontend,
            service_id,
            &value,
            &table,
            &spec.source_ranges,
            old.as_ref(),
            store,
        )
        .map_err(wrap)?;
        self.remove_leftovers(frontend, &backends, old.as_ref(), store, report)
            .map_err(wrap)?;
        if renamed {
            store.set_service_name(service_id, &spec.service);
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
            Some(o) if !same_maps(o, &programmed) => report.frontends_updated += 1,
            Some(_) => {}
        }
        self.current.insert(*frontend, programmed);
        Ok(())
    }

    /// Phase 1: backends. Endpoints that stay keep their ids; new ones get an id and a
    /// `BACKENDS` entry. Returns the frontend's backends in slot order.
    fn write_backends(
        &mut self,
        (frontend, service): (&Frontend, &str),
        service_id: u32,
        endpoints: &[Endpoint],
        old_backends: &[(Endpoint, u32)],
        store: &mut impl MapStore,
        report: &mut SyncReport,
    ) -> Result<Vec<(Endpoint, u32)>, SyncError> {
        let old_ids: BTreeMap<Endpoint, u32> = old_backends.iter().copied().collect();
        let mut backends = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let id = match old_ids.get(endpoint) {
                Some(id) => *id,
                None => {
                    let id = self.backend_ids.allocate("backend")?;
                    let backend = BackendEntry::new(endpoint, frontend.protocol, service_id);
                    store
                        .set_backend(id, &backend)
                        .map_err(|source| SyncError::Store {
                            frontend: *frontend,
                            service: service.to_string(),
                            source,
                        })?;
                    report.backends_added += 1;
                    id
                }
            };
            backends.push((*endpoint, id));
        }
        Ok(backends)
    }

    /// Phase 4: slots past the new count, then the backends that left.
    fn remove_leftovers(
        &mut self,
        frontend: &Frontend,
        backends: &[(Endpoint, u32)],
        old: Option<&Programmed>,
        store: &mut impl MapStore,
        report: &mut SyncReport,
    ) -> Result<(), StoreError> {
        let Some(old) = old else { return Ok(()) };
        for slot in backends.len() + 1..=old.slot_count {
            store.remove_slot(&service_key(frontend, slot as u16))?;
        }
        let kept: BTreeSet<u32> = backends.iter().map(|(_, id)| *id).collect();
        for (_, id) in &old.backends {
            if !kept.contains(id) {
                store.remove_backend(*id, frontend.family())?;
                store.forget_counters(None, Some(*id));
                self.backend_ids.free(*id);
                self.removed_backends.push(*id);
                report.backends_removed += 1;
            }
        }
        Ok(())
    }
}

/// Phase 2: slots whose content changes. Until slot 0 is rewritten the old count applies,
/// and every slot below it holds a live backend of this service (old or new).
fn write_slots(
    frontend: &Frontend,
    backends: &[(Endpoint, u32)],
    old_backends: &[(Endpoint, u32)],
    store: &mut impl MapStore,
) -> Result<(), StoreError> {
    for (i, (_, id)) in backends.iter().enumerate() {
        if old_backends.get(i).map(|(_, old_id)| old_id) != Some(id) {
            let value = ServiceValue {
                backend_id: *id,
                ..Default::default()
            };
            store.set_slot(&service_key(frontend, i as u16 + 1), &value)?;
        }
    }
    Ok(())
}

/// Phase 3: the Maglev table (whole, swapped in one update) before the frontend that uses
/// it, then the frontend itself (slot 0); a table no longer used goes after the frontend.
/// Source ranges are added before the frontend enforces them and removed after, so a change
/// never drops a client both the old and the new ranges allow.
fn write_frontend(
    frontend: &Frontend,
    service_id: u32,
    value: &ServiceValue,
    table: &Option<Vec<u32>>,
    ranges: &[IpNet],
    old: Option<&Programmed>,
    store: &mut impl MapStore,
) -> Result<(), StoreError> {
    let old_table = old.and_then(|o| o.maglev.as_ref());
    let old_ranges = old.map(|o| o.source_ranges.as_slice()).unwrap_or(&[]);
    if let Some(table) = table
        && old_table != Some(table)
    {
        store.set_maglev(service_id, table)?;
    }
    for range in ranges.iter().filter(|r| !old_ranges.contains(r)) {
        store.add_source_range(service_id, range)?;
    }
    if old.map(|o| o.frontend_value) != Some(*value) {
        store.set_slot(&service_key(frontend, 0), value)?;
    }
    if table.is_none() && old_table.is_some() {
        store.remove_maglev(service_id)?;
    }
    for range in old_ranges.iter().filter(|r| !ranges.contains(r)) {
        store.remove_source_range(service_id, range)?;
    }
    Ok(())
}

/// Whether two records put the same entries in the maps (names aside).
fn same_maps(a: &Programmed, b: &Programmed) -> bool {
    (
        a.frontend_value,
        &a.backends,
        a.slot_count,
        &a.maglev,
        &a.source_ranges,
    ) == (
        b.frontend_value,
        &b.backends,
        b.slot_count,
        &b.maglev,
        &b.source_ranges,
    )
}

#[cfg(test)]
mod tests;
