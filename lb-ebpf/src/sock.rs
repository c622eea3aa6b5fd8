//! Node processes reaching services (cgroup sock_addr hooks on `--cgroup`): connect() and
//! unconnected sendmsg() to a frontend go to a backend chosen like for pods, and the
//! socket's view (recvmsg source, getpeername) stays the frontend. Nothing is NATed per
//! packet: the kernel's socket is simply connected to the backend.
//!
//! Only sockets of the host's network namespace are balanced here (as Cilium's
//! host-namespace-only socket LB). On a node the hooks sit on the root cgroup, above every
//! pod; a pod's socket is left to the TC path on its interface, which sees the pod's address
//! and source port, so affinity, source-hash, Maglev, least-conn, source ranges and
//! `xlb explain` mean for pods exactly what they mean in the TC tables.
use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    Outcome, PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL, SVC_FLAG_DROP_EMPTY, SockFrontend, SockKey,
    outcome,
};

use crate::{
    family::V4,
    maps::{HOST_NETNS, SOCK_REVNAT},
    parse::Flow,
    stats, svc,
};

/// The hook lets the call proceed.
pub const ALLOW: i32 = 1;
/// The hook fails the call (with the errno set by `bpf_set_retval`, else EPERM).
pub const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// connect() / sendmsg(): frontend → backend. Returns the hook's verdict and the outcome.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext) -> (i32, Option<Outcome>) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let (proto, dst, dport) =
        unsafe { ((*sa).protocol as u8, (*sa).user_ip4, (*sa).user_port as u16) };
    if (proto != PROTO_TCP && proto != PROTO_UDP) || !in_host_netns(ctx) {
        return (ALLOW, None);
    }
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let flow = Flow {
        proto,
        src: 0,
        dst,
        // Spreads a node's sockets in 5-tuple hashes (Maglev), which have no source here.
        sport: cookie as u16,
        dport,
        tcp_flags: 0,
        l4_off: 0,
    };
    let Some((key, frontend)) = svc::find_frontend::<V4>(&flow, SCOPE_INTERNAL, true) else {
        return (ALLOW, None);
    };
    if frontend.count == 0 {
        if frontend.flags & SVC_FLAG_DROP_EMPTY == 0 {
            // SAFETY: helper valid for cgroup programs (kernel 5.18+).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return (DENY, Some(outcome::SOCK_REFUSED));
    }
    let Ok((backend_id, backend)) =
        svc::select_backend::<V4>(&key, &frontend, &flow, svc::now_ns())
    else {
        return (ALLOW, Some(outcome::DROP_BACKEND_MISSING));
    };
    let reverse = SockKey {
        cookie,
        backend: backend.ip,
        port: backend.port,
        _pad: 0,
    };
    let shown = SockFrontend {
        addr: dst,
        port: dport,
        proto,
        _pad: 0,
        service_id: frontend.service_id,
        backend_id,
    };
    // Without the entry the process would see the backend as its peer: still correct
    // traffic, so a full map does not fail the call.
    let _ = SOCK_REVNAT.insert(reverse, shown, 0);
    // SAFETY: the context fields are writable from connect/sendmsg hooks.
    unsafe {
        (*sa).user_ip4 = backend.ip;
        (*sa).user_port = backend.port as u32;
    }
    stats::count_traffic(frontend.service_id, backend_id, 0, true);
    (ALLOW, Some(outcome::SOCK_CONNECT))
}

/// Whether the socket lives in the host's network namespace. Until the agent has written
/// the host's cookie, every socket is balanced (node processes keep reaching services).
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext) -> bool {
    let host = HOST_NETNS.get(0).copied().unwrap_or(0);
    // SAFETY: helper valid for sock_addr programs (kernel 5.7+).
    host == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == host
}

/// recvmsg() / getpeername(): backend → the frontend the socket asked for.
#[inline(always)]
pub fn revnat(ctx: &SockAddrContext) -> Option<Outcome> {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; the helper is allowed in these hooks.
    let key = unsafe {
        SockKey {
            cookie: bpf_get_socket_cookie(sa.cast()),
            backend: (*sa).user_ip4,
            port: (*sa).user_port as u16,
            _pad: 0,
        }
    };
    // SAFETY: value copied out immediately.
    let shown = unsafe { SOCK_REVNAT.get(key) }.copied()?;
    // SAFETY: the context fields are writable from recvmsg/getpeername hooks.
    unsafe {
        (*sa).user_ip4 = shown.addr;
        (*sa).user_port = shown.port as u32;
    }
    Some(outcome::SOCK_REVNAT)
}
