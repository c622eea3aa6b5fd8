//! Two CPUs running one program on the same packets at the same instant: for the races a
//! single test run cannot show (two first packets of one flow, each missing the other's
//! conntrack entry).
use std::sync::atomic::{AtomicU32, Ordering};

use lb_common::program_names;
use xlb::datapath::load;

use crate::datapath::{Datapath, test_run};

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
    /// per frame, pinned to CPUs 0 and 1) and returns each frame's two outputs. `None` on a
    /// machine with fewer than two CPUs, where no two packets can race.
    pub fn on_two_cpus(&mut self, hook: Hook, frames: &[Vec<u8>]) -> Option<Vec<[Vec<u8>; 2]>> {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < CPUS.len() {
            return None;
        }
        let ebpf = &mut self.ebpf;
        let outputs = match hook {
            Hook::FromPod => {
                let prog = &*load::program(ebpf, program_names::TC_FROM_POD).expect("program");
                race(frames, |frame| {
                    test_run(prog, frame, 1).expect("test run").packet
                })
            }
            Hook::External => {
                let prog = &*load::xdp_program(ebpf).expect("program");
                race(frames, |frame| {
                    test_run(prog, frame, 1).expect("test run").packet
                })
            }
        };
        Some(outputs)
    }
}

/// Runs `frames` on two CPUs at once (`Datapath::on_two_cpus`) and asserts that both
/// outputs of each went to one destination (`dst` of an output packet). `false` on a
/// machine with one CPU (said on stderr), where nothing raced.
pub fn assert_one_destination_each<D: PartialEq + std::fmt::Debug>(
    dp: &mut Datapath,
    hook: Hook,
    frames: &[Vec<u8>],
    dst: impl Fn(&[u8]) -> D,
) -> bool {
    let Some(outputs) = dp.on_two_cpus(hook, frames) else {
        eprintln!("one CPU: no two first packets can race, nothing to test");
        return false;
    };
    let split: Vec<(usize, D, D)> = outputs
        .iter()
        .enumerate()
        .map(|(i, [a, b])| (i, dst(a), dst(b)))
        .filter(|(_, a, b)| a != b)
        .collect();
    assert!(
        split.is_empty(),
        "{} of {} flows sent to two destinations (frame, one CPU's, the other's): {:?}",
        split.len(),
        frames.len(),
        &split[..split.len().min(10)]
    );
    true
}

fn race(frames: &[Vec<u8>], run: impl Fn(&[u8]) -> Vec<u8> + Sync) -> Vec<[Vec<u8>; 2]> {
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

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
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
