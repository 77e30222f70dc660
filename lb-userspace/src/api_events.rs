//! Events written to the Kubernetes API (`events.k8s.io/v1`), as `kubectl describe service`
//! shows them: what the controller did with a Service and what it refused.
//!
//! [`EventSink::publish`] never waits for the API: the controller's loop must not stall on an
//! unreachable or slow API server for the sake of an event. It queues the event on a bounded
//! queue that one background task drains in order, through kube-runtime's [`Recorder`]. Events
//! are a diagnostic, not state: one that cannot be written is dropped and counted, never
//! retried.
//!
//! Spam is filtered as client-go's `EventCorrelator` does ([`SpamFilter`]): each regarded object
//! has a token bucket ([`BURST`] events, then one per [`REFILL_EVERY`]), and an event identical to
//! one published less than [`REPEAT_WINDOW`] ago is dropped (it adds nothing). Identical events
//! further apart are aggregated by the Recorder into one Event's `series` (count and last time)
//! as long as they keep coming less than [`SERIES_TTL`] apart.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, warn};

/// The `reportingController` of our events.
pub const REPORTING_CONTROLLER: &str = "lb.xdp.rs/controller";
/// Events waiting for the background task; beyond that, new ones are dropped (the API is
/// unreachable or far too slow, and older events are worth more than the latest flood).
pub const QUEUE_CAPACITY: usize = 1024;
/// Events one object may have in a burst (client-go's spam filter: 25).
pub const BURST: u32 = 25;
/// One more event per object is allowed this often once the burst is spent (client-go: 1/300 s).
pub const REFILL_EVERY: Duration = Duration::from_secs(5 * 60);
/// An event identical to one published less than this ago is dropped: the Recorder would only
/// bump its series count, an API write for nothing.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(60);
/// How long kube-runtime's Recorder keeps an event to aggregate repeats into its series (its
/// private `CACHE_TTL`, 6 minutes after the last occurrence).
pub const SERIES_TTL: Duration = Duration::from_secs(6 * 60);
/// Bound on one API write: a hung request must not hold up the queue for long.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// The API refuses longer notes (events.k8s.io/v1: at most 1 kB).
const MAX_NOTE_BYTES: usize = 1024;
/// The API refuses longer reasons and actions (128 characters).
const MAX_REASON_BYTES: usize = 128;
/// An API error of one kind is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// One event about an object, as `kubectl describe` shows it: `Type`, `Reason`, `Message`
/// (the note); the action is kept in the Event but not shown.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApiEvent {
    /// `Normal` or `Warning`.
    pub type_: EventType,
    /// Why, in PascalCase: `IPAllocated`, `AllocationFailed`, `Rejected`.
    pub reason: String,
    /// What the controller did or tried, in PascalCase: `Allocate`, `Apply`.
    pub action: String,
    /// What happened, for a human (at most 1 kB; longer notes are cut).
    pub note: String,
}

impl ApiEvent {
    /// A `Normal` event.
    pub fn normal(
        reason: impl Into<String>,
        action: impl Into<String>,
        note: impl Into<String>,
    ) -> Self {
        Self {
            type_: EventType::Normal,
            reason: reason.into(),
            action: action.into(),
            note: note.into(),
        }
    }

    /// A `Warning` event.
    pub fn warning(
        reason: impl Into<String>,
        action: impl Into<String>,
        note: impl Into<String>,
    ) -> Self {
        Self {
            type_: EventType::Warning,
            ..Self::normal(reason, action, note)
        }
    }

    /// The event with its fields cut to what the API accepts, so that an over-long note is
    /// published cut rather than refused whole.
    fn within_limits(mut self) -> Self {
        truncate(&mut self.reason, MAX_REASON_BYTES);
        truncate(&mut self.action, MAX_REASON_BYTES);
        truncate(&mut self.note, MAX_NOTE_BYTES);
        self
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, ending with `…` when cut.
fn truncate(s: &mut String, max: usize) {
    const ELLIPSIS: &str = "…";
    if s.len() <= max {
        return;
    }
    let mut end = max - ELLIPSIS.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(ELLIPSIS);
}

/// The reference events about `service` point to (`regarding`): `kubectl describe service`
/// lists the events whose reference names the Service (its uid tells a recreated Service of the
/// same name apart).
pub fn service_reference(service: &Service) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: service.metadata.namespace.clone(),
        name: service.metadata.name.clone(),
        uid: service.metadata.uid.clone(),
        resource_version: service.metadata.resource_version.clone(),
        field_path: None,
    }
}

/// Publishes [`ApiEvent`]s to the API in the background. Cheap to clone; the background task
/// ends once every clone is dropped and the queue is drained.
#[derive(Clone)]
pub struct EventSink {
    queue: mpsc::Sender<Queued>,
    filter: Arc<Mutex<SpamFilter>>,
    counts: Arc<Counts>,
}

/// The sink's counters, shared with its task.
#[derive(Default)]
struct Counts {
    published: AtomicU64,
    dropped: AtomicU64,
}

/// An event waiting for the background task.
struct Queued {
    regarding: ObjectReference,
    event: ApiEvent,
}

impl EventSink {
    /// Starts the background task (within a tokio runtime) that writes the events as
    /// `reporter`: controller [`REPORTING_CONTROLLER`], instance the node's name.
    pub fn spawn(client: kube::Client, reporter: Reporter) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        let counts = Arc::new(Counts::default());
        tokio::spawn(write_events(client, reporter, rx, counts.clone()));
        Self {
            queue,
            filter: Arc::new(Mutex::new(SpamFilter::default())),
            counts,
        }
    }

    /// Queues `event` about `regarding` (a Service's [`service_reference`]). It is dropped, and
    /// counted in [`dropped`](Self::dropped), when the queue is full, when the object has spent
    /// its burst of events, or when the same event was published less than [`REPEAT_WINDOW`]
    /// ago. Never waits for the API.
    pub fn publish(&self, regarding: ObjectReference, event: ApiEvent) {
        let event = event.within_limits();
        // A place in the queue first: a full queue must not spend the object's tokens.
        let permit = match self.queue.try_reserve() {
            Ok(permit) => permit,
            Err(e) => {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
                debug!(
                    reason = %event.reason,
                    name = ?regarding.name,
                    error = %e,
                    "API event dropped: queue full"
                );
                return;
            }
        };
        let verdict = self
            .filter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .admit(&regarding, &event, Instant::now());
        if verdict != Verdict::Admit {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(reason = %event.reason, name = ?regarding.name, ?verdict, "API event dropped");
            return;
        }
        permit.send(Queued { regarding, event });
    }

    /// Events not written to the API: over the rate limit, repeated, queue full, or refused by
    /// the API (or unreachable).
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// Events written to the API (created, or a repeat counted in an Event's series).
    pub fn published(&self) -> u64 {
        self.counts.published.load(Ordering::Relaxed)
    }
}

/// The background task: writes the queued events in order until every sink is dropped.
async fn write_events(
    client: kube::Client,
    reporter: Reporter,
    mut rx: mpsc::Receiver<Queued>,
    counts: Arc<Counts>,
) {
    // One Recorder per distinct event. kube-runtime's Recorder aggregates repeats by object,
    // type, reason and action but not note: through one Recorder, "AllocationFailed: pool
    // exhausted" then "AllocationFailed: address in use" would show as the first note twice.
    // A Recorder of its own per note makes it aggregate identical events only.
    let mut series: HashMap<EventKey, Series> = HashMap::new();
    let mut gate = WarnGate::new(WARN_EVERY);
    while let Some(Queued { regarding, event }) = rx.recv().await {
        let now = Instant::now();
        // Past its TTL the Recorder would create a new Event anyway.
        series.retain(|_, s| now.duration_since(s.last) < SERIES_TTL);
        let key = EventKey::new(&regarding, &event);
        let entry = series.entry(key.clone()).or_insert_with(|| Series {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            regarding,
            last: now,
        });
        entry.last = now;
        let published = Event {
            type_: event.type_,
            reason: event.reason,
            note: Some(event.note),
            action: event.action,
            secondary: None,
        };
        // The Recorder matches a repeat on the whole reference, resourceVersion included,
        // which changes with every write to the Service: the first reference stands for all.
        let result = tokio::time::timeout(
            API_TIMEOUT,
            entry.recorder.publish(&published, &entry.regarding),
        )
        .await;
        let error = match result {
            Ok(Ok(())) => {
                counts.published.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(Err(e)) => (error_kind(&e), e.to_string()),
            Err(_) => (
                "timeout".to_owned(),
                format!("no answer within {API_TIMEOUT:?}"),
            ),
        };
        // A failed write may leave the Recorder believing in an Event that does not exist (a
        // series patch of a deleted Event fails every time): the next one starts afresh.
        let Series { regarding, .. } = series.remove(&key).expect("entry inserted above");
        counts.dropped.fetch_add(1, Ordering::Relaxed);
        let (kind, message) = error;
        if let Some(suppressed) = gate.allow(&kind, Instant::now()) {
            warn!(
                error = %message,
                kind = %kind,
                namespace = ?regarding.namespace,
                name = ?regarding.name,
                reason = %published.reason,
                suppressed,
                "writing an event to the API failed: event dropped"
            );
        }
    }
}

/// The events of one [`EventKey`] aggregated into one Event's series.
struct Series {
    recorder: Recorder,
    regarding: ObjectReference,
    last: Instant,
}

/// An object, as events regard it: its resourceVersion changes with every write and is no
/// part of its identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ObjectKey {
    api_version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

impl From<&ObjectReference> for ObjectKey {
    fn from(r: &ObjectReference) -> Self {
        Self {
            api_version: r.api_version.clone(),
            kind: r.kind.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        }
    }
}

/// What makes two events identical: the same object and the same event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EventKey {
    object: ObjectKey,
    event: ApiEvent,
}

impl EventKey {
    fn new(regarding: &ObjectReference, event: &ApiEvent) -> Self {
        Self {
            object: regarding.into(),
            event: event.clone(),
        }
    }
}

/// What [`SpamFilter::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Publish it.
    Admit,
    /// Its object has spent its burst and no token has come back yet.
    RateLimited,
    /// The same event about the same object was admitted less than the repeat window ago.
    Repeat,
}

/// The spam filter of client-go's `EventCorrelator`, with the time passed in: a token bucket
/// per regarded object, and identical events dropped within a window. Pure, for tests.
#[derive(Debug)]
pub struct SpamFilter {
    burst: u32,
    refill_every: Duration,
    repeat_window: Duration,
    buckets: HashMap<ObjectKey, Bucket>,
    /// When each event was last admitted.
    admitted: HashMap<EventKey, Instant>,
    /// When the maps were last pruned: they are, at most once per repeat window.
    pruned: Option<Instant>,
}

impl Default for SpamFilter {
    /// [`BURST`], [`REFILL_EVERY`], [`REPEAT_WINDOW`].
    fn default() -> Self {
        Self::new(BURST, REFILL_EVERY, REPEAT_WINDOW)
    }
}

impl SpamFilter {
    /// A filter letting each object have `burst` events at once, then one per `refill_every`,
    /// and dropping an event identical to one admitted less than `repeat_window` ago.
    pub fn new(burst: u32, refill_every: Duration, repeat_window: Duration) -> Self {
        Self {
            burst,
            refill_every: refill_every.max(Duration::from_nanos(1)),
            repeat_window,
            buckets: HashMap::new(),
            admitted: HashMap::new(),
            pruned: None,
        }
    }

    /// Whether `event` about `regarding` may be published at `now`. A repeat spends no token:
    /// it is not published.
    pub fn admit(
        &mut self,
        regarding: &ObjectReference,
        event: &ApiEvent,
        now: Instant,
    ) -> Verdict {
        self.prune(now);
        let key = EventKey::new(regarding, event);
        if let Some(&last) = self.admitted.get(&key)
            && now.saturating_duration_since(last) < self.repeat_window
        {
            return Verdict::Repeat;
        }
        let (burst, every) = (self.burst, self.refill_every);
        let bucket = self.buckets.entry(key.object.clone()).or_insert(Bucket {
            tokens: burst,
            since: now,
        });
        if !bucket.take(now, burst, every) {
            return Verdict::RateLimited;
        }
        self.admitted.insert(key, now);
        Verdict::Admit
    }

    /// Forgets what no longer matters: full buckets (a new one is the same) and admissions past
    /// the repeat window. Keeps the maps as small as the recent activity.
    fn prune(&mut self, now: Instant) {
        if self
            .pruned
            .is_some_and(|at| now.saturating_duration_since(at) < self.repeat_window)
        {
            return;
        }
        self.pruned = Some(now);
        let (burst, every, window) = (self.burst, self.refill_every, self.repeat_window);
        self.buckets.retain(|_, b| {
            b.refill(now, burst, every);
            b.tokens < burst
        });
        self.admitted
            .retain(|_, &mut at| now.saturating_duration_since(at) < window);
    }
}

/// A token bucket counted in whole tokens, so that refills are exact (no float drift).
#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// Since when the next token accrues.
    since: Instant,
}

impl Bucket {
    /// Adds the tokens accrued since `since`, up to `burst`.
    fn refill(&mut self, now: Instant, burst: u32, every: Duration) {
        let accrued = now.saturating_duration_since(self.since).as_nanos() / every.as_nanos();
        if accrued > 0 {
            self.tokens = burst.min(
                self.tokens
                    .saturating_add(u32::try_from(accrued).unwrap_or(u32::MAX)),
            );
            // The part of an interval already elapsed counts towards the next token.
            let step = u32::try_from(accrued).map_or(None, |n| every.checked_mul(n));
            self.since = step.and_then(|d| self.since.checked_add(d)).unwrap_or(now);
        }
        if self.tokens >= burst {
            // A full bucket accrues nothing: the next token counts from when one is taken.
            self.since = now;
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self, now: Instant, burst: u32, every: Duration) -> bool {
        self.refill(now, burst, every);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Keeps warnings about failing API calls down to one per kind of error per period, with the
/// number left unsaid: an unreachable API server fails every call.
#[derive(Debug)]
pub(crate) struct WarnGate {
    every: Duration,
    kinds: HashMap<String, (Instant, u64)>,
}

impl WarnGate {
    /// A gate letting one warning of each kind through per `every`.
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            kinds: HashMap::new(),
        }
    }

    /// Whether to log an error of `kind` at `now`: `Some(n)` with the number of errors of that
    /// kind not logged since the last logged one, or `None` to stay quiet.
    pub(crate) fn allow(&mut self, kind: &str, now: Instant) -> Option<u64> {
        match self.kinds.get_mut(kind) {
            Some((last, quiet)) if now.saturating_duration_since(*last) < self.every => {
                *quiet += 1;
                None
            }
            Some((last, quiet)) => {
                *last = now;
                Some(std::mem::take(quiet))
            }
            None => {
                self.kinds.insert(kind.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

/// A short name of the kind of a client error, to tell errors apart without their details
/// (`409 Conflict`, `transport`): the details (addresses, names) differ from one call to the
/// next for the same cause.
pub(crate) fn error_kind(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} {}", status.code, status.reason),
        kube::Error::HyperError(_) => "http".into(),
        kube::Error::Service(_) => "transport".into(),
        kube::Error::SerdeError(_) => "decode".into(),
        kube::Error::Auth(_) => "auth".into(),
        _ => "client".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, uid: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some("default".into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            resource_version: Some("1".into()),
            field_path: None,
        }
    }

    fn event(note: &str) -> ApiEvent {
        ApiEvent::normal("IPAllocated", "Allocate", note)
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_burst_then_one_event_per_refill() {
        let mut filter = SpamFilter::default();
        let t0 = Instant::now();
        let web = service("web", "u1");
        for i in 0..BURST {
            assert_eq!(
                filter.admit(&web, &event(&format!("n{i}")), t0),
                Verdict::Admit,
                "event {i}"
            );
        }
        assert_eq!(filter.admit(&web, &event("over"), t0), Verdict::RateLimited);
        assert_eq!(
            filter.admit(
                &web,
                &event("over"),
                t0 + REFILL_EVERY - Duration::from_millis(1)
            ),
            Verdict::RateLimited
        );
        assert_eq!(
            filter.admit(&web, &event("over"), t0 + REFILL_EVERY),
            Verdict::Admit
        );
        // That token is spent: the next one comes a full period later.
        assert_eq!(
            filter.admit(&web, &event("again"), t0 + REFILL_EVERY + MINUTE),
            Verdict::RateLimited
        );
        assert_eq!(
            filter.admit(&web, &event("again"), t0 + 2 * REFILL_EVERY),
            Verdict::Admit
        );
    }

    #[test]
    fn tokens_accrue_exactly_across_checks() {
        let mut filter = SpamFilter::new(1, Duration::from_secs(3), Duration::ZERO);
        let t0 = Instant::now();
        let web = service("web", "u1");
        assert_eq!(filter.admit(&web, &event("a"), t0), Verdict::Admit);
        // Checks in between keep the partial interval: 1 s + 1 s + 1 s make one token.
        for s in 1..3 {
            assert_eq!(
                filter.admit(&web, &event("a"), t0 + Duration::from_secs(s)),
                Verdict::RateLimited
            );
        }
        assert_eq!(
            filter.admit(&web, &event("a"), t0 + Duration::from_secs(3)),
            Verdict::Admit
        );
    }

    #[test]
    fn the_bucket_refills_up_to_the_burst_only() {
        let mut filter = SpamFilter::new(3, MINUTE, Duration::ZERO);
        let t0 = Instant::now();
        let web = service("web", "u1");
        for _ in 0..3 {
            assert_eq!(filter.admit(&web, &event("a"), t0), Verdict::Admit);
        }
        let later = t0 + 100 * MINUTE;
        for _ in 0..3 {
            assert_eq!(filter.admit(&web, &event("a"), later), Verdict::Admit);
        }
        assert_eq!(filter.admit(&web, &event("a"), later), Verdict::RateLimited);
    }

    #[test]
    fn identical_events_within_the_window_are_repeats() {
        let mut filter = SpamFilter::default();
        let t0 = Instant::now();
        let web = service("web", "u1");
        assert_eq!(filter.admit(&web, &event("10.0.0.1"), t0), Verdict::Admit);
        assert_eq!(
            filter.admit(&web, &event("10.0.0.1"), t0 + Duration::from_secs(59)),
            Verdict::Repeat
        );
        // Another note, reason, type or action is another event.
        assert_eq!(filter.admit(&web, &event("10.0.0.2"), t0), Verdict::Admit);
        assert_eq!(
            filter.admit(
                &web,
                &ApiEvent::normal("Rejected", "Allocate", "10.0.0.1"),
                t0
            ),
            Verdict::Admit
        );
        assert_eq!(
            filter.admit(
                &web,
                &ApiEvent::warning("IPAllocated", "Allocate", "10.0.0.1"),
                t0
            ),
            Verdict::Admit
        );
        // The window counts from the admitted one, not from the repeats: a steady repeat is
        // published once per window, its series kept current.
        assert_eq!(
            filter.admit(&web, &event("10.0.0.1"), t0 + MINUTE),
            Verdict::Admit
        );
        // A new resourceVersion of the Service is the same object.
        let mut newer = web.clone();
        newer.resource_version = Some("2".into());
        assert_eq!(
            filter.admit(&newer, &event("10.0.0.1"), t0 + MINUTE),
            Verdict::Repeat
        );
    }

    #[test]
    fn repeats_spend_no_tokens() {
        let mut filter = SpamFilter::new(2, REFILL_EVERY, MINUTE);
        let t0 = Instant::now();
        let web = service("web", "u1");
        assert_eq!(filter.admit(&web, &event("a"), t0), Verdict::Admit);
        for _ in 0..10 {
            assert_eq!(filter.admit(&web, &event("a"), t0), Verdict::Repeat);
        }
        assert_eq!(filter.admit(&web, &event("b"), t0), Verdict::Admit);
        assert_eq!(filter.admit(&web, &event("c"), t0), Verdict::RateLimited);
    }

    #[test]
    fn objects_have_buckets_of_their_own() {
        let mut filter = SpamFilter::new(2, REFILL_EVERY, Duration::ZERO);
        let t0 = Instant::now();
        let web = service("web", "u1");
        let db = service("db", "u2");
        let web_recreated = service("web", "u3");
        for _ in 0..2 {
            assert_eq!(filter.admit(&web, &event("a"), t0), Verdict::Admit);
        }
        assert_eq!(filter.admit(&web, &event("a"), t0), Verdict::RateLimited);
        assert_eq!(filter.admit(&db, &event("a"), t0), Verdict::Admit);
        // Same name, new uid: another object.
        assert_eq!(
            filter.admit(&web_recreated, &event("a"), t0),
            Verdict::Admit
        );
        let mut other_namespace = web.clone();
        other_namespace.namespace = Some("prod".into());
        assert_eq!(
            filter.admit(&other_namespace, &event("a"), t0),
            Verdict::Admit
        );
    }

    #[test]
    fn pruning_forgets_nothing_that_matters() {
        let mut filter = SpamFilter::new(2, MINUTE, MINUTE);
        let t0 = Instant::now();
        let web = service("web", "u1");
        let db = service("db", "u2");
        assert_eq!(filter.admit(&web, &event("a"), t0), Verdict::Admit);
        assert_eq!(filter.admit(&web, &event("b"), t0), Verdict::Admit);
        assert_eq!(filter.admit(&db, &event("a"), t0), Verdict::Admit);
        // 90 s on: db's bucket is full again and its event out of the window (forgotten);
        // web's bucket has one token of two, its state kept.
        let t1 = t0 + Duration::from_secs(90);
        assert_eq!(filter.admit(&web, &event("c"), t1), Verdict::Admit);
        assert_eq!(filter.buckets.len(), 1, "{:?}", filter.buckets);
        assert_eq!(filter.admitted.len(), 1, "{:?}", filter.admitted);
        assert_eq!(filter.admit(&web, &event("d"), t1), Verdict::RateLimited);
        // The half interval web had accrued at 90 s still counts.
        assert_eq!(
            filter.admit(&web, &event("d"), t0 + Duration::from_secs(120)),
            Verdict::Admit
        );
    }

    #[test]
    fn long_fields_are_cut_on_a_character_boundary() {
        let long =
            ApiEvent::warning("R".repeat(200), "A".repeat(129), "é".repeat(600)).within_limits();
        assert!(long.reason.len() <= MAX_REASON_BYTES && long.reason.ends_with('…'));
        assert!(long.action.len() <= MAX_REASON_BYTES && long.action.ends_with('…'));
        assert!(
            long.note.len() <= MAX_NOTE_BYTES && long.note.ends_with('…'),
            "{}",
            long.note.len()
        );
        assert!(long.note.len() > MAX_NOTE_BYTES - 4);
        let short = event("fits").within_limits();
        assert_eq!(short, event("fits"));
        let exact = ApiEvent::normal("R", "A", "x".repeat(MAX_NOTE_BYTES)).within_limits();
        assert_eq!(exact.note.len(), MAX_NOTE_BYTES);
        assert!(!exact.note.ends_with('…'));
    }

    #[test]
    fn a_service_reference_names_the_service() {
        let service = Service {
            metadata: kube::api::ObjectMeta {
                namespace: Some("shop".into()),
                name: Some("web".into()),
                uid: Some("1234".into()),
                resource_version: Some("42".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            service_reference(&service),
            ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some("shop".into()),
                name: Some("web".into()),
                uid: Some("1234".into()),
                resource_version: Some("42".into()),
                field_path: None,
            }
        );
    }

    #[test]
    fn the_warn_gate_lets_one_per_kind_per_period_through() {
        let mut gate = WarnGate::new(MINUTE);
        let t0 = Instant::now();
        assert_eq!(gate.allow("transport", t0), Some(0));
        assert_eq!(gate.allow("transport", t0 + Duration::from_secs(1)), None);
        assert_eq!(gate.allow("transport", t0 + Duration::from_secs(2)), None);
        assert_eq!(
            gate.allow("403 Forbidden", t0 + Duration::from_secs(2)),
            Some(0)
        );
        assert_eq!(gate.allow("transport", t0 + MINUTE), Some(2));
        assert_eq!(gate.allow("transport", t0 + MINUTE), None);
    }

    #[test]
    fn error_kinds_leave_the_details_out() {
        let conflict = kube::Error::Api(
            kube::core::Status::failure(
                "Operation cannot be fulfilled on leases \"lb\"",
                "Conflict",
            )
            .with_code(409)
            .boxed(),
        );
        assert_eq!(error_kind(&conflict), "409 Conflict");
        let decode = kube::Error::SerdeError(serde_json::from_str::<u8>("x").unwrap_err());
        assert_eq!(error_kind(&decode), "decode");
    }

    #[tokio::test]
    async fn publish_never_waits_and_counts_what_it_drops() {
        // A client to nowhere: publish must return at once whatever the API does.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let sink = EventSink::spawn(
            client,
            Reporter {
                controller: REPORTING_CONTROLLER.into(),
                instance: Some("node-1".into()),
            },
        );
        let web = service("web", "u1");
        for i in 0..BURST + 5 {
            sink.publish(web.clone(), event(&format!("n{i}")));
        }
        sink.publish(web.clone(), event("n0"));
        // 5 over the burst and one repeat, at once; the rest fail at the API, later.
        assert!(sink.dropped() >= 6, "{}", sink.dropped());
        let clone = sink.clone();
        tokio::time::timeout(Duration::from_secs(30), async {
            while clone.dropped() < u64::from(BURST) + 6 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every event dropped");
        assert_eq!(sink.published(), 0);
    }
}
