//! Installs build and test prerequisites when missing; silent and fast when all is there.
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// nightly + rust-src (eBPF is built with -Z build-std) and bpf-linker (LLVM 22).
pub fn ensure_build_tools() -> Result<()> {
    if !succeeds("rustup", &["run", "nightly", "rustc", "--version"]) {
        say("installing the nightly toolchain (eBPF programs need it)");
        run(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        say("installing rust-src for nightly (eBPF programs are built with -Z build-std)");
        run(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    if !succeeds("bpf-linker", &["--version"]) {
        apt_install(&["llvm-22-dev", "libpolly-22-dev"])?;
        say("installing bpf-linker with LLVM 22 (about 70 s)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let status = Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .status()
            .context("running cargo install bpf-linker")?;
        if !status.success() {
            bail!("cargo install bpf-linker failed ({status})");
        }
    }
    Ok(())
}

/// What the privileged layers call out to: `ip` (iproute2), `nsenter` (util-linux),
/// `bpftool` (to forge an incompatible pinned map), `iptables`/`nft` (kube-proxy leftovers
/// for `xlb cleanup --kube-proxy-rules`), `python3` (node-process clients), `trafgen`
/// (netsniff-ng: pods' packets from an AF_PACKET TX ring; the namespace benchmark's load)
/// and `ethtool` (checksum offload off, so that receivers check translated checksums).
pub fn ensure_test_tools() -> Result<()> {
    let mut missing = Vec::new();
    if !succeeds("bpftool", &["version"]) {
        missing.push("bpftool");
    }
    if !succeeds("ip", &["-V"]) {
        missing.push("iproute2");
    }
    if !succeeds("nsenter", &["--version"]) {
        missing.push("util-linux");
    }
    if !succeeds("iptables-save", &["--version"]) {
        missing.push("iptables");
    }
    if !succeeds("nft", &["--version"]) {
        missing.push("nftables");
    }
    if !succeeds("python3", &["--version"]) {
        missing.push("python3");
    }
    if !succeeds("trafgen", &["--version"]) {
        missing.push("netsniff-ng");
    }
    if !succeeds("ethtool", &["--version"]) {
        missing.push("ethtool");
    }
    apt_install(&missing)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .context("running apt-get install")?;
    if !status.success() {
        bail!(
            "apt-get install {} failed ({status}); are you root?",
            missing.join(" ")
        );
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", package])
        .map(|s| s.contains("install ok installed"))
        .unwrap_or(false)
}

fn say(what: &str) {
    println!("xtask: {what}");
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// What `cargo xtask bench` calls out to besides the test tools: `rsvg-convert` (PNG plots).
pub fn ensure_bench_tools() -> Result<()> {
    let mut missing = Vec::new();
    if !succeeds("rsvg-convert", &["--version"]) {
        missing.push("librsvg2-bin");
    }
    apt_install(&missing)
}
