//! Pod interfaces: which exist in this network namespace, which match `--pod-ifaces`, and
//! keeping the TC programs attached to exactly those as interfaces come and go.
use std::{collections::BTreeMap, ffi::CStr};

use aya::Ebpf;

use crate::loader::{self, Hook, PinLayout, XdpAttach};

/// Interfaces of the current network namespace (via `if_nameindex`, which asks the kernel
/// through a socket, so it is right even when /sys belongs to another namespace).
pub fn list() -> BTreeMap<String, u32> {
    let mut found = BTreeMap::new();
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return found;
        }
        let mut cursor = head;
        while (*cursor).if_index != 0 && !(*cursor).if_name.is_null() {
            let name = CStr::from_ptr((*cursor).if_name)
                .to_string_lossy()
                .into_owned();
            found.insert(name, (*cursor).if_index);
            cursor = cursor.add(1);
        }
        libc::if_freenameindex(head);
    }
    found
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

/// IPv4 addresses of the interfaces matching `patterns`, in interface-name order; with no
/// patterns, of every interface but loopback (kube-proxy's default NodePort addresses).
pub fn ipv4_addresses(patterns: &IfacePatterns) -> Vec<std::net::Ipv4Addr> {
    let wanted = |name: &str| {
        if patterns.is_empty() {
            name != "lo"
        } else {
            patterns.matches(name)
        }
    };
    let mut found: Vec<(String, std::net::Ipv4Addr)> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free below.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return Vec::new();
        }
        let mut cursor = head;
        while !cursor.is_null() {
            let entry = &*cursor;
            cursor = entry.ifa_next;
            if entry.ifa_addr.is_null() || i32::from((*entry.ifa_addr).sa_family) != libc::AF_INET {
                continue;
            }
            let name = CStr::from_ptr(entry.ifa_name)
                .to_string_lossy()
                .into_owned();
            if !wanted(&name) {
                continue;
            }
            let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
            found.push((
                name,
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            ));
        }
        libc::freeifaddrs(head);
    }
    found.sort();
    found.into_iter().map(|(_, addr)| addr).collect()
}

/// Comma-separated globs, e.g. `veth*,cali*`.
#[derive(Debug, Clone)]
pub struct IfacePatterns(Vec<glob::Pattern>);

impl IfacePatterns {
    pub fn parse(list: &str) -> Result<Self, glob::PatternError> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(glob::Pattern::new)
            .collect::<Result<Vec<_>, _>>()
            .map(IfacePatterns)
    }

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
        if let Err(e) = loader::mark_pod_iface(ebpf, name, index, false) {
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
            loader::detach(&name, pins, hooks);
            if let Some(index) = self.attached.remove(&name) {
                self.forget_pod_iface(ebpf, &name, index);
            }
            log::info!("detached from {name} (interface gone)");
        }
        if !self.swept_stale_pins {
            for name in loader::pinned_ifaces_of(pins, hooks).into_keys() {
                if !present.contains_key(&name) {
                    loader::detach(&name, pins, hooks);
                    log::info!("removed stale pinned links of {name}");
                }
            }
            // An ifindex left by an earlier agent may now name another device, into which
            // bpf_redirect_peer would drop: keep only interfaces that match now (re-marked
            // when attached below).
            let current: Vec<u32> = present.values().copied().collect();
            for index in loader::marked_pod_ifaces(ebpf) {
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
                Role::Pod => loader::attach(ebpf, name, pins),
                Role::External(how) => {
                    accept_local_sources(name);
                    loader::attach_external(ebpf, name, pins, how)
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
        let p = IfacePatterns::parse("veth*, cali*,eth1").expect("valid");
        assert!(p.matches("veth12ab"));
        assert!(p.matches("cali0"));
        assert!(p.matches("eth1"));
        assert!(!p.matches("eth0"));
        assert!(!IfacePatterns::parse("*").expect("valid").matches("lo"));
        assert!(IfacePatterns::parse("[").is_err());
    }
}
