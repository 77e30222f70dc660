//! `cargo xtask bench`: builds in release mode and runs the benchmark harness
//! (`tests/examples/bench`), which writes `BENCHMARKS.md`, `bench.json` and
//! `docs/forwarding.svg` at the workspace root.

use crate::cmd::{cargo, require_root, status, workspace_root};

/// Runs every benchmark; `quick` shortens every run (for a smoke test of the harness).
pub fn run(quick: bool) -> anyhow::Result<()> {
    require_root("cargo xtask bench")?;
    lb_tests::netns::sweep_stale()?;
    status(cargo().args(["build", "--release", "--workspace"]))?;
    status(cargo().args([
        "build",
        "--release",
        "--package",
        "lb-tests",
        "--example",
        "bench",
    ]))?;
    let root = workspace_root();
    let mut command = std::process::Command::new(root.join("target/release/examples/bench"));
    command.arg(&root);
    if quick {
        command.env("LB_BENCH_QUICK", "1");
    }
    status(&mut command)
}
