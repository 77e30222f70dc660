//! Idempotent bootstrap of a fresh machine.
//!
//! - the `nightly` toolchain with `rust-src` (the eBPF crate is built with `-Z build-std=core`);
//! - a `bpf-linker` whose LLVM major version matches the nightly's;
//! - the Debian packages the tests, the sandbox and the benchmarks use.
//!
//! Each step checks before it acts, so a second run only reads versions.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd::{status, stdout};

const NIGHTLY: &str = "nightly";

/// bpf-linker release known to link with each LLVM major version of the nightly toolchain.
/// 0.10.4 loads the toolchain's own libLLVM at run time, so it follows the nightly's LLVM 22.
const BPF_LINKER_FOR_LLVM: &[(u32, &str)] = &[(22, "0.10.4")];

/// Debian packages used by the tests, the sandbox, the demo and the benchmarks.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "conntrack",
    "iptables",
    "nftables",
    "bpftool",
    "xdp-tools",
    "tcpdump",
    "wrk",
    "iperf3",
    // `promtool check metrics`: the metrics test checks `/metrics` with Prometheus' own linter.
    "prometheus",
    // The multi-node sandbox's router and nodes speak BGP and BFD with BIRD 2.
    "bird2",
];

/// Runs every step.
pub fn run() -> anyhow::Result<()> {
    nightly_with_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    Ok(())
}

fn nightly_with_rust_src() -> anyhow::Result<()> {
    let toolchains = stdout(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required to manage the nightly toolchain")?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = stdout(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

/// The LLVM major version of the nightly toolchain, from `rustc +nightly -vV`.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let version = stdout(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.trim().parse().ok())
        .with_context(|| format!("no LLVM version in `rustc +{NIGHTLY} -vV`:\n{version}"))
}

fn bpf_linker() -> anyhow::Result<()> {
    let llvm = nightly_llvm_major()?;
    let Some(&(_, wanted)) = BPF_LINKER_FOR_LLVM.iter().find(|(major, _)| *major == llvm) else {
        let known: Vec<String> = BPF_LINKER_FOR_LLVM
            .iter()
            .map(|(major, version)| format!("LLVM {major} -> bpf-linker {version}"))
            .collect();
        bail!(
            "the {NIGHTLY} toolchain uses LLVM {llvm}, and no bpf-linker release is known here to \
             link with it (known: {}). bpf-linker must use the same LLVM major as rustc, or the \
             eBPF object fails to link. Install a {NIGHTLY} toolchain with one of those LLVM \
             versions, or add the bpf-linker release for LLVM {llvm} to BPF_LINKER_FOR_LLVM in \
             xtask/src/setup.rs.",
            known.join(", ")
        );
    };
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned());
    if installed.as_deref() == Some(&format!("bpf-linker {wanted}")) {
        return Ok(());
    }
    eprintln!(
        "bpf-linker {wanted} is needed for LLVM {llvm} (found: {})",
        installed.as_deref().unwrap_or("none")
    );
    status(Command::new("cargo").args([
        "install",
        "bpf-linker",
        "--version",
        wanted,
        "--locked",
        "--force",
    ]))
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            Command::new("dpkg-query")
                .args(["-W", "-f", "${db:Status-Status}", package])
                .output()
                .map(|output| output.stdout != b"installed")
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing Debian packages {}: run `apt-get install {}` as root, or run this as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )?;
    if missing.contains(&"prometheus") {
        // Only its promtool is wanted: on a machine with an init system the package would
        // also leave a Prometheus server running on :9090.
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "prometheus"])
            .stderr(std::process::Stdio::null())
            .status();
    }
    Ok(())
}
