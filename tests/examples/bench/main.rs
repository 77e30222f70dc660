//! `cargo xtask bench` runs this: every comparison side by side in one process, interleaved
//! (A B A B ...) over rounds, reported as median ratios with min-max, absolute figures beside.
//! Writes `BENCHMARKS.md` and `bench.json` into the folder given as the first argument.

mod control;
mod forwarding;
mod http;
mod per_packet;
mod report;

use std::path::PathBuf;

use report::Report;

fn main() -> anyhow::Result<()> {
    let out: PathBuf = std::env::args()
        .nth(1)
        .map_or_else(|| ".".into(), PathBuf::from);
    let quick = std::env::var_os("LB_BENCH_QUICK").is_some();
    lb_tests::netns::sweep_stale()?;
    let mut report = Report::default();
    report.machine = report::machine();
    eprintln!("== per-packet cost (BPF_PROG_TEST_RUN)");
    per_packet::run(&mut report, quick)?;
    eprintln!("== forwarding rate (XDP live frames through the sandbox)");
    forwarding::run(&mut report, quick)?;
    eprintln!("== HTTP end to end (wrk)");
    http::run(&mut report, quick)?;
    eprintln!("== Maglev and control plane");
    control::run(&mut report, quick)?;
    report.write(&out)?;
    println!("{}", report.markdown());
    Ok(())
}
