//! Pod interfaces: which exist in this network namespace, which match `--pod-ifaces`, and
//! keeping the TC programs attached to exactly those as interfaces come and go.
use std::collections::BTreeMap;

use aya::Ebpf;

use super::{
    attach::{self, XdpAttach},
    pins::{self, Hook, PinLayout},
};

/// Interfaces of the current network namespace (via `if_nameindex`, which asks the kernel
/// through a socket, so it is right even when /sys belongs to another namespace).
pub fn list() -> BTreeMap<String, u32> {
    nix::net::if_::if_nameindex()
        .map(|ifaces| {
            ifaces
                .iter()
                .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
                .collect()
        })
        .unwrap_or_default()
}

/// Lets `iface` accept packets whose source is a node address: SNATed flows to local
/// backends leave XDP with the node's address as source and go up the stack to the pod, which
/// the kernel would otherwise drop as martians.
fn accept_local_sources(iface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    match std::fs::write(&path, "1") {
        Ok(()) => log::info!("set {path} = 1 (SNATed NodePort flows to local backends)"),
        Err(e) => log::warn!(
            "cannot set {path} = 1: {e}; SNATed NodePort flows to backends on this node \
             will be dropped as martians"
        ),
    }
}

/// IPv4 and IPv6 addresses of the interfaces matching `patterns`, in interface-name order
/// within each family; with no patterns, of every interface but loopback (kube-proxy's
/// default NodePort addresses). IPv6 link-local addresses are left out: they are no
/// NodePort address a client elsewhere can use, nor a SNAT source replies can route back to.
pub fn node_addresses(patterns: &IfacePatterns) -> Vec<std::net::IpAddr> {
    let wanted = |name: &str| {
        if patterns.is_empty() {
            name != "lo"
        } else {
            patterns.matches(name)
        }
    };
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut found: Vec<(bool, String, std::net::IpAddr)> = addresses
        .filter(|entry| wanted(&entry.interface_name))
        .filter_map(|entry| {
            let address = entry.address?;
            let ip: std::net::IpAddr = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => v4.ip().into(),
                (None, Some(v6)) if !is_link_local(&v6.ip()) => v6.ip().into(),
                _ => return None,
            };
            Some((ip.is_ipv6(), entry.interface_name, ip))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, _, addr)| addr).collect()
}

/// fe80::/10.
fn is_link_local(ip: &std::net::Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// Comma-separated globs, e.g. `veth*,cali*`.
#[derive(Debug, Clone)]
pub struct IfacePatterns(Vec<glob::Pattern>);

impl std::str::FromStr for IfacePatterns {
    type Err = glob::PatternError;

    fn from_str(list: &str) -> Result<Self, glob::PatternError> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(glob::Pattern::new)
            .collect::<Result<Vec<_>, _>>()
            .map(IfacePatterns)
    }
}

impl IfacePatterns {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, iface: &str) -> bool {
        iface != "lo" && self.0.iter().any(|p| p.matches(iface))
    }
}

/// Which programs an [`Attacher`] keeps attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// TC on the host side of pod interfaces.
    Pod,
    /// XDP on the node's external interfaces.
    External(XdpAttach),
}

impl Role {
    fn hooks(self) -> &'static [Hook] {
        match self {
            Role::Pod => &Hook::POD,
            Role::External(_) => &Hook::EXTERNAL,
        }
    }
}

/// Keeps programs attached to the matching interfaces.
pub struct Attacher {
    role: Role,
    patterns: IfacePatterns,
    /// Attached interfaces and the ifindex we attached to (a recreated interface gets a new one).
    attached: BTreeMap<String, u32>,
    /// Interfaces whose attach failed, by ifindex, so the error is logged once.
    failed: BTreeMap<String, u32>,
    /// Pins left by an earlier agent were checked (once, at start: later, only interfaces
    /// in `attached` can leave pins behind, and those are handled above).
    swept_stale_pins: bool,
}

impl Attacher {
    fn forget_pod_iface(&self, ebpf: &mut Ebpf, name: &str, index: u32) {
        if self.role != Role::Pod {
            return;
        }
        if let Err(e) = attach::mark_pod_iface(ebpf, name, index, false) {
            log::warn!("{e}");
        }
    }

    pub fn new(role: Role, patterns: IfacePatterns) -> Self {
        Self {
            role,
            patterns,
            attached: BTreeMap::new(),
            failed: BTreeMap::new(),
            swept_stale_pins: false,
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &String> {
        self.attached.keys()
    }

    /// Attaches to new matching interfaces, detaches from vanished ones. Pinned links of an
    /// earlier agent for interfaces that no longer match are removed on the first call.
    pub fn reconcile(&mut self, ebpf: &mut Ebpf, pins: &PinLayout) {
        let present: BTreeMap<String, u32> = list()
            .into_iter()
            .filter(|(name, _)| self.patterns.matches(name))
            .collect();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, index)| present.get(*name) != Some(index))
            .map(|(name, _)| name.clone())
            .collect();
        let hooks = self.role.hooks();
        for name in gone {
            pins::detach(&name, pins, hooks);
            if let Some(index) = self.attached.remove(&name) {
                self.forget_pod_iface(ebpf, &name, index);
            }
            log::info!("detached from {name} (interface gone)");
        }
        if !self.swept_stale_pins {
            for name in pins::pinned_ifaces_of(pins, hooks).into_keys() {
                if !present.contains_key(&name) {
                    pins::detach(&name, pins, hooks);
                    log::info!("removed stale pinned links of {name}");
                }
            }
            // An ifindex left by an earlier agent may now name another device, into which
            // bpf_redirect_peer would drop: keep only interfaces that match now (re-marked
            // when attached below).
            let current: Vec<u32> = present.values().copied().collect();
            for index in attach::marked_pod_ifaces(ebpf) {
                if self.role == Role::Pod && !current.contains(&index) {
                    self.forget_pod_iface(ebpf, "(stale)", index);
                }
            }
            self.swept_stale_pins = true;
        }
        self.failed
            .retain(|name, index| present.get(name) == Some(index));
        for (name, index) in &present {
            if self.attached.contains_key(name) || self.failed.contains_key(name) {
                continue;
            }
            let attached = match self.role {
                Role::Pod => attach::attach(ebpf, name, pins),
                Role::External(how) => {
                    accept_local_sources(name);
                    attach::attach_external(ebpf, name, pins, how)
                }
            };
            match attached {
                Ok(mode) => {
                    log::info!("attached to {name} (ifindex {index}, {mode:?})");
                    self.attached.insert(name.clone(), *index);
                }
                Err(e) => {
                    log::error!("{e}; will retry if the interface is recreated");
                    self.failed.insert(name.clone(), *index);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_globs_and_never_lo() {
        let p = "veth*, cali*,eth1".parse::<IfacePatterns>().expect("valid");
        assert!(p.matches("veth12ab"));
        assert!(p.matches("cali0"));
        assert!(p.matches("eth1"));
        assert!(!p.matches("eth0"));
        assert!(!"*".parse::<IfacePatterns>().expect("valid").matches("lo"));
        assert!("[".parse::<IfacePatterns>().is_err());
    }
}
