//! The real agent (`xlb agent --manifests DIR`, nothing attached) on N generated Services:
//! its peak memory, the time from start to all programmed, and the time from one object
//! change to the datapath programmed while other objects keep changing.
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{SCOPE_INTERNAL, ServiceKey};
use serde::Serialize;
use xlb::datapath::{maps::PinnedMaps, pins::PinLayout};
use xlb_tests::cluster::{daemonset_agent_args, with_overrides};

use crate::datapath::ENDPOINTS;

#[derive(Debug, Serialize)]
pub struct AgentRun {
    pub services: u32,
    pub endpoints: u32,
    pub max_rss_kib: u64,
    /// From start to the first sync of every service (manifests parsed, maps written).
    pub cold_start_ms: f64,
    pub change: ChangeLatency,
}

/// One Service's endpoint replaced in its manifest → the new backend in the pinned maps,
/// while another Service's manifest is rewritten `churn_per_s` times a second.
#[derive(Debug, Serialize)]
pub struct ChangeLatency {
    pub rounds: u32,
    pub churn_per_s: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

const CHANGED_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 1);
const CHURN_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 2);
const CHURN_PER_S: u32 = 50;

/// A Service `name` at `vip`:80 with the given endpoints (port 8080), as manifest YAML.
fn service_yaml(name: &str, vip: Ipv4Addr, endpoints: impl Iterator<Item = Ipv4Addr>) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n\
         spec: {{clusterIP: {vip}, ports: [{{name: http, port: 80, protocol: TCP}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n\
         \x20 namespace: bench\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for ip in endpoints {
        let _ = writeln!(yaml, "- {{addresses: [\"{ip}\"]}}");
    }
    yaml.push_str("---\n");
    yaml
}

/// Replaces `path` in one step (the agent never reads a half-written file).
fn replace_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// The agent process, its pins and its scratch directory; all removed on drop.
struct RunningAgent {
    child: Child,
    xlb: PathBuf,
    bpffs: PathBuf,
    dir: PathBuf,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(&self.xlb)
            .arg("cleanup")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .output();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ne(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Whether the changed Service's one backend is `ip` in the pinned maps.
fn programmed(maps: &PinnedMaps, ip: Ipv4Addr) -> bool {
    let key = ServiceKey {
        vip: ne(CHANGED_VIP),
        port: 80u16.to_be(),
        slot: 1,
        proto: 6,
        scope: SCOPE_INTERNAL,
        _pad: [0; 2],
    };
    maps.services
        .get(&key, 0)
        .and_then(|slot| maps.backends.get(&slot.backend_id, 0))
        .is_ok_and(|b| b.ip == ne(ip))
}

fn wait_programmed(maps: &PinnedMaps, ip: Ipv4Addr, agent: &mut RunningAgent) -> Result<f64> {
    let started = Instant::now();
    while !programmed(maps, ip) {
        if started.elapsed() > Duration::from_secs(10) || agent.child.try_wait()?.is_some() {
            bail!("the agent did not program endpoint {ip} within 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// Runs the agent on `services` generated Services (10 endpoints each) and measures it.
pub fn measure(xlb: &Path, services: u32, rounds: u32) -> Result<AgentRun> {
    let dir = std::env::temp_dir().join(format!("xlb-bench-agent-{}", std::process::id()));
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let mut yaml = String::new();
    for s in 0..services {
        let endpoints = (0..ENDPOINTS).map(|e| Ipv4Addr::from(0x0af4_0000 + s * ENDPOINTS + e));
        yaml.push_str(&service_yaml(
            &format!("svc-{s}"),
            Ipv4Addr::from(0x0a60_0000 + s),
            endpoints,
        ));
    }
    std::fs::write(manifests.join("all.yaml"), yaml)?;
    let first = Ipv4Addr::new(10, 113, 0, 0);
    let changed = manifests.join("changed.yaml");
    replace_file(
        &changed,
        &service_yaml("changed", CHANGED_VIP, [first].into_iter()),
    )?;
    let bpffs = PathBuf::from(format!(
        "/sys/fs/bpf/xlb-bench-agent-{}",
        std::process::id()
    ));
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    let started = Instant::now();
    // The DaemonSet's arguments, with what a bench run on this host must change: nothing
    // attached anywhere, endpoints on loopback, its own pins and manifests.
    let overrides: Vec<(String, String)> = [
        ("--manifests", manifests.display().to_string()),
        ("--pod-ifaces", "xlb-none-*".to_string()),
        ("--external-ifaces", String::new()),
        ("--cgroup", "none".to_string()),
        ("--metrics-addr", "127.0.0.1:0".to_string()),
        ("--healthz-addr", "127.0.0.1:0".to_string()),
        ("--bpffs", bpffs.display().to_string()),
    ]
    .into_iter()
    .map(|(flag, value)| (flag.to_string(), value))
    .collect();
    let args = with_overrides(&daemonset_agent_args()?, &overrides);
    let child = Command::new(xlb)
        .args(&args)
        .env("RUST_LOG", "info")
        .stderr(log.try_clone()?)
        .stdout(log)
        .spawn()
        .context("starting the agent")?;
    let mut agent = RunningAgent {
        child,
        xlb: xlb.to_path_buf(),
        bpffs: bpffs.clone(),
        dir: dir.clone(),
    };
    let synced = format!("synced {} frontend(s)", services + 1);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains(&synced) {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) || agent.child.try_wait()?.is_some() {
            bail!("agent did not sync {services} services:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let cold_start_ms = started.elapsed().as_secs_f64() * 1e3;

    // Another Service changes all along (50 times a second) while one change is timed.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, path) = (Arc::clone(&stop), manifests.join("churn.yaml"));
        std::thread::spawn(move || -> Result<()> {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let ip = Ipv4Addr::from(0x0a70_0000 + i % 60_000);
                replace_file(&path, &service_yaml("churn", CHURN_VIP, [ip].into_iter()))?;
                i += 1;
                std::thread::sleep(Duration::from_millis(u64::from(1000 / CHURN_PER_S)));
            }
            Ok(())
        })
    };
    let maps = PinnedMaps::open(&PinLayout::new(&bpffs))?;
    let mut times = Vec::new();
    let result = (|| -> Result<()> {
        wait_programmed(&maps, first, &mut agent)?;
        for round in 1..=rounds {
            // Changes land at any point of the agent's loop, not in step with it.
            std::thread::sleep(Duration::from_millis(u64::from(round * 37 % 100)));
            let ip = Ipv4Addr::new(10, 113, (round / 256) as u8, (round % 256) as u8);
            replace_file(
                &changed,
                &service_yaml("changed", CHANGED_VIP, [ip].into_iter()),
            )?;
            times.push(wait_programmed(&maps, ip, &mut agent)?);
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let churned = churn
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"));
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap_or_default();
    drop(maps);
    drop(agent);
    result?;
    churned??;
    let max_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(AgentRun {
        services,
        endpoints: services * ENDPOINTS,
        max_rss_kib,
        cold_start_ms,
        change: ChangeLatency {
            rounds,
            churn_per_s: CHURN_PER_S,
            p50_ms: crate::percentile(times.clone(), 0.5),
            p99_ms: crate::percentile(times.clone(), 0.99),
            max_ms: times.iter().copied().fold(0.0, f64::max),
        },
    })
}
