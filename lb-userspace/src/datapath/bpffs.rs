//! Making sure the pin directory is on a BPF filesystem.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot create pin directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not on a BPF filesystem and mounting one at {mountpoint} failed: {source}; \
         mount it yourself (`mount -t bpf bpf {mountpoint}`) or pass --bpffs on a bpffs"
    )]
    Mount {
        path: PathBuf,
        mountpoint: PathBuf,
        source: std::io::Error,
    },
}

/// True if `path` exists and lives on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|stat| stat.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Ensures `dir` exists on a bpffs: if its parent is not one, mounts bpffs on the parent
/// (on a fresh node `/sys/fs/bpf` is often not mounted), then creates `dir`.
pub fn ensure_pin_dir(dir: &Path) -> Result<(), BpffsError> {
    let mountpoint = dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    if !is_bpffs(&mountpoint) && !is_bpffs(dir) {
        std::fs::create_dir_all(&mountpoint).map_err(|source| BpffsError::CreateDir {
            path: mountpoint.clone(),
            source,
        })?;
        mount_bpffs(&mountpoint).map_err(|source| BpffsError::Mount {
            path: dir.to_path_buf(),
            mountpoint: mountpoint.clone(),
            source,
        })?;
        log::info!("mounted bpffs at {}", mountpoint.display());
    }
    std::fs::create_dir_all(dir).map_err(|source| BpffsError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

fn mount_bpffs(at: &Path) -> std::io::Result<()> {
    nix::mount::mount(
        Some("bpf"),
        at,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}

/// Where the cgroup v2 hierarchy is mounted (the first `cgroup2` entry of /proc/self/mounts).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, mountpoint, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
    })
}
