//! Prometheus text exposition of the data plane's counters, rendered with prometheus-client
//! from a fresh registry at every scrape, so the figures are the maps' own.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::controller::Controller;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    service: String,
    port: String,
    frontend: String,
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

/// Reload outcomes counted by the controller loop.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reloads {
    /// Configurations applied.
    pub succeeded: u64,
    /// Configurations rejected.
    pub failed: u64,
}

/// Renders every metric of `controller` in the Prometheus text format.
pub fn render(controller: &Controller, reloads: Reloads) -> String {
    let mut registry = Registry::with_prefix("lb");
    let families = [
        (
            "service_packets",
            "Packets forwarded for a service frontend (both directions)",
        ),
        (
            "service_bytes",
            "Bytes forwarded for a service frontend (both directions)",
        ),
        (
            "service_new_flows",
            "New flows placed for a service frontend",
        ),
    ]
    .map(|(name, help)| {
        let family = Family::<ServiceLabels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    });
    let endpoint_families = [
        (
            "endpoint_packets",
            "Packets forwarded to and from an endpoint",
        ),
        ("endpoint_bytes", "Bytes forwarded to and from an endpoint"),
        ("endpoint_new_flows", "New flows placed on an endpoint"),
    ]
    .map(|(name, help)| {
        let family = Family::<EndpointLabels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    });
    let dataplane = controller.dataplane();
    for service in &controller.state().services {
        let port = service.port.to_string();
        let Ok(counter) = dataplane.service_counter(service.id) else {
            continue;
        };
        let labels = ServiceLabels {
            namespace: service.namespace.clone(),
            service: service.name.clone(),
            port: port.clone(),
            frontend: service.frontends_text(),
        };
        families[0].get_or_create(&labels).inc_by(counter.packets);
        families[1].get_or_create(&labels).inc_by(counter.bytes);
        families[2].get_or_create(&labels).inc_by(counter.new_flows);
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
    let reload_family = Family::<ResultLabels, Counter>::default();
    registry.register(
        "reloads",
        "Configuration reloads by result",
        reload_family.clone(),
    );
    for (result, count) in [("success", reloads.succeeded), ("failure", reloads.failed)] {
        reload_family
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc_by(count);
    }
    let generation = Gauge::<i64>::default();
    registry.register(
        "config_generation",
        "Number of configurations applied since start",
        generation.clone(),
    );
    generation.set(controller.state().generation as i64);
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}
