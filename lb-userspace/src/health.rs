//! Health check node ports, as kube-proxy serves them: for each Service with
//! `externalTrafficPolicy: Local`, the API server allocates a `healthCheckNodePort`, and every
//! node answers HTTP on it whether it has endpoints of the Service (200) or not (503). A cloud
//! load balancer, or a router's health check, uses the answer to send the Service's traffic
//! only to nodes that can serve it, since with `Local` a node without endpoints drops it.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{http::StatusCode, response::IntoResponse};
use serde::Serialize;
use tracing::{info, warn};

use crate::model::{Cluster, POLICY_LOCAL};

/// What one health check node port answers about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthStatus {
    /// The Service.
    pub service: ServiceName,
    /// Its endpoints on this node that take new connections.
    #[serde(rename = "localEndpoints")]
    pub local_endpoints: usize,
    /// Always true while the controller runs (kube-proxy's field of the same name).
    #[serde(rename = "serviceProxyHealthy")]
    pub service_proxy_healthy: bool,
}

/// A Service's namespace and name, in kube-proxy's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceName {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// The health check node ports `cluster` asks this node (`node_name`) to serve, with their
/// answers: one per Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort`.
/// An endpoint counts once however many ports and address families it serves: its pod when
/// the manifest names it (a dual-stack pod has an address per family), else its address.
pub fn wanted(cluster: &Cluster, node_name: &str) -> BTreeMap<u16, HealthStatus> {
    let mut wanted = BTreeMap::new();
    for service in &cluster.services {
        let Some(port) = service.health_check_node_port else {
            continue;
        };
        if service.external_traffic_policy != POLICY_LOCAL {
            continue;
        }
        let mut local: Vec<_> = service
            .ports
            .iter()
            .flat_map(|p| &p.endpoints)
            .filter(|e| !e.terminating && e.node_name.as_deref() == Some(node_name))
            .map(|e| e.pod.clone().unwrap_or_else(|| e.addr.to_string()))
            .collect();
        local.sort_unstable();
        local.dedup();
        wanted.insert(
            port,
            HealthStatus {
                service: ServiceName {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                },
                local_endpoints: local.len(),
                service_proxy_healthy: true,
            },
        );
    }
    wanted
}

struct Server {
    status: Arc<RwLock<HealthStatus>>,
    task: tokio::task::JoinHandle<()>,
}

/// The health check servers this controller runs, one per port.
#[derive(Default)]
pub struct HealthChecks {
    servers: BTreeMap<u16, Server>,
}

impl HealthChecks {
    /// Serves exactly the ports of `wanted` with their answers: starts the new ones, updates
    /// the answers of the others and stops those no longer wanted. A port that cannot be
    /// bound is logged and tried again at the next sync; the data plane is not concerned.
    pub fn sync(&mut self, wanted: BTreeMap<u16, HealthStatus>) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.task.abort();
                info!(port, "health check node port closed");
            }
            keep
        });
        for (port, status) in wanted {
            if let Some(server) = self.servers.get(&port) {
                let mut current = server.status.write().unwrap_or_else(|e| e.into_inner());
                *current = status;
                continue;
            }
            match serve(port, status) {
                Ok(server) => {
                    info!(port, "serving a health check node port");
                    self.servers.insert(port, server);
                }
                Err(e) => warn!(port, error = %e, "cannot serve a health check node port"),
            }
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

/// Binds `port` on every address of the node (IPv6 and IPv4-mapped, as kube-proxy's default
/// `--nodeport-addresses`), and answers with `status`.
fn serve(port: u16, status: HealthStatus) -> std::io::Result<Server> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let status = Arc::new(RwLock::new(status));
    let shared = status.clone();
    let app = axum::Router::new().fallback(move || {
        let status = shared.read().unwrap_or_else(|e| e.into_inner()).clone();
        async move { answer(&status) }
    });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(port, error = %e, "health check node port stopped");
        }
    });
    Ok(Server { status, task })
}

/// kube-proxy's answer: 200 with local endpoints, 503 without.
fn answer(status: &HealthStatus) -> impl IntoResponse + use<> {
    let code = if status.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [
            (axum::http::header::CONTENT_TYPE, "application/json"),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        serde_json::to_string(status).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{self, Manifests};

    #[test]
    fn counts_this_nodes_endpoints_of_local_services() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: LoadBalancer\n  \
                    externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports:\n  - name: http\n    \
                    port: 80\n  - name: https\n    port: 443\n---\napiVersion: discovery.k8s.io/v1\n\
                    kind: EndpointSlice\nmetadata:\n  name: web-1\n  labels:\n    \
                    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  port: 80\n\
                    - name: https\n  port: 443\nendpoints:\n- addresses: [198.18.1.1]\n  nodeName: a\n\
                    - addresses: [198.18.1.2]\n  nodeName: b\n- addresses: [198.18.1.3]\n  nodeName: a\n  \
                    conditions: {ready: false, serving: true, terminating: true}\n";
        let mut manifests = Manifests::default();
        manifest::read_text(std::path::Path::new("t.yaml"), yaml, &mut manifests).unwrap();
        let cluster = crate::model::build(&manifests, &crate::model::Options::default()).unwrap();
        let on_a = wanted(&cluster, "a");
        assert_eq!(
            on_a[&32000].local_endpoints, 1,
            "a ready endpoint, counted once"
        );
        assert_eq!(wanted(&cluster, "c")[&32000].local_endpoints, 0);
        assert_eq!(
            serde_json::to_string(&on_a[&32000]).unwrap(),
            r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}"#
        );
    }
}
