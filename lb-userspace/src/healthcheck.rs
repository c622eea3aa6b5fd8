//! healthCheckNodePort servers: for each externalTrafficPolicy Local LoadBalancer service,
//! answer what kube-proxy answers, so cloud load balancers send traffic only to nodes with
//! local endpoints: 200 with the local endpoint count, or 503 when there are none.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::model::HealthCheck;

/// The status line and JSON body kube-proxy's service health server sends.
pub fn response(check: &HealthCheck) -> (&'static str, String) {
    let status = if check.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    (status, body.to_string())
}

struct Server {
    state: Arc<Mutex<HealthCheck>>,
    stop: Arc<AtomicBool>,
}

/// The running servers, one per port, kept equal to the wanted set.
#[derive(Default)]
pub struct HealthServers {
    servers: BTreeMap<u16, Server>,
    /// Ports that could not be bound, so the error is logged once.
    failed: BTreeMap<u16, String>,
}

impl HealthServers {
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.stop.store(true, Ordering::Relaxed);
                log::info!("stopped health check server on port {port}");
            }
            keep
        });
        self.failed.retain(|port, _| wanted.contains_key(port));
        for (port, check) in wanted {
            if let Some(server) = self.servers.get(port) {
                if let Ok(mut state) = server.state.lock() {
                    *state = check.clone();
                }
                continue;
            }
            match start(*port, check.clone()) {
                Ok(server) => {
                    log::info!(
                        "health check for {}/{} on port {port}",
                        check.namespace,
                        check.name
                    );
                    self.servers.insert(*port, server);
                }
                Err(e) => {
                    let message = format!(
                        "cannot serve healthCheckNodePort {port} of {}/{}: {e}",
                        check.namespace, check.name
                    );
                    if self.failed.insert(*port, message.clone()).is_none() {
                        log::error!("{message}; retrying on the next change");
                    }
                }
            }
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.stop.store(true, Ordering::Relaxed);
        }
    }
}

fn start(port: u16, check: HealthCheck) -> std::io::Result<Server> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    listener.set_nonblocking(true)?;
    let state = Arc::new(Mutex::new(check));
    let stop = Arc::new(AtomicBool::new(false));
    let (thread_state, thread_stop) = (Arc::clone(&state), Arc::clone(&stop));
    std::thread::spawn(move || {
        while !thread_stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let check = thread_state.lock().map(|s| s.clone());
                    if let Ok(check) = check {
                        let _ = answer(conn, &check);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    Ok(Server { state, stop })
}

fn answer(mut conn: TcpStream, check: &HealthCheck) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    // Any path answers, as kube-proxy's does; the request line is read so the client's
    // request is consumed before we close.
    let mut request_line = String::new();
    BufReader::new(&conn).read_line(&mut request_line)?;
    let (status, body) = response(check);
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: \
         nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_compatible_answers() {
        let mut check = HealthCheck {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (status, body) = response(&check);
        assert_eq!(status, "200 OK");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        check.local_endpoints = 0;
        assert_eq!(response(&check).0, "503 Service Unavailable");
    }
}
