//! The pinned BPF maps, opened by path: used by the agent to sync and by the read commands.
use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, ServiceKey, ServiceValue, TrafficCounter,
    map_names,
};

use crate::{
    loader::PinLayout,
    sync::{MapStore, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error(
        "cannot open pinned map {path}: {source}; is the agent running with this --bpffs \
         (or has it run since the last `xlb cleanup`)?"
    )]
    Open {
        path: std::path::PathBuf,
        source: MapError,
    },
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout {
        name: &'static str,
        source: MapError,
    },
}

pub struct PinnedMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub stats: PerCpuArray<MapData, u64>,
    pub service_stats: PerCpuHashMap<MapData, u32, TrafficCounter>,
    pub backend_stats: PerCpuHashMap<MapData, u32, TrafficCounter>,
}

fn open(layout: &PinLayout, name: &'static str) -> Result<Map, MapsError> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| MapsError::Layout { name, source })
}

macro_rules! typed {
    ($layout:expr, $name:expr, $ty:ident) => {
        $ty::try_from(open($layout, $name)?).map_err(|source| MapsError::Layout {
            name: $name,
            source,
        })?
    };
}

impl PinnedMaps {
    pub fn open(layout: &PinLayout) -> Result<Self, MapsError> {
        Ok(Self {
            services: typed!(layout, map_names::SERVICES, HashMap),
            backends: typed!(layout, map_names::BACKENDS, HashMap),
            conntrack: typed!(layout, map_names::CONNTRACK, HashMap),
            affinity: typed!(layout, map_names::AFFINITY, HashMap),
            stats: typed!(layout, map_names::STATS, PerCpuArray),
            service_stats: typed!(layout, map_names::SERVICE_STATS, PerCpuHashMap),
            backend_stats: typed!(layout, map_names::BACKEND_STATS, PerCpuHashMap),
        })
    }

    /// Every `SERVICES` entry (entries that vanish while iterating are skipped).
    pub fn service_slots(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services.iter().filter_map(Result::ok).collect()
    }

    pub fn all_backends(&self) -> Vec<(u32, Backend)> {
        self.backends.iter().filter_map(Result::ok).collect()
    }

    /// Deletes dead conntrack and affinity entries (see `conntrack_gc`); returns how many.
    pub fn collect_garbage(&mut self, now_ns: u64) -> usize {
        let live: std::collections::BTreeSet<u32> =
            self.backends.keys().filter_map(Result::ok).collect();
        let flows: Vec<_> = self.conntrack.iter().filter_map(Result::ok).collect();
        let affinities: Vec<_> = self.affinity.iter().filter_map(Result::ok).collect();
        let mut removed = 0;
        for key in crate::conntrack_gc::stale_flows(flows, &live, now_ns) {
            removed += usize::from(self.conntrack.remove(&key).is_ok());
        }
        for key in crate::conntrack_gc::stale_affinities(affinities, &live) {
            removed += usize::from(self.affinity.remove(&key).is_ok());
        }
        removed
    }
}

/// Sums a per-CPU counter.
pub fn sum_counter(values: &aya::maps::PerCpuValues<TrafficCounter>) -> TrafficCounter {
    values
        .iter()
        .fold(TrafficCounter::default(), |acc, v| TrafficCounter {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
        })
}

fn store_err(operation: &'static str, map: &'static str, e: MapError) -> StoreError {
    StoreError {
        operation,
        map,
        message: e.to_string(),
    }
}

/// Deleting something already gone is success: sync must be idempotent.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl MapStore for PinnedMaps {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), StoreError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(|e| store_err("insert", map_names::BACKENDS, e))
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), StoreError> {
        ignore_missing(self.backends.remove(&id))
            .map_err(|e| store_err("delete", map_names::BACKENDS, e))
    }
    fn set_slot(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), StoreError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| store_err("insert", map_names::SERVICES, e))
    }
    fn remove_slot(&mut self, key: &ServiceKey) -> Result<(), StoreError> {
        ignore_missing(self.services.remove(key))
            .map_err(|e| store_err("delete", map_names::SERVICES, e))
    }
    fn forget_counters(&mut self, service_id: Option<u32>, backend_id: Option<u32>) {
        if let Some(id) = service_id {
            let _ = self.service_stats.remove(&id);
        }
        if let Some(id) = backend_id {
            let _ = self.backend_stats.remove(&id);
        }
    }
}
