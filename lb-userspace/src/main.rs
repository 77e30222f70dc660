//! `lb-userspace`: the load balancer's controller and CLI.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_userspace::{AttachMode, Dataplane};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// XDP service load balancer for Kubernetes `Service`s of type LoadBalancer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the data plane, attach it to IFACE and serve until Ctrl-C or SIGTERM.
    Attach {
        /// The client-facing interface.
        iface: String,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t)]
        mode: AttachMode,
        /// Seconds between counter summaries in the log (0: only at exit).
        #[arg(long, default_value_t = 10)]
        stats_interval: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Attach {
            iface,
            mode,
            stats_interval,
        } => attach(&iface, mode, stats_interval).await,
    }
}

async fn attach(iface: &str, mode: AttachMode, stats_interval: u64) -> anyhow::Result<()> {
    let mut dataplane = Dataplane::load().context("loading the data plane")?;
    dataplane.attach(iface, mode)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut ticker =
        (stats_interval > 0).then(|| tokio::time::interval(Duration::from_secs(stats_interval)));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            () = async { ticker.as_mut().unwrap().tick().await; }, if ticker.is_some() => {
                log_counters(&dataplane)?;
            }
        }
    }
    info!("stopping");
    log_counters(&dataplane)?;
    dataplane.detach_all()?;
    Ok(())
}

fn log_counters(dataplane: &Dataplane) -> anyhow::Result<()> {
    for (reason, counter) in dataplane.reason_counters()? {
        if counter.packets > 0 {
            info!(
                reason = reason.name(),
                packets = counter.packets,
                bytes = counter.bytes,
                "counter"
            );
        }
    }
    Ok(())
}
