//! Objects are kept for as long as they exist (reflector stores, a manifest file's last good
//! state), so they keep only what translation reads: server bookkeeping and the parts of
//! endpoints xlb never looks at are dropped, and vectors give back the room deserializing
//! left over (a slice of 10 endpoints otherwise holds 16 endpoint slots of 352 bytes).
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub trait Compact {
    fn compact(&mut self);
}

/// `kubectl apply` keeps a copy of the whole object in this annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn compact_metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED);
    }
}

impl Compact for Service {
    fn compact(&mut self) {
        compact_metadata(&mut self.metadata);
        if let Some(spec) = &mut self.spec {
            // Deserializing grows vectors four at a time: one port holds room for four.
            if let Some(ports) = &mut spec.ports {
                ports.shrink_to_fit();
            }
            if let Some(ips) = &mut spec.cluster_ips {
                ips.shrink_to_fit();
            }
        }
    }
}

impl Compact for EndpointSlice {
    fn compact(&mut self) {
        compact_metadata(&mut self.metadata);
        if let Some(ports) = &mut self.ports {
            ports.shrink_to_fit();
        }
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
        compact_metadata(&mut self.metadata);
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
        let mut slice: EndpointSlice = serde_saphyr::from_str(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}, \
             managedFields: [{manager: kube-controller-manager}], \
             annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}', keep: me}}\n\
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
        let annotations = slice.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["keep"]);
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
