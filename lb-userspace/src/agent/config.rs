//! The agent's configuration, built from `xlb agent`'s flags: everything resolved here (node
//! name, cgroup) so the loop itself never looks at the environment.
use std::{net::Ipv4Addr, path::PathBuf};

use crate::{
    cli::{AgentArgs, CgroupArg},
    datapath::{attach::XdpAttach, bpffs, ifaces::IfacePatterns},
    model::Scheduler,
};

/// Where Services and EndpointSlices come from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// `--manifests DIR`.
    Manifests(PathBuf),
    /// The Kubernetes API: `--kubeconfig FILE`, or in-cluster configuration.
    Kube { kubeconfig: Option<PathBuf> },
}

impl std::fmt::Display for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceConfig::Manifests(path) => write!(f, "manifests in {}", path.display()),
            SourceConfig::Kube {
                kubeconfig: Some(path),
            } => write!(f, "the Kubernetes API ({})", path.display()),
            SourceConfig::Kube { kubeconfig: None } => write!(f, "the Kubernetes API (in-cluster)"),
        }
    }
}

#[derive(Debug, Clone)]
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
    pub xdp_mode: XdpAttach,
    /// Where node processes live: the socket hooks attach here. `None`: not attached.
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no cgroup v2 mount found for the socket hooks (--cgroup auto): pass --cgroup PATH or \
         --cgroup none"
    )]
    NoCgroup2,
    #[error("no --node-name, no $NODE_NAME and no host name: pass --node-name")]
    NoNodeName,
    #[error(
        "KUBERNETES_SERVICE_HOST is still {API_SERVER_PLACEHOLDER:?}: set the API server's \
         address in the xlb-kubernetes-api ConfigMap of deploy/xlb.yaml (step 1 of \
         replacing kube-proxy in the README)"
    )]
    ApiServerPlaceholder,
}

/// What deploy/xlb.yaml's ConfigMap says until the operator sets the API server's address.
pub const API_SERVER_PLACEHOLDER: &str = "REPLACE_WITH_API_SERVER_ADDRESS";

impl TryFrom<AgentArgs> for AgentConfig {
    type Error = ConfigError;

    fn try_from(args: AgentArgs) -> Result<Self, ConfigError> {
        let cgroup = match args.cgroup {
            CgroupArg::None => None,
            CgroupArg::Auto => Some(bpffs::cgroup2_root().ok_or(ConfigError::NoCgroup2)?),
            CgroupArg::Path(path) => Some(path),
        };
        let node_name = args
            .node_name
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .or_else(hostname)
            .ok_or(ConfigError::NoNodeName)?;
        let source = match args.manifests {
            Some(dir) => SourceConfig::Manifests(dir),
            None => SourceConfig::Kube {
                kubeconfig: args.kubeconfig,
            },
        };
        if matches!(source, SourceConfig::Kube { kubeconfig: None })
            && std::env::var("KUBERNETES_SERVICE_HOST").as_deref() == Ok(API_SERVER_PLACEHOLDER)
        {
            return Err(ConfigError::ApiServerPlaceholder);
        }
        Ok(AgentConfig {
            source,
            pod_ifaces: args.pod_ifaces,
            bpffs: args.bpffs,
            scheduler: args.scheduler,
            maglev_table_size: args.maglev_table_size,
            metrics_addr: args.metrics_addr,
            healthz_addr: args.healthz_addr,
            node_name,
            external_ifaces: args.external_ifaces,
            node_ips: args.node_ips,
            snat_ports: args.snat_ports,
            xdp_mode: args.xdp_mode,
            cgroup,
        })
    }
}

fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(args: &[&str]) -> AgentConfig {
        let mut all = vec!["xlb", "agent", "--manifests", "/m"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).expect("valid flags").command {
            Command::Agent(args) => AgentConfig::try_from(*args).expect("valid config"),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_become_the_agent_config() {
        let c = config(&[
            "--cgroup",
            "none",
            "--node-name",
            "n1",
            "--pod-ifaces",
            "cali*",
        ]);
        assert!(c.cgroup.is_none());
        assert_eq!(c.node_name, "n1");
        assert!(c.pod_ifaces.matches("cali0") && !c.pod_ifaces.matches("veth0"));
        assert!(matches!(c.source, SourceConfig::Manifests(ref p) if p == &PathBuf::from("/m")));
        let c = config(&["--cgroup", "/sys/fs/cgroup/node", "--node-name", "n1"]);
        assert_eq!(c.cgroup, Some(PathBuf::from("/sys/fs/cgroup/node")));
    }
}
