//! The map operations sync needs, implemented by the pinned BPF maps and by test fakes.
use lb_common::ServiceValue;

use super::keys::{BackendEntry, SlotKey};
use crate::model::{Family, IpNet};

/// The map operations sync needs; implemented by the real BPF maps and by test fakes.
pub trait MapStore {
    /// Writes a backend into the map of its family.
    fn set_backend(&mut self, id: u32, backend: &BackendEntry) -> Result<(), StoreError>;
    fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), StoreError>;
    fn set_slot(&mut self, key: &SlotKey, value: &ServiceValue) -> Result<(), StoreError>;
    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), StoreError>;
    /// Source ranges go to the trie of the range's family.
    /// Replaces the frontend's Maglev table as a whole (`table`: M backend ids).
    fn set_maglev(&mut self, service_id: u32, table: &[u32]) -> Result<(), StoreError>;
    fn remove_maglev(&mut self, service_id: u32) -> Result<(), StoreError>;
    fn add_source_range(&mut self, service_id: u32, range: &IpNet) -> Result<(), StoreError>;
    fn remove_source_range(&mut self, service_id: u32, range: &IpNet) -> Result<(), StoreError>;
    /// Records which Service port a service id serves, for the read commands. Best effort:
    /// a name that cannot be written only leaves `xlb services` without it.
    fn set_service_name(&mut self, service_id: u32, name: &str);
    /// Drops the counters, scheduler state and name of a removed service or backend id
    /// (ids get reused).
    fn forget_counters(&mut self, service_id: Option<u32>, backend_id: Option<u32>);
}

#[derive(Debug, thiserror::Error)]
#[error("{operation} in map {map} failed: {message}")]
pub struct StoreError {
    pub operation: &'static str,
    pub map: &'static str,
    pub message: String,
}
