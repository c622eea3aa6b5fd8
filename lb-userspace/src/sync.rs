//! Writes the difference between the desired state and what the maps hold, in an order that
//! never exposes a half-written service: backends first, then backend slots, then the
//! frontend (slot 0) with its count; removals in reverse.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Backend, MAX_BACKENDS, SVC_FLAG_AFFINITY, ServiceKey, ServiceValue};

use crate::model::{DesiredState, Endpoint, Frontend, FrontendSpec, Protocol};

/// The map operations sync needs; implemented by the real BPF maps and by test fakes.
pub trait MapStore {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), StoreError>;
    fn remove_backend(&mut self, id: u32) -> Result<(), StoreError>;
    fn set_slot(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), StoreError>;
    fn remove_slot(&mut self, key: &ServiceKey) -> Result<(), StoreError>;
    /// Drops the traffic counters of a removed service or backend id (ids get reused).
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
#[derive(Debug, Default)]
pub struct Syncer {
    current: BTreeMap<Frontend, Programmed>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    /// Adopted backends no frontend references; removed by the next apply.
    orphans: Vec<u32>,
}

pub fn service_key(frontend: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey {
        vip: u32::from_ne_bytes(frontend.ip.octets()),
        port: frontend.port.to_be(),
        slot,
        proto: frontend.protocol.number(),
        _pad: [0; 3],
    }
}

pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        ip: key.vip.to_ne_bytes().into(),
        port: u16::from_be(key.port),
        protocol: Protocol::from_number(key.proto)?,
    })
}

fn frontend_value(service_id: u32, count: usize, spec: &FrontendSpec) -> ServiceValue {
    ServiceValue {
        backend_id: 0,
        service_id,
        count: count as u16,
        flags: if spec.affinity_timeout_s.is_some() {
            SVC_FLAG_AFFINITY
        } else {
            0
        },
        affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
    }
}

impl Syncer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the tracked state from existing map contents (agent restart), so ids of
    /// services and backends stay the same and established flows keep their backend.
    /// Incomplete frontends (slot 0 missing, or a slot pointing nowhere) are left out and
    /// get rewritten by the next sync.
    pub fn adopt(
        slots: impl IntoIterator<Item = (ServiceKey, ServiceValue)>,
        backends: impl IntoIterator<Item = (u32, Backend)>,
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
        syncer
    }

    /// What is programmed now.
    pub fn current(&self) -> &BTreeMap<Frontend, Programmed> {
        &self.current
    }

    /// Applies `desired` to `store`. On error the tracked state may be ahead of the maps for
    /// the failing frontend; callers re-adopt from the maps before retrying.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        store: &mut impl MapStore,
    ) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        let gone: Vec<Frontend> = self
            .current
            .keys()
            .filter(|f| !desired.contains_key(f))
            .copied()
            .collect();
        for frontend in gone {
            if let Some(old) = self.current.remove(&frontend) {
                self.remove_frontend(&frontend, &old, store)?;
                report.frontends_removed += 1;
                report.backends_removed += old.backends.len();
            }
        }
        for (frontend, spec) in desired {
            self.apply_frontend(frontend, spec, store, &mut report)?;
        }
        for id in std::mem::take(&mut self.orphans) {
            let wrap = |source| SyncError::Store {
                frontend: Frontend {
                    ip: [0, 0, 0, 0].into(),
                    port: 0,
                    protocol: Protocol::Tcp,
                },
                service: "(orphaned backend)".into(),
                source,
            };
            store.remove_backend(id).map_err(wrap)?;
            store.forget_counters(None, Some(id));
        }
        Ok(report)
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
        for slot in 1..=old.slot_count {
            store
                .remove_slot(&service_key(frontend, slot as u16))
                .map_err(wrap)?;
        }
        for (_, id) in &old.backends {
            store.remove_backend(*id).map_err(wrap)?;
            store.forget_counters(None, Some(*id));
            self.backend_ids.free(*id);
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
        let old = self.current.get(frontend).cloned();
        let endpoints = if spec.endpoints.len() > MAX_BACKENDS as usize {
            report.truncated += 1;
            &spec.endpoints[..MAX_BACKENDS as usize]
        } else {
            &spec.endpoints[..]
        };
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
        // 3. The frontend itself.
        let value = frontend_value(service_id, backends.len(), spec);
        if old.as_ref().map(|o| o.frontend_value) != Some(value) {
            store
                .set_slot(&service_key(frontend, 0), &value)
                .map_err(wrap)?;
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
                report.backends_removed += 1;
            }
        }
        let programmed = Programmed {
            service: spec.service.clone(),
            service_id,
            frontend_value: value,
            slot_count: backends.len(),
            backends,
        };
        match &old {
            None => report.frontends_added += 1,
            Some(o)
                if (o.frontend_value, &o.backends, o.slot_count)
                    != (
                        programmed.frontend_value,
                        &programmed.backends,
                        programmed.slot_count,
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
