//! Command line of the `xlb` binary.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{
    datapath::{attach::XdpAttach, ifaces::IfacePatterns},
    model::Scheduler,
};

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/xlb";
/// `--snat-ports` unless given: above Linux's default ephemeral range (32768-60999) and
/// kube-proxy's NodePort range (30000-32767).
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61_000, 65_535);

fn port_range(value: &str) -> Result<(u16, u16), String> {
    let (min, max) = value
        .split_once('-')
        .ok_or_else(|| format!("{value:?} is not MIN-MAX"))?;
    let parse = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port number"))
    };
    let (min, max) = (parse(min)?, parse(max)?);
    if min == 0 || min > max {
        return Err(format!("{value:?}: need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}

fn maglev_size(value: &str) -> Result<u32, String> {
    let size: u32 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    crate::sync::maglev::check_size(size).map_err(|e| e.to_string())
}

#[derive(Debug, Parser)]
#[command(name = "xlb", version, about = "eBPF Kubernetes service load balancer")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: program the datapath from Services and EndpointSlices.
    Agent(Box<AgentArgs>),
    /// Frontends, backends and their counters (like `ipvsadm -Ln --stats`).
    Services(ReadArgs),
    /// NATed flows (like `conntrack -L`).
    Conntrack(ReadArgs),
    /// Outcome counters and map fill levels.
    Stats(ReadArgs),
    /// What the datapath would do with a packet, and why (from the live maps).
    Explain(ExplainArgs),
    /// Make sure --bpffs lies on a BPF filesystem, mounting one on its parent if needed (the
    /// DaemonSet's privileged init container runs this, so the mount reaches the host and
    /// the agent itself needs no privileged mount propagation).
    MountBpffs {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Detach the programs and remove every pin under --bpffs; with --kube-proxy-rules,
    /// remove kube-proxy's leftover iptables chains and nftables tables instead.
    Cleanup {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Remove kube-proxy's KUBE-* iptables chains (kubelet's are kept) and its nftables
        /// tables from this node, after replacing kube-proxy with xlb.
        #[arg(long)]
        kube_proxy_rules: bool,
    },
}

/// `xlb agent` flags.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// kube-proxy's configuration file (a `KubeProxyConfiguration`, as in kubeadm's
    /// kube-proxy ConfigMap): nodePortAddresses, clusterCIDR, masqueradeAll, ipvs.scheduler,
    /// metricsBindAddress, healthzBindAddress and hostnameOverride are used; flags given on
    /// the command line win; other fields are reported as ignored.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read Service and EndpointSlice objects from the YAML/JSON files in DIR (re-read on
    /// change) instead of watching the Kubernetes API.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Watch the Kubernetes API with this kubeconfig (default: in-cluster configuration).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Host-side pod interfaces to attach to: comma-separated globs.
    #[arg(long, value_name = "GLOB,...", default_value = "veth*")]
    pub pod_ifaces: IfacePatterns,
    /// Where maps and links are pinned (a bpffs is mounted on its parent if needed).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Load-balancing algorithm of services without an `xlb.io/scheduler` annotation:
    /// random, round-robin, least-conn, source-hash or maglev.
    #[arg(long, value_name = "NAME", default_value = "random")]
    pub scheduler: Scheduler,
    /// Entries in each Maglev lookup table: a prime; more entries spread more evenly.
    #[arg(long, value_name = "PRIME", default_value_t = lb_common::MAGLEV_DEFAULT_SIZE,
          value_parser = maglev_size)]
    pub maglev_table_size: u32,
    /// Where Prometheus metrics are served (`/metrics`), as kube-proxy's default.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10249")]
    pub metrics_addr: std::net::SocketAddr,
    /// Where `/healthz` is served (kube-proxy's format and default port).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    pub healthz_addr: std::net::SocketAddr,
    /// This node's name, for traffic policies (endpoints' `nodeName`); default
    /// $NODE_NAME, then the host name.
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Interfaces where traffic from outside arrives (XDP): comma-separated names or
    /// globs. None: no NodePort/externalIP/LoadBalancer traffic from outside.
    #[arg(long, value_name = "IF,...", default_value = "")]
    pub external_ifaces: IfacePatterns,
    /// Addresses NodePorts answer on (comma-separated, IPv4 and IPv6); default: the
    /// addresses of the external interfaces, or of every interface but lo without them
    /// (kube-proxy's --nodeport-addresses; IPv6 link-local ones left out). Each family's
    /// first one is its SNAT (and hairpin) source.
    #[arg(long, value_name = "IP,...", value_delimiter = ',')]
    pub node_ips: Vec<std::net::IpAddr>,
    /// Source ports for SNATed NodePort/LoadBalancer flows (outside the local ephemeral
    /// range, so they never collide with the node's own connections).
    // The default is DEFAULT_SNAT_PORTS (a unit test holds them equal).
    #[arg(long, value_name = "MIN-MAX", default_value = "61000-65535", value_parser = port_range)]
    pub snat_ports: (u16, u16),
    /// How XDP runs on the external interfaces: auto (native where the driver has it),
    /// native, or generic (any device; needed on veth pairs whose peers have no NAPI).
    #[arg(long, value_name = "MODE", value_enum, default_value = "auto")]
    pub xdp_mode: XdpAttach,
    /// cgroup (v2) of the node processes whose connections to services are balanced
    /// (socket hooks); `auto`: the cgroup v2 root; `none`: not attached.
    #[arg(long, value_name = "PATH|auto|none", default_value = "auto")]
    pub cgroup: CgroupArg,
}

/// `--cgroup`: where the socket hooks attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupArg {
    /// The cgroup v2 root: every process of the node, pods included.
    Auto,
    /// No socket hooks.
    None,
    Path(PathBuf),
}

impl std::str::FromStr for CgroupArg {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        Ok(match value {
            "auto" => CgroupArg::Auto,
            "none" => CgroupArg::None,
            "" => return Err("expected a cgroup path, auto or none".into()),
            path => CgroupArg::Path(PathBuf::from(path)),
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The client: IP, or IP:PORT ([IPv6]:PORT) to look up its tracked flow and exact
    /// Maglev pick.
    #[arg(long, value_name = "IP[:PORT]", value_parser = ip_port_opt)]
    pub src: (std::net::IpAddr, Option<u16>),
    /// The destination: a ClusterIP, externalIP, LoadBalancer IP or node address, and port
    /// (IP:PORT, [IPv6]:PORT); of the client's family.
    #[arg(long, value_name = "IP:PORT", value_parser = ip_port)]
    pub dst: (std::net::IpAddr, u16),
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: ProtoArg,
    /// Where the packet comes from.
    #[arg(long, value_enum, default_value = "pod")]
    pub from: crate::report::explain::Origin,
    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT` (a bare IPv6 address has no port).
fn ip_port_opt(value: &str) -> Result<(std::net::IpAddr, Option<u16>), String> {
    if let Ok(ip) = value.parse::<std::net::IpAddr>() {
        return Ok((ip, None));
    }
    ip_port(value).map(|(ip, port)| (ip, Some(port)))
}

/// `IP:PORT` or `[IPv6]:PORT`.
fn ip_port(value: &str) -> Result<(std::net::IpAddr, u16), String> {
    value
        .parse::<std::net::SocketAddr>()
        .map(|a| (a.ip(), a.port()))
        .map_err(|_| format!("{value:?}: expected IP:PORT or [IPv6]:PORT"))
}

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_flags_parse() {
        let cli = Cli::try_parse_from([
            "xlb",
            "agent",
            "--manifests",
            "/etc/xlb",
            "--pod-ifaces",
            "veth*,cali*",
            "--bpffs",
            "/sys/fs/bpf/t",
        ])
        .expect("valid");
        match cli.command {
            Command::Agent(args) => {
                let AgentArgs {
                    config,
                    manifests,
                    kubeconfig,
                    pod_ifaces,
                    bpffs,
                    scheduler,
                    maglev_table_size,
                    metrics_addr,
                    healthz_addr,
                    node_name,
                    external_ifaces,
                    node_ips,
                    snat_ports,
                    xdp_mode,
                    cgroup,
                } = *args;
                assert_eq!(cgroup, CgroupArg::Auto);
                assert_eq!(config, None);
                assert_eq!(xdp_mode, XdpAttach::Auto);
                assert_eq!(metrics_addr.port(), 10249);
                assert_eq!(healthz_addr.port(), 10256);
                assert_eq!(node_name, None);
                assert!(external_ifaces.is_empty());
                assert!(node_ips.is_empty());
                assert_eq!(snat_ports, DEFAULT_SNAT_PORTS);
                assert_eq!(manifests, Some(PathBuf::from("/etc/xlb")));
                assert_eq!(kubeconfig, None);
                assert!(pod_ifaces.matches("veth0") && pod_ifaces.matches("cali1"));
                assert!(!pod_ifaces.matches("eth0"));
                assert_eq!(bpffs, PathBuf::from("/sys/fs/bpf/t"));
                assert_eq!(scheduler, Scheduler::Random);
                assert_eq!(maglev_table_size, 16_381);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn read_commands_default_bpffs_and_json() {
        let cli = Cli::try_parse_from(["xlb", "services", "--json"]).expect("valid");
        match cli.command {
            Command::Services(args) => {
                assert!(args.json);
                assert_eq!(args.bpffs, PathBuf::from(DEFAULT_BPFFS));
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn agent_sources_and_unknown_flags() {
        // Without --manifests: the Kubernetes API (in-cluster, or --kubeconfig).
        assert!(Cli::try_parse_from(["xlb", "agent"]).is_ok());
        assert!(Cli::try_parse_from(["xlb", "agent", "--kubeconfig", "k"]).is_ok());
        assert!(
            Cli::try_parse_from(["xlb", "agent", "--manifests", "d", "--kubeconfig", "k"]).is_err()
        );
        assert!(Cli::try_parse_from(["xlb", "agent", "--manifests", "d", "--bogus"]).is_err());
    }

    #[test]
    fn scheduler_and_maglev_size_are_validated() {
        let agent = |extra: &[&str]| {
            let mut args = vec!["xlb", "agent", "--manifests", "d"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        match agent(&["--scheduler", "maglev", "--maglev-table-size", "251"])
            .expect("valid")
            .command
        {
            Command::Agent(args) => assert_eq!(
                (args.scheduler, args.maglev_table_size),
                (Scheduler::Maglev, 251)
            ),
            other => panic!("parsed as {other:?}"),
        }
        let err = agent(&["--scheduler", "wlc"])
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("unknown scheduler \"wlc\""), "{err}");
        assert!(err.contains("round-robin"), "lists the known names: {err}");
        let err = agent(&["--maglev-table-size", "1000"])
            .expect_err("not prime")
            .to_string();
        assert!(err.contains("not a prime"), "{err}");
    }

    #[test]
    fn north_south_flags() {
        let cli = Cli::try_parse_from([
            "xlb",
            "agent",
            "--manifests",
            "d",
            "--external-ifaces",
            "eth0,bond*",
            "--node-ips",
            "192.0.2.1,192.0.2.2",
            "--snat-ports",
            "40000-40100",
            "--node-name",
            "worker-1",
        ])
        .expect("valid");
        match cli.command {
            Command::Agent(args) => {
                let AgentArgs {
                    external_ifaces,
                    node_ips,
                    snat_ports,
                    node_name,
                    ..
                } = *args;
                assert!(external_ifaces.matches("eth0") && external_ifaces.matches("bond1"));
                assert!(!external_ifaces.matches("eth1"));
                assert_eq!(node_ips.len(), 2);
                assert_eq!(snat_ports, (40000, 40100));
                assert_eq!(node_name.as_deref(), Some("worker-1"));
            }
            other => panic!("parsed as {other:?}"),
        }
        for bad in ["40100-40000", "0-10", "x-1", "100"] {
            let err =
                Cli::try_parse_from(["xlb", "agent", "--manifests", "d", "--snat-ports", bad])
                    .expect_err(bad)
                    .to_string();
            assert!(err.contains("--snat-ports"), "{err}");
        }
        // Both families; each family's first is its SNAT source.
        match Cli::try_parse_from([
            "xlb",
            "agent",
            "--manifests",
            "d",
            "--node-ips",
            "fd00::1,192.168.0.1",
        ]) {
            Ok(Cli {
                command: Command::Agent(args),
            }) => assert_eq!(
                args.node_ips,
                [
                    "fd00::1".parse::<std::net::IpAddr>().expect("ip"),
                    "192.168.0.1".parse().expect("ip")
                ]
            ),
            other => panic!("parsed as {other:?}"),
        }
        assert!(
            Cli::try_parse_from(["xlb", "agent", "--manifests", "d", "--node-ips", "fd00::zz"])
                .is_err()
        );
        let err = Cli::try_parse_from(["xlb", "agent", "--pod-ifaces", "veth[", "--cgroup", "x"])
            .expect_err("bad glob")
            .to_string();
        assert!(err.contains("--pod-ifaces"), "{err}");
        assert!(Cli::try_parse_from(["xlb", "agent", "--cgroup", ""]).is_err());
    }
}
