//! A tiny HTTP/1.1 responder for the agent's endpoints (metrics, healthz, health-check node
//! ports): one thread per listener, one short request at a time, closed after each answer.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

pub struct Response {
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
}

/// Binds `addr` (the error is the caller's to report) and answers requests with `handler`
/// (given the request path) until `stop` is set.
pub fn serve(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handler: impl Fn(&str) -> Response + Send + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    if let Err(e) = answer(conn, &handler) {
                        log::debug!("request on {addr} failed: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    log::warn!("listener on {addr}: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    });
    Ok(())
}

fn answer(mut conn: TcpStream, handler: &impl Fn(&str) -> Response) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut request_line = String::new();
    BufReader::new(&conn).read_line(&mut request_line)?;
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let response = handler(path);
    write!(
        conn,
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        response.status,
        response.content_type,
        response.body.len(),
        response.body
    )
}
