//! The manifests of `deploy/` read as the API server would read them: every document parsed
//! by its kind into its typed object with unknown fields refused, the CustomResourceDefinition
//! exactly `lb-userspace crd`'s, RBAC exactly the least privilege the controller needs, the
//! DaemonSet's mounts, environment and probes as the controller expects them, and its flags
//! known to the binary.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::CustomResourceExt as _;
use lb_userspace::{
    crd::{LoadBalancerIPPool, crd_yaml},
    ipam::Pool,
};
use serde::{Deserialize, de::DeserializeOwned};

const NAMESPACE: &str = "lb-xdp-system";
const NAME: &str = "lb-xdp";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `kustomization.yaml`: the only fields it uses.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
}

/// Every object of `deploy/`, typed.
#[derive(Default)]
struct Deploy {
    files: Vec<String>,
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    daemon_sets: Vec<DaemonSet>,
    crds: Vec<CustomResourceDefinition>,
    pools: Vec<LoadBalancerIPPool>,
    kustomizations: Vec<Kustomization>,
}

/// `value` as a `T`, refusing any field `T` does not have (as the API server's strict field
/// validation would).
fn strict<T: DeserializeOwned>(value: &serde_yaml_ng::Value, at: &str) -> T {
    let mut unknown = Vec::new();
    let typed = serde_ignored::deserialize(value.clone(), |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{at}: {e}"));
    assert!(unknown.is_empty(), "{at}: unknown fields {unknown:?}");
    typed
}

/// A custom resource as [`strict`] reads a built-in one. kube's derived types have no
/// `apiVersion` and `kind` fields (they are constants of the type, and are not checked on
/// reading): checked here, then left out.
fn strict_custom<T: DeserializeOwned + kube::Resource<DynamicType = ()>>(
    value: &serde_yaml_ng::Value,
    at: &str,
) -> T {
    assert_eq!(
        value["apiVersion"].as_str(),
        Some(T::api_version(&()).as_ref()),
        "{at}: apiVersion"
    );
    assert_eq!(
        value["kind"].as_str(),
        Some(T::kind(&()).as_ref()),
        "{at}: kind"
    );
    let mut value = value.clone();
    if let Some(mapping) = value.as_mapping_mut() {
        mapping.remove("apiVersion");
        mapping.remove("kind");
    }
    strict(&value, at)
}

fn read_deploy() -> Deploy {
    let mut deploy = Deploy::default();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    for path in paths {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# "),
            "{file} does not start with a comment saying what it is"
        );
        for (i, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml_ng::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file}: document {i}: {e}"));
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let at = format!("{file}: document {i} ({kind})");
            match kind.as_str() {
                "Namespace" => deploy.namespaces.push(strict(&value, &at)),
                "ServiceAccount" => deploy.service_accounts.push(strict(&value, &at)),
                "ClusterRole" => deploy.cluster_roles.push(strict(&value, &at)),
                "ClusterRoleBinding" => deploy.cluster_role_bindings.push(strict(&value, &at)),
                "Role" => deploy.roles.push(strict(&value, &at)),
                "RoleBinding" => deploy.role_bindings.push(strict(&value, &at)),
                "DaemonSet" => deploy.daemon_sets.push(strict(&value, &at)),
                "CustomResourceDefinition" => deploy.crds.push(strict(&value, &at)),
                "LoadBalancerIPPool" => deploy.pools.push(strict_custom(&value, &at)),
                "Kustomization" => deploy.kustomizations.push(strict(&value, &at)),
                other => panic!("{at}: a kind this test does not know: {other:?}"),
            }
        }
        deploy.files.push(file);
    }
    deploy
}

#[test]
fn every_document_parses_as_its_kind_and_the_kustomization_lists_every_file() {
    let deploy = read_deploy();
    assert_eq!(deploy.namespaces.len(), 1);
    assert_eq!(
        deploy.namespaces[0].metadata.name.as_deref(),
        Some(NAMESPACE)
    );
    assert_eq!(deploy.daemon_sets.len(), 1);
    assert_eq!(deploy.crds.len(), 1);
    assert_eq!(deploy.kustomizations.len(), 1);
    let kustomization = &deploy.kustomizations[0];
    assert_eq!(kustomization.api_version, "kustomize.config.k8s.io/v1beta1");
    assert_eq!(kustomization.kind, "Kustomization");
    let listed: BTreeSet<&str> = kustomization.resources.iter().map(String::as_str).collect();
    let files: BTreeSet<&str> = deploy
        .files
        .iter()
        .map(String::as_str)
        .filter(|f| *f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}

#[test]
fn the_crd_file_is_what_lb_userspace_crd_prints() {
    let text = std::fs::read_to_string(deploy_dir().join("crd.yaml")).unwrap();
    assert!(
        text == crd_yaml(),
        "deploy/crd.yaml is stale: regenerate it with `lb-userspace crd > deploy/crd.yaml`"
    );
    assert_eq!(read_deploy().crds[0], LoadBalancerIPPool::crd());
}

#[test]
fn the_example_pool_converts() {
    let deploy = read_deploy();
    assert_eq!(deploy.pools.len(), 1);
    let pool = Pool::from_resource(&deploy.pools[0]).unwrap();
    let blocks: Vec<&str> = pool.blocks.iter().map(|b| b.written.as_str()).collect();
    assert_eq!(blocks, ["198.18.200.0/24", "2001:db8:200::/64"]);
}

/// A rule as (API group, resource, verb) triples.
fn triples(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut triples = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    triples.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    triples
}

fn expected(rules: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String)> {
    rules
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs
                .iter()
                .map(|verb| ((*group).into(), (*resource).into(), (*verb).into()))
        })
        .collect()
}

fn is_our_service_account(subjects: Option<&Vec<Subject>>) -> bool {
    subjects.is_some_and(|subjects| {
        subjects.len() == 1
            && subjects[0].kind == "ServiceAccount"
            && subjects[0].name == NAME
            && subjects[0].namespace.as_deref() == Some(NAMESPACE)
    })
}

#[test]
fn rbac_is_exactly_the_least_privilege_the_controller_needs() {
    let deploy = read_deploy();
    assert_eq!(deploy.service_accounts.len(), 1);
    let account = &deploy.service_accounts[0].metadata;
    assert_eq!(
        (account.name.as_deref(), account.namespace.as_deref()),
        (Some(NAME), Some(NAMESPACE))
    );

    assert_eq!(deploy.cluster_roles.len(), 1);
    let cluster_role = &deploy.cluster_roles[0];
    assert_eq!(cluster_role.metadata.name.as_deref(), Some(NAME));
    let granted = triples(cluster_role.rules.as_deref().unwrap_or_default());
    assert_eq!(
        granted,
        expected(&[
            ("", "services", &["get", "list", "watch"]),
            ("", "services/status", &["patch", "update"]),
            ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
            ("", "nodes", &["get", "list", "watch"]),
            (
                "lb.xdp.rs",
                "loadbalancerippools",
                &["get", "list", "watch"]
            ),
            // The pools' counts (status.assigned, status.free), written by the leader.
            ("lb.xdp.rs", "loadbalancerippools/status", &["patch"]),
            ("events.k8s.io", "events", &["create", "patch"]),
        ])
    );

    assert_eq!(deploy.roles.len(), 1);
    let role = &deploy.roles[0];
    assert_eq!(
        (
            role.metadata.name.as_deref(),
            role.metadata.namespace.as_deref()
        ),
        (Some(NAME), Some(NAMESPACE))
    );
    assert_eq!(
        triples(role.rules.as_deref().unwrap_or_default()),
        expected(&[(
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"]
        )])
    );

    for (group, resource, verb) in granted
        .iter()
        .chain(&triples(role.rules.as_deref().unwrap_or_default()))
    {
        assert!(
            ![group, resource, verb].iter().any(|s| s.contains('*')),
            "wildcard in {group}/{resource} {verb}"
        );
        assert_ne!(resource, "secrets");
    }

    assert_eq!(deploy.cluster_role_bindings.len(), 1);
    let binding = &deploy.cluster_role_bindings[0];
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            binding.role_ref.name.as_str()
        ),
        ("ClusterRole", NAME)
    );
    assert!(is_our_service_account(binding.subjects.as_ref()));
    assert_eq!(deploy.role_bindings.len(), 1);
    let binding = &deploy.role_bindings[0];
    assert_eq!(binding.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            binding.role_ref.name.as_str()
        ),
        ("Role", NAME)
    );
    assert!(is_our_service_account(binding.subjects.as_ref()));
}

fn container(daemon_set: &DaemonSet) -> &Container {
    let pod = daemon_set.spec.template.spec.as_ref().expect("a pod spec");
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

#[test]
fn the_daemon_set_runs_the_controller_as_it_expects() {
    let deploy = read_deploy();
    let daemon_set = &deploy.daemon_sets[0];
    assert_eq!(daemon_set.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = &daemon_set.spec;
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.termination_grace_period_seconds, Some(30));
    // Every taint tolerated: a controller on every node.
    assert!(pod.tolerations.iter().flatten().any(|t| {
        t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
    }));
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .unwrap();
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    let container = container(daemon_set);
    assert_eq!(
        container.command.as_deref(),
        Some(&["lb-userspace".to_owned()][..])
    );
    let env = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name} in the environment"))
    };
    let field = |name: &str| {
        env(name)
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field("NODE_NAME").as_deref(), Some("spec.nodeName"));
    assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        field("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    assert!(env("LB_INTERFACE").value.is_some());

    // Host paths mounted at the same paths in the container.
    let mounts: Vec<(&str, &str)> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    for path in ["/sys/fs/bpf", "/run/lb"] {
        let (volume, _) = mounts
            .iter()
            .find(|(_, mount_path)| *mount_path == path)
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        let host_path = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == *volume)
            .and_then(|v| v.host_path.as_ref())
            .unwrap_or_else(|| panic!("volume {volume} is not a hostPath"));
        assert_eq!(host_path.path, path);
    }

    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(false));
    let capabilities = security.capabilities.as_ref().unwrap();
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN"])
    );
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    // Probes on the metrics address the controller is told to listen on.
    let args = container.args.as_deref().unwrap_or_default();
    let metrics: SocketAddr = args
        .iter()
        .position(|a| a == "--metrics-addr")
        .and_then(|i| args.get(i + 1))
        .expect("--metrics-addr ADDR")
        .parse()
        .expect("--metrics-addr is an address");
    let probe = |probe: Option<&k8s_openapi::api::core::v1::Probe>| {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        (get.path.clone().unwrap_or_default(), get.port.clone())
    };
    let port =
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(metrics.port()));
    assert_eq!(
        probe(container.liveness_probe.as_ref()),
        ("/healthz".into(), port.clone())
    );
    assert_eq!(
        probe(container.readiness_probe.as_ref()),
        ("/readyz".into(), port)
    );

    // The pins on the host's bpffs (see the DaemonSet's comment), under the mounted path.
    let pin_root = args
        .iter()
        .position(|a| a == "--pin-root")
        .and_then(|i| args.get(i + 1))
        .expect("--pin-root PATH");
    assert!(pin_root.starts_with("/sys/fs/bpf/"), "{pin_root}");
}

#[test]
fn the_daemon_set_passes_only_flags_attach_knows() {
    let deploy = read_deploy();
    let container = container(&deploy.daemon_sets[0]);
    let args = container.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("attach"));
    assert_eq!(args.get(1).map(String::as_str), Some("$(LB_INTERFACE)"));
    let output = Command::new(env!("CARGO_BIN_EXE_lb-userspace"))
        .args(["attach", "--help"])
        .output()
        .expect("lb-userspace runs");
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        let listed = help
            .split(|c: char| c.is_whitespace() || c == ',')
            .any(|word| word == flag);
        assert!(listed, "`lb-userspace attach --help` does not list {flag}");
    }
    // A value of a closed set is one of its values (clap lists them under the flag).
    let log_format = help
        .split("\n      --")
        .find(|section| section.starts_with("log-format"))
        .expect("--log-format is listed");
    assert!(
        log_format.contains("- json:"),
        "--log-format json: {log_format}"
    );
}
