//! The agent's HTTP endpoints (metrics, `/healthz`, health-check node ports): hyper on the
//! agent's tokio runtime. Each connection is a task, so an idle or slow client cannot hold up
//! the others — cloud load balancers probe health-check node ports from outside, and
//! kubelet's liveness probe restarts an agent whose `/healthz` stalls. Headers must arrive
//! within `HEADER_TIMEOUT`, a connection lives at most `CONNECTION_LIFETIME`, and at most
//! `MAX_CONNECTIONS` are open per listener (more are closed at once).
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, StatusCode, body::Incoming, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{runtime::Handle, sync::Semaphore, task::JoinHandle};

/// A request line and headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A keep-alive connection is closed after this (clients reconnect).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Open connections per listener.
pub const MAX_CONNECTIONS: usize = 1024;

pub struct Response {
    /// Status line, e.g. "200 OK".
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn new(status: &'static str, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            body,
        }
    }

    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let code = self
            .status
            .split_whitespace()
            .next()
            .and_then(|c| c.parse::<u16>().ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = code;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(self.content_type),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            header::HeaderValue::from_static("nosniff"),
        );
        response
    }
}

/// A request handler: given the request path (without query), the response. It runs on the
/// runtime's blocking pool, so it may read the pinned maps.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// A running listener; dropping it stops accepting (open connections finish their request).
pub struct Server {
    accept: JoinHandle<()>,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Binds `addr` now (the error is the caller's to report) and serves `handler` on `runtime`.
pub fn serve(runtime: &Handle, addr: SocketAddr, handler: Handler) -> std::io::Result<Server> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let accept = runtime.spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    log::warn!("accepting on {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                log::debug!("{addr}: {MAX_CONNECTIONS} connections open; closing {peer}'s");
                continue;
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |request: Request<Incoming>| {
                    let handler = Arc::clone(&handler);
                    async move {
                        let path = request.uri().path().to_string();
                        let response = tokio::task::spawn_blocking(move || handler(&path))
                            .await
                            .unwrap_or_else(|_| {
                                Response::new(
                                    "500 Internal Server Error",
                                    "text/plain",
                                    "handler failed\n".into(),
                                )
                            });
                        Ok::<_, Infallible>(response.into_hyper())
                    }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                // Past its lifetime the connection is dropped (closed); the client reconnects.
                if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                    log::debug!("{addr}: connection from {peer}: {e}");
                }
            });
        }
    });
    Ok(Server { accept, addr })
}

/// The agent's runtime for serving: a small multi-threaded one, its own threads named.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .thread_name("xlb-serve")
        .enable_all()
        .build()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        time::Instant,
    };

    use super::*;

    /// GET `path` on `addr` (loopback), returning the status line and the time it took.
    pub(crate) fn get(addr: SocketAddr, path: &str) -> (String, Duration) {
        let started = Instant::now();
        let mut conn = TcpStream::connect(addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut text = String::new();
        conn.read_to_string(&mut text).expect("answer");
        (
            text.lines().next().unwrap_or("").to_string(),
            started.elapsed(),
        )
    }

    /// 200 idle connections and a slow-loris sender (a byte of headers every 100 ms) hold
    /// open; an ordinary request still answers at once.
    pub(crate) fn answers_despite_idle_and_slow_clients(addr: SocketAddr, path: &str) {
        let idle: Vec<TcpStream> = (0..200)
            .map(|_| TcpStream::connect(addr).expect("idle connection"))
            .collect();
        let mut loris = TcpStream::connect(addr).expect("slow connection");
        let drip = std::thread::spawn(move || {
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n".iter().take(20) {
                if loris.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..5 {
            let (status, took) = get(addr, path);
            assert!(status.contains("200"), "{status}");
            assert!(took < Duration::from_millis(100), "answered in {took:?}");
        }
        drip.join().expect("slow sender");
        drop(idle);
    }

    #[test]
    fn idle_and_slow_clients_do_not_stall_others() {
        let rt = runtime().expect("runtime");
        let server = serve(
            rt.handle(),
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(|path: &str| Response::new("200 OK", "text/plain", format!("{path}\n"))),
        )
        .expect("bind");
        answers_despite_idle_and_slow_clients(server.addr, "/healthz");
    }

    #[test]
    fn statuses_paths_and_keep_alive() {
        let rt = runtime().expect("runtime");
        let server = serve(
            rt.handle(),
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(|path: &str| match path {
                "/ok" => Response::new("200 OK", "text/plain", "ok\n".into()),
                _ => Response::new("404 Not Found", "text/plain", "no\n".into()),
            }),
        )
        .expect("bind");
        assert!(get(server.addr, "/ok?x=1").0.starts_with("HTTP/1.1 200"));
        assert!(get(server.addr, "/other").0.starts_with("HTTP/1.1 404"));
        // Two requests on one connection.
        let mut conn = TcpStream::connect(server.addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        for _ in 0..2 {
            write!(conn, "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
            let n = conn.read(&mut buf).expect("answer");
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        }
    }
}
