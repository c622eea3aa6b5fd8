//! Outcome codes: every packet the programs see is counted under exactly one of these,
//! except `AFFINITY_HIT` and `SCHED_FALLBACK`, extra counts on top of the new flow's `DNAT_NEW`.

/// Index into the per-CPU `STATS` array.
pub type Outcome = u32;

pub mod outcome {
    use super::Outcome;
    /// Not addressed to a service (or not a reply of a NATed flow): passed untouched.
    pub const PASS_NOT_SERVICE: Outcome = 0;
    /// New flow to a service: backend chosen, DNATed, conntrack entry created.
    pub const DNAT_NEW: Outcome = 1;
    /// Packet of a known flow: DNATed to the conntrack backend.
    pub const DNAT_ESTABLISHED: Outcome = 2;
    /// Reply of a NATed flow: source rewritten back to the service.
    pub const REVNAT: Outcome = 3;
    /// Service has no usable endpoint: ICMP unreachable sent back to the client.
    pub const REJECT_NO_BACKEND: Outcome = 4;
    /// ICMP error about a NATed flow: outer and embedded headers translated.
    pub const ICMP_ERROR_XLATE: Outcome = 5;
    /// Ethernet/IPv4/L4 header shorter than it claims: passed untouched.
    pub const MALFORMED: Outcome = 6;
    /// IPv4 fragment: passed untouched (ports are not in every fragment).
    pub const FRAGMENT: Outcome = 7;
    /// IPv4 header with options: passed untouched.
    pub const IP_OPTIONS: Outcome = 8;
    /// Not IPv4 (IPv6, ARP, ...): passed untouched.
    pub const NOT_IPV4: Outcome = 9;
    /// IPv4 but neither TCP, UDP nor ICMP: passed untouched.
    pub const OTHER_PROTOCOL: Outcome = 10;
    /// Conntrack map update failed: packet dropped.
    pub const DROP_CT_FULL: Outcome = 11;
    /// A packet rewrite helper failed: packet dropped.
    pub const DROP_REWRITE_FAILED: Outcome = 12;
    /// Frontend says it has backends but a slot or backend is missing (mid-update race).
    pub const DROP_BACKEND_MISSING: Outcome = 13;
    /// Session affinity entry used for a new flow (counted in addition to `DNAT_NEW`).
    pub const AFFINITY_HIT: Outcome = 14;
    /// The service's algorithm could not pick (no Maglev table yet, or it named a backend
    /// that is gone): a random backend was used instead (extra count, like `AFFINITY_HIT`).
    pub const SCHED_FALLBACK: Outcome = 15;
    /// From outside to a service with a Local traffic policy and no endpoint on this node:
    /// dropped (as kube-proxy does).
    pub const DROP_NO_LOCAL_ENDPOINT: Outcome = 16;
    /// Client outside the service's loadBalancerSourceRanges: dropped.
    pub const DROP_SOURCE_RANGE: Outcome = 17;
    /// Every SNAT port tried for this backend was taken (or no node address is known yet):
    /// dropped.
    pub const DROP_SNAT_EXHAUSTED: Outcome = 18;
    /// From outside, new flow: DNAT (and SNAT under externalTrafficPolicy Cluster).
    pub const EXTERNAL_NEW: Outcome = 19;
    /// From outside, known flow.
    pub const EXTERNAL_ESTABLISHED: Outcome = 20;
    /// Reply of an external flow translated back towards the client.
    pub const EXTERNAL_REPLY: Outcome = 21;
    /// A node process's connect()/sendmsg() to a frontend went to a backend.
    pub const SOCK_CONNECT: Outcome = 22;
    /// A node process's connect()/sendmsg() to a frontend without endpoints was refused.
    pub const SOCK_REFUSED: Outcome = 23;
    /// A node process saw the frontend as its peer (recvmsg, getpeername).
    pub const SOCK_REVNAT: Outcome = 24;
    pub const COUNT: u32 = 25;
}

/// Human names, indexed by outcome code (used by `xlb stats` and metrics).
pub const OUTCOME_NAMES: [&str; outcome::COUNT as usize] = [
    "pass_not_service",
    "dnat_new",
    "dnat_established",
    "revnat",
    "reject_no_backend",
    "icmp_error_xlate",
    "malformed",
    "fragment",
    "ip_options",
    "not_ipv4",
    "other_protocol",
    "drop_ct_full",
    "drop_rewrite_failed",
    "drop_backend_missing",
    "affinity_hit",
    "sched_fallback",
    "drop_no_local_endpoint",
    "drop_source_range",
    "drop_snat_exhausted",
    "external_new",
    "external_established",
    "external_reply",
    "sock_connect",
    "sock_refused",
    "sock_revnat",
];
