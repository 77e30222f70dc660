//! `cargo xtask soak --seconds N`: the churn soak of the test suite, for as long as asked.

use crate::cmd::{cargo, require_root, status};

/// Runs the soak test for `seconds`.
pub fn run(seconds: u64) -> anyhow::Result<()> {
    require_root("cargo xtask soak")?;
    lb_tests::netns::sweep_stale()?;
    status(cargo().args(["build", "--workspace"]))?;
    status(
        cargo()
            .args([
                "test",
                "--package",
                "lb-tests",
                "--test",
                "soak",
                "--",
                "--nocapture",
            ])
            .env("LB_SOAK_SECONDS", seconds.to_string()),
    )
}
