//! Real servers and clients for pods. Servers answer with their pod name, so a client learns
//! which backend it reached. Everything is bounded: servers stop when dropped, clients use
//! timeouts.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;

use crate::{netns::Netns, topology::Pod};

pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;

/// TCP and UDP servers of one pod; stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts, in `pod`'s namespace, a TCP server on 8080 (sends "NAME\n", then echoes) and a
/// UDP server on 5353 (answers "NAME", or "NAME CLIENT-IP" to "whoami"), on every IPv4
/// address and on the pod's IPv6 address if it has one.
pub fn serve(pod: &Pod) -> Result<Servers> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut addresses = vec![IpAddr::from(Ipv4Addr::UNSPECIFIED)];
    addresses.extend(pod.ip6.map(IpAddr::from));
    let mut threads = Vec::new();
    for ip in addresses {
        let tcp = pod.ns.enter(move || TcpListener::bind((ip, TCP_PORT)))??;
        let udp = pod.ns.enter(move || UdpSocket::bind((ip, UDP_PORT)))??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        threads.push(serve_tcp(tcp, pod.name.clone(), Arc::clone(&stop)));
        threads.push(serve_udp(udp, pod.name.clone(), Arc::clone(&stop)));
    }
    Ok(Servers { stop, threads })
}

fn serve_tcp(tcp: TcpListener, name: String, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut handlers = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match tcp.accept() {
                Ok((conn, _)) => {
                    let stop = Arc::clone(&stop);
                    let name = name.clone();
                    handlers.push(std::thread::spawn(move || echo(conn, &name, &stop)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
            handlers.retain(|h: &JoinHandle<()>| !h.is_finished());
        }
        for h in handlers {
            let _ = h.join();
        }
    })
}

fn serve_udp(udp: UdpSocket, name: String, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                // "whoami": also say which client address arrived (NAT tests).
                let answer = if &buf[..n] == b"whoami" {
                    format!("{name} {}", from.ip())
                } else {
                    name.clone()
                };
                let _ = udp.send_to(answer.as_bytes(), from);
            }
        }
    })
}

fn echo(mut conn: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    if conn.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Connects (from the calling thread's namespace) and returns the stream after reading the
/// server's name line.
pub fn tcp_connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<(TcpStream, String)> {
    let conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the greeting",
        ));
    }
    Ok((conn, line.trim_end().to_string()))
}

/// One short TCP connection: which backend answered.
pub fn tcp_hello(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    tcp_connect(addr, timeout).map(|(_, name)| name)
}

/// One UDP request from a fresh socket (fresh source port, so a new flow): who answered.
/// A UDP socket of `addr`'s family on an ephemeral port.
fn udp_client(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    if addr.is_ipv6() {
        UdpSocket::bind("[::]:0")
    } else {
        UdpSocket::bind("0.0.0.0:0")
    }
}

pub fn udp_hello(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let socket = udp_client(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hello", addr)?;
    let mut buf = [0u8; 256];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// One UDP "whoami" from a fresh socket: (backend name, client address the backend saw).
pub fn udp_whoami(addr: SocketAddr, timeout: Duration) -> std::io::Result<(String, String)> {
    let socket = udp_client(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"whoami", addr)?;
    let mut buf = [0u8; 256];
    let (n, _) = socket.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (name, seen) = text.split_once(' ').unwrap_or((&text, ""));
    Ok((name.to_string(), seen.to_string()))
}

/// `n` TCP connections (or UDP requests) from `ns` to `target`, each with `timeout`: the
/// answers counted per backend name (failures as "error: ...").
pub fn spread(
    ns: &Netns,
    target: SocketAddr,
    n: usize,
    udp: bool,
    timeout: Duration,
) -> std::collections::BTreeMap<String, usize> {
    ns.enter(move || {
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            let who = if udp {
                udp_hello(target, timeout)
            } else {
                tcp_hello(target, timeout)
            };
            *counts
                .entry(who.unwrap_or_else(|e| format!("error: {e}")))
                .or_insert(0) += 1;
        }
        counts
    })
    .expect("client thread")
}

/// `count` "whoami" datagrams from `ns`, sent by trafgen from an AF_PACKET TX ring (the
/// kernel builds those skbs with only the Ethernet header in the linear part, the IP and
/// UDP headers in page fragments) with source `from` to `to`, through the pod's gateway;
/// the answers arriving at `from`'s port counted by (sender, backend name, client address
/// the backend saw). trafgen runs from a thread in the pod (its namespace and cgroup).
pub fn ring_whoami(
    ns: &Netns,
    from: SocketAddr,
    to: SocketAddr,
    count: usize,
) -> anyhow::Result<std::collections::BTreeMap<(SocketAddr, String, String), usize>> {
    use anyhow::Context as _;
    // Bound first, so the answers find a socket (and no port unreachable goes back).
    let socket = ns.enter(move || UdpSocket::bind(from))??;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let ip = match (from.ip(), to.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => format!("ipv4(saddr={src}, daddr={dst}, ttl=64)"),
        (src, dst) => format!("ip6(sa={src}, da={dst}, hl=64)"),
    };
    let conf = std::env::temp_dir().join(format!(
        "xlb-test-trafgen-{}-{}.cfg",
        std::process::id(),
        from.port()
    ));
    std::fs::write(
        &conf,
        format!(
            "{{ eth(da={}, sa=02:00:00:00:00:02), {ip}, udp(sp={}, dp={}), \"whoami\" }}\n",
            crate::topology::HOST_SIDE_MAC,
            from.port(),
            to.port()
        ),
    )?;
    // trafgen sends from every CPU: the flow's first datagrams may reach the hook on two
    // CPUs at once, and still take one backend. (Its `-n 0` would mean "until stopped".)
    let conf_arg = conf.clone();
    let sent = ns
        .enter(move || {
            std::process::Command::new("trafgen")
                .args(["-o", "eth0", "-q", "-n", &count.max(1).to_string(), "-i"])
                .arg(&conf_arg)
                .output()
        })
        .and_then(|out| {
            out.context("running trafgen (netsniff-ng, installed by `cargo xtask test`)")
        });
    let _ = std::fs::remove_file(&conf);
    let out = sent?;
    anyhow::ensure!(
        out.status.success(),
        "trafgen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut answers = std::collections::BTreeMap::new();
    let mut buf = [0u8; 256];
    while let Ok((n, sender)) = socket.recv_from(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let (name, seen) = text.split_once(' ').unwrap_or((&text, ""));
        *answers
            .entry((sender, name.to_string(), seen.to_string()))
            .or_insert(0) += 1;
    }
    Ok(answers)
}

/// A pod's packets leave its stack CHECKSUM_PARTIAL over veth: the L4 checksum field holds
/// only the pseudo-header sum, which a program's address rewrite must fix and its port
/// rewrite must leave alone. Transmit checksum offload goes off (`Netns::tx_checksum_off`)
/// on the interfaces of `node` the translated packets leave by, `uplink` (requests to a
/// backend on another node) and `client`'s node-side end (replies), so the kernel completes
/// those checksums in software after the programs ran, and the receivers' stacks check
/// them: a wrong field is a dropped segment there, not a silent pass.
///
/// `n` TCP connections to `vip`:80 and UDP requests to `vip`:53 from `client`: asserts that
/// every one was answered, by exactly the pods `backends`, and that neither `client` nor
/// `receivers` counted a checksum error meanwhile.
pub fn assert_offloaded_checksums_come_out_right(
    node: &Netns,
    uplink: &str,
    client: &Pod,
    receivers: &[&Netns],
    vip: IpAddr,
    backends: &[&str],
    n: usize,
) {
    node.tx_checksum_off(uplink).expect("the node's uplink");
    node.tx_checksum_off(&client.host_iface)
        .expect("the client's node-side interface");
    let client = &client.ns;
    let errors = || -> Vec<(u64, u64)> {
        std::iter::once(client)
            .chain(receivers.iter().copied())
            .map(|ns| ns.checksum_errors().expect("checksum counters"))
            .collect()
    };
    let before = errors();
    let (tcp, udp) = client
        .enter(move || {
            let timeout = Duration::from_secs(1);
            let mut tcp = std::collections::BTreeMap::new();
            let mut udp = std::collections::BTreeMap::new();
            for _ in 0..n {
                let who =
                    tcp_hello(SocketAddr::new(vip, 80), timeout).unwrap_or_else(|e| e.to_string());
                *tcp.entry(who).or_insert(0) += 1;
                let (who, _) = udp_whoami(SocketAddr::new(vip, 53), timeout)
                    .unwrap_or_else(|e| (e.to_string(), String::new()));
                *udp.entry(who).or_insert(0) += 1;
            }
            (tcp, udp)
        })
        .expect("client thread");
    for (proto, answers) in [("TCP", &tcp), ("UDP", &udp)] {
        assert_eq!(
            answers.keys().map(String::as_str).collect::<Vec<_>>(),
            backends,
            "{proto} to {vip}: every answer from a backend, each backend among them: {answers:?}"
        );
    }
    assert_eq!(
        before,
        errors(),
        "(TCP, UDP) checksum errors of the client, then of each receiver"
    );
}
