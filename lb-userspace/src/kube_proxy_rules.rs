//! `xlb cleanup --kube-proxy-rules`: removes what kube-proxy leaves behind when it is
//! replaced — its iptables chains (and every rule jumping to them) and its nftables tables —
//! while keeping everything else, kubelet's own KUBE-* chains included.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

/// Chains kube-proxy's iptables mode creates (kube-proxy's own `--cleanup` list).
const OWNED: [&str; 8] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
];
/// Per-service chain prefixes.
const OWNED_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-XLB-",
    "KUBE-EXT-",
    "KUBE-SVL-",
];

fn owned(chain: &str) -> bool {
    OWNED.contains(&chain) || OWNED_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// `iptables-save` output without kube-proxy's chains and the rules in or jumping to them;
/// returns the new text and how many chains and rules went. Tables without any are left
/// out of the result, so `iptables-restore` does not touch them.
pub fn strip(save: &str) -> (String, usize) {
    let mut out = String::new();
    let mut removed = 0;
    let mut table: Vec<String> = Vec::new();
    let mut table_removed = 0;
    for line in save.lines() {
        if line.starts_with('*') {
            table = vec![line.to_string()];
            table_removed = 0;
            continue;
        }
        if line == "COMMIT" {
            if table_removed > 0 {
                out.push_str(&table.join("\n"));
                out.push_str("\nCOMMIT\n");
                removed += table_removed;
            }
            table.clear();
            continue;
        }
        if table.is_empty() {
            continue; // comments outside tables
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let drop = match fields.first() {
            Some(chain) if chain.starts_with(':') => owned(&chain[1..]),
            Some(&"-A") => {
                let in_owned = fields.get(1).is_some_and(|c| owned(c));
                let jumps = fields
                    .windows(2)
                    .any(|w| matches!(w[0], "-j" | "-g" | "--jump" | "--goto") && owned(w[1]));
                in_owned || jumps
            }
            _ => false,
        };
        if drop {
            table_removed += 1;
        } else {
            table.push(line.to_string());
        }
    }
    (out, removed)
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("running {program}: {message} (is the iptables package installed?)")]
    Run { program: String, message: String },
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, CleanupError> {
    let err = |message: String| CleanupError::Run {
        program: format!("{program} {}", args.join(" ")),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes kube-proxy's rules from this network namespace (IPv4 and IPv6 iptables, and the
/// nftables tables of its nftables mode); returns a line per thing removed.
pub fn cleanup() -> Result<Vec<String>, CleanupError> {
    let mut report = Vec::new();
    for (save, restore) in [
        ("iptables-save", "iptables-restore"),
        ("ip6tables-save", "ip6tables-restore"),
    ] {
        let current = match run(save, &[], None) {
            Ok(text) => text,
            Err(e) if save.starts_with("ip6") => {
                log::debug!("{e}; skipping IPv6");
                continue;
            }
            Err(e) => return Err(e),
        };
        let (stripped, removed) = strip(&current);
        if removed > 0 {
            run(restore, &[], Some(&stripped))?;
            report.push(format!(
                "{save}: removed {removed} kube-proxy chains and rules"
            ));
        }
    }
    for family in ["ip", "ip6"] {
        if run("nft", &["list", "table", family, "kube-proxy"], None).is_ok() {
            run("nft", &["delete", "table", family, "kube-proxy"], None)?;
            report.push(format!("nftables: removed table {family} kube-proxy"));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "# Generated by iptables-save v1.8.9
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-XYZ - [0:0]
:KUBE-POSTROUTING - [0:0]
:MY-NAT - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A PREROUTING -j MY-NAT
-A POSTROUTING -j KUBE-POSTROUTING
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp --dport 80 -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -j KUBE-SEP-XYZ
-A KUBE-SEP-XYZ -p tcp -j DNAT --to-destination 10.244.1.2:8080
-A MY-NAT -p tcp --dport 8080 -j REDIRECT --to-ports 80
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j MARK --set-mark 1
COMMIT
";

    #[test]
    fn strips_kube_proxy_and_keeps_the_rest() {
        let (out, removed) = strip(SAVE);
        assert_eq!(removed, 14, "{out}");
        assert!(
            !out.contains("KUBE-SERVICES")
                && !out.contains("KUBE-SVC")
                && !out.contains("KUBE-SEP")
        );
        assert!(!out.contains("KUBE-FORWARD") && !out.contains("KUBE-POSTROUTING"));
        for kept in [
            ":KUBE-FIREWALL",
            "-A INPUT -j KUBE-FIREWALL",
            "--dport 22 -j ACCEPT",
            ":MY-NAT",
            "-A PREROUTING -j MY-NAT",
            "REDIRECT --to-ports 80",
        ] {
            assert!(out.contains(kept), "{kept} kept in:\n{out}");
        }
        assert!(
            !out.contains("*mangle"),
            "untouched tables are not restored"
        );
        assert_eq!(out.matches("COMMIT").count(), 2);
    }

    #[test]
    fn nothing_to_strip_is_a_noop() {
        let plain = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        assert_eq!(strip(plain), (String::new(), 0));
    }
}
