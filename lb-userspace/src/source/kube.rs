//! The Kubernetes API source: Services, EndpointSlices and this node's Node, watched with
//! kube-rs reflectors on a runtime thread of their own. The agent loop polls a snapshot, the
//! same way it polls the manifests directory.
//!
//! kube-rs's watcher lists, then watches from the list's resourceVersion, relists when the
//! server says 410 Gone, and (with the default backoff) waits longer after each failure
//! instead of spinning while the API server is down. The stores keep the last known objects
//! meanwhile, so the datapath keeps serving what it had.
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};

use super::{
    compact::Compact,
    validate::{self, Validate},
};
use crate::{agent::wake::Wake, translate::Objects};

/// The zone label kube-proxy reads from its Node for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error(
        "no in-cluster configuration ({0}); outside a pod pass --kubeconfig FILE or --manifests DIR"
    )]
    InCluster(String),
    #[error("building the Kubernetes client: {0}")]
    Client(String),
    #[error("starting the watch thread: {0}")]
    Thread(std::io::Error),
}

/// What the watches know, shared with the runtime thread.
struct Shared {
    /// Tells the agent loop that `generation` moved.
    wake: Wake,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// Bumped on every applied watch event.
    generation: AtomicU64,
    /// Watch failures seen (for logs and metrics).
    errors: AtomicU64,
    /// The first full list of each kind arrived.
    services_listed: AtomicBool,
    slices_listed: AtomicBool,
    nodes_listed: AtomicBool,
    stop: AtomicBool,
}

/// A snapshot of the cluster as far as this node cares.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub objects: Objects,
    /// This node's zone label, if its Node object has one.
    pub zone: Option<String>,
}

pub struct KubeSource {
    shared: Arc<Shared>,
    seen_generation: u64,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeSource {
    /// Connects (in-cluster unless `kubeconfig` is given) and starts watching. Returns at
    /// once; [`KubeSource::poll`] says when the first lists are in.
    /// `wake` is notified on every change.
    pub fn start(
        kubeconfig: Option<PathBuf>,
        node_name: &str,
        wake: Wake,
    ) -> Result<Self, KubeSourceError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(KubeSourceError::Thread)?;
        let config = runtime.block_on(client_config(kubeconfig))?;
        let (services, services_writer) = reflector::store::<Service>();
        let (slices, slices_writer) = reflector::store::<EndpointSlice>();
        let (nodes, nodes_writer) = reflector::store::<Node>();
        let shared = Arc::new(Shared {
            services,
            slices,
            nodes,
            generation: AtomicU64::new(0),
            wake,
            errors: AtomicU64::new(0),
            services_listed: AtomicBool::new(false),
            slices_listed: AtomicBool::new(false),
            nodes_listed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let node_selector = format!("metadata.name={node_name}");
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let client = match Client::try_from(config) {
                        Ok(client) => client,
                        Err(e) => {
                            log::error!("building the Kubernetes client: {e}");
                            return;
                        }
                    };
                    let shared = thread_shared;
                    let services = watch(
                        Api::<Service>::all(client.clone()),
                        watcher::Config::default(),
                        services_writer,
                        Arc::clone(&shared),
                        |s| &s.services_listed,
                    );
                    let slices = watch(
                        Api::<EndpointSlice>::all(client.clone()),
                        watcher::Config::default(),
                        slices_writer,
                        Arc::clone(&shared),
                        |s| &s.slices_listed,
                    );
                    let nodes = watch(
                        Api::<Node>::all(client),
                        watcher::Config::default().fields(&node_selector),
                        nodes_writer,
                        Arc::clone(&shared),
                        |s| &s.nodes_listed,
                    );
                    let stopped = async {
                        while !shared.stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    };
                    tokio::select! {
                        _ = services => {}
                        _ = slices => {}
                        _ = nodes => {}
                        _ = stopped => {}
                    }
                });
            })
            .map_err(KubeSourceError::Thread)?;
        Ok(KubeSource {
            shared,
            seen_generation: u64::MAX,
            thread: Some(thread),
        })
    }

    /// A new snapshot if anything changed since the last call and Services and
    /// EndpointSlices have been listed at least once (never sync half a cluster).
    pub fn poll(&mut self) -> Option<Snapshot> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation == self.seen_generation || !self.ready() {
            return None;
        }
        self.seen_generation = generation;
        let zone = self.shared.nodes.state().first().and_then(|node| {
            node.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ZONE_LABEL).cloned())
        });
        Some(Snapshot {
            objects: Objects {
                services: self.shared.services.state(),
                slices: self.shared.slices.state(),
                nodes: Vec::new(),
            },
            zone,
        })
    }

    /// Services and EndpointSlices were listed at least once.
    pub fn ready(&self) -> bool {
        self.shared.services_listed.load(Ordering::Acquire)
            && self.shared.slices_listed.load(Ordering::Acquire)
    }

    /// Watch failures so far (each one retried with backoff).
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The client configuration: `kubeconfig`, or the pod's in-cluster configuration.
pub async fn client_config(kubeconfig: Option<PathBuf>) -> Result<Config, KubeSourceError> {
    match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(&path).map_err(|e| KubeSourceError::Kubeconfig {
                path: path.clone(),
                message: e.to_string(),
            })?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeSourceError::Kubeconfig {
                    path,
                    message: e.to_string(),
                })
        }
        None => Config::incluster().map_err(|e| KubeSourceError::InCluster(e.to_string())),
    }
}

/// Runs one reflector until the stream ends (it does not, short of a bug).
async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    shared: Arc<Shared>,
    listed: fn(&Shared) -> &AtomicBool,
) where
    K: kube::Resource<DynamicType = ()>
        + Compact
        + Validate
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let kind = K::kind(&()).to_string();
    let mut events = std::pin::pin!(
        watcher(api, config)
            .default_backoff()
            .modify(|object| {
                validate::check(object, "the API");
                object.compact();
            })
            .reflect(writer)
    );
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if matches!(event, watcher::Event::InitDone) {
                    listed(&shared).store(true, Ordering::Release);
                }
                if failing {
                    log::info!("watching {kind}s again");
                    failing = false;
                }
                shared.generation.fetch_add(1, Ordering::Release);
                shared.wake.notify();
            }
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    log::warn!(
                        "watching {kind}s failed: {e}; retrying with backoff, the datapath \
                         keeps the last known state"
                    );
                    failing = true;
                }
            }
        }
    }
}
