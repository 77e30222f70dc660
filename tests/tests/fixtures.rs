//! Packet fixtures through BPF_PROG_TEST_RUN, in the style of Katran's tester: each case
//! programs the maps, runs an input frame through the loaded program and checks the verdict, the
//! exact output bytes (built independently with etherparse), valid checksums and the counter of
//! the reason it was counted under. Every case runs inside a fresh network namespace so route
//! lookups are deterministic (no route: DNATed frames go to the kernel).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    Backend, Event, PodHandoff, Reason, ServiceKey, ServiceValue,
    conntrack::{TCP_ACK, TCP_RST, TCP_SYN},
    maps::{
        BACKEND_F_TERMINATING, BACKEND_F_VALID, POD_HANDOFF_MAGIC, PROTO_TCP, PROTO_UDP,
        SERVICE_F_AFFINITY, SERVICE_F_DROP_EMPTY, SERVICE_F_SOURCE_RANGES,
    },
};
use lb_tests::frames::{Spec, assert_checksums_valid};
use lb_userspace::Dataplane;

mod harness;
use harness::*;

/// What a case expects.
enum Expect {
    /// Passed byte for byte.
    Unchanged(Reason),
    /// Dropped.
    Dropped(Reason),
    /// DNATed to this frame and passed to the kernel (no route in the test namespace).
    Dnat(Vec<u8>),
    /// Answered with this frame (XDP_TX).
    Answered(Vec<u8>),
    /// Refused with this frame (XDP_TX): an RST or an ICMP port unreachable, counted under the
    /// reason.
    Refused(Reason, Vec<u8>),
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    expect: Expect,
}

fn check(lb: &Lb, case: &Case) {
    let name = case.name;
    let (reason, verdict, output) = match &case.expect {
        Expect::Unchanged(reason) => (*reason, XDP_PASS, &case.input),
        Expect::Dropped(reason) => (*reason, XDP_DROP, &case.input),
        Expect::Dnat(output) => (Reason::DnatFibFallback, XDP_PASS, output),
        Expect::Answered(output) => (Reason::IcmpEchoReply, XDP_TX, output),
        Expect::Refused(reason, output) => (*reason, XDP_TX, output),
    };
    let (got_verdict, got_output) = lb.run(&case.input);
    assert_eq!(got_verdict, verdict, "{name}: verdict");
    if verdict != XDP_DROP {
        assert_eq!(&got_output, output, "{name}: output bytes");
    }
    if matches!(
        case.expect,
        Expect::Dnat(_) | Expect::Answered(_) | Expect::Refused(..)
    ) {
        assert_checksums_valid(&got_output);
    }
    assert_eq!(lb.last_reason(), reason, "{name}: counted under");
}

/// The service every stateless case uses: TCP and UDP on VIP4 and VIP6, one backend each, so
/// the expected backend is known without consulting the table.
fn single_backend_lb() -> Lb {
    let mut lb = Lb::new();
    lb.service(1, VIP4, PROTO_TCP, 0, &[(1, backend4(1), BACKEND_F_VALID)]);
    lb.service(2, VIP4, PROTO_UDP, 0, &[(2, backend4(2), BACKEND_F_VALID)]);
    lb.service(3, VIP6, PROTO_TCP, 0, &[(3, backend6(3), BACKEND_F_VALID)]);
    lb.service(4, VIP6, PROTO_UDP, 0, &[(4, backend6(4), BACKEND_F_VALID)]);
    lb
}

fn truncated(frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame[..len].to_vec()
}

/// Sets a big-endian u16 at `at` and fixes the IPv4 header checksum of the header at 14.
fn patch_ipv4(mut frame: Vec<u8>, at: usize, value: u16) -> Vec<u8> {
    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let check = lb_common::checksum::compute(&frame[14..14 + ((frame[14] & 0xf) as usize) * 4]);
    frame[24..26].copy_from_slice(&check.to_be_bytes());
    frame
}

/// Inserts an 8-byte hop-by-hop options header after the IPv6 header at 14.
fn with_hop_by_hop(frame: Vec<u8>) -> Vec<u8> {
    with_extensions(frame, &[0])
}

/// An untagged IPv6 frame with extension headers of the given kinds inserted before its
/// transport header, in order (8 bytes each: PadN options, a routing header with no segments
/// left, an atomic fragment header, or 16 for authentication).
fn with_extensions(mut frame: Vec<u8>, kinds: &[u8]) -> Vec<u8> {
    let mut next = frame[14 + 6];
    let mut inserted = Vec::new();
    for &kind in kinds.iter().rev() {
        let header: Vec<u8> = match kind {
            // Routing type 4, no segments left.
            43 => vec![next, 0, 4, 0, 0, 0, 0, 0],
            // An atomic fragment: offset 0, no more fragments.
            44 => vec![next, 0, 0, 0, 0, 0, 0x12, 0x34],
            // Authentication: length in 4-byte words less 2.
            51 => vec![next, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0],
            _ => vec![next, 0, 1, 4, 0, 0, 0, 0],
        };
        inserted.splice(0..0, header);
        next = kind;
    }
    frame[14 + 6] = next;
    let payload_len = u16::from_be_bytes([frame[18], frame[19]]) + inserted.len() as u16;
    frame[18..20].copy_from_slice(&payload_len.to_be_bytes());
    frame.splice(54..54, inserted);
    frame
}

fn echo_reply_v4() -> Vec<u8> {
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 10])
        .ipv4([198, 18, 100, 1], [198, 18, 0, 10], 64)
        .icmpv4_echo_reply(1, 1)
        .write(&mut frame, b"ping")
        .unwrap();
    frame
}

fn echo_v6(reply: bool) -> Vec<u8> {
    let (client, vip) = (addr16(CLIENT6), addr16(VIP6));
    let (src, dst, smac, dmac) = if reply {
        (vip, client, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 10])
    } else {
        (client, vip, [2, 0, 0, 0, 0, 10], [2, 0, 0, 0, 0, 1])
    };
    let builder = etherparse::PacketBuilder::ethernet2(smac, dmac).ipv6(src, dst, 64);
    let mut frame = Vec::new();
    if reply {
        builder
            .icmpv6_echo_reply(7, 9)
            .write(&mut frame, b"ping6")
            .unwrap();
    } else {
        builder
            .icmpv6_echo_request(7, 9)
            .write(&mut frame, b"ping6")
            .unwrap();
    }
    frame
}

fn stateless_cases() -> Vec<Case> {
    let tcp4 = Spec::tcp(CLIENT4, 40000, VIP4, PORT);
    let udp4 = Spec::udp(CLIENT4, 40001, VIP4, PORT);
    let tcp6 = Spec::tcp(CLIENT6, 40002, VIP6, PORT);
    let udp6 = Spec::udp(CLIENT6, 40003, VIP6, PORT);
    let dnat = |spec: &Spec, backend: IpAddr| Expect::Dnat(spec.to(backend, TARGET_PORT).build());
    let with = |spec: &Spec, f: &dyn Fn(&mut Spec)| {
        let mut spec = spec.clone();
        f(&mut spec);
        spec
    };
    let mut udp4_no_checksum = udp4.build();
    udp4_no_checksum[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let mut udp4_no_checksum_out = udp4.to(backend4(2), TARGET_PORT).build();
    udp4_no_checksum_out[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let arp = {
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 10], [0xff; 6])
            .arp(
                etherparse::ArpPacket::new(
                    etherparse::ArpHardwareId::ETHERNET,
                    etherparse::EtherType::IPV4,
                    etherparse::ArpOperation::REQUEST,
                    &[2, 0, 0, 0, 0, 10],
                    &[198, 18, 0, 10],
                    &[0; 6],
                    &[198, 18, 100, 1],
                )
                .unwrap(),
            )
            .write(&mut frame)
            .unwrap();
        frame
    };
    let mut lldp = tcp4.build();
    lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
    let icmp_to_vip = {
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 10], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 0, 10], [198, 18, 100, 1], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut frame, b"ping")
            .unwrap();
        frame
    };
    let tcp4_len = tcp4.build().len();
    vec![
        // DNAT of each family and protocol.
        Case {
            name: "tcp4 dnat",
            input: tcp4.build(),
            expect: dnat(&tcp4, backend4(1)),
        },
        Case {
            name: "udp4 dnat",
            input: udp4.build(),
            expect: dnat(&udp4, backend4(2)),
        },
        Case {
            name: "tcp6 dnat",
            input: tcp6.build(),
            expect: dnat(&tcp6, backend6(3)),
        },
        Case {
            name: "udp6 dnat",
            input: udp6.build(),
            expect: dnat(&udp6, backend6(4)),
        },
        Case {
            name: "udp4 checksum 0 stays 0",
            input: udp4_no_checksum,
            expect: Expect::Dnat(udp4_no_checksum_out),
        },
        Case {
            name: "tcp4 with a large payload",
            input: with(&tcp4, &|s| s.payload = vec![0xab; 1400]).build(),
            expect: dnat(&with(&tcp4, &|s| s.payload = vec![0xab; 1400]), backend4(1)),
        },
        // IPv4 options are skipped by IHL, and kept.
        Case {
            name: "tcp4 with 4 bytes of options",
            input: with(&tcp4, &|s| s.ipv4_options = 4).build(),
            expect: dnat(&with(&tcp4, &|s| s.ipv4_options = 4), backend4(1)),
        },
        Case {
            name: "udp4 with 40 bytes of options",
            input: with(&udp4, &|s| s.ipv4_options = 40).build(),
            expect: dnat(&with(&udp4, &|s| s.ipv4_options = 40), backend4(2)),
        },
        // VLAN tags are kept; the kernel routes tagged frames.
        Case {
            name: "802.1Q tcp4 dnat",
            input: with(&tcp4, &|s| s.vlans = 1).build(),
            expect: dnat(&with(&tcp4, &|s| s.vlans = 1), backend4(1)),
        },
        Case {
            name: "QinQ udp6 dnat",
            input: with(&udp6, &|s| s.vlans = 2).build(),
            expect: dnat(&with(&udp6, &|s| s.vlans = 2), backend6(4)),
        },
        Case {
            name: "802.1Q non-VIP passes",
            input: with(&tcp4, &|s| {
                s.vlans = 1;
                s.dst = CLIENT4;
            })
            .build(),
            expect: Expect::Unchanged(Reason::PassNotVip),
        },
        // Fragments: the first carries the ports and is DNATed; later ones to a VIP are dropped.
        Case {
            name: "first fragment udp4 dnat",
            input: with(&udp4, &|s| s.more_fragments = true).build(),
            expect: dnat(&with(&udp4, &|s| s.more_fragments = true), backend4(2)),
        },
        Case {
            name: "a later fragment of an unknown datagram to a VIP dropped",
            input: with(&udp4, &|s| {
                s.fragment_offset = 185;
                s.identification = 999;
            })
            .build(),
            expect: Expect::Dropped(Reason::DropFragment),
        },
        Case {
            name: "non-first fragment elsewhere passes",
            input: with(&udp4, &|s| {
                s.fragment_offset = 185;
                s.dst = CLIENT4;
            })
            .build(),
            expect: Expect::Unchanged(Reason::PassNotVip),
        },
        // Not ours: untouched.
        Case {
            name: "ARP passes",
            input: arp,
            expect: Expect::Unchanged(Reason::PassNotIp),
        },
        Case {
            name: "LLDP passes",
            input: lldp,
            expect: Expect::Unchanged(Reason::PassNotIp),
        },
        Case {
            name: "tcp4 to another address passes",
            input: tcp4.to(backend4(9), PORT).build(),
            expect: Expect::Unchanged(Reason::PassNotVip),
        },
        Case {
            name: "tcp4 to the VIP on another port passes",
            input: tcp4.to(VIP4, 22).build(),
            expect: Expect::Unchanged(Reason::PassNotVip),
        },
        Case {
            name: "tcp6 to another address passes",
            input: tcp6.to(backend6(9), PORT).build(),
            expect: Expect::Unchanged(Reason::PassNotVip),
        },
        Case {
            name: "ICMP echo to the VIP is answered",
            input: icmp_to_vip,
            expect: Expect::Answered(echo_reply_v4()),
        },
        Case {
            name: "ICMPv6 echo to the VIP is answered",
            input: echo_v6(false),
            expect: Expect::Answered(echo_v6(true)),
        },
        // Truncation at every header boundary.
        Case {
            name: "truncated inside the second VLAN tag",
            input: truncated(with(&tcp4, &|s| s.vlans = 2).build(), 20),
            expect: Expect::Unchanged(Reason::PassUnparsed),
        },
        Case {
            name: "truncated after Ethernet (IPv4 type)",
            input: truncated(tcp4.build(), 14),
            expect: Expect::Unchanged(Reason::PassUnparsed),
        },
        Case {
            name: "truncated inside the IPv4 header",
            input: truncated(tcp4.build(), 14 + 10),
            expect: Expect::Unchanged(Reason::PassUnparsed),
        },
        Case {
            name: "truncated after the IPv4 header, to a VIP",
            input: truncated(tcp4.build(), 14 + 20),
            expect: Expect::Dropped(Reason::DropMalformed),
        },
        Case {
            name: "truncated inside the TCP header, to a VIP",
            input: truncated(tcp4.build(), 14 + 20 + 10),
            expect: Expect::Dropped(Reason::DropMalformed),
        },
        Case {
            name: "truncated inside the UDP header, to a VIP",
            input: truncated(udp4.build(), 14 + 20 + 4),
            expect: Expect::Dropped(Reason::DropMalformed),
        },
        Case {
            name: "truncated inside the IPv6 header",
            input: truncated(tcp6.build(), 14 + 30),
            expect: Expect::Unchanged(Reason::PassUnparsed),
        },
        Case {
            name: "truncated after the IPv6 header, to a VIP",
            input: truncated(tcp6.build(), 14 + 40),
            expect: Expect::Dropped(Reason::DropMalformed),
        },
        Case {
            name: "truncated inside the VLAN tag",
            input: truncated(with(&tcp4, &|s| s.vlans = 1).build(), 16),
            expect: Expect::Unchanged(Reason::PassUnparsed),
        },
        // Lying length fields.
        Case {
            name: "IHL below 5, to a VIP",
            input: {
                let mut f = tcp4.build();
                f[14] = 0x44;
                f
            },
            expect: Expect::Dropped(Reason::DropMalformed),
        },
        Case {
            name: "IPv4 total length beyond the frame, to a VIP",
            input: patch_ipv4(tcp4.build(), 16, (tcp4_len - 14 + 100) as u16),
            expect: Expect::Dropped(Reason::DropMalformed),
        },
        Case {
            // The VIP filter passes it before anything but its destination is read.
            name: "IPv4 total length beyond the frame, to an address no service uses",
            input: patch_ipv4(tcp4.to(CLIENT4, PORT).build(), 16, 1500),
            expect: Expect::Unchanged(Reason::PassNotVip),
        },
        Case {
            // A tagged frame is parsed before its destination is known.
            name: "IPv4 total length beyond the frame, tagged, elsewhere",
            input: {
                let mut f = with(&tcp4.to(CLIENT4, PORT), &|s| s.vlans = 1).build();
                f[18 + 2..18 + 4].copy_from_slice(&1500u16.to_be_bytes());
                f
            },
            expect: Expect::Unchanged(Reason::PassUnparsed),
        },
        Case {
            name: "TCP data offset below 5, to a VIP",
            input: {
                let mut f = tcp4.build();
                f[14 + 20 + 12] = 0x40;
                f
            },
            expect: Expect::Dropped(Reason::DropMalformed),
        },
        Case {
            name: "UDP length beyond the IP payload, to a VIP",
            input: {
                let mut f = udp4.build();
                f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&600u16.to_be_bytes());
                f
            },
            expect: Expect::Dropped(Reason::DropMalformed),
        },
        Case {
            name: "IPv6 payload length beyond the frame, to a VIP",
            input: {
                let mut f = udp6.build();
                f[18..20].copy_from_slice(&900u16.to_be_bytes());
                f
            },
            expect: Expect::Dropped(Reason::DropMalformed),
        },
        // IPv6 extension headers are walked.
        Case {
            name: "IPv6 hop-by-hop to a VIP dnat",
            input: with_hop_by_hop(udp6.build()),
            expect: Expect::Dnat(with_hop_by_hop(udp6.to(backend6(4), TARGET_PORT).build())),
        },
        Case {
            name: "IPv6 hop-by-hop, routing, atomic fragment and authentication headers: dnat",
            input: with_extensions(tcp6.build(), &[0, 43, 44, 51, 60][..4]),
            expect: Expect::Dnat(with_extensions(
                tcp6.to(backend6(3), TARGET_PORT).build(),
                &[0, 43, 44, 51, 60][..4],
            )),
        },
        Case {
            name: "IPv6 with more extension headers than walked, to a VIP dropped",
            input: with_extensions(udp6.build(), &[0, 60, 43, 60, 60]),
            expect: Expect::Dropped(Reason::DropUnsupported),
        },
        Case {
            name: "IPv6 ESP (not walked: the ports are encrypted) to a VIP dropped",
            input: {
                let mut f = udp6.build();
                f[14 + 6] = 50;
                f
            },
            expect: Expect::Dropped(Reason::DropUnsupported),
        },
        Case {
            name: "IPv6 hop-by-hop elsewhere passes",
            input: with_hop_by_hop(udp6.to(backend6(9), PORT).build()),
            expect: Expect::Unchanged(Reason::PassNotVip),
        },
        // Wrong protocol for the service.
        Case {
            name: "UDP to a TCP-only VIP:port (v6 UDP service absent on port 8081)",
            input: udp6.to(VIP6, PORT + 1).build(),
            expect: Expect::Unchanged(Reason::PassNotVip),
        },
    ]
}

#[test]
fn stateless_fixtures() {
    let seen = in_fresh_netns("fx", |_| {
        let lb = single_backend_lb();
        let mut seen = std::collections::BTreeSet::new();
        for case in &stateless_cases() {
            check(&lb, case);
            seen.insert(lb.last_reason().name());
        }
        seen
    });
    // Every stateless row of dataplane.md's decision table has at least one case.
    let table = [
        Reason::PassNotIp,
        Reason::PassUnparsed,
        Reason::PassNotVip,
        Reason::DropMalformed,
        Reason::DropFragment,
        Reason::DropUnsupported,
        Reason::DnatFibFallback,
        Reason::IcmpEchoReply,
    ];
    for reason in table {
        assert!(seen.contains(reason.name()), "no case of {}", reason.name());
    }
}

/// The RST+ACK that refuses `syn` (a TCP segment with SYN from the client): from VIP:port, seq
/// 0, ack the SYN's sequence number (1000 in `Spec`) + 1 + its payload, window 0, no options;
/// a fresh IP header (IPv4: DF, id 0), TTL 64, the MACs swapped and the VLAN tags kept.
fn reset_for(syn: &Spec) -> Vec<u8> {
    let ack = 1000 + 1 + syn.payload.len() as u32;
    let eth = etherparse::PacketBuilder::ethernet2(syn.dst_mac, syn.src_mac);
    let vlan = |id| etherparse::VlanId::try_new(id).unwrap();
    let ip = match (syn.dst, syn.src) {
        (IpAddr::V4(vip), IpAddr::V4(client)) => etherparse::IpHeaders::Ipv4(
            etherparse::Ipv4Header::new(
                0,
                64,
                etherparse::IpNumber::TCP,
                vip.octets(),
                client.octets(),
            )
            .unwrap(),
            Default::default(),
        ),
        (IpAddr::V6(vip), IpAddr::V6(client)) => etherparse::IpHeaders::Ipv6(
            etherparse::Ipv6Header {
                hop_limit: 64,
                next_header: etherparse::IpNumber::TCP,
                source: vip.octets(),
                destination: client.octets(),
                ..Default::default()
            },
            Default::default(),
        ),
        _ => unreachable!(),
    };
    let with_ip = match syn.vlans {
        0 => eth.ip(ip),
        1 => eth.single_vlan(vlan(100)).ip(ip),
        _ => eth.double_vlan(vlan(200), vlan(100)).ip(ip),
    };
    let mut frame = Vec::new();
    with_ip
        .tcp(syn.dport, syn.sport, 0, 0)
        .rst()
        .ack(ack)
        .write(&mut frame, &[])
        .unwrap();
    frame
}

/// The ICMP (type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable that refuses the UDP
/// datagram `input` (untagged): from the VIP, quoting the datagram's IP header(s) as received
/// and 8 bytes of UDP; IPv4 with DF clear and id 0, TTL 64, the MACs swapped.
fn port_unreachable_for(input: &[u8]) -> Vec<u8> {
    use etherparse::{Icmpv4Type, Icmpv6Type, IpHeaders, NetSlice, SlicedPacket, icmpv4, icmpv6};
    let sliced = SlicedPacket::from_ethernet(input).unwrap();
    let udp_at = input.len()
        - sliced.transport.as_ref().map_or(0, |t| match t {
            etherparse::TransportSlice::Udp(udp) => udp.slice().len(),
            _ => panic!("not UDP"),
        });
    let quote = &input[14..udp_at + 8];
    let (dst_mac, src_mac) = (&input[0..6], &input[6..12]);
    let eth = etherparse::PacketBuilder::ethernet2(
        dst_mac.try_into().unwrap(),
        src_mac.try_into().unwrap(),
    );
    let mut frame = Vec::new();
    match sliced.net.unwrap() {
        NetSlice::Ipv4(ip) => {
            let header = ip.header();
            let mut out = etherparse::Ipv4Header::new(
                0,
                64,
                etherparse::IpNumber::ICMP,
                header.destination(),
                header.source(),
            )
            .unwrap();
            out.dont_fragment = false;
            eth.ip(IpHeaders::Ipv4(out, Default::default()))
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::Port,
                ))
                .write(&mut frame, quote)
                .unwrap();
        }
        NetSlice::Ipv6(ip) => {
            let header = ip.header();
            eth.ipv6(header.destination(), header.source(), 64)
                .icmpv6(Icmpv6Type::DestinationUnreachable(
                    icmpv6::DestUnreachableCode::Port,
                ))
                .write(&mut frame, quote)
                .unwrap();
        }
        NetSlice::Arp(_) => unreachable!(),
    }
    frame
}

/// A service with no usable backend refuses what opens a flow as kube-proxy does (a TCP SYN
/// gets an RST, a UDP datagram an ICMP port unreachable) and drops what it cannot answer.
#[test]
fn no_backend_rejects_syns_and_datagrams_and_drops_the_rest() {
    in_fresh_netns("nob", |_| {
        let mut lb = Lb::new();
        // A service with no table at all, and one whose only backend was removed.
        lb.service(1, VIP4, PROTO_TCP, 0, &[]);
        lb.service(2, VIP4, PROTO_UDP, 0, &[(2, backend4(2), BACKEND_F_VALID)]);
        lb.dataplane.set_backend(2, &Backend::default()).unwrap();
        lb.service(3, VIP6, PROTO_TCP, 0, &[]);
        lb.service(4, VIP6, PROTO_UDP, 0, &[]);
        let syn4 = Spec::tcp(CLIENT4, 40000, VIP4, PORT);
        let syn6 = Spec::tcp(CLIENT6, 40001, VIP6, PORT);
        let udp4 = Spec::udp(CLIENT4, 40002, VIP4, PORT);
        let udp6 = Spec::udp(CLIENT6, 40003, VIP6, PORT);
        let with = |spec: &Spec, f: &dyn Fn(&mut Spec)| {
            let mut spec = spec.clone();
            f(&mut spec);
            spec
        };
        let refused = |spec: &Spec| Expect::Refused(Reason::RejectTcp, reset_for(spec));
        let unreachable =
            |input: Vec<u8>| Expect::Refused(Reason::RejectUdp, port_unreachable_for(&input));
        let no_payload = with(&syn4, &|s| s.payload.clear());
        let options4 = with(&syn4, &|s| s.ipv4_options = 12);
        let tagged6 = with(&syn6, &|s| s.vlans = 1);
        let qinq4 = with(&syn4, &|s| s.vlans = 2);
        let udp4_options = with(&udp4, &|s| {
            s.ipv4_options = 8;
            s.payload = vec![0x5a; 600];
        });
        let udp6_large = with(&udp6, &|s| s.payload = vec![0xa5; 1200]);
        let cases = vec![
            Case {
                name: "tcp4 SYN with a payload: RST+ACK",
                input: syn4.build(),
                expect: refused(&syn4),
            },
            Case {
                name: "tcp4 SYN without payload: RST+ACK",
                input: no_payload.build(),
                expect: refused(&no_payload),
            },
            Case {
                name: "tcp4 SYN with IPv4 options: RST+ACK without them",
                input: options4.build(),
                expect: refused(&options4),
            },
            Case {
                name: "QinQ tcp4 SYN: RST+ACK with the tags kept",
                input: qinq4.build(),
                expect: refused(&qinq4),
            },
            Case {
                name: "tcp6 SYN: RST+ACK",
                input: syn6.build(),
                expect: refused(&syn6),
            },
            Case {
                name: "802.1Q tcp6 SYN: RST+ACK with the tag kept",
                input: tagged6.build(),
                expect: refused(&tagged6),
            },
            Case {
                name: "tcp4 ACK without a flow: dropped",
                input: syn4.ack().build(),
                expect: Expect::Dropped(Reason::DropNoBackend),
            },
            Case {
                name: "tcp6 SYN+ACK: dropped",
                input: syn6.with_flags(TCP_SYN | TCP_ACK).build(),
                expect: Expect::Dropped(Reason::DropNoBackend),
            },
            Case {
                name: "tcp4 SYN+RST: dropped",
                input: syn4.with_flags(TCP_SYN | TCP_RST).build(),
                expect: Expect::Dropped(Reason::DropNoBackend),
            },
            Case {
                name: "udp4 (backend removed): port unreachable",
                input: udp4.build(),
                expect: unreachable(udp4.build()),
            },
            Case {
                name: "udp4 with IPv4 options and 600 bytes: port unreachable quoting the options",
                input: udp4_options.build(),
                expect: unreachable(udp4_options.build()),
            },
            Case {
                name: "udp6: port unreachable",
                input: udp6.build(),
                expect: unreachable(udp6.build()),
            },
            Case {
                name: "udp6 with 1200 bytes: port unreachable",
                input: udp6_large.build(),
                expect: unreachable(udp6_large.build()),
            },
            Case {
                name: "udp6 with a hop-by-hop header: port unreachable quoting it",
                input: with_hop_by_hop(udp6.build()),
                expect: unreachable(with_hop_by_hop(udp6.build())),
            },
            Case {
                name: "udp4 first fragment: dropped",
                input: with(&udp4, &|s| s.more_fragments = true).build(),
                expect: Expect::Dropped(Reason::DropNoBackend),
            },
        ];
        for case in &cases {
            check(&lb, case);
        }
        // The answers are no larger than the questions plus the ICMPv6 headers.
        for case in &cases {
            if let Expect::Refused(_, answer) = &case.expect {
                assert!(answer.len() <= case.input.len() + 48, "{}", case.name);
            }
        }
        // Nothing was placed or tracked for them.
        assert!(lb.dataplane.flows().unwrap().is_empty());
    });
}

/// A frontend flagged to drop (`externalTrafficPolicy: Local` without a local endpoint) drops
/// what it has no backend for, SYNs and datagrams included; its tracked flows still pass.
#[test]
fn a_frontend_that_drops_when_empty_answers_nothing() {
    in_fresh_netns("nolocal", |_| {
        let mut lb = Lb::new();
        lb.service(1, VIP4, PROTO_TCP, SERVICE_F_DROP_EMPTY, &[]);
        lb.service(2, VIP6, PROTO_UDP, SERVICE_F_DROP_EMPTY, &[]);
        lb.service(
            3,
            VIP6,
            PROTO_TCP,
            SERVICE_F_DROP_EMPTY,
            &[(3, backend6(3), BACKEND_F_VALID)],
        );
        for (name, input) in [
            ("tcp4 SYN", Spec::tcp(CLIENT4, 1, VIP4, PORT).build()),
            ("tcp4 ACK", Spec::tcp(CLIENT4, 1, VIP4, PORT).ack().build()),
            ("udp6", Spec::udp(CLIENT6, 1, VIP6, PORT).build()),
        ] {
            check(
                &lb,
                &Case {
                    name,
                    input,
                    expect: Expect::Dropped(Reason::DropNoLocalBackend),
                },
            );
        }
        // With a backend the flag changes nothing.
        let syn = Spec::tcp(CLIENT6, 2, VIP6, PORT);
        check(
            &lb,
            &Case {
                name: "tcp6 SYN with a backend",
                input: syn.build(),
                expect: Expect::Dnat(syn.to(backend6(3), TARGET_PORT).build()),
            },
        );
    });
}

#[test]
fn conntrack_keeps_flows_on_their_backend_when_the_table_changes() {
    in_fresh_netns("ct", |_| {
        let mut lb = Lb::new();
        let four = valid_backends4(4);
        lb.service(1, VIP4, PROTO_TCP, 0, &four);
        let flows: Vec<Spec> = (0..64)
            .map(|p| Spec::tcp(CLIENT4, 20000 + p, VIP4, PORT))
            .collect();
        let first: Vec<u8> = flows
            .iter()
            .map(|f| backend_of(&lb.run(&f.build()).1))
            .collect();
        assert!(
            first.iter().any(|b| *b != first[0]),
            "64 flows spread over 4 backends"
        );
        assert_eq!(lb.event(Event::ConntrackMiss), 64);

        // Scale to 8 backends: a new table, but established flows stay where they are.
        let eight = valid_backends4(8);
        lb.service(1, VIP4, PROTO_TCP, 0, &eight);
        let again: Vec<u8> = flows
            .iter()
            .map(|f| backend_of(&lb.run(&f.ack().build()).1))
            .collect();
        assert_eq!(first, again, "established flows kept their backends");
        assert_eq!(lb.event(Event::ConntrackHit), 64);

        // New flows use the new table: some land on the new backends.
        let fresh: Vec<u8> = (0..64)
            .map(|p| backend_of(&lb.run(&Spec::tcp(CLIENT4, 30000 + p, VIP4, PORT).build()).1))
            .collect();
        assert!(
            fresh.iter().any(|b| *b > 4),
            "new flows reach the new backends"
        );
        let counted = lb.dataplane.backend_counter(1).unwrap();
        assert!(counted.new_flows >= 1 && counted.packets >= counted.new_flows);
    });
}

#[test]
fn a_removed_backends_flows_are_rebalanced() {
    in_fresh_netns("rb", |_| {
        let mut lb = Lb::new();
        let two = [
            (1, backend4(1), BACKEND_F_VALID),
            (2, backend4(2), BACKEND_F_VALID),
        ];
        lb.service(1, VIP4, PROTO_TCP, 0, &two);
        let flows: Vec<Spec> = (0..32)
            .map(|p| Spec::tcp(CLIENT4, 20000 + p, VIP4, PORT))
            .collect();
        let on_removed = flows
            .iter()
            .filter(|flow| backend_of(&lb.run(&flow.build()).1) == 2)
            .count() as u64;
        assert!(on_removed >= 1, "some flows on the backend to remove");
        // Remove backend 2: empty its slot and rebuild the table without it.
        lb.dataplane.set_backend(2, &Backend::default()).unwrap();
        lb.table(1, &two[..1]);
        for flow in &flows {
            let (verdict, output) = lb.run(&flow.ack().build());
            assert_eq!(verdict, XDP_PASS);
            assert_eq!(lb.last_reason(), Reason::DnatFibFallback);
            assert_eq!(output, flow.ack().to(backend4(1), TARGET_PORT).build());
        }
        assert_eq!(
            lb.event(Event::ConntrackRebalanced),
            on_removed,
            "exactly the removed backend's flows were placed again"
        );
    });
}

#[test]
fn a_terminating_backend_keeps_its_flows_but_takes_no_new_ones() {
    in_fresh_netns("term", |_| {
        let mut lb = Lb::new();
        let two = [
            (1, backend4(1), BACKEND_F_VALID),
            (2, backend4(2), BACKEND_F_VALID),
        ];
        lb.service(1, VIP4, PROTO_TCP, 0, &two);
        let flows: Vec<Spec> = (0..32)
            .map(|p| Spec::tcp(CLIENT4, 20000 + p, VIP4, PORT))
            .collect();
        let before: Vec<u8> = flows
            .iter()
            .map(|f| backend_of(&lb.run(&f.build()).1))
            .collect();
        assert!(before.contains(&2));
        let terminating = [
            (1, backend4(1), BACKEND_F_VALID),
            (2, backend4(2), BACKEND_F_VALID | BACKEND_F_TERMINATING),
        ];
        lb.service(1, VIP4, PROTO_TCP, 0, &terminating);
        for (flow, &backend) in flows.iter().zip(&before) {
            let (verdict, output) = lb.run(&flow.ack().build());
            assert_eq!(
                (verdict, lb.last_reason()),
                (XDP_PASS, Reason::DnatFibFallback)
            );
            assert_eq!(
                output,
                flow.ack().to(backend4(backend), TARGET_PORT).build(),
                "existing flows stay, terminating backend included"
            );
        }
        for p in 0..32 {
            let fresh = Spec::tcp(CLIENT4, 40000 + p, VIP4, PORT);
            let (verdict, output) = lb.run(&fresh.build());
            assert_eq!(
                (verdict, lb.last_reason()),
                (XDP_PASS, Reason::DnatFibFallback)
            );
            assert_eq!(
                output,
                fresh.to(backend4(1), TARGET_PORT).build(),
                "no new flow to the terminating backend"
            );
        }
    });
}

#[test]
fn client_ip_affinity_keeps_a_clients_connections_together() {
    in_fresh_netns("aff", |_| {
        let mut lb = Lb::new();
        let four = valid_backends4(4);
        lb.service(1, VIP4, PROTO_TCP, SERVICE_F_AFFINITY, &four);
        lb.service(
            2,
            VIP4,
            PROTO_UDP,
            0,
            &four
                .iter()
                .map(|&(i, a, f)| (i + 10, a, f))
                .collect::<Vec<_>>(),
        );
        let backends: Vec<u8> = (0..16)
            .map(|p| backend_of(&lb.run(&Spec::tcp(CLIENT4, 20000 + p, VIP4, PORT).build()).1))
            .collect();
        assert!(
            backends.iter().all(|b| *b == backends[0]),
            "one client, one backend: {backends:?}"
        );
        assert_eq!(lb.event(Event::AffinityHit), 15);
        // Without affinity the same client's flows spread.
        let spread: Vec<u8> = (0..16)
            .map(|p| backend_of(&lb.run(&Spec::udp(CLIENT4, 20000 + p, VIP4, PORT).build()).1))
            .collect();
        assert!(
            spread.iter().any(|b| *b != spread[0]),
            "no affinity: flows spread"
        );
    });
}

/// Service 1 on VIP4/TCP over four backends, with ClientIP affinity that lasts
/// `timeout_secs`.
fn affinity_lb(timeout_secs: u32) -> Lb {
    let mut lb = Lb::new();
    lb.service(1, VIP4, PROTO_TCP, SERVICE_F_AFFINITY, &valid_backends4(4));
    let key = ServiceKey {
        addr: addr16(VIP4),
        port: PORT,
        proto: PROTO_TCP,
        pad: 0,
    };
    let value = ServiceValue {
        id: 1,
        flags: SERVICE_F_AFFINITY,
        affinity_timeout_secs: timeout_secs,
    };
    lb.dataplane.set_service(&key, &value).unwrap();
    lb
}

#[test]
fn client_ip_affinity_expires_after_its_timeout() {
    in_fresh_netns("affexp", |_| {
        let lb = affinity_lb(1);
        lb.run(&Spec::tcp(CLIENT4, 20000, VIP4, PORT).build());
        lb.run(&Spec::tcp(CLIENT4, 20001, VIP4, PORT).build());
        assert_eq!(lb.event(Event::AffinityHit), 1, "within the timeout");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        lb.run(&Spec::tcp(CLIENT4, 20002, VIP4, PORT).build());
        assert_eq!(
            lb.event(Event::AffinityHit),
            1,
            "after the timeout the entry is not used"
        );
    });
}

/// Every connection of a remembered client renews its affinity: connections 1.2 s apart keep
/// their backend under a 2 s timeout, though the first is 2.4 s old by the last.
#[test]
fn client_ip_affinity_is_renewed_by_each_connection() {
    in_fresh_netns("affnew", |_| {
        let lb = affinity_lb(2);
        lb.run(&Spec::tcp(CLIENT4, 20000, VIP4, PORT).build());
        for port in [20001, 20002] {
            std::thread::sleep(std::time::Duration::from_millis(1200));
            lb.run(&Spec::tcp(CLIENT4, port, VIP4, PORT).build());
        }
        assert_eq!(
            lb.event(Event::AffinityHit),
            2,
            "both later connections were remembered"
        );
    });
}

#[test]
fn replies_are_reverse_nated_on_egress() {
    in_fresh_netns("rnat", |_| {
        let mut lb = Lb::new();
        lb.service(1, VIP4, PROTO_TCP, 0, &[(1, backend4(1), BACKEND_F_VALID)]);
        lb.service(4, VIP6, PROTO_UDP, 0, &[(4, backend6(4), BACKEND_F_VALID)]);
        let run_tc = |frame: &[u8]| lb.run_tc(frame);
        for (name, request, backend) in [
            ("tcp4", Spec::tcp(CLIENT4, 41000, VIP4, PORT), backend4(1)),
            ("udp6", Spec::udp(CLIENT6, 41001, VIP6, PORT), backend6(4)),
        ] {
            lb.run(&request.build());
            let mut reply = request.clone();
            reply.src = backend;
            reply.sport = TARGET_PORT;
            reply.dst = request.src;
            reply.dport = request.sport;
            let mut expected = reply.clone();
            expected.src = request.dst;
            expected.sport = PORT;
            let before = lb.reason(Reason::ReverseNat);
            let (verdict, output) = run_tc(&reply.build());
            assert_eq!(verdict, TC_ACT_UNSPEC, "{name}");
            assert_eq!(
                output,
                expected.build(),
                "{name}: reply rewritten to the VIP"
            );
            assert_checksums_valid(&output);
            assert_eq!(lb.reason(Reason::ReverseNat), before + 1, "{name}");
        }
        // A packet of no tracked flow leaves untouched.
        let stranger = Spec::tcp(backend4(1), TARGET_PORT, CLIENT4, 5).build();
        let before = lb.reason(Reason::EgressPass);
        let (verdict, output) = run_tc(&stranger);
        assert_eq!((verdict, output), (TC_ACT_UNSPEC, stranger));
        assert_eq!(lb.reason(Reason::EgressPass), before + 1);
    });
}

#[test]
fn frames_with_a_route_and_a_neighbour_are_sent_directly() {
    sent_directly("fwd", CLIENT4, VIP4, backend4(1));
}

#[test]
fn ipv6_frames_with_a_route_and_a_neighbour_are_sent_directly() {
    sent_directly("fwd6", CLIENT6, VIP6, backend6(1));
}

/// DNATed frames to `backend` (resolved by `routed_netns`) leave by XDP_TX when they arrived on
/// the egress port, through the device map once it takes redirected frames, both with the next
/// hop's MACs and TTL / hop limit - 1; to the kernel otherwise, and when the TTL expires here.
fn sent_directly(tag: &str, client: IpAddr, vip: IpAddr, backend: IpAddr) {
    let (ns, fwd0, fwd0_mac, fwd1) = routed_netns(tag);
    ns.enter(|| {
        let mut lb = Lb::new();
        lb.service(1, vip, PROTO_TCP, 0, &[(1, backend, BACKEND_F_VALID)]);
        let request = Spec::tcp(client, 42000, vip, PORT);

        // Arriving on the egress port itself: XDP_TX with the next hop's MACs and TTL - 1.
        let (verdict, output) = lb.run_on(&request.build(), Some(fwd0));
        assert_eq!((verdict, lb.last_reason()), (XDP_TX, Reason::DnatTx));
        assert_eq!(output, forwarded(&request, backend, fwd0_mac).build());
        assert_checksums_valid(&output);

        // Arriving elsewhere, with the egress port not registered: the kernel forwards it.
        let other = Spec::tcp(client, 42001, vip, PORT);
        let (verdict, output) = lb.run_on(&other.build(), Some(fwd1));
        assert_eq!(
            (verdict, lb.last_reason()),
            (XDP_PASS, Reason::DnatFibFallback)
        );
        assert_eq!(output, other.to(backend, TARGET_PORT).build());

        // Registered as a redirect target: redirected, rewritten as for XDP_TX.
        lb.dataplane.add_tx_port(fwd0).unwrap();
        let third = Spec::tcp(client, 42002, vip, PORT);
        let (verdict, output) = lb.run_on(&third.build(), Some(fwd1));
        assert_eq!(
            (verdict, lb.last_reason()),
            (XDP_REDIRECT, Reason::DnatRedirect)
        );
        assert_eq!(output, forwarded(&third, backend, fwd0_mac).build());
        assert_checksums_valid(&output);

        // TTL 1: the kernel must answer with time-exceeded, so it gets the frame.
        let mut expiring = Spec::tcp(client, 42003, vip, PORT);
        expiring.ttl = 1;
        let (verdict, output) = lb.run_on(&expiring.build(), Some(fwd0));
        assert_eq!(
            (verdict, lb.last_reason()),
            (XDP_PASS, Reason::DnatFibFallback)
        );
        assert_eq!(output, expiring.to(backend, TARGET_PORT).build());
    })
    .unwrap();
}

/// `request` as forwarded to `backend` by the fast path: DNATed, one hop older, from the
/// egress port's MAC (`egress_mac`) to the neighbour's (`routed_netns`'s 02:00:00:00:01:01).
/// Backends whose ids share a next-hop cache slot (`id % NEXT_HOP_SLOTS`) each leave with
/// their own neighbour's MAC, however their packets interleave.
#[test]
fn backends_sharing_a_next_hop_slot_keep_their_own_next_hops() {
    let (ns, fwd0, fwd0_mac, _) = routed_netns("fwd-slot");
    ns.enter(|| {
        let other_mac = [2, 0, 0, 0, 1, 2];
        ns.ip(&[
            "neigh",
            "add",
            "198.18.1.2",
            "lladdr",
            "02:00:00:00:01:02",
            "dev",
            "fwd0",
            "nud",
            "permanent",
        ])
        .unwrap();
        let mut lb = Lb::new();
        let shared = lb_common::maps::NEXT_HOP_SLOTS + 1;
        let vip2 = IpAddr::V4(Ipv4Addr::new(198, 18, 100, 2));
        lb.service(1, VIP4, PROTO_TCP, 0, &[(1, backend4(1), BACKEND_F_VALID)]);
        lb.service(
            2,
            vip2,
            PROTO_TCP,
            0,
            &[(shared, backend4(2), BACKEND_F_VALID)],
        );
        for port in 43000..43004 {
            for (vip, backend, mac) in [
                (VIP4, backend4(1), [2, 0, 0, 0, 1, 1]),
                (vip2, backend4(2), other_mac),
            ] {
                let request = Spec::tcp(CLIENT4, port, vip, PORT);
                let (verdict, output) = lb.run_on(&request.build(), Some(fwd0));
                assert_eq!((verdict, lb.last_reason()), (XDP_TX, Reason::DnatTx));
                let mut expected = forwarded(&request, backend, fwd0_mac);
                expected.dst_mac = mac;
                assert_eq!(output, expected.build(), "to {backend}");
            }
        }
    })
    .unwrap();
}

fn forwarded(request: &Spec, backend: IpAddr, egress_mac: [u8; 6]) -> Spec {
    let mut expected = request.to(backend, TARGET_PORT);
    expected.ttl -= 1;
    expected.src_mac = egress_mac;
    expected.dst_mac = [2, 0, 0, 0, 1, 1];
    expected
}

/// The cached next hop keeps the egress MTU: a larger frame goes to the kernel (which
/// fragments it or answers "fragmentation needed"), never dropped; a redirect that fails
/// (the port left the device map) also leaves the frame to the kernel, untouched but for the
/// DNAT, and both are counted.
#[test]
fn frames_over_the_mtu_and_failed_redirects_go_to_the_kernel() {
    let (ns, fwd0, fwd0_mac, fwd1) = routed_netns("mtu");
    ns.ip(&["link", "set", "fwd0", "mtu", "1280"]).unwrap();
    ns.enter(|| {
        let mut lb = Lb::new();
        lb.service(1, VIP4, PROTO_TCP, 0, &[(1, backend4(1), BACKEND_F_VALID)]);
        let sized = |sport, ip_len: usize| {
            let mut spec = Spec::tcp(CLIENT4, sport, VIP4, PORT);
            spec.payload = vec![0xab; ip_len - 40];
            spec
        };
        // A frame that fits fills the next-hop cache; one of exactly the MTU still fits.
        for fitting in [sized(43000, 100), sized(43001, 1280)] {
            let (verdict, output) = lb.run_on(&fitting.build(), Some(fwd0));
            assert_eq!((verdict, lb.last_reason()), (XDP_TX, Reason::DnatTx));
            assert_eq!(output, forwarded(&fitting, backend4(1), fwd0_mac).build());
        }
        // One byte more: to the kernel, rewritten but otherwise as it came.
        let big = sized(43002, 1281);
        let (verdict, output) = lb.run_on(&big.build(), Some(fwd0));
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(output, big.to(backend4(1), TARGET_PORT).build());
        assert_checksums_valid(&output);
        assert_eq!(lb.event(Event::MtuExceeded), 1);
        assert_eq!(lb.last_reason(), Reason::DnatFibFallback);

        // Redirected while fwd0 takes redirected frames...
        lb.dataplane.add_tx_port(fwd0).unwrap();
        let redirected = sized(43003, 100);
        let (verdict, output) = lb.run_on(&redirected.build(), Some(fwd1));
        assert_eq!(
            (verdict, lb.last_reason()),
            (XDP_REDIRECT, Reason::DnatRedirect)
        );
        assert_eq!(
            output,
            forwarded(&redirected, backend4(1), fwd0_mac).build()
        );
        // ...and to the kernel once it no longer does, though the cache still says it does.
        lb.dataplane.remove_tx_port(fwd0).unwrap();
        let after = sized(43004, 100);
        let (verdict, output) = lb.run_on(&after.build(), Some(fwd1));
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(output, after.to(backend4(1), TARGET_PORT).build());
        assert_eq!(lb.event(Event::RedirectFailed), 1);
        assert_eq!(lb.last_reason(), Reason::DnatFibFallback);
    })
    .unwrap();
}

#[test]
fn frames_for_a_local_pod_are_handed_to_the_tc_program_and_its_replies_sent_straight_out() {
    let unrouted = IpAddr::V4(Ipv4Addr::new(198, 18, 5, 10));
    past_the_stack(
        "pod4",
        CLIENT4,
        unrouted,
        VIP4,
        backend4(1),
        "198.18.0.0/24",
    );
}

#[test]
fn ipv6_frames_for_a_local_pod_are_handed_to_the_tc_program_and_its_replies_sent_straight_out() {
    let unrouted = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x10));
    past_the_stack(
        "pod6",
        CLIENT6,
        unrouted,
        VIP6,
        backend6(1),
        "2001:db8::/64",
    );
}

/// A local pod behind `fwd0` (`routed_netns`), its interface on the fast path, the client
/// behind `fwd1` (`client_net`, a resolved neighbour): a DNATed frame is passed with a
/// `PodHandoff` in front of it and its headers otherwise as they came (TTL, MACs: the TC
/// program writes them); a reply is reverse-NATed, one hop older, addressed to the client's
/// neighbour and redirected out of `fwd1`. A reply the kernel must route (no route to the
/// client) passes untouched with its flow untouched, and the client-facing egress
/// reverse-NATs it as before. (A route once found is kept per client for a second, as for
/// backends: a later route change reaches the fast path within that.)
fn past_the_stack(
    tag: &str,
    client: IpAddr,
    unrouted: IpAddr,
    vip: IpAddr,
    backend: IpAddr,
    client_net: &str,
) {
    const TC_ACT_REDIRECT: u32 = 7;
    let client_mac = [2, 0, 0, 0, 0, 0x10];
    let (ns, fwd0, fwd0_mac, fwd1) = routed_netns(tag);
    ns.ip(&["route", "add", client_net, "dev", "fwd1"]).unwrap();
    ns.ip(&[
        "neigh",
        "add",
        &client.to_string(),
        "lladdr",
        "02:00:00:00:00:10",
        "dev",
        "fwd1",
        "nud",
        "permanent",
    ])
    .unwrap();
    let (_, fwd1_mac) = link(&ns, "fwd1");
    ns.enter(|| {
        let mut lb = Lb::new();
        lb.service(1, vip, PROTO_TCP, 0, &[(1, backend, BACKEND_F_VALID)]);
        lb.dataplane.attach_pod_interface("fwd0").unwrap();

        let request = Spec::tcp(client, 44000, vip, PORT);
        let (verdict, output) = lb.run_on(&request.build(), Some(fwd1));
        assert_eq!((verdict, lb.last_reason()), (XDP_PASS, Reason::DnatPod));
        let handoff = PodHandoff {
            magic: POD_HANDOFF_MAGIC,
            ifindex: fwd0,
            dmac: [2, 0, 0, 0, 1, 1],
            smac: fwd0_mac,
        };
        let mut expected: Vec<u8> =
            [handoff.magic.to_ne_bytes(), handoff.ifindex.to_ne_bytes()].concat();
        expected.extend(handoff.dmac);
        expected.extend(handoff.smac);
        let dnat = request.to(backend, TARGET_PORT).build();
        expected.extend(&dnat);
        assert_eq!(output, expected, "metadata, then the DNATed frame");
        assert_checksums_valid(&output[std::mem::size_of::<PodHandoff>()..]);

        let mut reply = request.clone();
        (reply.src, reply.sport, reply.dst, reply.dport) =
            (backend, TARGET_PORT, request.src, request.sport);
        (reply.src_mac, reply.dst_mac) = ([2, 0, 0, 0, 1, 1], fwd0_mac);
        let mut sent = reply.clone();
        (sent.src, sent.sport) = (vip, PORT);
        sent.ttl -= 1;
        (sent.src_mac, sent.dst_mac) = (fwd1_mac, client_mac);
        let (verdict, output) = lb.run_tc_pod(&reply.build(), fwd0);
        assert_eq!(
            (verdict, lb.last_reason()),
            (TC_ACT_REDIRECT, Reason::ReverseNatPod)
        );
        assert_eq!(
            output,
            sent.build(),
            "reverse-NATed, to the client's neighbour"
        );
        assert_checksums_valid(&output);

        // A client without a route back (nothing routes to `unrouted` here): the kernel routes
        // the reply, untouched here and reverse-NATed on the client-facing egress, its flow
        // still known there.
        let request = Spec::tcp(unrouted, 44001, vip, PORT);
        lb.run_on(&request.build(), Some(fwd1));
        let mut reply = request.clone();
        (reply.src, reply.sport, reply.dst, reply.dport) =
            (backend, TARGET_PORT, request.src, request.sport);
        let (verdict, output) = lb.run_tc_pod(&reply.build(), fwd0);
        assert_eq!(
            (verdict, lb.last_reason()),
            (TC_ACT_UNSPEC, Reason::PodPass)
        );
        assert_eq!(output, reply.build());
        let (verdict, output) = lb.run_tc(&reply.build());
        assert_eq!(
            (verdict, lb.last_reason()),
            (TC_ACT_UNSPEC, Reason::ReverseNat)
        );
        let mut egress = reply.clone();
        (egress.src, egress.sport) = (vip, PORT);
        assert_eq!(output, egress.build());

        // A packet of no tracked flow passes untouched.
        let stranger = Spec::tcp(backend, TARGET_PORT, client, 5).build();
        let (verdict, output) = lb.run_tc_pod(&stranger, fwd0);
        assert_eq!(
            (verdict, lb.last_reason()),
            (TC_ACT_UNSPEC, Reason::PodPass)
        );
        assert_eq!(output, stranger);
    })
    .unwrap();
}

/// The first 28 (IPv4) or 48 (IPv6) bytes of a packet, as ICMP errors quote it, with the
/// given source and destination; the IPv4 header checksum recomputed from scratch.
fn quote(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    let frame = Spec::tcp(src, sport, dst, dport).build();
    let len = if src.is_ipv4() { 28 } else { 48 };
    frame[14..14 + len].to_vec()
}

fn icmp_error(
    from: IpAddr,
    to: IpAddr,
    quoted: &[u8],
    v4: etherparse::Icmpv4Type,
    v6: etherparse::Icmpv6Type,
) -> Vec<u8> {
    let mut frame = Vec::new();
    let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 20], [2, 0, 0, 0, 0, 1]);
    match (from, to) {
        (IpAddr::V4(a), IpAddr::V4(b)) => eth
            .ipv4(a.octets(), b.octets(), 64)
            .icmpv4(v4)
            .write(&mut frame, quoted)
            .unwrap(),
        (IpAddr::V6(a), IpAddr::V6(b)) => eth
            .ipv6(a.octets(), b.octets(), 64)
            .icmpv6(v6)
            .write(&mut frame, quoted)
            .unwrap(),
        _ => unreachable!(),
    }
    frame
}

#[test]
fn icmp_errors_about_vip_flows_reach_the_backend_and_come_back_as_the_vip() {
    use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4::DestUnreachableHeader};
    in_fresh_netns("icmp", |_| {
        let mut lb = Lb::new();
        lb.service(1, VIP4, PROTO_TCP, 0, &[(1, backend4(1), BACKEND_F_VALID)]);
        lb.service(3, VIP6, PROTO_TCP, 0, &[(3, backend6(3), BACKEND_F_VALID)]);
        lb.run(&Spec::tcp(CLIENT4, 40000, VIP4, PORT).build());
        lb.run(&Spec::tcp(CLIENT6, 40000, VIP6, PORT).build());
        let router4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 254));
        let router6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe));
        let frag_needed =
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1400,
            });
        let too_big = Icmpv6Type::PacketTooBig { mtu: 1400 };

        // A router on the client's side says the VIP's reply was too big: the backend must hear.
        for (name, router, vip, client, backend) in [
            (
                "IPv4 fragmentation needed",
                router4,
                VIP4,
                CLIENT4,
                backend4(1),
            ),
            ("ICMPv6 packet too big", router6, VIP6, CLIENT6, backend6(3)),
        ] {
            let input = icmp_error(
                router,
                vip,
                &quote(vip, PORT, client, 40000),
                frag_needed.clone(),
                too_big,
            );
            let expected = icmp_error(
                router,
                backend,
                &quote(backend, TARGET_PORT, client, 40000),
                frag_needed.clone(),
                too_big,
            );
            let before = lb.event(Event::IcmpToBackend);
            let (verdict, output) = lb.run(&input);
            assert_eq!(verdict, XDP_PASS, "{name}");
            assert_eq!(output, expected, "{name}: rewritten to the backend");
            assert_eq!(lb.event(Event::IcmpToBackend), before + 1, "{name}");
        }

        // About a flow nobody knows: dropped and counted.
        let stranger = icmp_error(
            router4,
            VIP4,
            &quote(VIP4, PORT, CLIENT4, 1),
            frag_needed.clone(),
            too_big,
        );
        let before = lb.reason(Reason::DropIcmpUnknownFlow);
        assert_eq!(lb.run(&stranger).0, XDP_DROP);
        assert_eq!(lb.reason(Reason::DropIcmpUnknownFlow), before + 1);

        // The backend's own error about the flow leaves as the VIP's, quoted packet included.
        let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
        let input = icmp_error(
            backend4(1),
            CLIENT4,
            &quote(CLIENT4, 40000, backend4(1), TARGET_PORT),
            unreachable.clone(),
            too_big,
        );
        let expected = icmp_error(
            VIP4,
            CLIENT4,
            &quote(CLIENT4, 40000, VIP4, PORT),
            unreachable,
            too_big,
        );
        assert_eq!(
            lb.run_tc(&input),
            (TC_ACT_UNSPEC, expected),
            "reverse NAT of the backend's ICMP error"
        );
        assert_eq!(lb.last_reason(), Reason::ReverseNatIcmp);
    });
}

/// On an address of the host itself (a node IP serving nodePorts) only packets to one of its
/// services are the load balancer's: the host's own fragments, pings and path MTU errors about
/// its own connections pass untouched, while the same to a VIP the load balancer owns are
/// dropped or answered.
#[test]
fn host_addresses_pass_everything_but_their_services() {
    use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4::DestUnreachableHeader};
    in_fresh_netns("host", |_| {
        let mut lb = Lb::new();
        lb.service(1, VIP4, PROTO_TCP, 0, &[(1, backend4(1), BACKEND_F_VALID)]);
        let router4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 254));
        let frag_needed = |to| {
            icmp_error(
                router4,
                to,
                &quote(to, 22, CLIENT4, 50000),
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                }),
                Icmpv6Type::PacketTooBig { mtu: 1400 },
            )
        };
        let fragment = |to| {
            let mut spec = Spec::udp(CLIENT4, 40000, to, 53);
            spec.fragment_offset = 185;
            spec.build()
        };
        let ping = |to: IpAddr| {
            let mut frame = Vec::new();
            let IpAddr::V4(to) = to else { unreachable!() };
            etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 10], [2, 0, 0, 0, 0, 1])
                .ipv4([198, 18, 0, 10], to.octets(), 64)
                .icmpv4_echo_request(1, 1)
                .write(&mut frame, b"ping")
                .unwrap();
            frame
        };
        // Owned by the load balancer: dropped, answered.
        assert_eq!(lb.run(&frag_needed(VIP4)).0, XDP_DROP);
        assert_eq!(lb.run(&fragment(VIP4)).0, XDP_DROP);
        assert_eq!(lb.run(&ping(VIP4)).0, XDP_TX);
        // The same address flagged as the host's: passed byte for byte.
        lb.dataplane
            .set_vip_addr(addr16(VIP4), 1 | lb_common::maps::VIP_ADDR_F_HOST)
            .unwrap();
        for (name, frame) in [
            ("path MTU error", frag_needed(VIP4)),
            ("fragment", fragment(VIP4)),
            ("ping", ping(VIP4)),
        ] {
            let before = lb.reason(Reason::PassNotVip);
            assert_eq!(lb.run(&frame), (XDP_PASS, frame.clone()), "{name}");
            assert_eq!(lb.reason(Reason::PassNotVip), before + 1, "{name}");
        }
        // Its service is still served.
        let request = Spec::tcp(CLIENT4, 40001, VIP4, PORT);
        let (verdict, output) = lb.run(&request.build());
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(output, request.to(backend4(1), TARGET_PORT).build());
    });
}

/// With the connection table full, the LRU evicts the least recently used flows: new flows are
/// still placed (never dropped), and an evicted flow's next packet is placed again by Maglev —
/// on the same backend while the table is unchanged.
#[test]
fn a_full_connection_table_degrades_to_maglev_placement_not_to_drops() {
    in_fresh_netns("lru", |_| {
        let mut lb = Lb::with_dataplane(
            Dataplane::load_with(lb_userspace::dataplane::LoadOptions {
                conntrack_size: 512,
                ..Default::default()
            })
            .unwrap(),
        );
        let four = valid_backends4(4);
        lb.service(1, VIP4, PROTO_TCP, 0, &four);
        let flows: Vec<Spec> = (0..4000u16)
            .map(|p| {
                Spec::tcp(
                    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10 + (p / 1000) as u8)),
                    10000 + p,
                    VIP4,
                    PORT,
                )
            })
            .collect();
        let first: Vec<u8> = flows
            .iter()
            .map(|f| {
                let (verdict, output) = lb.run(&f.build());
                assert_eq!(
                    (verdict, lb.last_reason()),
                    (XDP_PASS, Reason::DnatFibFallback),
                    "placed, not dropped"
                );
                backend_of(&output)
            })
            .collect();
        let tracked = lb.dataplane.flows().unwrap().len();
        let capacity = lb_common::maps::lru_entries_for(512, aya::util::nr_cpus().unwrap() as u32);
        assert!(
            (512..=capacity as usize).contains(&tracked),
            "the table holds its capacity: {tracked}"
        );
        // Every flow again, mid-stream: most were evicted, and come back to the same backend.
        let again: Vec<u8> = flows
            .iter()
            .map(|f| {
                let (verdict, output) = lb.run(&f.ack().build());
                assert_eq!(
                    (verdict, lb.last_reason()),
                    (XDP_PASS, Reason::DnatFibFallback)
                );
                backend_of(&output)
            })
            .collect();
        assert_eq!(
            first, again,
            "evicted flows are placed again where they were"
        );
        // At least every flow beyond what the table holds was evicted and missed; every ACK
        // either found its flow or missed it.
        let (hits, misses) = (
            lb.event(Event::ConntrackHit),
            lb.event(Event::ConntrackMissNonSyn),
        );
        assert!(
            misses >= 4000 - capacity as u64,
            "evictions were seen: {misses} misses"
        );
        assert_eq!(hits + misses, 4000, "every ACK looked up once");
        assert_eq!(
            lb.event(Event::ConntrackInsertFailed),
            0,
            "no insert failed"
        );
        assert_eq!(lb.reason(Reason::DropNoBackend), 0);
    });
}

/// Only addresses in the VIP filter reach the service lookup: with the filter emptied, a
/// service's own packets pass as not ours (counted `pass_not_vip`, no lookup, no flow); with
/// its address written back, they are DNATed again.
#[test]
fn the_vip_filter_decides_which_packets_reach_the_service_lookup() {
    in_fresh_netns("fx-filter", |_| {
        let mut lb = single_backend_lb();
        let syn = Spec::tcp(CLIENT4, 40000, VIP4, PORT).build();
        lb.dataplane.set_vip_filter([]).unwrap();
        let (verdict, output) = lb.run(&syn);
        assert_eq!((verdict, lb.last_reason()), (XDP_PASS, Reason::PassNotVip));
        assert_eq!(output, syn, "passed unchanged");
        assert!(
            lb.dataplane.flows().unwrap().is_empty(),
            "no flow was tracked"
        );
        lb.dataplane
            .set_vip_filter([addr16(VIP4), addr16(VIP6)])
            .unwrap();
        let (verdict, output) = lb.run(&syn);
        assert_eq!(
            (verdict, lb.last_reason()),
            (XDP_PASS, Reason::DnatFibFallback)
        );
        assert_eq!(backend_of(&output), 1);
    });
}

/// `loadBalancerSourceRanges`: a frontend with `SERVICE_F_SOURCE_RANGES` admits only clients in
/// its own ranges, on every packet (removing a range cuts established flows); a frontend
/// without the flag ignores the trie.
#[test]
fn source_ranges_admit_only_their_clients() {
    in_fresh_netns("ranges", |_| {
        let mut lb = Lb::new();
        let ranged = SERVICE_F_SOURCE_RANGES;
        lb.service(
            1,
            VIP4,
            PROTO_TCP,
            ranged,
            &[(1, backend4(1), BACKEND_F_VALID)],
        );
        lb.service(2, VIP4, PROTO_UDP, 0, &[(2, backend4(2), BACKEND_F_VALID)]);
        lb.service(
            3,
            VIP6,
            PROTO_TCP,
            ranged,
            &[(3, backend6(3), BACKEND_F_VALID)],
        );
        // Flagged with no range at all: nobody is admitted.
        lb.service(
            4,
            VIP6,
            PROTO_UDP,
            ranged,
            &[(4, backend6(4), BACKEND_F_VALID)],
        );
        let outside4 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5));
        let outside6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1));
        let dp = &mut lb.dataplane;
        // CLIENT4 is 198.18.0.10, CLIENT6 2001:db8::10. Host bits and repeats count once.
        dp.set_source_ranges(
            1,
            &[
                (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 77)), 24),
                (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0)), 24),
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), 25),
            ],
        )
        .unwrap();
        // Ranges for the unflagged service 2 that would exclude everyone it serves.
        dp.set_source_ranges(2, &[(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8)])
            .unwrap();
        dp.set_source_ranges(
            3,
            &[(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)),
                64,
            )],
        )
        .unwrap();
        let mut got = dp.source_ranges(1).unwrap();
        got.sort();
        assert_eq!(
            got,
            [
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), 25),
                (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0)), 24),
            ]
        );
        assert!(
            dp.set_source_ranges(1, &[(outside4, 33)]).is_err(),
            "a /33 is refused"
        );
        assert_eq!(dp.source_ranges(1).unwrap().len(), 2, "nothing written");

        let inside4 = Spec::tcp(CLIENT4, 41000, VIP4, PORT);
        let inside6 = Spec::tcp(CLIENT6, 41001, VIP6, PORT);
        let dnat = |spec: &Spec, backend| Expect::Dnat(spec.to(backend, TARGET_PORT).build());
        let dropped = Expect::Dropped;
        let cases = vec![
            Case {
                name: "tcp4 from inside a range: DNAT",
                input: inside4.build(),
                expect: dnat(&inside4, backend4(1)),
            },
            Case {
                name: "tcp4 from outside: dropped",
                input: Spec::tcp(outside4, 41002, VIP4, PORT).build(),
                expect: dropped(Reason::DropSourceRange),
            },
            Case {
                name: "tcp4 ACK from outside (a flow's packet): dropped",
                input: Spec::tcp(outside4, 41002, VIP4, PORT).ack().build(),
                expect: dropped(Reason::DropSourceRange),
            },
            Case {
                name: "udp4 to an unflagged frontend from outside its ranges: DNAT",
                input: Spec::udp(outside4, 41003, VIP4, PORT).build(),
                expect: dnat(&Spec::udp(outside4, 41003, VIP4, PORT), backend4(2)),
            },
            Case {
                name: "tcp6 from inside: DNAT",
                input: inside6.build(),
                expect: dnat(&inside6, backend6(3)),
            },
            Case {
                name: "tcp6 from outside: dropped",
                input: Spec::tcp(outside6, 41004, VIP6, PORT).build(),
                expect: dropped(Reason::DropSourceRange),
            },
            Case {
                name: "udp6 to a flagged frontend without ranges: dropped",
                input: Spec::udp(CLIENT6, 41005, VIP6, PORT).build(),
                expect: dropped(Reason::DropSourceRange),
            },
        ];
        for case in &cases {
            check(&lb, case);
        }
        // Another service's ranges never admit a client: service 4 still admits nobody.
        lb.dataplane
            .set_source_ranges(3, &[(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)])
            .unwrap();
        check(
            &lb,
            &Case {
                name: "udp6 to service 4 with ::/0 on service 3: dropped",
                input: Spec::udp(CLIENT6, 41005, VIP6, PORT).build(),
                expect: dropped(Reason::DropSourceRange),
            },
        );

        // A live edit that drops CLIENT4's range cuts its established flow at once.
        lb.dataplane
            .set_source_ranges(1, &[(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), 25)])
            .unwrap();
        assert_eq!(
            lb.dataplane.source_ranges(1).unwrap(),
            [(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), 25)]
        );
        check(
            &lb,
            &Case {
                name: "tcp4 ACK of a tracked flow after its range was removed: dropped",
                input: inside4.ack().build(),
                expect: dropped(Reason::DropSourceRange),
            },
        );
        // Cleared: the flagged frontend admits nobody; the other services keep theirs.
        lb.dataplane.clear_source_ranges(1).unwrap();
        assert!(lb.dataplane.source_ranges(1).unwrap().is_empty());
        assert_eq!(lb.dataplane.source_ranges(2).unwrap().len(), 1);
        check(
            &lb,
            &Case {
                name: "tcp4 from a former range after the clear: dropped",
                input: Spec::tcp(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 1, VIP4, PORT).build(),
                expect: dropped(Reason::DropSourceRange),
            },
        );
        // Set again: the flow is admitted again (its entry outlived the cut).
        lb.dataplane.set_source_ranges(1, &[(CLIENT4, 32)]).unwrap();
        check(
            &lb,
            &Case {
                name: "tcp4 ACK from a /32 range: DNAT again",
                input: inside4.ack().build(),
                expect: dnat(&inside4.ack(), backend4(1)),
            },
        );
    });
}
