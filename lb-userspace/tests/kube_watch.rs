//! The Kubernetes API source against a fake API server speaking list/watch: kube-rs and the
//! translation unchanged, real HTTP on 127.0.0.1, no privileges needed.
mod fake_apiserver;

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use fake_apiserver::{FakeApi, Kind, TlsFront};
use xlb::{
    model::{Endpoint, Frontend, Protocol},
    source::kube::{KubeSource, Snapshot},
    translate::{Options, translate},
};

const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
spec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, protocol: TCP}]\n";

fn slice(endpoints: &[(&str, &str, &str)]) -> String {
    let mut out = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
         namespace: shop\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\n\
         ports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n",
    );
    for (ip, condition, zone_hint) in endpoints {
        let conditions = match *condition {
            "terminating" => "{ready: false, serving: true, terminating: true}",
            _ => "{ready: true, serving: true, terminating: false}",
        };
        let hints = if zone_hint.is_empty() {
            String::new()
        } else {
            format!(", hints: {{forZones: [{{name: {zone_hint}}}]}}")
        };
        out.push_str(&format!(
            "- {{addresses: [\"{ip}\"], conditions: {conditions}{hints}}}\n"
        ));
    }
    out
}

struct Watching {
    api: FakeApi,
    source: KubeSource,
    latest: Snapshot,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(objects: &[&str]) -> Watching {
    let api = FakeApi::start();
    for o in objects {
        api.apply(o);
    }
    let dir =
        TempDir(std::env::temp_dir().join(format!("xlb-kube-{}-{}", std::process::id(), api.port)));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let source = KubeSource::start(Some(kubeconfig), "node1", xlb::agent::wake::Wake::default())
        .expect("source starts");
    Watching {
        api,
        source,
        latest: Snapshot::default(),
        _dir: dir,
    }
}

impl Watching {
    /// Polls until `want` holds for the endpoints of 10.96.0.10:80 (or 10 s pass).
    fn wait_for(&mut self, what: &str, want: impl Fn(Option<&Vec<Endpoint>>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(snapshot) = self.source.poll() {
                self.latest = snapshot;
            }
            let options = Options {
                zone: self.latest.zone.clone(),
                node_name: Some("node1".into()),
                ..Options::default()
            };
            let t = translate(&self.latest.objects, &options);
            let frontend = Frontend::internal(Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp);
            let endpoints = t.desired.get(&frontend).map(|s| s.endpoints.clone());
            if want(endpoints.as_ref()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: endpoints still {endpoints:?}; requests: {:#?}",
                self.api.requests()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn ips(endpoints: Option<&Vec<Endpoint>>) -> Vec<String> {
    endpoints
        .map(|e| e.iter().map(|e| e.ip.to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn initial_list_then_adds_modifications_and_deletes() {
    let one = slice(&[("10.244.1.2", "ready", "")]);
    let mut w = start(&[WEB, &one]);
    w.wait_for("initial list", |e| ips(e) == ["10.244.1.2"]);
    w.api.apply(&slice(&[
        ("10.244.1.2", "ready", ""),
        ("10.244.2.3", "ready", ""),
    ]));
    w.wait_for("modified slice", |e| ips(e) == ["10.244.1.2", "10.244.2.3"]);
    w.api.delete(Kind::Service, "shop", "web");
    w.wait_for("service deleted", |e| e.is_none());
    w.api.apply(WEB);
    w.wait_for("service added back", |e| ips(e).len() == 2);
    // The watches were streams, not polling: a handful of lists, then watches.
    let requests = w.api.requests();
    assert!(
        requests.iter().any(|r| r.contains("watch=true")),
        "{requests:#?}"
    );
    assert!(requests.len() < 20, "no busy relisting: {requests:#?}");
}

#[test]
fn relists_after_410_gone() {
    let mut w = start(&[WEB, &slice(&[("10.244.1.2", "ready", "")])]);
    w.wait_for("initial list", |e| ips(e) == ["10.244.1.2"]);
    let lists_before = w
        .api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch="))
        .count();
    // History compacted, and a change the old watch can no longer deliver.
    w.api.expire_history();
    w.api.apply(&slice(&[("10.244.3.4", "ready", "")]));
    w.wait_for("state after relist", |e| ips(e) == ["10.244.3.4"]);
    let lists_after = w
        .api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch="))
        .count();
    assert!(
        lists_after > lists_before,
        "relisted: {:#?}",
        w.api.requests()
    );
}

#[test]
fn survives_an_api_outage_and_catches_up() {
    let mut w = start(&[WEB, &slice(&[("10.244.1.2", "ready", "")])]);
    w.wait_for("initial list", |e| ips(e) == ["10.244.1.2"]);
    w.api.set_down(true);
    w.api.apply(&slice(&[
        ("10.244.1.2", "ready", ""),
        ("10.244.9.9", "ready", ""),
    ]));
    // Meanwhile the last known state stands, and the client backs off instead of spinning.
    let requests_at_start = w.api.requests().len();
    std::thread::sleep(Duration::from_secs(2));
    w.wait_for("state kept while down", |e| ips(e) == ["10.244.1.2"]);
    assert!(w.source.errors() > 0, "the outage was noticed");
    w.api.set_down(false);
    w.wait_for("caught up", |e| ips(e) == ["10.244.1.2", "10.244.9.9"]);
    let during = w.api.requests().len() - requests_at_start;
    assert!(during < 30, "{during} requests around a 2 s outage");
}

#[test]
fn topology_hints_and_terminating_fallback() {
    let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels: \
                {topology.kubernetes.io/zone: zone-a}\n";
    let other = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node2\n  labels: \
                 {topology.kubernetes.io/zone: zone-b}\n";
    let hinted = WEB.replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, annotations: {service.kubernetes.io/topology-mode: Auto}}",
    );
    let zoned = slice(&[
        ("10.244.1.2", "ready", "zone-a"),
        ("10.244.2.3", "ready", "zone-b"),
    ]);
    let mut w = start(&[node, other, &hinted, &zoned]);
    // Only this node's Node is watched: its zone, zone-a, picks the hinted endpoint.
    w.wait_for("zone-a endpoints", |e| ips(e) == ["10.244.1.2"]);
    assert_eq!(w.latest.zone.as_deref(), Some("zone-a"));
    // An endpoint without hints: kube-proxy ignores hints altogether.
    w.api.apply(&slice(&[
        ("10.244.1.2", "ready", "zone-a"),
        ("10.244.2.3", "ready", "zone-b"),
        ("10.244.4.4", "ready", ""),
    ]));
    w.wait_for("hints ignored", |e| ips(e).len() == 3);
    // Nothing ready: serving+terminating endpoints take over.
    w.api.apply(&slice(&[
        ("10.244.5.5", "terminating", ""),
        ("10.244.6.6", "terminating", ""),
    ]));
    w.wait_for("terminating fallback", |e| {
        ips(e) == ["10.244.5.5", "10.244.6.6"]
    });
    assert!(
        w.api
            .requests()
            .iter()
            .any(|r| r.contains("fieldSelector=metadata.name")),
        "{:#?}",
        w.api.requests()
    );
}

#[test]
fn a_fatal_agent_error_is_recorded_as_an_event_on_the_node() {
    let api = FakeApi::start();
    let dir = TempDir(std::env::temp_dir().join(format!("xlb-event-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    // A pin directory that cannot exist: the agent fails before touching the datapath.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["agent", "--kubeconfig"])
        .arg(&kubeconfig)
        .args([
            "--node-name",
            "node7",
            "--bpffs",
            "/dev/null/xlb",
            "--cgroup",
            "none",
        ])
        .output()
        .expect("run xlb");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot create pin directory /dev/null"),
        "{stderr}"
    );
    let events = api.events();
    assert_eq!(events.len(), 1, "{events:?} / {stderr}");
    let event = &events[0];
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "XlbAgentFailed");
    assert_eq!(event["regarding"]["kind"], "Node");
    assert_eq!(event["regarding"]["name"], "node7");
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains("cannot create pin directory /dev/null")),
        "{event}"
    );
}

/// The privileged test loads programs: it is `#[ignore]`d, and `cargo xtask test` runs it
/// as root with `--include-ignored`. Asked for without root, it fails with the reason.
fn require_privileges() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test loads eBPF programs: run it as root (`sudo cargo xtask test`)"
    );
}

/// Removes the agent's pins, and stops it, on drop.
struct AgentGuard {
    child: std::process::Child,
    bpffs: std::path::PathBuf,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
            .arg("cleanup")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .output();
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

fn programmed(bpffs: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["services", "--json", "--bpffs"])
        .arg(bpffs)
        .output()
        .expect("xlb services");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut backends: Vec<String> = rows
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["backends"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["address"].as_str().map(String::from))
        .collect();
    backends.sort();
    backends
}

/// The agent flags of these tests: nothing attached anywhere, loopback-only endpoints.
const QUIET_AGENT: [&str; 10] = [
    "--node-name",
    "node1",
    "--pod-ifaces",
    "xlb-none-*",
    "--cgroup",
    "none",
    "--metrics-addr",
    "127.0.0.1:0",
    "--healthz-addr",
    "127.0.0.1:0",
];

/// Runs the agent `command` (given its --bpffs) against `api` and checks that it programs
/// the maps from the API and follows changes.
fn programs_the_datapath_from(api: &FakeApi, command: impl FnOnce(&Path) -> Command) {
    api.apply(WEB);
    api.apply(&slice(&[("10.244.1.2", "ready", "")]));
    let bpffs = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/xlb-kube-{}-{}",
        std::process::id(),
        api.port
    ));
    let child = command(&bpffs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the agent");
    let _agent = AgentGuard {
        child,
        bpffs: bpffs.clone(),
    };
    let wait = |want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while programmed(&bpffs) != want {
            assert!(
                Instant::now() < deadline,
                "still {:?}, want {want:?}",
                programmed(&bpffs)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait(&["10.244.1.2:8080"]);
    api.apply(&slice(&[
        ("10.244.1.2", "ready", ""),
        ("10.244.2.3", "ready", ""),
    ]));
    wait(&["10.244.1.2:8080", "10.244.2.3:8080"]);
    // The Service made dual-stack, its IPv6 slice added (the EndpointSlice controller
    // writes one per family): IPv6 backends programmed beside the IPv4 ones.
    api.apply(&WEB.replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00:10:96::10']\n  \
         ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack\n",
    ));
    api.apply(
        &slice(&[("fd00:10:244:1::2", "ready", "")])
            .replace("name: web-1", "name: web-v6")
            .replace("addressType: IPv4", "addressType: IPv6"),
    );
    wait(&[
        "10.244.1.2:8080",
        "10.244.2.3:8080",
        "[fd00:10:244:1::2]:8080",
    ]);
    api.delete(Kind::Service, "shop", "web");
    wait(&[]);
}

/// The real agent, watching the fake API server, programs the maps and follows changes.
/// Nothing is attached anywhere (no interface matches, no cgroup), nothing is sent.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn the_agent_programs_the_datapath_from_the_api() {
    require_privileges();
    let api = FakeApi::start();
    let dir = TempDir(std::env::temp_dir().join(format!("xlb-agent-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    programs_the_datapath_from(&api, |bpffs| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_xlb"));
        command
            .args(["agent", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(QUIET_AGENT)
            .arg("--bpffs")
            .arg(bpffs);
        command
    });
}

/// The DaemonSet's way: no kubeconfig, the API server from KUBERNETES_SERVICE_HOST/PORT
/// (the xlb-kubernetes-api ConfigMap) over HTTPS, the service account's token, CA and
/// namespace from /var/run/secrets/kubernetes.io/serviceaccount. The agent runs in a mount
/// namespace of its own with a tmpfs on /run holding those files, so the host's /run is
/// never touched.
#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn the_agent_runs_in_cluster_from_the_environment_and_service_account() {
    require_privileges();
    let api = FakeApi::start();
    let tls = TlsFront::start(&api);
    let dir = TempDir(std::env::temp_dir().join(format!("xlb-incluster-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    for (file, content) in [
        ("token", "test"),
        ("ca.crt", tls.ca_pem.as_str()),
        ("namespace", "kube-system"),
    ] {
        std::fs::write(dir.0.join(file), content).expect("service account file");
    }
    // The agent mounts bpffs only where it is missing; doing it here first keeps the mount
    // in the host's mount namespace, where this test reads the pins.
    let probe = std::path::PathBuf::from(format!("/sys/fs/bpf/xlb-probe-{}", std::process::id()));
    xlb::datapath::bpffs::ensure_pin_dir(&probe).expect("bpffs");
    let _ = std::fs::remove_dir(&probe);
    programs_the_datapath_from(&api, |bpffs| {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                "mount -t tmpfs tmpfs /run && \
                 mkdir -p /run/secrets/kubernetes.io/serviceaccount && \
                 cp \"$0\"/* /run/secrets/kubernetes.io/serviceaccount/ && exec \"$@\"",
            )
            .arg(&dir.0)
            .arg(env!("CARGO_BIN_EXE_xlb"))
            .arg("agent")
            .args(QUIET_AGENT)
            .arg("--bpffs")
            .arg(bpffs)
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", tls.port.to_string());
        command
    });
}
