//! `cargo xtask demo --nodes N`: the tutorial's Service on N nodes behind an ECMP router (the
//! multi-node sandbox, `lb_tests::cluster`). Four pods over the nodes; every node announces the
//! VIP over BGP; connections held open; a node fails (only BFD tells the router), the router
//! re-hashes its flows onto the others, and every held connection whose pod is alive keeps
//! answering from the same pod; then the node comes back. The machine is left clean.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    cluster::{self, ANNOUNCE_ARGS, Cluster, VIP4},
    sandbox::{EndpointState, HeldConnection},
};

use crate::{
    cmd::require_root,
    demo::{build_binaries, command, left_clean, show_spread, step},
};

/// Requests per batch, and connections held open.
const BATCH: usize = 200;
const HELD: usize = 24;

/// The Deployment's pods: 4 replicas placed over the nodes as a scheduler spreads them (pod 1
/// of every node, then pod 2 of the first ones).
fn replicas(nodes: usize) -> Vec<(usize, u8)> {
    (0..4)
        .map(|i| (i % nodes + 1, (i / nodes) as u8 + 1))
        .collect()
}

/// `BATCH` requests on new connections from the client's 8 addresses; the answering pods.
fn batch(cluster: &Cluster) -> anyhow::Result<Vec<String>> {
    let sources = cluster::client_v4s();
    (0..BATCH)
        .map(|i| {
            let from = SocketAddr::new(IpAddr::V4(sources[i % sources.len()]), 0);
            cluster.http_get_from(from, IpAddr::V4(VIP4))
        })
        .collect()
}

/// Which node a pod (`node-I-pod-J`) runs on.
fn node_of(pod: &str) -> usize {
    pod.split('-')
        .nth(1)
        .and_then(|i| i.parse().ok())
        .unwrap_or(0)
}

/// The router's route to the VIP, as `ip route` prints it.
fn show_route(cluster: &Cluster) -> anyhow::Result<()> {
    command("ip route show 198.18.200.1   # on the router");
    let out = cluster
        .router
        .exec("ip", &["route", "show", &VIP4.to_string()])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// Asks every held connection whose pod runs on a node other than `lost`: (asked, answered by
/// the same pod).
fn ask_held(held: &mut [(HeldConnection, String)], lost: Option<usize>) -> (usize, usize) {
    let mut asked = 0;
    let mut same = 0;
    for (connection, pod) in held.iter_mut() {
        if Some(node_of(pod)) == lost {
            continue;
        }
        asked += 1;
        if connection.get().is_ok_and(|answer| answer == *pod) {
            same += 1;
        }
    }
    (asked, same)
}

/// Runs the demo on `nodes` nodes; the sandbox is removed whatever happens.
pub fn run(nodes: usize) -> anyhow::Result<()> {
    require_root("cargo xtask demo --nodes")?;
    anyhow::ensure!(
        (2..=cluster::MAX_NODES).contains(&nodes),
        "--nodes takes 2 to {}",
        cluster::MAX_NODES
    );
    lb_tests::netns::sweep_stale()?;
    let binaries = build_binaries()?;
    let started = Instant::now();
    let failing = 2;

    step(&format!(
        "{nodes} Kubernetes nodes behind a router, in network namespaces: each node runs the \
         load balancer and BIRD; the router runs BIRD with multipath"
    ));
    let mut cluster = Cluster::up("demo", binaries, nodes).context("building the cluster")?;
    println!("{}", cluster.describe());

    step("kubectl apply: Deployment tomcat-deployment (replicas: 4), Service tomcat-load-balancer");
    cluster.write_manifests("Cluster")?;
    let pods = replicas(nodes);
    let ready = |lost: Option<usize>| {
        let pods = pods.clone();
        move |node: usize, pod: u8| {
            pods.contains(&(node, pod))
                .then_some(if Some(node) == lost {
                    EndpointState::NotReady
                } else {
                    EndpointState::Ready
                })
        }
    };
    cluster.write_endpoints_of(ready(None))?;
    let names: Vec<String> = pods
        .iter()
        .map(|(node, pod)| cluster::pod_name(*node, *pod))
        .collect();
    println!("pods: {}", names.join(", "));
    command(
        "lb-userspace attach eth0 --config MANIFESTS --node-name node-I --announce-table 4242   # on every node",
    );
    cluster.start_controllers(ANNOUNCE_ARGS, false)?;

    step("Every node announces 198.18.200.1 over BGP: the router spreads flows over all of them");
    let all: Vec<IpAddr> = (1..=nodes)
        .map(|i| cluster.next_hop_of(i, IpAddr::V4(VIP4)))
        .collect();
    cluster.wait_next_hops(IpAddr::V4(VIP4), &all, Duration::from_secs(10))?;
    show_route(&cluster)?;
    println!(
        "a node that receives a flow for a pod on another node sends it there in a GUE tunnel; \
         that node answers the client directly"
    );

    step(&format!("{BATCH} requests, each on a new connection"));
    command("for i in $(seq 200); do curl -s http://198.18.200.1:8080/; done");
    show_spread(&batch(&cluster)?, &names);

    step(&format!("{HELD} connections held open (keep-alive)"));
    let sources = cluster::client_v4s();
    let mut held = Vec::new();
    for i in 0..HELD {
        let from = SocketAddr::new(IpAddr::V4(sources[i % sources.len()]), 0);
        let mut connection = cluster.hold_connection(from, IpAddr::V4(VIP4))?;
        let pod = connection.get()?;
        held.push((connection, pod));
    }
    let mut per_pod: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, pod) in &held {
        *per_pod.entry(pod).or_default() += 1;
    }
    println!("held connections per pod: {per_pod:?}");

    step(&format!(
        "node-{failing} fails: its link goes dark, as a crash would (only BFD tells the router)"
    ));
    let failed_at = Instant::now();
    cluster.fail_node(failing)?;
    let survivors: Vec<IpAddr> = (1..=nodes)
        .filter(|i| *i != failing)
        .map(|i| cluster.next_hop_of(i, IpAddr::V4(VIP4)))
        .collect();
    cluster.wait_next_hops(IpAddr::V4(VIP4), &survivors, Duration::from_secs(10))?;
    println!(
        "the router withdrew node-{failing}'s route after {} ms",
        failed_at.elapsed().as_millis()
    );
    show_route(&cluster)?;
    let (asked, same) = ask_held(&mut held, Some(failing));
    let lost = HELD - asked;
    println!(
        "held connections whose pod is alive: {asked}, still answered by the same pod: {same} \
         (the {lost} on node-{failing}'s pod went down with it)"
    );
    anyhow::ensure!(same == asked, "a connection to a living pod broke");
    println!(
        "(the flows node-{failing} was receiving now reach other nodes, whose Maglev tables pick \
         the same pods: identical on every node)"
    );

    step(&format!(
        "The node lifecycle controller marks node-{failing}'s pod not ready: new requests go to \
         the others"
    ));
    let applied = cluster.applied();
    cluster.write_endpoints_of(ready(Some(failing)))?;
    let live: Vec<usize> = (1..=nodes).filter(|i| *i != failing).collect();
    cluster.wait_applied(&applied, &live, Duration::from_secs(10))?;
    show_spread(&batch(&cluster)?, &names);

    step(&format!("node-{failing} comes back"));
    let applied = cluster.applied();
    cluster.restore_node(failing)?;
    cluster.write_endpoints_of(ready(None))?;
    let back = cluster.wait_next_hops(IpAddr::V4(VIP4), &all, Duration::from_secs(10))?;
    cluster.wait_applied(&applied, &all_nodes(nodes), Duration::from_secs(10))?;
    println!("node-{failing} announces again: the router has it back after {back:?}");
    show_route(&cluster)?;
    let (asked, same) = ask_held(&mut held, Some(failing));
    println!("held connections still answered by the same pod: {same} of {asked}");
    anyhow::ensure!(same == asked, "a connection broke when the node came back");
    show_spread(&batch(&cluster)?, &names);

    step("Cleaning up: controllers detach and withdraw, BIRD stops, the namespaces go");
    drop(held);
    drop(cluster);
    left_clean(started)
}

fn all_nodes(nodes: usize) -> Vec<usize> {
    (1..=nodes).collect()
}
