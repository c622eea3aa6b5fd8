//! xlb: Kubernetes Services and EndpointSlices to eBPF maps.
//!
//! The path of a Service object: `source` (Kubernetes API or a manifests directory) →
//! `translate` (pure: objects to the desired frontends of `model`) → `sync` (writes the
//! difference into the pinned maps of `datapath`). `agent` runs that loop and keeps the
//! programs attached; `serve` answers metrics, `/healthz` and health-check node ports;
//! `report` builds the read commands' output from the pinned maps; `kube_proxy` removes the
//! rules kube-proxy leaves behind.

pub mod agent;
pub mod cli;
pub mod command;
pub mod datapath;
pub mod kube_proxy;
pub mod model;
pub mod report;
pub mod serve;
pub mod source;
pub mod sync;
pub mod translate;

/// The compiled eBPF object (all programs and map definitions).
pub fn ebpf_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"))
}
