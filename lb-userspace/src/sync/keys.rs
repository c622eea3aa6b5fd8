//! Map keys and values of a frontend: `ServiceKey` slots, the slot-0 `ServiceValue` and
//! `Backend` entries, in the maps of the frontend's family.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    Backend, Ip6, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_SNAT, SVC_FLAG_SOURCE_RANGES,
    ServiceKey, ServiceValue, ip6_from_octets, ip6_octets, with_scheduler,
};

use crate::model::{Endpoint, Family, Frontend, FrontendSpec, Protocol, Scope};

/// An IPv4 address as the maps hold it (network byte order).
pub fn map_v4(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn from_map_v4(ip: u32) -> Ipv4Addr {
    ip.to_ne_bytes().into()
}

pub fn map_v6(ip: Ipv6Addr) -> Ip6 {
    ip6_from_octets(ip.octets())
}

pub fn from_map_v6(ip: Ip6) -> Ipv6Addr {
    ip6_octets(ip).into()
}

/// A key of `SERVICES` (IPv4 frontends) or `SERVICES6` (IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SlotKey {
    V4(ServiceKey),
    V6(ServiceKey<Ip6>),
}

impl SlotKey {
    pub fn slot(&self) -> u16 {
        match self {
            SlotKey::V4(k) => k.slot,
            SlotKey::V6(k) => k.slot,
        }
    }

    /// The key of another slot of the same frontend.
    pub fn with_slot(&self, slot: u16) -> SlotKey {
        match self {
            SlotKey::V4(k) => SlotKey::V4(ServiceKey { slot, ..*k }),
            SlotKey::V6(k) => SlotKey::V6(ServiceKey { slot, ..*k }),
        }
    }
}

pub fn service_key(frontend: &Frontend, slot: u16) -> SlotKey {
    let (port, proto, scope) = (
        frontend.port.to_be(),
        frontend.protocol.number(),
        frontend.scope.code(),
    );
    match frontend.ip {
        IpAddr::V4(ip) => SlotKey::V4(ServiceKey {
            vip: map_v4(ip),
            port,
            slot,
            proto,
            scope,
            _pad: [0; 2],
        }),
        IpAddr::V6(ip) => SlotKey::V6(ServiceKey {
            vip: map_v6(ip),
            port,
            slot,
            proto,
            scope,
            _pad: [0; 2],
        }),
    }
}

pub fn frontend_of(key: &SlotKey) -> Option<Frontend> {
    let (ip, port, proto, scope): (IpAddr, _, _, _) = match key {
        SlotKey::V4(k) => (from_map_v4(k.vip).into(), k.port, k.proto, k.scope),
        SlotKey::V6(k) => (from_map_v6(k.vip).into(), k.port, k.proto, k.scope),
    };
    Some(Frontend {
        ip,
        port: u16::from_be(port),
        protocol: Protocol::from_number(proto)?,
        scope: Scope::from_code(scope)?,
    })
}

/// A value of `BACKENDS` or `BACKENDS6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendEntry {
    V4(Backend),
    V6(Backend<Ip6>),
}

impl BackendEntry {
    pub fn new(endpoint: &Endpoint, protocol: Protocol, service_id: u32) -> BackendEntry {
        let (port, proto) = (endpoint.port.to_be(), protocol.number());
        match endpoint.ip {
            IpAddr::V4(ip) => BackendEntry::V4(Backend {
                ip: map_v4(ip),
                port,
                proto,
                _pad: 0,
                service_id,
            }),
            IpAddr::V6(ip) => BackendEntry::V6(Backend {
                ip: map_v6(ip),
                port,
                proto,
                _pad: 0,
                service_id,
            }),
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        match self {
            BackendEntry::V4(b) => Endpoint {
                ip: from_map_v4(b.ip).into(),
                port: u16::from_be(b.port),
            },
            BackendEntry::V6(b) => Endpoint {
                ip: from_map_v6(b.ip).into(),
                port: u16::from_be(b.port),
            },
        }
    }

    pub fn service_id(&self) -> u32 {
        match self {
            BackendEntry::V4(b) => b.service_id,
            BackendEntry::V6(b) => b.service_id,
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            BackendEntry::V4(b) => b.proto,
            BackendEntry::V6(b) => b.proto,
        }
    }

    pub fn family(&self) -> Family {
        match self {
            BackendEntry::V4(_) => Family::V4,
            BackendEntry::V6(_) => Family::V6,
        }
    }
}

pub fn frontend_value(service_id: u32, count: usize, spec: &FrontendSpec) -> ServiceValue {
    let mut flags = 0;
    for (set, flag) in [
        (spec.affinity_timeout_s.is_some(), SVC_FLAG_AFFINITY),
        (spec.snat, SVC_FLAG_SNAT),
        (spec.drop_when_empty, SVC_FLAG_DROP_EMPTY),
        (!spec.source_ranges.is_empty(), SVC_FLAG_SOURCE_RANGES),
    ] {
        if set {
            flags |= flag;
        }
    }
    ServiceValue {
        backend_id: 0,
        service_id,
        count: count as u16,
        flags: with_scheduler(flags, spec.scheduler.code()),
        affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_backends_round_trip_in_both_families() {
        for ip in ["10.96.0.10", "fd00:10:96::10", "0.0.0.0", "::"] {
            let ip: IpAddr = ip.parse().expect("address");
            let frontend = Frontend::internal(ip, 443, Protocol::Udp);
            let key = service_key(&frontend, 3);
            assert_eq!(key.slot(), 3);
            assert_eq!(frontend_of(&key), Some(frontend));
            assert_eq!(matches!(key, SlotKey::V6(_)), ip.is_ipv6());
            let endpoint = Endpoint { ip, port: 8443 };
            let backend = BackendEntry::new(&endpoint, Protocol::Udp, 9);
            assert_eq!(
                (backend.endpoint(), backend.service_id(), backend.proto()),
                (endpoint, 9, lb_common::PROTO_UDP)
            );
            assert_eq!(backend.family(), Family::of(ip));
        }
        // Network byte order: the first address byte is the lowest in memory.
        let SlotKey::V6(k) = service_key(
            &Frontend::internal("fd00::1".parse::<IpAddr>().expect("ip"), 1, Protocol::Tcp),
            0,
        ) else {
            panic!("IPv6 key");
        };
        assert_eq!(ip6_octets(k.vip)[0], 0xfd);
        assert_eq!(ip6_octets(k.vip)[15], 1);
    }
}
