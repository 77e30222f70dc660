//! The controller as an operator runs it: `lb-userspace attach --config DIR` on a routing node
//! between a client and two pods, in namespaces this test creates. The manifests change under
//! it, it is killed with SIGKILL and restarted, and a long-lived TCP connection is served
//! throughout.
//!
//! ```text
//! client 198.18.0.1 --- 198.18.0.2 node 198.18.1.254 --- 198.18.1.1 pod-1
//!                       (controller on veth-n)    198.18.2.254 --- 198.18.2.1 pod-2
//! ```

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use lb_tests::{
    Roots,
    netns::{Netns, veth_pair},
    sandbox::LoggedChild,
};

/// How long the controller may take to log what a step waits for.
const WAIT: Duration = Duration::from_secs(10);

const VIP: &str = "198.18.100.1:8080";

/// Connections held on pod-1 across the scale-up, the kill and the restart.
const HELD: usize = 16;

fn service_yaml() -> &'static str {
    "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  \
     type: LoadBalancer\n  externalIPs: [198.18.100.1]\n  selector:\n    app: web\n  ports:\n  - \
     port: 8080\n    targetPort: 8080\n    protocol: TCP\n"
}

fn endpoints_yaml(pods: &[&str]) -> String {
    let mut yaml = "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\n  namespace: default\nsubsets:\n- addresses:\n".to_owned();
    for pod in pods {
        yaml += &format!("  - ip: {pod}\n");
    }
    yaml += "  ports:\n  - port: 8080\n    protocol: TCP\n";
    yaml
}

/// Writes a file the way kubectl and editors do: a new file renamed over the old one.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A pod: answers every line of every connection with its name.
fn serve_pod(pod: &Netns, name: &'static str) {
    let listener = pod
        .enter(|| TcpListener::bind("0.0.0.0:8080").unwrap())
        .unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines() {
                    if line.is_err() || writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A client connection kept open across the test.
struct Conversation {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conversation {
    fn open(client: &Netns) -> Self {
        let stream = client
            .enter(|| {
                let stream =
                    TcpStream::connect_timeout(&VIP.parse().unwrap(), Duration::from_secs(5))
                        .expect("connecting to the VIP");
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                stream
            })
            .unwrap();
        Self {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// Sends a line, returns the pod that answered.
    fn ask(&mut self) -> String {
        self.writer
            .write_all(b"who?\n")
            .expect("sending on the connection");
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .expect("an answer on the connection");
        answer.trim().to_owned()
    }
}

/// Which pods answer `count` new connections.
fn new_connections(client: &Netns, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| Conversation::open(client).ask())
        .collect()
}

/// Starts `lb-userspace attach` on the node and waits until it is ready (first apply done,
/// metrics served).
fn start_controller(node: &Netns, config: &Path, roots: &Roots) -> LoggedChild {
    let command = roots.attach_command(node, &lb_tests::lb_userspace_bin(), "veth-n", config);
    let controller = LoggedChild::spawn(command, false).unwrap();
    controller.wait_ready(WAIT).unwrap();
    controller
}

fn cli(roots: &Roots, args: &[&str]) -> String {
    roots.cli(&lb_tests::lb_userspace_bin(), args).unwrap()
}

#[test]
fn manifests_drive_the_data_plane_and_flows_survive_kill_and_restart() {
    let client = Netns::create("ctlc").unwrap();
    let node = Netns::create("ctln").unwrap();
    let pod1 = Netns::create("ctlp1").unwrap();
    let pod2 = Netns::create("ctlp2").unwrap();
    veth_pair((&client, "veth-c"), (&node, "veth-n")).unwrap();
    veth_pair((&node, "veth-p1"), (&pod1, "eth0")).unwrap();
    veth_pair((&node, "veth-p2"), (&pod2, "eth0")).unwrap();
    client
        .ip(&["addr", "add", "198.18.0.1/24", "dev", "veth-c"])
        .unwrap();
    client
        .ip(&["route", "add", "198.18.100.0/24", "via", "198.18.0.2"])
        .unwrap();
    client
        .exec("ethtool", &["-K", "veth-c", "tx", "off"])
        .unwrap();
    node.ip(&["addr", "add", "198.18.0.2/24", "dev", "veth-n"])
        .unwrap();
    node.ip(&["addr", "add", "198.18.1.254/24", "dev", "veth-p1"])
        .unwrap();
    node.ip(&["addr", "add", "198.18.2.254/24", "dev", "veth-p2"])
        .unwrap();
    node.exec("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
        .unwrap();
    for (pod, addr, gateway) in [
        (&pod1, "198.18.1.1/24", "198.18.1.254"),
        (&pod2, "198.18.2.1/24", "198.18.2.254"),
    ] {
        pod.ip(&["addr", "add", addr, "dev", "eth0"]).unwrap();
        pod.ip(&["route", "add", "default", "via", gateway])
            .unwrap();
    }
    serve_pod(&pod1, "pod-1");
    serve_pod(&pod2, "pod-2");

    let roots = Roots::new("ctl");
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("service.yaml"), service_yaml()).unwrap();
    let endpoints = config.path().join("endpoints.yaml");
    std::fs::write(&endpoints, endpoints_yaml(&["198.18.1.1"])).unwrap();

    // One endpoint: everything goes to pod-1, including a connection kept open throughout.
    let controller = start_controller(&node, config.path(), &roots);
    // Connections held on pod-1 throughout. Once pod-2 joins, Maglev would place about half of
    // them on pod-2: a controller that lost the flow tables (at a kill or a restart) would
    // move some of them with odds of 2^-HELD of missing it.
    let mut held: Vec<Conversation> = (0..HELD).map(|_| Conversation::open(&client)).collect();
    let mut ask_held = |moment: &str| {
        for (i, conversation) in held.iter_mut().enumerate() {
            assert_eq!(
                conversation.ask(),
                "pod-1",
                "{moment}: held connection {i} stays on its pod"
            );
        }
    };
    ask_held("opened");
    assert!(new_connections(&client, 5).iter().all(|p| p == "pod-1"));

    // Scale up: the rewritten manifest is applied, new connections reach pod-2 too.
    write_atomically(&endpoints, &endpoints_yaml(&["198.18.1.1", "198.18.2.1"]));
    controller.wait_for("applied", 2, WAIT).unwrap();
    let spread = new_connections(&client, 30);
    assert!(
        spread.iter().any(|p| p == "pod-2") && spread.iter().any(|p| p == "pod-1"),
        "{spread:?}"
    );
    ask_held("scaled up");

    // A broken manifest is rejected and the previous state keeps serving.
    write_atomically(
        &endpoints,
        "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web\n",
    );
    controller
        .wait_for("configuration rejected", 1, WAIT)
        .unwrap();
    ask_held("bad manifest");
    assert!(
        new_connections(&client, 4)
            .iter()
            .all(|p| p == "pod-1" || p == "pod-2")
    );
    // One naming its Service is told to it, as a Warning event.
    write_atomically(&endpoints, &endpoints_yaml(&["198.18.1.1", "not-an-ip"]));
    controller
        .wait_for("configuration rejected", 2, WAIT)
        .unwrap();
    write_atomically(&endpoints, &endpoints_yaml(&["198.18.1.1", "198.18.2.1"]));

    // The operator's views, from another process, and the metrics.
    let services = cli(&roots, &["get", "services"]);
    assert!(
        services.contains("web") && services.contains("198.18.100.1"),
        "{services}"
    );
    let described = cli(&roots, &["describe", "service", "web"]);
    for needle in [
        "Name:",
        "Selector:",
        "app=web",
        "Type:",
        "LoadBalancer",
        "IP:",
        "Port:",
        "TargetPort:",
        "Endpoints:",
        "198.18.1.1:8080,198.18.2.1:8080",
        "Session Affinity:",
        "External Traffic Policy:",
        "Internal Traffic Policy:",
        "Applied",
        "lb-userspace",
        "Warning",
        "Rejected",
        "Endpoints default/web: subsets[0].addresses[1].ip: \"not-an-ip\" is not an IP address",
    ] {
        assert!(described.contains(needle), "{needle} missing:\n{described}");
    }
    println!("{services}\n{described}");
    let explained = cli(
        &roots,
        &["explain", "198.18.0.1:1234", "198.18.100.1:8080/TCP"],
    );
    println!("{explained}");
    assert!(explained.contains("maglev"), "{explained}");
    let json: serde_json::Value =
        serde_json::from_str(&cli(&roots, &["get", "services", "-o", "json"])).unwrap();
    assert_eq!(json["kind"], "List");
    assert_eq!(json["items"][0]["metadata"]["name"], "web");
    assert_eq!(json["items"][0]["spec"]["type"], "LoadBalancer");
    let metrics = lb_tests::scrape_metrics(&node).unwrap();
    assert!(
        metrics.contains("lb_service_new_flows_total{namespace=\"default\",service=\"web\",port=\"8080/TCP\",family=\"IPv4\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_reloads_total{result=\"failure\"} 2"),
        "{metrics}"
    );
    println!(
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("lb_service") || l.starts_with("lb_endpoint_new"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // SIGKILL: nothing is cleaned up, the pinned data plane keeps serving.
    let mut controller = controller;
    controller.child.child_mut().kill().unwrap();
    controller.child.child_mut().wait().unwrap();
    ask_held("served while no controller runs");
    // New connections are still placed by the pinned tables, over both pods.
    let spread = new_connections(&client, 30);
    assert!(
        spread.iter().any(|p| p == "pod-1") && spread.iter().any(|p| p == "pod-2"),
        "placed over both pods with no controller running: {spread:?}"
    );

    // Restart: it adopts the pinned maps and links; the held flow is untouched.
    let restarted = start_controller(&node, config.path(), &roots);
    assert!(restarted.count("adopting the state of the previous controller") == 1);
    ask_held("after kill -9 and restart");

    // Scale down to pod-2 only: new connections all go there.
    write_atomically(&endpoints, &endpoints_yaml(&["198.18.2.1"]));
    restarted.wait_for("applied", 2, WAIT).unwrap();
    assert!(new_connections(&client, 10).iter().all(|p| p == "pod-2"));

    // A clean stop detaches: pins, state, XDP and TC programs all gone.
    let status = restarted.child.stop(Duration::from_secs(5)).unwrap();
    assert!(status.success());
    roots.assert_detached(&node, "veth-n");
}
