//! Where Services and EndpointSlices come from: the Kubernetes API or a manifests directory.
pub mod compact;
pub mod events;
pub mod kube;
pub mod manifests;
pub mod validate;

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
        /// Whose Node object (if the directory has one) gives the zone label.
        node_name: String,
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
                    node_name: node_name.to_string(),
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
                node_name,
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
                    due.then(|| {
                        let objects = dir.objects();
                        let zone = zone_of(&objects.nodes, node_name);
                        Snapshot { objects, zone }
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

/// The zone label (`topology.kubernetes.io/zone`) of the Node named `node_name`.
fn zone_of(
    nodes: &[std::sync::Arc<k8s_openapi::api::core::v1::Node>],
    node_name: &str,
) -> Option<String> {
    nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(kube::ZONE_LABEL).cloned())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_manifests_directory_gives_this_nodes_zone() {
        let objects = manifests::parse_file_text(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {topology.kubernetes.io/zone: zone-a}}\n\
             ---\napiVersion: v1\nkind: Node\nmetadata: {name: n2, labels: {topology.kubernetes.io/zone: zone-b}}\n",
            Path::new("nodes.yaml"),
            false,
        )
        .expect("parses");
        assert_eq!(zone_of(&objects.nodes, "n2").as_deref(), Some("zone-b"));
        assert_eq!(zone_of(&objects.nodes, "n3"), None);
    }
}
