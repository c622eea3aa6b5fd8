//! Test support for xlb: packet builders and checksum verification for the datapath tests,
//! network-namespace topologies with cleanup guards for the end-to-end tests and the demo.

pub mod cluster;
pub mod lan;
pub mod manifests;
pub mod netns;
pub mod packet;
pub mod privilege;
pub mod topology;
pub mod workload;
