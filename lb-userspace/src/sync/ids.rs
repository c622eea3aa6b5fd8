//! Service and backend ids: indexes of the per-service and per-backend counter arrays, so
//! they must stay below those arrays' capacities however many have come and gone.
use std::collections::{BTreeSet, VecDeque};

use lb_common::map_sizes;

use super::SyncError;

/// Allocates non-zero ids below `limit`: never-used ids first, then freed ones, the oldest
/// freed first, so a stale conntrack entry (GC'd within seconds) rarely meets its id again.
#[derive(Debug)]
pub struct IdAllocator {
    pub used: BTreeSet<u32>,
    /// Ids at or above this were never handed out.
    fresh: u32,
    /// Freed ids below `limit`, oldest first.
    freed: VecDeque<u32>,
    limit: u32,
}

impl IdAllocator {
    /// Ids `1..limit`.
    pub fn new(limit: u32) -> Self {
        IdAllocator {
            used: BTreeSet::new(),
            fresh: 1,
            freed: VecDeque::new(),
            limit,
        }
    }

    /// Service ids: indexes of `XLB_SERVICE_STATS`.
    pub fn services() -> Self {
        Self::new(map_sizes::SERVICE_STATS)
    }

    /// Backend ids: indexes of `XLB_BACKEND_STATS`.
    pub fn backends() -> Self {
        Self::new(map_sizes::BACKEND_STATS)
    }

    pub fn allocate(&mut self, what: &'static str) -> Result<u32, SyncError> {
        while self.fresh < self.limit {
            let id = self.fresh;
            self.fresh += 1;
            if self.used.insert(id) {
                return Ok(id);
            }
        }
        while let Some(id) = self.freed.pop_front() {
            if self.used.insert(id) {
                return Ok(id);
            }
        }
        Err(SyncError::IdsExhausted(what))
    }

    /// Marks an id found in the pinned maps as used (agent restart).
    pub fn adopt(&mut self, id: u32) {
        self.used.insert(id);
        self.fresh = self.fresh.max(id.saturating_add(1));
    }

    /// After adoption: ids below the highest adopted one that no map entry uses are free.
    pub fn settle(&mut self) {
        let top = self.fresh.min(self.limit);
        self.freed = (1..top).filter(|id| !self.used.contains(id)).collect();
    }

    pub fn free(&mut self, id: u32) {
        // An id at or above the limit (left by an older agent) is not handed out again.
        if self.used.remove(&id) && id < self.limit {
            self.freed.push_back(id);
        }
    }

    /// Ids tracked (used and freed): bounded by the limit however long the churn.
    #[cfg(test)]
    pub fn footprint(&self) -> usize {
        self.used.len() + self.freed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_first_then_the_oldest_freed_and_never_past_the_limit() {
        let mut ids = IdAllocator::new(5);
        let got: Vec<u32> = (0..4).map(|_| ids.allocate("x").expect("id")).collect();
        assert_eq!(got, [1, 2, 3, 4]);
        assert!(ids.allocate("x").is_err(), "ids 1..5 only");
        ids.free(3);
        ids.free(1);
        assert_eq!(ids.allocate("x").expect("id"), 3, "oldest freed first");
        assert_eq!(ids.allocate("x").expect("id"), 1);
        assert!(ids.allocate("x").is_err());
    }

    #[test]
    fn adoption_keeps_ids_and_frees_the_gaps() {
        let mut ids = IdAllocator::new(10);
        for id in [2, 5] {
            ids.adopt(id);
        }
        ids.settle();
        let got: Vec<u32> = (0..7).map(|_| ids.allocate("x").expect("id")).collect();
        assert_eq!(
            got,
            [6, 7, 8, 9, 1, 3, 4],
            "never-used first, then the gaps"
        );
        // An adopted id past the limit is kept while used, never handed out again.
        let mut ids = IdAllocator::new(4);
        ids.adopt(7);
        ids.settle();
        ids.free(7);
        let got: Vec<u32> = (0..3).map(|_| ids.allocate("x").expect("id")).collect();
        assert_eq!(got, [1, 2, 3]);
        assert!(ids.allocate("x").is_err());
    }
}
