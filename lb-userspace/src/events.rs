//! Events of the applied Services, as `kubectl describe` shows a Service's: what the
//! controller did with each (`Applied`) and what it refused (`Rejected`). They are kept with the
//! applied state, a few per Service; an event that repeats is counted, not listed again.

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{
    manifest::ConfigError,
    model::{Cluster, ServiceModel},
};

/// Events kept per Service; the oldest go first.
pub const MAX_EVENTS_PER_SERVICE: usize = 10;

/// `Normal` or `Warning`, as Kubernetes events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Things going as they should.
    Normal,
    /// Something the operator should look at.
    Warning,
}

impl EventKind {
    /// `Normal` or `Warning`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// One event of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEvent {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// `Normal` or `Warning`.
    pub kind: EventKind,
    /// `Applied`, `Rejected`.
    pub reason: String,
    /// What happened.
    pub message: String,
    /// When it first happened.
    pub first_seen: Timestamp,
    /// When it last happened.
    pub last_seen: Timestamp,
    /// How many times it happened.
    pub count: u32,
}

impl ServiceEvent {
    /// A new event of Service `namespace/name`, seen once, now.
    pub fn new(
        namespace: &str,
        name: &str,
        kind: EventKind,
        reason: &str,
        message: String,
        now: Timestamp,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            kind,
            reason: reason.into(),
            message,
            first_seen: now,
            last_seen: now,
            count: 1,
        }
    }

    /// Whether it is an event of Service `namespace/name`.
    pub fn of(&self, namespace: &str, name: &str) -> bool {
        self.namespace == namespace && self.name == name
    }

    /// The `Rejected` event of a configuration refused for `error`, against the Service the
    /// error names: a `Service` or an `Endpoints` (named as its Service), or an `EndpointSlice`
    /// named after one of `services` (`NAME-xxxxx`, as the EndpointSlice controller names them;
    /// the longest such name). `None` when the error names no Service (a document that does not
    /// parse, a file that cannot be read).
    pub fn rejected<'a>(
        error: &ConfigError,
        services: impl IntoIterator<Item = (&'a str, &'a str)>,
        now: Timestamp,
    ) -> Option<Self> {
        let object = &error.object;
        let (kind, namespace) = (object.kind.as_str(), object.namespace.as_str());
        if object.name.is_empty() {
            return None;
        }
        let name = match (kind, &object.service) {
            ("Service" | "Endpoints", _) => object.name.clone(),
            ("EndpointSlice", Some(service)) => service.clone(),
            // A slice without its label: the Service whose name its own begins with.
            ("EndpointSlice", None) => services
                .into_iter()
                .filter(|(ns, name)| {
                    *ns == namespace
                        && object
                            .name
                            .strip_prefix(*name)
                            .is_some_and(|tail| tail.starts_with('-'))
                })
                .map(|(_, name)| name)
                .max_by_key(|name| name.len())?
                .to_owned(),
            _ => return None,
        };
        // The field and what is wrong with it; the object too when it is not the Service.
        let mut message = String::new();
        if kind != "Service" {
            message += &format!("{}: ", error.object);
        }
        if error.field != "-" {
            message += &format!("{}: ", error.field);
        }
        message += &error.message;
        Some(Self::new(
            namespace,
            &name,
            EventKind::Warning,
            "Rejected",
            message,
            now,
        ))
    }
}

/// Adds `event` to `events`: counted on an equal one of the same Service (same kind, reason
/// and message) when there is one, else appended; the Service's oldest events beyond
/// [`MAX_EVENTS_PER_SERVICE`] are dropped.
pub fn record(events: &mut Vec<ServiceEvent>, event: ServiceEvent) {
    let same = events.iter().position(|e| {
        e.of(&event.namespace, &event.name)
            && e.kind == event.kind
            && e.reason == event.reason
            && e.message == event.message
    });
    let (namespace, name) = (event.namespace.clone(), event.name.clone());
    match same {
        Some(index) => {
            let mut seen = events.remove(index);
            seen.count = seen.count.saturating_add(event.count);
            seen.last_seen = seen.last_seen.max(event.last_seen);
            events.push(seen);
        }
        None => events.push(event),
    }
    let mut excess = events
        .iter()
        .filter(|e| e.of(&namespace, &name))
        .count()
        .saturating_sub(MAX_EVENTS_PER_SERVICE);
    events.retain(|e| {
        if excess > 0 && e.of(&namespace, &name) {
            excess -= 1;
            false
        } else {
            true
        }
    });
}

/// The events after `now` applied: those of Services still served are kept, and each Service
/// added or changed since `before` gets an `Applied` event.
pub fn after_apply(
    mut events: Vec<ServiceEvent>,
    before: &Cluster,
    now: &Cluster,
) -> Vec<ServiceEvent> {
    let at = now_timestamp();
    // By name, once: a cluster's thousands of Services each looked up by a scan would make
    // every apply quadratic.
    fn key(s: &ServiceModel) -> (&str, &str) {
        (&s.namespace, &s.name)
    }
    let served: std::collections::HashSet<(&str, &str)> = now.services.iter().map(key).collect();
    let previous_by_name: std::collections::HashMap<(&str, &str), &ServiceModel> =
        before.services.iter().map(|s| (key(s), s)).collect();
    events.retain(|e| served.contains(&(e.namespace.as_str(), e.name.as_str())));
    for service in &now.services {
        let previous = previous_by_name.get(&key(service)).copied();
        if previous != Some(service) {
            let event = ServiceEvent::new(
                &service.namespace,
                &service.name,
                EventKind::Normal,
                "Applied",
                applied_message(service, previous.is_none()),
                at,
            );
            record(&mut events, event);
        }
    }
    events
}

/// What an `Applied` event says: the Service's ports and how many endpoints take new flows.
fn applied_message(service: &ServiceModel, added: bool) -> String {
    let ports: Vec<String> = service
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.protocol.name()))
        .collect();
    let serving: usize = service
        .ports
        .iter()
        .map(|p| p.endpoints.iter().filter(|e| !e.terminating).count())
        .max()
        .unwrap_or(0);
    format!(
        "{} the data plane: {}, {serving} endpoint{} serving",
        if added { "Added to" } else { "Updated in" },
        if ports.is_empty() {
            "no port".to_owned()
        } else {
            ports.join(",")
        },
        if serving == 1 { "" } else { "s" }
    )
}

/// Now, to the second (jiff's clock needs its `std` feature, which nothing else enables).
pub fn now_timestamp() -> Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_secs())
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// kubectl's short age of what happened at `then` (`5m`, `3h`, `2d`; `<invalid>` in the
/// future, beyond 2 s of clock skew): `HumanDuration` of Kubernetes' apimachinery.
pub fn human_age(then: Timestamp, now: Timestamp) -> String {
    let seconds = now.as_second() - then.as_second();
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let days = (hours / 24) % 365;
        return if days == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{days}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ConfigReason, ObjectRef};

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + second).unwrap()
    }

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        let now = at(0);
        for (ago, text) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (5 * 60 + 7, "5m7s"),
            (10 * 60 + 7, "10m"),
            (179 * 60, "179m"),
            (3 * 3600, "3h"),
            (5 * 3600 + 20 * 60, "5h20m"),
            (30 * 3600, "30h"),
            (2 * 86_400, "2d"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (40 * 86_400 + 4 * 3600, "40d"),
            (800 * 86_400, "2y70d"),
            (9 * 365 * 86_400, "9y"),
        ] {
            assert_eq!(human_age(at(-ago), now), text, "{ago} s ago");
        }
    }

    #[test]
    fn repeated_events_are_counted_and_each_service_keeps_the_last_ten() {
        let mut events = Vec::new();
        let event = |name: &str, message: &str, t| {
            ServiceEvent::new(
                "default",
                name,
                EventKind::Normal,
                "Applied",
                message.into(),
                at(t),
            )
        };
        record(&mut events, event("web", "a", 0));
        record(&mut events, event("db", "a", 1));
        record(&mut events, event("web", "b", 2));
        record(&mut events, event("web", "a", 3));
        assert_eq!(events.len(), 3);
        let last = events.last().unwrap();
        assert_eq!(
            (
                last.message.as_str(),
                last.count,
                last.first_seen,
                last.last_seen
            ),
            ("a", 2, at(0), at(3))
        );
        for n in 0..20 {
            record(&mut events, event("web", &n.to_string(), 10 + n));
        }
        let web: Vec<&str> = events
            .iter()
            .filter(|e| e.name == "web")
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(web.len(), MAX_EVENTS_PER_SERVICE);
        assert_eq!(web.first(), Some(&"10"));
        assert!(
            events.iter().any(|e| e.name == "db"),
            "other services keep theirs"
        );
    }

    fn cluster(services: &[(&str, u16)]) -> Cluster {
        let mut manifests = crate::manifest::Manifests::default();
        for (n, (name, port)) in services.iter().enumerate() {
            let text = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  \
                 clusterIP: 10.96.0.{n}\n  ports: [{{port: {port}}}]\n"
            );
            crate::manifest::read_text(std::path::Path::new("a.yaml"), &text, &mut manifests)
                .unwrap();
        }
        crate::model::build(&manifests, &crate::model::Options::default()).unwrap()
    }

    #[test]
    fn an_apply_tells_each_service_added_or_changed_and_forgets_those_gone() {
        let applied = |events: &[ServiceEvent]| -> Vec<(String, String)> {
            events
                .iter()
                .map(|e| (e.name.clone(), e.message.clone()))
                .collect()
        };
        let first = cluster(&[("web", 80), ("db", 5432)]);
        let events = after_apply(Vec::new(), &Cluster::default(), &first);
        assert_eq!(
            applied(&events),
            [
                (
                    "db".into(),
                    "Added to the data plane: 5432/TCP, 0 endpoints serving".into()
                ),
                (
                    "web".into(),
                    "Added to the data plane: 80/TCP, 0 endpoints serving".into()
                ),
            ]
        );
        // Unchanged: nothing new.
        let events = after_apply(events, &first, &first);
        assert_eq!(events.len(), 2);
        // web changed, db gone (its events with it).
        let second = cluster(&[("web", 81)]);
        let events = after_apply(events, &first, &second);
        assert_eq!(
            applied(&events),
            [
                (
                    "web".into(),
                    "Added to the data plane: 80/TCP, 0 endpoints serving".into()
                ),
                (
                    "web".into(),
                    "Updated in the data plane: 81/TCP, 0 endpoints serving".into()
                ),
            ]
        );
        assert!(
            events
                .iter()
                .all(|e| e.kind == EventKind::Normal && e.reason == "Applied")
        );
    }

    #[test]
    fn a_rejection_is_told_to_the_service_it_names() {
        let error = |object: &str| ConfigError {
            file: "cfg/web.yaml".into(),
            object: Box::new(match object.split_once(' ') {
                Some((kind, rest)) => match rest.split_once('/') {
                    Some((namespace, name)) => ObjectRef::named(kind, namespace, name),
                    None => ObjectRef {
                        kind: kind.into(),
                        place: rest.trim_matches(['(', ')']).into(),
                        ..ObjectRef::default()
                    },
                },
                None => ObjectRef::at(object),
            }),
            reason: ConfigReason::InvalidValue,
            field: "spec.ports[0].port".into(),
            message: "0 is not a port (1..=65535)".into(),
        };
        let services = [("default", "web"), ("default", "web-api"), ("other", "db")];
        let rejected = |object: &str| {
            ServiceEvent::rejected(&error(object), services, at(0)).map(|e| (e.namespace, e.name))
        };
        let named = |ns: &str, name: &str| Some((ns.to_owned(), name.to_owned()));
        assert_eq!(rejected("Service default/web"), named("default", "web"));
        assert_eq!(rejected("Endpoints other/db"), named("other", "db"));
        assert_eq!(
            rejected("EndpointSlice default/web-api-x7k2p"),
            named("default", "web-api")
        );
        assert_eq!(rejected("EndpointSlice other/web-x7k2p"), None);
        // A slice naming its Service by label is told to that Service, whatever its name.
        let mut labelled = error("EndpointSlice default/abc-x7k2p");
        labelled.object.service = Some("web".into());
        assert_eq!(
            ServiceEvent::rejected(&labelled, services, at(0)).map(|e| (e.namespace, e.name)),
            named("default", "web")
        );
        assert_eq!(rejected("document 2"), None);
        assert_eq!(rejected("Service (document 1)"), None);
        let event = ServiceEvent::rejected(&error("Service default/web"), services, at(0)).unwrap();
        assert_eq!(
            (event.kind, event.reason.as_str()),
            (EventKind::Warning, "Rejected")
        );
        assert_eq!(
            event.message,
            "spec.ports[0].port: 0 is not a port (1..=65535)"
        );
        let event = ServiceEvent::rejected(&error("Endpoints other/db"), services, at(0)).unwrap();
        assert_eq!(
            event.message,
            "Endpoints other/db: spec.ports[0].port: 0 is not a port (1..=65535)"
        );
    }
}
