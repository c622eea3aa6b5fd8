//! Prometheus metrics of the agent (`--metrics-addr`): what is programmed, how syncs go,
//! and the datapath's counters read from the pinned maps at scrape time.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicBool},
};

use crate::{
    datapath::{maps::PinnedMaps, pins::PinLayout},
    report::inspect::{self, ServiceRow, StatsReport},
    serve::http::{self, Response},
};

/// Upper bounds of the sync duration histogram, in seconds.
const SYNC_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// What the agent loop reports about itself.
#[derive(Debug, Default, Clone)]
pub struct AgentMetrics {
    /// Frontend ("IP:PORT/PROTO") → Service port ("namespace/name:port").
    pub service_names: BTreeMap<String, String>,
    pub frontends: usize,
    pub backends: usize,
    pub syncs: u64,
    pub sync_errors: u64,
    /// Cumulative counts per bucket of `SYNC_BUCKETS`, plus the sum of durations.
    pub sync_buckets: [u64; SYNC_BUCKETS.len()],
    pub sync_seconds_sum: f64,
    /// For /healthz.
    pub health: crate::serve::healthz::Health,
    /// Seconds from noticing a change in the source to the datapath programmed, last sync.
    pub last_change_to_programmed_s: f64,
}

impl AgentMetrics {
    pub fn observe_sync(&mut self, seconds: f64) {
        self.syncs += 1;
        self.sync_seconds_sum += seconds;
        for (bucket, bound) in self.sync_buckets.iter_mut().zip(SYNC_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }
}

pub type SharedMetrics = Arc<Mutex<AgentMetrics>>;

/// A metric family read from each row: name, help, value.
type Family<R> = (&'static str, &'static str, fn(&R) -> u64);
/// The same with its Prometheus type.
type KindedFamily<R> = (&'static str, &'static str, &'static str, fn(&R) -> u64);

/// Escapes a label value (Prometheus text format).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The exposition text from the agent's own numbers and a read of the maps.
pub fn render(agent: &AgentMetrics, services: &[ServiceRow], stats: &StatsReport) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "xlb_frontends_programmed",
        "gauge",
        "Frontends (VIP:port/protocol) in the datapath.",
    );
    let _ = writeln!(out, "xlb_frontends_programmed {}", agent.frontends);
    header(
        &mut out,
        "xlb_backends_programmed",
        "gauge",
        "Backends of all frontends in the datapath.",
    );
    let _ = writeln!(out, "xlb_backends_programmed {}", agent.backends);
    header(
        &mut out,
        "xlb_sync_errors_total",
        "counter",
        "Syncs that failed and were retried.",
    );
    let _ = writeln!(out, "xlb_sync_errors_total {}", agent.sync_errors);
    header(
        &mut out,
        "xlb_sync_duration_seconds",
        "histogram",
        "Time to bring the maps to the desired state.",
    );
    for (bound, count) in SYNC_BUCKETS.iter().zip(agent.sync_buckets) {
        let _ = writeln!(
            out,
            "xlb_sync_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "xlb_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        agent.syncs
    );
    let _ = writeln!(
        out,
        "xlb_sync_duration_seconds_sum {}",
        agent.sync_seconds_sum
    );
    let _ = writeln!(out, "xlb_sync_duration_seconds_count {}", agent.syncs);
    header(
        &mut out,
        "xlb_change_to_programmed_seconds",
        "gauge",
        "From noticing the last object change to the datapath programmed.",
    );
    let _ = writeln!(
        out,
        "xlb_change_to_programmed_seconds {}",
        agent.last_change_to_programmed_s
    );

    header(
        &mut out,
        "xlb_packets_total",
        "counter",
        "Packets seen by the datapath, by outcome (drops and passes included).",
    );
    for (outcome, count) in &stats.outcomes {
        let _ = writeln!(out, "xlb_packets_total{{outcome=\"{outcome}\"}} {count}");
    }
    header(
        &mut out,
        "xlb_map_entries",
        "gauge",
        "Entries in each BPF map.",
    );
    for m in &stats.maps {
        let _ = writeln!(out, "xlb_map_entries{{map=\"{}\"}} {}", m.name, m.entries);
    }
    header(
        &mut out,
        "xlb_map_capacity",
        "gauge",
        "Capacity of each BPF map.",
    );
    for m in &stats.maps {
        let _ = writeln!(out, "xlb_map_capacity{{map=\"{}\"}} {}", m.name, m.capacity);
    }

    let frontend_labels = |row: &ServiceRow| {
        let frontend = row.frontend.to_string();
        let service = agent
            .service_names
            .get(&frontend)
            .map(String::as_str)
            .unwrap_or("");
        format!(
            "frontend=\"{}\",service=\"{}\"",
            label(&frontend),
            label(service)
        )
    };
    header(
        &mut out,
        "xlb_frontend_info",
        "gauge",
        "One per frontend, with its Service and algorithm.",
    );
    for row in services {
        let _ = writeln!(
            out,
            "xlb_frontend_info{{{},scheduler=\"{}\"}} 1",
            frontend_labels(row),
            label(&row.scheduler)
        );
    }
    let per_frontend: [Family<ServiceRow>; 3] = [
        (
            "xlb_frontend_new_flows_total",
            "New flows balanced by a frontend.",
            |r| r.flows,
        ),
        (
            "xlb_frontend_packets_total",
            "Packets to a frontend (forward direction).",
            |r| r.packets,
        ),
        (
            "xlb_frontend_bytes_total",
            "Bytes to a frontend (forward direction).",
            |r| r.bytes,
        ),
    ];
    for (name, help, value) in per_frontend {
        header(&mut out, name, "counter", help);
        for row in services {
            let _ = writeln!(out, "{name}{{{}}} {}", frontend_labels(row), value(row));
        }
    }
    let per_backend: [KindedFamily<inspect::BackendRow>; 4] = [
        (
            "xlb_backend_new_flows_total",
            "counter",
            "New flows sent to a backend: imbalance shows here.",
            |b| b.flows,
        ),
        (
            "xlb_backend_open_flows",
            "gauge",
            "Flows open to a backend on this node (least-conn's input).",
            |b| b.open_flows,
        ),
        (
            "xlb_backend_packets_total",
            "counter",
            "Packets sent to a backend.",
            |b| b.packets,
        ),
        (
            "xlb_backend_bytes_total",
            "counter",
            "Bytes sent to a backend.",
            |b| b.bytes,
        ),
    ];
    for (name, kind, help, value) in per_backend {
        header(&mut out, name, kind, help);
        for row in services {
            for b in &row.backends {
                let _ = writeln!(
                    out,
                    "{name}{{{},backend=\"{}\"}} {}",
                    frontend_labels(row),
                    label(&b.address),
                    value(b)
                );
            }
        }
    }
    out
}

/// Serves `/healthz` on `addr` until `stop`, in kube-proxy's format.
pub fn serve_healthz(
    addr: SocketAddr,
    agent: SharedMetrics,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    http::serve(addr, stop, move |path| match path {
        "/healthz" | "/livez" => {
            let health = agent.lock().map(|m| m.health).unwrap_or_default();
            let (status, body) =
                health.response(std::time::Instant::now(), std::time::SystemTime::now());
            Response::new(status, "application/json", body)
        }
        _ => Response::new("404 Not Found", "text/plain", "try /healthz\n".into()),
    })
}

/// Serves `/metrics` on `addr` until `stop`; one scrape at a time is plenty for Prometheus.
pub fn serve(
    addr: SocketAddr,
    pins: PathBuf,
    agent: SharedMetrics,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let layout = PinLayout::new(pins);
    http::serve(addr, stop, move |path| match path {
        "/metrics" => match PinnedMaps::open(&layout) {
            Ok(maps) => {
                let snapshot = agent.lock().map(|m| m.clone()).unwrap_or_default();
                let body = render(&snapshot, &inspect::services(&maps), &inspect::stats(&maps));
                Response::new("200 OK", "text/plain; version=0.0.4", body)
            }
            Err(e) => Response::new("503 Service Unavailable", "text/plain", format!("{e}\n")),
        },
        _ => Response::new("404 Not Found", "text/plain", "try /metrics\n".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Frontend, Protocol},
        report::inspect::{BackendRow, MapFill},
    };

    #[test]
    fn exposition_has_per_backend_new_flows_and_sync_histogram() {
        let mut agent = AgentMetrics {
            frontends: 1,
            backends: 2,
            ..Default::default()
        };
        agent
            .service_names
            .insert("10.96.0.10:80/TCP".into(), "default/web:http".into());
        agent.observe_sync(0.003);
        agent.observe_sync(0.2);
        let backend = |address: &str, flows| BackendRow {
            id: 1,
            address: address.into(),
            flows,
            open_flows: 1,
            maglev_entries: None,
            packets: 10,
            bytes: 1000,
        };
        let services = [ServiceRow {
            frontend: Frontend::internal([10, 96, 0, 10].into(), 80, Protocol::Tcp),
            service_id: 1,
            scheduler: "round-robin".into(),
            affinity_timeout_s: None,
            flows: 30,
            packets: 20,
            bytes: 2000,
            backends: vec![
                backend("10.244.0.11:8080", 20),
                backend("10.244.0.12:8080", 10),
            ],
        }];
        let stats = StatsReport {
            outcomes: [("dnat_new", 30u64), ("drop_ct_full", 0)].into(),
            maps: vec![MapFill {
                name: "XLB_CT",
                entries: 60,
                capacity: 524_288,
            }],
        };
        let text = render(&agent, &services, &stats);
        let labels = r#"frontend="10.96.0.10:80/TCP",service="default/web:http""#;
        for line in [
            format!(r#"xlb_backend_new_flows_total{{{labels},backend="10.244.0.11:8080"}} 20"#),
            format!(r#"xlb_backend_new_flows_total{{{labels},backend="10.244.0.12:8080"}} 10"#),
            format!(r#"xlb_frontend_info{{{labels},scheduler="round-robin"}} 1"#),
            format!(r#"xlb_frontend_new_flows_total{{{labels}}} 30"#),
            r#"xlb_sync_duration_seconds_bucket{le="0.005"} 1"#.to_string(),
            r#"xlb_sync_duration_seconds_bucket{le="0.25"} 2"#.to_string(),
            r#"xlb_sync_duration_seconds_bucket{le="+Inf"} 2"#.to_string(),
            "xlb_sync_duration_seconds_count 2".to_string(),
            r#"xlb_packets_total{outcome="dnat_new"} 30"#.to_string(),
            r#"xlb_map_entries{map="XLB_CT"} 60"#.to_string(),
            "xlb_frontends_programmed 1".to_string(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Every sample line belongs to a declared metric family.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {family} histogram")),
                "{l}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
    }
}
