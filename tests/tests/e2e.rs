//! End to end in the sandbox: real HTTP and UDP clients through the VIP to pods served by the
//! controller, as in the tutorial's story.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use lb_tests::sandbox::{
    Binaries,
    EndpointState::{NotReady, Ready, Terminating},
    HeldConnection, PORT, Sandbox, VIP4, VIP6,
};

fn binaries() -> Binaries {
    Binaries::in_dir(lb_tests::lb_userspace_bin().parent().unwrap())
}

fn counts(answers: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for answer in answers {
        *counts.entry(answer.clone()).or_default() += 1;
    }
    counts
}

/// Pearson's chi-square statistic of `observed` against an even spread.
fn chi_square(observed: &BTreeMap<String, usize>, buckets: usize) -> f64 {
    let total: usize = observed.values().sum();
    let expected = total as f64 / buckets as f64;
    let seen: f64 = observed
        .values()
        .map(|o| (*o as f64 - expected).powi(2) / expected)
        .sum();
    // Buckets that got nothing count too.
    seen + (buckets - observed.len()) as f64 * expected
}

fn sandbox(tag: &str, pods: u8) -> Sandbox {
    let mut sandbox = Sandbox::up(tag, binaries()).unwrap();
    for index in 1..=pods {
        sandbox.start_pod(index).unwrap();
    }
    sandbox.write_service(usize::from(pods), false).unwrap();
    let ready: Vec<_> = (1..=pods).map(|i| (i, Ready)).collect();
    sandbox.write_endpoints(&ready).unwrap();
    sandbox.start_controller(false).unwrap();
    sandbox
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn requests_spread_evenly_over_the_pods_over_ipv4_ipv6_and_udp() {
    let sandbox = sandbox("e2es", 4);
    let answers = sandbox.http_batch(IpAddr::V4(VIP4), 400).unwrap();
    let pods: Vec<String> = sandbox.pods.values().map(|p| p.name.clone()).collect();
    assert!(
        answers.iter().all(|a| pods.contains(a)),
        "every answer from an endpoint: {answers:?}"
    );
    let spread = counts(&answers);
    // 3 degrees of freedom: 16.27 is the 0.1% critical value.
    let chi2 = chi_square(&spread, 4);
    assert!(chi2 < 16.27, "chi-square {chi2:.2} for {spread:?}");

    let v6 = sandbox.http_batch(IpAddr::V6(VIP6), 20).unwrap();
    assert!(v6.iter().all(|a| pods.contains(a)), "{v6:?}");
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let (echo, from) = sandbox.udp_echo(vip, b"are you there?").unwrap();
        assert_eq!(echo, b"are you there?");
        assert_eq!(
            from,
            SocketAddr::new(vip, PORT),
            "the echo comes from the VIP"
        );
    }
}

#[test]
fn client_ip_affinity_holds_across_connections() {
    let sandbox = sandbox("e2ea", 4);
    sandbox.write_service(4, true).unwrap();
    sandbox.wait_applied(2).unwrap();
    let answers = sandbox.http_batch(IpAddr::V4(VIP4), 30).unwrap();
    assert_eq!(
        counts(&answers).len(),
        1,
        "one client, one pod: {answers:?}"
    );
}

#[test]
fn a_vip_without_endpoints_answers_nothing_and_counts_the_drops() {
    let sandbox = sandbox("e2en", 1);
    sandbox.write_endpoints(&[]).unwrap();
    sandbox.wait_applied(2).unwrap();
    let before = metric(
        &sandbox.scrape_metrics().unwrap(),
        "lb_packets_total{reason=\"drop_no_backend\"}",
    );
    let connected = sandbox
        .client
        .enter(|| {
            TcpStream::connect_timeout(
                &SocketAddr::new(IpAddr::V4(VIP4), PORT),
                Duration::from_millis(1500),
            )
        })
        .unwrap();
    assert!(connected.is_err(), "no endpoint, no answer");
    let after = metric(
        &sandbox.scrape_metrics().unwrap(),
        "lb_packets_total{reason=\"drop_no_backend\"}",
    );
    assert!(after > before, "drop counter moved: {before} -> {after}");
}

#[test]
fn held_connections_survive_scaling_and_a_controller_kill() {
    let mut sandbox = sandbox("e2eh", 2);
    let mut held: Vec<(HeldConnection, String)> = (0..8)
        .map(|_| {
            let mut connection = HeldConnection::open(&sandbox, IpAddr::V4(VIP4)).unwrap();
            let pod = connection.get().unwrap();
            (connection, pod)
        })
        .collect();
    let check = |held: &mut Vec<(HeldConnection, String)>| {
        for (connection, pod) in held.iter_mut() {
            assert_eq!(
                &connection.get().unwrap(),
                pod,
                "a held connection moved or broke"
            );
        }
    };

    // Scale up to 4.
    for index in 3..=4 {
        sandbox.start_pod(index).unwrap();
    }
    sandbox
        .write_endpoints(&[(1, Ready), (2, Ready), (3, Ready), (4, Ready)])
        .unwrap();
    sandbox.wait_applied(2).unwrap();
    check(&mut held);
    let spread = counts(&sandbox.http_batch(IpAddr::V4(VIP4), 60).unwrap());
    assert_eq!(spread.len(), 4, "{spread:?}");

    // kill -9 of the controller and a restart: flows go on.
    let mut controller = sandbox.controller.take().unwrap();
    controller.child.child_mut().kill().unwrap();
    controller.child.child_mut().wait().unwrap();
    check(&mut held);
    sandbox.start_controller(false).unwrap();
    check(&mut held);

    // Scale down other pods: 3 and 4 terminate, then go.
    sandbox
        .write_endpoints(&[(1, Ready), (2, Ready), (3, Terminating), (4, Terminating)])
        .unwrap();
    sandbox.wait_applied(2).unwrap();
    let answers = sandbox.http_batch(IpAddr::V4(VIP4), 20).unwrap();
    assert!(
        answers
            .iter()
            .all(|a| a.ends_with("-1") || a.ends_with("-2")),
        "{answers:?}"
    );
    sandbox.write_endpoints(&[(1, Ready), (2, Ready)]).unwrap();
    sandbox.wait_applied(3).unwrap();
    sandbox.stop_pod(3).unwrap();
    sandbox.stop_pod(4).unwrap();
    check(&mut held);
}

/// A pod whose endpoint turns not ready (a failing readiness probe; not terminating) keeps its
/// established connections and gets no new ones, as with kube-proxy; ready again, it gets new
/// ones again.
#[test]
fn a_not_ready_endpoint_keeps_its_connections_and_gets_no_new_ones() {
    let sandbox = sandbox("e2er", 2);
    let on = |pod: &str, index: u8| pod.ends_with(&format!("-{index}"));
    let mut held: Vec<(HeldConnection, String)> = Vec::new();
    // Connections until both pods hold some (Maglev spreads them; 64 all on one pod would be
    // a bug, not bad luck).
    while !(held.iter().any(|(_, p)| on(p, 1)) && held.iter().any(|(_, p)| on(p, 2))) {
        assert!(held.len() < 64, "both pods hold connections");
        let mut connection = HeldConnection::open(&sandbox, IpAddr::V4(VIP4)).unwrap();
        let pod = connection.get().unwrap();
        held.push((connection, pod));
    }
    let check = |held: &mut Vec<(HeldConnection, String)>| {
        for (connection, pod) in held.iter_mut() {
            assert_eq!(
                &connection.get().unwrap(),
                pod,
                "a held connection moved or broke"
            );
        }
    };

    sandbox
        .write_endpoints(&[(1, Ready), (2, NotReady)])
        .unwrap();
    sandbox.wait_applied(2).unwrap();
    check(&mut held);
    let answers = sandbox.http_batch(IpAddr::V4(VIP4), 20).unwrap();
    assert!(
        answers.iter().all(|a| on(a, 1)),
        "no new connection to the not-ready pod: {answers:?}"
    );
    let described = sandbox
        .cli(&["describe", "service", lb_tests::sandbox::SERVICE])
        .unwrap();
    assert!(
        described
            .lines()
            .any(|l| l.contains("not-ready") && l.contains("tomcat-deployment-2")),
        "{described}"
    );

    sandbox.write_endpoints(&[(1, Ready), (2, Ready)]).unwrap();
    sandbox.wait_applied(3).unwrap();
    check(&mut held);
    let answers = sandbox.http_batch(IpAddr::V4(VIP4), 40).unwrap();
    assert!(
        answers.iter().any(|a| on(a, 2)),
        "ready again, it gets new connections: {answers:?}"
    );
}

/// Under load (wrk hammering the VIP): `kill -9` of the controller and a restart lose no held
/// connection; then a graceful stop detaches cleanly while the load goes on.
#[test]
fn controller_kill_restart_and_detach_under_load() {
    let mut sandbox = sandbox("e2el", 2);
    let load = sandbox
        .client
        .command("wrk")
        .args(["-t1", "-c8", "-d6s", &format!("http://{VIP4}:8080/")])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let load = lb_tests::ChildGuard::new(load);
    let mut held: Vec<(HeldConnection, String)> = (0..8)
        .map(|_| {
            let mut c = HeldConnection::open(&sandbox, IpAddr::V4(VIP4)).unwrap();
            let pod = c.get().unwrap();
            (c, pod)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut controller = sandbox.controller.take().unwrap();
    controller.child.child_mut().kill().unwrap();
    controller.child.child_mut().wait().unwrap();
    for (c, pod) in held.iter_mut() {
        assert_eq!(&c.get().unwrap(), pod, "lost while no controller ran");
    }
    sandbox.start_controller(false).unwrap();
    for (c, pod) in held.iter_mut() {
        assert_eq!(&c.get().unwrap(), pod, "lost across the restart");
    }
    // A graceful stop under load: it detaches and exits promptly.
    let controller = sandbox.controller.take().unwrap();
    let started = std::time::Instant::now();
    let status = controller.child.stop(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let link = sandbox
        .node
        .exec("ip", &["-d", "link", "show", "veth-node"])
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "detached"
    );
    drop(load);
}
