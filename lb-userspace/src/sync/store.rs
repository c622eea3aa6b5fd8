//! The map operations sync needs, implemented by the pinned BPF maps and by test fakes.
use lb_common::{Backend, ServiceKey, ServiceValue};

use crate::model::Ipv4Net;

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
