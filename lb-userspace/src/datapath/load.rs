//! Loading the eBPF object (maps pinned or private) and looking up its programs by type.
use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ProgramArray},
    programs::{CgroupSockAddr, SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{map_names, program_names, skb_access};

use super::{
    DatapathError, clock, error_chain, migrate,
    pins::{Hook, PinLayout, check_pinned_layouts},
    skb_access::SkbAccess,
};

/// Loads the object and its programs. With `pins`, every map is pinned there (or the existing
/// pin reused, so conntrack and services survive an agent restart); without, maps are private.
pub fn load(pins: Option<&PinLayout>) -> Result<Ebpf, DatapathError> {
    load_with(pins, SkbAccess::probe())
}

/// [`load`], the TC programs reading the skb's checksum state as `access` says (tests
/// load the kernels-without-kfunc variant with [`SkbAccess::Helpers`]).
pub fn load_with(pins: Option<&PinLayout>, access: SkbAccess) -> Result<Ebpf, DatapathError> {
    let old = match pins {
        Some(layout) => {
            let old = migrate::take_old_backends(layout)?;
            migrate::drop_old_counts(layout)?;
            check_pinned_layouts(layout)?;
            old
        }
        None => migrate::OldBackends::default(),
    };
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = match pins {
        Some(layout) => map_names::ALL
            .iter()
            .map(|name| (*name, layout.map(name)))
            .collect(),
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut object = crate::ebpf_object().to_vec();
    let patched = access.patch(&mut object)?;
    log::debug!("skb access {access:?}: {patched} placeholder calls rewritten");
    let ip_summed_bit = access.ip_summed_bit();
    loader.override_global(skb_access::IP_SUMMED_BIT, &ip_summed_bit, true);
    let mut ebpf = loader
        .load(&object)
        .map_err(|e| DatapathError::Load(Box::new(e)))?;
    // Before any program of this object (the IPv6 stages, tail-called by the programs still
    // attached, first) can read the backend arrays.
    migrate::restore(&mut ebpf, old)?;
    for hook in Hook::POD {
        let program = program(&mut ebpf, hook.program())?;
        verify(hook.program(), || program.load())?;
    }
    load_ipv6_stages(&mut ebpf)?;
    let xdp = xdp_program(&mut ebpf)?;
    verify(program_names::XDP_EXTERNAL, || xdp.load())?;
    for hook in Hook::CGROUP {
        let program = sock_program(&mut ebpf, hook.program())?;
        verify(hook.program(), || program.load())?;
    }
    calibrate_clock(&mut ebpf)?;
    Ok(ebpf)
}

/// Samples the clock probe takes for [`clock::fit`], and rounds of them it may take.
const CLOCK_SAMPLES: usize = 9;
const CLOCK_ROUNDS: usize = 3;

/// Measures the line from jiffies to the coarse clock and gives it to the programs (the
/// global `XLB_CLOCK_LINE`, section `map_names::CLOCK`), before any of them is attached.
/// Where it cannot (the probe does not load or run, or the two clocks do not move
/// together), the line stays zero and the programs call the coarse clock's helper: slower,
/// the same stamps; logged.
fn calibrate_clock(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let line = match measure_clock(ebpf) {
        Ok(line) => line,
        Err(e) => {
            log::warn!(
                "the datapath clock reads the kernel's coarse clock through a helper call \
                 (slower): {e}"
            );
            return Ok(());
        }
    };
    let map_error = |e: aya::maps::MapError| DatapathError::Map {
        name: map_names::CLOCK,
        message: e.to_string(),
    };
    let mut map: Array<_, [u64; 2]> = Array::try_from(
        ebpf.map_mut(map_names::CLOCK)
            .ok_or(DatapathError::MissingMap(map_names::CLOCK))?,
    )
    .map_err(map_error)?;
    map.set(0, [line.tick_ns, line.offset_ns], 0)
        .map_err(map_error)?;
    log::debug!("datapath clock: jiffies along {line:?}");
    Ok(())
}

/// Samples jiffies and the coarse clock through the probe program and fits their line.
fn measure_clock(ebpf: &mut Ebpf) -> Result<clock::JiffyLine, DatapathError> {
    let name = program_names::CLOCK_PROBE;
    let probe: &mut Xdp = typed_program(ebpf, name)?;
    verify(name, || probe.load())?;
    let mut round = 0;
    loop {
        let mut samples = Vec::with_capacity(CLOCK_SAMPLES);
        for _ in 0..CLOCK_SAMPLES {
            let (frame, mut out) = ([0u8; 64], [0u8; 64]);
            probe
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .map_err(|source| DatapathError::Program {
                    name,
                    source: Box::new(source),
                })?;
            let word = |at: usize| u64::from_ne_bytes(out[at..at + 8].try_into().expect("8 bytes"));
            samples.push((word(0), word(8)));
        }
        round += 1;
        match clock::fit(clock::coarse_tick_ns(), &samples) {
            Ok(line) => return Ok(line),
            Err(e) if round < CLOCK_ROUNDS => log::debug!("measuring the datapath clock: {e}"),
            Err(e) => return Err(DatapathError::Clock(e)),
        }
    }
}

/// Times a program's load is tried when the verifier was interrupted (below).
const VERIFY_TRIES: usize = 3;

/// Loads program `name` (`load`: its `load`), again if the verifier gave up with EAGAIN: it
/// does when a signal is pending for the loading process (seen once in a test process),
/// which says nothing about the program.
fn verify(
    name: &'static str,
    load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), DatapathError> {
    let interrupted = |e: &aya::programs::ProgramError| {
        let interrupted = matches!(
            e,
            aya::programs::ProgramError::LoadError { io_error, .. }
                if io_error.raw_os_error() == Some(libc::EAGAIN)
        );
        if interrupted {
            log::warn!("verifying {name} was interrupted ({e}); trying again");
        }
        interrupted
    };
    retry_interrupted(VERIFY_TRIES, load, interrupted).map_err(|source| DatapathError::Program {
        name,
        source: Box::new(source),
    })
}

/// Runs `attempt` up to `tries` times while its error is `interrupted`.
fn retry_interrupted<E>(
    tries: usize,
    mut attempt: impl FnMut() -> Result<(), E>,
    interrupted: impl Fn(&E) -> bool,
) -> Result<(), E> {
    let mut left = tries;
    loop {
        left -= 1;
        match attempt() {
            Err(e) if left > 0 && interrupted(&e) => {}
            result => return result,
        }
    }
}

/// Loads the IPv6 stages and puts them in the program arrays the IPv4 programs tail-call
/// through (indexes as in `program_names::TC_IPV6` and `XDP_IPV6`). A reused (pinned) array
/// gets this object's stages: programs still attached from the previous agent tail-call
/// them until they are replaced too, and the stages read the same maps.
fn load_ipv6_stages(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let mut tc = Vec::new();
    for name in program_names::TC_IPV6 {
        let program = program(ebpf, name)?;
        verify(name, || program.load())?;
        tc.push(stage_fd(name, program.fd())?);
    }
    let mut xdp = Vec::new();
    for name in program_names::XDP_IPV6 {
        let program: &mut Xdp = typed_program(ebpf, name)?;
        verify(name, || program.load())?;
        xdp.push(stage_fd(name, program.fd())?);
    }
    fill_stages(ebpf, map_names::PROGS6, &tc)?;
    fill_stages(ebpf, map_names::PROGS6_XDP, &xdp)
}

fn stage_fd(
    name: &'static str,
    fd: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
) -> Result<aya::programs::ProgramFd, DatapathError> {
    let fd = fd.map_err(|source| DatapathError::Program {
        name,
        source: Box::new(source),
    })?;
    fd.try_clone().map_err(|e| DatapathError::Map {
        name: map_names::PROGS6,
        message: format!("duplicating the descriptor of {name}: {e}"),
    })
}

fn fill_stages(
    ebpf: &mut Ebpf,
    name: &'static str,
    fds: &[aya::programs::ProgramFd],
) -> Result<(), DatapathError> {
    let map = ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
    let mut stages = ProgramArray::try_from(map).map_err(|e| DatapathError::Map {
        name,
        message: error_chain(&e),
    })?;
    for (index, fd) in fds.iter().enumerate() {
        stages
            .set(index as u32, fd, 0)
            .map_err(|e| DatapathError::Map {
                name,
                message: error_chain(&e),
            })?;
    }
    Ok(())
}

/// A loaded cgroup sock_addr program by name.
pub fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    typed_program(ebpf, name)
}

/// A program of the object by name, as its type.
fn typed_program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name,
            source: Box::new(source),
        })
}

/// A loaded TC program by name.
pub fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    typed_program(ebpf, name)
}

/// The loaded XDP program.
pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    typed_program(ebpf, program_names::XDP_EXTERNAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_load_is_tried_again_a_bounded_number_of_times() {
        let eagain = || std::io::Error::from_raw_os_error(libc::EAGAIN);
        let interrupted = |e: &std::io::Error| e.raw_os_error() == Some(libc::EAGAIN);
        // Interrupted twice, then verified.
        let mut calls = 0;
        let result = retry_interrupted(
            3,
            || {
                calls += 1;
                if calls < 3 { Err(eagain()) } else { Ok(()) }
            },
            interrupted,
        );
        assert!(result.is_ok());
        assert_eq!(calls, 3);
        // Interrupted every time: the last error is reported.
        let mut calls = 0;
        let result = retry_interrupted(
            3,
            || {
                calls += 1;
                Err(eagain())
            },
            interrupted,
        );
        assert_eq!(
            result.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EAGAIN))
        );
        assert_eq!(calls, 3);
        // Refused by the verifier: reported at once.
        let mut calls = 0;
        let result = retry_interrupted(
            3,
            || {
                calls += 1;
                Err(std::io::Error::from_raw_os_error(libc::EACCES))
            },
            interrupted,
        );
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }
}
