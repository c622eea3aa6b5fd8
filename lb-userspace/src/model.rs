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
}

/// The whole desired datapath state.
pub type DesiredState = BTreeMap<Frontend, FrontendSpec>;
