//! Where Services and EndpointSlices come from.
pub mod compact;
pub mod kube;
pub mod manifests;
