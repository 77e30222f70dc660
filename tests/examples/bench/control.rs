//! Maglev and the control plane: table build times, disruption on a backend change, balance,
//! cold apply of many services, and the latency from a manifest write to the data plane.

use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_common::maps::{DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS};
use lb_tests::{
    netns::Netns,
    sandbox::{Binaries, EndpointState, EndpointState::Ready, Sandbox},
};
use lb_userspace::{
    Dataplane,
    controller::{AppliedState, Controller},
    dataplane::LoadOptions,
    maglev::{self, MaglevBackend},
    manifest::{self, Manifests},
    model::{self, Options},
};

use crate::report::{Report, median};

const SECTION: &str = "Maglev and control plane";
const MEMORY: &str = "Kernel memory of the data plane";

/// Ids of the BPF maps alive now. A map freed while the list is read (a data plane dropped
/// earlier goes away after a grace period) is left out.
fn map_ids() -> HashSet<u32> {
    aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .map(|info| info.id())
        .collect()
}

/// Kernel memory of the BPF maps named like the data plane's (Maglev tables included) that are
/// not in `before`, in MiB: the kernel's own accounting (`memlock` in each map's fdinfo,
/// per-CPU copies included).
fn map_memory_mib(before: &HashSet<u32>) -> anyhow::Result<f64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const NAMES: &[&str] = &[
        "SERVICES",
        "VIP_ADDRS",
        "VIP_FILTER",
        "MAGLEV",
        "BACKENDS",
        "CONNTRACK",
        "REVERSE_NAT",
        "AFFINITY",
        "FRAGMENTS",
        "TX_PORTS",
        "SOURCE_RANGES",
        "SCRATCH",
        "FIB_PARAMS",
        "NEXT_HOPS",
        "STATS",
        "EVENTS",
        "SERVICE_STATS",
        "BACKEND_STATS",
        "maglev_table",
    ];
    let mut bytes = 0u64;
    // A map freed while the list is read has no info to give: it is not ours.
    for info in aya::maps::loaded_maps().filter_map(Result::ok) {
        if before.contains(&info.id())
            || !info.name_as_str().is_some_and(|name| NAMES.contains(&name))
        {
            continue;
        }
        // A map freed since it was listed has no fd to open.
        let Ok(fd) = info.fd() else { continue };
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
        bytes += fdinfo
            .lines()
            .find_map(|line| line.strip_prefix("memlock:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

/// The kernel memory of the data plane `options` load, empty, in MiB.
fn empty_data_plane_mib(options: LoadOptions) -> anyhow::Result<f64> {
    let before = map_ids();
    let dataplane = Dataplane::load_with(options)?;
    let mib = map_memory_mib(&before)?;
    drop(dataplane);
    Ok(mib)
}

fn backends(n: u32) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend {
            id: i,
            identity: format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255).into_bytes(),
            weight: 1,
        })
        .collect()
}

fn moved(a: &[u32], b: &[u32]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

pub fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let rounds = 3;
    // Table build times, against the Maglev paper's figures for N = 1000.
    for n in [100u32, 1000] {
        for m in [16_381u32, 65_537, 655_373] {
            let list = backends(n);
            let times: Vec<f64> = (0..rounds)
                .map(|_| {
                    let start = Instant::now();
                    let table = maglev::build(&list, m).expect("prime").expect("backends");
                    std::hint::black_box(table);
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            let paper = match (n, m) {
                (1000, 65_537) => Some(1.8),
                (1000, 655_373) => Some(22.9),
                _ => None,
            };
            let reference = paper.map(|p| vec![p; rounds]);
            report.add(
                SECTION,
                &format!("table build, N={n}, M={m}"),
                "ms",
                times,
                paper.map(|p| {
                    (
                        if p < 2.0 {
                            "paper: 1.8 ms"
                        } else {
                            "paper: 22.9 ms"
                        },
                        reference.as_deref().unwrap_or(&[]),
                        (|v, b| v / b) as fn(f64, f64) -> f64,
                    )
                }),
                if paper.is_some() {
                    "ratio < 1: faster than the paper"
                } else {
                    ""
                },
            );
        }
    }
    // Disruption and balance at M = 65537.
    for n in [100u32, 1000] {
        let m = 65_537;
        let all = backends(n);
        let table = maglev::build(&all, m)?.expect("table");
        let without: Vec<MaglevBackend> = all.iter().filter(|b| b.id != n / 2).cloned().collect();
        let removed = maglev::build(&without, m)?.expect("table");
        let added = maglev::build(&backends(n + 1), m)?.expect("table");
        let ideal = 1.0 / f64::from(n);
        report.add(
            SECTION,
            &format!("slots moved removing 1 of N={n} (M={m})"),
            "fraction",
            vec![moved(&table, &removed)],
            Some(("ideal 1/N", &[ideal], |v, b| v / b)),
            "ratio 1.0 is minimal disruption",
        );
        report.add(
            SECTION,
            &format!("slots moved adding 1 to N={n} (M={m})"),
            "fraction",
            vec![moved(&table, &added)],
            Some(("ideal 1/(N+1)", &[1.0 / f64::from(n + 1)], |v, b| v / b)),
            "",
        );
        let mut counts = vec![0u32; n as usize];
        for id in &table {
            counts[*id as usize] += 1;
        }
        let mean = f64::from(m) / f64::from(n);
        let max = f64::from(*counts.iter().max().unwrap_or(&0));
        report.add(
            SECTION,
            &format!("max/mean backend share, N={n} (M={m})"),
            "ratio",
            vec![max / mean],
            None,
            "1.0 is a perfect balance",
        );
    }
    // Kernel memory: an empty data plane at the defaults, and what the connection tables cost
    // per million flows.
    let cpus = aya::util::nr_cpus().map_or(0, |n| n);
    let default_mib = empty_data_plane_mib(LoadOptions::default())?;
    let million_mib = empty_data_plane_mib(LoadOptions {
        conntrack_size: 1_000_000,
        ..LoadOptions::default()
    })?;
    let note = format!("{cpus} possible CPUs; per-CPU maps grow with them");
    report.add(
        MEMORY,
        &format!(
            "empty data plane at the defaults ({DEFAULT_CONNTRACK_SIZE} flows, {DEFAULT_MAX_BACKENDS} backends)"
        ),
        "MiB",
        vec![default_mib],
        None,
        &note,
    );
    report.add(
        MEMORY,
        "connection and reverse-NAT tables, per 1M flows",
        "MiB",
        vec![(million_mib - default_mib) * 1e6 / f64::from(1_000_000 - DEFAULT_CONNTRACK_SIZE)],
        None,
        "from the difference between a 1M-flow and a default table",
    );
    // Cold apply of many services, each with 10 endpoints, default table size.
    let counts: &[usize] = if quick { &[100, 1000] } else { &[1000, 10_000] };
    for &services in counts {
        let yaml = many_services(services, 10);
        let mut manifests = Manifests::default();
        manifest::read_text(&PathBuf::from("cold.yaml"), &yaml, &mut manifests)?;
        let cluster = model::build(&manifests, &Options::default())?;
        let ns = Netns::create("bench-cold")?;
        let mut memory = 0.0;
        let times: Vec<f64> = (0..if quick { 1 } else { rounds })
            .map(|_| {
                ns.enter(|| -> anyhow::Result<f64> {
                    let before = map_ids();
                    let mut controller = Controller::new(
                        Dataplane::load_with(LoadOptions {
                            max_backends: 2 * DEFAULT_MAX_BACKENDS,
                            ..LoadOptions::default()
                        })?,
                        AppliedState::default(),
                        None,
                        Options::default(),
                    );
                    let start = Instant::now();
                    controller.apply(&cluster)?;
                    let elapsed = start.elapsed().as_secs_f64() * 1e3;
                    memory = map_memory_mib(&before)?;
                    Ok(elapsed)
                })?
            })
            .collect::<anyhow::Result<_>>()?;
        report.add(
            MEMORY,
            &format!("{services} services x 10 endpoints applied (room for {} backends, default connection table)", 2 * DEFAULT_MAX_BACKENDS),
            "MiB",
            vec![memory],
            None,
            "every map, per-CPU copies on this machine's CPUs included",
        );
        report.add(
            SECTION,
            &format!("cold apply, {services} services x 10 endpoints (M=16381)"),
            "ms",
            times,
            None,
            "",
        );
        eprintln!("   cold apply of {services} services measured");
    }
    // Manifest write -> data plane, through the running controller.
    let dir = lb_tests::lb_userspace_bin();
    let mut sandbox = Sandbox::up(
        "bench-cp",
        Binaries::in_dir(dir.parent().expect("target dir")),
    )?;
    for index in 1..=3 {
        sandbox.start_pod(index)?;
    }
    sandbox.write_service(3, false)?;
    sandbox.write_endpoints(&[(1, Ready), (2, Ready)])?;
    sandbox.start_controller(false)?;
    let latencies = change_to_applied(&sandbox, if quick { 10 } else { 40 }, |endpoints| {
        sandbox.write_endpoints(endpoints)
    })?;
    let p99 = percentile(&latencies, 0.99);
    report.add(
        SECTION,
        "manifest write -> data plane, p50",
        "ms",
        vec![median(&latencies)],
        None,
        "includes the 50 ms settle time",
    );
    report.add(
        SECTION,
        "manifest write -> data plane, p99",
        "ms",
        vec![p99],
        Some(("goal 100 ms", &[100.0], |v, b| v / b)),
        "ratio < 1 meets the goal",
    );
    // Scrapes while the running controller applies 10,000 services: they read what it
    // published, never wait for the apply.
    let controller = sandbox.controller.as_ref().expect("started");
    let (applying, applied) = (controller.count("applying"), controller.count("applied"));
    lb_tests::sandbox::write_atomically(
        &sandbox.config.path().join("many.yaml"),
        &many_services(10_000, 2),
    )?;
    controller.wait_for("applying", applying + 1, Duration::from_secs(60))?;
    let mut scrapes = Vec::new();
    while controller.count("applied") == applied {
        let start = Instant::now();
        sandbox.scrape_metrics()?;
        scrapes.push(start.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(5));
    }
    scrapes.sort_by(f64::total_cmp);
    let p99 = percentile(&scrapes, 0.99);
    report.add(
        SECTION,
        "scrape during a 10k-service apply, p99",
        "ms",
        vec![p99],
        None,
        &format!(
            "{} scrapes while 10,000 services x 2 endpoints were applied",
            scrapes.len()
        ),
    );
    drop(sandbox);
    api_latency(report, quick)
}

/// Watch event -> data plane: the controller follows the stand-in API server (in the node's
/// namespace) holding 1,000 other Services with 10 endpoints each; the EndpointSlices of the
/// sandbox's Service change, and the time until the data plane's applied generation moves
/// is measured from the write into the stand-in, which sends the watch event at once.
fn api_latency(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let dir = lb_tests::lb_userspace_bin();
    let mut sandbox = Sandbox::up(
        "bench-api",
        Binaries::in_dir(dir.parent().expect("target dir")),
    )?;
    for index in 1..=3 {
        sandbox.start_pod(index)?;
    }
    let api = sandbox.start_api(&["--no-ipam"])?;
    let others = if quick { 100 } else { 1000 };
    api.apply_yaml(&many_services_with_slices(others, 10));
    api.apply_yaml(&sandbox.service_yaml(3, false));
    api.apply_yaml(&sandbox.endpoints_yaml(&[(1, Ready), (2, Ready)])?);
    sandbox.start_controller(false)?;
    let latencies = change_to_applied(&sandbox, if quick { 10 } else { 40 }, |endpoints| {
        api.apply_yaml(&sandbox.endpoints_yaml(endpoints)?);

        Ok(())
    })?;
    let p99 = percentile(&latencies, 0.99);
    let note = format!(
        "stand-in API server, {others} other Services x 10 endpoints in the cluster; includes the 5 ms settle"
    );
    report.add(
        SECTION,
        "API watch event -> data plane, p50",
        "ms",
        vec![median(&latencies)],
        None,
        &note,
    );
    report.add(
        SECTION,
        "API watch event -> data plane, p99",
        "ms",
        vec![p99],
        Some(("goal 100 ms", &[100.0], |v, b| v / b)),
        "ratio < 1 meets the goal",
    );
    drop(sandbox);
    drop(api);
    Ok(())
}

/// Milliseconds from each of `samples` endpoint changes (3 pods, then 2, alternately),
/// made by `change`, to the controller's next `applied` line (logged once the apply is in the
/// maps, the state file and the published state). The log is read as the controller writes
/// it: polling the state file instead would add its parse time (megabytes for a large
/// cluster) to every sample.
fn change_to_applied(
    sandbox: &Sandbox,
    samples: usize,
    mut change: impl FnMut(&[(u8, EndpointState)]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    let controller = sandbox.controller.as_ref().expect("started");
    let generation = || controller.count(" applied generation=");
    let mut latencies = Vec::new();
    for i in 0..samples {
        let before = generation();
        let endpoints = if i % 2 == 0 {
            vec![(1, Ready), (2, Ready), (3, Ready)]
        } else {
            vec![(1, Ready), (2, Ready)]
        };
        let start = Instant::now();
        change(&endpoints)?;
        while generation() == before {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(5),
                "the controller did not apply a change"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        latencies.push(start.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(20));
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// The `q` quantile of sorted `values` (nearest rank).
fn percentile(values: &[f64], q: f64) -> f64 {
    values[((values.len() as f64) * q).ceil() as usize - 1]
}

/// `services` Services `svc-N` on 198.19.0.0/16, each with `endpoints` endpoints on
/// 198.20.0.0/16.
fn many_services(services: usize, endpoints: usize) -> String {
    let mut yaml = String::new();
    for s in 0..services {
        yaml += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s}\nspec:\n  externalIPs: [198.19.{}.{}]\n  ports:\n  - port: 8080\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: svc-{s}\nsubsets:\n- addresses:\n",
            s >> 8,
            s & 255
        );
        for e in 0..endpoints {
            yaml += &format!(
                "  - ip: 198.20.{}.{}\n",
                (s * endpoints + e) >> 8 & 255,
                (s * endpoints + e) & 255
            );
        }
    }
    yaml
}

/// `services` Services `svc-N` in `default` on external IPs 198.18.128.0/17, each with an
/// EndpointSlice of `endpoints` endpoints on 198.19.128.0/17 (addresses only configured, never
/// sent to), as the API holds them.
fn many_services_with_slices(services: usize, endpoints: usize) -> String {
    let mut yaml = String::new();
    for s in 0..services {
        yaml += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s}\n  namespace: default\nspec:\n  externalIPs: [198.18.{}.{}]\n  ports:\n  - port: 8080\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{s}-v4\n  namespace: default\n  labels:\n    kubernetes.io/service-name: svc-{s}\naddressType: IPv4\nports:\n- port: 8080\n  protocol: TCP\nendpoints:\n",
            128 + (s >> 8),
            s & 255
        );
        for e in 0..endpoints {
            let n = s * endpoints + e;
            yaml += &format!(
                "- addresses: [\"198.19.{}.{}\"]\n  conditions: {{ready: true}}\n",
                128 + (n >> 8 & 127),
                n & 255
            );
        }
    }
    yaml
}
