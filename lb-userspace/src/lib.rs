//! xlb: Kubernetes Services and EndpointSlices to eBPF maps.

pub mod bpffs;
pub mod loader;
pub mod prog_test_run;

/// The compiled eBPF object (all programs and map definitions).
pub fn ebpf_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"))
}
