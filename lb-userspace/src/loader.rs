//! Loading the eBPF object, pinning its maps, attaching the TC programs to pod interfaces.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapType,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions},
        xdp::XdpLink,
    },
};
use lb_common::{map_names, program_names};

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("loading the eBPF object failed: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("attaching {program} to {iface} ({direction}) failed: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        direction: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinning link {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error(
        "pinned map {path} is {found} but this xlb expects {expected} \
         (left by another xlb version?): stop that agent and run `xlb cleanup --bpffs {root}` \
         (this drops established-flow state) before starting this one"
    )]
    IncompatiblePin {
        path: PathBuf,
        root: String,
        found: String,
        expected: String,
    },
    #[error("reading pinned map {path}: {message}")]
    PinnedMap { path: PathBuf, message: String },
    #[error("recording {iface} (ifindex {ifindex}) in map {map}: {message}")]
    PodIface {
        iface: String,
        ifindex: u32,
        map: &'static str,
        message: String,
    },
}

/// Stands in for an interface name in the link pins of the socket hooks.
pub const CGROUP_PIN_NAME: &str = "cgroup";

/// Key size, value size, capacity and type of every map, as the eBPF object defines them.
const MAP_LAYOUTS: [(&str, usize, usize, u32, MapType); 15] = {
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
            Hash,
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
        (
            map_names::CONNECTIONS,
            4,
            8,
            map_sizes::CONNECTIONS,
            LruHash,
        ),
        // Map-in-map: the value is an inner map's id.
        (map_names::MAGLEV, 4, 4, map_sizes::MAGLEV, HashOfMaps),
        (map_names::NODE_IPS, 4, 4, map_sizes::NODE_IPS, Hash),
        (map_names::CONFIG, 4, size_of::<NodeConfig>(), 1, Array),
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
    ]
};

/// Refuses to reuse pinned maps whose layout differs from ours: aya would hand them to the
/// programs unchecked, and the datapath would read garbage (or, for a smaller array, lose
/// counters without a word).
pub fn check_pinned_layouts(pins: &PinLayout) -> Result<(), LoaderError> {
    for (name, key, value, capacity, map_type) in MAP_LAYOUTS {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|e| LoaderError::PinnedMap {
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
            return Err(LoaderError::IncompatiblePin {
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
}

impl Hook {
    /// The hooks of a pod interface.
    pub const POD: [Hook; 2] = [Hook::FromPod, Hook::ToPod];
    /// The hooks of an external interface.
    pub const EXTERNAL: [Hook; 1] = [Hook::External];
    /// The socket hooks on the node processes' cgroup.
    pub const CGROUP: [Hook; 4] = [
        Hook::SockConnect,
        Hook::SockSendmsg,
        Hook::SockRecvmsg,
        Hook::SockGetpeername,
    ];
    fn program(self) -> &'static str {
        match self {
            Hook::FromPod => program_names::TC_FROM_POD,
            Hook::ToPod => program_names::TC_TO_POD,
            Hook::External => program_names::XDP_EXTERNAL,
            Hook::SockConnect => program_names::SOCK_CONNECT,
            Hook::SockSendmsg => program_names::SOCK_SENDMSG,
            Hook::SockRecvmsg => program_names::SOCK_RECVMSG,
            Hook::SockGetpeername => program_names::SOCK_GETPEERNAME,
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::ToPod => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
            Hook::External => "xdp",
            Hook::SockConnect => "sock_connect",
            Hook::SockSendmsg => "sock_sendmsg",
            Hook::SockRecvmsg => "sock_recvmsg",
            Hook::SockGetpeername => "sock_getpeername",
        }
    }
}

/// Loads the object and its programs. With `pins`, every map is pinned there (or the existing
/// pin reused, so conntrack and services survive an agent restart); without, maps are private.
pub fn load(pins: Option<&PinLayout>) -> Result<Ebpf, LoaderError> {
    if let Some(layout) = pins {
        check_pinned_layouts(layout)?;
    }
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = match pins {
        Some(layout) => map_names::ALL
            .iter()
            .map(|name| (*name, layout.map(name)))
            .collect(),
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(crate::ebpf_object())
        .map_err(|e| LoaderError::Load(Box::new(e)))?;
    for hook in Hook::POD {
        program(&mut ebpf, hook.program())?
            .load()
            .map_err(|source| LoaderError::Program {
                name: hook.program(),
                source: Box::new(source),
            })?;
    }
    xdp_program(&mut ebpf)?
        .load()
        .map_err(|source| LoaderError::Program {
            name: program_names::XDP_EXTERNAL,
            source: Box::new(source),
        })?;
    for hook in Hook::CGROUP {
        sock_program(&mut ebpf, hook.program())?
            .load()
            .map_err(|source| LoaderError::Program {
                name: hook.program(),
                source: Box::new(source),
            })?;
    }
    Ok(ebpf)
}

/// A loaded cgroup sock_addr program by name.
pub fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, LoaderError> {
    typed_program(ebpf, name)
}

/// A program of the object by name, as its type.
fn typed_program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoaderError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoaderError::Program {
            name,
            source: Box::new(source),
        })
}

fn ensure_links_dir(pins: &PinLayout) -> Result<(), LoaderError> {
    std::fs::create_dir_all(pins.links_dir()).map_err(|e| LoaderError::Pin {
        path: pins.links_dir(),
        message: e.to_string(),
    })
}

/// Pins `link` at `path`; a link an earlier agent pinned there is detached only now, after
/// the new one is attached, so the hook is never empty.
fn pin_link<L>(link: L, path: &Path) -> Result<(), LoaderError>
where
    L: TryInto<FdLink>,
    L::Error: std::fmt::Display,
{
    let fd_link: FdLink = link.try_into().map_err(|e| LoaderError::Pin {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    remove_pinned_link(path);
    fd_link.pin(path).map(drop).map_err(|e| LoaderError::Pin {
        path: path.to_path_buf(),
        message: error_chain(&e),
    })
}

/// Attaches the socket hooks to the cgroup at `path` (node processes in it reach services
/// through them). Links of an earlier agent are replaced only once the new ones are in
/// place; both translate alike, so no connect() goes untranslated meanwhile.
pub fn attach_cgroup(ebpf: &mut Ebpf, path: &Path, pins: &PinLayout) -> Result<(), LoaderError> {
    ensure_links_dir(pins)?;
    let cgroup = std::fs::File::open(path).map_err(|e| LoaderError::Pin {
        path: path.to_path_buf(),
        message: format!("opening the cgroup: {e}"),
    })?;
    for hook in Hook::CGROUP {
        let prog = sock_program(ebpf, hook.program())?;
        let attach_err = |source| LoaderError::Attach {
            program: hook.program(),
            iface: path.display().to_string(),
            direction: hook.suffix(),
            source: Box::new(source),
        };
        let id = prog
            // Single: bpf_link attachments always coexist with other programs (the
            // ALLOW_MULTI flag is for the legacy attach and makes link_create fail).
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        pin_link(link, &pins.link(CGROUP_PIN_NAME, hook))?;
    }
    Ok(())
}

/// A loaded TC program by name.
pub fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoaderError> {
    typed_program(ebpf, name)
}

/// The loaded XDP program.
pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoaderError> {
    typed_program(ebpf, program_names::XDP_EXTERNAL)
}

/// How the XDP program runs on external interfaces (`--xdp-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// Native (in the driver) where the driver supports it, generic otherwise.
    Auto,
    /// Native only: fail on drivers without XDP support.
    Native,
    /// Generic (after the driver builds the skb): works on every device, slower.
    Generic,
}

/// Attaches the XDP program to external interface `iface`. A link pinned by an earlier agent
/// is updated in place (no moment without a program); otherwise as `how` says.
pub fn attach_external(
    ebpf: &mut Ebpf,
    iface: &str,
    pins: &PinLayout,
    how: XdpAttach,
) -> Result<AttachMode, LoaderError> {
    ensure_links_dir(pins)?;
    let path = pins.link(iface, Hook::External);
    let prog = xdp_program(ebpf)?;
    let attach_err = |source| LoaderError::Attach {
        program: program_names::XDP_EXTERNAL,
        iface: iface.to_string(),
        direction: "xdp",
        source: Box::new(source),
    };
    let mut mode = AttachMode::XdpNative;
    let existing = PinnedLink::from_pin(&path)
        .ok()
        .and_then(|pinned| pinned.unpin().ok())
        .and_then(|link| XdpLink::try_from(link).ok());
    let id = match existing {
        Some(link) => {
            mode = AttachMode::XdpUpdated;
            prog.attach_to_link(link).map_err(attach_err)?
        }
        None if how == XdpAttach::Generic => {
            mode = AttachMode::XdpGeneric;
            prog.attach(iface, XdpMode::Skb).map_err(attach_err)?
        }
        None if how == XdpAttach::Native => {
            prog.attach(iface, XdpMode::Driver).map_err(attach_err)?
        }
        None => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => id,
            Err(native) => {
                log::warn!(
                    "native XDP on {iface} failed ({}); using generic XDP (slower)",
                    error_chain(&native)
                );
                mode = AttachMode::XdpGeneric;
                prog.attach(iface, XdpMode::Skb).map_err(attach_err)?
            }
        },
    };
    let link = prog.take_link(id).map_err(attach_err)?;
    pin_link(link, &path)?;
    Ok(mode)
}

/// Attaches both hooks to `iface`, replacing pinned links of an earlier agent only after the
/// new ones are in place, so there is no moment without a program.
pub fn attach(ebpf: &mut Ebpf, iface: &str, pins: &PinLayout) -> Result<AttachMode, LoaderError> {
    ensure_links_dir(pins)?;
    let mut mode = AttachMode::Tcx;
    for hook in Hook::POD {
        let prog = program(ebpf, hook.program())?;
        let attach_err = |source| LoaderError::Attach {
            program: hook.program(),
            iface: iface.to_string(),
            direction: hook.suffix(),
            source: Box::new(source),
        };
        // New programs go first so that during an upgrade they, not the old ones, decide.
        let tcx = prog.attach_with_options(
            iface,
            hook.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        );
        let link_id = match tcx {
            Ok(id) => id,
            Err(tcx_err) => {
                // Kernels before 6.6 have no tcx: fall back to a clsact qdisc filter, which
                // lives on without a pin (replaced in place by the next agent).
                log::debug!("tcx attach to {iface} failed ({tcx_err}), trying clsact");
                let _ = tc::qdisc_add_clsact(iface);
                mode = AttachMode::Clsact;
                let id = prog
                    .attach_with_options(
                        iface,
                        hook.attach_type(),
                        TcAttachOptions::Netlink(NlOptions::default()),
                    )
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                std::mem::forget(link); // keep the filter after we exit
                continue;
            }
        };
        let link = prog.take_link(link_id).map_err(attach_err)?;
        pin_link(link, &pins.link(iface, hook))?;
    }
    let c_name = std::ffi::CString::new(iface).unwrap_or_default();
    // SAFETY: a NUL-terminated name; the call only reads it.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    mark_pod_iface(ebpf, iface, ifindex, true)?;
    Ok(mode)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    Tcx,
    Clsact,
    XdpNative,
    XdpGeneric,
    /// An earlier agent's pinned XDP link now runs this program.
    XdpUpdated,
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

/// Records (or, with `pod` false, forgets) `ifindex` as the host end of a pod interface:
/// the datapath forwards translated packets into those with `bpf_redirect_peer`.
pub fn mark_pod_iface(
    ebpf: &mut Ebpf,
    iface: &str,
    ifindex: u32,
    pod: bool,
) -> Result<(), LoaderError> {
    let fail = |message: String| LoaderError::PodIface {
        iface: iface.to_string(),
        ifindex,
        map: map_names::POD_IFACES,
        message,
    };
    let map = ebpf
        .map_mut(map_names::POD_IFACES)
        .ok_or_else(|| fail("map missing from the eBPF object".into()))?;
    let mut map: aya::maps::HashMap<_, u32, u32> =
        aya::maps::HashMap::try_from(map).map_err(|e| fail(e.to_string()))?;
    let done = if pod {
        map.insert(ifindex, 1, 0)
    } else {
        match map.remove(&ifindex) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    };
    done.map_err(|e| fail(e.to_string()))
}

/// Every ifindex recorded by [`mark_pod_iface`] (by this agent or an earlier one).
pub fn marked_pod_ifaces(ebpf: &Ebpf) -> Vec<u32> {
    ebpf.map(map_names::POD_IFACES)
        .and_then(|m| aya::maps::HashMap::<_, u32, u32>::try_from(m).ok())
        .map(|m| m.keys().filter_map(Result::ok).collect())
        .unwrap_or_default()
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
    for name in map_names::ALL {
        let path = pins.map(name);
        if std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    for dir in [pins.links_dir(), pins.maps_dir(), pins.root.clone()] {
        let _ = std::fs::remove_dir(&dir);
    }
    removed
}

/// An error and its sources, `a: b: c` (aya's syscall errors keep errno in the source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
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
