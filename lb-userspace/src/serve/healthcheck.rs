//! healthCheckNodePort servers: for each externalTrafficPolicy Local LoadBalancer service,
//! answer what kube-proxy answers, so cloud load balancers send traffic only to nodes with
//! local endpoints: 200 with the local endpoint count, or 503 when there are none.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use crate::{
    model::HealthCheck,
    serve::http::{self, Response},
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
    let state = Arc::new(Mutex::new(check));
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::clone(&state);
    // Any path answers, as kube-proxy's does.
    http::serve(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        Arc::clone(&stop),
        move |_| {
            let check = served
                .lock()
                .map(|s| s.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            let (status, body) = response(&check);
            Response::new(status, "application/json", body)
        },
    )?;
    Ok(Server { state, stop })
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
