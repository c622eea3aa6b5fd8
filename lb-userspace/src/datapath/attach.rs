//! Attaching programs: TC (tcx, clsact fallback) on pod interfaces, XDP on external
//! interfaces, the socket hooks on a cgroup; every link pinned so it outlives the agent.
use std::path::Path;

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, LinkOrder, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions},
        xdp::XdpLink,
    },
};
use lb_common::{map_names, program_names};

use super::{
    DatapathError, error_chain,
    load::{program, sock_program, xdp_program},
    pins::{CGROUP_PIN_NAME, Hook, PinLayout, remove_pinned_link},
};

fn ensure_links_dir(pins: &PinLayout) -> Result<(), DatapathError> {
    std::fs::create_dir_all(pins.links_dir()).map_err(|e| DatapathError::Pin {
        path: pins.links_dir(),
        message: e.to_string(),
    })
}

/// Pins `link` at `path`; a link an earlier agent pinned there is detached only now, after
/// the new one is attached, so the hook is never empty.
fn pin_link<L>(link: L, path: &Path) -> Result<(), DatapathError>
where
    L: TryInto<FdLink>,
    L::Error: std::fmt::Display,
{
    let fd_link: FdLink = link.try_into().map_err(|e| DatapathError::Pin {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    remove_pinned_link(path);
    fd_link.pin(path).map(drop).map_err(|e| DatapathError::Pin {
        path: path.to_path_buf(),
        message: error_chain(&e),
    })
}

/// Attaches the socket hooks to the cgroup at `path` (node processes in it reach services
/// through them). Links of an earlier agent are replaced only once the new ones are in
/// place; both translate alike, so no connect() goes untranslated meanwhile.
pub fn attach_cgroup(ebpf: &mut Ebpf, path: &Path, pins: &PinLayout) -> Result<(), DatapathError> {
    ensure_links_dir(pins)?;
    let cgroup = std::fs::File::open(path).map_err(|e| DatapathError::Pin {
        path: path.to_path_buf(),
        message: format!("opening the cgroup: {e}"),
    })?;
    for hook in Hook::CGROUP {
        let prog = sock_program(ebpf, hook.program())?;
        let attach_err = |source| DatapathError::Attach {
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
) -> Result<AttachMode, DatapathError> {
    ensure_links_dir(pins)?;
    let path = pins.link(iface, Hook::External);
    let prog = xdp_program(ebpf)?;
    let attach_err = |source| DatapathError::Attach {
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
pub fn attach(ebpf: &mut Ebpf, iface: &str, pins: &PinLayout) -> Result<AttachMode, DatapathError> {
    ensure_links_dir(pins)?;
    let mut mode = AttachMode::Tcx;
    for hook in Hook::POD {
        let prog = program(ebpf, hook.program())?;
        let attach_err = |source| DatapathError::Attach {
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
    let ifindex = nix::net::if_::if_nametoindex(iface).unwrap_or(0);
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

/// Records (or, with `pod` false, forgets) `ifindex` as the host end of a pod interface:
/// the datapath forwards translated packets into those with `bpf_redirect_peer`.
pub fn mark_pod_iface(
    ebpf: &mut Ebpf,
    iface: &str,
    ifindex: u32,
    pod: bool,
) -> Result<(), DatapathError> {
    let fail = |message: String| DatapathError::PodIface {
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
