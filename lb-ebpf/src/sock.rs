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
//!
//! The IPv6 hooks balance IPv6 frontends, and IPv4-mapped addresses (`::ffff:a.b.c.d`, a
//! dual-stack socket reaching an IPv4 address) as the IPv4 frontends they are.
use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    Ip6, Outcome, PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL, SVC_FLAG_DROP_EMPTY, SockFrontend, SockKey,
    SockKey6, outcome,
};

use crate::{
    family::{Family, V4, V6},
    maps::{HOST_NETNS, SOCK_REVNAT, SOCK_REVNAT6},
    parse::Flow,
    stats, svc,
};

/// The hook lets the call proceed.
pub const ALLOW: i32 = 1;
/// The hook fails the call (with the errno set by `bpf_set_retval`, else EPERM).
pub const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// What the socket hooks keep per family: the socket → frontend memory of `SOCK_REVNAT`.
pub trait SockFamily: Family {
    fn remember(cookie: u64, backend: Self::Addr, port: u16, shown: &SockFrontend<Self::Addr>);
    fn recall(cookie: u64, backend: Self::Addr, port: u16) -> Option<SockFrontend<Self::Addr>>;
}

impl SockFamily for V4 {
    #[inline(always)]
    fn remember(cookie: u64, backend: u32, port: u16, shown: &SockFrontend) {
        let key = SockKey {
            cookie,
            backend,
            port,
            _pad: 0,
        };
        // Without the entry the process would see the backend as its peer: still correct
        // traffic, so a full map does not fail the call.
        let _ = SOCK_REVNAT.insert(key, shown, 0);
    }
    #[inline(always)]
    fn recall(cookie: u64, backend: u32, port: u16) -> Option<SockFrontend> {
        let key = SockKey {
            cookie,
            backend,
            port,
            _pad: 0,
        };
        // SAFETY: value copied out immediately.
        unsafe { SOCK_REVNAT.get(key) }.copied()
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn remember(cookie: u64, backend: Ip6, port: u16, shown: &SockFrontend<Ip6>) {
        let key = SockKey6 {
            cookie,
            backend,
            port,
            _pad: [0; 3],
        };
        let _ = SOCK_REVNAT6.insert(key, shown, 0);
    }
    #[inline(always)]
    fn recall(cookie: u64, backend: Ip6, port: u16) -> Option<SockFrontend<Ip6>> {
        let key = SockKey6 {
            cookie,
            backend,
            port,
            _pad: [0; 3],
        };
        // SAFETY: value copied out immediately.
        unsafe { SOCK_REVNAT6.get(key) }.copied()
    }
}

/// What a connect()/sendmsg() hook does with the address the process gave.
pub enum Connect<A> {
    /// Not a frontend (or not a socket of the host's namespace): unchanged.
    Leave,
    /// Connect to this backend instead.
    To(A, u16, Outcome),
    /// Fail the call (no usable endpoint).
    Refuse,
    /// A frontend whose backend could not be picked: unchanged, counted.
    Missed,
}

/// connect() / sendmsg() of an IPv4 socket: frontend → backend.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext) -> (i32, Option<Outcome>) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let (proto, dst, dport) =
        unsafe { ((*sa).protocol as u8, (*sa).user_ip4, (*sa).user_port as u16) };
    match balance::<V4>(ctx, proto, dst, dport) {
        Connect::To(ip, port, outcome) => {
            // SAFETY: the context fields are writable from connect/sendmsg hooks.
            unsafe {
                (*sa).user_ip4 = ip;
                (*sa).user_port = port as u32;
            }
            (ALLOW, Some(outcome))
        }
        other => verdict(other),
    }
}

/// connect() / sendmsg() of an IPv6 socket: IPv6 frontends, and IPv4-mapped addresses as
/// the IPv4 frontends they name.
#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) -> (i32, Option<Outcome>) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let (proto, dst, dport) =
        unsafe { ((*sa).protocol as u8, user_ip6(ctx), (*sa).user_port as u16) };
    if let Some(v4) = mapped_v4(&dst) {
        return match balance::<V4>(ctx, proto, v4, dport) {
            Connect::To(ip, port, outcome) => {
                // SAFETY: the context fields are writable from connect/sendmsg hooks.
                unsafe {
                    set_user_ip6(ctx, &[0, 0, MAPPED_PREFIX, ip]);
                    (*sa).user_port = port as u32;
                }
                (ALLOW, Some(outcome))
            }
            other => verdict(other),
        };
    }
    match balance::<V6>(ctx, proto, dst, dport) {
        Connect::To(ip, port, outcome) => {
            // SAFETY: as above.
            unsafe {
                set_user_ip6(ctx, &ip);
                (*sa).user_port = port as u32;
            }
            (ALLOW, Some(outcome))
        }
        other => verdict(other),
    }
}

/// The context's IPv6 address, a word at a time: the verifier takes context accesses only
/// at a constant offset from the context pointer, not through a pointer into it (which an
/// array copy becomes).
///
/// # Safety
/// `ctx` is the hook's own context.
#[inline(always)]
unsafe fn user_ip6(ctx: &SockAddrContext) -> Ip6 {
    let sa = ctx.sock_addr;
    // SAFETY: fields of the valid context, read one by one.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    }
}

/// Writes the context's IPv6 address a word at a time (see `user_ip6`).
///
/// # Safety
/// `ctx` is the hook's own context, of a hook that may write it (connect, sendmsg,
/// recvmsg, getpeername).
#[inline(always)]
unsafe fn set_user_ip6(ctx: &SockAddrContext, ip: &Ip6) {
    let sa = ctx.sock_addr;
    // SAFETY: fields of the valid context, written one by one.
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], ip[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], ip[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], ip[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], ip[3]);
    }
}

/// The third word of an IPv4-mapped address (`::ffff:0:0/96`), as it sits in memory.
const MAPPED_PREFIX: u32 = 0x0000_ffffu32.to_be();

/// The IPv4 address inside an IPv4-mapped IPv6 address.
#[inline(always)]
fn mapped_v4(addr: &Ip6) -> Option<u32> {
    (addr[0] == 0 && addr[1] == 0 && addr[2] == MAPPED_PREFIX).then_some(addr[3])
}

#[inline(always)]
fn verdict<A>(connect: Connect<A>) -> (i32, Option<Outcome>) {
    match connect {
        Connect::Leave => (ALLOW, None),
        Connect::To(_, _, outcome) => (ALLOW, Some(outcome)),
        Connect::Refuse => (DENY, Some(outcome::SOCK_REFUSED)),
        Connect::Missed => (ALLOW, Some(outcome::DROP_BACKEND_MISSING)),
    }
}

/// Picks the backend for a node process's socket to `dst:dport` of family `F`.
#[inline(always)]
fn balance<F: SockFamily>(
    ctx: &SockAddrContext,
    proto: u8,
    dst: F::Addr,
    dport: u16,
) -> Connect<F::Addr> {
    if (proto != PROTO_TCP && proto != PROTO_UDP) || !in_host_netns(ctx) {
        return Connect::Leave;
    }
    let sa = ctx.sock_addr;
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let flow = Flow {
        proto,
        src: F::Addr::default(),
        dst,
        // Spreads a node's sockets in 5-tuple hashes (Maglev), which have no source here.
        sport: cookie as u16,
        dport,
        tcp_flags: 0,
        l4_off: 0,
    };
    let Some((key, frontend)) = svc::find_frontend::<F>(&flow, SCOPE_INTERNAL, true) else {
        return Connect::Leave;
    };
    if frontend.count == 0 {
        if frontend.flags & SVC_FLAG_DROP_EMPTY == 0 {
            // SAFETY: helper valid for cgroup programs (kernel 5.18+).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return Connect::Refuse;
    }
    let Ok((backend_id, backend)) = svc::select_backend::<F>(&key, &frontend, &flow, svc::now_ns())
    else {
        return Connect::Missed;
    };
    let shown = SockFrontend {
        addr: dst,
        port: dport,
        proto,
        _pad: 0,
        service_id: frontend.service_id,
        backend_id,
    };
    F::remember(cookie, backend.ip, backend.port, &shown);
    stats::count_traffic(frontend.service_id, backend_id, 0, true);
    Connect::To(backend.ip, backend.port, outcome::SOCK_CONNECT)
}

/// Whether the socket lives in the host's network namespace. Until the agent has written
/// the host's cookie, every socket is balanced (node processes keep reaching services).
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext) -> bool {
    let host = HOST_NETNS.get(0).copied().unwrap_or(0);
    // SAFETY: helper valid for sock_addr programs (kernel 5.7+).
    host == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == host
}

/// recvmsg() / getpeername() of an IPv4 socket: backend → the frontend it asked for.
#[inline(always)]
pub fn revnat(ctx: &SockAddrContext) -> Option<Outcome> {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; the helper is allowed in these hooks.
    let (cookie, backend, port) = unsafe {
        (
            bpf_get_socket_cookie(sa.cast()),
            (*sa).user_ip4,
            (*sa).user_port as u16,
        )
    };
    let shown = V4::recall(cookie, backend, port)?;
    // SAFETY: the context fields are writable from recvmsg/getpeername hooks.
    unsafe {
        (*sa).user_ip4 = shown.addr;
        (*sa).user_port = shown.port as u32;
    }
    Some(outcome::SOCK_REVNAT)
}

/// recvmsg() / getpeername() of an IPv6 socket (IPv4-mapped peers as IPv4).
#[inline(always)]
pub fn revnat6(ctx: &SockAddrContext) -> Option<Outcome> {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; the helper is allowed in these hooks.
    let (cookie, backend, port) = unsafe {
        (
            bpf_get_socket_cookie(sa.cast()),
            user_ip6(ctx),
            (*sa).user_port as u16,
        )
    };
    let shown = match mapped_v4(&backend) {
        Some(v4) => V4::recall(cookie, v4, port).map(|s| ([0, 0, MAPPED_PREFIX, s.addr], s.port)),
        None => V6::recall(cookie, backend, port).map(|s| (s.addr, s.port)),
    }?;
    // SAFETY: the context fields are writable from recvmsg/getpeername hooks.
    unsafe {
        set_user_ip6(ctx, &shown.0);
        (*sa).user_port = shown.1 as u32;
    }
    Some(outcome::SOCK_REVNAT)
}
