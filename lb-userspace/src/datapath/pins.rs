//! Where the datapath lives in bpffs: map and link pin paths, the layout check that refuses
//! pins of another build, and removing every pin (`xlb cleanup`).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{maps::MapType, programs::links::PinnedLink};
use lb_common::{map_names, program_names};

use super::{DatapathError, error_chain};

/// Stands in for an interface name in the link pins of the socket hooks.
pub const CGROUP_PIN_NAME: &str = "cgroup";

/// Key size, value size, capacity and type of every map, as the eBPF object defines them.
const MAP_LAYOUTS: [(&str, usize, usize, u32, MapType); 35] = {
    use MapType::*;
    use lb_common::*;
    use std::mem::size_of;
    let counters = size_of::<TrafficCounter>();
    [
        (
            map_names::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            map_sizes::SERVICES,
            Hash,
        ),
        (
            map_names::BACKENDS,
            4,
            size_of::<Backend>(),
            map_sizes::BACKENDS,
            Array,
        ),
        (
            map_names::CONNTRACK,
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            map_sizes::CONNTRACK,
            LruHash,
        ),
        (
            map_names::AFFINITY,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            map_sizes::AFFINITY,
            LruHash,
        ),
        (map_names::STATS, 4, 8, outcome::COUNT, PerCpuArray),
        (
            map_names::SERVICE_STATS,
            4,
            counters,
            map_sizes::SERVICE_STATS,
            PerCpuArray,
        ),
        (
            map_names::BACKEND_STATS,
            4,
            counters,
            map_sizes::BACKEND_STATS,
            PerCpuArray,
        ),
        (
            map_names::ROUND_ROBIN,
            4,
            8,
            map_sizes::ROUND_ROBIN,
            LruHash,
        ),
        (map_names::CONNECTIONS, 4, 8, map_sizes::CONNECTIONS, Array),
        // Map-in-map: the value is an inner map's id.
        (map_names::MAGLEV, 4, 4, map_sizes::MAGLEV, HashOfMaps),
        (map_names::NODE_IPS, 4, 4, map_sizes::NODE_IPS, Hash),
        (map_names::CONFIG, 4, size_of::<NodeConfig>(), 1, Array),
        (map_names::HOST_NETNS, 4, 8, 1, Array),
        (map_names::CT_TIMEOUTS, 4, size_of::<CtTimeouts>(), 1, Array),
        (
            map_names::SERVICE_NAMES,
            4,
            size_of::<ServiceName>(),
            map_sizes::SERVICE_STATS,
            Hash,
        ),
        // LPM trie keys carry a 4-byte prefix length before the data.
        (
            map_names::SOURCE_RANGES,
            4 + size_of::<SourceRangeKey>(),
            1,
            map_sizes::SOURCE_RANGES,
            LpmTrie,
        ),
        (
            map_names::SOCK_REVNAT,
            size_of::<SockKey>(),
            size_of::<SockFrontend>(),
            map_sizes::SOCK_REVNAT,
            LruHash,
        ),
        (map_names::POD_IFACES, 4, 4, map_sizes::POD_IFACES, Hash),
        (
            map_names::SERVICES6,
            size_of::<ServiceKey<Ip6>>(),
            size_of::<ServiceValue>(),
            map_sizes::SERVICES,
            Hash,
        ),
        (
            map_names::BACKENDS6,
            4,
            size_of::<Backend<Ip6>>(),
            map_sizes::BACKENDS,
            Array,
        ),
        (
            map_names::CONNTRACK6,
            size_of::<CtKey<Ip6>>(),
            size_of::<CtValue<Ip6>>(),
            map_sizes::CONNTRACK,
            LruHash,
        ),
        (
            map_names::AFFINITY6,
            size_of::<AffinityKey<Ip6>>(),
            size_of::<AffinityValue>(),
            map_sizes::AFFINITY,
            LruHash,
        ),
        (map_names::NODE_IPS6, 16, 4, map_sizes::NODE_IPS, Hash),
        (
            map_names::CONFIG6,
            4,
            size_of::<NodeConfig<Ip6>>(),
            1,
            Array,
        ),
        (
            map_names::SOURCE_RANGES6,
            4 + size_of::<SourceRangeKey<Ip6>>(),
            1,
            map_sizes::SOURCE_RANGES,
            LpmTrie,
        ),
        (
            map_names::SOCK_REVNAT6,
            size_of::<SockKey6>(),
            size_of::<SockFrontend<Ip6>>(),
            map_sizes::SOCK_REVNAT,
            LruHash,
        ),
        (map_names::PROGS6, 4, 4, 4, ProgramArray),
        (map_names::PROGS6_XDP, 4, 4, 2, ProgramArray),
        (map_names::STATS6, 4, 8, outcome::COUNT, PerCpuArray),
        (map_names::ADDR_FILTER, 4, 8, addr_filter::ENTRIES, Array),
        (map_names::ROUTE_GEN, 4, 8, 1, Array),
        (map_names::REPLY_FILTER, 4, 8, addr_filter::ENTRIES, Array),
        (
            map_names::REPLY_CLAIMS,
            4,
            size_of::<ReplyClaim>(),
            map_sizes::REPLY_CLAIMS,
            Array,
        ),
        (
            map_names::REPLY_CLAIMS6,
            4,
            size_of::<ReplyClaim<Ip6>>(),
            map_sizes::REPLY_CLAIMS,
            Array,
        ),
        (
            map_names::FLOW_CLAIMS,
            4,
            size_of::<ReplyClaim>(),
            map_sizes::FLOW_CLAIMS,
            Array,
        ),
    ]
};

// Every pinned map has its layout checked.
const _: () = assert!(MAP_LAYOUTS.len() == map_names::ALL.len());

/// Refuses to reuse pinned maps whose layout differs from ours: aya would hand them to the
/// programs unchecked, and the datapath would read garbage (or, for a smaller array, lose
/// counters without a word).
pub fn check_pinned_layouts(pins: &PinLayout) -> Result<(), DatapathError> {
    for (name, key, value, capacity, map_type) in MAP_LAYOUTS {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|e| DatapathError::PinnedMap {
                path: path.clone(),
                message: error_chain(&e),
            })?;
        let describe = |key, value, capacity, map_type: Result<MapType, _>| {
            let map_type =
                map_type.map_or_else(|_| "unknown type".to_string(), |t| format!("{t:?}"));
            format!("{map_type}, key {key} B, value {value} B, {capacity} entries")
        };
        let found = describe(
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_type(),
        );
        let expected = describe(key as u32, value as u32, capacity, Ok(map_type));
        if found != expected {
            return Err(DatapathError::IncompatiblePin {
                path,
                root: pins.root.display().to_string(),
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// Where the agent pins things under `--bpffs`.
#[derive(Debug, Clone)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    /// `<hook>@<iface>`. bpffs refuses names containing '.', which interface names may have
    /// (VLANs: `eth0.100`); ':' can never appear in one, so it stands in for '.'.
    pub fn link(&self, iface: &str, hook: Hook) -> PathBuf {
        self.links_dir()
            .join(format!("{}@{}", hook.suffix(), iface.replace('.', ":")))
    }
}

/// Where programs attach: the two TC hooks on a pod interface's host side, XDP on an
/// external interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    FromPod,
    ToPod,
    External,
    SockConnect,
    SockSendmsg,
    SockRecvmsg,
    SockGetpeername,
    SockConnect6,
    SockSendmsg6,
    SockRecvmsg6,
    SockGetpeername6,
}

impl Hook {
    /// The hooks of a pod interface.
    pub const POD: [Hook; 2] = [Hook::FromPod, Hook::ToPod];
    /// The hooks of an external interface.
    pub const EXTERNAL: [Hook; 1] = [Hook::External];
    /// The socket hooks on the node processes' cgroup (IPv4, then IPv6).
    pub const CGROUP: [Hook; 8] = [
        Hook::SockConnect,
        Hook::SockSendmsg,
        Hook::SockRecvmsg,
        Hook::SockGetpeername,
        Hook::SockConnect6,
        Hook::SockSendmsg6,
        Hook::SockRecvmsg6,
        Hook::SockGetpeername6,
    ];
    pub(super) fn program(self) -> &'static str {
        match self {
            Hook::FromPod => program_names::TC_FROM_POD,
            Hook::ToPod => program_names::TC_TO_POD,
            Hook::External => program_names::XDP_EXTERNAL,
            Hook::SockConnect => program_names::SOCK_CONNECT,
            Hook::SockSendmsg => program_names::SOCK_SENDMSG,
            Hook::SockRecvmsg => program_names::SOCK_RECVMSG,
            Hook::SockGetpeername => program_names::SOCK_GETPEERNAME,
            Hook::SockConnect6 => program_names::SOCK_CONNECT6,
            Hook::SockSendmsg6 => program_names::SOCK_SENDMSG6,
            Hook::SockRecvmsg6 => program_names::SOCK_RECVMSG6,
            Hook::SockGetpeername6 => program_names::SOCK_GETPEERNAME6,
        }
    }
    pub(super) fn attach_type(self) -> aya::programs::TcAttachType {
        match self {
            Hook::ToPod => aya::programs::TcAttachType::Egress,
            _ => aya::programs::TcAttachType::Ingress,
        }
    }
    pub(super) fn suffix(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
            Hook::External => "xdp",
            Hook::SockConnect => "sock_connect",
            Hook::SockSendmsg => "sock_sendmsg",
            Hook::SockRecvmsg => "sock_recvmsg",
            Hook::SockGetpeername => "sock_getpeername",
            Hook::SockConnect6 => "sock_connect6",
            Hook::SockSendmsg6 => "sock_sendmsg6",
            Hook::SockRecvmsg6 => "sock_recvmsg6",
            Hook::SockGetpeername6 => "sock_getpeername6",
        }
    }
}

/// Detaches a pinned link (if any) by unpinning it and closing the last reference. A pin
/// that aya cannot open as a link (e.g. its interface is gone) is unlinked from bpffs.
pub fn remove_pinned_link(path: &Path) {
    match PinnedLink::from_pin(path) {
        Ok(pinned) => match pinned.unpin() {
            Ok(link) => drop(link),
            Err(e) => log::warn!("unpinning {}: {e}", path.display()),
        },
        Err(e) => log::debug!(
            "opening pinned link {}: {}",
            path.display(),
            error_chain(&e)
        ),
    }
    if path.exists()
        && let Err(e) = std::fs::remove_file(path)
    {
        log::warn!("removing {}: {e}", path.display());
    }
}

/// Detaches `hooks` from `iface` (used when the interface disappears or no longer matches).
pub fn detach(iface: &str, pins: &PinLayout, hooks: &[Hook]) {
    for hook in hooks {
        remove_pinned_link(&pins.link(iface, *hook));
    }
}

/// Interfaces with pinned links of `hooks`, by name (from the pin file names).
pub fn pinned_ifaces_of(pins: &PinLayout, hooks: &[Hook]) -> BTreeMap<String, Vec<PathBuf>> {
    let mut found = pinned_ifaces(pins);
    for paths in found.values_mut() {
        paths.retain(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            hooks
                .iter()
                .any(|h| name.starts_with(&format!("{}@", h.suffix())))
        });
    }
    found.retain(|_, paths| !paths.is_empty());
    found
}

/// Interfaces with pinned links, by name (from the pin file names, see [`PinLayout::link`]).
pub fn pinned_ifaces(pins: &PinLayout) -> BTreeMap<String, Vec<PathBuf>> {
    let mut found: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(pins.links_dir()) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some((_, iface)) = name.split_once('@') {
            found
                .entry(iface.replace(':', "."))
                .or_default()
                .push(entry.path());
        }
    }
    found
}

/// Removes every pin xlb made under `pins.root` (links first, so programs detach), then the
/// directories. Returns what it removed.
pub fn cleanup(pins: &PinLayout) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for paths in pinned_ifaces(pins).into_values() {
        for path in paths {
            remove_pinned_link(&path);
            removed.push(path);
        }
    }
    let maps = map_names::ALL.map(|name| pins.map(name));
    for path in maps.into_iter().chain(super::migrate::aside_pins(pins)) {
        if std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    for dir in [pins.links_dir(), pins.maps_dir(), pins.root.clone()] {
        let _ = std::fs::remove_dir(&dir);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_avoid_dots_and_round_trip() {
        let dir = std::env::temp_dir().join(format!("xlb-pins-{}", std::process::id()));
        let layout = PinLayout::new(&dir);
        let path = layout.link("eth0.100", Hook::FromPod);
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(!name.contains('.'), "{name}");
        std::fs::create_dir_all(layout.links_dir()).expect("dir");
        std::fs::write(&path, "").expect("file");
        std::fs::write(layout.link("veth1", Hook::ToPod), "").expect("file");
        let found: Vec<String> = pinned_ifaces(&layout).into_keys().collect();
        assert_eq!(found, ["eth0.100", "veth1"]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
