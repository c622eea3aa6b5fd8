//! Service and backend ids.
use std::collections::BTreeSet;

use super::SyncError;

/// Allocates small non-zero ids, preferring ones not used recently (a freed id is only
/// reused after the counter wraps), so stale conntrack entries rarely meet a reused id.
#[derive(Debug, Default)]
pub struct IdAllocator {
    pub used: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    pub fn allocate(&mut self, what: &'static str) -> Result<u32, SyncError> {
        for _ in 0..=u32::MAX {
            self.next = self.next.wrapping_add(1).max(1);
            if self.used.insert(self.next) {
                return Ok(self.next);
            }
        }
        Err(SyncError::IdsExhausted(what))
    }
    pub fn adopt(&mut self, id: u32) {
        self.used.insert(id);
        self.next = self.next.max(id);
    }
    pub fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}
