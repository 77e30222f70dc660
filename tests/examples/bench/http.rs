pub fn run(_report: &mut crate::report::Report, _quick: bool) -> anyhow::Result<()> {
    Ok(())
}
