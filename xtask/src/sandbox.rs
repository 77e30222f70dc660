//! `cargo xtask sandbox up|down`: the demo's topology left running to explore by hand.

use lb_tests::sandbox::{EndpointState::Ready, Sandbox};

use crate::{cmd::require_root, demo::build_binaries};

/// `up` builds the sandbox with 4 pods and the controller, and leaves it running; `down`
/// removes every sandbox namespace, process, pin and state, also after a crash or Ctrl-C.
pub fn run(action: &str) -> anyhow::Result<()> {
    require_root("cargo xtask sandbox")?;
    let removed = lb_tests::netns::sweep_stale()?;
    if action == "down" {
        println!("removed: {removed:?}");
        return Ok(());
    }
    let binaries = build_binaries()?;
    let mut sandbox = Sandbox::up("sbx", binaries)?;
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
