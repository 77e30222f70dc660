//! HTTP end to end through the VIP to 4 pods with wrk, keep-alive and a new connection per
//! request: ours vs kube-proxy's iptables and nftables rules, interleaved.

use lb_tests::sandbox::{Binaries, EndpointState::Ready, Sandbox, VIP4};

use crate::report::Report;

const SECTION: &str = "HTTP end to end (wrk, 4 pods)";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Config {
    Ours,
    Iptables,
    Nftables,
}

struct Wrk {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn parse_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let value: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        _ => return None,
    })
}

fn wrk(sandbox: &Sandbox, seconds: u32, close: bool) -> anyhow::Result<Wrk> {
    let url = format!("http://{VIP4}:8080/");
    let duration = format!("{seconds}s");
    let mut args = vec!["--latency", "-t1", "-c16", "-d", &duration];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let output = sandbox.client.exec("wrk", &args)?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
    };
    let requests_per_sec = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let p50_ms = field("50%")
        .and_then(|v| parse_duration_ms(&v))
        .unwrap_or(f64::NAN);
    let p99_ms = field("99%")
        .and_then(|v| parse_duration_ms(&v))
        .unwrap_or(f64::NAN);
    anyhow::ensure!(requests_per_sec > 0.0, "wrk measured nothing:\n{text}");
    Ok(Wrk {
        requests_per_sec,
        p50_ms,
        p99_ms,
    })
}

fn configure(sandbox: &mut Sandbox, config: Config) -> anyhow::Result<()> {
    if let Some(controller) = sandbox.controller.take() {
        controller.child.stop(std::time::Duration::from_secs(5))?;
    }
    crate::kube_proxy::reset(&sandbox.node);
    match config {
        Config::Ours => sandbox.start_controller(false)?,
        Config::Iptables => crate::kube_proxy::load(
            &sandbox.node,
            "iptables-restore",
            &crate::kube_proxy::iptables_rules(VIP4, "tcp", 4),
        )?,
        Config::Nftables => crate::kube_proxy::load(
            &sandbox.node,
            "nft",
            &crate::kube_proxy::nft_rules(VIP4, "tcp", 4),
        )?,
    }
    Ok(())
}

pub fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let dir = lb_tests::lb_userspace_bin();
    let binaries = Binaries::in_dir(dir.parent().expect("target dir"));
    let mut sandbox = Sandbox::up("bench-http", binaries)?;
    for index in 1..=4 {
        sandbox.start_pod(index)?;
    }
    sandbox.write_service(4, false)?;
    sandbox.write_endpoints(&[(1, Ready), (2, Ready), (3, Ready), (4, Ready)])?;
    let seconds = if quick { 1 } else { 3 };
    let configs = [Config::Ours, Config::Iptables, Config::Nftables];
    // [config][mode] -> per-round results
    let mut results: Vec<Vec<Vec<Wrk>>> = (0..3).map(|_| vec![Vec::new(), Vec::new()]).collect();
    for round in 0..3 {
        for (c, config) in configs.iter().enumerate() {
            configure(&mut sandbox, *config)?;
            for (m, close) in [false, true].iter().enumerate() {
                let result = wrk(&sandbox, seconds, *close)?;
                eprintln!(
                    "   round {round}: {config:?} {}: {:.0} req/s p50 {:.2} ms p99 {:.2} ms",
                    if *close {
                        "new connection per request"
                    } else {
                        "keep-alive"
                    },
                    result.requests_per_sec,
                    result.p50_ms,
                    result.p99_ms
                );
                results[c][m].push(result);
            }
        }
    }
    crate::kube_proxy::reset(&sandbox.node);
    for (m, mode) in ["keep-alive", "new connection per request"]
        .iter()
        .enumerate()
    {
        let rps = |c: usize| {
            results[c][m]
                .iter()
                .map(|w| w.requests_per_sec)
                .collect::<Vec<_>>()
        };
        let ours = rps(0);
        for (c, config) in configs.iter().enumerate() {
            let values = rps(c);
            let baseline = (c != 0).then(|| (format!("{config:?}"), values.clone()));
            report.add(
                SECTION,
                &format!("{config:?}, {mode}: requests/s"),
                "req/s",
                values.clone(),
                None,
                "",
            );
            if let Some((name, base)) = baseline {
                report.add(
                    SECTION,
                    &format!("ours vs {name}, {mode}"),
                    "req/s",
                    ours.clone(),
                    Some((&name, &base, |v, b| v / b)),
                    "ratio > 1: more requests per second than kube-proxy's rules",
                );
            }
            let p50: Vec<f64> = results[c][m].iter().map(|w| w.p50_ms).collect();
            let p99: Vec<f64> = results[c][m].iter().map(|w| w.p99_ms).collect();
            report.add(
                SECTION,
                &format!("{config:?}, {mode}: p50 latency"),
                "ms",
                p50,
                None,
                "",
            );
            report.add(
                SECTION,
                &format!("{config:?}, {mode}: p99 latency"),
                "ms",
                p99,
                None,
                "",
            );
        }
    }
    report.notes.push(format!(
        "HTTP: wrk -t1 -c16 for {seconds} s per run from the client namespace to {VIP4}:8080, 3 rounds of ours / iptables / nftables; the pods are lb-pod (HTTP/1.1 keep-alive, a thread per connection), the same for all."
    ));
    Ok(())
}
