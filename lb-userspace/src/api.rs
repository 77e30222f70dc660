//! The Kubernetes API as a source of the desired state, a peer of the file source
//! ([`crate::source::FileSource`]): it lists and watches Services, EndpointSlices and Nodes
//! with kube-rs's watcher (resourceVersions, bookmarks, a relist after `410 Gone`, backoff on
//! errors), keeps them in reflector stores, and publishes a [`Snapshot`] of them after every
//! settled burst of changes, on the same channel type the controller reads from a file.
//!
//! Safety, in the order a node meets the API:
//! - Nothing is published before every resource has been listed completely once: a
//!   controller starting, or restarting beside a serving data plane, never applies a partial
//!   cluster (which would remove Services that are only not listed yet).
//! - While the API cannot be reached, the stores keep the last objects they had and nothing is
//!   published: the data plane keeps serving the last good state. The outage is logged once
//!   per resource, its end too, and [`ApiHealth`] says so for the metrics.
//! - After a relist (a `410 Gone`, or a reconnection), kube-rs swaps a store's contents at the
//!   end of the list, never empties it first: an unchanged cluster publishes an unchanged
//!   snapshot, which the controller recognises and does not apply.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        utils::Backoff,
        watcher,
    },
};
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, sleep_until},
};
use tracing::{info, warn};

use crate::{
    manifest::{Located, Manifests},
    source::{Settle, Snapshot, Snapshots},
};

/// The origin an object read from the API carries where a file's would be: error messages
/// and events name it (`api: Service default/web: spec.ports[0].port: ...`).
pub const API_ORIGIN: &str = "api";

/// How long the API's changes settle before a snapshot is taken: a rollout writes an
/// EndpointSlice several times in a few milliseconds. Much shorter than a file's settle (no
/// editor writes half a file here), so a change reaches the data plane well within 100 ms.
pub const API_SETTLE: Settle = Settle {
    quiet: Duration::from_millis(5),
    max: Duration::from_millis(40),
};

/// The first wait after a watch error; it doubles up to [`WATCH_BACKOFF_MAX`] and starts
/// again after a success. Shorter than kube-rs's default (0.8 s to 30 s): a node that lost
/// the API for a few seconds catches up within seconds of its return, and the API server is
/// asked at most once a second per resource by each node while it is away.
const WATCH_BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between two tries of a watch.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Builds the API client: from `kubeconfig` when given, else as kube-rs infers it (in a pod:
/// the service account's token and the `KUBERNETES_SERVICE_*` variables; outside: `KUBECONFIG`
/// or `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "finding the API server (in-cluster configuration, KUBECONFIG or ~/.kube/config)",
        )?,
    };
    Client::try_from(config).context("building the API client")
}

/// How long a watch that failed must go without a new error to count as connected again
/// when no event says so: a watch resumed from its resourceVersion brings no event until
/// something changes, and a failing one fails again within [`WATCH_BACKOFF_MAX`].
const QUIET_AFTER_ERROR: Duration = Duration::from_secs(2);

/// One watched resource's connection, for the metrics and the logs.
#[derive(Debug, Default)]
pub struct WatchHealth {
    /// The resource's plural (`services`).
    pub resource: &'static str,
    /// An event arrived since the last error (or there was none).
    delivering: AtomicBool,
    /// When its list or watch last failed.
    last_error: std::sync::Mutex<Option<std::time::Instant>>,
    /// Errors of its list and watch calls.
    pub errors: AtomicU64,
}

impl WatchHealth {
    /// Whether the resource is watched now: an event arrived since its last error, or no
    /// error came for [`QUIET_AFTER_ERROR`] (kube-rs retries a failing watch within a second:
    /// silence means it started).
    pub fn connected(&self) -> bool {
        let last_error = *self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        match last_error {
            None => true,
            Some(at) => {
                self.delivering.load(Ordering::Relaxed) || at.elapsed() >= QUIET_AFTER_ERROR
            }
        }
    }

    fn failed(&self) -> bool {
        let was_connected = self.connected();
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now());
        self.delivering.store(false, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        was_connected
    }
}

/// The API source's connection, one entry per watched resource.
#[derive(Debug)]
pub struct ApiHealth {
    /// Services, EndpointSlices, Nodes.
    pub watches: [WatchHealth; 3],
}

impl ApiHealth {
    fn new() -> Self {
        let watch = |resource| WatchHealth {
            resource,
            ..WatchHealth::default()
        };
        Self {
            watches: [watch("services"), watch("endpointslices"), watch("nodes")],
        }
    }
}

/// The stores the API source keeps, for whoever else needs the same objects (the address
/// assignment reads Services from here rather than watching them a second time).
#[derive(Clone)]
pub struct ApiStores {
    /// Every Service.
    pub services: Store<Service>,
    /// Every EndpointSlice.
    pub slices: Store<EndpointSlice>,
    /// Every Node (for node addresses).
    pub nodes: Store<Node>,
}

/// Lists and watches the API and publishes snapshots of it. Dropping it stops the watches.
pub struct ApiSource {
    tasks: Vec<JoinHandle<()>>,
    /// The objects as last seen.
    pub stores: ApiStores,
    /// The watches' connection.
    pub health: Arc<ApiHealth>,
    /// Counts the changes of the Services store (for the address assignment, which reads
    /// only Services).
    pub service_changes: watch::Receiver<u64>,
    /// True once every store holds a complete list. Others wait on this rather than on a
    /// store's `wait_until_ready`: kube-runtime's readiness wakes only the last task that
    /// polled it, so a second task waiting on the same store can wait forever.
    pub listed: watch::Receiver<bool>,
}

impl Drop for ApiSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ApiSource {
    /// Starts the watches (within a tokio runtime). The first snapshot comes once every
    /// resource has been listed completely.
    pub fn start(client: &Client, settle: Settle) -> (Self, Snapshots) {
        let health = Arc::new(ApiHealth::new());
        let (changed, changes) = watch::channel(0u64);
        let changed = Arc::new(changed);
        let (service_changed, service_changes) = watch::channel(0u64);
        let mut tasks = Vec::new();
        let services = follow(
            Api::<Service>::all(client.clone()),
            &health,
            0,
            &[changed.clone(), Arc::new(service_changed)],
            &mut tasks,
        );
        let slices = follow(
            Api::<EndpointSlice>::all(client.clone()),
            &health,
            1,
            std::slice::from_ref(&changed),
            &mut tasks,
        );
        let nodes = follow(
            Api::<Node>::all(client.clone()),
            &health,
            2,
            std::slice::from_ref(&changed),
            &mut tasks,
        );
        let stores = ApiStores {
            services,
            slices,
            nodes,
        };
        let (snapshot_tx, snapshots) = watch::channel(None);
        let (listed_tx, listed) = watch::channel(false);
        tasks.push(tokio::spawn(publish(
            stores.clone(),
            settle,
            changes,
            listed_tx,
            snapshot_tx,
        )));
        (
            Self {
                tasks,
                stores,
                health,
                service_changes,
                listed,
            },
            snapshots,
        )
    }
}

/// Watches one resource into a store (its task pushed on `tasks`), and signals every change
/// of it on each of `changed`.
fn follow<K>(
    api: Api<K>,
    health: &Arc<ApiHealth>,
    index: usize,
    changed: &[Arc<watch::Sender<u64>>],
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        // Nobody reads them, and they are most of a busy object's size.
        .modify(|object| object.managed_fields_mut().clear())
        .backoff(WatchBackoff::default())
        .reflect(writer);
    let health = health.clone();
    let changed = changed.to_vec();
    tasks.push(tokio::spawn(async move {
        let watch = &health.watches[index];
        let mut stream = std::pin::pin!(stream);
        loop {
            match stream.try_next().await {
                Ok(Some(event)) => {
                    if !watch.delivering.swap(true, Ordering::Relaxed) {
                        info!(resource = watch.resource, "watching the API");
                    }
                    match event {
                        // Objects of a list in progress are not in the store yet.
                        watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                        watcher::Event::InitDone
                        | watcher::Event::Apply(_)
                        | watcher::Event::Delete(_) => {}
                    }
                    for changed in &changed {
                        changed.send_modify(|n| *n += 1);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    // Once per outage: the backoff retries every second meanwhile.
                    if watch.failed() {
                        warn!(resource = watch.resource, error = %e, "the API cannot be watched: the last state it gave keeps serving; retrying");
                    }
                }
            }
        }
    }));
    reader
}

/// Waits for every store's first complete list (then says so on `listed`), then publishes a
/// snapshot after every settled burst of changes. The only task that waits on the stores'
/// readiness (see [`ApiSource::listed`]).
async fn publish(
    stores: ApiStores,
    settle: Settle,
    mut changes: watch::Receiver<u64>,
    listed: watch::Sender<bool>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
) {
    let ready = futures::future::try_join3(
        stores.services.wait_until_ready(),
        stores.slices.wait_until_ready(),
        stores.nodes.wait_until_ready(),
    );
    if ready.await.is_err() {
        return;
    }
    info!("the API is listed: publishing its state");
    let _ = listed.send(true);
    changes.mark_unchanged();
    let mut generation = 0;
    loop {
        generation += 1;
        let read = stores.clone();
        let Ok(manifests) = tokio::task::spawn_blocking(move || manifests(&read)).await else {
            return;
        };
        let snapshot = Arc::new(Snapshot {
            generation,
            manifests: Ok(manifests),
        });
        if snapshots.send(Some(snapshot)).is_err() {
            return;
        }
        // The next burst: from its first change, `quiet` after its last, at most `max`.
        if changes.changed().await.is_err() {
            return;
        }
        let deadline = Instant::now() + settle.max;
        let mut quiet_until = Instant::now() + settle.quiet;
        loop {
            tokio::select! {
                changed = changes.changed() => match changed {
                    Ok(()) => quiet_until = Instant::now() + settle.quiet,
                    Err(_) => return,
                },
                () = sleep_until(quiet_until.min(deadline)) => break,
            }
        }
        changes.mark_unchanged();
    }
}

/// The stores' objects as the model reads manifests, each with [`API_ORIGIN`] for a file.
fn manifests(stores: &ApiStores) -> Manifests {
    fn located<K: Clone>(objects: Vec<Arc<K>>) -> Vec<Located<K>> {
        objects
            .into_iter()
            .map(|object| Located {
                file: PathBuf::from(API_ORIGIN),
                object: (*object).clone(),
            })
            .collect()
    }
    let mut manifests = Manifests {
        services: located(stores.services.state()),
        slices: located(stores.slices.state()),
        nodes: located(stores.nodes.state()),
        ..Manifests::default()
    };
    // FQDN slices are passed on as they are: the model reads IPv4 and IPv6 slices only, as
    // kube-proxy does (and says nothing of the others, which a cluster has many of).
    // The stores' order is a hash map's: the model sorts what it builds, but a stable input
    // keeps refusals (and their log lines) in one order from one snapshot to the next.
    let key = |meta: &kube::api::ObjectMeta| (meta.namespace.clone(), meta.name.clone());
    manifests.services.sort_by_key(|l| key(&l.object.metadata));
    manifests.slices.sort_by_key(|l| key(&l.object.metadata));
    manifests.nodes.sort_by_key(|l| key(&l.object.metadata));
    manifests
}

/// The watches' backoff: [`WATCH_BACKOFF_FIRST`] doubling to [`WATCH_BACKOFF_MAX`], again
/// from the start after a success.
#[derive(Debug, Clone, Copy)]
struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: WATCH_BACKOFF_FIRST,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next;
        self.next = (self.next * 2).min(WATCH_BACKOFF_MAX);
        Some(wait)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// A Node's addresses, as `--node-ip` would give them: its `InternalIP`s and `ExternalIP`s
/// (kube-proxy serves node ports on every address of the node).
pub fn node_addresses(node: &Node) -> Vec<std::net::IpAddr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_backoff_doubles_to_its_ceiling_and_starts_again_after_a_success() {
        let mut backoff = WatchBackoff::default();
        let waits: Vec<_> = backoff.by_ref().take(5).collect();
        assert_eq!(
            waits,
            [200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        backoff.reset();
        assert_eq!(backoff.next(), Some(WATCH_BACKOFF_FIRST));
    }

    #[test]
    fn node_addresses_are_its_internal_and_external_ips() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "198.18.0.2"},
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "2001:db8::2"},
                {"type": "InternalDNS", "address": "n1.example"}
            ]}
        }))
        .unwrap();
        assert_eq!(
            node_addresses(&node),
            [
                "198.18.0.2".parse::<std::net::IpAddr>().unwrap(),
                "2001:db8::2".parse().unwrap()
            ]
        );
    }
}
