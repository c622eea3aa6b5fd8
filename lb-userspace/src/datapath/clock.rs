//! The datapath's clock, read from userspace: conntrack and affinity stamps are
//! CLOCK_MONOTONIC nanoseconds at tick resolution, which start at boot. The programs take
//! them from jiffies along a line the agent measures at load ([`fit`]; lb-ebpf's `clock`
//! says why), or from `bpf_ktime_get_coarse_ns` where it could not.
use std::time::Duration;

use nix::{
    sys::time::TimeSpec,
    time::{ClockId, clock_getres, clock_gettime},
};

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    nanoseconds(clock_gettime(ClockId::CLOCK_MONOTONIC))
}

/// CLOCK_MONOTONIC_COARSE now, in nanoseconds: what the programs' clock reads (up to a tick
/// behind the precise clock).
pub fn coarse_ns() -> u64 {
    nanoseconds(clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE))
}

/// A clock reading (or resolution) in nanoseconds; 0 if the clock could not be read.
fn nanoseconds(t: nix::Result<TimeSpec>) -> u64 {
    t.map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The stamp `age` before `now_ns`, saturating at 0: the clock starts at boot, so on a
/// machine up for less than `age` the oldest stamp there is (0) stands in.
pub fn before(now_ns: u64, age: Duration) -> u64 {
    now_ns.saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX))
}

/// CLOCK_MONOTONIC nanoseconds from jiffies: `jiffies * tick_ns + offset_ns` (wrapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffyLine {
    pub tick_ns: u64,
    pub offset_ns: u64,
}

impl JiffyLine {
    pub fn at(self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.offset_ns)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("the coarse clock's resolution, {0} ns, is no tick length (HZ 100 to 1000)")]
    Tick(u64),
    #[error("no samples")]
    NoSamples,
    #[error(
        "jiffies and the coarse clock do not move together: only {near} of {samples} \
         samples lie within a tick ({tick_ns} ns) of their median line"
    )]
    Spread {
        near: usize,
        samples: usize,
        tick_ns: u64,
    },
}

/// The length of a tick: the coarse clocks' resolution (the kernel's `TICK_NSEC`, by
/// which `jiffies_64` advances).
pub fn coarse_tick_ns() -> u64 {
    nanoseconds(clock_getres(ClockId::CLOCK_MONOTONIC_COARSE))
}

/// The line through `samples` of (jiffies, coarse clock) read back to back: the kernel
/// advances both at each tick, jiffies first, so a sample taken between the two steps (or
/// preempted between its reads) sits off the line; the median offset is the line's. Where
/// no majority of the samples lies within a tick of it, the two clocks do not move
/// together here: an error.
pub fn fit(tick_ns: u64, samples: &[(u64, u64)]) -> Result<JiffyLine, CalibrationError> {
    if !(1_000_000..=10_000_000).contains(&tick_ns) {
        return Err(CalibrationError::Tick(tick_ns));
    }
    // Offsets as signed distances from the first, so that wrapping sorts right.
    let (j0, n0) = *samples.first().ok_or(CalibrationError::NoSamples)?;
    let base = n0.wrapping_sub(j0.wrapping_mul(tick_ns));
    let mut deltas: Vec<i64> = samples
        .iter()
        .map(|(j, n)| n.wrapping_sub(j.wrapping_mul(tick_ns)).wrapping_sub(base) as i64)
        .collect();
    deltas.sort_unstable();
    let median = deltas[deltas.len() / 2];
    let near = deltas
        .iter()
        .filter(|d| d.abs_diff(median) <= tick_ns)
        .count();
    if near * 2 <= samples.len() {
        return Err(CalibrationError::Spread {
            near,
            samples: samples.len(),
            tick_ns,
        });
    }
    Ok(JiffyLine {
        tick_ns,
        offset_ns: base.wrapping_add_signed(median),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: u64 = 4_000_000;

    #[test]
    fn the_line_goes_through_most_samples() {
        // Boot-time jiffies start near 2^32; the offset is then "negative" (wrapping).
        let j = 4_294_967_296 - 75_000 + 12_345;
        let offset = 0u64.wrapping_sub(17_179_569_180_000_000);
        let ns = |j: u64| j.wrapping_mul(TICK).wrapping_add(offset);
        // One sample read between the jiffies step and the clock's: a tick low.
        let samples = [(j, ns(j)), (j, ns(j)), (j + 1, ns(j)), (j + 1, ns(j + 1))];
        let line = fit(TICK, &samples).expect("fits");
        assert_eq!(
            line,
            JiffyLine {
                tick_ns: TICK,
                offset_ns: offset
            }
        );
        assert_eq!(line.at(j + 250), ns(j) + 1_000_000_000);
    }

    #[test]
    fn a_preempted_sample_does_not_move_the_line() {
        let ns = |j: u64| j * TICK + 123;
        let mut samples: Vec<(u64, u64)> = (0..8).map(|i| (1000 + i, ns(1000 + i))).collect();
        samples.push((1000, ns(1000) + 50 * TICK));
        let line = fit(TICK, &samples).expect("fits");
        assert_eq!(line.offset_ns, 123);
    }

    #[test]
    fn clocks_that_do_not_move_together_or_odd_ticks_are_refused() {
        let samples = [(100, 400_000_000), (100, 420_000_000)];
        assert!(matches!(
            fit(TICK, &samples),
            Err(CalibrationError::Spread { .. })
        ));
        assert!(matches!(
            fit(0, &samples[..1]),
            Err(CalibrationError::Tick(0))
        ));
        assert!(matches!(fit(TICK, &[]), Err(CalibrationError::NoSamples)));
    }

    #[test]
    fn this_machines_tick() {
        let tick = coarse_tick_ns();
        assert!((1_000_000..=10_000_000).contains(&tick), "{tick}");
        // The coarse clock lags the precise one (read after it here).
        let (coarse, precise) = (coarse_ns(), monotonic_ns());
        assert!(coarse > 0 && coarse <= precise, "{coarse} {precise}");
    }

    #[test]
    fn stamps_in_the_past_saturate_at_boot() {
        assert_eq!(before(5_000_000_000, Duration::from_secs(3600)), 0);
        assert_eq!(before(5_000_000_000, Duration::from_secs(2)), 3_000_000_000);
        assert!(monotonic_ns() > 0);
    }
}
