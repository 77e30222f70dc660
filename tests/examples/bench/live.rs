//! What the sections that push XDP live frames through namespaces share (`forwarding`,
//! `node_model`): the generator (`bench_gen` in lb-ebpf/src/bench.rs) and its configuration,
//! the layout of the benchmark programs' maps, the service programmed into the data plane, the
//! pods' links, and the arithmetic of the reports.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use lb_common::{
    Backend, ServiceKey, ServiceValue,
    maps::{BACKEND_F_VALID, PROTO_UDP, ipv4_mapped},
};
use lb_tests::netns::{Netns, veth_pair_with_queues};
use lb_userspace::Dataplane;

/// The service's address (port 8080, UDP).
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
/// Pods behind the node, 198.18.N.1 for N in 1..=PODS.
pub const PODS: u8 = 4;
/// The "many flows" of every comparison.
pub const MANY_FLOWS: u32 = 100_000;
/// Queues of every veth of the rigs: one per CPU of the scaling runs.
pub const QUEUES: u32 = 2;
/// The client's first port. Flow `k` uses port `BASE_PORT + k % (65536 - BASE_PORT)` and adds
/// `k / (65536 - BASE_PORT)` to the second byte of the client's address (198.18.0.1, then
/// 198.19.0.1, ...): ports alone would repeat after 55,536 flows.
pub const BASE_PORT: u16 = 10000;

/// The generator's configuration (`GenConfig` in lb-ebpf/src/bench.rs).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenConfig {
    template: [u8; 42],
    cycle_dst: u8,
    pad: u8,
    flows: u32,
    base_port: u16,
    new_flows: u16,
}
// SAFETY: repr(C), explicit padding, any bit pattern valid.
unsafe impl aya::Pod for GenConfig {}

/// The minimal forwarders' backend or rewrite (`MinBackend` in lb-ebpf/src/bench.rs).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MinBackend {
    pub addr: [u8; 4],
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}
// SAFETY: as above.
unsafe impl aya::Pod for MinBackend {}

/// What the generator sends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Traffic {
    /// Frames cycling over this many flows (see [`BASE_PORT`]).
    Flows(u32),
    /// A new flow in every frame.
    NewFlows,
}

/// Which end of the frame the flows differ in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cycle {
    /// The source: a client's requests.
    Source,
    /// The destination: a server's replies to many clients.
    Destination,
}

/// Where and what a generator sends: frames of `frame` through the interface `ifindex` of
/// `ns` (XDP_TX: they arrive at its veth peer).
pub struct Generator<'a> {
    pub ns: &'a Netns,
    pub ifindex: u32,
    pub frame: Vec<u8>,
    pub cycle: Cycle,
}

/// A 64-byte UDP frame (14 + 20 + 8 bytes of headers, 22 of zeros) with UDP checksum 0.
pub fn udp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> anyhow::Result<Vec<u8>> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1)
        .write(&mut frame, &[0u8; 22])?;
    frame[40..42].copy_from_slice(&[0, 0]);
    Ok(frame)
}

/// Sends `frames` frames of `traffic` from `generator`, on CPU 0 or on each of CPUs 0..`cpus`
/// at once (each generator pinned: generator, forwarding and sink of a frame all run on the
/// CPU that sent it, veth queue = CPU, a closed loop); returns the longest run's duration.
pub fn generate(
    bench: &mut Ebpf,
    generator: &Generator<'_>,
    traffic: Traffic,
    frames: u32,
    cpus: usize,
) -> anyhow::Result<Duration> {
    let mut template = [0u8; 42];
    template.copy_from_slice(&generator.frame[..42]);
    let (flows, new_flows) = match traffic {
        Traffic::Flows(flows) => (flows, 0),
        Traffic::NewFlows => (0, 1),
    };
    let mut config: Array<_, GenConfig> = bench.map_mut("GEN_CONFIG").expect("map").try_into()?;
    config.set(
        0,
        GenConfig {
            template,
            cycle_dst: u8::from(generator.cycle == Cycle::Destination),
            pad: 0,
            flows,
            base_port: BASE_PORT,
            new_flows,
        },
        0,
    )?;
    let ctx: Vec<u8> = [0, generator.frame.len() as u32, 0, generator.ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let program: &Xdp = bench.program("bench_gen").expect("program").try_into()?;
    let (ns, frame) = (generator.ns, &generator.frame);
    std::thread::scope(|scope| -> anyhow::Result<Duration> {
        let runs: Vec<_> = (0..cpus)
            .map(|cpu| {
                let ctx = &ctx;
                scope.spawn(move || {
                    ns.enter(|| -> anyhow::Result<Duration> {
                        let mut set = nix::sched::CpuSet::new();
                        set.set(cpu)?;
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
                        let start = Instant::now();
                        program.test_run(TestRunOptions {
                            data_in: Some(frame),
                            ctx_in: Some(ctx),
                            repeat: frames,
                            attrs: TestRunAttrs::new().xdp_live_frames(64),
                            ..TestRunOptions::new()
                        })?;
                        Ok(start.elapsed())
                    })?
                })
            })
            .collect();
        let mut longest = Duration::ZERO;
        for run in runs {
            let took = run
                .join()
                .map_err(|_| anyhow::anyhow!("generator panicked"))??;
            longest = longest.max(took);
        }
        Ok(longest)
    })
}

/// Frames for a run of about `target` per CPU, from a calibration run's rate.
pub fn frames_for(probe_mpps: f64, target: Duration, cpus: usize) -> u32 {
    ((probe_mpps * 1e6 * target.as_secs_f64() / cpus as f64) as u32).clamp(50_000, 20_000_000)
}

/// The sum over CPUs of slot 0 of the per-CPU counter `name` of the benchmark programs.
pub fn per_cpu_total(bench: &Ebpf, name: &str) -> anyhow::Result<u64> {
    let count: PerCpuArray<_, u64> = bench.map(name).expect("map").try_into()?;
    Ok(count.get(&0, 0)?.iter().sum())
}

/// An interface's index and MAC address, read inside `ns`.
pub fn link_info(ns: &Netns, dev: &str) -> anyhow::Result<(u32, [u8; 6])> {
    let read = |file: &str| -> anyhow::Result<String> {
        Ok(String::from_utf8(
            ns.exec("cat", &[&format!("/sys/class/net/{dev}/{file}")])?
                .stdout,
        )?)
    };
    let mac: Vec<u8> = read("address")?
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()?;
    Ok((
        read("ifindex")?.trim().parse()?,
        mac.try_into().map_err(|_| anyhow::anyhow!("MAC"))?,
    ))
}

/// `aa:bb:...` for `ip neigh`.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A pod's namespace and its veth pair to the node.
pub struct Pod {
    pub ns: Netns,
    /// The node's end of the pair, `p{i}`.
    pub node_end: String,
    pub node_end_index: u32,
    pub node_end_mac: [u8; 6],
    /// The pod's end, `eth0`.
    pub pod_mac: [u8; 6],
}

/// Pod `i` (namespace `{tag}{i}`, `setup` run in it first): a veth pair `p{i}` (node,
/// 198.18.i.254/24) <-> `eth0` (pod, 198.18.i.1/24), with a permanent neighbour entry for the
/// pod on the node.
pub fn add_pod(
    node: &Netns,
    tag: &str,
    i: u8,
    setup: fn(&Netns) -> anyhow::Result<()>,
) -> anyhow::Result<Pod> {
    let ns = Netns::create(&format!("{tag}{i}"))?;
    setup(&ns)?;
    let node_end = format!("p{i}");
    veth_pair_with_queues((node, &node_end), (&ns, "eth0"), QUEUES)?;
    node.ip(&[
        "addr",
        "add",
        &format!("198.18.{i}.254/24"),
        "dev",
        &node_end,
    ])?;
    ns.ip(&["addr", "add", &format!("198.18.{i}.1/24"), "dev", "eth0"])?;
    let (_, pod_mac) = link_info(&ns, "eth0")?;
    let (node_end_index, node_end_mac) = link_info(node, &node_end)?;
    node.ip(&[
        "neigh",
        "replace",
        &format!("198.18.{i}.1"),
        "lladdr",
        &mac_string(pod_mac),
        "dev",
        &node_end,
        "nud",
        "permanent",
    ])?;
    Ok(Pod {
        ns,
        node_end,
        node_end_index,
        node_end_mac,
        pod_mac,
    })
}

/// The service VIP:8080/UDP (id 0) with backends 1..=PODS (198.18.N.1:8080) and a Maglev
/// table over all of them.
pub fn program_service(dataplane: &mut Dataplane) -> anyhow::Result<()> {
    let key = ServiceKey {
        addr: ipv4_mapped(VIP.octets()),
        port: 8080,
        proto: PROTO_UDP,
        pad: 0,
    };
    dataplane.set_service(
        &key,
        &ServiceValue {
            id: 0,
            flags: 0,
            affinity_timeout_secs: 0,
        },
    )?;
    dataplane.set_vip_addr(ipv4_mapped(VIP.octets()), 1)?;
    for i in 1..=PODS {
        dataplane.set_backend(
            u32::from(i),
            &Backend {
                addr: ipv4_mapped([198, 18, i, 1]),
                port: 8080,
                flags: BACKEND_F_VALID,
                service_id: 0,
                node: [0; 16],
            },
        )?;
    }
    set_table(dataplane, PODS)
}

/// Makes the service's Maglev table place new flows on pods 1..=`pods` only.
pub fn set_table(dataplane: &mut Dataplane, pods: u8) -> anyhow::Result<()> {
    let placed: Vec<_> = (1..=pods)
        .map(|i| lb_userspace::maglev::MaglevBackend {
            id: u32::from(i),
            identity: vec![i],
            weight: 1,
        })
        .collect();
    let table = lb_userspace::maglev::build(&placed, 1021)?.expect("a table");
    dataplane.set_maglev_table(0, &table)?;
    Ok(())
}

/// Per round, the ns a configuration adds per packet over the ceiling measured in the same
/// round: 1000/rate - 1000/ceiling (rates in Mpps).
pub fn ns_added(rates: &[f64], ceiling: &[f64]) -> Vec<f64> {
    rates
        .iter()
        .zip(ceiling)
        .map(|(r, c)| 1e3 / r - 1e3 / c)
        .collect()
}

/// A ratio where the value over its baseline is the figure (rates; or costs, read inversely).
pub fn quotient(value: f64, baseline: f64) -> f64 {
    value / baseline
}

/// "1 flow", "100000 flows".
pub fn flows_label(flows: u32) -> String {
    format!("{flows} flow{}", if flows == 1 { "" } else { "s" })
}
