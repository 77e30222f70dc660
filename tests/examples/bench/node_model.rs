//! The node model: in a Kubernetes node the pods sit behind the node on veth pairs whose pod
//! side runs ordinary applications, not XDP programs. The `forwarding` section's pods are XDP
//! sinks, so an XDP redirect into them works; here they are not: whatever forwards a packet to
//! a pod must get it there as an ordinary socket buffer, which `bench_tc_sink` counts and drops
//! at the pod's `eth0` tcx ingress.
//!
//! Topology: a client (`g0`, 198.18.0.1) — the node (`n0`, 198.18.0.2, forwarding on) — pods
//! 1..4 (`p{i}` 198.18.i.254 on the node, `eth0` 198.18.i.1 in the pod), permanent neighbours,
//! the VIP 198.18.200.1:8080/UDP spread over the pods by Maglev. XDP live frames, one CPU,
//! configurations interleaved over rounds, for 1 flow and 100k flows, both ways:
//!
//! - forward (client -> VIP -> pod): the ceiling (XDP_PASS and a TC sink on `n0`: the socket
//!   buffer alone), plain kernel forwarding to pod 1, kube-proxy's iptables and nftables rules,
//!   ours today (`lb_xdp`, which hands the DNATed packet to the kernel to forward: its redirect
//!   needs an XDP program on the pod's side), ours on the pod path (once the data plane has it)
//!   and the floor: a minimal XDP DNAT then a TC `bpf_redirect_peer` into the pod;
//! - replies (pod 1 -> client, a generator in pod 1, an XDP sink on the client's `g0`): the
//!   ceiling (a TC sink on `p1`), plain forwarding, iptables and nftables (their conntrack
//!   reverses the DNAT), ours (the reverse NAT at `n0`'s TC egress), and the floor: a minimal TC
//!   reverse NAT on `p1` then `bpf_redirect` out of `n0`. Every configuration has XDP_PASS on
//!   `p1`: XDP_TX from a veth needs its peer to run NAPI. Before each stateful measurement the
//!   same flows are sent forward once, so the state the replies need exists (checked).

use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use aya::{
    Ebpf,
    maps::{Array, HashMap},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
};
use lb_common::Reason;
use lb_tests::netns::{Netns, veth_pair_with_queues};
use lb_userspace::{AttachMode, Dataplane, dataplane::BENCH_OBJECT};

use crate::{
    live::{
        self, Cycle, Generator, MANY_FLOWS, MinBackend, PODS, QUEUES, Traffic, VIP, flows_label,
        link_info, ns_added, quotient,
    },
    report::Report,
};

pub const FORWARD: &str =
    "Node model, client -> VIP -> pod, pods without XDP (XDP live frames, 64-byte UDP, one CPU)";
pub const REPLY: &str = "Node model, pod -> client replies (XDP live frames, 64-byte UDP, one CPU)";

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const POD1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Client -> VIP -> pod.
    Forward,
    /// Pod 1 -> client, source rewritten back to the VIP.
    Reply,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Ceiling,
    Plain,
    Iptables,
    Nftables,
    OursToday,
    /// `lb_xdp` with the pods' host-side veths registered (see [`attach_pod_path`]).
    OursPodPath,
    Floor,
}

impl Config {
    fn name(self, direction: Direction) -> &'static str {
        match (self, direction) {
            (Self::Ceiling, Direction::Forward) => "skb at the node, no forwarding (ceiling)",
            (Self::Ceiling, Direction::Reply) => "skb at the pod's veth on the node (ceiling)",
            (Self::Plain, Direction::Forward) => "plain kernel forwarding to pod 1, no DNAT",
            (Self::Plain, Direction::Reply) => "plain kernel forwarding, no reverse NAT",
            (Self::Iptables, _) => "iptables DNAT (kube-proxy rules)",
            (Self::Nftables, _) => "nftables DNAT (kube-proxy rules)",
            (Self::OursToday, _) => "ours today (lb_xdp + TC egress, kernel forwards)",
            (Self::OursPodPath, _) => "ours, pod path",
            (Self::Floor, Direction::Forward) => {
                "minimal XDP DNAT + TC redirect_peer into the pod (floor)"
            }
            (Self::Floor, Direction::Reply) => "minimal TC reverse NAT + redirect to n0 (floor)",
        }
    }

    /// Whether replies need state made by the forward direction.
    fn stateful(self) -> bool {
        matches!(
            self,
            Self::Iptables | Self::Nftables | Self::OursToday | Self::OursPodPath
        )
    }
}

/// The pod path of the data plane: XDP DNAT, then a TC program on the node's interface moves
/// the packet into the pod with `bpf_redirect_peer`; replies are reverse-NATed by a TC program
/// at the pod's host-side veth ingress.
fn attach_pod_path(dataplane: &mut Dataplane, node: &Netns) -> anyhow::Result<bool> {
    for i in 1..=PODS {
        node.enter(|| dataplane.attach_pod_interface(&format!("p{i}")))??;
    }
    Ok(true)
}

/// Turns IPv6 off in `ns` for the links made after.
fn quiet_ipv6(ns: &Netns) -> anyhow::Result<()> {
    for setting in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        ns.exec("sysctl", &["-qw", setting])?;
    }
    Ok(())
}

/// Which sink counts a configuration's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sink {
    /// `bench_tc_sink` (the pods' `eth0`, or the ceilings' node interfaces).
    Tc,
    /// `bench_sink` on the client's `g0`.
    Xdp,
}

impl Sink {
    fn of(config: Config, direction: Direction) -> Self {
        match (config, direction) {
            (_, Direction::Forward) | (Config::Ceiling, Direction::Reply) => Self::Tc,
            (_, Direction::Reply) => Self::Xdp,
        }
    }

    fn map(self) -> &'static str {
        match self {
            Self::Tc => "TC_SINK_COUNT",
            Self::Xdp => "SINK_COUNT",
        }
    }
}

/// A benchmark program attached for the current configuration.
enum BenchLink {
    Xdp(&'static str, XdpLinkId),
    Tc(&'static str, SchedClassifierLinkId),
}

struct Rig {
    client: Netns,
    node: Netns,
    pods: Vec<live::Pod>,
    bench: Ebpf,
    dataplane: Dataplane,
    client_index: u32,
    client_mac: [u8; 6],
    n0_mac: [u8; 6],
    /// Pod 1's `eth0`, in its namespace.
    pod1_index: u32,
    links: Vec<BenchLink>,
    /// Pods the service and the kernel rule sets place new flows on (1..=serving).
    serving: u8,
}

impl Rig {
    fn build() -> anyhow::Result<Self> {
        let client = Netns::create("bmc")?;
        let node = Netns::create("bmn")?;
        // No IPv6 anywhere in the rig: its neighbour discovery and listener reports would
        // reach the sinks and be counted.
        for ns in [&client, &node] {
            quiet_ipv6(ns)?;
        }
        for setting in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            node.exec("sysctl", &["-qw", setting])?;
        }
        veth_pair_with_queues((&client, "g0"), (&node, "n0"), QUEUES)?;
        client.ip(&["addr", "add", "198.18.0.1/24", "dev", "g0"])?;
        node.ip(&["addr", "add", "198.18.0.2/24", "dev", "n0"])?;
        let (client_index, client_mac) = link_info(&client, "g0")?;
        let (n0_index, n0_mac) = link_info(&node, "n0")?;
        node.ip(&[
            "neigh",
            "replace",
            "198.18.0.1",
            "lladdr",
            &live::mac_string(client_mac),
            "dev",
            "n0",
            "nud",
            "permanent",
        ])?;
        // The client's further addresses (flows past 55,536 ports, see live::BASE_PORT).
        node.ip(&["route", "add", "198.19.0.0/16", "via", "198.18.0.1"])?;
        for route in ["198.18.200.0/24"]
            .into_iter()
            .map(String::from)
            .chain((1..=PODS).map(|i| format!("198.18.{i}.0/24")))
        {
            client.ip(&["route", "add", &route, "via", "198.18.0.2"])?;
        }
        let mut bench = Ebpf::load(BENCH_OBJECT)?;
        for name in ["bench_gen", "bench_sink", "bench_min_dnat_pass"] {
            let program: &mut Xdp = bench.program_mut(name).expect("program").try_into()?;
            program.load()?;
        }
        for name in ["bench_tc_sink", "bench_min_peer", "bench_min_reply"] {
            let program: &mut SchedClassifier =
                bench.program_mut(name).expect("program").try_into()?;
            program.load()?;
        }
        // The client is the measuring end of replies: an XDP sink on its veth.
        {
            let sink: &mut Xdp = bench
                .program_mut("bench_sink")
                .expect("program")
                .try_into()?;
            client.enter(|| sink.attach("g0", XdpMode::Driver))??;
        }
        let mut dataplane = Dataplane::load()?;
        live::program_service(&mut dataplane)?;
        let mut pods = Vec::new();
        for i in 1..=PODS {
            let pod = live::add_pod(&node, "bmp", i, quiet_ipv6)?;
            pod.ns
                .ip(&["route", "add", "default", "via", &format!("198.18.{i}.254")])?;
            node.exec(
                "sysctl",
                &[
                    "-qw",
                    &format!("net.ipv4.conf.{}.rp_filter=0", pod.node_end),
                ],
            )?;
            // An ordinary pod: its stack's first step, tcx ingress, counts and drops.
            let sink: &mut SchedClassifier = bench
                .program_mut("bench_tc_sink")
                .expect("program")
                .try_into()?;
            pod.ns
                .enter(|| sink.attach("eth0", TcAttachType::Ingress))??;
            pods.push(pod);
        }
        node.exec("sysctl", &["-qw", "net.ipv4.conf.n0.rp_filter=0"])?;
        let pod1 = &pods[0];
        let (pod1_index, _) = link_info(&pod1.ns, "eth0")?;
        let mut min_backends: HashMap<_, [u8; 4], MinBackend> =
            bench.map_mut("MIN_BACKENDS").expect("map").try_into()?;
        min_backends.insert(
            VIP.octets(),
            MinBackend {
                addr: POD1.octets(),
                ifindex: pod1.node_end_index,
                dmac: pod1.pod_mac,
                smac: pod1.node_end_mac,
            },
            0,
        )?;
        let mut min_peer: Array<_, MinBackend> =
            bench.map_mut("MIN_PEER").expect("map").try_into()?;
        min_peer.set(
            0,
            MinBackend {
                addr: POD1.octets(),
                ifindex: pod1.node_end_index,
                dmac: [0; 6],
                smac: [0; 6],
            },
            0,
        )?;
        let mut min_reply: Array<_, MinBackend> =
            bench.map_mut("MIN_REPLY").expect("map").try_into()?;
        min_reply.set(
            0,
            MinBackend {
                addr: VIP.octets(),
                ifindex: n0_index,
                dmac: client_mac,
                smac: n0_mac,
            },
            0,
        )?;
        Ok(Self {
            client,
            node,
            pods,
            bench,
            dataplane,
            client_index,
            client_mac,
            n0_mac,
            pod1_index,
            links: Vec::new(),
            serving: PODS,
        })
    }

    /// Removes every program and rule of the current configuration (the sinks of the pods
    /// and the client stay) and checks that no netfilter hook is left: one left behind would
    /// charge conntrack to the configurations that follow.
    fn detach(&mut self) -> anyhow::Result<()> {
        for link in std::mem::take(&mut self.links) {
            match link {
                BenchLink::Xdp(name, id) => {
                    let program: &mut Xdp =
                        self.bench.program_mut(name).expect("program").try_into()?;
                    program.detach(id)?;
                }
                BenchLink::Tc(name, id) => {
                    let program: &mut SchedClassifier =
                        self.bench.program_mut(name).expect("program").try_into()?;
                    program.detach(id)?;
                }
            }
        }
        self.dataplane.detach_all()?;
        crate::kube_proxy::reset(&self.node);
        let ruleset = String::from_utf8(self.node.exec("nft", &["list", "ruleset"])?.stdout)?;
        anyhow::ensure!(
            !ruleset.contains("hook"),
            "netfilter chains left in the node after a reset:\n{ruleset}"
        );
        Ok(())
    }

    fn attach_xdp(&mut self, name: &'static str, iface: &str) -> anyhow::Result<()> {
        let program: &mut Xdp = self.bench.program_mut(name).expect("program").try_into()?;
        let link = self
            .node
            .enter(|| program.attach(iface, XdpMode::Driver))??;
        self.links.push(BenchLink::Xdp(name, link));
        Ok(())
    }

    fn attach_tc(&mut self, name: &'static str, iface: &str) -> anyhow::Result<()> {
        let program: &mut SchedClassifier =
            self.bench.program_mut(name).expect("program").try_into()?;
        let link = self
            .node
            .enter(|| program.attach(iface, TcAttachType::Ingress))??;
        self.links.push(BenchLink::Tc(name, link));
        Ok(())
    }

    fn attach_pass(&mut self, iface: &str) -> anyhow::Result<()> {
        let dataplane = &mut self.dataplane;
        self.node.enter(|| dataplane.attach_pass(iface))??;
        Ok(())
    }

    /// Sets the node up for `config`; false when this branch cannot (the pod path).
    fn configure(&mut self, config: Config, direction: Direction) -> anyhow::Result<bool> {
        self.detach()?;
        if direction == Direction::Reply {
            // The pod's generator sends with XDP_TX: its veth peer must run NAPI.
            self.attach_pass("p1")?;
        }
        match (config, direction) {
            (Config::Ceiling, Direction::Forward) => {
                self.attach_pass("n0")?;
                self.attach_tc("bench_tc_sink", "n0")?;
            }
            (Config::Ceiling, Direction::Reply) => self.attach_tc("bench_tc_sink", "p1")?,
            (Config::Plain, Direction::Forward) => self.attach_pass("n0")?,
            (Config::Plain, Direction::Reply) => {}
            (Config::Iptables | Config::Nftables, _) => {
                // veth hands frames to the stack through NAPI only with an XDP program on it.
                self.attach_pass("n0")?;
                let (program, rules) = if config == Config::Iptables {
                    (
                        "iptables-restore",
                        crate::kube_proxy::iptables_rules(VIP, "udp", self.serving),
                    )
                } else {
                    (
                        "nft",
                        crate::kube_proxy::nft_rules(VIP, "udp", self.serving),
                    )
                };
                crate::kube_proxy::load(&self.node, program, &rules)?;
            }
            (Config::OursToday | Config::OursPodPath, _) => {
                let dataplane = &mut self.dataplane;
                self.node
                    .enter(|| dataplane.attach("n0", AttachMode::Native))??;
                if config == Config::OursPodPath
                    && !attach_pod_path(&mut self.dataplane, &self.node)?
                {
                    self.detach()?;
                    return Ok(false);
                }
            }
            (Config::Floor, Direction::Forward) => {
                self.attach_xdp("bench_min_dnat_pass", "n0")?;
                self.attach_tc("bench_min_peer", "n0")?;
            }
            (Config::Floor, Direction::Reply) => self.attach_tc("bench_min_reply", "p1")?,
        }
        Ok(true)
    }

    /// Interface and softnet counters of the rig, for an error that says where frames went.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        let namespaces = [&self.client, &self.node]
            .into_iter()
            .chain(self.pods.iter().map(|p| &p.ns));
        for ns in namespaces {
            if let Ok(o) = ns.exec("ip", &["-s", "-s", "link"]) {
                out += &format!("{}:\n{}", ns.name(), String::from_utf8_lossy(&o.stdout));
            }
        }
        out + &std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default()
    }

    /// Datagrams the node's IP stack has forwarded (`Ip: ForwDatagrams`).
    fn forwarded(&self) -> anyhow::Result<u64> {
        let out = self.node.exec("cat", &["/proc/net/snmp"])?;
        let text = String::from_utf8(out.stdout)?;
        let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
        let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
            anyhow::bail!("no Ip lines in the node's /proc/net/snmp");
        };
        let at = names
            .split_whitespace()
            .position(|n| n == "ForwDatagrams")
            .ok_or_else(|| anyhow::anyhow!("no ForwDatagrams in /proc/net/snmp"))?;
        Ok(values
            .split_whitespace()
            .nth(at)
            .ok_or_else(|| anyhow::anyhow!("short Ip line in /proc/net/snmp"))?
            .parse()?)
    }

    /// Connections in the node's kernel conntrack table.
    fn kernel_flows(&self) -> anyhow::Result<u64> {
        let out = self.node.exec("conntrack", &["-C"])?;
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    }

    /// Room for `flows` connections in the node's conntrack table, raised if needed.
    fn conntrack_room(&self, flows: u64) -> anyhow::Result<()> {
        let key = "net.netfilter.nf_conntrack_max";
        let read = || -> anyhow::Result<u64> {
            let out = self.node.exec("sysctl", &["-n", key])?;
            Ok(String::from_utf8(out.stdout)?.trim().parse()?)
        };
        if read()? >= flows {
            return Ok(());
        }
        let _ = self
            .node
            .exec("sysctl", &["-qw", &format!("{key}={flows}")]);
        let max = read()?;
        anyhow::ensure!(
            max >= flows,
            "{key} is {max} in the node and cannot be raised to {flows}"
        );
        Ok(())
    }

    /// Sends `frames` frames of `flows` flows (forward: client -> `dst`; reply: pod 1 ->
    /// client); returns (frames counted by `sink`, seconds the generator took).
    fn send(
        &mut self,
        direction: Direction,
        dst: Ipv4Addr,
        flows: u32,
        frames: u32,
        sink: Sink,
    ) -> anyhow::Result<(u64, f64)> {
        let generator = match direction {
            Direction::Forward => Generator {
                ns: &self.client,
                ifindex: self.client_index,
                frame: live::udp_frame(
                    (self.client_mac, self.n0_mac),
                    (CLIENT, live::BASE_PORT),
                    (dst, 8080),
                )?,
                cycle: Cycle::Source,
            },
            Direction::Reply => Generator {
                ns: &self.pods[0].ns,
                ifindex: self.pod1_index,
                frame: live::udp_frame(
                    (self.pods[0].pod_mac, self.pods[0].node_end_mac),
                    (POD1, 8080),
                    (CLIENT, live::BASE_PORT),
                )?,
                cycle: Cycle::Destination,
            },
        };
        let before = live::per_cpu_total(&self.bench, sink.map())?;
        let elapsed = live::generate(
            &mut self.bench,
            &generator,
            Traffic::Flows(flows),
            frames,
            1,
        )?;
        let delivered = live::per_cpu_total(&self.bench, sink.map())? - before;
        Ok((delivered, elapsed.as_secs_f64()))
    }

    /// Sends `flows` forward (each twice) so that their replies find the state they need, and
    /// checks the kernel's conntrack holds them.
    fn prime(&mut self, config: Config, flows: u32) -> anyhow::Result<()> {
        let kernel = matches!(config, Config::Iptables | Config::Nftables);
        if kernel {
            self.conntrack_room(2 * u64::from(MANY_FLOWS))?;
        }
        self.send(
            Direction::Forward,
            VIP,
            flows,
            (2 * flows).max(64),
            Sink::Tc,
        )?;
        if kernel {
            let tracked = self.kernel_flows()?;
            anyhow::ensure!(
                tracked >= u64::from(flows),
                "{}: {tracked} connections in the node's conntrack after sending {flows} flows",
                config.name(Direction::Reply)
            );
        }
        Ok(())
    }

    /// One measured run with its checks: the frames took the path the configuration is meant
    /// to measure. Returns the rate at the sink, in Mpps.
    fn measure(
        &mut self,
        config: Config,
        direction: Direction,
        flows: u32,
        frames: u32,
    ) -> anyhow::Result<f64> {
        let dst = if config == Config::Plain && direction == Direction::Forward {
            POD1
        } else {
            VIP
        };
        let sink = Sink::of(config, direction);
        let reasons_before = self.dataplane.reason_counters()?;
        let kernel =
            direction == Direction::Reply && matches!(config, Config::Iptables | Config::Nftables);
        let tracked_before = if kernel { self.kernel_flows()? } else { 0 };
        let forwarded_before = self.forwarded()?;
        let (delivered, seconds) = self.send(direction, dst, flows, frames, sink)?;
        let forwarded = self.forwarded()? - forwarded_before;
        let reasons_after = self.dataplane.reason_counters()?;
        let delta = |reason: Reason| {
            reasons_after[reason as usize].1.packets - reasons_before[reason as usize].1.packets
        };
        let name = config.name(direction);
        anyhow::ensure!(
            delivered * 10 >= u64::from(frames),
            "{name}: only {delivered} of {frames} frames reached the sink\n{}",
            self.diagnostics()
        );
        // Whether the node's IP stack forwarded the frames: the floors and the pod path go
        // around it, the rest through it.
        let around = matches!(config, Config::Floor | Config::OursPodPath);
        let through = !around && config != Config::Ceiling;
        anyhow::ensure!(
            (!around || forwarded == 0) && (!through || forwarded >= delivered),
            "{name}: the node's IP stack forwarded {forwarded} frames for {delivered} delivered: not the path measured"
        );
        match (config, direction) {
            (Config::OursToday, Direction::Forward) => {
                // Pods without XDP take no redirected frames: lb_xdp hands every DNATed frame
                // to the kernel.
                let fallback = delta(Reason::DnatFibFallback);
                let sent = delta(Reason::DnatRedirect) + delta(Reason::DnatTx);
                anyhow::ensure!(
                    sent == 0 && fallback >= delivered,
                    "{name}: {fallback} frames handed to the kernel (dnat_fib_fallback) and {sent} sent by XDP, for {delivered} delivered: not the path measured"
                );
            }
            (Config::OursPodPath, Direction::Forward) => {
                // Whether the frames went around the node's IP stack is checked above (its
                // forwarding counter); here, that lb_xdp handed every one to the TC program.
                let handed = delta(Reason::DnatPod);
                anyhow::ensure!(
                    handed >= delivered,
                    "{name}: lb_xdp handed {handed} frames to the pod path (dnat_pod) for {delivered} delivered"
                );
            }
            (Config::OursToday, Direction::Reply) => {
                // Every reply that reached the client was reverse-NATed on n0's TC egress,
                // where none may go out untouched.
                let reversed = delta(Reason::ReverseNat);
                let passed = delta(Reason::EgressPass);
                anyhow::ensure!(
                    reversed >= delivered && passed == 0,
                    "{name}: {reversed} replies reverse-NATed and {passed} passed untouched, for {delivered} delivered of {frames} sent"
                );
            }
            (Config::OursPodPath, Direction::Reply) => {
                // Every reply was reverse-NATed and sent out by the pod's program, none by
                // n0's egress.
                let reversed = delta(Reason::ReverseNatPod);
                let by_egress = delta(Reason::ReverseNat);
                anyhow::ensure!(
                    reversed >= delivered && by_egress == 0,
                    "{name}: {reversed} replies sent straight out (reverse_nat_pod) and {by_egress} reverse-NATed on n0's egress, for {delivered} delivered of {frames} sent"
                );
            }
            (Config::Iptables | Config::Nftables, Direction::Reply) => {
                // A reply conntrack did not know would have become a new connection.
                let tracked = self.kernel_flows()?;
                anyhow::ensure!(
                    tracked == tracked_before,
                    "{name}: the node's conntrack went from {tracked_before} to {tracked} connections during the replies: some replies matched no connection"
                );
            }
            _ => {}
        }
        if delivered < u64::from(frames) * 99 / 100 {
            eprintln!("   ({name}: {delivered} of {frames} frames reached the sink)");
        }
        Ok(delivered as f64 / seconds / 1e6)
    }
}

pub fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let mut rig = Rig::build()?;
    let rounds = 3;
    let target = if quick {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(1500)
    };
    let pod_path = rig.configure(Config::OursPodPath, Direction::Forward)?;
    let configs: Vec<Config> = [
        Config::Ceiling,
        Config::Plain,
        Config::Iptables,
        Config::Nftables,
        Config::OursToday,
        Config::OursPodPath,
        Config::Floor,
    ]
    .into_iter()
    .filter(|c| pod_path || *c != Config::OursPodPath)
    .collect();
    let runs: Vec<(Config, u32)> = [1, MANY_FLOWS]
        .into_iter()
        .flat_map(|flows| configs.iter().map(move |c| (*c, flows)))
        .collect();
    for direction in [Direction::Forward, Direction::Reply] {
        if direction == Direction::Reply {
            // Replies come from pod 1 only: every flow must be placed there, by ours and by
            // the kernel's rules. Ours' flows of the forward runs on other pods are removed.
            rig.serving = 1;
            live::set_table(&mut rig.dataplane, 1)?;
            rig.dataplane
                .purge_backends(&(2..=u32::from(PODS)).collect::<HashSet<_>>())?;
        }
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
        for round in 0..rounds {
            for (i, (config, flows)) in runs.iter().enumerate() {
                anyhow::ensure!(
                    rig.configure(*config, direction)?,
                    "{} cannot be set up",
                    config.name(direction)
                );
                if direction == Direction::Reply && config.stateful() {
                    rig.prime(*config, *flows)?;
                }
                // Calibrate, then one long run of about `target`.
                let probe = rig.measure(*config, direction, *flows, 50_000)?;
                let frames = live::frames_for(probe, target, 1);
                let rate = rig.measure(*config, direction, *flows, frames)?;
                eprintln!(
                    "   round {round}, {direction:?}: {} ({}): {rate:.3} Mpps",
                    config.name(direction),
                    flows_label(*flows)
                );
                rates[i].push(rate);
            }
        }
        rig.detach()?;
        add_rows(report, direction, &runs, &rates);
    }
    report.notes.push(format!(
        "Node model: pods behind the node on veth pairs whose pod side runs no XDP (ordinary \
         applications; a TC sink at the pod's eth0 ingress counts and drops), so a packet must \
         reach the pod as a socket buffer: the forwarding section's XDP redirect into XDP sinks \
         is not available. The ceilings are the socket buffer alone (XDP_PASS and a TC sink on \
         the node's interface, on the pod's veth for replies); \"ns added by the node\" is \
         1000/rate - 1000/ceiling within a round. Ours today hands every DNATed packet to the \
         kernel to forward (its dnat_fib_fallback counter and the node's IP forwarding counter \
         are checked on every run, as is the floors' going around the IP stack); the floor is the planned \
         path's mechanism with nothing else: XDP DNAT then bpf_redirect_peer at the node's tcx \
         ingress, and for replies a TC reverse NAT on the pod's veth then bpf_redirect out of \
         the node. Replies come from a generator in pod 1 (XDP_TX from its eth0, with XDP_PASS \
         on the node-side p1 in every configuration: a veth's XDP_TX needs NAPI on its peer) to \
         an XDP sink on the client; the service then places every flow on pod 1, the flows are \
         sent forward once before each stateful run, and every run checks that the replies \
         were reverse-NATed (ours' reverse_nat counter, no new kernel conntrack entry). {} \
         {rounds} rounds of about {} ms per configuration, CPU 0; UDP checksums 0.",
        if pod_path {
            "Ours on the pod path: lb_xdp with the pods' host-side veths registered."
        } else {
            "Ours on the pod path is not on this branch yet: its rows are missing."
        },
        target.as_millis()
    ));
    Ok(())
}

fn add_rows(report: &mut Report, direction: Direction, runs: &[(Config, u32)], rates: &[Vec<f64>]) {
    let section = match direction {
        Direction::Forward => FORWARD,
        Direction::Reply => REPLY,
    };
    let by =
        |config: Config, flows: u32| runs.iter().position(|(c, f)| *c == config && *f == flows);
    let ceiling = |flows| &rates[by(Config::Ceiling, flows).expect("ceiling")];
    let added = |i: usize| ns_added(&rates[i], ceiling(runs[i].1));
    for (i, (config, flows)) in runs.iter().enumerate() {
        let label = format!("{} - {}", config.name(direction), flows_label(*flows));
        report.add(section, &label, "Mpps", rates[i].clone(), None, "");
        if *config != Config::Ceiling {
            report.add(
                section,
                &format!("{label}: ns added by the node"),
                "ns",
                added(i),
                None,
                "1000/rate - 1000/ceiling, same round",
            );
        }
    }
    for flows in [1, MANY_FLOWS] {
        for ours in [Config::OursToday, Config::OursPodPath] {
            let Some(o) = by(ours, flows) else {
                continue;
            };
            let ours_name = ours.name(direction);
            for other in [Config::Iptables, Config::Nftables] {
                let j = by(other, flows).expect("run");
                let name = other.name(direction);
                report.add(
                    section,
                    &format!("{ours_name} vs {name}, {}", flows_label(flows)),
                    "Mpps",
                    rates[o].clone(),
                    Some((name, &rates[j], quotient)),
                    "rate ratio",
                );
            }
            let floor = by(Config::Floor, flows).expect("run");
            let floor_ns = added(floor);
            report.add(
                section,
                &format!("ns added: {ours_name} vs the floor, {}", flows_label(flows)),
                "ns",
                added(o),
                Some((Config::Floor.name(direction), &floor_ns, quotient)),
                "ours / floor: 1 is the floor's cost",
            );
        }
    }
}
