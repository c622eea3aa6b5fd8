//! healthCheckNodePort servers: for each externalTrafficPolicy Local LoadBalancer service,
//! answer what kube-proxy answers, so cloud load balancers send traffic only to nodes with
//! local endpoints: 200 with the local endpoint count, or 503 when there are none.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::runtime::Handle;

use crate::{
    model::HealthCheck,
    serve::http::{self, Response, Server},
};

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

struct Running {
    state: Arc<Mutex<HealthCheck>>,
    /// Dropping it closes the port.
    _server: Server,
}

/// The running servers, one per port, kept equal to the wanted set.
pub struct HealthServers {
    runtime: Handle,
    /// Where they listen (every address, as kube-proxy's; tests use loopback).
    ip: IpAddr,
    servers: BTreeMap<u16, Running>,
    /// Ports that could not be bound, so the error is logged once.
    failed: BTreeMap<u16, String>,
}

impl HealthServers {
    pub fn new(runtime: Handle, ip: IpAddr) -> Self {
        HealthServers {
            runtime,
            ip,
            servers: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, _| {
            let keep = wanted.contains_key(port);
            if !keep {
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
            match self.start(*port, check.clone()) {
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

    fn start(&self, port: u16, check: HealthCheck) -> std::io::Result<Running> {
        let state = Arc::new(Mutex::new(check));
        let served = Arc::clone(&state);
        // Any path answers, as kube-proxy's does.
        let handler: http::Handler = Arc::new(move |_: &str| {
            let check = served
                .lock()
                .map(|s| s.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            let (status, body) = response(&check);
            Response::new(status, "application/json", body)
        });
        let server = http::serve(&self.runtime, SocketAddr::new(self.ip, port), handler)?;
        Ok(Running {
            state,
            _server: server,
        })
    }
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

    /// A free loopback port (bound and released; good enough for a test).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    }

    #[test]
    fn a_health_check_port_answers_despite_idle_and_slow_clients_and_closes_when_unwanted() {
        let rt = http::runtime().expect("runtime");
        let mut servers = HealthServers::new(rt.handle().clone(), [127, 0, 0, 1].into());
        let port = free_port();
        let check = HealthCheck {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 1,
        };
        servers.update(&[(port, check)].into());
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        http::tests::answers_despite_idle_and_slow_clients(addr, "/");
        servers.update(&BTreeMap::new());
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "port {port} still open after its service went"
        );
    }
}
