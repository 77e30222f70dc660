//! The fixture harness shared by the BPF_PROG_TEST_RUN tests: addresses, a loaded data plane
//! with helpers to program services (`Lb`), and runners for both programs.
// Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    Backend, Event, Reason, ServiceKey, ServiceValue,
    maps::{BACKEND_F_TERMINATING, BACKEND_F_VALID, ipv4_mapped},
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

pub fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

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

/// A loaded data plane with helpers to program services.
pub struct Lb {
    pub dataplane: Dataplane,
    /// Frames run through `lb_xdp`, to check the counters account for every one.
    pub runs: std::cell::Cell<u64>,
}

impl Drop for Lb {
    /// Every frame run through the program is counted under exactly one reason.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let xdp_total: u64 = self
                .dataplane
                .reason_counters()
                .unwrap()
                .iter()
                .filter(|(reason, _)| {
                    !reason.name().starts_with("egress") && !reason.name().starts_with("reverse")
                })
                .map(|(_, c)| c.packets)
                .sum();
            assert_eq!(
                xdp_total,
                self.runs.get(),
                "XDP counters account for every frame"
            );
        }
    }
}

impl Lb {
    pub fn new() -> Self {
        Self {
            dataplane: Dataplane::load().expect("load the data plane"),
            runs: std::cell::Cell::new(0),
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
        self.runs.set(self.runs.get() + 1);
        run_xdp(
            self.dataplane.xdp_program().unwrap(),
            frame,
            ingress_ifindex,
        )
    }

    /// Runs `frame` through the TC egress program.
    pub fn run_tc(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut output = vec![0u8; frame.len() + 256];
        let result = self
            .dataplane
            .tc_egress_program()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut output),
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN (tc)");
        output.truncate(result.data_size_out as usize);
        (result.return_value, output)
    }

    pub fn reason(&self, reason: Reason) -> u64 {
        self.dataplane.reason_counter(reason).unwrap().packets
    }

    pub fn total(&self) -> u64 {
        self.dataplane
            .reason_counters()
            .unwrap()
            .iter()
            .map(|(_, c)| c.packets)
            .sum()
    }

    pub fn event(&self, event: Event) -> u64 {
        self.dataplane.event_counter(event).unwrap()
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

/// Runs `f` on a thread inside a fresh namespace.
pub fn in_fresh_netns<T: Send>(tag: &str, f: impl FnOnce(&Netns) -> T + Send) -> T {
    let ns = Netns::create(tag).unwrap();
    let result = ns.enter(|| f(&ns)).unwrap();
    drop(ns);
    result
}

/// Which backend a DNATed output frame went to (its IPv4 destination's last byte).
pub fn backend_of(output: &[u8]) -> u8 {
    output[14 + 19]
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
