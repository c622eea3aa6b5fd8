//! Making sure the pin directory is on a BPF filesystem.
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
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
    let target = CString::new(at.as_os_str().as_bytes())?;
    let kind = c"bpf";
    // SAFETY: all pointers are NUL-terminated strings alive for the call.
    let rc = unsafe {
        libc::mount(
            kind.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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
