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
    let leftovers = lb_tests::netns::sweep_stale()?;
    let live = list_project_namespaces()?;
    if !live.is_empty() || !leftovers.is_empty() {
        bail!("the tests left network namespaces behind: {live:?} {leftovers:?}");
    }
    let processes = leftover_processes();
    if !processes.is_empty() {
        bail!("the tests left processes behind: {processes:?}");
    }
    let pins = leftover_pins();
    if !pins.is_empty() {
        bail!("the tests left pins or states behind: {pins:?}");
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

/// `lb-pod` and `lb-userspace` processes still running.
fn leftover_processes() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| {
            let program = cmdline.split(' ').next().unwrap_or_default();
            program.ends_with("/lb-pod") || program.ends_with("/lb-userspace")
        })
        .collect()
}

/// Test pin or state folders still present under the default roots.
fn leftover_pins() -> Vec<String> {
    ["/run/lb/bpf", "/run/lb/state"]
        .iter()
        .filter_map(|root| std::fs::read_dir(root).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path().display().to_string())
        .filter(|path| path.contains(lb_tests::netns::PREFIX))
        .collect()
}

fn list_project_namespaces() -> anyhow::Result<Vec<String>> {
    let output = lb_tests::netns::run("ip", &["netns", "list"])?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(lb_tests::netns::PREFIX))
        .map(str::to_owned)
        .collect())
}
