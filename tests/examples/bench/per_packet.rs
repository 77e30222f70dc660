//! Per-packet cost of each path of the program, timed by the kernel with BPF_PROG_TEST_RUN
//! (repeat = 1 in a loop: repeat > 1 would feed the rewritten frame back in), beside a minimal
//! XDP_PASS program and a minimal one-lookup DNAT + XDP_TX program, interleaved, in a fresh
//! namespace (no route: DNATed frames take the stack fallback, as the route lookup is part of
//! the path).

use std::net::{IpAddr, Ipv4Addr};

use aya::{
    Ebpf, TestRunResult,
    maps::HashMap,
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{
    Backend, ServiceKey, ServiceValue,
    maps::{BACKEND_F_VALID, PROTO_TCP, ipv4_mapped},
};
use lb_tests::{frames::Spec, netns::Netns};
use lb_userspace::{Dataplane, dataplane::BENCH_OBJECT};

use crate::report::{Report, median};

const SECTION: &str = "Per-packet cost (BPF_PROG_TEST_RUN, ns added over XDP_PASS)";
/// Katran's XDP program measured the same way on this kind of VM (the reference).
const KATRAN: [(&str, f64); 3] = [
    ("non-VIP pass", 160.0),
    ("conntrack hit", 430.0),
    ("new flow", 1500.0),
];
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const TABLE_SIZE: u32 = 1021;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8)
}

/// One run of `frame`, timed by the kernel (repeat = 1).
fn once(frame: &[u8]) -> TestRunOptions<'_> {
    TestRunOptions {
        data_in: Some(frame),
        ..TestRunOptions::new()
    }
}

fn nanos(result: Result<TestRunResult, ProgramError>) -> f64 {
    result.expect("BPF_PROG_TEST_RUN").duration.as_nanos() as f64
}

fn xdp_ns(program: &Xdp, frame: &[u8]) -> f64 {
    nanos(program.test_run(once(frame)))
}

fn tc_ns(program: &SchedClassifier, frame: &[u8]) -> f64 {
    nanos(program.test_run(once(frame)))
}

/// Programs `services` services of 4 backends each.
fn program_services(dataplane: &mut Dataplane, services: u32) -> anyhow::Result<()> {
    let mut tables = Vec::new();
    for s in 0..services {
        let key = ServiceKey {
            addr: ipv4_mapped(vip(s).octets()),
            port: 8080,
            proto: PROTO_TCP,
            pad: 0,
        };
        dataplane.set_service(
            &key,
            &ServiceValue {
                id: s,
                flags: 0,
                affinity_timeout_secs: 0,
            },
        )?;
        dataplane.set_vip_addr(ipv4_mapped(vip(s).octets()), 1)?;
        let ids: Vec<u32> = (0..4).map(|b| s * 4 + b).collect();
        for (b, id) in ids.iter().enumerate() {
            let backend = Backend {
                addr: ipv4_mapped([198, 18, 1, b as u8 + 1]),
                port: 8080,
                flags: BACKEND_F_VALID,
                service_id: s,
            };
            dataplane.set_backend(*id, &backend)?;
        }
        let placed: Vec<_> = ids
            .iter()
            .map(|id| lb_userspace::maglev::MaglevBackend {
                id: *id,
                identity: id.to_be_bytes().to_vec(),
                weight: 1,
            })
            .collect();
        let table = lb_userspace::maglev::build(&placed, TABLE_SIZE)?.expect("a table");
        tables.push((s, table));
    }
    dataplane.set_maglev_tables(&tables)?;
    Ok(())
}

pub fn run(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let ns = Netns::create("bench-pp")?;
    ns.enter(|| measure(report, quick))?
}

fn measure(report: &mut Report, quick: bool) -> anyhow::Result<()> {
    let rounds = 3;
    let runs = if quick { 3_000 } else { 40_000 };
    let live_flows: u32 = if quick { 10_000 } else { 100_000 };
    let mut bench = Ebpf::load(BENCH_OBJECT)?;
    {
        let program: &mut Xdp = bench
            .program_mut("bench_min_dnat")
            .expect("program")
            .try_into()?;
        program.load()?;
    }
    // The floor DNAT's one backend, sent back out (XDP_TX).
    let mut min_backends: HashMap<_, [u8; 4], [u8; 20]> =
        bench.map_mut("MIN_BACKENDS").expect("map").try_into()?;
    let mut value = [0u8; 20];
    value[..4].copy_from_slice(&[198, 18, 1, 1]);
    min_backends.insert(vip(0).octets(), value, 0)?;
    let min_dnat: &Xdp = bench
        .program("bench_min_dnat")
        .expect("program")
        .try_into()?;

    for services in [1u32, 100, 10_000] {
        let started = std::time::Instant::now();
        let mut dataplane = Dataplane::load()?;
        eprintln!("   loaded in {:?}", started.elapsed());
        program_services(&mut dataplane, services)?;
        eprintln!(
            "   {services} services programmed in {:?}",
            started.elapsed()
        );
        let pass = dataplane.xdp_pass_program()?;
        let lb = dataplane.xdp_program()?;
        let tc = dataplane.tc_egress_program()?;
        // Live flows spread over the services.
        for i in 0..live_flows {
            let src = Ipv4Addr::new(198, 21, (i >> 8) as u8, i as u8);
            let frame = Spec::tcp(
                IpAddr::V4(src),
                1000 + (i % 50_000) as u16,
                IpAddr::V4(vip(i % services)),
                8080,
            )
            .build();
            xdp_ns(lb, &frame);
        }
        // Opened by a SYN, then measured with the segments of an established connection (a
        // SYN is always placed afresh).
        let opening = Spec::tcp(IpAddr::V4(CLIENT), 50000, IpAddr::V4(vip(0)), 8080);
        xdp_ns(lb, &opening.build());
        let established = opening.ack().build();
        let backend_of = {
            let flows = dataplane.flows()?;
            let key = flows
                .iter()
                .find(|(k, _)| k.sport == 50000 && k.src == ipv4_mapped(CLIENT.octets()))
                .map(|(_, v)| v.backend_id)
                .expect("the established flow is tracked");
            1 + (key % 4) as u8
        };
        let reply = Spec::tcp(
            IpAddr::V4(Ipv4Addr::new(198, 18, 1, backend_of)),
            8080,
            IpAddr::V4(CLIENT),
            50000,
        )
        .ack()
        .build();
        let untracked = Spec::tcp(
            IpAddr::V4(Ipv4Addr::new(198, 18, 9, 9)),
            8080,
            IpAddr::V4(CLIENT),
            50001,
        )
        .ack()
        .build();
        let not_vip = Spec::tcp(
            IpAddr::V4(CLIENT),
            50000,
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            80,
        )
        .build();
        let new_flows: Vec<Vec<u8>> = (0..runs * rounds)
            .map(|i| {
                let src = Ipv4Addr::new(198, 22, (i >> 16) as u8, (i >> 8) as u8);
                Spec::tcp(
                    IpAddr::V4(src),
                    1024 + (i & 0xff) as u16,
                    IpAddr::V4(vip(0)),
                    8080,
                )
                .build()
            })
            .collect();

        let names = [
            "XDP_PASS",
            "min DNAT + XDP_TX",
            "non-VIP pass",
            "conntrack hit",
            "new flow",
            "reverse NAT (TC)",
            "TC egress, untracked",
        ];
        let mut per_round: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        for round in 0..rounds {
            let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); names.len()];
            for i in 0..runs {
                samples[0].push(xdp_ns(pass, &established));
                samples[1].push(xdp_ns(min_dnat, &established));
                samples[2].push(xdp_ns(lb, &not_vip));
                samples[3].push(xdp_ns(lb, &established));
                samples[4].push(xdp_ns(lb, &new_flows[round * runs + i]));
                samples[5].push(tc_ns(tc, &reply));
                samples[6].push(tc_ns(tc, &untracked));
            }
            for (path, s) in samples.iter().enumerate() {
                per_round[path].push(median(s));
            }
        }
        let floor = per_round[0].clone();
        let over: Vec<Vec<f64>> = per_round
            .iter()
            .map(|r| r.iter().zip(&floor).map(|(v, f)| v - f).collect())
            .collect();
        let label = format!(
            "{services} service{}, {live_flows} live flows",
            if services == 1 { "" } else { "s" }
        );
        report.add(
            SECTION,
            &format!("XDP_PASS floor (absolute), {label}"),
            "ns",
            floor.clone(),
            None,
            "",
        );
        report.add(
            SECTION,
            &format!("min DNAT + XDP_TX, {label}"),
            "ns",
            over[1].clone(),
            None,
            "the floor of a DNAT",
        );
        for (path, katran) in [(2, KATRAN[0]), (3, KATRAN[1]), (4, KATRAN[2])] {
            let reference = vec![katran.1; rounds];
            report.add(
                SECTION,
                &format!("{}, {label}", names[path]),
                "ns",
                over[path].clone(),
                Some((
                    &format!("Katran {}: +{} ns", katran.0, katran.1),
                    &reference,
                    |v, b| v / b,
                )),
                "ratio < 1: cheaper than Katran",
            );
        }
        report.add(
            SECTION,
            &format!("reverse NAT (TC), {label}"),
            "ns",
            per_round[5].iter().zip(&per_round[6]).map(|(v, b)| v - b).collect(),
            None,
            "over the TC program passing an untracked packet (a TC test run allocates a socket buffer)",
        );
        report.add(
            SECTION,
            &format!("TC egress untracked (absolute), {label}"),
            "ns",
            per_round[6].clone(),
            None,
            "",
        );
        eprintln!("   {services} services done");
    }
    report.notes.push(format!(
        "Per-packet: {rounds} rounds x {runs} runs per path (repeat = 1), medians per round; Maglev tables of {TABLE_SIZE} slots per service (10k services x 16381 slots would take 1.3 GB of kernel memory)."
    ));
    Ok(())
}
