//! The address pool custom resource, `LoadBalancerIPPool` (`lb.xdp.rs/v1alpha1`,
//! cluster-scoped): the addresses the leader hands to LoadBalancer Services (see
//! [`crate::ipam`], which reads and validates it: [`crate::ipam::Pool::from_resource`]).
//!
//! ```yaml
//! apiVersion: lb.xdp.rs/v1alpha1
//! kind: LoadBalancerIPPool
//! metadata:
//!   name: pool-a
//! spec:
//!   blocks:
//!     - cidr: 198.18.200.0/24
//!     - start: 2001:db8:200::10
//!       stop: 2001:db8:200::ff
//!   autoAssign: true
//!   allowFirstLastIPs: false
//! ```
//!
//! The fields follow Cilium's `CiliumLoadBalancerIPPool` (`blocks` of `cidr` or `start`/`stop`,
//! `allowFirstLastIPs`) and MetalLB's `IPAddressPool` (`autoAssign`), so that either's users
//! read it at once.

use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// The doc comments of the spec and status types are the schema's descriptions: `kubectl explain
// loadbalancerippool.spec` prints them, so they are written for the pool's author.

/// The addresses of one pool: which blocks, and which Services may get them.
// Two printer columns are integers: clippy takes the repeated `type_ = "integer"` inside
// `#[kube(...)]` for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "lb.xdp.rs",
    version = "v1alpha1",
    kind = "LoadBalancerIPPool",
    plural = "loadbalancerippools",
    shortname = "lbpool",
    status = "LoadBalancerIPPoolStatus",
    derive = "PartialEq",
    doc = "Addresses the lb-xdp leader assigns to LoadBalancer Services \
           (status.loadBalancer.ingress).",
    printcolumn(name = "Blocks", type_ = "string", json_path = ".spec.blocks"),
    printcolumn(
        name = "Auto-Assign",
        type_ = "boolean",
        json_path = ".spec.autoAssign"
    ),
    printcolumn(name = "Assigned", type_ = "integer", json_path = ".status.assigned"),
    printcolumn(name = "Free", type_ = "integer", json_path = ".status.free"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIPPoolSpec {
    /// The pool's addresses: CIDRs and ranges, IPv4 and IPv6 mixed as needed.
    #[schemars(length(min = 1))]
    pub blocks: Vec<PoolBlock>,
    /// Whether the pool's addresses go to Services that ask for none (true, the default).
    /// False: only to Services that request one of its addresses (spec.loadBalancerIP, the
    /// lb.xdp.rs/loadBalancerIPs annotation) or name the pool (the lb.xdp.rs/ip-pool
    /// annotation).
    #[serde(default = "auto_assign_default")]
    pub auto_assign: bool,
    /// Whether the first and last address of a CIDR block are handed out too. False (the
    /// default): the network and broadcast addresses of IPv4 CIDRs shorter than /31, and the
    /// first (Subnet-Router anycast) and last address of IPv6 CIDRs shorter than /127, are
    /// kept back, requests included. Ranges (start/stop) are handed out whole either way.
    #[serde(default, rename = "allowFirstLastIPs")]
    pub allow_first_last_ips: bool,
}

fn auto_assign_default() -> bool {
    true
}

/// One block of a pool: a CIDR, or a range from start to stop (inclusive, one family).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
// Exactly one of the two forms, checked by the API server at `kubectl apply`, so that a
// malformed block is refused to its author rather than found later by the leader; the rule
// uses only `has()`, known to every Kubernetes version with CRD validation rules (1.25 and
// later). The addresses themselves are checked by `ipam::Pool::from_resource`. The fields are
// `Option`s in Rust but plain strings in the schema (`schemars(with)`): a null is not a block.
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.cidr) ? !has(self.start) && !has(self.stop) : has(self.start) && has(self.stop)",
    "message": "a block is either cidr, or start and stop",
}]))]
pub struct PoolBlock {
    /// A CIDR: 198.18.200.0/24, 2001:db8:200::/64 (no host bits set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub cidr: Option<String>,
    /// The range's first address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub start: Option<String>,
    /// The range's last address (not below start, of its family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub stop: Option<String>,
}

/// What the leader last counted in the pool. Counts stop at 9223372036854775807 (2^63-1, the
/// largest integer Kubernetes stores): an IPv6 /64 holds more.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIPPoolStatus {
    /// Addresses of the pool assigned to Services (an address shared by several Services
    /// counts once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "i64")]
    pub assigned: Option<i64>,
    /// Addresses of the pool that can still be handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "i64")]
    pub free: Option<i64>,
}

/// The first line of [`crd_yaml`]: what the file is, and how it is made.
const CRD_HEADER: &str = "# The LoadBalancerIPPool CustomResourceDefinition (lb.xdp.rs/v1alpha1), \
                          generated by `lb-userspace crd`: do not edit.\n";

/// The `LoadBalancerIPPool` CustomResourceDefinition as YAML, after a comment line saying what
/// it is: `lb-userspace crd` prints it, `deploy/crd.yaml` is it (a test checks).
pub fn crd_yaml() -> String {
    let crd = LoadBalancerIPPool::crd();
    // A CustomResourceDefinition is plain data (strings, maps, lists): serialising it to YAML
    // cannot fail, whatever the spec types.
    let yaml = serde_yaml_ng::to_string(&crd).expect("a CustomResourceDefinition serialises");
    format!("{CRD_HEADER}{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_names_the_resource_as_specified() {
        let crd = LoadBalancerIPPool::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("loadbalancerippools.lb.xdp.rs")
        );
        assert_eq!(crd.spec.group, "lb.xdp.rs");
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.kind, "LoadBalancerIPPool");
        assert_eq!(crd.spec.names.plural, "loadbalancerippools");
        assert_eq!(crd.spec.names.short_names, Some(vec!["lbpool".to_owned()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some())
        );
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Blocks", "Auto-Assign", "Assigned", "Free", "Age"]
        );
    }

    #[test]
    fn the_schema_defaults_and_validates_what_the_spec_says() {
        let crd = serde_json::to_value(LoadBalancerIPPool::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["blocks"]));
        assert_eq!(spec["properties"]["autoAssign"]["default"], true);
        assert_eq!(spec["properties"]["allowFirstLastIPs"]["default"], false);
        assert_eq!(spec["properties"]["blocks"]["minItems"], 1);
        let block = &spec["properties"]["blocks"]["items"];
        assert!(
            block["x-kubernetes-validations"][0]["rule"]
                .as_str()
                .is_some_and(|rule| rule.contains("has(self.cidr)")),
            "{block}"
        );
    }

    #[test]
    fn the_yaml_starts_with_a_comment_and_reads_back() {
        let yaml = crd_yaml();
        assert!(yaml.starts_with("# The LoadBalancerIPPool CustomResourceDefinition"));
        let read: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(read, LoadBalancerIPPool::crd());
    }

    #[test]
    fn defaults_apply_to_a_spec_that_leaves_them_out() {
        let spec: LoadBalancerIPPoolSpec =
            serde_yaml_ng::from_str("blocks: [{cidr: 198.18.200.0/24}]").unwrap();
        assert!(spec.auto_assign);
        assert!(!spec.allow_first_last_ips);
    }
}
