//! Replacing kube-proxy: its configuration file as xlb's input, and its leftover rules.
pub mod config;
pub mod rules;

pub use rules::cleanup;
