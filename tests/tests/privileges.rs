//! Least privilege, as the binary enforces it.

use std::process::Command;

/// Without the capabilities it needs, `attach` stops at once and names them.
#[test]
fn attach_without_capabilities_names_what_is_missing() {
    // A copy others may execute: the build tree may not be reachable to `nobody`.
    let copy = tempfile::Builder::new()
        .prefix("lb-userspace")
        .tempfile()
        .unwrap()
        .into_temp_path();
    std::fs::copy(lb_tests::lb_userspace_bin(), &copy).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&*copy)
        .args(["attach", "lo"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for capability in ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"] {
        assert!(
            stderr.contains(capability),
            "{capability} not named: {stderr}"
        );
    }
}

/// The pin and state folders are readable by root only; metrics listen on loopback by
/// default.
#[test]
fn state_is_private_and_metrics_stay_on_loopback() {
    use std::os::unix::fs::PermissionsExt as _;
    let roots = lb_tests::Roots::new("priv");
    let paths = lb_userspace::pins::Paths::new(
        std::path::Path::new(&roots.pin_root),
        std::path::Path::new(&roots.state_root),
        "eth0",
    );
    paths
        .prepare(std::path::Path::new(&roots.pin_root))
        .unwrap();
    for dir in [&paths.pin_dir, paths.state_file.parent().unwrap()] {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", dir.display());
    }
    let help = Command::new(lb_tests::lb_userspace_bin())
        .args(["attach", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("127.0.0.1:9464"));
}
