//! Harness of the datapath tables: the real eBPF object with private maps, run through
//! BPF_PROG_TEST_RUN, and helpers to set map state and compare packets.
#![allow(dead_code)] // each test binary uses part of the harness
use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, NodeConfig, Outcome, SCOPE_INTERNAL,
    ServiceKey, ServiceValue, SourceRangeKey, map_names, program_names,
};
use xlb::{loader, prog_test_run};

use std::os::fd::AsRawFd as _;

use xlb_tests::{
    netns::{Netns, unique_tag},
    packet::checksum_errors,
};

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_REDIRECT: i32 = 7;
pub const PASS: i32 = -1; // TC_ACT_UNSPEC: continue untouched

pub const CLIENT: &str = "10.244.0.5";
pub const VIP: &str = "10.96.0.10";
pub const SERVICE_ID: u32 = 7;

pub fn ip(s: &str) -> u32 {
    u32::from_ne_bytes(s.parse::<Ipv4Addr>().expect("test address").octets())
}

/// A freshly loaded object with private (unpinned) maps: every test starts from empty maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    _netns: Netns,
}

#[derive(Clone, Copy)]
pub enum Hook {
    FromPod,
    ToPod,
}

impl Datapath {
    /// Loads the object, and moves the calling test's thread into an empty network
    /// namespace of its own: the programs' FIB lookups then find no route whatever the
    /// machine's routing, so verdicts do not depend on the host.
    pub fn new() -> Datapath {
        let netns = Netns::new(&unique_tag(), "dp").expect("test namespace");
        let file = std::fs::File::open(netns.path()).expect("open namespace");
        // SAFETY: setns on an open netns fd only moves this (test) thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Datapath {
            ebpf: loader::load(None).expect("eBPF object loads and passes the verifier"),
            _netns: netns,
        }
    }

    /// Programs `VIP:port/proto` for pods with backends `(id, ip, port)` in slots 1..=n.
    pub fn service(&mut self, proto: u8, port: u16, backends: &[(u32, &str, u16)], flags: u16) {
        self.frontend(ip(VIP), SCOPE_INTERNAL, proto, port, backends, flags);
    }

    /// Programs frontend `vip:port/proto` in `scope` (vip 0: NodePort on any node address).
    pub fn frontend(
        &mut self,
        vip: u32,
        scope: u8,
        proto: u8,
        port: u16,
        backends: &[(u32, &str, u16)],
        flags: u16,
    ) {
        let key = |slot| ServiceKey {
            vip,
            port: port.to_be(),
            slot,
            proto,
            scope,
            _pad: [0; 2],
        };
        {
            let mut be: HashMap<_, u32, Backend> =
                HashMap::try_from(self.ebpf.map_mut(map_names::BACKENDS).expect("map"))
                    .expect("map type");
            for (id, addr, bport) in backends {
                let b = Backend {
                    ip: ip(addr),
                    port: bport.to_be(),
                    proto,
                    _pad: 0,
                    service_id: SERVICE_ID,
                };
                be.insert(id, b, 0).expect("insert backend");
            }
        }
        let mut svc: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::SERVICES).expect("map"))
                .expect("map type");
        for (slot, (id, _, _)) in backends.iter().enumerate() {
            let v = ServiceValue {
                backend_id: *id,
                ..Default::default()
            };
            svc.insert(key(slot as u16 + 1), v, 0).expect("insert slot");
        }
        let front = ServiceValue {
            backend_id: 0,
            service_id: SERVICE_ID,
            count: backends.len() as u16,
            flags,
            affinity_timeout_s: 10,
        };
        svc.insert(key(0), front, 0).expect("insert frontend");
    }

    pub fn remove_backend(&mut self, id: u32) {
        let mut be: HashMap<_, u32, Backend> =
            HashMap::try_from(self.ebpf.map_mut(map_names::BACKENDS).expect("map"))
                .expect("map type");
        be.remove(&id).expect("backend present");
    }

    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> (i32, Vec<u8>) {
        let name = match hook {
            Hook::FromPod => program_names::TC_FROM_POD,
            Hook::ToPod => program_names::TC_TO_POD,
        };
        let prog = loader::program(&mut self.ebpf, name).expect("program");
        let out = prog_test_run::run(prog, frame, 1).expect("test run");
        (out.retval, out.packet)
    }

    /// Runs the XDP program (traffic from outside) on `frame`.
    pub fn run_external(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = loader::xdp_program(&mut self.ebpf).expect("program");
        let out = prog_test_run::run_xdp(prog, frame, 1).expect("test run");
        (out.retval as u32, out.packet)
    }

    /// Node addresses (NodePorts answer on them; the first is the SNAT source) and the SNAT
    /// port range.
    pub fn set_node(&mut self, addresses: &[&str], ports: (u16, u16)) {
        {
            let mut ips: HashMap<_, u32, u32> =
                HashMap::try_from(self.ebpf.map_mut(map_names::NODE_IPS).expect("map"))
                    .expect("map type");
            for a in addresses {
                ips.insert(ip(a), 1, 0).expect("node ip");
            }
        }
        let mut config: Array<_, NodeConfig> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).expect("map")).expect("map type");
        let node = NodeConfig {
            snat_addr: ip(addresses[0]),
            snat_port_min: ports.0,
            snat_port_max: ports.1,
        };
        config.set(0, node, 0).expect("config");
    }

    /// Allows `cidr` ("a.b.c.d/n") for the test service's source ranges.
    pub fn allow_source(&mut self, cidr: &str) {
        let (addr, prefix) = cidr.split_once('/').expect("cidr");
        let mut ranges: LpmTrie<_, SourceRangeKey, u8> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::SOURCE_RANGES).expect("map"))
                .expect("map type");
        let key = Key::new(
            32 + prefix.parse::<u32>().expect("prefix"),
            SourceRangeKey {
                service_id_be: SERVICE_ID.to_be(),
                addr: ip(addr),
            },
        );
        ranges.insert(&key, 1, 0).expect("range");
    }

    pub fn stat(&self, o: Outcome) -> u64 {
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::STATS).expect("map")).expect("map type");
        stats.get(&o, 0).expect("stat").iter().sum()
    }

    pub fn ct(&self) -> Vec<(CtKey, CtValue)> {
        let ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map(map_names::CONNTRACK).expect("map")).expect("map type");
        ct.iter().map(|r| r.expect("ct entry")).collect()
    }

    pub fn set_affinity(&mut self, client: &str, backend_id: u32, last_used_ns: u64) {
        let mut aff: HashMap<_, AffinityKey, AffinityValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::AFFINITY).expect("map"))
                .expect("map type");
        let key = AffinityKey {
            client: ip(client),
            service_id: SERVICE_ID,
        };
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns,
        };
        aff.insert(key, value, 0).expect("affinity");
    }
}

impl Datapath {
    /// Moves every conntrack entry's last-seen time `seconds` into the past.
    pub fn age_conntrack(&mut self, seconds: u64) {
        let mut ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK).expect("map"))
                .expect("map type");
        let entries: Vec<(CtKey, CtValue)> = ct.iter().map(|r| r.expect("entry")).collect();
        for (k, mut v) in entries {
            v.last_seen_ns -= seconds * 1_000_000_000;
            ct.insert(k, v, 0).expect("update");
        }
    }
}

/// Asserts `out` equals `input` except for the given byte ranges, and that checksums hold.
pub fn assert_only_changed(input: &[u8], out: &[u8], allowed: &[std::ops::Range<usize>]) {
    assert_eq!(input.len(), out.len(), "length changed");
    for (i, (a, b)) in input.iter().zip(out).enumerate() {
        if a != b {
            assert!(
                allowed.iter().any(|r| r.contains(&i)),
                "byte {i} changed ({a:#04x} -> {b:#04x}) outside the NAT fields"
            );
        }
    }
    assert_eq!(checksum_errors(out), Vec::<String>::new());
}

pub const IP_CSUM: std::ops::Range<usize> = 24..26;
pub const IP_SRC: std::ops::Range<usize> = 26..30;
pub const IP_DST: std::ops::Range<usize> = 30..34;
pub const SPORT: std::ops::Range<usize> = 34..36;
pub const DPORT: std::ops::Range<usize> = 36..38;
pub const TCP_CSUM: std::ops::Range<usize> = 50..52;
pub const UDP_CSUM: std::ops::Range<usize> = 40..42;
