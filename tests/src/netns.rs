//! Network namespaces and veth links made with iproute2, removed on drop.
//!
//! Every namespace is named `lbt-<tag>-<pid>` so that [`sweep_stale`] can remove what a crashed
//! run left behind without touching a live run's namespaces.

use std::{
    fs::File,
    process::{Command, Output},
    thread,
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

/// Prefix of every namespace the project creates.
pub const PREFIX: &str = "lbt-";

/// Runs `ip` with `args` and fails with its stderr if it fails.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args).map(drop)
}

/// Runs a command and fails with its stderr if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// A network namespace, deleted (with every link inside it) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `lbt-<tag>-<pid>`, with its loopback up.
    pub fn create(tag: &str) -> anyhow::Result<Self> {
        let name = format!("{PREFIX}{tag}-{}", std::process::id());
        // A namespace of the same name can only be a leftover of this very process.
        let _ = run("ip", &["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Creates `lbt-<tag>-<pid>` with a veth pair `link` <-> `peer` inside it, both up: a link
    /// to attach to that touches nothing outside the namespace.
    pub fn with_veth(tag: &str, link: &str, peer: &str) -> anyhow::Result<Self> {
        let netns = Self::create(tag)?;
        netns.ip(&["link", "add", link, "type", "veth", "peer", "name", peer])?;
        for name in [link, peer] {
            netns.ip(&["link", "set", name, "up"])?;
        }
        Ok(netns)
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <name> args`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command prepared to run inside the namespace, for callers that spawn and wait.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `f` on a thread that has entered the namespace, so sockets and netlink calls it
    /// makes belong to the namespace. The calling thread's namespace is untouched.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("entering {path}"))?;
                    Ok(f())
                })
                .join()
                .expect("thread inside the namespace panicked")
        })
    }
}

/// A closure that binds a TCP listener at `addr` inside the namespace `name`, each time it is
/// called (a server that goes away and comes back binds again): a thread of its own enters
/// the namespace, binds and hands the socket back, which stays in that namespace.
pub fn tcp_binder(
    name: &str,
    addr: std::net::SocketAddr,
) -> impl Fn() -> std::io::Result<std::net::TcpListener> + Send + Sync + 'static {
    let path = format!("/var/run/netns/{name}");
    move || {
        let file = File::open(&path)?;
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                    std::net::TcpListener::bind(addr)
                })
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("binding thread panicked")))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("removing namespace {}: {error:#}", self.name);
        }
    }
}

/// Creates a veth pair with one end in each namespace, both up.
pub fn veth_pair(a: (&Netns, &str), b: (&Netns, &str)) -> anyhow::Result<()> {
    veth_pair_with_queues(a, b, 1)
}

/// A veth pair whose ends have `queues` receive and transmit queues each: frames sent on one
/// CPU are received on the peer's queue of that CPU, so CPUs forward in parallel.
pub fn veth_pair_with_queues(
    a: (&Netns, &str),
    b: (&Netns, &str),
    queues: u32,
) -> anyhow::Result<()> {
    let ((ns_a, name_a), (ns_b, name_b)) = (a, b);
    let queues = queues.to_string();
    ns_a.ip(&[
        "link",
        "add",
        name_a,
        "numtxqueues",
        &queues,
        "numrxqueues",
        &queues,
        "type",
        "veth",
        "peer",
        "name",
        name_b,
        "numtxqueues",
        &queues,
        "numrxqueues",
        &queues,
        "netns",
        ns_b.name(),
    ])?;
    ns_a.ip(&["link", "set", name_a, "up"])?;
    ns_b.ip(&["link", "set", name_b, "up"])?;
    Ok(())
}

/// Whether a `lbt-...-<pid>` name belongs to a process that is gone.
fn is_stale(name: &str) -> bool {
    name.strip_prefix(PREFIX).is_some_and(|rest| {
        !rest
            .rsplit_once('-')
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    })
}

/// Removes what crashed or killed runs left behind: `lbt-*` namespaces whose creating process
/// is gone (after killing the processes still running inside them), and their pin, state and
/// cluster state folders.
pub fn sweep_stale() -> anyhow::Result<Vec<String>> {
    let output = run("ip", &["netns", "list"])?;
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !is_stale(name) {
            continue;
        }
        let pids = run("ip", &["netns", "pids", name])?;
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        ip(&["netns", "del", name])?;
        removed.push(name.to_owned());
    }
    for root in ["/run/lb/bpf", "/run/lb/state", "/run/lb/cluster"] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                let _ = std::fs::remove_dir_all(entry.path());
                removed.push(entry.path().display().to_string());
            }
        }
    }
    Ok(removed)
}
