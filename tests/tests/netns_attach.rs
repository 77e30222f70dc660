//! The XDP program attached to a veth inside namespaces this test creates, with real traffic.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::UdpSocket,
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use lb_common::Reason;
use lb_tests::{
    ChildGuard, Roots,
    netns::{Netns, veth_pair},
    sandbox::{LoggedChild, READY},
};
use lb_userspace::{AttachMode, Dataplane};
use nix::sys::signal::Signal;

/// Two namespaces joined by a veth pair: `client` 198.18.0.1 / 2001:db8::1 on `veth-c`,
/// `server` 198.18.0.2 / 2001:db8::2 on `veth-s`.
struct Pair {
    client: Netns,
    server: Netns,
}

fn pair(tag: &str) -> Pair {
    let client = Netns::create(&format!("{tag}c")).unwrap();
    let server = Netns::create(&format!("{tag}s")).unwrap();
    veth_pair((&client, "veth-c"), (&server, "veth-s")).unwrap();
    for (ns, dev, v4, v6) in [
        (&client, "veth-c", "198.18.0.1/24", "2001:db8::1/64"),
        (&server, "veth-s", "198.18.0.2/24", "2001:db8::2/64"),
    ] {
        ns.ip(&["addr", "add", v4, "dev", dev]).unwrap();
        ns.ip(&["addr", "add", v6, "dev", dev, "nodad"]).unwrap();
    }
    Pair { client, server }
}

fn send_udp(ns: &Netns, to: &str, count: usize) {
    let to = to.to_owned();
    ns.enter(move || {
        let bind = if to.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let socket = UdpSocket::bind(bind).unwrap();
        for _ in 0..count {
            socket.send_to(b"ping", &to).unwrap();
            // Pace the sends so the first ones are not lost while the neighbour resolves.
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .unwrap();
}

#[test]
fn attached_program_counts_real_ipv4_and_ipv6_traffic() {
    let Pair { client, server } = pair("att");
    let mut dataplane = Dataplane::load().unwrap();
    server
        .enter(|| dataplane.attach("veth-s", AttachMode::Auto))
        .unwrap()
        .unwrap();

    send_udp(&client, "198.18.0.2:9", 20);
    send_udp(&client, "[2001:db8::2]:9", 20);

    // No service is configured: all IP traffic passes as not-for-a-VIP. The neighbour is
    // resolved before any IP packet leaves, so ARP must have been seen too. The last
    // datagrams may still be on the veth when the sender is done: wait for them.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ip = dataplane.reason_counter(Reason::PassNotVip).unwrap();
    while ip.packets < 40 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        ip = dataplane.reason_counter(Reason::PassNotVip).unwrap();
    }
    let not_ip = dataplane.reason_counter(Reason::PassNotIp).unwrap();
    assert!(ip.packets >= 40, "IP packets counted: {ip:?}");
    assert!(not_ip.packets >= 1, "ARP counted: {not_ip:?}");
    assert!(ip.bytes >= 40 * 46, "IP bytes counted: {ip:?}");

    dataplane.detach_all().unwrap();
    // Packets already queued on the veth's NAPI may still meet the old program: let them
    // drain (the counter holds still for 100 ms) before freezing it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut frozen = dataplane.reason_counter(Reason::PassNotVip).unwrap();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = dataplane.reason_counter(Reason::PassNotVip).unwrap();
        if now == frozen || Instant::now() > deadline {
            break;
        }
        frozen = now;
    }
    send_udp(&client, "198.18.0.2:9", 5);
    assert_eq!(
        dataplane.reason_counter(Reason::PassNotVip).unwrap(),
        frozen,
        "no packet counted after detaching"
    );
}

/// The released binary as an operator runs it: attach, count, detach on SIGTERM.
#[test]
fn cli_attaches_counts_and_detaches_on_sigterm() {
    let Pair { client, server } = pair("cli");
    let roots = lb_tests::Roots::new("cli");
    let child = server
        .command(lb_tests::lb_userspace_bin())
        .args(["attach", "veth-s", "--stats-interval", "1"])
        .args([
            "--pin-root",
            &roots.pin_root,
            "--state-root",
            &roots.state_root,
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard::new(child);
    let stdout = child.child_mut().stdout.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                lines.lock().unwrap().push(line.unwrap());
            }
        })
    };
    let wait_for = |needle: &str, timeout: Duration| {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if lines.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    let attached = wait_for(READY, Duration::from_secs(10));
    assert!(attached, "no attach line: {:?}", lines.lock().unwrap());

    send_udp(&client, "198.18.0.2:9", 10);
    assert!(
        wait_for("reason=\"pass_not_vip\"", Duration::from_secs(5)),
        "no IP counter line: {:?}",
        lines.lock().unwrap()
    );

    let status = child.stop(Duration::from_secs(5)).unwrap();
    reader.join().unwrap();
    let output = lines.lock().unwrap().join("\n");
    assert!(status.success(), "exit status {status}: {output}");
    assert!(output.contains("detached"), "{output}");
    roots.assert_detached(&server, "veth-s");
}

/// `--keep-on-exit` leaves the data plane attached after SIGTERM; `detach` removes it.
#[test]
fn keep_on_exit_then_detach_removes_everything() {
    let Pair {
        client: _client,
        server,
    } = pair("keep");
    let roots = lb_tests::Roots::new("keep");
    let mut command = server.command(lb_tests::lb_userspace_bin());
    command
        .args([
            "attach",
            "veth-s",
            "--stats-interval",
            "0",
            "--keep-on-exit",
        ])
        .args([
            "--pin-root",
            &roots.pin_root,
            "--state-root",
            &roots.state_root,
        ]);
    let controller = LoggedChild::spawn(command, false).unwrap();
    // Start-up complete: a stop before would remove the data plane despite --keep-on-exit.
    controller.wait_ready(Duration::from_secs(10)).unwrap();
    let child = controller.child;
    let pins = std::path::Path::new(&roots.pin_root).join("veth-s");
    assert!(pins.join("link_xdp").exists(), "pinned link");
    assert!(child.stop(Duration::from_secs(5)).unwrap().success());
    let attached = |server: &Netns| {
        let link = server
            .exec("ip", &["-d", "link", "show", "veth-s"])
            .unwrap();
        String::from_utf8_lossy(&link.stdout).contains("prog/xdp")
    };
    assert!(
        attached(&server),
        "still attached after a graceful stop with --keep-on-exit"
    );
    assert!(pins.join("CONNTRACK").exists(), "maps still pinned");

    roots
        .cli(&lb_tests::lb_userspace_bin(), &["detach", "veth-s"])
        .unwrap();
    assert!(!pins.exists(), "pins removed");
    assert!(!attached(&server), "detached once the pins are gone");
    roots.assert_detached(&server, "veth-s");
}

/// A Service with one endpoint, so that start-up includes a first apply.
fn write_manifests(dir: &Path) {
    std::fs::write(
        dir.join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  externalIPs: [198.18.100.1]\n  \
         ports:\n  - port: 8080\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\n\
         subsets:\n- addresses:\n  - ip: 198.18.0.1\n  ports:\n  - port: 8080\n",
    )
    .unwrap();
}

/// A [`pair`] with private roots and the manifests folder a controller on it serves.
fn pair_with_config(tag: &str) -> (Pair, Roots, tempfile::TempDir) {
    let config = tempfile::tempdir().unwrap();
    write_manifests(config.path());
    (pair(tag), Roots::new(tag), config)
}

/// `lb-userspace attach veth-s` in `server`, with `roots` and `config`.
fn attach_command(
    server: &Netns,
    roots: &Roots,
    config: &Path,
    extra: &[&str],
) -> std::process::Command {
    let mut command = roots.attach_command(server, &lb_tests::lb_userspace_bin(), "veth-s", config);
    command.args(extra);
    command
}

/// `net.ipv4.conf.all.send_redirects` and `net.ipv4.conf.veth-s.send_redirects` in `ns`, read
/// by `sysctl` run inside it.
fn send_redirects(ns: &Netns) -> (String, String) {
    let output = ns
        .exec(
            "sysctl",
            &[
                "-n",
                "net.ipv4.conf.all.send_redirects",
                "net.ipv4.conf.veth-s.send_redirects",
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut lines = text.lines().map(str::to_owned);
    (lines.next().unwrap(), lines.next().unwrap())
}

fn set_send_redirects(ns: &Netns, all: &str, iface: &str) {
    ns.exec(
        "sysctl",
        &[
            "-qw",
            &format!("net.ipv4.conf.all.send_redirects={all}"),
            &format!("net.ipv4.conf.veth-s.send_redirects={iface}"),
        ],
    )
    .unwrap();
}

/// What an attach to `veth-s` leaves: its pin folder, its state file and redirect record, an
/// XDP program on the interface, a tcx egress program on it, processes in the namespace, ICMP
/// redirect settings changed from 1 (what the test sets first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Leftovers {
    pins: bool,
    state: bool,
    xdp: bool,
    tcx: bool,
    processes: bool,
    redirects: bool,
}

impl Leftovers {
    const NONE: Self = Self {
        pins: false,
        state: false,
        xdp: false,
        tcx: false,
        processes: false,
        redirects: false,
    };

    fn of(server: &Netns, roots: &Roots) -> Self {
        let link = server
            .exec("ip", &["-d", "link", "show", "veth-s"])
            .unwrap();
        let tcx = server
            .enter(|| SchedClassifier::query_tcx("veth-s", TcAttachType::Egress))
            .unwrap()
            .unwrap()
            .1;
        let pids = lb_tests::netns::run("ip", &["netns", "pids", server.name()]).unwrap();
        Self {
            pins: Path::new(&roots.pin_root).join("veth-s").exists(),
            state: ["veth-s.json", "veth-s.sysctl"]
                .iter()
                .any(|f| Path::new(&roots.state_root).join(f).exists()),
            xdp: String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
            tcx: !tcx.is_empty(),
            processes: !String::from_utf8_lossy(&pids.stdout).trim().is_empty(),
            redirects: send_redirects(server) != ("1".into(), "1".into()),
        }
    }
}

/// Where in the controller's life a stop signal landed, read from its log (for the record
/// only: the test asserts the same outcome wherever it lands).
fn landing(log: &[String], status: std::process::ExitStatus) -> &'static str {
    let has = |needle: &str| log.iter().any(|l| l.contains(needle));
    if has("step=\"loading the data plane\"") {
        "during the load"
    } else if has("step=\"attaching\"") {
        "during the attach"
    } else if has("step=\"the first apply\"") {
        "during the first apply"
    } else if has("stop signal during start-up") {
        "between steps"
    } else if has("stopping") {
        "after start-up"
    } else if status.signal().is_some() {
        "before the handlers (default action)"
    } else {
        "elsewhere"
    }
}

/// A stop signal at any moment of start-up ends the controller and leaves nothing behind, as
/// one after start-up does; with `--keep-on-exit` what is left is all or nothing. The delays
/// only move where the signal lands (before the handlers, during the load, the attach, the first
/// apply, or after start-up): nothing asserted depends on where it did.
#[test]
fn a_stop_signal_at_any_moment_of_start_up_leaves_nothing_behind() {
    let (
        Pair {
            client: _client,
            server,
        },
        roots,
        config,
    ) = pair_with_config("sig");
    set_send_redirects(&server, "1", "1");
    let delays_ms = [0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 700, 1000];
    let mut landed: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (signal, keep_on_exit) in [
        (Signal::SIGTERM, false),
        (Signal::SIGINT, false),
        (Signal::SIGTERM, true),
    ] {
        let round = if keep_on_exit {
            "--keep-on-exit"
        } else {
            signal.as_str()
        };
        let extra: &[&str] = if keep_on_exit {
            &["--keep-on-exit"]
        } else {
            &[]
        };
        for delay in delays_ms {
            let controller =
                LoggedChild::spawn(attach_command(&server, &roots, config.path(), extra), false)
                    .unwrap();
            std::thread::sleep(Duration::from_millis(delay));
            // A generous bound: the load the signal may interrupt finishes first.
            let status = controller
                .child
                .stop_with(signal, Duration::from_secs(60))
                .unwrap();
            let log = controller.log.lock().unwrap().clone();
            let context = format!("{round}, {delay} ms: {status}\n{}", log.join("\n"));
            // Exited by itself (handled), or killed by the signal before it had handlers (and
            // so before it made anything); never by the SIGKILL that follows the grace period.
            assert!(
                status.success() || status.signal() == Some(signal as i32),
                "{context}"
            );
            *landed.entry((round, landing(&log, status))).or_default() += 1;
            let left = Leftovers::of(&server, &roots);
            if keep_on_exit && left != Leftovers::NONE {
                let whole = Leftovers {
                    pins: true,
                    state: true,
                    xdp: true,
                    tcx: true,
                    processes: false,
                    redirects: true,
                };
                assert_eq!(left, whole, "kept, so kept whole: {context}");
                let state: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(Path::new(&roots.state_root).join("veth-s.json"))
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(state["generation"], 1, "{context}");
                roots
                    .cli(&lb_tests::lb_userspace_bin(), &["detach", "veth-s"])
                    .unwrap();
                assert_eq!(Leftovers::of(&server, &roots), Leftovers::NONE, "{context}");
            } else {
                assert_eq!(left, Leftovers::NONE, "{context}");
            }
        }
    }
    println!("where the signals landed: {landed:#?}");
}

/// Attach turns ICMP redirects off on the interface and for the namespace (either at 1 sends
/// them), and exiting puts back the values found; a restart that adopts the attach keeps the
/// originals recorded by the first, and `detach` run from the host puts them back too.
#[test]
fn icmp_redirects_are_off_while_attached_and_put_back_after() {
    let (
        Pair {
            client: _client,
            server,
        },
        roots,
        config,
    ) = pair_with_config("redir");
    let record = Path::new(&roots.state_root).join("veth-s.sysctl");
    let off = ("0".to_owned(), "0".to_owned());
    let start = |extra: &[&str]| {
        let controller =
            LoggedChild::spawn(attach_command(&server, &roots, config.path(), extra), false)
                .unwrap();
        controller.wait_ready(Duration::from_secs(20)).unwrap();
        controller
    };

    // A controller that exits detaches and puts both back.
    set_send_redirects(&server, "1", "1");
    let controller = start(&[]);
    assert_eq!(send_redirects(&server), off, "off while attached");
    assert!(
        controller
            .child
            .stop(Duration::from_secs(10))
            .unwrap()
            .success()
    );
    assert_eq!(send_redirects(&server), ("1".into(), "1".into()));
    assert!(!record.exists(), "the record goes with the attach");

    // Kept across a restart (which finds them at 0 and must not record that), then `detach`
    // from the host, not inside the namespace. Different originals, so a swap would show.
    set_send_redirects(&server, "1", "0");
    let keep = ["--keep-on-exit"];
    let controller = start(&keep);
    assert_eq!(send_redirects(&server), off);
    assert!(
        controller
            .child
            .stop(Duration::from_secs(10))
            .unwrap()
            .success()
    );
    assert_eq!(send_redirects(&server), off, "kept with the data plane");
    let controller = start(&keep);
    assert_eq!(
        controller.count("adopting the state of the previous controller"),
        1
    );
    assert!(
        controller
            .child
            .stop(Duration::from_secs(10))
            .unwrap()
            .success()
    );
    assert_eq!(send_redirects(&server), off);
    let detached = roots
        .cli(&lb_tests::lb_userspace_bin(), &["detach", "veth-s"])
        .unwrap();
    assert!(
        detached.contains("ICMP redirect settings put back"),
        "{detached}"
    );
    assert_eq!(send_redirects(&server), ("1".into(), "0".into()));
    assert!(!record.exists());
}
