//! The `xlb` binary: parses the command line and hands each command to the library.
use std::sync::{Arc, atomic::AtomicBool};

use anyhow::{Context as _, Result};
use xlb::{
    agent::{self, AgentConfig, SourceConfig},
    cli::{Cli, Command, ProtoArg, ReadArgs},
    datapath::{maps::PinnedMaps, pins},
    report::{explain, inspect},
};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli =
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Which agent flags were on the command line: they win over a --config file.
    let agent_flags = matches.subcommand_matches("agent").cloned();
    let given = move |id: &str| {
        agent_flags.as_ref().is_some_and(|m| {
            m.try_get_raw(id).is_ok()
                && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        })
    };
    if let Err(err) = run(cli, given) {
        eprintln!("xlb: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli, given: impl Fn(&str) -> bool) -> Result<()> {
    match cli.command {
        Command::Agent(args) => {
            let config = AgentConfig::new(*args, given)?;
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&stop))
                    .context("installing signal handlers")?;
            }
            let event_target = match &config.source {
                SourceConfig::Kube { kubeconfig } => {
                    Some((kubeconfig.clone(), config.node_name.clone()))
                }
                SourceConfig::Manifests(_) => None,
            };
            let result = agent::run(config, stop);
            // Tell the cluster too: `kubectl describe node` shows why xlb is not serving.
            if let (Err(err), Some((kubeconfig, node))) = (&result, event_target) {
                xlb::source::events::report_fatal(
                    kubeconfig,
                    &node,
                    "XlbAgentFailed",
                    &format!("{err:#}"),
                );
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
            if args.src.0.is_ipv4() != args.dst.0.is_ipv4() {
                anyhow::bail!(
                    "--src {} and --dst {} are of different address families: xlb balances \
                     each family on its own (no NAT46/64), so such a packet reaches no service",
                    args.src.0,
                    args.dst.0
                );
            }
            let query = explain::Query {
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
            let explanation = explain::decide(&query, &explain::snapshot(maps, &query));
            render(args.read.json, &explanation, explain::text)
        }),
        Command::Stats(args) => read(&args, |maps| {
            render(args.json, &inspect::stats(maps), inspect::stats_text)
        }),
        Command::MountBpffs { bpffs } => {
            xlb::datapath::bpffs::ensure_pin_dir(&bpffs)?;
            println!("{} is on a bpffs", bpffs.display());
            Ok(())
        }
        Command::Cleanup {
            kube_proxy_rules: true,
            ..
        } => {
            let removed = xlb::kube_proxy::cleanup().context("removing kube-proxy's rules")?;
            if removed.is_empty() {
                println!("no kube-proxy rules found");
            }
            for line in removed {
                println!("{line}");
            }
            Ok(())
        }
        Command::Cleanup { bpffs, .. } => {
            let removed = pins::cleanup(&pins::PinLayout::new(&bpffs));
            println!("removed {} pin(s) under {}", removed.len(), bpffs.display());
            Ok(())
        }
    }
}

fn read(args: &ReadArgs, report: impl Fn(&PinnedMaps) -> Result<String>) -> Result<()> {
    let maps = PinnedMaps::open(&pins::PinLayout::new(&args.bpffs))?;
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
