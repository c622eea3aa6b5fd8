//! `xlb agent`: load and pin the datapath, keep maps equal to the manifests, keep programs
//! attached to the pod interfaces. Leaves everything pinned on exit so traffic keeps flowing
//! across restarts.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use lb_common::NodeConfig;

use crate::{
    bpffs,
    healthcheck::HealthServers,
    ifaces::{self, Attacher, IfacePatterns, Role},
    loader::{self, PinLayout},
    maps::PinnedMaps,
    metrics::{self, SharedMetrics},
    model::Scheduler,
    source::{
        kube::{KubeSource, Snapshot},
        manifests::ManifestDir,
    },
    sync::Syncer,
    translate::{Objects, Options, Translator},
    wake::Wake,
};

/// How often files and interfaces are checked: well inside the one-second promise.
const POLL: Duration = Duration::from_millis(100);
/// How often dead conntrack entries are collected (also right after backends are removed).
const GC_INTERVAL: Duration = Duration::from_secs(5);
/// Earliest conntrack GC after one that ran, when backends were removed meanwhile.
const GC_AFTER_REMOVAL: Duration = Duration::from_secs(1);

/// Where Services and EndpointSlices come from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// `--manifests DIR`.
    Manifests(PathBuf),
    /// The Kubernetes API: `--kubeconfig FILE`, or in-cluster configuration.
    Kube { kubeconfig: Option<PathBuf> },
}

pub struct AgentConfig {
    pub source: SourceConfig,
    pub pod_ifaces: IfacePatterns,
    pub bpffs: PathBuf,
    pub scheduler: Scheduler,
    pub maglev_table_size: u32,
    pub metrics_addr: std::net::SocketAddr,
    pub healthz_addr: std::net::SocketAddr,
    pub node_name: String,
    pub external_ifaces: IfacePatterns,
    /// Empty: the external interfaces' addresses.
    pub node_ips: Vec<Ipv4Addr>,
    pub snat_ports: (u16, u16),
    pub xdp_mode: crate::loader::XdpAttach,
    /// Where node processes live: the socket hooks attach here. `None`: not attached.
    pub cgroup: Option<PathBuf>,
}

pub fn run(config: AgentConfig, stop: Arc<AtomicBool>) -> Result<()> {
    bpffs::ensure_pin_dir(&config.bpffs)?;
    let pins = PinLayout::new(&config.bpffs);
    std::fs::create_dir_all(pins.maps_dir())
        .with_context(|| format!("creating {}", pins.maps_dir().display()))?;
    let mut ebpf = loader::load(Some(&pins)).context("loading the datapath")?;
    let mut maps = PinnedMaps::open(&pins)?;
    if let Some(cgroup) = &config.cgroup {
        loader::attach_cgroup(&mut ebpf, cgroup, &pins).with_context(|| {
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
    };
    let mut syncer = adopt(&maps);
    if !syncer.current().is_empty() {
        log::info!(
            "adopted {} frontend(s) from pinned maps under {}",
            syncer.current().len(),
            pins.root.display()
        );
    }
    let metrics = SharedMetrics::default();
    // Metrics are for humans and Prometheus; a taken port (kube-proxy still running on this
    // node?) must not stop the datapath from being programmed.
    match metrics::serve(
        config.metrics_addr,
        pins.root.clone(),
        Arc::clone(&metrics),
        Arc::clone(&stop),
    ) {
        Ok(_) => log::info!("serving metrics on http://{}/metrics", config.metrics_addr),
        Err(e) => log::error!(
            "cannot serve metrics on {}: {e}; running without metrics (choose another \
             --metrics-addr)",
            config.metrics_addr
        ),
    }
    match metrics::serve_healthz(config.healthz_addr, Arc::clone(&metrics), Arc::clone(&stop)) {
        Ok(()) => log::info!("serving health on http://{}/healthz", config.healthz_addr),
        Err(e) => log::error!(
            "cannot serve /healthz on {}: {e}; running without (choose another \
             --healthz-addr)",
            config.healthz_addr
        ),
    }
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
    let mut health = HealthServers::default();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    // No sync before the source was read once: an unreadable directory or an unreachable
    // API server at start must not wipe the state adopted from the pins.
    let mut need_sync = false;
    let gc = ConntrackGc::start(&pins, Arc::clone(&stop))?;
    log::info!(
        "watching {} for Services and EndpointSlices; default scheduler {}, Maglev table \
         size {}",
        source.describe(&config.source),
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
            record_sync(&metrics, &mut syncer, started.elapsed(), result.is_ok());
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

/// Conntrack and affinity garbage collection on a thread of its own: a walk over the whole
/// table must not hold up programming a change. Runs every `GC_INTERVAL`, and at most
/// `GC_AFTER_REMOVAL` after being asked (backends were removed).
struct ConntrackGc {
    wake: Wake,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConntrackGc {
    fn start(pins: &PinLayout, stop: Arc<AtomicBool>) -> Result<ConntrackGc> {
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
                    let removed = maps.collect_garbage(crate::inspect::monotonic_ns());
                    if removed > 0 {
                        log::debug!("conntrack gc: removed {removed} dead entries");
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
    fn soon(&self) {
        self.wake.notify();
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Publishes what a sync did to the metrics endpoint.
fn record_sync(metrics: &SharedMetrics, syncer: &mut Syncer, took: Duration, ok: bool) {
    let Ok(mut m) = metrics.lock() else { return };
    if !ok {
        m.sync_errors += 1;
        return;
    }
    m.observe_sync(took.as_secs_f64());
    m.frontends = syncer.current().len();
    m.backends = syncer.current().values().map(|p| p.backends.len()).sum();
    if syncer.take_names_changed() {
        m.service_names = syncer
            .current()
            .iter()
            .map(|(f, p)| (f.to_string(), p.service.clone()))
            .collect();
    }
}

/// Keeps `XLB_NODE_IPS` and the SNAT settings equal to the node's addresses (given, or
/// those of the external interfaces, which may change while the agent runs).
#[derive(Default)]
struct NodeAddresses {
    current: Option<Vec<Ipv4Addr>>,
}

impl NodeAddresses {
    fn reconcile(&mut self, config: &AgentConfig, maps: &mut PinnedMaps) {
        let addresses = if config.node_ips.is_empty() {
            ifaces::ipv4_addresses(&config.external_ifaces)
        } else {
            config.node_ips.clone()
        };
        if self.current.as_ref() == Some(&addresses) {
            return;
        }
        let node = NodeConfig {
            snat_addr: addresses
                .first()
                .map(|a| u32::from_ne_bytes(a.octets()))
                .unwrap_or(0),
            snat_port_min: config.snat_ports.0,
            snat_port_max: config.snat_ports.1,
        };
        match maps.set_node(&addresses, &node) {
            Ok(()) => {
                log::info!("node addresses (NodePorts, SNAT source first): {addresses:?}");
                self.current = Some(addresses);
            }
            Err(e) => log::error!("writing node addresses {addresses:?}: {e}; retrying"),
        }
    }
}

/// The running source of objects.
enum Source {
    Manifests {
        dir: ManifestDir,
        scanned: bool,
        error_logged: bool,
    },
    Kube(Box<KubeSource>),
}

impl Source {
    fn start(config: &SourceConfig, node_name: &str, wake: &Wake) -> Result<Source> {
        Ok(match config {
            SourceConfig::Manifests(path) => {
                if let Err(e) = crate::wake::watch_dir(path, wake.clone()) {
                    log::warn!(
                        "cannot watch {} for changes ({e}); reading it every {POLL:?} instead",
                        path.display()
                    );
                }
                Source::Manifests {
                    dir: ManifestDir::new(path),
                    scanned: false,
                    error_logged: false,
                }
            }
            SourceConfig::Kube { kubeconfig } => Source::Kube(Box::new(
                KubeSource::start(kubeconfig.clone(), node_name, wake.clone())
                    .context("connecting to the Kubernetes API")?,
            )),
        })
    }

    fn describe(&self, config: &SourceConfig) -> String {
        match config {
            SourceConfig::Manifests(path) => format!("manifests in {}", path.display()),
            SourceConfig::Kube {
                kubeconfig: Some(path),
            } => {
                format!("the Kubernetes API ({})", path.display())
            }
            SourceConfig::Kube { kubeconfig: None } => "the Kubernetes API (in-cluster)".into(),
        }
    }

    /// New objects when a sync is due: the first complete read, then every change.
    fn poll(&mut self) -> Option<Snapshot> {
        match self {
            Source::Manifests {
                dir,
                scanned,
                error_logged,
            } => match dir.rescan() {
                Ok(rescan) => {
                    *error_logged = false;
                    for err in &rescan.errors {
                        log::error!("{err}; keeping the last good objects of this file");
                    }
                    let due = rescan.changed || !*scanned;
                    *scanned = true;
                    due.then(|| Snapshot {
                        objects: dir.objects(),
                        zone: None,
                    })
                }
                Err(err) => {
                    if !*error_logged {
                        log::error!("{err}; keeping the current state");
                        *error_logged = true;
                    }
                    None
                }
            },
            Source::Kube(kube) => kube.poll(),
        }
    }
}
