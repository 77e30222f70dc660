//! The tunnel between nodes through BPF_PROG_TEST_RUN: the receiving node wraps a packet for a
//! backend on another node in IPv4 or IPv6 / UDP / GUE (exact bytes, built here with
//! etherparse and the shared header layout), the backend's node takes it off and DNATs it to
//! the backend named, only from known nodes; packets too large for the underlay are answered
//! with "fragmentation needed" / "packet too big".
//!
//! Both nodes are loaded in one namespace (two data planes, each with its own maps), whose
//! `fwd0` routes to the peer node and to the backends.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Header};
use lb_common::{
    Backend, Event, Reason, TunnelConfig,
    conntrack::{CT_REMOTE, TCP_ACK},
    hash::flow_hash,
    maps::{BACKEND_F_VALID, PROTO_TCP, PROTO_UDP, addr16},
    tunnel::{GUE_LEN, UDP_LEN, source_port, udp_gue_header},
};
use lb_tests::{
    frames::{Spec, assert_checksums_valid},
    netns::Netns,
};

mod harness;
use harness::*;

const TUNNEL_PORT: u16 = 6080;
/// The receiving node's underlay addresses (on `fwd0`).
const SELF4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
const SELF6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xfe);
/// The backend's node, a neighbour on `fwd0`.
const PEER4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xc);
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x0c];
const BACKEND_MAC: [u8; 6] = BACKEND1_MAC;

/// [`routed_netns`] with permanent neighbours for the peer node too; returns it with
/// `fwd0`'s index and MAC.
fn underlay(tag: &str) -> (Netns, u32, [u8; 6]) {
    let (ns, fwd0, fwd0_mac, _) = routed_netns(tag);
    add_neighbour(&ns, &PEER4.to_string(), PEER_MAC);
    add_neighbour(&ns, &PEER6.to_string(), PEER_MAC);
    (ns, fwd0, fwd0_mac)
}

/// A data plane serving `vip:PORT/proto` with backend 1 (of the VIP's family), on node
/// `node` (`None`: this node), with the tunnel's end `own` and `peers`.
fn node(
    vip: IpAddr,
    proto: u8,
    backend_node: Option<IpAddr>,
    own: [IpAddr; 2],
    peers: &[IpAddr],
    mtu: u32,
) -> Lb {
    let mut lb = Lb::new();
    let backend = if vip.is_ipv4() {
        backend4(1)
    } else {
        backend6(1)
    };
    lb.service(1, vip, proto, 0, &[(1, backend, BACKEND_F_VALID)]);
    lb.dataplane
        .set_backend(
            1,
            &Backend {
                addr: addr16(backend),
                port: TARGET_PORT,
                flags: BACKEND_F_VALID,
                service_id: 1,
                node: backend_node.map_or([0; 16], addr16),
            },
        )
        .unwrap();
    let config = TunnelConfig {
        addr4: addr16(own[0]),
        addr6: addr16(own[1]),
        port: TUNNEL_PORT,
        pad: 0,
        mtu,
    };
    let peers: BTreeSet<IpAddr> = peers.iter().copied().collect();
    lb.dataplane.set_tunnel(&config, &peers).unwrap();
    // The controller lets the node's own addresses through the VIP filter.
    lb.dataplane
        .set_vip_filter([addr16(vip), addr16(own[0]), addr16(own[1])])
        .unwrap();
    lb
}

/// The receiving node: backend 1 lives on the peer.
fn receiving(vip: IpAddr, proto: u8, mtu: u32) -> Lb {
    let peer = if vip.is_ipv4() {
        IpAddr::V4(PEER4)
    } else {
        IpAddr::V6(PEER6)
    };
    node(
        vip,
        proto,
        Some(peer),
        [IpAddr::V4(SELF4), IpAddr::V6(SELF6)],
        &[IpAddr::V4(PEER4), IpAddr::V6(PEER6)],
        mtu,
    )
}

/// The backend's node: backend 1 is its own; the receiving node is its peer.
fn backends_node(vip: IpAddr, proto: u8) -> Lb {
    node(
        vip,
        proto,
        None,
        [IpAddr::V4(PEER4), IpAddr::V6(PEER6)],
        &[IpAddr::V4(SELF4), IpAddr::V6(SELF6)],
        1500,
    )
}

/// `inner` (a whole frame: its IP packet is carried as it came) inside the tunnel from `src`
/// to `dst`, between the given MACs, as the sender builds it after one hop (outer TTL 63).
fn encapsulated(inner: &Spec, src: IpAddr, dst: IpAddr, macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
    let inner_frame = inner.build();
    let inner_ip = &inner_frame[14..];
    let hash = flow_hash(
        &addr16(inner.src),
        &addr16(inner.dst),
        inner.sport,
        inner.dport,
        if inner.tcp { PROTO_TCP } else { PROTO_UDP },
    );
    let backend = if inner.dst.is_ipv4() {
        backend4(1)
    } else {
        backend6(1)
    };
    let udp_gue = udp_gue_header(
        inner_ip.len(),
        inner.dst.is_ipv4(),
        source_port(hash),
        TUNNEL_PORT,
        &addr16(backend),
        TARGET_PORT,
    );
    let payload_len = UDP_LEN + GUE_LEN + inner_ip.len();
    let mut frame = Vec::new();
    let (ether_type, ip): (EtherType, Vec<u8>) = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut header = Ipv4Header::new(
                payload_len as u16,
                63,
                IpNumber::UDP,
                src.octets(),
                dst.octets(),
            )
            .unwrap();
            header.dont_fragment = true;
            header.header_checksum = header.calc_header_checksum();
            (EtherType::IPV4, header.to_bytes().to_vec())
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let header = Ipv6Header {
                flow_label: etherparse::Ipv6FlowLabel::try_new(hash & 0xf_ffff).unwrap(),
                payload_length: payload_len as u16,
                next_header: IpNumber::UDP,
                hop_limit: 63,
                source: src.octets(),
                destination: dst.octets(),
                ..Default::default()
            };
            (EtherType::IPV6, header.to_bytes().to_vec())
        }
        _ => panic!("mixed families"),
    };
    Ethernet2Header {
        destination: macs.0,
        source: macs.1,
        ether_type,
    }
    .write(&mut frame)
    .unwrap();
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&udp_gue);
    frame.extend_from_slice(inner_ip);
    frame
}

/// `request` as the backend's node sends it on to backend 1 after taking it out of the
/// tunnel: DNATed, one hop older, from `fwd0`'s MAC to the backend's.
fn delivered(request: &Spec, fwd0_mac: [u8; 6]) -> Vec<u8> {
    let backend = if request.dst.is_ipv4() {
        backend4(1)
    } else {
        backend6(1)
    };
    let mut forwarded = request.to(backend, TARGET_PORT);
    forwarded.ttl -= 1;
    forwarded.src_mac = fwd0_mac;
    forwarded.dst_mac = BACKEND_MAC;
    forwarded.build()
}

#[test]
fn a_flow_for_a_pod_on_another_node_crosses_the_tunnel_and_is_dnated_there() {
    for (tag, client, vip, peer) in [
        ("gue4", CLIENT4, VIP4, IpAddr::V4(PEER4)),
        ("gue6", CLIENT6, VIP6, IpAddr::V6(PEER6)),
    ] {
        let (ns, fwd0, fwd0_mac) = underlay(tag);
        ns.enter(|| {
            let own = if vip.is_ipv4() {
                IpAddr::V4(SELF4)
            } else {
                IpAddr::V6(SELF6)
            };
            let receiver = receiving(vip, PROTO_TCP, 1500);
            let pods_node = backends_node(vip, PROTO_TCP);
            let syn = Spec::tcp(client, 42000, vip, PORT);

            // The receiving node: the packet as it came, inside the tunnel to the peer (same
            // family), sent back out of the interface it came in on.
            let (verdict, output) = receiver.run_on(&syn.build(), Some(fwd0));
            assert_eq!(
                (verdict, receiver.last_reason()),
                (XDP_TX, Reason::TunnelTx)
            );
            let expected = encapsulated(&syn, own, peer, (PEER_MAC, fwd0_mac));
            assert_eq!(output, expected, "{tag}: the encapsulated SYN");
            // The inner packet, given an Ethernet header of its own again, is the client's as
            // it was sent: checksums valid (the slice alone parses as no frame at all).
            let inner_at = 14 + if vip.is_ipv4() { 20 } else { 40 } + UDP_LEN + GUE_LEN;
            let inner = [&output[..12], &syn.build()[12..14], &output[inner_at..]].concat();
            assert_eq!(
                inner[14..],
                syn.build()[14..],
                "{tag}: the inner packet untouched"
            );
            assert_checksums_valid(&inner);
            if vip.is_ipv4() {
                // The outer IPv4 header's checksum (its UDP checksum is 0: none).
                assert_checksums_valid(&output);
            }
            // Tracked there without a reverse entry: replies never come back this way.
            let flows = receiver.dataplane.flows().unwrap();
            assert_eq!(flows.len(), 1);
            assert_ne!(flows[0].1.state & CT_REMOTE, 0);
            assert!(receiver.dataplane.reverse_flows().unwrap().is_empty());

            // The backend's node: out of the tunnel, DNATed to backend 1 and routed to it.
            let (verdict, output) = pods_node.run_on(&output, Some(fwd0));
            assert_eq!((verdict, pods_node.last_reason()), (XDP_TX, Reason::DnatTx));
            assert_eq!(
                output,
                delivered(&syn, fwd0_mac),
                "{tag}: the delivered SYN"
            );
            assert_checksums_valid(&output);
            assert_eq!(pods_node.event(Event::TunnelDecapsulated), 1);
            // ... where the flow has both entries: the reply is reverse-NATed here.
            assert_eq!(pods_node.dataplane.reverse_flows().unwrap().len(), 1);
            let backend = if vip.is_ipv4() {
                backend4(1)
            } else {
                backend6(1)
            };
            let reply = Spec::tcp(backend, TARGET_PORT, client, 42000).with_flags(TCP_ACK);
            let (_, output) = pods_node.run_tc(&reply.build());
            assert_eq!(pods_node.last_reason(), Reason::ReverseNat);
            assert_eq!(
                output,
                Spec::tcp(vip, PORT, client, 42000)
                    .with_flags(TCP_ACK)
                    .build()
            );

            // The client's next segment follows the flow on both nodes.
            let ack = syn.ack();
            let (_, tunneled) = receiver.run_on(&ack.build(), Some(fwd0));
            assert_eq!(receiver.last_reason(), Reason::TunnelTx);
            assert_eq!(receiver.event(Event::ConntrackHit), 1);
            let (_, output) = pods_node.run_on(&tunneled, Some(fwd0));
            assert_eq!(pods_node.last_reason(), Reason::DnatTx);
            assert_eq!(output, delivered(&ack, fwd0_mac));
            assert_eq!(pods_node.event(Event::ConntrackHit), 1);
        })
        .unwrap();
    }
}

#[test]
fn a_mid_flow_packet_on_a_node_that_never_saw_its_flow_reaches_the_same_pod() {
    let (ns, fwd0, fwd0_mac) = underlay("guemid");
    ns.enter(|| {
        let pods_node = backends_node(VIP4, PROTO_TCP);
        let syn = Spec::tcp(CLIENT4, 43000, VIP4, PORT);
        let first = receiving(VIP4, PROTO_TCP, 1500);
        let (_, tunneled) = first.run_on(&syn.build(), Some(fwd0));
        pods_node.run_on(&tunneled, Some(fwd0));
        // ECMP moves the flow to another node: its Maglev table picks the same backend, and
        // the backend's node follows the flow's entry.
        let other = receiving(VIP4, PROTO_TCP, 1500);
        let ack = syn.ack();
        let (verdict, tunneled) = other.run_on(&ack.build(), Some(fwd0));
        assert_eq!((verdict, other.last_reason()), (XDP_TX, Reason::TunnelTx));
        assert_eq!(other.event(Event::ConntrackMissNonSyn), 1);
        let (_, output) = pods_node.run_on(&tunneled, Some(fwd0));
        assert_eq!(pods_node.last_reason(), Reason::DnatTx);
        assert_eq!(output, delivered(&ack, fwd0_mac));
        assert_eq!(pods_node.event(Event::ConntrackHit), 1);
    })
    .unwrap();
}

#[test]
fn tunnel_packets_from_unknown_addresses_are_dropped_and_counted() {
    let (ns, fwd0, fwd0_mac) = underlay("guespoof");
    ns.enter(|| {
        let receiver = receiving(VIP4, PROTO_UDP, 1500);
        let pods_node = backends_node(VIP4, PROTO_UDP);
        let datagram = Spec::udp(CLIENT4, 44000, VIP4, PORT);
        let (_, genuine) = receiver.run_on(&datagram.build(), Some(fwd0));
        assert_eq!(receiver.last_reason(), Reason::TunnelTx);

        // The same packet from an address that is no node's: dropped, counted.
        let spoofed = encapsulated(
            &datagram,
            IpAddr::V4(Ipv4Addr::new(198, 18, 1, 99)),
            IpAddr::V4(PEER4),
            (PEER_MAC, fwd0_mac),
        );
        let (verdict, _) = pods_node.run_on(&spoofed, Some(fwd0));
        assert_eq!(
            (verdict, pods_node.last_reason()),
            (XDP_DROP, Reason::DropTunnelPeer)
        );
        assert_eq!(pods_node.reason(Reason::DropTunnelPeer), 1);
        assert!(pods_node.dataplane.flows().unwrap().is_empty());

        // From a known node but naming a backend this node does not have: dropped.
        let mut wrong = genuine.clone();
        let backend_at = 14 + 20 + UDP_LEN + 4;
        wrong[backend_at + 15] = 77;
        let (verdict, _) = pods_node.run_on(&wrong, Some(fwd0));
        assert_eq!(
            (verdict, pods_node.last_reason()),
            (XDP_DROP, Reason::DropTunnelInvalid)
        );

        // Other UDP to the node's address is the host's.
        let other_port = Spec::udp(CLIENT4, 44001, IpAddr::V4(PEER4), 53);
        let (verdict, _) = pods_node.run_on(&other_port.build(), Some(fwd0));
        assert_eq!(
            (verdict, pods_node.last_reason()),
            (XDP_PASS, Reason::PassNotVip)
        );

        // The genuine one is taken.
        let (_, output) = pods_node.run_on(&genuine, Some(fwd0));
        assert_eq!(pods_node.last_reason(), Reason::DnatTx);
        assert_eq!(output, delivered(&datagram, fwd0_mac));
    })
    .unwrap();
}

#[test]
fn packets_too_large_for_the_underlay_are_answered_with_the_tunnel_mtu() {
    let (ns, fwd0, _) = underlay("guemtu");
    ns.enter(|| {
        for (client, vip) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
            let receiver = receiving(vip, PROTO_TCP, 1500);
            let syn = Spec::tcp(client, 45000, vip, PORT);
            receiver.run_on(&syn.build(), Some(fwd0));
            // A full-size segment: 1500 bytes of IP, 52 (72) more once encapsulated.
            let mut big = syn.ack();
            let ip_header = if vip.is_ipv4() { 20 } else { 40 };
            big.payload = vec![7; 1500 - ip_header - 20];
            let input = big.build();
            let (verdict, output) = receiver.run_on(&input, Some(fwd0));
            assert_eq!(
                (verdict, receiver.last_reason()),
                (XDP_TX, Reason::TunnelTooBig)
            );
            assert_checksums_valid(&output);
            // The IP header and the first 8 bytes of TCP (ports and sequence number).
            let quote_len = ip_header + 8;
            let (kind, code, mtu_field, icmp_at) = if vip.is_ipv4() {
                (3, 4, [0, 0, 0x05, 0xa8], 14 + 20) // 1448
            } else {
                (2, 0, [0, 0, 0x05, 0x94], 14 + 40) // 1428
            };
            assert_eq!(output.len(), icmp_at + 8 + quote_len);
            assert_eq!(&output[icmp_at..icmp_at + 2], &[kind, code]);
            assert_eq!(&output[icmp_at + 4..icmp_at + 8], &mtu_field);
            // From the VIP to the client, quoting the packet's headers as received.
            assert_eq!(&output[icmp_at + 8..], &input[14..14 + quote_len]);
            assert_eq!(&output[..6], &input[6..12], "back to the client's MAC");
        }
    })
    .unwrap();
}
