//! Churn soak in the sandbox: endpoints change ten times a second while clients keep sending
//! requests and hold connections. Bounded (`LB_SOAK_SECONDS`, default 3; `cargo xtask soak`
//! runs a long one). Checked: every change is applied (the controller's generation follows the
//! writes); every answer comes from a pod that was an endpoint at some moment of its request;
//! no held connection to the pod that stays an endpoint throughout breaks; nothing is dropped
//! for want of a backend; afterwards, with pods 2 to 4 removed while they hold tracked flows,
//! the connection table keeps no entry of a removed backend.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{FlowKey, FlowValue};
use lb_tests::sandbox::{
    Binaries,
    EndpointState::{self, Ready},
    HeldConnection, Sandbox, VIP4,
};

/// The endpoint sets in force over time: `(written, set)`, in order. Set `k` may serve from
/// its write until set `k + 1` is applied; each set is applied before the next is written.
type Timeline = Arc<Mutex<Vec<(Instant, BTreeSet<u8>)>>>;

/// The pods that may answer a request made between `start` and `end`: those of every set that
/// may have served at some moment of it.
fn allowed(timeline: &[(Instant, BTreeSet<u8>)], start: Instant, end: Instant) -> BTreeSet<u8> {
    let mut pods = BTreeSet::new();
    for (k, (written, set)) in timeline.iter().enumerate() {
        // Until the next set was applied, which the writer waited for before writing the one
        // after: the write after next bounds it.
        let until = timeline.get(k + 2).map_or(end, |(w, _)| *w);
        if *written <= end && until >= start {
            pods.extend(set);
        }
    }
    pods
}

/// The answers of a client thread: `(sent, answered, pod)`.
type Answers = Vec<(Instant, Instant, String)>;

/// A client thread sending requests through the VIP until told to stop. Dropped (a failed
/// check unwinding), it stops and is joined, so the sandbox it shares is dropped and cleaned
/// up rather than left running when the test process exits.
struct Clients {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Answers, u32)>>,
}

impl Clients {
    fn start(sandbox: &Arc<Sandbox>, vip: IpAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sandbox, stop) = (sandbox.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                let mut failures = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    match sandbox.http_get(vip) {
                        Ok(pod) => answers.push((start, Instant::now(), pod)),
                        // A request placed on a pod removed in the same instant may fail.
                        Err(_) => failures += 1,
                    }
                }
                (answers, failures)
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread; its answers and how many requests failed.
    fn finish(&mut self) -> (Answers, u32) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("the client thread")
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.finish();
        }
    }
}

/// The backend ids of the applied state and its generation.
fn applied_state(sandbox: &Sandbox) -> (u64, BTreeSet<u64>) {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(&sandbox.roots.state_root).join("veth-node.json"))
            .unwrap(),
    )
    .unwrap();
    let ids = state["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["id"].as_u64().unwrap())
        })
        .collect();
    (state["generation"].as_u64().unwrap(), ids)
}

/// The backend ids the connection table's entries name.
fn tracked_backends(sandbox: &Sandbox) -> Vec<u64> {
    let conntrack = Map::from_map_data(
        MapData::from_pin(PathBuf::from(&sandbox.roots.pin_root).join("veth-node/CONNTRACK"))
            .unwrap(),
    )
    .unwrap();
    let conntrack: HashMap<_, FlowKey, FlowValue> = conntrack.try_into().unwrap();
    conntrack
        .iter()
        .filter_map(Result::ok)
        .map(|(_, v)| u64::from(v.backend_id))
        .collect()
}

/// Writes `endpoints` and waits until the controller applied them: its `applied`-th apply
/// (the first at start-up), with the generation it records. A watcher that missed the change
/// fails here.
fn write_and_apply(sandbox: &Sandbox, endpoints: &[(u8, EndpointState)], applied: usize) {
    sandbox.write_endpoints(endpoints).unwrap();
    sandbox.wait_applied(applied).unwrap();
    let (generation, _) = applied_state(sandbox);
    assert_eq!(
        generation, applied as u64,
        "generation of the applied state"
    );
}

#[test]
fn endpoints_churning_ten_times_a_second_never_misroute_or_break_surviving_flows() {
    let seconds: u64 = std::env::var("LB_SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = lb_tests::lb_userspace_bin();
    let mut sandbox = Sandbox::up("soak", Binaries::in_dir(dir.parent().unwrap())).unwrap();
    // Pod 5 runs but is never an endpoint: it must never answer.
    for index in 1..=5 {
        sandbox.start_pod(index).unwrap();
    }
    sandbox.write_service(4, false).unwrap();
    sandbox
        .write_endpoints(&[(1, Ready), (2, Ready), (3, Ready), (4, Ready)])
        .unwrap();
    sandbox.start_controller(false).unwrap();
    let vip = IpAddr::V4(VIP4);
    let sandbox = Arc::new(sandbox);

    // Held connections; those on pod 1, which stays an endpoint throughout, must never break.
    let mut held: Vec<(HeldConnection, String)> = (0..24)
        .map(|_| {
            let mut c = HeldConnection::open(&sandbox, vip).unwrap();
            let pod = c.get().unwrap();
            (c, pod)
        })
        .collect();
    let survivors = held.iter().filter(|(_, p)| p.ends_with("-1")).count();

    let timeline: Timeline = Arc::new(Mutex::new(vec![(Instant::now(), (1..=4).collect())]));
    let mut clients = Clients::start(&sandbox, vip);
    let start = Instant::now();
    let mut changes = 0usize;
    let mut seed = 0x2545_f491u64;
    let mut current: BTreeSet<u8> = (1..=4).collect();
    while start.elapsed() < Duration::from_secs(seconds) {
        // A set other than the one serving: an unchanged one would not be applied.
        let mut set = current.clone();
        while set == current {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            set = std::iter::once(1)
                .chain((2..=4u8).filter(|pod| (seed >> (pod * 8)) & 1 == 1))
                .collect();
        }
        let endpoints: Vec<(u8, EndpointState)> = set.iter().map(|p| (*p, Ready)).collect();
        timeline.lock().unwrap().push((Instant::now(), set.clone()));
        changes += 1;
        write_and_apply(&sandbox, &endpoints, changes + 1);
        current = set;
        for (connection, pod) in held.iter_mut().filter(|(_, p)| p.ends_with("-1")) {
            assert_eq!(
                &connection.get().unwrap(),
                pod,
                "a connection to the surviving pod broke"
            );
        }
        // Ten changes a second: pace the next one, now that this one is applied.
        let next = start + Duration::from_millis(100) * u32::try_from(changes).unwrap();
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let (answers, failures) = clients.finish();
    let timeline = timeline.lock().unwrap().clone();
    for (start, end, pod) in &answers {
        let index: u8 = pod.rsplit('-').next().unwrap().parse().unwrap();
        let allowed = allowed(&timeline, *start, *end);
        assert!(
            allowed.contains(&index),
            "{pod} answered a request made while the endpoints were {allowed:?}"
        );
    }
    assert!(answers.len() > 50, "{} requests answered", answers.len());
    assert!(changes >= 5, "only {changes} changes applied");

    // Nothing was dropped or refused for want of a backend, or dropped as malformed.
    let metrics = sandbox.scrape_metrics().unwrap();
    for reason in [
        "drop_no_backend",
        "reject_tcp",
        "reject_udp",
        "drop_malformed",
        "reverse_nat_failed",
    ] {
        let line = format!("lb_packets_total{{reason=\"{reason}\"}} 0");
        assert!(metrics.contains(&line), "{reason} moved:\n{metrics}");
    }

    // Pods 2 to 4 hold tracked flows (connections opened with all four ready, until each
    // holds one), then leave: nothing of theirs may stay in the connection table. Their ids
    // are not given to anyone after (only pod 1 remains), so an entry left naming them shows.
    let mut applied = changes + 1;
    if current.len() < 4 {
        applied += 1;
        write_and_apply(
            &sandbox,
            &[(1, Ready), (2, Ready), (3, Ready), (4, Ready)],
            applied,
        );
    }
    let mut leaving: Vec<(HeldConnection, String)> = Vec::new();
    while !(2..=4).all(|i| leaving.iter().any(|(_, p)| p.ends_with(&format!("-{i}")))) {
        assert!(leaving.len() < 64, "pods 2 to 4 all hold connections");
        let mut connection = HeldConnection::open(&sandbox, vip).unwrap();
        let pod = connection.get().unwrap();
        leaving.push((connection, pod));
    }
    let (_, before) = applied_state(&sandbox);
    let tracked_before = tracked_backends(&sandbox);
    write_and_apply(&sandbox, &[(1, Ready)], applied + 1);
    let (_, pod1_only) = applied_state(&sandbox);
    let removed: BTreeSet<u64> = before.difference(&pod1_only).copied().collect();
    assert_eq!(
        pod1_only.len(),
        4,
        "one data-plane service per Service port (TCP and UDP) and family, pod 1 only"
    );
    assert!(
        tracked_before.iter().any(|id| removed.contains(id)),
        "the leaving pods held tracked flows before they left: {tracked_before:?}"
    );
    let stale: Vec<u64> = tracked_backends(&sandbox)
        .into_iter()
        .filter(|id| !pod1_only.contains(id))
        .collect();
    assert!(
        stale.is_empty(),
        "flows of removed backends left in the connection table: {stale:?}"
    );
    drop(leaving);
    println!(
        "soak: {seconds} s, {changes} endpoint changes, {} requests answered ({} failed while their pod was removed), {survivors} held connections to the surviving pod unbroken",
        answers.len(),
        failures
    );
}
