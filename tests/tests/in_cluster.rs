//! The controller in a cluster, against the stand-in API server of the tests crate (no real
//! API server can be installed here: the stand-in speaks its wire protocol, list and watch,
//! status patches, Leases and Events, and is what these tests mean by "the API"). Every
//! scenario sends real traffic from the sandbox's client through the data plane.
//!
//! - The seed's story through the API: a LoadBalancer Service created without an address is
//!   `<pending>`, gets one from a pool (written to its status), and its EndpointSlices for
//!   1, then 4, then 2 pods are followed while a held connection keeps its pod.
//! - An API outage of seconds: the data plane keeps serving, nothing is applied meanwhile,
//!   and the change made during the outage is applied once, after it.
//! - A `410 Gone`: the watch relists and the change is applied once.
//! - Two controllers share the Lease: only the leader writes status; when it dies, the other
//!   takes over within the lease duration and assigns the next Service.
//! - A requested address outside every pool, and pool exhaustion: Warning events, no address,
//!   and a freed address goes to the Service that waited.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_tests::{
    Roots,
    apiserver::StandIn,
    sandbox::{
        Binaries, EndpointState::Ready, HeldConnection, LoggedChild, NODE_NAME, PORT, SERVICE,
        Sandbox, VIP4, VIP6,
    },
};
use serde_json::{Value, json};

/// The lease timing of every controller here: failover is measured in seconds, not in the
/// production default's fifteen.
const LEASE_ARGS: [&str; 6] = [
    "--lease-duration",
    "2s",
    "--lease-renew-deadline",
    "1500ms",
    "--lease-retry-period",
    "250ms",
];

/// What the controller's line for an apply says (and no other line).
const APPLIED: &str = " applied generation=";

fn binaries() -> Binaries {
    Binaries::in_dir(lb_tests::lb_userspace_bin().parent().unwrap())
}

/// Polls `done` every 20 ms until it is true; fails with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A sandbox whose node's controller follows the stand-in API server.
struct Cluster {
    sandbox: Sandbox,
    api: StandIn,
    kubeconfig: PathBuf,
}

impl Cluster {
    /// The sandbox with `pods` pods, the stand-in serving in the node's namespace with this
    /// node's Node object, and the Service dual-stack; the controller not started.
    fn up(tag: &str, pods: u8) -> Self {
        let mut sandbox = Sandbox::up(tag, binaries()).unwrap();
        for index in 1..=pods {
            sandbox.start_pod(index).unwrap();
        }
        let api = sandbox.start_api(&LEASE_ARGS).unwrap();
        sandbox.spec_extra =
            "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n".into();
        let kubeconfig = sandbox.config.path().join("kubeconfig");
        Self {
            sandbox,
            api,
            kubeconfig,
        }
    }

    /// The sandbox's pool: 198.18.200.0/24 and 2001:db8:200::/64, whose first addresses are
    /// the sandbox's VIPs (the client routes both prefixes to the node).
    fn create_pool(&self) {
        self.api.apply_value(pool(
            "default",
            &[
                json!({"cidr": "198.18.200.0/24"}),
                json!({"cidr": "2001:db8:200::/64"}),
            ],
        ));
    }

    /// Creates or updates the sandbox's Service, as `kubectl apply` would.
    fn apply_service(&self) {
        self.api.apply_yaml(&self.sandbox.service_yaml(2, false));
    }

    /// Writes the EndpointSlices for `pods`, as the endpoint-slice controller would.
    fn set_endpoints(&self, pods: &[u8]) {
        let endpoints: Vec<_> = pods.iter().map(|&p| (p, Ready)).collect();
        self.api
            .apply_yaml(&self.sandbox.endpoints_yaml(&endpoints).unwrap());
    }

    /// The Service's `status.loadBalancer.ingress` addresses, as the API has them.
    fn ingress(&self, name: &str) -> Vec<IpAddr> {
        ingress_of(self.api.get("v1", "Service", Some("default"), name))
    }

    /// Waits until the controller logged its next apply (the `applied`-th) and every watch
    /// is connected again: any apply a relist would cause has happened by then.
    fn wait_resynced(&self, applied: usize) {
        self.controller()
            .wait_for(APPLIED, applied, Duration::from_secs(10))
            .unwrap();
        wait_until("every watch connected", Duration::from_secs(10), || {
            self.sandbox.scrape_metrics().is_ok_and(|text| {
                ["services", "endpointslices", "nodes"].iter().all(|r| {
                    metric(&text, &format!("lb_api_watch_up{{resource=\"{r}\"}}")) == Some(1.0)
                })
            })
        });
    }

    fn controller(&self) -> &LoggedChild {
        self.sandbox.controller.as_ref().expect("started")
    }

    /// Waits until `count` requests, each on a new connection, are answered by exactly the
    /// pods `pods` (the data plane follows the last change).
    fn wait_pods(&self, vip: IpAddr, pods: &[u8]) {
        let want: BTreeSet<String> = pods
            .iter()
            .map(|p| format!("tomcat-deployment-{p}"))
            .collect();
        wait_until(
            &format!("{vip} answered by pods {pods:?}"),
            Duration::from_secs(15),
            || {
                let seen: BTreeSet<String> = self
                    .sandbox
                    .http_batch(vip, 8 * pods.len())
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                seen == want
            },
        );
    }
}

/// A `LoadBalancerIPPool` named `name` with `blocks`.
fn pool(name: &str, blocks: &[Value]) -> Value {
    json!({
        "apiVersion": "lb.xdp.rs/v1alpha1", "kind": "LoadBalancerIPPool",
        "metadata": {"name": name},
        "spec": {"blocks": blocks}
    })
}

fn ingress_of(service: Option<Value>) -> Vec<IpAddr> {
    service
        .and_then(|s| s["status"]["loadBalancer"]["ingress"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i["ip"].as_str()?.parse().ok())
        .collect()
}

/// The value of the series `series` in a scrape, if present.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The events the stand-in holds about Service `name`: (type, reason, note).
fn events_about(api: &StandIn, name: &str) -> Vec<(String, String, String)> {
    api.events()
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

/// The seed's story, driven through the API: the Service is `<pending>` until a pool exists,
/// then gets the pool's first addresses in its status (and an event says so); its
/// EndpointSlices for 1, then 4, then 2 pods are followed, while a connection held from the
/// start keeps answering from its pod; IPv6 and UDP take the same addresses.
#[test]
fn the_seed_story_through_the_api() {
    let mut cluster = Cluster::up("api-seed", 4);
    cluster.sandbox.start_controller(false).unwrap();
    cluster.apply_service();
    cluster.set_endpoints(&[1]);
    // No pool yet: applied without a load balancer address, as kubectl shows it.
    wait_until(
        "the Service applied as <pending>",
        Duration::from_secs(10),
        || {
            cluster
                .sandbox
                .cli(&["get", "services", SERVICE])
                .is_ok_and(|text| text.contains("<pending>"))
        },
    );
    assert!(cluster.ingress(SERVICE).is_empty());
    cluster.create_pool();
    wait_until(
        "the address written to status",
        Duration::from_secs(10),
        || cluster.ingress(SERVICE) == [IpAddr::V4(VIP4), IpAddr::V6(VIP6)],
    );
    // Events are written from a queue, after the status: never waited for by the writer.
    wait_until("the IPAllocated event", Duration::from_secs(10), || {
        events_about(&cluster.api, SERVICE)
            .iter()
            .any(|(kind, reason, note)| {
                kind == "Normal" && reason == "IPAllocated" && note.contains(&VIP4.to_string())
            })
    });
    cluster.wait_pods(VIP4.into(), &[1]);
    let text = cluster.sandbox.cli(&["get", "services", SERVICE]).unwrap();
    assert!(text.contains(&VIP4.to_string()), "{text}");
    let mut held = HeldConnection::open(&cluster.sandbox, VIP4.into()).unwrap();
    assert_eq!(held.get().unwrap(), "tomcat-deployment-1");

    cluster.set_endpoints(&[1, 2, 3, 4]);
    cluster.wait_pods(VIP4.into(), &[1, 2, 3, 4]);
    assert_eq!(
        held.get().unwrap(),
        "tomcat-deployment-1",
        "the held connection kept its pod"
    );

    cluster.set_endpoints(&[1, 2]);
    cluster.wait_pods(VIP4.into(), &[1, 2]);
    cluster.wait_pods(VIP6.into(), &[1, 2]);
    assert_eq!(
        held.get().unwrap(),
        "tomcat-deployment-1",
        "the held connection kept its pod"
    );
    let (echo, from) = cluster.sandbox.udp_echo(VIP4.into(), b"ping").unwrap();
    assert_eq!(echo, b"ping");
    assert_eq!(from, SocketAddr::new(VIP4.into(), PORT));
}

/// An API outage of three seconds: the data plane keeps serving what it had, nothing is
/// applied meanwhile (no flap), the metrics say the API is away; the change made during the
/// outage is applied once the API is back, once.
#[test]
fn an_api_outage_keeps_serving_and_resyncs_once() {
    let mut cluster = Cluster::up("api-outage", 3);
    cluster.create_pool();
    cluster.apply_service();
    cluster.set_endpoints(&[1, 2]);
    cluster.sandbox.start_controller(false).unwrap();
    wait_until("the address assigned", Duration::from_secs(10), || {
        !cluster.ingress(SERVICE).is_empty()
    });
    cluster.wait_pods(VIP4.into(), &[1, 2]);
    let applied = cluster.controller().count(APPLIED);

    let outage = Instant::now();
    cluster.api.outage();
    wait_until("lb_api_watch_up 0", Duration::from_secs(10), || {
        cluster.sandbox.scrape_metrics().is_ok_and(|text| {
            metric(&text, "lb_api_watch_up{resource=\"endpointslices\"}") == Some(0.0)
        })
    });
    // What the endpoint-slice controller writes while this node cannot hear it.
    cluster.set_endpoints(&[1, 2, 3]);
    while outage.elapsed() < Duration::from_secs(3) {
        let pods = cluster.sandbox.http_batch(VIP4.into(), 4).unwrap();
        assert!(
            pods.iter().all(|p| p != "tomcat-deployment-3"),
            "served from the last good state during the outage: {pods:?}"
        );
    }
    assert_eq!(
        cluster.controller().count(APPLIED),
        applied,
        "nothing applied during the outage: {}",
        cluster.controller().text()
    );

    cluster.api.restore();
    cluster.wait_pods(VIP4.into(), &[1, 2, 3]);
    cluster.wait_resynced(applied + 1);
    assert_eq!(
        cluster.controller().count(APPLIED),
        applied + 1,
        "one apply for the one change: the relist itself changed nothing"
    );
    assert!(
        cluster
            .controller()
            .text()
            .contains("the API cannot be watched")
    );
}

/// A controller restarted while the API is away (an upgrade during an API server outage)
/// removes nothing before the API's first complete list: the data plane it adopts keeps
/// serving the held connection and new ones until the API is back, and the change made
/// meanwhile is applied then.
#[test]
fn a_restart_while_the_api_is_away_serves_what_it_adopted_until_listed() {
    let mut cluster = Cluster::up("api-restart", 3);
    cluster.create_pool();
    cluster.apply_service();
    cluster.set_endpoints(&[1, 2]);
    cluster.sandbox.controller_args = vec!["--keep-on-exit".into()];
    cluster.sandbox.start_controller(false).unwrap();
    cluster.wait_pods(VIP4.into(), &[1, 2]);
    let mut held = HeldConnection::open(&cluster.sandbox, VIP4.into()).unwrap();
    let pod = held.get().unwrap();

    let stopped = cluster.sandbox.controller.take().unwrap();
    assert!(
        stopped
            .child
            .stop(Duration::from_secs(5))
            .unwrap()
            .success()
    );
    cluster.api.outage();
    cluster.set_endpoints(&[1, 2, 3]);
    cluster.sandbox.controller_args.clear();
    cluster.sandbox.spawn_controller(false).unwrap();
    cluster
        .controller()
        .wait_for(
            "waiting for the API's first complete list",
            1,
            Duration::from_secs(10),
        )
        .unwrap();
    let away = Instant::now();
    while away.elapsed() < Duration::from_secs(2) {
        let pods = cluster.sandbox.http_batch(VIP4.into(), 4).unwrap();
        assert!(
            pods.iter().all(|p| p != "tomcat-deployment-3"),
            "the adopted state serves: {pods:?}"
        );
        assert_eq!(
            held.get().unwrap(),
            pod,
            "the held connection keeps its pod"
        );
    }
    assert_eq!(
        cluster.controller().count(APPLIED),
        0,
        "nothing applied before the list"
    );

    cluster.api.restore();
    cluster
        .controller()
        .wait_ready(Duration::from_secs(10))
        .unwrap();
    cluster.wait_pods(VIP4.into(), &[1, 2, 3]);
    assert_eq!(
        held.get().unwrap(),
        pod,
        "the held connection keeps its pod"
    );
}

/// A `410 Gone`: while this node could not hear it, the API server took a change and then
/// compacted the history the watch would resume from. Back, the controller's watch gets 410,
/// relists, and the change is applied once.
#[test]
fn a_410_gone_relists_and_applies_once() {
    let mut cluster = Cluster::up("api-gone", 3);
    cluster.create_pool();
    cluster.apply_service();
    cluster.set_endpoints(&[1, 2]);
    cluster.sandbox.start_controller(false).unwrap();
    cluster.wait_pods(VIP4.into(), &[1, 2]);
    let applied = cluster.controller().count(APPLIED);

    cluster.api.outage();
    cluster.set_endpoints(&[1, 2, 3]);
    cluster.api.compact();
    let lists_before = endpointslice_lists(&cluster.api);
    cluster.api.restore();
    cluster.wait_pods(VIP4.into(), &[1, 2, 3]);
    cluster.wait_resynced(applied + 1);
    assert!(
        endpointslice_lists(&cluster.api) > lists_before,
        "the EndpointSlices were listed again after the 410"
    );
    assert_eq!(cluster.controller().count(APPLIED), applied + 1);
}

/// The list calls (not watches) for EndpointSlices the stand-in answered.
fn endpointslice_lists(api: &StandIn) -> usize {
    api.requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && r.path.ends_with("/endpointslices") && !r.query.contains("watch=")
        })
        .count()
}

/// Two controllers share the Lease. The first one up leads: it alone writes status, and the
/// other (serving the client's traffic all the same) writes nothing. When the leader dies
/// (SIGKILL: no release), the other leads within the lease duration and assigns the next
/// Service, whose traffic it serves.
#[test]
fn two_controllers_share_the_lease_and_the_follower_takes_over() {
    let mut cluster = Cluster::up("api-lease", 2);
    // The other node's controller: on a second interface of the node's namespace (one XDP
    // program per interface), its own pins, metrics port and node name.
    let node = &cluster.sandbox.node;
    node.ip(&[
        "link",
        "add",
        "veth-aux",
        "type",
        "veth",
        "peer",
        "name",
        "veth-aux-peer",
    ])
    .unwrap();
    for link in ["veth-aux", "veth-aux-peer"] {
        node.ip(&["link", "set", link, "up"]).unwrap();
    }
    let other_roots = Roots::new("api-lease-b");
    let mut command = node.command(&binaries().controller);
    command.args([
        "attach",
        "veth-aux",
        "--stats-interval",
        "0",
        "--kubeconfig",
    ]);
    command.arg(&cluster.kubeconfig);
    command.args(LEASE_ARGS);
    command.args([
        "--node-name",
        "sandbox-node-b",
        "--metrics-addr",
        "127.0.0.1:9465",
        "--pin-root",
        &other_roots.pin_root,
        "--state-root",
        &other_roots.state_root,
    ]);
    let mut leader = LoggedChild::spawn(command, false).unwrap();
    leader.wait_ready(Duration::from_secs(10)).unwrap();
    leader
        .wait_for("leading the address assignment", 1, Duration::from_secs(10))
        .unwrap();
    cluster.sandbox.start_controller(false).unwrap();

    cluster.create_pool();
    cluster.apply_service();
    cluster.set_endpoints(&[1, 2]);
    wait_until("the leader assigned", Duration::from_secs(10), || {
        !cluster.ingress(SERVICE).is_empty()
    });
    cluster.wait_pods(VIP4.into(), &[1, 2]);
    assert!(leader.count("status.loadBalancer.ingress written") >= 1);
    assert_eq!(
        cluster
            .controller()
            .count("status.loadBalancer.ingress written"),
        0,
        "the follower writes no status"
    );
    assert_eq!(
        cluster.controller().count("leading the address assignment"),
        0
    );

    let killed = Instant::now();
    leader.child.child_mut().kill().unwrap();
    let _ = leader.child.child_mut().wait();
    cluster
        .controller()
        .wait_for("leading the address assignment", 1, Duration::from_secs(10))
        .unwrap();
    let took = killed.elapsed();
    // The lease lasts 2 s; the follower looks every 250 ms.
    assert!(took < Duration::from_secs(3), "took over after {took:?}");

    // The next Service, on the pool's next address, assigned by the new leader.
    let second = Ipv4Addr::new(198, 18, 200, 2);
    let yaml = cluster
        .sandbox
        .service_yaml(2, false)
        .replace(&format!("name: {SERVICE}"), "name: second")
        .replace("clusterIP: 198.18.100.1", "clusterIP: 198.18.100.2")
        .replace("clusterIPs: [198.18.100.1]", "clusterIPs: [198.18.100.2]")
        .replace("nodePort: 30854", "nodePort: 30855");
    cluster.api.apply_yaml(&yaml);
    let slices = cluster
        .sandbox
        .endpoints_yaml(&[(1, Ready), (2, Ready)])
        .unwrap()
        .replace(&format!("name: {SERVICE}-"), "name: second-")
        .replace(
            &format!("kubernetes.io/service-name: {SERVICE}"),
            "kubernetes.io/service-name: second",
        );
    cluster.api.apply_yaml(&slices);
    wait_until("the new leader assigned", Duration::from_secs(10), || {
        cluster.ingress("second").first() == Some(&IpAddr::V4(second))
    });
    cluster.wait_pods(second.into(), &[1, 2]);
    assert!(
        cluster
            .controller()
            .count("status.loadBalancer.ingress written")
            >= 1
    );
    // The dead controller's data plane on veth-aux, pinned: removed as an operator would.
    drop(leader);
    other_roots
        .cli(&binaries().controller, &["detach", "veth-aux"])
        .unwrap();
}

/// A Service asking for an address outside every pool gets none and a Warning event; a
/// two-address pool serves two Services and refuses the third with a Warning event; when one
/// of the two is deleted, its address goes to the one that waited.
#[test]
fn requests_outside_the_pools_and_exhaustion_are_refused_with_events() {
    let mut cluster = Cluster::up("api-ipam", 2);
    cluster.api.apply_value(pool(
        "small",
        &[json!({"start": "198.18.200.10", "stop": "198.18.200.11"})],
    ));
    cluster.sandbox.start_controller(false).unwrap();
    let service = |name: &str, cluster_ip: &str, request: Option<&str>| {
        let mut spec = json!({
            "type": "LoadBalancer",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "selector": {"app": "tomcat"},
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP", "targetPort": PORT}]
        });
        if let Some(ip) = request {
            spec["loadBalancerIP"] = json!(ip);
        }
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec
        })
    };
    let slice = |name: &str| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-v4"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["198.18.1.1"], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": NODE_NAME},
                {"addresses": ["198.18.2.1"], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": NODE_NAME}
            ]
        })
    };
    cluster
        .api
        .apply_value(service("outside", "198.18.100.10", Some("198.18.201.5")));
    for (name, cluster_ip) in [
        ("a", "198.18.100.11"),
        ("b", "198.18.100.12"),
        ("c", "198.18.100.13"),
    ] {
        cluster.api.apply_value(service(name, cluster_ip, None));
        cluster.api.apply_value(slice(name));
    }
    let first = IpAddr::V4(Ipv4Addr::new(198, 18, 200, 10));
    let second = IpAddr::V4(Ipv4Addr::new(198, 18, 200, 11));
    wait_until("a and b assigned", Duration::from_secs(10), || {
        cluster.ingress("a") == [first] && cluster.ingress("b") == [second]
    });
    wait_until(
        "the refusals told as events",
        Duration::from_secs(10),
        || {
            let outside = events_about(&cluster.api, "outside");
            let c = events_about(&cluster.api, "c");
            outside.iter().any(|(kind, reason, note)| {
                kind == "Warning"
                    && reason == "AddressNotInAnyPool"
                    && note.contains("198.18.201.5")
            }) && c
                .iter()
                .any(|(kind, reason, _)| kind == "Warning" && reason == "PoolExhausted")
        },
    );
    assert!(cluster.ingress("outside").is_empty());
    assert!(cluster.ingress("c").is_empty());
    // The refused request is not served either (it is a request, not an address).
    wait_until(
        "outside applied as <pending>",
        Duration::from_secs(10),
        || {
            cluster
                .sandbox
                .cli(&["get", "services", "outside"])
                .is_ok_and(|text| text.contains("<pending>"))
        },
    );
    cluster.wait_pods(first, &[1, 2]);

    assert!(cluster.api.delete("v1", "Service", Some("default"), "b"));
    wait_until(
        "the freed address goes to c",
        Duration::from_secs(10),
        || cluster.ingress("c") == [second],
    );
    cluster.wait_pods(second, &[1, 2]);
}
