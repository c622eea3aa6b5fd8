//! Builds the eBPF object (`lb-ebpf`, target bpfel-unknown-none) into OUT_DIR with aya-build.
//!
//! aya-build relays every line of the inner cargo build ("Compiling core …") as a
//! `cargo:warning`, which reads as dozens of warnings. So this script runs itself again as a
//! child that does the build, and passes on only cargo's directives, one "building eBPF
//! programs" line and real compiler diagnostics; when the inner build fails, everything.
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};

const INNER: &str = "XLB_EBPF_BUILD_INNER";

fn main() -> anyhow::Result<()> {
    if std::env::var_os(INNER).is_some() {
        return build();
    }
    let me = std::env::current_exe().context("locating the build script")?;
    let out = Command::new(&me)
        .env(INNER, "1")
        .output()
        .with_context(|| format!("running {}", me.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut relayed = Vec::new();
    for line in stdout.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(text) => relayed.push(text.to_string()),
            None => println!("{line}"),
        }
    }
    if !out.status.success() {
        for text in &relayed {
            println!("cargo:warning={text}");
        }
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("building the eBPF programs failed (inner build output above)");
    }
    println!("cargo:warning=building eBPF programs… done");
    for text in relayed.iter().filter(|t| !is_progress(t)) {
        println!("cargo:warning={text}");
    }
    Ok(())
}

/// Cargo's progress lines (not diagnostics).
fn is_progress(line: &str) -> bool {
    let word = line.split_whitespace().next().unwrap_or("");
    line.trim().is_empty()
        || matches!(
            word,
            "Compiling"
                | "Finished"
                | "Downloaded"
                | "Downloading"
                | "Updating"
                | "Locking"
                | "Adding"
                | "Blocking"
                | "Fresh"
                | "Checking"
        )
}

fn build() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata failed")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed: run `cargo xtask test` once to install nightly \
         rust-src and bpf-linker",
    )
}
