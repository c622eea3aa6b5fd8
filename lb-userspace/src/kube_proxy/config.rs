//! `xlb agent --config FILE`: the `KubeProxyConfiguration` kubeadm keeps in the kube-proxy
//! ConfigMap, so an operator replacing kube-proxy keeps one configuration. The fields that
//! mean something for xlb are used (flags given on the command line still win); every other
//! field is reported once as ignored, naming it.
use std::{net::SocketAddr, path::Path};

use lb_common::CtTimeouts;

use crate::model::{IpNet, Scheduler};

/// What xlb takes from a `KubeProxyConfiguration`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KubeProxySettings {
    /// `nodePortAddresses`: NodePorts answer on node addresses inside these.
    pub node_port_cidrs: Vec<IpNet>,
    /// `clusterCIDR` (one per family when dual-stack): ClusterIP traffic from outside it
    /// (arriving from outside the node) is balanced and masqueraded, as kube-proxy's
    /// KUBE-MARK-MASQ rule does.
    pub cluster_cidrs: Vec<IpNet>,
    /// `masqueradeAll`.
    pub masquerade_all: bool,
    /// `ipvs.scheduler`, as the node's default algorithm.
    pub scheduler: Option<Scheduler>,
    pub metrics_addr: Option<SocketAddr>,
    pub healthz_addr: Option<SocketAddr>,
    /// `hostnameOverride`: this node's name.
    pub node_name: Option<String>,
    /// `conntrack.tcpEstablishedTimeout`, `tcpCloseWaitTimeout`, `udpTimeout` as xlb's own
    /// connection-tracking lifetimes (0: xlb's default).
    pub ct_timeouts: CtTimeouts,
    /// Fields present but not used, with why (reported by the agent at start).
    pub ignored: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading kube-proxy configuration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not YAML/JSON: {message}")]
    Parse { path: String, message: String },
    #[error(
        "{path}: kind {kind:?} of {api_version:?} is not a KubeProxyConfiguration \
         (kubeproxy.config.k8s.io/v1alpha1)"
    )]
    Kind {
        path: String,
        kind: String,
        api_version: String,
    },
    #[error("{path}: {field}: {message}")]
    Field {
        path: String,
        field: String,
        message: String,
    },
}

/// Reads `path` (YAML or JSON; a kube-proxy ConfigMap's `config.conf`).
pub fn read(path: &Path) -> Result<KubeProxySettings, ConfigFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text, &shown)
}

/// A kube-proxy address field: "IP:PORT", ":PORT" (every address) or "" (unset).
fn bind_address(value: &str) -> Result<Option<SocketAddr>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    let full = match value.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => value.to_string(),
    };
    full.parse()
        .map(Some)
        .map_err(|_| format!("{value:?} is not IP:PORT or :PORT"))
}

/// A Go duration ("24h0m0s", "1m30s", "500ms") in whole seconds, saturating at u32::MAX.
fn go_duration_s(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a duration (e.g. 24h0m0s, 30s)");
    let mut total_ms: u64 = 0;
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(0);
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return Err(bad());
        };
        total_ms = total_ms.saturating_add(value.saturating_mul(unit_ms));
        rest = &rest[len..];
    }
    Ok(u32::try_from(total_ms / 1_000).unwrap_or(u32::MAX))
}

/// IPVS scheduler names → xlb's algorithms.
fn ipvs_scheduler(name: &str) -> Option<Scheduler> {
    match name {
        "rr" => Some(Scheduler::RoundRobin),
        "lc" => Some(Scheduler::LeastConn),
        "sh" => Some(Scheduler::SourceHash),
        "mh" => Some(Scheduler::Maglev),
        _ => None,
    }
}

pub fn parse(text: &str, path: &str) -> Result<KubeProxySettings, ConfigFileError> {
    let value: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| ConfigFileError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })?;
    let field_err = |field: &str, message: String| ConfigFileError::Field {
        path: path.to_string(),
        field: field.to_string(),
        message,
    };
    let text_of = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let (kind, api_version) = (text_of(&value["kind"]), text_of(&value["apiVersion"]));
    if kind != "KubeProxyConfiguration" || !api_version.starts_with("kubeproxy.config.k8s.io/") {
        return Err(ConfigFileError::Kind {
            path: path.to_string(),
            kind,
            api_version,
        });
    }
    let mut out = KubeProxySettings::default();
    let Some(fields) = value.as_object() else {
        return Ok(out);
    };
    for (name, v) in fields {
        match name.as_str() {
            "apiVersion" | "kind" => {}
            "nodePortAddresses" => {
                for cidr in v.as_array().into_iter().flatten() {
                    let cidr = text_of(cidr);
                    match cidr.parse::<IpNet>() {
                        Ok(net) => out.node_port_cidrs.push(net),
                        Err(_) if cidr == "primary" => out.ignored.push(format!(
                            "nodePortAddresses {cidr:?}: give the node's addresses as CIDRs \
                             (or --node-ips)"
                        )),
                        Err(e) => return Err(field_err(name, e.to_string())),
                    }
                }
            }
            "clusterCIDR" => {
                for cidr in text_of(v)
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                {
                    match cidr.parse::<IpNet>() {
                        Ok(net) => out.cluster_cidrs.push(net),
                        Err(e) => return Err(field_err(name, e.to_string())),
                    }
                }
            }
            "masqueradeAll" => out.masquerade_all = v.as_bool().unwrap_or(false),
            "ipvs" => {
                let scheduler = text_of(&v["scheduler"]);
                if !scheduler.is_empty() {
                    match ipvs_scheduler(&scheduler) {
                        Some(s) => out.scheduler = Some(s),
                        None => out.ignored.push(format!(
                            "ipvs.scheduler {scheduler:?}: xlb has rr, lc, sh and mh \
                             (round-robin, least-conn, source-hash, maglev)"
                        )),
                    }
                }
            }
            "metricsBindAddress" => {
                out.metrics_addr = bind_address(&text_of(v)).map_err(|e| field_err(name, e))?
            }
            "healthzBindAddress" => {
                out.healthz_addr = bind_address(&text_of(v)).map_err(|e| field_err(name, e))?
            }
            "hostnameOverride" => {
                out.node_name = Some(text_of(v)).filter(|n| !n.is_empty());
            }
            "conntrack" => {
                for (key, setting) in v.as_object().into_iter().flatten() {
                    let seconds = |setting: &serde_json::Value| match setting.as_str() {
                        None => Ok(0),
                        Some(text) => go_duration_s(text)
                            .map_err(|e| field_err(&format!("conntrack.{key}"), e)),
                    };
                    match key.as_str() {
                        "tcpEstablishedTimeout" => {
                            out.ct_timeouts.tcp_established_s = seconds(setting)?
                        }
                        "tcpCloseWaitTimeout" => out.ct_timeouts.tcp_closing_s = seconds(setting)?,
                        "udpTimeout" => out.ct_timeouts.other_s = seconds(setting)?,
                        other => out.ignored.push(format!(
                            "conntrack.{other}: xlb's connection tracking is its own (a \
                             fixed-size LRU table, no netfilter sysctl)"
                        )),
                    }
                }
            }
            "mode" => out.ignored.push(format!(
                "mode {}: xlb replaces every kube-proxy mode",
                v.as_str().unwrap_or("(empty)")
            )),
            other => out.ignored.push(format!("{other}: not used by xlb")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What kubeadm writes into the kube-proxy ConfigMap (config.conf), trimmed.
    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
clusterCIDR: 10.244.0.0/16
conntrack:
  maxPerCore: null
  tcpEstablishedTimeout: 24h0m0s
  tcpCloseWaitTimeout: 1h0m0s
  udpTimeout: 30s
healthzBindAddress: ""
hostnameOverride: ""
ipvs:
  scheduler: "rr"
masqueradeAll: false
metricsBindAddress: "127.0.0.1:10249"
mode: ipvs
nodePortAddresses: ["192.168.0.0/16", "fd00::/64"]
"#;

    #[test]
    fn kubeadm_configuration_maps_and_reports_the_rest() {
        let s = parse(KUBEADM, "config.conf").expect("valid");
        assert_eq!(s.cluster_cidrs, ["10.244.0.0/16".parse().expect("cidr")]);
        assert_eq!(s.scheduler, Some(Scheduler::RoundRobin));
        assert_eq!(s.metrics_addr, "127.0.0.1:10249".parse().ok());
        assert_eq!(s.healthz_addr, None, "empty means kube-proxy's default");
        assert_eq!(s.node_name, None);
        assert_eq!(
            s.node_port_cidrs,
            [
                "192.168.0.0/16".parse().expect("cidr"),
                "fd00::/64".parse().expect("cidr")
            ]
        );
        assert_eq!(
            s.ct_timeouts,
            CtTimeouts {
                tcp_syn_s: 0,
                tcp_established_s: 86_400,
                tcp_closing_s: 3_600,
                other_s: 30,
            }
        );
        assert_eq!(go_duration_s("1m30s"), Ok(90));
        assert_eq!(go_duration_s("500ms"), Ok(0));
        assert!(go_duration_s("1 day").is_err());
        for field in [
            "bindAddress",
            "clientConnection",
            "conntrack.maxPerCore",
            "mode ipvs",
        ] {
            assert!(
                s.ignored.iter().any(|i| i.contains(field)),
                "{field} reported: {:?}",
                s.ignored
            );
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_field_named() {
        let err = parse("kind: Pod\napiVersion: v1\n", "f").expect_err("not kube-proxy's");
        assert!(
            err.to_string().contains("not a KubeProxyConfiguration"),
            "{err}"
        );
        let bad = KUBEADM.replace("10.244.0.0/16", "10.244.0.300/16");
        let err = parse(&bad, "f").expect_err("bad CIDR").to_string();
        assert!(err.starts_with("f: clusterCIDR:"), "{err}");
        let bad = KUBEADM.replace("127.0.0.1:10249", "localhost");
        let err = parse(&bad, "f").expect_err("bad address").to_string();
        assert!(err.contains("metricsBindAddress"), "{err}");
        assert_eq!(
            bind_address(":10256").expect("port only"),
            "0.0.0.0:10256".parse().ok()
        );
        let lc = KUBEADM.replace("\"rr\"", "\"wrr\"");
        let s = parse(&lc, "f").expect("valid");
        assert_eq!(s.scheduler, None);
        assert!(
            s.ignored.iter().any(|i| i.contains("wrr")),
            "{:?}",
            s.ignored
        );
    }
}
