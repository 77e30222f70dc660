//! A stand-in Kubernetes API server for tests: the real wire protocol (paths, list and watch
//! bodies, `Status` errors, resourceVersions, bookmarks, 410 after compaction) over plain HTTP
//! on loopback, for the few resources the controller uses, so that a kube-rs client cannot
//! tell it from the real one for what it asks. No real kube-apiserver can run where the tests
//! do.
//!
//! It also does what a real one cannot be asked to: stop answering and come back on the same
//! port ([`StandIn::outage`], [`StandIn::restore`]), forget its history ([`StandIn::compact`]),
//! fail one chosen request ([`StandIn::fail_next`]), and tell what it was asked
//! ([`StandIn::requests`]).
//!
//! Served: `v1` Services (with `status`), Nodes, Namespaces; `discovery.k8s.io/v1`
//! EndpointSlices; `lb.xdp.rs/v1alpha1` LoadBalancerIPPools (cluster-scoped custom resource,
//! with `status`); `coordination.k8s.io/v1` Leases; `events.k8s.io/v1` Events; and
//! `GET /version`. Verbs: list (paged, with label and field selectors), watch, get, create,
//! replace, merge patch, delete; objects whole or, for clients that ask with
//! `as=PartialObjectMetadata`, their metadata only.

mod http;
mod object;
mod resources;
mod selectors;
mod services;
mod status;
mod store;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::http::{HeaderMap, Method, Uri, header};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize as _;
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use object::meta_str;
use resources::EVENTS;
use store::{Precondition, Store};

/// The bind function given to [`StandIn::start`].
type Bind = dyn Fn() -> std::io::Result<TcpListener> + Send + Sync;

/// A running stand-in API server. It owns its tokio runtime (its own threads), so it serves
/// whatever the test thread does, and its methods are plain blocking calls, usable from
/// synchronous tests and from async ones alike. Dropping it stops everything.
pub struct StandIn {
    shared: Arc<Shared>,
    bind: Arc<Bind>,
    address: SocketAddr,
    /// `None` during an outage.
    serving: Mutex<Option<Serving>>,
    bookmark_interval: watch::Sender<Duration>,
    /// `Option` only so that `Drop` can shut it down without blocking.
    runtime: Option<Runtime>,
}

/// One request the stand-in answered.
#[derive(Clone, Debug)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query, as sent (`""` when there is none).
    pub query: String,
    /// The `User-Agent` header (`""` when absent).
    pub user_agent: String,
    /// The HTTP status of the answer (a watch counts as 200 when it starts).
    pub code: u16,
    /// When it was answered.
    pub at: Instant,
    params: http::Params,
}

impl Request {
    /// A query parameter, decoded (`param("limit")`).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// Whether this was a watch (`watch=true` or `watch=1`).
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }

    /// Whether this was a list of the collection at `path` (a GET that is not a watch).
    pub fn is_list_of(&self, path: &str) -> bool {
        self.method == "GET" && self.path == path && !self.is_watch()
    }
}

/// What the server tasks and the test thread share.
struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<Request>>,
    faults: Mutex<Vec<Fault>>,
}

/// A failure armed by [`StandIn::fail_next`].
struct Fault {
    method: String,
    path_suffix: String,
    code: u16,
}

/// The listener's incarnation: dropping `stop` ends the accept loop and every connection;
/// `stopped` disconnects once they are all gone.
struct Serving {
    stop: watch::Sender<()>,
    stopped: std::sync::mpsc::Receiver<()>,
}

/// A lock that a panicking test thread cannot wedge for the server (the data stays usable).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// The armed fault this request triggers, if any (used up).
    fn take_fault(&self, method: &str, path: &str) -> Option<u16> {
        let mut faults = lock(&self.faults);
        let index = faults.iter().position(|fault| {
            fault.method.eq_ignore_ascii_case(method) && path.ends_with(&fault.path_suffix)
        })?;
        Some(faults.remove(index).code)
    }

    fn record(&self, method: &Method, uri: &Uri, headers: &HeaderMap, code: u16) {
        let user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        lock(&self.requests).push(Request {
            method: method.to_string(),
            path: uri.path().to_string(),
            query: uri.query().unwrap_or("").to_string(),
            user_agent: user_agent.to_string(),
            code,
            at: Instant::now(),
            params: http::params(uri).unwrap_or_default(),
        });
    }
}

impl StandIn {
    /// Starts a stand-in listening on what `bind` returns. `bind` is called again by
    /// [`restore`](Self::restore) to reopen the same port, so it must give the same address
    /// every time; it may enter a network namespace before binding, so that the listener lives
    /// there.
    pub fn start(
        bind: impl Fn() -> std::io::Result<TcpListener> + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("stand-in-apiserver")
            .enable_all()
            .build()
            .context("the stand-in API server's runtime")?;
        let bind: Arc<Bind> = Arc::new(bind);
        let listener = bind().context("binding the stand-in API server")?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
        });
        let (bookmark_interval, interval) = watch::channel(Duration::from_secs(1));
        runtime.spawn(send_bookmarks(Arc::clone(&shared), interval));
        let serving = serve(&runtime, listener, &shared)?;
        Ok(StandIn {
            shared,
            bind,
            address,
            serving: Mutex::new(Some(serving)),
            bookmark_interval,
            runtime: Some(runtime),
        })
    }

    /// Starts a stand-in on 127.0.0.1 and a free port (the same one after a
    /// [`restore`](Self::restore)), in the current network namespace.
    pub fn start_local() -> anyhow::Result<Self> {
        let port = AtomicU16::new(0);
        Self::start(move || {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port.load(Ordering::Relaxed)))?;
            port.store(listener.local_addr()?.port(), Ordering::Relaxed);
            Ok(listener)
        })
    }

    /// The server's URL, `http://127.0.0.1:PORT` (for a listener bound to every address, its
    /// loopback one).
    pub fn url(&self) -> String {
        let mut address = self.address;
        if address.ip().is_unspecified() {
            address.set_ip(match address {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{address}")
    }

    /// Writes a kubeconfig for the stand-in (one cluster at [`url`](Self::url), a user without
    /// credentials, a context with namespace `default`, made current), as
    /// `kube::Config::from_custom_kubeconfig` takes it.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url()}}],
            "users": [{"name": "stand-in", "user": {}}],
            "contexts": [{
                "name": "stand-in",
                "context": {"cluster": "stand-in", "user": "stand-in", "namespace": "default"},
            }],
            "current-context": "stand-in",
        });
        let yaml = serde_yaml_ng::to_string(&config)?;
        std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or replaces `object` as a client's create or update would: the server's
    /// metadata filled in (uid, resourceVersion, creationTimestamp kept on update, generation
    /// bumped on a spec change, for the kinds that have one), the API server's Service
    /// defaults and allocations, `status` ignored where it is a subresource (so a Service's
    /// status given here is dropped on create and left as it was on update); ADDED or MODIFIED
    /// sent to the watches. A resourceVersion in `object` is not checked. A namespaced object
    /// without a namespace goes to `default`. Returns the stored object.
    ///
    /// Panics if the stand-in does not serve the kind, or if the real server would refuse the
    /// object (the message says why): a fixture that cannot be stored is a bug in the test.
    pub fn apply<K: k8s_openapi::Resource + serde::Serialize>(&self, object: &K) -> Value {
        let mut value = serde_json::to_value(object)
            .unwrap_or_else(|e| panic!("{} does not serialize: {e}", K::KIND));
        if let Some(map) = value.as_object_mut() {
            map.entry("apiVersion")
                .or_insert_with(|| json!(K::API_VERSION));
            map.entry("kind").or_insert_with(|| json!(K::KIND));
        }
        self.apply_value(value)
    }

    /// [`apply`](Self::apply) for an untyped object (a custom resource, say); its kind and
    /// apiVersion say what it is.
    pub fn apply_value(&self, object: Value) -> Value {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let resource = resources::by_kind(api_version, &kind)
            .unwrap_or_else(|| panic!("the stand-in does not serve {api_version:?} {kind:?}"));
        let namespace = meta_str(&object, "namespace")
            .unwrap_or("default")
            .to_string();
        let name = meta_str(&object, "name")
            .unwrap_or_else(|| panic!("a {kind} to apply needs metadata.name"))
            .to_string();
        let mut store = self.shared.store();
        let exists = store.get(resource, Some(&namespace), &name).is_ok();
        let stored = if exists {
            store.update(
                resource,
                Some(&namespace),
                &name,
                object,
                false,
                Precondition::Ignored,
            )
        } else {
            store.create(resource, Some(&namespace), object)
        };
        drop(store);
        stored.unwrap_or_else(|e| {
            panic!(
                "the stand-in refused {kind} {name}: {} ({})",
                e.message, e.code
            )
        })
    }

    /// [`apply_value`](Self::apply_value) for every object of a YAML stream (`---`-separated
    /// documents, as `kubectl apply -f` takes) of a kind the stand-in serves; others (a
    /// Deployment beside its Service) are skipped. Returns how many were applied.
    pub fn apply_yaml(&self, yaml: &str) -> usize {
        let mut applied = 0;
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("a YAML document to apply does not parse: {e}"));
            let served = value
                .get("apiVersion")
                .and_then(Value::as_str)
                .zip(value.get("kind").and_then(Value::as_str));
            if served
                .is_some_and(|(api_version, kind)| resources::by_kind(api_version, kind).is_some())
            {
                self.apply_value(value);
                applied += 1;
            }
        }
        applied
    }

    /// Deletes an object as a client's delete would (DELETED sent to the watches; an object
    /// with finalizers is only marked for deletion, as the real server does). `namespace` is
    /// ignored for cluster-scoped kinds; `None` means `default` for namespaced ones. Returns
    /// whether the object existed.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let Some(resource) = resources::by_kind(api_version, kind) else {
            return false;
        };
        self.shared
            .store()
            .delete(resource, namespace, name, &Value::Null)
            .is_ok()
    }

    /// The stored object (with kind and apiVersion, as a GET returns it). `namespace` as for
    /// [`delete`](Self::delete).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let resource = resources::by_kind(api_version, kind)?;
        self.shared
            .store()
            .get(resource, namespace, name)
            .ok()
            .cloned()
    }

    /// The stored object as `K`. Panics if it does not decode as one (a stored object always
    /// should).
    pub fn get_as<K: k8s_openapi::Resource + serde::de::DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let value = self.get(K::API_VERSION, K::KIND, namespace, name)?;
        Some(
            serde_json::from_value(value)
                .unwrap_or_else(|e| panic!("the stored {} {name} is not one: {e}", K::KIND)),
        )
    }

    /// Stops answering, as a crashed API server: closes the listener and every open
    /// connection (watches end mid-stream); connecting is refused until
    /// [`restore`](Self::restore). The objects stay (writes with [`apply`](Self::apply) still
    /// work, and are there when it comes back). Returns once everything is closed.
    pub fn outage(&self) {
        let serving = lock(&self.serving).take();
        if let Some(Serving { stop, stopped }) = serving {
            drop(stop);
            // Disconnected: the accept loop and every connection have dropped their sender.
            if let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(Duration::from_secs(10)) {
                panic!("the stand-in API server did not close its connections within 10 s");
            }
        }
    }

    /// Ends an [`outage`](Self::outage): binds again with the same `bind`, same port. Panics
    /// if that fails (the port was taken meanwhile, or `bind` gave another one).
    pub fn restore(&self) {
        let mut serving = lock(&self.serving);
        if serving.is_some() {
            return;
        }
        let listener = (self.bind)()
            .unwrap_or_else(|e| panic!("the stand-in cannot bind {} again: {e}", self.address));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        assert_eq!(
            port,
            self.address.port(),
            "the stand-in's bind gave another port"
        );
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the stand-in");
        *serving = Some(
            serve(runtime, listener, &self.shared)
                .unwrap_or_else(|e| panic!("the stand-in cannot serve again: {e}")),
        );
    }

    /// Forgets the history of changes, as an etcd compaction at the current resourceVersion: a
    /// watch resuming from an older resourceVersion gets ERROR 410 Expired ("too old resource
    /// version"), and so does a list continued from an older page. Also ends every open watch,
    /// so that clients resume and meet it (a client that had seen the latest change resumes
    /// without error, as from a real server).
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Makes the next request whose method is `method` and whose path ends with `path_suffix`
    /// fail with `code` (a `Status` with the reason that goes with it: 409 on
    /// `".../status"` is a Conflict as the real server words it). Faults are used in the order
    /// they were armed.
    pub fn fail_next(&self, method: &str, path_suffix: &str, code: u16) {
        lock(&self.shared.faults).push(Fault {
            method: method.to_string(),
            path_suffix: path_suffix.to_string(),
            code,
        });
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.requests).clone()
    }

    /// The `events.k8s.io/v1` Events stored.
    pub fn events(&self) -> Vec<k8s_openapi::api::events::v1::Event> {
        self.shared
            .store()
            .objects(EVENTS)
            .filter_map(|event| serde_json::from_value(event.clone()).ok())
            .collect()
    }

    /// How many watches are open now (a watch whose client has disconnected is not counted):
    /// for tests of clients that must not leak them.
    pub fn open_watches(&self) -> usize {
        self.shared.store().open_watches()
    }

    /// How often watches that allow bookmarks get one (default 1 s; the real server sends one
    /// about every minute).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.bookmark_interval.send_replace(every);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // Without waiting: the drop may happen inside a test's runtime, where blocking on
        // another runtime's shutdown is refused.
        lock(&self.serving).take();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Serves `listener` on `runtime` until the returned [`Serving`] is dropped.
fn serve(
    runtime: &Runtime,
    listener: TcpListener,
    shared: &Arc<Shared>,
) -> std::io::Result<Serving> {
    listener.set_nonblocking(true)?;
    let listener = {
        let _runtime = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let (stop, stop_received) = watch::channel(());
    let (stopped_sender, stopped) = std::sync::mpsc::channel();
    let router = http::router(Arc::clone(shared));
    runtime.spawn(accept(listener, router, stop_received, stopped_sender));
    Ok(Serving { stop, stopped })
}

/// Accepts connections until `stop`'s sender is dropped; each connection ends then too.
/// `stopped` is held by this loop and every connection, so that its receiver knows when they
/// are all gone.
async fn accept(
    listener: tokio::net::TcpListener,
    router: Router,
    mut stop: watch::Receiver<()>,
    stopped: std::sync::mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors, say: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, router.clone(), stop.clone(), stopped.clone()));
            }
        }
    }
    drop(listener);
    drop(stopped);
}

/// One HTTP/1.1 connection, cut (not drained) when `stop` fires, as a crash would.
async fn connection(
    stream: tokio::net::TcpStream,
    router: Router,
    mut stop: watch::Receiver<()>,
    _stopped: std::sync::mpsc::Sender<()>,
) {
    let service = TowerToHyperService::new(router);
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        _ = stop.changed() => {}
    }
}

/// Sends bookmarks to the watches that allow them, every `interval`.
async fn send_bookmarks(shared: Arc<Shared>, mut interval: watch::Receiver<Duration>) {
    loop {
        let every = (*interval.borrow_and_update()).max(Duration::from_millis(10));
        tokio::select! {
            () = tokio::time::sleep(every) => shared.store().send_bookmarks(),
            changed = interval.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
