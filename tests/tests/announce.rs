//! Announcing VIPs to the routing daemon (`--announce-table`): the routes the controller keeps
//! in its table, as `ip route` shows them, through a controller's life in the sandbox; and the
//! table writer alone in a namespace.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    netns::Netns,
    sandbox::{
        Binaries, EndpointState::Ready, NODE_IFACE, NODE_NAME, PORT, Sandbox, VIP4, VIP6,
        write_atomically,
    },
};
use lb_userspace::announce::{ROUTE_PROTOCOL, RouteTable};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

const TABLE: &str = "4242";
/// The `Local` Service's load balancer IP.
const LOCAL_VIP: &str = "198.18.200.2";
const WAIT: Duration = Duration::from_secs(10);
const DRAIN: &str = "4s";

/// The routes of table [`TABLE`] in `ns`, both families, as `ip -j route` lists them: each
/// `type dst protocol`.
fn routes(ns: &Netns) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for family in ["-4", "-6"] {
        let output = ns
            .command("ip")
            .args([family, "-j", "route", "show", "table", TABLE])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        // A table never written to does not exist, and holds nothing.
        if !output.status.success() {
            let error = String::from_utf8_lossy(&output.stderr);
            assert!(error.contains("does not exist"), "{error}");
            continue;
        }
        if text.trim().is_empty() {
            continue;
        }
        let list: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        for route in list {
            let field = |name: &str| match &route[name] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            found.insert(format!(
                "{} {} {}",
                field("type"),
                field("dst"),
                field("protocol")
            ));
        }
    }
    found
}

/// The routes announcing `addrs`, as [`routes`] shows them.
fn announced(addrs: &[&str]) -> BTreeSet<String> {
    addrs
        .iter()
        .map(|a| format!("blackhole {a} {ROUTE_PROTOCOL}"))
        .collect()
}

/// Waits until table [`TABLE`] in `ns` holds exactly `want`.
fn wait_routes(ns: &Netns, want: &BTreeSet<String>, log: impl Fn() -> String) {
    let start = Instant::now();
    loop {
        let now = routes(ns);
        if now == *want {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "table {TABLE} holds {now:?}, not {want:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `Local` Service on [`LOCAL_VIP`] with the endpoints of `pods` (index, node name).
fn local_service(sandbox: &Sandbox, pods: &[(u8, &str)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: local
  namespace: default
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  ports:
  - name: http
    port: {PORT}
    protocol: TCP
status:
  loadBalancer:
    ingress:
    - ip: {LOCAL_VIP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-v4
  namespace: default
  labels:
    kubernetes.io/service-name: local
addressType: IPv4
ports:
- name: http
  port: {PORT}
  protocol: TCP
endpoints:
"
    );
    for (index, node) in pods {
        let pod = &sandbox.pods[index];
        yaml += &format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n",
            pod.v4
        );
    }
    yaml
}

/// This node's Node object, with the exclude label or without.
fn node(excluded: bool) -> String {
    let labels = if excluded {
        "  labels:\n    node.kubernetes.io/exclude-from-external-load-balancers: \"true\"\n"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\n{labels}")
}

fn metric(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::to_owned)
}

#[test]
fn the_controller_announces_what_it_serves_withdraws_on_a_drain_and_before_it_stops() {
    let mut sandbox = Sandbox::up("announce", Binaries::of_this_build()).unwrap();
    for index in [1, 2] {
        sandbox.start_pod(index).unwrap();
    }
    sandbox.controller_args = ["--announce-table", TABLE, "--drain-period", DRAIN]
        .map(String::from)
        .to_vec();
    sandbox.write_service(1, false).unwrap();
    sandbox.write_endpoints(&[(1, Ready)]).unwrap();
    let config = sandbox.config.path().to_owned();
    write_atomically(
        &config.join("local.yaml"),
        &local_service(&sandbox, &[(2, "other-node")]),
    )
    .unwrap();
    write_atomically(&config.join("node.yaml"), &node(false)).unwrap();
    // A route left in the table by someone else: the controller owns the table.
    sandbox
        .node
        .ip(&["route", "add", "blackhole", "10.9.0.0/16", "table", TABLE])
        .unwrap();
    sandbox.start_controller(false).unwrap();
    let log = || sandbox.controller.as_ref().unwrap().text();

    // Ready: the Cluster-policy Service's VIPs are announced; the Local one, whose only
    // endpoint is on another node, is not; the stranger route is gone.
    let both = announced(&[&VIP4.to_string(), &VIP6.to_string()]);
    assert_eq!(routes(&sandbox.node), both, "{}", log());
    let describe = sandbox.cli(&["describe", "service", "local"]).unwrap();
    assert!(
        describe.contains(&format!("{LOCAL_VIP}  not announced: no-local-endpoint")),
        "{describe}"
    );
    let metrics = sandbox.scrape_metrics().unwrap();
    assert_eq!(
        metric(&metrics, "lb_announced_addresses").as_deref(),
        Some("2")
    );
    assert_eq!(metric(&metrics, "lb_draining").as_deref(), Some("0"));

    // A local endpoint appears: announced.
    write_atomically(
        &config.join("local.yaml"),
        &local_service(&sandbox, &[(1, NODE_NAME), (2, "other-node")]),
    )
    .unwrap();
    let all = announced(&[&VIP4.to_string(), &VIP6.to_string(), LOCAL_VIP]);
    wait_routes(&sandbox.node, &all, log);
    // The line comes once the record `describe` reads is written.
    let announced_local = format!("announced address={LOCAL_VIP}");
    let controller = sandbox.controller.as_ref().unwrap();
    controller.wait_for(&announced_local, 1, WAIT).unwrap();
    let describe = sandbox.cli(&["describe", "service", "local"]).unwrap();
    assert!(
        describe.contains(&format!("{LOCAL_VIP}  announced")),
        "{describe}"
    );

    // The node labelled out of external load balancers: every route withdrawn, traffic still
    // served.
    write_atomically(&config.join("node.yaml"), &node(true)).unwrap();
    wait_routes(&sandbox.node, &BTreeSet::new(), log);
    controller
        .wait_for("reason=node-excluded", 3, WAIT)
        .unwrap();
    sandbox.http_get(IpAddr::V4(VIP4)).unwrap();
    sandbox.http_get(IpAddr::V6(VIP6)).unwrap();
    // And back.
    write_atomically(&config.join("node.yaml"), &node(false)).unwrap();
    wait_routes(&sandbox.node, &all, log);
    controller.wait_for(&announced_local, 2, WAIT).unwrap();

    // SIGTERM: the routes go first, traffic is served through the drain period, then the data
    // plane goes.
    kill(Pid::from_raw(controller.child.id() as i32), Signal::SIGTERM).unwrap();
    controller.wait_for("drain started", 1, WAIT).unwrap();
    wait_routes(&sandbox.node, &BTreeSet::new(), log);
    // The lines come once the figures are updated.
    controller.wait_for("reason=stopping", 3, WAIT).unwrap();
    let metrics = sandbox.scrape_metrics().unwrap();
    assert_eq!(metric(&metrics, "lb_draining").as_deref(), Some("1"));
    assert_eq!(
        metric(&metrics, "lb_announced_addresses").as_deref(),
        Some("0")
    );
    sandbox.http_get(IpAddr::V4(VIP4)).unwrap();
    assert_eq!(
        controller.count("drain over"),
        0,
        "the request was served during the drain\n{}",
        log()
    );
    controller.wait_for("drain over", 1, WAIT).unwrap();
    controller
        .wait_for("detached and removed", 1, WAIT)
        .unwrap();
    let text = log();
    let (withdrawn, detached) = (
        text.find(&format!("withdrew address={VIP4} reason=stopping")),
        text.find("detached and removed"),
    );
    assert!(
        withdrawn.is_some() && withdrawn < detached,
        "withdrawn before the data plane was detached\n{text}"
    );
    let status = sandbox.controller.take().unwrap().child.stop(WAIT).unwrap();
    assert!(status.success(), "{status}");
    assert!(routes(&sandbox.node).is_empty());
    sandbox.roots.assert_detached(&sandbox.node, NODE_IFACE);
}

/// `--keep-on-exit`: the data plane keeps serving, so its routes stay; a restarted controller
/// adopts them (nothing announced again) and `detach` withdraws them with the data plane.
#[test]
fn routes_stay_with_a_kept_data_plane_and_go_with_detach() {
    let mut sandbox = Sandbox::up("announcekeep", Binaries::of_this_build()).unwrap();
    sandbox.start_pod(1).unwrap();
    sandbox.controller_args = ["--announce-table", TABLE, "--keep-on-exit"]
        .map(String::from)
        .to_vec();
    sandbox.write_service(1, false).unwrap();
    sandbox.write_endpoints(&[(1, Ready)]).unwrap();
    sandbox.start_controller(false).unwrap();
    let both = announced(&[&VIP4.to_string(), &VIP6.to_string()]);
    assert_eq!(routes(&sandbox.node), both);
    let stop = |sandbox: &mut Sandbox| {
        let status = sandbox.controller.take().unwrap().child.stop(WAIT).unwrap();
        assert!(status.success(), "{status}");
    };
    stop(&mut sandbox);
    assert_eq!(routes(&sandbox.node), both, "kept with the data plane");
    sandbox.start_controller(false).unwrap();
    let controller = sandbox.controller.as_ref().unwrap();
    assert_eq!(
        controller.count("announced address="),
        0,
        "{}",
        controller.text()
    );
    assert_eq!(routes(&sandbox.node), both);
    stop(&mut sandbox);
    // From another namespace, detach refuses: the routes are in the controller's.
    let error = sandbox
        .cli(&["detach", NODE_IFACE])
        .unwrap_err()
        .to_string();
    assert!(error.contains("another network namespace"), "{error}");
    assert_eq!(routes(&sandbox.node), both);
    let binary = lb_tests::lb_userspace_bin();
    let detach = sandbox
        .node
        .command(&binary)
        .args(["detach", NODE_IFACE, "--pin-root", &sandbox.roots.pin_root])
        .args(["--state-root", &sandbox.roots.state_root])
        .output()
        .unwrap();
    assert!(detach.status.success(), "{detach:?}");
    assert!(routes(&sandbox.node).is_empty());
    sandbox.roots.assert_detached(&sandbox.node, NODE_IFACE);
}

/// The table writer alone: exactly one blackhole route of protocol 250 per address, whatever
/// the table held; a second sync changes nothing; an empty set empties the table.
#[test]
fn a_sync_leaves_exactly_the_wanted_routes() {
    let ns = Netns::create("announcetable").unwrap();
    ns.ip(&["route", "add", "blackhole", "10.9.0.0/16", "table", TABLE])
        .unwrap();
    ns.ip(&["route", "add", "blackhole", "198.18.200.1", "table", TABLE])
        .unwrap();
    ns.ip(&[
        "-6",
        "route",
        "add",
        "blackhole",
        "2001:db8:200::1",
        "proto",
        "250",
        "metric",
        "7",
        "table",
        TABLE,
    ])
    .unwrap();
    let want: BTreeSet<IpAddr> = ["198.18.200.1", "198.18.200.3", "2001:db8:200::1"]
        .map(|a| a.parse().unwrap())
        .into();
    let table: u32 = TABLE.parse().unwrap();
    let (first, second) = ns
        .enter(move || {
            let mut routes = RouteTable::open(table).unwrap();
            (routes.sync(&want).unwrap(), routes.sync(&want).unwrap())
        })
        .unwrap();
    assert_eq!(
        routes(&ns),
        announced(&["198.18.200.1", "198.18.200.3", "2001:db8:200::1"])
    );
    // The foreign prefix and the IPv4 route of another protocol removed; the IPv6 one (ours,
    // whatever its metric) kept.
    assert_eq!(first.removed.len(), 2, "{first:?}");
    assert_eq!(first.added.len(), 2, "{first:?}");
    assert_eq!(second, Default::default(), "nothing to do again");
    ns.enter(move || {
        RouteTable::open(table)
            .unwrap()
            .sync(&BTreeSet::new())
            .unwrap()
    })
    .unwrap();
    assert!(routes(&ns).is_empty());
}
