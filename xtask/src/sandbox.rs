//! `cargo xtask sandbox`: the demo's topology, or a multi-node cluster with a BGP router, left
//! running to explore by hand; nodes failed, restored, drained and undrained from another
//! process; everything removed by `down`.

use std::path::Path;

use lb_tests::{
    cluster::{self, Cluster, ClusterRef},
    sandbox::{EndpointState::Ready, Sandbox},
};

use crate::{cmd::require_root, demo::build_binaries};

/// The tag of the sandbox's namespaces (`lbt-sbx-...`).
const TAG: &str = "sbx";

/// A link to the running cluster's state folder (its manifests in `config/`, the BIRD
/// configurations, logs and control sockets), made by `up --nodes`, removed by `down`.
pub const CLUSTER_LINK: &str = "/run/lb/sandbox-cluster";

/// What `cargo xtask sandbox` does.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Bring the sandbox up and leave it running: the single node with 4 pods, or with
    /// `--nodes N` a cluster of N nodes (2 pods each) behind a BGP router.
    Up {
        /// Build a cluster of this many nodes (1 to 8) with a BIRD router.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=8))]
        nodes: Option<u8>,
    },
    /// Remove every sandbox namespace, process (controllers, BIRD, pods), pin and state.
    Down,
    /// Take cluster node I off the network as a crash would (its router bridge port down).
    FailNode {
        /// The node, 1-based.
        index: usize,
    },
    /// Put cluster node I back on the network.
    RestoreNode {
        /// The node, 1-based.
        index: usize,
    },
    /// Label cluster node I's Node object with
    /// node.kubernetes.io/exclude-from-external-load-balancers: its controller withdraws.
    DrainNode {
        /// The node, 1-based.
        index: usize,
    },
    /// Remove that label again.
    UndrainNode {
        /// The node, 1-based.
        index: usize,
    },
}

/// An operation on a node of a running cluster.
type NodeAction = fn(&ClusterRef, usize) -> anyhow::Result<()>;

/// Runs `action`.
pub fn run(action: Action) -> anyhow::Result<()> {
    require_root("cargo xtask sandbox")?;
    let (index, act): (usize, NodeAction) = match action {
        Action::Up { nodes: None } => return up_single(),
        Action::Up { nodes: Some(nodes) } => return up_cluster(usize::from(nodes)),
        Action::Down => {
            let removed = lb_tests::netns::sweep_stale()?;
            let _ = std::fs::remove_file(CLUSTER_LINK);
            println!("removed: {removed:?}");
            return Ok(());
        }
        Action::FailNode { index } => (index, ClusterRef::fail_node),
        Action::RestoreNode { index } => (index, ClusterRef::restore_node),
        Action::DrainNode { index } => (index, ClusterRef::drain_node),
        Action::UndrainNode { index } => (index, ClusterRef::undrain_node),
    };
    // Another process's cluster: found by its tag, never swept here.
    let handle = ClusterRef::find(TAG)?;
    if !Path::new("/var/run/netns")
        .join(handle.node_ns(index))
        .exists()
    {
        anyhow::bail!("the sandbox cluster has no node {index}");
    }
    act(&handle, index)?;
    for vip in [cluster::VIP4.into(), std::net::IpAddr::from(cluster::VIP6)] {
        println!(
            "router next hops for {vip}: {:?}",
            handle.router_next_hops(vip)?
        );
    }
    Ok(())
}

fn up_single() -> anyhow::Result<()> {
    lb_tests::netns::sweep_stale()?;
    let binaries = build_binaries()?;
    let mut sandbox = Sandbox::up(TAG, binaries)?;
    for index in 1..=4 {
        sandbox.start_pod(index)?;
    }
    sandbox.write_service(4, false)?;
    sandbox.write_endpoints(&[(1, Ready), (2, Ready), (3, Ready), (4, Ready)])?;
    sandbox.start_controller(false)?;
    println!(
        "sandbox up: namespaces {} (client), {} (node), pods {}\n\
         try:  ip netns exec {} curl http://198.18.200.1:8080/\n      \
         target/release/lb-userspace describe service tomcat-load-balancer --pin-root {} --state-root {}\n\
         manifests: {}\n\
         remove it with: cargo xtask sandbox down",
        sandbox.client.name(),
        sandbox.node.name(),
        sandbox
            .pods
            .values()
            .map(|p| p.ns.name().to_owned())
            .collect::<Vec<_>>()
            .join(", "),
        sandbox.client.name(),
        sandbox.roots.pin_root,
        sandbox.roots.state_root,
        sandbox.config.path().display(),
    );
    // Left running on purpose: `down` finds it by its namespaces' names.
    std::mem::forget(sandbox);
    Ok(())
}

fn up_cluster(nodes: usize) -> anyhow::Result<()> {
    lb_tests::netns::sweep_stale()?;
    let _ = std::fs::remove_file(CLUSTER_LINK);
    let binaries = build_binaries()?;
    let controller = binaries.controller.clone();
    let mut cluster = Cluster::up(TAG, binaries, nodes)?;
    cluster.write_manifests("Cluster")?;
    cluster.start_controllers(cluster::ANNOUNCE_ARGS, false)?;
    std::os::unix::fs::symlink(cluster.handle.state_dir(), CLUSTER_LINK)?;
    let (router, client, node1) = (
        cluster.router.name().to_owned(),
        cluster.client.name().to_owned(),
        cluster.node(1).ns.name().to_owned(),
    );
    let announce = if cluster::ANNOUNCE_ARGS.is_empty() {
        format!(
            "the controllers do not announce yet (lb-userspace has no --announce-table): \
             announce by hand with\n      \
             ip -n {node1} route add blackhole 198.18.200.1/32 table 4242 proto 250"
        )
    } else {
        format!("the controllers announce with {:?}", cluster::ANNOUNCE_ARGS)
    };
    println!(
        "sandbox cluster up ({nodes} nodes):\n{}\n{announce}\n\
         manifests: {CLUSTER_LINK}/config (every node's controller reads them)\n\
         try:  ip -n {router} route show 198.18.200.1\n      \
         birdc -s {CLUSTER_LINK}/bird-router.ctl show protocols\n      \
         birdc -s {CLUSTER_LINK}/bird-node1.ctl show route\n      \
         ip netns exec {client} curl --interface 198.18.2.3 http://198.18.200.1:8080/\n      \
         {} describe service tomcat-load-balancer --pin-root {} --state-root {}\n      \
         cargo xtask sandbox fail-node 2 / restore-node 2 / drain-node 2 / undrain-node 2\n\
         remove it with: cargo xtask sandbox down",
        cluster.describe(),
        controller.display(),
        cluster.node(1).roots.pin_root,
        cluster.node(1).roots.state_root,
    );
    // Left running on purpose: the node commands and `down` find it by its names.
    cluster.leak();
    Ok(())
}
