//! Privileged tests run only as root and only when asked (`cargo xtask test` asks), so a plain
//! `cargo test` as a normal user stays green and says what it skipped.

/// True when the privileged layers should run; otherwise prints why the test is skipped.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let asked = std::env::var_os("XLB_PRIVILEGED_TESTS").is_some_and(|v| v == "1");
    match (root, asked) {
        (true, true) => true,
        (false, _) => {
            eprintln!("SKIPPED {test}: needs root (run `sudo cargo xtask test`)");
            false
        }
        (true, false) => {
            eprintln!("SKIPPED {test}: set XLB_PRIVILEGED_TESTS=1 (cargo xtask test does)");
            false
        }
    }
}
