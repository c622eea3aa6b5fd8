//! Two CPUs running one program on the same packets at the same instant: for the races a
//! single test run cannot show (two first packets of one flow, each missing the other's
//! conntrack entry).
use std::sync::atomic::{AtomicU32, Ordering};

use lb_common::{outcome, program_names};
use xlb::datapath::load;

use crate::datapath::{Datapath, TC_ACT_SHOT, XDP_DROP, test_run};

/// New flows a race test sends: two CPUs released together miss each other's entry in
/// about half of them on the test VM (the window is the few hundred nanoseconds between
/// a flow's lookup and its insert).
pub const FLOWS: u16 = 2_000;

/// The CPUs the racing threads are pinned to.
const CPUS: [usize; 2] = [0, 1];

/// Ten backends (ids 1..=10) at `address(id)`, all on one port: where racing flows go.
pub struct Backends(Vec<(u32, String, u16)>);

impl Backends {
    pub fn ten(address: impl Fn(u32) -> String, port: u16) -> Backends {
        Backends((1..=10).map(|id| (id, address(id), port)).collect())
    }

    /// As `Datapath::service` and `Datapath::frontend` take them.
    pub fn entries(&self) -> Vec<(u32, &str, u16)> {
        self.0
            .iter()
            .map(|(id, addr, port)| (*id, addr.as_str(), *port))
            .collect()
    }
}

/// Which program the two CPUs run.
#[derive(Clone, Copy)]
pub enum Hook {
    FromPod,
    External,
}

impl Datapath {
    /// Runs each of `frames` on two CPUs at once (both threads released by one spin barrier
    /// per frame, pinned to CPUs 0 and 1) and returns each frame's two outputs (verdict and
    /// packet). `None` on a machine with fewer than two CPUs, where no two packets can race.
    pub fn on_two_cpus(&mut self, hook: Hook, frames: &[Vec<u8>]) -> Option<Vec<[Output; 2]>> {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < CPUS.len() {
            return None;
        }
        let ebpf = &mut self.ebpf;
        let outputs = match hook {
            Hook::FromPod => {
                let prog = &*load::program(ebpf, program_names::TC_FROM_POD).expect("program");
                race(frames, |frame| {
                    let out = test_run(prog, frame, 1).expect("test run");
                    (out.retval, out.packet)
                })
            }
            Hook::External => {
                let prog = &*load::xdp_program(ebpf).expect("program");
                race(frames, |frame| {
                    let out = test_run(prog, frame, 1).expect("test run");
                    (out.retval, out.packet)
                })
            }
        };
        Some(outputs)
    }
}

/// One CPU's verdict and packet out.
pub type Output = (i32, Vec<u8>);

/// A dropping verdict of `hook`'s program.
fn dropped(hook: Hook, verdict: i32) -> bool {
    match hook {
        Hook::FromPod => verdict == TC_ACT_SHOT,
        Hook::External => verdict == XDP_DROP as i32,
    }
}

/// Runs `frames` on two CPUs at once (`Datapath::on_two_cpus`) and asserts that both
/// outputs of each went to one destination (`dst` of an output packet). One CPU may have
/// dropped its packet instead, counted as `drop_flow_stalled` (the other CPU stalled
/// while recording the flow: rare, at most one flow in a hundred here); returns how many
/// were, or `None` on a machine with one CPU (said on stderr), where nothing raced.
pub fn assert_one_destination_each<D: PartialEq + std::fmt::Debug>(
    dp: &mut Datapath,
    hook: Hook,
    frames: &[Vec<u8>],
    dst: impl Fn(&[u8]) -> D,
) -> Option<u64> {
    let Some(outputs) = dp.on_two_cpus(hook, frames) else {
        eprintln!("one CPU: no two first packets can race, nothing to test");
        return None;
    };
    let stalled = outputs
        .iter()
        .flatten()
        .filter(|(verdict, _)| dropped(hook, *verdict))
        .count() as u64;
    let split: Vec<(usize, D, D)> = outputs
        .iter()
        .enumerate()
        .filter(|(_, [a, b])| !dropped(hook, a.0) && !dropped(hook, b.0))
        .map(|(i, [a, b])| (i, dst(&a.1), dst(&b.1)))
        .filter(|(_, a, b)| a != b)
        .collect();
    assert!(
        split.is_empty(),
        "{} of {} flows sent to two destinations (frame, one CPU's, the other's): {:?}",
        split.len(),
        frames.len(),
        &split[..split.len().min(10)]
    );
    assert_eq!(
        dp.stat(outcome::DROP_FLOW_STALLED) + dp.stat6(outcome::DROP_FLOW_STALLED),
        stalled,
        "every packet dropped in the race is a stalled twin's"
    );
    assert!(
        stalled <= frames.len() as u64 / 100,
        "{stalled} of {} flows' first packets dropped as stalled: the wait is too short",
        frames.len()
    );
    if stalled > 0 {
        eprintln!("{stalled} first packets dropped: their twin's CPU stalled mid-record");
    }
    Some(stalled)
}

fn race(frames: &[Vec<u8>], run: impl Fn(&[u8]) -> Output + Sync) -> Vec<[Output; 2]> {
    // Each thread adds one per frame and spins until both did: a spin (not a futex) keeps
    // the two releases within a few nanoseconds of each other.
    let arrived = AtomicU32::new(0);
    let [a, b] = std::thread::scope(|scope| {
        CPUS.map(|cpu| {
            let (arrived, run) = (&arrived, &run);
            scope.spawn(move || {
                pin_to(cpu);
                let mut out = Vec::with_capacity(frames.len());
                for (i, frame) in frames.iter().enumerate() {
                    let target = (i as u32 + 1) * CPUS.len() as u32;
                    arrived.fetch_add(1, Ordering::AcqRel);
                    while arrived.load(Ordering::Acquire) < target {
                        std::hint::spin_loop();
                    }
                    out.push(run(frame));
                }
                out
            })
        })
        .map(|thread| thread.join().expect("racing thread"))
    });
    a.into_iter().zip(b).map(|(a, b)| [a, b]).collect()
}

/// Pins the calling thread to `cpu` (per-CPU state: a test that needs one CPU's).
pub fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}
