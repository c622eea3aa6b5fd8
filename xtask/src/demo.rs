pub fn run(_xlb: &std::path::Path, _root: &std::path::Path, _seconds: u64) -> anyhow::Result<()> {
    anyhow::bail!("demo not written yet")
}
