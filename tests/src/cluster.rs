//! A multi-node sandbox with a real BGP router: `N` nodes (1..=8) on a shared L2 fabric behind a
//! router running BIRD 2, a client behind the router, two pods per node. Each node runs its
//! own BIRD, which announces to the router every address the node's controller keeps as a
//! route in kernel table [`ANNOUNCE_TABLE`]; the router installs one ECMP route per announced
//! address over every announcing node and spreads flows over them by their L4 tuple.
//!
//! ```text
//!  client  eth0 198.18.2.2-9/24, 2001:db8:2::2-9/64, default via the router
//!    │
//!    │ to-client 198.18.2.1/24, 2001:db8:2::1/64
//!  router  (BIRD AS 65000; forwarding; fib_multipath_hash_policy=1 for v4 and v6;
//!    │      no pod routes: clients never address pods)
//!    │ bridge `fabric` 198.18.1.1/24, 2001:db8:1::1/64
//!    ├── port fabric-n1 ══ eth0 node-1 198.18.1.11, 2001:db8:1::b   (BIRD AS 65001)
//!    ├── port fabric-n2 ══ eth0 node-2 198.18.1.12, 2001:db8:1::c   (BIRD AS 65002)
//!    └── ...            ══ eth0 node-I 198.18.1.(10+I), 2001:db8:1::(10+I)  (AS 65000+I)
//!
//!  node-I  eth0: the underlay and client-facing link (the load balancer attaches here);
//!          default routes via 198.18.1.1 / 2001:db8:1::1; routes to every other node's pod
//!          subnet via that node's fabric address (as a CNI would); forwarding on;
//!          kernel table 4242: the controller's blackhole routes, one per announced address
//!    │ veth-pJ 198.18.(16+I).254 peer .J, 2001:db8:(16+I)::fe peer ::J (point-to-point)
//!  pod J of node I (J = 1, 2): eth0 198.18.(16+I).J, 2001:db8:(16+I)::J, default via the node;
//!          `lb-pod node-I-pod-J` (HTTP on 8080 answering its name, UDP echo)
//!
//!  VIPs 198.18.200.1 and 2001:db8:200::1, port 8080 TCP (http) and UDP (echo)
//! ```
//!
//! BGP: an IPv4 session (ipv4 channel) and an IPv6 session (ipv6 channel) between the router
//! and each node, eBGP, router AS 65000 and node I AS 65000+I, BFD on both (100 ms intervals,
//! multiplier 3: a silent peer is down after 300 ms), hold time 3 s and keepalive 1 s as a
//! backstop. A node exports only what its BIRD learned from table 4242 (`protocol kernel ...
//! kernel table 4242; learn;`: routes of any protocol but BIRD's own, added asynchronously);
//! the router exports nothing and installs what it learns with `merge paths on` (one
//! multipath route). The configurations are written by [`router_bird_conf`] and
//! [`node_bird_conf`] into the state folder, with comments, for an operator to read.
//!
//! Names: namespaces `lbt-<tag>-router-<pid>`, `lbt-<tag>-client-<pid>`, `lbt-<tag>-nodeI-<pid>`,
//! `lbt-<tag>-nIpJ-<pid>`; the state folder (BIRD configurations, control sockets, logs, and
//! `config/`, the manifests every controller reads) is `/run/lb/cluster/lbt-<tag>-<pid>`.
//! Everything follows from the tag and the pid of the process that built the cluster, so a
//! process of its own ([`ClusterRef::find`], `cargo xtask sandbox fail-node 2`) can fail,
//! restore, drain or undrain a node of a cluster another process left running. Dropping the
//! [`Cluster`] stops every process (controllers, BIRD, pods) and removes namespaces, pins and
//! the state folder; [`crate::netns::sweep_stale`] removes them after a crash.

use std::{
    fmt::Write as _,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    ChildGuard, Roots,
    netns::{self, Netns, veth_pair},
    sandbox::{
        self, Binaries, EndpointState, HeldConnection, LoggedChild, PORT, Pod, PodLink,
        write_atomically,
    },
};

pub use crate::sandbox::{VIP4, VIP6};

/// Most nodes a cluster has (node addresses and pod subnets are laid out for up to 8).
pub const MAX_NODES: usize = 8;
/// Pods per node.
pub const PODS_PER_NODE: u8 = 2;
/// The kernel routing table of each node's namespace where the controller keeps one
/// `blackhole` route per address it wants announced; the node's BIRD exports what it holds.
pub const ANNOUNCE_TABLE: u32 = 4242;
/// The routing protocol number the controller gives those routes (`proto 250`).
pub const ANNOUNCE_PROTO: u8 = 250;
/// The arguments that make a controller keep its announcements in [`ANNOUNCE_TABLE`], added by
/// `cargo xtask sandbox up --nodes N` (and the tests) to every node's controller; a stopping
/// controller withdraws, then serves on for a one-second drain period.
pub const ANNOUNCE_ARGS: &[&str] = &["--announce-table", "4242", "--drain-period", "1s"];
/// The arguments every node's controller gets besides the announcement's: XDP in generic
/// mode, because the router's ends of the nodes' veths run no XDP program, and a veth drops
/// the frames its peer sends by native XDP_TX (the tunnel's, between nodes) unless its own end
/// runs one. A physical NIC has no such condition; the fixtures cover the native path.
pub const NODE_ARGS: &[&str] = &["--mode", "generic"];
/// The router's AS number.
pub const ROUTER_AS: u32 = 65000;
/// The interface every node attaches the load balancer to: its underlay link.
pub const NODE_IFACE: &str = "eth0";
/// The router's bridge to which every node's underlay link is a port.
pub const FABRIC: &str = "fabric";
/// The router's end of the link to the client.
pub const ROUTER_CLIENT_IFACE: &str = "to-client";
/// The router's address on the fabric.
pub const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The router's IPv6 address on the fabric.
pub const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// Where every cluster keeps its state folder (`lbt-<tag>-<pid>` below it).
pub const STATE_ROOT: &str = "/run/lb/cluster";
/// What a controller logs after each apply.
pub const APPLIED: &str = " applied generation=";
/// The label that takes a node out of external load balancing (what `drain_node` sets).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The AS number of node `index`.
pub fn node_as(index: usize) -> u32 {
    ROUTER_AS + index as u32
}

/// Node `index`'s name (`--node-name`, the Node object, the endpoints' `nodeName`).
pub fn node_name(index: usize) -> String {
    format!("node-{index}")
}

/// Node `index`'s fabric (InternalIP) IPv4 address.
pub fn node_v4(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 10 + index as u8)
}

/// Node `index`'s fabric (InternalIP) IPv6 address.
pub fn node_v6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 10 + index as u16)
}

/// Pod `pod` of node `index`: its IPv4 address.
pub fn pod_v4(index: usize, pod: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 16 + index as u8, pod)
}

/// Pod `pod` of node `index`: its IPv6 address.
pub fn pod_v6(index: usize, pod: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 16 + index as u16, 0, 0, 0, 0, u16::from(pod))
}

/// Pod `pod` of node `index`: its name, and what its server answers.
pub fn pod_name(index: usize, pod: u8) -> String {
    format!("node-{index}-pod-{pod}")
}

/// The client's addresses: 198.18.2.2 to 198.18.2.9 (the first is its primary).
pub fn client_v4s() -> Vec<Ipv4Addr> {
    (2..=9).map(|h| Ipv4Addr::new(198, 18, 2, h)).collect()
}

/// The client's IPv6 addresses: 2001:db8:2::2 to 2001:db8:2::9.
pub fn client_v6s() -> Vec<Ipv6Addr> {
    (2..=9)
        .map(|h| Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, h))
        .collect()
}

/// The router's bridge port of node `index`.
fn fabric_port(index: usize) -> String {
    format!("fabric-n{index}")
}

/// The router's BIRD configuration for nodes `1..=nodes`.
pub fn router_bird_conf(nodes: usize, log: &Path) -> String {
    let mut conf = format!(
        "# The router's BIRD 2 (AS {ROUTER_AS}). It peers with every node (eBGP, an IPv4 and an IPv6
# session each, BFD on), takes every address they announce and installs it in the main
# table; routes for the same address from several nodes become one multipath (ECMP) route.
# It announces nothing.
router id {ROUTER_V4};
log \"{log}\" all;

# Interfaces and their addresses, for the sessions' next hops.
protocol device {{ }}

# The main kernel table: what BGP learned, one route per prefix with a next hop per node.
protocol kernel main_v4 {{
  ipv4 {{ import none; export all; }};
  merge paths on;
}}
protocol kernel main_v6 {{
  ipv6 {{ import none; export all; }};
  merge paths on;
}}

{bfd}
# The settings of every node session.
template bgp node_session {{
  local as {ROUTER_AS};
  bfd on;              # down 300 ms after the node's BFD packets stop (see protocol bfd)
  hold time 3;         # the backstop when BFD is silent too: 3 s without a keepalive
  keepalive time 1;
  connect delay time 1;
  connect retry time 1;
  error wait time 1, 4; # a session that failed is retried after 1 s (up to 4 s)
}}
",
        log = log.display(),
        bfd = BFD_CONF,
    );
    for index in 1..=nodes {
        let (asn, v4, v6) = (node_as(index), node_v4(index), node_v6(index));
        let _ = write!(
            conf,
            "
# {name}
protocol bgp node{index}_v4 from node_session {{
  neighbor {v4} as {asn};
  ipv4 {{ import all; export none; }};
}}
protocol bgp node{index}_v6 from node_session {{
  neighbor {v6} as {asn};
  ipv6 {{ import all; export none; }};
}}
",
            name = node_name(index)
        );
    }
    conf
}

/// BFD, the same on both ends: 100 ms intervals, 3 missed packets.
const BFD_CONF: &str =
    "# BFD for the BGP sessions that ask for it: a packet every 100 ms, the session is down
# after 3 missed ones (300 ms). Sent every 100 ms even while down, so it comes back fast.
protocol bfd {
  interface \"*\" {
    interval 100 ms;
    idle tx interval 100 ms;
    multiplier 3;
  };
}
";

/// Node `index`'s BIRD configuration.
pub fn node_bird_conf(index: usize, log: &Path) -> String {
    format!(
        "# {name}'s BIRD 2 (AS {asn}). It announces to the router every address the load balancer's
# controller keeps as a route in kernel table {ANNOUNCE_TABLE} (one blackhole route per address, /32
# and /128, protocol {ANNOUNCE_PROTO}), and nothing else. The controller owns that table: when it
# removes a route, BIRD withdraws the address.
router id {v4};
log \"{log}\" all;

protocol device {{ }}

# Table {ANNOUNCE_TABLE}, read only. `learn` takes routes other programs add (any protocol but
# BIRD's own), as the kernel reports them, not only at the periodic scan.
protocol kernel table{ANNOUNCE_TABLE}_v4 {{
  ipv4 {{ import all; export none; }};
  kernel table {ANNOUNCE_TABLE};
  learn;
  scan time 10;
}}
protocol kernel table{ANNOUNCE_TABLE}_v6 {{
  ipv6 {{ import all; export none; }};
  kernel table {ANNOUNCE_TABLE};
  learn;
  scan time 10;
}}

{bfd}
template bgp router_session {{
  local as {asn};
  bfd on;
  hold time 3;
  keepalive time 1;
  connect delay time 1;
  connect retry time 1;
  error wait time 1, 4;
}}

# Only what table {ANNOUNCE_TABLE} holds goes to the router; nothing comes back.
protocol bgp router_v4 from router_session {{
  neighbor {ROUTER_V4} as {ROUTER_AS};
  ipv4 {{ import none; export where proto = \"table{ANNOUNCE_TABLE}_v4\"; }};
}}
protocol bgp router_v6 from router_session {{
  neighbor {ROUTER_V6} as {ROUTER_AS};
  ipv6 {{ import none; export where proto = \"table{ANNOUNCE_TABLE}_v6\"; }};
}}
",
        name = node_name(index),
        asn = node_as(index),
        v4 = node_v4(index),
        log = log.display(),
        bfd = BFD_CONF,
    )
}

/// Node `index`'s Node object: its InternalIPs (the fabric addresses), its hostname, its
/// labels; [`EXCLUDE_LABEL`] when `drained`.
pub fn node_manifest(index: usize, drained: bool) -> String {
    let name = node_name(index);
    let exclude = if drained {
        format!("    {EXCLUDE_LABEL}: \"true\"\n")
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels:
    kubernetes.io/hostname: {name}
    kubernetes.io/os: linux
{exclude}status:
  addresses:
  - type: InternalIP
    address: {v4}
  - type: InternalIP
    address: {v6}
  - type: Hostname
    address: {name}
",
        v4 = node_v4(index),
        v6 = node_v6(index),
    )
}

/// A cluster named by its tag and the pid of the process that built it: what every operation
/// that only needs names (fail, restore, drain, the router's routes) works from, in any process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRef {
    /// The tag given to [`Cluster::up`].
    pub tag: String,
    /// The pid of the process that built it.
    pub pid: u32,
}

impl ClusterRef {
    /// The cluster tagged `tag` that is up (its router namespace exists), whichever process
    /// built it.
    pub fn find(tag: &str) -> anyhow::Result<Self> {
        let list = netns::run("ip", &["netns", "list"])?;
        let prefix = format!("{}{tag}-router-", netns::PREFIX);
        let found: Vec<u32> = String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter_map(|name| name.strip_prefix(&prefix)?.parse().ok())
            .collect();
        match found[..] {
            [pid] => Ok(Self {
                tag: tag.to_owned(),
                pid,
            }),
            [] => bail!("no cluster tagged {tag:?} is up (no namespace {prefix}<pid>)"),
            _ => bail!("several clusters tagged {tag:?} are up (pids {found:?})"),
        }
    }

    /// The name of the namespace `part` (`router`, `client`, `node2`, `n2p1`).
    pub fn ns_name(&self, part: &str) -> String {
        format!("{}{}-{part}-{}", netns::PREFIX, self.tag, self.pid)
    }

    /// The router's namespace name.
    pub fn router_ns(&self) -> String {
        self.ns_name("router")
    }

    /// Node `index`'s namespace name.
    pub fn node_ns(&self, index: usize) -> String {
        self.ns_name(&format!("node{index}"))
    }

    /// The state folder: BIRD configurations, sockets and logs, and `config/`.
    pub fn state_dir(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(format!("{}{}-{}", netns::PREFIX, self.tag, self.pid))
    }

    /// The manifests folder every node's controller reads (`--config`).
    pub fn config_dir(&self) -> PathBuf {
        self.state_dir().join("config")
    }

    /// BIRD's control socket in namespace `part` (`router`, `node2`): `birdc -s` it.
    pub fn bird_socket(&self, part: &str) -> PathBuf {
        self.state_dir().join(format!("bird-{part}.ctl"))
    }

    /// Takes node `index` off the network as a crash would: its port on the router's bridge
    /// goes down. The router's next hops all leave by the bridge, which stays up (its other
    /// ports are), so the kernel drops no route of its own: only BFD (300 ms) tells BIRD the
    /// node is gone, which then withdraws its next hop.
    pub fn fail_node(&self, index: usize) -> anyhow::Result<()> {
        self.router_ip(&["link", "set", &fabric_port(index), "down"])
    }

    /// Puts node `index` back on the network: its sessions come up again (BFD at once, BGP
    /// within a few seconds) and it announces again what its table holds.
    pub fn restore_node(&self, index: usize) -> anyhow::Result<()> {
        self.router_ip(&["link", "set", &fabric_port(index), "up"])
    }

    /// Labels node `index`'s Node object with [`EXCLUDE_LABEL`]: its controller withdraws its
    /// announcements.
    pub fn drain_node(&self, index: usize) -> anyhow::Result<()> {
        self.write_node(index, true)
    }

    /// Removes [`EXCLUDE_LABEL`] from node `index`'s Node object.
    pub fn undrain_node(&self, index: usize) -> anyhow::Result<()> {
        self.write_node(index, false)
    }

    fn write_node(&self, index: usize, drained: bool) -> anyhow::Result<()> {
        write_atomically(
            &self.config_dir().join(format!("node-{index}.yaml")),
            &node_manifest(index, drained),
        )
    }

    fn router_ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let ns = self.router_ns();
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        netns::ip(&full)
    }

    /// The next hops of the router's main-table route to exactly `addr` (/32 or /128), sorted;
    /// empty when it has none.
    pub fn router_next_hops(&self, addr: IpAddr) -> anyhow::Result<Vec<IpAddr>> {
        let family = if addr.is_ipv4() { "-4" } else { "-6" };
        let output = netns::run(
            "ip",
            &[
                "-n",
                &self.router_ns(),
                "-j",
                family,
                "route",
                "show",
                "exact",
                &addr.to_string(),
            ],
        )?;
        parse_next_hops(&output.stdout)
    }

    /// Waits until the router's route to `addr` has exactly the next hops `expected` (in any
    /// order; empty: no route); returns how long that took. Polls every 5 ms.
    pub fn wait_next_hops(
        &self,
        addr: IpAddr,
        expected: &[IpAddr],
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let mut expected = expected.to_vec();
        expected.sort();
        let start = Instant::now();
        loop {
            let hops = self.router_next_hops(addr)?;
            if hops == expected {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the router's next hops for {addr} are {hops:?} after {timeout:?}, expected \
                     {expected:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `birdc -s SOCKET ARGS` for the BIRD in namespace `part` (`router`, `node2`); its output.
    pub fn birdc(&self, part: &str, args: &[&str]) -> anyhow::Result<String> {
        let socket = self.bird_socket(part);
        let mut full = vec!["-s", socket.to_str().context("socket path")?];
        full.extend_from_slice(args);
        let output = netns::run("birdc", &full)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The router's BGP sessions that are established and its BFD sessions that are up.
    pub fn router_sessions_up(&self) -> anyhow::Result<(usize, usize)> {
        let protocols = self.birdc("router", &["show", "protocols"])?;
        let bgp = protocols
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("BGP") && l.contains("Established"))
            .count();
        let bfd = self.birdc("router", &["show", "bfd", "sessions"])?;
        let bfd = bfd
            .lines()
            .filter(|l| l.split_whitespace().nth(2) == Some("Up"))
            .count();
        Ok((bgp, bfd))
    }
}

/// The next hops in `ip -j route show` output (a route with a `gateway`, or `nexthops`).
fn parse_next_hops(json: &[u8]) -> anyhow::Result<Vec<IpAddr>> {
    let routes: Vec<serde_json::Value> =
        serde_json::from_slice(json).context("parsing `ip -j route show`")?;
    let mut hops = Vec::new();
    for route in &routes {
        let gateways: Vec<&serde_json::Value> = match route.get("nexthops") {
            Some(serde_json::Value::Array(nexthops)) => nexthops.iter().collect(),
            _ => vec![route],
        };
        for gateway in gateways {
            if let Some(text) = gateway.get("gateway").and_then(|g| g.as_str()) {
                hops.push(text.parse::<IpAddr>()?);
            }
        }
    }
    hops.sort();
    Ok(hops)
}

/// One node of the cluster.
pub struct Node {
    /// 1-based.
    pub index: usize,
    /// `node-I`.
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// Its fabric (InternalIP) addresses.
    pub v4: Ipv4Addr,
    /// Its fabric IPv6 address.
    pub v6: Ipv6Addr,
    /// Its pods, pod 1 first.
    pub pods: Vec<Pod>,
    /// Pin and state roots of its controller.
    pub roots: Roots,
    /// Its controller, once started.
    pub controller: Option<LoggedChild>,
    bird: Option<ChildGuard>,
}

impl Node {
    /// Both fabric addresses.
    pub fn addrs(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.v4), IpAddr::V6(self.v6)]
    }

    /// Adds the route that announces `addr` to table [`ANNOUNCE_TABLE`] by hand, as the
    /// controller does: `ip route add blackhole ADDR table 4242 proto 250`.
    pub fn announce(&self, addr: IpAddr) -> anyhow::Result<()> {
        self.announce_route("add", addr)
    }

    /// Removes the route [`Node::announce`] added.
    pub fn withdraw(&self, addr: IpAddr) -> anyhow::Result<()> {
        self.announce_route("del", addr)
    }

    fn announce_route(&self, action: &str, addr: IpAddr) -> anyhow::Result<()> {
        let prefix = match addr {
            IpAddr::V4(_) => format!("{addr}/32"),
            IpAddr::V6(_) => format!("{addr}/128"),
        };
        let (table, proto) = (ANNOUNCE_TABLE.to_string(), ANNOUNCE_PROTO.to_string());
        self.ns.ip(&[
            "route",
            action,
            "blackhole",
            &prefix,
            "table",
            &table,
            "proto",
            &proto,
        ])
    }
}

/// The cluster. Dropping it stops every process and removes every namespace, pin and folder.
pub struct Cluster {
    /// The router's namespace.
    pub router: Netns,
    /// The client's namespace.
    pub client: Netns,
    /// The nodes, node 1 first.
    pub nodes: Vec<Node>,
    /// Its names and what works from them alone.
    pub handle: ClusterRef,
    router_bird: Option<ChildGuard>,
    binaries: Binaries,
}

impl Cluster {
    /// Builds router, client and `nodes` nodes with their pods (serving), starts BIRD on the
    /// router and every node and waits until every BGP session is established and every BFD
    /// session up. No controller yet ([`Cluster::start_controllers`]), no manifests yet
    /// ([`Cluster::write_manifests`]).
    pub fn up(tag: &str, binaries: Binaries, nodes: usize) -> anyhow::Result<Self> {
        ensure!(
            (1..=MAX_NODES).contains(&nodes),
            "1 to {MAX_NODES} nodes, not {nodes}"
        );
        for binary in [&binaries.controller, &binaries.pod] {
            if !binary.exists() {
                bail!("{} is missing: build the workspace first", binary.display());
            }
        }
        let handle = ClusterRef {
            tag: tag.to_owned(),
            pid: std::process::id(),
        };
        let state = handle.state_dir();
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(handle.config_dir())
            .with_context(|| format!("creating {}", state.display()))?;
        let router = Netns::create(&format!("{tag}-router"))?;
        let client = Netns::create(&format!("{tag}-client"))?;
        let mut cluster = Self {
            router,
            client,
            nodes: Vec::new(),
            handle,
            router_bird: None,
            binaries,
        };
        cluster.build_router()?;
        for index in 1..=nodes {
            cluster.add_node(index, nodes)?;
        }
        let log = cluster.handle.state_dir().join("bird-router.log");
        let conf = router_bird_conf(nodes, &log);
        cluster.router_bird = Some(start_bird(
            &cluster.router,
            &cluster.handle,
            "router",
            &conf,
        )?);
        for index in 1..=nodes {
            let part = format!("node{index}");
            let log = cluster.handle.state_dir().join(format!("bird-{part}.log"));
            let conf = node_bird_conf(index, &log);
            let bird = start_bird(&cluster.nodes[index - 1].ns, &cluster.handle, &part, &conf)?;
            cluster.nodes[index - 1].bird = Some(bird);
        }
        cluster.wait_sessions(Duration::from_secs(20))?;
        Ok(cluster)
    }

    fn build_router(&mut self) -> anyhow::Result<()> {
        let (router, client) = (&self.router, &self.client);
        router.ip(&[
            "link",
            "add",
            FABRIC,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        router.ip(&["link", "set", FABRIC, "up"])?;
        router.ip(&["addr", "add", "198.18.1.1/24", "dev", FABRIC])?;
        router.ip(&["addr", "add", "2001:db8:1::1/64", "dev", FABRIC, "nodad"])?;
        veth_pair((router, ROUTER_CLIENT_IFACE), (client, "eth0"))?;
        router.ip(&["addr", "add", "198.18.2.1/24", "dev", ROUTER_CLIENT_IFACE])?;
        router.ip(&[
            "addr",
            "add",
            "2001:db8:2::1/64",
            "dev",
            ROUTER_CLIENT_IFACE,
            "nodad",
        ])?;
        for sysctl in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ] {
            router.exec("sysctl", &["-qw", sysctl])?;
        }
        for v4 in client_v4s() {
            client.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        }
        for v6 in client_v6s() {
            client.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        }
        client.ip(&["route", "add", "default", "via", "198.18.2.1"])?;
        client.ip(&["-6", "route", "add", "default", "via", "2001:db8:2::1"])?;
        // A NIC hands XDP frames with complete checksums; a veth would pass on the client's
        // offloaded partial ones, through the router, to the nodes' XDP.
        client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        Ok(())
    }

    fn add_node(&mut self, index: usize, nodes: usize) -> anyhow::Result<()> {
        let tag = &self.handle.tag;
        let ns = Netns::create(&format!("{tag}-node{index}"))?;
        let port = fabric_port(index);
        veth_pair((&self.router, &port), (&ns, NODE_IFACE))?;
        self.router.ip(&["link", "set", &port, "master", FABRIC])?;
        // No unknown-unicast flooding to the nodes: a failed node's MAC is flushed with its
        // port, and its frames, flooded, would be served by the other nodes' XDP (generic mode
        // sees frames for another host before the stack drops them; a NIC filters them out
        // by its MAC first). Broadcasts (ARP) and multicasts (IPv6 ND) still flood.
        self.router
            .exec("bridge", &["link", "set", "dev", &port, "flood", "off"])?;
        let (v4, v6) = (node_v4(index), node_v6(index));
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", NODE_IFACE])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            NODE_IFACE,
            "nodad",
        ])?;
        ns.ip(&["route", "add", "default", "via", &ROUTER_V4.to_string()])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &ROUTER_V6.to_string(),
        ])?;
        for sysctl in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            ns.exec("sysctl", &["-qw", sysctl])?;
        }
        // The other nodes' pod subnets, via those nodes (what a CNI's routes do).
        for other in (1..=nodes).filter(|&other| other != index) {
            let subnet4 = format!("{}/24", pod_v4(other, 0));
            let subnet6 = format!("{}/64", pod_v6(other, 0));
            ns.ip(&["route", "add", &subnet4, "via", &node_v4(other).to_string()])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                &subnet6,
                "via",
                &node_v6(other).to_string(),
            ])?;
        }
        let mut pods = Vec::new();
        for pod in 1..=PODS_PER_NODE {
            let link = PodLink {
                node_end: format!("veth-p{pod}"),
                gateway_v4: pod_v4(index, 254),
                gateway_v6: Ipv6Addr::new(0x2001, 0xdb8, 16 + index as u16, 0, 0, 0, 0, 0xfe),
                v4: pod_v4(index, pod),
                v6: pod_v6(index, pod),
                subnet: None,
                mtu: None,
            };
            pods.push(sandbox::start_pod_on(
                &ns,
                &format!("{tag}-n{index}p{pod}"),
                pod_name(index, pod),
                &link,
                &self.binaries.pod,
            )?);
        }
        self.nodes.push(Node {
            index,
            name: node_name(index),
            ns,
            v4,
            v6,
            pods,
            roots: Roots::new(&format!("{tag}-node{index}")),
            controller: None,
            bird: None,
        });
        Ok(())
    }

    /// Waits until the router has every BGP session (2 per node) established and every BFD
    /// session up.
    pub fn wait_sessions(&self, timeout: Duration) -> anyhow::Result<()> {
        let wanted = 2 * self.nodes.len();
        let start = Instant::now();
        loop {
            let up = self.handle.router_sessions_up();
            if matches!(up, Ok((bgp, bfd)) if bgp == wanted && bfd == wanted) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "after {timeout:?}, (established BGP, up BFD) sessions on the router: {up:?}, \
                     expected {wanted} each; router:\n{}",
                    self.handle
                        .birdc("router", &["show", "protocols"])
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Node `index` (1-based).
    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index - 1]
    }

    /// The manifests folder every node's controller reads.
    pub fn config_dir(&self) -> PathBuf {
        self.handle.config_dir()
    }

    /// Writes the shared manifests: the `tomcat-load-balancer` Service (type LoadBalancer,
    /// ingress [`VIP4`] and [`VIP6`], port 8080 TCP and UDP, `externalTrafficPolicy: policy`),
    /// its EndpointSlices (every pod of every node, ready, with its node's `nodeName`) and
    /// one Node object per node (`node-I.yaml`, not drained).
    pub fn write_manifests(&self, policy: &str) -> anyhow::Result<()> {
        let config = self.config_dir();
        let pods = self.nodes.iter().map(|n| n.pods.len()).sum();
        write_atomically(
            &config.join("tomcat.yaml"),
            &sandbox::service_yaml(
                pods,
                false,
                false,
                policy,
                "  ipFamilyPolicy: PreferDualStack\n",
            ),
        )?;
        self.write_endpoints(|_| EndpointState::Ready)?;
        for node in &self.nodes {
            self.handle.undrain_node(node.index)?;
        }
        Ok(())
    }

    /// Rewrites the EndpointSlices: every pod of every node, in the state `state_of` gives its
    /// node (a node lifecycle controller marks a lost node's pods not ready).
    pub fn write_endpoints(&self, state_of: impl Fn(usize) -> EndpointState) -> anyhow::Result<()> {
        self.write_endpoints_of(|node, _| Some(state_of(node)))
    }

    /// Rewrites the EndpointSlices with the pods `state_of(node, pod)` names, in the state it
    /// gives (`None`: not an endpoint, as a Deployment of fewer replicas).
    pub fn write_endpoints_of(
        &self,
        state_of: impl Fn(usize, u8) -> Option<EndpointState>,
    ) -> anyhow::Result<()> {
        let endpoints: Vec<(&Pod, &str, EndpointState)> = self
            .nodes
            .iter()
            .flat_map(|node| {
                node.pods.iter().enumerate().filter_map(|(i, pod)| {
                    let state = state_of(node.index, i as u8 + 1)?;
                    Some((pod, node.name.as_str(), state))
                })
            })
            .collect();
        write_atomically(
            &self.config_dir().join("tomcat-endpoints.yaml"),
            &sandbox::endpoint_slices_yaml(&endpoints, false),
        )
    }

    /// How many applies each running controller logged, node 1 first.
    pub fn applied(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| n.controller.as_ref().map_or(0, |c| c.count(APPLIED)))
            .collect()
    }

    /// Waits until every running controller of `nodes` logged an apply more than `before`
    /// ([`Cluster::applied`]) counted.
    pub fn wait_applied(
        &self,
        before: &[usize],
        nodes: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        for &index in nodes {
            let node = self.node(index);
            if let Some(controller) = &node.controller {
                controller
                    .wait_for(APPLIED, before[index - 1] + 1, timeout)
                    .with_context(|| format!("{}'s controller", node.name))?;
            }
        }
        Ok(())
    }

    /// Starts `lb-userspace attach eth0 --config <config dir> --node-name node-I --pin-root ..
    /// --state-root .. EXTRA` in every node and waits until each is ready.
    pub fn start_controllers(&mut self, extra_args: &[&str], echo: bool) -> anyhow::Result<()> {
        let config = self.config_dir();
        for node in &mut self.nodes {
            let mut command =
                node.roots
                    .attach_command(&node.ns, &self.binaries.controller, NODE_IFACE, &config);
            command
                .args(["--node-name", &node.name])
                .args(NODE_ARGS)
                .args(extra_args);
            // Kept at once: a controller that never gets ready is still stopped on drop.
            node.controller = Some(LoggedChild::spawn(command, echo)?);
        }
        for node in &self.nodes {
            node.controller
                .as_ref()
                .expect("just started")
                .wait_ready(Duration::from_secs(20))
                .with_context(|| format!("{}'s controller", node.name))?;
        }
        Ok(())
    }

    /// tcpdump (`-l -nn`, capture `filter`) on the router's side of node `index`'s link, in
    /// `direction` (`out`: what the router sends the node; `in`: what the node sends), once it
    /// listens; its lines are the packets.
    pub fn capture_link(
        &self,
        index: usize,
        direction: &str,
        filter: &str,
    ) -> anyhow::Result<LoggedChild> {
        let mut command = self.router.command("tcpdump");
        command.args([
            "-l",
            "-nn",
            "-Q",
            direction,
            "-i",
            &fabric_port(index),
            filter,
        ]);
        let child = LoggedChild::spawn(command, false)?;
        child.wait_for("listening on", 1, Duration::from_secs(5))?;
        Ok(child)
    }

    /// See [`ClusterRef::fail_node`].
    pub fn fail_node(&self, index: usize) -> anyhow::Result<()> {
        self.handle.fail_node(index)
    }

    /// See [`ClusterRef::restore_node`].
    pub fn restore_node(&self, index: usize) -> anyhow::Result<()> {
        self.handle.restore_node(index)
    }

    /// See [`ClusterRef::drain_node`].
    pub fn drain_node(&self, index: usize) -> anyhow::Result<()> {
        self.handle.drain_node(index)
    }

    /// See [`ClusterRef::undrain_node`].
    pub fn undrain_node(&self, index: usize) -> anyhow::Result<()> {
        self.handle.undrain_node(index)
    }

    /// See [`ClusterRef::router_next_hops`].
    pub fn router_next_hops(&self, addr: IpAddr) -> anyhow::Result<Vec<IpAddr>> {
        self.handle.router_next_hops(addr)
    }

    /// See [`ClusterRef::wait_next_hops`].
    pub fn wait_next_hops(
        &self,
        addr: IpAddr,
        expected: &[IpAddr],
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        self.handle.wait_next_hops(addr, expected, timeout)
    }

    /// The fabric address of node `index` in `addr`'s family: its next hop at the router.
    pub fn next_hop_of(&self, index: usize, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => IpAddr::V4(node_v4(index)),
            IpAddr::V6(_) => IpAddr::V6(node_v6(index)),
        }
    }

    /// A TCP connection from the client's `from` (an address of [`client_v4s`] or
    /// [`client_v6s`]; port 0 for any) to `to`; reads time out after 5 s.
    pub fn connect_from(
        &self,
        from: SocketAddr,
        to: SocketAddr,
    ) -> anyhow::Result<std::net::TcpStream> {
        sandbox::connect_from(&self.client, from, to)
    }

    /// A keep-alive HTTP connection from the client's `from` to `vip`:8080, held open.
    pub fn hold_connection(&self, from: SocketAddr, vip: IpAddr) -> anyhow::Result<HeldConnection> {
        HeldConnection::from_stream(self.connect_from(from, SocketAddr::new(vip, PORT))?)
    }

    /// One HTTP GET on a new connection from the client's `from` to `vip`:8080; returns the
    /// pod that answered.
    pub fn http_get_from(&self, from: SocketAddr, vip: IpAddr) -> anyhow::Result<String> {
        self.hold_connection(from, vip)?.get()
    }

    /// A UDP datagram from the client's `from` to `vip`:8080 and its echo.
    pub fn udp_echo_from(
        &self,
        from: SocketAddr,
        vip: IpAddr,
        payload: &[u8],
    ) -> anyhow::Result<Vec<u8>> {
        let payload = payload.to_vec();
        self.client.enter(move || -> anyhow::Result<Vec<u8>> {
            let socket = UdpSocket::bind(from)?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.send_to(&payload, SocketAddr::new(vip, PORT))?;
            let mut buf = vec![0u8; 65536];
            let (n, _) = socket.recv_from(&mut buf)?;
            Ok(buf[..n].to_vec())
        })?
    }

    /// A summary for people: namespaces, addresses, VIPs, state folder.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "router  {}  fabric 198.18.1.1 2001:db8:1::1, to the client 198.18.2.1 2001:db8:2::1, AS {ROUTER_AS}\n\
             client  {}  198.18.2.2-9 2001:db8:2::2-9\n",
            self.router.name(),
            self.client.name()
        );
        for node in &self.nodes {
            let _ = writeln!(
                text,
                "{}  {}  {} {} AS {}, pods {}",
                node.name,
                node.ns.name(),
                node.v4,
                node.v6,
                node_as(node.index),
                node.pods
                    .iter()
                    .map(|p| format!("{} {} ({})", p.v4, p.v6, p.ns.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let _ = write!(
            text,
            "VIPs    {VIP4} {VIP6} port {PORT} TCP+UDP\nstate   {} (manifests in config/, BIRD \
             configurations, logs and sockets)",
            self.handle.state_dir().display()
        );
        text
    }

    /// Leaves everything running for another process (the xtask sandbox): nothing is stopped
    /// or removed; [`crate::netns::sweep_stale`] removes it once this process is gone.
    pub fn leak(self) -> ClusterRef {
        let handle = self.handle.clone();
        std::mem::forget(self);
        handle
    }
}

/// Starts BIRD in `ns` with configuration `conf` (written to `bird-PART.conf` in the state
/// folder), its control socket `bird-PART.ctl`, its log `bird-PART.log`; returns once it
/// answers on the socket.
fn start_bird(
    ns: &Netns,
    handle: &ClusterRef,
    part: &str,
    conf: &str,
) -> anyhow::Result<ChildGuard> {
    let state = handle.state_dir();
    let conf_path = state.join(format!("bird-{part}.conf"));
    std::fs::write(&conf_path, conf)?;
    let socket = handle.bird_socket(part);
    let log = state.join(format!("bird-{part}.log"));
    // Early errors (a configuration that does not parse) go to stderr, before the log is open.
    let out = File::options().create(true).append(true).open(&log)?;
    let mut command: Command = ns.command("bird");
    command
        .arg("-f")
        .arg("-c")
        .arg(&conf_path)
        .arg("-s")
        .arg(&socket)
        .arg("-P")
        .arg(state.join(format!("bird-{part}.pid")))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let mut bird = ChildGuard::new(command.spawn().context("starting bird")?);
    let start = Instant::now();
    while handle.birdc(part, &["show", "status"]).is_err() {
        if let Some(status) = bird.child_mut().try_wait()? {
            bail!(
                "bird in {} exited ({status}): {}",
                ns.name(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!(
                "bird in {} does not answer on {}",
                ns.name(),
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(bird)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Controllers first (each detaches and unpins), then BIRD and the pods, then the
        // namespaces (the fields), then the state folder.
        for node in &mut self.nodes {
            if let Some(controller) = node.controller.take() {
                let _ = controller.child.stop(Duration::from_secs(5));
            }
        }
        for node in &mut self.nodes {
            node.bird.take();
            node.pods.clear();
        }
        self.router_bird.take();
        let _ = std::fs::remove_dir_all(self.handle.state_dir());
    }
}
