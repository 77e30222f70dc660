//! The veth sandbox that mirrors a Kubernetes node: a `client` namespace, a `node` namespace
//! (the load balancer host, routing between client and pods, running `lb-userspace attach` on
//! its client-facing veth) and one namespace per pod, each running `lb-pod` (HTTP on 8080
//! answering its name, UDP echo). The demo, the end-to-end tests and `cargo xtask sandbox` all
//! use it.
//!
//! ```text
//! client 198.18.0.1, 2001:db8::1 ── veth-client ══ veth-node ── node 198.18.0.2, 2001:db8::2
//! node 198.18.N.254, 2001:db8:N::fe ── veth-pN ══ eth0 ── pod-N 198.18.N.1, 2001:db8:N::1
//! VIPs: cluster IP 198.18.100.1 / 2001:db8:100::1, load balancer IP 198.18.200.1 / 2001:db8:200::1
//! ```

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    ChildGuard, Roots,
    netns::{Netns, veth_pair},
};

/// The service's load balancer IPv4 address (what clients use).
pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
/// The service's load balancer IPv6 address.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1);
/// The service's cluster IP.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// The service port, and every pod's port.
pub const PORT: u16 = 8080;
/// The pods' server-push port (see `lb-pod`), served as the `push` port with
/// [`Sandbox::push_port`].
pub const PUSH_PORT: u16 = 9090;
/// Namespace and name of the tutorial's service.
pub const SERVICE: &str = "tomcat-load-balancer";
/// The line `lb-userspace attach` logs once it is fully up (`READY_LINE` in its `main.rs`):
/// stop handlers installed, metrics served, first apply done. "applied" comes before the
/// metrics listener is served, so waiting for it races start-up.
pub const READY: &str = "controller ready";
/// Name of the client-facing interface in the node namespace.
pub const NODE_IFACE: &str = "veth-node";
/// The node's name (`--node-name`), and the `nodeName` of its pods' endpoints unless
/// [`Sandbox::pod_nodes`] says otherwise.
pub const NODE_NAME: &str = "sandbox-node";
/// Where [`Sandbox::start_api`]'s stand-in API server listens, in the node's namespace.
pub const API_ADDR: &str = "127.0.0.1:6443";
/// The node's client-facing IPv4 address.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// The binaries the sandbox runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `lb-userspace`.
    pub controller: PathBuf,
    /// `lb-pod`.
    pub pod: PathBuf,
}

impl Binaries {
    /// The binaries of this build, beside [`crate::lb_userspace_bin`]: what the tests run.
    pub fn of_this_build() -> Self {
        Self::in_dir(
            crate::lb_userspace_bin()
                .parent()
                .expect("the binary's folder"),
        )
    }

    /// The binaries beside `lb-userspace` in a target profile folder.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            controller: dir.join("lb-userspace"),
            pod: dir.join("lb-pod"),
        }
    }
}

/// A child whose stdout and stderr lines are collected.
pub struct LoggedChild {
    /// The process.
    pub child: ChildGuard,
    /// Its output lines so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl LoggedChild {
    /// Spawns `command` and collects its output; `echo` also prints each line.
    pub fn spawn(mut command: std::process::Command, echo: bool) -> anyhow::Result<Self> {
        let mut child = ChildGuard::new(
            command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting a sandbox process")?,
        );
        let log = Arc::new(Mutex::new(Vec::new()));
        let pipes: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.child_mut().stdout.take().expect("piped")),
            Box::new(child.child_mut().stderr.take().expect("piped")),
        ];
        for pipe in pipes {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if echo {
                        println!("    | {line}");
                    }
                    log.lock().expect("log lock").push(line);
                }
            });
        }
        Ok(Self { child, log })
    }

    /// Everything logged so far, one line per line.
    pub fn text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until a controller logged its [`READY`] line (start-up over).
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for(READY, 1, timeout)
    }

    /// Waits until `needle` was logged `times` times.
    pub fn wait_for(&self, needle: &str, times: usize, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while self.count(needle) < times {
            if start.elapsed() > timeout {
                bail!("no {needle:?} (x{times}) in the log:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

/// A pod of the Deployment.
pub struct Pod {
    /// Its namespace.
    pub ns: Netns,
    /// `tomcat-deployment-N`.
    pub name: String,
    /// Its IPv4 address.
    pub v4: Ipv4Addr,
    /// Its IPv6 address.
    pub v6: Ipv6Addr,
    server: ChildGuard,
}

/// How an endpoint appears in the EndpointSlices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// Ready: takes new connections.
    Ready,
    /// Terminating: keeps its connections, takes no new ones.
    Terminating,
    /// Not ready (a failing readiness probe), not terminating: keeps its connections, takes no
    /// new ones.
    NotReady,
}

/// How a pod's veth pair is addressed.
#[derive(Debug, Clone)]
pub struct PodLink {
    /// The node's end of the pair (the pod's end is its `eth0`).
    pub node_end: String,
    /// The node's IPv4 address on its end: the pod's default gateway.
    pub gateway_v4: Ipv4Addr,
    /// The node's IPv6 address on its end: the pod's default gateway.
    pub gateway_v6: Ipv6Addr,
    /// The pod's IPv4 address.
    pub v4: Ipv4Addr,
    /// The pod's IPv6 address.
    pub v6: Ipv6Addr,
    /// `Some((v4 length, v6 length))`: both ends in one subnet of those lengths, a subnet per
    /// pod (the single-node sandbox). `None`: point-to-point addresses (`ip addr add GATEWAY
    /// peer POD`), so that the pods of a node share its gateway address and one subnet per
    /// node (as routed CNIs do; the cluster's nodes).
    pub subnet: Option<(u8, u8)>,
    /// The MTU of both ends, if not the default 1500.
    pub mtu: Option<u16>,
}

/// Starts a pod behind `node`: namespace `lbt-<ns_tag>-<pid>`, its veth pair to the node
/// addressed as `link` says, its default routes via the node, and `lb-pod NAME` serving
/// [`PORT`] and [`PUSH_PORT`]; returns once it answers on [`PORT`].
pub fn start_pod_on(
    node: &Netns,
    ns_tag: &str,
    name: String,
    link: &PodLink,
    pod_binary: &Path,
) -> anyhow::Result<Pod> {
    let ns = Netns::create(ns_tag)?;
    let node_end = link.node_end.as_str();
    veth_pair((node, node_end), (&ns, "eth0"))?;
    if let Some(mtu) = link.mtu {
        let mtu = mtu.to_string();
        node.ip(&["link", "set", node_end, "mtu", &mtu])?;
        ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
    }
    let ends = [
        (
            node,
            node_end,
            link.gateway_v4.to_string(),
            link.v4.to_string(),
        ),
        (
            &ns,
            "eth0",
            link.v4.to_string(),
            link.gateway_v4.to_string(),
        ),
        (
            node,
            node_end,
            link.gateway_v6.to_string(),
            link.v6.to_string(),
        ),
        (
            &ns,
            "eth0",
            link.v6.to_string(),
            link.gateway_v6.to_string(),
        ),
    ];
    for (at, (netns, dev, local, peer)) in ends.iter().enumerate() {
        let v6 = at >= 2;
        let mut args = vec!["addr".to_owned(), "add".to_owned()];
        match link.subnet {
            Some((len4, len6)) => args.push(format!("{local}/{}", if v6 { len6 } else { len4 })),
            None => args.extend([local.clone(), "peer".to_owned(), peer.clone()]),
        }
        args.extend(["dev".to_owned(), (*dev).to_owned()]);
        if v6 {
            args.push("nodad".to_owned());
        }
        netns.ip(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    // A point-to-point IPv6 address's route to its peer is only added once the kernel saw
    // the link's carrier (linkwatch, up to a second late when links churn): the gateway is
    // said to be on the link rather than found by that route.
    let onlink: &[&str] = if link.subnet.is_none() {
        &["dev", "eth0", "onlink"]
    } else {
        &[]
    };
    let gateway_v4 = link.gateway_v4.to_string();
    let gateway_v6 = link.gateway_v6.to_string();
    ns.ip(&[&["route", "add", "default", "via", &gateway_v4], onlink].concat())?;
    ns.ip(&[
        &["-6", "route", "add", "default", "via", &gateway_v6],
        onlink,
    ]
    .concat())?;
    let server = ns
        .command(pod_binary)
        .args([&name, &PORT.to_string(), &PUSH_PORT.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .context("starting lb-pod")?;
    let pod = Pod {
        ns,
        name,
        v4: link.v4,
        v6: link.v6,
        server: ChildGuard::new(server),
    };
    // Wait until it answers on both families (the node's IPv6 route to a point-to-point
    // peer comes with the carrier), so endpoints are only published for a serving pod.
    let start = Instant::now();
    for target in [IpAddr::V4(pod.v4), IpAddr::V6(pod.v6)] {
        let target = SocketAddr::new(target, PORT);
        while node
            .enter(move || {
                std::net::TcpStream::connect_timeout(&target, Duration::from_millis(100))
            })?
            .is_err()
        {
            if start.elapsed() > Duration::from_secs(5) {
                bail!("{} did not start: {target} does not answer", pod.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(pod)
}

/// The sandbox. Dropping it stops every process and removes every namespace and pin.
pub struct Sandbox {
    /// The client's namespace.
    pub client: Netns,
    /// The load balancer host's namespace.
    pub node: Netns,
    /// Pods by index (1-based).
    pub pods: BTreeMap<u8, Pod>,
    /// The manifests folder the controller watches.
    pub config: tempfile::TempDir,
    /// Pin and state roots of this sandbox's controller.
    pub roots: Roots,
    /// The controller, once started.
    pub controller: Option<LoggedChild>,
    /// The service also has the pods' server-push port ([`PUSH_PORT`], TCP).
    pub push_port: bool,
    /// More arguments for `lb-userspace attach`.
    pub controller_args: Vec<String>,
    /// The service's `externalTrafficPolicy`.
    pub external_traffic_policy: &'static str,
    /// More lines of the service's spec (indented two spaces, each ending in a newline).
    pub spec_extra: String,
    /// Pods whose endpoints name another node than [`NODE_NAME`].
    pub pod_nodes: BTreeMap<u8, String>,
    /// The MTU of the pods' links (both ends), if not the default 1500: an overlay network's
    /// pods behind the node's 1500.
    pub pod_mtu: Option<u16>,
    /// Where the controller reads the desired state: `None` for the manifests folder
    /// ([`Sandbox::config`]); else the arguments that replace `--config DIR` (say
    /// `--kubeconfig PATH`).
    pub source_args: Option<Vec<String>>,
    /// What tests gave it to keep until the end (see [`Sandbox::hold`]).
    held: Vec<Box<dyn std::any::Any + Send + Sync>>,
    binaries: Binaries,
    tag: String,
}

impl Sandbox {
    /// Builds client and node; no pod yet.
    pub fn up(tag: &str, binaries: Binaries) -> anyhow::Result<Self> {
        for binary in [&binaries.controller, &binaries.pod] {
            if !binary.exists() {
                bail!("{} is missing: build the workspace first", binary.display());
            }
        }
        let client = Netns::create(&format!("{tag}-client"))?;
        let node = Netns::create(&format!("{tag}-node"))?;
        veth_pair((&client, "veth-client"), (&node, NODE_IFACE))?;
        client.ip(&["addr", "add", "198.18.0.1/24", "dev", "veth-client"])?;
        client.ip(&[
            "addr",
            "add",
            "2001:db8::1/64",
            "dev",
            "veth-client",
            "nodad",
        ])?;
        node.ip(&["addr", "add", "198.18.0.2/24", "dev", NODE_IFACE])?;
        node.ip(&["addr", "add", "2001:db8::2/64", "dev", NODE_IFACE, "nodad"])?;
        for prefix in ["198.18.100.0/24", "198.18.200.0/24"] {
            client.ip(&["route", "add", prefix, "via", "198.18.0.2"])?;
        }
        for prefix in ["2001:db8:100::/48", "2001:db8:200::/48"] {
            client.ip(&["-6", "route", "add", prefix, "via", "2001:db8::2"])?;
        }
        // A NIC hands XDP frames with complete checksums; a veth would hand it the sender's
        // offloaded partial ones. Make the client's link behave like a wire.
        client.exec("ethtool", &["-K", "veth-client", "tx", "off"])?;
        for sysctl in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            node.exec("sysctl", &["-qw", sysctl])?;
        }
        Ok(Self {
            client,
            node,
            pods: BTreeMap::new(),
            config: tempfile::tempdir()?,
            roots: Roots::new(&format!("{tag}-roots")),
            controller: None,
            push_port: false,
            controller_args: Vec::new(),
            external_traffic_policy: "Cluster",
            spec_extra: String::new(),
            pod_nodes: BTreeMap::new(),
            pod_mtu: None,
            source_args: None,
            held: Vec::new(),
            binaries,
            tag: tag.to_owned(),
        })
    }

    /// Keeps `thing` until the sandbox is taken down, and drops it before the namespaces: a
    /// data plane a test loaded to hold an XDP program on one of the sandbox's links, say.
    pub fn hold(&mut self, thing: Box<dyn std::any::Any + Send + Sync>) {
        self.held.push(thing);
    }

    /// Starts pod `index`: its namespace, its link to the node and its server.
    pub fn start_pod(&mut self, index: u8) -> anyhow::Result<()> {
        let link = PodLink {
            node_end: format!("veth-p{index}"),
            gateway_v4: Ipv4Addr::new(198, 18, index, 254),
            gateway_v6: Ipv6Addr::new(0x2001, 0xdb8, u16::from(index), 0, 0, 0, 0, 0xfe),
            v4: Ipv4Addr::new(198, 18, index, 1),
            v6: Ipv6Addr::new(0x2001, 0xdb8, u16::from(index), 0, 0, 0, 0, 1),
            subnet: Some((24, 64)),
            mtu: self.pod_mtu,
        };
        let pod = start_pod_on(
            &self.node,
            &format!("{}-pod{index}", self.tag),
            format!("tomcat-deployment-{index}"),
            &link,
            &self.binaries.pod,
        )?;
        self.pods.insert(index, pod);
        Ok(())
    }

    /// Stops pod `index` and removes its namespace and its veth pair.
    pub fn stop_pod(&mut self, index: u8) -> anyhow::Result<()> {
        if let Some(pod) = self.pods.remove(&index) {
            pod.server.stop(Duration::from_secs(2))?;
            // The pair goes now: a removed namespace's interfaces are destroyed later, by the
            // kernel's cleanup work, and a pod started again at once would find its name taken.
            self.node.ip(&["link", "del", &format!("veth-p{index}")])?;
            drop(pod.ns);
        }
        Ok(())
    }

    /// Writes the Deployment (skipped by the controller, as in a real manifest folder) and the
    /// `tomcat-load-balancer` Service, optionally with ClientIP affinity.
    pub fn write_service(&self, replicas: usize, affinity: bool) -> anyhow::Result<()> {
        write_atomically(
            &self.config.path().join("tomcat.yaml"),
            &self.service_yaml(replicas, affinity),
        )
    }

    /// The Deployment and the Service [`Sandbox::write_service`] writes, as YAML documents.
    pub fn service_yaml(&self, replicas: usize, affinity: bool) -> String {
        service_yaml(
            replicas,
            affinity,
            self.push_port,
            self.external_traffic_policy,
            &self.spec_extra,
        )
    }

    /// Writes the service's EndpointSlices (IPv4 and IPv6) for the given pods.
    pub fn write_endpoints(&self, endpoints: &[(u8, EndpointState)]) -> anyhow::Result<()> {
        write_atomically(
            &self.config.path().join("tomcat-endpoints.yaml"),
            &self.endpoints_yaml(endpoints)?,
        )
    }

    /// The EndpointSlices [`Sandbox::write_endpoints`] writes, as YAML documents.
    pub fn endpoints_yaml(&self, endpoints: &[(u8, EndpointState)]) -> anyhow::Result<String> {
        let mut listed = Vec::new();
        for (index, state) in endpoints {
            let Some(pod) = self.pods.get(index) else {
                bail!("pod {index} is not running");
            };
            let node = self.pod_nodes.get(index).map_or(NODE_NAME, String::as_str);
            listed.push((pod, node, *state));
        }
        Ok(endpoint_slices_yaml(&listed, self.push_port))
    }

    /// Starts the stand-in API server ([`crate::apiserver`]) in the node's namespace at
    /// [`API_ADDR`], holding this node's Node object, and points the controller at it
    /// (`--kubeconfig`, with the lease timing `lease_args`); the kubeconfig is written in the
    /// manifests folder. The stand-in is the caller's: dropping it stops it.
    pub fn start_api(&mut self, lease_args: &[&str]) -> anyhow::Result<crate::apiserver::StandIn> {
        let api = crate::apiserver::StandIn::start(crate::netns::tcp_binder(
            self.node.name(),
            API_ADDR.parse()?,
        ))?;
        let kubeconfig = self.config.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        api.apply_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE_NAME},
            "status": {"addresses": [
                {"type": "InternalIP", "address": NODE_IP.to_string()},
                {"type": "Hostname", "address": NODE_NAME}
            ]}
        }));
        let mut args = vec!["--kubeconfig".to_owned(), kubeconfig.display().to_string()];
        args.extend(lease_args.iter().map(|a| (*a).to_owned()));
        self.source_args = Some(args);
        Ok(api)
    }

    /// Starts (or restarts) the controller on the node and waits until it is ready (first
    /// apply done, metrics served, stop handlers installed).
    pub fn start_controller(&mut self, echo: bool) -> anyhow::Result<()> {
        self.spawn_controller(echo)?;
        self.controller
            .as_ref()
            .expect("just set")
            .wait_ready(Duration::from_secs(10))
    }

    /// Starts (or restarts) the controller on the node without waiting for it: a test that
    /// watches what happens before it is ready (its source unreachable, say) waits itself.
    pub fn spawn_controller(&mut self, echo: bool) -> anyhow::Result<()> {
        let mut command = match &self.source_args {
            None => self.roots.attach_command(
                &self.node,
                &self.binaries.controller,
                NODE_IFACE,
                self.config.path(),
            ),
            Some(source) => {
                let mut command = self.node.command(&self.binaries.controller);
                command.args(["attach", NODE_IFACE, "--stats-interval", "0"]);
                command.args(source);
                command.args([
                    "--pin-root",
                    &self.roots.pin_root,
                    "--state-root",
                    &self.roots.state_root,
                ]);
                command
            }
        };
        command.args(["--node-name", NODE_NAME]);
        command.args(&self.controller_args);
        // Kept at once: a controller that never gets ready is still stopped on drop.
        self.controller = Some(LoggedChild::spawn(command, echo)?);
        Ok(())
    }

    /// Waits until the controller applied `count` configurations since it started.
    pub fn wait_applied(&self, count: usize) -> anyhow::Result<()> {
        self.controller.as_ref().context("no controller")?.wait_for(
            "applied",
            count,
            Duration::from_secs(10),
        )
    }

    /// Runs `lb-userspace ARGS` against this sandbox's roots, from the host.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        self.roots.cli(&self.binaries.controller, args)
    }

    /// The metrics the node's controller serves.
    pub fn scrape_metrics(&self) -> anyhow::Result<String> {
        crate::scrape_metrics(&self.node)
    }

    /// One HTTP GET on a new connection from the client; returns the pod that answered.
    pub fn http_get(&self, vip: IpAddr) -> anyhow::Result<String> {
        let url = match vip {
            IpAddr::V4(v4) => format!("http://{v4}:{PORT}/"),
            IpAddr::V6(v6) => format!("http://[{v6}]:{PORT}/"),
        };
        self.client.enter(move || -> anyhow::Result<String> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .max_idle_connections(0)
                .build()
                .into();
            let body = agent.get(&url).call()?.body_mut().read_to_string()?;
            Ok(body.trim().to_owned())
        })?
    }

    /// `count` HTTP requests, each on a new connection; the answering pods.
    pub fn http_batch(&self, vip: IpAddr, count: usize) -> anyhow::Result<Vec<String>> {
        (0..count).map(|_| self.http_get(vip)).collect()
    }

    /// Makes every pod write `NAME TOKEN` on the connections it holds on [`PUSH_PORT`];
    /// returns how many connections the pods wrote to.
    pub fn push(&self, token: &str) -> anyhow::Result<usize> {
        let pods: Vec<Ipv4Addr> = self.pods.values().map(|p| p.v4).collect();
        let token = token.to_owned();
        self.node.enter(move || -> anyhow::Result<usize> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut total = 0;
            for pod in pods {
                socket.send_to(token.as_bytes(), (pod, PUSH_PORT))?;
                let mut buf = [0u8; 64];
                let (n, _) = socket.recv_from(&mut buf)?;
                let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                total += answer
                    .strip_prefix("pushed ")
                    .and_then(|n| n.parse::<usize>().ok())
                    .with_context(|| format!("{pod} answered {answer:?}"))?;
            }
            Ok(total)
        })?
    }

    /// A TCP connection from the client to `to` (5 s to connect, reads time out after 5 s).
    pub fn connect(&self, to: SocketAddr) -> anyhow::Result<std::net::TcpStream> {
        self.client.enter(move || {
            let stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            anyhow::Ok(stream)
        })?
    }

    /// A UDP datagram to the VIP and its echo, from the client.
    pub fn udp_echo(&self, vip: IpAddr, payload: &[u8]) -> anyhow::Result<(Vec<u8>, SocketAddr)> {
        let payload = payload.to_vec();
        self.client
            .enter(move || -> anyhow::Result<(Vec<u8>, SocketAddr)> {
                let bind = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                let socket = UdpSocket::bind(bind)?;
                socket.set_read_timeout(Some(Duration::from_secs(3)))?;
                socket.send_to(&payload, SocketAddr::new(vip, PORT))?;
                let mut buf = vec![0u8; 65536];
                let (n, from) = socket.recv_from(&mut buf)?;
                Ok((buf[..n].to_vec(), from))
            })?
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // The controller first (it detaches and unpins), then the pods, then the namespaces.
        // Its own detach must have removed everything before the roots' drop removes the
        // folders (which would hide a leak): checked unless the test is failing already.
        if let Some(controller) = self.controller.take() {
            let log = controller.log.clone();
            let stopped = controller.child.stop(Duration::from_secs(5));
            if !std::thread::panicking() {
                let left = self.roots.leftovers(&self.node, NODE_IFACE);
                self.pods.clear();
                assert!(
                    matches!(&stopped, Ok(status) if status.success()),
                    "the controller's stop: {stopped:?}; its last lines:\n{}",
                    log.lock()
                        .expect("log lock")
                        .iter()
                        .rev()
                        .take(15)
                        .rev()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                let left = left.expect("listing the controller's leftovers");
                assert!(left.is_empty(), "the controller's detach left: {left:#?}");
            }
        }
        self.pods.clear();
        self.held.clear();
    }
}

/// The Deployment (skipped by the controller, as in a real manifest folder) and the
/// `tomcat-load-balancer` Service of type LoadBalancer (ingress [`VIP4`] and [`VIP6`], port
/// [`PORT`] TCP `http` and UDP `echo`, the `push` port too if `push_port`), optionally with
/// ClientIP affinity, with `externalTrafficPolicy: policy` and `extra` lines in its spec
/// (indented two spaces, each ending in a newline).
pub fn service_yaml(
    replicas: usize,
    affinity: bool,
    push_port: bool,
    policy: &str,
    extra: &str,
) -> String {
    let affinity = if affinity {
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 10800\n"
    } else {
        "  sessionAffinity: None\n"
    };
    let push = if push_port {
        format!(
            "  - name: push\n    port: {PUSH_PORT}\n    targetPort: {PUSH_PORT}\n    protocol: TCP\n"
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: tomcat-deployment
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: tomcat
  template:
    metadata:
      labels:
        app: tomcat
    spec:
      containers:
      - name: tomcat
        image: tomcat:9
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: {SERVICE}
  namespace: default
spec:
  type: LoadBalancer
  selector:
    app: tomcat
  clusterIP: {CLUSTER_IP}
  clusterIPs: [{CLUSTER_IP}]
  externalTrafficPolicy: {policy}
{extra}{affinity}  ports:
  - name: http
    port: {PORT}
    targetPort: {PORT}
    protocol: TCP
    nodePort: 30854
  - name: echo
    port: {PORT}
    targetPort: {PORT}
    protocol: UDP
{push}status:
  loadBalancer:
    ingress:
    - ip: {VIP4}
    - ip: {VIP6}
"
    )
}

/// The Service's EndpointSlices (one IPv4, one IPv6) listing `endpoints`: each pod with the
/// `nodeName` of its node and its state; with the `push` port if `push_port`.
pub fn endpoint_slices_yaml(endpoints: &[(&Pod, &str, EndpointState)], push_port: bool) -> String {
    let mut yaml = String::new();
    let push = if push_port {
        format!("- name: push\n  port: {PUSH_PORT}\n  protocol: TCP\n")
    } else {
        String::new()
    };
    for (family, address_type) in [("v4", "IPv4"), ("v6", "IPv6")] {
        yaml += &format!(
            "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {SERVICE}-{family}
  namespace: default
  labels:
    kubernetes.io/service-name: {SERVICE}
addressType: {address_type}
ports:
- name: http
  port: {PORT}
  protocol: TCP
- name: echo
  port: {PORT}
  protocol: UDP
{push}endpoints:
"
        );
        for (pod, node, state) in endpoints {
            let address = if family == "v4" {
                pod.v4.to_string()
            } else {
                pod.v6.to_string()
            };
            let conditions = match state {
                EndpointState::Ready => "{ready: true, serving: true, terminating: false}",
                EndpointState::Terminating => "{ready: false, serving: true, terminating: true}",
                EndpointState::NotReady => "{ready: false, serving: false, terminating: false}",
            };
            yaml += &format!(
                "- addresses: [\"{address}\"]\n  conditions: {conditions}\n  nodeName: {node}\n  targetRef:\n    kind: Pod\n    name: {}\n    namespace: default\n",
                pod.name
            );
        }
    }
    yaml
}

/// A TCP connection from `from` (an address of the namespace's, port 0 for any) to `to`,
/// made in `ns`: 5 s to connect, reads time out after 5 s.
pub fn connect_from(
    ns: &Netns,
    from: SocketAddr,
    to: SocketAddr,
) -> anyhow::Result<std::net::TcpStream> {
    connect_within(ns, from, to, Duration::from_secs(5))
}

/// As [`connect_from`], giving up connecting after `timeout` (under a second: no SYN is
/// sent twice).
pub fn connect_within(
    ns: &Netns,
    from: SocketAddr,
    to: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<std::net::TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket,
    };
    use std::os::fd::AsRawFd as _;
    ns.enter(move || -> anyhow::Result<std::net::TcpStream> {
        let family = if from.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Stream, SockFlag::empty(), None)?;
        bind(fd.as_raw_fd(), &SockaddrStorage::from(from))?;
        let stream = std::net::TcpStream::from(fd);
        stream.set_write_timeout(Some(timeout))?;
        connect(stream.as_raw_fd(), &SockaddrStorage::from(to))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(stream)
    })?
}

/// Writes a file the way kubectl and editors do: a new file renamed over the old one.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A long-lived HTTP/1.1 keep-alive connection from the client.
pub struct HeldConnection {
    stream: std::net::TcpStream,
    reader: BufReader<std::net::TcpStream>,
}

impl HeldConnection {
    /// Opens a connection to `vip` from the client namespace.
    pub fn open(sandbox: &Sandbox, vip: IpAddr) -> anyhow::Result<Self> {
        let stream = sandbox.connect(SocketAddr::new(vip, PORT))?;
        Self::from_stream(stream)
    }

    /// A connection opened otherwise (from a chosen port, say).
    pub fn from_stream(stream: std::net::TcpStream) -> anyhow::Result<Self> {
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    /// Sends a GET on the connection; returns the answering pod.
    pub fn get(&mut self) -> anyhow::Result<String> {
        use std::io::{Read as _, Write as _};
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: tomcat\r\nConnection: keep-alive\r\n\r\n")?;
        let mut length = 0;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("the connection was closed");
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(value) = line
                .to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(str::trim)
                .map(str::to_owned)
            {
                length = value.parse()?;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).trim().to_owned())
    }
}

/// A long-lived connection to the pods' server-push port ([`PUSH_PORT`]) from the client: the
/// pod speaks first, so only its replies cross the load balancer once it is open. A flow
/// whose reverse (reply) entry was lost is caught here even when Maglev would place the
/// client's packets on the same pod again.
pub struct PushConnection {
    reader: BufReader<std::net::TcpStream>,
}

impl PushConnection {
    /// Opens a connection to `vip`:[`PUSH_PORT`] from the client namespace.
    pub fn open(sandbox: &Sandbox, vip: IpAddr) -> anyhow::Result<Self> {
        let stream = sandbox.connect(SocketAddr::new(vip, PUSH_PORT))?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// Reads lines until one ends with `token` (lines of earlier pushes still on the way are
    /// skipped); returns the pod that wrote it. Fails on a closed, reset or silent connection.
    pub fn hear(&mut self, token: &str) -> anyhow::Result<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("the connection was closed");
            }
            if let Some(pod) = line.trim_end().strip_suffix(token) {
                return Ok(pod.trim_end().to_owned());
            }
        }
    }
}

impl Sandbox {
    /// Pushes `token` until the pods hold at least `connections` push connections (a pod
    /// accepts them asynchronously, so the first pushes may miss the newest ones); fails
    /// after a few seconds.
    pub fn push_to_at_least(&self, token: &str, connections: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pushed = self.push(token)?;
            if pushed >= connections {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the pods hold {pushed} push connections, expected {connections}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
