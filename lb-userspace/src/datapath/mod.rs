//! The datapath handle: loading the eBPF object, pins, attaching to interfaces and cgroups,
//! the pinned maps as the agent and the read commands use them, conntrack GC, sockets.
use std::path::PathBuf;

pub mod addr_filter;
pub mod attach;
pub mod bpffs;
pub mod clock;
pub mod gc;
pub mod id_arrays;
pub mod ifaces;
pub mod load;
pub mod maps;
pub mod migrate;
pub mod netlink;
pub mod pins;
pub mod route_policy;
pub mod route_watch;
pub mod skb_access;
pub mod sockets;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("jiffies and the coarse clock could not be put on one line: {0}")]
    Clock(#[from] clock::CalibrationError),
    #[error("preparing the eBPF object for this kernel's BTF: {0}")]
    SkbAccess(#[from] skb_access::BtfError),
    #[error("loading the eBPF object failed: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("filling map {name} of the loaded object: {message}")]
    Map { name: &'static str, message: String },
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
