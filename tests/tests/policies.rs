//! Kubernetes' Service semantics as kube-proxy implements them, through the controller and the
//! real XDP program: ClientIP affinity per Service port across its frontends, traffic policies
//! that keep external or internal traffic on this node's endpoints, cluster IPs served only when
//! asked for.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf};

use lb_common::Reason;
use lb_tests::frames::Spec;

mod harness;
use lb_userspace::{
    Dataplane,
    controller::{AppliedState, Controller, Scope},
    manifest::{self, Manifests},
    model::{self, Cluster, Options},
};

const LB_IP: [u8; 4] = [198, 18, 200, 1];
const EXTERNAL_IP: [u8; 4] = [198, 18, 200, 2];
const CLUSTER_IP: [u8; 4] = [198, 18, 100, 1];
const NODE_IP: [u8; 4] = [198, 18, 0, 2];
const NODE_PORT: u16 = 30080;

/// The `web` Service on every kind of frontend, with `spec_extra` in its spec and one
/// EndpointSlice listing `(address, node)`.
fn web(spec_extra: &str, endpoints: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 198.18.100.1\n  externalIPs: [198.18.200.2]\n{spec_extra}  ports:\n  - name: http\n    \
         port: 8080\n    nodePort: {NODE_PORT}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.18.200.1\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels:\n    \
         kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  port: 8080\nendpoints:\n"
    );
    for (addr, node) in endpoints {
        yaml += &format!("- addresses: [{addr}]\n  nodeName: {node}\n");
    }
    yaml
}

fn options() -> Options {
    Options {
        node_ips: vec![IpAddr::from(NODE_IP)],
        node_name: "node-a".into(),
        serve_cluster_ips: true,
        ..Options::default()
    }
}

fn build(yaml: &str, options: &Options) -> Cluster {
    let mut manifests = Manifests::default();
    manifest::read_text(&PathBuf::from("web.yaml"), yaml, &mut manifests).unwrap();
    model::build(&manifests, options).unwrap()
}

fn controller(options: Options) -> Controller {
    Controller::new(
        Dataplane::load().unwrap(),
        AppliedState::default(),
        None,
        options,
    )
}

/// Sends a TCP SYN from `client`:`sport` to `vip`:`port`; returns the verdict and the address
/// it was sent to (`None` unless passed on DNATed).
fn syn(
    dataplane: &Dataplane,
    client: [u8; 4],
    sport: u16,
    vip: [u8; 4],
    port: u16,
) -> (u32, Option<IpAddr>) {
    let frame = Spec::tcp(IpAddr::from(client), sport, IpAddr::from(vip), port).build();
    let (verdict, output) = harness::run_xdp(dataplane.xdp_program().unwrap(), &frame, None);
    if verdict != harness::XDP_PASS {
        return (verdict, None);
    }
    let dst: [u8; 4] = output[14 + 16..14 + 20].try_into().unwrap();
    (verdict, Some(IpAddr::from(dst)))
}

/// The endpoints that new flows of many clients reach through `vip`:`port`.
fn reached(dataplane: &Dataplane, vip: [u8; 4], port: u16) -> BTreeSet<IpAddr> {
    (0..64u8)
        .filter_map(|i| syn(dataplane, [198, 18, 5, i], 40_000 + u16::from(i), vip, port).1)
        .collect()
}

fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

/// kube-proxy keeps ClientIP affinity per Service port: a client placed through the load
/// balancer IP gets the same endpoint through the external IP, the cluster IP and the node
/// port. One data-plane service per Service port (and family) serves all of them.
#[test]
fn client_ip_affinity_is_kept_per_service_port_across_its_frontends() {
    harness::in_fresh_netns("affinity", |_| {
        let eps = [
            ("198.18.1.1", "node-a"),
            ("198.18.1.2", "node-a"),
            ("198.18.1.3", "node-a"),
            ("198.18.1.4", "node-a"),
        ];
        let yaml = web("  sessionAffinity: ClientIP\n", &eps);
        let mut controller = controller(options());
        controller.apply(&build(&yaml, &options())).unwrap();
        let services = &controller.state().services;
        assert_eq!(services.len(), 1, "one data-plane service: {services:?}");
        assert_eq!(services[0].frontends.len(), 4);
        assert_eq!(services[0].scope, Scope::All);
        let dataplane = controller.dataplane();
        for client in 0..12u8 {
            let client = [198, 18, 6, client];
            let first = syn(dataplane, client, 50_000, LB_IP, 8080).1.unwrap();
            // New connections (new client ports) through every other frontend.
            for (i, (vip, port)) in [
                (EXTERNAL_IP, 8080),
                (CLUSTER_IP, 8080),
                (NODE_IP, NODE_PORT),
            ]
            .into_iter()
            .enumerate()
            {
                let other = syn(dataplane, client, 50_001 + i as u16, vip, port)
                    .1
                    .unwrap();
                assert_eq!(other, first, "client {client:?} through {vip:?}:{port}");
            }
        }
    });
}

/// `externalTrafficPolicy: Local`: load balancer IPs, external IPs and node ports reach only
/// this node's endpoints, while cluster IPs reach all; with none on this node, external
/// traffic is dropped and counted, not refused (the Service has endpoints elsewhere).
#[test]
fn external_traffic_policy_local_keeps_external_traffic_on_this_nodes_endpoints() {
    harness::in_fresh_netns("etplocal", |_| {
        let eps = [
            ("198.18.1.1", "node-a"),
            ("198.18.1.2", "node-b"),
            ("198.18.1.3", "node-a"),
        ];
        let yaml = web(
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            &eps,
        );
        let mut controller = controller(options());
        controller.apply(&build(&yaml, &options())).unwrap();
        let scopes: Vec<(Scope, usize, usize)> = controller
            .state()
            .services
            .iter()
            .map(|s| (s.scope, s.frontends.len(), s.backends.len()))
            .collect();
        assert_eq!(scopes, [(Scope::External, 3, 2), (Scope::Internal, 1, 3)]);
        let dataplane = controller.dataplane();
        let local = addrs(&["198.18.1.1", "198.18.1.3"]);
        assert_eq!(reached(dataplane, LB_IP, 8080), local);
        assert_eq!(reached(dataplane, EXTERNAL_IP, 8080), local);
        assert_eq!(reached(dataplane, NODE_IP, NODE_PORT), local);
        assert_eq!(
            reached(dataplane, CLUSTER_IP, 8080),
            addrs(&["198.18.1.1", "198.18.1.2", "198.18.1.3"])
        );

        // Every endpoint moves to node-b: external traffic has nowhere to go on this node.
        let remote = [("198.18.1.2", "node-b"), ("198.18.1.4", "node-b")];
        let yaml = web(
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            &remote,
        );
        controller.apply(&build(&yaml, &options())).unwrap();
        let dataplane = controller.dataplane();
        let before = dataplane
            .reason_counter(Reason::DropNoLocalBackend)
            .unwrap()
            .packets;
        assert_eq!(
            syn(dataplane, [198, 18, 7, 1], 40_000, LB_IP, 8080).0,
            harness::XDP_DROP
        );
        assert_eq!(
            dataplane
                .reason_counter(Reason::DropNoLocalBackend)
                .unwrap()
                .packets,
            before + 1
        );
        assert_eq!(
            reached(dataplane, CLUSTER_IP, 8080),
            addrs(&["198.18.1.2", "198.18.1.4"])
        );
    });
}

/// `internalTrafficPolicy: Local`: cluster IPs reach only this node's endpoints; external
/// frontends reach all.
#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_this_nodes_endpoints() {
    harness::in_fresh_netns("itplocal", |_| {
        let eps = [("198.18.1.1", "node-a"), ("198.18.1.2", "node-b")];
        let yaml = web("  internalTrafficPolicy: Local\n", &eps);
        let mut controller = controller(options());
        controller.apply(&build(&yaml, &options())).unwrap();
        let dataplane = controller.dataplane();
        assert_eq!(reached(dataplane, CLUSTER_IP, 8080), addrs(&["198.18.1.1"]));
        assert_eq!(
            reached(dataplane, LB_IP, 8080),
            addrs(&["198.18.1.1", "198.18.1.2"])
        );
    });
}

/// Cluster IPs are the cluster's own addresses: not served on the client-facing interface
/// unless asked for; the Service's other frontends are.
#[test]
fn cluster_ips_are_not_served_unless_asked_for() {
    harness::in_fresh_netns("clusterip", |_| {
        let not_served = Options {
            serve_cluster_ips: false,
            ..options()
        };
        let yaml = web("", &[("198.18.1.1", "node-a")]);
        let mut controller = controller(not_served.clone());
        controller.apply(&build(&yaml, &not_served)).unwrap();
        let dataplane = controller.dataplane();
        let before = dataplane
            .reason_counter(Reason::PassNotVip)
            .unwrap()
            .packets;
        assert_eq!(
            syn(dataplane, [198, 18, 7, 2], 40_000, CLUSTER_IP, 8080),
            (harness::XDP_PASS, Some(IpAddr::from(CLUSTER_IP)))
        );
        assert_eq!(
            dataplane
                .reason_counter(Reason::PassNotVip)
                .unwrap()
                .packets,
            before + 1,
            "passed untouched as not a VIP"
        );
        assert_eq!(reached(dataplane, LB_IP, 8080), addrs(&["198.18.1.1"]));
    });
}

/// `loadBalancerSourceRanges` restrict the load balancer IPs only (not the external IPs, the
/// cluster IP or the node port, as kube-proxy's filter rules), family by family: a Service
/// whose ranges are all IPv4 admits no IPv6 client through its IPv6 load balancer IP.
#[test]
fn source_ranges_restrict_load_balancer_ips_family_by_family() {
    harness::in_fresh_netns("ranges", |_| {
        let yaml = web(
            "  loadBalancerSourceRanges: [198.18.5.0/24]\n",
            &[("198.18.1.1", "node-a")],
        )
        .replace(
            "    - ip: 198.18.200.1\n",
            "    - ip: 198.18.200.1\n    - ip: 2001:db8:200::1\n",
        ) + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-2\n  \
           labels:\n    kubernetes.io/service-name: web\naddressType: IPv6\nports:\n- name: http\n  \
           port: 8080\nendpoints:\n- addresses: [\"2001:db8:1::1\"]\n  nodeName: node-a\n";
        let mut controller = controller(options());
        controller.apply(&build(&yaml, &options())).unwrap();
        let dataplane = controller.dataplane();
        let dropped = || {
            dataplane
                .reason_counter(Reason::DropSourceRange)
                .unwrap()
                .packets
        };
        let before = dropped();
        let inside = [198, 18, 5, 9];
        let outside = [198, 18, 6, 9];
        assert!(syn(dataplane, inside, 40_000, LB_IP, 8080).1.is_some());
        assert_eq!(
            syn(dataplane, outside, 40_001, LB_IP, 8080).0,
            harness::XDP_DROP
        );
        assert_eq!(dropped(), before + 1);
        for (vip, port) in [
            (EXTERNAL_IP, 8080),
            (CLUSTER_IP, 8080),
            (NODE_IP, NODE_PORT),
        ] {
            assert!(
                syn(dataplane, outside, 40_002, vip, port).1.is_some(),
                "{vip:?}:{port} is not a load balancer IP"
            );
        }
        let v6 = Spec::tcp(
            "2001:db8:5::9".parse().unwrap(),
            40_003,
            "2001:db8:200::1".parse().unwrap(),
            8080,
        )
        .build();
        let (verdict, _) = harness::run_xdp(dataplane.xdp_program().unwrap(), &v6, None);
        assert_eq!(verdict, harness::XDP_DROP, "no IPv6 range: no IPv6 client");
        assert_eq!(dropped(), before + 2);
    });
}
