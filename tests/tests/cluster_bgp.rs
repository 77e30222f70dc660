//! The multi-node sandbox's BGP (`lb_tests::cluster`): nodes announce what their table 4242
//! holds to a BIRD router, which installs one ECMP route over them, drops a crashed node's
//! next hop within BFD's detection time, and spreads flows over the nodes by their L4 tuple.
//! Needs root (namespaces) and BIRD 2 (`cargo xtask setup` installs it).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{self, Cluster, VIP4, VIP6},
    sandbox::Binaries,
};

fn binaries() -> Binaries {
    Binaries::of_this_build()
}

const VIPS: [IpAddr; 2] = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];

/// The next hops of `vip`'s family for `nodes`.
fn hops(cluster: &Cluster, vip: IpAddr, nodes: &[usize]) -> Vec<IpAddr> {
    nodes.iter().map(|&i| cluster.next_hop_of(i, vip)).collect()
}

/// Every node announces both VIPs by hand.
fn announce_everywhere(cluster: &Cluster) {
    for node in &cluster.nodes {
        for vip in VIPS {
            node.announce(vip).unwrap();
        }
    }
}

/// A route added to table 4242 reaches the router within milliseconds (BIRD learns it from
/// the kernel's notification, not at its 10 s scan); with all three nodes announcing, the
/// router holds one route with three next hops; a node that removes its route is dropped.
#[test]
fn the_router_installs_one_ecmp_route_over_every_announcing_node() {
    let cluster = Cluster::up("cbgp-ecmp", binaries(), 3).unwrap();
    let timeout = Duration::from_secs(5);
    for vip in VIPS {
        let start = Instant::now();
        cluster.node(1).announce(vip).unwrap();
        let took = cluster
            .wait_next_hops(vip, &hops(&cluster, vip, &[1]), timeout)
            .unwrap();
        println!("{vip}: table 4242 -> the router's route in {took:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "learned at a scan, not from the notification"
        );
    }
    for node in [2, 3] {
        for vip in VIPS {
            cluster.node(node).announce(vip).unwrap();
        }
    }
    for vip in VIPS {
        cluster
            .wait_next_hops(vip, &hops(&cluster, vip, &[1, 2, 3]), timeout)
            .unwrap();
        // One route, three next hops: parsed from a single multipath entry.
        let output = cluster
            .router
            .exec(
                "ip",
                &[
                    "-j",
                    if vip.is_ipv4() { "-4" } else { "-6" },
                    "route",
                    "show",
                    "exact",
                    &vip.to_string(),
                ],
            )
            .unwrap();
        let routes: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(routes.len(), 1, "{routes:#?}");
        assert_eq!(
            routes[0]["nexthops"].as_array().map(Vec::len),
            Some(3),
            "{routes:#?}"
        );
    }
    for vip in VIPS {
        cluster.node(2).withdraw(vip).unwrap();
        cluster
            .wait_next_hops(vip, &hops(&cluster, vip, &[1, 3]), timeout)
            .unwrap();
    }
    for vip in VIPS {
        cluster.node(1).withdraw(vip).unwrap();
        cluster.node(3).withdraw(vip).unwrap();
        cluster.wait_next_hops(vip, &[], timeout).unwrap();
    }
}

/// A node that leaves the network as a crash would (its port on the router's bridge down):
/// the router's own link stays up, so only BFD can tell; the node's next hop goes in about
/// 300 ms, and comes back once the node does.
#[test]
fn a_failed_node_is_dropped_by_bfd_and_comes_back_when_restored() {
    let cluster = Cluster::up("cbgp-fail", binaries(), 3).unwrap();
    announce_everywhere(&cluster);
    for vip in VIPS {
        cluster
            .wait_next_hops(
                vip,
                &hops(&cluster, vip, &[1, 2, 3]),
                Duration::from_secs(5),
            )
            .unwrap();
    }
    let start = Instant::now();
    cluster.fail_node(2).unwrap();
    // The next hops leave by the bridge, which is still up: no link event drops them.
    let fabric = cluster
        .router
        .exec("ip", &["-j", "link", "show", cluster::FABRIC])
        .unwrap();
    let fabric: serde_json::Value = serde_json::from_slice(&fabric.stdout).unwrap();
    assert_eq!(fabric[0]["operstate"], "UP", "{fabric:#}");
    let mut took = BTreeMap::new();
    for vip in VIPS {
        cluster
            .wait_next_hops(vip, &hops(&cluster, vip, &[1, 3]), Duration::from_secs(5))
            .unwrap();
        took.insert(vip, start.elapsed());
    }
    println!("node 2 failed -> its next hop gone from the router: {took:?}");
    cluster.restore_node(2).unwrap();
    let start = Instant::now();
    for vip in VIPS {
        cluster
            .wait_next_hops(
                vip,
                &hops(&cluster, vip, &[1, 2, 3]),
                Duration::from_secs(15),
            )
            .unwrap();
    }
    println!(
        "node 2 restored -> its next hops back in {:?}",
        start.elapsed()
    );
}

/// The router hashes flows by their L4 tuple: from one client address, source ports alone
/// spread over the three nodes, both in the kernel's answer for each tuple and in real
/// datagrams counted where they arrive.
#[test]
fn the_router_spreads_flows_over_the_nodes_by_their_ports() {
    let cluster = Cluster::up("cbgp-hash", binaries(), 3).unwrap();
    announce_everywhere(&cluster);
    for vip in VIPS {
        cluster
            .wait_next_hops(
                vip,
                &hops(&cluster, vip, &[1, 2, 3]),
                Duration::from_secs(5),
            )
            .unwrap();
    }
    // The route the router picks for each source port of one client address.
    for (vip, client) in [
        (IpAddr::V4(VIP4), cluster::client_v4s()[0].to_string()),
        (IpAddr::V6(VIP6), cluster::client_v6s()[0].to_string()),
    ] {
        let mut per_hop: BTreeMap<String, usize> = BTreeMap::new();
        for sport in 40000..40060u16 {
            let output = cluster
                .router
                .exec(
                    "ip",
                    &[
                        "-j",
                        "route",
                        "get",
                        &vip.to_string(),
                        "from",
                        &client,
                        "iif",
                        cluster::ROUTER_CLIENT_IFACE,
                        "ipproto",
                        "tcp",
                        "sport",
                        &sport.to_string(),
                        "dport",
                        "8080",
                    ],
                )
                .unwrap();
            let route: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            let hop = route[0]["gateway"].as_str().unwrap_or("none").to_owned();
            *per_hop.entry(hop).or_default() += 1;
        }
        println!("{vip}: 60 source ports of {client} -> next hops {per_hop:?}");
        assert_eq!(per_hop.len(), 3, "{per_hop:?}");
    }
    // Real datagrams: each node counts and drops the ones to the VIP that reach it.
    for node in &cluster.nodes {
        node.ns
            .exec(
                "nft",
                &[
                    "add table inet count; add chain inet count vip { type filter hook prerouting \
                     priority -300; }; add rule inet count vip ip daddr 198.18.200.1 udp dport \
                     8080 counter drop",
                ],
            )
            .unwrap();
    }
    let from = cluster::client_v4s()[0];
    for sport in 41000..41060u16 {
        cluster
            .client
            .enter(move || {
                let socket = std::net::UdpSocket::bind(SocketAddr::new(from.into(), sport))?;
                socket.send_to(b"x", SocketAddr::new(VIP4.into(), 8080))
            })
            .unwrap()
            .unwrap();
    }
    // Every datagram is counted once, at one node: wait until all 60 are.
    let deadline = Instant::now() + Duration::from_secs(5);
    let counts = loop {
        let counts: Vec<u64> = cluster
            .nodes
            .iter()
            .map(|node| {
                let output = node
                    .ns
                    .exec("nft", &["-j", "list", "chain", "inet", "count", "vip"])
                    .unwrap();
                let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                packets(&json).expect("a counter")
            })
            .collect();
        if counts.iter().sum::<u64>() >= 60 || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    println!("60 datagrams from 60 source ports -> per node {counts:?}");
    assert_eq!(counts.iter().sum::<u64>(), 60, "{counts:?}");
    assert!(counts.iter().filter(|&&c| c > 0).count() >= 2, "{counts:?}");
}

/// The packets of the first counter in `nft -j` output.
fn packets(json: &serde_json::Value) -> Option<u64> {
    match json {
        serde_json::Value::Object(map) => map
            .get("counter")
            .and_then(|c| c["packets"].as_u64())
            .or_else(|| map.values().find_map(packets)),
        serde_json::Value::Array(items) => items.iter().find_map(packets),
        _ => None,
    }
}
