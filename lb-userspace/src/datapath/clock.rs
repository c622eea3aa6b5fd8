//! The datapath's clock, read from userspace: conntrack and affinity stamps are
//! CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_coarse_ns`), which start at boot.
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The stamp `age` before `now_ns`, saturating at 0: the clock starts at boot, so on a
/// machine up for less than `age` the oldest stamp there is (0) stands in.
pub fn before(now_ns: u64, age: Duration) -> u64 {
    now_ns.saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_in_the_past_saturate_at_boot() {
        assert_eq!(before(5_000_000_000, Duration::from_secs(3600)), 0);
        assert_eq!(before(5_000_000_000, Duration::from_secs(2)), 3_000_000_000);
        assert!(monotonic_ns() > 0);
    }
}
