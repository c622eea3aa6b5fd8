//! Service and EndpointSlice YAML as the Kubernetes API serves it, for tests and the demo.
use std::fmt::Write as _;

/// A ClusterIP Service with TCP port 80 → named target "http" and UDP 53 → "dns".
pub fn service(name: &str, cluster_ip: &str, affinity_timeout: Option<u32>) -> String {
    let affinity = affinity_timeout
        .map(|t| {
            format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}\n")
        })
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n{affinity}  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: http\n  - name: dns\n    port: 53\n    protocol: UDP\n    targetPort: 5353\n"
    )
}

/// An EndpointSlice for `service` with `(pod IP, ready)` endpoints on 8080/TCP and 5353/UDP.
pub fn slice(service: &str, endpoints: &[(&str, bool)]) -> String {
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abc12\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\n- name: dns\n  port: 5353\n  protocol: UDP\nendpoints:\n"
    );
    for (ip, ready) in endpoints {
        let _ = write!(
            out,
            "- addresses: [\"{ip}\"]\n  conditions:\n    ready: {ready}\n    serving: {ready}\n    terminating: false\n"
        );
    }
    if endpoints.is_empty() {
        out = out.replace("endpoints:\n", "endpoints: []\n");
    }
    out
}

/// `slice` for the IPv6 addresses of a dual-stack or IPv6 Service (one slice per family,
/// as the EndpointSlice controller writes them).
pub fn slice6(service: &str, endpoints: &[(&str, bool)]) -> String {
    slice(service, endpoints)
        .replace("addressType: IPv4", "addressType: IPv6")
        .replace(
            &format!("name: {service}-abc12"),
            &format!("name: {service}-v6xyz"),
        )
}

/// A Service with `cluster_ips` (one per family, the first the primary) and the ports of
/// `service`, `ipFamilyPolicy` as the API server sets it for that many families.
pub fn dual_stack_service(name: &str, cluster_ips: &[&str]) -> String {
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    let policy = if cluster_ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    let quoted: Vec<String> = cluster_ips.iter().map(|ip| format!("'{ip}'")).collect();
    service(name, cluster_ips[0], None).replace(
        &format!("  clusterIP: {ip}\n  clusterIPs: [{ip}]\n", ip = cluster_ips[0]),
        &format!(
            "  clusterIP: '{}'\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  ipFamilyPolicy: {policy}\n",
            cluster_ips[0],
            quoted.join(", "),
            families.join(", ")
        ),
    )
}

/// `service_yaml` with the `xlb.io/scheduler` annotation set to `scheduler`.
pub fn with_scheduler(service_yaml: &str, scheduler: &str) -> String {
    service_yaml.replacen(
        "metadata:\n",
        &format!("metadata:\n  annotations:\n    xlb.io/scheduler: {scheduler}\n"),
        1,
    )
}
