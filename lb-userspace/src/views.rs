//! What an operator reads: `get services`, `describe service` (in kubectl's layout, plus live
//! counters) and `explain` (which backend a flow gets and why). They read the applied state and
//! the pinned maps of running controllers, so they work from any shell.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, path::Path};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    AffinityKey, AffinityValue, FlowCounter, FlowKey, FlowValue,
    conntrack::{self, Found},
    hash::{client_hash, flow_hash},
    maps::names,
};
use serde::Serialize;

use crate::{
    controller::{AppliedService, AppliedState, addr16, data_plane_backend},
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
    service_stats: Option<PerCpuArray<MapData, FlowCounter>>,
    backend_stats: Option<PerCpuArray<MapData, FlowCounter>>,
    conntrack: Option<HashMap<MapData, FlowKey, FlowValue>>,
    affinity: Option<HashMap<MapData, AffinityKey, AffinityValue>>,
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
        let dir = pin_root.join(&iface);
        all.push(Attached {
            service_stats: open_map(&dir, names::SERVICE_STATS).and_then(|m| m.try_into().ok()),
            backend_stats: open_map(&dir, names::BACKEND_STATS).and_then(|m| m.try_into().ok()),
            conntrack: open_map(&dir, names::CONNTRACK).and_then(|m| m.try_into().ok()),
            affinity: open_map(&dir, names::AFFINITY).and_then(|m| m.try_into().ok()),
            iface,
            state,
        });
    }
    if all.is_empty() {
        return Err(ViewError::NoState(state_root.display().to_string()));
    }
    Ok(all)
}

fn sum(map: Option<&PerCpuArray<MapData, FlowCounter>>, index: u32) -> FlowCounter {
    map.and_then(|m| m.get(&index, 0).ok())
        .map(|per_cpu| {
            per_cpu
                .iter()
                .fold(FlowCounter::default(), |a, b| a.plus(*b))
        })
        .unwrap_or_default()
}

/// Packets, bytes and new flows.
#[derive(Debug, Default, Clone, Copy, Serialize)]
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
    /// path past the host's stack, `stack` otherwise.
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
    /// Per service port name (or number): its endpoints' traffic.
    pub endpoints: BTreeMap<String, Vec<EndpointView>>,
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
    let mut endpoints: BTreeMap<String, BTreeMap<String, EndpointView>> = BTreeMap::new();
    for applied in attached
        .state
        .services
        .iter()
        .filter(|s| s.namespace == model.namespace && s.name == model.name)
    {
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
                path: attached
                    .state
                    .local_pods
                    .get(&backend.addr)
                    .cloned()
                    .unwrap_or_else(|| "stack".into()),
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
        endpoints: endpoints
            .into_iter()
            .map(|(port, views)| (port, views.into_values().collect()))
            .collect(),
    }
}

/// The service's addresses other than its cluster IP (load balancer and external IPs).
fn external_ips(service: &ServiceModel) -> Vec<String> {
    service
        .addresses
        .iter()
        .filter(|a| a.kind != FrontendKind::ClusterIp)
        .map(|a| a.addr.to_string())
        .collect()
}

/// `get services`: one line per service, as `kubectl get services` prints them.
pub fn get_services(all: &[Attached], json: bool) -> String {
    let views: Vec<ServiceView> = all
        .iter()
        .flat_map(|a| {
            a.state
                .cluster
                .services
                .iter()
                .map(move |s| service_view(a, s))
        })
        .collect();
    if json {
        return serde_json::to_string_pretty(&views).unwrap_or_default();
    }
    let mut rows = vec![
        [
            "NAMESPACE",
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "ENDPOINTS",
            "PACKETS",
        ]
        .map(str::to_owned),
    ];
    for view in &views {
        let s = &view.service;
        let external = external_ips(s);
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
        rows.push([
            s.namespace.clone(),
            s.name.clone(),
            s.service_type.clone(),
            s.cluster_ip.clone().unwrap_or_else(|| "<none>".into()),
            if external.is_empty() {
                "<none>".into()
            } else {
                external.join(",")
            },
            ports.join(","),
            endpoints.to_string(),
            packets.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("   ").trim_end());
    }
    out
}

/// `describe service NAME`: kubectl's layout, then the live counters.
pub fn describe_service(
    all: &[Attached],
    namespace: &str,
    name: &str,
    json: bool,
) -> Result<String, ViewError> {
    let (attached, model) = all
        .iter()
        .find_map(|a| {
            a.state
                .cluster
                .services
                .iter()
                .find(|s| s.namespace == namespace && s.name == name)
                .map(|s| (a, s))
        })
        .ok_or_else(|| ViewError::NotFound {
            namespace: namespace.into(),
            name: name.into(),
        })?;
    let view = service_view(attached, model);
    if json {
        return Ok(serde_json::to_string_pretty(&view).unwrap_or_default());
    }
    let s = &view.service;
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{:<25}{value}", format!("{key}:"));
    };
    line("Name", s.name.clone());
    line("Namespace", s.namespace.clone());
    line("Labels", "<none>".into());
    line("Annotations", "<none>".into());
    line(
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
    line("Type", s.service_type.clone());
    line(
        "IP",
        s.cluster_ip.clone().unwrap_or_else(|| "<none>".into()),
    );
    let external = external_ips(s);
    if !external.is_empty() {
        line("LoadBalancer Ingress", external.join(", "));
    }
    for port in &s.ports {
        let name = if port.name.is_empty() {
            "<unset>".to_owned()
        } else {
            port.name.clone()
        };
        line(
            "Port",
            format!("{name} {}/{}", port.port, port.protocol.name()),
        );
        line(
            "TargetPort",
            format!("{}/{}", port.target_port, port.protocol.name()),
        );
        if let Some(node_port) = port.node_port {
            line(
                "NodePort",
                format!("{name} {node_port}/{}", port.protocol.name()),
            );
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
        line("Endpoints", shown);
    }
    line(
        "Session Affinity",
        match s.affinity_timeout_secs {
            Some(t) => format!("ClientIP (timeout {t}s)"),
            None => "None".into(),
        },
    );
    line("External Traffic Policy", s.external_traffic_policy.clone());
    let local_pods = view
        .endpoints
        .values()
        .flatten()
        .filter(|e| e.path != "stack")
        .map(|e| e.path.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    line(
        "Load Balancer",
        format!(
            "XDP on {} (Maglev, table size {}); local pods past the host's stack: {local_pods}",
            view.interface, s.table_size
        ),
    );
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
    let _ = writeln!(out, "Events:                  <none>");
    Ok(out)
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
    json: bool,
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
    let protocol = match protocol.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => return Err(ViewError::Usage(format!("{other}: expected TCP or UDP"))),
    };
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
    if json {
        return Ok(serde_json::to_string_pretty(&explanation).unwrap_or_default());
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

fn explain_flow(
    attached: &Attached,
    service: &AppliedService,
    source: SocketAddr,
    vip: SocketAddr,
    protocol: Protocol,
) -> Explanation {
    let endpoint_of = |id: u32| {
        service
            .backends
            .iter()
            .find(|b| b.id == id)
            .map(|b| SocketAddr::new(b.addr, b.port).to_string())
    };
    let label = format!(
        "{}/{} ({}/{})",
        service.namespace,
        service.name,
        SocketAddr::new(vip.ip(), vip.port()),
        protocol.name()
    );
    let src = addr16(source.ip());
    let dst = addr16(vip.ip());
    let key = FlowKey {
        src,
        dst,
        sport: source.port(),
        dport: vip.port(),
        proto: protocol.number(),
        pad: [0; 3],
    };
    // The same judgement the kernel makes of the entry (`lb_common::conntrack::judge`), for the
    // flow's next packet that is not a SYN (a SYN is always placed afresh).
    let now = crate::conntrack::now_ns();
    let tracked = attached
        .conntrack
        .as_ref()
        .and_then(|m| m.get(&key, 0).ok());
    let mut stale = None;
    if let Some(flow) = tracked {
        let state = conntrack::state_name(key.proto, flow.state);
        let backend = service
            .backends
            .iter()
            .find(|b| b.id == flow.backend_id)
            .map(|b| data_plane_backend(service, b));
        let found = conntrack::judge(
            &flow,
            backend.as_ref(),
            service.id,
            source.is_ipv4(),
            false,
            now,
        );
        if let (Found::Follow, Some(endpoint)) = (found, endpoint_of(flow.backend_id)) {
            return Explanation {
                service: label,
                endpoint: Some(endpoint),
                decided_by: "conntrack".into(),
                detail: format!(
                    "a tracked flow ({state}, expires in {}s), kept on backend {}; a new \
                     connection (SYN) from this port is placed afresh",
                    flow.expires_ns.saturating_sub(now) / 1_000_000_000,
                    flow.backend_id
                ),
            };
        }
        let why = match found {
            Found::OtherService => "is another service's",
            Found::Expired => "expired",
            _ => "names a backend no longer serving",
        };
        stale = Some(format!("its tracked entry ({state}) {why}, so "));
    }
    let stale = stale.unwrap_or_default();
    if service.affinity_timeout_secs.is_some() {
        let key = AffinityKey {
            client: src,
            service_id: service.id,
        };
        if let Some(seen) = attached.affinity.as_ref().and_then(|m| m.get(&key, 0).ok())
            && let Some(endpoint) = endpoint_of(seen.backend_id)
        {
            return Explanation {
                service: label,
                endpoint: Some(endpoint),
                decided_by: "affinity".into(),
                detail: format!(
                    "ClientIP affinity: this client's last backend (timeout {}s)",
                    service.affinity_timeout_secs.unwrap_or_default()
                ),
            };
        }
    }
    let Ok(Some(table)) = service.maglev_table() else {
        return Explanation {
            service: label,
            endpoint: None,
            decided_by: "no backend".into(),
            detail: "no endpoint takes new flows: the packet is dropped and counted".into(),
        };
    };
    let hash = if service.affinity_timeout_secs.is_some() {
        client_hash(&src, &dst)
    } else {
        flow_hash(&src, &dst, source.port(), vip.port(), protocol.number())
    };
    let slot = hash % service.table_size;
    let id = table[slot as usize];
    Explanation {
        service: label,
        endpoint: endpoint_of(id),
        decided_by: "maglev".into(),
        detail: format!(
            "{stale}a new flow: hash {hash:#010x} -> slot {slot} of {} -> backend {id}",
            service.table_size
        ),
    }
}
