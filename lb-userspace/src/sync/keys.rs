//! Map keys and values of a frontend: `ServiceKey` slots and the slot-0 `ServiceValue`.
use lb_common::{
    SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_SNAT, SVC_FLAG_SOURCE_RANGES, ServiceKey,
    ServiceValue, with_scheduler,
};

use crate::model::{Frontend, FrontendSpec, Protocol, Scope};

pub fn service_key(frontend: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey {
        vip: u32::from_ne_bytes(frontend.ip.octets()),
        port: frontend.port.to_be(),
        slot,
        proto: frontend.protocol.number(),
        scope: frontend.scope.code(),
        _pad: [0; 2],
    }
}

pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        ip: key.vip.to_ne_bytes().into(),
        port: u16::from_be(key.port),
        protocol: Protocol::from_number(key.proto)?,
        scope: Scope::from_code(key.scope)?,
    })
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
