//! Conntrack and affinity garbage collection on a thread of its own.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::wake::Wake;
use crate::{
    datapath::{clock::monotonic_ns, maps::PinnedMaps, pins::PinLayout},
    serve::metrics::WalkedCounts,
};

/// How often dead conntrack entries are collected (also right after backends are removed).
const GC_INTERVAL: Duration = Duration::from_secs(5);
/// Earliest conntrack GC after one that ran, when backends were removed meanwhile.
const GC_AFTER_REMOVAL: Duration = Duration::from_secs(1);

/// Conntrack and affinity garbage collection on a thread of its own: a walk over the whole
/// table must not hold up programming a change. Runs every `GC_INTERVAL`, and at most
/// `GC_AFTER_REMOVAL` after being asked (backends were removed).
pub struct ConntrackGc {
    wake: Wake,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConntrackGc {
    pub fn start(
        pins: &PinLayout,
        walked: Arc<WalkedCounts>,
        stop: Arc<AtomicBool>,
    ) -> Result<ConntrackGc> {
        let mut maps = PinnedMaps::open(pins)?;
        let wake = Wake::default();
        let (thread_wake, thread_stop) = (wake.clone(), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                // Flows younger than the live-set grace are spared by a collection; one
                // asked for gets a second pass after a rest, which takes those too.
                let mut second_pass = false;
                while !thread_stop.load(Ordering::Relaxed) {
                    let collected = maps.collect_garbage(monotonic_ns());
                    walked.record(&collected);
                    if collected.removed > 0 {
                        log::debug!("conntrack gc: removed {} dead entries", collected.removed);
                    }
                    // A burst of removals costs one walk a second at most: requests made
                    // meanwhile stay pending and end the wait below at once.
                    let rested = Instant::now();
                    while rested.elapsed() < GC_AFTER_REMOVAL
                        && !thread_stop.load(Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if std::mem::take(&mut second_pass) {
                        continue;
                    }
                    second_pass = thread_wake.wait(GC_INTERVAL - GC_AFTER_REMOVAL);
                }
            })
            .context("starting the conntrack GC thread")?;
        Ok(ConntrackGc {
            wake,
            stop,
            thread: Some(thread),
        })
    }

    /// Asks for a collection soon (removed backends' flows and affinities).
    pub fn soon(&self) {
        self.wake.notify();
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
