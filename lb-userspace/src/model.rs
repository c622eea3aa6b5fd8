//! What the datapath should do, independent of Kubernetes types and of BPF maps.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

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

/// An address family. Each family is balanced on its own (kube-proxy runs one proxier per
/// family): a frontend's endpoints, source ranges and node addresses are of its family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Family {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The family's unspecified address (where NodePort frontends are stored).
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// As Kubernetes spells it (`ipFamilies`, `addressType`).
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `addr:port`, IPv6 in brackets (`[fd00::1]:80`).
pub struct HostPort(pub IpAddr, pub u16);

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.1),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.1),
        }
    }
}

/// A virtual address clients connect to: ClusterIP, externalIP or LoadBalancer IP (or any
/// node address of the family, 0.0.0.0 or ::, for a NodePort), port, protocol, and the
/// clients it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    /// A frontend for pods and node processes.
    pub fn internal(ip: impl Into<IpAddr>, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            ip: ip.into(),
            port,
            protocol,
            scope: Scope::Internal,
        }
    }
    pub fn is_node_port(&self) -> bool {
        self.ip.is_unspecified()
    }
    pub fn family(&self) -> Family {
        Family::of(self.ip)
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.is_node_port(), self.ip) {
            (true, IpAddr::V4(_)) => write!(f, "*:{}/{}", self.port, self.protocol)?,
            (true, IpAddr::V6(_)) => write!(f, "[*]:{}/{}", self.port, self.protocol)?,
            (false, ip) => write!(f, "{}/{}", HostPort(ip, self.port), self.protocol)?,
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
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        HostPort(self.ip, self.port).fmt(f)
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
    /// loadBalancerSourceRanges of the frontend's family: clients outside every range are
    /// dropped; empty = anyone.
    pub source_ranges: Vec<IpNet>,
}

/// An IPv4 or IPv6 prefix (`10.0.0.0/8`, `fd00::/64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The `prefix` leading bits of `addr` (host bits cleared), as a 128-bit number.
fn masked(addr: IpAddr, prefix: u8) -> u128 {
    let (bits, width) = match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    if prefix == 0 {
        0
    } else {
        bits & (u128::MAX >> (128 - width)) & !((1u128 << (width - u32::from(prefix))) - 1)
    }
}

impl IpNet {
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// Whether `ip` (of the same family) is inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family() && masked(ip, self.prefix) == masked(self.addr, self.prefix)
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;
    /// `a.b.c.d/n` or `x::y/n` (host bits are cleared), or a bare address (/32, /128).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (
                a,
                Some(
                    p.parse::<u8>()
                        .map_err(|_| format!("bad prefix in {text:?}"))?,
                ),
            ),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or prefix"))?;
        let width = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = prefix.unwrap_or(width);
        if prefix > width {
            return Err(format!("prefix of {text:?} is longer than {width}"));
        }
        let bits = masked(addr, prefix);
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(bits as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
        };
        Ok(IpNet { addr, prefix })
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
