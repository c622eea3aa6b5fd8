//! The agent's configuration, built from `xlb agent`'s flags: everything resolved here (node
//! name, cgroup) so the loop itself never looks at the environment.
use std::path::PathBuf;

use crate::{
    cli::{AgentArgs, CgroupArg},
    datapath::{attach::XdpAttach, bpffs, ifaces::IfacePatterns},
    kube_proxy::config::{self as kube_proxy_config, ConfigFileError},
    model::{IpNet, Scheduler},
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
    pub node_ips: Vec<std::net::IpAddr>,
    pub snat_ports: (u16, u16),
    pub xdp_mode: XdpAttach,
    /// Where node processes live: the socket hooks attach here. `None`: not attached.
    pub cgroup: Option<PathBuf>,
    /// NodePorts answer only on node addresses inside these (empty: every one).
    pub node_port_cidrs: Vec<IpNet>,
    /// ClusterIPs reached from outside the node are balanced and masqueraded (kube-proxy
    /// with clusterCIDR or masqueradeAll).
    pub masquerade_outside: bool,
    /// What the kube-proxy configuration file had that xlb does not use.
    pub ignored_settings: Vec<String>,
    /// Connection-tracking lifetimes (kube-proxy's conntrack settings; zeros: defaults).
    pub ct_timeouts: lb_common::CtTimeouts,
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
    #[error(transparent)]
    ConfigFile(#[from] ConfigFileError),
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

    /// As if no flag had been given explicitly: a `--config` file's values apply.
    fn try_from(args: AgentArgs) -> Result<Self, ConfigError> {
        AgentConfig::new(args, |_| false)
    }
}

impl AgentConfig {
    /// Builds the configuration from the flags and, with `--config`, kube-proxy's file:
    /// the file's value of a setting applies unless `given(flag id)` says the flag was on
    /// the command line.
    pub fn new(mut args: AgentArgs, given: impl Fn(&str) -> bool) -> Result<Self, ConfigError> {
        let mut node_port_cidrs = Vec::new();
        let mut masquerade_outside = false;
        let mut ignored_settings = Vec::new();
        let mut ct_timeouts = lb_common::CtTimeouts::default();
        if let Some(path) = &args.config {
            let file = kube_proxy_config::read(path)?;
            if let Some(s) = file.scheduler.filter(|_| !given("scheduler")) {
                args.scheduler = s;
            }
            if let Some(a) = file.metrics_addr.filter(|_| !given("metrics_addr")) {
                args.metrics_addr = a;
            }
            if let Some(a) = file.healthz_addr.filter(|_| !given("healthz_addr")) {
                args.healthz_addr = a;
            }
            if let Some(n) = file.node_name.filter(|_| !given("node_name")) {
                args.node_name = Some(n);
            }
            node_port_cidrs = file.node_port_cidrs;
            ct_timeouts = file.ct_timeouts;
            masquerade_outside = !file.cluster_cidrs.is_empty() || file.masquerade_all;
            if file.masquerade_all {
                ignored_settings.push(
                    "masqueradeAll: pods' ClusterIP traffic keeps its source (only traffic \
                     from outside the node is masqueraded)"
                        .to_string(),
                );
            }
            ignored_settings.extend(file.ignored);
        }
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
            node_port_cidrs,
            masquerade_outside,
            ignored_settings,
            ct_timeouts,
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

    #[test]
    fn the_kube_proxy_file_applies_where_no_flag_was_given() {
        let dir = std::env::temp_dir().join(format!("xlb-kpconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("config.conf");
        std::fs::write(
            &file,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             clusterCIDR: 10.244.0.0/16\nipvs: {scheduler: lc}\nhostnameOverride: kp-node\n\
             metricsBindAddress: 127.0.0.1:20249\nnodePortAddresses: [192.168.50.0/24]\n\
             conntrack: {udpTimeout: 30s}\n",
        )
        .expect("write");
        let args = |extra: &[&str]| {
            let mut all = vec!["xlb", "agent", "--manifests", "/m", "--cgroup", "none"];
            all.extend_from_slice(extra);
            all.extend_from_slice(&["--config", file.to_str().expect("path")]);
            let matches = <Cli as clap::CommandFactory>::command()
                .try_get_matches_from(all)
                .expect("valid flags");
            let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).expect("cli");
            let sub = matches.subcommand_matches("agent").expect("agent").clone();
            match cli.command {
                Command::Agent(a) => AgentConfig::new(*a, |id| {
                    sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
                })
                .expect("config"),
                other => panic!("parsed as {other:?}"),
            }
        };
        let c = args(&[]);
        assert_eq!(c.scheduler, Scheduler::LeastConn, "ipvs.scheduler lc");
        assert_eq!(c.node_name, "kp-node");
        assert_eq!(c.metrics_addr.port(), 20249);
        assert_eq!(
            c.healthz_addr.port(),
            10256,
            "unset in the file: the default"
        );
        assert!(c.masquerade_outside);
        assert_eq!(c.node_port_cidrs.len(), 1);
        assert_eq!(c.ct_timeouts.other_s, 30, "conntrack.udpTimeout");
        // Flags on the command line win over the file.
        let c = args(&["--scheduler", "maglev", "--node-name", "flag-node"]);
        assert_eq!(
            (c.scheduler, c.node_name.as_str()),
            (Scheduler::Maglev, "flag-node")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
