//! `cargo xtask fuzz [--seconds N]`: the cargo-fuzz target over the data plane's parser.

use std::process::Command;

use crate::cmd::{status, workspace_root};

/// Installs cargo-fuzz if needed and fuzzes the parser for `seconds`.
pub fn run(seconds: u64) -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    status(
        Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", "--fuzz-dir"])
            .arg(workspace_root().join("fuzz"))
            .args(["parse", "--", &format!("-max_total_time={seconds}")])
            .current_dir(workspace_root()),
    )
}
