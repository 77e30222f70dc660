//! `cargo xtask test`: the one command that checks everything. CI runs exactly this.

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::bail;

use crate::cmd::{cargo, require_root, rustup_nightly_cargo, status};

/// Runs the checks and tests in order of cost, cheapest first.
pub fn run() -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
    for name in lb_tests::netns::sweep_stale()? {
        eprintln!("removed stale namespace {name}");
    }
    status(cargo().args(["fmt", "--all", "--", "--check"]))?;
    status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Host clippy sees only the stub main of lb-ebpf; lint the real programs for their target.
    status(rustup_nightly_cargo().args([
        "clippy",
        "--package",
        "lb-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/bpf-clippy",
        "--",
        "-D",
        "warnings",
    ]))?;
    status(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let totals = cargo_test()?;
    // The test processes have exited: whatever they named after themselves and left is stale
    // (names of live processes belong to another run on the same machine).
    let leftovers = lb_tests::netns::sweep_stale()?;
    if !leftovers.is_empty() {
        bail!("the tests left namespaces, pins or states behind: {leftovers:?}");
    }
    let processes = leftover_processes();
    if !processes.is_empty() {
        bail!("the tests left processes behind: {processes:?}");
    }
    println!(
        "cargo xtask test: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if totals.ignored > 0 {
        bail!(
            "{} tests were ignored: every test runs in this command",
            totals.ignored
        );
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// `cargo test --workspace`, echoing its output and adding up its `test result:` lines.
fn cargo_test() -> anyhow::Result<Totals> {
    let mut command = cargo();
    command.args(["test", "--workspace"]).stdout(Stdio::piped());
    eprintln!("+ {command:?}");
    let mut child = command.spawn()?;
    let mut totals = Totals::default();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            for part in result.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(count), Some(kind)) = (words.next(), words.next()) {
                    let count: u64 = count.parse().unwrap_or(0);
                    match kind {
                        "passed" => totals.passed += count,
                        "failed" => totals.failed += count,
                        "ignored" => totals.ignored += count,
                        _ => {}
                    }
                }
            }
        }
    }
    let exit = child.wait()?;
    if !exit.success() {
        bail!(
            "cargo test failed ({exit}): {} passed, {} failed",
            totals.passed,
            totals.failed
        );
    }
    Ok(totals)
}

/// `lb-pod` and `lb-userspace` processes of the builds the tests run (`target/debug`) still
/// running. The demo, the sandbox and the benchmark run the release builds: their processes,
/// alive beside a test run, belong to them.
fn leftover_processes() -> Vec<String> {
    let target = crate::cmd::workspace_root().join("target/debug");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_link(entry.path().join("exe")).ok())
        .filter(|exe| {
            exe.starts_with(&target)
                && exe
                    .file_name()
                    .is_some_and(|name| name == "lb-pod" || name == "lb-userspace")
        })
        .map(|exe| exe.display().to_string())
        .collect()
}
