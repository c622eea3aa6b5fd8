//! What the agent serves over HTTP: Prometheus metrics, `/healthz`, health-check node ports.
pub mod healthcheck;
pub mod healthz;
pub mod http;
pub mod metrics;
