//! xlb: Kubernetes Services and EndpointSlices to eBPF maps.
//!
//! Data flow: `source` (manifests) → `translate` (pure) → `sync` (diff into `maps`), with
//! `loader` and `ifaces` keeping the programs loaded, pinned and attached.

pub mod agent;
pub mod bpffs;
pub mod cli;
pub mod command;
pub mod conntrack_gc;
pub mod events;
pub mod explain;
pub mod healthcheck;
pub mod healthz;
pub mod http;
pub mod ifaces;
pub mod inspect;
pub mod kube_proxy_rules;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod prog_test_run;
pub mod sockets;
pub mod source;
pub mod sync;
pub mod translate;
pub mod wake;

/// The compiled eBPF object (all programs and map definitions).
pub fn ebpf_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"))
}
