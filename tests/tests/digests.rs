//! Node-independent tables: two controllers fed the same objects in different orders, with
//! different histories (and so different backend ids), build Maglev tables with equal digests.

use std::{collections::BTreeMap, path::PathBuf};

use lb_userspace::{
    Dataplane,
    controller::{AppliedState, Controller},
    manifest::{self, Manifests},
    model::{self, Cluster, Options},
};

mod harness;

/// Service `svc-N` on 198.18.200.N:8080 (TCP) and :53 (UDP), with `endpoints` IPv4 endpoints
/// and a weight annotation on the first.
fn service(n: u8, endpoints: u8) -> Vec<String> {
    let mut documents = vec![format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{n}\n  annotations:\n    \
         lb.xdp.rs/endpoint-weights: \"198.18.{n}.1=3\"\nspec:\n  externalIPs: [198.18.200.{n}]\n  \
         ports:\n  - name: http\n    port: 8080\n  - name: dns\n    port: 53\n    protocol: UDP\n"
    )];
    for e in 1..=endpoints {
        documents.push(format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{n}-{e}\n  \
             labels:\n    kubernetes.io/service-name: svc-{n}\naddressType: IPv4\nports:\n- name: http\n  \
             port: 8080\n- name: dns\n  port: 53\n  protocol: UDP\nendpoints:\n- addresses: [198.18.{n}.{e}]\n"
        ));
    }
    documents
}

fn build(documents: &[String]) -> Cluster {
    let mut manifests = Manifests::default();
    manifest::read_text(
        &PathBuf::from("objects.yaml"),
        &documents.join("---\n"),
        &mut manifests,
    )
    .unwrap();
    model::build(&manifests, &Options::default()).unwrap()
}

/// Digests per (service, port name, family, scope), and the backend ids used.
fn digests(controller: &Controller) -> (BTreeMap<String, Option<String>>, Vec<u32>) {
    let services = &controller.state().services;
    let digests = services
        .iter()
        .map(|s| {
            (
                format!(
                    "{}/{} {} {} {:?}",
                    s.namespace, s.name, s.port_name, s.ipv4, s.scope
                ),
                s.table_digest.clone(),
            )
        })
        .collect();
    let ids = services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.id))
        .collect();
    (digests, ids)
}

#[test]
fn two_controllers_fed_the_same_objects_in_different_orders_report_equal_digests() {
    harness::in_fresh_netns("digests", |_| {
        let objects: Vec<String> = (1..=6).flat_map(|n| service(n, 2 + n)).collect();
        let mut a = Controller::new(
            Dataplane::load().unwrap(),
            AppliedState::default(),
            None,
            Options::default(),
        );
        a.apply(&build(&objects)).unwrap();

        // The other node saw other Services first (its ids differ) and reads the objects
        // backwards.
        let mut b = Controller::new(
            Dataplane::load().unwrap(),
            AppliedState::default(),
            None,
            Options::default(),
        );
        b.apply(&build(
            &(20..=24).flat_map(|n| service(n, 5)).collect::<Vec<_>>(),
        ))
        .unwrap();
        let mut reversed = objects.clone();
        reversed.reverse();
        b.apply(&build(&reversed)).unwrap();

        let (digests_a, ids_a) = digests(&a);
        let (digests_b, ids_b) = digests(&b);
        assert_eq!(digests_a.len(), 12, "6 Services x 2 ports");
        assert!(digests_a.values().all(Option::is_some));
        assert_eq!(digests_a, digests_b);
        assert_ne!(
            ids_a, ids_b,
            "the ids differ: they are not what the digest hashes"
        );

        // A change of endpoints changes the digest of that Service's tables only.
        let mut changed = objects.clone();
        changed.extend(service(1, 4).into_iter().skip(1));
        changed.extend(service(1, 5).into_iter().skip(5));
        b.apply(&build(&changed)).unwrap();
        let (after, _) = digests(&b);
        for (key, digest) in &after {
            assert_eq!(
                digest == &digests_a[key],
                !key.starts_with("default/svc-1 "),
                "{key}"
            );
        }
    });
}
