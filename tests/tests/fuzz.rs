//! The packet fuzzer, bounded: `cargo xtask test` runs 200,000 packets (each through all
//! three packet programs) from a fixed seed; `cargo xtask fuzz --packets N --seed S` runs any
//! size (XLB_FUZZ_PACKETS, XLB_FUZZ_SEED). Needs root (see `privilege`).
use xlb_tests::{fuzz, privilege::require_privileges};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "privileged: run by `sudo cargo xtask test`"]
fn mutated_packets_keep_every_oracle() {
    require_privileges();
    let (packets, seed) = (
        env_or("XLB_FUZZ_PACKETS", 200_000),
        env_or("XLB_FUZZ_SEED", 0x786c_6221),
    );
    match fuzz::run(packets, seed).expect("fuzzer setup") {
        Ok(report) => {
            eprintln!(
                "fuzz: {} packets, {} program runs, {} rewritten ({} with checksums checked), \
                 {} breaking the parser contract, in {:.1} s (seed {seed})",
                report.packets,
                report.runs,
                report.rewritten,
                report.checksums_checked,
                report.contract_breaking,
                report.seconds
            );
            assert_eq!(report.packets, packets);
            assert!(
                report.checksums_checked > 0,
                "the rewrite oracle had nothing to check"
            );
            assert!(
                report.contract_breaking > 0,
                "the contract oracle had nothing to check"
            );
        }
        Err(failure) => panic!("{failure}"),
    }
}
