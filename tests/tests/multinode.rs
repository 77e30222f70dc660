//! N nodes behind an ECMP router (`lb_tests::cluster`), each running the real controller with
//! its announcements in table 4242 and its BIRD: flows arrive at any node, pods on other nodes
//! are reached through the tunnel and answer the client directly; a node that fails, comes
//! back or drains moves flows between nodes without losing one whose pod lives.
//! Needs root (namespaces) and BIRD 2 (`cargo xtask setup` installs it).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{ANNOUNCE_ARGS, Cluster, VIP4, VIP6, client_v4s, client_v6s},
    sandbox::{Binaries, EndpointState, HeldConnection, LoggedChild, connect_within},
};

fn binaries() -> Binaries {
    Binaries::of_this_build()
}

const VIPS: [IpAddr; 2] = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
const CONVERGED: Duration = Duration::from_secs(10);

/// `nodes` nodes serving the tutorial's Service (`policy`) from every pod, every node
/// announcing both VIPs, the router holding every node as a next hop.
fn cluster_up(tag: &str, nodes: usize, policy: &str) -> Cluster {
    let mut cluster = Cluster::up(tag, binaries(), nodes).unwrap();
    cluster.write_manifests(policy).unwrap();
    cluster.start_controllers(ANNOUNCE_ARGS, false).unwrap();
    for vip in VIPS {
        let all: Vec<IpAddr> = (1..=nodes).map(|i| cluster.next_hop_of(i, vip)).collect();
        cluster.wait_next_hops(vip, &all, CONVERGED).unwrap();
    }
    cluster
}

/// The node a pod name (`node-I-pod-J`) lives on.
fn node_of_pod(pod: &str) -> usize {
    pod.strip_prefix("node-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("not a pod name: {pod:?}"))
}

/// The client's source addresses of `vip`'s family.
fn sources(vip: IpAddr) -> Vec<IpAddr> {
    match vip {
        IpAddr::V4(_) => client_v4s().into_iter().map(IpAddr::V4).collect(),
        IpAddr::V6(_) => client_v6s().into_iter().map(IpAddr::V6).collect(),
    }
}

/// Every node answers for every pod: new connections from many source addresses and ports
/// (spread by the router over the three nodes) reach pods of all three nodes, over IPv4 and
/// IPv6, TCP and UDP. Every node built the same Maglev tables (their digests, as the metrics
/// report them, are equal): what makes a flow moved between nodes land on the same pod.
#[test]
fn every_node_serves_every_pod_over_ipv4_and_ipv6_tcp_and_udp() {
    let cluster = cluster_up("mn-any", 3, "Cluster");
    let digests: Vec<BTreeSet<String>> = cluster
        .nodes
        .iter()
        .map(|node| {
            lb_tests::scrape_metrics(&node.ns)
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("lb_service_table_info{"))
                .map(str::to_owned)
                .collect()
        })
        .collect();
    // Both families, TCP and UDP: four tables.
    assert_eq!(digests[0].len(), 4, "{:?}", digests[0]);
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "the nodes' tables differ: {digests:#?}"
    );
    for vip in VIPS {
        let mut pods: BTreeMap<String, usize> = BTreeMap::new();
        for (i, from) in sources(vip).into_iter().cycle().take(40).enumerate() {
            let from = SocketAddr::new(from, 0);
            let pod = cluster
                .http_get_from(from, vip)
                .unwrap_or_else(|e| panic!("GET {vip} from {from} (#{i}): {e:#}"));
            *pods.entry(pod).or_default() += 1;
        }
        println!("{vip} TCP: {pods:?}");
        let nodes: std::collections::BTreeSet<usize> =
            pods.keys().map(|p| node_of_pod(p)).collect();
        assert_eq!(nodes.len(), 3, "{vip}: pods of every node answer: {pods:?}");
        for (i, from) in sources(vip).into_iter().enumerate() {
            let payload = format!("ping {i}");
            let echo = cluster
                .udp_echo_from(SocketAddr::new(from, 0), vip, payload.as_bytes())
                .unwrap_or_else(|e| panic!("UDP {vip} from {from}: {e:#}"));
            assert!(
                String::from_utf8_lossy(&echo).contains(&payload),
                "{vip} UDP echo: {echo:?}"
            );
        }
    }
}

/// Held connections keep their pod while their flows move between nodes.
struct Held {
    connection: HeldConnection,
    pod: String,
}

/// `count` keep-alive connections from the client's addresses, IPv4 and IPv6 alternately,
/// each having answered once.
fn hold(cluster: &Cluster, count: usize) -> Vec<Held> {
    (0..count)
        .map(|i| {
            let vip = VIPS[i % 2];
            let sources = sources(vip);
            let from = SocketAddr::new(sources[(i / 2) % sources.len()], 0);
            let mut connection = cluster.hold_connection(from, vip).unwrap();
            let pod = connection.get().unwrap();
            Held { connection, pod }
        })
        .collect()
}

/// Asks every held connection whose pod is `alive` once more: how many answered from their
/// own pod, and what became of the others.
fn still_on_their_pods(held: &mut [Held], alive: impl Fn(&str) -> bool) -> (usize, Vec<String>) {
    let mut kept = 0;
    let mut lost = Vec::new();
    for h in held.iter_mut().filter(|h| alive(&h.pod)) {
        match h.connection.get() {
            Ok(pod) if pod == h.pod => kept += 1,
            Ok(other) => lost.push(format!("{} -> {other}", h.pod)),
            Err(e) => lost.push(format!("{}: {e:#}", h.pod)),
        }
    }
    (kept, lost)
}

/// Runs `during` while new connections are opened one after another (IPv4 and IPv6
/// alternately) by three threads, each given 900 ms to connect (so a SYN is never sent
/// twice: a lost one is a failed connection) and 900 ms to answer; returns `during`'s result
/// and, per connection, when it was started and whether it answered.
fn probing<T>(cluster: &Cluster, during: impl FnOnce() -> T) -> (T, Vec<(Instant, bool)>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let probers: Vec<_> = (0..3)
            .map(|thread| {
                let stop = &stop;
                scope.spawn(move || {
                    let mut results = Vec::new();
                    let mut i = thread;
                    while !stop.load(Ordering::Relaxed) {
                        let vip = VIPS[i % 2];
                        let from = SocketAddr::new(sources(vip)[(i / 2) % 8], 0);
                        let started = Instant::now();
                        let ok = connect_within(
                            &cluster.client,
                            from,
                            SocketAddr::new(vip, 8080),
                            Duration::from_millis(900),
                        )
                        .and_then(|stream| {
                            // A connection cut by the failure must not hold the thread past
                            // the window either.
                            stream.set_read_timeout(Some(Duration::from_millis(900)))?;
                            HeldConnection::from_stream(stream)
                        })
                        .and_then(|mut c| c.get())
                        .is_ok();
                        results.push((started, ok));
                        i += 3;
                    }
                    results
                })
            })
            .collect();
        let result = during();
        stop.store(true, Ordering::Relaxed);
        let probes = probers
            .into_iter()
            .flat_map(|p| p.join().unwrap())
            .collect();
        (result, probes)
    })
}

/// The one scenario of a node's life, on one cluster: 200 connections held across the three
/// nodes (IPv4 and IPv6) while node 2 fails (taken off the network as a crash would: only BFD
/// tells the router), comes back, and node 3 drains.
///
/// - Failure: every connection whose pod lives continues on its pod (those on node 2's pods
///   are gone with them), and new connections succeed once the router has converged and the
///   lost node's pods are marked not ready (as Kubernetes' node lifecycle controller does,
///   here at once).
/// - Return: the router hashes flows over three nodes again; every connection continues.
/// - Drain (the exclude label): node 3 withdraws first and keeps serving; nothing is lost, no
///   new connection fails.
#[test]
fn flows_whose_pod_lives_survive_a_node_failing_returning_and_draining() {
    let cluster = cluster_up("mn-life", 3, "Cluster");
    let mut held = hold(&cluster, 200);
    let on_node2 = held.iter().filter(|h| node_of_pod(&h.pod) == 2).count();
    let per_node: BTreeMap<usize, usize> = held.iter().fold(BTreeMap::new(), |mut m, h| {
        *m.entry(node_of_pod(&h.pod)).or_default() += 1;
        m
    });
    println!("200 held connections, pods per node: {per_node:?}");
    assert_eq!(per_node.len(), 3, "connections on every node's pods");

    // Node 2 fails.
    let applied = cluster.applied();
    let mut failed_at = Instant::now();
    let ((router, converged), probes) = probing(&cluster, || {
        std::thread::sleep(Duration::from_millis(300));
        failed_at = Instant::now();
        cluster.fail_node(2).unwrap();
        cluster
            .write_endpoints(|node| {
                if node == 2 {
                    EndpointState::NotReady
                } else {
                    EndpointState::Ready
                }
            })
            .unwrap();
        let mut router = Duration::ZERO;
        for vip in VIPS {
            let survivors = [cluster.next_hop_of(1, vip), cluster.next_hop_of(3, vip)];
            router = router.max(cluster.wait_next_hops(vip, &survivors, CONVERGED).unwrap());
        }
        cluster.wait_applied(&applied, &[1, 3], CONVERGED).unwrap();
        let converged = failed_at.elapsed();
        // Longer than a probe can take (1.8 s): every thread starts probes after convergence.
        std::thread::sleep(Duration::from_millis(2500));
        (router, converged)
    });
    println!(
        "node 2 failed: the router dropped it after {router:?}; converged (router and \
         endpoints) after {converged:?}"
    );
    let last_failure = probes
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(at, _)| at.saturating_duration_since(failed_at))
        .max();
    let failed = probes.iter().filter(|(_, ok)| !ok).count();
    println!(
        "new connections during the failover: {} tried, {failed} failed, the last failure \
         started {last_failure:?} after the failure",
        probes.len()
    );
    assert!(
        probes
            .iter()
            .filter(|(at, _)| at.saturating_duration_since(failed_at) > converged)
            .all(|(_, ok)| *ok),
        "a new connection started after convergence ({converged:?}) failed"
    );
    assert!(
        probes
            .iter()
            .any(|(at, ok)| *ok && at.saturating_duration_since(failed_at) > converged)
    );
    let (kept, lost) = still_on_their_pods(&mut held, |pod| node_of_pod(pod) != 2);
    println!("after the failure: {kept} connections kept their pod, lost: {lost:?}");
    assert!(
        lost.is_empty(),
        "connections whose pod lives were lost: {lost:?}"
    );
    assert_eq!(kept, 200 - on_node2);

    // Node 2 returns: its pods are ready again, the router hashes over three nodes again.
    let applied = cluster.applied();
    cluster.restore_node(2).unwrap();
    cluster.write_endpoints(|_| EndpointState::Ready).unwrap();
    for vip in VIPS {
        let all: Vec<IpAddr> = (1..=3).map(|i| cluster.next_hop_of(i, vip)).collect();
        let took = cluster.wait_next_hops(vip, &all, CONVERGED).unwrap();
        println!("{vip}: node 2 back at the router after {took:?}");
    }
    cluster
        .wait_applied(&applied, &[1, 2, 3], CONVERGED)
        .unwrap();
    let (kept, lost) = still_on_their_pods(&mut held, |pod| node_of_pod(pod) != 2);
    println!("after the return: {kept} kept their pod, lost: {lost:?}");
    assert!(
        lost.is_empty(),
        "connections lost when node 2 returned: {lost:?}"
    );
    let mut fresh = hold(&cluster, 30);
    assert!(
        fresh.iter().any(|h| node_of_pod(&h.pod) == 2),
        "node 2's pods serve again"
    );

    // Node 3 drains: withdrawn first, it keeps serving what the router still sends it.
    let ((), probes) = probing(&cluster, || {
        cluster.drain_node(3).unwrap();
        for vip in VIPS {
            let rest = [cluster.next_hop_of(1, vip), cluster.next_hop_of(2, vip)];
            let took = cluster.wait_next_hops(vip, &rest, CONVERGED).unwrap();
            println!("{vip}: node 3 withdrawn after {took:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    });
    let failed = probes.iter().filter(|(_, ok)| !ok).count();
    println!(
        "new connections during the drain: {} tried, {failed} failed",
        probes.len()
    );
    assert_eq!(failed, 0, "a drain loses no new connection");
    let (kept, lost) = still_on_their_pods(&mut held, |pod| node_of_pod(pod) != 2);
    let (kept_fresh, lost_fresh) = still_on_their_pods(&mut fresh, |_| true);
    println!("after the drain: {} kept their pod", kept + kept_fresh);
    assert!(
        lost.is_empty() && lost_fresh.is_empty(),
        "a drain lost connections: {lost:?} {lost_fresh:?}"
    );
}

/// Replies leave from the pod's node straight to the client: captured on the router's side of
/// every node's link, a flow's replies (from the VIP) come only from its pod's node, never
/// from the node the router sent the flow to when that is another.
#[test]
fn replies_leave_from_the_pods_node_never_from_the_receiving_node() {
    let cluster = cluster_up("mn-dsr", 3, "Cluster");
    // One capture per node link: what the router sends the node (`out`), what the node sends
    // the router (`in`).
    let capture = |index: usize, direction: &str| {
        cluster
            .capture_link(index, direction, "tcp port 8080 and net 198.18.2.0/24")
            .unwrap()
    };
    let to_node: Vec<LoggedChild> = (1..=3).map(|i| capture(i, "out")).collect();
    let from_node: Vec<LoggedChild> = (1..=3).map(|i| capture(i, "in")).collect();
    let from = IpAddr::V4(client_v4s()[0]);
    let mut pods = BTreeMap::new();
    for port in 47000..47060u16 {
        let pod = cluster
            .http_get_from(SocketAddr::new(from, port), IpAddr::V4(VIP4))
            .unwrap();
        pods.insert(port, node_of_pod(&pod));
    }
    std::thread::sleep(Duration::from_millis(300));
    // `198.18.2.2.47000 > 198.18.200.1.8080` went to the node; `198.18.200.1.8080 >
    // 198.18.2.2.47000` came from it.
    let ports = |child: &LoggedChild, needle: &str| -> BTreeSet<u16> {
        child
            .text()
            .lines()
            .filter_map(|line| {
                let at = line.find(needle)? + needle.len();
                line[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let request = format!("{from}.");
    let reply = format!("{VIP4}.8080 > {from}.");
    let mut cross = 0;
    for (port, pod_node) in &pods {
        let receiving: Vec<usize> = (1..=3)
            .filter(|i| ports(&to_node[i - 1], &request).contains(port))
            .collect();
        let replying: Vec<usize> = (1..=3)
            .filter(|i| ports(&from_node[i - 1], &reply).contains(port))
            .collect();
        assert_eq!(
            replying,
            [*pod_node],
            "port {port}: replies only from the pod's node"
        );
        assert_eq!(
            receiving.len(),
            1,
            "port {port}: one receiving node, {receiving:?}"
        );
        if receiving[0] != *pod_node {
            cross += 1;
        }
    }
    println!(
        "{} flows, {cross} of them received by a node other than their pod's",
        pods.len()
    );
    assert!(cross > 0, "no flow crossed nodes: the check proved nothing");
}

/// A tunnel packet from an address that is no node's is dropped and counted, and its inner
/// packet reaches no pod.
#[test]
fn spoofed_tunnel_packets_are_dropped_and_counted() {
    let cluster = cluster_up("mn-spoof", 3, "Cluster");
    let node1 = cluster.node(1);
    let dropped = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with("lb_packets_total{reason=\"drop_tunnel_peer\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = dropped(&lb_tests::scrape_metrics(&node1.ns).unwrap());
    // A well-formed GUE packet naming node 1's pod 1, carrying a UDP datagram from the
    // client to the VIP's echo port: decapsulated, it would be echoed back to the client.
    let client = client_v4s()[0];
    let inner = lb_tests::frames::Spec::udp(IpAddr::V4(client), 48000, IpAddr::V4(VIP4), 8080);
    let inner_ip = inner.build()[14..].to_vec();
    let mut gue = lb_common::tunnel::udp_gue_header(
        inner_ip.len(),
        true,
        50000,
        6080,
        &lb_common::maps::addr16(IpAddr::V4(Ipv4Addr::new(198, 18, 17, 1))),
        8080,
    )[8..]
        .to_vec();
    gue.extend_from_slice(&inner_ip);
    let node_addr = SocketAddr::new(IpAddr::V4(node1.v4), 6080);
    let echoed = cluster
        .client
        .enter(move || -> anyhow::Result<bool> {
            let echo = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client), 48000))?;
            echo.set_read_timeout(Some(Duration::from_millis(700)))?;
            let sender = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client), 0))?;
            for _ in 0..3 {
                sender.send_to(&gue, node_addr)?;
            }
            let mut buf = [0u8; 2048];
            Ok(echo.recv_from(&mut buf).is_ok())
        })
        .unwrap()
        .unwrap();
    assert!(!echoed, "a spoofed tunnel packet reached a pod");
    let after = dropped(&lb_tests::scrape_metrics(&node1.ns).unwrap());
    assert_eq!(
        after - before,
        3,
        "three spoofed packets dropped and counted"
    );
}
