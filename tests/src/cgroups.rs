//! cgroups as a node has them, inside a subtree the test creates and removes: a node cgroup
//! standing in for the root cgroup (the agent's `--cgroup`), and below it one cgroup per pod,
//! as kubelet places pod processes. The agent's socket hooks thus see pods' sockets, as on a
//! real node.
//!
//! Pods' "processes" are test threads, so the subtree is threaded (cgroup v2): the test
//! process joins a domain cgroup of its own, and a thread that enters a pod's namespace
//! also joins that pod's cgroup. The process returns to its previous cgroup, and every cgroup
//! made here is removed, when the last user is dropped.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The cgroup v2 mount.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup v2 mount for the node's cgroups")
}

/// This process's cgroup domain for the test's node and pod cgroups.
pub struct TestDomain {
    pub path: PathBuf,
    /// Where the process was before, to return to.
    previous: PathBuf,
}

static DOMAIN: Mutex<Weak<TestDomain>> = Mutex::new(Weak::new());

impl TestDomain {
    /// The domain of this process, created (and joined) by the first caller.
    pub fn shared() -> Result<Arc<TestDomain>> {
        let mut slot = DOMAIN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(domain) = slot.upgrade() {
            return Ok(domain);
        }
        let root = cgroup2_root()?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 entry in /proc/self/cgroup")?;
        let previous = root.join(relative.trim_start_matches('/'));
        let path = root.join(format!("xlb-tests-{}", std::process::id()));
        // Named by our pid: one left behind (a failed test's threads were still leaving
        // it at its removal) is this process's own, reused rather than failing every test
        // after.
        match std::fs::create_dir(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                Err(e).with_context(|| format!("creating {}", path.display()))?
            }
            _ => {}
        }
        let domain = Arc::new(TestDomain { path, previous });
        move_process(&domain.path)?;
        *slot = Arc::downgrade(&domain);
        Ok(domain)
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        if let Err(e) = move_process(&self.previous) {
            eprintln!("cleanup: returning to {}: {e:#}", self.previous.display());
        }
        remove(&self.path);
    }
}

fn move_process(to: &Path) -> Result<()> {
    std::fs::write(to.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving this process into {}", to.display()))
}

/// Makes `path` a threaded cgroup (so threads of the test process may join it).
fn threaded(path: &Path) -> Result<()> {
    std::fs::create_dir(path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::write(path.join("cgroup.type"), "threaded")
        .with_context(|| format!("making {} threaded", path.display()))
}

/// Removes an (emptying) cgroup; threads that just exited may still be leaving it.
fn remove(path: &Path) {
    let started = Instant::now();
    while let Err(e) = std::fs::remove_dir(path) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return;
        }
        if started.elapsed() > Duration::from_secs(2) {
            eprintln!("cleanup: removing cgroup {}: {e}", path.display());
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A node's cgroup (the agent's `--cgroup`) and its pods' cgroups.
pub struct NodeCgroup {
    pub path: PathBuf,
    pods: Mutex<Vec<PathBuf>>,
    _domain: Arc<TestDomain>,
}

impl NodeCgroup {
    pub fn new(tag: &str) -> Result<NodeCgroup> {
        let domain = TestDomain::shared()?;
        let path = domain.path.join(format!("node-{tag}"));
        threaded(&path)?;
        Ok(NodeCgroup {
            path,
            pods: Mutex::new(Vec::new()),
            _domain: domain,
        })
    }

    /// The cgroup of pod `name`, created below the node's.
    pub fn pod(&self, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.contains('/') {
            bail!("bad pod name {name:?}");
        }
        let path = self.path.join(format!("pod-{name}"));
        threaded(&path)?;
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        Ok(path)
    }
}

impl Drop for NodeCgroup {
    fn drop(&mut self) {
        for pod in self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            remove(&pod);
        }
        remove(&self.path);
    }
}

/// Moves the calling thread into `cgroup` (threaded).
pub fn join_thread(cgroup: &Path) -> std::io::Result<()> {
    // "0" is the writing thread itself.
    std::fs::write(cgroup.join("cgroup.threads"), "0")
}
