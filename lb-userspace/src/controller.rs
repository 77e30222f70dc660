//! Applying a desired state to the data plane: diff against what was applied, build each
//! changed service's Maglev table off to the side and swap it in with one map update, then
//! retire what is no longer used and clear its flows.
//!
//! Order matters so that no packet sees a half-made state: backends are written before any
//! table names them, tables before their service appears, and slots are emptied only after the
//! tables that named them were replaced. A backend turning terminating is flagged only after
//! the tables that named it were replaced too: the data plane refuses terminating backends to
//! new flows, so a table still naming a flagged backend would drop the new flows of its slots.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::{
    Backend, ServiceKey, ServiceValue, TunnelConfig,
    maps::{
        BACKEND_F_TERMINATING, BACKEND_F_VALID, MAX_SERVICES, SERVICE_F_AFFINITY,
        SERVICE_F_DROP_EMPTY, SERVICE_F_SOURCE_RANGES, VIP_ADDR_F_HOST,
    },
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    dataplane::{Dataplane, DataplaneError},
    events::{self, ServiceEvent},
    maglev::{self, MaglevBackend, MaglevTable},
    model::{Cluster, EndpointModel, Frontend, FrontendKind, Options, Protocol, SourceRange},
    pods::Discovery,
};

/// Errors of applying a state.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The data plane refused an update.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// More services or backends than the data plane holds.
    #[error("out of {0} ids: the data plane holds {1}")]
    OutOfIds(&'static str, u32),
    /// A Maglev table could not be built.
    #[error(transparent)]
    Maglev(#[from] maglev::MaglevError),
    /// Saving or reading the applied state failed.
    #[error("state file {path}: {message}")]
    State {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

pub use crate::model::VipKey;

/// Which frontends of a Service port share one data-plane service (one id, one Maglev table,
/// one affinity table): all of them, unless the traffic policies give the external and the
/// internal ones different endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Every frontend.
    All,
    /// Load balancer IPs, external IPs and node ports (`externalTrafficPolicy`).
    External,
    /// Cluster IPs (`internalTrafficPolicy`).
    Internal,
}

impl Scope {
    fn includes(self, kind: FrontendKind) -> bool {
        match self {
            Self::All => true,
            Self::External => kind.is_external(),
            Self::Internal => !kind.is_external(),
        }
    }
}

/// What identifies a data-plane service from one apply to the next.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    namespace: String,
    name: String,
    port: u16,
    protocol: Protocol,
    ipv4: bool,
    scope: Scope,
}

/// A backend as applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedBackend {
    /// Slot in the BACKENDS array.
    pub id: u32,
    /// Address.
    pub addr: IpAddr,
    /// Target port.
    pub port: u16,
    /// Keeps its flows, takes no new ones.
    pub terminating: bool,
    /// It takes no new flows because its pod is not ready (not because it is terminating).
    #[serde(default)]
    pub not_ready: bool,
    /// Maglev weight.
    pub weight: u32,
    /// The pod, if known.
    pub pod: Option<String>,
    /// The underlay address of the other node it lives on, reached through the tunnel (that
    /// node does the DNAT and answers the client); `None`: DNATed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<IpAddr>,
}

/// A data plane service as applied: one port of a Kubernetes Service in one address family,
/// reached through every frontend that shares its endpoints. Its frontends share its id, and
/// so its Maglev table, its counters and its ClientIP affinity (kube-proxy's affinity is per
/// Service port too, whichever address a client used).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedService {
    /// Where it is reached, sorted.
    pub frontends: Vec<Frontend>,
    /// Which of the Service port's frontends these are.
    pub scope: Scope,
    /// Slot of its counters and its Maglev table.
    pub id: u32,
    /// The Kubernetes service's namespace.
    pub namespace: String,
    /// The Kubernetes service's name.
    pub name: String,
    /// The service port's name.
    pub port_name: String,
    /// The service port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
    /// The address family of its frontends and backends.
    pub ipv4: bool,
    /// ClientIP affinity timeout, if any.
    pub affinity_timeout_secs: Option<u32>,
    /// Maglev table size.
    pub table_size: u32,
    /// Its load balancer IPs admit only the clients of `source_ranges` (the Service has
    /// `loadBalancerSourceRanges`).
    #[serde(default)]
    pub source_restricted: bool,
    /// The Service's source ranges of this family: none admits nobody of this family through
    /// the load balancer IPs, when `source_restricted`.
    #[serde(default)]
    pub source_ranges: Vec<SourceRange>,
    /// New flows are dropped, not refused, when no backend takes them: the Service has
    /// endpoints, none of them on this node (a `Local` traffic policy), as kube-proxy does.
    #[serde(default)]
    pub drop_when_empty: bool,
    /// Backends, sorted by address and port.
    pub backends: Vec<AppliedBackend>,
    /// The digest of its Maglev table ([`maglev::digest`]): equal on every node serving the
    /// same endpoints. `None` without a table (no backend takes new flows).
    #[serde(default)]
    pub table_digest: Option<String>,
}

/// Everything applied, saved beside the pinned maps so a restarted controller knows the ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    /// Count of successful applies.
    pub generation: u64,
    /// The desired state last applied (for the views).
    pub cluster: Cluster,
    /// The data plane services.
    pub services: Vec<AppliedService>,
    /// Endpoint addresses that are local pods on the path past the host's stack, with their
    /// host-side interfaces.
    #[serde(default)]
    pub local_pods: BTreeMap<IpAddr, String>,
    /// What happened to each Service (`describe` shows them): a few per Service, repeats
    /// counted.
    #[serde(default)]
    pub events: Vec<ServiceEvent>,
}

impl AppliedService {
    /// What identifies it from one apply to the next.
    pub fn group(&self) -> GroupKey {
        GroupKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            port: self.port,
            protocol: self.protocol,
            ipv4: self.ipv4,
            scope: self.scope,
        }
    }

    /// Its frontends, for people: `198.18.0.10:80/TCP, 198.18.0.11:80/TCP`.
    pub fn frontends_text(&self) -> String {
        let keys: Vec<String> = self.frontends.iter().map(|f| f.key.to_string()).collect();
        keys.join(", ")
    }

    /// The frontend reached at `key`, if it is one of this service's.
    pub fn frontend(&self, key: &VipKey) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.key == *key)
    }

    /// The data plane's value for `frontend`: the service's id and settings, and the checks
    /// that depend on how the frontend is reached.
    pub fn frontend_value(&self, frontend: &Frontend) -> ServiceValue {
        let mut flags = 0;
        if self.affinity_timeout_secs.is_some() {
            flags |= SERVICE_F_AFFINITY;
        }
        if frontend.kind == FrontendKind::LoadBalancer && self.source_restricted {
            flags |= SERVICE_F_SOURCE_RANGES;
        }
        if self.drop_when_empty {
            flags |= SERVICE_F_DROP_EMPTY;
        }
        ServiceValue {
            id: self.id,
            flags,
            affinity_timeout_secs: self.affinity_timeout_secs.unwrap_or(0),
        }
    }

    /// The service's Maglev table ([`MaglevTable`]): its backends placed by their address and
    /// port (so every load balancer builds the same table whatever ids it gave), with a
    /// fallback over those that take new flows when some do not; `None` when none does.
    pub fn maglev_table(&self) -> Result<Option<MaglevTable>, maglev::MaglevError> {
        let placed: Vec<(MaglevBackend, bool)> = self
            .backends
            .iter()
            .map(|b| {
                (
                    MaglevBackend::at(b.id, b.addr, b.port, b.weight),
                    !b.terminating,
                )
            })
            .collect();
        MaglevTable::build(&placed, self.table_size)
    }

    /// The digest of `table` (its Maglev table), naming backends by address and port: equal
    /// on every node that serves the same endpoints (see [`maglev::digest`]).
    pub fn table_digest(&self, table: &MaglevTable) -> String {
        let every: Vec<MaglevBackend> = self
            .backends
            .iter()
            .map(|b| MaglevBackend::at(b.id, b.addr, b.port, b.weight))
            .collect();
        maglev::digest(&every, &table.slots)
    }
}

impl AppliedState {
    /// Reads a saved state; a missing file is an empty state.
    pub fn read(path: &Path) -> Result<Self, ControllerError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ControllerError::State {
                path: path.display().to_string(),
                message: format!(
                    "{e}: not a state this version can adopt (a data plane kept from an older \
                     version is removed with `lb-userspace detach IFACE`)"
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ControllerError::State {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Saves the state atomically (write, then rename).
    pub fn write(&self, path: &Path) -> Result<(), ControllerError> {
        let error = |e: &dyn std::fmt::Display| ControllerError::State {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        // Compact: a cluster's state runs to megabytes, written after every apply (tools
        // read it with a JSON parser; `jq .` pretty-prints it for a person).
        let text = serde_json::to_vec(self).map_err(|e| error(&e))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| error(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| error(&e))
    }
}

/// What one apply changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Services added.
    pub added: usize,
    /// Services whose Maglev table or settings changed.
    pub changed: usize,
    /// Services removed.
    pub removed: usize,
    /// Backends whose slots were emptied.
    pub backends_removed: usize,
    /// Flows cleared because their backend was removed.
    pub flows_cleared: usize,
}

/// The 16-byte form of an address the data plane uses (kept here for the views).
pub use lb_common::maps::addr16;

/// Every backend address of `services`, once per backend (the discovery skips repeats).
fn backend_addresses(services: &[AppliedService]) -> Vec<IpAddr> {
    services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.addr))
        .collect()
}

/// The data plane's key of a service.
pub fn service_key(key: &VipKey) -> ServiceKey {
    ServiceKey {
        addr: addr16(key.vip),
        port: key.port,
        proto: key.protocol.number(),
        pad: 0,
    }
}

/// The steps of an apply, in order, each reported to [`Controller::on_step`] once done (even
/// when it had nothing to do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApplyStep {
    /// Backends that take new flows (new ones, and ones no longer terminating) are written,
    /// and new ids' counters zeroed.
    BackendsAdded,
    /// Changed Maglev tables are swapped in; services left with no backend taking new flows
    /// lose theirs.
    TablesSwapped,
    /// Backends turning terminating are flagged, now that no table names them.
    BackendsDraining,
    /// Services are written, and the VIP addresses counted.
    ServicesWritten,
    /// Services and backends that are gone are removed, and their flows cleared.
    Retired,
}

/// Called after each step of an apply, with the data plane as that step left it.
type StepHook = Box<dyn FnMut(ApplyStep, &Dataplane) + Send>;

/// Drives a [`Dataplane`] towards desired states.
pub struct Controller {
    dataplane: Dataplane,
    state: AppliedState,
    state_path: Option<PathBuf>,
    options: Options,
    /// The `VIP_ADDRS` values this controller wrote (empty after a start: all are written
    /// again).
    vip_addrs: BTreeMap<IpAddr, u32>,
    on_step: Option<StepHook>,
    /// Asks the kernel which backends are local pods (opened on first use).
    discovery: Option<Discovery>,
    /// The tunnel as last written (`None` after a start: written again).
    tunnel: Option<Tunnel>,
}

impl Controller {
    /// A controller over `dataplane`, which already holds `state` (empty for a fresh one).
    pub fn new(
        dataplane: Dataplane,
        state: AppliedState,
        state_path: Option<PathBuf>,
        options: Options,
    ) -> Self {
        Self {
            dataplane,
            state,
            state_path,
            options,
            vip_addrs: BTreeMap::new(),
            on_step: None,
            discovery: None,
            tunnel: None,
        }
    }

    /// Calls `hook` after each step of every apply, with the data plane as the step left it:
    /// what a packet arriving between two steps meets (the tests check no step drops one).
    pub fn on_step(&mut self, hook: impl FnMut(ApplyStep, &Dataplane) + Send + 'static) {
        self.on_step = Some(Box::new(hook));
    }

    fn step_done(&mut self, step: ApplyStep) {
        tracing::debug!(?step, "apply step done");
        if let Some(hook) = &mut self.on_step {
            hook(step, &self.dataplane);
        }
    }

    /// The data plane.
    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }

    /// The data plane, mutably (attaching, detaching).
    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// What is applied.
    pub fn state(&self) -> &AppliedState {
        &self.state
    }

    /// Records `event` with the applied state, and saves it (a rejected configuration leaves
    /// the state as it was, its event included).
    pub fn record_event(&mut self, event: ServiceEvent) -> Result<(), ControllerError> {
        events::record(&mut self.state.events, event);
        match &self.state_path {
            Some(path) => self.state.write(path),
            None => Ok(()),
        }
    }

    /// The data plane services `cluster` asks for, with ids still unassigned (0).
    fn desired(&self, cluster: &Cluster, tunnel: &Tunnel) -> Vec<AppliedService> {
        let mut services = Vec::new();
        // Node ports are served on the node addresses the desired state names (`--node-ip`,
        // or the Node object's).
        let options = Options {
            node_ips: cluster.node_ips.clone(),
            ..self.options.clone()
        };
        for service in &cluster.services {
            let external_local = service.node_local(FrontendKind::LoadBalancer);
            let internal_local = service.node_local(FrontendKind::ClusterIp);
            let scopes = if external_local == internal_local {
                vec![(Scope::All, external_local)]
            } else {
                vec![
                    (Scope::External, external_local),
                    (Scope::Internal, internal_local),
                ]
            };
            for port in &service.ports {
                let frontends = service.frontends(port, &options);
                for ipv4 in [true, false] {
                    let family: Vec<&EndpointModel> = port
                        .endpoints
                        .iter()
                        .filter(|e| e.addr.is_ipv4() == ipv4)
                        .collect();
                    for &(scope, node_local) in &scopes {
                        let mut frontends: Vec<Frontend> = frontends
                            .iter()
                            .filter(|f| f.key.vip.is_ipv4() == ipv4 && scope.includes(f.kind))
                            .copied()
                            .collect();
                        if frontends.is_empty() {
                            continue;
                        }
                        frontends.sort();
                        let on_this_node = |e: &&&EndpointModel| {
                            !node_local
                                || e.node_name.as_deref() == Some(self.options.node_name.as_str())
                        };
                        let backends: Vec<AppliedBackend> = family
                            .iter()
                            .filter(on_this_node)
                            .map(|e| AppliedBackend {
                                id: 0,
                                addr: e.addr,
                                port: e.port,
                                terminating: e.terminating,
                                not_ready: e.not_ready,
                                weight: e.weight,
                                pod: e.pod.clone(),
                                node: tunnel.node_of(e.addr, e.node_name.as_deref()),
                            })
                            .collect();
                        let serving_elsewhere = family.iter().any(|e| !e.terminating);
                        services.push(AppliedService {
                            frontends,
                            scope,
                            id: 0,
                            namespace: service.namespace.clone(),
                            name: service.name.clone(),
                            port_name: port.name.clone(),
                            port: port.port,
                            protocol: port.protocol,
                            ipv4,
                            affinity_timeout_secs: service.affinity_timeout_secs,
                            table_size: service.table_size,
                            source_restricted: !service.source_ranges.is_empty(),
                            source_ranges: service
                                .source_ranges
                                .iter()
                                .filter(|r| r.addr.is_ipv4() == ipv4)
                                .copied()
                                .collect(),
                            drop_when_empty: node_local && serving_elsewhere,
                            backends,
                            table_digest: None,
                        });
                    }
                }
            }
        }
        services.sort_by_key(AppliedService::group);
        services
    }

    /// Applies `cluster`: only what changed is written.
    pub fn apply(&mut self, cluster: &Cluster) -> Result<ApplyReport, ControllerError> {
        let mut report = ApplyReport::default();
        let old_services = self.state.services.clone();
        let old: BTreeMap<GroupKey, &AppliedService> =
            old_services.iter().map(|s| (s.group(), s)).collect();
        let old_frontends: BTreeMap<VipKey, ServiceValue> = old_services
            .iter()
            .flat_map(|s| {
                s.frontends
                    .iter()
                    .map(move |f| (f.key, s.frontend_value(f)))
            })
            .collect();
        let tunnel = Tunnel::of(cluster, &self.options);
        let mut desired = self.desired(cluster, &tunnel);
        // 0. The tunnel, before any backend that needs it: this node's addresses, the peers
        // it takes packets from.
        if self.tunnel.as_ref() != Some(&tunnel) {
            self.dataplane
                .set_tunnel(&tunnel.config(), &tunnel.peers())?;
            self.tunnel = Some(tunnel.clone());
        }

        // Ids: kept for what stays, the lowest free one for what is new. Ids freed by this apply
        // are not reused by it, since their flows are cleared only at its end.
        let mut service_ids = IdPool::new(
            old.values().map(|s| s.id).collect(),
            MAX_SERVICES,
            "service",
        );
        let mut backend_ids = IdPool::new(
            old.values()
                .flat_map(|s| s.backends.iter().map(|b| b.id))
                .collect(),
            self.dataplane.max_backends(),
            "backend",
        );
        let mut new_service_ids = Vec::new();
        let mut new_backend_ids = Vec::new();
        for service in &mut desired {
            let previous = old.get(&service.group());
            service.id = match previous {
                Some(p) => p.id,
                None => {
                    let id = service_ids.allocate()?;
                    new_service_ids.push(id);
                    id
                }
            };
            for backend in &mut service.backends {
                let kept = previous.and_then(|p| {
                    p.backends
                        .iter()
                        .find(|b| (b.addr, b.port) == (backend.addr, backend.port))
                });
                backend.id = match kept {
                    Some(b) => b.id,
                    None => {
                        let id = backend_ids.allocate()?;
                        new_backend_ids.push(id);
                        id
                    }
                };
            }
        }
        // A recycled id must not carry its previous holder's totals into the views and metrics;
        // zeroed before anything can count against it.
        self.dataplane
            .reset_flow_counters(&new_service_ids, &new_backend_ids)?;

        // 1. Backends that take new flows, before any table names them. Those turning
        // terminating keep their flag until step 2 replaced the tables that name them.
        let mut draining = Vec::new();
        for service in &desired {
            let previous = old.get(&service.group());
            for backend in &service.backends {
                let was = previous
                    .and_then(|p| p.backends.iter().find(|b| b.id == backend.id))
                    .map(|b| b.terminating);
                match was {
                    Some(terminating) if terminating == backend.terminating => {}
                    Some(false) => {
                        draining.push((backend.id, data_plane_backend(service, backend)));
                    }
                    _ => self
                        .dataplane
                        .set_backend(backend.id, &data_plane_backend(service, backend))?,
                }
            }
        }
        self.step_done(ApplyStep::BackendsAdded);
        // 2. Tables, built whole and swapped in one batch; then 3. the backends turning
        // terminating, and 4. the services themselves.
        let mut tables = Vec::new();
        let mut emptied = Vec::new();
        for service in &mut desired {
            let previous = old.get(&service.group()).copied();
            service.table_digest = previous.and_then(|p| p.table_digest.clone());
            if table_inputs_changed(previous, service) {
                let table = service.maglev_table()?;
                service.table_digest = table.as_ref().map(|t| service.table_digest(t));
                match table {
                    Some(table) => tables.push((service.id, table)),
                    // No backend takes new flows: without a table the data plane refuses them
                    // (or drops them, with `drop_when_empty`) and counts them.
                    None if previous.is_some() => emptied.push(service.id),
                    None => {}
                }
            }
        }
        self.dataplane.set_maglev_tables(&tables)?;
        for id in emptied {
            let _ = self.dataplane.remove_maglev_table(id);
        }
        self.step_done(ApplyStep::TablesSwapped);
        // The kernel returns from a map-in-map update only once running programs are done
        // with the old inner map (an RCU grace period), so no packet still reads an old table.
        for (id, backend) in &draining {
            self.dataplane.set_backend(*id, backend)?;
        }
        self.step_done(ApplyStep::BackendsDraining);
        // The VIP filter lets the new addresses through before their services exist, and the
        // old ones until theirs are gone.
        // This node's tunnel addresses pass the filter too: the tunnel's packets arrive there.
        let desired_vips: Vec<[u8; 16]> = desired
            .iter()
            .flat_map(|s| s.frontends.iter().map(|f| addr16(f.key.vip)))
            .chain(tunnel.own.iter().map(|a| addr16(*a)))
            .collect();
        self.dataplane.set_vip_filter(
            desired_vips
                .iter()
                .copied()
                .chain(old_frontends.keys().map(|k| addr16(k.vip))),
        )?;
        // Source ranges before the frontends that check them: a frontend flagged before its
        // ranges exist would drop every client.
        for service in &desired {
            let previous = old.get(&service.group()).copied();
            let ranges_changed = previous
                .is_none_or(|p| !p.source_restricted || p.source_ranges != service.source_ranges);
            if ranges_changed && service.source_restricted {
                self.dataplane
                    .set_source_ranges(service.id, &source_range_prefixes(service))?;
            }
        }
        for service in &desired {
            let previous = old.get(&service.group()).copied();
            let mut frontends_changed = false;
            for frontend in &service.frontends {
                let value = service.frontend_value(frontend);
                if old_frontends.get(&frontend.key) != Some(&value) {
                    self.dataplane
                        .set_service(&service_key(&frontend.key), &value)?;
                    frontends_changed = true;
                }
            }
            match previous {
                None => report.added += 1,
                Some(p)
                    if frontends_changed
                        || p.frontends != service.frontends
                        || table_inputs_changed(Some(p), service) =>
                {
                    report.changed += 1;
                }
                Some(_) => {}
            }
        }
        self.set_vip_counts(&desired, &cluster.node_ips)?;
        self.step_done(ApplyStep::ServicesWritten);

        // 5. Retire what is gone, and the flows of removed backends.
        let desired_keys: HashSet<VipKey> = desired
            .iter()
            .flat_map(|s| s.frontends.iter().map(|f| f.key))
            .collect();
        for key in old_frontends.keys().filter(|k| !desired_keys.contains(k)) {
            self.dataplane.remove_service(&service_key(key))?;
        }
        let desired_groups: BTreeMap<GroupKey, &AppliedService> =
            desired.iter().map(|s| (s.group(), s)).collect();
        for (group, service) in &old {
            let now = desired_groups.get(group);
            if now.is_none() {
                let _ = self.dataplane.remove_maglev_table(service.id);
                report.removed += 1;
            }
            if service.source_restricted && now.is_none_or(|s| !s.source_restricted) {
                self.dataplane.clear_source_ranges(service.id)?;
            }
        }
        let kept_backends: HashSet<u32> = desired
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        let removed_backends: HashSet<u32> = old
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .filter(|id| !kept_backends.contains(id))
            .collect();
        for id in &removed_backends {
            self.dataplane.set_backend(*id, &Backend::default())?;
        }
        report.backends_removed = removed_backends.len();
        report.flows_cleared = self.dataplane.purge_backends(&removed_backends)?;
        self.dataplane.set_vip_filter(desired_vips)?;
        self.step_done(ApplyStep::Retired);
        let local_pods = self.sync_pod_interfaces(backend_addresses(&desired));

        let events = events::after_apply(
            std::mem::take(&mut self.state.events),
            &self.state.cluster,
            cluster,
        );
        self.state = AppliedState {
            generation: self.state.generation + 1,
            cluster: cluster.clone(),
            services: desired,
            local_pods,
            events,
        };
        if let Some(path) = &self.state_path {
            self.state.write(path)?;
        }
        Ok(report)
    }

    /// Logs the "applied" line of an apply that `report`s: whoever runs the controller logs it
    /// once what the apply changed is in force everywhere it is read (the state file, the
    /// published state), since that line is what waiting for an apply waits for.
    pub fn log_applied(&self, report: &ApplyReport) {
        info!(
            generation = self.state.generation,
            services = self.state.services.len(),
            added = report.added,
            changed = report.changed,
            removed = report.removed,
            backends_removed = report.backends_removed,
            flows_cleared = report.flows_cleared,
            "applied"
        );
    }

    /// Looks for the local pods among the applied endpoints again, between applies: a pod's
    /// interface can be recreated (its sandbox restarted) without any endpoint changing.
    /// Saves the state when what is on the path changed.
    pub fn refresh_local_pods(&mut self) -> Result<(), ControllerError> {
        let local_pods = self.sync_pod_interfaces(backend_addresses(&self.state.services));
        if local_pods != self.state.local_pods {
            self.state.local_pods = local_pods;
            if let Some(path) = &self.state_path {
                self.state.write(path)?;
            }
        }
        Ok(())
    }

    /// Takes the interfaces of the local pods among `backends` onto the fast path,
    /// and those of pods no longer among them off it; returns the endpoints on it, with their
    /// interfaces. Only ever a speed-up: what fails is logged, and those pods' traffic goes
    /// through the host's stack as before.
    fn sync_pod_interfaces(&mut self, backends: Vec<IpAddr>) -> BTreeMap<IpAddr, String> {
        let mut on_path = BTreeMap::new();
        let client_facing: HashSet<String> = self
            .dataplane
            .attached_interfaces()
            .map(str::to_owned)
            .collect();
        if client_facing.is_empty() {
            return on_path;
        }
        if self.discovery.is_none() {
            match Discovery::new() {
                Ok(discovery) => self.discovery = Some(discovery),
                Err(e) => {
                    warn!(error = %e, "local pods cannot be found: their traffic goes through the host's stack");
                    return on_path;
                }
            }
        }
        let Some(discovery) = self.discovery.as_mut() else {
            return on_path;
        };
        let found = match discovery.local_pods(backends) {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "finding local pods failed: their interfaces stay as they were");
                return self.state.local_pods.clone();
            }
        };
        let found: BTreeMap<IpAddr, String> = found
            .into_iter()
            .map(|(addr, interface)| (addr, interface.name))
            .filter(|(_, name)| !client_facing.contains(name))
            .collect();
        let wanted: BTreeSet<String> = found.values().cloned().collect();
        let gone: Vec<String> = self
            .dataplane
            .pod_interfaces()
            .filter(|name| !wanted.contains(*name))
            .map(str::to_owned)
            .collect();
        for name in gone {
            if let Err(e) = self.dataplane.detach_pod_interface(&name) {
                warn!(iface = %name, error = %e, "taking a pod interface off the fast path");
            }
        }
        let mut failed = BTreeSet::new();
        for name in wanted {
            if let Err(e) = self.dataplane.attach_pod_interface(&name) {
                warn!(iface = %name, error = %e, "a local pod stays on the host's stack");
                failed.insert(name);
            }
        }
        on_path.extend(found.into_iter().filter(|(_, name)| !failed.contains(name)));
        on_path
    }

    /// Updates `VIP_ADDRS`: the number of services on each address, flagged when the address
    /// is the host's own (a node IP, or any interface address now).
    fn set_vip_counts(
        &mut self,
        desired: &[AppliedService],
        node_ips: &[IpAddr],
    ) -> Result<(), ControllerError> {
        let host: HashSet<IpAddr> = crate::host::addresses()
            .into_iter()
            .chain(node_ips.iter().copied())
            .collect();
        let mut values: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for frontend in desired.iter().flat_map(|s| &s.frontends) {
            *values.entry(frontend.key.vip).or_default() += 1;
        }
        for (addr, value) in &mut values {
            if host.contains(addr) {
                *value |= VIP_ADDR_F_HOST;
            }
        }
        for (addr, value) in &values {
            if self.vip_addrs.get(addr) != Some(value) {
                self.dataplane.set_vip_addr(addr16(*addr), *value)?;
            }
        }
        let gone: HashSet<IpAddr> = self
            .state
            .services
            .iter()
            .flat_map(|s| s.frontends.iter().map(|f| f.key.vip))
            .chain(self.vip_addrs.keys().copied())
            .filter(|addr| !values.contains_key(addr))
            .collect();
        for addr in gone {
            self.dataplane.set_vip_addr(addr16(addr), 0)?;
        }
        self.vip_addrs = values;
        Ok(())
    }
}

/// Ids in use, handing out the lowest free one above the last handed out (so a large apply
/// does not scan from zero for every new id).
struct IdPool {
    used: HashSet<u32>,
    next: u32,
    capacity: u32,
    what: &'static str,
}

impl IdPool {
    fn new(used: HashSet<u32>, capacity: u32, what: &'static str) -> Self {
        Self {
            used,
            next: 0,
            capacity,
            what,
        }
    }

    fn allocate(&mut self) -> Result<u32, ControllerError> {
        if self.used.len() >= self.capacity as usize {
            return Err(ControllerError::OutOfIds(self.what, self.capacity));
        }
        while self.used.contains(&self.next) {
            self.next = (self.next + 1) % self.capacity;
        }
        let id = self.next;
        self.used.insert(id);
        self.next = (self.next + 1) % self.capacity;
        Ok(id)
    }
}

/// Whether `service`'s Maglev table must be built anew.
fn table_inputs_changed(previous: Option<&AppliedService>, service: &AppliedService) -> bool {
    previous.is_none_or(|p| {
        p.table_size != service.table_size || table_inputs(p) != table_inputs(service)
    })
}

/// The prefixes of `service`'s source ranges, as the data plane stores them.
fn source_range_prefixes(service: &AppliedService) -> Vec<(IpAddr, u8)> {
    service
        .source_ranges
        .iter()
        .map(|r| (r.addr, r.prefix_len))
        .collect()
}

fn table_inputs(service: &AppliedService) -> Vec<(u32, bool, u32)> {
    service
        .backends
        .iter()
        .map(|b| (b.id, b.terminating, b.weight))
        .collect()
}

/// The data plane's slot value of `backend` of `service`.
pub fn data_plane_backend(service: &AppliedService, backend: &AppliedBackend) -> Backend {
    let mut flags = BACKEND_F_VALID;
    if backend.terminating {
        flags |= BACKEND_F_TERMINATING;
    }
    Backend {
        addr: addr16(backend.addr),
        port: backend.port,
        flags,
        service_id: service.id,
        node: backend.node.map_or([0; 16], addr16),
    }
}

/// This node's end of the tunnel to the other nodes, as the desired state implies it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tunnel {
    /// This node's underlay addresses (its Node object's), at most one per family.
    pub own: Vec<IpAddr>,
    /// The other nodes' underlay addresses, by node name.
    pub others: BTreeMap<String, Vec<IpAddr>>,
    /// The UDP port (0: no tunnel).
    pub port: u16,
    /// The underlay's MTU.
    pub mtu: u32,
}

impl Tunnel {
    /// The tunnel `cluster` implies for the node `options` names: none without a port, or
    /// when the node has no Node object with an address.
    pub fn of(cluster: &Cluster, options: &Options) -> Self {
        let Some(me) = cluster.node(&options.node_name) else {
            return Self::default();
        };
        if options.tunnel_port == 0 {
            return Self::default();
        }
        let first = |v4: bool| me.addresses.iter().copied().find(|a| a.is_ipv4() == v4);
        let own: Vec<IpAddr> = [first(true), first(false)].into_iter().flatten().collect();
        let others = cluster
            .nodes
            .iter()
            .filter(|n| n.name != me.name)
            .map(|n| (n.name.clone(), n.addresses.clone()))
            .collect();
        Self {
            own,
            others,
            port: options.tunnel_port,
            mtu: options.underlay_mtu,
        }
    }

    /// The other nodes' underlay addresses: the only tunnel sources taken.
    pub fn peers(&self) -> BTreeSet<IpAddr> {
        self.others
            .values()
            .flatten()
            .copied()
            .filter(|a| !self.own.contains(a))
            .collect()
    }

    /// Where an endpoint at `addr` on node `node_name` is reached through the tunnel: that
    /// node's underlay address of the endpoint's family when both ends have one, else of the
    /// other family when both ends have that; `None` for an endpoint of this node, of a node
    /// without a Node object, or without a tunnel (it is DNATed here, as on one node).
    pub fn node_of(&self, addr: IpAddr, node_name: Option<&str>) -> Option<IpAddr> {
        let theirs = self.others.get(node_name?)?;
        let usable = |v4: bool| {
            let mine = self.own.iter().any(|a| a.is_ipv4() == v4);
            theirs.iter().copied().find(|a| a.is_ipv4() == v4 && mine)
        };
        usable(addr.is_ipv4()).or_else(|| usable(!addr.is_ipv4()))
    }

    /// The data plane's view of it.
    pub fn config(&self) -> TunnelConfig {
        let mut config = TunnelConfig {
            port: self.port,
            mtu: self.mtu,
            ..TunnelConfig::default()
        };
        for addr in &self.own {
            match addr {
                IpAddr::V4(_) => config.addr4 = addr16(*addr),
                IpAddr::V6(_) => config.addr6 = addr16(*addr),
            }
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeModel;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn cluster(nodes: &[(&str, &[&str])]) -> Cluster {
        Cluster {
            nodes: nodes
                .iter()
                .map(|(name, addresses)| NodeModel {
                    name: (*name).to_string(),
                    addresses: addresses.iter().map(|a| ip(a)).collect(),
                })
                .collect(),
            ..Cluster::default()
        }
    }

    #[test]
    fn endpoints_on_other_nodes_are_reached_through_the_tunnel_in_their_family_when_possible() {
        let options = Options {
            node_name: "a".into(),
            ..Options::default()
        };
        let cluster = cluster(&[
            ("a", &["198.18.1.11", "2001:db8:1::b"]),
            ("b", &["198.18.1.12", "2001:db8:1::c"]),
            ("c", &["198.18.1.13"]),
        ]);
        let tunnel = Tunnel::of(&cluster, &options);
        assert_eq!(tunnel.own, [ip("198.18.1.11"), ip("2001:db8:1::b")]);
        assert_eq!(
            tunnel.peers().into_iter().collect::<Vec<_>>(),
            [ip("198.18.1.12"), ip("198.18.1.13"), ip("2001:db8:1::c")]
        );
        let (pod4, pod6) = (ip("198.18.18.1"), ip("2001:db8:12::1"));
        assert_eq!(tunnel.node_of(pod4, Some("b")), Some(ip("198.18.1.12")));
        assert_eq!(tunnel.node_of(pod6, Some("b")), Some(ip("2001:db8:1::c")));
        // An IPv6 pod on an IPv4-only node: IPv6 inside IPv4.
        assert_eq!(tunnel.node_of(pod6, Some("c")), Some(ip("198.18.1.13")));
        // This node's, no node, an unknown node: DNATed here.
        assert_eq!(tunnel.node_of(pod4, Some("a")), None);
        assert_eq!(tunnel.node_of(pod4, None), None);
        assert_eq!(tunnel.node_of(pod4, Some("z")), None);
        let config = tunnel.config();
        assert_eq!(config.addr4, addr16(ip("198.18.1.11")));
        assert_eq!(config.addr6, addr16(ip("2001:db8:1::b")));
        assert_eq!(config.port, lb_common::maps::DEFAULT_TUNNEL_PORT);

        // No tunnel without this node's Node object, or with the port at 0.
        let nameless = Options {
            node_name: "z".into(),
            ..Options::default()
        };
        assert_eq!(
            Tunnel::of(&cluster, &nameless).node_of(pod4, Some("b")),
            None
        );
        let off = Options {
            tunnel_port: 0,
            ..options
        };
        assert_eq!(Tunnel::of(&cluster, &off), Tunnel::default());
    }
}
