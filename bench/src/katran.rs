//! Katran's XDP balancer beside xlb's programs in the same run (`--katran OBJECT`): the
//! reference operators compare an eBPF balancer's packet cost with. The object is one the
//! operator built from Katran's public source (README: how); nothing here fetches it. It is
//! loaded by `bpftool` (libbpf understands its map-in-map definitions) into a private bpffs,
//! filled as Katran's own loader fills it — VIPs with a consistent-hashing ring each over 10
//! reals, the default router's MAC, one LRU connection table per CPU (as large as xlb's
//! conntrack, for like footprints) — and run through BPF_PROG_TEST_RUN with the frames
//! xlb's NodePort rows use: a SYN from a new client (a new flow, each to another VIP), that
//! flow's next packet (established), and a packet to no VIP (passed).
use std::{
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapData},
    programs::Xdp,
};
use aya_obj::programs::XdpAttachType;
use xlb_tests::{
    datapath::test_run,
    netns::unique_tag,
    packet::{ACK, Frame, SYN},
};

use crate::datapath::{ENDPOINTS, PacketCost, ne, summarize};

const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;

/// `struct vip_definition`: the VIP (IPv4 in the first word), port (network order), proto.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipDefinition {
    addr: [u32; 4],
    port: u16,
    proto: u8,
    _pad: u8,
}
// SAFETY: plain data without padding holes (explicit pad byte).
unsafe impl Pod for VipDefinition {}

/// `struct vip_meta`: flags (none: hash on the 5-tuple, LRU on) and the VIP's ring number.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipMeta {
    flags: u32,
    vip_num: u32,
}
// SAFETY: plain data.
unsafe impl Pod for VipMeta {}

/// `struct real_definition`: the real's address (IPv4 in the first word) and flags.
#[repr(C)]
#[derive(Clone, Copy)]
struct RealDefinition {
    addr: [u32; 4],
    flags: u8,
    _pad: [u8; 3],
}
// SAFETY: plain data with explicit padding.
unsafe impl Pod for RealDefinition {}

/// `struct flow_key` and `struct real_pos_lru`: the sizes of the per-CPU LRU tables.
const FLOW_KEY_SIZE: &str = "40";
const REAL_POS_SIZE: &str = "16";

/// A private bpffs holding the loaded object's program and maps; unmounted (which frees
/// them) and removed on drop.
struct Loaded {
    dir: PathBuf,
}

impl Loaded {
    fn new(object: &Path) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("xlb-bench-katran-{}", unique_tag()));
        let pins = dir.join("pins");
        xlb::datapath::bpffs::ensure_pin_dir(&pins)
            .with_context(|| format!("a private bpffs at {}", dir.display()))?;
        let loaded = Loaded { dir };
        let (prog, maps) = (loaded.path("prog"), loaded.path("maps"));
        bpftool(&[
            "prog",
            "loadall",
            &object.display().to_string(),
            &prog,
            "pinmaps",
            &maps,
            "type",
            "xdp",
        ])
        .with_context(|| format!("loading Katran's object {}", object.display()))?;
        Ok(loaded)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join("pins").join(name).display().to_string()
    }

    fn map(&self, name: &str) -> Result<MapData> {
        let path = self.path(&format!("maps/{name}"));
        MapData::from_pin(&path).with_context(|| format!("Katran's map {path}"))
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bpftool(args: &[&str]) -> Result<()> {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .context("running bpftool (apt-get install bpftool)")?;
    if !out.status.success() {
        bail!(
            "bpftool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// How many VIPs the object was built for (its `vip_map`'s size: Katran's `MAX_VIPS`).
fn capacity(loaded: &Loaded) -> Result<u32> {
    Ok(loaded.map("vip_map")?.info()?.max_entries())
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a70_0000 + i)
}

/// Fills Katran's maps for `vips` VIPs (port 80, TCP) of `ENDPOINTS` reals each.
fn populate(loaded: &Loaded, vips: u32, max_vips: u32) -> Result<()> {
    let mut vip_map: HashMap<_, VipDefinition, VipMeta> =
        HashMap::try_from(Map::HashMap(loaded.map("vip_map")?))?;
    let mut reals: Array<_, RealDefinition> = Array::try_from(Map::Array(loaded.map("reals")?))?;
    let rings = loaded.map("ch_rings")?;
    let max_reals = reals.len();
    // Katran's ring size: the ring map holds MAX_VIPS rings.
    let ring_size = rings.info()?.max_entries() / max_vips;
    // Reals are a shared pool (Katran's MAX_REALS is 4096): index 0 is never used.
    let real_index = |v: u32, e: u32| 1 + (v * ENDPOINTS + e) % (max_reals - 1);
    for v in 0..vips {
        let key = VipDefinition {
            addr: [ne(vip(v)), 0, 0, 0],
            port: 80u16.to_be(),
            proto: 6,
            _pad: 0,
        };
        vip_map.insert(
            key,
            VipMeta {
                flags: 0,
                vip_num: v,
            },
            0,
        )?;
        for e in 0..ENDPOINTS {
            let real = RealDefinition {
                addr: [ne(Ipv4Addr::from(0x0a71_0000 + v * ENDPOINTS + e)), 0, 0, 0],
                flags: 0,
                _pad: [0; 3],
            };
            reals.set(real_index(v, e), real, 0)?;
        }
        // The ring: positions spread over the VIP's reals, as Katran's Maglev fills it.
        let keys: Vec<u32> = (0..ring_size).map(|p| v * ring_size + p).collect();
        let values: Vec<u32> = (0..ring_size)
            .map(|p| real_index(v, p % ENDPOINTS))
            .collect();
        update_batch(rings.fd().as_fd().as_raw_fd(), &keys, &values)
            .context("filling Katran's ch_rings")?;
    }
    // The default router's MAC (ctl_array position 0).
    let mut ctl: Array<_, u64> = Array::try_from(Map::Array(loaded.map("ctl_array")?))?;
    ctl.set(0, u64::from_ne_bytes([2, 0, 0, 0, 0, 1, 0, 0]), 0)?;
    // One LRU connection table per possible CPU, as Katran's loader makes them (without
    // one for the CPU a run lands on it falls back to a 1 000-entry table meant for unit
    // tests; the usable CPUs are too few: a bench pinned to CPU 1 has one).
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let entries = lb_common::map_sizes::CONNTRACK.to_string();
    for cpu in 0..cpus {
        let inner = loaded.path(&format!("lru{cpu}"));
        bpftool(&[
            "map",
            "create",
            &inner,
            "type",
            "lru_hash",
            "key",
            FLOW_KEY_SIZE,
            "value",
            REAL_POS_SIZE,
            "entries",
            &entries,
            "name",
            &format!("katran_lru{cpu}"),
        ])?;
        let key = (cpu as u32).to_ne_bytes().map(|b| b.to_string());
        let mut args = vec!["map", "update", "pinned"];
        let outer = loaded.path("maps/lru_mapping");
        args.push(&outer);
        args.push("key");
        args.extend(key.iter().map(String::as_str));
        args.extend(["value", "pinned", &inner]);
        bpftool(&args)?;
    }
    Ok(())
}

/// `BPF_MAP_UPDATE_BATCH` on an array (millions of ring positions: one syscall per chunk).
fn update_batch(fd: i32, keys: &[u32], values: &[u32]) -> Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    for (k, v) in keys.chunks(65_536).zip(values.chunks(65_536)) {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at live buffers of `count` keys and values of the
        // map's key and value sizes (4 bytes each); the kernel only reads them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("BPF_MAP_UPDATE_BATCH");
        }
    }
    Ok(())
}

/// Katran's rows at `services` VIPs (or `None` if the object holds fewer VIPs: build it
/// with a larger `MAX_VIPS`).
pub fn measure(object: &Path, services: u32, samples: u32) -> Result<Option<Vec<PacketCost>>> {
    let loaded = Loaded::new(object)?;
    let max_vips = capacity(&loaded)?;
    if services > max_vips {
        eprintln!(
            "Katran's object holds {max_vips} VIPs (MAX_VIPS): skipping it at {services} services"
        );
        return Ok(None);
    }
    populate(&loaded, services, max_vips)?;
    let prog = Xdp::from_pin(
        loaded.path("prog/balancer_ingress"),
        XdpAttachType::Interface,
    )
    .context("Katran's program")?;
    let run = |frame: &[u8], want: i32, what: &str| -> Result<u64> {
        let out = test_run(&prog, frame, 1)?;
        if out.retval != want {
            bail!(
                "Katran's verdict on {what} was {} (expected {want})",
                out.retval
            );
        }
        Ok(out.duration_ns)
    };
    let client = |i: u32| Ipv4Addr::from(0xcb00_7200 + (i % 60_000) + 1).to_string();
    let target = |i: u32| vip(i.wrapping_mul(2_654_435_761) % services).to_string();
    let (mut new, mut est, mut pass) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let (c, port, t) = (client(i), 20_000 + (i / 60_000) as u16, target(i));
        new.push(run(
            &Frame::tcp(&c, port, &t, 80, SYN).build(),
            XDP_TX,
            "a SYN",
        )?);
        est.push(run(
            &Frame::tcp(&c, port, &t, 80, ACK).build(),
            XDP_TX,
            "an ACK",
        )?);
        pass.push(run(
            &Frame::tcp(&c, port, "10.250.0.1", 80, ACK).build(),
            XDP_PASS,
            "a packet to no VIP",
        )?);
    }
    Ok(Some(vec![
        summarize("katran_new_flow", services, new),
        summarize("katran_established", services, est),
        summarize("katran_passthrough", services, pass),
    ]))
}
