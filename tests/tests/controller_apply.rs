//! The controller's diffing against the real maps: ids stay stable, only what changed is
//! written, removed backends' flows are cleared, removed services disappear.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use lb_common::{FlowCounter, Reason};
use lb_tests::{frames::Spec, netns::Netns};

mod harness;
use lb_userspace::{
    Dataplane,
    controller::{AppliedState, ApplyReport, ApplyStep, Controller},
    manifest::{self, Manifests},
    model::{self, Cluster, Options},
};

fn cluster(pods: &[&str], extra: &str) -> Cluster {
    let mut yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  externalIPs: [198.18.100.1]\n  ports:\n  - port: 8080\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\nsubsets:\n- addresses:\n".to_owned();
    for pod in pods {
        yaml += &format!("  - ip: {pod}\n");
    }
    yaml += extra;
    let mut manifests = Manifests::default();
    manifest::read_text(&PathBuf::from("apply.yaml"), &yaml, &mut manifests).unwrap();
    model::build(&manifests, &Options::default()).unwrap()
}

/// A controller over a freshly loaded data plane with nothing applied and no state file.
fn fresh_controller(options: Options) -> Controller {
    Controller::new(
        Dataplane::load().unwrap(),
        AppliedState::default(),
        None,
        options,
    )
}

#[test]
fn apply_diffs_against_what_is_applied() {
    let ns = Netns::create("apply").unwrap();
    ns.enter(|| {
        let dataplane = Dataplane::load().unwrap();
        let mut controller =
            Controller::new(dataplane, AppliedState::default(), None, Options::default());
        let three = cluster(&["198.18.1.1", "198.18.1.2", "198.18.1.3"], "");
        let report = controller.apply(&three).unwrap();
        assert_eq!(
            report,
            ApplyReport {
                added: 1,
                ..ApplyReport::default()
            }
        );
        let ids: Vec<u32> = controller.state().services[0]
            .backends
            .iter()
            .map(|b| b.id)
            .collect();

        // Same state again: nothing to write.
        assert_eq!(controller.apply(&three).unwrap(), ApplyReport::default());

        // Flows to every backend: each new flow's frame comes out rewritten to one of the
        // three, whole (XDP_PASS: no route in this namespace, the kernel forwards it).
        let program = controller.dataplane().xdp_program().unwrap();
        let mut placed = [0usize; 3];
        for port in 0..60u16 {
            let client = IpAddr::from([198, 18, 0, 1]);
            let frame = Spec::tcp(client, 10000 + port, IpAddr::from([198, 18, 100, 1]), 8080);
            let (verdict, output) = harness::run_xdp(program, &frame.build(), None);
            assert_eq!(verdict, harness::XDP_PASS);
            let backend = harness::backend_on(&output, 8080);
            assert!((1..=3).contains(&backend), "flow {port} went to .{backend}");
            assert_eq!(
                output,
                frame.to(harness::backend4(backend), 8080).build(),
                "flow {port}"
            );
            placed[usize::from(backend - 1)] += 1;
        }
        assert!(placed.iter().all(|n| *n > 0), "{placed:?}");
        assert_eq!(controller.dataplane().flows().unwrap().len(), 60);

        // Remove one backend: its slot is emptied and exactly its flows cleared (the ones
        // whose frames went to it); the others keep their ids and flows.
        let two = cluster(&["198.18.1.1", "198.18.1.3"], "");
        let report = controller.apply(&two).unwrap();
        assert_eq!(
            report,
            ApplyReport {
                changed: 1,
                backends_removed: 1,
                flows_cleared: placed[1],
                ..ApplyReport::default()
            }
        );
        let kept: Vec<u32> = controller.state().services[0]
            .backends
            .iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(
            kept,
            vec![ids[0], ids[2]],
            "surviving backends keep their ids"
        );
        let flows = controller.dataplane().flows().unwrap();
        assert_eq!(flows.len(), placed[0] + placed[2]);
        assert!(flows.iter().all(|(_, v)| v.backend_id != ids[1]));

        // Adding a backend changes the table and removes nothing.
        let report = controller
            .apply(&cluster(&["198.18.1.1", "198.18.1.3", "198.18.1.4"], ""))
            .unwrap();
        assert_eq!(
            report,
            ApplyReport {
                changed: 1,
                ..ApplyReport::default()
            }
        );

        // The service goes away entirely.
        let report = controller.apply(&Cluster::default()).unwrap();
        assert_eq!(
            report,
            ApplyReport {
                removed: 1,
                backends_removed: 3,
                flows_cleared: placed[0] + placed[2],
                ..ApplyReport::default()
            }
        );
        assert!(controller.dataplane().flows().unwrap().is_empty());
        assert!(controller.state().services.is_empty());
    })
    .unwrap();
}

#[test]
fn node_ports_are_served_on_the_node_addresses() {
    let ns = Netns::create("nodeport").unwrap();
    ns.enter(|| {
        let options = Options {
            node_ips: vec!["198.18.0.2".parse().unwrap()],
            ..Options::default()
        };
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: NodePort\n  externalIPs: [198.18.100.1]\n  ports:\n  - port: 8080\n    nodePort: 30854\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\nsubsets:\n- addresses:\n  - ip: 198.18.1.1\n";
        let mut manifests = Manifests::default();
        manifest::read_text(&PathBuf::from("nodeport.yaml"), yaml, &mut manifests).unwrap();
        let cluster = model::build(&manifests, &options).unwrap();
        let mut controller = fresh_controller(options);
        controller.apply(&cluster).unwrap();
        let frontends: Vec<String> = controller.state().services.iter().map(|s| s.frontends_text()).collect();
        assert_eq!(frontends, ["198.18.0.2:30854/TCP, 198.18.100.1:8080/TCP"], "one service port, one data-plane service");
        // A packet to the node port is DNATed to the endpoint's port.
        let frame = Spec::tcp(IpAddr::from([198, 18, 0, 1]), 5555, IpAddr::from([198, 18, 0, 2]), 30854).build();
        let program = controller.dataplane().xdp_program().unwrap();
        let (verdict, output) = harness::run_xdp(program, &frame, None);
        assert_eq!(verdict, harness::XDP_PASS);
        assert_eq!(output, Spec::tcp(IpAddr::from([198, 18, 0, 1]), 5555, IpAddr::from([198, 18, 1, 1]), 8080).build());
        // The node IP is the host's own: what is not its services' passes (here a fragment of
        // the host's own traffic), while the same to the external IP, which the load balancer
        // owns, is dropped.
        let verdict = |dst: [u8; 4]| {
            let mut spec = Spec::udp(IpAddr::from([198, 18, 0, 1]), 5555, IpAddr::from(dst), 53);
            spec.fragment_offset = 100;
            spec.identification = 77;
            harness::run_xdp(program, &spec.build(), None).0
        };
        assert_eq!(verdict([198, 18, 0, 2]), harness::XDP_PASS, "on the node IP");
        assert_eq!(verdict([198, 18, 100, 1]), harness::XDP_DROP, "on the external IP");
    })
    .unwrap();
}

/// The `web` service with an EndpointSlice: (address, terminating) per endpoint.
fn sliced(endpoints: &[(&str, bool)]) -> Cluster {
    let mut yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  externalIPs: [198.18.100.1]\n  ports:\n  - port: 8080\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- port: 8080\nendpoints:\n".to_owned();
    for (addr, terminating) in endpoints {
        yaml += &format!(
            "- addresses: [{addr}]\n  conditions: {{ready: {}, serving: true, terminating: {terminating}}}\n",
            !terminating
        );
    }
    let mut manifests = Manifests::default();
    manifest::read_text(&PathBuf::from("sliced.yaml"), &yaml, &mut manifests).unwrap();
    model::build(&manifests, &Options::default()).unwrap()
}

/// Runs `count` new TCP flows (client ports from `*next_port` on) to 198.18.100.1:8080 through
/// the XDP program; returns how many were refused for want of a backend (answered with an RST,
/// or dropped). Every frame is either passed on (DNATed) or refused, and the counters agree
/// with the verdicts.
fn new_flows(dataplane: &Dataplane, next_port: &mut u16, count: u16) -> u64 {
    let refused = || {
        [Reason::RejectTcp, Reason::DropNoBackend]
            .map(|reason| dataplane.reason_counter(reason).unwrap().packets)
            .iter()
            .sum::<u64>()
    };
    let before = refused();
    let program = dataplane.xdp_program().unwrap();
    let mut refused_verdicts = 0;
    for _ in 0..count {
        let frame = Spec::tcp(
            IpAddr::from([198, 18, 0, 1]),
            *next_port,
            IpAddr::from([198, 18, 100, 1]),
            8080,
        )
        .build();
        *next_port += 1;
        match harness::run_xdp(program, &frame, None).0 {
            harness::XDP_PASS => {}
            harness::XDP_TX | harness::XDP_DROP => refused_verdicts += 1,
            other => panic!("verdict {other} for a new flow"),
        }
    }
    let counted = refused() - before;
    assert_eq!(
        counted, refused_verdicts,
        "refusals counted against verdicts"
    );
    counted
}

/// A backend turning terminating is flagged only once no table names it: new flows arriving
/// between any two steps of the apply all find a backend (the data plane refuses terminating
/// backends to new flows, so a flag written while the old table still names the backend drops
/// the new flows of its slots).
#[test]
fn no_step_of_an_apply_drops_new_flows_when_a_backend_turns_terminating() {
    let ns = Netns::create("drain").unwrap();
    ns.enter(|| {
        let mut controller = fresh_controller(Options::default());
        let pods = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
        controller
            .apply(&sliced(&pods.map(|p| (p, false))))
            .unwrap();
        let drained = controller.state().services[0].backends[1].id;

        // Probe every step: 300 new flows, about 100 of them hashing to the slots of the
        // backend about to drain.
        let steps: Arc<Mutex<Vec<(ApplyStep, u64)>>> = Arc::default();
        let mut next_port = 20_000;
        {
            let steps = steps.clone();
            controller.on_step(move |step, dataplane| {
                let dropped = new_flows(dataplane, &mut next_port, 300);
                steps.lock().unwrap().push((step, dropped));
            });
        }
        controller
            .apply(&sliced(&[
                (pods[0], false),
                (pods[1], true),
                (pods[2], false),
            ]))
            .unwrap();
        let steps = steps.lock().unwrap().clone();
        assert_eq!(
            steps.iter().map(|(step, _)| *step).collect::<Vec<_>>(),
            [
                ApplyStep::BackendsAdded,
                ApplyStep::TablesSwapped,
                ApplyStep::BackendsDraining,
                ApplyStep::ServicesWritten,
                ApplyStep::Retired,
            ]
        );
        assert!(
            steps.iter().all(|(_, dropped)| *dropped == 0),
            "new flows dropped between steps: {steps:?}"
        );

        // And it did drain: flagged, out of the fallback table (it keeps its first-table
        // slots, so no other backend's flows move), no new flow placed on it.
        let service = &controller.state().services[0];
        assert!(service.backends[1].terminating && service.backends[1].id == drained);
        let table = service.maglev_table().unwrap().unwrap();
        assert!(table.first().contains(&drained));
        assert!(!table.fallback().unwrap().contains(&drained));
        let flows_before = controller.dataplane().flows().unwrap().len();
        let mut port = 40_000;
        assert_eq!(new_flows(controller.dataplane(), &mut port, 300), 0);
        let flows = controller.dataplane().flows().unwrap();
        assert_eq!(flows.len(), flows_before + 300);
        assert!(
            flows
                .iter()
                .filter(|(k, _)| k.sport >= 40_000)
                .all(|(_, v)| v.backend_id != drained),
            "a new flow on the terminating backend"
        );
    })
    .unwrap();
}

/// An id freed by one apply and handed out by a later one starts with zero counters: the views
/// and metrics of the new service or backend must not show its predecessor's traffic.
#[test]
fn recycled_ids_start_with_zero_counters() {
    let ns = Netns::create("recycle").unwrap();
    ns.enter(|| {
        let mut controller = fresh_controller(Options::default());
        controller
            .apply(&sliced(&[("198.18.1.1", false), ("198.18.1.2", false)]))
            .unwrap();
        let service = controller.state().services[0].id;
        let gone = controller.state().services[0].backends[1].id;
        let mut port = 10_000;
        new_flows(controller.dataplane(), &mut port, 100);
        // Counted exactly: one packet per flow, and the flows the table holds for the backend.
        let counted = controller.dataplane().backend_counter(gone).unwrap();
        let placed = controller
            .dataplane()
            .flows()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.backend_id == gone)
            .count();
        assert!(placed > 0);
        assert_eq!(counted.new_flows, placed as u64, "{counted:?}");
        assert_eq!(
            controller
                .dataplane()
                .service_counter(service)
                .unwrap()
                .packets,
            100
        );

        // 198.18.1.2 goes; 198.18.1.4 comes in the next apply and gets its id back.
        controller.apply(&sliced(&[("198.18.1.1", false)])).unwrap();
        controller
            .apply(&sliced(&[("198.18.1.1", false), ("198.18.1.4", false)]))
            .unwrap();
        let newcomer = &controller.state().services[0].backends[1];
        assert_eq!(
            (newcomer.addr.to_string().as_str(), newcomer.id),
            ("198.18.1.4", gone)
        );
        assert_eq!(
            controller.dataplane().backend_counter(gone).unwrap(),
            FlowCounter::default()
        );

        // The service goes, and another takes its id.
        controller.apply(&Cluster::default()).unwrap();
        controller.apply(&cluster(&["198.18.1.1"], "")).unwrap();
        assert_eq!(controller.state().services[0].id, service);
        assert_eq!(
            controller.dataplane().service_counter(service).unwrap(),
            FlowCounter::default()
        );
    })
    .unwrap();
}

/// `explain` answers what the data plane does for the same flow: for new flows (Maglev), for
/// the same flows once tracked (conntrack), and after a backend is removed (its flows placed
/// afresh), the endpoint it names is the one the XDP program rewrites the frame to.
#[test]
fn explain_names_the_backend_the_data_plane_picks() {
    let ns = Netns::create("explain").unwrap();
    let roots = lb_tests::Roots::new("explain");
    ns.enter(|| {
        let paths = lb_userspace::pins::Paths::new(
            std::path::Path::new(&roots.pin_root),
            std::path::Path::new(&roots.state_root),
            "veth-x",
        );
        paths
            .prepare(std::path::Path::new(&roots.pin_root))
            .unwrap();
        let dataplane = Dataplane::load_with(lb_userspace::dataplane::LoadOptions {
            pin_dir: Some(paths.pin_dir.clone()),
            ..Default::default()
        })
        .unwrap();
        let mut controller = Controller::new(
            dataplane,
            AppliedState::default(),
            Some(paths.state_file.clone()),
            Options::default(),
        );
        controller
            .apply(&cluster(&["198.18.1.1", "198.18.1.2", "198.18.1.3"], ""))
            .unwrap();
        let client = IpAddr::from([198, 18, 0, 1]);
        let flow = |port: u16| Spec::tcp(client, port, IpAddr::from([198, 18, 100, 1]), 8080);
        // What `lb-userspace explain` prints, as JSON: (endpoint, decided by).
        let explain = |port: u16| {
            let all = lb_userspace::views::read_all(
                std::path::Path::new(&roots.state_root),
                std::path::Path::new(&roots.pin_root),
            )
            .unwrap();
            let json = lb_userspace::views::explain(
                &all,
                &format!("{client}:{port}"),
                "198.18.100.1:8080/TCP",
                lb_userspace::views::Format::Json,
            )
            .unwrap();
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            // The detail is one readable sentence: no run of spaces left by a broken literal.
            let detail = value["detail"].as_str().unwrap();
            assert!(!detail.contains("  "), "{detail:?}");
            (
                value["endpoint"].as_str().unwrap_or("<none>").to_owned(),
                value["decided_by"].as_str().unwrap().to_owned(),
            )
        };
        // Where the program sends a frame.
        let run = |controller: &Controller, frame: &Spec| {
            let program = controller.dataplane().xdp_program().unwrap();
            let (verdict, output) = harness::run_xdp(program, &frame.build(), None);
            assert_eq!(verdict, harness::XDP_PASS);
            format!("198.18.1.{}:8080", harness::backend_on(&output, 8080))
        };
        let ports = 30000..30200u16;
        let mut placed = BTreeMap::new();
        for port in ports.clone() {
            let (endpoint, decided_by) = explain(port);
            assert_eq!(decided_by, "maglev", "port {port}");
            assert_eq!(
                run(&controller, &flow(port)),
                endpoint,
                "new flow from port {port}"
            );
            placed.insert(port, endpoint.clone());
            // Now tracked: the same answer, by conntrack, and the next segment follows it.
            assert_eq!(explain(port), (endpoint.clone(), "conntrack".into()));
            assert_eq!(run(&controller, &flow(port).ack()), endpoint, "port {port}");
        }
        let mut on = BTreeMap::<&str, usize>::new();
        for endpoint in placed.values() {
            *on.entry(endpoint).or_default() += 1;
        }
        assert_eq!(on.len(), 3, "{on:?}");

        // 198.18.1.2 goes: its flows are cleared and placed afresh, the others stay tracked.
        controller
            .apply(&cluster(&["198.18.1.1", "198.18.1.3"], ""))
            .unwrap();
        for port in ports {
            let (endpoint, decided_by) = explain(port);
            assert_ne!(endpoint, "198.18.1.2:8080");
            // Exactly the removed backend's flows lost their entries.
            let was = &placed[&port];
            assert_eq!(
                decided_by == "maglev",
                was == "198.18.1.2:8080",
                "port {port}, on {was}"
            );
            // A SYN is placed afresh, a tracked flow's next segment follows its entry.
            let frame = match decided_by.as_str() {
                "maglev" => flow(port),
                "conntrack" => flow(port).ack(),
                other => panic!("port {port} decided by {other}"),
            };
            assert_eq!(
                run(&controller, &frame),
                endpoint,
                "port {port} after removal"
            );
        }
    })
    .unwrap();
}

/// The backend capacity a data plane is loaded with (`--max-backends`) sizes its backend maps
/// and bounds the controller's ids: endpoints up to it apply, one more is refused with the
/// capacity named, and what was serving keeps serving.
#[test]
fn the_backend_capacity_is_what_the_data_plane_was_loaded_with() {
    let ns = Netns::create("capacity").unwrap();
    ns.enter(|| {
        let dataplane = Dataplane::load_with(lb_userspace::dataplane::LoadOptions {
            max_backends: 3,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(dataplane.max_backends(), 3);
        let mut controller =
            Controller::new(dataplane, AppliedState::default(), None, Options::default());
        let three = cluster(&["198.18.1.1", "198.18.1.2", "198.18.1.3"], "");
        controller.apply(&three).unwrap();
        let four = cluster(
            &["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"],
            "",
        );
        let refused = controller.apply(&four).unwrap_err().to_string();
        assert!(
            refused.contains("backend") && refused.contains('3'),
            "{refused}"
        );
        assert_eq!(controller.state().services[0].backends.len(), 3);
    })
    .unwrap();
}
