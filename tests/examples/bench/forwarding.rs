//! Forwarding rate of the load-balancer hop. A generator made of XDP live frames
//! (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES) on the client's veth sends 64-byte UDP
//! frames to the node; sinks count and drop them in the pods. Everything runs on one CPU (a
//! closed loop), and the configurations are interleaved over rounds:
//!
//! - ceiling: the node's veth itself is the sink (no router at all);
//! - ours: `lb_xdp` on the node (DNAT, route lookup, redirect to the pod's veth);
//! - iptables: kube-proxy's rule pattern (`-m statistic --mode random`), iptables-nft;
//! - nftables: kube-proxy's `numgen random mod N vmap` pattern;
//! - plain kernel forwarding to one pod, no DNAT;
//! - the minimal XDP DNAT forwarder (one backend, checksum fix, redirect): the floor.

use std::{net::Ipv4Addr, time::Duration};

use aya::{
    Ebpf,
    maps::{DevMapHash, HashMap},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_tests::netns::{Netns, veth_pair_with_queues};
use lb_userspace::{AttachMode, Dataplane, dataplane::BENCH_OBJECT};

use crate::{
    live::{
        self, Cycle, Generator, MANY_FLOWS, MinBackend, PODS, QUEUES, Traffic, VIP, flows_label,
        link_info, ns_added, quotient,
    },
    report::Report,
};

pub const SECTION: &str =
    "Forwarding rate of the load-balancer hop (XDP live frames, 64-byte UDP, one CPU)";

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Config {
    Ceiling,
    Ours,
    Iptables,
    Nftables,
    Plain,
    MinXdp,
}

impl Config {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Ceiling => "no router (ceiling)",
            Self::Ours => "ours (lb_xdp)",
            Self::Iptables => "iptables DNAT (kube-proxy rules)",
            Self::Nftables => "nftables DNAT (kube-proxy rules)",
            Self::Plain => "plain kernel forwarding, no DNAT",
            Self::MinXdp => "minimal XDP DNAT forwarder (floor)",
        }
    }
}

/// Generator, node and pods (sinks); the `nodes` section adds a peer node to it.
pub(crate) struct Rig {
    gen_ns: Netns,
    pub(crate) node: Netns,
    _pods: Vec<live::Pod>,
    pub(crate) bench: Ebpf,
    pub(crate) dataplane: Dataplane,
    gen_ifindex: u32,
    node_mac: [u8; 6],
    gen_mac: [u8; 6],
    /// The program attached to the node's client-facing veth now.
    node_program: NodeProgram,
}

/// What is attached to the node's client-facing veth.
enum NodeProgram {
    Nothing,
    /// The load balancer's programs (or its XDP_PASS), detached through the data plane.
    Dataplane,
    /// A benchmark program.
    Bench(&'static str, XdpLinkId),
}

impl Rig {
    pub(crate) fn build() -> anyhow::Result<Self> {
        let gen_ns = Netns::create("bfg")?;
        let node = Netns::create("bfn")?;
        veth_pair_with_queues((&gen_ns, "g0"), (&node, "n0"), QUEUES)?;
        gen_ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "g0"])?;
        node.ip(&["addr", "add", "198.18.0.2/24", "dev", "n0"])?;
        node.exec("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])?;
        node.exec("sysctl", &["-qw", "net.ipv4.conf.all.rp_filter=0"])?;
        node.exec("sysctl", &["-qw", "net.ipv4.conf.n0.rp_filter=0"])?;
        let mut bench = Ebpf::load(BENCH_OBJECT)?;
        for name in ["bench_gen", "bench_sink", "bench_min_dnat"] {
            let program: &mut Xdp = bench.program_mut(name).expect("program").try_into()?;
            program.load()?;
        }
        let mut pods = Vec::new();
        let mut dataplane = Dataplane::load()?;
        live::program_service(&mut dataplane)?;
        for i in 1..=PODS {
            let pod = live::add_pod(&node, "bfp", i, |_| Ok(()))?;
            // Every pod drops and counts what reaches it.
            {
                let sink: &mut Xdp = bench
                    .program_mut("bench_sink")
                    .expect("program")
                    .try_into()?;
                pod.ns.enter(|| sink.attach("eth0", XdpMode::Driver))??;
            }
            // Device maps resolve interface indexes in the caller's namespace.
            let index = pod.node_end_index;
            node.enter(|| dataplane.add_tx_port(index))??;
            pods.push(pod);
        }
        let (p1_index, p1_mac, pod1_mac) = (
            pods[0].node_end_index,
            pods[0].node_end_mac,
            pods[0].pod_mac,
        );
        let mut min_backends: HashMap<_, [u8; 4], MinBackend> =
            bench.map_mut("MIN_BACKENDS").expect("map").try_into()?;
        min_backends.insert(
            VIP.octets(),
            MinBackend {
                addr: [198, 18, 1, 1],
                ifindex: p1_index,
                dmac: pod1_mac,
                smac: p1_mac,
            },
            0,
        )?;
        let mut min_tx: DevMapHash<_> = bench.map_mut("MIN_TX").expect("map").try_into()?;
        node.enter(|| min_tx.insert(p1_index, p1_index, None, 0))??;
        let (gen_ifindex, gen_mac) = link_info(&gen_ns, "g0")?;
        let (_, node_mac) = link_info(&node, "n0")?;
        Ok(Self {
            gen_ns,
            node,
            _pods: pods,
            bench,
            dataplane,
            gen_ifindex,
            node_mac,
            gen_mac,
            node_program: NodeProgram::Nothing,
        })
    }

    pub(crate) fn detach_node(&mut self) -> anyhow::Result<()> {
        match std::mem::replace(&mut self.node_program, NodeProgram::Nothing) {
            NodeProgram::Nothing => {}
            NodeProgram::Dataplane => self.dataplane.detach_all()?,
            NodeProgram::Bench(name, link) => {
                let program: &mut Xdp =
                    self.bench.program_mut(name).expect("program").try_into()?;
                program.detach(link)?;
            }
        }
        crate::kube_proxy::reset(&self.node);
        Ok(())
    }

    fn attach_bench(&mut self, name: &'static str) -> anyhow::Result<()> {
        let program: &mut Xdp = self.bench.program_mut(name).expect("program").try_into()?;
        let link = self
            .node
            .enter(|| program.attach("n0", XdpMode::Driver))??;
        self.node_program = NodeProgram::Bench(name, link);
        Ok(())
    }

    pub(crate) fn configure(&mut self, config: Config) -> anyhow::Result<()> {
        self.detach_node()?;
        match config {
            Config::Ceiling => self.attach_bench("bench_sink")?,
            Config::MinXdp => self.attach_bench("bench_min_dnat")?,
            Config::Ours => {
                let dataplane = &mut self.dataplane;
                self.node
                    .enter(|| dataplane.attach("n0", AttachMode::Native))??;
                self.node_program = NodeProgram::Dataplane;
            }
            Config::Iptables | Config::Nftables | Config::Plain => {
                // veth hands frames to the stack through NAPI only with an XDP program on it.
                let dataplane = &mut self.dataplane;
                self.node.enter(|| dataplane.attach_pass("n0"))??;
                self.node_program = NodeProgram::Dataplane;
                if config == Config::Iptables {
                    let rules = crate::kube_proxy::iptables_rules(VIP, "udp", PODS);
                    crate::kube_proxy::load(&self.node, "iptables-restore", &rules)?;
                }
                if config == Config::Nftables {
                    let rules = crate::kube_proxy::nft_rules(VIP, "udp", PODS);
                    crate::kube_proxy::load(&self.node, "nft", &rules)?;
                }
            }
        }
        Ok(())
    }

    fn sunk(&self) -> anyhow::Result<u64> {
        live::per_cpu_total(&self.bench, "SINK_COUNT")
    }

    /// Sends `frames` frames with `traffic` to `dst` from one generator on CPU 0, or one on
    /// each of CPUs 0..`cpus` at once; returns the rate that reached the sinks, in Mpps.
    pub(crate) fn send(
        &mut self,
        dst: Ipv4Addr,
        traffic: Traffic,
        frames: u32,
        cpus: usize,
    ) -> anyhow::Result<f64> {
        let generator = Generator {
            ns: &self.gen_ns,
            ifindex: self.gen_ifindex,
            frame: live::udp_frame(
                (self.gen_mac, self.node_mac),
                (Ipv4Addr::new(198, 18, 0, 1), live::BASE_PORT),
                (dst, 8080),
            )?,
            cycle: Cycle::Source,
        };
        let before = self.sunk()?;
        let elapsed = live::generate(&mut self.bench, &generator, traffic, frames, cpus)?;
        let delivered = self.sunk()? - before;
        Ok(delivered as f64 / elapsed.as_secs_f64() / 1e6)
    }

    /// The rate on one CPU of `traffic` to `dst`: a calibration run, then one long run of
    /// about `target`.
    pub(crate) fn measure(
        &mut self,
        dst: Ipv4Addr,
        traffic: Traffic,
        target: Duration,
    ) -> anyhow::Result<f64> {
        let probe = self.send(dst, traffic, 50_000, 1)?;
        let frames = live::frames_for(probe, target, 1);
        self.send(dst, traffic, frames, 1)
    }
}

/// How long each measured run lasts.
pub(crate) fn run_length(quick: bool) -> Duration {
    if quick {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(1500)
    }
}

const SCALING: &str = "Forwarding with 2 CPUs at once (a veth queue per CPU), against one";

/// Ours on one CPU and on two at once, for hits (1 flow, 100k flows) and for a new flow in
/// every frame: a lock or a counter line shared between CPUs would keep the ratio under 2.
fn scaling(
    rig: &mut Rig,
    report: &mut Report,
    rounds: usize,
    target: Duration,
) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        report.notes.push("Scaling: skipped, one CPU.".into());
        return Ok(());
    }
    rig.configure(Config::Ours)?;
    let traffics = [
        ("1 flow (hits)", Traffic::Flows(1)),
        ("100000 flows (hits)", Traffic::Flows(MANY_FLOWS)),
        ("a new flow in every frame", Traffic::NewFlows),
    ];
    let mut rates = vec![[Vec::new(), Vec::new()]; traffics.len()];
    for round in 0..rounds {
        for (t, (name, traffic)) in traffics.iter().enumerate() {
            for cpus in [1, 2] {
                let probe = rig.send(VIP, *traffic, 50_000, cpus)?;
                let frames = live::frames_for(probe, target, cpus);
                let rate = rig.send(VIP, *traffic, frames, cpus)?;
                eprintln!("   round {round}: ours, {name}, {cpus} CPU(s): {rate:.3} Mpps");
                rates[t][cpus - 1].push(rate);
            }
        }
    }
    for ((name, _), [one, two]) in traffics.iter().zip(&rates) {
        report.add(
            SCALING,
            &format!("ours, 1 CPU, {name}"),
            "Mpps",
            one.clone(),
            None,
            "",
        );
        report.add(
            SCALING,
            &format!("ours, 2 CPUs, {name}"),
            "Mpps",
            two.clone(),
            Some(("1 CPU", one, quotient)),
            "goal: >= 1.8",
        );
    }
    Ok(())
}

pub fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let mut rig = Rig::build()?;
    let rounds = 3;
    let target = run_length(quick);
    let runs: Vec<(Config, u32, Ipv4Addr)> = vec![
        (Config::Ceiling, 1, VIP),
        (Config::Ours, 1, VIP),
        (Config::Ours, MANY_FLOWS, VIP),
        (Config::MinXdp, 1, VIP),
        (Config::MinXdp, MANY_FLOWS, VIP),
        (Config::Iptables, 1, VIP),
        (Config::Iptables, MANY_FLOWS, VIP),
        (Config::Nftables, 1, VIP),
        (Config::Nftables, MANY_FLOWS, VIP),
        (Config::Plain, 1, Ipv4Addr::new(198, 18, 1, 1)),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    for round in 0..rounds {
        for (i, (config, flows, dst)) in runs.iter().enumerate() {
            rig.configure(*config)?;
            let rate = rig.measure(*dst, Traffic::Flows(*flows), target)?;
            eprintln!(
                "   round {round}: {} ({flows} flows): {rate:.3} Mpps",
                config.name()
            );
            rates[i].push(rate);
        }
    }
    scaling(&mut rig, report, rounds, target)?;
    rig.detach_node()?;
    let ceiling = rates[0].clone();
    let ns_added = |rate: &[f64]| ns_added(rate, &ceiling);
    let by = |config: Config, flows: u32| {
        runs.iter()
            .position(|(c, f, _)| *c == config && *f == flows)
            .expect("run")
    };
    for (i, (config, flows, _)) in runs.iter().enumerate() {
        let label = format!("{} - {}", config.name(), flows_label(*flows));
        let baseline: Option<(String, usize)> = match config {
            Config::Ours if *flows == 1 => {
                Some(("iptables, 1 flow".into(), by(Config::Iptables, 1)))
            }
            Config::Ours => Some((
                format!("iptables, {MANY_FLOWS} flows"),
                by(Config::Iptables, MANY_FLOWS),
            )),
            _ => None,
        };
        let base_rounds = baseline.as_ref().map(|(_, j)| rates[*j].clone());
        report.add(
            SECTION,
            &label,
            "Mpps",
            rates[i].clone(),
            baseline.as_ref().map(|(name, _)| {
                (
                    name.as_str(),
                    base_rounds.as_deref().unwrap_or(&[]),
                    quotient as fn(f64, f64) -> f64,
                )
            }),
            "",
        );
        if *config != Config::Ceiling {
            report.add(
                SECTION,
                &format!("{label}: ns added by the node"),
                "ns",
                ns_added(&rates[i]),
                None,
                "1/rate - 1/ceiling",
            );
        }
    }
    for flows in [1, MANY_FLOWS] {
        let ours = by(Config::Ours, flows);
        for (other, goal) in [
            (Config::Iptables, "kube-proxy's iptables mode"),
            (Config::Nftables, "kube-proxy's nftables mode"),
            (Config::MinXdp, "goal: >= 0.8"),
        ] {
            let other = by(other, flows);
            let name = runs[other].0.name();
            report.add(
                SECTION,
                &format!("ours vs {name}, {}", flows_label(flows)),
                "Mpps",
                rates[ours].clone(),
                Some((name, &rates[other], quotient)),
                goal,
            );
            // The same comparison as the time each adds per packet (lower is better).
            let (ours_ns, other_ns) = (ns_added(&rates[ours]), ns_added(&rates[other]));
            report.add(
                SECTION,
                &format!("ns added: {name} over ours, {}", flows_label(flows)),
                "ns",
                other_ns,
                Some(("ours", &ours_ns, quotient)),
                "ratio > 1: ours adds less time per packet",
            );
        }
    }
    report.notes.push(format!(
        "Forwarding: {rounds} rounds, each configuration calibrated then run for about {} ms of live frames (batch 64) on CPU 0; rates are frames counted by the sinks per second of the generator's run.",
        target.as_millis()
    ));
    Ok(())
}
