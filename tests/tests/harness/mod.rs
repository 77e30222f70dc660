//! The fixture harness shared by the BPF_PROG_TEST_RUN tests: addresses, a loaded data plane
//! with helpers to program services (`Lb`), and runners for both programs.
// Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    Backend, Event, Reason, ServiceKey, ServiceValue,
    maps::{BACKEND_F_TERMINATING, BACKEND_F_VALID},
};
use lb_tests::netns::Netns;
use lb_userspace::{
    Dataplane,
    maglev::{self, MaglevBackend},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
/// tcx: on to the next program of the chain.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;

pub const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1));
pub const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1));
pub const CLIENT4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
pub const CLIENT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
pub const PORT: u16 = 8080;
pub const TARGET_PORT: u16 = 9090;
pub const TABLE_SIZE: u32 = 1021;

pub use lb_common::maps::addr16;

pub fn backend4(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 1, i))
}

/// Backends 1..=n at `backend4(i)`, all valid, as `Lb::service` takes them.
pub fn valid_backends4(n: u8) -> Vec<(u32, IpAddr, u16)> {
    (1..=n)
        .map(|i| (u32::from(i), backend4(i), BACKEND_F_VALID))
        .collect()
}

pub fn backend6(i: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, i))
}

/// A loaded data plane with helpers to program services. Every frame run through it (XDP or
/// TC) is checked to be counted under exactly one reason, once: a path that counts twice and
/// another that counts nothing cannot cancel out as they could in a total taken at the end.
pub struct Lb {
    pub dataplane: Dataplane,
    stats: Stats,
    /// The reason the last run frame was counted under.
    last_reason: std::cell::Cell<Option<Reason>>,
}

impl Lb {
    pub fn new() -> Self {
        Self::with_dataplane(Dataplane::load().expect("load the data plane"))
    }

    /// A harness around a data plane loaded with non-default options.
    pub fn with_dataplane(dataplane: Dataplane) -> Self {
        Self {
            stats: Stats::of(&dataplane),
            dataplane,
            last_reason: std::cell::Cell::new(None),
        }
    }

    /// Programs service `id` on `vip:PORT/proto` with backends `(backend id, address, flags)`
    /// listening on TARGET_PORT, and a Maglev table of its non-terminating backends.
    pub fn service(
        &mut self,
        id: u32,
        vip: IpAddr,
        proto: u8,
        flags: u32,
        backends: &[(u32, IpAddr, u16)],
    ) {
        let key = ServiceKey {
            addr: addr16(vip),
            port: PORT,
            proto,
            pad: 0,
        };
        let value = ServiceValue {
            id,
            flags,
            affinity_timeout_secs: 10800,
        };
        self.dataplane.set_service(&key, &value).unwrap();
        self.dataplane.set_vip_addr(addr16(vip), 1).unwrap();
        for &(backend_id, addr, backend_flags) in backends {
            let backend = Backend {
                addr: addr16(addr),
                port: TARGET_PORT,
                flags: backend_flags,
                service_id: id,
                node: [0; 16],
            };
            self.dataplane.set_backend(backend_id, &backend).unwrap();
        }
        self.table(id, backends);
    }

    /// Builds and swaps in service `id`'s Maglev table from its accepting backends.
    pub fn table(&mut self, id: u32, backends: &[(u32, IpAddr, u16)]) {
        let placed: Vec<MaglevBackend> = backends
            .iter()
            .filter(|(_, _, flags)| flags & BACKEND_F_TERMINATING == 0)
            .map(|&(backend_id, addr, _)| MaglevBackend {
                id: backend_id,
                identity: addr16(addr).to_vec(),
                weight: 1,
            })
            .collect();
        match maglev::build(&placed, TABLE_SIZE).unwrap() {
            Some(table) => self.dataplane.set_maglev_table(id, &table).unwrap(),
            None => {
                let _ = self.dataplane.remove_maglev_table(id);
            }
        }
    }

    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(frame, None)
    }

    pub fn run_on(&self, frame: &[u8], ingress_ifindex: Option<u32>) -> (u32, Vec<u8>) {
        self.counted_once(|| {
            run_xdp(
                self.dataplane.xdp_program().unwrap(),
                frame,
                ingress_ifindex,
            )
        })
    }

    /// Runs `frame` through the TC egress program.
    pub fn run_tc(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.counted_once(|| run_tc(self.dataplane.tc_egress_program().unwrap(), frame))
    }

    /// Runs `frame` through the TC program of local pods' interfaces, as received on
    /// `ingress_ifindex`.
    pub fn run_tc_pod(&self, frame: &[u8], ingress_ifindex: u32) -> (u32, Vec<u8>) {
        self.counted_once(|| {
            run_tc_on(
                self.dataplane.tc_pod_program().unwrap(),
                frame,
                Some(ingress_ifindex),
            )
        })
    }

    /// Runs one frame with `run` and checks it was counted under exactly one reason, once,
    /// remembering that reason for `last_reason`.
    fn counted_once(&self, run: impl FnOnce() -> (u32, Vec<u8>)) -> (u32, Vec<u8>) {
        let before = self.stats.packets();
        let result = run();
        self.last_reason
            .set(Some(counted_under(&before, &self.stats.packets())));
        result
    }

    /// The reason the last frame run (XDP or TC) was counted under.
    pub fn last_reason(&self) -> Reason {
        self.last_reason.get().expect("no frame run yet")
    }

    pub fn reason(&self, reason: Reason) -> u64 {
        self.dataplane.reason_counter(reason).unwrap().packets
    }

    pub fn event(&self, event: Event) -> u64 {
        self.dataplane.event_counter(event).unwrap()
    }
}

/// The one reason whose packet count grew, by exactly one, between two readings of the `STATS`
/// counters; panics naming what was counted otherwise (twice, under two reasons, or not at all).
pub fn counted_under(before: &[u64], after: &[u64]) -> Reason {
    let grown: Vec<(Reason, u64)> = Reason::ALL
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a != b)
        .map(|(&reason, (b, a))| (reason, a.wrapping_sub(*b)))
        .collect();
    match grown[..] {
        [(reason, 1)] => reason,
        _ => panic!(
            "one frame must be counted under exactly one reason, once; counted: {:?}",
            grown
                .iter()
                .map(|(r, n)| (r.name(), *n as i64))
                .collect::<Vec<_>>()
        ),
    }
}

/// The `STATS` per-CPU array of one loaded data plane (found through its XDP program's maps,
/// as other tests' data planes run beside it), read whole in one `BPF_MAP_LOOKUP_BATCH`: cheap
/// enough to read after every frame of a large corpus.
pub struct Stats {
    map: aya::maps::MapData,
    cpus: usize,
}

impl Stats {
    pub fn of(dataplane: &Dataplane) -> Self {
        let ids = dataplane
            .xdp_program()
            .unwrap()
            .info()
            .unwrap()
            .map_ids()
            .unwrap()
            .expect("the kernel lists a program's maps");
        let id = ids
            .into_iter()
            .find(|&id| {
                aya::maps::MapInfo::from_id(id)
                    .is_ok_and(|info| info.name_as_str() == Some(lb_common::maps::names::STATS))
            })
            .expect("the XDP program uses STATS");
        Self {
            map: aya::maps::MapData::from_id(id).unwrap(),
            cpus: aya::util::nr_cpus().unwrap(),
        }
    }

    /// Packets per reason, summed over the CPUs, indexed by `Reason as usize`.
    pub fn packets(&self) -> Vec<u64> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // A `Counter` is two words: packets, bytes.
        let words = std::mem::size_of::<lb_common::Counter>() / 8;
        lb_userspace::syscall::read_per_cpu_array(
            self.map.fd().as_fd().as_raw_fd(),
            Reason::ALL.len(),
            self.cpus,
            words,
        )
        .expect("BPF_MAP_LOOKUP_BATCH of STATS")
        .chunks(self.cpus * words)
        .map(|per_cpu| per_cpu.iter().step_by(words).sum())
        .collect()
    }
}

/// Runs `frame` through an XDP program, optionally as if received on `ingress_ifindex`.
pub fn run_xdp(
    program: &aya::programs::Xdp,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
) -> (u32, Vec<u8>) {
    let mut output = vec![0u8; frame.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, ingress_ifindex.unwrap_or(0), 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ctx_in: ingress_ifindex.map(|_| &ctx[..]),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    output.truncate(result.data_size_out as usize);
    (result.return_value, output)
}

/// Runs `frame` through a TC program.
pub fn run_tc(program: &aya::programs::SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    run_tc_on(program, frame, None)
}

/// Runs `frame` through a TC program, optionally as if received on `ingress_ifindex`.
pub fn run_tc_on(
    program: &aya::programs::SchedClassifier,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
) -> (u32, Vec<u8>) {
    let mut output = vec![0u8; frame.len() + 256];
    // struct __sk_buff (192 bytes): the test run takes ingress_ifindex (offset 36) and
    // ifindex (40), the device the buffer is on; every other field stays zero.
    let mut ctx = [0u8; 192];
    if let Some(ifindex) = ingress_ifindex {
        ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    }
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ctx_in: ingress_ifindex.map(|_| &ctx[..]),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN (tc)");
    output.truncate(result.data_size_out as usize);
    (result.return_value, output)
}

/// Runs `f` on a thread inside a fresh namespace.
pub fn in_fresh_netns<T: Send>(tag: &str, f: impl FnOnce(&Netns) -> T + Send) -> T {
    let ns = Netns::create(tag).unwrap();
    let result = ns.enter(|| f(&ns)).unwrap();
    drop(ns);
    result
}

/// Which backend `i` a DNATed output frame went to: its whole destination address is
/// `backend4(i)` or `backend6(i)` and its destination port `TARGET_PORT`, else `None` (a frame
/// left untouched, or rewritten to anything else).
pub fn try_backend_of(output: &[u8]) -> Option<u8> {
    try_backend_on(output, TARGET_PORT)
}

/// As [`try_backend_of`], for backends listening on `port`.
pub fn try_backend_on(output: &[u8], port: u16) -> Option<u8> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let sliced = SlicedPacket::from_ethernet(output).ok()?;
    let dst = match sliced.net? {
        NetSlice::Ipv4(ip) => IpAddr::V4(ip.header().destination_addr()),
        NetSlice::Ipv6(ip) => IpAddr::V6(ip.header().destination_addr()),
        NetSlice::Arp(_) => return None,
    };
    let dport = match sliced.transport? {
        TransportSlice::Tcp(tcp) => tcp.destination_port(),
        TransportSlice::Udp(udp) => udp.destination_port(),
        _ => return None,
    };
    (1..=u8::MAX).find(|&i| dport == port && (dst == backend4(i) || dst == backend6(u16::from(i))))
}

/// Which backend a DNATed output frame went to; panics unless it was DNATed to one.
pub fn backend_of(output: &[u8]) -> u8 {
    backend_on(output, TARGET_PORT)
}

/// As [`backend_of`], for backends listening on `port` (the controller tests' services).
pub fn backend_on(output: &[u8], port: u16) -> u8 {
    try_backend_on(output, port)
        .unwrap_or_else(|| panic!("not DNATed to a backend:{port}: {output:02x?}"))
}

/// Reads an interface's index and MAC in `ns` (`ip netns exec` mounts the namespace's /sys).
pub fn link(ns: &Netns, name: &str) -> (u32, [u8; 6]) {
    let read = |file: &str| {
        let path = format!("/sys/class/net/{name}/{file}");
        String::from_utf8(ns.exec("cat", &[&path]).unwrap().stdout).unwrap()
    };
    let mac: Vec<u8> = read("address")
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    (
        read("ifindex").trim().parse().unwrap(),
        mac.try_into().unwrap(),
    )
}

/// The MAC of backend 1's neighbour entry in [`routed_netns`] (both families).
pub const BACKEND1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];

/// A namespace with routes to the backends' subnets (IPv4 and IPv6) out of `fwd0` (its peer
/// `fwd1`), resolved neighbours for backend 1 of both families (the same MAC,
/// [`BACKEND1_MAC`]) and forwarding on: (namespace, fwd0's index and MAC, fwd1's index).
pub fn routed_netns(tag: &str) -> (Netns, u32, [u8; 6], u32) {
    let ns = Netns::create(tag).unwrap();
    ns.ip(&[
        "link", "add", "fwd0", "type", "veth", "peer", "name", "fwd1",
    ])
    .unwrap();
    for dev in ["fwd0", "fwd1"] {
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    ns.ip(&["addr", "add", "198.18.1.254/24", "dev", "fwd0"])
        .unwrap();
    // nodad: the address is usable (and the route with it) at once, not after duplicate
    // address detection.
    ns.ip(&["addr", "add", "2001:db8:1::fe/64", "dev", "fwd0", "nodad"])
        .unwrap();
    for (backend, family) in [("198.18.1.1", "ipv4"), ("2001:db8:1::1", "ipv6")] {
        add_neighbour(&ns, backend, BACKEND1_MAC);
        let forwarding = format!("net.{family}.conf.all.forwarding=1");
        ns.exec("sysctl", &["-qw", &forwarding]).unwrap();
    }
    let (fwd0, fwd0_mac) = link(&ns, "fwd0");
    let (fwd1, _) = link(&ns, "fwd1");
    (ns, fwd0, fwd0_mac, fwd1)
}

/// A permanent neighbour entry for `addr` at `mac` on `fwd0` in `ns`.
pub fn add_neighbour(ns: &Netns, addr: &str, mac: [u8; 6]) {
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&[
        "neigh",
        "add",
        addr,
        "lladdr",
        &mac,
        "dev",
        "fwd0",
        "nud",
        "permanent",
    ])
    .unwrap();
}
