//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection`
//! (`tryAcquireOrRenew`) does it.
//!
//! Every node runs the controller; only one may assign LoadBalancer addresses and write
//! Service status, or two nodes could hand one address to two Services. The candidates share a
//! Lease: the holder renews it every retry period; the others watch it, and take it over only
//! once it has not changed for its `leaseDurationSeconds`.
//!
//! Two rules make it safe without trusting any clock but our own:
//! - A follower never compares the holder's `renewTime` with its own clock (they may be
//!   skewed by minutes). It times how long the Lease's version stays unchanged by its own
//!   clock, from the moment it first read that version.
//! - A leader counts its leadership from the moment it *sent* its last successful write, and
//!   stops leading [`renew_deadline`](LeaseSettings::renew_deadline) after it, shorter than the
//!   lease duration. A follower can only have read that write after it was sent, so the leader
//!   has stopped before any follower's wait is over, even when the leader cannot reach the API.
//!
//! Writes are conditional on the resourceVersion read (an update with a stale one fails with
//! 409 Conflict): of two candidates taking over at once, one wins.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::{Instant, sleep_until, timeout},
};
use tracing::{debug, info, warn};

use crate::api_events::{WarnGate, error_kind};

/// Default lease duration: how long followers wait for a silent leader (client-go: 15 s).
pub const DEFAULT_DURATION: Duration = Duration::from_secs(15);
/// Default time a leader keeps leading without a successful renewal (client-go: 10 s).
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Default period of the attempts to acquire or renew (client-go: 2 s).
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// A failing API call of one kind is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Which Lease to campaign on, as whom, and its timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// Who we are in `holderIdentity`: unique among the candidates (the node's name, and the
    /// pod's when in a pod, so that a new pod on the node is another candidate).
    pub identity: String,
    /// `leaseDurationSeconds`: how long followers wait for the lease to change before taking
    /// it over. Whole seconds, the field being an integer.
    pub duration: Duration,
    /// How long a leader keeps leading without a successful renewal. Shorter than
    /// [`duration`](Self::duration), so that a leader cut off from the API stops before a
    /// follower may take over.
    pub renew_deadline: Duration,
    /// Period of the attempts: renewals while leading, reads of the lease while following.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Settings with the default timings (15 s, 10 s, 2 s).
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration: DEFAULT_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// Checks what the election's safety rests on: names present, a duration the Lease can
    /// carry, and `retry_period < renew_deadline < duration`.
    pub fn validate(&self) -> Result<(), LeaseError> {
        for (field, value) in [
            ("namespace", &self.namespace),
            ("name", &self.name),
            ("identity", &self.identity),
        ] {
            if value.is_empty() {
                return Err(LeaseError::Empty { field });
            }
        }
        if self.duration.subsec_nanos() != 0
            || self.duration.is_zero()
            || i32::try_from(self.duration.as_secs()).is_err()
        {
            return Err(LeaseError::Duration {
                duration: self.duration,
            });
        }
        if self.renew_deadline >= self.duration {
            return Err(LeaseError::RenewDeadline {
                renew_deadline: self.renew_deadline,
                duration: self.duration,
            });
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(LeaseError::RetryPeriod {
                retry_period: self.retry_period,
                renew_deadline: self.renew_deadline,
            });
        }
        Ok(())
    }

    /// The duration as `leaseDurationSeconds` (checked by [`validate`](Self::validate)).
    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// What can go wrong with the election.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A name is missing.
    #[error("the lease's {field} must not be empty")]
    Empty {
        /// `namespace`, `name` or `identity`.
        field: &'static str,
    },
    /// The duration cannot be written as `leaseDurationSeconds`: rounding it down would let
    /// followers take over before this leader stops.
    #[error("the lease duration ({duration:?}) must be a whole number of seconds, at least 1")]
    Duration {
        /// The duration given.
        duration: Duration,
    },
    /// A leader that cannot renew would still lead when followers take over.
    #[error(
        "the renew deadline ({renew_deadline:?}) must be shorter than the lease duration ({duration:?}): \
         a leader that cannot renew must stop before others may take the lease over"
    )]
    RenewDeadline {
        /// The renew deadline given.
        renew_deadline: Duration,
        /// The lease duration given.
        duration: Duration,
    },
    /// A leader would have one try, or none, to renew before its deadline.
    #[error(
        "the retry period ({retry_period:?}) must be above zero and shorter than the renew deadline \
         ({renew_deadline:?}): a leader needs more than one try to renew"
    )]
    RetryPeriod {
        /// The retry period given.
        retry_period: Duration,
        /// The renew deadline given.
        renew_deadline: Duration,
    },
    /// Reading or writing the Lease failed.
    #[error("reading or writing the lease: {0}")]
    Api(#[from] kube::Error),
    /// The API server did not answer in time.
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
}

impl LeaseError {
    /// A short name of the kind of error, for [`WarnGate`].
    fn kind(&self) -> String {
        match self {
            Self::Api(e) => error_kind(e),
            Self::Timeout(_) => "timeout".into(),
            other => other.to_string(),
        }
    }
}

/// The campaign started by [`spawn`]. Dropping it stops the campaign without giving the lease
/// up (followers take over once it expires); [`release`](Self::release) gives it up.
pub struct Leadership {
    /// Whether this process holds the lease: true from a successful acquisition or renewal
    /// until its renew deadline passes without another, or until the lease is lost or
    /// released. Only a leader may assign addresses and write status.
    pub leading: watch::Receiver<bool>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Leadership {
    /// Whether this process leads now.
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Stops leading (`leading` turns false first, so that nothing is done as leader once a
    /// follower may take over), clears the lease's holder if we hold it so that a follower
    /// takes over at its next attempt rather than after the lease duration (client-go's
    /// `ReleaseOnCancel`), and stops the campaign. Gives up after the renew deadline when the
    /// API does not answer: the lease then expires as it would have.
    pub async fn release(self) {
        let Self { stop, task, .. } = self;
        let _ = stop.send(());
        if let Err(e) = task.await
            && e.is_panic()
        {
            warn!(error = %e, "the leader election task panicked");
        }
    }
}

/// Starts campaigning for the lease of `settings` (within a tokio runtime), at once.
pub fn spawn(client: kube::Client, settings: LeaseSettings) -> Result<Leadership, LeaseError> {
    settings.validate()?;
    let api = Api::namespaced(client, &settings.namespace);
    let (leading_tx, leading) = watch::channel(false);
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(run(api, Campaign::new(settings), leading_tx, stopped));
    Ok(Leadership {
        leading,
        stop,
        task,
    })
}

/// The lease as last read, and since when by our clock it has been as it is.
#[derive(Debug, Clone)]
struct Observed {
    /// As read: a write starts from it, its resourceVersion making the write conditional.
    lease: Lease,
    /// When we first read this version of it (our clock).
    since: Instant,
}

impl Observed {
    /// Records `lease`, read at `now`, after `previous`: a lease unchanged keeps the time it
    /// was first seen.
    fn new(previous: Option<&Observed>, lease: Lease, now: Instant) -> Self {
        let since = match previous {
            Some(p) if same_version(&p.lease, &lease) => p.since,
            _ => now,
        };
        Self { lease, since }
    }

    /// Who holds it; `None` when nobody does (never held, or released).
    fn holder(&self) -> Option<&str> {
        holder(&self.lease)
    }

    /// How long it stays valid after its last change: its own `leaseDurationSeconds`, what its
    /// holder promised to keep to; ours when it has none.
    fn duration(&self, settings: &LeaseSettings) -> Duration {
        self.lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|&s| s > 0)
            .map_or(settings.duration, Duration::from_secs)
    }
}

/// Who holds `lease`; `None` when nobody does.
fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// Whether two reads of the lease are the same version: every write changes the
/// resourceVersion. Without one (not from an API server), the contents are compared.
fn same_version(a: &Lease, b: &Lease) -> bool {
    match (&a.metadata.resource_version, &b.metadata.resource_version) {
        (Some(x), Some(y)) => x == y && holder(a) == holder(b),
        _ => a.spec == b.spec,
    }
}

/// What to do about the lease at one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// There is none: create it, held by us.
    Create,
    /// We hold it: write a new renewTime.
    Renew,
    /// Nobody holds it, or its holder has let it expire: write it held by us.
    TakeOver,
    /// Someone else holds it and it has not expired: wait.
    Follow {
        /// The holder.
        holder: String,
    },
}

/// The decision of one attempt, from the lease as read (`None`: there is none) at `now`.
///
/// The lease of another holder has expired only once it has stayed the same version for its
/// duration as measured by our clock since we first read that version: its `renewTime`,
/// written by another node's clock, is never compared with ours.
fn decide(observed: Option<&Observed>, now: Instant, me: &str, settings: &LeaseSettings) -> Step {
    let Some(observed) = observed else {
        return Step::Create;
    };
    match observed.holder() {
        Some(holder) if holder == me => Step::Renew,
        None => Step::TakeOver,
        Some(holder) => {
            if now.saturating_duration_since(observed.since) >= observed.duration(settings) {
                Step::TakeOver
            } else {
                Step::Follow {
                    holder: holder.to_owned(),
                }
            }
        }
    }
}

/// How a write of the lease ended.
#[derive(Debug)]
enum Outcome {
    /// Written; the lease as the API returned it.
    Written(Box<Lease>),
    /// 409: someone else wrote the lease since we read it (or created it first).
    Conflict,
    /// Any other error, or no answer: we do not know whether it was written.
    Failed,
}

/// The state of the election for one candidate, without any I/O: what it read of the lease and
/// until when it leads. The task ([`run`]) feeds it reads and write outcomes.
#[derive(Debug)]
struct Campaign {
    settings: LeaseSettings,
    observed: Option<Observed>,
    /// Until when we lead: the send time of our last successful write plus the renew deadline.
    leader_until: Option<Instant>,
    /// Why we last stopped leading before the deadline, for the log.
    lost: Option<String>,
}

impl Campaign {
    fn new(settings: LeaseSettings) -> Self {
        Self {
            settings,
            observed: None,
            leader_until: None,
            lost: None,
        }
    }

    /// Whether we lead at `now`.
    fn leading(&self, now: Instant) -> bool {
        self.leader_until.is_some_and(|until| now < until)
    }

    /// Records the lease as read at `now` (`None`: there is none). One held by someone else, or
    /// by nobody, ends our leadership at once, whatever our deadline says.
    fn observe(&mut self, lease: Option<Lease>, now: Instant) {
        self.observed = lease.map(|l| Observed::new(self.observed.as_ref(), l, now));
        let held = self.observed.as_ref().and_then(Observed::holder);
        if held != Some(self.settings.identity.as_str()) && self.leader_until.take().is_some() {
            self.lost = Some(match held {
                Some(holder) => format!("the lease is held by {holder}"),
                None => "the lease is no longer held".into(),
            });
        }
    }

    /// What to do at `now`, from the last read.
    fn decide(&self, now: Instant) -> Step {
        decide(
            self.observed.as_ref(),
            now,
            &self.settings.identity,
            &self.settings,
        )
    }

    /// The lease to write for `step` at `at` (wall clock), or `None` when there is nothing to
    /// write.
    fn write(&self, step: &Step, at: Timestamp) -> Option<Lease> {
        let now = Some(MicroTime(at));
        let ours = |spec: &mut LeaseSpec| {
            spec.holder_identity = Some(self.settings.identity.clone());
            spec.lease_duration_seconds = Some(self.settings.duration_seconds());
            spec.renew_time = now.clone();
        };
        match step {
            Step::Follow { .. } => None,
            Step::Create => {
                let mut spec = LeaseSpec {
                    acquire_time: now.clone(),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                };
                ours(&mut spec);
                Some(Lease {
                    metadata: ObjectMeta {
                        namespace: Some(self.settings.namespace.clone()),
                        name: Some(self.settings.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                })
            }
            Step::Renew | Step::TakeOver => {
                let mut lease = self.observed.as_ref()?.lease.clone();
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if *step == Step::TakeOver {
                    spec.acquire_time = now.clone();
                    spec.lease_transitions =
                        Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                }
                ours(spec);
                Some(lease)
            }
        }
    }

    /// Records how the write of `step`, sent at `sent`, ended (at `now`).
    fn record(&mut self, step: &Step, outcome: Outcome, sent: Instant, now: Instant) {
        match outcome {
            Outcome::Written(lease) => {
                self.observed = Some(Observed {
                    lease: *lease,
                    since: now,
                });
                // Counted from the send: a follower can only have read this write after it.
                self.leader_until = Some(sent + self.settings.renew_deadline);
                self.lost = None;
            }
            Outcome::Conflict => {
                // Someone wrote the lease after our read: when renewing, it is no longer ours
                // to hold (a takeover); when acquiring, someone else was first.
                if *step == Step::Renew && self.leader_until.take().is_some() {
                    self.lost =
                        Some("the lease was written by another candidate (409 Conflict)".into());
                }
            }
            // Still leading, if we were, until the deadline: the next attempt may succeed.
            Outcome::Failed => {}
        }
    }

    /// Why we stopped leading (taken, once).
    fn lost_reason(&mut self) -> String {
        self.lost
            .take()
            .unwrap_or_else(|| "the renew deadline passed without a renewal".into())
    }
}

/// Sets `leading`, logging a change.
fn set_leading(
    tx: &watch::Sender<bool>,
    leading: bool,
    settings: &LeaseSettings,
    reason: impl FnOnce() -> String,
) {
    let changed = tx.send_if_modified(|value| {
        let changed = *value != leading;
        *value = leading;
        changed
    });
    if !changed {
        return;
    }
    let (identity, lease) = (&settings.identity, &settings.name);
    if leading {
        info!(identity, lease, "became leader");
    } else {
        info!(identity, lease, reason = reason(), "lost leadership");
    }
}

/// One attempt: reads the lease, decides, writes. Updates `campaign` as it goes, so that an
/// attempt cut short (timeout, stop) leaves what it learnt.
async fn attempt(api: &Api<Lease>, campaign: &mut Campaign) -> Result<Step, LeaseError> {
    let name = campaign.settings.name.clone();
    let lease = api.get_opt(&name).await?;
    campaign.observe(lease, Instant::now());
    let step = campaign.decide(Instant::now());
    let Some(lease) = campaign.write(&step, Timestamp::now()) else {
        return Ok(step);
    };
    let sent = Instant::now();
    let pp = PostParams::default();
    let written = match step {
        Step::Create => api.create(&pp, &lease).await,
        _ => api.replace(&name, &pp, &lease).await,
    };
    let (outcome, result) = match written {
        Ok(lease) => (Outcome::Written(Box::new(lease)), Ok(step.clone())),
        // AlreadyExists (create) and Conflict (update) are both 409.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            debug!(
                lease = %name,
                ?step,
                message = %status.message,
                "lease written by another candidate first"
            );
            (Outcome::Conflict, Ok(step.clone()))
        }
        Err(e) => (Outcome::Failed, Err(e.into())),
    };
    campaign.record(&step, outcome, sent, Instant::now());
    result
}

/// The campaign's task: an attempt every retry period until stopped; `leading` turns false the
/// moment the renew deadline passes, even while an attempt hangs.
async fn run(
    api: Api<Lease>,
    mut campaign: Campaign,
    leading: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let settings = campaign.settings.clone();
    let mut gate = WarnGate::new(WARN_EVERY);
    let mut failing = false;
    let mut followed: Option<String> = None;
    let mut next = Instant::now();
    let release = loop {
        let deadline = campaign.leader_until.filter(|_| *leading.borrow());
        let round = async {
            sleep_until(next).await;
            // Bounded as client-go bounds a renewal: a hung request must not stop the retries.
            timeout(settings.renew_deadline, attempt(&api, &mut campaign))
                .await
                .unwrap_or(Err(LeaseError::Timeout(settings.renew_deadline)))
        };
        // In a block of its own: the round borrows the campaign until it is dropped.
        let result = {
            let mut round = std::pin::pin!(round);
            let mut deadline_armed = deadline.is_some();
            loop {
                tokio::select! {
                    biased;
                    stopped = &mut stop => break Err(stopped.is_ok()),
                    result = &mut round => break Ok(result),
                    () = sleep_until(deadline.unwrap_or(next)), if deadline_armed => {
                        deadline_armed = false;
                        let why = || "the renew deadline passed without a renewal".into();
                        set_leading(&leading, false, &settings, why);
                    }
                }
            }
        };
        let result = match result {
            Ok(result) => result,
            Err(release) => break release,
        };
        let now = Instant::now();
        let leads = campaign.leading(now);
        set_leading(&leading, leads, &settings, || campaign.lost_reason());
        match result {
            Ok(step) => {
                if std::mem::take(&mut failing) {
                    info!(lease = %settings.name, "the lease can be read and written again");
                }
                if let Step::Follow { holder } = step
                    && followed.as_ref() != Some(&holder)
                {
                    info!(identity = %settings.identity, leader = %holder, "following the leader");
                    followed = Some(holder);
                } else if leads {
                    followed = None;
                }
            }
            Err(e) => {
                failing = true;
                if let Some(suppressed) = gate.allow(&e.kind(), now) {
                    warn!(
                        lease = %settings.name,
                        error = %e,
                        leading = leads,
                        suppressed,
                        "leader election attempt failed"
                    );
                }
            }
        }
        next = now + settings.retry_period;
    };
    set_leading(&leading, false, &settings, || "stopping".into());
    if release {
        let done = timeout(settings.renew_deadline, give_up(&api, &settings)).await;
        match done.unwrap_or(Err(LeaseError::Timeout(settings.renew_deadline))) {
            Ok(true) => {
                info!(identity = %settings.identity, lease = %settings.name, "lease released")
            }
            Ok(false) => {
                debug!(lease = %settings.name, "not holding the lease: nothing to release")
            }
            Err(e) => {
                warn!(
                    lease = %settings.name,
                    error = %e,
                    "releasing the lease failed: it expires in its own time"
                )
            }
        }
    }
}

/// The lease given up: holder cleared (followers take a lease nobody holds at once), transitions
/// and duration kept, renewTime telling when.
fn released(mut lease: Lease, at: Timestamp) -> Lease {
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.acquire_time = None;
    spec.renew_time = Some(MicroTime(at));
    lease
}

/// Clears the lease's holder if it is us. Reads it afresh, for the last write may have been
/// cut short: `Ok(false)` when it is not ours (anymore).
async fn give_up(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, LeaseError> {
    // A conflict means the lease changed under us (a renewal of ours cut short, landing late,
    // or a takeover): read it again, a few times.
    for _ in 0..3 {
        let Some(lease) = api.get_opt(&settings.name).await? else {
            return Ok(false);
        };
        if holder(&lease) != Some(settings.identity.as_str()) {
            return Ok(false);
        }
        match api
            .replace(
                &settings.name,
                &PostParams::default(),
                &released(lease, Timestamp::now()),
            )
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "node-a";
    const OTHER: &str = "node-b";

    fn settings() -> LeaseSettings {
        LeaseSettings::new("lb-system", "lb-controller", ME)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A lease as an API server would return it.
    fn lease(
        holder: Option<&str>,
        version: &str,
        duration: Option<i32>,
        renewed: Timestamp,
    ) -> Lease {
        Lease {
            metadata: ObjectMeta {
                namespace: Some("lb-system".into()),
                name: Some("lb-controller".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: duration,
                renew_time: Some(MicroTime(renewed)),
                acquire_time: Some(MicroTime(renewed)),
                lease_transitions: Some(3),
                ..LeaseSpec::default()
            }),
        }
    }

    fn held_by(holder: &str, version: &str) -> Lease {
        lease(Some(holder), version, Some(15), Timestamp::now())
    }

    fn observed(lease: Lease, since: Instant) -> Observed {
        Observed { lease, since }
    }

    fn written(lease: Lease) -> Outcome {
        Outcome::Written(Box::new(lease))
    }

    fn follow(holder: &str) -> Step {
        Step::Follow {
            holder: holder.into(),
        }
    }

    #[test]
    fn the_defaults_are_valid() {
        let s = settings();
        assert_eq!(
            (s.duration, s.renew_deadline, s.retry_period),
            (secs(15), secs(10), secs(2))
        );
        s.validate().unwrap();
    }

    #[test]
    fn settings_the_safety_rests_on_are_checked() {
        let with = |f: fn(&mut LeaseSettings)| {
            let mut s = settings();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert!(matches!(
            with(|s| s.renew_deadline = secs(15)),
            LeaseError::RenewDeadline { .. }
        ));
        assert!(matches!(
            with(|s| s.renew_deadline = secs(20)),
            LeaseError::RenewDeadline { .. }
        ));
        assert!(matches!(
            with(|s| s.retry_period = secs(10)),
            LeaseError::RetryPeriod { .. }
        ));
        assert!(matches!(
            with(|s| s.retry_period = Duration::ZERO),
            LeaseError::RetryPeriod { .. }
        ));
        assert!(matches!(
            with(|s| s.duration = ms(15_500)),
            LeaseError::Duration { .. }
        ));
        assert!(matches!(
            with(|s| s.duration = Duration::ZERO),
            LeaseError::Duration { .. }
        ));
        assert!(matches!(
            with(|s| s.duration = secs(1 << 40)),
            LeaseError::Duration { .. }
        ));
        assert!(matches!(
            with(|s| s.identity.clear()),
            LeaseError::Empty { field: "identity" }
        ));
        assert!(matches!(
            with(|s| s.name.clear()),
            LeaseError::Empty { field: "name" }
        ));
        assert!(matches!(
            with(|s| s.namespace.clear()),
            LeaseError::Empty { field: "namespace" }
        ));
        // Short timings are fine as long as they are ordered (tests use them).
        let mut short = settings();
        (short.duration, short.renew_deadline, short.retry_period) = (secs(2), ms(1500), ms(200));
        short.validate().unwrap();
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, Instant::now(), ME, &settings()), Step::Create);
    }

    #[test]
    fn our_lease_is_renewed() {
        let now = Instant::now();
        let ours = observed(held_by(ME, "7"), now);
        assert_eq!(decide(Some(&ours), now, ME, &settings()), Step::Renew);
        // However long ago we read it: it is ours until someone else writes it.
        assert_eq!(
            decide(Some(&ours), now + secs(3600), ME, &settings()),
            Step::Renew
        );
    }

    #[test]
    fn a_fresh_lease_of_another_is_followed_until_it_expires_by_our_clock() {
        let t0 = Instant::now();
        let theirs = observed(held_by(OTHER, "7"), t0);
        let s = settings();
        assert_eq!(decide(Some(&theirs), t0, ME, &s), follow(OTHER));
        assert_eq!(
            decide(Some(&theirs), t0 + secs(15) - ms(1), ME, &s),
            follow(OTHER)
        );
        assert_eq!(decide(Some(&theirs), t0 + secs(15), ME, &s), Step::TakeOver);
    }

    #[test]
    fn renew_time_is_never_compared_with_our_clock() {
        let s = settings();
        let t0 = Instant::now();
        // Their clock runs an hour behind ours: the renewTime looks long expired, but we have
        // only just read this version.
        let an_hour_ago = Timestamp::now() - secs(3600);
        let behind = observed(lease(Some(OTHER), "7", Some(15), an_hour_ago), t0);
        assert_eq!(decide(Some(&behind), t0 + secs(1), ME, &s), follow(OTHER));
        // Their clock runs an hour ahead: the renewTime looks fresh for an hour, but the
        // version has not changed for 15 s of ours.
        let in_an_hour = Timestamp::now() + secs(3600);
        let ahead = observed(lease(Some(OTHER), "7", Some(15), in_an_hour), t0);
        assert_eq!(decide(Some(&ahead), t0 + secs(15), ME, &s), Step::TakeOver);
    }

    #[test]
    fn the_lease_duration_is_the_holders() {
        let t0 = Instant::now();
        let s = settings();
        let long = observed(lease(Some(OTHER), "7", Some(60), Timestamp::now()), t0);
        assert_eq!(decide(Some(&long), t0 + secs(59), ME, &s), follow(OTHER));
        assert_eq!(decide(Some(&long), t0 + secs(60), ME, &s), Step::TakeOver);
        // Without one, ours.
        let none = observed(lease(Some(OTHER), "7", None, Timestamp::now()), t0);
        assert_eq!(decide(Some(&none), t0 + secs(14), ME, &s), follow(OTHER));
        assert_eq!(decide(Some(&none), t0 + secs(15), ME, &s), Step::TakeOver);
    }

    #[test]
    fn a_released_lease_is_taken_over_at_once() {
        let now = Instant::now();
        let s = settings();
        let nobody = observed(lease(None, "8", Some(15), Timestamp::now()), now);
        assert_eq!(decide(Some(&nobody), now, ME, &s), Step::TakeOver);
        let empty = observed(lease(Some(""), "8", Some(15), Timestamp::now()), now);
        assert_eq!(decide(Some(&empty), now, ME, &s), Step::TakeOver);
        // As written by released(): holder cleared.
        let given_up = observed(released(held_by(OTHER, "8"), Timestamp::now()), now);
        assert_eq!(decide(Some(&given_up), now, ME, &s), Step::TakeOver);
    }

    #[test]
    fn a_new_version_restarts_the_wait() {
        let s = settings();
        let mut c = Campaign::new(s.clone());
        let t0 = Instant::now();
        c.observe(Some(held_by(OTHER, "7")), t0);
        c.observe(Some(held_by(OTHER, "7")), t0 + secs(10));
        assert_eq!(
            c.observed.as_ref().unwrap().since,
            t0,
            "same version: first seen at t0"
        );
        // Renewed at 12 s: the 15 s count again from when we read it.
        c.observe(Some(held_by(OTHER, "9")), t0 + secs(12));
        assert_eq!(c.decide(t0 + secs(15)), follow(OTHER));
        assert_eq!(c.decide(t0 + secs(27) - ms(1)), follow(OTHER));
        assert_eq!(c.decide(t0 + secs(27)), Step::TakeOver);
        // A failed read in between changes nothing; a lease deleted and recreated is new.
        c.observe(None, t0 + secs(28));
        assert_eq!(c.decide(t0 + secs(28)), Step::Create);
        c.observe(Some(held_by(OTHER, "9")), t0 + secs(29));
        assert_eq!(c.observed.as_ref().unwrap().since, t0 + secs(29));
    }

    #[test]
    fn without_a_resource_version_the_contents_tell_versions_apart() {
        let renewed = Timestamp::now();
        let mut a = lease(Some(OTHER), "x", Some(15), renewed);
        a.metadata.resource_version = None;
        let mut b = a.clone();
        assert!(same_version(&a, &b));
        b.spec.as_mut().unwrap().renew_time = Some(MicroTime(renewed + secs(2)));
        assert!(!same_version(&a, &b));
    }

    #[test]
    fn a_successful_write_leads_until_the_renew_deadline_from_its_send() {
        let s = settings();
        let mut c = Campaign::new(s.clone());
        let t0 = Instant::now();
        c.observe(None, t0);
        assert_eq!(c.decide(t0), Step::Create);
        let sent = t0 + ms(5);
        c.record(
            &Step::Create,
            written(held_by(ME, "1")),
            sent,
            sent + ms(300),
        );
        assert!(c.leading(sent + ms(300)));
        assert!(c.leading(sent + secs(10) - ms(1)));
        assert!(
            !c.leading(sent + secs(10)),
            "the renew deadline passed without a renewal"
        );
        assert_eq!(
            c.lost_reason(),
            "the renew deadline passed without a renewal"
        );
    }

    #[test]
    fn failed_renewals_keep_leading_until_the_deadline_then_a_renewal_leads_again() {
        let mut c = Campaign::new(settings());
        let t0 = Instant::now();
        c.observe(Some(held_by(ME, "1")), t0);
        c.record(&Step::Renew, written(held_by(ME, "2")), t0, t0);
        for s in [2, 4, 6, 8] {
            let at = t0 + secs(s);
            c.observe(Some(held_by(ME, "2")), at);
            assert_eq!(c.decide(at), Step::Renew);
            c.record(&Step::Renew, Outcome::Failed, at, at + ms(100));
            assert!(c.leading(at + ms(100)));
        }
        assert!(!c.leading(t0 + secs(10)));
        // The lease is still ours (nobody may take it for 15 s): renewing it leads again.
        let at = t0 + secs(11);
        c.observe(Some(held_by(ME, "2")), at);
        assert_eq!(c.decide(at), Step::Renew);
        c.record(&Step::Renew, written(held_by(ME, "3")), at, at);
        assert!(c.leading(at + secs(9)));
    }

    #[test]
    fn a_conflicting_renewal_stops_leading_at_once() {
        let mut c = Campaign::new(settings());
        let t0 = Instant::now();
        c.observe(Some(held_by(ME, "1")), t0);
        c.record(&Step::Renew, written(held_by(ME, "2")), t0, t0);
        c.record(&Step::Renew, Outcome::Conflict, t0 + secs(2), t0 + secs(2));
        assert!(!c.leading(t0 + secs(2)));
        assert!(c.lost_reason().contains("409"));
    }

    #[test]
    fn losing_a_race_to_acquire_follows() {
        let t0 = Instant::now();
        // Two candidates create the lease at once: ours gets AlreadyExists.
        let mut c = Campaign::new(settings());
        c.observe(None, t0);
        c.record(&Step::Create, Outcome::Conflict, t0, t0);
        assert!(!c.leading(t0));
        c.observe(Some(held_by(OTHER, "1")), t0 + secs(2));
        assert_eq!(c.decide(t0 + secs(2)), follow(OTHER));
        // Two candidates take an expired lease over at once: ours gets Conflict.
        c.observe(Some(held_by(OTHER, "1")), t0 + secs(17));
        assert_eq!(c.decide(t0 + secs(17)), Step::TakeOver);
        c.record(
            &Step::TakeOver,
            Outcome::Conflict,
            t0 + secs(17),
            t0 + secs(17),
        );
        assert!(!c.leading(t0 + secs(17)));
        c.observe(Some(held_by("node-c", "2")), t0 + secs(19));
        assert_eq!(c.decide(t0 + secs(19)), follow("node-c"));
    }

    #[test]
    fn reading_the_lease_held_by_another_stops_leading_at_once() {
        let mut c = Campaign::new(settings());
        let t0 = Instant::now();
        c.record(&Step::Create, written(held_by(ME, "1")), t0, t0);
        assert!(c.leading(t0 + secs(1)));
        c.observe(Some(held_by(OTHER, "5")), t0 + secs(2));
        assert!(!c.leading(t0 + secs(2)));
        assert_eq!(c.lost_reason(), format!("the lease is held by {OTHER}"));
        // And a released one too.
        c.record(
            &Step::TakeOver,
            written(held_by(ME, "6")),
            t0 + secs(3),
            t0 + secs(3),
        );
        c.observe(
            Some(lease(None, "7", Some(15), Timestamp::now())),
            t0 + secs(4),
        );
        assert!(!c.leading(t0 + secs(4)));
    }

    #[test]
    fn writes_carry_what_client_go_writes() {
        let s = settings();
        let at = Timestamp::now();
        let mut c = Campaign::new(s.clone());
        let created = c.write(&Step::Create, at).unwrap();
        assert_eq!(created.metadata.name.as_deref(), Some("lb-controller"));
        assert_eq!(created.metadata.namespace.as_deref(), Some("lb-system"));
        assert_eq!(created.metadata.resource_version, None);
        let spec = created.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(ME));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.acquire_time, Some(MicroTime(at)));
        assert_eq!(spec.renew_time, Some(MicroTime(at)));

        // Taking over: transitions + 1, acquired now, the resourceVersion read kept.
        let read_at = Timestamp::now() - secs(60);
        let mut theirs = lease(Some(OTHER), "41", Some(30), read_at);
        theirs.metadata.labels = Some([("app".to_owned(), "lb".to_owned())].into());
        c.observe(Some(theirs), Instant::now());
        let taken = c.write(&Step::TakeOver, at).unwrap();
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("41"));
        assert!(
            taken.metadata.labels.is_some(),
            "the rest of the object is kept"
        );
        let spec = taken.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(ME));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.acquire_time, Some(MicroTime(at)));
        assert_eq!(spec.renew_time, Some(MicroTime(at)));

        // Renewing: only renewTime (and our duration) change.
        c.observe(
            Some(lease(Some(ME), "42", Some(15), read_at)),
            Instant::now(),
        );
        let renewed = c.write(&Step::Renew, at).unwrap();
        assert_eq!(renewed.metadata.resource_version.as_deref(), Some("42"));
        let spec = renewed.spec.unwrap();
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.acquire_time, Some(MicroTime(read_at)));
        assert_eq!(spec.renew_time, Some(MicroTime(at)));

        assert_eq!(c.write(&follow(OTHER), at), None);

        // Released: nobody holds it; transitions and duration kept.
        let given_up = released(lease(Some(ME), "43", Some(15), read_at), at);
        assert_eq!(given_up.metadata.resource_version.as_deref(), Some("43"));
        let spec = given_up.spec.unwrap();
        assert_eq!(spec.holder_identity, None);
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.renew_time, Some(MicroTime(at)));
    }

    /// The property the timings exist for: whatever the delays, a follower never decides to
    /// take over while the leader still believes it leads. A leader renews every 2 s until its
    /// writes stop getting through (the API unreachable for it only); the follower reads the
    /// lease every `poll` with its reads landing `lag` after it was written.
    #[test]
    fn a_follower_never_takes_over_while_the_leader_leads() {
        let s = settings();
        let mut me_as_other = s.clone();
        me_as_other.identity = OTHER.into();
        for cut_at in [0u64, 1, 3, 7, 10] {
            for poll in [ms(100), ms(700), secs(2)] {
                for lag in [ms(0), ms(30), ms(900)] {
                    let t0 = Instant::now();
                    let mut leader = Campaign::new(s.clone());
                    let mut follower = Campaign::new(me_as_other.clone());
                    let mut version = 0u32;
                    let mut written_at: Vec<(Instant, u32)> = Vec::new();
                    let mut next_renewal = t0;
                    let mut next_poll = t0;
                    let mut t = t0;
                    while t < t0 + secs(60) {
                        if t >= next_renewal {
                            // Sent at t, lands 50 ms later, while it gets through.
                            if t < t0 + secs(cut_at * 2) || version == 0 {
                                version += 1;
                                written_at.push((t + ms(50), version));
                                let step = if version == 1 {
                                    Step::Create
                                } else {
                                    Step::Renew
                                };
                                leader.record(
                                    &step,
                                    written(held_by(ME, &version.to_string())),
                                    t,
                                    t + ms(50),
                                );
                            } else {
                                leader.record(&Step::Renew, Outcome::Failed, t, t + ms(50));
                            }
                            next_renewal = t + secs(2);
                        }
                        if t >= next_poll {
                            // The latest version that had landed `lag` before.
                            let visible = written_at.iter().rev().find(|(at, _)| *at + lag <= t);
                            if let Some((_, v)) = visible {
                                follower.observe(Some(held_by(ME, &v.to_string())), t);
                                if follower.decide(t) == Step::TakeOver {
                                    assert!(
                                        !leader.leading(t),
                                        "cut {cut_at} poll {poll:?} lag {lag:?}: taken over at {:?} while leading",
                                        t - t0
                                    );
                                }
                            }
                            next_poll = t + poll;
                        }
                        t += ms(10);
                    }
                    assert!(!leader.leading(t), "the leader stopped");
                    assert_eq!(
                        follower.decide(t),
                        Step::TakeOver,
                        "the follower takes over eventually"
                    );
                }
            }
        }
    }
}
