//! `cargo xtask bench`: xlb's per-packet cost (BPF_PROG_TEST_RUN) and control-plane costs
//! against kube-proxy's iptables and nftables rulesets, in one run on one machine. Writes
//! `bench/results/<date>.json`, a Markdown table and SVG (+ PNG if rsvg-convert is there).
mod agent;
mod control;
mod datapath;
mod forward;
mod katran;
mod plot;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Result, bail};
use clap::Parser;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(name = "xlb-bench")]
struct Args {
    /// Every scenario at the smallest scale only (what `cargo xtask test` runs).
    #[arg(long)]
    quick: bool,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Packets per namespace-forwarding measurement (default 20 000 quick, 500 000 full).
    #[arg(long)]
    packets: Option<u64>,
    /// Passes of the namespace-forwarding measurement of plain routing and xlb, interleaved
    /// (default 1 quick, 5 full): its rates move ±30 % between passes on a 2-core VM, so the
    /// ratio to routing is taken per pass and its median reported.
    #[arg(long)]
    forward_passes: Option<usize>,
    /// The xlb binary (for the agent memory measurement).
    #[arg(long, env = "XLB_BIN")]
    xlb: Option<PathBuf>,
    /// Service counts to measure at (default 1,1000,10000,100000; 1 with --quick).
    #[arg(long, value_delimiter = ',')]
    scales: Option<Vec<u32>>,
    /// A Katran XDP object (`balancer.bpf.o`, built from Katran's source: see the README) to
    /// measure beside xlb's programs in the same run.
    #[arg(long, env = "XLB_BENCH_KATRAN")]
    katran: Option<PathBuf>,
    /// Only these parts (default all): packet, program, forward, agent.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Option<Vec<Part>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Per-packet cost in the programs (BPF_PROG_TEST_RUN).
    Packet,
    /// Programming time: xlb's sync vs iptables-restore and nft -f.
    Program,
    /// Packet rate through the namespace topology.
    Forward,
    /// The agent's memory at 10k services / 100k endpoints.
    Agent,
}

#[derive(Debug, Serialize)]
struct Results {
    date: String,
    machine: Machine,
    command: String,
    packet: Vec<datapath::PacketCost>,
    program: Vec<control::ProgramCost>,
    forwarding: Vec<forward::Forwarded>,
    /// Kernel memory of xlb's maps with the largest service count, bytes.
    map_memory_bytes: u64,
    agent: Option<agent::AgentRun>,
}

#[derive(Debug, Serialize)]
struct Machine {
    kernel: String,
    cpus: usize,
    cpu_model: String,
}

fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    Machine {
        kernel,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
    }
}

/// The `q` quantile (0..=1) of `v`, nearest rank below; `v` must not be empty.
pub(crate) fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q) as usize]
}

fn today() -> String {
    let out = Command::new("date").arg("+%Y-%m-%d").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown-date".into())
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads eBPF programs and creates namespaces: run it as root");
    }
    let started = Instant::now();
    let scales = args.scales.clone().unwrap_or_else(|| {
        if args.quick {
            vec![1]
        } else {
            vec![1, 1_000, 10_000, 100_000]
        }
    });
    let wanted = |part| args.only.as_ref().is_none_or(|only| only.contains(&part));
    let samples = if args.quick { 2_000 } else { 20_000 };
    let mut packet = Vec::new();
    let mut program = Vec::new();
    let mut map_memory_bytes = 0;
    for &services in &scales {
        eprintln!(
            "== {services} service(s), {} endpoints each",
            datapath::endpoints_at(services)
        );
        if wanted(Part::Packet) {
            packet.extend(datapath::measure(
                services,
                samples,
                args.katran.as_deref(),
            )?);
        }
        if wanted(Part::Program) {
            let changes = if args.quick { 20 } else { 200 };
            let (xlb, memory) = control::xlb(services, changes)?;
            map_memory_bytes = memory;
            program.push(xlb);
            // Every scale: a load that takes too long is stopped and reported as such.
            program.extend(control::kube_proxy(services)?);
        }
    }
    let mut forwarding = Vec::new();
    let count = args
        .packets
        .unwrap_or(if args.quick { 20_000 } else { 500_000 });
    let passes = args
        .forward_passes
        .unwrap_or(if args.quick { 1 } else { 5 });
    for &services in scales.iter().filter(|_| wanted(Part::Forward)) {
        eprintln!("== packet rate through namespaces, {services} service(s)");
        forwarding.extend(forward::measure(services, count, passes)?);
    }
    let agent_scale = if args.quick { 100 } else { 10_000 };
    let agent = match &args.xlb {
        Some(xlb) if wanted(Part::Agent) => {
            eprintln!("== the agent at {agent_scale} services");
            let rounds = if args.quick { 10 } else { 100 };
            Some(agent::measure(xlb, agent_scale, rounds)?)
        }
        Some(_) => None,
        None => {
            eprintln!("no --xlb / XLB_BIN: skipping the agent memory measurement");
            None
        }
    };
    let results = Results {
        date: today(),
        machine: machine(),
        command: format!(
            "cargo xtask bench{}",
            if args.quick { " --quick" } else { "" }
        ),
        packet,
        program,
        forwarding,
        map_memory_bytes,
        agent,
    };
    write(&args.out, &results, args.quick)?;
    eprintln!("bench finished in {:.0?}", started.elapsed());
    Ok(())
}

fn write(dir: &Path, r: &Results, quick: bool) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let stem = if quick {
        format!("{}-quick", r.date)
    } else {
        r.date.clone()
    };
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(r)?,
    )?;
    let mut md = format!(
        "# xlb benchmark {}\n\nMachine: {} ({} CPUs), kernel {}. Command: `{}`.\n\n\
         ## Per-packet cost in the programs (BPF_PROG_TEST_RUN, ns)\n\n\
         *warm*: one packet repeated 250 times per call (the kernel's repetitions; translated \
         packets come back through a mirror frontend, so each repetition is a translation), \
         median over calls of the per-packet average. *cold*: one fresh packet per call, each \
         to another service, call overhead (`floor_non_ip`) and cache misses included; new \
         flows can only be measured this way. *× floor*: the median over the median of a \
         trivial program of the same hook (`floor_trivial_tc`, `floor_trivial_xdp`), method \
         and scale in the same run, which compares across machines.\n\n\
         | scenario | method | services | median | p90 | × floor |\n|---|---|---:|---:|---:|---:|\n",
        r.date, r.machine.cpu_model, r.machine.cpus, r.machine.kernel, r.command
    );
    let mut packet_rows: Vec<&datapath::PacketCost> = r.packet.iter().collect();
    packet_rows.sort_by_key(|p| (p.method, p.scenario, p.services));
    for p in &packet_rows {
        let floor = packet_rows.iter().find(|f| {
            f.scenario == format!("floor_trivial_{}", p.hook)
                && f.method == p.method
                && f.services == p.services
        });
        let times = floor.filter(|f| f.median_ns > 0).map_or_else(
            || "–".to_string(),
            |f| format!("{:.1}", p.median_ns as f64 / f.median_ns as f64),
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {times} |",
            p.scenario, p.method, p.services, p.median_ns, p.p90_ns
        );
    }
    md.push_str(
        "\n## Programming N services (10 endpoints each; 2 at 100k, where 10 would not fit the backend ids), ms\n\n\
         | system | services | cold start | one change p50 | one change p99 | rules/entries |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into());
    for p in &r.program {
        let _ = writeln!(
            md,
            "| {} | {} | {}{:.1}{} | {} | {} | {} |",
            p.system,
            p.services,
            if p.stopped { "> " } else { "" },
            p.cold_ms,
            if p.stopped { " (stopped)" } else { "" },
            ms(p.change_p50_ms),
            ms(p.change_p99_ms),
            p.objects
        );
    }
    md.push_str(
        "\n## Packet rate through namespaces: client pod → node → backend pod\n\n\
         Delivered packets per second at the backend's interface, trafgen UDP from one client; \
         CPU is the whole machine's per delivered packet; xlb's program time is the from-pod \
         program's own, from the kernel's BPF run-time statistics during the same run. \
         Routing and xlb run in interleaved passes (kube-proxy's rulesets in the first): \
         medians over the passes, and the rate against plain routing of the same family \
         taken per pass (median, range).\n\n\
         | mode | services | flows | passes | sent | delivered | pps | pps range | × routing | \
         × routing range | CPU µs/packet | program ns/packet |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for f in &r.forwarding {
        let (m, dash) = (&f.median, || "–".to_string());
        let program = m
            .program_ns_per_packet
            .map_or_else(dash, |ns| format!("{ns:.0}"));
        let vs = f.vs_routing.map_or_else(dash, |v| format!("{v:.2}"));
        let vs_range = match (f.vs_routing_min, f.vs_routing_max) {
            (Some(a), Some(b)) => format!("{a:.2}-{b:.2}"),
            _ => dash(),
        };
        let _ = writeln!(
            md,
            "| {:?} | {} | {} | {} | {} | {} | {:.0} | {:.0}-{:.0} | {vs} | {vs_range} | {:.2} | {program} |",
            m.mode,
            m.services,
            m.flows,
            f.passes,
            m.sent,
            m.delivered,
            m.pps,
            f.pps_min,
            f.pps_max,
            m.cpu_us_per_packet
        );
    }
    let _ = writeln!(
        md,
        "\nxlb map memory at the largest scale: {:.1} MiB.",
        r.map_memory_bytes as f64 / 1_048_576.0
    );
    if let Some(a) = &r.agent {
        let _ = writeln!(
            md,
            "Agent at {} services / {} endpoints (manifests source, release build): peak RSS \
             {:.1} MiB, start to all programmed {:.0} ms. One Service's endpoint changed in its \
             manifest → programmed in the maps, while another Service changes {} times a \
             second ({} changes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (inotify wakes \
             the agent, which translates the changed Services and syncs their frontends).",
            a.services,
            a.endpoints,
            a.max_rss_kib as f64 / 1024.0,
            a.cold_start_ms,
            a.change.churn_per_s,
            a.change.rounds,
            a.change.p50_ms,
            a.change.p99_ms,
            a.change.max_ms
        );
    }
    md.push_str(&format!(
        "\n![ns per packet]({stem}-packet.svg)\n![programming time]({stem}-program.svg)\n\
         ![packet rate]({stem}-pps.svg)\n"
    ));
    std::fs::write(dir.join(format!("{stem}.md")), &md)?;

    let mut scenarios: Vec<(&str, &str)> =
        r.packet.iter().map(|p| (p.scenario, p.method)).collect();
    scenarios.sort();
    scenarios.dedup();
    let packet_series: Vec<plot::Series> = scenarios
        .iter()
        .map(|&(scenario, method)| plot::Series {
            name: format!("{scenario} ({method})"),
            points: r
                .packet
                .iter()
                .filter(|p| p.scenario == scenario && p.method == method)
                .map(|p| (f64::from(p.services), p.median_ns.max(1) as f64))
                .collect(),
        })
        .collect();
    let mut systems: Vec<&str> = r.program.iter().map(|p| p.system).collect();
    systems.sort();
    systems.dedup();
    let program_series: Vec<plot::Series> = systems
        .iter()
        .map(|s| plot::Series {
            name: s.to_string(),
            points: r
                .program
                .iter()
                .filter(|p| p.system == *s && !p.stopped)
                .map(|p| (f64::from(p.services), p.cold_ms.max(0.001)))
                .collect(),
        })
        .collect();
    let mut modes: Vec<String> = r
        .forwarding
        .iter()
        .map(|f| format!("{:?} {}", f.median.mode, f.median.flows))
        .collect();
    modes.sort();
    modes.dedup();
    let pps_series: Vec<plot::Series> = modes
        .iter()
        .map(|m| plot::Series {
            name: m.to_lowercase(),
            points: r
                .forwarding
                .iter()
                .map(|f| &f.median)
                .filter(|f| format!("{:?} {}", f.mode, f.flows) == *m)
                .map(|f| (f64::from(f.services), f.pps.max(1.0)))
                .collect(),
        })
        .collect();
    for (name, svg) in [
        (
            "pps",
            plot::chart(
                "Delivered packets/s, client pod → node → backend pod",
                "services (10 endpoints each; 2 at 100k)",
                "packets per second",
                &pps_series,
            ),
        ),
        (
            "packet",
            plot::chart(
                "xlb per-packet cost (median, BPF_PROG_TEST_RUN)",
                "services (10 endpoints each; 2 at 100k)",
                "ns per packet",
                &packet_series,
            ),
        ),
        (
            "program",
            plot::chart(
                "Programming N services from cold",
                "services (10 endpoints each; 2 at 100k)",
                "ms",
                &program_series,
            ),
        ),
    ] {
        let svg_path = dir.join(format!("{stem}-{name}.svg"));
        std::fs::write(&svg_path, svg)?;
        let png = dir.join(format!("{stem}-{name}.png"));
        match Command::new("rsvg-convert")
            .arg("-o")
            .arg(&png)
            .arg(&svg_path)
            .status()
        {
            Ok(s) if s.success() => {}
            _ => eprintln!("rsvg-convert unavailable: {name} plot written as SVG only"),
        }
    }
    eprintln!("results: {}", dir.join(format!("{stem}.md")).display());
    Ok(())
}
