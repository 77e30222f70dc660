//! `cargo xtask demo`: the tutorial's story, played in the veth sandbox with real HTTP clients.
//! A Deployment of one tomcat pod behind `tomcat-load-balancer` (LoadBalancer, 8080 -> 8080);
//! scaled to 4 replicas; scaled back to 2, with connections held open to the surviving pods
//! never broken. The machine is left clean.

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use anyhow::Context as _;
use lb_tests::sandbox::{
    Binaries,
    EndpointState::{Ready, Terminating},
    HeldConnection, SERVICE, Sandbox, VIP4,
};

use crate::cmd::{cargo, require_root, status, workspace_root};

/// Requests per batch.
const BATCH: usize = 200;

/// Builds the release binaries the sandbox runs.
pub fn build_binaries() -> anyhow::Result<Binaries> {
    status(cargo().args([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--package",
        "lb-tests",
        "--bins",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), std::path::PathBuf::from);
    Ok(Binaries::in_dir(&target.join("release")))
}

pub fn step(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

pub fn command(text: &str) {
    println!("$ {text}");
}

/// Prints how a batch spread over the pods, as a table and a bar chart.
pub fn show_spread(answers: &[String], pods: &[String]) {
    let mut counts: BTreeMap<&str, usize> = pods.iter().map(|p| (p.as_str(), 0)).collect();
    for answer in answers {
        *counts.entry(answer.as_str()).or_default() += 1;
    }
    println!("{:<24} {:>8} {:>7}", "POD", "REQUESTS", "SHARE");
    for (pod, count) in &counts {
        let share = *count as f64 * 100.0 / answers.len() as f64;
        let bar = "█".repeat((*count * 50).div_ceil(answers.len().max(1)));
        println!("{pod:<24} {count:>8} {share:>6.1}%  {bar}");
    }
}

/// Runs the demo; the sandbox is removed whatever happens.
pub fn run() -> anyhow::Result<()> {
    require_root("cargo xtask demo")?;
    lb_tests::netns::sweep_stale()?;
    let binaries = build_binaries()?;
    let started = Instant::now();
    let vip = IpAddr::V4(VIP4);
    let vip_url = format!("http://{VIP4}:8080/");

    step("A Kubernetes node in network namespaces: a client, the node (the load balancer), pods");
    let mut sandbox = Sandbox::up("demo", binaries).context("building the sandbox")?;
    println!("client 198.18.0.1 -> node 198.18.0.2 (XDP on veth-node) -> pods 198.18.N.1:8080");

    step("kubectl apply: Deployment tomcat-deployment (replicas: 1), Service tomcat-load-balancer");
    sandbox.start_pod(1)?;
    sandbox.write_service(1, false)?;
    sandbox.write_endpoints(&[(1, Ready)])?;
    command(
        "kubectl expose deployment tomcat-deployment --type=LoadBalancer --port=8080 --target-port 8080 --name=tomcat-load-balancer",
    );
    println!("service/tomcat-load-balancer exposed");
    command("lb-userspace attach veth-node --config MANIFESTS   # on the node");
    sandbox.start_controller(true)?;
    command("lb-userspace get services");
    print!("{}", sandbox.cli(&["get", "services"])?);

    step(&format!(
        "{BATCH} requests to {vip_url}, a new connection each"
    ));
    let pods = |sandbox: &Sandbox| -> Vec<String> {
        sandbox.pods.values().map(|p| p.name.clone()).collect()
    };
    let answers = sandbox.http_batch(vip, BATCH)?;
    show_spread(&answers, &pods(&sandbox));

    step("kubectl scale --replicas=4 deployment/tomcat-deployment");
    for index in 2..=4 {
        sandbox.start_pod(index)?;
    }
    sandbox.write_service(4, false)?;
    sandbox.write_endpoints(&[(1, Ready), (2, Ready), (3, Ready), (4, Ready)])?;
    sandbox.wait_applied(2)?;
    println!(
        "deployment.extensions/tomcat-deployment scaled (the EndpointSlices were rewritten; the controller applied them)"
    );
    let mut held: Vec<(HeldConnection, String)> = Vec::new();
    for _ in 0..8 {
        let mut connection = HeldConnection::open(&sandbox, vip)?;
        let pod = connection.get()?;
        held.push((connection, pod));
    }
    let held_pods: Vec<&str> = held.iter().map(|(_, p)| p.as_str()).collect();
    println!(
        "8 keep-alive connections opened and held, on: {}",
        held_pods.join(", ")
    );

    step(&format!(
        "The same {BATCH} requests, now spread by Maglev over 4 pods"
    ));
    let answers = sandbox.http_batch(vip, BATCH)?;
    show_spread(&answers, &pods(&sandbox));

    step("The same service over UDP and IPv6");
    let (echo, from) = sandbox.udp_echo(vip, b"hello over UDP")?;
    println!(
        "UDP echo of {:?} from {from}",
        String::from_utf8_lossy(&echo)
    );
    let v6 = IpAddr::V6(lb_tests::sandbox::VIP6);
    println!(
        "HTTP over IPv6 to [{v6}]:8080 answered by {}",
        sandbox.http_get(v6)?
    );

    step("lb-userspace describe service tomcat-load-balancer");
    print!("{}", sandbox.cli(&["describe", "service", SERVICE])?);

    step("kubectl scale --replicas=2 deployment/tomcat-deployment");
    sandbox.write_service(2, false)?;
    sandbox.write_endpoints(&[(1, Ready), (2, Ready), (3, Terminating), (4, Terminating)])?;
    sandbox.wait_applied(3)?;
    println!("pods 3 and 4 are terminating: they keep their connections, take no new ones");
    sandbox.write_endpoints(&[(1, Ready), (2, Ready)])?;
    sandbox.wait_applied(4)?;
    sandbox.stop_pod(3)?;
    sandbox.stop_pod(4)?;
    println!("pods 3 and 4 are gone");
    let mut unbroken = 0;
    let mut on_survivors = 0;
    for (connection, pod) in &mut held {
        if pod.ends_with("-3") || pod.ends_with("-4") {
            continue;
        }
        on_survivors += 1;
        match connection.get() {
            Ok(answer) if &answer == pod => unbroken += 1,
            Ok(answer) => println!("a connection held to {pod} was answered by {answer}"),
            Err(e) => println!("a connection held to {pod} broke: {e}"),
        }
    }
    println!(
        "connections held open to the surviving pods: {on_survivors}, still answered by the same pod: {unbroken}"
    );
    anyhow::ensure!(
        unbroken == on_survivors,
        "a connection to a surviving pod broke"
    );
    let answers = sandbox.http_batch(vip, BATCH)?;
    show_spread(&answers, &pods(&sandbox));

    step("Cleaning up: the controller detaches, the namespaces go");
    drop(sandbox);
    left_clean(started)
}

/// Checks that no sandbox namespace is left (the sandbox was dropped) and says how long the
/// demo took.
pub fn left_clean(started: Instant) -> anyhow::Result<()> {
    let left = lb_tests::netns::run("ip", &["netns", "list"])?;
    let left = String::from_utf8_lossy(&left.stdout);
    anyhow::ensure!(
        !left.contains(lb_tests::netns::PREFIX),
        "namespaces left behind: {left}"
    );
    println!(
        "done in {:.1} s; no namespace, pin or process left",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo xtask demo --api`: the story through a stand-in API server (the tests crate's test
/// double speaking the API's wire protocol; no real cluster is involved). The Service is
/// created without an address and shows `<pending>`; a pool is created, the leader assigns
/// the pool's first address and writes it to the Service's status; the EndpointSlices are
/// written for 1, then 4 pods, and the traffic follows.
pub fn run_api() -> anyhow::Result<()> {
    require_root("cargo xtask demo")?;
    lb_tests::netns::sweep_stale()?;
    let binaries = build_binaries()?;
    let started = Instant::now();
    let vip = IpAddr::V4(VIP4);

    step(
        "A node in network namespaces, and a STAND-IN Kubernetes API server (a test double, not a cluster)",
    );
    let mut sandbox = Sandbox::up("demo-api", binaries).context("building the sandbox")?;
    for index in 1..=4 {
        sandbox.start_pod(index)?;
    }
    let api = sandbox.start_api(&[])?;
    println!("stand-in API server on 127.0.0.1:6443 in the node's namespace");
    command("lb-userspace attach veth-node --kubeconfig KUBECONFIG   # on the node");
    sandbox.spec_extra = "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n".into();
    sandbox.start_controller(true)?;

    step(
        "kubectl expose deployment tomcat-deployment --type=LoadBalancer --port=8080 (no pool yet)",
    );
    api.apply_yaml(&sandbox.service_yaml(1, false));
    api.apply_yaml(&sandbox.endpoints_yaml(&[(1, Ready)])?);
    wait_shown(&sandbox, &["get", "services"], "<pending>")?;
    command("lb-userspace get services");
    print!("{}", sandbox.cli(&["get", "services"])?);

    step("kubectl apply -f deploy/pool-example.yaml   # 198.18.200.0/24, 2001:db8:200::/64");
    api.apply_value(serde_json::json!({
        "apiVersion": "lb.xdp.rs/v1alpha1", "kind": "LoadBalancerIPPool",
        "metadata": {"name": "example"},
        "spec": {"blocks": [{"cidr": "198.18.200.0/24"}, {"cidr": "2001:db8:200::/64"}]}
    }));
    wait_shown(&sandbox, &["get", "services"], &VIP4.to_string())?;
    command(
        "kubectl get service tomcat-load-balancer -o jsonpath='{.status}'   # from the stand-in",
    );
    let service = api
        .get("v1", "Service", Some("default"), SERVICE)
        .context("the Service is in the stand-in")?;
    println!("{}", service["status"]);
    command("lb-userspace get services");
    print!("{}", sandbox.cli(&["get", "services"])?);
    for event in api.events() {
        println!(
            "Event {} {} {}: {}",
            event.type_.unwrap_or_default(),
            event.reason.unwrap_or_default(),
            event.regarding.and_then(|r| r.name).unwrap_or_default(),
            event.note.unwrap_or_default()
        );
    }
    let pods = |sandbox: &Sandbox| -> Vec<String> {
        sandbox.pods.values().map(|p| p.name.clone()).collect()
    };
    step(&format!("{BATCH} requests to http://{VIP4}:8080/"));
    show_spread(&sandbox.http_batch(vip, BATCH)?, &pods(&sandbox));

    step("kubectl scale --replicas=4: the endpoint-slice controller writes 4 endpoints");
    api.apply_yaml(&sandbox.endpoints_yaml(&[(1, Ready), (2, Ready), (3, Ready), (4, Ready)])?);
    wait_shown(&sandbox, &["describe", "service", SERVICE], "198.18.4.1")?;
    show_spread(&sandbox.http_batch(vip, BATCH)?, &pods(&sandbox));

    step("Cleaning up");
    drop(sandbox);
    drop(api);
    println!(
        "done in {:.1} s; no namespace, pin or process left",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits until `lb-userspace ARGS` prints `text` (the controller applied what the API says).
fn wait_shown(sandbox: &Sandbox, args: &[&str], text: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while !sandbox.cli(args).is_ok_and(|shown| shown.contains(text)) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "lb-userspace {args:?} never showed {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}
