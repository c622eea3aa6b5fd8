use std::sync::{Arc, atomic::AtomicBool};

use anyhow::{Context as _, Result};
use clap::Parser as _;
use xlb::{
    agent::{self, AgentConfig, SourceConfig},
    cli::{Cli, Command, ProtoArg, ReadArgs},
    ifaces::IfacePatterns,
    inspect,
    loader::{self, PinLayout},
    maps::PinnedMaps,
};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(err) = run(Cli::parse()) {
        eprintln!("xlb: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Agent(args) => {
            let args = *args;
            let cgroup = match args.cgroup.as_str() {
                "none" => None,
                "auto" => Some(xlb::bpffs::cgroup2_root().context(
                    "no cgroup v2 mount found for the socket hooks: pass --cgroup PATH or \
                     --cgroup none",
                )?),
                path => Some(std::path::PathBuf::from(path)),
            };
            let external_ifaces =
                IfacePatterns::parse(&args.external_ifaces).with_context(|| {
                    format!(
                        "--external-ifaces {:?} is not a valid list",
                        args.external_ifaces
                    )
                })?;
            let node_name = args
                .node_name
                .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
                .or_else(hostname)
                .context("no --node-name, no $NODE_NAME and no host name: pass --node-name")?;
            let pod_ifaces = IfacePatterns::parse(&args.pod_ifaces).with_context(|| {
                format!(
                    "--pod-ifaces {:?} is not a valid glob list",
                    args.pod_ifaces
                )
            })?;
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&stop))
                    .context("installing signal handlers")?;
            }
            let source = match args.manifests {
                Some(dir) => SourceConfig::Manifests(dir),
                None => SourceConfig::Kube {
                    kubeconfig: args.kubeconfig,
                },
            };
            let event_target = match &source {
                SourceConfig::Kube { kubeconfig } => Some((kubeconfig.clone(), node_name.clone())),
                SourceConfig::Manifests(_) => None,
            };
            let result = agent::run(
                AgentConfig {
                    source,
                    pod_ifaces,
                    bpffs: args.bpffs,
                    scheduler: args.scheduler,
                    maglev_table_size: args.maglev_table_size,
                    metrics_addr: args.metrics_addr,
                    healthz_addr: args.healthz_addr,
                    node_name,
                    external_ifaces,
                    node_ips: args.node_ips,
                    snat_ports: args.snat_ports,
                    xdp_mode: args.xdp_mode,
                    cgroup,
                },
                stop,
            );
            // Tell the cluster too: `kubectl describe node` shows why xlb is not serving.
            if let (Err(err), Some((kubeconfig, node))) = (&result, event_target) {
                xlb::events::report_fatal(kubeconfig, &node, "XlbAgentFailed", &format!("{err:#}"));
            }
            result
        }
        Command::Services(args) => read(&args, |maps| {
            render(args.json, &inspect::services(maps), |r| {
                inspect::services_text(r)
            })
        }),
        Command::Conntrack(args) => read(&args, |maps| {
            render(args.json, &inspect::conntrack(maps), |r| {
                inspect::conntrack_text(r)
            })
        }),
        Command::Explain(args) => read(&args.read, |maps| {
            let query = xlb::explain::Query {
                src: args.src.0,
                sport: args.src.1,
                dst: args.dst.0,
                dport: args.dst.1,
                proto: match args.proto {
                    ProtoArg::Tcp => xlb::model::Protocol::Tcp,
                    ProtoArg::Udp => xlb::model::Protocol::Udp,
                },
                origin: args.from,
            };
            let explanation = xlb::explain::decide(&query, &xlb::explain::snapshot(maps, &query));
            render(args.read.json, &explanation, xlb::explain::text)
        }),
        Command::Stats(args) => read(&args, |maps| {
            render(args.json, &inspect::stats(maps), inspect::stats_text)
        }),
        Command::Cleanup {
            kube_proxy_rules: true,
            ..
        } => {
            let removed =
                xlb::kube_proxy_rules::cleanup().context("removing kube-proxy's rules")?;
            if removed.is_empty() {
                println!("no kube-proxy rules found");
            }
            for line in removed {
                println!("{line}");
            }
            Ok(())
        }
        Command::Cleanup { bpffs, .. } => {
            let removed = loader::cleanup(&PinLayout::new(&bpffs));
            println!("removed {} pin(s) under {}", removed.len(), bpffs.display());
            Ok(())
        }
    }
}

fn read(args: &ReadArgs, report: impl Fn(&PinnedMaps) -> Result<String>) -> Result<()> {
    let maps = PinnedMaps::open(&PinLayout::new(&args.bpffs))?;
    println!("{}", report(&maps)?.trim_end());
    Ok(())
}

/// JSON (pretty) with `--json`, the table otherwise.
fn render<T: serde::Serialize + ?Sized>(
    json: bool,
    report: &T,
    text: impl Fn(&T) -> String,
) -> Result<String> {
    Ok(if json {
        serde_json::to_string_pretty(report)?
    } else {
        text(report)
    })
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    (!name.is_empty()).then_some(name)
}
