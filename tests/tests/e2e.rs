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
    HeldConnection, PORT, PUSH_PORT, Sandbox, VIP4, VIP6,
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
    // Enough requests that a pod with 1.5 times its share fails the bound below: its spread
    // (1/3 and 2/9 x 3 instead of 1/4) gives the statistic a noncentrality of N/27 = 92.6, and
    // a noncentral chi-square with 3 degrees of freedom stays under 25.90 with probability
    // 1.5e-6. 400 requests (noncentrality 14.8 against 16.27) let it through half the time.
    let answers = sandbox.http_batch(IpAddr::V4(VIP4), 2500).unwrap();
    let pods: Vec<String> = sandbox.pods.values().map(|p| p.name.clone()).collect();
    assert!(
        answers.iter().all(|a| pods.contains(a)),
        "every answer from an endpoint: {answers:?}"
    );
    let spread = counts(&answers);
    // 3 degrees of freedom: 25.90 is the 0.001% critical value, so an even spread fails with
    // probability 1e-5 (Maglev's slot shares, within 1% of even, add at most 0.25 of
    // noncentrality: still under 2.4e-5).
    let chi2 = chi_square(&spread, 4);
    assert!(chi2 < 25.90, "chi-square {chi2:.2} for {spread:?}");

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
    // Its held connections are still tracked on it: describe reads the data path's table.
    let json: serde_json::Value = serde_json::from_str(
        &sandbox
            .cli(&[
                "describe",
                "service",
                lb_tests::sandbox::SERVICE,
                "-o",
                "json",
            ])
            .unwrap(),
    )
    .unwrap();
    let flows_on_pod2: u64 = json["endpoints"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|list| list.as_array().unwrap())
        .filter(|e| e["pod"] == "tomcat-deployment-2")
        .map(|e| e["flows"].as_u64().unwrap())
        .sum();
    assert!(flows_on_pod2 >= 1, "{json}");

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

/// The connection table keeps every live flow while fewer than its size are alive, however
/// many came and went: ten idle connections to a server that speaks first outlive ten times
/// the table (`--conntrack-size 1024`) in short HTTP connections, each closed normally, and
/// still hear the server.
#[test]
fn idle_connections_outlive_ten_tables_of_short_ones_and_hear_the_server_first() {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    const TABLE: usize = 1024;
    let mut sandbox = Sandbox::up("e2eidle", binaries()).unwrap();
    sandbox.push_port = true;
    sandbox.controller_args = vec!["--conntrack-size".into(), TABLE.to_string()];
    for index in 1..=2 {
        sandbox.start_pod(index).unwrap();
    }
    sandbox.write_service(2, false).unwrap();
    sandbox.write_endpoints(&[(1, Ready), (2, Ready)]).unwrap();
    sandbox.start_controller(false).unwrap();

    let idle: Vec<BufReader<TcpStream>> = sandbox
        .client
        .enter(|| {
            (0..10)
                .map(|_| {
                    let stream = TcpStream::connect_timeout(
                        &SocketAddr::new(IpAddr::V4(VIP4), PUSH_PORT),
                        Duration::from_secs(5),
                    )?;
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    anyhow::Ok(BufReader::new(stream))
                })
                .collect::<anyhow::Result<_>>()
        })
        .unwrap()
        .unwrap();
    let mut idle = idle;
    // How many idle connections hear the pods' push `token` (lines of earlier pushes, still on
    // the way, are skipped).
    let hear_all = |idle: &mut Vec<BufReader<TcpStream>>, token: &str| {
        // The pods may not have accepted every connection yet: push until all 10 are held.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sandbox.push(token).unwrap() < 10 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut heard = 0;
        for (i, stream) in idle.iter_mut().enumerate() {
            let mut line = String::new();
            loop {
                line.clear();
                match stream.read_line(&mut line) {
                    Ok(n) if n > 0 && line.trim_end().ends_with(token) => {
                        heard += 1;
                        break;
                    }
                    Ok(n) if n > 0 => {}
                    other => {
                        eprintln!("{token}: idle connection {i}: {other:?} {line:?}");
                        break;
                    }
                }
            }
        }
        heard
    };
    assert_eq!(hear_all(&mut idle, "before"), 10, "before the churn");

    let closed = sandbox
        .client
        .enter(|| {
            let mut closed = 0;
            for _ in 0..10 * TABLE {
                let mut stream = TcpStream::connect_timeout(
                    &SocketAddr::new(IpAddr::V4(VIP4), PORT),
                    Duration::from_secs(5),
                )
                .unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: tomcat\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).unwrap();
                closed += usize::from(answer.starts_with(b"HTTP/1.1 200"));
            }
            closed
        })
        .unwrap();
    assert_eq!(closed, 10 * TABLE, "every short connection answered");
    let metrics = sandbox.scrape_metrics().unwrap();
    let removed = metric(&metrics, "lb_events_total{event=\"conntrack_closed\"}");
    assert!(
        removed >= (10 * TABLE) as u64,
        "closed connections were removed: {removed}"
    );
    assert_eq!(hear_all(&mut idle, "after"), 10, "after the churn");
}

/// A datagram larger than the links' MTU crosses the VIP fragmented, both ways: the pod gets
/// it whole and its echo, fragmented by the pod, reaches the client whole from the VIP.
#[test]
fn a_4000_byte_udp_datagram_crosses_the_vip_both_ways_over_ipv4_and_ipv6() {
    let sandbox = sandbox("e2efrag", 1);
    let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let (echo, from) = sandbox.udp_echo(vip, &payload).unwrap();
        assert_eq!(
            from,
            SocketAddr::new(vip, PORT),
            "the echo comes from the VIP"
        );
        assert_eq!(
            echo.len(),
            payload.len(),
            "{vip}: the whole datagram came back"
        );
        assert_eq!(echo, payload, "{vip}");
    }
}

/// Pods on links of MTU 1400 (an overlay network) behind the node's 1500: large requests and
/// responses still complete. A 1450-byte datagram is too big for the pod's link: the node
/// answers "fragmentation needed" (its quoted header rewritten back to the VIP on the way
/// out), the client's stack learns the path MTU and sends it again in fragments; the pod's
/// echo leaves it in fragments too.
#[test]
fn pods_behind_a_smaller_mtu_get_large_requests_and_answer_them() {
    let mut sandbox = Sandbox::up("e2emtu", binaries()).unwrap();
    sandbox.pod_mtu = Some(1400);
    sandbox.start_pod(1).unwrap();
    sandbox.write_service(1, false).unwrap();
    sandbox.write_endpoints(&[(1, Ready)]).unwrap();
    sandbox.start_controller(false).unwrap();
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let payload: Vec<u8> = (0..1450u32).map(|i| (i % 241) as u8).collect();
        let answered = sandbox
            .client
            .enter(move || -> anyhow::Result<bool> {
                let socket =
                    std::net::UdpSocket::bind(if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
                socket.set_read_timeout(Some(Duration::from_millis(500)))?;
                let mut buf = vec![0u8; 65536];
                // The first try may be answered by "fragmentation needed" only.
                for _ in 0..6 {
                    let _ = socket.send_to(&payload, SocketAddr::new(vip, PORT));
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        return Ok(from == SocketAddr::new(vip, PORT) && buf[..n] == payload[..]);
                    }
                }
                Ok(false)
            })
            .unwrap()
            .unwrap();
        assert!(
            answered,
            "{vip}: the 1450-byte datagram was echoed whole from the VIP"
        );
        // A 200 kB request over TCP, answered.
        let url = match vip {
            IpAddr::V4(v4) => format!("http://{v4}:{PORT}/"),
            IpAddr::V6(v6) => format!("http://[{v6}]:{PORT}/"),
        };
        let answer = sandbox
            .client
            .enter(move || -> anyhow::Result<String> {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build()
                    .into();
                let body = vec![b'x'; 200_000];
                Ok(agent
                    .post(&url)
                    .send(&body[..])?
                    .body_mut()
                    .read_to_string()?)
            })
            .unwrap()
            .unwrap();
        assert_eq!(answer.trim(), "tomcat-deployment-1", "{vip}");
    }
}

/// A connection from `port` of the client to the VIP, on a socket that closes with an RST
/// (`SO_LINGER` 0) and may reuse the port at once.
fn connect_from(sandbox: &Sandbox, port: u16) -> HeldConnection {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    let stream = sandbox
        .client
        .enter(move || -> anyhow::Result<TcpStream> {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            setsockopt(
                &fd,
                sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )?;
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrIn::new(198, 18, 0, 1, port),
            )?;
            let [a, b, c, d] = VIP4.octets();
            connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrIn::new(a, b, c, d, PORT),
            )?;
            let stream = TcpStream::from(fd);
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(stream)
        })
        .unwrap()
        .unwrap();
    HeldConnection::from_stream(stream).unwrap()
}

/// A SYN never follows an old entry: when a client vanished without its FIN or RST reaching
/// the load balancer and its pod then went terminating, a new connection from the same port
/// (the same 5-tuple) is placed afresh on a serving pod.
#[test]
fn a_reused_client_port_reaches_a_serving_pod_after_its_old_pod_went_terminating() {
    let sandbox = sandbox("e2esyn", 2);
    let port = 45000;
    let mut first = connect_from(&sandbox, port);
    let old_pod = first.get().unwrap();
    // The client vanishes without a word: its FIN and RST never reach the load balancer, which
    // keeps the flow as established.
    let port_arg = port.to_string();
    for flag in ["FIN", "RST"] {
        sandbox
            .client
            .exec(
                "iptables",
                &[
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "--sport",
                    &port_arg,
                    "--tcp-flags",
                    flag,
                    flag,
                    "-j",
                    "DROP",
                ],
            )
            .unwrap();
    }
    drop(first);
    let index: u8 = old_pod.rsplit('-').next().unwrap().parse().unwrap();
    let other = 3 - index;
    sandbox
        .write_endpoints(&[(index, Terminating), (other, Ready)])
        .unwrap();
    sandbox.wait_applied(2).unwrap();
    sandbox.client.exec("iptables", &["-F", "OUTPUT"]).unwrap();
    // The load balancer still keeps the vanished connection on the old pod.
    let source = format!("198.18.0.1:{port}");
    let frontend = format!("{VIP4}:{PORT}/TCP");
    let explained = sandbox.cli(&["explain", &source, &frontend]).unwrap();
    assert!(
        explained.contains("Decided by:  conntrack") && explained.contains("established"),
        "{explained}"
    );
    let replaced = || {
        metric(
            &sandbox.scrape_metrics().unwrap(),
            "lb_events_total{event=\"conntrack_syn_replaced\"}",
        )
    };
    let before = replaced();
    let mut second = connect_from(&sandbox, port);
    assert_eq!(
        second.get().unwrap(),
        format!("tomcat-deployment-{other}"),
        "the new connection went to the serving pod"
    );
    assert_eq!(
        replaced(),
        before + 1,
        "its SYN met the old entry and replaced it"
    );
}
