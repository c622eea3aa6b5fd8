//! Where Services and EndpointSlices come from: the Kubernetes API or a manifests directory.
pub mod compact;
pub mod events;
pub mod kube;
pub mod manifests;

use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::agent::{
    SourceConfig,
    wake::{Wake, watch_dir},
};
use kube::{KubeSource, Snapshot};
use manifests::ManifestDir;

/// How often a manifests directory is read again when it cannot be watched.
const POLL: Duration = Duration::from_millis(100);

/// The running source of objects.
pub enum Source {
    Manifests {
        dir: ManifestDir,
        scanned: bool,
        error_logged: bool,
    },
    Kube(Box<KubeSource>),
}

impl Source {
    pub fn start(config: &SourceConfig, node_name: &str, wake: &Wake) -> Result<Source> {
        Ok(match config {
            SourceConfig::Manifests(path) => {
                if let Err(e) = watch_dir(path, wake.clone()) {
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

    /// New objects when a sync is due: the first complete read, then every change.
    pub fn poll(&mut self) -> Option<Snapshot> {
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
