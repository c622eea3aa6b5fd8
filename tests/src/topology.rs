//! A single Kubernetes-like node in namespaces: the node (where the agent runs and the host
//! ends of pod interfaces live) and pods wired to it with veth pairs, routed like Calico or
//! Cilium do (/32 pod addresses, a static gateway neighbour). Nothing touches the root
//! namespace, and everything goes away when the `Node` is dropped.
use std::net::Ipv4Addr;

use anyhow::Result;

use crate::netns::{Netns, unique_tag};

/// Host-side pod interface names all start with this (the agent's `--pod-ifaces` glob).
pub const POD_IFACE_PREFIX: &str = "xp";
pub const POD_IFACE_GLOB: &str = "xp*";
/// The pods' default gateway: a link-local address no one owns; pods reach it through a
/// permanent neighbour entry pointing at the host side's fixed MAC (Calico's scheme).
const GATEWAY: &str = "169.254.1.1";
const HOST_SIDE_MAC: &str = "ee:ee:ee:ee:ee:ee";

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub host_iface: String,
    pub ns: Netns,
}

pub struct Node {
    pub tag: String,
    /// Pods are dropped before the node namespace (field order).
    pub pods: Vec<Pod>,
    pub ns: Netns,
}

impl Node {
    pub fn new() -> Result<Node> {
        let tag = unique_tag();
        let ns = Netns::new(&tag, "node")?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(Node {
            tag,
            pods: Vec::new(),
            ns,
        })
    }

    /// Adds a pod named `name` with address `ip`, returns its index.
    pub fn add_pod(&mut self, name: &str, ip: &str) -> Result<usize> {
        let index = self.pods.len();
        let ns = Netns::new(&self.tag, name)?;
        let host_iface = format!("{POD_IFACE_PREFIX}{index}{}", &self.tag);
        let host_iface: String = host_iface.chars().take(15).collect();
        self.ns.add_veth(&host_iface, Some(HOST_SIDE_MAC), &ns)?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"])?;
        ns.ip(&[
            "neigh",
            "add",
            GATEWAY,
            "lladdr",
            HOST_SIDE_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        self.ns.ip(&["link", "set", &host_iface, "up"])?;
        self.ns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_iface])?;
        self.pods.push(Pod {
            name: name.to_string(),
            ip: ip.parse()?,
            host_iface,
            ns,
        });
        Ok(index)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Deletes a pod (its namespace and veth pair), as when Kubernetes deletes it.
    pub fn remove_pod(&mut self, name: &str) {
        self.pods.retain(|p| p.name != name);
    }
}
