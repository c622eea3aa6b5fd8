//! A Kubernetes API server stand-in for Services, EndpointSlices and Nodes that speaks the
//! list/watch protocol as kube-apiserver does: lists with a collection resourceVersion,
//! chunked watch streams of ADDED/MODIFIED/DELETED events from a resourceVersion, BOOKMARKs,
//! `410 Gone` (an ERROR event with an Expired Status) for compacted resourceVersions, and
//! outages (connections dropped, existing streams cut). Plain HTTP on 127.0.0.1.
#![allow(dead_code)]
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }
    fn from_object(object: &Value) -> Kind {
        match object["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("Node") => Kind::Node,
            other => panic!("fake API server does not serve {other:?}"),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

type Key = (Kind, String, String);

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, kind, event type, object) of every change.
    log: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    /// Bumped to cut every open watch stream.
    epoch: u64,
    requests: Vec<String>,
    /// Bodies of Events created (POST .../events).
    events: Vec<Value>,
}

pub struct FakeApi {
    pub port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    pub fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let down = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, down, stop) = (Arc::clone(&state), Arc::clone(&down), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) if down.load(Ordering::Relaxed) => drop(conn),
                        Ok((conn, _)) => {
                            let (state, down, stop) =
                                (Arc::clone(&state), Arc::clone(&down), Arc::clone(&stop));
                            std::thread::spawn(move || serve(conn, &state, &down, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        FakeApi {
            port,
            state,
            down,
            stop,
            thread: Some(thread),
        }
    }

    /// A kubeconfig pointing at this server, written to `path`.
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: \
             http://127.0.0.1:{}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: \
             fake}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{token: test}}\n",
            self.port
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    /// Creates or replaces an object given as YAML.
    pub fn apply(&self, yaml: &str) {
        let mut object: Value = serde_saphyr::from_str(yaml).expect("object YAML");
        let kind = Kind::from_object(&object);
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or(if kind == Kind::Node { "" } else { "default" })
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        let (lock, changed) = &*self.state;
        let mut state = lock.lock().expect("state");
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{name}"));
        if kind != Kind::Node {
            object["metadata"]["namespace"] = json!(namespace);
        }
        let key = (kind, namespace, name);
        let event = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert(key, object.clone());
        state.log.push((rv, kind, event, object));
        changed.notify_all();
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let (lock, changed) = &*self.state;
        let mut state = lock.lock().expect("state");
        let key = (kind, namespace.to_string(), name.to_string());
        let Some(mut object) = state.objects.remove(&key) else {
            return;
        };
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        let rv = state.rv;
        state.log.push((rv, kind, "DELETED", object));
        changed.notify_all();
    }

    /// Compacts history: open watches get `410 Gone` and must relist. History moves on first
    /// (another object's change, as in a busy cluster), so every resourceVersion a client
    /// holds is older than what is kept, whatever bookmarks it saw.
    pub fn expire_history(&self) {
        let (lock, changed) = &*self.state;
        let mut state = lock.lock().expect("state");
        state.rv += 1;
        state.compacted_below = state.rv + 1;
        state.epoch += 1;
        changed.notify_all();
    }

    /// Outage: new connections are dropped, open streams cut. `false` ends it.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
        let (lock, changed) = &*self.state;
        lock.lock().expect("state").epoch += 1;
        changed.notify_all();
    }

    /// Events posted so far.
    pub fn events(&self) -> Vec<Value> {
        self.state.0.lock().expect("state").events.clone()
    }

    /// Request lines served so far ("GET /api/v1/services?..." ...).
    pub fn requests(&self) -> Vec<String> {
        self.state.0.lock().expect("state").requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.state.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn query(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let params = q
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('=').or(Some((p, ""))))
        .map(|(k, v)| (k.to_string(), v.replace("%3D", "=").replace("%2C", ",")))
        .collect();
    (path.to_string(), params)
}

/// Serves requests on one connection until it closes (HTTP/1.1 keep-alive).
fn serve(
    conn: TcpStream,
    state: &Arc<(Mutex<State>, Condvar)>,
    down: &AtomicBool,
    stop: &AtomicBool,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; content_length];
        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
            return;
        }
        if down.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
            return;
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        state
            .0
            .lock()
            .expect("state")
            .requests
            .push(request_line.trim().to_string());
        let (path, params) = query(&target);
        if request_line.starts_with("POST") && path.ends_with("/events") {
            let mut event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            event["metadata"]["resourceVersion"] = json!("1");
            state.0.lock().expect("state").events.push(event.clone());
            if respond(&mut writer, "201 Created", &event.to_string()).is_err() {
                return;
            }
            continue;
        }
        let Some(kind) = Kind::from_path(&path) else {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404})
            .to_string();
            if respond(&mut writer, "404 Not Found", &body).is_err() {
                return;
            }
            continue;
        };
        let node_name = params
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("metadata.name="))
            .map(str::to_string);
        let selected = |object: &Value| {
            node_name
                .as_deref()
                .is_none_or(|n| object["metadata"]["name"].as_str() == Some(n))
        };
        if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from: u64 = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            watch(&mut writer, state, kind, from, &selected, down, stop);
            return; // a watch ends its connection
        }
        let (items, rv) = {
            let state = state.0.lock().expect("state");
            let items: Vec<Value> = state
                .objects
                .iter()
                .filter(|((k, _, _), o)| *k == kind && selected(o))
                .map(|(_, o)| o.clone())
                .collect();
            (items, state.rv)
        };
        let body = json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        })
        .to_string();
        if respond(&mut writer, "200 OK", &body).is_err() {
            return;
        }
    }
}

fn respond(writer: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        writer,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn chunk(writer: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(writer, "{:x}\r\n{data}\r\n", data.len())?;
    writer.flush()
}

/// Streams events after `from` until the epoch changes (expiry, outage) or the client leaves.
fn watch(
    writer: &mut TcpStream,
    state: &Arc<(Mutex<State>, Condvar)>,
    kind: Kind,
    from: u64,
    selected: &dyn Fn(&Value) -> bool,
    down: &AtomicBool,
    stop: &AtomicBool,
) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if writer.write_all(head.as_bytes()).is_err() {
        return;
    }
    let (lock, changed) = &**state;
    let mut sent_up_to = from;
    let epoch = lock.lock().expect("state").epoch;
    let mut last_bookmark = Instant::now();
    loop {
        let guard = lock.lock().expect("state");
        if guard.epoch != epoch || down.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
            if guard.compacted_below > sent_up_to && !down.load(Ordering::Relaxed) {
                drop(guard);
                let _ = chunk(writer, &gone().to_string());
                let _ = writer.write_all(b"0\r\n\r\n");
            }
            return;
        }
        if sent_up_to + 1 < guard.compacted_below {
            drop(guard);
            let _ = chunk(writer, &gone().to_string());
            let _ = writer.write_all(b"0\r\n\r\n");
            return;
        }
        let events: Vec<(u64, &'static str, Value)> = guard
            .log
            .iter()
            .filter(|(rv, k, _, o)| *rv > sent_up_to && *k == kind && selected(o))
            .map(|(rv, _, t, o)| (*rv, *t, o.clone()))
            .collect();
        let current = guard.rv;
        if events.is_empty() {
            let (g, _) = changed
                .wait_timeout(guard, Duration::from_millis(200))
                .expect("wait");
            drop(g);
            if last_bookmark.elapsed() > Duration::from_secs(1) {
                last_bookmark = Instant::now();
                let bookmark = json!({"type": "BOOKMARK", "object": {
                    "kind": kind.name(), "apiVersion": kind.api_version(),
                    "metadata": {"resourceVersion": current.to_string()}}});
                if chunk(writer, &bookmark.to_string()).is_err() {
                    return;
                }
                sent_up_to = sent_up_to.max(current);
            }
            continue;
        }
        drop(guard);
        for (rv, event, object) in events {
            let line = json!({"type": event, "object": object}).to_string();
            if chunk(writer, &line).is_err() {
                return;
            }
            sent_up_to = rv;
        }
    }
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired",
        "code": 410}})
}

/// HTTPS in front of a [`FakeApi`] (a self-signed certificate for 127.0.0.1), as in-cluster
/// clients insist on: each TLS connection is relayed to the plain server.
pub struct TlsFront {
    pub port: u16,
    /// PEM of the certificate (the service account's `ca.crt`).
    pub ca_pem: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TlsFront {
    pub fn start(api: &FakeApi) -> TlsFront {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
            .expect("self-signed certificate");
        let ca_pem = cert.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let backend = api.port;
        runtime.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(conn).await else {
                        return;
                    };
                    if let Ok(mut plain) =
                        tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        });
        TlsFront {
            port,
            ca_pem,
            runtime: Some(runtime),
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
