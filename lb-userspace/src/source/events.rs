//! Kubernetes Events on this node's Node for fatal agent errors, so `kubectl describe node`
//! tells an operator why xlb is not running there (kube-proxy records its start-up on the
//! Node the same way).
use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// Posts a Warning Event `reason` with `message` about Node `node_name`; gives up after a
/// few seconds (the agent is exiting anyway).
pub fn report_fatal(kubeconfig: Option<PathBuf>, node_name: &str, reason: &str, message: &str) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return log::warn!("cannot post the event: {e}"),
    };
    let posted = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            let config = crate::source::kube::client_config(kubeconfig)
                .await
                .map_err(|e| e.to_string())?;
            let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
            let reporter = Reporter {
                controller: "xlb".into(),
                instance: Some(node_name.to_string()),
            };
            let node = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node_name.to_string()),
                uid: Some(node_name.to_string()),
                ..Default::default()
            };
            // The Events API limits notes to 1 kB.
            let note: String = message.chars().take(1000).collect();
            Recorder::new(client, reporter)
                .publish(
                    &Event {
                        type_: EventType::Warning,
                        reason: reason.into(),
                        note: Some(note),
                        action: "Start".into(),
                        secondary: None,
                    },
                    &node,
                )
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r)
    });
    match posted {
        Ok(()) => log::info!("recorded event {reason} on node {node_name}"),
        Err(e) => log::warn!("cannot post event {reason} on node {node_name}: {e}"),
    }
}
