//! Outcome codes: every packet the programs see is counted under exactly one of these,
//! except the `Extra` ones (`AFFINITY_HIT`, `SCHED_FALLBACK`), counted on top of the new
//! flow's `DNAT_NEW`.
//!
//! One table defines each code, its name (`xlb stats`, metrics) and its kind (whether the
//! datapath drops the packet), so the three can never disagree.

/// Index into the per-CPU `STATS` array.
pub type Outcome = u32;

/// What an outcome means for the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// Left untouched, for the stack (or the next program) to handle.
    Pass,
    /// Translated, answered or steered by xlb.
    Handled,
    /// Dropped.
    Drop,
    /// Counted on top of another outcome of the same packet.
    Extra,
}

/// One row of the outcome table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutcomeInfo {
    pub code: Outcome,
    pub name: &'static str,
    pub kind: OutcomeKind,
}

macro_rules! outcomes {
    ($($(#[doc = $doc:literal])* $konst:ident = $code:literal, $name:literal, $kind:ident;)*) => {
        pub mod outcome {
            use super::Outcome;
            $($(#[doc = $doc])* pub const $konst: Outcome = $code;)*
            /// Number of outcome codes (entries of `STATS`).
            pub const COUNT: u32 = [$($code),*].len() as u32;
        }

        /// Every outcome, indexed by code.
        pub const OUTCOMES: [OutcomeInfo; outcome::COUNT as usize] = [
            $(OutcomeInfo { code: $code, name: $name, kind: OutcomeKind::$kind },)*
        ];

        /// Bit `code` set for every outcome of kind `Drop`: the datapath's test is a shift.
        const DROP_MASK: u64 = 0 $(| (matches!(OutcomeKind::$kind, OutcomeKind::Drop) as u64) << $code)*;
    };
}

outcomes! {
    /// Not addressed to a service (or not a reply of a NATed flow): passed untouched.
    PASS_NOT_SERVICE = 0, "pass_not_service", Pass;
    /// New flow to a service: backend chosen, DNATed, conntrack entry created.
    DNAT_NEW = 1, "dnat_new", Handled;
    /// Packet of a known flow: DNATed to the conntrack backend.
    DNAT_ESTABLISHED = 2, "dnat_established", Handled;
    /// Reply of a NATed flow: source rewritten back to the service.
    REVNAT = 3, "revnat", Handled;
    /// Service has no usable endpoint: ICMP unreachable sent back to the client.
    REJECT_NO_BACKEND = 4, "reject_no_backend", Handled;
    /// ICMP error about a NATed flow: outer and embedded headers translated.
    ICMP_ERROR_XLATE = 5, "icmp_error_xlate", Handled;
    /// Ethernet/IPv4/L4 header shorter than it claims: passed untouched.
    MALFORMED = 6, "malformed", Pass;
    /// IPv4 fragment or IPv6 fragment header: passed untouched (ports are not in every
    /// fragment).
    FRAGMENT = 7, "fragment", Pass;
    /// IPv4 header with options, or an IPv6 extension-header chain longer than the datapath
    /// walks (`parse::IPV6_EXT_MAX`): passed untouched.
    IP_OPTIONS = 8, "ip_options", Pass;
    /// Neither IPv4 nor IPv6 (ARP, ...): passed untouched.
    NOT_IP = 9, "not_ip", Pass;
    /// IP but neither TCP, UDP nor an ICMP/ICMPv6 error: passed untouched (neighbour
    /// discovery, echo, ESP, ...).
    OTHER_PROTOCOL = 10, "other_protocol", Pass;
    /// Conntrack map update failed: packet dropped.
    DROP_CT_FULL = 11, "drop_ct_full", Drop;
    /// A packet rewrite helper failed: packet dropped.
    DROP_REWRITE_FAILED = 12, "drop_rewrite_failed", Drop;
    /// Frontend says it has backends but a slot or backend is missing (mid-update race).
    DROP_BACKEND_MISSING = 13, "drop_backend_missing", Drop;
    /// Session affinity entry used for a new flow (counted in addition to `DNAT_NEW`).
    AFFINITY_HIT = 14, "affinity_hit", Extra;
    /// The service's algorithm could not pick (no Maglev table yet, or it named a backend
    /// that is gone): a random backend was used instead (extra count, like `AFFINITY_HIT`).
    SCHED_FALLBACK = 15, "sched_fallback", Extra;
    /// From outside to a service with a Local traffic policy and no endpoint on this node:
    /// dropped (as kube-proxy does).
    DROP_NO_LOCAL_ENDPOINT = 16, "drop_no_local_endpoint", Drop;
    /// Client outside the service's loadBalancerSourceRanges: dropped.
    DROP_SOURCE_RANGE = 17, "drop_source_range", Drop;
    /// Every SNAT port tried for this backend was taken (or no node address is known yet):
    /// dropped.
    DROP_SNAT_EXHAUSTED = 18, "drop_snat_exhausted", Drop;
    /// From outside, new flow: DNAT (and SNAT under externalTrafficPolicy Cluster).
    EXTERNAL_NEW = 19, "external_new", Handled;
    /// From outside, known flow.
    EXTERNAL_ESTABLISHED = 20, "external_established", Handled;
    /// Reply of an external flow translated back towards the client.
    EXTERNAL_REPLY = 21, "external_reply", Handled;
    /// A node process's connect()/sendmsg() to a frontend went to a backend.
    SOCK_CONNECT = 22, "sock_connect", Handled;
    /// A node process's connect()/sendmsg() to a frontend without endpoints was refused.
    SOCK_REFUSED = 23, "sock_refused", Handled;
    /// A node process saw the frontend as its peer (recvmsg, getpeername).
    SOCK_REVNAT = 24, "sock_revnat", Handled;
    /// A new flow's first packet met the same flow's entry being recorded by another CPU
    /// that stalled there longer than the wait allows (a few milliseconds): dropped rather
    /// than sent to a backend that CPU may not have chosen. The flow's next packet follows
    /// the entry.
    DROP_FLOW_STALLED = 25, "drop_flow_stalled", Drop;
}

// Codes are the table's indexes, and the drop mask has room for every one.
const _: () = {
    let mut i = 0;
    while i < OUTCOMES.len() {
        assert!(OUTCOMES[i].code as usize == i);
        i += 1;
    }
    assert!(outcome::COUNT <= 64);
};

/// Whether the datapath drops a packet with this outcome.
#[inline(always)]
pub const fn is_drop(o: Outcome) -> bool {
    o < outcome::COUNT && (DROP_MASK >> o) & 1 == 1
}

/// The outcome's name (`xlb stats`, metrics labels); `"unknown"` for a code past the table.
pub fn outcome_name(o: Outcome) -> &'static str {
    OUTCOMES.get(o as usize).map_or("unknown", |info| info.name)
}
