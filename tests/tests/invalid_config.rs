//! The invalid-manifest corpus (`lb-userspace/tests/data/invalid`, one file per mistake, each
//! with the object, field and mistake it must be rejected for in its header) against the real
//! binary: each stops `attach` at start-up with a one-line error naming the file, the object
//! and the field, and, arriving by live reload, is rejected for that same fault without changing
//! what is serving.
//!
//! The corpus uses VIPs the sandbox does not serve (198.18.150.0/24), so a live rejection can
//! only come from the file's own fault, not from a collision with the sandbox's service.

use std::{
    io::Read as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use lb_tests::{
    ChildGuard, Roots,
    netns::Netns,
    sandbox::{Binaries, EndpointState::Ready, HeldConnection, Sandbox, VIP4, write_atomically},
};

#[path = "../../lb-userspace/tests/data/invalid_corpus.rs"]
mod invalid_corpus;

use invalid_corpus::{Invalid, invalid_corpus};

fn corpus() -> Vec<Invalid> {
    invalid_corpus(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-userspace/tests/data/invalid"),
    )
}

/// The error line must locate the fault exactly (file, object, field) and say what it is.
fn assert_names_the_fault(line: &str, invalid: &Invalid, file: &Path) {
    let expected = invalid.expected_error(file);
    assert!(
        line.contains(&expected),
        "{}: expected {expected:?} in {line:?}",
        invalid.path.display()
    );
}

/// Run inside a namespace of its own on a veth, with private roots: were a file accepted, the
/// attach it let through would touch neither the host's loopback nor its pins, and the test
/// fails on a deadline instead of hanging on a controller that serves.
#[test]
fn each_invalid_manifest_stops_attach_at_start_up() {
    let ns = Netns::with_veth("badcfg-start", "veth-lb", "veth-peer").unwrap();
    let roots = Roots::new("badcfg-start");
    for invalid in corpus() {
        let file = invalid.path.display();
        let mut child = ChildGuard::new(
            ns.command(lb_tests::lb_userspace_bin())
                .args(["attach", "veth-lb", "--config"])
                .arg(&invalid.path)
                .args(["--pin-root", &roots.pin_root])
                .args(["--state-root", &roots.state_root])
                .env("RUST_BACKTRACE", "0")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.child_mut().try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{file} was accepted: attach runs"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        let mut pipe = child.child_mut().stderr.take().unwrap();
        pipe.read_to_string(&mut stderr).unwrap();
        assert!(!status.success(), "{file} was accepted: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("Error: "))
            .collect();
        let [error] = errors[..] else {
            panic!("one error line for {file}: {stderr}")
        };
        assert_names_the_fault(error, &invalid, &invalid.path);
        // Refused before anything was made.
        let link = ns.exec("ip", &["link", "show", "veth-lb"]).unwrap();
        assert!(
            !String::from_utf8_lossy(&link.stdout).contains("xdp"),
            "{file} left XDP attached"
        );
        assert!(
            !Path::new(&roots.pin_root).join("veth-lb").exists(),
            "{file} left pins"
        );
    }
}

#[test]
fn invalid_manifests_arriving_live_never_disturb_what_is_serving() {
    let dir = lb_tests::lb_userspace_bin();
    let mut sandbox = Sandbox::up("badcfg", Binaries::in_dir(dir.parent().unwrap())).unwrap();
    for index in 1..=2 {
        sandbox.start_pod(index).unwrap();
    }
    sandbox.write_service(2, false).unwrap();
    sandbox.write_endpoints(&[(1, Ready), (2, Ready)]).unwrap();
    sandbox.start_controller(false).unwrap();
    let vip = IpAddr::V4(VIP4);
    let mut held = HeldConnection::open(&sandbox, vip).unwrap();
    let pod = held.get().unwrap();
    let state = PathBuf::from(&sandbox.roots.state_root).join("veth-node.json");
    // What is applied for the Services serving before, without the events (each rejection
    // adds one, for `describe`). Reloads are per object: a valid object beside the invalid one
    // in a corpus file (the older Service of a conflict, the Service of a bad slice) is
    // applied, and only what served before must never change.
    let read_state = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap()
    };
    let identity = |s: &serde_json::Value| (s["namespace"].clone(), s["name"].clone());
    let serving: Vec<_> = read_state()["cluster"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(identity)
        .collect();
    let applied_part = || {
        let value = read_state();
        let of_serving = |list: &serde_json::Value| -> Vec<serde_json::Value> {
            list.as_array()
                .unwrap()
                .iter()
                .filter(|s| serving.contains(&identity(s)))
                .cloned()
                .collect()
        };
        (
            of_serving(&value["cluster"]["services"]),
            of_serving(&value["services"]),
            value["local_pods"].clone(),
        )
    };
    let applied = applied_part();
    assert!(!applied.0.is_empty() && !applied.1.is_empty());

    let bad = sandbox.config.path().join("zz-incoming.yaml");
    let controller = sandbox.controller.as_ref().unwrap();
    for (n, invalid) in corpus().iter().enumerate() {
        write_atomically(&bad, &invalid.text).unwrap();
        controller
            .wait_for("configuration rejected", n + 1, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{}: {e}", invalid.path.display()));
        let rejection = controller
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("configuration rejected"))
            .nth(n)
            .cloned()
            .unwrap();
        assert_names_the_fault(&rejection, invalid, &bad);
        assert_eq!(
            held.get().unwrap(),
            pod,
            "{} disturbed a held connection",
            invalid.path.display()
        );
    }
    assert_eq!(applied_part(), applied, "what served before never changed");
    let answers = sandbox.http_batch(vip, 10).unwrap();
    assert!(
        answers
            .iter()
            .all(|a| a.ends_with("-1") || a.ends_with("-2")),
        "{answers:?}"
    );
}
