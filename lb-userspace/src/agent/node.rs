//! Keeps `XLB_NODE_IPS` and the SNAT settings equal to the node's addresses (given, or
//! those of the external interfaces, which may change while the agent runs).
use std::net::Ipv4Addr;

use lb_common::NodeConfig;

use super::AgentConfig;
use crate::datapath::{ifaces, maps::PinnedMaps};

#[derive(Default)]
pub struct NodeAddresses {
    current: Option<Vec<Ipv4Addr>>,
}

impl NodeAddresses {
    pub fn reconcile(&mut self, config: &AgentConfig, maps: &mut PinnedMaps) {
        let mut addresses = if config.node_ips.is_empty() {
            ifaces::ipv4_addresses(&config.external_ifaces)
        } else {
            config.node_ips.clone()
        };
        // kube-proxy's nodePortAddresses.
        if !config.node_port_cidrs.is_empty() {
            addresses.retain(|a| config.node_port_cidrs.iter().any(|net| net.contains(*a)));
        }
        if self.current.as_ref() == Some(&addresses) {
            return;
        }
        let node = NodeConfig {
            snat_addr: addresses
                .first()
                .map(|a| u32::from_ne_bytes(a.octets()))
                .unwrap_or(0),
            snat_port_min: config.snat_ports.0,
            snat_port_max: config.snat_ports.1,
        };
        match maps.set_node(&addresses, &node) {
            Ok(()) => {
                log::info!("node addresses (NodePorts, SNAT source first): {addresses:?}");
                self.current = Some(addresses);
            }
            Err(e) => log::error!("writing node addresses {addresses:?}: {e}; retrying"),
        }
    }
}
