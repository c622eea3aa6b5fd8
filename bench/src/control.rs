//! Control plane: time to program N services from cold and one change among N, for xlb
//! (sync into real pinned maps) and for kube-proxy's own datapaths (`iptables-restore` of its
//! iptables-mode ruleset, `nft -f` of its nftables-mode ruleset, in a namespace of ours).
use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use xlb::{
    datapath::{
        load,
        maps::PinnedMaps,
        pins::{self, PinLayout},
    },
    model::{DesiredState, Endpoint, Frontend, FrontendSpec, Protocol, Scheduler},
    sync::Syncer,
};

use crate::datapath::{ENDPOINTS, endpoints_at};

#[derive(Debug, Clone, Serialize)]
pub struct ProgramCost {
    pub system: &'static str,
    pub services: u32,
    /// All services programmed from nothing, ms.
    pub cold_ms: f64,
    /// One service's endpoints changed with all others present: p50 and p99, ms.
    pub change_p50_ms: Option<f64>,
    pub change_p99_ms: Option<f64>,
    /// Rules or map entries written for the cold start.
    pub objects: usize,
    /// The load was stopped at `cold_ms` without finishing (it took longer than the bench
    /// allows): `cold_ms` is a lower bound.
    pub stopped: bool,
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + i)
}

fn endpoint(service: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0af4_0000 + service * ENDPOINTS + e)
}

fn desired(services: u32, changed: Option<(u32, u32)>) -> DesiredState {
    let per_service = endpoints_at(services);
    (0..services)
        .map(|s| {
            let endpoints = (0..per_service)
                .map(|e| {
                    // A change swaps one endpoint of one service for a new address.
                    let ip = match changed {
                        Some((cs, round)) if cs == s && e == 0 => {
                            Ipv4Addr::from(0x0b00_0000 + round)
                        }
                        _ => endpoint(s, e),
                    };
                    Endpoint {
                        ip: ip.into(),
                        port: 8080,
                    }
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            (
                Frontend::internal(vip(s), 80, Protocol::Tcp),
                FrontendSpec {
                    service: format!("bench/svc-{s}:http"),
                    endpoints,
                    affinity_timeout_s: None,
                    scheduler: Scheduler::Random,
                    snat: false,
                    drop_when_empty: false,
                    source_ranges: Vec::new(),
                },
            )
        })
        .collect()
}

/// Removes the bench's pins on drop.
struct Pins(PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        pins::cleanup(&PinLayout::new(&self.0));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xlb: sync N services into pinned maps, then `changes` single-service changes.
pub fn xlb(services: u32, changes: u32) -> Result<(ProgramCost, u64)> {
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/xlb-bench-{}",
        std::process::id()
    )));
    xlb::datapath::bpffs::ensure_pin_dir(&pins.0)?;
    let layout = PinLayout::new(&pins.0);
    std::fs::create_dir_all(layout.maps_dir())?;
    let _ebpf = load::load(Some(&layout)).context("loading the datapath")?;
    let mut maps = PinnedMaps::open(&layout)?;
    let mut syncer = Syncer::new();
    let want = desired(services, None);
    let started = Instant::now();
    let report = syncer.apply(&want, &mut maps)?;
    let cold_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut times = Vec::new();
    for round in 0..changes {
        let changed = desired(services, Some(((round * 7919) % services, round + 1)));
        let started = Instant::now();
        syncer.apply(&changed, &mut maps)?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let memlock = map_memory(&layout);
    Ok((
        ProgramCost {
            system: "xlb",
            services,
            cold_ms,
            change_p50_ms: (!times.is_empty()).then(|| crate::percentile(times.clone(), 0.5)),
            change_p99_ms: (!times.is_empty()).then(|| crate::percentile(times, 0.99)),
            objects: report.frontends_added
                + report.backends_added
                + want.len() * endpoints_at(services) as usize,
            stopped: false,
        },
        memlock,
    ))
}

/// Kernel memory of the pinned maps (bpftool's bytes_memlock).
fn map_memory(layout: &PinLayout) -> u64 {
    lb_common::map_names::ALL
        .iter()
        .filter_map(|name| {
            let out = Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(layout.map(name))
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["bytes_memlock"].as_u64()
        })
        .sum()
}

/// kube-proxy's iptables-mode ruleset for N services (nat table), as it writes it with
/// iptables-restore: KUBE-SERVICES → KUBE-SVC-* (statistic random) → KUBE-SEP-* (DNAT).
pub fn iptables_ruleset(services: u32, proto: &str) -> (String, usize) {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    let mut count = 7;
    let endpoints = endpoints_at(services);
    for s in 0..services {
        let svc = format!("KUBE-SVC-{s:016X}");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"bench/svc-{s}:http cluster IP\" -m {proto} --dport 80 -j {svc}",
            vip(s)
        );
        count += 1;
        for e in 0..endpoints {
            let sep = format!("KUBE-SEP-{:016X}", s * ENDPOINTS + e);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = endpoints - e;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/svc-{s}:http -> {}:8080\" -m statistic --mode random --probability {:.11} -j {sep}",
                    endpoint(s, e),
                    1.0 / f64::from(left)
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/svc-{s}:http -> {}:8080\" -j {sep}",
                    endpoint(s, e)
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {}/32 -m comment --comment \"bench/svc-{s}:http\" -j KUBE-MARK-MASQ",
                endpoint(s, e)
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {proto} -m comment --comment \"bench/svc-{s}:http\" -m {proto} -j DNAT --to-destination {}:8080",
                endpoint(s, e)
            );
            count += 3;
        }
    }
    (format!("{chains}{rules}COMMIT\n"), count)
}

/// kube-proxy's nftables-mode ruleset for N services: a verdict map from (IP, proto, port)
/// to per-service chains that pick an endpoint chain with numgen.
pub fn nft_ruleset(services: u32, proto: &str) -> (String, usize) {
    let mut out = String::from(
        "table ip kube-proxy {\n  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {\n",
    );
    let mut count = 0;
    for s in 0..services {
        let _ = writeln!(out, "      {} . {proto} . 80 : goto service-{s},", vip(s));
    }
    let endpoints = endpoints_at(services);
    out.push_str("    }\n  }\n  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n");
    for s in 0..services {
        let _ = write!(
            out,
            "  chain service-{s} {{\n    numgen random mod {endpoints} vmap {{ "
        );
        for e in 0..endpoints {
            let _ = write!(out, "{e} : goto endpoint-{}, ", s * ENDPOINTS + e);
        }
        out.push_str("}\n  }\n");
        for e in 0..endpoints {
            let _ = writeln!(
                out,
                "  chain endpoint-{} {{\n    ip saddr {} mark set mark | 0x4000\n    meta l4proto {proto} dnat to {}:8080\n  }}",
                s * ENDPOINTS + e,
                endpoint(s, e),
                endpoint(s, e)
            );
            count += 2;
        }
        count += 2;
    }
    out.push_str("}\n");
    (out, count)
}

/// A network namespace for the baselines, deleted on drop.
struct Namespace(String);
impl Namespace {
    fn new() -> Result<Namespace> {
        let name = format!("xlb-bench-{}", std::process::id());
        run("ip", &["netns", "add", &name], None)?;
        Ok(Namespace(name))
    }
}
impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0], None);
    }
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<()> {
    xlb::command::run(program, args, input)?;
    Ok(())
}

/// Runs `program args` in namespace `ns` with `input` on stdin, stopping it after `limit`.
/// Returns how long it ran and whether it finished.
fn run_bounded(
    ns: &Namespace,
    program: &[&str],
    input: String,
    limit: Duration,
) -> Result<(Duration, bool)> {
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .args(program)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.join(" ")))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // A large ruleset does not fit the pipe: feed it from a thread of its own.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let finished = loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("{}: {}", program.join(" "), err.trim());
            }
            break true;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let _ = feeder.join();
    Ok((took, finished))
}

/// Longest a kube-proxy ruleset may take to load before the bench stops it and reports a
/// lower bound (nft -f of the 10k-service ruleset takes over two minutes here).
pub const KUBE_PROXY_LOAD_LIMIT: Duration = Duration::from_secs(300);

/// Cold-start times of kube-proxy's rulesets for N services, in a fresh namespace each.
pub fn kube_proxy(services: u32) -> Result<Vec<ProgramCost>> {
    let mut results = Vec::new();
    let loads: [(&'static str, &[&str], (String, usize)); 2] = [
        (
            "iptables-restore",
            &["iptables-restore"],
            iptables_ruleset(services, "tcp"),
        ),
        ("nft -f", &["nft", "-f", "-"], nft_ruleset(services, "tcp")),
    ];
    for (system, program, (rules, count)) in loads {
        let ns = Namespace::new()?;
        let (took, finished) = run_bounded(&ns, program, rules, KUBE_PROXY_LOAD_LIMIT)?;
        if !finished {
            eprintln!("   {system} stopped after {took:.0?} ({services} services)");
        }
        results.push(ProgramCost {
            system,
            services,
            cold_ms: took.as_secs_f64() * 1e3,
            change_p50_ms: None,
            change_p99_ms: None,
            objects: count,
            stopped: !finished,
        });
    }
    Ok(results)
}
