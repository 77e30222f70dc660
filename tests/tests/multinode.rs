//! N nodes behind an ECMP router (`lb_tests::cluster`), each running the real controller with
//! its announcements in table 4242 and its BIRD: flows arrive at any node, pods on other nodes
//! are reached through the tunnel and answer the client directly; a node that fails, comes
//! back or drains moves flows between nodes without losing one whose pod lives.
//! Needs root (namespaces) and BIRD 2 (`cargo xtask setup` installs it).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    cluster::{self, ANNOUNCE_ARGS, Cluster, VIP4, VIP6, client_v4s, client_v6s},
    sandbox::{Binaries, HeldConnection},
};

fn binaries() -> Binaries {
    Binaries::in_dir(
        lb_tests::lb_userspace_bin()
            .parent()
            .expect("the binary's folder"),
    )
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
/// IPv6, TCP and UDP.
#[test]
fn every_node_serves_every_pod_over_ipv4_and_ipv6_tcp_and_udp() {
    let cluster = cluster_up("mn-any", 3, "Cluster");
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

fn hold(cluster: &Cluster, vip: IpAddr, count: usize) -> Vec<Held> {
    let sources = sources(vip);
    (0..count)
        .map(|i| {
            let from = SocketAddr::new(sources[i % sources.len()], 0);
            let mut connection = cluster.hold_connection(from, vip).unwrap();
            let pod = connection.get().unwrap();
            Held { connection, pod }
        })
        .collect()
}

/// (connections that answered from their own pod, connections that failed or changed pod).
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

#[test]
fn connections_survive_a_failed_node_when_their_pod_lives() {
    let cluster = cluster_up("mn-fail", 3, "Cluster");
    let vip = IpAddr::V4(VIP4);
    let mut held = hold(&cluster, vip, 200);
    let on_node2 = held.iter().filter(|h| node_of_pod(&h.pod) == 2).count();
    println!("200 held connections, {on_node2} of them on node 2's pods");

    cluster.fail_node(2).unwrap();
    let survivors = [cluster.next_hop_of(1, vip), cluster.next_hop_of(3, vip)];
    let converged = cluster.wait_next_hops(vip, &survivors, CONVERGED).unwrap();
    println!("the router dropped node 2 after {converged:?}");

    let (kept, lost) = still_on_their_pods(&mut held, |pod| node_of_pod(pod) != 2);
    println!("{kept} kept their pod, lost: {lost:?}");
    assert!(
        lost.is_empty(),
        "connections whose pod lives were lost: {lost:?}"
    );
    assert_eq!(kept, 200 - on_node2);
}

#[test]
#[ignore]
fn debug_leak() {
    let cluster = cluster_up("mn-dbg", 3, "Cluster");
    println!("{}", cluster.describe());
    cluster.leak();
}
