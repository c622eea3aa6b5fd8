//! Keeps `XLB_NODE_IPS` and the SNAT settings equal to the node's addresses (given, or
//! those of the external interfaces, which may change while the agent runs).
use std::net::IpAddr;

use super::AgentConfig;
use crate::datapath::{ifaces, maps::PinnedMaps};
use crate::model::Family;

#[derive(Default)]
pub struct NodeAddresses {
    current: Option<Vec<IpAddr>>,
}

impl NodeAddresses {
    pub fn reconcile(&mut self, config: &AgentConfig, maps: &mut PinnedMaps) {
        let mut addresses = if config.node_ips.is_empty() {
            ifaces::node_addresses(&config.external_ifaces)
        } else {
            config.node_ips.clone()
        };
        // kube-proxy's nodePortAddresses, per family: a family none of them is of keeps
        // all its addresses (NewNodePortAddresses falls back to the family's zero CIDR).
        let cidrs = &config.node_port_cidrs;
        addresses.retain(|a| {
            let family = Family::of(*a);
            let mut of_family = cidrs.iter().filter(|net| net.family() == family).peekable();
            of_family.peek().is_none() || of_family.any(|net| net.contains(*a))
        });
        if self.current.as_ref() == Some(&addresses) {
            return;
        }
        match maps.set_node(&addresses, config.snat_ports) {
            Ok(()) => {
                log::info!(
                    "node addresses (NodePorts; each family's first is its SNAT source): \
                     {addresses:?}"
                );
                self.current = Some(addresses);
            }
            Err(e) => log::error!("writing node addresses {addresses:?}: {e}; retrying"),
        }
    }
}
