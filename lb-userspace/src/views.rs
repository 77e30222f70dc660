//! What an operator reads: `get services`, `describe service` (in kubectl's layouts, plus live
//! counters; `-o yaml` and `-o json` print `v1 Service`s with the live state in a field of
//! their own, [`LIVE_FIELD`]) and `explain` (which backend a flow gets and why). They read the
//! applied state and the pinned maps of running controllers, so they work from any shell.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use k8s_openapi::{
    api::core::v1::{
        ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
        ServiceStatus, SessionAffinityConfig,
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
    jiff::Timestamp,
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, FlowCounter, FlowKey, FlowValue,
    conntrack::{self, Found},
    maps::{SERVICE_F_SOURCE_RANGES, is_ipv4_mapped, names},
    select::{Choice, Copied, Query, SelectionMaps, select},
};
use serde::Serialize;

use crate::{
    controller::{AppliedService, AppliedState, addr16},
    events::{ServiceEvent, human_age},
    model::{FrontendKind, Protocol, ServiceModel, VipKey},
};

/// Errors of reading what controllers applied.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// No controller state was found.
    #[error("no load balancer state under {0}: is `lb-userspace attach` running?")]
    NoState(String),
    /// A state file or a pinned map could not be read.
    #[error("{0}")]
    Read(String),
    /// The service is not known.
    #[error("service {namespace}/{name} not found")]
    NotFound {
        /// Namespace asked for.
        namespace: String,
        /// Name asked for.
        name: String,
    },
    /// The arguments of `explain` do not parse.
    #[error("{0}")]
    Usage(String),
}

/// One interface's applied state and its pinned counters.
pub struct Attached {
    /// The interface.
    pub iface: String,
    /// What its controller applied.
    pub state: AppliedState,
    /// What its controller announces, with `--announce-table`.
    pub announcements: Option<crate::announce::Record>,
    service_stats: Option<PerCpuArray<MapData, FlowCounter>>,
    backend_stats: Option<PerCpuArray<MapData, FlowCounter>>,
    conntrack: Option<HashMap<MapData, FlowKey, FlowValue>>,
    affinity: Option<HashMap<MapData, AffinityKey, AffinityValue>>,
    backends: Option<Array<MapData, Backend>>,
    /// `MAGLEV`, a hash of maps: service id -> the id of its table (an array).
    maglev: Option<MapData>,
}

impl Attached {
    /// Service `service_id`'s Maglev table as the kernel holds it, opened by its id.
    fn maglev_table(&self, service_id: u32) -> Option<MapData> {
        let outer = self.maglev.as_ref()?;
        let id: u32 = crate::syscall::lookup(outer.fd().as_fd().as_raw_fd(), &service_id)?;
        MapData::from_id(id).ok()
    }

    /// The size of service `service_id`'s Maglev table in the kernel (slot 0).
    fn maglev_size(&self, service_id: u32) -> Option<u32> {
        let table = self.maglev_table(service_id)?;
        crate::syscall::lookup(table.fd().as_fd().as_raw_fd(), &0u32)
    }
}

/// `explain` reads the kernel's own maps, through the selection the kernel runs.
impl SelectionMaps for Attached {
    type Flow = Copied<FlowValue>;
    type Affinity = Copied<AffinityValue>;
    type Backend = Copied<Backend>;

    fn flow(&self, key: &FlowKey) -> Option<Self::Flow> {
        self.conntrack.as_ref()?.get(key, 0).ok().map(Copied)
    }

    fn backend(&self, id: u32) -> Option<Self::Backend> {
        self.backends.as_ref()?.get(&id, 0).ok().map(Copied)
    }

    fn affinity(&self, key: &AffinityKey) -> Option<Self::Affinity> {
        self.affinity.as_ref()?.get(key, 0).ok().map(Copied)
    }

    fn maglev_slot(&self, service_id: u32, hash: u32) -> Option<u32> {
        let table = self.maglev_table(service_id)?;
        let fd = table.fd().as_fd().as_raw_fd();
        let size: u32 = crate::syscall::lookup(fd, &0u32)?;
        if size == 0 {
            return None;
        }
        crate::syscall::lookup(fd, &(1 + hash % size))
    }

    fn maglev_fallback_slot(&self, service_id: u32, hash: u32) -> Option<u32> {
        let table = self.maglev_table(service_id)?;
        let fd = table.fd().as_fd().as_raw_fd();
        let size: u32 = crate::syscall::lookup(fd, &0u32)?;
        if size == 0 {
            return None;
        }
        crate::syscall::lookup(fd, &(1 + size + hash % size))
    }
}

fn open_map(dir: &Path, name: &str) -> Option<Map> {
    let data = MapData::from_pin(dir.join(name)).ok()?;
    Map::from_map_data(data).ok()
}

/// Reads every interface's state under `state_root`, with the pinned maps under `pin_root`.
pub fn read_all(state_root: &Path, pin_root: &Path) -> Result<Vec<Attached>, ViewError> {
    let entries = std::fs::read_dir(state_root)
        .map_err(|_| ViewError::NoState(state_root.display().to_string()))?;
    let mut all = Vec::new();
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        let iface = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let state = AppliedState::read(&file).map_err(|e| ViewError::Read(e.to_string()))?;
        let announcements = crate::announce::Record::read(&crate::announce::record_file(&file))
            .map_err(|e| ViewError::Read(e.to_string()))?;
        let dir = pin_root.join(&iface);
        all.push(Attached {
            service_stats: open_map(&dir, names::SERVICE_STATS).and_then(|m| m.try_into().ok()),
            backend_stats: open_map(&dir, names::BACKEND_STATS).and_then(|m| m.try_into().ok()),
            conntrack: open_map(&dir, names::CONNTRACK).and_then(|m| m.try_into().ok()),
            affinity: open_map(&dir, names::AFFINITY).and_then(|m| m.try_into().ok()),
            backends: open_map(&dir, names::BACKENDS).and_then(|m| m.try_into().ok()),
            maglev: MapData::from_pin(dir.join(names::MAGLEV)).ok(),
            iface,
            state,
            announcements,
        });
    }
    if all.is_empty() {
        return Err(ViewError::NoState(state_root.display().to_string()));
    }
    Ok(all)
}

fn sum(map: Option<&PerCpuArray<MapData, FlowCounter>>, index: u32) -> FlowCounter {
    map.and_then(|m| m.get(&index, 0).ok())
        .map(|per_cpu| per_cpu.iter().sum::<FlowCounter>())
        .unwrap_or_default()
}

/// Packets, bytes and new flows.
#[derive(Debug, Default, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    /// Packets (both directions).
    pub packets: u64,
    /// Bytes (both directions).
    pub bytes: u64,
    /// New flows placed.
    pub new_flows: u64,
}

impl From<FlowCounter> for Traffic {
    fn from(c: FlowCounter) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
        }
    }
}

/// Live traffic of one endpoint.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    /// `addr:port`.
    pub endpoint: String,
    /// The pod, if known.
    pub pod: Option<String>,
    /// `serving`, or `terminating` / `not-ready` (existing flows only, no new ones).
    pub state: &'static str,
    /// Maglev weight.
    pub weight: u32,
    /// Packets (both directions).
    pub packets: u64,
    /// Bytes (both directions).
    pub bytes: u64,
    /// New flows placed on it.
    pub new_flows: u64,
    /// Flows tracked on it now (live entries of the connection table, as the data path
    /// follows them).
    pub flows: u64,
    /// How its packets cross the node: its host-side interface when it is a local pod on the
    /// path past the host's stack, `tunnel:NODE-ADDRESS` when it lives on another node (the
    /// packets go there inside the tunnel), `stack` otherwise.
    pub path: String,
}

/// One service as `describe` shows it.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    /// The interface of the load balancer serving it.
    pub interface: String,
    /// The service as applied.
    pub service: ServiceModel,
    /// Per VIP:port/proto: packets, bytes, new flows.
    pub frontends: BTreeMap<String, Traffic>,
    /// Per frontend (as `frontends`): the digest of its Maglev table, equal on every node
    /// serving the same endpoints (`None`: no table, no backend takes new flows).
    pub table_digests: BTreeMap<String, Option<String>>,
    /// Per service port name (or number): its endpoints' traffic.
    pub endpoints: BTreeMap<String, Vec<EndpointView>>,
    /// With `--announce-table`: per load balancer or external address, whether this node
    /// announces it (`announced`), or why not (`not announced: no-local-endpoint`).
    pub announcements: BTreeMap<String, String>,
}

/// Whether this node announces each load balancer and external address of `model`, and why
/// not (empty without `--announce-table`).
fn announcements(attached: &Attached, model: &ServiceModel) -> BTreeMap<String, String> {
    let Some(record) = &attached.announcements else {
        return BTreeMap::new();
    };
    let service = format!("{}/{}", model.namespace, model.name);
    model
        .addresses
        .iter()
        .filter(|a| {
            matches!(
                a.kind,
                FrontendKind::LoadBalancer | FrontendKind::ExternalIp
            )
        })
        .map(|a| {
            let decision = &record.decision;
            let mut text = match decision.withheld.get(&a.addr) {
                _ if decision.announced.contains(&a.addr) => "announced".to_owned(),
                Some(reasons) => match reasons.get(&service).or(reasons.values().next()) {
                    Some(why) => format!("not announced: {} ({})", why.name(), why.describe()),
                    None => "not announced".to_owned(),
                },
                None => "not announced: not served".to_owned(),
            };
            if let Some(error) = record.error.as_ref().filter(|_| !record.synced) {
                let _ = write!(
                    text,
                    "; the last sync of table {} failed: {error}",
                    record.table
                );
            }
            (a.addr.to_string(), text)
        })
        .collect()
}

/// Live connection-table entries per backend id (expired ones are no longer followed).
fn live_flows(attached: &Attached) -> BTreeMap<u32, u64> {
    let now = crate::conntrack::now_ns();
    let mut counts = BTreeMap::new();
    for (_, flow) in attached
        .conntrack
        .iter()
        .flat_map(|m| m.iter().filter_map(Result::ok))
    {
        if !conntrack::expired(flow.expires_ns, now) {
            *counts.entry(flow.backend_id).or_default() += 1;
        }
    }
    counts
}

fn service_view(attached: &Attached, model: &ServiceModel) -> ServiceView {
    let live = live_flows(attached);
    let mut frontends = BTreeMap::new();
    let mut table_digests = BTreeMap::new();
    let mut endpoints: BTreeMap<String, BTreeMap<String, EndpointView>> = BTreeMap::new();
    for applied in attached
        .state
        .services
        .iter()
        .filter(|s| s.namespace == model.namespace && s.name == model.name)
    {
        table_digests.insert(applied.frontends_text(), applied.table_digest.clone());
        frontends.insert(
            applied.frontends_text(),
            Traffic::from(sum(attached.service_stats.as_ref(), applied.id)),
        );
        let port_label = if applied.port_name.is_empty() {
            format!("{}/{}", applied.port, applied.protocol.name())
        } else {
            applied.port_name.clone()
        };
        let views = endpoints.entry(port_label).or_default();
        for backend in &applied.backends {
            let counter = sum(attached.backend_stats.as_ref(), backend.id);
            let endpoint = SocketAddr::new(backend.addr, backend.port).to_string();
            let view = views.entry(endpoint.clone()).or_insert(EndpointView {
                endpoint,
                pod: backend.pod.clone(),
                state: match (backend.terminating, backend.not_ready) {
                    (false, _) => "serving",
                    (true, false) => "terminating",
                    (true, true) => "not-ready",
                },
                weight: backend.weight,
                packets: 0,
                bytes: 0,
                new_flows: 0,
                flows: 0,
                path: match backend.node {
                    Some(node) => format!("tunnel:{node}"),
                    None => attached
                        .state
                        .local_pods
                        .get(&backend.addr)
                        .cloned()
                        .unwrap_or_else(|| "stack".into()),
                },
            });
            view.flows += live.get(&backend.id).copied().unwrap_or_default();
            view.packets += counter.packets;
            view.bytes += counter.bytes;
            view.new_flows += counter.new_flows;
        }
    }
    ServiceView {
        interface: attached.iface.clone(),
        service: model.clone(),
        frontends,
        table_digests,
        endpoints: endpoints
            .into_iter()
            .map(|(port, views)| (port, views.into_values().collect()))
            .collect(),
        announcements: announcements(attached, model),
    }
}

/// How a view is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Tables and fields, as kubectl prints them.
    Wide,
    /// Kubernetes objects in JSON.
    Json,
    /// Kubernetes objects in YAML.
    Yaml,
}

/// Which namespaces `get` lists.
#[derive(Debug, Clone, Copy)]
pub enum Namespaces<'a> {
    /// One (`-n`; `default` when not given).
    One(&'a str),
    /// Every one (`-A`): the table gains a NAMESPACE column.
    All,
}

/// The name of the field of our live state in the Kubernetes-shaped objects of `-o yaml` and
/// `-o json` (the project's annotation domain, `lb.xdp.rs`, in a field name's form).
pub const LIVE_FIELD: &str = "lbXdpRs";

/// A `v1 Service` as `-o yaml` and `-o json` print it: the Service as applied, and beside it
/// (in [`LIVE_FIELD`]) what this load balancer does with it. It reads as a `v1 Service`
/// (Kubernetes' readers ignore the extra field).
#[derive(Debug, Serialize)]
pub struct ServiceObject {
    /// The Service.
    #[serde(flatten)]
    pub service: Service,
    /// Its live state here.
    #[serde(rename = "lbXdpRs")]
    pub live: Live,
}

/// What this load balancer does with a Service.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Live {
    /// The interface of the load balancer serving it.
    pub interface: String,
    /// Its Maglev table size.
    pub table_size: u32,
    /// Per frontend (the VIP:port/protocol of one data-plane service, several joined by `, `
    /// when they share it): packets, bytes, new flows.
    pub frontends: BTreeMap<String, Traffic>,
    /// Per frontend (as `frontends`): the digest of its Maglev table, naming backends by
    /// address and port, so equal on every node serving the same endpoints.
    pub table_digests: BTreeMap<String, Option<String>>,
    /// Per service port name (or `port/protocol`): its endpoints' traffic.
    pub endpoints: BTreeMap<String, Vec<EndpointView>>,
    /// With `--announce-table`: per load balancer or external address, whether this node
    /// announces it, or why not.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub announcements: BTreeMap<String, String>,
    /// Its events, oldest first (`describe` only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventObject>,
}

/// An event, with Kubernetes' `v1 Event` field names.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventObject {
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: &'static str,
    /// `Applied`, `Rejected`.
    pub reason: String,
    /// What happened.
    pub message: String,
    /// How many times.
    pub count: u32,
    /// When first.
    pub first_timestamp: Time,
    /// When last.
    pub last_timestamp: Time,
}

/// `v1 List`, as `kubectl get -o yaml` prints several objects.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct List<T> {
    api_version: &'static str,
    items: Vec<T>,
    kind: &'static str,
    metadata: ListMeta,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: &'static str,
}

fn encode<T: Serialize>(value: &T, format: Format) -> String {
    match format {
        Format::Yaml => serde_yaml_ng::to_string(value).unwrap_or_default(),
        _ => serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
    }
}

fn non_empty<T: Default + PartialEq>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

/// The service's addresses of one kind, in the order the manifest gives them.
fn addresses(service: &ServiceModel, kind: FrontendKind) -> Vec<String> {
    service
        .addresses
        .iter()
        .filter(|a| a.kind == kind)
        .map(|a| a.addr.to_string())
        .collect()
}

/// `spec.clusterIP` (the first cluster IP), as kubectl shows it.
fn cluster_ip(service: &ServiceModel) -> Option<String> {
    service
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty())
        .or_else(|| {
            addresses(service, FrontendKind::ClusterIp)
                .into_iter()
                .next()
        })
}

/// `spec.ipFamilies`, or when the manifest does not say, the families of the cluster IPs (as
/// the API server fills them in).
fn ip_families(service: &ServiceModel) -> Vec<String> {
    if !service.ip_families.is_empty() {
        return service.ip_families.clone();
    }
    let mut families = Vec::new();
    for address in service
        .addresses
        .iter()
        .filter(|a| a.kind == FrontendKind::ClusterIp)
    {
        let family = if address.addr.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        };
        if !families.iter().any(|f| f == family) {
            families.push(family.to_owned());
        }
    }
    families
}

/// Whether the Service takes outside traffic, so has an `externalTrafficPolicy` (the API
/// server sets it for these types only).
fn has_external_policy(service: &ServiceModel) -> bool {
    matches!(service.service_type.as_str(), "LoadBalancer" | "NodePort")
}

/// The Service as a `v1 Service`.
pub fn to_service(s: &ServiceModel) -> Service {
    let ingress: Vec<LoadBalancerIngress> = addresses(s, FrontendKind::LoadBalancer)
        .into_iter()
        .map(|ip| LoadBalancerIngress {
            ip: Some(ip),
            ..Default::default()
        })
        .collect();
    let ports = s
        .ports
        .iter()
        .map(|p| ServicePort {
            name: non_empty(p.name.clone()),
            port: i32::from(p.port),
            protocol: Some(p.protocol.name().into()),
            target_port: Some(match p.target_port.parse() {
                Ok(number) => IntOrString::Int(number),
                Err(_) => IntOrString::String(p.target_port.clone()),
            }),
            node_port: p.node_port.map(i32::from),
            ..Default::default()
        })
        .collect();
    Service {
        metadata: ObjectMeta {
            name: Some(s.name.clone()),
            namespace: Some(s.namespace.clone()),
            labels: non_empty(s.labels.clone()),
            annotations: non_empty(s.annotations.clone()),
            creation_timestamp: s
                .created
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok())
                .map(Time),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(s.service_type.clone()),
            cluster_ip: cluster_ip(s),
            cluster_ips: non_empty(addresses(s, FrontendKind::ClusterIp)),
            external_ips: non_empty(addresses(s, FrontendKind::ExternalIp)),
            ip_families: non_empty(ip_families(s)),
            ip_family_policy: s.ip_family_policy.clone(),
            ports: Some(ports),
            selector: non_empty(s.selector.clone()),
            session_affinity: Some(
                if s.affinity_timeout_secs.is_some() {
                    "ClientIP"
                } else {
                    "None"
                }
                .into(),
            ),
            session_affinity_config: s.affinity_timeout_secs.map(|t| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: i32::try_from(t).ok(),
                }),
            }),
            external_traffic_policy: has_external_policy(s)
                .then(|| s.external_traffic_policy.clone()),
            internal_traffic_policy: Some(s.internal_traffic_policy.clone()),
            health_check_node_port: s.health_check_node_port.map(i32::from),
            load_balancer_source_ranges: non_empty(
                s.source_ranges.iter().map(ToString::to_string).collect(),
            ),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: non_empty(ingress),
            }),
            ..Default::default()
        }),
    }
}

fn service_object(view: ServiceView, events: &[ServiceEvent]) -> ServiceObject {
    ServiceObject {
        service: to_service(&view.service),
        live: Live {
            interface: view.interface,
            table_size: view.service.table_size,
            frontends: view.frontends,
            table_digests: view.table_digests,
            endpoints: view.endpoints,
            announcements: view.announcements,
            events: events
                .iter()
                .map(|e| EventObject {
                    type_: e.kind.name(),
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                    count: e.count,
                    first_timestamp: Time(e.first_seen),
                    last_timestamp: Time(e.last_seen),
                })
                .collect(),
        },
    }
}

/// kubectl's AGE of something created at `created` (RFC 3339): `<unknown>` without it.
fn age(created: Option<&str>, now: Timestamp) -> String {
    created
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map_or_else(|| "<unknown>".into(), |t| human_age(t, now))
}

/// kubectl's EXTERNAL-IP: the load balancer's and the external IPs; `<pending>` for a
/// LoadBalancer Service with neither, `<none>` for others.
fn external_ip_column(service: &ServiceModel) -> String {
    let mut external = addresses(service, FrontendKind::LoadBalancer);
    external.extend(addresses(service, FrontendKind::ExternalIp));
    match (external.is_empty(), service.service_type.as_str()) {
        (false, _) => external.join(","),
        (true, "LoadBalancer") => "<pending>".into(),
        (true, _) => "<none>".into(),
    }
}

/// kubectl's tab writers: `get` pads columns with 3 spaces to at least 10 characters,
/// `describe` with 2.
const GET_PADDING: usize = 3;
const GET_MIN_WIDTH: usize = 10;
const DESCRIBE_PADDING: usize = 2;

/// Lines of cells, aligned as kubectl's tab writer aligns its columns: `padding` spaces after
/// the widest cell of each column, at least `min_width` in all; the last cell of a line is not
/// padded.
fn aligned(rows: &[Vec<String>], padding: usize, min_width: usize) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter(|row| column + 1 < row.len())
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        for (column, cell) in row.iter().enumerate() {
            if column + 1 < row.len() {
                let width = (widths[column] + padding).max(min_width);
                let _ = write!(out, "{cell:<width$}");
            } else {
                out += cell;
            }
        }
        out += "\n";
    }
    out
}

fn views_in<'a>(
    all: &'a [Attached],
    namespaces: Namespaces<'a>,
    name: Option<&'a str>,
) -> impl Iterator<Item = (&'a Attached, &'a ServiceModel)> + 'a {
    all.iter().flat_map(move |a| {
        a.state
            .cluster
            .services
            .iter()
            .filter(move |s| match namespaces {
                Namespaces::One(namespace) => s.namespace == namespace,
                Namespaces::All => true,
            })
            .filter(move |s| name.is_none_or(|name| s.name == name))
            .map(move |s| (a, s))
    })
}

/// `get services [NAME]`: kubectl's columns (NAMESPACE first with `-A`, then NAME, TYPE,
/// CLUSTER-IP, EXTERNAL-IP, PORT(S), AGE), then ours: ENDPOINTS (of the port that has most)
/// and PACKETS (through every frontend). `-o yaml` and `-o json` print a `v1 List` of
/// [`ServiceObject`]s. An empty table is an empty string (see [`no_resources`]).
pub fn get_services(
    all: &[Attached],
    namespaces: Namespaces,
    name: Option<&str>,
    format: Format,
    now: Timestamp,
) -> Result<String, ViewError> {
    let views: Vec<ServiceView> = views_in(all, namespaces, name)
        .map(|(a, s)| service_view(a, s))
        .collect();
    if let (Some(name), true) = (name, views.is_empty()) {
        return Err(ViewError::NotFound {
            namespace: match namespaces {
                Namespaces::One(namespace) => namespace.into(),
                Namespaces::All => "*".into(),
            },
            name: name.into(),
        });
    }
    if format != Format::Wide {
        let list = List {
            api_version: "v1",
            items: views
                .into_iter()
                .map(|view| service_object(view, &[]))
                .collect(),
            kind: "List",
            metadata: ListMeta {
                resource_version: "",
            },
        };
        return Ok(encode(&list, format));
    }
    if views.is_empty() {
        return Ok(String::new());
    }
    let every_namespace = matches!(namespaces, Namespaces::All);
    let mut header = vec![
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
        "ENDPOINTS",
        "PACKETS",
    ];
    if every_namespace {
        header.insert(0, "NAMESPACE");
    }
    let mut rows = vec![header.into_iter().map(str::to_owned).collect::<Vec<_>>()];
    for view in &views {
        let s = &view.service;
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| match p.node_port {
                Some(n) => format!("{}:{}/{}", p.port, n, p.protocol.name()),
                None => format!("{}/{}", p.port, p.protocol.name()),
            })
            .collect();
        let endpoints: usize = s.ports.iter().map(|p| p.endpoints.len()).max().unwrap_or(0);
        let packets: u64 = view.frontends.values().map(|c| c.packets).sum();
        let mut row = vec![
            s.name.clone(),
            s.service_type.clone(),
            cluster_ip(s).unwrap_or_else(|| "<none>".into()),
            external_ip_column(s),
            if ports.is_empty() {
                "<none>".into()
            } else {
                ports.join(",")
            },
            age(s.created.as_deref(), now),
            endpoints.to_string(),
            packets.to_string(),
        ];
        if every_namespace {
            row.insert(0, s.namespace.clone());
        }
        rows.push(row);
    }
    Ok(aligned(&rows, GET_PADDING, GET_MIN_WIDTH))
}

/// What kubectl says when there is nothing to list.
pub fn no_resources(namespaces: Namespaces) -> String {
    match namespaces {
        Namespaces::One(namespace) => format!("No resources found in {namespace} namespace."),
        Namespaces::All => "No resources found".into(),
    }
}

/// Labels (`key=value`) or annotations (`key: value`) as kubectl's describe lists them: one a
/// line under the field's name, `<none>` when there is none. Long or multi-line annotations
/// go on lines of their own, shortened, as kubectl does.
fn multiline(
    rows: &mut Vec<Vec<String>>,
    title: &str,
    map: &BTreeMap<String, String>,
    annotations: bool,
) {
    /// kubectl's longest annotation line.
    const MAX_ANNOTATION_LEN: usize = 140;
    let shorten = |s: &str, max: usize| {
        if s.chars().count() > max {
            s.chars().take(max).collect::<String>() + "..."
        } else {
            s.to_owned()
        }
    };
    let mut first = true;
    let mut push = |rows: &mut Vec<Vec<String>>, value: String| {
        let key = if first {
            format!("{title}:")
        } else {
            String::new()
        };
        first = false;
        rows.push(vec![key, value]);
    };
    let entries: Vec<(&String, &String)> = map
        .iter()
        .filter(|(k, _)| !annotations || *k != LAST_APPLIED_ANNOTATION)
        .collect();
    if entries.is_empty() {
        push(rows, "<none>".into());
        return;
    }
    for (key, value) in entries {
        if !annotations {
            push(rows, format!("{key}={value}"));
            continue;
        }
        let value = value.strip_suffix('\n').unwrap_or(value);
        if value.len() + key.len() + 2 > MAX_ANNOTATION_LEN || value.contains('\n') {
            push(rows, format!("{key}:"));
            for line in value.split('\n') {
                push(rows, format!("  {}", shorten(line, MAX_ANNOTATION_LEN - 2)));
            }
        } else {
            push(rows, format!("{key}: {value}"));
        }
    }
}

/// The annotation `kubectl apply` keeps, which kubectl's describe leaves out.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// kubectl's events table: `Type  Reason  Age  From  Message`, oldest first.
fn events_table(events: &[ServiceEvent], now: Timestamp) -> String {
    if events.is_empty() {
        return String::new();
    }
    let mut sorted: Vec<&ServiceEvent> = events.iter().collect();
    sorted.sort_by_key(|e| e.last_seen);
    let mut rows = vec![
        ["  Type", "Reason", "Age", "From", "Message"]
            .map(str::to_owned)
            .to_vec(),
        ["  ----", "------", "----", "----", "-------"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for e in sorted {
        let age = if e.count > 1 {
            format!(
                "{} (x{} over {})",
                human_age(e.last_seen, now),
                e.count,
                human_age(e.first_seen, now)
            )
        } else {
            human_age(e.first_seen, now)
        };
        rows.push(vec![
            format!("  {}", e.kind.name()),
            e.reason.clone(),
            age,
            EVENT_SOURCE.into(),
            e.message.trim().to_owned(),
        ]);
    }
    format!("Events:\n{}", aligned(&rows, DESCRIBE_PADDING, 0))
}

/// The `From` of our events.
pub const EVENT_SOURCE: &str = "lb-userspace";

/// `describe service NAME`: kubectl's fields in kubectl's order, ending with the events; then
/// the live state (the data path, per-frontend and per-endpoint counters, how each endpoint's
/// packets cross the node). `-o yaml` and `-o json` print a [`ServiceObject`] with its events.
pub fn describe_service(
    all: &[Attached],
    namespace: &str,
    name: &str,
    format: Format,
    now: Timestamp,
) -> Result<String, ViewError> {
    let (attached, model) = views_in(all, Namespaces::One(namespace), Some(name))
        .next()
        .ok_or_else(|| ViewError::NotFound {
            namespace: namespace.into(),
            name: name.into(),
        })?;
    let events: Vec<ServiceEvent> = attached
        .state
        .events
        .iter()
        .filter(|e| e.of(namespace, name))
        .cloned()
        .collect();
    let view = service_view(attached, model);
    if format != Format::Wide {
        return Ok(encode(&service_object(view, &events), format));
    }
    let s = &view.service;
    let mut rows: Vec<Vec<String>> = Vec::new();
    let line = |rows: &mut Vec<Vec<String>>, key: &str, value: String| {
        rows.push(vec![format!("{key}:"), value]);
    };
    line(&mut rows, "Name", s.name.clone());
    line(&mut rows, "Namespace", s.namespace.clone());
    multiline(&mut rows, "Labels", &s.labels, false);
    multiline(&mut rows, "Annotations", &s.annotations, true);
    line(
        &mut rows,
        "Selector",
        if s.selector.is_empty() {
            "<none>".into()
        } else {
            s.selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        },
    );
    line(&mut rows, "Type", s.service_type.clone());
    if let Some(policy) = &s.ip_family_policy {
        line(&mut rows, "IP Family Policy", policy.clone());
    }
    let or_none = |list: Vec<String>| {
        if list.is_empty() {
            "<none>".to_owned()
        } else {
            list.join(",")
        }
    };
    line(&mut rows, "IP Families", or_none(ip_families(s)));
    line(
        &mut rows,
        "IP",
        cluster_ip(s).unwrap_or_else(|| "<none>".into()),
    );
    line(
        &mut rows,
        "IPs",
        or_none(addresses(s, FrontendKind::ClusterIp)),
    );
    let external = addresses(s, FrontendKind::ExternalIp);
    if !external.is_empty() {
        line(&mut rows, "External IPs", external.join(","));
    }
    let ingress = addresses(s, FrontendKind::LoadBalancer);
    if !ingress.is_empty() {
        line(&mut rows, "LoadBalancer Ingress", ingress.join(", "));
    }
    for port in &s.ports {
        let name = if port.name.is_empty() {
            "<unset>".to_owned()
        } else {
            port.name.clone()
        };
        let protocol = port.protocol.name();
        // kubectl's tab writer: the port's name is a column of its own line.
        rows.push(vec![
            "Port:".into(),
            name.clone(),
            format!("{}/{protocol}", port.port),
        ]);
        line(
            &mut rows,
            "TargetPort",
            format!("{}/{protocol}", port.target_port),
        );
        if let Some(node_port) = port.node_port {
            rows.push(vec![
                "NodePort:".into(),
                name.clone(),
                format!("{node_port}/{protocol}"),
            ]);
        }
        let serving: Vec<String> = port
            .endpoints
            .iter()
            .filter(|e| !e.terminating)
            .map(|e| SocketAddr::new(e.addr, e.port).to_string())
            .collect();
        // kubectl shows three endpoints, then how many more.
        let shown = match serving.len() {
            0 => "<none>".to_owned(),
            1..=3 => serving.join(","),
            n => format!("{} + {} more...", serving[..3].join(","), n - 3),
        };
        line(&mut rows, "Endpoints", shown);
    }
    line(
        &mut rows,
        "Session Affinity",
        if s.affinity_timeout_secs.is_some() {
            "ClientIP"
        } else {
            "None"
        }
        .into(),
    );
    if has_external_policy(s) {
        line(
            &mut rows,
            "External Traffic Policy",
            s.external_traffic_policy.clone(),
        );
    }
    line(
        &mut rows,
        "Internal Traffic Policy",
        s.internal_traffic_policy.clone(),
    );
    if let Some(port) = s.health_check_node_port {
        line(&mut rows, "HealthCheck NodePort", port.to_string());
    }
    if !s.source_ranges.is_empty() {
        line(
            &mut rows,
            "LoadBalancer Source Ranges",
            s.source_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if events.is_empty() {
        line(&mut rows, "Events", "<none>".into());
    }
    let mut out = aligned(&rows, DESCRIBE_PADDING, 0);
    out += &events_table(&events, now);
    out += &live_section(&view);
    Ok(out)
}

/// Ours, after kubectl's fields: the data path and the live counters.
fn live_section(view: &ServiceView) -> String {
    let s = &view.service;
    let mut out = String::new();
    let local_pods = view
        .endpoints
        .values()
        .flatten()
        .filter(|e| e.path != "stack")
        .map(|e| e.path.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let affinity = s
        .affinity_timeout_secs
        .map(|t| format!("; ClientIP affinity per Service port, timeout {t}s"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "Load Balancer:  XDP on {} (Maglev, table size {}){affinity}; local pods past the \
         host's stack: {local_pods}",
        view.interface, s.table_size
    );
    if !view.announcements.is_empty() {
        let _ = writeln!(out, "Announcements (to the routing daemon):");
        let width = view
            .announcements
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(0);
        for (addr, text) in &view.announcements {
            let _ = writeln!(out, "  {addr:<width$}  {text}");
        }
    }
    let _ = writeln!(out, "Traffic:");
    let _ = writeln!(
        out,
        "  {:<30} {:>10} {:>12} {:>10}",
        "FRONTEND", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for (frontend, c) in &view.frontends {
        let _ = writeln!(
            out,
            "  {frontend:<30} {:>10} {:>12} {:>10}",
            c.packets, c.bytes, c.new_flows
        );
    }
    let _ = writeln!(
        out,
        "  {:<30} {:<12} {:>6} {:>10} {:>12} {:>10} {:>6}  {:<10}  POD",
        "ENDPOINT", "STATE", "WEIGHT", "PACKETS", "BYTES", "NEW FLOWS", "FLOWS", "PATH"
    );
    for (port, endpoints) in &view.endpoints {
        for e in endpoints {
            let _ = writeln!(
                out,
                "  {:<30} {:<12} {:>6} {:>10} {:>12} {:>10} {:>6}  {:<10}  {}",
                format!("{} ({port})", e.endpoint),
                e.state,
                e.weight,
                e.packets,
                e.bytes,
                e.new_flows,
                e.flows,
                e.path,
                e.pod.clone().unwrap_or_else(|| "-".into())
            );
        }
    }
    out
}

/// Why a flow goes where it goes.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The service.
    pub service: String,
    /// The chosen endpoint.
    pub endpoint: Option<String>,
    /// `conntrack`, `affinity`, `maglev` or `no backend`.
    pub decided_by: String,
    /// Details.
    pub detail: String,
}

/// `explain SRC_IP:SRC_PORT VIP:PORT/PROTO`.
pub fn explain(
    all: &[Attached],
    source: &str,
    frontend: &str,
    format: Format,
) -> Result<String, ViewError> {
    let source: SocketAddr = source
        .parse()
        .map_err(|_| ViewError::Usage(format!("{source:?}: expected SRC_IP:SRC_PORT")))?;
    let (vip, protocol) = frontend
        .rsplit_once('/')
        .map_or((frontend, "TCP"), |(v, p)| (v, p));
    let vip: SocketAddr = vip
        .parse()
        .map_err(|_| ViewError::Usage(format!("{frontend:?}: expected VIP:PORT/PROTO")))?;
    // On the command line either case will do; manifests are case-sensitive, as the API is.
    let protocol = Protocol::parse(Some(&protocol.to_ascii_uppercase()))
        .map_err(|other| ViewError::Usage(format!("{other}: expected TCP or UDP")))?;
    let found = all.iter().find_map(|a| {
        a.state
            .services
            .iter()
            .find(|s| {
                s.frontend(&VipKey {
                    vip: vip.ip(),
                    port: vip.port(),
                    protocol,
                })
                .is_some()
            })
            .map(|s| (a, s))
    });
    let Some((attached, service)) = found else {
        return Err(ViewError::Usage(format!(
            "{vip}/{} is not a VIP:port of any service: the packet passes untouched",
            protocol.name()
        )));
    };
    let explanation = explain_flow(attached, service, source, vip, protocol);
    if format != Format::Wide {
        return Ok(encode(&explanation, format));
    }
    Ok(format!(
        "Service:     {}\nEndpoint:    {}\nDecided by:  {}\nDetail:      {}\n",
        explanation.service,
        explanation
            .endpoint
            .clone()
            .unwrap_or_else(|| "<none>".into()),
        explanation.decided_by,
        explanation.detail
    ))
}

/// The endpoint a data-plane backend slot names.
fn endpoint(backend: &Backend) -> String {
    let at = SocketAddr::new(ip_of(&backend.addr), backend.port);
    if backend.node == [0; 16] {
        at.to_string()
    } else {
        format!(
            "{at} (on node {}, through the tunnel)",
            ip_of(&backend.node)
        )
    }
}

/// The address a 16-byte data plane address holds.
fn ip_of(addr: &[u8; 16]) -> IpAddr {
    if is_ipv4_mapped(addr) {
        IpAddr::from([addr[12], addr[13], addr[14], addr[15]])
    } else {
        IpAddr::from(*addr)
    }
}

fn explain_flow(
    attached: &Attached,
    service: &AppliedService,
    source: SocketAddr,
    vip: SocketAddr,
    protocol: Protocol,
) -> Explanation {
    let label = format!(
        "{}/{} ({}/{})",
        service.namespace,
        service.name,
        SocketAddr::new(vip.ip(), vip.port()),
        protocol.name()
    );
    let frontend = service.frontend(&VipKey {
        vip: vip.ip(),
        port: vip.port(),
        protocol,
    });
    let value = frontend.map(|f| service.frontend_value(f));
    if value.is_some_and(|v| v.flags & SERVICE_F_SOURCE_RANGES != 0)
        && !service
            .source_ranges
            .iter()
            .any(|r| r.contains(source.ip()))
    {
        return Explanation {
            service: label,
            endpoint: None,
            decided_by: "source ranges".into(),
            detail: "the client is outside the Service's loadBalancerSourceRanges: every \
                     packet is dropped and counted (drop_source_range)"
                .into(),
        };
    }
    let value = value.unwrap_or_default();
    let key = FlowKey {
        src: addr16(source.ip()),
        dst: addr16(vip.ip()),
        sport: source.port(),
        dport: vip.port(),
        proto: protocol.number(),
        pad: [0; 3],
    };
    // The kernel's own selection over its maps, for the flow's next packet that is not a SYN
    // (a SYN is always placed afresh).
    let now = crate::conntrack::now_ns();
    let selection = select(
        attached,
        &Query {
            key: &key,
            service: &value,
            ipv4: source.is_ipv4(),
            syn: false,
            now_ns: now,
            assigned: None,
        },
    );
    let mut stale = String::new();
    let mut tracked_state = "";
    let mut expires_ns = 0;
    if let (Some(entry), Some(found)) = (&selection.tracked.entry, selection.tracked.found) {
        tracked_state = conntrack::state_name(key.proto, entry.state);
        expires_ns = entry.expires_ns;
        let why = match found {
            Found::Follow => "",
            Found::OtherService => "is another service's",
            Found::Expired => "expired",
            _ => "names a backend no longer serving",
        };
        stale = format!("its tracked entry ({tracked_state}) {why}, so ");
    }
    match selection.choice {
        Choice::Tracked {
            backend_id,
            backend,
        } => Explanation {
            service: label,
            endpoint: Some(endpoint(&backend)),
            decided_by: "conntrack".into(),
            detail: format!(
                "a tracked flow ({tracked_state}, expires in {}s), kept on backend \
                 {backend_id}; a new connection (SYN) from this port is placed afresh",
                expires_ns.saturating_sub(now) / 1_000_000_000,
            ),
        },
        Choice::Affinity {
            entry,
            backend_id,
            backend,
        } => Explanation {
            service: label,
            endpoint: Some(endpoint(&backend)),
            decided_by: "affinity".into(),
            detail: format!(
                "{stale}ClientIP affinity: this client's last backend {backend_id}, used {}s \
                 ago (timeout {}s)",
                now.saturating_sub(entry.last_used_ns) / 1_000_000_000,
                value.affinity_timeout_secs
            ),
        },
        Choice::Maglev {
            hash,
            backend_id,
            backend,
        } => {
            let size = attached
                .maglev_size(service.id)
                .unwrap_or(service.table_size);
            Explanation {
                service: label,
                endpoint: Some(endpoint(&backend)),
                decided_by: "maglev".into(),
                detail: format!(
                    "{stale}a new flow: hash {hash:#010x} -> slot {} of {size} -> backend \
                     {backend_id}",
                    hash % size.max(1)
                ),
            }
        }
        // Only for packets out of the tunnel, which `explain` does not ask about.
        Choice::Assigned {
            backend_id,
            backend,
        } => Explanation {
            service: label,
            endpoint: Some(endpoint(&backend)),
            decided_by: "tunnel".into(),
            detail: format!("the node that received it picked backend {backend_id}"),
        },
        Choice::None => Explanation {
            service: label,
            endpoint: None,
            decided_by: "no backend".into(),
            detail: if service.drop_when_empty {
                "no endpoint on this node takes new flows (a Local traffic policy): the \
                 packet is dropped and counted (drop_no_local_backend)"
                    .into()
            } else {
                "no endpoint takes new flows: a TCP SYN is refused with a reset, a UDP \
                 datagram with ICMP port unreachable (reject_tcp, reject_udp); other packets \
                 are dropped and counted (drop_no_backend)"
                    .into()
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        events::{self, EventKind},
        manifest::{Manifests, read_text},
        model::{self, Options},
    };

    const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: tomcat-load-balancer
  namespace: default
  creationTimestamp: "2026-11-20T10:00:00Z"
  labels: {app: tomcat, tier: web}
  annotations:
    lb.xdp.rs/maglev-table-size: "251"
    team: payments
    kubectl.kubernetes.io/last-applied-configuration: "{}"
spec:
  type: LoadBalancer
  clusterIP: 10.96.43.114
  clusterIPs: [10.96.43.114]
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  selector: {app: tomcat}
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [198.18.0.0/16]
  ports:
  - {port: 8080, targetPort: 8080, nodePort: 30854, protocol: TCP}
status:
  loadBalancer:
    ingress: [{ip: 198.18.100.1}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: tomcat-load-balancer, namespace: default}
subsets:
- addresses: [{ip: 172.17.0.5}, {ip: 172.17.0.7}, {ip: 172.17.0.8}, {ip: 172.17.0.9}]
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: shop, creationTimestamp: "2026-11-18T12:00:00Z"}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 8080, targetPort: http, nodePort: 30854, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11, "fd00::11"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalIPs: [198.18.0.5, "2001:db8::5"]
  ports:
  - {port: 80}
status:
  loadBalancer:
    ingress: [{ip: 198.18.100.2}, {ip: "2001:db8::2"}]
---
apiVersion: v1
kind: Service
metadata: {name: internal, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  clusterIPs: [10.96.0.12, "fd00::12"]
  ports:
  - {port: 443}
"#;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn now() -> Timestamp {
        at("2026-11-20T13:00:00Z")
    }

    fn attached(text: &str) -> Vec<Attached> {
        let mut manifests = Manifests::default();
        read_text(Path::new("cfg/tomcat.yaml"), text, &mut manifests).unwrap();
        let cluster = model::build(&manifests, &Options::default()).unwrap();
        vec![Attached {
            iface: "eth0".into(),
            state: AppliedState {
                cluster,
                ..AppliedState::default()
            },
            announcements: None,
            service_stats: None,
            backend_stats: None,
            conntrack: None,
            affinity: None,
            backends: None,
            maglev: None,
        }]
    }

    fn get(namespaces: Namespaces, name: Option<&str>, format: Format) -> String {
        get_services(&attached(MANIFESTS), namespaces, name, format, now()).unwrap()
    }

    #[test]
    fn get_lists_one_namespace_in_kubectls_columns() {
        assert_eq!(
            get(Namespaces::One("default"), None, Format::Wide),
            "\
NAME                   TYPE           CLUSTER-IP     EXTERNAL-IP    PORT(S)          AGE       ENDPOINTS   PACKETS
tomcat-load-balancer   LoadBalancer   10.96.43.114   198.18.100.1   8080:30854/TCP   3h        4           0
"
        );
        assert_eq!(
            get(
                Namespaces::One("default"),
                Some("tomcat-load-balancer"),
                Format::Wide
            ),
            get(Namespaces::One("default"), None, Format::Wide)
        );
        assert_eq!(get(Namespaces::One("nowhere"), None, Format::Wide), "");
        assert_eq!(
            no_resources(Namespaces::One("nowhere")),
            "No resources found in nowhere namespace."
        );
        let missing = get_services(
            &attached(MANIFESTS),
            Namespaces::One("shop"),
            Some("tomcat-load-balancer"),
            Format::Wide,
            now(),
        );
        assert!(matches!(missing, Err(ViewError::NotFound { .. })));
    }

    #[test]
    fn get_all_namespaces_leads_with_the_namespace_pending_and_dual_stack() {
        assert_eq!(
            get(Namespaces::All, None, Format::Wide),
            "\
NAMESPACE   NAME                   TYPE           CLUSTER-IP     EXTERNAL-IP                                       PORT(S)                 AGE         ENDPOINTS   PACKETS
default     tomcat-load-balancer   LoadBalancer   10.96.43.114   198.18.100.1                                      8080:30854/TCP          3h          4           0
shop        dns                    LoadBalancer   10.96.0.20     <pending>                                         8080:30854/TCP,53/UDP   2d1h        0           0
shop        dual                   LoadBalancer   10.96.0.11     198.18.100.2,2001:db8::2,198.18.0.5,2001:db8::5   80/TCP                  <unknown>   0           0
shop        internal               ClusterIP      10.96.0.12     <none>                                            443/TCP                 <unknown>   0           0
"
        );
    }

    #[test]
    fn describe_prints_kubectls_fields_in_kubectls_order_then_the_live_state() {
        let mut all = attached(MANIFESTS);
        let state = &mut all[0].state;
        let event = |kind, reason: &str, message: &str, when: &str| {
            events::ServiceEvent::new(
                "default",
                "tomcat-load-balancer",
                kind,
                reason,
                message.into(),
                at(when),
            )
        };
        events::record(
            &mut state.events,
            event(
                EventKind::Normal,
                "Applied",
                "Added to the data plane: 8080/TCP, 4 endpoints serving",
                "2026-11-20T10:00:00Z",
            ),
        );
        events::record(
            &mut state.events,
            event(
                EventKind::Warning,
                "Rejected",
                "spec.ports[0].port: 0 is not a port (1..=65535)",
                "2026-11-20T12:50:00Z",
            ),
        );
        events::record(
            &mut state.events,
            event(
                EventKind::Warning,
                "Rejected",
                "spec.ports[0].port: 0 is not a port (1..=65535)",
                "2026-11-20T12:55:00Z",
            ),
        );
        let described =
            describe_service(&all, "default", "tomcat-load-balancer", Format::Wide, now()).unwrap();
        let (kubectl, ours) = described.split_at(described.find("Load Balancer:").unwrap());
        assert_eq!(
            kubectl,
            "\
Name:                        tomcat-load-balancer
Namespace:                   default
Labels:                      app=tomcat
                             tier=web
Annotations:                 lb.xdp.rs/maglev-table-size: 251
                             team: payments
Selector:                    app=tomcat
Type:                        LoadBalancer
IP Family Policy:            SingleStack
IP Families:                 IPv4
IP:                          10.96.43.114
IPs:                         10.96.43.114
LoadBalancer Ingress:        198.18.100.1
Port:                        <unset>  8080/TCP
TargetPort:                  8080/TCP
NodePort:                    <unset>  30854/TCP
Endpoints:                   172.17.0.5:8080,172.17.0.7:8080,172.17.0.8:8080 + 1 more...
Session Affinity:            None
External Traffic Policy:     Local
Internal Traffic Policy:     Cluster
HealthCheck NodePort:        32000
LoadBalancer Source Ranges:  198.18.0.0/16
Events:
  Type     Reason    Age               From          Message
  ----     ------    ----              ----          -------
  Normal   Applied   3h                lb-userspace  Added to the data plane: 8080/TCP, 4 endpoints serving
  Warning  Rejected  5m (x2 over 10m)  lb-userspace  spec.ports[0].port: 0 is not a port (1..=65535)
"
        );
        assert!(
            ours.starts_with(
                "Load Balancer:  XDP on eth0 (Maglev, table size 251); local pods past the \
                 host's stack: 0\nTraffic:\n"
            ),
            "{ours}"
        );
    }

    #[test]
    fn describe_without_labels_or_events_says_none_and_dual_stack_keeps_cluster_ips_apart() {
        let all = attached(MANIFESTS);
        let described = describe_service(&all, "shop", "dual", Format::Wide, now()).unwrap();
        let kubectl = &described[..described.find("Load Balancer:").unwrap()];
        assert_eq!(
            kubectl,
            "\
Name:                     dual
Namespace:                shop
Labels:                   <none>
Annotations:              <none>
Selector:                 <none>
Type:                     LoadBalancer
IP Family Policy:         RequireDualStack
IP Families:              IPv4,IPv6
IP:                       10.96.0.11
IPs:                      10.96.0.11,fd00::11
External IPs:             198.18.0.5,2001:db8::5
LoadBalancer Ingress:     198.18.100.2, 2001:db8::2
Port:                     <unset>  80/TCP
TargetPort:               80/TCP
Endpoints:                <none>
Session Affinity:         None
External Traffic Policy:  Cluster
Internal Traffic Policy:  Cluster
Events:                   <none>
"
        );
        // Families the manifest does not give are those of the cluster IPs, as the API server
        // fills them in; a ClusterIP Service has no external traffic policy.
        let described = describe_service(&all, "shop", "internal", Format::Wide, now()).unwrap();
        assert!(
            described.contains("\nIP Families:              IPv4,IPv6\n"),
            "{described}"
        );
        assert!(
            !described.contains("External Traffic Policy"),
            "{described}"
        );
        assert!(
            describe_service(&all, "shop", "dns", Format::Wide, now())
                .unwrap()
                .contains("\nSession Affinity:         ClientIP\n")
        );
        assert!(matches!(
            describe_service(&all, "default", "dual", Format::Wide, now()),
            Err(ViewError::NotFound { .. })
        ));
    }

    #[test]
    fn yaml_reads_back_as_kubernetes_services_and_as_our_manifests() {
        let all = attached(MANIFESTS);
        let described = describe_service(&all, "shop", "dual", Format::Yaml, now()).unwrap();
        let service: Service = serde_yaml_ng::from_str(&described).unwrap();
        let model = &all[0].state.cluster.services[2];
        assert_eq!(model.name, "dual");
        assert_eq!(service, to_service(model));
        let spec = service.spec.unwrap();
        assert_eq!(
            spec.cluster_ips,
            Some(vec!["10.96.0.11".to_owned(), "fd00::11".to_owned()])
        );
        let ingress: Vec<String> = service
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap()
            .into_iter()
            .filter_map(|i| i.ip)
            .collect();
        assert_eq!(ingress, ["198.18.100.2", "2001:db8::2"]);

        // `get -o yaml` is a v1 List our own reader takes back: the same Services.
        let listed = get(Namespaces::All, None, Format::Yaml);
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&listed).unwrap();
        assert_eq!(value["kind"], "List");
        assert_eq!(value["items"][0]["kind"], "Service");
        assert_eq!(
            value["items"][0]["metadata"]["creationTimestamp"],
            "2026-11-20T10:00:00Z"
        );
        assert_eq!(value["items"][0][LIVE_FIELD]["tableSize"], 251);
        let read_back = attached(&listed);
        let strip = |services: &[ServiceModel]| -> Vec<ServiceModel> {
            services
                .iter()
                .cloned()
                .map(|mut s| {
                    // Families the manifest left out are printed as the API server fills them.
                    s.ip_families = ip_families(&s);
                    s.file = String::new();
                    for port in &mut s.ports {
                        port.endpoints.clear();
                    }
                    s
                })
                .collect()
        };
        assert_eq!(
            strip(&read_back[0].state.cluster.services),
            strip(&all[0].state.cluster.services)
        );

        // JSON: the same objects; describe's carry the events.
        let mut all = all;
        events::record(
            &mut all[0].state.events,
            events::ServiceEvent::new(
                "shop",
                "dual",
                EventKind::Normal,
                "Applied",
                "Added".into(),
                now(),
            ),
        );
        let json: serde_json::Value = serde_json::from_str(
            &describe_service(&all, "shop", "dual", Format::Json, now()).unwrap(),
        )
        .unwrap();
        assert_eq!(json["apiVersion"], "v1");
        assert_eq!(json["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(json[LIVE_FIELD]["events"][0]["type"], "Normal");
        assert_eq!(
            json[LIVE_FIELD]["events"][0]["lastTimestamp"],
            "2026-11-20T13:00:00Z"
        );
        let listed: serde_json::Value =
            serde_json::from_str(&get(Namespaces::One("shop"), None, Format::Json)).unwrap();
        assert_eq!(listed["items"].as_array().map(Vec::len), Some(3));
    }
}
