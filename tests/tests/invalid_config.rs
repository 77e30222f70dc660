//! The invalid-manifest corpus (`lb-userspace/tests/data/invalid`, one file per mistake) against
//! the real binary: each stops `attach` at start-up with a one-line error naming the file, and,
//! arriving by live reload, none changes what is serving.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_tests::sandbox::{
    Binaries, EndpointState::Ready, HeldConnection, Sandbox, VIP4, write_atomically,
};

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-userspace/tests/data/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 30);
    files
}

#[test]
fn each_invalid_manifest_stops_attach_at_start_up() {
    for file in corpus() {
        let output = Command::new(lb_tests::lb_userspace_bin())
            .args(["attach", "lo", "--config"])
            .arg(&file)
            .env("RUST_BACKTRACE", "0")
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{} was accepted", file.display());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let error = stderr
            .lines()
            .find(|l| l.starts_with("Error: "))
            .unwrap_or_else(|| panic!("no error line for {}: {stderr}", file.display()));
        assert!(error.contains(&file.display().to_string()), "{error}");
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
    let applied = std::fs::read_to_string(&state).unwrap();

    let bad = sandbox.config.path().join("zz-incoming.yaml");
    for (n, file) in corpus().iter().enumerate() {
        write_atomically(&bad, &std::fs::read_to_string(file).unwrap()).unwrap();
        sandbox
            .controller
            .as_ref()
            .unwrap()
            .wait_for("configuration rejected", n + 1, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(
            held.get().unwrap(),
            pod,
            "{} disturbed a held connection",
            file.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        applied,
        "the applied state never changed"
    );
    let answers = sandbox.http_batch(vip, 10).unwrap();
    assert!(
        answers
            .iter()
            .all(|a| a.ends_with("-1") || a.ends_with("-2")),
        "{answers:?}"
    );
}
