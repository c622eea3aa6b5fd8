//! What the datapath should do, independent of Kubernetes types and of BPF maps.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Where a frontend's clients are: the same address can lead to different endpoint sets for
/// pods and for clients outside the cluster (externalTrafficPolicy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Pods and the node's own processes (TC on pod interfaces, socket hooks).
    #[default]
    Internal,
    /// Clients outside the cluster entering through an external interface (XDP).
    External,
}

impl Scope {
    pub fn code(self) -> u8 {
        match self {
            Scope::Internal => lb_common::SCOPE_INTERNAL,
            Scope::External => lb_common::SCOPE_EXTERNAL,
        }
    }
    pub fn from_code(code: u8) -> Option<Scope> {
        match code {
            lb_common::SCOPE_INTERNAL => Some(Scope::Internal),
            lb_common::SCOPE_EXTERNAL => Some(Scope::External),
            _ => None,
        }
    }
}

/// A virtual address clients connect to: ClusterIP, externalIP or LoadBalancer IP (or any
/// node address, 0.0.0.0, for a NodePort), port, protocol, and the clients it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    /// A frontend for pods and node processes.
    pub fn internal(ip: Ipv4Addr, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            ip,
            port,
            protocol,
            scope: Scope::Internal,
        }
    }
    pub fn is_node_port(&self) -> bool {
        self.ip.is_unspecified()
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_node_port() {
            write!(f, "*:{}/{}", self.port, self.protocol)?;
        } else {
            write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)?;
        }
        if self.scope == Scope::External {
            f.write_str(" (external)")?;
        }
        Ok(())
    }
}

/// A backend address (pod IP and target port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// Everything the datapath needs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendSpec {
    /// `namespace/name:port-name` of the Service port, for logs and `xlb services`.
    pub service: String,
    /// Usable endpoints, sorted and unique. Empty: reject clients.
    pub endpoints: Vec<Endpoint>,
    /// `sessionAffinity: ClientIP` timeout in seconds, if set.
    pub affinity_timeout_s: Option<u32>,
    /// How new flows pick among `endpoints`.
    pub scheduler: Scheduler,
    /// Rewrite external clients' source to the node's address (externalTrafficPolicy
    /// Cluster), so replies come back through this node.
    pub snat: bool,
    /// No usable endpoint means drop rather than reject (a Local traffic policy without
    /// local endpoints, as kube-proxy does).
    pub drop_when_empty: bool,
    /// loadBalancerSourceRanges: clients outside every range are dropped; empty = anyone.
    pub source_ranges: Vec<Ipv4Net>,
}

/// An IPv4 prefix (`10.0.0.0/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Ipv4Net {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;
    /// `a.b.c.d/n` (host bits are cleared) or a bare address (/32).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>()
                    .map_err(|_| format!("bad prefix in {text:?}"))?,
            ),
            None => (text.trim(), 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 address or prefix"))?;
        if prefix > 32 {
            return Err(format!("prefix of {text:?} is longer than 32"));
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(Ipv4Net {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

/// A healthCheckNodePort to serve (externalTrafficPolicy Local LoadBalancer services).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

/// A load-balancing algorithm (see `lb_common::scheduler` for what each does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scheduler {
    #[default]
    Random,
    RoundRobin,
    LeastConn,
    SourceHash,
    Maglev,
}

impl Scheduler {
    pub const ALL: [Scheduler; 5] = [
        Scheduler::Random,
        Scheduler::RoundRobin,
        Scheduler::LeastConn,
        Scheduler::SourceHash,
        Scheduler::Maglev,
    ];

    /// The code the datapath reads from the frontend's flags.
    pub fn code(self) -> u8 {
        use lb_common::scheduler as s;
        match self {
            Scheduler::Random => s::RANDOM,
            Scheduler::RoundRobin => s::ROUND_ROBIN,
            Scheduler::LeastConn => s::LEAST_CONN,
            Scheduler::SourceHash => s::SOURCE_HASH,
            Scheduler::Maglev => s::MAGLEV,
        }
    }

    pub fn from_code(code: u8) -> Option<Scheduler> {
        Scheduler::ALL.into_iter().find(|s| s.code() == code)
    }

    pub fn name(self) -> &'static str {
        lb_common::scheduler::NAMES[self.code() as usize]
    }

    /// Every accepted name, for error messages.
    pub fn known_names() -> String {
        lb_common::scheduler::NAMES.join(", ")
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Scheduler {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {name:?} (known: {known})", known = Scheduler::known_names())]
pub struct UnknownScheduler {
    pub name: String,
}

impl std::str::FromStr for Scheduler {
    type Err = UnknownScheduler;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Scheduler::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| UnknownScheduler { name: name.into() })
    }
}

/// The whole desired datapath state.
pub type DesiredState = BTreeMap<Frontend, FrontendSpec>;
