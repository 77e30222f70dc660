//! Address assignment in the cluster: the leader (see [`crate::lease`]) gives LoadBalancer
//! Services of our class their addresses from the pools ([`crate::ipam::allocate`]) and writes
//! them to `status.loadBalancer.ingress` through the status subresource; every node, leader
//! or not, serves what the status says (the API source reads it back like any other change).
//!
//! One writer: a follower decides nothing and writes nothing. The leader decides from the
//! whole cluster at once (the allocation is a pure function of the Services and the pools,
//! so a new leader reaches the same answer and moves nobody), and writes only what differs
//! from the status it sees. A write carries the resourceVersion it was decided on: a Service
//! changed meanwhile answers `409 Conflict`, and is decided again on its newer version when
//! the watch brings it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{
        WatchStreamExt as _,
        events::EventType,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    api_events::{ApiEvent, EventSink, service_reference},
    crd::LoadBalancerIPPool,
    ipam::{self, Allocation, Claim, Decision, Pool},
    manifest::ConfigError,
};

/// How often the leader decides again without a change: a write that failed for a reason
/// the watch does not report (the API away) is tried again at the latest then.
const RESYNC: Duration = Duration::from_secs(10);
/// The wait after a failed write before deciding again.
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(500);

/// What the address assignment needs.
pub struct AssignSettings {
    /// The `spec.loadBalancerClass` served (Services of another class are not ours).
    pub class: String,
    /// Pools given by `--ip-pool`, beside the `LoadBalancerIPPool` objects.
    pub flag_pools: Vec<Pool>,
}

/// The assignment's figures, for the metrics.
#[derive(Debug, Default)]
pub struct AssignFigures {
    /// Addresses assigned, as last decided.
    pub assigned: AtomicU64,
    /// Services refused, as last decided.
    pub refused: AtomicU64,
    /// Status writes that succeeded.
    pub writes_ok: AtomicU64,
    /// Status writes refused with `409 Conflict` (decided again on the newer object).
    pub writes_conflict: AtomicU64,
    /// Status writes that failed otherwise.
    pub writes_failed: AtomicU64,
}

/// The running assignment. Dropping it stops it.
pub struct Assignment {
    tasks: Vec<JoinHandle<()>>,
    /// Its figures.
    pub figures: Arc<AssignFigures>,
}

impl Drop for Assignment {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Assignment {
    /// Starts watching the pools (on every node: a new leader starts from a warm store) and
    /// assigning while `leading`. `services` is the API source's store, `service_changes` its
    /// change signal, `listed` true once it holds a complete list.
    pub fn start(
        client: &Client,
        services: Store<Service>,
        service_changes: watch::Receiver<u64>,
        listed: watch::Receiver<bool>,
        leading: watch::Receiver<bool>,
        events: EventSink,
        settings: AssignSettings,
    ) -> Self {
        let (pools, pool_writer) = reflector::store();
        let (pool_changed, pool_changes) = watch::channel(0u64);
        let pool_stream = watcher(
            Api::<LoadBalancerIPPool>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(pool_writer);
        let watch_pools = tokio::spawn(async move {
            let mut stream = std::pin::pin!(pool_stream);
            let mut failing = false;
            loop {
                match stream.try_next().await {
                    Ok(Some(_)) => {
                        failing = false;
                        pool_changed.send_modify(|n| *n += 1);
                    }
                    Ok(None) => return,
                    Err(e) => {
                        if !failing {
                            warn!(error = %e, "the LoadBalancerIPPools cannot be watched (is the CRD of deploy/crd.yaml installed?): no address is assigned until they are listed");
                        }
                        failing = true;
                    }
                }
            }
        });
        let figures = Arc::new(AssignFigures::default());
        let leader = Leader {
            client: client.clone(),
            services,
            pools,
            events,
            settings,
            figures: figures.clone(),
            told: HashMap::new(),
            last_valid: HashMap::new(),
        };
        let assign = tokio::spawn(leader.run(service_changes, pool_changes, listed, leading));
        Self {
            tasks: vec![watch_pools, assign],
            figures,
        }
    }
}

/// What a status write came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Written.
    Done,
    /// Not written: decided on an older version of the Service (or one without a name); the
    /// watch brings the newer one, and a new decision with it.
    Stale,
    /// Not written: to be tried again.
    Failed,
}

/// The leader's side.
struct Leader {
    client: Client,
    services: Store<Service>,
    pools: Store<LoadBalancerIPPool>,
    events: EventSink,
    settings: AssignSettings,
    figures: Arc<AssignFigures>,
    /// The decision last told (as an event) for each Service uid: events say what changed,
    /// not the same decision at every pass.
    told: HashMap<String, Decision>,
    /// The last valid version of each pool object: an edit that breaks a pool keeps its
    /// previous version in force (else every Service in it would be renumbered).
    last_valid: HashMap<String, Pool>,
}

impl Leader {
    async fn run(
        mut self,
        mut service_changes: watch::Receiver<u64>,
        mut pool_changes: watch::Receiver<u64>,
        mut listed: watch::Receiver<bool>,
        mut leading: watch::Receiver<bool>,
    ) {
        loop {
            // Followers wait; a new leader starts from what it is told anew.
            if leading.wait_for(|leading| *leading).await.is_err() {
                return;
            }
            self.told.clear();
            // Deciding before the pools are listed would refuse every Service and clear its
            // status; before the Services are, it would miss who holds what. (The Services'
            // readiness is the API source's to wait on: see `ApiSource::listed`. This task is
            // the only one waiting on the pools'.)
            if self.pools.wait_until_ready().await.is_err()
                || listed.wait_for(|listed| *listed).await.is_err()
            {
                return;
            }
            info!("leading the address assignment");
            while *leading.borrow_and_update() {
                let wait = if self.decide_and_write().await {
                    RESYNC
                } else {
                    RETRY_AFTER_ERROR
                };
                tokio::select! {
                    changed = service_changes.changed() => if changed.is_err() { return },
                    changed = pool_changes.changed() => if changed.is_err() { return },
                    changed = leading.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(wait) => {}
                }
            }
            info!("no longer leading the address assignment: writing nothing");
        }
    }

    /// The pools: `--ip-pool`s, then every `LoadBalancerIPPool`; one whose edit made it
    /// invalid keeps its last valid version (logged), one never valid is left out.
    fn pools(&mut self) -> Vec<Pool> {
        let mut pools = self.settings.flag_pools.clone();
        let resources = self.pools.state();
        self.last_valid
            .retain(|name, _| resources.iter().any(|r| r.name_any() == *name));
        for resource in &resources {
            match Pool::from_resource(resource) {
                Ok(pool) => {
                    self.last_valid.insert(resource.name_any(), pool.clone());
                    pools.push(pool);
                }
                Err(e) => match self.last_valid.get(&resource.name_any()) {
                    Some(previous) => {
                        warn!(error = %e, "a LoadBalancerIPPool edit is invalid: its previous version stays in force");
                        pools.push(previous.clone());
                    }
                    None => warn!(error = %e, "a LoadBalancerIPPool is invalid: left out"),
                },
            }
        }
        pools
    }

    /// Writes each pool object's counts (`kubectl get lbpool` shows them) where they changed.
    async fn write_pool_counts(&self, pools: &[Pool], allocations: &[Allocation]) {
        let api: Api<LoadBalancerIPPool> = Api::all(self.client.clone());
        for resource in self.pools.state() {
            let Some(pool) = pools.iter().find(|p| p.name == resource.name_any()) else {
                continue;
            };
            let counts = ipam::pool_status(pool, allocations);
            if resource.status.as_ref() == Some(&counts) {
                continue;
            }
            let patch = serde_json::json!({ "status": counts });
            if let Err(e) = api
                .patch_status(
                    &resource.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                // Counts for people: the next pass writes them again.
                tracing::debug!(pool = %resource.name_any(), error = %e, "writing a pool's counts");
            }
        }
    }

    /// Decides every claim and writes the status that differs; whether every write succeeded.
    async fn decide_and_write(&mut self) -> bool {
        let pools = self.pools();
        let services = self.services.state();
        let claims: Vec<Claim> = services
            .iter()
            .filter_map(|s| Claim::from_service(s, &self.settings.class))
            .collect();
        let allocations = ipam::allocate(&pools, &claims);
        let by_uid: HashMap<&str, &Arc<Service>> = services
            .iter()
            .filter_map(|s| Some((s.metadata.uid.as_deref()?, s)))
            .collect();
        let assigned: usize = allocations.iter().map(|a| a.ingress().len()).sum();
        let refused = allocations
            .iter()
            .filter(|a| matches!(a.decision, Decision::Refused { .. }))
            .count();
        self.figures
            .assigned
            .store(assigned as u64, Ordering::Relaxed);
        self.figures
            .refused
            .store(refused as u64, Ordering::Relaxed);
        let mut all_written = true;
        for allocation in &allocations {
            let Some(service) = by_uid.get(allocation.uid.as_str()) else {
                continue;
            };
            let outcome = if ipam::ingress_addresses(service) != allocation.ingress() {
                Some(self.write(service, allocation.ingress()).await)
            } else {
                None
            };
            all_written &= outcome != Some(Write::Failed);
            self.tell(service, allocation, outcome == Some(Write::Done));
        }
        // A Service no longer of type LoadBalancer keeps the status it had: ours to clear.
        for service in &services {
            if ipam::stale_ingress(service, &pools, &self.settings.class) {
                all_written &= self.write(service, &[]).await != Write::Failed;
            }
        }
        self.write_pool_counts(&pools, &allocations).await;
        all_written
    }

    /// Writes `ingress` to `service`'s status, on the version it was decided on.
    async fn write(&self, service: &Service, ingress: &[IpAddr]) -> Write {
        let (Some(namespace), Some(name)) = (&service.metadata.namespace, &service.metadata.name)
        else {
            return Write::Stale;
        };
        let mut patch = ipam::status_patch(ingress);
        patch["metadata"] = serde_json::json!({
            "resourceVersion": service.metadata.resource_version,
        });
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.figures.writes_ok.fetch_add(1, Ordering::Relaxed);
                info!(service = %format!("{namespace}/{name}"), ingress = ?ingress, "status.loadBalancer.ingress written");
                Write::Done
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Decided on an older version: the watch brings the newer one, and with it
                // a new decision.
                self.figures.writes_conflict.fetch_add(1, Ordering::Relaxed);
                Write::Stale
            }
            Err(e) => {
                self.figures.writes_failed.fetch_add(1, Ordering::Relaxed);
                warn!(service = %format!("{namespace}/{name}"), error = %e, "writing the Service's status failed: trying again");
                Write::Failed
            }
        }
    }

    /// Tells a decision as an event on its Service: an assignment when this leader wrote it
    /// (a new leader finding every address in place says nothing), a refusal when it is not
    /// the one told last (a new leader tells the refusals it finds once).
    fn tell(&mut self, service: &Service, allocation: &Allocation, written: bool) {
        let assigned = matches!(allocation.decision, Decision::Assigned(_));
        if (assigned && !written)
            || (!assigned && self.told.get(&allocation.uid) == Some(&allocation.decision))
        {
            return;
        }
        self.told
            .insert(allocation.uid.clone(), allocation.decision.clone());
        let event = match &allocation.decision {
            Decision::Assigned(addresses) => {
                let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
                ApiEvent::normal(
                    "IPAllocated",
                    "Allocate",
                    format!("Assigned {} from the pools", list.join(", ")),
                )
            }
            Decision::Refused { reason, message } => {
                ApiEvent::warning(reason.event_reason(), "Allocate", message.clone())
            }
        };
        self.events.publish(service_reference(service), event);
    }
}

/// Tells configuration refusals as `Warning Rejected` events on the Services they name, from
/// the leader only (every node refuses the same objects: one voice is enough; a refusal that
/// is one node's own, a VIP that is its address, is in that node's log and `describe`).
#[derive(Clone)]
pub struct RefusalAnnouncer {
    services: Store<Service>,
    leading: watch::Receiver<bool>,
    events: EventSink,
}

impl RefusalAnnouncer {
    /// Announces through `events` while `leading`, finding Services in `services`.
    pub fn new(
        services: Store<Service>,
        leading: watch::Receiver<bool>,
        events: EventSink,
    ) -> Self {
        Self {
            services,
            leading,
            events,
        }
    }

    /// Tells `error` to its Service, if this node leads and the Service exists. Never waits.
    pub fn announce(&self, error: &ConfigError) {
        if !*self.leading.borrow() {
            return;
        }
        let Some(name) = error.object.service.as_deref() else {
            return;
        };
        let namespace = error.object.namespace.as_str();
        let Some(service) = self.services.find(|s| {
            s.metadata.name.as_deref() == Some(name) && s.namespace().as_deref() == Some(namespace)
        }) else {
            return;
        };
        let note = format!("{}: {}", error.field, error.message);
        self.events.publish(
            service_reference(&service),
            ApiEvent {
                type_: EventType::Warning,
                reason: "Rejected".into(),
                action: "Apply".into(),
                note,
            },
        );
    }
}
