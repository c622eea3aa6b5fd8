//! Where the workspace and its build directory are, asked of cargo at run time: a build
//! directory may be shared (`CARGO_TARGET_DIR`, `build.target-dir`) and one built binary may
//! serve another checkout, so neither comes from compile-time paths.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Workspace {
    /// The workspace containing the current directory (`cargo metadata`).
    pub fn current() -> Result<Workspace> {
        Self::of(Path::new("."))
    }

    /// The workspace containing `dir`.
    pub fn of(dir: &Path) -> Result<Workspace> {
        let out = metadata_command(dir)
            .output()
            .with_context(|| format!("running cargo metadata in {}", dir.display()))?;
        if !out.status.success() {
            bail!(
                "cargo metadata in {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Self::from_metadata(&out.stdout)
    }

    fn from_metadata(json: &[u8]) -> Result<Workspace> {
        let meta: serde_json::Value =
            serde_json::from_slice(json).context("cargo metadata printed no JSON")?;
        let path = |field: &str| {
            meta[field]
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("cargo metadata has no {field}"))
        };
        Ok(Workspace {
            root: path("workspace_root")?,
            target_dir: path("target_directory")?,
        })
    }

    /// A binary of the workspace built in `profile` ("debug", "release").
    pub fn binary(&self, profile: &str, name: &str) -> PathBuf {
        self.target_dir.join(profile).join(name)
    }
}

/// `cargo metadata` of the workspace containing `dir`, workspace members only.
fn metadata_command(dir: &Path) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(dir);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_come_from_cargo_metadata() {
        let ws = Workspace::from_metadata(
            br#"{"workspace_root":"/src/xlb","target_directory":"/cache/target","packages":[]}"#,
        )
        .expect("metadata");
        assert_eq!(ws.root, PathBuf::from("/src/xlb"));
        assert_eq!(
            ws.binary("debug", "xlb"),
            PathBuf::from("/cache/target/debug/xlb")
        );
        assert!(Workspace::from_metadata(b"{}").is_err());
    }

    #[test]
    fn a_shared_target_dir_is_followed() {
        let here = Workspace::current().expect("cargo metadata");
        let shared = std::env::temp_dir().join("xlb-shared-target");
        let out = metadata_command(&here.root)
            .env("CARGO_TARGET_DIR", &shared)
            .output()
            .expect("cargo metadata");
        let ws = Workspace::from_metadata(&out.stdout).expect("metadata");
        assert_eq!(ws.target_dir, shared);
        assert_eq!(ws.root, here.root);
    }
}
