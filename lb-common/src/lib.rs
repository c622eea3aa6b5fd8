//! Types that cross the kernel boundary: BPF map keys and values, outcome codes, limits.
//!
//! Every type is `#[repr(C)]`, `Copy`, has explicit padding and a compile-time size check, so
//! the eBPF programs and the agent agree on the layout byte for byte. Addresses and ports are
//! kept in network byte order (noted on each field) because that is how they sit in packets.
#![no_std]

mod maps;
mod sched;
mod stats;

pub use maps::*;
pub use sched::*;
pub use stats::*;
