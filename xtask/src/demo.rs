//! `cargo xtask demo`: the main job. Builds the release binary, makes a two-namespace veth
//! sandbox (client 198.18.0.1 -> node 198.18.0.2), runs `lb-userspace attach` on the node's
//! veth, sends UDP from the client and shows the counters the program kept.

use std::{
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    ChildGuard,
    netns::{Netns, sweep_stale, veth_pair},
};

use crate::cmd::{cargo, require_root, status, workspace_root};

/// Runs the demo and removes the sandbox whatever happens.
pub fn run() -> anyhow::Result<()> {
    require_root("cargo xtask demo")?;
    sweep_stale()?;
    status(cargo().args(["build", "--release", "--package", "lb-userspace"]))?;
    let binary = workspace_root().join("target/release/lb-userspace");

    println!("\n== sandbox: client (198.18.0.1) <-veth-> node (198.18.0.2)");
    let client = Netns::create("demo-client")?;
    let node = Netns::create("demo-node")?;
    veth_pair((&client, "veth-client"), (&node, "veth-node"))?;
    client.ip(&["addr", "add", "198.18.0.1/24", "dev", "veth-client"])?;
    node.ip(&["addr", "add", "198.18.0.2/24", "dev", "veth-node"])?;

    println!("== node: lb-userspace attach veth-node");
    let controller = node
        .command(&binary)
        .args(["attach", "veth-node", "--stats-interval", "2"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting lb-userspace")?;
    let controller = ChildGuard::new(controller);
    // Give the loader time to attach before traffic starts.
    thread::sleep(Duration::from_millis(500));

    println!("== client: 3 s of UDP to 198.18.0.2");
    let start = Instant::now();
    let udp = client.enter(|| -> anyhow::Result<usize> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let mut sent = 0;
        while start.elapsed() < Duration::from_secs(3) {
            socket.send_to(b"demo", "198.18.0.2:9")?;
            sent += 1;
            thread::sleep(Duration::from_millis(10));
        }
        Ok(sent)
    })??;
    println!("sent {udp} UDP datagrams");

    println!("== stopping lb-userspace (SIGTERM): it logs its counters and detaches");
    let exit = controller.stop(Duration::from_secs(5))?;
    anyhow::ensure!(exit.success(), "lb-userspace exited with {exit}");
    println!("== done; removing the sandbox");
    Ok(())
}
