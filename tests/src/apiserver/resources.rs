//! The resources the stand-in serves, one row each, with the registry behaviour that differs
//! between them in the real API server.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use serde_json::Value;

/// One served resource: where it lives in the URL space, what its objects are called, and the
/// registry strategy the real API server applies to it.
#[derive(Debug)]
pub(super) struct ResourceType {
    /// API group, `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// The URL segment (`services`), also the `kind` of Status details.
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// `.../status` exists, and writes to the main resource leave `.status` as it was.
    pub status_subresource: bool,
    /// `.status` given on create is dropped (Services, custom resources with a status
    /// subresource); other kinds keep it (a kubelet creates its Node with a status).
    pub status_dropped_on_create: bool,
    /// `metadata.generation` is kept: 1 on create, one more on each change outside metadata
    /// (and outside `.status` where the status is a subresource).
    pub generation: bool,
    /// Served from a CustomResourceDefinition: list items keep kind and apiVersion, list
    /// metadata always carries `continue`, a replace must name the resourceVersion it read.
    pub custom: bool,
    /// DELETE answers with the deleted object instead of a Status (`ReturnDeletedObject` in the
    /// API server's registry: Services, not most others).
    pub returns_deleted_object: bool,
    /// Decodes a body as the API server's typed decoder would: unknown fields dropped, fields of
    /// the wrong type refused.
    pub decode: fn(Value) -> Result<Value, serde_json::Error>,
}

impl ResourceType {
    /// `v1` or `group/version`, as objects carry it.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The group-qualified resource the real server names in messages: `services`,
    /// `leases.coordination.k8s.io`.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The group-qualified kind the real server names in validation messages: `Service`,
    /// `Lease.coordination.k8s.io`.
    pub fn group_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

/// A typed round trip: what the API server's decoder keeps of a body.
fn typed<K: serde::de::DeserializeOwned + serde::Serialize>(
    value: Value,
) -> Result<Value, serde_json::Error> {
    serde_json::to_value(serde_json::from_value::<K>(value)?)
}

/// Custom resources are stored as sent (the stand-in has no structural schema to prune with).
fn unstructured(value: Value) -> Result<Value, serde_json::Error> {
    if value.is_object() {
        Ok(value)
    } else {
        Err(serde::de::Error::custom("expected a JSON object"))
    }
}

/// Index of Services in [`RESOURCES`] (their defaults and allocations are special).
pub(super) const SERVICES: usize = 0;
/// Index of events.k8s.io Events in [`RESOURCES`].
pub(super) const EVENTS: usize = 6;

/// Everything the stand-in serves.
pub(super) const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        status_subresource: true,
        status_dropped_on_create: true,
        generation: false,
        custom: false,
        returns_deleted_object: true,
        decode: typed::<Service>,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        status_subresource: true,
        status_dropped_on_create: false,
        generation: false,
        custom: false,
        returns_deleted_object: false,
        decode: typed::<Node>,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status_subresource: true,
        status_dropped_on_create: false,
        generation: false,
        custom: false,
        returns_deleted_object: false,
        decode: typed::<Namespace>,
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        status_subresource: false,
        status_dropped_on_create: false,
        generation: true,
        custom: false,
        returns_deleted_object: false,
        decode: typed::<EndpointSlice>,
    },
    ResourceType {
        group: "lb.xdp.rs",
        version: "v1alpha1",
        plural: "loadbalancerippools",
        kind: "LoadBalancerIPPool",
        namespaced: false,
        status_subresource: true,
        status_dropped_on_create: true,
        generation: true,
        custom: true,
        returns_deleted_object: false,
        decode: unstructured,
    },
    ResourceType {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
        status_dropped_on_create: false,
        generation: false,
        custom: false,
        returns_deleted_object: false,
        decode: typed::<Lease>,
    },
    ResourceType {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
        status_dropped_on_create: false,
        generation: false,
        custom: false,
        returns_deleted_object: false,
        decode: typed::<Event>,
    },
];

/// The resource served at `group`/`version`/`plural`.
pub(super) fn by_path(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource whose objects have this `apiVersion` and `kind`.
pub(super) fn by_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.kind == kind && r.api_version() == api_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_special_indices_name_the_right_rows() {
        assert_eq!(RESOURCES[SERVICES].plural, "services");
        assert_eq!(RESOURCES[EVENTS].group_resource(), "events.events.k8s.io");
        assert_eq!(by_kind("lb.xdp.rs/v1alpha1", "LoadBalancerIPPool"), Some(4));
        assert_eq!(by_path("", "v1", "nodes"), Some(1));
    }
}
