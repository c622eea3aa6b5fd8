//! Whether a FIB lookup's result may depend on a packet's source address, per family. It
//! cannot when the policy rules are the kernel's defaults and no route is multipath (ECMP
//! hashes the source), uses a nexthop object (which may be a group) or is source-specific
//! (IPv6 `from`): then the next-hop cache keys its entries by destination and ingress
//! interface alone (`lb_common::route_gen`), so every client's flows to a backend share one
//! entry instead of each client paying a FIB lookup. Checked by dumping rules and routes
//! (`route_watch` does it at start and after every routing announcement); any doubt —
//! a rule, an attribute or an answer it does not know — counts as "may depend".
use std::{io, os::fd::OwnedFd};

use super::netlink::{self, RTM_GETROUTE, RTM_GETRULE, RTM_NEWROUTE, RTM_NEWRULE};

const RTA_MULTIPATH: u16 = 9;
const RTA_NH_ID: u16 = 30;
const FRA_PRIORITY: u16 = 6;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_PROTOCOL: u16 = 21;
const FR_ACT_TO_TBL: u8 = 1;
const RT_TABLE_DEFAULT: u32 = 253;
const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;
/// Both `struct rtmsg` and `struct fib_rule_hdr` are 12 bytes, the family first.
const HEADER_LEN: usize = 12;

/// Per family: FIB lookups cannot depend on the source address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceFree {
    pub v4: bool,
    pub v6: bool,
}

impl SourceFree {
    /// What the agent logs when the policy is read or changes.
    pub fn describe(self) -> String {
        let one = |family: &str, free: bool| {
            if free {
                format!("{family} by destination (default rules, no multipath)")
            } else {
                format!("{family} by source and destination (policy rules or multipath routes)")
            }
        };
        format!(
            "next hops cached per {}; {}",
            one("IPv4", self.v4),
            one("IPv6", self.v6)
        )
    }

    /// The flag bits of `XLB_ROUTE_GEN`'s value.
    pub fn bits(self) -> u64 {
        let mut bits = 0;
        if self.v4 {
            bits |= lb_common::route_gen::SOURCE_FREE_V4;
        }
        if self.v6 {
            bits |= lb_common::route_gen::SOURCE_FREE_V6;
        }
        bits
    }
}

/// Checks this network namespace's rules and routes (the calling thread's namespace).
pub fn source_free() -> io::Result<SourceFree> {
    let socket = netlink::socket(libc::NETLINK_ROUTE)?;
    Ok(SourceFree {
        v4: family_source_free(&socket, libc::AF_INET as u8)?,
        v6: family_source_free(&socket, libc::AF_INET6 as u8)?,
    })
}

fn family_source_free(socket: &OwnedFd, family: u8) -> io::Result<bool> {
    let mut header = [0u8; HEADER_LEN];
    header[0] = family;
    let rules = netlink::dump(socket, RTM_GETRULE, &header)?;
    if !default_rules(family, &rules) {
        return Ok(false);
    }
    let routes = netlink::dump(socket, RTM_GETROUTE, &header)?;
    Ok(routes
        .iter()
        .all(|(kind, route)| *kind != RTM_NEWROUTE || route_source_free(route)))
}

/// Whether the dumped rules are exactly the kernel's defaults for `family`: local (0), main
/// (32766) and, for IPv4, default (32767), each without selectors.
fn default_rules(family: u8, rules: &[(u16, Vec<u8>)]) -> bool {
    let mut found = Vec::new();
    for (kind, rule) in rules {
        if *kind != RTM_NEWRULE {
            continue;
        }
        let Some(header) = rule.get(..HEADER_LEN) else {
            return false;
        };
        // dst_len, src_len, tos: no selector; action: look up a table.
        if header[1] != 0 || header[2] != 0 || header[3] != 0 || header[7] != FR_ACT_TO_TBL {
            return false;
        }
        let (mut priority, mut table) = (0u32, u32::from(header[4]));
        for (attr, value) in netlink::attributes(&rule[HEADER_LEN..]) {
            let word = || {
                value
                    .get(..4)
                    .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            };
            match attr {
                FRA_PRIORITY => priority = word().unwrap_or(u32::MAX),
                FRA_TABLE => table = word().unwrap_or(0),
                FRA_PROTOCOL => {}
                // Always dumped; -1 (unset) unless a rule suppresses short prefixes.
                FRA_SUPPRESS_PREFIXLEN if word() == Some(u32::MAX) => {}
                // iif, oif, fwmark, ports, uid range, …: a selector of some kind.
                _ => return false,
            }
        }
        found.push((priority, table));
    }
    found.sort_unstable();
    let defaults: &[(u32, u32)] = if family == libc::AF_INET as u8 {
        &[
            (0, RT_TABLE_LOCAL),
            (32766, RT_TABLE_MAIN),
            (32767, RT_TABLE_DEFAULT),
        ]
    } else {
        &[(0, RT_TABLE_LOCAL), (32766, RT_TABLE_MAIN)]
    };
    found == defaults
}

/// Whether a dumped route's result is the same for every source: not source-specific, not
/// multipath, no nexthop object, no TOS selector.
fn route_source_free(route: &[u8]) -> bool {
    let Some(header) = route.get(..HEADER_LEN) else {
        return false;
    };
    // src_len, tos
    if header[2] != 0 || header[3] != 0 {
        return false;
    }
    netlink::attributes(&route[HEADER_LEN..])
        .iter()
        .all(|(attr, _)| *attr != RTA_MULTIPATH && *attr != RTA_NH_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(priority: Option<u32>, table: u32, extra: &[(u16, &[u8])]) -> (u16, Vec<u8>) {
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes[7] = FR_ACT_TO_TBL;
        let mut attrs: Vec<(u16, Vec<u8>)> = vec![(FRA_TABLE, table.to_ne_bytes().to_vec())];
        if let Some(p) = priority {
            attrs.push((FRA_PRIORITY, p.to_ne_bytes().to_vec()));
        }
        attrs.push((FRA_SUPPRESS_PREFIXLEN, u32::MAX.to_ne_bytes().to_vec()));
        attrs.push((FRA_PROTOCOL, vec![2]));
        attrs.extend(extra.iter().map(|(k, v)| (*k, v.to_vec())));
        for (kind, value) in attrs {
            bytes.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            bytes.extend_from_slice(&kind.to_ne_bytes());
            bytes.extend_from_slice(&value);
            bytes.resize(bytes.len().next_multiple_of(4), 0);
        }
        (RTM_NEWRULE, bytes)
    }

    #[test]
    fn only_the_kernels_default_rules_leave_lookups_source_free() {
        let v4 = libc::AF_INET as u8;
        let defaults = vec![
            rule(None, RT_TABLE_LOCAL, &[]),
            rule(Some(32766), RT_TABLE_MAIN, &[]),
            rule(Some(32767), RT_TABLE_DEFAULT, &[]),
        ];
        assert!(default_rules(v4, &defaults));
        assert!(
            !default_rules(libc::AF_INET6 as u8, &defaults),
            "IPv6 has no default-table rule"
        );
        let mut with_source = defaults.clone();
        with_source.push(rule(Some(100), 100, &[]));
        with_source[3].1[2] = 16; // from 10.9.0.0/16
        assert!(!default_rules(v4, &with_source));
        let mut extra_table = defaults.clone();
        extra_table.push(rule(Some(1000), 100, &[]));
        assert!(!default_rules(v4, &extra_table), "any other rule");
        let mut fwmark = defaults.clone();
        fwmark[1] = rule(Some(32766), RT_TABLE_MAIN, &[(10, &7u32.to_ne_bytes())]);
        assert!(
            !default_rules(v4, &fwmark),
            "a default priority with a selector"
        );
        let mut suppress = defaults.clone();
        suppress[1] = rule(
            Some(32766),
            RT_TABLE_MAIN,
            &[(FRA_SUPPRESS_PREFIXLEN, &0u32.to_ne_bytes())],
        );
        assert!(!default_rules(v4, &suppress), "suppress_prefixlength set");
    }

    #[test]
    fn multipath_nexthop_objects_and_source_routes_may_depend_on_the_source() {
        let plain = [0u8; HEADER_LEN].to_vec();
        assert!(route_source_free(&plain));
        let mut from = plain.clone();
        from[2] = 64;
        assert!(!route_source_free(&from), "IPv6 `from` route");
        for attr in [RTA_MULTIPATH, RTA_NH_ID] {
            let mut route = plain.clone();
            route.extend_from_slice(&8u16.to_ne_bytes());
            route.extend_from_slice(&attr.to_ne_bytes());
            route.extend_from_slice(&[0; 4]);
            assert!(!route_source_free(&route), "attribute {attr}");
        }
        assert!(!route_source_free(&plain[..4]), "a cut message");
    }

    #[test]
    fn the_log_line_names_each_familys_keys() {
        let line = SourceFree {
            v4: false,
            v6: true,
        }
        .describe();
        assert_eq!(
            line,
            "next hops cached per IPv4 by source and destination (policy rules or multipath \
             routes); IPv6 by destination (default rules, no multipath)"
        );
    }

    #[test]
    fn the_flags_land_above_the_generation() {
        let both = SourceFree { v4: true, v6: true }.bits();
        assert_eq!(both & lb_common::route_gen::GENERATION, 0);
        assert_eq!(SourceFree::default().bits(), 0);
    }
}
