//! A single Kubernetes-like node in namespaces: the node (where the agent runs and the host
//! ends of pod interfaces live) and pods wired to it with veth pairs, routed like Calico or
//! Cilium do (/32 pod addresses, a static gateway neighbour). Nothing touches the root
//! namespace, and everything goes away when the `Node` is dropped.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::netns::{Netns, unique_tag};

/// Host-side pod interface names all start with this (the agent's `--pod-ifaces` glob).
pub const POD_IFACE_PREFIX: &str = "xp";
pub const POD_IFACE_GLOB: &str = "xp*";
/// The pods' default gateway: a link-local address no one owns; pods reach it through a
/// permanent neighbour entry pointing at the host side's fixed MAC (Calico's scheme).
const GATEWAY: &str = "169.254.1.1";
/// The IPv6 twin: a link-local gateway reached through a permanent neighbour entry.
const GATEWAY6: &str = "fe80::1";
pub const HOST_SIDE_MAC: &str = "ee:ee:ee:ee:ee:ee";

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address on a dual-stack node.
    pub ip6: Option<Ipv6Addr>,
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
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // Addresses (the host sides' link-local ones too) usable at once, without the
        // second of duplicate address detection.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(Node {
            tag,
            pods: Vec::new(),
            ns,
        })
    }

    /// Adds a pod named `name` with address `ip`, returns its index.
    pub fn add_pod(&mut self, name: &str, ip: &str) -> Result<usize> {
        self.add_dual_stack_pod(name, ip, None)
    }

    /// Adds a pod with an IPv4 address and, if given, an IPv6 one (routed the same way:
    /// a /128, a link-local gateway with a permanent neighbour); returns its index.
    pub fn add_dual_stack_pod(&mut self, name: &str, ip: &str, ip6: Option<&str>) -> Result<usize> {
        let index = self.pods.len();
        let ns = Netns::new(&self.tag, name)?;
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
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
        if let Some(ip6) = ip6 {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&["-6", "route", "add", GATEWAY6, "dev", "eth0"])?;
            ns.ip(&[
                "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
            ])?;
            ns.ip(&[
                "-6",
                "neigh",
                "add",
                GATEWAY6,
                "lladdr",
                HOST_SIDE_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
        }
        self.ns.ip(&["link", "set", &host_iface, "up"])?;
        self.ns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_iface])?;
        if let Some(ip6) = ip6 {
            self.ns.ip(&[
                "-6",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                &host_iface,
            ])?;
        }
        self.pods.push(Pod {
            name: name.to_string(),
            ip: ip.parse()?,
            ip6: ip6.map(str::parse).transpose()?,
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
