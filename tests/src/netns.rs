//! Network namespaces owned by a test: unique names, deleted on drop (also on panic).
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short tag unique to this process and call: `<pid base36><counter>`.
pub fn unique_tag() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}{n}", radix36(std::process::id()))
}

fn radix36(mut v: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// Runs a command; error (with its stderr) unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace created by us and deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Threads that enter the namespace join this cgroup too (a pod's, or the node's).
    cgroup: Option<PathBuf>,
}

impl Netns {
    /// Creates `xlb-<tag>-<role>` with loopback up.
    pub fn new(tag: &str, role: &str) -> Result<Netns> {
        let name = format!("xlb-{tag}-{role}");
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name, cgroup: None };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full).map(|_| ())
    }

    /// Creates a veth pair: `host` in this namespace (with MAC `mac` if given), `eth0` in
    /// `peer` (a pod's end, or a backend's).
    pub fn add_veth(&self, host: &str, mac: Option<&str>, peer: &Netns) -> Result<()> {
        let mut args = vec!["link", "add", host];
        if let Some(mac) = mac {
            args.extend(["address", mac]);
        }
        args.extend(["type", "veth", "peer", "name", "eth0", "netns", peer.name()]);
        self.ip(&args)
    }

    /// Routes `prefix` out of `dev` via `gateway` (reached on the link), a permanent
    /// neighbour with MAC `mac`, so FIB lookups for it succeed without any traffic. IPv6
    /// if `gateway` is an IPv6 address.
    pub fn route_via(&self, dev: &str, prefix: &str, gateway: &str, mac: &str) -> Result<()> {
        let family = if gateway.contains(':') { "-6" } else { "-4" };
        self.ip(&[family, "route", "add", gateway, "dev", dev, "scope", "link"])?;
        self.ip(&[family, "route", "add", prefix, "via", gateway, "dev", dev])?;
        self.ip(&[
            family,
            "neigh",
            "add",
            gateway,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])
    }

    /// The (received, transmitted) packet counters of `iface` in this namespace.
    pub fn link_packets(&self, iface: &str) -> Result<(u64, u64)> {
        let out = run("ip", &["-n", &self.name, "-s", "-j", "link", "show", iface])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("`ip -s -j link show {iface}` in {}", self.name))?;
        let count = |dir: &str| {
            v[0]["stats64"][dir]["packets"]
                .as_u64()
                .with_context(|| format!("{dir} packets of {iface} in {}", self.name))
        };
        Ok((count("rx")?, count("tx")?))
    }

    /// Turns off transmit checksum offload of `iface` (`ethtool -K IFACE tx off`): what it
    /// sends leaves with the L4 checksum completed in software (`skb_checksum_help`) from
    /// what the stack and the programs left in the field, so the receiver checks that.
    pub fn tx_checksum_off(&self, iface: &str) -> Result<()> {
        let ns = self.name.as_str();
        run(
            "ip",
            &["netns", "exec", ns, "ethtool", "-K", iface, "tx", "off"],
        )?;
        let out = run("ip", &["netns", "exec", ns, "ethtool", "-k", iface])?;
        let features = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            features.contains("tx-checksumming: off"),
            "{iface} in {ns} still offloads checksums: {features}"
        );
        Ok(())
    }

    /// Segments and datagrams this namespace's stack dropped for a bad checksum:
    /// (TCP `InCsumErrors`, UDP `InCsumErrors`) of its /proc/net/snmp.
    pub fn checksum_errors(&self) -> Result<(u64, u64)> {
        let snmp = self.enter(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
        let counter = |proto: &str| -> Result<u64> {
            let mut lines = snmp.lines().filter(|l| l.starts_with(proto));
            let (names, values) = (lines.next(), lines.next());
            let (names, values) = names.zip(values).context("no such lines")?;
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == "InCsumErrors")
                .context("no InCsumErrors")?
                .1
                .parse()
                .context("not a number")
        };
        let in_ns = |proto: &str| {
            counter(proto).with_context(|| format!("{proto} InCsumErrors of {}", self.name))
        };
        Ok((in_ns("Tcp:")?, in_ns("Udp:")?))
    }

    /// Sets a sysctl inside the namespace (/proc/sys/net is per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value_owned = value.to_string();
        self.enter(move || std::fs::write(&path, value_owned))?
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Runs `f` on a thread that has joined this namespace; sockets it creates live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let handle = self.spawn(f)?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))
    }

    /// From now on, threads entering the namespace also join `cgroup` (threaded).
    pub fn set_cgroup(&mut self, cgroup: PathBuf) {
        self.cgroup = Some(cgroup);
    }

    /// Like `enter` but returns the running thread.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        let cgroup = self.cgroup.clone();
        Ok(std::thread::spawn(move || {
            // SAFETY: setns on an open netns fd only changes this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            if let Some(cgroup) = &cgroup {
                crate::cgroups::join_thread(cgroup)
                    .unwrap_or_else(|e| panic!("joining cgroup {}: {e}", cgroup.display()));
            }
            f()
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces (and the veth peers elsewhere).
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Namespaces whose names start with `xlb-<tag>`: to check that nothing was left behind.
pub fn leftover(tag: &str) -> Vec<String> {
    let prefix = format!("xlb-{tag}-");
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}
