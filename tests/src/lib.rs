//! Test support for xlb: the datapath harness (feature `datapath`) with packet builders and
//! checksum verification for the datapath tests and the bench, network-namespace topologies
//! with cleanup guards for the end-to-end tests and the demo.

pub mod cgroups;
pub mod cluster;
#[cfg(feature = "datapath")]
pub mod datapath;
#[cfg(feature = "datapath")]
pub mod fuzz;
pub mod lan;
pub mod manifests;
pub mod netns;
pub mod packet;
pub mod packet6;
pub mod privilege;
#[cfg(feature = "datapath")]
pub mod race;
pub mod topology;
pub mod workload;
pub mod workspace;
