//! The stand-in API server against the real client: kube-rs 5 (its `Client` from the
//! kubeconfig the stand-in writes, its runtime's watcher, reflector and event recorder) must not
//! be able to tell it from a real API server for what the controller uses. Loopback in the
//! host's namespace, no privileges; every wait polls with a deadline.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use lb_tests::apiserver::StandIn;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Bounds for what must happen, only ever waited for.
const WAIT: Duration = Duration::from_secs(8);

const SERVICES: &str = "/api/v1/namespaces/default/services";

/// A kube-rs client of `standin`, configured from the kubeconfig it writes.
async fn client(standin: &StandIn) -> anyhow::Result<Client> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kubeconfig");
    standin.write_kubeconfig(&path)?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
    let options = kube::config::KubeConfigOptions::default();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?;
    // Loopback: an HTTPS_PROXY in the environment must not take the requests elsewhere.
    config.proxy_url = None;
    Ok(Client::try_from(config)?)
}

fn service(name: &str, port: u16) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": [{"name": "http", "port": port}]},
    }))
    .expect("a Service")
}

/// Polls `done` until it holds, failing the test with `what` after [`WAIT`].
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next event of a raw watch that is not a bookmark.
async fn next_event<S>(events: &mut S) -> WatchEvent<Service>
where
    S: Stream<Item = kube::Result<WatchEvent<Service>>> + Unpin,
{
    loop {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("a watch event in time")
            .expect("the watch goes on")
            .expect("a decodable watch event");
        if !matches!(event, WatchEvent::Bookmark(_)) {
            return event;
        }
    }
}

/// Whether the raw watch ends (bookmarks and read errors of a cut connection aside).
async fn watch_ends<S>(events: &mut S) -> bool
where
    S: Stream<Item = kube::Result<WatchEvent<Service>>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => return false,
            Ok(None) => return true,
            Ok(Some(Ok(WatchEvent::Bookmark(_)) | Err(_))) => {}
            Ok(Some(Ok(other))) => panic!("unexpected event after the end: {other:?}"),
        }
    }
}

/// A reflector, run in the background with kube-rs's default backoff, as a controller runs
/// it; its errors are kept.
struct Reflected<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    errors: Arc<Mutex<Vec<watcher::Error>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Reflected<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    fn start(api: Api<K>, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&errors);
        let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
        let task = tokio::spawn(stream.for_each(move |event| {
            if let Err(error) = event {
                kept.lock().unwrap().push(error);
            }
            futures::future::ready(())
        }));
        Reflected {
            store,
            errors,
            task,
        }
    }

    fn get(&self, name: &str) -> Option<Arc<K>> {
        self.store.get(&ObjectRef::new(name).within("default"))
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.store.state().iter().map(|s| s.name_any()).collect();
        names.sort();
        names
    }
}

impl<K: Resource<DynamicType = ()> + 'static> Drop for Reflected<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn port_of(service: &Service) -> i32 {
    service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map_or(0, |p| p[0].port)
}

#[tokio::test]
async fn a_reflector_sees_additions_modifications_and_deletions() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    let client = client(&standin).await?;
    let version = client.apiserver_version().await?;
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "37")
    );
    let api: Api<Service> = Api::namespaced(client, "default");
    let mut raw = api.watch(&WatchParams::default(), "0").await?.boxed();
    let reflected = Reflected::start(api.clone(), watcher::Config::default());

    standin.apply(&service("web", 80));
    assert!(matches!(next_event(&mut raw).await, WatchEvent::Added(s) if s.name_any() == "web"));
    wait_for("web in the store", || reflected.get("web").is_some()).await;

    standin.apply(&service("web", 8080));
    assert!(matches!(next_event(&mut raw).await, WatchEvent::Modified(s) if port_of(&s) == 8080));
    wait_for("the new port in the store", || {
        reflected.get("web").is_some_and(|s| port_of(&s) == 8080)
    })
    .await;

    assert!(standin.delete("v1", "Service", Some("default"), "web"));
    let WatchEvent::Deleted(gone) = next_event(&mut raw).await else {
        panic!("DELETED expected");
    };
    // The deletion is a revision of its own, and the deleted object carries it.
    let stored_last = standin.requests().len();
    assert_eq!(
        gone.resource_version().as_deref(),
        Some("4"),
        "{stored_last}"
    );
    wait_for("web gone from the store", || reflected.names().is_empty()).await;
    assert!(reflected.errors.lock().unwrap().is_empty());
    Ok(())
}

#[tokio::test]
async fn the_initial_list_is_paged() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    for name in ["a", "b", "c", "d", "e"] {
        standin.apply(&service(name, 80));
    }
    let api: Api<Service> = Api::namespaced(client(&standin).await?, "default");
    let reflected = Reflected::start(api, watcher::Config::default().page_size(2));
    wait_for("all five in the store", || reflected.names().len() == 5).await;
    wait_for("the watch after the list", || {
        standin
            .requests()
            .iter()
            .any(|r| r.path == SERVICES && r.is_watch())
    })
    .await;

    let requests = standin.requests();
    let lists: Vec<_> = requests.iter().filter(|r| r.is_list_of(SERVICES)).collect();
    assert_eq!(lists.len(), 3, "{lists:#?}");
    assert!(
        lists
            .iter()
            .all(|r| r.param("limit") == Some("2") && r.code == 200)
    );
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1].param("continue").is_some() && lists[2].param("continue").is_some());
    // Every page is consistent with the first: the watch resumes from its resourceVersion.
    let watch = requests.iter().find(|r| r.is_watch()).unwrap();
    assert_eq!(watch.param("resourceVersion"), Some("6"));
    Ok(())
}

#[tokio::test]
async fn streaming_lists_need_no_list() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    standin.apply(&service("a", 80));
    standin.apply(&service("b", 80));
    let api: Api<Service> = Api::namespaced(client(&standin).await?, "default");
    let reflected = Reflected::start(api, watcher::Config::default().streaming_lists());
    wait_for("a and b in the store", || reflected.names() == ["a", "b"]).await;
    standin.apply(&service("c", 80));
    wait_for("c in the store", || reflected.get("c").is_some()).await;
    let requests = standin.requests();
    assert!(requests.iter().all(|r| r.is_watch()), "{requests:#?}");
    assert_eq!(requests[0].param("sendInitialEvents"), Some("true"));
    Ok(())
}

#[test]
fn a_client_that_goes_away_leaves_no_watch_behind() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let standin = StandIn::start_local()?;
    // Bookmarks off, nothing changes: only the connection's end can tell the server.
    standin.set_bookmark_interval(Duration::from_secs(3600));
    let address = standin.url().trim_start_matches("http://").to_string();
    let mut watches = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(&address)?;
        let request = format!("GET {SERVICES}?watch=true HTTP/1.1\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes())?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        assert_eq!(&head, b"HTTP/1.1 200");
        watches.push(stream);
    }
    assert_eq!(standin.open_watches(), 5);
    drop(watches);
    let deadline = Instant::now() + WAIT;
    while standin.open_watches() > 0 {
        assert!(
            Instant::now() < deadline,
            "watches left open: {}",
            standin.open_watches()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[tokio::test]
async fn compaction_sends_watches_back_to_a_relist() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    let web = standin.apply(&service("web", 80));
    let seen = web["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let api: Api<Service> = Api::namespaced(client(&standin).await?, "default");

    // Compaction ends the watches that are open.
    let mut open = api.watch(&WatchParams::default(), &seen).await?.boxed();
    standin.compact();
    assert!(watch_ends(&mut open).await, "compaction ends open watches");

    let reflected = Reflected::start(api.clone(), watcher::Config::default());
    wait_for("web in the store", || reflected.get("web").is_some()).await;
    // A change the watch cannot have seen (the server is down), then the compaction: the
    // watcher resumes from before it and is told to start over.
    standin.outage();
    standin.apply(&service("db", 5432));
    standin.compact();
    standin.restore();
    wait_for("db in the store", || reflected.get("db").is_some()).await;
    let expired = reflected.errors.lock().unwrap().iter().any(|e| {
        matches!(e, watcher::Error::WatchError(status) if status.code == 410 && status.reason == "Expired")
    });
    assert!(expired, "{:?}", reflected.errors.lock().unwrap());
    let lists = standin
        .requests()
        .iter()
        .filter(|r| r.is_list_of(SERVICES))
        .count();
    assert_eq!(lists, 2, "the first list and the relist");

    // As the real server words it: the version asked for, and the oldest one it has.
    let mut stale = api.watch(&WatchParams::default(), &seen).await?.boxed();
    let WatchEvent::Error(status) = next_event(&mut stale).await else {
        panic!("ERROR expected");
    };
    let compacted = standin.get("v1", "Service", Some("default"), "db").unwrap();
    let compacted = compacted["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        (status.code, status.reason.as_str(), status.message),
        (
            410,
            "Expired",
            format!("too old resource version: {seen} ({compacted})")
        )
    );
    assert!(watch_ends(&mut stale).await);
    Ok(())
}

#[tokio::test]
async fn bookmarks_carry_the_latest_resource_version() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    standin.set_bookmark_interval(Duration::from_millis(50));
    let web = standin.apply(&service("web", 80));
    let api: Api<Service> = Api::namespaced(client(&standin).await?, "default");
    let rv = web["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut events = api.watch(&WatchParams::default(), &rv).await?.boxed();
    // A write elsewhere moves the resourceVersion on; the next bookmarks say so.
    let other = standin.apply_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "elsewhere", "namespace": "default"}, "spec": {},
    }));
    let latest = other["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no bookmark at {latest}");
        let event = tokio::time::timeout(WAIT, events.next()).await?.unwrap()?;
        match event {
            WatchEvent::Bookmark(bookmark) if bookmark.metadata.resource_version == latest => break,
            WatchEvent::Bookmark(_) => {}
            other => panic!("only bookmarks expected, got {other:?}"),
        }
    }
    // `timeoutSeconds` ends a watch, bookmarks or not.
    let mut short = api
        .watch(&WatchParams::default().timeout(1), &latest)
        .await?
        .boxed();
    assert!(watch_ends(&mut short).await);
    Ok(())
}

#[tokio::test]
async fn after_an_outage_the_watcher_catches_up() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    standin.apply(&service("a", 80));
    standin.apply(&service("b", 80));
    let api: Api<Service> = Api::namespaced(client(&standin).await?, "default");
    let reflected = Reflected::start(api, watcher::Config::default());
    wait_for("a and b in the store", || reflected.names() == ["a", "b"]).await;

    standin.outage();
    let address = standin.url().trim_start_matches("http://").to_string();
    let refused = TcpStream::connect(&address).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    wait_for("the watcher to fail", || {
        !reflected.errors.lock().unwrap().is_empty()
    })
    .await;

    standin.apply(&service("a", 8080));
    assert!(standin.delete("v1", "Service", None, "b"));
    standin.apply(&service("c", 80));
    standin.restore();
    wait_for("the changes made during the outage", || {
        reflected.names() == ["a", "c"] && reflected.get("a").is_some_and(|a| port_of(&a) == 8080)
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn status_patches_are_preconditioned_and_touch_only_the_status() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    let api: Api<Service> = Api::namespaced(client(&standin).await?, "default");
    let created = api
        .create(&PostParams::default(), &service("web", 80))
        .await?;
    let stale = created.resource_version().unwrap();
    let labelled = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
        )
        .await?;
    let current = labelled.resource_version().unwrap();
    let mut events = api.watch(&WatchParams::default(), &current).await?.boxed();

    let ingress = json!({"loadBalancer": {"ingress": [{"ip": "198.18.100.1", "ipMode": "VIP"}]}});
    let stale_patch = json!({"metadata": {"resourceVersion": stale}, "status": ingress});
    let refused = api
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&stale_patch))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = refused else {
        panic!("an API error expected: {refused:?}");
    };
    assert_eq!(
        (status.code, status.reason.as_str(), status.message.as_str()),
        (
            409,
            "Conflict",
            "Operation cannot be fulfilled on services \"web\": the object has been modified; \
             please apply your changes to the latest version and try again"
        )
    );

    // The right resourceVersion: the status changes, the spec in the same body does not.
    let patch = json!({"metadata": {"resourceVersion": current}, "spec": {"type": "ClusterIP"}, "status": ingress});
    let patched = api
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let spec = patched.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    let ingress_ip = |s: &Service| -> Option<String> {
        s.status
            .as_ref()?
            .load_balancer
            .as_ref()?
            .ingress
            .as_ref()?[0]
            .ip
            .clone()
    };
    assert_eq!(ingress_ip(&patched).as_deref(), Some("198.18.100.1"));
    match next_event(&mut events).await {
        WatchEvent::Modified(s) => assert_eq!(ingress_ip(&s).as_deref(), Some("198.18.100.1")),
        other => panic!("MODIFIED expected, got {other:?}"),
    }

    // The main resource leaves the status alone, and an injected fault is answered once.
    let cleared = json!({"status": {"loadBalancer": {"ingress": null}}});
    let unchanged = api
        .patch("web", &PatchParams::default(), &Patch::Merge(&cleared))
        .await?;
    assert_eq!(ingress_ip(&unchanged).as_deref(), Some("198.18.100.1"));
    assert_eq!(
        unchanged.resource_version(),
        patched.resource_version(),
        "a no-op is no write"
    );
    standin.fail_next("PATCH", "/web/status", 409);
    let injected = api
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&cleared))
        .await;
    assert!(
        matches!(injected, Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "Conflict")
    );
    api.patch_status("web", &PatchParams::default(), &Patch::Merge(&cleared))
        .await?;
    let stored: Service = standin.get_as(Some("default"), "web").unwrap();
    assert_eq!(ingress_ip(&stored), None);
    Ok(())
}

#[tokio::test]
async fn leases_replace_only_the_version_they_read() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    let leases: Api<Lease> = Api::namespaced(client(&standin).await?, "default");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "lb-leader"},
        "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 15},
    }))?;
    let created = leases.create(&PostParams::default(), &lease).await?;
    let again = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(
        matches!(&again, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"
            && s.message == "leases.coordination.k8s.io \"lb-leader\" already exists"),
        "{again:?}"
    );

    let mut read = leases.get("lb-leader").await?;
    assert_eq!(read.metadata.uid, created.metadata.uid);
    read.spec.as_mut().unwrap().holder_identity = Some("node-b".into());
    let taken = leases
        .replace("lb-leader", &PostParams::default(), &read)
        .await?;
    assert_ne!(taken.resource_version(), created.resource_version());

    // Another holder writing over what it read before: refused.
    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("node-c".into());
    let refused = leases
        .replace("lb-leader", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{refused:?}"
    );
    let holder = leases.get("lb-leader").await?.spec.unwrap().holder_identity;
    assert_eq!(holder.as_deref(), Some("node-b"));

    let deleted = leases.delete("lb-leader", &Default::default()).await?;
    assert!(
        deleted.is_right(),
        "a Lease's deletion answers a Status: {deleted:?}"
    );
    let missing = leases.get("lb-leader").await.unwrap_err();
    assert!(
        matches!(&missing, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{missing:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_event_recorder_creates_then_patches_a_series() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    let client = client(&standin).await?;
    let web = Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &service("web", 80))
        .await?;
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "lb".into(),
            instance: None,
        },
    );
    let event = RecorderEvent {
        type_: EventType::Normal,
        reason: "IPAllocated".into(),
        note: Some("198.18.100.1".into()),
        action: "Allocate".into(),
        secondary: None,
    };
    recorder.publish(&event, &web.object_ref(&())).await?;
    recorder.publish(&event, &web.object_ref(&())).await?;

    let events = standin.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    let stored = &events[0];
    assert_eq!(stored.series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(
        stored.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("web")
    );
    assert_eq!(stored.reporting_controller.as_deref(), Some("lb"));
    let writes: Vec<_> = standin
        .requests()
        .into_iter()
        .filter(|r| {
            r.path
                .starts_with("/apis/events.k8s.io/v1/namespaces/default/events")
        })
        .map(|r| (r.method, r.code))
        .collect();
    assert_eq!(
        writes,
        [("POST".to_string(), 201), ("PATCH".to_string(), 200)]
    );
    Ok(())
}

#[tokio::test]
async fn services_get_the_api_servers_defaults() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    let api: Api<Service> = Api::namespaced(client(&standin).await?, "default");
    let mut with_status = service("web", 80);
    with_status.status =
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}))?;
    let created = api.create(&PostParams::default(), &with_status).await?;
    let spec = created.spec.clone().unwrap();
    let cluster_ip = spec.cluster_ip.clone().unwrap();
    assert!(cluster_ip.starts_with("198.19."), "{cluster_ip}");
    assert_eq!(spec.cluster_ips, Some(vec![cluster_ip.clone()]));
    assert_eq!(spec.ip_families, Some(vec!["IPv4".to_string()]));
    assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(spec.allocate_load_balancer_node_ports, Some(true));
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
    );
    let node_port = port.node_port.unwrap();
    assert!((30000..=32767).contains(&node_port), "{node_port}");
    // The status a client sends with a create is not kept.
    let status = serde_json::to_value(&created.status)?;
    assert_eq!(status, json!({"loadBalancer": {}}));
    assert_eq!(
        created.metadata.generation, None,
        "Services have no generation"
    );

    // A replace that omits the allocations (a client that writes its own spec) keeps them.
    let mut replacement = service("web", 80);
    replacement.metadata.resource_version = created.resource_version();
    let replaced = api
        .replace("web", &PostParams::default(), &replacement)
        .await?;
    let kept = replaced.spec.unwrap();
    assert_eq!(kept.cluster_ip, Some(cluster_ip));
    assert_eq!(kept.ports.unwrap()[0].node_port, Some(node_port));

    // Dual stack when asked for; a health check node port for Local traffic.
    let dual: Service = serde_json::from_value(json!({
        "metadata": {"name": "dual"},
        "spec": {"type": "LoadBalancer", "ipFamilyPolicy": "PreferDualStack",
            "externalTrafficPolicy": "Local", "ports": [{"port": 53, "protocol": "UDP"}]},
    }))?;
    let dual = api
        .create(&PostParams::default(), &dual)
        .await?
        .spec
        .unwrap();
    let ips = dual.cluster_ips.unwrap();
    assert!(ips[1].starts_with("2001:db8:ffff::"), "{ips:?}");
    assert_eq!(
        dual.ip_families,
        Some(vec!["IPv4".to_string(), "IPv6".to_string()])
    );
    assert!(
        dual.health_check_node_port
            .is_some_and(|p| (30000..=32767).contains(&p))
    );
    Ok(())
}

fn slice(name: &str, service: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}],
    })
}

#[tokio::test]
async fn selectors_narrow_lists_and_watches() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    standin.apply_value(slice("web-1", "web"));
    standin.apply_value(slice("db-1", "db"));
    let client = client(&standin).await?;
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let by_label = watcher::Config::default().labels("kubernetes.io/service-name=web");
    let web = Reflected::start(slices.clone(), by_label);
    let by_name = Reflected::start(
        slices.clone(),
        watcher::Config::default().fields("metadata.name=db-1"),
    );
    let names = |r: &Reflected<EndpointSlice>| -> Vec<String> {
        let mut names: Vec<_> = r.store.state().iter().map(|s| s.name_any()).collect();
        names.sort();
        names
    };
    wait_for("the selected slices", || {
        names(&web) == ["web-1"] && names(&by_name) == ["db-1"]
    })
    .await;

    // Relabelled to another Service: it leaves the one selection and enters none.
    standin.apply_value(slice("web-2", "web"));
    standin.apply_value(slice("web-1", "db"));
    wait_for("the relabelled slice gone", || names(&web) == ["web-2"]).await;
    let generation = standin
        .get("discovery.k8s.io/v1", "EndpointSlice", None, "web-1")
        .unwrap();
    assert_eq!(
        generation["metadata"]["generation"], 1,
        "a label is metadata: no new generation"
    );
    assert_eq!(names(&by_name), ["db-1"]);

    let refused = slices
        .list(&kube::api::ListParams::default().fields("spec.addressType=IPv4"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 400
            && s.message == "field label not supported: spec.addressType"),
        "{refused:?}"
    );
    Ok(())
}

#[tokio::test]
async fn metadata_clients_get_partial_object_metadata() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    let node = |name: &str| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDR": "10.244.0.0/24"}});
    standin.apply_value(node("node-a"));
    let client = client(&standin).await?;
    let nodes: Api<Node> = Api::all(client.clone());

    let list = nodes
        .list_metadata(&kube::api::ListParams::default())
        .await?;
    assert_eq!(list.items.len(), 1);
    let item = &list.items[0];
    assert_eq!(item.metadata.name.as_deref(), Some("node-a"));
    assert_eq!(
        item.types.as_ref().map(|t| t.kind.as_str()),
        Some("PartialObjectMetadata")
    );
    let got = nodes.get_metadata("node-a").await?;
    assert_eq!(got.metadata.uid, item.metadata.uid);

    let (store, writer) = reflector::store::<PartialObjectMeta<Node>>();
    // kube-rs 5's metadata watcher: an Api of PartialObjectMeta asks for metadata only.
    let partial: Api<PartialObjectMeta<Node>> = Api::all(client);
    let stream = reflector::reflector(writer, watcher(partial, watcher::Config::default()));
    let task = tokio::spawn(
        stream
            .default_backoff()
            .for_each(|_| futures::future::ready(())),
    );
    // node-b reaches the store through the metadata watch.
    wait_for("the metadata watch", || standin.open_watches() == 1).await;
    standin.apply_value(node("node-b"));
    wait_for("both nodes in the store", || store.state().len() == 2).await;
    task.abort();

    // On the wire: no spec, and the list and its items say what they are.
    let requests = standin.requests();
    let watch = requests.iter().find(|r| r.is_watch()).unwrap();
    assert_eq!(watch.path, "/api/v1/nodes");
    let body = ureq::get(format!("{}/api/v1/nodes", standin.url()))
        .header(
            "Accept",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        .call()?
        .body_mut()
        .read_to_string()?;
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(body["kind"], "PartialObjectMetadataList");
    assert_eq!(body["apiVersion"], "meta.k8s.io/v1");
    assert_eq!(body["items"][0]["kind"], "PartialObjectMetadata");
    assert_eq!(body["items"][0].get("spec"), None);
    Ok(())
}

#[tokio::test]
async fn many_watchers_at_once() -> anyhow::Result<()> {
    // Three controllers, each watching four resources.
    let standin = StandIn::start_local()?;
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut nodes = Vec::new();
    let mut leases = Vec::new();
    for _ in 0..3 {
        let client = client(&standin).await?;
        let config = watcher::Config::default;
        services.push(Reflected::start(
            Api::<Service>::all(client.clone()),
            config(),
        ));
        slices.push(Reflected::start(
            Api::<EndpointSlice>::all(client.clone()),
            config(),
        ));
        nodes.push(Reflected::start(Api::<Node>::all(client.clone()), config()));
        leases.push(Reflected::start(Api::<Lease>::all(client), config()));
    }
    // Everything below reaches the stores through the twelve open watches.
    wait_for("twelve watches", || standin.open_watches() == 12).await;
    standin.apply(&service("web", 80));
    standin.apply_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}],
    }));
    standin
        .apply_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}));
    standin.apply_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "lb", "namespace": "kube-system"}, "spec": {},
    }));
    for _ in 0..3 {
        let (s, e, n, l) = (
            services.remove(0),
            slices.remove(0),
            nodes.remove(0),
            leases.remove(0),
        );
        wait_for("every object in every store", || {
            s.store.state().len() == 1
                && e.store.state().len() == 1
                && n.store.state().len() == 1
                && l.store.state().len() == 1
        })
        .await;
    }
    assert_eq!(standin.open_watches(), 12);
    Ok(())
}

/// Real API-server bodies, reduced to the parts whose shape is compared. Recorded from a
/// v1.36 cluster in k8s-openapi's test replays (`k8s-openapi-tests/test-replays/v1-36/`,
/// `pod-list.json` and `watch_event-watch_pods_without_initial_events.json`).
const RECORDED_LIST: &str = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"554"},"items":[{"metadata":{"name":"coredns-589f44dc88-4fpns","namespace":"kube-system","uid":"f78db027-d69e-485e-9a9e-a6dc7493b6d7","resourceVersion":"481","creationTimestamp":"2026-06-15T04:14:53Z"},"spec":{},"status":{}}]}"#;
const RECORDED_ADDED: &str = r#"{"type":"ADDED","object":{"kind":"Pod","apiVersion":"v1","metadata":{"name":"coredns-589f44dc88-4fpns","namespace":"kube-system","uid":"f78db027-d69e-485e-9a9e-a6dc7493b6d7","resourceVersion":"481","creationTimestamp":"2026-06-15T04:14:53Z"},"spec":{},"status":{}}}"#;
const RECORDED_BOOKMARK: &str = r#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"550","annotations":{"k8s.io/initial-events-end":"true"}}}}"#;

/// The keys of `value` and of its objects, recursively, values replaced by their JSON type
/// (strings by their length class: decimal, RFC 3339, uuid, other).
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().take(1).map(shape).collect()),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            json!("decimal")
        }
        Value::String(s) if s.len() == 20 && s.ends_with('Z') => json!("time"),
        Value::String(s) if s.len() == 36 && s.matches('-').count() == 4 => json!("uuid"),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        other => other.clone(),
    }
}

/// The shape of what kind, name, namespace and a Service's spec make different from a Pod.
fn comparable(mut value: Value) -> Value {
    fn strip(object: &mut Value) {
        if let Some(map) = object.as_object_mut() {
            map.insert("spec".into(), json!({}));
            map.insert("status".into(), json!({}));
            if let Some(metadata) = map.get_mut("metadata").and_then(Value::as_object_mut) {
                metadata.remove("labels");
            }
        }
    }
    if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
        items.iter_mut().for_each(strip);
    }
    if let Some(object) = value.get_mut("object") {
        strip(object);
    }
    shape(&value)
}

#[test]
fn list_and_watch_bodies_have_the_recorded_shape() -> anyhow::Result<()> {
    let standin = StandIn::start_local()?;
    standin.apply(&service("web", 80));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WAIT))
        .http_status_as_error(false)
        .build()
        .into();

    let list = agent
        .get(format!("{}{SERVICES}", standin.url()))
        .call()?
        .body_mut()
        .read_to_string()?;
    let list: Value = serde_json::from_str(&list)?;
    assert_eq!(
        comparable(list),
        comparable(serde_json::from_str(RECORDED_LIST)?)
    );

    // A streaming list (the watch kube-rs opens with `streaming_lists()`): ADDED for what
    // exists, then the bookmark that ends the initial events.
    let url = format!(
        "{}{SERVICES}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true\
         &resourceVersionMatch=NotOlderThan&resourceVersion=",
        standin.url()
    );
    let mut response = agent.get(url).call()?;
    assert_eq!(response.headers()["content-type"], "application/json");
    let mut lines = BufReader::new(response.body_mut().as_reader()).lines();
    let added: Value = serde_json::from_str(&lines.next().unwrap()?)?;
    assert_eq!(
        comparable(added),
        comparable(serde_json::from_str(RECORDED_ADDED)?)
    );
    let bookmark: Value = serde_json::from_str(&lines.next().unwrap()?)?;
    let mut recorded: Value = serde_json::from_str(RECORDED_BOOKMARK)?;
    recorded["object"]["kind"] = json!("Service");
    assert_eq!(shape(&bookmark), shape(&recorded));

    // The error bodies, byte for byte as the real server writes them.
    let mut missing = agent
        .get(format!("{}{SERVICES}/db", standin.url()))
        .call()?;
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.body_mut().read_to_string()?,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"services \"db\" not found","reason":"NotFound","details":{"name":"db","kind":"services"},"code":404}"#
    );
    let mut strategic = agent
        .patch(format!("{}{SERVICES}/web", standin.url()))
        .header("Content-Type", "application/strategic-merge-patch+json")
        .send("{}")?;
    assert_eq!(strategic.status(), 415);
    let refused: Value = serde_json::from_str(&strategic.body_mut().read_to_string()?)?;
    assert_eq!(refused["reason"], "UnsupportedMediaType");
    Ok(())
}
