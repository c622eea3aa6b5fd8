//! Property tests of the control plane's hostile-input edge: whatever a manifests directory
//! holds, the parser and the translation never panic, and the translation of any input is
//! deterministic and the same whether computed fresh or incrementally (the agent's way).
use std::path::Path;

use proptest::prelude::*;
use xlb::{
    source::manifests::parse_file_text,
    translate::{Objects, Options, Translator, translate},
};

/// Field values chosen to hit the validation and translation edges: valid, out of range,
/// of the wrong family, of the wrong type, empty.
fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("80".to_string()),
        Just("0".to_string()),
        Just("65536".to_string()),
        Just("-1".to_string()),
        Just("http".to_string()),
        (1u32..70_000).prop_map(|p| p.to_string()),
    ]
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..=255, 0u8..=255).prop_map(|(a, b)| format!("10.96.{a}.{b}")),
        Just("10.244.1.300".to_string()),
        Just("::1".to_string()),
        Just("None".to_string()),
        Just("".to_string()),
        Just("not-an-ip".to_string()),
    ]
}

fn protocol() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("TCP"),
        Just("UDP"),
        Just("SCTP"),
        Just("ICMP"),
        Just("")
    ]
}

fn policy() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("Local"), Just("Cluster"), Just("Bogus")]
}

prop_compose! {
    fn service()(
        name in "[a-c]",
        cluster_ip in ip(),
        external in ip(),
        port in port(),
        node_port in port(),
        proto in protocol(),
        etp in policy(),
        itp in policy(),
        kind in prop_oneof![Just("ClusterIP"), Just("NodePort"), Just("LoadBalancer"), Just("ExternalName")],
        timeout in prop_oneof![Just("10"), Just("-5"), Just("86401"), Just("x")],
        range in prop_oneof![Just("10.0.0.0/8"), Just("10.0.0.1"), Just("::/0"), Just("300.0.0.0/8")],
        headless in any::<bool>(),
    ) -> String {
        let labels = if headless { "{service.kubernetes.io/headless: ''}" } else { "{}" };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: p, labels: {labels}}}\n\
             spec:\n  type: {kind}\n  clusterIP: '{cluster_ip}'\n  externalIPs: ['{external}']\n\
             \x20 externalTrafficPolicy: {etp}\n  internalTrafficPolicy: {itp}\n\
             \x20 sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n\
             \x20 loadBalancerSourceRanges: ['{range}']\n\
             \x20 ports: [{{name: http, port: {port}, nodePort: {node_port}, protocol: '{proto}'}}]\n"
        )
    }
}

prop_compose! {
    fn slice()(
        name in "[a-c]",
        family in prop_oneof![Just("IPv4"), Just("IPv6"), Just("FQDN"), Just("Other")],
        port in port(),
        proto in protocol(),
        addresses in proptest::collection::vec(ip(), 0..4),
        ready in proptest::option::of(any::<bool>()),
        terminating in proptest::option::of(any::<bool>()),
        node in prop_oneof![Just("n1"), Just("n2")],
        zone in prop_oneof![Just("zone-a"), Just("zone-b")],
    ) -> String {
        let conditions = |value: Option<bool>| value.map_or("null".to_string(), |v| v.to_string());
        let endpoints: String = addresses
            .iter()
            .map(|a| {
                format!(
                    "- {{addresses: ['{a}'], nodeName: {node}, conditions: {{ready: {}, terminating: {}}}, \
                     hints: {{forZones: [{{name: {zone}}}]}}}}\n",
                    conditions(ready),
                    conditions(terminating)
                )
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-x, namespace: p, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: {family}\nports: [{{name: http, port: {port}, protocol: '{proto}'}}]\n\
             endpoints:{}\n",
            if endpoints.is_empty() { " []\n".to_string() } else { format!("\n{endpoints}") }
        )
    }
}

fn options(zone: bool) -> Options {
    Options {
        node_name: Some("n1".into()),
        zone: zone.then(|| "zone-a".into()),
        ..Options::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any bytes, as YAML or JSON: an error or objects, never a panic.
    #[test]
    fn arbitrary_text_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), json in any::<bool>()) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_file_text(&text, Path::new("fuzz.yaml"), json);
    }

    /// Documents that look like ours, cut anywhere: never a panic.
    #[test]
    fn cut_documents_never_panic(doc in service(), cut in 0usize..600) {
        let end = doc.char_indices().map(|(i, _)| i).nth(cut).unwrap_or(doc.len());
        let _ = parse_file_text(&doc[..end], Path::new("cut.yaml"), false);
    }

    /// Any mix of Services and EndpointSlices with hostile field values: the translation is
    /// deterministic, and the incremental translator ends where a fresh one does.
    #[test]
    fn translation_is_deterministic_and_incremental(
        first in proptest::collection::vec(prop_oneof![service(), slice()], 0..6),
        second in proptest::collection::vec(prop_oneof![service(), slice()], 0..6),
        zone in any::<bool>(),
    ) {
        let objects = |docs: &[String]| -> Objects {
            parse_file_text(&docs.join("---\n"), Path::new("p.yaml"), false).unwrap_or_default()
        };
        let (a, b) = (objects(&first), objects(&second));
        let options = options(zone);
        prop_assert_eq!(translate(&a, &options), translate(&a, &options));
        let mut incremental = Translator::default();
        incremental.translate(&a, &options);
        let after = incremental.translate(&b, &options).clone();
        prop_assert_eq!(after, translate(&b, &options));
    }
}
