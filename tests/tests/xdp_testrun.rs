//! Frames run through the loaded XDP program with BPF_PROG_TEST_RUN.

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::PacketBuilder;
use lb_common::Reason;
use lb_userspace::Dataplane;

const XDP_PASS: u32 = 2;

struct Verdict {
    action: u32,
    output: Vec<u8>,
}

fn run(dataplane: &Dataplane, frame: &[u8]) -> Verdict {
    let mut output = vec![0u8; frame.len() + 256];
    let result = dataplane
        .xdp_program()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    output.truncate(result.data_size_out as usize);
    Verdict {
        action: result.return_value,
        output,
    }
}

fn udp4() -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .udp(40000, 8080)
        .write(&mut frame, b"hello")
        .unwrap();
    frame
}

fn udp6() -> Vec<u8> {
    let mut frame = Vec::new();
    let src = "2001:db8::1"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    let dst = "2001:db8::2"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src, dst, 64)
        .udp(40000, 8080)
        .write(&mut frame, b"hello")
        .unwrap();
    frame
}

fn arp() -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [0xff; 6])
        .arp(
            etherparse::ArpPacket::new(
                etherparse::ArpHardwareId::ETHERNET,
                etherparse::EtherType::IPV4,
                etherparse::ArpOperation::REQUEST,
                &[2, 0, 0, 0, 0, 1],
                &[198, 18, 0, 1],
                &[0; 6],
                &[198, 18, 0, 2],
            )
            .unwrap(),
        )
        .write(&mut frame)
        .unwrap();
    frame
}

#[test]
fn every_frame_passes_unchanged_and_is_counted_under_its_reason() {
    let dataplane = Dataplane::load().expect("load the data plane");
    let mut truncated_ipv4 = udp4();
    truncated_ipv4.truncate(14 + 10);
    let cases = [
        (udp4(), Reason::PassIpv4),
        (udp6(), Reason::PassIpv6),
        (arp(), Reason::PassNotIp),
        (truncated_ipv4, Reason::PassTruncated),
    ];
    for (frame, reason) in &cases {
        let before = dataplane.reason_counter(*reason).unwrap();
        let verdict = run(&dataplane, frame);
        assert_eq!(verdict.action, XDP_PASS, "{}", reason.name());
        assert_eq!(&verdict.output, frame, "{} frame altered", reason.name());
        let after = dataplane.reason_counter(*reason).unwrap();
        assert_eq!(after.packets, before.packets + 1, "{}", reason.name());
        assert_eq!(
            after.bytes,
            before.bytes + frame.len() as u64,
            "{}",
            reason.name()
        );
    }
    let total: u64 = dataplane
        .reason_counters()
        .unwrap()
        .iter()
        .map(|(_, counter)| counter.packets)
        .sum();
    assert_eq!(
        total,
        cases.len() as u64,
        "every frame counted exactly once"
    );
}
