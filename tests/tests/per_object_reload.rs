//! Reloads are per object (issue 15): the real controller in the veth sandbox serves ten
//! Services of one file; a reload where one of them turns invalid keeps the other nine serving
//! (and takes their changes), keeps the invalid one at its previous version, and reports it: a
//! `configuration rejected` log line naming file, object and field, and a `Rejected` event on
//! its Service.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, time::Duration};

use lb_tests::sandbox::{Binaries, EndpointState::Ready, Sandbox, write_atomically};

const SERVICES: usize = 10;

/// The VIP of Service `i` (the sandbox routes 198.18.200.0/24 through the node).
fn vip(i: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 200, 10 + i as u8))
}

/// Ten Services `svc0`..`svc9`, each on its own VIP with pods 1 and 2 as endpoints; `bad` has
/// port 0, and `pod_2_only` lists pod 2 alone.
fn services(bad: Option<usize>, pod_2_only: Option<usize>) -> String {
    (0..SERVICES)
        .map(|i| {
            let port = if Some(i) == bad { 0 } else { 8080 };
            let pods = if Some(i) == pod_2_only {
                "  - ip: 198.18.2.1\n".to_owned()
            } else {
                "  - ip: 198.18.1.1\n  - ip: 198.18.2.1\n".to_owned()
            };
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc{i}\nspec:\n  type: \
                 LoadBalancer\n  externalIPs: [{vip}]\n  ports:\n  - port: {port}\n    \
                 targetPort: 8080\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: \
                 svc{i}\nsubsets:\n- addresses:\n{pods}  ports:\n  - port: 8080\n",
                vip = vip(i)
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn served(sandbox: &Sandbox) -> BTreeSet<String> {
    let services: serde_json::Value =
        serde_json::from_str(&sandbox.cli(&["get", "services", "-o", "json"]).unwrap()).unwrap();
    services["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_reload_with_one_bad_service_among_ten_keeps_the_nine_serving_and_reports_the_one() {
    let dir = lb_tests::lb_userspace_bin();
    let mut sandbox = Sandbox::up("perobj", Binaries::in_dir(dir.parent().unwrap())).unwrap();
    for index in 1..=2 {
        sandbox.start_pod(index).unwrap();
    }
    sandbox.write_service(2, false).unwrap();
    sandbox.write_endpoints(&[(1, Ready), (2, Ready)]).unwrap();
    let file = sandbox.config.path().join("ten.yaml");
    write_atomically(&file, &services(None, None)).unwrap();
    sandbox.start_controller(false).unwrap();
    let all: BTreeSet<String> = (0..SERVICES).map(|i| format!("svc{i}")).collect();
    assert!(served(&sandbox).is_superset(&all), "{:?}", served(&sandbox));
    for i in [3, 4] {
        let answers = sandbox.http_batch(vip(i), 4).unwrap();
        assert!(
            answers
                .iter()
                .all(|a| a.ends_with("-1") || a.ends_with("-2"))
        );
    }

    // svc4 turns invalid; svc3 changes validly (pod 2 only) in the same write.
    write_atomically(&file, &services(Some(4), Some(3))).unwrap();
    let controller = sandbox.controller.as_ref().unwrap();
    controller
        .wait_for("configuration rejected", 1, Duration::from_secs(10))
        .unwrap();
    let log = controller.text();
    let rejections: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("configuration rejected"))
        .collect();
    let [rejection] = rejections[..] else {
        panic!("one rejection: {rejections:?}")
    };
    let expected = format!(
        "{}: Service default/svc4: spec.ports[0].port: 0 is not a port (1..=65535)",
        file.display()
    );
    assert!(rejection.contains(&expected), "{rejection}");
    // The other objects went ahead: svc3 is served by pod 2 alone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answers = sandbox.http_batch(vip(3), 6).unwrap();
        if answers.iter().all(|a| a.ends_with("-2")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "svc3's change was not applied: {answers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // All ten still served: the nine, and svc4 at its previous version.
    assert!(served(&sandbox).is_superset(&all), "{:?}", served(&sandbox));
    for i in [0, 4, 9] {
        let answers = sandbox.http_batch(vip(i), 4).unwrap();
        assert!(
            answers
                .iter()
                .all(|a| a.ends_with("-1") || a.ends_with("-2")),
            "svc{i}: {answers:?}"
        );
    }
    // The rejection is svc4's event.
    let state = PathBuf::from(&sandbox.roots.state_root).join("veth-node.json");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    let events: Vec<&serde_json::Value> = state["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "Rejected")
        .collect();
    let [event] = events[..] else {
        panic!("one rejection event: {events:?}")
    };
    assert_eq!(
        (&event["namespace"], &event["name"]),
        (&"default".into(), &"svc4".into())
    );
    assert_eq!(event["kind"], "Warning");
    assert_eq!(
        event["message"],
        "spec.ports[0].port: 0 is not a port (1..=65535)"
    );
    // A reload that refused an object is not a successful one.
    let metrics = sandbox.scrape_metrics().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "lb_config_last_reload_successful 0"),
        "{metrics}"
    );
}
