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
    let _ = sandbox.node.exec("iptables", &["-t", "nat", "-F"]);
    let _ = sandbox.node.exec("iptables", &["-t", "nat", "-X"]);
    let _ = sandbox.node.exec("nft", &["delete", "table", "ip", "kube"]);
    let _ = sandbox.node.exec("conntrack", &["-F"]);
    let pods = 4;
    match config {
        Config::Ours => sandbox.start_controller(false)?,
        Config::Iptables => {
            let mut rules =
                String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-TOMCAT - [0:0]\n");
            for i in 1..=pods {
                rules += &format!(":KUBE-SEP-{i} - [0:0]\n");
            }
            rules += "-A PREROUTING -j KUBE-SERVICES\n";
            rules += &format!(
                "-A KUBE-SERVICES -d {VIP4}/32 -p tcp -m tcp --dport 8080 -j KUBE-SVC-TOMCAT\n"
            );
            for i in 1..=pods {
                if i < pods {
                    rules += &format!(
                        "-A KUBE-SVC-TOMCAT -m statistic --mode random --probability {:.5} -j KUBE-SEP-{i}\n",
                        1.0 / f64::from(pods - i + 1)
                    );
                } else {
                    rules += &format!("-A KUBE-SVC-TOMCAT -j KUBE-SEP-{i}\n");
                }
                rules += &format!(
                    "-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination 198.18.{i}.1:8080\n"
                );
            }
            rules += "COMMIT\n";
            feed(sandbox, "iptables-restore", &[], &rules)?;
        }
        Config::Nftables => {
            let vmap: Vec<String> = (1..=pods)
                .map(|i| format!("{} : jump sep{i}", i - 1))
                .collect();
            let mut rules = format!(
                "table ip kube {{\n  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; ip daddr {VIP4} tcp dport 8080 jump svc; }}\n  chain svc {{ numgen random mod {pods} vmap {{ {} }}; }}\n",
                vmap.join(", ")
            );
            for i in 1..=pods {
                rules +=
                    &format!("  chain sep{i} {{ meta l4proto tcp dnat to 198.18.{i}.1:8080; }}\n");
            }
            rules += "}\n";
            feed(sandbox, "nft", &["-f", "-"], &rules)?;
        }
    }
    Ok(())
}

fn feed(sandbox: &Sandbox, program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = sandbox
        .node
        .command(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "{program} refused:\n{input}");
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
    configure(&mut sandbox, Config::Iptables)?;
    let _ = sandbox.node.exec("iptables", &["-t", "nat", "-F"]);
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
        "HTTP: wrk -t1 -c16 for {seconds} s per run from the client namespace to {VIP4}:8080, 3 rounds of ours / iptables / nftables; the pods are lb-pod (tiny_http, one thread), the same for all."
    ));
    Ok(())
}
