//! Across nodes (the tunnel, direct server return, failover):
//!
//! - the receiving node's forwarding rate when the backends live on another node (the packet
//!   goes out again inside IPv4/UDP/GUE to that node, here a veth whose far end is a sink
//!   standing for the peer) against today's DNAT to a local pod, on the `forwarding` rig
//!   (XDP live frames, 64-byte UDP, one CPU, interleaved rounds);
//! - bytes through the receiving node per byte delivered, for 10 MB HTTP downloads through
//!   the 3-node cluster sandbox (`lb_tests::cluster`), from the router's interface counters;
//! - failover in that cluster: a node taken off the network (BFD) or drained, to the router's
//!   route change and to a flow the failed node received answering again.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::programs::{Xdp, XdpMode};
use lb_common::{
    Backend, Reason, ServiceKey, ServiceValue, TunnelConfig,
    maps::{BACKEND_F_VALID, PROTO_UDP, ipv4_mapped},
};
use lb_tests::{
    cluster::{ANNOUNCE_ARGS, Cluster, VIP4, VIP6, client_v4s},
    sandbox::{Binaries, LoggedChild},
};

use crate::{
    forwarding::{Config, Rig, run_length},
    live::{self, MANY_FLOWS, PODS, Traffic, VIP, flows_label, ns_added, quotient},
    report::{Report, median},
};

pub const RATE: &str = "Across nodes: the receiving node's forwarding rate, backends on another node (tunnel) vs local (DNAT) (XDP live frames, 64-byte UDP, one CPU)";
pub const BYTES: &str = "Across nodes: bytes on the receiving node's link per byte delivered (10 MB HTTP downloads, 3-node cluster sandbox)";
pub const FAILOVER: &str =
    "Across nodes: failover in the 3-node cluster sandbox (BFD 100 ms x 3, generic XDP, veth)";

/// The service whose backends live on the peer node (service id 1, port 8080/UDP).
const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 201, 1);
/// The peer node: a sink behind the node's `p100` (198.18.100.254/24).
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const PEER_INDEX: u8 = 100;
/// Backend ids of the remote service: `REMOTE_BASE + 1 ..= REMOTE_BASE + PODS`.
const REMOTE_BASE: u32 = 10;

pub fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    rate(report, quick)?;
    let dir = lb_tests::lb_userspace_bin();
    let binaries = Binaries::in_dir(dir.parent().expect("target dir"));
    let mut cluster = Cluster::up("bn", binaries, 3)?;
    cluster.write_manifests("Cluster")?;
    cluster.start_controllers(ANNOUNCE_ARGS, false)?;
    wait_all_nodes(&cluster)?;
    bytes(&cluster, report, quick)?;
    failover(&cluster, report, quick)?;
    Ok(())
}

/// Adds the peer node to the forwarding rig: a sink at [`PEER`] behind the node's `p100` (a
/// permanent neighbour, a TX port), the node's tunnel end (198.18.100.254, port 6080), and
/// the service [`VIP_REMOTE`] whose [`PODS`] backends live on the peer.
fn add_peer(rig: &mut Rig) -> anyhow::Result<live::Pod> {
    let peer = live::add_pod(&rig.node, "bfr", PEER_INDEX, |_| Ok(()))?;
    {
        let sink: &mut Xdp = rig
            .bench
            .program_mut("bench_sink")
            .expect("program")
            .try_into()?;
        peer.ns.enter(|| sink.attach("eth0", XdpMode::Driver))??;
    }
    let index = peer.node_end_index;
    let dataplane = &mut rig.dataplane;
    rig.node.enter(|| dataplane.add_tx_port(index))??;
    dataplane.set_tunnel(
        &TunnelConfig {
            addr4: ipv4_mapped([198, 18, PEER_INDEX, 254]),
            addr6: [0; 16],
            port: 6080,
            pad: 0,
            mtu: 1500,
        },
        &BTreeSet::from([IpAddr::V4(PEER)]),
    )?;
    let key = ServiceKey {
        addr: ipv4_mapped(VIP_REMOTE.octets()),
        port: 8080,
        proto: PROTO_UDP,
        pad: 0,
    };
    dataplane.set_service(
        &key,
        &ServiceValue {
            id: 1,
            flags: 0,
            affinity_timeout_secs: 0,
        },
    )?;
    dataplane.set_vip_addr(ipv4_mapped(VIP_REMOTE.octets()), 1)?;
    let mut placed = Vec::new();
    for i in 1..=PODS {
        let id = REMOTE_BASE + u32::from(i);
        dataplane.set_backend(
            id,
            &Backend {
                addr: ipv4_mapped([10, 244, i, 1]),
                port: 8080,
                flags: BACKEND_F_VALID,
                service_id: 1,
                node: ipv4_mapped(PEER.octets()),
            },
        )?;
        placed.push(lb_userspace::maglev::MaglevBackend {
            id,
            identity: vec![100 + i],
            weight: 1,
        });
    }
    let table = lb_userspace::maglev::build(&placed, 1021)?.expect("a table");
    dataplane.set_maglev_table(1, &table)?;
    Ok(peer)
}

/// Part 1: the ceiling, DNAT to local pods and the tunnel to the peer, 1 and many flows,
/// interleaved over rounds.
fn rate(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let mut rig = Rig::build()?;
    let _peer = add_peer(&mut rig)?;
    let (rounds, target) = (3, run_length(quick));
    let runs: [(&str, Config, u32, Ipv4Addr); 5] = [
        ("no router (ceiling)", Config::Ceiling, 1, VIP),
        ("ours, local backends (DNAT)", Config::Ours, 1, VIP),
        ("ours, local backends (DNAT)", Config::Ours, MANY_FLOWS, VIP),
        (
            "ours, backends on another node (tunnel)",
            Config::Ours,
            1,
            VIP_REMOTE,
        ),
        (
            "ours, backends on another node (tunnel)",
            Config::Ours,
            MANY_FLOWS,
            VIP_REMOTE,
        ),
    ];
    let reason = |rig: &Rig, reason: Reason| -> anyhow::Result<u64> {
        Ok(rig.dataplane.reason_counter(reason)?.packets)
    };
    let mut rates = vec![Vec::new(); runs.len()];
    for round in 0..rounds {
        for (i, (name, config, flows, dst)) in runs.iter().enumerate() {
            rig.configure(*config)?;
            let tunnelled = reason(&rig, Reason::TunnelRedirect)?;
            let rate = rig.measure(*dst, Traffic::Flows(*flows), target)?;
            let tunnelled = reason(&rig, Reason::TunnelRedirect)? - tunnelled;
            eprintln!(
                "   round {round}: {name} ({}): {rate:.3} Mpps ({tunnelled} tunnel_redirect)",
                flows_label(*flows)
            );
            rates[i].push(rate);
        }
    }
    let counts: Vec<String> = [
        Reason::DnatRedirect,
        Reason::TunnelRedirect,
        Reason::TunnelTx,
        Reason::TunnelFallback,
    ]
    .into_iter()
    .map(|r| Ok(format!("{r:?} {}", reason(&rig, r)?)))
    .collect::<anyhow::Result<_>>()?;
    rig.detach_node()?;
    let ceiling = rates[0].clone();
    for (i, (name, _, flows, _)) in runs.iter().enumerate() {
        let label = format!("{name} - {}", flows_label(*flows));
        report.add(RATE, &label, "Mpps", rates[i].clone(), None, "");
        if i > 0 {
            report.add(
                RATE,
                &format!("{label}: ns added by the node"),
                "ns",
                ns_added(&rates[i], &ceiling),
                None,
                "1/rate - 1/ceiling",
            );
        }
    }
    for (flows, dnat, tunnel) in [(1, 1, 3), (MANY_FLOWS, 2, 4)] {
        report.add(
            RATE,
            &format!("tunnel vs DNAT, {}", flows_label(flows)),
            "Mpps",
            rates[tunnel].clone(),
            Some(("DNAT", &rates[dnat], quotient)),
            "the tunnel's frames are 44 bytes longer (108 bytes)",
        );
    }
    report.notes.push(format!(
        "Across nodes, rate: the forwarding rig with a peer node added (a veth whose far end \
         counts and drops, a permanent neighbour entry for 198.18.100.1); {rounds} rounds of \
         about {} ms each per configuration, native XDP on veth. Reasons counted by the node \
         over the whole run: {}.",
        target.as_millis(),
        counts.join(", ")
    ));
    Ok(())
}

/// Waits until the router has every node as a next hop for both VIPs.
fn wait_all_nodes(cluster: &Cluster) -> anyhow::Result<()> {
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let all: Vec<IpAddr> = (1..=3).map(|i| cluster.next_hop_of(i, vip)).collect();
        cluster.wait_next_hops(vip, &all, Duration::from_secs(20))?;
    }
    Ok(())
}

/// tcpdump on the router's side of every node's link: which node the router sent a client
/// port's flow to (`-Q out`), which node its replies came from (`-Q in`). TCP: SYN and
/// SYN-ACK only; UDP: every datagram. Tunnel packets (between node addresses) never match.
struct Capture {
    to_node: Vec<LoggedChild>,
    from_node: Vec<LoggedChild>,
}

impl Capture {
    fn start(cluster: &Cluster) -> anyhow::Result<Self> {
        let capture = |index: usize, direction: &str| {
            cluster.capture_link(
                index,
                direction,
                "net 198.18.2.0/24 and port 8080 and (udp or tcp[tcpflags] & tcp-syn != 0)",
            )
        };
        Ok(Self {
            to_node: (1..=3)
                .map(|i| capture(i, "out"))
                .collect::<anyhow::Result<_>>()?,
            from_node: (1..=3)
                .map(|i| capture(i, "in"))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// The nodes (1-based) whose capture has client port `port` after `needle`.
    fn nodes(captures: &[LoggedChild], needle: &str, port: u16) -> Vec<usize> {
        (1..=captures.len())
            .filter(|i| {
                captures[i - 1].text().lines().any(|line| {
                    line.find(needle).is_some_and(|at| {
                        line[at + needle.len()..]
                            .split(|c: char| !c.is_ascii_digit())
                            .next()
                            .and_then(|p| p.parse::<u16>().ok())
                            == Some(port)
                    })
                })
            })
            .collect()
    }

    /// The node that received client port `port`'s flow and the node its replies left from.
    fn flow(&self, port: u16) -> (Vec<usize>, Vec<usize>) {
        let from = client_v4s()[0];
        (
            Self::nodes(&self.to_node, &format!("{from}."), port),
            Self::nodes(&self.from_node, &format!("{VIP4}.8080 > {from}."), port),
        )
    }
}

/// Bytes the router sent node `index` and received from it: what the node's link carried.
fn link_bytes(cluster: &Cluster, index: usize) -> anyhow::Result<u64> {
    let read = |what: &str| -> anyhow::Result<u64> {
        let out = cluster.router.exec(
            "cat",
            &[&format!("/sys/class/net/fabric-n{index}/statistics/{what}")],
        )?;
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    Ok(read("rx_bytes")? + read("tx_bytes")?)
}

/// `GET /bytes/size` over a new connection from the client's first address, port `port`;
/// the body's length.
fn download(cluster: &Cluster, port: u16, size: u64) -> anyhow::Result<u64> {
    let from = SocketAddr::new(IpAddr::V4(client_v4s()[0]), port);
    let mut stream = cluster.connect_from(from, SocketAddr::new(IpAddr::V4(VIP4), 8080))?;
    stream.write_all(
        format!("GET /bytes/{size} HTTP/1.1\r\nHost: tomcat\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut answer = Vec::with_capacity(size as usize + 200);
    stream.read_to_end(&mut answer)?;
    let head = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP head"))?
        + 4;
    Ok((answer.len() - head) as u64)
}

/// Part 2: 10 MB downloads from new client ports until `want` flows crossed nodes (receiving
/// node != pod's node) and `want` did not; per flow, the bytes on each link over the bytes
/// delivered.
fn bytes(cluster: &Cluster, report: &mut Report, quick: bool) -> anyhow::Result<()> {
    const SIZE: u64 = 10_000_000;
    let want = if quick { 3 } else { 7 };
    let capture = Capture::start(cluster)?;
    // Per download: client port, delivered bytes, each link's bytes.
    let mut downloads = Vec::new();
    let (mut crossed, mut local) = (0, 0);
    for port in 42000..42060u16 {
        if crossed >= want && local >= want {
            break;
        }
        let before: Vec<u64> = (1..=3)
            .map(|i| link_bytes(cluster, i))
            .collect::<anyhow::Result<_>>()?;
        let delivered = download(cluster, port, SIZE)?;
        let after: Vec<u64> = (1..=3)
            .map(|i| link_bytes(cluster, i))
            .collect::<anyhow::Result<_>>()?;
        let links: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        std::thread::sleep(Duration::from_millis(100));
        let (receiving, replying) = capture.flow(port);
        let &[r] = receiving.as_slice() else {
            anyhow::bail!("port {port}: receiving nodes {receiving:?}");
        };
        let &[p] = replying.as_slice() else {
            anyhow::bail!("port {port}: replying nodes {replying:?}");
        };
        eprintln!(
            "   download from port {port}: {delivered} bytes, received by node {r}, pod on \
             node {p}; link bytes per node {links:?}"
        );
        if r == p {
            local += 1;
        } else {
            crossed += 1;
        }
        downloads.push((r, p, delivered as f64, links));
    }
    let per_byte = |node: usize, d: &(usize, usize, f64, Vec<u64>)| d.3[node - 1] as f64 / d.2;
    let dsr: Vec<f64> = downloads
        .iter()
        .filter(|d| d.0 != d.1)
        .map(|d| per_byte(d.0, d))
        .collect();
    let pod_node: Vec<f64> = downloads
        .iter()
        .filter(|d| d.0 != d.1)
        .map(|d| per_byte(d.1, d))
        .collect();
    let dnat: Vec<f64> = downloads
        .iter()
        .filter(|d| d.0 == d.1)
        .map(|d| per_byte(d.0, d))
        .collect();
    let pairs = dsr.len().min(dnat.len());
    report.add(
        BYTES,
        "receiving node, pod on another node (tunnel, DSR)",
        "B/B",
        dsr.clone(),
        None,
        "in: requests and ACKs; out: the same, encapsulated",
    );
    report.add(
        BYTES,
        "the pod's node, same flows",
        "B/B",
        pod_node,
        None,
        "in: the tunnel's requests and ACKs; out: the reply, straight to the client",
    );
    report.add(
        BYTES,
        "receiving node = the pod's node (local DNAT)",
        "B/B",
        dnat.clone(),
        None,
        "the reply leaves through it once",
    );
    report.add(
        BYTES,
        "receiving node: local DNAT vs tunnel (DSR)",
        "B/B",
        dnat[..pairs].to_vec(),
        Some(("tunnel (DSR)", &dsr[..pairs], quotient)),
        "how many times the bytes",
    );
    report.notes.push(format!(
        "Across nodes, bytes: {} downloads of {SIZE} bytes (`GET /bytes/N` of lb-pod) over IPv4 \
         from new client ports; the receiving and replying nodes from tcpdump on the router's \
         `fabric-nI` ports (SYN and SYN-ACK), the bytes from the router's counters of the same \
         ports (rx + tx, Ethernet frames; BFD and BGP included, a few kB/s per link) over the \
         body bytes the client read. The DNAT figure is the cluster's own node serving its own \
         pod (its link carries the reply out once and the requests in); a load balancer that \
         is not the pod's node and DNATs without DSR carries the reply in and out again: at \
         least 2 bytes per byte delivered (not measured here).",
        downloads.len()
    ));
    Ok(())
}

/// A UDP flow from the client's first address, port `port`, to VIP4:8080 that the router
/// sends to node `node` and whose pod lives on another node.
fn flow_through(
    cluster: &Cluster,
    node: usize,
    ports: std::ops::Range<u16>,
) -> anyhow::Result<u16> {
    let capture = Capture::start(cluster)?;
    let from = IpAddr::V4(client_v4s()[0]);
    for port in ports.clone() {
        cluster.udp_echo_from(SocketAddr::new(from, port), IpAddr::V4(VIP4), b"find")?;
    }
    std::thread::sleep(Duration::from_millis(200));
    ports
        .into_iter()
        .find(|&port| {
            let (receiving, replying) = capture.flow(port);
            receiving == [node] && replying.len() == 1 && replying[0] != node
        })
        .ok_or_else(|| anyhow::anyhow!("no flow through node {node} to another node's pod"))
}

/// Probes the UDP flow from `port` every 5 ms (a sequence number echoed) until `stop`; the
/// send times of the probes that were answered, and of all.
fn probe(
    cluster: &Cluster,
    port: u16,
    stop: &AtomicBool,
) -> anyhow::Result<(Vec<Instant>, Vec<bool>)> {
    let from = SocketAddr::new(IpAddr::V4(client_v4s()[0]), port);
    cluster.client.enter(|| -> anyhow::Result<_> {
        let socket = UdpSocket::bind(from)?;
        socket.set_read_timeout(Some(Duration::from_millis(5)))?;
        let (mut sent, mut answered) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            let seq = sent.len() as u32;
            sent.push(Instant::now());
            answered.push(false);
            socket.send_to(&seq.to_be_bytes(), SocketAddr::new(IpAddr::V4(VIP4), 8080))?;
            let deadline = Instant::now() + Duration::from_millis(5);
            while Instant::now() < deadline {
                if let Ok(n) = socket.recv(&mut buf)
                    && n == 4
                {
                    let k = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                    if k < answered.len() {
                        answered[k] = true;
                    }
                }
            }
        }
        Ok((sent, answered))
    })?
}

/// Part 3: node 2 fails (its bridge port down, only BFD tells the router), a few times; the
/// time to the router's route change and to a UDP flow the router was sending to node 2
/// (its pod elsewhere) answering again; then node 3 drains (the exclude label): the time to
/// the router's route change.
fn failover(cluster: &Cluster, report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let reps = if quick { 2 } else { 5 };
    let both = |a: usize, b: usize| -> Vec<(IpAddr, Vec<IpAddr>)> {
        [IpAddr::V4(VIP4), IpAddr::V6(VIP6)]
            .into_iter()
            .map(|vip| {
                (
                    vip,
                    vec![cluster.next_hop_of(a, vip), cluster.next_hop_of(b, vip)],
                )
            })
            .collect()
    };
    let (mut routed4, mut routed) = (Vec::new(), Vec::new());
    let (mut moved, mut drained) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        let port = flow_through(cluster, 2, 43000 + rep * 100..43000 + rep * 100 + 40)?;
        let stop = AtomicBool::new(false);
        let (route, (sent, answered)) = std::thread::scope(|scope| -> anyhow::Result<_> {
            let prober = scope.spawn(|| probe(cluster, port, &stop));
            std::thread::sleep(Duration::from_millis(300));
            let failed_at = Instant::now();
            cluster.fail_node(2)?;
            let mut route = Vec::new();
            for (vip, survivors) in both(1, 3) {
                cluster.wait_next_hops(vip, &survivors, Duration::from_secs(10))?;
                route.push(failed_at.elapsed());
            }
            std::thread::sleep(Duration::from_millis(700));
            stop.store(true, Ordering::Relaxed);
            let probes = prober
                .join()
                .map_err(|_| anyhow::anyhow!("prober panicked"))??;
            Ok(((failed_at, route), probes))
        })?;
        let (failed_at, route) = route;
        // The first probe answered after the first one lost since the failure (`fail_node`
        // takes a few ms: probes sent meanwhile still reach node 2).
        let first_lost = sent
            .iter()
            .zip(&answered)
            .position(|(at, ok)| !*ok && *at > failed_at)
            .unwrap_or(sent.len());
        let back = sent[first_lost..]
            .iter()
            .zip(&answered[first_lost..])
            .find(|(_, ok)| **ok)
            .map(|(at, _)| at.duration_since(failed_at));
        let lost = sent
            .iter()
            .zip(&answered)
            .filter(|(at, ok)| !**ok && **at > failed_at)
            .count();
        eprintln!(
            "   failure {rep}: flow from port {port}: router changed after {route:?} (IPv4, \
             then both), the flow answered again after {back:?} ({lost} probes lost)"
        );
        routed4.push(ms(route[0]));
        routed.push(ms(route[1]));
        moved.push(back.map_or(f64::NAN, ms));
        cluster.restore_node(2)?;
        wait_all_nodes(cluster)?;
        cluster.wait_sessions(Duration::from_secs(20))?;
    }
    for rep in 0..reps {
        let drained_at = Instant::now();
        cluster.drain_node(3)?;
        for (vip, rest) in both(1, 2) {
            cluster.wait_next_hops(vip, &rest, Duration::from_secs(10))?;
        }
        let took = drained_at.elapsed();
        eprintln!("   drain {rep}: router changed after {took:?}");
        drained.push(ms(took));
        cluster.undrain_node(3)?;
        wait_all_nodes(cluster)?;
    }
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    for (name, values, note) in [
        (
            "node failure to the router's route change (IPv4 VIP)",
            &routed4,
            "BFD: 3 x 100 ms missed, then BIRD's route update",
        ),
        (
            "node failure to the router's route change (both VIPs)",
            &routed,
            "BFD: 3 x 100 ms missed, then BIRD's route update",
        ),
        (
            "node failure to a flow it received answering again",
            &moved,
            "IPv4 UDP probes (each given 5 ms to be echoed); its pod on another node, the flow's new node picks the same pod",
        ),
        (
            "drain (exclude label) to the router's route change (both VIPs)",
            &drained,
            "the controller's apply, BIRD's kernel scan and BGP withdrawal",
        ),
    ] {
        report.add(
            FAILOVER,
            name,
            "ms",
            values.clone(),
            None,
            &format!("max {:.0} ms; {note}", max(values)),
        );
    }
    report.notes.push(format!(
        "Across nodes, failover: {reps} failures of node 2 (its port on the router's bridge set \
         down, as `cargo xtask sandbox fail-node` does; restored and BGP re-established between \
         repetitions) and {reps} drains of node 3 (undrained between); the sandbox's bridge does \
         not flood unknown unicast to the nodes (`lb_tests::cluster`: else the other nodes' \
         generic XDP would serve the failed node's flooded frames, which a NIC filters out by \
         its MAC address). Times are measured from \
         the moment the test fails or labels the node, the routes polled every 5 ms. The lost \
         node's pods stay ready in the EndpointSlices (Kubernetes takes 40 s or more to mark \
         them): flows whose pod was on the failed node are not counted here. Median {:.0} ms \
         to the route change.",
        median(&routed)
    ));
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
