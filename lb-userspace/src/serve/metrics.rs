//! Prometheus metrics of the agent (`--metrics-addr`): what is programmed, how syncs go,
//! and the datapath's counters read from the pinned maps at scrape time, encoded by
//! prometheus-client (a collector builds each scrape; OpenMetrics text).
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
    registry::Registry,
};
use tokio::runtime::Handle;

use crate::{
    datapath::{
        maps::{Collected, PinnedMaps},
        pins::PinLayout,
    },
    report::inspect::{self, BackendRow, ServiceRow, StatsReport},
    serve::http::{self, Handler, Response, Server},
};

/// Upper bounds of the sync duration histogram, in seconds.
const SYNC_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// What the agent loop reports about itself.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    pub frontends: usize,
    pub backends: usize,
    pub sync_errors: u64,
    /// Shared by clones: observations made through any of them count.
    pub sync_duration: Histogram,
    /// For /healthz.
    pub health: crate::serve::healthz::Health,
    /// Seconds from noticing a change in the source to the datapath programmed, last sync.
    pub last_change_to_programmed_s: f64,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            frontends: 0,
            backends: 0,
            sync_errors: 0,
            sync_duration: Histogram::new(SYNC_BUCKETS),
            health: Default::default(),
            last_change_to_programmed_s: 0.0,
        }
    }
}

impl AgentMetrics {
    pub fn observe_sync(&mut self, seconds: f64) {
        self.sync_duration.observe(seconds);
    }
}

pub type SharedMetrics = Arc<Mutex<AgentMetrics>>;

/// Entry counts of the big LRU maps, from the conntrack GC's walk (every few seconds), so
/// a scrape does not walk half a million entries again. `u64::MAX`: not counted yet.
/// (conntrack, affinity, conntrack6, affinity6).
#[derive(Debug)]
pub struct WalkedCounts([AtomicU64; 4]);

impl Default for WalkedCounts {
    fn default() -> Self {
        WalkedCounts(std::array::from_fn(|_| AtomicU64::new(u64::MAX)))
    }
}

impl WalkedCounts {
    pub fn record(&self, collected: &Collected) {
        let counts = [
            collected.conntrack,
            collected.affinity,
            collected.conntrack6,
            collected.affinity6,
        ];
        for (cell, n) in self.0.iter().zip(counts) {
            cell.store(n as u64, Ordering::Relaxed);
        }
    }

    fn get(&self) -> Option<Collected> {
        let [ct, aff, ct6, aff6] = self.0.each_ref().map(|c| c.load(Ordering::Relaxed));
        [ct, aff, ct6, aff6]
            .iter()
            .all(|n| *n != u64::MAX)
            .then_some(Collected {
                removed: 0,
                conntrack: ct as usize,
                affinity: aff as usize,
                conntrack6: ct6 as usize,
                affinity6: aff6 as usize,
            })
    }
}

/// One scrape's numbers.
struct Scrape<'a> {
    agent: &'a AgentMetrics,
    services: &'a [ServiceRow],
    stats: &'a StatsReport,
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge<N>(enc: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> std::fmt::Result
where
    ConstGauge<N>: prometheus_client::encoding::EncodeMetric,
{
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A per-row family: name (counters without `_total`, the encoder adds it), help, type, value.
type Family<R> = (&'static str, &'static str, MetricType, fn(&R) -> u64);

impl Scrape<'_> {
    fn frontend_labels(&self, row: &ServiceRow) -> [(&'static str, String); 3] {
        // The Service port as the agent recorded it in the pinned maps (`xlb services`'s).
        let service = row.service.clone().unwrap_or_default();
        [
            ("frontend", row.frontend.to_string()),
            ("service", service),
            ("family", row.frontend.family().name().to_string()),
        ]
    }

    fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let agent = self.agent;
        gauge(
            enc,
            "xlb_frontends_programmed",
            "Frontends (VIP:port/protocol) in the datapath.",
            agent.frontends as i64,
        )?;
        gauge(
            enc,
            "xlb_backends_programmed",
            "Backends of all frontends in the datapath.",
            agent.backends as i64,
        )?;
        counter(
            enc,
            "xlb_sync_errors",
            "Syncs that failed and were retried.",
            agent.sync_errors,
        )?;
        agent.sync_duration.encode(enc.encode_descriptor(
            "xlb_sync_duration_seconds",
            "Time to bring the maps to the desired state.",
            None,
            MetricType::Histogram,
        )?)?;
        gauge(
            enc,
            "xlb_change_to_programmed_seconds",
            "From noticing the last object change to the datapath programmed.",
            agent.last_change_to_programmed_s,
        )?;
        let mut packets = enc.encode_descriptor(
            "xlb_packets",
            "Packets seen by the datapath, by outcome (drops and passes included).",
            None,
            MetricType::Counter,
        )?;
        for (family, outcomes) in &self.stats.outcomes_by_family {
            for (outcome, count) in outcomes {
                ConstCounter::new(*count).encode(
                    packets.encode_family(&[("outcome", *outcome), ("family", *family)])?,
                )?;
            }
        }
        for (name, help, value) in [
            (
                "xlb_map_entries",
                "Entries in each BPF map.",
                (|m| m.entries as i64) as fn(&inspect::MapFill) -> i64,
            ),
            ("xlb_map_capacity", "Capacity of each BPF map.", |m| {
                i64::from(m.capacity)
            }),
        ] {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for m in &self.stats.maps {
                ConstGauge::new(value(m)).encode(family.encode_family(&[("map", m.name)])?)?;
            }
        }
        // A gauge of 1 rather than an OpenMetrics info: the labels stay in frontend, service,
        // scheduler order, like every other per-frontend family.
        let mut rejected = enc.encode_descriptor(
            "xlb_objects_rejected",
            "Objects and fields refused by validation (as the API server would), by kind and \
             reason.",
            None,
            MetricType::Counter,
        )?;
        for ((kind, reason), count) in crate::source::validate::rejected_counts() {
            ConstCounter::new(count)
                .encode(rejected.encode_family(&[("kind", kind), ("reason", reason)])?)?;
        }
        let mut info = enc.encode_descriptor(
            "xlb_frontend_info",
            "One per frontend, with its Service and algorithm.",
            None,
            MetricType::Gauge,
        )?;
        for row in self.services {
            let [frontend, service, family] = self.frontend_labels(row);
            let labels = [
                frontend,
                service,
                family,
                ("scheduler", row.scheduler.clone()),
            ];
            ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
        }
        let per_frontend: [Family<ServiceRow>; 3] = [
            (
                "xlb_frontend_new_flows",
                "New flows balanced by a frontend.",
                MetricType::Counter,
                |r| r.flows,
            ),
            (
                "xlb_frontend_packets",
                "Packets to a frontend (forward direction).",
                MetricType::Counter,
                |r| r.packets,
            ),
            (
                "xlb_frontend_bytes",
                "Bytes to a frontend (forward direction).",
                MetricType::Counter,
                |r| r.bytes,
            ),
        ];
        for (name, help, kind, value) in per_frontend {
            let mut family = enc.encode_descriptor(name, help, None, kind)?;
            for row in self.services {
                ConstCounter::new(value(row))
                    .encode(family.encode_family(&self.frontend_labels(row))?)?;
            }
        }
        let per_backend: [Family<BackendRow>; 4] = [
            (
                "xlb_backend_new_flows",
                "New flows sent to a backend: imbalance shows here.",
                MetricType::Counter,
                |b| b.flows,
            ),
            (
                "xlb_backend_open_flows",
                "Flows open to a backend on this node (least-conn's input).",
                MetricType::Gauge,
                |b| b.open_flows,
            ),
            (
                "xlb_backend_packets",
                "Packets sent to a backend.",
                MetricType::Counter,
                |b| b.packets,
            ),
            (
                "xlb_backend_bytes",
                "Bytes sent to a backend.",
                MetricType::Counter,
                |b| b.bytes,
            ),
        ];
        for (name, help, kind, value) in per_backend {
            let mut family = enc.encode_descriptor(name, help, None, kind)?;
            for row in self.services {
                let [frontend, service, ip_family] = self.frontend_labels(row);
                for b in &row.backends {
                    let labels = [
                        frontend.clone(),
                        service.clone(),
                        ip_family.clone(),
                        ("backend", b.address.clone()),
                    ];
                    let sample = family.encode_family(&labels)?;
                    match kind {
                        MetricType::Gauge => ConstGauge::new(value(b) as i64).encode(sample)?,
                        _ => ConstCounter::new(value(b)).encode(sample)?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads the agent's numbers and the pinned maps at each scrape.
#[derive(Debug)]
struct ScrapeCollector {
    layout: PinLayout,
    agent: SharedMetrics,
    walked: Arc<WalkedCounts>,
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let agent = self.agent.lock().map(|m| m.clone()).unwrap_or_default();
        let (services, stats) = match PinnedMaps::open(&self.layout) {
            Ok(maps) => (
                inspect::services(&maps),
                inspect::stats_with(&maps, self.walked.get()),
            ),
            Err(e) => {
                log::warn!("metrics: {e}; reporting the agent's own numbers only");
                (Vec::new(), StatsReport::default())
            }
        };
        Scrape {
            agent: &agent,
            services: &services,
            stats: &stats,
        }
        .encode(&mut enc)
    }
}

/// OpenMetrics text of one collector.
fn exposition(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        log::warn!("metrics: encoding failed: {e}");
    }
    out
}

/// Serves `/healthz` (and `/livez`) on `addr`, in kube-proxy's format.
pub fn serve_healthz(
    runtime: &Handle,
    addr: SocketAddr,
    agent: SharedMetrics,
) -> std::io::Result<Server> {
    let handler: Handler = Arc::new(move |path: &str| match path {
        "/healthz" | "/livez" => {
            let health = agent.lock().map(|m| m.health).unwrap_or_default();
            let (status, body) =
                health.response(std::time::Instant::now(), std::time::SystemTime::now());
            Response::new(status, "application/json", body)
        }
        _ => Response::new("404 Not Found", "text/plain", "try /healthz\n".into()),
    });
    http::serve(runtime, addr, handler)
}

/// Serves `/metrics` on `addr`, reading the pinned maps at each scrape.
pub fn serve(
    runtime: &Handle,
    addr: SocketAddr,
    pins: PathBuf,
    agent: SharedMetrics,
    walked: Arc<WalkedCounts>,
) -> std::io::Result<Server> {
    let layout = PinLayout::new(pins);
    let handler: Handler = Arc::new(move |path: &str| match path {
        "/metrics" => {
            let body = exposition(ScrapeCollector {
                layout: layout.clone(),
                agent: Arc::clone(&agent),
                walked: Arc::clone(&walked),
            });
            Response::new(
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
        }
        _ => Response::new("404 Not Found", "text/plain", "try /metrics\n".into()),
    });
    http::serve(runtime, addr, handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Frontend, Protocol},
        report::inspect::MapFill,
    };

    /// A collector of fixed numbers.
    #[derive(Debug)]
    struct Fixed(AgentMetrics, Vec<ServiceRow>, StatsReport);

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            Scrape {
                agent: &self.0,
                services: &self.1,
                stats: &self.2,
            }
            .encode(&mut enc)
        }
    }

    #[test]
    fn exposition_has_per_backend_new_flows_and_sync_histogram() {
        let mut agent = AgentMetrics {
            frontends: 1,
            backends: 2,
            ..Default::default()
        };
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
            frontend: Frontend::internal(std::net::Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp),
            service: Some("default/web:http".into()),
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
            outcomes_by_family: [
                ("IPv4", [("dnat_new", 30u64), ("drop_ct_full", 0)].into()),
                ("IPv6", [("dnat_new", 0u64), ("drop_ct_full", 0)].into()),
            ]
            .into(),
            maps: vec![MapFill {
                name: "XLB_CT",
                entries: 60,
                capacity: 524_288,
            }],
        };
        let text = exposition(Fixed(agent, services.to_vec(), stats));
        let labels = r#"frontend="10.96.0.10:80/TCP",service="default/web:http",family="IPv4""#;
        for line in [
            format!(r#"xlb_backend_new_flows_total{{{labels},backend="10.244.0.11:8080"}} 20"#),
            format!(r#"xlb_backend_new_flows_total{{{labels},backend="10.244.0.12:8080"}} 10"#),
            format!(r#"xlb_frontend_info{{{labels},scheduler="round-robin"}} 1"#),
            format!(r#"xlb_frontend_new_flows_total{{{labels}}} 30"#),
            r#"xlb_sync_duration_seconds_bucket{le="0.005"} 1"#.to_string(),
            r#"xlb_sync_duration_seconds_bucket{le="0.25"} 2"#.to_string(),
            r#"xlb_sync_duration_seconds_bucket{le="+Inf"} 2"#.to_string(),
            "xlb_sync_duration_seconds_count 2".to_string(),
            r#"xlb_packets_total{outcome="dnat_new",family="IPv4"} 30"#.to_string(),
            r#"xlb_packets_total{outcome="dnat_new",family="IPv6"} 0"#.to_string(),
            r#"xlb_map_entries{map="XLB_CT"} 60"#.to_string(),
            "xlb_frontends_programmed 1".to_string(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Every sample line belongs to a declared metric family (counters' samples carry
        // `_total`, histograms' `_bucket`/`_sum`/`_count`), and OpenMetrics text ends in EOF.
        assert_eq!(text.lines().last(), Some("# EOF"));
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            let counter = name.trim_end_matches("_total");
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} gauge\n"))
                    || text.contains(&format!("# TYPE {counter} counter\n"))
                    || text.contains(&format!("# TYPE {family} histogram\n")),
                "{l}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let agent = AgentMetrics::default();
        let services = [ServiceRow {
            frontend: Frontend::internal(std::net::Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp),
            service: Some(r#"a"b\c"#.into()),
            service_id: 1,
            scheduler: "random".into(),
            affinity_timeout_s: None,
            flows: 0,
            packets: 0,
            bytes: 0,
            backends: vec![],
        }];
        let text = exposition(Fixed(agent, services.to_vec(), StatsReport::default()));
        assert!(text.contains(r#"service="a\"b\\c""#), "{text}");
    }
}
