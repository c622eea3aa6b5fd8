//! deploy/xlb.yaml against the API server's pod validation rules that a schema check does
//! not see (k8s.io/kubernetes pkg/apis/core/validation): Bidirectional mount propagation
//! only in privileged containers, no privileged container that forbids privilege
//! escalation, known capability names, hostPath types, mounts naming volumes, ConfigMap
//! references that resolve. And the containers' arguments are ones `xlb` accepts.
use std::collections::BTreeSet;

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec},
};
use xlb::cli::{Cli, Command};

/// Linux capability names as Kubernetes spells them (no CAP_ prefix).
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

const HOST_PATH_TYPES: [&str; 8] = [
    "",
    "DirectoryOrCreate",
    "Directory",
    "FileOrCreate",
    "File",
    "Socket",
    "CharDevice",
    "BlockDevice",
];

struct Deploy {
    daemonset: DaemonSet,
    config_maps: Vec<ConfigMap>,
}

fn deploy() -> Deploy {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/xlb.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/xlb.yaml");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("YAML");
    let of_kind = |kind: &'static str| {
        docs.iter()
            .filter(move |d| d["kind"] == kind)
            .cloned()
            .collect::<Vec<_>>()
    };
    Deploy {
        daemonset: serde_json::from_value(of_kind("DaemonSet").remove(0)).expect("DaemonSet"),
        config_maps: of_kind("ConfigMap")
            .into_iter()
            .map(|d| serde_json::from_value(d).expect("ConfigMap"))
            .collect(),
    }
}

fn pod_spec(d: &Deploy) -> PodSpec {
    d.daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod template spec")
}

fn containers(spec: &PodSpec) -> Vec<Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .cloned()
        .collect()
}

/// The pod-level violations of `spec`, as the API server would report them.
fn violations(spec: &PodSpec, config_maps: &[ConfigMap]) -> Vec<String> {
    let mut found = Vec::new();
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for volume in spec.volumes.iter().flatten() {
        if let Some(host) = &volume.host_path {
            let kind = host.type_.as_deref().unwrap_or("");
            if !HOST_PATH_TYPES.contains(&kind) {
                found.push(format!("volume {}: hostPath type {kind:?}", volume.name));
            }
        }
    }
    for c in containers(spec) {
        let security = c.security_context.clone().unwrap_or_default();
        let privileged = security.privileged.unwrap_or(false);
        if privileged && security.allow_privilege_escalation == Some(false) {
            found.push(format!(
                "{}: privileged with allowPrivilegeEscalation false",
                c.name
            ));
        }
        for m in c.volume_mounts.iter().flatten() {
            if !volumes.contains(m.name.as_str()) {
                found.push(format!("{}: mount of unknown volume {}", c.name, m.name));
            }
            match m.mount_propagation.as_deref() {
                None | Some("None") | Some("HostToContainer") => {}
                Some("Bidirectional") if privileged => {}
                Some("Bidirectional") => found.push(format!(
                    "{}: Bidirectional mount propagation of {} needs a privileged container",
                    c.name, m.name
                )),
                Some(other) => found.push(format!("{}: mountPropagation {other}", c.name)),
            }
        }
        let caps = security.capabilities.unwrap_or_default();
        for cap in caps.add.iter().flatten().chain(caps.drop.iter().flatten()) {
            if cap != "ALL" && !CAPABILITIES.contains(&cap.as_str()) {
                found.push(format!("{}: unknown capability {cap}", c.name));
            }
        }
        for source in c.env_from.iter().flatten() {
            if let Some(reference) = &source.config_map_ref
                && !reference.optional.unwrap_or(false)
                && !config_maps
                    .iter()
                    .any(|m| m.metadata.name.as_deref() == Some(reference.name.as_str()))
            {
                found.push(format!(
                    "{}: envFrom ConfigMap {} is not in the manifest",
                    c.name, reference.name
                ));
            }
        }
    }
    found
}

#[test]
fn the_daemonset_passes_pod_validation() {
    let d = deploy();
    let spec = pod_spec(&d);
    assert_eq!(violations(&spec, &d.config_maps), Vec::<String>::new());
    let agent = spec
        .containers
        .iter()
        .find(|c| c.name == "xlb")
        .expect("agent");
    assert_ne!(
        agent.security_context.as_ref().and_then(|s| s.privileged),
        Some(true),
        "the agent runs unprivileged"
    );
}

#[test]
fn the_checks_catch_what_the_api_server_rejects() {
    let d = deploy();
    let mut spec = pod_spec(&d);
    // The agent with the init container's Bidirectional mount: rejected.
    let agent = spec
        .containers
        .iter_mut()
        .find(|c| c.name == "xlb")
        .expect("agent");
    for m in agent.volume_mounts.iter_mut().flatten() {
        m.mount_propagation = Some("Bidirectional".into());
    }
    if let Some(caps) = agent
        .security_context
        .as_mut()
        .and_then(|s| s.capabilities.as_mut())
    {
        caps.add.get_or_insert_default().push("CAP_BPF".into());
    }
    let found = violations(&spec, &[]);
    for want in [
        "needs a privileged container",
        "unknown capability CAP_BPF",
        "ConfigMap",
    ] {
        assert!(found.iter().any(|f| f.contains(want)), "{want}: {found:?}");
    }
}

#[test]
fn container_arguments_are_ones_xlb_accepts_and_point_at_the_api_server_config() {
    let d = deploy();
    let spec = pod_spec(&d);
    let mut seen = Vec::new();
    for c in containers(&spec) {
        let args: Vec<String> = std::iter::once("xlb".to_string())
            .chain(c.args.clone().unwrap_or_default())
            .collect();
        let cli = Cli::try_parse_from(&args)
            .unwrap_or_else(|e| panic!("{}: {args:?} rejected: {e}", c.name));
        seen.push(match cli.command {
            Command::Agent(a) => {
                assert!(
                    a.manifests.is_none() && a.kubeconfig.is_none(),
                    "in-cluster"
                );
                "agent"
            }
            Command::MountBpffs { .. } => "mount-bpffs",
            other => panic!("{}: unexpected command {other:?}", c.name),
        });
        assert!(
            c.image
                .as_deref()
                .is_some_and(|i| i.contains("REPLACE_WITH_YOUR_REGISTRY")),
            "{}: an image placeholder the operator must set, not a made-up reference",
            c.name
        );
    }
    assert_eq!(seen, ["mount-bpffs", "agent"]);
    // The API server's address comes from the ConfigMap, as KUBERNETES_SERVICE_HOST/PORT.
    let api = d
        .config_maps
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some("xlb-kubernetes-api"))
        .and_then(|m| m.data.clone())
        .expect("xlb-kubernetes-api data");
    assert_eq!(
        api.get("KUBERNETES_SERVICE_HOST").map(String::as_str),
        Some(xlb::agent::API_SERVER_PLACEHOLDER)
    );
    assert!(
        api.get("KUBERNETES_SERVICE_PORT")
            .is_some_and(|p| p.parse::<u16>().is_ok())
    );
}
