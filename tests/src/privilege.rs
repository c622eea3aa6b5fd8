//! Privileged tests (datapath and end-to-end layers) are `#[ignore]`d with a reason, so a
//! plain `cargo test` reports them as ignored, never as passed; `cargo xtask test` runs them
//! as root with `--include-ignored`.

/// Fails the test, saying why, when it was asked to run without root.
pub fn require_privileges() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test loads eBPF programs and builds network namespaces: run it as root \
         (`sudo cargo xtask test`)"
    );
}
