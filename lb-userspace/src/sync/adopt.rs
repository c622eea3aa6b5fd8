//! Rebuilding what is programmed from the pinned maps after an agent restart.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{ServiceValue, scheduler, scheduler_of};

use super::{
    Programmed, Syncer,
    keys::{BackendEntry, SlotKey, frontend_of},
};
use crate::model::Frontend;

impl Syncer {
    /// Rebuilds the tracked state from existing map contents (agent restart), so ids of
    /// services and backends stay the same and established flows keep their backend.
    /// Incomplete frontends (slot 0 missing, or a slot pointing nowhere) are left out and
    /// get rewritten by the next sync.
    pub fn adopt(
        slots: impl IntoIterator<Item = (SlotKey, ServiceValue)>,
        backends: impl IntoIterator<Item = (u32, BackendEntry)>,
        maglev_tables: impl IntoIterator<Item = u32>,
    ) -> Self {
        let backends: BTreeMap<u32, BackendEntry> = backends.into_iter().collect();
        let mut by_frontend: BTreeMap<Frontend, BTreeMap<u16, ServiceValue>> = BTreeMap::new();
        for (key, value) in slots {
            if let Some(frontend) = frontend_of(&key) {
                by_frontend
                    .entry(frontend)
                    .or_default()
                    .insert(key.slot(), value);
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
                // A backend of the other family cannot be this frontend's.
                let Some(b) = backends
                    .get(&id)
                    .filter(|b| b.family() == frontend.family())
                else {
                    break;
                };
                list.push((b.endpoint(), id));
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
            .iter()
            .filter(|(id, _)| !referenced.contains(id))
            .map(|(id, b)| (*id, b.family()))
            .collect();
        for (id, _) in &syncer.orphans {
            syncer.backend_ids.adopt(*id);
        }
        syncer.backend_ids.settle();
        syncer.service_ids.settle();
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
}
