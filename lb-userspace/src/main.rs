use std::sync::{Arc, atomic::AtomicBool};

use anyhow::{Context as _, Result};
use clap::Parser as _;
use xlb::{
    agent::{self, AgentConfig},
    cli::{Cli, Command, ReadArgs},
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
        Command::Agent {
            manifests,
            pod_ifaces,
            bpffs,
            scheduler,
            maglev_table_size,
            metrics_addr,
        } => {
            let pod_ifaces = IfacePatterns::parse(&pod_ifaces)
                .with_context(|| format!("--pod-ifaces {pod_ifaces:?} is not a valid glob list"))?;
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&stop))
                    .context("installing signal handlers")?;
            }
            agent::run(
                AgentConfig {
                    manifests,
                    pod_ifaces,
                    bpffs,
                    scheduler,
                    maglev_table_size,
                    metrics_addr,
                },
                stop,
            )
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
        Command::Stats(args) => read(&args, |maps| {
            render(args.json, &inspect::stats(maps), inspect::stats_text)
        }),
        Command::Cleanup { bpffs } => {
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
