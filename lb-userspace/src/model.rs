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

/// A virtual address clients connect to: ClusterIP, externalIP or LoadBalancer IP, port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
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
