//! Kubernetes' Service semantics in the sandbox, with real clients: `externalTrafficPolicy:
//! Local` and its health check node port, `loadBalancerSourceRanges` and their live edit,
//! and connections to a Service without endpoints refused at once, as kube-proxy does.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::sandbox::{Binaries, EndpointState::Ready, NODE_IP, PORT, Sandbox, VIP4, VIP6};
use lb_userspace::{Dataplane, dataplane::LoadOptions};

const HEALTH_CHECK_PORT: u16 = 32_000;

fn binaries() -> Binaries {
    Binaries::in_dir(lb_tests::lb_userspace_bin().parent().unwrap())
}

/// A sandbox with `pods` ready pods, the service configured by `configure` before the
/// controller starts.
fn sandbox(tag: &str, pods: u8, configure: impl FnOnce(&mut Sandbox)) -> Sandbox {
    let mut sandbox = Sandbox::up(tag, binaries()).unwrap();
    for index in 1..=pods {
        sandbox.start_pod(index).unwrap();
    }
    configure(&mut sandbox);
    sandbox.write_service(usize::from(pods), false).unwrap();
    let endpoints: Vec<_> = (1..=pods).map(|i| (i, Ready)).collect();
    sandbox.write_endpoints(&endpoints).unwrap();
    sandbox.start_controller(false).unwrap();
    sandbox
}

/// The health check node port's answer to the client: status and body.
fn health_check(sandbox: &Sandbox) -> (u16, String) {
    let url = format!("http://{NODE_IP}:{HEALTH_CHECK_PORT}/healthz");
    sandbox
        .client
        .enter(move || -> anyhow::Result<(u16, String)> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .http_status_as_error(false)
                .build()
                .into();
            let mut response = agent.get(&url).call()?;
            let status = response.status().as_u16();
            Ok((status, response.body_mut().read_to_string()?))
        })
        .unwrap()
        .unwrap()
}

/// A TCP connection attempt from the client to `vip`:[`PORT`], and how long it took to fail
/// or succeed.
fn try_connect(
    sandbox: &Sandbox,
    vip: IpAddr,
    timeout: Duration,
) -> (std::io::Result<()>, Duration) {
    sandbox
        .client
        .enter(move || {
            let start = Instant::now();
            let result = TcpStream::connect_timeout(&SocketAddr::new(vip, PORT), timeout).map(drop);
            (result, start.elapsed())
        })
        .unwrap()
}

/// The value of the first series starting with `prefix` in a scrape (0 if absent).
fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `externalTrafficPolicy: Local` with two node names: requests through the load balancer IP
/// reach only the pod on this node, and the health check node port says how many there are
/// (200), then that there are none (503) once every endpoint is on the other node, when the
/// load balancer IP no longer answers.
#[test]
fn external_traffic_policy_local_serves_this_nodes_pods_and_answers_the_health_check() {
    let mut sandbox = sandbox("semlocal", 2, |sandbox| {
        sandbox.external_traffic_policy = "Local";
        sandbox.spec_extra = format!("  healthCheckNodePort: {HEALTH_CHECK_PORT}\n");
        sandbox.pod_nodes.insert(2, "other-node".into());
    });
    let local_pod = sandbox.pods[&1].name.clone();
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let answers = sandbox.http_batch(vip, 12).unwrap();
        assert!(
            answers.iter().all(|a| *a == local_pod),
            "{vip}: {answers:?}"
        );
    }
    let (status, body) = health_check(&sandbox);
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["localEndpoints"], 1, "{body}");
    assert_eq!(body["service"]["name"], "tomcat-load-balancer", "{body}");
    assert_eq!(body["service"]["namespace"], "default", "{body}");

    // Pod 1 moves to the other node too: nothing local is left.
    sandbox.pod_nodes.insert(1, "other-node".into());
    sandbox.write_endpoints(&[(1, Ready), (2, Ready)]).unwrap();
    sandbox.wait_applied(2).unwrap();
    let (status, body) = health_check(&sandbox);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    let (result, _) = try_connect(&sandbox, IpAddr::V4(VIP4), Duration::from_millis(700));
    assert!(
        result
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "dropped, not refused: the Service has endpoints elsewhere: {result:?}"
    );
    let scrape = sandbox.scrape_metrics().unwrap();
    assert!(
        metric(
            &scrape,
            "lb_packets_total{reason=\"drop_no_local_backend\"}"
        ) > 0,
        "counted"
    );
}

/// Makes the client's link take the frames the node's XDP program sends back out of its
/// interface (XDP_TX: the refusals), as a NIC's wire does. A veth hands XDP_TX frames to its
/// peer's receive ring but wakes the peer to read them only when the peer runs an XDP program
/// of its own (the kernel's `veth_xdp_flush`), so the client's end gets the data plane's
/// XDP_PASS program, from a small data plane the sandbox holds.
fn client_takes_xdp_tx(sandbox: &mut Sandbox) {
    let mut dataplane = sandbox
        .client
        .enter(|| {
            Dataplane::load_with(LoadOptions {
                conntrack_size: 1024,
                max_backends: 16,
                pin_dir: None,
            })
        })
        .unwrap()
        .unwrap();
    sandbox
        .client
        .enter(|| dataplane.attach_pass("veth-client"))
        .unwrap()
        .unwrap();
    sandbox.hold(Box::new(dataplane));
}

/// A Service without endpoints refuses connections at once, as kube-proxy's REJECT rules do:
/// a TCP SYN is answered with a reset and a UDP datagram with ICMP port unreachable, from XDP,
/// over IPv4 and IPv6; clients see "connection refused" in well under a second.
#[test]
fn a_service_without_endpoints_refuses_connections_at_once() {
    let sandbox = sandbox("semreject", 1, client_takes_xdp_tx);
    sandbox.write_endpoints(&[]).unwrap();
    sandbox.wait_applied(2).unwrap();
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let (result, took) = try_connect(&sandbox, vip, Duration::from_secs(3));
        assert!(
            result
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{vip}: {result:?}"
        );
        assert!(
            took < Duration::from_millis(500),
            "{vip}: refused after {took:?}"
        );
        let refused = sandbox
            .client
            .enter(move || -> std::io::Result<usize> {
                let bind: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                    .parse()
                    .unwrap();
                let socket = std::net::UdpSocket::bind(bind)?;
                socket.set_read_timeout(Some(Duration::from_secs(3)))?;
                socket.connect(SocketAddr::new(vip, PORT))?;
                socket.send(b"anyone?")?;
                socket.recv(&mut [0u8; 64])
            })
            .unwrap();
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{vip}: UDP {refused:?}"
        );
    }
    let scrape = sandbox.scrape_metrics().unwrap();
    assert!(
        metric(&scrape, "lb_packets_total{reason=\"reject_tcp\"}") >= 2,
        "counted"
    );
    assert!(
        metric(&scrape, "lb_packets_total{reason=\"reject_udp\"}") >= 2,
        "counted"
    );
}

/// `loadBalancerSourceRanges` admits only its clients through the load balancer IPs, and a
/// live edit takes effect within the reload budget, established connections included.
#[test]
fn source_ranges_admit_only_their_clients_and_follow_live_edits() {
    let mut sandbox = sandbox("semranges", 1, |sandbox| {
        sandbox.spec_extra =
            "  loadBalancerSourceRanges: [203.0.113.0/24, 2001:db8:ffff::/48]\n".into();
    });
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let (result, _) = try_connect(&sandbox, vip, Duration::from_millis(500));
        assert!(
            result
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
            "{vip}: dropped, client outside the ranges: {result:?}"
        );
    }
    let dropped = metric(
        &sandbox.scrape_metrics().unwrap(),
        "lb_packets_total{reason=\"drop_source_range\"}",
    );
    assert!(dropped >= 2, "counted: {dropped}");

    // The client's networks join the ranges.
    sandbox.spec_extra =
        "  loadBalancerSourceRanges: [203.0.113.0/24, 198.18.0.0/24, 2001:db8::/64]\n".into();
    sandbox.write_service(1, false).unwrap();
    sandbox.wait_applied(2).unwrap();
    let pod = sandbox.pods[&1].name.clone();
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        assert_eq!(sandbox.http_get(vip).unwrap(), pod, "{vip}");
    }
    let mut held = lb_tests::sandbox::HeldConnection::open(&sandbox, IpAddr::V4(VIP4)).unwrap();
    assert_eq!(held.get().unwrap(), pod);

    // And leave them again: new and established connections alike are cut off.
    sandbox.spec_extra = "  loadBalancerSourceRanges: [203.0.113.0/24]\n".into();
    sandbox.write_service(1, false).unwrap();
    sandbox.wait_applied(3).unwrap();
    let (result, _) = try_connect(&sandbox, IpAddr::V4(VIP4), Duration::from_millis(500));
    assert!(result.is_err(), "{result:?}");
    assert!(
        held.get().is_err(),
        "an established connection is cut off too"
    );
}
