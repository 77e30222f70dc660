//! Helpers for tests that need real kernel objects: network namespaces, veth links and the
//! built `lb-userspace` binary. `xtask` builds its sandbox from the same pieces.

pub mod apiserver;
pub mod cluster;
#[path = "../../lb-ebpf/src/frame.rs"]
pub mod frame;
pub mod frames;
pub mod netns;
#[path = "../../lb-ebpf/src/offsets.rs"]
pub mod offsets;
#[path = "../../lb-ebpf/src/parse.rs"]
pub mod parse;
pub mod parser;
pub mod sandbox;

use std::path::PathBuf;

/// Path of the `lb-userspace` binary built in the same target directory as the running test
/// (`LB_USERSPACE_BIN` overrides it). `cargo xtask test` builds it before running the tests.
pub fn lb_userspace_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LB_USERSPACE_BIN") {
        return path.into();
    }
    // Test binaries live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("path of the running test");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary inside target/<profile>/deps");
    let bin = profile_dir.join("lb-userspace");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` first (`cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// Pin and state roots private to one test (under the default bpffs root), removed on drop.
#[derive(Debug)]
pub struct Roots {
    /// `--pin-root`.
    pub pin_root: String,
    /// `--state-root`.
    pub state_root: String,
}

impl Roots {
    /// The arguments of `lb-userspace attach IFACE` serving `config` with these roots, the
    /// periodic counter log off (tests read counters themselves).
    pub fn attach_args(&self, iface: &str, config: &std::path::Path) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> =
            ["attach", iface, "--stats-interval", "0", "--config"]
                .map(Into::into)
                .to_vec();
        args.push(config.into());
        for arg in [
            "--pin-root",
            &self.pin_root,
            "--state-root",
            &self.state_root,
        ] {
            args.push(arg.into());
        }
        args
    }

    /// `controller attach IFACE` run in `ns` (see [`Roots::attach_args`]), its log uncoloured.
    pub fn attach_command(
        &self,
        ns: &netns::Netns,
        controller: &std::path::Path,
        iface: &str,
        config: &std::path::Path,
    ) -> std::process::Command {
        let mut command = ns.command(controller);
        command.args(self.attach_args(iface, config));
        command
    }

    /// Roots named `lbt-<tag>-<pid>`. Mounts the bpffs at `/run/lb/bpf` from this process
    /// when it is not there: a controller run by `ip netns exec` gets a mount namespace of its
    /// own, and a bpffs it mounted there would vanish with it, pins and all.
    pub fn new(tag: &str) -> Self {
        use nix::{
            mount::{MsFlags, mount},
            sys::statfs::{BPF_FS_MAGIC, statfs},
        };
        let root = std::path::Path::new("/run/lb/bpf");
        std::fs::create_dir_all(root).expect("creating /run/lb/bpf");
        if !statfs(root).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC) {
            mount(
                Some("bpf"),
                root,
                Some("bpf"),
                MsFlags::empty(),
                Some("mode=0700"),
            )
            .expect("mounting a bpffs at /run/lb/bpf");
        }
        let name = format!("{}{tag}-{}", netns::PREFIX, std::process::id());
        Self {
            pin_root: format!("/run/lb/bpf/{name}"),
            state_root: format!("/run/lb/state/{name}"),
        }
    }
}

impl Roots {
    /// Runs `binary ARGS --pin-root .. --state-root ..` (the views, `detach`) from the host and
    /// returns its standard output; fails with its standard error.
    pub fn cli(&self, binary: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
        let output = std::process::Command::new(binary)
            .args(args)
            .args([
                "--pin-root",
                &self.pin_root,
                "--state-root",
                &self.state_root,
            ])
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "lb-userspace {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The one-service manifest [`attach_in_netns`] serves: `web` on 198.18.100.1:8080/TCP with
/// endpoints 198.18.1.1 and 198.18.1.2.
pub const WEB_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  \
    externalIPs: [198.18.100.1]\n  ports:\n  - port: 8080\n---\napiVersion: v1\nkind: Endpoints\n\
    metadata:\n  name: web\nsubsets:\n- addresses:\n  - ip: 198.18.1.1\n  - ip: 198.18.1.2\n";

/// A controller attached to `veth-lb` in a namespace of its own (see [`netns::Netns::with_veth`])
/// with private roots, serving [`WEB_SERVICE`]. Dropping it stops the controller, then removes
/// the namespace and the roots.
pub struct NetnsController {
    /// The controller, once it logged that start-up is over (taken by [`NetnsController::stop`]).
    controller: Option<sandbox::LoggedChild>,
    /// Its namespace.
    pub ns: netns::Netns,
    /// Its pin and state roots.
    pub roots: Roots,
    _config: tempfile::TempDir,
}

/// Starts a [`NetnsController`] tagged `tag`; `wrapper` (a program and its arguments, e.g.
/// `setpriv` and the capabilities to keep) runs the binary when not empty.
pub fn attach_in_netns(tag: &str, wrapper: &[&str]) -> anyhow::Result<NetnsController> {
    attach_in_netns_with(tag, wrapper, &[])
}

/// [`attach_in_netns`], with `args` added to `attach`'s.
pub fn attach_in_netns_with(
    tag: &str,
    wrapper: &[&str],
    args: &[&str],
) -> anyhow::Result<NetnsController> {
    let ns = netns::Netns::with_veth(tag, "veth-lb", "veth-peer")?;
    let roots = Roots::new(tag);
    let config = tempfile::tempdir()?;
    std::fs::write(config.path().join("web.yaml"), WEB_SERVICE)?;
    let command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = ns.command(program);
            command
                .args(args)
                .arg(lb_userspace_bin())
                .args(roots.attach_args("veth-lb", config.path()));
            command
        }
        None => roots.attach_command(&ns, &lb_userspace_bin(), "veth-lb", config.path()),
    };
    let mut command = command;
    command.args(args);
    let controller = sandbox::LoggedChild::spawn(command, false)?;
    controller.wait_ready(std::time::Duration::from_secs(10))?;
    Ok(NetnsController {
        controller: Some(controller),
        ns,
        roots,
        _config: config,
    })
}

impl NetnsController {
    /// The folder of manifests it serves (holding `web.yaml`).
    pub fn config_dir(&self) -> &std::path::Path {
        self._config.path()
    }

    /// The running controller and its log.
    pub fn controller(&self) -> &sandbox::LoggedChild {
        self.controller.as_ref().expect("running until stopped")
    }

    /// Stops the controller (SIGTERM) and checks that its own detach removed everything
    /// ([`Roots::assert_detached`]) before the roots' drop removes the folders, which would hide
    /// a leak; returns its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.stop_and_check()
            .expect("the controller was running until stopped")
    }

    fn stop_and_check(&mut self) -> Option<std::process::ExitStatus> {
        let controller = self.controller.take()?;
        let status = controller
            .child
            .stop(std::time::Duration::from_secs(10))
            .expect("stopping the controller");
        if !std::thread::panicking() {
            self.roots.assert_detached(&self.ns, "veth-lb");
        }
        Some(status)
    }
}

impl Drop for NetnsController {
    fn drop(&mut self) {
        self.stop_and_check();
    }
}

impl Roots {
    /// What the controller's own detach left of its attach to `iface` in `ns`: pins, the
    /// state and redirect records, an XDP program, a tcx (TC egress) program. Empty when it removed
    /// everything. Checked before [`Roots`]' drop removes the folders, which would hide a
    /// leak from `cargo xtask test`'s leftover check.
    pub fn leftovers(&self, ns: &netns::Netns, iface: &str) -> anyhow::Result<Vec<String>> {
        let mut left = Vec::new();
        let pins = std::path::Path::new(&self.pin_root).join(iface);
        if pins.exists() {
            left.push(format!("pins {}", pins.display()));
        }
        for record in ["json", "sysctl", "announce"] {
            let file = std::path::Path::new(&self.state_root).join(format!("{iface}.{record}"));
            if file.exists() {
                left.push(format!("state {}", file.display()));
            }
        }
        // tcx programs (the reverse NAT), asked of the kernel: bpftool 7.1 does not list them.
        let owned = iface.to_owned();
        let (_, tcx) = ns.enter(move || {
            aya::programs::SchedClassifier::query_tcx(&owned, aya::programs::TcAttachType::Egress)
        })??;
        if !tcx.is_empty() {
            left.push(format!("{} tcx egress programs on {iface}", tcx.len()));
        }
        let link = ns.exec("ip", &["-d", "link", "show", iface])?;
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        if link.contains("prog/xdp") {
            left.push(format!("XDP on {iface}: {link}"));
        }
        Ok(left)
    }

    /// Asserts that the controller's own detach removed everything of its attach to `iface`
    /// in `ns` (see [`Roots::leftovers`]).
    pub fn assert_detached(&self, ns: &netns::Netns, iface: &str) {
        let left = self.leftovers(ns, iface).expect("listing leftovers");
        assert!(left.is_empty(), "the controller's detach left: {left:#?}");
    }
}

/// The Prometheus text a controller in `ns` serves on its default metrics address.
pub fn scrape_metrics(ns: &netns::Netns) -> anyhow::Result<String> {
    get_from_controller(ns, "/metrics")
}

/// The whole HTTP response (status line, headers, body) of a GET of `path` from the
/// controller's metrics listener in `ns`.
pub fn get_from_controller(ns: &netns::Netns, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    ns.enter(|| -> anyhow::Result<String> {
        let mut stream = std::net::TcpStream::connect("127.0.0.1:9464")?;
        stream.write_all(request.as_bytes())?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })?
}

impl Drop for Roots {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_root);
        let _ = std::fs::remove_dir_all(&self.state_root);
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL after a grace period) when dropped,
/// so an early return or a panic never leaves a controller running.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<std::process::Child>,
}

impl ChildGuard {
    /// Takes ownership of `child`.
    pub fn new(child: std::process::Child) -> Self {
        Self { child: Some(child) }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child
            .as_ref()
            .expect("child present until stopped")
            .id()
    }

    /// Mutable access to the child, e.g. to take its pipes.
    pub fn child_mut(&mut self) -> &mut std::process::Child {
        self.child.as_mut().expect("child present until stopped")
    }

    /// Sends SIGTERM and waits up to `grace` before SIGKILL; returns the exit status.
    pub fn stop(self, grace: std::time::Duration) -> std::io::Result<std::process::ExitStatus> {
        self.stop_with(nix::sys::signal::Signal::SIGTERM, grace)
    }

    /// Sends `signal` and waits up to `grace` before SIGKILL; returns the exit status.
    pub fn stop_with(
        mut self,
        signal: nix::sys::signal::Signal,
        grace: std::time::Duration,
    ) -> std::io::Result<std::process::ExitStatus> {
        let child = self.child.take().expect("child present until stopped");
        terminate(child, signal, grace)
    }
}

fn terminate(
    mut child: std::process::Child,
    signal: nix::sys::signal::Signal,
    grace: std::time::Duration,
) -> std::io::Result<std::process::ExitStatus> {
    use nix::{sys::signal::kill, unistd::Pid};
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = terminate(
                child,
                nix::sys::signal::Signal::SIGTERM,
                std::time::Duration::from_secs(2),
            );
        }
    }
}
