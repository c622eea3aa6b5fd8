//! `cargo xtask`: the one entry point for developers and CI.
mod bootstrap;
mod demo;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use xlb_tests::workspace::Workspace;

#[derive(Parser)]
#[command(about = "xlb developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing, then run every test layer (unit; datapath and end-to-end as root).
    Test {
        /// Only the unprivileged unit layer.
        #[arg(long)]
        unit_only: bool,
    },
    /// Without arguments: the demo in throw-away namespaces. With `-- AGENT ARGS`: run
    /// `xlb agent AGENT ARGS` for real on this host.
    Run {
        /// How long the demo drives traffic, in seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// The packet fuzzer at any size (root): mutated packets through every packet program.
    Fuzz {
        /// Packets (each runs through TC from-pod, TC to-pod and XDP).
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// Seed of the mutations (the same seed replays the same packets).
        #[arg(long, default_value_t = 0x786c_6221)]
        seed: u64,
    },
    /// Benchmarks: xlb against kube-proxy's iptables and nftables rulesets (root).
    Bench {
        /// Every scenario at the smallest scale (under two minutes).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ws = Workspace::current().context("finding the workspace (cargo metadata)")?;
    let root = &ws;
    match cli.task {
        Task::Test { unit_only } => test(root, unit_only),
        Task::Fuzz { packets, seed } => {
            bootstrap::ensure_build_tools()?;
            require_root("the fuzzer loads eBPF programs")?;
            bootstrap::ensure_test_tools()?;
            let (packets, seed) = (packets.to_string(), seed.to_string());
            cargo(
                root,
                &[
                    "test",
                    "--release",
                    "--package",
                    "xlb-tests",
                    "--features",
                    "datapath",
                    "--test",
                    "fuzz",
                    "--",
                    "--include-ignored",
                    "--nocapture",
                ],
                &[("XLB_FUZZ_PACKETS", &packets), ("XLB_FUZZ_SEED", &seed)],
            )
        }
        Task::Bench { quick } => {
            bootstrap::ensure_build_tools()?;
            require_root("the benchmark loads eBPF programs and builds namespaces")?;
            bootstrap::ensure_test_tools()?;
            bootstrap::ensure_bench_tools()?;
            bench(root, quick, &root.root.join("bench/results"))
        }
        Task::Run {
            seconds,
            agent_args,
        } => {
            bootstrap::ensure_build_tools()?;
            let xlb = build_xlb(root)?;
            if agent_args.is_empty() {
                require_root("the demo builds network namespaces")?;
                demo::run(&xlb, &root.root, seconds)
            } else {
                let status = Command::new(&xlb)
                    .arg("agent")
                    .args(&agent_args)
                    .status()
                    .with_context(|| format!("starting {}", xlb.display()))?;
                if !status.success() {
                    bail!("xlb agent exited with {status}");
                }
                Ok(())
            }
        }
    }
}

/// Validates the deploy and example manifests with `kubernetes-validate` (strict: unknown
/// fields are errors), installed from PyPI into target/ on first use.
fn validate_manifests(ws: &Workspace) -> Result<()> {
    let (root, tools) = (&ws.root, ws.target_dir.join("pytools"));
    if !tools.join("kubernetes_validate").exists() {
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--root-user-action=ignore")
            .args([
                "--target",
                &tools.to_string_lossy(),
                "kubernetes-validate==1.37.0",
            ])
            .status()
            .context("running pip (python3 -m pip) to install kubernetes-validate")?;
        if !status.success() {
            bail!("installing kubernetes-validate from PyPI failed ({status})");
        }
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["deploy", "examples/manifests"] {
        for entry in std::fs::read_dir(root.join(dir))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    let status = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            "1.34.0",
        ])
        .args(&files)
        .env("PYTHONPATH", &tools)
        .status()
        .context("running kubernetes-validate")?;
    if !status.success() {
        bail!("manifests do not match the Kubernetes 1.34 schema (see above)");
    }
    println!("{} manifest file(s) valid", files.len());
    Ok(())
}

/// Runs the benchmark (release build) writing into `out`.
fn bench(root: &Workspace, quick: bool, out: &Path) -> Result<()> {
    // The agent's memory is measured on the binary that ships (deploy/Containerfile builds
    // it in release): a debug build maps several times more of its own file.
    cargo(
        root,
        &[
            "build",
            "--release",
            "--package",
            "lb-userspace",
            "--bin",
            "xlb",
        ],
        &[],
    )?;
    let xlb = root.binary("release", "xlb");
    let out = out.to_string_lossy().to_string();
    let xlb = xlb.to_string_lossy().to_string();
    let mut args = vec![
        "run",
        "--release",
        "--quiet",
        "--package",
        "xlb-bench",
        "--",
        "--out",
        &out,
    ];
    if quick {
        args.push("--quick");
    }
    cargo(root, &args, &[("XLB_BIN", xlb.as_str())])
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}

/// Builds the `xlb` binary and returns its path.
fn build_xlb(root: &Workspace) -> Result<PathBuf> {
    cargo(
        root,
        &["build", "--package", "lb-userspace", "--bin", "xlb"],
        &[],
    )?;
    Ok(root.binary("debug", "xlb"))
}

fn cargo(root: &Workspace, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(&root.root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(root: &Workspace, unit_only: bool) -> Result<()> {
    bootstrap::ensure_build_tools()?;
    println!("== layer 1: unit tests (unprivileged)");
    cargo(root, &["test", "--workspace"], &[])?;
    println!("== layer 1: manifests against the Kubernetes 1.34 OpenAPI schema");
    validate_manifests(root)?;
    if unit_only {
        println!("SKIPPED layers 2 (datapath) and 3 (end-to-end): --unit-only");
        return Ok(());
    }
    if !is_root() {
        println!(
            "SKIPPED layers 2 (datapath, BPF_PROG_TEST_RUN) and 3 (end-to-end in network \
             namespaces): they load eBPF programs and create namespaces, which needs root. \
             Run `sudo cargo xtask test`."
        );
        return Ok(());
    }
    bootstrap::ensure_test_tools()?;
    let xlb = build_xlb(root)?;
    let xlb = xlb.to_string_lossy().to_string();
    let env = [("XLB_BIN", xlb.as_str())];
    println!("== layer 2: datapath tables (BPF_PROG_TEST_RUN)");
    cargo(
        root,
        &[
            "test",
            "--package",
            "xlb-tests",
            "--features",
            "datapath",
            "--test",
            "datapath",
            "--test",
            "datapath6",
            "--test",
            "schedulers",
            "--test",
            "external",
            "--test",
            "external6",
            "--test",
            "fuzz",
            "--",
            "--include-ignored",
        ],
        &env,
    )?;
    println!("== layer 3: end-to-end in network namespaces (real agent, real sockets)");
    cargo(
        root,
        &[
            "test",
            "--package",
            "xlb-tests",
            "--test",
            "e2e",
            "--test",
            "e2e_schedulers",
            "--test",
            "e2e_north_south",
            "--test",
            "e2e_conformance",
            "--test",
            "e2e_ipv6",
            "--",
            "--include-ignored",
            "--test-threads=1",
        ],
        &env,
    )?;
    println!("== bench --quick: every benchmark scenario at the smallest scale");
    bootstrap::ensure_bench_tools()?;
    bench(root, true, &root.target_dir.join("bench-quick"))?;
    // The real agent against the fake API server (loads programs, attaches nothing), with a
    // kubeconfig and in-cluster (environment and service account, over HTTPS).
    cargo(
        root,
        &[
            "test",
            "--package",
            "lb-userspace",
            "--test",
            "kube_watch",
            "the_agent_",
            "--",
            "--include-ignored",
        ],
        &env,
    )?;
    Ok(())
}
