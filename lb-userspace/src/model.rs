//! The desired state: services as the data plane serves them, built from manifests and
//! validated. Kubernetes' own rules apply: ready endpoints serve; when none is ready, serving
//! and terminating ones do. Every other endpoint still listed (terminating, or not ready) keeps
//! its existing flows and takes no new ones; only an endpoint that leaves the objects loses its
//! flows.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::Path,
};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_common::maps::{MAGLEV_DEFAULT_SIZE, MAGLEV_MAX_SIZE, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

use crate::{
    maglev::is_prime,
    manifest::{
        ConfigError, ConfigReason, Located, Manifests, ObjectRef, SERVICE_NAME_LABEL, namespace_of,
    },
};

/// Service annotation: per-endpoint Maglev weights, `"IP=WEIGHT,IP=WEIGHT"` (default 1; 0
/// takes no new flows).
pub const ANNOTATION_WEIGHTS: &str = "lb.xdp.rs/endpoint-weights";
/// Service annotation: the Maglev table size (a prime up to 131071; default 16381).
pub const ANNOTATION_TABLE_SIZE: &str = "lb.xdp.rs/maglev-table-size";
/// Kubernetes' default ClientIP affinity timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// The legacy annotation kube-proxy reads source ranges from when `spec.loadBalancerSourceRanges`
/// is empty.
const ANNOTATION_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// The `spec.loadBalancerClass` this load balancer implements unless told otherwise
/// (`--load-balancer-class`): Services of another class are left to their own implementation;
/// Services with no class are ours.
pub const DEFAULT_LOAD_BALANCER_CLASS: &str = "lb.xdp.rs/xdp";

/// Options that are not in the manifests. The build ([`build_each`]) reads only
/// `load_balancer_class`, shared by every node; the others are this node's, read by its
/// projection ([`project`], [`ServiceModel::frontends`]).
#[derive(Debug, Clone)]
pub struct Options {
    /// Node addresses on which `nodePort`s are served as VIPs too.
    pub node_ips: Vec<IpAddr>,
    /// The host's own addresses: a VIP among them would capture traffic meant for the host
    /// (its SSH, its API server) and is refused unless `allow_host_addresses`.
    pub host_addresses: Vec<IpAddr>,
    /// Serve VIPs that are addresses of this host.
    pub allow_host_addresses: bool,
    /// This node's name, as endpoints' `nodeName` gives it: the endpoints of
    /// `externalTrafficPolicy: Local` and `internalTrafficPolicy: Local` are the ones on it.
    pub node_name: String,
    /// Serve cluster IPs on the client-facing interface too. Off by default: a cluster IP is
    /// the cluster's own address (kube-dns, the API server's `kubernetes` Service), not one
    /// to expose to whoever reaches this interface (Cilium does not either).
    pub serve_cluster_ips: bool,
    /// The `spec.loadBalancerClass` served: a Service of another class is skipped.
    pub load_balancer_class: String,
    /// Serve `spec.loadBalancerIP` as given. True for files (the address is the one asked
    /// for, nobody else assigns it); false when following the API, where it is a request the
    /// address assignment grants by writing `status.loadBalancer.ingress` (or refuses, and
    /// then it must not be served).
    pub serve_requested_ips: bool,
    /// The UDP port of the tunnel to the other nodes; 0: no tunnel (endpoints on other nodes
    /// are DNATed here and routed by the host, as on one node).
    pub tunnel_port: u16,
    /// The largest IP packet the underlay carries (the attached interface's MTU).
    pub underlay_mtu: u32,
    /// This node's Node object carries `node.kubernetes.io/exclude-from-external-load-balancers`:
    /// it announces no address (see [`crate::announce`]) and keeps serving.
    pub excluded_from_load_balancers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            node_ips: Vec::new(),
            host_addresses: Vec::new(),
            allow_host_addresses: false,
            node_name: String::new(),
            serve_cluster_ips: false,
            load_balancer_class: DEFAULT_LOAD_BALANCER_CLASS.into(),
            serve_requested_ips: true,
            tunnel_port: lb_common::maps::DEFAULT_TUNNEL_PORT,
            underlay_mtu: 1500,
            excluded_from_load_balancers: false,
        }
    }
}

/// How a frontend reaches its service: it decides which traffic policy and which filters
/// apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)`: in-cluster traffic, under `internalTrafficPolicy`.
    ClusterIp,
    /// `spec.externalIPs`, under `externalTrafficPolicy`.
    ExternalIp,
    /// `status.loadBalancer.ingress` and `spec.loadBalancerIP`, under
    /// `externalTrafficPolicy` and `loadBalancerSourceRanges`.
    LoadBalancer,
    /// A node address and a `nodePort`, under `externalTrafficPolicy`.
    NodePort,
}

impl FrontendKind {
    /// Whether traffic through it comes from outside the cluster (`externalTrafficPolicy`
    /// applies) rather than from inside (`internalTrafficPolicy`).
    pub fn is_external(self) -> bool {
        self != Self::ClusterIp
    }
}

/// One VIP:port:proto: where a service is reached, the data plane's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VipKey {
    /// The VIP.
    pub vip: IpAddr,
    /// The service port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl std::fmt::Display for VipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.vip {
            IpAddr::V4(v4) => write!(f, "{v4}:{}/{}", self.port, self.protocol.name()),
            IpAddr::V6(v6) => write!(f, "[{v6}]:{}/{}", self.port, self.protocol.name()),
        }
    }
}

/// A frontend and how it reaches its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Frontend {
    /// Where.
    pub key: VipKey,
    /// How.
    pub kind: FrontendKind,
}

/// An address of a service and the field it comes from. Two are equal when they serve the
/// same (address and kind): the field is where it was read, not what is served.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceAddress {
    /// The address.
    pub addr: IpAddr,
    /// Which kind of frontend it makes.
    pub kind: FrontendKind,
    /// The field it was read from (`spec.clusterIP`, `spec.externalIPs[1]`), for refusals
    /// made after the build (a host address, on this node).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
}

impl PartialEq for ServiceAddress {
    fn eq(&self, other: &Self) -> bool {
        (self.addr, self.kind) == (other.addr, other.kind)
    }
}

impl Eq for ServiceAddress {}

/// A client range of `loadBalancerSourceRanges`, its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SourceRange {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix_len: u8,
}

impl SourceRange {
    /// Parses `a.b.c.d/n` or `x::/n`, clearing host bits as the API server's CIDR parsing
    /// does; `None` when it is not a CIDR.
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, len) = text.trim().split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let prefix_len: u8 = len.parse().ok()?;
        let addr = match addr {
            IpAddr::V4(v4) if prefix_len <= 32 => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) if prefix_len <= 128 => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            _ => return None,
        };
        Some(Self { addr, prefix_len })
    }
}

impl SourceRange {
    /// Whether `addr` is in the range (never across address families).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for SourceRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    /// A protocol as a manifest writes it (`TCP` when it writes none); `Err` with the text of
    /// one not served (`SCTP`, or `tcp`: the API is case-sensitive).
    pub fn parse(text: Option<&str>) -> Result<Self, &str> {
        match text.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            other => Err(other),
        }
    }

    /// `TCP` or `UDP`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// An endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointModel {
    /// The endpoint address.
    pub addr: IpAddr,
    /// The resolved target port.
    pub port: u16,
    /// Keeps its existing flows but takes no new ones (its pod is terminating or not ready).
    pub terminating: bool,
    /// Why it takes no new flows, when it does not: its pod is not ready (and not terminating).
    /// Absent from states saved before it existed.
    #[serde(default)]
    pub not_ready: bool,
    /// Maglev weight (0: no new flows).
    pub weight: u32,
    /// The pod behind it, if the manifest names it.
    pub pod: Option<String>,
    /// The node it runs on, if the manifest says (`nodeName`).
    #[serde(default)]
    pub node_name: Option<String>,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortModel {
    /// The port's name (empty when unnamed).
    pub name: String,
    /// The service port.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// `targetPort` as written (a number or a name).
    pub target_port: String,
    /// The node port, if any.
    pub node_port: Option<u16>,
    /// The endpoints, in a stable order.
    pub endpoints: Vec<EndpointModel>,
}

/// A service as the data plane serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceModel {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The manifest file.
    pub file: String,
    /// `spec.type`.
    pub service_type: String,
    /// `spec.selector`.
    pub selector: BTreeMap<String, String>,
    /// `spec.clusterIP`.
    pub cluster_ip: Option<String>,
    /// Every address the service is reached on (load balancer IPs, external IPs, cluster
    /// IPs), once each, with the field it came from.
    #[serde(default)]
    pub addresses: Vec<ServiceAddress>,
    /// ClientIP affinity timeout in seconds, when `sessionAffinity: ClientIP`.
    pub affinity_timeout_secs: Option<u32>,
    /// `spec.externalTrafficPolicy`.
    pub external_traffic_policy: String,
    /// `spec.internalTrafficPolicy`.
    #[serde(default = "cluster_policy")]
    pub internal_traffic_policy: String,
    /// `spec.healthCheckNodePort`: answered on this node's addresses while
    /// `externalTrafficPolicy` is `Local`.
    #[serde(default)]
    pub health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges` (or the legacy annotation): the clients admitted
    /// through the load balancer IPs; empty admits every client.
    #[serde(default)]
    pub source_ranges: Vec<SourceRange>,
    /// `spec.ipFamilyPolicy`.
    #[serde(default)]
    pub ip_family_policy: Option<String>,
    /// `spec.ipFamilies`.
    #[serde(default)]
    pub ip_families: Vec<String>,
    /// `metadata.labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// `metadata.creationTimestamp` (RFC 3339), when the manifest has it.
    #[serde(default)]
    pub created: Option<String>,
    /// Maglev table size.
    pub table_size: u32,
    /// The ports.
    pub ports: Vec<PortModel>,
}

fn cluster_policy() -> String {
    "Cluster".into()
}

/// A traffic policy that keeps traffic on the node it arrived at.
pub const POLICY_LOCAL: &str = "Local";

impl ServiceModel {
    /// Every frontend of `port` this node serves: the service's addresses (cluster IPs only
    /// with `serve_cluster_ips`) at the service port, and the node addresses at the node port.
    pub fn frontends(&self, port: &PortModel, options: &Options) -> Vec<Frontend> {
        let at = |vip: IpAddr, number: u16, kind: FrontendKind| Frontend {
            key: VipKey {
                vip,
                port: number,
                protocol: port.protocol,
            },
            kind,
        };
        let addresses = self
            .addresses
            .iter()
            .filter(|a| a.kind != FrontendKind::ClusterIp || options.serve_cluster_ips)
            .map(|a| at(a.addr, port.port, a.kind));
        let node_ports = port
            .node_port
            .map(|node_port| {
                options
                    .node_ips
                    .iter()
                    .map(move |ip| at(*ip, node_port, FrontendKind::NodePort))
            })
            .into_iter()
            .flatten();
        addresses.chain(node_ports).collect()
    }

    /// Whether traffic through frontends of `kind` goes only to this node's endpoints.
    pub fn node_local(&self, kind: FrontendKind) -> bool {
        let policy = if kind.is_external() {
            &self.external_traffic_policy
        } else {
            &self.internal_traffic_policy
        };
        policy == POLICY_LOCAL
    }
}

/// The whole desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// Services, sorted by namespace and name.
    pub services: Vec<ServiceModel>,
    /// Problems that leave the rest served (an SCTP port, say).
    pub warnings: Vec<String>,
    /// The node addresses on which node ports are served: this node's, set by its projection
    /// ([`project`]; empty in the shared build). Part of the desired state, so that a Node
    /// object's new address is applied like any other change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_ips: Vec<IpAddr>,
    /// Every node of the cluster (from its Node object), by name: where the tunnel reaches
    /// the endpoints that live on other nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeModel>,
    /// This node is excluded from external load balancers (its Node object's label, set by
    /// its projection): it announces nothing. Part of the desired state, as `node_ips`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub excluded_from_load_balancers: bool,
}

/// A node as the tunnel sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeModel {
    /// Its name, as endpoints' `nodeName` gives it.
    pub name: String,
    /// Its underlay addresses: its `InternalIP`s (its `ExternalIP`s when it has none), in the
    /// Node object's order.
    pub addresses: Vec<IpAddr>,
}

impl Cluster {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeModel> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// The nodes of `manifests`, sorted by name (the last object of a name wins, as a file's later
/// version would); nodes without a usable address are left out.
fn node_models(manifests: &Manifests) -> Vec<NodeModel> {
    let mut nodes: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for located in &manifests.nodes {
        let node = &located.object;
        let Some(name) = node.metadata.name.clone() else {
            continue;
        };
        let of_type = |kind: &str| -> Vec<IpAddr> {
            node.status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter(|a| a.type_ == kind)
                .filter_map(|a| a.address.parse().ok())
                .collect()
        };
        let mut addresses = of_type("InternalIP");
        if addresses.is_empty() {
            addresses = of_type("ExternalIP");
        }
        if !addresses.is_empty() {
            nodes.insert(name, addresses);
        }
    }
    nodes
        .into_iter()
        .map(|(name, addresses)| NodeModel { name, addresses })
        .collect()
}

/// A raw endpoint, before Kubernetes' serving rules are applied.
#[derive(Debug, Clone)]
struct RawEndpoint {
    addr: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    pod: Option<String>,
    node_name: Option<String>,
    /// The endpoint's ports.
    ports: Vec<EndpointPort>,
}

/// What a build made of the objects: the desired state, and the objects refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The desired state: every Service not refused (warnings included).
    pub cluster: Cluster,
    /// The objects refused, each with its reason, identity, field and message.
    pub refused: Vec<ConfigError>,
}

impl Outcome {
    /// The desired state, or the first refusal: the all-or-nothing mode of start-up.
    pub fn strict(self) -> Result<Cluster, ConfigError> {
        match self.refused.into_iter().next() {
            Some(error) => Err(error),
            None => Ok(self.cluster),
        }
    }
}

/// Reads manifests at `path` into the desired state this node serves, all or nothing: the
/// first object refused refuses the whole configuration (start-up).
pub fn load(path: &Path, options: &Options) -> Result<Cluster, ConfigError> {
    build(&crate::manifest::load(path)?, options)
}

/// Reads manifests at `path` object by object (reloads): a refused object leaves the others
/// served, and its Service as `previous` had it (see [`build_each`]). `Err` only when the
/// whole configuration is refused: a file that cannot be read, is empty (being written) or
/// holds a document that is not a Kubernetes object.
pub fn load_each(
    path: &Path,
    options: &Options,
    previous: &Cluster,
) -> Result<Outcome, ConfigError> {
    Ok(build_and_project_each(
        &crate::manifest::load(path)?,
        options,
        previous,
    ))
}

/// Builds `manifests` object by object ([`build_each`]), then projects the result on this
/// node ([`project`]); the refusals of both, in that order.
pub fn build_and_project_each(
    manifests: &Manifests,
    options: &Options,
    previous: &Cluster,
) -> Outcome {
    let built = build_each(manifests, options, previous);
    let mut projected = project(&built.cluster, options);
    projected.refused.splice(0..0, built.refused);
    projected
}

/// Builds and validates the desired state this node serves, all or nothing: the build, then
/// this node's projection of it ([`project`]); the first refusal is the error.
pub fn build(manifests: &Manifests, options: &Options) -> Result<Cluster, ConfigError> {
    let cluster = build_each(manifests, options, &Cluster::default()).strict()?;
    project(&cluster, options).strict()
}

/// The order in which Services claim an address: the oldest `creationTimestamp` first (one
/// without comes after every one with), then namespace and name, as Kubernetes decides
/// between two claims of one thing. It depends on the objects only, never on their order in
/// the input.
fn seniority(service: &ServiceModel) -> (bool, Option<k8s_openapi::jiff::Timestamp>, &str, &str) {
    let created = service.created.as_deref().and_then(|t| t.parse().ok());
    (
        created.is_none(),
        created,
        &service.namespace,
        &service.name,
    )
}

fn conflict(service: &ServiceModel, key: VipKey, winner: &str) -> ConfigError {
    ConfigError {
        file: service.file.clone(),
        object: Box::new(ObjectRef::named(
            "Service",
            &service.namespace,
            &service.name,
        )),
        field: "spec.ports".into(),
        reason: ConfigReason::Conflict,
        message: format!("{key} is already served by {winner}"),
    }
}

/// Builds the desired state object by object: a pure function of the objects (and of the
/// load balancer class served), the same on every node; node-local refusals are
/// [`project`]'s.
///
/// - A refused Service is left out.
/// - A refused EndpointSlice or Endpoints contributes nothing; its Service is built from its
///   other slices.
/// - A Service one of whose objects is refused and that `previous` serves keeps `previous`'s
///   version (kube-proxy keeps serving the last version of an object it could read), unless
///   it loses an address conflict.
/// - Two Services on one VIP:port/protocol: the older (see [`seniority`]) is served, the other
///   refused, whatever the input order.
pub fn build_each(manifests: &Manifests, options: &Options, previous: &Cluster) -> Outcome {
    let mut warnings = manifests.warnings.clone();
    let mut refused = manifests.refused.clone();
    let mut candidates = Vec::new();
    let index = EndpointIndex::new(manifests);
    for located in &manifests.services {
        match service_model(located, &index, options, &mut warnings, &mut refused) {
            Ok(Some(service)) => candidates.push(service),
            Ok(None) => {}
            Err(error) => refused.push(error),
        }
    }
    // Services with a refused object keep their previous version, when there is one.
    let touched: HashSet<(&str, &str)> = refused
        .iter()
        .filter_map(|e| Some((e.object.namespace.as_str(), e.object.service.as_deref()?)))
        .collect();
    let kept = |s: &&ServiceModel| touched.contains(&(s.namespace.as_str(), s.name.as_str()));
    let carried: Vec<&ServiceModel> = previous.services.iter().filter(kept).collect();
    candidates.retain(|s| {
        !carried
            .iter()
            .any(|c| (&c.namespace, &c.name) == (&s.namespace, &s.name))
    });
    candidates.extend(carried.into_iter().cloned());
    // Two services on one VIP:port conflict whether or not this node serves the address; node
    // addresses are this node's, left to `project`.
    let every_address = Options {
        serve_cluster_ips: true,
        node_ips: Vec::new(),
        ..options.clone()
    };
    let services = resolve_conflicts(candidates, &every_address, &mut refused);
    Outcome {
        cluster: Cluster {
            services,
            warnings,
            node_ips: Vec::new(),
            nodes: node_models(manifests),
            excluded_from_load_balancers: false,
        },
        refused,
    }
}

/// The services that keep their addresses: by [`seniority`], each claims every frontend it
/// has at `addresses`; one finding a frontend claimed already (by another, or by itself
/// twice) is refused. In namespace and name order.
fn resolve_conflicts(
    mut candidates: Vec<ServiceModel>,
    addresses: &Options,
    refused: &mut Vec<ConfigError>,
) -> Vec<ServiceModel> {
    candidates.sort_by(|a, b| seniority(a).cmp(&seniority(b)));
    let mut claimed: HashMap<VipKey, String> = HashMap::new();
    let mut services = Vec::new();
    for service in candidates {
        let label = format!("Service {}/{}", service.namespace, service.name);
        let mut mine: HashMap<VipKey, String> = HashMap::new();
        let taken = service
            .ports
            .iter()
            .flat_map(|port| service.frontends(port, addresses))
            .find_map(|f| {
                let winner = claimed.get(&f.key).or_else(|| mine.get(&f.key)).cloned();
                mine.insert(f.key, label.clone());
                winner.map(|w| (f.key, w))
            });
        match taken {
            Some((key, winner)) => refused.push(conflict(&service, key, &winner)),
            None => {
                claimed.extend(mine);
                services.push(service);
            }
        }
    }
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    services
}

/// This node's projection of the shared desired state: the node-local refusals. A VIP that is
/// an address of this host is refused (unless `allow_host_addresses`), and so is a node port
/// whose frontend on a node address another Service's address already has (the older Service
/// keeps it). A refused Service is left out.
pub fn project(cluster: &Cluster, options: &Options) -> Outcome {
    let mut refused = Vec::new();
    let mut candidates = Vec::new();
    for service in &cluster.services {
        let host_address = service
            .addresses
            .iter()
            .find(|a| !options.allow_host_addresses && options.host_addresses.contains(&a.addr));
        match host_address {
            None => candidates.push(service.clone()),
            Some(address) => refused.push(ConfigError {
                file: service.file.clone(),
                object: Box::new(ObjectRef::named(
                    "Service",
                    &service.namespace,
                    &service.name,
                )),
                field: address.field.clone(),
                reason: ConfigReason::HostAddress,
                message: format!(
                    "{} is an address of this host: serving it would capture the host's own \
                     traffic (allow it with --allow-host-addresses)",
                    address.addr
                ),
            }),
        }
    }
    let every_address = Options {
        serve_cluster_ips: true,
        ..options.clone()
    };
    let services = resolve_conflicts(candidates, &every_address, &mut refused);
    Outcome {
        cluster: Cluster {
            services,
            warnings: cluster.warnings.clone(),
            node_ips: options.node_ips.clone(),
            nodes: cluster.nodes.clone(),
            excluded_from_load_balancers: options.excluded_from_load_balancers,
        },
        refused,
    }
}

fn service_model(
    located: &Located<Service>,
    index: &EndpointIndex<'_>,
    options: &Options,
    warnings: &mut Vec<String>,
    refused: &mut Vec<ConfigError>,
) -> Result<Option<ServiceModel>, ConfigError> {
    let service = &located.object;
    let file = located.file.display().to_string();
    let namespace = namespace_of(service.metadata.namespace.as_deref()).to_owned();
    let Some(name) = service.metadata.name.clone() else {
        return Err(ConfigError {
            file,
            object: Box::new(ObjectRef {
                kind: "Service".into(),
                namespace,
                ..ObjectRef::default()
            }),
            field: "metadata.name".into(),
            reason: ConfigReason::MissingField,
            message: "missing".into(),
        });
    };
    let object = ObjectRef::named("Service", &namespace, &name);
    // Every refusal made here is of a value.
    let error = |field: &str, message: String| ConfigError {
        file: file.clone(),
        object: Box::new(object.clone()),
        field: field.into(),
        reason: ConfigReason::InvalidValue,
        message,
    };
    let spec = service.spec.clone().unwrap_or_default();
    let service_type = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    if service_type == "ExternalName" {
        warnings.push(format!(
            "{file}: {object}: ExternalName services have no data plane"
        ));
        return Ok(None);
    }
    if let Some(class) = foreign_class(spec.load_balancer_class.as_deref(), options) {
        warnings.push(format!(
            "{file}: {object}: spec.loadBalancerClass {class}: not ours ({}); skipped",
            options.load_balancer_class
        ));
        return Ok(None);
    }

    let mut addresses: Vec<ServiceAddress> = Vec::new();
    let mut add_address =
        |field: &str, text: &str, kind: FrontendKind| -> Result<(), ConfigError> {
            if text.is_empty() || text == "None" {
                return Ok(());
            }
            let ip: IpAddr = text
                .parse()
                .map_err(|_| error(field, format!("{text:?} is not an IP address")))?;
            // An address listed twice (a load balancer IP also in externalIPs) keeps its first
            // field: the most external one, so the stricter filters apply.
            if !addresses.iter().any(|a| a.addr == ip) {
                addresses.push(ServiceAddress {
                    addr: ip,
                    kind,
                    field: field.into(),
                });
            }
            Ok(())
        };
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default();
    for (i, entry) in ingress.iter().enumerate() {
        if let Some(ip) = &entry.ip {
            add_address(
                &format!("status.loadBalancer.ingress[{i}].ip"),
                ip,
                FrontendKind::LoadBalancer,
            )?;
        }
    }
    if let Some(ip) = spec
        .load_balancer_ip
        .as_ref()
        .filter(|_| options.serve_requested_ips)
    {
        add_address("spec.loadBalancerIP", ip, FrontendKind::LoadBalancer)?;
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        add_address(
            &format!("spec.externalIPs[{i}]"),
            ip,
            FrontendKind::ExternalIp,
        )?;
    }
    match &spec.cluster_ips {
        Some(ips) => {
            for (i, ip) in ips.iter().enumerate() {
                add_address(
                    &format!("spec.clusterIPs[{i}]"),
                    ip,
                    FrontendKind::ClusterIp,
                )?;
            }
        }
        None => {
            if let Some(ip) = &spec.cluster_ip {
                add_address("spec.clusterIP", ip, FrontendKind::ClusterIp)?;
            }
        }
    }

    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let weights = parse_weights(annotations.get(ANNOTATION_WEIGHTS), &error)?;
    let table_size = match annotations.get(ANNOTATION_TABLE_SIZE) {
        None => MAGLEV_DEFAULT_SIZE,
        Some(text) => {
            let field = format!("metadata.annotations[{ANNOTATION_TABLE_SIZE}]");
            let size: u32 = text
                .parse()
                .map_err(|_| error(&field, format!("{text:?} is not a number")))?;
            if !is_prime(size) || size > MAGLEV_MAX_SIZE {
                return Err(error(
                    &field,
                    format!("{size} is not a prime up to {MAGLEV_MAX_SIZE}"),
                ));
            }
            size
        }
    };
    let affinity_timeout_secs = match spec.session_affinity.as_deref() {
        Some("ClientIP") => Some(
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map_or(Ok(DEFAULT_AFFINITY_TIMEOUT_SECS), |t| {
                    u32::try_from(t)
                        .ok()
                        .filter(|t| (1..=86_400).contains(t))
                        .ok_or_else(|| {
                            error(
                                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                                format!("{t} is not within 1..=86400"),
                            )
                        })
                })?,
        ),
        Some("None") | None => None,
        Some(other) => {
            return Err(error(
                "spec.sessionAffinity",
                format!("{other:?}: expected None or ClientIP"),
            ));
        }
    };

    let raw = raw_endpoints(&namespace, &name, index, refused);
    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let protocol = match Protocol::parse(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(other) => {
                warnings.push(format!(
                    "{file}: {object}: {field}.protocol: {other} is not supported; this port is \
                     not served, the service's other ports are"
                ));
                continue;
            }
        };
        let number = port_number(port.port, &format!("{field}.port"), &error)?;
        let node_port = port
            .node_port
            .map(|p| port_number(p, &format!("{field}.nodePort"), &error))
            .transpose()?;
        let mut note = |text: String| warnings.push(format!("{file}: {object}: {field}: {text}"));
        let endpoints = endpoints_for_port(port, number, protocol, &raw, &weights, &mut note)
            .map_err(|message| error(&format!("{field}.targetPort"), message))?;
        ports.push(PortModel {
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
            target_port: match &port.target_port {
                Some(IntOrString::Int(n)) => n.to_string(),
                Some(IntOrString::String(s)) => s.clone(),
                None => number.to_string(),
            },
            node_port,
            endpoints,
        });
    }
    if ports.is_empty() && spec.ports.as_ref().is_some_and(|p| !p.is_empty()) {
        return Err(error(
            "spec.ports",
            "no port this load balancer serves: only TCP and UDP are".into(),
        ));
    }
    let source_ranges = source_ranges(&spec, &annotations, &error)?;
    let health_check_node_port = spec
        .health_check_node_port
        .map(|p| port_number(p, "spec.healthCheckNodePort", &error))
        .transpose()?;
    Ok(Some(ServiceModel {
        namespace,
        name,
        file,
        service_type,
        selector: spec.selector.clone().unwrap_or_default(),
        cluster_ip: spec.cluster_ip.clone(),
        addresses,
        affinity_timeout_secs,
        external_traffic_policy: spec
            .external_traffic_policy
            .clone()
            .unwrap_or_else(cluster_policy),
        internal_traffic_policy: spec
            .internal_traffic_policy
            .clone()
            .unwrap_or_else(cluster_policy),
        health_check_node_port,
        source_ranges,
        ip_family_policy: spec.ip_family_policy.clone(),
        ip_families: spec.ip_families.clone().unwrap_or_default(),
        labels: service.metadata.labels.clone().unwrap_or_default(),
        annotations,
        created: service
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        table_size,
        ports,
    }))
}

/// `spec.loadBalancerSourceRanges`, or when it is empty the legacy annotation kube-proxy
/// also reads.
fn source_ranges(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    annotations: &BTreeMap<String, String>,
    error: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<SourceRange>, ConfigError> {
    let listed: Vec<(String, String)> = match spec.load_balancer_source_ranges.as_deref() {
        Some(ranges) if !ranges.is_empty() => ranges
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("spec.loadBalancerSourceRanges[{i}]"), r.clone()))
            .collect(),
        _ => annotations
            .get(ANNOTATION_SOURCE_RANGES)
            .map(|text| {
                text.split(',')
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(|r| {
                        (
                            format!("metadata.annotations[{ANNOTATION_SOURCE_RANGES}]"),
                            r.to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut ranges = Vec::new();
    for (field, text) in listed {
        let range = SourceRange::parse(&text)
            .ok_or_else(|| error(&field, format!("{text:?} is not a CIDR (address/length)")))?;
        if !ranges.contains(&range) {
            ranges.push(range);
        }
    }
    ranges.sort();
    Ok(ranges)
}

fn port_number(
    value: i32,
    field: &str,
    error: &dyn Fn(&str, String) -> ConfigError,
) -> Result<u16, ConfigError> {
    valid_port(value).ok_or_else(|| error(field, format!("{value} is not a port (1..=65535)")))
}

/// A port number (1..=65535) of any port field: service, node, target or endpoint port.
fn valid_port(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

fn parse_weights(
    text: Option<&String>,
    error: &dyn Fn(&str, String) -> ConfigError,
) -> Result<HashMap<IpAddr, u32>, ConfigError> {
    let mut weights = HashMap::new();
    let Some(text) = text else {
        return Ok(weights);
    };
    let field = format!("metadata.annotations[{ANNOTATION_WEIGHTS}]");
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parsed = item
            .split_once('=')
            .and_then(|(ip, w)| Some((ip.trim().parse().ok()?, w.trim().parse().ok()?)));
        let Some((ip, weight)) = parsed else {
            return Err(error(&field, format!("{item:?}: expected IP=WEIGHT")));
        };
        if weight > 1000 {
            return Err(error(&field, format!("{item:?}: weights go up to 1000")));
        }
        weights.insert(ip, weight);
    }
    Ok(weights)
}

/// The class of a Service that belongs to another load balancer implementation, if it does:
/// one with no `spec.loadBalancerClass`, or ours, is ours.
fn foreign_class<'a>(class: Option<&'a str>, options: &Options) -> Option<&'a str> {
    class.filter(|class| *class != options.load_balancer_class)
}

/// Each Service's EndpointSlices (of address types IPv4 and IPv6, in input order) and its
/// Endpoints object (the first of that name), by namespace and Service name: found once per
/// build rather than by every Service scanning every object (quadratic in a cluster's size).
struct EndpointIndex<'a> {
    slices: HashMap<(&'a str, &'a str), Vec<&'a Located<EndpointSlice>>>,
    endpoints: HashMap<(&'a str, &'a str), &'a Located<Endpoints>>,
}

impl<'a> EndpointIndex<'a> {
    fn new(manifests: &'a Manifests) -> Self {
        let mut slices: HashMap<_, Vec<_>> = HashMap::new();
        for slice in &manifests.slices {
            let metadata = &slice.object.metadata;
            let service = metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if let Some(service) = service
                && matches!(slice.object.address_type.as_str(), "IPv4" | "IPv6")
            {
                let namespace = namespace_of(metadata.namespace.as_deref());
                slices
                    .entry((namespace, service.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        let mut endpoints = HashMap::new();
        for object in &manifests.endpoints {
            let metadata = &object.object.metadata;
            if let Some(name) = metadata.name.as_deref() {
                endpoints
                    .entry((namespace_of(metadata.namespace.as_deref()), name))
                    .or_insert(object);
            }
        }
        Self { slices, endpoints }
    }
}

/// The endpoints of a service: from its EndpointSlices when it has any (as kube-proxy does),
/// else from its Endpoints object. Slices of an address type other than IPv4 and IPv6 (FQDN)
/// are left out (the manifest reader warned of them), and of each slice endpoint only its
/// first address is used, as kube-proxy does (the API makes an endpoint's addresses
/// fungible).
///
/// A slice (or an Endpoints object) listing an address that is not one is refused into
/// `refused` and contributes nothing; the service keeps what its other slices list.
fn raw_endpoints(
    namespace: &str,
    name: &str,
    index: &EndpointIndex<'_>,
    refused: &mut Vec<ConfigError>,
) -> Vec<RawEndpoint> {
    // A bad address is the fault of the object that lists it, in its own file.
    let bad_address = |file: &Path, kind: &str, object: &str, field: String, text: &str| {
        let mut object = ObjectRef::named(kind, namespace, object);
        object.service = Some(name.to_owned());
        ConfigError {
            file: file.display().to_string(),
            object: Box::new(object),
            field,
            reason: ConfigReason::InvalidValue,
            message: format!("{text:?} is not an IP address"),
        }
    };
    let mut raw = Vec::new();
    let slices = index
        .slices
        .get(&(namespace, name))
        .cloned()
        .unwrap_or_default();
    if !slices.is_empty() {
        'slices: for slice in slices {
            let ports: Vec<EndpointPort> = slice
                .object
                .ports
                .iter()
                .flatten()
                .filter_map(|p| endpoint_port(p.name.as_ref(), p.port?, p.protocol.as_ref()))
                .collect();
            let slice_name = slice.object.metadata.name.as_deref().unwrap_or_default();
            let mut listed = Vec::new();
            for (e, endpoint) in slice.object.endpoints.iter().flatten().enumerate() {
                let conditions = endpoint.conditions.clone().unwrap_or_default();
                let ready = conditions.ready.unwrap_or(true);
                if let Some(text) = endpoint.addresses.first() {
                    let Ok(addr) = text.parse() else {
                        refused.push(bad_address(
                            &slice.file,
                            "EndpointSlice",
                            slice_name,
                            format!("endpoints[{e}].addresses[0]"),
                            text,
                        ));
                        continue 'slices;
                    };
                    listed.push(RawEndpoint {
                        addr,
                        ready,
                        serving: conditions.serving.unwrap_or(ready),
                        terminating: conditions.terminating.unwrap_or(false),
                        pod: endpoint.target_ref.as_ref().and_then(|t| t.name.clone()),
                        node_name: endpoint.node_name.clone(),
                        ports: ports.clone(),
                    });
                }
            }
            raw.extend(listed);
        }
        return raw;
    }
    let Some(endpoints) = index.endpoints.get(&(namespace, name)) else {
        return raw;
    };
    for (s, subset) in endpoints.object.subsets.iter().flatten().enumerate() {
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .filter_map(|p| endpoint_port(p.name.as_ref(), p.port, p.protocol.as_ref()))
            .collect();
        for (ready, list, addresses) in [
            (true, "addresses", subset.addresses.iter().flatten()),
            (
                false,
                "notReadyAddresses",
                subset.not_ready_addresses.iter().flatten(),
            ),
        ] {
            for (a, address) in addresses.enumerate() {
                let Ok(addr) = address.ip.parse() else {
                    refused.push(bad_address(
                        &endpoints.file,
                        "Endpoints",
                        name,
                        format!("subsets[{s}].{list}[{a}].ip"),
                        &address.ip,
                    ));
                    return Vec::new();
                };
                raw.push(RawEndpoint {
                    addr,
                    ready,
                    serving: ready,
                    terminating: false,
                    pod: address.target_ref.as_ref().and_then(|t| t.name.clone()),
                    node_name: address.node_name.clone(),
                    ports: ports.clone(),
                });
            }
        }
    }
    raw
}

/// An endpoint port as (name, number, protocol), the same whether from an EndpointSlice or an
/// Endpoints object; `None` when the number is not a port (0 included). The protocol is `None`
/// when it is one not served: such a port is found only by name.
fn endpoint_port(
    name: Option<&String>,
    number: i32,
    protocol: Option<&String>,
) -> Option<EndpointPort> {
    Some((
        name.cloned().unwrap_or_default(),
        valid_port(number)?,
        Protocol::parse(protocol.map(String::as_str)).ok(),
    ))
}

/// (name, number, protocol) of an endpoint's port.
type EndpointPort = (String, u16, Option<Protocol>);

/// The endpoints serving one service port, with resolved target ports.
///
/// An endpoint that has no port of the named `targetPort` (a rollout renaming it, half done)
/// has no endpoint for this port: one warning line through `note` names them, and the service
/// is served by the others.
fn endpoints_for_port(
    port: &ServicePort,
    number: u16,
    protocol: Protocol,
    raw: &[RawEndpoint],
    weights: &HashMap<IpAddr, u32>,
    note: &mut dyn FnMut(String),
) -> Result<Vec<EndpointModel>, String> {
    let port_name = port.name.clone().unwrap_or_default();
    let mut resolved = Vec::new();
    let mut unresolved = Vec::new();
    for endpoint in raw {
        let found = endpoint
            .ports
            .iter()
            .find(|(name, _, proto)| *name == port_name && *proto == Some(protocol))
            .or_else(|| match &port.target_port {
                Some(IntOrString::String(target)) => {
                    endpoint.ports.iter().find(|(name, _, _)| name == target)
                }
                _ => None,
            })
            .map(|(_, p, _)| *p);
        let target = match (found, &port.target_port) {
            (Some(p), _) => p,
            (None, Some(IntOrString::Int(n))) => {
                valid_port(*n).ok_or_else(|| format!("{n} is not a port (1..=65535)"))?
            }
            (None, None) => number,
            (None, Some(IntOrString::String(_))) => {
                if !unresolved.contains(&endpoint.addr) {
                    unresolved.push(endpoint.addr);
                }
                continue;
            }
        };
        resolved.push((endpoint, target));
    }
    if let (false, Some(IntOrString::String(name))) = (unresolved.is_empty(), &port.target_port) {
        let addresses: Vec<String> = unresolved.iter().map(ToString::to_string).collect();
        note(format!(
            "named targetPort {name:?} is not among the ports of endpoint {}: no endpoint there \
             for this port",
            addresses.join(", ")
        ));
    }
    // Kubernetes' rule, per address family (a dual-stack service's IPv4 and IPv6 endpoints are
    // two sets): ready endpoints serve; with none ready, serving+terminating ones do.
    let any_ready = |family_v4: bool| {
        resolved
            .iter()
            .any(|(e, _)| e.ready && e.addr.is_ipv4() == family_v4)
    };
    let (ready_v4, ready_v6) = (any_ready(true), any_ready(false));
    let mut endpoints = Vec::new();
    for (endpoint, target) in resolved {
        let family_ready = if endpoint.addr.is_ipv4() {
            ready_v4
        } else {
            ready_v6
        };
        let serves = if family_ready {
            endpoint.ready
        } else {
            endpoint.serving && endpoint.terminating
        };
        // Every other endpoint listed keeps its established flows and takes no new ones: a pod
        // whose readiness probe fails for a moment should not have its connections cut, and
        // kube-proxy leaves established connections alone too. Only endpoints that leave the
        // objects lose their flows.
        endpoints.push(EndpointModel {
            addr: endpoint.addr,
            port: target,
            terminating: !serves,
            not_ready: !serves && !endpoint.terminating,
            weight: weights.get(&endpoint.addr).copied().unwrap_or(1),
            pod: endpoint.pod.clone(),
            node_name: endpoint.node_name.clone(),
        });
    }
    // An endpoint listed twice (two slices during a change) takes its best listing, as
    // kube-proxy does: serving, then terminating (its pod going away), then not ready.
    endpoints.sort_by_key(|e| (e.addr, e.port, e.terminating, e.not_ready));
    endpoints.dedup_by(|a, b| (a.addr, a.port) == (b.addr, b.port));
    Ok(endpoints)
}

#[cfg(test)]
#[path = "../tests/data/invalid_corpus.rs"]
mod invalid_corpus;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{invalid_corpus::invalid_corpus, *};
    use crate::manifest::{self, Manifests};

    fn parse(yaml: &str) -> Result<Cluster, ConfigError> {
        let mut manifests = Manifests::default();
        manifest::read_text(&PathBuf::from("test.yaml"), yaml, &mut manifests)?;
        build(&manifests, &Options::default())
    }

    fn service(extra_spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: LoadBalancer\n  \
             clusterIP: 198.18.100.1\n  selector:\n    app: web\n  ports:\n  - name: http\n    \
             port: 8080\n    targetPort: 8080\n{extra_spec}"
        )
    }

    fn slice(endpoints: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  \
             labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  \
             port: 8080\n  protocol: TCP\nendpoints:\n{endpoints}"
        )
    }

    #[test]
    fn reads_kubectl_output_of_the_tutorial() {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/kubectl-tomcat.yaml"
        ));
        let cluster = load(&path, &Options::default()).unwrap();
        let [service] = &cluster.services[..] else {
            panic!("one service: {cluster:?}")
        };
        assert_eq!(service.name, "tomcat-load-balancer");
        assert_eq!(service.service_type, "LoadBalancer");
        assert_eq!(
            service.addresses.iter().map(|a| a.addr).collect::<Vec<_>>(),
            vec!["10.96.43.114".parse::<IpAddr>().unwrap()]
        );
        let port = &service.ports[0];
        assert_eq!(
            (port.port, port.protocol, port.node_port),
            (8080, Protocol::Tcp, Some(30854))
        );
        let endpoints: Vec<String> = port
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.addr, e.port))
            .collect();
        assert_eq!(
            endpoints,
            [
                "172.17.0.5:8080",
                "172.17.0.7:8080",
                "172.17.0.8:8080",
                "172.17.0.9:8080"
            ]
        );
        assert_eq!(
            port.endpoints[0].pod.as_deref(),
            Some("tomcat-deployment-5b8c7d9f4-abcde")
        );
    }

    #[test]
    fn vips_come_from_every_address_field() {
        let yaml = service(
            "  loadBalancerIP: 198.18.200.1\n  externalIPs: [198.18.200.2]\nstatus:\n  \
             loadBalancer:\n    ingress:\n    - ip: 198.18.200.3\n",
        );
        let cluster = parse(&yaml).unwrap();
        let vips: Vec<String> = cluster.services[0]
            .addresses
            .iter()
            .map(|a| format!("{} {:?}", a.addr, a.kind))
            .collect();
        assert_eq!(
            vips,
            [
                "198.18.200.3 LoadBalancer",
                "198.18.200.1 LoadBalancer",
                "198.18.200.2 ExternalIp",
                "198.18.100.1 ClusterIp"
            ]
        );
    }

    /// (address, takes no new flows, not ready) of the first port's endpoints.
    fn states(cluster: &Cluster) -> Vec<(String, bool, bool)> {
        cluster.services[0].ports[0]
            .endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.terminating, e.not_ready))
            .collect()
    }

    #[test]
    fn endpoint_slices_follow_kubernetes_serving_rules() {
        let endpoints = "- addresses: [198.18.1.1]\n  conditions: {ready: true}\n\
                         - addresses: [198.18.1.2]\n  conditions: {ready: false, serving: true, terminating: true}\n\
                         - addresses: [198.18.1.3]\n  conditions: {ready: false, serving: false}\n\
                         - addresses: [198.18.1.4]\n  conditions: {ready: false, serving: false, terminating: true}\n";
        let cluster = parse(&(service("") + &slice(endpoints))).unwrap();
        assert_eq!(
            states(&cluster),
            [
                ("198.18.1.1".into(), false, false), // ready: serves
                ("198.18.1.2".into(), true, false),  // terminating: existing flows only
                ("198.18.1.3".into(), true, true),   // not ready: existing flows only
                ("198.18.1.4".into(), true, false),  // terminating, not serving: the same
            ]
        );

        // None ready: serving and terminating ones serve; the others keep their flows only.
        let endpoints = "- addresses: [198.18.1.2]\n  conditions: {ready: false, serving: true, terminating: true}\n\
                         - addresses: [198.18.1.3]\n  conditions: {ready: false}\n";
        let cluster = parse(&(service("") + &slice(endpoints))).unwrap();
        assert_eq!(
            states(&cluster),
            [
                ("198.18.1.2".into(), false, false),
                ("198.18.1.3".into(), true, true),
            ]
        );
    }

    #[test]
    fn not_ready_addresses_of_endpoints_keep_their_flows_only() {
        let endpoints = "---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\nsubsets:\n\
                         - addresses:\n  - ip: 198.18.1.1\n  notReadyAddresses:\n  - ip: 198.18.1.2\n";
        let cluster = parse(&(service("") + endpoints)).unwrap();
        assert_eq!(
            states(&cluster),
            [
                ("198.18.1.1".into(), false, false),
                ("198.18.1.2".into(), true, true),
            ]
        );
    }

    #[test]
    fn an_endpoint_listed_twice_serves_if_either_listing_does() {
        let second = slice("- addresses: [198.18.1.1]\n  conditions: {ready: false}\n")
            .replace("name: web-abc", "name: web-def");
        let yaml = service("")
            + &slice("- addresses: [198.18.1.1]\n  conditions: {ready: true}\n")
            + &second;
        assert_eq!(
            states(&parse(&yaml).unwrap()),
            [("198.18.1.1".into(), false, false)]
        );
    }

    #[test]
    fn named_target_ports_resolve_through_endpoint_ports() {
        let yaml = service("").replace("targetPort: 8080", "targetPort: web-http");
        let slice = slice("- addresses: [198.18.1.1]\n")
            .replace("port: 8080\n  protocol", "port: 9999\n  protocol");
        let cluster = parse(&(yaml.clone() + &slice)).unwrap();
        assert_eq!(cluster.services[0].ports[0].endpoints[0].port, 9999);
        assert_eq!(cluster.services[0].ports[0].target_port, "web-http");
        // An endpoint without that port (a rollout renaming it, half done) has no endpoint for
        // this port, with a warning; the others serve. (It was an error, refusing the whole
        // configuration for a state Kubernetes passes through.)
        let endpoints = "---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\nsubsets:\n\
                         - addresses:\n  - ip: 198.18.1.1\n\
                         - addresses:\n  - ip: 198.18.1.2\n  ports:\n  - {name: web-http, port: 9999}\n";
        let cluster = parse(&(yaml + endpoints)).unwrap();
        let port = &cluster.services[0].ports[0];
        let served: Vec<String> = port
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.addr, e.port))
            .collect();
        assert_eq!(served, ["198.18.1.2:9999"]);
        assert_eq!(
            cluster.warnings,
            [
                "test.yaml: Service default/web: spec.ports[0]: named targetPort \"web-http\" is not \
              among the ports of endpoint 198.18.1.1: no endpoint there for this port"
            ]
        );
    }

    fn build_with(yaml: &str, options: &Options) -> Cluster {
        let mut manifests = Manifests::default();
        manifest::read_text(&PathBuf::from("test.yaml"), yaml, &mut manifests).unwrap();
        build(&manifests, options).unwrap()
    }

    fn frontend_texts(cluster: &Cluster, options: &Options) -> Vec<String> {
        let service = &cluster.services[0];
        service
            .ports
            .iter()
            .flat_map(|p| service.frontends(p, options))
            .map(|f| format!("{} {:?}", f.key, f.kind))
            .collect()
    }

    #[test]
    fn cluster_ips_are_frontends_only_when_asked_for() {
        let yaml = service(
            "  externalIPs: [198.18.200.2]
  ports:
  - name: http
    port: 8080
    nodePort: 30080
",
        )
        .replace(
            "  ports:
  - name: http
    port: 8080
    targetPort: 8080
",
            "",
        );
        let node = Options {
            node_ips: vec!["198.18.0.2".parse().unwrap()],
            ..Options::default()
        };
        let cluster = build_with(&yaml, &node);
        assert_eq!(
            frontend_texts(&cluster, &node),
            [
                "198.18.200.2:8080/TCP ExternalIp",
                "198.18.0.2:30080/TCP NodePort"
            ]
        );
        let serving = Options {
            serve_cluster_ips: true,
            ..node
        };
        assert_eq!(
            frontend_texts(&cluster, &serving),
            [
                "198.18.200.2:8080/TCP ExternalIp",
                "198.18.100.1:8080/TCP ClusterIp",
                "198.18.0.2:30080/TCP NodePort"
            ]
        );
    }

    #[test]
    fn a_cluster_ip_not_served_still_conflicts_with_another_services() {
        let yaml = service("")
            + "---
" + &service("").replace("name: web", "name: other");
        let mut manifests = Manifests::default();
        manifest::read_text(&PathBuf::from("test.yaml"), &yaml, &mut manifests).unwrap();
        let error = build(&manifests, &Options::default()).unwrap_err();
        assert!(error.message.contains("already served by"), "{error}");
    }

    #[test]
    fn traffic_policies_node_names_and_health_check_port_are_read() {
        let yaml = service(
            "  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  healthCheckNodePort: 32000
",
        ) + &slice(
            "- addresses: [198.18.1.1]
  nodeName: node-a
- addresses: [198.18.1.2]
",
        );
        let cluster = parse(&yaml).unwrap();
        let service = &cluster.services[0];
        assert!(service.node_local(FrontendKind::LoadBalancer));
        assert!(service.node_local(FrontendKind::NodePort));
        assert!(service.node_local(FrontendKind::ClusterIp));
        assert_eq!(service.health_check_node_port, Some(32000));
        let nodes: Vec<Option<&str>> = service.ports[0]
            .endpoints
            .iter()
            .map(|e| e.node_name.as_deref())
            .collect();
        assert_eq!(nodes, [Some("node-a"), None]);
        let default = parse(&service_default()).unwrap();
        assert!(!default.services[0].node_local(FrontendKind::LoadBalancer));
        assert!(!default.services[0].node_local(FrontendKind::ClusterIp));
    }

    #[test]
    fn nodes_are_read_with_their_underlay_addresses() {
        let node = |name: &str, addresses: &str| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  \
                 addresses:\n{addresses}"
            )
        };
        let yaml = service_default()
            + &node(
                "node-b",
                "  - {type: Hostname, address: node-b}\n  - {type: ExternalIP, address: 203.0.113.9}\n  \
                 - {type: InternalIP, address: 198.18.1.12}\n  - {type: InternalIP, address: \
                 '2001:db8:1::c'}\n",
            )
            + &node("node-a", "  - {type: ExternalIP, address: 198.18.1.11}\n")
            + &node("node-c", "  - {type: Hostname, address: node-c}\n");
        let cluster = parse(&yaml).unwrap();
        // By name; InternalIPs when there are any (the underlay), else ExternalIPs; a node
        // without an address is not one the tunnel can reach.
        let nodes: Vec<(&str, Vec<String>)> = cluster
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.addresses.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            nodes,
            [
                ("node-a", vec!["198.18.1.11".to_string()]),
                (
                    "node-b",
                    vec!["198.18.1.12".to_string(), "2001:db8:1::c".to_string()]
                ),
            ]
        );
    }

    fn service_default() -> String {
        service("")
    }

    #[test]
    fn source_ranges_come_from_the_spec_or_the_legacy_annotation() {
        let cluster = parse(&service(
            "  loadBalancerSourceRanges: [\"203.0.113.7/24\", \"2001:db8::1/32\", \"198.18.0.1/32\"]
",
        ))
        .unwrap();
        let ranges: Vec<String> = cluster.services[0]
            .source_ranges
            .iter()
            .map(ToString::to_string)
            .collect();
        // Host bits cleared, as the API server's CIDR parsing does; sorted.
        assert_eq!(ranges, ["198.18.0.1/32", "203.0.113.0/24", "2001:db8::/32"]);
        let annotated = service("").replace(
            "  name: web\n",
            "  name: web\n  annotations:\n    service.beta.kubernetes.io/load-balancer-source-ranges: \"198.18.0.0/16, 10.0.0.0/8\"\n",
        );
        let ranges: Vec<String> = parse(&annotated).unwrap().services[0]
            .source_ranges
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ranges, ["10.0.0.0/8", "198.18.0.0/16"]);
        let error = parse(&service(
            "  loadBalancerSourceRanges: [\"203.0.113.0\"]
",
        ))
        .unwrap_err();
        assert_eq!(error.field, "spec.loadBalancerSourceRanges[0]");
        assert!(error.message.contains("not a CIDR"), "{error}");
        assert_eq!(SourceRange::parse("198.18.0.0/33"), None);
        let range = SourceRange::parse("198.18.0.0/24").unwrap();
        assert!(range.contains("198.18.0.77".parse().unwrap()));
        assert!(!range.contains("198.18.1.1".parse().unwrap()));
        assert!(
            !range.contains("::ffff:198.18.0.1".parse().unwrap()),
            "families apart"
        );
        assert!(
            SourceRange::parse("::/0")
                .unwrap()
                .contains("2001:db8::1".parse().unwrap())
        );
        assert!(
            SourceRange::parse("0.0.0.0/0")
                .unwrap()
                .contains("203.0.113.1".parse().unwrap())
        );
        assert_eq!(
            SourceRange::parse("0.0.0.0/0").map(|r| r.to_string()),
            Some("0.0.0.0/0".into())
        );
    }

    #[test]
    fn weights_table_size_and_affinity_come_from_the_service() {
        let yaml = service(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n",
        )
        .replace(
            "  name: web\n",
            "  name: web\n  annotations:\n    lb.xdp.rs/endpoint-weights: \"198.18.1.1=3\"\n    lb.xdp.rs/maglev-table-size: \"65537\"\n",
        );
        let cluster =
            parse(&(yaml + &slice("- addresses: [198.18.1.1]\n- addresses: [198.18.1.2]\n")))
                .unwrap();
        let service = &cluster.services[0];
        assert_eq!(service.affinity_timeout_secs, Some(60));
        assert_eq!(service.table_size, 65537);
        let weights: Vec<u32> = service.ports[0]
            .endpoints
            .iter()
            .map(|e| e.weight)
            .collect();
        assert_eq!(weights, [3, 1]);
    }

    #[test]
    fn sctp_ports_are_skipped_with_a_warning() {
        let yaml = service("  - name: sctp\n    port: 9000\n    protocol: SCTP\n");
        let cluster = parse(&yaml).unwrap();
        assert_eq!(cluster.services[0].ports.len(), 1);
        assert!(
            cluster.warnings[0].contains("spec.ports[1].protocol: SCTP"),
            "{:?}",
            cluster.warnings
        );
    }

    #[test]
    fn bad_input_names_file_object_and_field() {
        for (yaml, field, needle) in [
            (
                service("").replace("port: 8080\n    targetPort", "port: 70000\n    targetPort"),
                "spec.ports[0].port",
                "70000",
            ),
            (
                service("").replace("198.18.100.1", "not-an-ip"),
                "spec.clusterIP",
                "not-an-ip",
            ),
            (
                service("").replace("port: 8080\n    targetPort", "port: eighty\n    targetPort"),
                "spec.ports[0].port",
                "invalid",
            ),
            (
                "apiVersion: v2\nkind: Service\nmetadata: {name: x}\n".into(),
                "kind",
                "unknown kind Service (v2)",
            ),
            (
                "kind: Service\nmetadata: {name: x}\n".into(),
                "apiVersion",
                "missing",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: x\n".into(),
                "-",
                "not valid YAML",
            ),
            (
                service("").replace(
                    "name: web\n",
                    "name: web\n  annotations:\n    lb.xdp.rs/maglev-table-size: \"1000\"\n",
                ),
                "metadata.annotations[lb.xdp.rs/maglev-table-size]",
                "prime",
            ),
            (
                service("") + "---\n" + &service("").replace("name: http", "name: other"),
                "spec.ports",
                "already served",
            ),
        ] {
            let error = parse(&yaml).unwrap_err();
            assert_eq!(error.file, "test.yaml");
            assert_eq!(error.field, field, "{error}");
            assert!(error.to_string().contains(needle), "{error}");
        }
    }

    /// Every manifest of `tests/data/invalid` is rejected with one line naming its file and the
    /// object, field and mistake its header expects: a file rejected for another reason (a
    /// check that regressed, caught later by a different one) fails.
    #[test]
    fn the_invalid_manifest_corpus_is_rejected_precisely() {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/invalid"));
        for invalid in invalid_corpus(&dir) {
            let file = invalid.path.display();
            let error = load(&invalid.path, &Options::default())
                .err()
                .unwrap_or_else(|| panic!("{file} was accepted"));
            let line = error.to_string();
            assert!(!line.contains('\n'), "one line: {line}");
            assert_eq!(
                (
                    error.file.as_str(),
                    error.object.to_string().as_str(),
                    error.field.as_str()
                ),
                (file.to_string().as_str(), &*invalid.object, &*invalid.field),
                "{line}"
            );
            let expected = invalid.expected_error(&invalid.path);
            assert!(
                line.starts_with(&expected),
                "{line}\ndoes not begin {expected}"
            );
        }
    }

    /// A bad address is the fault of the Endpoints or EndpointSlice that lists it: the error
    /// names that object and its file, not the Service's (the sandbox keeps them apart).
    #[test]
    fn a_bad_endpoint_address_names_the_file_and_object_that_list_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a-service.yaml"), service("")).unwrap();
        for (listing, object, field) in [
            (
                "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\nsubsets:\n- addresses:\n  \
                 - ip: 198.18.1.1\n  notReadyAddresses:\n  - ip: 198.18.1.2\n  - ip: 198.18.1.x\n"
                    .to_owned(),
                "Endpoints default/web",
                "subsets[0].notReadyAddresses[1].ip",
            ),
            (
                slice("- addresses: [198.18.1.1]\n- addresses: [198.18.1.x]\n"),
                "EndpointSlice default/web-abc",
                "endpoints[1].addresses[0]",
            ),
        ] {
            let file = dir.path().join("b-endpoints.yaml");
            std::fs::write(&file, listing).unwrap();
            let error = load(dir.path(), &Options::default()).unwrap_err();
            assert_eq!(
                (error.file.as_str(), error.object.to_string().as_str(), error.field.as_str()),
                (file.display().to_string().as_str(), object, field),
                "{error}"
            );
            assert_eq!(error.message, "\"198.18.1.x\" is not an IP address");
        }
    }

    #[test]
    fn vips_that_are_host_addresses_are_refused_unless_allowed() {
        let mut manifests = Manifests::default();
        manifest::read_text(&PathBuf::from("test.yaml"), &service(""), &mut manifests).unwrap();
        let mut options = Options {
            host_addresses: vec!["198.18.100.1".parse().unwrap()],
            ..Options::default()
        };
        let error = build(&manifests, &options).unwrap_err();
        assert_eq!(error.field, "spec.clusterIP");
        assert!(error.message.contains("--allow-host-addresses"), "{error}");
        options.allow_host_addresses = true;
        assert_eq!(build(&manifests, &options).unwrap().services.len(), 1);
    }

    fn refused(yaml: &str) -> ConfigError {
        parse(yaml).expect_err("refused")
    }

    #[test]
    fn near_misses_of_known_fields_are_refused_naming_the_field_meant() {
        for (yaml, object, field, meant) in [
            (
                service("  sessionAfinity: ClientIP\n"),
                "Service default/web",
                "spec.sessionAfinity",
                "sessionAffinity",
            ),
            (
                service("  loadBalancerIp: 198.18.200.1\n"),
                "Service default/web",
                "spec.loadBalancerIp",
                "loadBalancerIP",
            ),
            (
                service("  externalIPS: [198.18.200.2]\n"),
                "Service default/web",
                "spec.externalIPS",
                "externalIPs",
            ),
            (
                service("").replace("targetPort: 8080", "tragetPort: 8080"),
                "Service default/web",
                "spec.ports[0].tragetPort",
                "targetPort",
            ),
            (
                service("") + &slice("- addresses: [198.18.1.1]\n- adresses: [198.18.1.2]\n"),
                "EndpointSlice default/web-abc",
                "endpoints[1].adresses",
                "addresses",
            ),
            (
                service("")
                    + "---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\nsubsets:\n\
                       - addresses:\n  - ip: 198.18.1.1\n  notreadyAddresses: []\n",
                "Endpoints default/web",
                "subsets[0].notreadyAddresses",
                "notReadyAddresses",
            ),
        ] {
            let error = refused(&yaml);
            assert_eq!(
                (error.object.to_string().as_str(), error.field.as_str()),
                (object, field),
                "{error}"
            );
            assert_eq!(
                error.message,
                format!("unknown field; did you mean {meant}?")
            );
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("test.yaml: {object}: {field}: unknown field")),
                "{error}"
            );
        }
    }

    #[test]
    fn unknown_fields_that_are_no_near_miss_are_warnings_and_the_object_is_served() {
        let yaml = service("  fooBarBaz: Prefer\n")
            + &slice("- addresses: [198.18.1.1]\n  futureCondition: {x: 1}\n");
        let cluster = parse(&yaml).unwrap();
        assert_eq!(cluster.services[0].ports[0].endpoints.len(), 1);
        assert_eq!(
            cluster.warnings,
            [
                "test.yaml: Service default/web: spec.fooBarBaz: unknown field (not known to this \
                 version); ignored",
                "test.yaml: EndpointSlice default/web-abc: endpoints[0].futureCondition: unknown \
                 field (not known to this version); ignored",
            ]
        );
    }

    #[test]
    fn fqdn_endpoint_slices_are_skipped_with_a_warning() {
        let fqdn = slice("- addresses: [web.example.com]\n")
            .replace("name: web-abc", "name: web-fqdn")
            .replace("addressType: IPv4", "addressType: FQDN");
        let cluster =
            parse(&(service("") + &fqdn + &slice("- addresses: [198.18.1.1]\n"))).unwrap();
        assert_eq!(states(&cluster), [("198.18.1.1".into(), false, false)]);
        assert_eq!(
            cluster.warnings,
            [
                "test.yaml: EndpointSlice default/web-fqdn: addressType FQDN: not an IP address type; \
              skipped"
            ]
        );
    }

    #[test]
    fn kinds_that_are_not_ours_are_skipped_with_a_warning() {
        let yaml = "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: web}\n\
                    spec: {minAvailable: 1}\n---\n\
                    apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: reader, namespace: ops}\n---\n"
            .to_owned()
            + &service("");
        let cluster = parse(&yaml).unwrap();
        assert_eq!(cluster.services.len(), 1);
        assert_eq!(
            cluster.warnings,
            [
                "test.yaml: PodDisruptionBudget default/web: kind PodDisruptionBudget (policy/v1) \
                 is not ours; skipped",
                "test.yaml: Role ops/reader: kind Role (rbac.authorization.k8s.io/v1) is not ours; \
                 skipped",
            ]
        );
    }

    #[test]
    fn an_address_listed_twice_takes_its_best_listing() {
        let second = |conditions: &str| {
            slice(&format!(
                "- addresses: [198.18.1.1]\n  conditions: {conditions}\n"
            ))
            .replace("name: web-abc", "name: web-def")
        };
        for (first, other, expected) in [
            // Ready beats terminating, whichever slice comes first.
            (
                "{ready: true}",
                "{ready: false, serving: true, terminating: true}",
                (false, false),
            ),
            (
                "{ready: false, serving: true, terminating: true}",
                "{ready: true}",
                (false, false),
            ),
            // None ready: serving-terminating serves, beating a not-ready listing.
            (
                "{ready: false}",
                "{ready: false, serving: true, terminating: true}",
                (false, false),
            ),
            // Neither serves (another endpoint is ready): terminating beats not ready.
            (
                "{ready: false}",
                "{ready: false, serving: false, terminating: true}",
                (true, false),
            ),
        ] {
            let yaml = service("")
                + &slice(&format!(
                    "- addresses: [198.18.1.1]\n  conditions: {first}\n- addresses: [198.18.1.9]\n  \
                     conditions: {{ready: {}}}\n",
                    expected == (true, false)
                ))
                + &second(other);
            let cluster = parse(&yaml).unwrap();
            let (terminating, not_ready) = expected;
            assert_eq!(
                states(&cluster)[0],
                ("198.18.1.1".into(), terminating, not_ready),
                "{first} + {other}"
            );
        }
    }

    #[test]
    fn only_the_first_address_of_a_slice_endpoint_is_used() {
        let cluster = parse(
            &(service("")
                + &slice("- addresses: [198.18.1.1, 198.18.1.2]\n- addresses: [198.18.1.3]\n")),
        )
        .unwrap();
        let addresses: Vec<String> = states(&cluster).into_iter().map(|s| s.0).collect();
        assert_eq!(addresses, ["198.18.1.1", "198.18.1.3"]);
    }

    #[test]
    fn the_terminating_fallback_is_decided_per_address_family() {
        // IPv4 has a ready endpoint; IPv6 has only a serving+terminating one, which serves.
        let v6 = slice("- addresses: [\"2001:db8::1\"]\n  conditions: {ready: false, serving: true, terminating: true}\n")
            .replace("name: web-abc", "name: web-v6")
            .replace("addressType: IPv4", "addressType: IPv6");
        let v4 = slice(
            "- addresses: [198.18.1.1]\n  conditions: {ready: true}\n\
             - addresses: [198.18.1.2]\n  conditions: {ready: false, serving: true, terminating: true}\n",
        );
        let cluster = parse(&(service("") + &v4 + &v6)).unwrap();
        assert_eq!(
            states(&cluster),
            [
                ("198.18.1.1".into(), false, false),
                ("198.18.1.2".into(), true, false), // IPv4 has a ready one: existing flows only
                ("2001:db8::1".into(), false, false), // IPv6 has none: it serves
            ]
        );
    }

    #[test]
    fn services_of_another_load_balancer_class_are_skipped() {
        let ours = service(&format!(
            "  loadBalancerClass: {DEFAULT_LOAD_BALANCER_CLASS}\n"
        ));
        assert_eq!(parse(&ours).unwrap().services.len(), 1);
        assert_eq!(parse(&service("")).unwrap().services.len(), 1);
        let theirs = service("  loadBalancerClass: example.com/other\n");
        let cluster = parse(&theirs).unwrap();
        assert!(cluster.services.is_empty());
        assert_eq!(
            cluster.warnings,
            [
                "test.yaml: Service default/web: spec.loadBalancerClass example.com/other: not ours \
              (lb.xdp.rs/xdp); skipped"
            ]
        );
        // Told to serve that class: the service is ours, and one of the default class is not.
        let mut manifests = Manifests::default();
        manifest::read_text(&PathBuf::from("test.yaml"), &theirs, &mut manifests).unwrap();
        manifest::read_text(
            &PathBuf::from("b.yaml"),
            &ours
                .replace("198.18.100.1", "198.18.100.2")
                .replace("name: web", "name: mine"),
            &mut manifests,
        )
        .unwrap();
        let options = Options {
            load_balancer_class: "example.com/other".into(),
            ..Options::default()
        };
        let cluster = build(&manifests, &options).unwrap();
        let names: Vec<&str> = cluster.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web"]);
        assert_eq!(cluster.warnings.len(), 1, "{:?}", cluster.warnings);
    }

    /// Real `kubectl -o yaml` output carries fields we do not use (managedFields, uid,
    /// resourceVersion, status.conditions): all are known to the typed structs, so loading it
    /// warns of nothing.
    #[test]
    fn kubectl_output_in_the_test_data_loads_without_warnings() {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data"));
        let mut read = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let cluster = load(&path, &Options::default()).unwrap();
                assert!(!cluster.services.is_empty(), "{}", path.display());
                assert_eq!(cluster.warnings, Vec::<String>::new(), "{}", path.display());
                read += 1;
            }
        }
        assert!(read >= 2, "{read} files");
    }

    /// `n` Services, each on its own VIP with one slice; `bad` (if any) has a port of 0.
    fn services(n: usize, bad: Option<usize>) -> Vec<String> {
        (0..n)
            .map(|i| {
                let port = if Some(i) == bad { 0 } else { 8080 };
                service("")
                    .replace("name: web\n", &format!("name: web{i}\n"))
                    .replace("198.18.100.1", &format!("198.18.100.{}", i + 1))
                    .replace(
                        "port: 8080\n    targetPort",
                        &format!("port: {port}\n    targetPort"),
                    )
                    + &slice(&format!("- addresses: [198.18.1.{}]\n", i + 1))
                        .replace("name: web-abc", &format!("name: web{i}-abc"))
                        .replace("service-name: web\n", &format!("service-name: web{i}\n"))
            })
            .collect()
    }

    fn read(documents: &[String]) -> Manifests {
        let mut manifests = Manifests::default();
        let text = documents.join("---\n");
        manifest::read_text(&PathBuf::from("test.yaml"), &text, &mut manifests).unwrap();
        manifests
    }

    fn names(cluster: &Cluster) -> Vec<&str> {
        cluster.services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn one_bad_service_among_ten_is_refused_alone() {
        let manifests = read(&services(10, Some(4)));
        let outcome = build_each(&manifests, &Options::default(), &Cluster::default());
        assert_eq!(outcome.cluster.services.len(), 9);
        assert!(!names(&outcome.cluster).contains(&"web4"));
        let [refused] = &outcome.refused[..] else {
            panic!("one refusal: {:?}", outcome.refused)
        };
        assert_eq!(refused.reason, ConfigReason::InvalidValue);
        assert_eq!(
            (
                refused.object.kind.as_str(),
                refused.object.namespace.as_str(),
                refused.object.name.as_str()
            ),
            ("Service", "default", "web4")
        );
        assert_eq!(refused.field, "spec.ports[0].port");
        assert_eq!(
            refused.to_string(),
            "test.yaml: Service default/web4: spec.ports[0].port: 0 is not a port (1..=65535)"
        );
        // All or nothing, that one refuses everything.
        assert_eq!(build(&manifests, &Options::default()), Err(refused.clone()));
    }

    #[test]
    fn a_refused_service_keeps_its_previous_version() {
        let previous = build(&read(&services(3, None)), &Options::default()).unwrap();
        let outcome = build_each(&read(&services(3, Some(1))), &Options::default(), &previous);
        assert_eq!(outcome.refused.len(), 1);
        assert_eq!(outcome.cluster.services, previous.services);
        // A near miss found while reading: the same.
        let mut documents = services(3, None);
        documents[1] = documents[1].replace("targetPort: 8080", "tragetPort: 9090");
        let outcome = build_each(&read(&documents), &Options::default(), &previous);
        assert_eq!(outcome.refused[0].reason, ConfigReason::UnknownField);
        assert_eq!(outcome.cluster.services, previous.services);
    }

    #[test]
    fn a_bad_slice_takes_only_its_own_endpoints_away() {
        let yaml = service("")
            + &slice("- addresses: [198.18.1.1]\n")
            + &slice("- addresses: [198.18.1.x]\n").replace("name: web-abc", "name: web-def");
        let manifests = read(&[yaml]);
        let outcome = build_each(&manifests, &Options::default(), &Cluster::default());
        assert_eq!(
            states(&outcome.cluster),
            [("198.18.1.1".into(), false, false)]
        );
        let [refused] = &outcome.refused[..] else {
            panic!("one refusal: {:?}", outcome.refused)
        };
        assert_eq!(refused.object.to_string(), "EndpointSlice default/web-def");
        assert_eq!(refused.object.service.as_deref(), Some("web"));
        // Served before: its Service keeps that version, the bad slice's endpoints and all.
        let mut previous = outcome.cluster.clone();
        previous.services[0].ports[0].endpoints[0].weight = 7;
        let outcome = build_each(&manifests, &Options::default(), &previous);
        assert_eq!(outcome.cluster.services, previous.services);
    }

    #[test]
    fn the_oldest_service_wins_a_conflict_whatever_the_order() {
        let at = |name: &str, created: &str| {
            service("").replace(
                "name: web\n",
                &format!("name: {name}\n  creationTimestamp: \"{created}\"\n"),
            )
        };
        let old = at("zeta", "2024-01-01T00:00:00Z");
        let young = at("alpha", "2024-06-01T00:00:00Z");
        for documents in [[old.clone(), young.clone()], [young.clone(), old.clone()]] {
            let outcome = build_each(&read(&documents), &Options::default(), &Cluster::default());
            assert_eq!(names(&outcome.cluster), ["zeta"]);
            assert_eq!(outcome.refused.len(), 1);
            assert_eq!(outcome.refused[0].reason, ConfigReason::Conflict);
            assert_eq!(outcome.refused[0].object.name, "alpha");
            assert!(
                outcome.refused[0]
                    .message
                    .ends_with("already served by Service default/zeta"),
                "{}",
                outcome.refused[0]
            );
        }
        // No timestamps: namespace and name decide.
        let a = service("").replace("name: web\n", "name: a\n");
        let b = service("").replace("name: web\n", "name: b\n");
        for documents in [[a.clone(), b.clone()], [b, a]] {
            let outcome = build_each(&read(&documents), &Options::default(), &Cluster::default());
            assert_eq!(names(&outcome.cluster), ["a"]);
        }
    }

    #[test]
    fn shuffled_input_builds_the_same_cluster() {
        let mut documents = services(6, None);
        // Duplicated endpoints across slices and a conflicting pair.
        documents.push(
            slice("- addresses: [198.18.1.1]\n  conditions: {ready: false}\n")
                .replace("name: web-abc", "name: web0-dup")
                .replace("service-name: web\n", "service-name: web0\n"),
        );
        documents.push(service("").replace("name: web\n", "name: clash\n"));
        let expected = build_each(&read(&documents), &Options::default(), &Cluster::default());
        assert_eq!(expected.refused.len(), 1, "{:?}", expected.refused);
        // A fixed sequence of rotations and swaps: every order the same cluster.
        for round in 0..documents.len() {
            documents.rotate_left(3);
            documents.swap(0, round);
            let outcome = build_each(&read(&documents), &Options::default(), &Cluster::default());
            assert_eq!(outcome.cluster, expected.cluster, "round {round}");
        }
    }

    #[test]
    fn host_addresses_are_refused_by_the_projection_not_the_build() {
        let manifests = read(&services(2, None));
        let options = Options {
            host_addresses: vec!["198.18.100.2".parse().unwrap()],
            ..Options::default()
        };
        let shared = build_each(&manifests, &options, &Cluster::default());
        assert!(shared.refused.is_empty());
        assert_eq!(shared.cluster.services.len(), 2);
        let projected = project(&shared.cluster, &options);
        assert_eq!(names(&projected.cluster), ["web0"]);
        let [refused] = &projected.refused[..] else {
            panic!("one refusal: {:?}", projected.refused)
        };
        assert_eq!(refused.reason, ConfigReason::HostAddress);
        assert_eq!(refused.field, "spec.clusterIP");
    }

    #[test]
    fn an_endpoint_port_of_zero_is_no_port() {
        let yaml = service("").replace("targetPort: 8080", "targetPort: http")
            + &slice("- addresses: [198.18.1.1]\n")
                .replace("port: 8080\n  protocol", "port: 0\n  protocol");
        let cluster = parse(&yaml).unwrap();
        assert!(cluster.services[0].ports[0].endpoints.is_empty());
    }

    #[test]
    fn other_kinds_beside_services_are_skipped() {
        let yaml = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: tomcat-deployment}\nspec: {replicas: 4}\n---\n"
            .to_owned()
            + &service("");
        assert_eq!(parse(&yaml).unwrap().services.len(), 1);
    }
}
