//! Churn soak in the sandbox: endpoints change ten times a second while clients keep sending
//! requests and hold connections. Bounded (`LB_SOAK_SECONDS`, default 3; `cargo xtask soak`
//! runs a long one). Checked: no answer ever comes from a pod that was never an endpoint; no
//! held connection to the pod that stays an endpoint throughout breaks; nothing is dropped for
//! want of a backend; afterwards the maps hold no entry of a removed backend.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{FlowKey, FlowValue};
use lb_tests::sandbox::{
    Binaries,
    EndpointState::{self, Ready},
    HeldConnection, Sandbox, VIP4,
};

#[test]
fn endpoints_churning_ten_times_a_second_never_misroute_or_break_surviving_flows() {
    let seconds: u64 = std::env::var("LB_SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = lb_tests::lb_userspace_bin();
    let mut sandbox = Sandbox::up("soak", Binaries::in_dir(dir.parent().unwrap())).unwrap();
    // Pod 5 runs but is never an endpoint: it must never answer.
    for index in 1..=5 {
        sandbox.start_pod(index).unwrap();
    }
    sandbox.write_service(4, false).unwrap();
    sandbox
        .write_endpoints(&[(1, Ready), (2, Ready), (3, Ready), (4, Ready)])
        .unwrap();
    sandbox.start_controller(false).unwrap();
    let vip = IpAddr::V4(VIP4);
    let sandbox = Arc::new(sandbox);

    // Held connections; those on pod 1, which stays an endpoint throughout, must never break.
    let mut held: Vec<(HeldConnection, String)> = (0..24)
        .map(|_| {
            let mut c = HeldConnection::open(&sandbox, vip).unwrap();
            let pod = c.get().unwrap();
            (c, pod)
        })
        .collect();
    let survivors = held.iter().filter(|(_, p)| p.ends_with("-1")).count();

    let stop = Arc::new(AtomicBool::new(false));
    let clients = {
        let (sandbox, stop) = (sandbox.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            let mut failures = 0u32;
            while !stop.load(Ordering::Relaxed) {
                match sandbox.http_get(vip) {
                    Ok(pod) => answers.push(pod),
                    // A request placed on a pod removed in the same instant may fail.
                    Err(_) => failures += 1,
                }
            }
            (answers, failures)
        })
    };

    let start = Instant::now();
    let mut changes = 0usize;
    let mut seed = 0x2545_f491u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut endpoints: Vec<(u8, EndpointState)> = vec![(1, Ready)];
        for pod in 2..=4u8 {
            if (seed >> (pod * 8)) & 1 == 1 {
                endpoints.push((pod, Ready));
            }
        }
        sandbox.write_endpoints(&endpoints).unwrap();
        changes += 1;
        std::thread::sleep(Duration::from_millis(100));
        for (connection, pod) in held.iter_mut().filter(|(_, p)| p.ends_with("-1")) {
            assert_eq!(
                &connection.get().unwrap(),
                pod,
                "a connection to the surviving pod broke"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (answers, failures) = clients.join().unwrap();
    let pods: BTreeSet<&str> = answers.iter().map(String::as_str).collect();
    assert!(
        !pods.iter().any(|p| p.ends_with("-5")),
        "a pod that was never an endpoint answered"
    );
    assert!(answers.len() > 50, "{} requests answered", answers.len());

    // Nothing was dropped for want of a backend, or as malformed.
    let metrics = sandbox.scrape_metrics().unwrap();
    for reason in ["drop_no_backend", "drop_malformed", "reverse_nat_failed"] {
        let line = format!("lb_packets_total{{reason=\"{reason}\"}} 0");
        assert!(metrics.contains(&line), "{reason} moved:\n{metrics}");
    }

    // Back to the start; nothing of a removed backend may stay in the maps.
    sandbox
        .write_endpoints(&[(1, Ready), (2, Ready), (3, Ready), (4, Ready)])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(&sandbox.roots.state_root).join("veth-node.json"))
            .unwrap(),
    )
    .unwrap();
    let live: BTreeSet<u64> = state["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["id"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        live.len(),
        6 * 4,
        "back to the start: 3 VIPs (cluster IP, load balancer IPv4 and IPv6) x TCP and UDP, 4 pods each"
    );
    let conntrack = Map::from_map_data(
        MapData::from_pin(PathBuf::from(&sandbox.roots.pin_root).join("veth-node/CONNTRACK"))
            .unwrap(),
    )
    .unwrap();
    let conntrack: HashMap<_, FlowKey, FlowValue> = conntrack.try_into().unwrap();
    let stale = conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| !live.contains(&u64::from(v.backend_id)))
        .count();
    assert_eq!(
        stale, 0,
        "flows of removed backends left in the connection table"
    );
    println!(
        "soak: {seconds} s, {changes} endpoint changes, {} requests answered ({} failed while their pod was removed), {survivors} held connections to the surviving pod unbroken",
        answers.len(),
        failures
    );
}
