//! Prometheus metrics: the data plane's counters, read from its maps at every scrape into a fresh
//! prometheus-client registry (so the figures are the maps' own), and the controller's own
//! figures (reloads, apply durations, build).
//!
//! Served in the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]), the format every Prometheus
//! scrapes and `promtool check metrics` reads. prometheus-client writes OpenMetrics, whose
//! counter families are named without their samples' `_total`: read as the text format, every
//! counter sample is then a family of its own with no HELP or TYPE. [`to_text_format`] names
//! them as the text format does.
//!
//! Service series are one per Kubernetes Service port and address family; per-endpoint series
//! only when asked (`--metrics-endpoints`): they are as many as the endpoints, and change with
//! every rollout.

use std::time::{Duration, SystemTime};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    controller::{AppliedService, AppliedState},
    dataplane::CounterReader,
};

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of `lb_apply_duration_seconds`' buckets: 1 ms to 10 s.
const APPLY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The commit built, when the build gave one (`LB_GIT_COMMIT=$(git rev-parse --short HEAD)`).
const COMMIT: Option<&str> = option_env!("LB_GIT_COMMIT");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    service: String,
    port: String,
    family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    namespace: String,
    service: String,
    port: String,
    family: String,
    scope: String,
    digest: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    namespace: String,
    service: String,
    port: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// Configuration loads and applies, as the controller loop saw them.
#[derive(Debug, Clone)]
pub struct Reloads {
    /// Configurations applied.
    succeeded: u64,
    /// Configurations rejected, or whose apply failed.
    failed: u64,
    /// The last configuration read is the one in force: it was applied, or it was the one
    /// applied already. True before any (nothing failed).
    last_successful: bool,
    /// When a configuration was last applied.
    last_success: Option<SystemTime>,
    /// How long applies took (all of them: the first, reloads, failed ones).
    apply_duration: Histogram,
    /// Applies tried again after a failure (the desired state unchanged).
    retries: u64,
}

impl Default for Reloads {
    fn default() -> Self {
        Self {
            succeeded: 0,
            failed: 0,
            last_successful: true,
            last_success: None,
            apply_duration: Histogram::new(APPLY_BUCKETS),
            retries: 0,
        }
    }
}

impl Reloads {
    /// An apply that took `took`, and succeeded or not.
    pub fn applied(&mut self, took: Duration, succeeded: bool) {
        self.apply_duration.observe(took.as_secs_f64());
        if succeeded {
            self.succeeded += 1;
            self.last_successful = true;
            self.last_success = Some(SystemTime::now());
        } else {
            self.failed += 1;
            self.last_successful = false;
        }
    }

    /// A failed apply is tried again (its outcome is counted by [`Reloads::applied`]).
    pub fn retried(&mut self) {
        self.retries += 1;
    }

    /// A configuration that did not load (it does not validate): nothing was applied.
    pub fn rejected(&mut self) {
        self.failed += 1;
        self.last_successful = false;
    }

    /// A configuration that loaded and is the one applied already: nothing to apply, and the
    /// configuration in force is the file's again (say, a broken edit reverted).
    pub fn unchanged(&mut self) {
        self.last_successful = true;
    }
}

/// The label of a Service port: its name, or `8080/TCP` when it has none (a Service's only
/// port may be unnamed).
fn port_label(service: &AppliedService) -> String {
    if service.port_name.is_empty() {
        format!("{}/{}", service.port, service.protocol.name())
    } else {
        service.port_name.clone()
    }
}

/// Every metric of the applied `state`, the data plane's counters (read through `counters`,
/// which do not need the controller: a scrape never waits for an apply) and `reloads`, in the
/// Prometheus text format 0.0.4 (served as [`CONTENT_TYPE`]); per-endpoint families only with
/// `endpoints`.
pub fn render(
    state: &AppliedState,
    counters: &CounterReader,
    reloads: &Reloads,
    endpoints: bool,
    announce: Option<&crate::announce::Figures>,
    in_cluster: Option<&InCluster>,
) -> String {
    let mut registry = Registry::with_prefix("lb");
    let families = [
        (
            "service_packets",
            "Packets forwarded for a Service port and address family (both directions)",
        ),
        (
            "service_bytes",
            "Bytes forwarded for a Service port and address family (both directions)",
        ),
        (
            "service_new_flows",
            "New flows placed for a Service port and address family",
        ),
    ]
    .map(|(name, help)| {
        let family = Family::<ServiceLabels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    });
    let endpoint_families = endpoints.then(|| {
        [
            (
                "endpoint_packets",
                "Packets forwarded to and from an endpoint (--metrics-endpoints)",
            ),
            (
                "endpoint_bytes",
                "Bytes forwarded to and from an endpoint (--metrics-endpoints)",
            ),
            (
                "endpoint_new_flows",
                "New flows placed on an endpoint (--metrics-endpoints)",
            ),
        ]
        .map(|(name, help)| {
            let family = Family::<EndpointLabels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        })
    });
    let tables = Family::<TableLabels, Gauge>::default();
    registry.register(
        "service_table_info",
        "The digest of a Service port's Maglev table (backends named by address and port): \
         equal on every node serving the same endpoints; scope all, external or internal",
        tables.clone(),
    );
    let dataplane = counters;
    // A Service port with a `Local` traffic policy is two data-plane services (its external and
    // its internal frontends): their counters add up in the port's one series.
    for service in &state.services {
        let port = port_label(service);
        let Ok(counter) = dataplane.service_counter(service.id) else {
            continue;
        };
        let labels = ServiceLabels {
            namespace: service.namespace.clone(),
            service: service.name.clone(),
            port: port.clone(),
            family: if service.ipv4 { "IPv4" } else { "IPv6" }.into(),
        };
        if let Some(digest) = &service.table_digest {
            tables
                .get_or_create(&TableLabels {
                    namespace: service.namespace.clone(),
                    service: service.name.clone(),
                    port: port.clone(),
                    family: labels.family.clone(),
                    scope: format!("{:?}", service.scope).to_lowercase(),
                    digest: digest.clone(),
                })
                .set(1);
        }
        families[0].get_or_create(&labels).inc_by(counter.packets);
        families[1].get_or_create(&labels).inc_by(counter.bytes);
        families[2].get_or_create(&labels).inc_by(counter.new_flows);
        let Some(endpoint_families) = &endpoint_families else {
            continue;
        };
        for backend in &service.backends {
            let Ok(counter) = dataplane.backend_counter(backend.id) else {
                continue;
            };
            let labels = EndpointLabels {
                namespace: service.namespace.clone(),
                service: service.name.clone(),
                port: port.clone(),
                endpoint: std::net::SocketAddr::new(backend.addr, backend.port).to_string(),
            };
            endpoint_families[0]
                .get_or_create(&labels)
                .inc_by(counter.packets);
            endpoint_families[1]
                .get_or_create(&labels)
                .inc_by(counter.bytes);
            endpoint_families[2]
                .get_or_create(&labels)
                .inc_by(counter.new_flows);
        }
    }
    let packets = Family::<ReasonLabels, Counter>::default();
    let bytes = Family::<ReasonLabels, Counter>::default();
    registry.register(
        "packets",
        "Packets by the reason of their verdict",
        packets.clone(),
    );
    registry.register(
        "bytes",
        "Bytes by the reason of their verdict",
        bytes.clone(),
    );
    for (reason, counter) in dataplane.reason_counters().unwrap_or_default() {
        let labels = ReasonLabels {
            reason: reason.name().into(),
        };
        packets.get_or_create(&labels).inc_by(counter.packets);
        bytes.get_or_create(&labels).inc_by(counter.bytes);
    }
    let events = Family::<EventLabels, Counter>::default();
    registry.register("events", "Data path events", events.clone());
    for (event, count) in dataplane.event_counters().unwrap_or_default() {
        events
            .get_or_create(&EventLabels {
                event: event.name().into(),
            })
            .inc_by(count);
    }
    register_reloads(&mut registry, reloads);
    if let Some(announce) = announce {
        register_announce(&mut registry, announce);
    }
    if let Some(in_cluster) = in_cluster {
        register_in_cluster(&mut registry, in_cluster);
    }
    let generation = Gauge::<i64>::default();
    registry.register(
        "config_generation",
        "Number of configurations applied since start",
        generation.clone(),
    );
    generation.set(state.generation as i64);
    let build = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    registry.register(
        "build_info",
        "Always 1: the version (and commit, when the build gave one) of the running controller",
        build.clone(),
    );
    let mut labels = vec![("version", env!("CARGO_PKG_VERSION"))];
    labels.extend(COMMIT.map(|commit| ("commit", commit)));
    build.get_or_create(&labels).set(1);
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    to_text_format(&text)
}

/// One watched resource of the API, as the metrics show it.
#[derive(Debug, Clone)]
pub struct WatchFigures {
    /// Its plural (`services`).
    pub resource: &'static str,
    /// Its last list or watch call succeeded.
    pub connected: bool,
    /// Its list and watch calls that failed.
    pub errors: u64,
}

/// What a controller following the Kubernetes API adds to the metrics.
#[derive(Debug, Clone, Default)]
pub struct InCluster {
    /// The watches of the API source.
    pub watches: Vec<WatchFigures>,
    /// Whether this node holds the address assignment's lease (`None`: no assignment here).
    pub leading: Option<bool>,
    /// Addresses written to Services' status, as last decided (the leader's figure).
    pub addresses_assigned: u64,
    /// Services refused an address, as last decided.
    pub services_refused: u64,
    /// Status writes by result: `success`, `conflict`, `error`.
    pub status_writes: [(&'static str, u64); 3],
    /// Events published to the API.
    pub events_published: u64,
    /// Events dropped: over the rate limit, the queue full, or refused by the API.
    pub events_dropped: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
}

fn register_in_cluster(registry: &mut Registry, figures: &InCluster) {
    let up = Family::<ResourceLabels, Gauge>::default();
    registry.register(
        "api_watch_up",
        "1 while the API's list and watch calls for a resource succeed, 0 while it cannot be \
         reached (the last state it gave keeps serving)",
        up.clone(),
    );
    let errors = Family::<ResourceLabels, Counter>::default();
    registry.register(
        "api_watch_errors",
        "Failed list and watch calls to the API, by resource (each retried with backoff)",
        errors.clone(),
    );
    for watch in &figures.watches {
        let labels = ResourceLabels {
            resource: watch.resource.into(),
        };
        up.get_or_create(&labels).set(i64::from(watch.connected));
        errors.get_or_create(&labels).inc_by(watch.errors);
    }
    if let Some(leading) = figures.leading {
        let leader = Gauge::<i64>::default();
        registry.register(
            "leader",
            "1 while this node holds the lease of the address assignment (it alone assigns \
             addresses and writes Service status)",
            leader.clone(),
        );
        leader.set(i64::from(leading));
        let assigned = Gauge::<i64>::default();
        registry.register(
            "ipam_addresses_assigned",
            "Load balancer addresses assigned to Services, as last decided by the leader",
            assigned.clone(),
        );
        assigned.set(figures.addresses_assigned as i64);
        let refused = Gauge::<i64>::default();
        registry.register(
            "ipam_services_refused",
            "LoadBalancer Services refused an address (outside every pool, in use, pools \
             exhausted), as last decided by the leader",
            refused.clone(),
        );
        refused.set(figures.services_refused as i64);
        let writes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "ipam_status_writes",
            "Writes of status.loadBalancer.ingress by result (a conflict is decided again on the \
             newer object)",
            writes.clone(),
        );
        for (result, count) in figures.status_writes {
            writes
                .get_or_create(&ResultLabels {
                    result: result.into(),
                })
                .inc_by(count);
        }
    }
    let events = Family::<ResultLabels, Counter>::default();
    registry.register(
        "api_events",
        "Events written to the API about Services, by result (dropped: over the rate limit, \
         the queue full or refused by the API)",
        events.clone(),
    );
    for (result, count) in [
        ("published", figures.events_published),
        ("dropped", figures.events_dropped),
    ] {
        events
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc_by(count);
    }
}

/// The announcements' figures (`--announce-table`).
fn register_announce(registry: &mut Registry, figures: &crate::announce::Figures) {
    use std::sync::atomic::Ordering::Relaxed;
    let announced = Gauge::<i64>::default();
    registry.register(
        "announced_addresses",
        "Addresses this node announces now (routes in the --announce-table table)",
        announced.clone(),
    );
    announced.set(figures.announced.load(Relaxed) as i64);
    let syncs = Family::<ResultLabels, Counter>::default();
    registry.register(
        "announce_syncs",
        "Syncs of the announcement table by result (a failed one is tried again with backoff)",
        syncs.clone(),
    );
    for (result, count) in [
        ("ok", figures.syncs_ok.load(Relaxed)),
        ("error", figures.syncs_failed.load(Relaxed)),
    ] {
        syncs
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc_by(count);
    }
    let draining = Gauge::<i64>::default();
    registry.register(
        "draining",
        "1 once a stop withdrew the announcements while the data plane still serves",
        draining.clone(),
    );
    draining.set(i64::from(figures.draining.load(Relaxed)));
}

fn register_reloads(registry: &mut Registry, reloads: &Reloads) {
    let results = Family::<ResultLabels, Counter>::default();
    registry.register(
        "reloads",
        "Configuration reloads by result",
        results.clone(),
    );
    for (result, count) in [("success", reloads.succeeded), ("failure", reloads.failed)] {
        results
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc_by(count);
    }
    let successful = Gauge::<i64>::default();
    registry.register(
        "config_last_reload_successful",
        "1 when the last configuration read is the one in force, 0 when it was rejected or \
         failed to apply (the previous one serves)",
        successful.clone(),
    );
    successful.set(i64::from(reloads.last_successful));
    let timestamp = Gauge::<i64>::default();
    registry.register(
        "config_last_reload_success_timestamp_seconds",
        "When a configuration was last applied, in Unix seconds (0: none yet)",
        timestamp.clone(),
    );
    timestamp.set(
        reloads
            .last_success
            .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_secs() as i64),
    );
    let retries = Counter::<u64>::default();
    registry.register(
        "apply_retries",
        "Applies tried again after a failure, with backoff (each attempt is counted in \
         lb_reloads_total too)",
        retries.clone(),
    );
    retries.inc_by(reloads.retries);
    registry.register(
        "apply_duration_seconds",
        "How long applying a configuration to the data plane took (the first and every reload)",
        reloads.apply_duration.clone(),
    );
}

/// prometheus-client's OpenMetrics text as the Prometheus text format 0.0.4. For what it
/// writes here they differ in three ways only: a counter family's HELP and TYPE name it with
/// its samples' `_total`; there is no `# UNIT`; there is no `# EOF`. Samples, label escaping
/// and histograms are written alike.
fn to_text_format(openmetrics: &str) -> String {
    let mut text = String::with_capacity(openmetrics.len() + 1024);
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        // HELP comes right before its TYPE.
        let renamed = if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = lines
                .peek()
                .and_then(|next| next.strip_prefix("# TYPE "))
                .is_some_and(|next| next.strip_suffix(" counter") == Some(name));
            counter.then(|| format!("# HELP {name}_total {help}"))
        } else {
            line.strip_prefix("# TYPE ")
                .and_then(|rest| rest.strip_suffix(" counter"))
                .map(|name| format!("# TYPE {name}_total counter"))
        };
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_their_help_and_type_and_there_is_no_eof() {
        let mut registry = Registry::with_prefix("lb");
        let counter = Family::<ResultLabels, Counter>::default();
        registry.register("reloads", "Reloads", counter.clone());
        counter
            .get_or_create(&ResultLabels {
                result: "a \"quoted\\\" one\nand more".into(),
            })
            .inc_by(3);
        let gauge = Gauge::<i64>::default();
        registry.register("config_generation", "Generation", gauge.clone());
        gauge.set(2);
        let histogram = Histogram::new([0.001, 1.0]);
        registry.register("apply_duration_seconds", "Applies", histogram.clone());
        histogram.observe(0.5);
        let mut openmetrics = String::new();
        encode(&mut openmetrics, &registry).unwrap();
        assert_eq!(
            to_text_format(&openmetrics),
            "# HELP lb_reloads_total Reloads.\n\
             # TYPE lb_reloads_total counter\n\
             lb_reloads_total{result=\"a \\\"quoted\\\\\\\" one\\nand more\"} 3\n\
             # HELP lb_config_generation Generation.\n\
             # TYPE lb_config_generation gauge\n\
             lb_config_generation 2\n\
             # HELP lb_apply_duration_seconds Applies.\n\
             # TYPE lb_apply_duration_seconds histogram\n\
             lb_apply_duration_seconds_sum 0.5\n\
             lb_apply_duration_seconds_count 1\n\
             lb_apply_duration_seconds_bucket{le=\"0.001\"} 0\n\
             lb_apply_duration_seconds_bucket{le=\"1.0\"} 1\n\
             lb_apply_duration_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }

    #[test]
    fn reloads_say_whether_the_configuration_read_last_is_in_force() {
        let mut reloads = Reloads::default();
        assert!(reloads.last_successful && reloads.last_success.is_none());
        reloads.applied(Duration::from_millis(3), true);
        let applied_at = reloads.last_success.expect("applied");
        reloads.rejected();
        assert!(!reloads.last_successful);
        reloads.unchanged();
        assert!(reloads.last_successful);
        assert_eq!(
            reloads.last_success,
            Some(applied_at),
            "nothing applied since"
        );
        reloads.applied(Duration::from_secs(20), false);
        assert!(!reloads.last_successful);
        assert_eq!((reloads.succeeded, reloads.failed), (1, 2));
    }
}
