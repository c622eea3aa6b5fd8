//! Objects are kept for as long as they exist (reflector stores, a manifest file's last good
//! state), so they keep only what translation reads: server bookkeeping and the parts of
//! endpoints xlb never looks at are dropped, and vectors give back the room deserializing
//! left over (a slice of 10 endpoints otherwise holds 16 endpoint slots of 352 bytes).
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

pub trait Compact {
    fn compact(&mut self);
}

impl Compact for Service {
    fn compact(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.owner_references = None;
    }
}

impl Compact for EndpointSlice {
    fn compact(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.owner_references = None;
        for endpoint in &mut self.endpoints {
            endpoint.target_ref = None;
            endpoint.deprecated_topology = None;
            endpoint.hostname = None;
            endpoint.addresses.shrink_to_fit();
        }
        self.endpoints.shrink_to_fit();
    }
}

impl Compact for Node {
    fn compact(&mut self) {
        self.metadata.managed_fields = None;
        // Only the labels (topology zone) are read; a node's status lists every image it
        // holds, often tens of kilobytes.
        self.status = None;
        self.spec = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_keep_what_translation_reads_and_no_spare_room() {
        let mut slice: EndpointSlice = serde_yaml::from_str(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}, \
             managedFields: [{manager: kube-controller-manager}]}\n\
             addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
             endpoints:\n\
             - {addresses: [10.244.0.1], conditions: {ready: true}, nodeName: n1, zone: a, \
             hostname: web-0, targetRef: {kind: Pod, name: web-0}}\n\
             - {addresses: [10.244.0.2], conditions: {ready: false}}\n\
             - {addresses: [10.244.0.3]}\n",
        )
        .expect("slice");
        slice.compact();
        assert_eq!(slice.endpoints.capacity(), 3);
        assert!(slice.metadata.managed_fields.is_none());
        let first = &slice.endpoints[0];
        assert!(first.target_ref.is_none() && first.hostname.is_none());
        assert_eq!(first.addresses, ["10.244.0.1"]);
        assert_eq!(first.node_name.as_deref(), Some("n1"));
        assert_eq!(first.zone.as_deref(), Some("a"));
        assert_eq!(
            slice.endpoints[1].conditions.as_ref().and_then(|c| c.ready),
            Some(false)
        );
        assert!(slice.metadata.labels.is_some() && slice.ports.is_some());
    }
}
