//! `cargo xtask`: everything a fresh machine needs, in one place. Every command runs `setup`
//! first, which is idempotent and takes seconds once done.

mod bench;
mod cmd;
mod demo;
mod demo_nodes;
mod fuzz;
mod sandbox;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Project tasks of the XDP service load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need: nightly rust-src, bpf-linker, Debian packages.
    Setup,
    /// Build the workspace (the eBPF object is built and embedded by lb-userspace's build.rs).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run every check and test: fmt, clippy (host and BPF target), unit, packet and namespace
    /// tests. Needs root.
    Test,
    /// Run the main job: the tutorial's scaling story through the load balancer, in a veth
    /// sandbox with real HTTP clients.
    Demo {
        /// The same story with the controller following a stand-in Kubernetes API server (the
        /// tests crate's test double, not a real cluster): the Service's EXTERNAL-IP goes from
        /// `<pending>` to the address the leader assigns from a pool.
        #[arg(long, conflicts_with = "nodes")]
        api: bool,
        /// The story on N nodes behind an ECMP router with BGP (the multi-node sandbox): four
        /// pods over the nodes, held connections, a node fails and comes back.
        #[arg(long)]
        nodes: Option<usize>,
    },
    /// Run the benchmarks and write BENCHMARKS.md, bench.json and docs/forwarding.svg.
    Bench {
        /// Short runs: checks the harness, not the figures.
        #[arg(long)]
        quick: bool,
    },
    /// Fuzz the data plane's packet parser (installs cargo-fuzz).
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the churn soak (endpoints changing 10 times a second under traffic) for longer than
    /// the test suite does.
    Soak {
        /// How long to churn.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Bring the sandbox up (4 pods, the controller running; or with `up --nodes N` a cluster
    /// behind a BGP router) to explore by hand, fail, restore, drain or undrain a cluster node,
    /// or take it all down.
    Sandbox {
        #[command(subcommand)]
        action: sandbox::Action,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    setup::run()?;
    match cli.command {
        Command::Setup => Ok(()),
        Command::Build { release } => cmd::cargo_build(release),
        Command::Test => test::run(),
        Command::Demo {
            nodes: Some(nodes), ..
        } => demo_nodes::run(nodes),
        Command::Demo { api: false, .. } => demo::run(),
        Command::Demo { api: true, .. } => demo::run_api(),
        Command::Sandbox { action } => sandbox::run(action),
        Command::Bench { quick } => bench::run(quick),
        Command::Fuzz { seconds } => fuzz::run(seconds),
        Command::Soak { seconds } => soak::run(seconds),
    }
}
