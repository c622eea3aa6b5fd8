//! `xlb agent`: load and pin the datapath, keep the maps equal to the source's objects, keep
//! programs attached to the pod and external interfaces. Leaves everything pinned on exit so
//! traffic keeps flowing across restarts.
mod config;
mod gc;
mod node;
pub mod wake;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

pub use config::{API_SERVER_PLACEHOLDER, AgentConfig, ConfigError, SourceConfig};
use gc::ConntrackGc;
use node::NodeAddresses;
use wake::Wake;

use crate::{
    datapath::{
        attach, bpffs,
        ifaces::{Attacher, Role},
        load,
        maps::PinnedMaps,
        pins::PinLayout,
        route_watch,
    },
    serve::{
        healthcheck::HealthServers,
        http,
        metrics::{self, SharedMetrics, WalkedCounts},
    },
    source::Source,
    sync::Syncer,
    translate::{Objects, Options, Translator},
};

/// How often files and interfaces are checked: well inside the one-second promise.
const POLL: Duration = Duration::from_millis(100);

pub fn run(config: AgentConfig, stop: Arc<AtomicBool>) -> Result<()> {
    bpffs::ensure_pin_dir(&config.bpffs)?;
    let pins = PinLayout::new(&config.bpffs);
    std::fs::create_dir_all(pins.maps_dir())
        .with_context(|| format!("creating {}", pins.maps_dir().display()))?;
    let mut ebpf = load::load(Some(&pins)).context("loading the datapath")?;
    let mut maps = PinnedMaps::open(&pins)?;
    // Before anything is forwarded from a cached next hop: routing changes invalidate them.
    route_watch::spawn(&pins).context("watching routing changes for the next-hop cache")?;
    // Before anything is programmed: the lifetimes every flow is judged by.
    maps.set_ct_timeouts(&config.ct_timeouts)
        .context("writing the conntrack lifetimes")?;
    if let Some(cgroup) = &config.cgroup {
        // Before the hooks attach: they must know which sockets are the host's.
        let cookie = maps
            .set_host_netns()
            .context("recording the host network namespace for the socket hooks")?;
        log::debug!("host network namespace cookie {cookie}");
        attach::attach_cgroup(&mut ebpf, cgroup, &pins).with_context(|| {
            format!(
                "attaching the socket hooks to cgroup {} (node processes' service traffic); \
                 pass --cgroup none to go without",
                cgroup.display()
            )
        })?;
        log::info!(
            "node processes in cgroup {} reach services",
            cgroup.display()
        );
    }
    let adopt = |maps: &PinnedMaps| {
        Syncer::adopt(
            maps.service_slots(),
            maps.all_backends(),
            maps.maglev_tables(),
        )
        .with_maglev_size(config.maglev_table_size)
    };
    let mut options = Options {
        default_scheduler: config.scheduler,
        node_name: Some(config.node_name.clone()),
        zone: None,
        masquerade_outside: config.masquerade_outside,
    };
    for ignored in &config.ignored_settings {
        log::warn!("kube-proxy configuration: {ignored}; ignored");
    }
    let mut syncer = adopt(&maps);
    if !syncer.current().is_empty() {
        log::info!(
            "adopted {} frontend(s) from pinned maps under {}",
            syncer.current().len(),
            pins.root.display()
        );
    }
    let metrics = SharedMetrics::default();
    let walked = Arc::new(WalkedCounts::default());
    // Metrics, /healthz and health-check node ports are served here, each connection a task.
    let runtime = http::runtime().context("starting the agent's serving runtime")?;
    // Metrics are for humans and Prometheus; a taken port (kube-proxy still running on this
    // node?) must not stop the datapath from being programmed.
    let _metrics_server = match metrics::serve(
        runtime.handle(),
        config.metrics_addr,
        pins.root.clone(),
        Arc::clone(&metrics),
        Arc::clone(&walked),
    ) {
        Ok(server) => {
            log::info!("serving metrics on http://{}/metrics", server.addr);
            Some(server)
        }
        Err(e) => {
            log::error!(
                "cannot serve metrics on {}: {e}; running without metrics (choose another \
                 --metrics-addr)",
                config.metrics_addr
            );
            None
        }
    };
    let _healthz_server =
        match metrics::serve_healthz(runtime.handle(), config.healthz_addr, Arc::clone(&metrics)) {
            Ok(server) => {
                log::info!("serving health on http://{}/healthz", server.addr);
                Some(server)
            }
            Err(e) => {
                log::error!(
                    "cannot serve /healthz on {}: {e}; running without (choose another \
                     --healthz-addr)",
                    config.healthz_addr
                );
                None
            }
        };
    let wake = Wake::default();
    let mut translator = Translator::default();
    // The first sync (after adopting pinned state) and one after an error compare
    // everything; later ones only what changed.
    let mut full_sync = true;
    let mut source = Source::start(&config.source, &config.node_name, &wake)?;
    let mut changed_at: Option<Instant> = None;
    let mut latest: Option<Objects> = None;
    let mut attacher = Attacher::new(Role::Pod, config.pod_ifaces.clone());
    let mut external = Attacher::new(
        Role::External(config.xdp_mode),
        config.external_ifaces.clone(),
    );
    let mut node = NodeAddresses::default();
    let mut health = HealthServers::new(
        runtime.handle().clone(),
        std::net::Ipv4Addr::UNSPECIFIED.into(),
    );
    let mut warned: BTreeSet<String> = BTreeSet::new();
    // No sync before the source was read once: an unreadable directory or an unreachable
    // API server at start must not wipe the state adopted from the pins.
    let mut need_sync = false;
    let gc = ConntrackGc::start(&pins, walked, Arc::clone(&stop))?;
    log::info!(
        "watching {} for Services and EndpointSlices; default scheduler {}, Maglev table \
         size {}",
        config.source,
        config.scheduler,
        config.maglev_table_size
    );

    while !stop.load(Ordering::Relaxed) {
        // Node addresses first: NodePorts and SNAT must know them before services are
        // programmed or XDP is attached, or the first packets would miss them.
        node.reconcile(&config, &mut maps);
        if let Ok(mut m) = metrics.lock() {
            m.health.last_loop = Instant::now();
        }
        if let Some(update) = source.poll() {
            latest = Some(update.objects);
            options.zone = update.zone;
            need_sync = true;
            changed_at.get_or_insert_with(Instant::now);
            if let Ok(mut m) = metrics.lock() {
                m.health.pending_since.get_or_insert_with(Instant::now);
            }
        }
        if need_sync && let Some(objects) = &latest {
            let started = Instant::now();
            translator.translate(objects, &options);
            let changed = translator.take_changed();
            let translation = translator.current();
            for w in &translation.warnings {
                if warned.insert(w.clone()) {
                    log::warn!("{w}");
                }
            }
            health.update(&translation.health_checks);
            // Only what the translator changed, once a full sync went through: the maps
            // hold the rest already.
            let result = if full_sync {
                syncer.apply(&translation.desired, &mut maps)
            } else {
                syncer.apply_changes(&translation.desired, &changed, &mut maps)
            };
            full_sync = result.is_err();
            record_sync(&metrics, &syncer, started.elapsed(), result.is_ok());
            if result.is_ok()
                && let (Some(at), Ok(mut m)) = (changed_at.take(), metrics.lock())
            {
                m.last_change_to_programmed_s = at.elapsed().as_secs_f64();
                m.health.pending_since = None;
                m.health.last_synced = Some(std::time::SystemTime::now());
            }
            match result {
                Ok(report) => {
                    need_sync = false;
                    let removed: BTreeSet<u32> =
                        syncer.take_removed_backends().into_iter().collect();
                    // Only node processes (the socket hooks) have sockets to let go of.
                    let destroyed = if config.cgroup.is_some() {
                        maps.release_sockets(&removed)
                    } else {
                        0
                    };
                    if destroyed > 0 {
                        log::info!(
                            "closed {destroyed} node UDP socket(s) connected to removed backends"
                        );
                    }
                    if report.backends_removed > 0 {
                        gc.soon();
                    }
                    if !report.is_noop() {
                        log::info!(
                            "synced {} frontend(s) in {:?}: {report:?}",
                            translation.desired.len(),
                            started.elapsed()
                        );
                    }
                }
                Err(err) => {
                    log::error!("{err}; re-reading map state and retrying");
                    syncer = adopt(&maps);
                }
            }
        }
        attacher.reconcile(&mut ebpf, &pins);
        external.reconcile(&mut ebpf, &pins);
        // Sources wake us at once when something changed; the tick does the rest (node
        // addresses, interfaces, GC) and covers a source that cannot notify.
        wake.wait(POLL);
    }
    gc.stop();
    log::info!(
        "stopping; programs and maps stay pinned under {} so traffic keeps flowing \
         (`xlb cleanup --bpffs {}` removes them)",
        pins.root.display(),
        pins.root.display()
    );
    Ok(())
}

/// Publishes what a sync did to the metrics endpoint.
fn record_sync(metrics: &SharedMetrics, syncer: &Syncer, took: Duration, ok: bool) {
    let Ok(mut m) = metrics.lock() else { return };
    if !ok {
        m.sync_errors += 1;
        return;
    }
    m.observe_sync(took.as_secs_f64());
    m.frontends = syncer.current().len();
    m.backends = syncer.current().values().map(|p| p.backends.len()).sum();
}
