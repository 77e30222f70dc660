//! Which VIPs this node announces, and handing them to the routing daemon (issue 17).
//!
//! The contract with the routing daemon: with `--announce-table N` the controller keeps exactly
//! one `blackhole` route per address it wants announced (/32 for IPv4, /128 for IPv6), of route
//! protocol [`ROUTE_PROTOCOL`], in kernel routing table N of its own network namespace, and
//! owns that table's whole content: anything else found there is removed at each sync. BIRD's
//! `protocol kernel { kernel table N; learn; }` imports those routes and exports them to BGP;
//! FRR would use `ip import-table N`. The routes are never used to forward (the table is
//! looked up by no rule): they are a list the daemon reads.
//!
//! [`decide`] is the rule, a pure function of the applied desired state; [`RouteTable`] writes
//! it over rtnetlink; [`Announcer`] runs both after every apply, retries failed syncs, and
//! withdraws everything when the controller stops.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::rtnetlink::{Exchange, NetlinkError, RouteSocket, host_route};

use crate::{
    controller::AppliedState,
    model::{Cluster, FrontendKind, ServiceModel},
};

/// The route protocol number of the announced routes (`proto 250`): what tells them from any
/// other route, for the routing daemon's filters and for people reading `ip route`.
pub const ROUTE_PROTOCOL: u8 = 250;

/// The label that drains a node: with it (any value) on its Node object, the node withdraws
/// every announcement and keeps serving (what Kubernetes' service controller honours for
/// cloud load balancers, and MetalLB too).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The first wait before a failed sync is tried again; doubled after each failure up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two tries of a failed sync.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Whether `node` carries [`EXCLUDE_LABEL`].
pub fn excluded(node: &Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key(EXCLUDE_LABEL))
}

/// Why an address of a Service is not announced (for that Service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Withheld {
    /// This node's Node object carries [`EXCLUDE_LABEL`]: it is drained.
    NodeExcluded,
    /// `externalTrafficPolicy: Cluster`, and no endpoint of the address's family takes new
    /// flows (ready, or serving while none is ready) on any node.
    NoReadyEndpoint,
    /// `externalTrafficPolicy: Local`, and no endpoint of the address's family on this node
    /// takes new flows.
    NoLocalEndpoint,
    /// The controller is stopping (or draining before it stops).
    Stopping,
}

impl Withheld {
    /// Its name in logs: `no-local-endpoint`.
    pub fn name(self) -> &'static str {
        match self {
            Self::NodeExcluded => "node-excluded",
            Self::NoReadyEndpoint => "no-ready-endpoint",
            Self::NoLocalEndpoint => "no-local-endpoint",
            Self::Stopping => "stopping",
        }
    }

    /// What it means, for people (`describe`).
    pub fn describe(self) -> &'static str {
        match self {
            Self::NodeExcluded => {
                "this node is labelled node.kubernetes.io/exclude-from-external-load-balancers"
            }
            Self::NoReadyEndpoint => "no ready endpoint of its family on any node",
            Self::NoLocalEndpoint => {
                "externalTrafficPolicy Local and no ready endpoint of its family on this node"
            }
            Self::Stopping => "the controller is stopping",
        }
    }
}

/// What this node announces, and why it does not announce the other addresses it serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The addresses announced.
    pub announced: BTreeSet<IpAddr>,
    /// Each address served but not announced, with why, per Service that has it
    /// (`namespace/name`).
    pub withheld: BTreeMap<IpAddr, BTreeMap<String, Withheld>>,
}

impl Decision {
    /// Why `addr` is not announced, in one word per reason (`no-local-endpoint`; several
    /// Services' different reasons joined with `,`); `None` when it is announced or not served.
    pub fn reason(&self, addr: IpAddr) -> Option<String> {
        let reasons: BTreeSet<&str> = self
            .withheld
            .get(&addr)?
            .values()
            .map(|w| w.name())
            .collect();
        Some(reasons.into_iter().collect::<Vec<_>>().join(","))
    }

    /// The same addresses, none announced: every one withheld for `why`.
    pub fn withdrawn(&self, why: Withheld) -> Self {
        let mut withheld = self.withheld.clone();
        for addr in &self.announced {
            withheld
                .entry(*addr)
                .or_default()
                .insert(String::new(), why);
        }
        for reasons in withheld.values_mut() {
            for reason in reasons.values_mut() {
                *reason = why;
            }
        }
        Self {
            announced: BTreeSet::new(),
            withheld,
        }
    }
}

/// The addresses announced from what this node serves (`cluster`, its applied desired state):
/// the load balancer addresses and external IPs of every Service it serves, never cluster IPs
/// nor node addresses. Per Service and address family (an IPv4 VIP serves IPv4 endpoints):
///
/// - `externalTrafficPolicy: Cluster`: when the Service has an endpoint that takes new flows
///   (ready, or serving and terminating while none is ready) on any node, as MetalLB does;
/// - `Local`: when one of those is on this node (`node_name`).
///
/// An address several Services share is announced when any of them wants it. Nothing is
/// announced when the node is excluded from external load balancers (its label): it is
/// drained, and keeps serving.
pub fn decide(cluster: &Cluster, node_name: &str) -> Decision {
    let mut wanted: BTreeSet<IpAddr> = BTreeSet::new();
    let mut withheld: BTreeMap<IpAddr, BTreeMap<String, Withheld>> = BTreeMap::new();
    for service in &cluster.services {
        for address in service.addresses.iter().filter(|a| {
            matches!(
                a.kind,
                FrontendKind::LoadBalancer | FrontendKind::ExternalIp
            )
        }) {
            let why = if cluster.excluded_from_load_balancers {
                Some(Withheld::NodeExcluded)
            } else {
                why_not(service, address.addr, node_name)
            };
            match why {
                None => {
                    wanted.insert(address.addr);
                }
                Some(why) => {
                    withheld
                        .entry(address.addr)
                        .or_default()
                        .insert(format!("{}/{}", service.namespace, service.name), why);
                }
            }
        }
    }
    withheld.retain(|addr, _| !wanted.contains(addr));
    Decision {
        announced: wanted,
        withheld,
    }
}

/// Why `service` does not want `addr` announced (`None`: it does).
fn why_not(service: &ServiceModel, addr: IpAddr, node_name: &str) -> Option<Withheld> {
    let local = service.node_local(FrontendKind::LoadBalancer);
    let takes_flows = service
        .ports
        .iter()
        .flat_map(|p| &p.endpoints)
        .filter(|e| e.addr.is_ipv4() == addr.is_ipv4())
        .filter(|e| !local || e.node_name.as_deref() == Some(node_name))
        .any(|e| !e.terminating && e.weight > 0);
    match (takes_flows, local) {
        (true, _) => None,
        (false, true) => Some(Withheld::NoLocalEndpoint),
        (false, false) => Some(Withheld::NoReadyEndpoint),
    }
}

/// Errors of reading or writing the announcement table.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// The rtnetlink socket failed, or an answer did not parse.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The kernel refused a request.
    #[error("rtnetlink: {action} in table {table}: {source}")]
    Refused {
        /// What was asked (`adding 198.18.200.1/32`).
        action: String,
        /// The table.
        table: u32,
        /// The kernel's error.
        source: io::Error,
    },
    /// `detach` runs in another network namespace than the controller that announced.
    #[error(
        "the addresses were announced in table {table} of another network namespace: run \
         detach in the controller's namespace (ip netns exec NAME ...)"
    )]
    OtherNamespace {
        /// The table.
        table: u32,
    },
    /// The record of the announcements could not be read or written.
    #[error("{path}: {source}")]
    Record {
        /// The file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// A route found in the table.
#[derive(Debug, Clone)]
struct Found {
    message: RouteMessage,
    destination: Option<IpAddr>,
}

impl Found {
    /// The address it announces, when it is one of ours: a blackhole host route of
    /// [`ROUTE_PROTOCOL`].
    fn announced(&self) -> Option<IpAddr> {
        let header = &self.message.header;
        let addr = self.destination?;
        let host = if addr.is_ipv4() { 32 } else { 128 };
        (header.kind == RouteType::BlackHole
            && u8::from(header.protocol) == ROUTE_PROTOCOL
            && header.destination_prefix_length == host)
            .then_some(addr)
    }

    /// `198.18.200.1` for a host route, `10.0.0.0/8` for another prefix.
    fn text(&self) -> String {
        let header = &self.message.header;
        match self.destination {
            Some(addr) if self.announced() == Some(addr) => addr.to_string(),
            Some(addr) => format!("{addr}/{}", header.destination_prefix_length),
            None => format!("default/{:?}", header.address_family),
        }
    }
}

/// What a sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The addresses whose route was added.
    pub added: Vec<IpAddr>,
    /// The routes removed (an address, or a prefix that was not ours), each with whether it
    /// was one of our addresses.
    pub removed: Vec<(String, Option<IpAddr>)>,
}

/// Kernel routing table N, written over rtnetlink in the calling thread's network namespace.
pub struct RouteTable {
    table: u32,
    socket: RouteSocket,
}

impl RouteTable {
    /// Opens an rtnetlink socket for table `table`.
    pub fn open(table: u32) -> Result<Self, AnnounceError> {
        // Strict: the kernel then filters dumps by table (older kernels ignore it: the
        // answers are filtered here too).
        Ok(Self {
            table,
            socket: RouteSocket::open(true)?,
        })
    }

    /// The addresses announced in the table now (our blackhole host routes).
    pub fn announced(&mut self) -> Result<BTreeSet<IpAddr>, AnnounceError> {
        Ok(self.list()?.iter().filter_map(Found::announced).collect())
    }

    /// Makes the table hold exactly one blackhole route of [`ROUTE_PROTOCOL`] per address of
    /// `wanted` and nothing else: removes every other route, then adds the missing ones. Doing
    /// it again changes nothing.
    pub fn sync(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<Changes, AnnounceError> {
        let mut changes = Changes::default();
        let mut kept = BTreeSet::new();
        for route in self.list()? {
            match route.announced() {
                // The first route of a wanted address is kept; another one is a duplicate.
                Some(addr) if wanted.contains(&addr) && kept.insert(addr) => {}
                announced => {
                    self.delete(&route)?;
                    changes.removed.push((route.text(), announced));
                }
            }
        }
        for addr in wanted.difference(&kept) {
            self.add(*addr)?;
            changes.added.push(*addr);
        }
        Ok(changes)
    }

    /// Every route of the table, of both families.
    fn list(&mut self) -> Result<Vec<Found>, AnnounceError> {
        let mut found = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            request.attributes.push(RouteAttribute::Table(self.table));
            let answers = match self.ask(RouteNetlinkMessage::GetRoute(request), Exchange::Dump) {
                Ok(answers) => answers,
                // A table that does not exist yet holds nothing.
                Err(AnnounceError::Refused { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            for answer in answers {
                let RouteNetlinkMessage::NewRoute(message) = answer else {
                    continue;
                };
                if message.header.address_family != family || table_of(&message) != self.table {
                    continue;
                }
                let destination = message.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
                found.push(Found {
                    message,
                    destination,
                });
            }
        }
        Ok(found)
    }

    fn add(&mut self, addr: IpAddr) -> Result<(), AnnounceError> {
        let mut message = host_route(addr);
        message.header.table = RouteHeader::RT_TABLE_UNSPEC;
        message.header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
        message.header.kind = RouteType::BlackHole;
        message.attributes.push(RouteAttribute::Table(self.table));
        self.ask(
            RouteNetlinkMessage::NewRoute(message),
            Exchange::Change(NLM_F_CREATE | NLM_F_REPLACE),
        )
        .map_err(|e| e.doing(format!("adding {addr}")))?;
        Ok(())
    }

    fn delete(&mut self, route: &Found) -> Result<(), AnnounceError> {
        let mut message = RouteMessage::default();
        message.header = route.message.header.clone();
        // What identifies the route; the rest (cache figures, flags) is the kernel's.
        message.attributes = route
            .message
            .attributes
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    RouteAttribute::Destination(_)
                        | RouteAttribute::Priority(_)
                        | RouteAttribute::Oif(_)
                        | RouteAttribute::Gateway(_)
                        | RouteAttribute::Via(_)
                        | RouteAttribute::Source(_)
                        | RouteAttribute::MultiPath(_)
                )
            })
            .cloned()
            .collect();
        message.attributes.push(RouteAttribute::Table(self.table));
        match self.ask(RouteNetlinkMessage::DelRoute(message), Exchange::Change(0)) {
            // Gone already: that is what was asked.
            Err(AnnounceError::Refused { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) =>
            {
                Ok(())
            }
            other => other
                .map(drop)
                .map_err(|e| e.doing(format!("removing {}", route.text()))),
        }
    }

    /// Sends one request and collects its answers; a refusal is an error naming the table.
    fn ask(
        &mut self,
        request: RouteNetlinkMessage,
        exchange: Exchange,
    ) -> Result<Vec<RouteNetlinkMessage>, AnnounceError> {
        self.socket.ask(request, exchange).map_err(|e| match e {
            NetlinkError::Refused(source) => AnnounceError::Refused {
                action: if exchange == Exchange::Dump {
                    "listing"
                } else {
                    "asking"
                }
                .into(),
                table: self.table,
                source,
            },
            other => other.into(),
        })
    }
}

impl AnnounceError {
    /// The same refusal, saying what was asked.
    fn doing(self, action: String) -> Self {
        match self {
            Self::Refused { table, source, .. } => Self::Refused {
                action,
                table,
                source,
            },
            other => other,
        }
    }
}

/// The table a route is in: its `RTA_TABLE`, or the header's (tables below 256).
fn table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// What the controller last did, saved beside the applied state for `describe` and `detach`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The table (`--announce-table`).
    pub table: u32,
    /// The last decision.
    pub decision: Decision,
    /// The table holds the decision: the last sync succeeded.
    pub synced: bool,
    /// The last sync's error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The network namespace of the table (the inode of the controller's
    /// `/proc/self/ns/net`): `detach` withdraws from that one only.
    #[serde(default)]
    pub netns: Option<u64>,
}

/// The calling thread's network namespace (the inode of its `/proc/thread-self/ns/net`).
fn current_netns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// The record's file beside the applied state `state_file` (`veth0.json` ->
/// `veth0.announce`).
pub fn record_file(state_file: &Path) -> PathBuf {
    state_file.with_extension("announce")
}

impl Record {
    /// Reads the record at `path`; `None` when there is none (no `--announce-table`).
    pub fn read(path: &Path) -> Result<Option<Self>, AnnounceError> {
        let error = |source| AnnounceError::Record {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| error(e.into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(error(e)),
        }
    }

    fn write(&self, path: &Path) -> Result<(), AnnounceError> {
        let error = |source| AnnounceError::Record {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_string(self).map_err(|e| error(e.into()))?;
        let temporary = path.with_extension("announce.tmp");
        std::fs::write(&temporary, text).map_err(error)?;
        std::fs::rename(&temporary, path).map_err(error)
    }
}

/// Withdraws what a controller announced for the applied state `state_file` (its record
/// names the table) and removes the record: when the data plane is removed, its
/// announcements go too. Nothing to do without a record.
pub fn withdraw_recorded(state_file: &Path) -> Result<usize, AnnounceError> {
    let path = record_file(state_file);
    let Some(record) = Record::read(&path)? else {
        return Ok(0);
    };
    if record.netns.is_some() && record.netns != current_netns() {
        return Err(AnnounceError::OtherNamespace {
            table: record.table,
        });
    }
    let changes = RouteTable::open(record.table)?.sync(&BTreeSet::new())?;
    for (route, _) in &changes.removed {
        info!(address = %route, reason = Withheld::Stopping.name(), "withdrew");
    }
    let _ = std::fs::remove_file(&path);
    Ok(changes.removed.len())
}

/// The announcements' figures, for `/metrics`.
#[derive(Debug, Default)]
pub struct Figures {
    /// Addresses announced now (in the table).
    pub announced: AtomicU64,
    /// Syncs that succeeded.
    pub syncs_ok: AtomicU64,
    /// Syncs that failed.
    pub syncs_failed: AtomicU64,
    /// Withdrawn before stopping, still serving.
    pub draining: AtomicBool,
}

/// Keeps table N as the applied state asks: after every apply (a Node object's label is part
/// of it), with failed syncs tried again, until told to withdraw.
pub struct Announcer {
    /// Its figures.
    pub figures: Arc<Figures>,
    withdraw: Option<tokio::sync::mpsc::Sender<oneshot::Sender<bool>>>,
}

impl Announcer {
    /// Syncs the table to `applied` now (the first sync: once the data plane serves it), then
    /// follows it on a task of its own. A failed sync is logged, counted and tried again.
    pub async fn start(
        table: u32,
        node_name: String,
        state_file: &Path,
        mut applied: watch::Receiver<Arc<AppliedState>>,
    ) -> Self {
        let figures = Arc::new(Figures::default());
        let mut syncer = Syncer {
            table,
            routes: None,
            record_file: record_file(state_file),
            figures: figures.clone(),
        };
        let (withdraw, mut withdrawals) = tokio::sync::mpsc::channel::<oneshot::Sender<bool>>(1);
        let mut decision = decide(&applied.borrow_and_update().cluster, &node_name);
        let mut ok = syncer.sync(&decision);
        tokio::spawn(async move {
            let mut wait = RETRY_FIRST;
            loop {
                let retry = async {
                    if ok {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(wait).await;
                };
                tokio::select! {
                    changed = applied.changed() => {
                        // The controller thread is gone: the routes stay as they are, as the
                        // data plane does.
                        if changed.is_err() {
                            return;
                        }
                        decision = decide(&applied.borrow_and_update().cluster, &node_name);
                        wait = RETRY_FIRST;
                    }
                    () = retry => wait = (wait * 2).min(RETRY_MAX),
                    asked = withdrawals.recv() => {
                        let Some(done) = asked else { return };
                        syncer.figures.draining.store(true, Ordering::Relaxed);
                        let withdrawn = decision.withdrawn(Withheld::Stopping);
                        let mut wait = RETRY_FIRST;
                        // Until it succeeds or whoever asked stops waiting.
                        while !syncer.sync(&withdrawn) && !done.is_closed() {
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(RETRY_MAX);
                        }
                        let _ = done.send(true);
                        return;
                    }
                }
                ok = syncer.sync(&decision);
            }
        });
        Self {
            figures,
            withdraw: Some(withdraw),
        }
    }

    /// Withdraws every announcement and stops following the applied state; true once the
    /// table is empty, false if it could not be emptied within `patience` (tries go on until
    /// then).
    pub async fn withdraw(&mut self, patience: Duration) -> bool {
        let Some(withdraw) = self.withdraw.take() else {
            return true;
        };
        let (done, withdrawn) = oneshot::channel();
        if withdraw.send(done).await.is_err() {
            return false;
        }
        tokio::time::timeout(patience, withdrawn)
            .await
            .is_ok_and(|done| done.unwrap_or(false))
    }
}

/// How long a stop waits for the withdrawal at most, before it goes on (and tries once more
/// when the data plane is removed).
const WITHDRAW_PATIENCE: Duration = Duration::from_secs(5);

/// The graceful stop: withdraws every announcement, then keeps serving for `period` so the
/// routers move the flows away before the data plane goes; `cut_short` (a second stop signal)
/// ends the wait early.
pub async fn drain(
    mut announcer: Announcer,
    period: Duration,
    cut_short: impl std::future::Future<Output = ()>,
) {
    info!(
        drain_period_ms = period.as_millis() as u64,
        "drain started: withdrawing the announced addresses, serving on"
    );
    if !announcer.withdraw(WITHDRAW_PATIENCE).await {
        error!("the announced addresses could not all be withdrawn: stopping all the same");
    }
    tokio::select! {
        () = tokio::time::sleep(period) => info!("drain over"),
        () = cut_short => info!("drain cut short by a second stop signal"),
    }
}

/// Syncs the table and says so: in the log, the figures and the record.
struct Syncer {
    table: u32,
    /// The socket, opened at the first sync (and again after it failed).
    routes: Option<RouteTable>,
    record_file: PathBuf,
    figures: Arc<Figures>,
}

impl Syncer {
    /// One sync to `decision`; whether it succeeded.
    fn sync(&mut self, decision: &Decision) -> bool {
        let result = match self.routes.take() {
            Some(routes) => Ok(routes),
            None => RouteTable::open(self.table),
        }
        .and_then(|mut routes| {
            let changes = routes.sync(&decision.announced)?;
            let announced = routes.announced()?.len();
            self.routes = Some(routes);
            Ok((changes, announced))
        });
        let mut record = Record {
            table: self.table,
            decision: decision.clone(),
            synced: result.is_ok(),
            error: None,
            netns: current_netns(),
        };
        if let Err(e) = &result {
            record.error = Some(e.to_string());
        }
        // The figures and the record before the lines: whoever reads a line finds them.
        if let Err(e) = record.write(&self.record_file) {
            warn!(error = %e, "saving the announcements for describe");
        }
        match result {
            Ok((changes, announced)) => {
                self.figures.syncs_ok.fetch_add(1, Ordering::Relaxed);
                self.figures
                    .announced
                    .store(announced as u64, Ordering::Relaxed);
                for (route, addr) in &changes.removed {
                    let reason = addr
                        .and_then(|addr| decision.reason(addr))
                        .unwrap_or_else(|| "not-served".into());
                    info!(address = %route, %reason, "withdrew");
                }
                for addr in &changes.added {
                    info!(address = %addr, "announced");
                }
            }
            Err(e) => {
                self.figures.syncs_failed.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, table = self.table, "syncing the announced addresses failed: trying again");
            }
        }
        record.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointModel, PortModel, Protocol, ServiceAddress};

    const NODE: &str = "node-a";

    fn endpoint(addr: &str, node: &str, serving: bool) -> EndpointModel {
        EndpointModel {
            addr: addr.parse().unwrap(),
            port: 8080,
            terminating: !serving,
            not_ready: !serving,
            weight: 1,
            pod: None,
            node_name: Some(node.into()),
        }
    }

    fn service(name: &str, policy: &str, addresses: &[(&str, FrontendKind)]) -> ServiceModel {
        ServiceModel {
            namespace: "default".into(),
            name: name.into(),
            file: String::new(),
            service_type: "LoadBalancer".into(),
            selector: BTreeMap::new(),
            cluster_ip: None,
            addresses: addresses
                .iter()
                .map(|(addr, kind)| ServiceAddress {
                    addr: addr.parse().unwrap(),
                    kind: *kind,
                    field: String::new(),
                })
                .collect(),
            affinity_timeout_secs: None,
            external_traffic_policy: policy.into(),
            internal_traffic_policy: "Cluster".into(),
            health_check_node_port: None,
            source_ranges: Vec::new(),
            ip_family_policy: None,
            ip_families: Vec::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            created: None,
            table_size: 251,
            ports: vec![PortModel {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: "8080".into(),
                node_port: None,
                endpoints: Vec::new(),
            }],
        }
    }

    fn with_endpoints(mut service: ServiceModel, endpoints: Vec<EndpointModel>) -> ServiceModel {
        service.ports[0].endpoints = endpoints;
        service
    }

    fn cluster(services: Vec<ServiceModel>) -> Cluster {
        Cluster {
            services,
            ..Cluster::default()
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn announced(decision: &Decision) -> Vec<String> {
        decision.announced.iter().map(ToString::to_string).collect()
    }

    const LB: FrontendKind = FrontendKind::LoadBalancer;

    #[test]
    fn load_balancer_and_external_addresses_are_announced_never_cluster_or_node_addresses() {
        let mut web = with_endpoints(
            service(
                "web",
                "Cluster",
                &[
                    ("198.18.200.1", LB),
                    ("198.18.201.1", FrontendKind::ExternalIp),
                    ("10.96.0.1", FrontendKind::ClusterIp),
                ],
            ),
            vec![endpoint("10.0.0.1", "node-b", true)],
        );
        web.ports[0].node_port = Some(30080);
        let mut cluster = cluster(vec![web]);
        cluster.node_ips = vec![ip("198.18.0.2")];
        let decision = decide(&cluster, NODE);
        assert_eq!(announced(&decision), ["198.18.200.1", "198.18.201.1"]);
        assert!(decision.withheld.is_empty(), "{decision:?}");
    }

    #[test]
    fn cluster_policy_needs_a_ready_or_serving_endpoint_anywhere() {
        let vip = [("198.18.200.1", LB)];
        let elsewhere = vec![endpoint("10.0.0.1", "node-b", true)];
        assert_eq!(
            announced(&decide(
                &cluster(vec![with_endpoints(
                    service("a", "Cluster", &vip),
                    elsewhere
                )]),
                NODE
            )),
            ["198.18.200.1"],
            "an endpoint on another node is enough"
        );
        // Terminating or not ready (the model marks both as taking no new flows).
        let none = vec![endpoint("10.0.0.1", NODE, false)];
        let decision = decide(
            &cluster(vec![with_endpoints(service("a", "Cluster", &vip), none)]),
            NODE,
        );
        assert!(decision.announced.is_empty());
        assert_eq!(
            decision.reason(ip("198.18.200.1")).as_deref(),
            Some("no-ready-endpoint")
        );
        let decision = decide(&cluster(vec![service("a", "Cluster", &vip)]), NODE);
        assert_eq!(
            decision.withheld[&ip("198.18.200.1")]["default/a"],
            Withheld::NoReadyEndpoint,
            "no endpoint at all"
        );
        let mut zero = endpoint("10.0.0.1", NODE, true);
        zero.weight = 0;
        let decision = decide(
            &cluster(vec![with_endpoints(
                service("a", "Cluster", &vip),
                vec![zero],
            )]),
            NODE,
        );
        assert!(
            decision.announced.is_empty(),
            "an endpoint of weight 0 takes no new flows"
        );
    }

    #[test]
    fn local_policy_needs_a_ready_endpoint_on_this_node() {
        let vip = [("198.18.200.1", LB)];
        let elsewhere = vec![
            endpoint("10.0.0.1", "node-b", true),
            endpoint("10.0.0.2", NODE, false),
        ];
        let decision = decide(
            &cluster(vec![with_endpoints(service("a", "Local", &vip), elsewhere)]),
            NODE,
        );
        assert!(decision.announced.is_empty());
        assert_eq!(
            decision.reason(ip("198.18.200.1")).as_deref(),
            Some("no-local-endpoint")
        );
        let here = vec![
            endpoint("10.0.0.1", "node-b", true),
            endpoint("10.0.0.2", NODE, true),
        ];
        assert_eq!(
            announced(&decide(
                &cluster(vec![with_endpoints(service("a", "Local", &vip), here)]),
                NODE
            )),
            ["198.18.200.1"]
        );
    }

    #[test]
    fn each_address_family_needs_endpoints_of_its_own() {
        let vips = [("198.18.200.1", LB), ("2001:db8:200::1", LB)];
        let v4_only = vec![endpoint("10.0.0.1", NODE, true)];
        let decision = decide(
            &cluster(vec![with_endpoints(
                service("a", "Cluster", &vips),
                v4_only,
            )]),
            NODE,
        );
        assert_eq!(announced(&decision), ["198.18.200.1"]);
        assert_eq!(
            decision.reason(ip("2001:db8:200::1")).as_deref(),
            Some("no-ready-endpoint")
        );
    }

    #[test]
    fn a_shared_address_is_announced_when_any_of_its_services_wants_it() {
        let vip = [("198.18.200.1", LB)];
        let wanting = with_endpoints(
            service("a", "Local", &vip),
            vec![endpoint("10.0.0.1", NODE, true)],
        );
        let not_wanting = service("b", "Local", &vip);
        let decision = decide(&cluster(vec![not_wanting.clone(), wanting]), NODE);
        assert_eq!(announced(&decision), ["198.18.200.1"]);
        assert!(decision.withheld.is_empty(), "{decision:?}");
        let decision = decide(
            &cluster(vec![not_wanting, service("c", "Cluster", &vip)]),
            NODE,
        );
        assert!(decision.announced.is_empty());
        assert_eq!(
            decision.reason(ip("198.18.200.1")).as_deref(),
            Some("no-local-endpoint,no-ready-endpoint")
        );
    }

    #[test]
    fn an_excluded_node_announces_nothing() {
        let web = with_endpoints(
            service("web", "Cluster", &[("198.18.200.1", LB)]),
            vec![endpoint("10.0.0.1", NODE, true)],
        );
        let mut cluster = cluster(vec![web]);
        cluster.excluded_from_load_balancers = true;
        let decision = decide(&cluster, NODE);
        assert!(decision.announced.is_empty());
        assert_eq!(
            decision.reason(ip("198.18.200.1")).as_deref(),
            Some("node-excluded")
        );
    }

    #[test]
    fn the_exclude_label_drains_whatever_its_value() {
        let node = |labels: serde_json::Value| -> Node {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": NODE, "labels": labels}
            }))
            .unwrap()
        };
        assert!(excluded(&node(serde_json::json!({EXCLUDE_LABEL: ""}))));
        assert!(excluded(&node(serde_json::json!({EXCLUDE_LABEL: "true"}))));
        assert!(!excluded(&node(serde_json::json!({"other": "true"}))));
        assert!(!excluded(&node(serde_json::json!(null))));
    }

    #[test]
    fn withdrawing_keeps_every_address_with_the_reason() {
        let decision = Decision {
            announced: [ip("198.18.200.1")].into(),
            withheld: [(
                ip("198.18.200.2"),
                [("default/a".to_owned(), Withheld::NoLocalEndpoint)].into(),
            )]
            .into(),
        };
        let withdrawn = decision.withdrawn(Withheld::Stopping);
        assert!(withdrawn.announced.is_empty());
        assert_eq!(
            withdrawn.reason(ip("198.18.200.1")).as_deref(),
            Some("stopping")
        );
        assert_eq!(
            withdrawn.reason(ip("198.18.200.2")).as_deref(),
            Some("stopping")
        );
    }
}
