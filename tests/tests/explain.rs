//! `explain` runs the kernel's own selection (`lb_common::select`) over the pinned maps: for
//! 10,000 flows (new flows placed by Maglev, tracked flows, ClientIP affinity fresh, expired and
//! naming a backend that turned terminating) the backend it names is the one the XDP program
//! sends the flow's next packet to.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{AffinityKey, AffinityValue, maps::names};
use lb_tests::{frames::Spec, netns::Netns};
use lb_userspace::{
    Dataplane,
    controller::{AppliedState, Controller, addr16},
    manifest::{self, Manifests},
    model::{self, Cluster, Options},
    views::{self, Attached, Format},
};

mod harness;

const WEB: [u8; 4] = [198, 18, 100, 1];
const STICKY: [u8; 4] = [198, 18, 100, 2];
const TIMEOUT_SECS: u64 = 100;

fn service(name: &str, vip: [u8; 4], affinity: &str, pods: &[(String, bool)]) -> String {
    let [a, b, c, d] = vip;
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  externalIPs: \
         [{a}.{b}.{c}.{d}]\n{affinity}  ports:\n  - port: 8080\n---\napiVersion: \
         discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  labels:\n    \
         kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- port: 8080\n\
         endpoints:\n"
    );
    for (pod, terminating) in pods {
        let conditions = if *terminating {
            "{ready: false, serving: true, terminating: true}"
        } else {
            "{ready: true, serving: true, terminating: false}"
        };
        yaml += &format!("- addresses: [{pod}]\n  conditions: {conditions}\n");
    }
    yaml
}

/// `web` (no affinity) on four pods, `sticky` (ClientIP affinity) on four others, the first of
/// them terminating when `terminating`.
fn cluster(terminating: bool) -> Cluster {
    let pods = |net: u8| -> Vec<(String, bool)> {
        (1..=4u8)
            .map(|i| (format!("198.18.{net}.{i}"), terminating && i == 1))
            .collect()
    };
    let web: Vec<_> = pods(1).into_iter().map(|(p, _)| (p, false)).collect();
    let affinity = format!(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
         timeoutSeconds: {TIMEOUT_SECS}\n"
    );
    let yaml =
        service("web", WEB, "", &web) + "---\n" + &service("sticky", STICKY, &affinity, &pods(2));
    let mut manifests = Manifests::default();
    manifest::read_text(&PathBuf::from("explain.yaml"), &yaml, &mut manifests).unwrap();
    model::build(&manifests, &Options::default()).unwrap()
}

/// Compares `explain`'s answer for flows with the kernel's placement of them.
struct Check<'a> {
    controller: &'a Controller,
    all: Vec<Attached>,
    compared: usize,
}

impl Check<'_> {
    /// What `explain` says of `frame`'s flow, then where the program sends `frame`: both must
    /// name the same endpoint. Returns how explain decided.
    fn flow(&mut self, frame: &Spec, client: IpAddr, sport: u16, vip: [u8; 4]) -> String {
        let [a, b, c, d] = vip;
        let json = views::explain(
            &self.all,
            &format!("{client}:{sport}"),
            &format!("{a}.{b}.{c}.{d}:8080/TCP"),
            Format::Json,
        )
        .unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let explained = value["endpoint"].as_str().unwrap_or("<none>").to_owned();
        let decided_by = value["decided_by"].as_str().unwrap().to_owned();
        let program = self.controller.dataplane().xdp_program().unwrap();
        let (verdict, output) = harness::run_xdp(program, &frame.build(), None);
        assert_eq!(verdict, harness::XDP_PASS, "{client}:{sport} -> {vip:?}");
        let picked = destination(&output);
        assert_eq!(
            picked, explained,
            "{client}:{sport} -> {vip:?}: the kernel picked {picked}, explain says {explained} \
             ({decided_by}: {})",
            value["detail"]
        );
        self.compared += 1;
        decided_by
    }

    fn reread(&mut self, roots: &lb_tests::Roots) {
        self.all =
            views::read_all(Path::new(&roots.state_root), Path::new(&roots.pin_root)).unwrap();
    }
}

/// Where an output frame is sent (IPv4, no options).
fn destination(output: &[u8]) -> String {
    let ip = IpAddr::from(<[u8; 4]>::try_from(&output[30..34]).unwrap());
    let port = u16::from_be_bytes([output[36], output[37]]);
    SocketAddr::new(ip, port).to_string()
}

fn affinity_map(pin_dir: &Path) -> HashMap<MapData, AffinityKey, AffinityValue> {
    let data = MapData::from_pin(pin_dir.join(names::AFFINITY)).unwrap();
    Map::from_map_data(data).unwrap().try_into().unwrap()
}

#[test]
fn explain_names_the_backend_the_kernel_picks_for_every_kind_of_decision() {
    let ns = Netns::create("explainsel").unwrap();
    let roots = lb_tests::Roots::new("explainsel");
    ns.enter(|| {
        let paths = lb_userspace::pins::Paths::new(
            Path::new(&roots.pin_root),
            Path::new(&roots.state_root),
            "veth-x",
        );
        paths.prepare(Path::new(&roots.pin_root)).unwrap();
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
        controller.apply(&cluster(false)).unwrap();
        let sticky_id = controller
            .state()
            .services
            .iter()
            .find(|s| s.name == "sticky")
            .unwrap()
            .id;
        let sticky_backends: Vec<u32> = controller
            .state()
            .services
            .iter()
            .find(|s| s.name == "sticky")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.id)
            .collect();
        let mut decided = std::collections::BTreeMap::<String, usize>::new();
        let mut check = Check {
            controller: &controller,
            all: Vec::new(),
            compared: 0,
        };
        check.reread(&roots);
        let client = |i: u32| IpAddr::from([198, 19, (i >> 8) as u8, i as u8]);
        let vip = |v: [u8; 4]| IpAddr::from(v);

        // web: new flows (Maglev by the flow hash), then each one's next segment (tracked).
        for i in 0..2000u32 {
            let (c, port) = (client(i % 64), 20_000 + i as u16);
            let syn = Spec::tcp(c, port, vip(WEB), 8080);
            *decided.entry(check.flow(&syn, c, port, WEB)).or_default() += 1;
            *decided
                .entry(check.flow(&syn.ack(), c, port, WEB))
                .or_default() += 1;
        }
        // sticky: a client's first connection (Maglev by the client hash), then another one
        // from a new port (affinity).
        for i in 0..1000u32 {
            let c = client(1000 + i);
            let first = Spec::tcp(c, 30_000, vip(STICKY), 8080);
            *decided
                .entry(check.flow(&first, c, 30_000, STICKY))
                .or_default() += 1;
            let second = Spec::tcp(c, 30_001, vip(STICKY), 8080);
            *decided
                .entry(check.flow(&second, c, 30_001, STICKY))
                .or_default() += 1;
        }
        // Affinity entries written behind the kernel's back, on the clock it reads: fresh ones
        // (used 50 s ago) and expired ones (used 150 s ago, past the 100 s timeout), each naming
        // a backend picked by the client's number, not by its hash.
        let now = lb_userspace::conntrack::now_ns();
        let mut affinity = affinity_map(&paths.pin_dir);
        for i in 0..1000u32 {
            let c = client(3000 + i);
            let age_secs = if i % 2 == 0 { 50 } else { 150 };
            affinity
                .insert(
                    AffinityKey {
                        client: addr16(c),
                        service_id: sticky_id,
                    },
                    AffinityValue {
                        backend_id: sticky_backends[i as usize % sticky_backends.len()],
                        pad: 0,
                        last_used_ns: now - age_secs * 1_000_000_000,
                    },
                    0,
                )
                .unwrap();
        }
        for i in 0..1000u32 {
            let c = client(3000 + i);
            let syn = Spec::tcp(c, 30_000, vip(STICKY), 8080);
            let by = check.flow(&syn, c, 30_000, STICKY);
            let expect = if i % 2 == 0 { "affinity" } else { "maglev" };
            assert_eq!(
                by,
                expect,
                "client {c}, entry {}s old",
                if i % 2 == 0 { 50 } else { 150 }
            );
            *decided.entry(by).or_default() += 1;
        }

        // sticky's first pod turns terminating: affinity entries naming it no longer hold
        // (Maglev places those clients anew), new clients never reach it, tracked flows on it
        // keep it.
        drop(check);
        controller.apply(&cluster(true)).unwrap();
        let mut check = Check {
            controller: &controller,
            all: Vec::new(),
            compared: 4000 + 2000 + 1000,
        };
        check.reread(&roots);
        let mut on_terminating = 0;
        for i in 0..1000u32 {
            let c = client(1000 + i);
            // The tracked first connection's next segment.
            let ack = Spec::tcp(c, 30_000, vip(STICKY), 8080).ack();
            *decided
                .entry(check.flow(&ack, c, 30_000, STICKY))
                .or_default() += 1;
            // A new connection.
            let syn = Spec::tcp(c, 30_002, vip(STICKY), 8080);
            let by = check.flow(&syn, c, 30_002, STICKY);
            if by == "maglev" {
                on_terminating += 1;
            }
            *decided.entry(by).or_default() += 1;
        }
        for i in 0..1000u32 {
            let c = client(5000 + i);
            let syn = Spec::tcp(c, 30_000, vip(STICKY), 8080);
            *decided
                .entry(check.flow(&syn, c, 30_000, STICKY))
                .or_default() += 1;
        }
        assert_eq!(check.compared, 10_000);
        // Every kind of decision was exercised.
        assert!(decided["conntrack"] >= 3000, "{decided:?}");
        assert!(decided["affinity"] >= 1000, "{decided:?}");
        assert!(decided["maglev"] >= 3000, "{decided:?}");
        // About a quarter of the clients had the now-terminating pod.
        assert!(
            (100..500).contains(&on_terminating),
            "{on_terminating} {decided:?}"
        );
    })
    .unwrap();
}
