//! Least privilege, as the binary enforces it.

use std::time::Duration;

use lb_tests::netns::Netns;

/// Without the capabilities it needs, `attach` stops at once and names them. Run on a veth of a
/// namespace of its own with private roots, so that a regression touches nothing of the host.
#[test]
fn attach_without_capabilities_names_what_is_missing() {
    let ns = Netns::with_veth("nocaps", "veth-lb", "veth-peer").unwrap();
    let roots = lb_tests::Roots::new("nocaps");
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
    let output = ns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&*copy)
        .args(["attach", "veth-lb", "--pin-root", &roots.pin_root])
        .args(["--state-root", &roots.state_root])
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
    let link = ns.exec("ip", &["link", "show", "veth-lb"]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"));
}

/// Exactly CAP_NET_ADMIN + CAP_BPF + CAP_PERFMON (no CAP_SYS_ADMIN, nothing else, none to
/// gain: the bounding set holds only those three) are enough to attach, apply a service and
/// serve, and the metrics then listen on loopback only: checked by what is bound, and by a
/// connection on the interface's own address being refused while loopback answers.
#[test]
fn attach_with_exactly_the_three_capabilities_serves_and_keeps_metrics_on_loopback() {
    let caps = "-all,+net_admin,+bpf,+perfmon";
    let running = lb_tests::attach_in_netns(
        "leastpriv",
        &[
            "setpriv",
            &format!("--inh-caps={caps}"),
            &format!("--ambient-caps={caps}"),
            &format!("--bounding-set={caps}"),
        ],
    )
    .unwrap();
    let ns = &running.ns;
    ns.ip(&["addr", "add", "198.18.0.2/24", "dev", "veth-lb"])
        .unwrap();
    // It ran with the three capabilities and no other.
    let status = std::fs::read_to_string(format!("/proc/{}/status", controller_pid(ns))).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(
        u64::from_str_radix(effective, 16).unwrap(),
        (1 << 12) | (1 << 38) | (1 << 39)
    );
    let link = ns.exec("ip", &["link", "show", "veth-lb"]).unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "no XDP program on veth-lb"
    );

    // What is bound: one listener on the metrics port, on 127.0.0.1.
    let tcp = ns
        .exec("cat", &["/proc/net/tcp", "/proc/net/tcp6"])
        .unwrap();
    let listeners: Vec<String> = String::from_utf8_lossy(&tcp.stdout)
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            // local_address is field 1 (hex address:port), st field 3 (0A = LISTEN).
            (fields.get(3) == Some(&"0A") && fields[1].ends_with(":24F8"))
                .then(|| fields[1].to_owned())
        })
        .collect();
    assert_eq!(listeners, ["0100007F:24F8"], "127.0.0.1:9464 only");
    let reachable = |addr: &str| {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        ns.enter(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        })
        .unwrap()
    };
    assert!(reachable("127.0.0.1:9464"));
    assert!(
        !reachable("198.18.0.2:9464"),
        "metrics reachable off loopback"
    );

    let stopped = running.stop();
    assert!(stopped.success(), "{stopped:?}");
}

/// The id of the one `lb-userspace` running in `ns`.
fn controller_pid(ns: &Netns) -> u32 {
    let pids = ns.exec("ip", &["netns", "pids", ns.name()]).unwrap();
    let pids: Vec<u32> = String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "lb-userspace")
        })
        .collect();
    let [pid] = pids[..] else {
        panic!("one lb-userspace in the namespace: {pids:?}")
    };
    pid
}

/// The pin and state folders are readable by root only.
#[test]
fn state_is_private() {
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
}
