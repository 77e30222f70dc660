//! Per-packet cost of the XDP program's paths, measured with BPF_PROG_TEST_RUN beside a minimal
//! XDP_PASS program in the same run: `cargo run --release -p lb-tests --example testrun_cost`.
//!
//! Each sample is one run (repeat = 1, since repeat > 1 would feed the rewritten frame back in),
//! timed by the kernel; the paths are interleaved so drift hits all alike. Runs inside a fresh
//! network namespace, where the route lookup finds no route and DNATed frames go to the stack.

use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::{
    Backend, ServiceKey, ServiceValue,
    maps::{BACKEND_F_VALID, PROTO_TCP, ipv4_mapped},
};
use lb_tests::{frames::Spec, netns::Netns};
use lb_userspace::{
    Dataplane,
    maglev::{self, MaglevBackend},
};

const RUNS: usize = 100_000;

fn run(program: &Xdp, frame: &[u8]) -> u64 {
    program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN")
        .duration
        .as_nanos() as u64
}

fn median(mut samples: Vec<u64>) -> u64 {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let ns = Netns::create("cost")?;
    ns.enter(measure)?
}

fn measure() -> anyhow::Result<()> {
    let mut dataplane = Dataplane::load()?;
    let vip = Ipv4Addr::new(198, 18, 100, 1);
    dataplane.set_service(
        &ServiceKey {
            addr: ipv4_mapped(vip.octets()),
            port: 8080,
            proto: PROTO_TCP,
            pad: 0,
        },
        &ServiceValue {
            id: 1,
            flags: 0,
            affinity_timeout_secs: 0,
        },
    )?;
    dataplane.set_vip_addr(ipv4_mapped(vip.octets()), 1)?;
    let backends: Vec<MaglevBackend> = (1..=4u8)
        .map(|i| MaglevBackend {
            id: u32::from(i),
            identity: vec![198, 18, 1, i],
            weight: 1,
        })
        .collect();
    for b in &backends {
        let backend = Backend {
            addr: ipv4_mapped([198, 18, 1, b.id as u8]),
            port: 8080,
            flags: BACKEND_F_VALID,
            service_id: 1,
        };
        dataplane.set_backend(b.id, &backend)?;
    }
    let table = maglev::build(&backends, 16381)?.expect("a table");
    dataplane.set_maglev_table(1, &table)?;

    let client = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
    let established = Spec::tcp(client, 50000, IpAddr::V4(vip), 8080).build();
    let not_vip = Spec::tcp(client, 50000, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 80).build();
    // Distinct source address and port per run: every run places a new flow.
    let new_flows: Vec<Vec<u8>> = (0..RUNS)
        .map(|i| {
            let src = Ipv4Addr::new(198, 19, (i >> 16) as u8, (i >> 8) as u8);
            Spec::tcp(
                IpAddr::V4(src),
                (i & 0xff) as u16 + 1024,
                IpAddr::V4(vip),
                8080,
            )
            .build()
        })
        .collect();

    let pass = dataplane.xdp_pass_program()?;
    let lb = dataplane.xdp_program()?;
    run(lb, &established); // the flow is now tracked
    let (mut floor, mut non_vip, mut hit, mut new) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for frame in &new_flows {
        floor.push(run(pass, &established));
        non_vip.push(run(lb, &not_vip));
        hit.push(run(lb, &established));
        new.push(run(lb, frame));
    }
    let floor = median(floor);
    println!("runs per path: {RUNS} (repeat=1, interleaved), medians of kernel-timed runs");
    println!("{:<28} {:>8} {:>14}", "path", "ns", "ns over PASS");
    println!("{:<28} {:>8} {:>14}", "XDP_PASS (floor)", floor, "-");
    for (name, samples) in [
        ("non-VIP pass", non_vip),
        ("conntrack hit (DNAT)", hit),
        ("new flow (Maglev + insert)", new),
    ] {
        let m = median(samples);
        println!("{name:<28} {m:>8} {:>+14}", m as i64 - floor as i64);
    }
    Ok(())
}
