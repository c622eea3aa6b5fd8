//! A shared L2 segment between namespaces (a bridge in a namespace of its own), for
//! north-south tests: an outside client and several nodes on one subnet. Removed on drop.
use anyhow::Result;

use crate::netns::Netns;

pub struct Lan {
    pub ns: Netns,
    tag: String,
    ports: usize,
}

impl Lan {
    pub fn new(tag: &str) -> Result<Lan> {
        let ns = Netns::new(tag, "lan")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Lan {
            ns,
            tag: tag.to_string(),
            ports: 0,
        })
    }

    /// Plugs `ns` into the segment as interface `iface` with address `cidr` (a.b.c.d/n).
    pub fn connect(&mut self, ns: &Netns, iface: &str, cidr: &str) -> Result<()> {
        let port: String = format!("l{}{}", self.ports, self.tag)
            .chars()
            .take(15)
            .collect();
        self.ports += 1;
        self.ns.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            iface,
            "netns",
            ns.name(),
        ])?;
        self.ns.ip(&["link", "set", &port, "master", "br0"])?;
        self.ns.ip(&["link", "set", &port, "up"])?;
        ns.ip(&["addr", "add", cidr, "dev", iface])?;
        ns.ip(&["link", "set", iface, "up"])?;
        Ok(())
    }
}
