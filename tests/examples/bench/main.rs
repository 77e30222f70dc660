//! `cargo xtask bench` runs this: every comparison side by side in one process, interleaved
//! (A B A B ...) over rounds, reported as median ratios with min-max, absolute figures beside.
//! Writes `BENCHMARKS.md` and `bench.json` into the folder given as the first argument.

mod control;
mod forwarding;
mod http;
mod kube_proxy;
mod live;
mod node_model;
mod nodes;
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
    // LB_BENCH_ONLY=forwarding (say) runs one section, for working on it.
    let only = std::env::var("LB_BENCH_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut report = Report {
        machine: report::machine(),
        ..Report::default()
    };
    type Section = fn(&mut Report, bool) -> anyhow::Result<()>;
    let sections: [(&str, &str, Section); 6] = [
        (
            "per-packet",
            "per-packet cost (BPF_PROG_TEST_RUN)",
            per_packet::run,
        ),
        (
            "forwarding",
            "forwarding rate (XDP live frames through the sandbox)",
            forwarding::run,
        ),
        (
            "node-model",
            "the node model: pods without XDP behind the node (XDP live frames)",
            node_model::run,
        ),
        ("http", "HTTP end to end (wrk)", http::run),
        ("control", "Maglev and control plane", control::run),
        (
            "nodes",
            "across nodes: tunnel rate, bytes through the receiving node, failover",
            nodes::run,
        ),
    ];
    for (name, title, run) in sections {
        if wanted(name) {
            eprintln!("== {title}");
            run(&mut report, quick)?;
        }
    }
    report.write(&out)?;
    if wanted("forwarding") {
        let svg = report.svg_bars(
            forwarding::SECTION,
            "Mpps",
            "Forwarding rate of the load-balancer hop (Mpps, 64-byte UDP, one CPU)",
        );
        std::fs::create_dir_all(out.join("docs"))?;
        std::fs::write(out.join("docs/forwarding.svg"), svg)?;
    }
    println!("{}", report.markdown());
    Ok(())
}
