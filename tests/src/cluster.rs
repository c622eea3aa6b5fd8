//! A node with pods, their servers, a manifests directory and the real `xlb agent`, all torn
//! down on drop: agent stopped, pins removed, namespaces and files deleted.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cgroups::NodeCgroup,
    netns::run,
    topology::{Node, POD_IFACE_GLOB},
    workload::{Servers, serve},
};

/// The `xlb` binary: `$XLB_BIN` (set by `cargo xtask test`) or the workspace's debug build
/// (in the build directory cargo reports, which `CARGO_TARGET_DIR` may move).
pub fn xlb_binary() -> PathBuf {
    std::env::var_os("XLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::workspace::Workspace::current()
                .map(|ws| ws.binary("debug", "xlb"))
                .unwrap_or_else(|e| panic!("finding the xlb binary: {e:#}; set XLB_BIN"))
        })
}

/// A directory under /tmp removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Result<Scratch> {
        let path = std::env::temp_dir().join(format!("xlb-{tag}"));
        std::fs::create_dir_all(path.join("manifests"))?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes the agent's pins on drop (`xlb cleanup`), detaching its programs.
pub struct PinGuard {
    pub xlb: PathBuf,
    pub bpffs: PathBuf,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let bpffs = self.bpffs.to_string_lossy().to_string();
        let _ = run(&self.xlb.to_string_lossy(), &["cleanup", "--bpffs", &bpffs]);
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// The xlb container's arguments in deploy/xlb.yaml's DaemonSet.
pub fn daemonset_agent_args() -> Result<Vec<String>> {
    let root = crate::workspace::Workspace::current()?.root;
    let path = root.join("deploy/xlb.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    let containers = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .map(|d| d["spec"]["template"]["spec"]["containers"].clone())
        .context("no DaemonSet in deploy/xlb.yaml")?;
    let agent = containers
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "xlb")
        .context("no xlb container in the DaemonSet")?;
    Ok(agent["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect())
}

/// `args` (`--flag=value` or `--flag value` after a subcommand) with each override's value
/// in place of the flag's, and the overrides they do not have appended; of two overrides of
/// one flag, the later wins.
pub fn with_overrides(args: &[String], overrides: &[(String, String)]) -> Vec<String> {
    let mut latest: Vec<(String, String)> = Vec::new();
    for (flag, value) in overrides {
        latest.retain(|(f, _)| f != flag);
        latest.push((flag.clone(), value.clone()));
    }
    let overrides = latest.as_slice();
    let mut out = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
            None => (arg.clone(), None),
        };
        let takes_next = inline.is_none()
            && flag.starts_with("--")
            && args.get(i + 1).is_some_and(|next| !next.starts_with("--"));
        match overrides.iter().find(|(f, _)| *f == flag) {
            Some((f, value)) => {
                used.insert(f.clone());
                out.push(format!("{f}={value}"));
            }
            None => {
                out.push(arg.clone());
                if takes_next {
                    out.push(args[i + 1].clone());
                }
            }
        }
        i += if takes_next { 2 } else { 1 };
    }
    for (flag, value) in overrides.iter().filter(|(f, _)| !used.contains(f)) {
        out.push(format!("{flag}={value}"));
    }
    out
}

/// A running `xlb agent` in the node's network namespace; stopped on drop.
pub struct Agent {
    child: Child,
}

impl Agent {
    /// Starts the agent with the DaemonSet's arguments (deploy/xlb.yaml), the test's node
    /// values put in for the flags a test must set (`--manifests`, `--pod-ifaces`,
    /// `--bpffs`, `--external-ifaces`) and `extra` on top (`--flag value` pairs, which also
    /// replace the DaemonSet's value of the same flag).
    pub fn start(
        xlb: &Path,
        node: &Node,
        manifests: &Path,
        bpffs: &Path,
        log: &Path,
        extra: &[String],
    ) -> Result<Agent> {
        let mut overrides = vec![
            ("--manifests".to_string(), manifests.display().to_string()),
            ("--pod-ifaces".to_string(), POD_IFACE_GLOB.to_string()),
            ("--bpffs".to_string(), bpffs.display().to_string()),
            // The DaemonSet's NIC name; a test node has none unless the test gives one.
            ("--external-ifaces".to_string(), String::new()),
        ];
        overrides.extend(
            extra
                .chunks(2)
                .map(|pair| (pair[0].clone(), pair.get(1).cloned().unwrap_or_default())),
        );
        let args = with_overrides(&daemonset_agent_args()?, &overrides);
        let log_file = File::options().create(true).append(true).open(log)?;
        // nsenter joins only the network namespace, so /sys (bpffs) stays the host's;
        // `ip netns exec` would remount /sys and hide it.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", node.ns.path()))
            .arg(xlb)
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} agent", xlb.display()))?;
        Ok(Agent { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(mut self) -> Result<()> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("agent exited with {status}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("agent did not stop within 5 s of SIGTERM")
    }

    /// `kill -9`: the agent gets no chance to clean anything up.
    pub fn crash(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Everything a test or the demo needs. Fields drop in order: agent, servers, node, pins,
/// cgroup, files.
pub struct Cluster {
    pub agent: Option<Agent>,
    /// Extra `xlb agent` arguments (north-south tests: external interfaces, node name).
    pub agent_args: Vec<String>,
    pub servers: Vec<Servers>,
    pub node: Node,
    pub pins: PinGuard,
    /// The node cgroup (the agent's `--cgroup`) with a cgroup per pod below it.
    pub cgroup: NodeCgroup,
    pub scratch: Scratch,
}

impl Cluster {
    /// A node with `pods` (name, IP); every pod runs the TCP and UDP servers.
    pub fn new(pods: &[(&str, &str)]) -> Result<Cluster> {
        let pods: Vec<(&str, &str, Option<&str>)> =
            pods.iter().map(|(name, ip)| (*name, *ip, None)).collect();
        Cluster::dual_stack(&pods)
    }

    /// A node with `pods` (name, IPv4, IPv6 if any); the servers answer on both families.
    pub fn dual_stack(pods: &[(&str, &str, Option<&str>)]) -> Result<Cluster> {
        let mut node = Node::new()?;
        let xlb = xlb_binary();
        if !xlb.exists() {
            bail!(
                "{} not found: build it (cargo xtask test does) or set XLB_BIN",
                xlb.display()
            );
        }
        let scratch = Scratch::new(&node.tag)?;
        let pins = PinGuard {
            xlb,
            bpffs: PathBuf::from(format!("/sys/fs/bpf/xlb-test-{}", node.tag)),
        };
        let cgroup = NodeCgroup::new(&node.tag)?;
        // Test threads in the node's namespace are node processes.
        node.ns.set_cgroup(cgroup.path.clone());
        let mut servers = Vec::new();
        for (name, ip, ip6) in pods {
            let index = node.add_dual_stack_pod(name, ip, *ip6)?;
            node.pods[index].ns.set_cgroup(cgroup.pod(name)?);
            servers.push(serve(&node.pods[index])?);
        }
        Ok(Cluster {
            agent: None,
            agent_args: Vec::new(),
            servers,
            node,
            pins,
            cgroup,
            scratch,
        })
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.scratch.path.join("manifests")
    }

    pub fn log_path(&self) -> PathBuf {
        self.scratch.path.join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Writes a manifest atomically (write + rename), as config management tools do.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.scratch.path.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests_dir().join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        Ok(std::fs::remove_file(self.manifests_dir().join(file))?)
    }

    pub fn start_agent(&mut self) -> Result<()> {
        let agent = Agent::start(
            &self.pins.xlb,
            &self.node,
            &self.manifests_dir(),
            &self.pins.bpffs,
            &self.log_path(),
            &[
                vec![
                    "--cgroup".to_string(),
                    self.cgroup.path.display().to_string(),
                ],
                self.agent_args.clone(),
            ]
            .concat(),
        )?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Runs `xlb ARGS --bpffs <ours>` and returns stdout.
    pub fn xlb(&self, args: &[&str]) -> Result<String> {
        let bpffs = self.pins.bpffs.to_string_lossy().to_string();
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--bpffs", &bpffs]);
        let out = run(&self.pins.xlb.to_string_lossy(), &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `xlb services --json`, parsed.
    pub fn services(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.xlb(&["services", "--json"])?)?)
    }

    /// Starts a node process (in the node's network namespace and the node cgroup) running
    /// `python3 -c SCRIPT ARGS`, its output captured.
    pub fn node_process(&self, script: &str, args: &[&str]) -> Result<Child> {
        let procs = self.cgroup.path.join("cgroup.procs");
        Command::new("nsenter")
            .arg(format!("--net={}", self.node.ns.path()))
            .args([
                "sh",
                "-c",
                r#"echo $$ > "$0" && shift && exec python3 -c "$@""#,
            ])
            .arg(&procs)
            .arg("--")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting a node process")
    }

    /// GET `path` from the agent's HTTP endpoint on `port` inside the node's namespace.
    pub fn http_get(&self, port: u16, path: &str) -> Result<String> {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        self.node.ns.enter(move || -> Result<String> {
            use std::io::{Read as _, Write as _};
            let mut conn = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(2),
            )?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(request.as_bytes())?;
            let mut response = String::new();
            conn.read_to_string(&mut response)?;
            Ok(response)
        })?
    }

    /// The agent's Prometheus metrics (default `--metrics-addr`), body only.
    pub fn metrics(&self) -> Result<String> {
        let response = self.http_get(10249, "/metrics")?;
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => bail!("metrics request failed: {response}"),
        }
    }

    /// Backend addresses programmed for `frontend` ("IP:PORT/TCP", "[IPv6]:PORT/TCP"), if
    /// it exists.
    pub fn programmed(&self, frontend: &str) -> Option<Vec<String>> {
        let services = self.services().ok()?;
        services.as_array()?.iter().find_map(|row| {
            let f = &row["frontend"];
            let ip = f["ip"].as_str()?;
            let ip = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_string()
            };
            let name = format!(
                "{ip}:{}/{}",
                f["port"],
                f["protocol"].as_str()?.to_uppercase()
            );
            (name == frontend).then(|| {
                let mut list: Vec<String> = row["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| b["address"].as_str().map(String::from))
                    .collect();
                list.sort();
                list
            })
        })
    }

    /// Waits until the agent has attached to every pod interface.
    pub fn wait_attached(&self, timeout: Duration) -> Result<()> {
        let ifaces: Vec<String> = self
            .node
            .pods
            .iter()
            .map(|p| p.host_iface.clone())
            .collect();
        wait_until(timeout, || {
            let log = self.log();
            ifaces
                .iter()
                .all(|i| log.contains(&format!("attached to {i} ")))
        })
        .with_context(|| {
            format!(
                "agent did not attach to all pod interfaces; log:\n{}",
                self.log()
            )
        })
        .map(|_| ())
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns how long it took.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemonset_args_with_the_test_node_values() {
        let shipped = daemonset_agent_args().expect("deploy/xlb.yaml");
        assert_eq!(shipped.first().map(String::as_str), Some("agent"));
        let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let got = with_overrides(
            &strings(&[
                "agent",
                "--pod-ifaces=veth*",
                "--scheduler",
                "maglev",
                "--x",
            ]),
            &[
                ("--pod-ifaces".into(), "xp*".into()),
                ("--manifests".into(), "/m".into()),
            ],
        );
        assert_eq!(
            got,
            strings(&[
                "agent",
                "--pod-ifaces=xp*",
                "--scheduler",
                "maglev",
                "--x",
                "--manifests=/m"
            ])
        );
        let got = with_overrides(
            &strings(&["agent", "--scheduler", "maglev"]),
            &[
                ("--scheduler".into(), "random".into()),
                ("--scheduler".into(), "least-conn".into()),
            ],
        );
        assert_eq!(got, strings(&["agent", "--scheduler=least-conn"]));
    }
}
