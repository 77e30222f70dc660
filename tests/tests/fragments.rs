//! Fragmented datagrams through a VIP, both ways, IPv4 and IPv6, through BPF_PROG_TEST_RUN:
//! the first fragment is rewritten whole (its transport checksum covers the datagram), later
//! ones (no transport header) follow it by (source, destination, identification, protocol) and
//! get their address rewritten alone.

use std::net::IpAddr;

use etherparse::{Ipv4Header, PacketBuilder};
use lb_common::{
    Event, Reason,
    maps::{BACKEND_F_VALID, PROTO_UDP},
};
use lb_tests::frames::Spec;

mod harness;
use harness::*;

/// `frame` (untagged IPv4) with its destination (`dst`) or source address replaced and the
/// header checksum computed again from scratch.
fn with_ipv4_addr(mut frame: Vec<u8>, addr: IpAddr, dst: bool) -> Vec<u8> {
    let IpAddr::V4(addr) = addr else {
        unreachable!()
    };
    let (mut header, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
    if dst {
        header.destination = addr.octets();
    } else {
        header.source = addr.octets();
    }
    header.header_checksum = header.calc_header_checksum();
    let bytes = header.to_bytes();
    frame[14..14 + bytes.len()].copy_from_slice(&bytes);
    frame
}

/// `frame` (untagged IPv6) with its source or destination address replaced.
fn with_ipv6_addr(mut frame: Vec<u8>, addr: IpAddr, dst: bool) -> Vec<u8> {
    let IpAddr::V6(addr) = addr else {
        unreachable!()
    };
    let at = if dst { 14 + 24 } else { 14 + 8 };
    frame[at..at + 16].copy_from_slice(&addr.octets());
    frame
}

fn with_addr(frame: Vec<u8>, addr: IpAddr, dst: bool) -> Vec<u8> {
    if addr.is_ipv4() {
        with_ipv4_addr(frame, addr, dst)
    } else {
        with_ipv6_addr(frame, addr, dst)
    }
}

/// The two fragments of a UDP datagram from `src:sport` to `dst:dport`, identification `id`:
/// the first carries the UDP header and 16 bytes, the later one 24 more bytes at offset 24.
fn fragments(spec: &Spec, id: u16) -> (Vec<u8>, Vec<u8>) {
    match (spec.src, spec.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            let first = Spec {
                more_fragments: true,
                identification: id,
                payload: vec![0x11; 16],
                ..spec.clone()
            };
            let later = Spec {
                fragment_offset: 3,
                identification: id,
                payload: vec![0x22; 16],
                ..spec.clone()
            };
            (first.build(), later.build())
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            // The first: a UDP datagram with a fragment header (offset 0, more fragments).
            let mut first = Vec::new();
            PacketBuilder::ethernet2(spec.src_mac, spec.dst_mac)
                .ipv6(src.octets(), dst.octets(), spec.ttl)
                .udp(spec.sport, spec.dport)
                .write(&mut first, &[0x11; 16])
                .unwrap();
            let id = u32::from(id).to_be_bytes();
            let insert = |frame: &mut Vec<u8>, offset_words: u16, more: bool| {
                let next = frame[14 + 6];
                frame[14 + 6] = 44;
                let len = u16::from_be_bytes([frame[18], frame[19]]) + 8;
                frame[18..20].copy_from_slice(&len.to_be_bytes());
                let field = (offset_words << 3) | u16::from(more);
                let [hi, lo] = field.to_be_bytes();
                frame.splice(54..54, [next, 0, hi, lo, id[0], id[1], id[2], id[3]]);
            };
            insert(&mut first, 0, true);
            // The later: 24 bytes of data at offset 24 (3 words), UDP as next header.
            let mut later = Vec::new();
            PacketBuilder::ethernet2(spec.src_mac, spec.dst_mac)
                .ipv6(src.octets(), dst.octets(), spec.ttl)
                .write(&mut later, etherparse::IpNumber::UDP, &[0x22; 24])
                .unwrap();
            insert(&mut later, 3, false);
            (first, later)
        }
        _ => unreachable!(),
    }
}

#[test]
fn fragmented_datagrams_cross_the_vip_whole_both_ways() {
    in_fresh_netns("frag", |_| {
        let mut lb = Lb::new();
        lb.service(2, VIP4, PROTO_UDP, 0, &[(2, backend4(2), BACKEND_F_VALID)]);
        lb.service(4, VIP6, PROTO_UDP, 0, &[(4, backend6(4), BACKEND_F_VALID)]);
        for (name, client, vip, backend) in [
            ("IPv4", CLIENT4, VIP4, backend4(2)),
            ("IPv6", CLIENT6, VIP6, backend6(4)),
        ] {
            // Client -> VIP: the first fragment is DNATed whole, the later one follows it.
            let request = Spec::udp(client, 41000, vip, PORT);
            let (first, later) = fragments(&request, 7);
            let (expected_first, _) = fragments(&request.to(backend, TARGET_PORT), 7);
            assert_eq!(lb.run(&first), (XDP_PASS, expected_first), "{name} first");
            assert_eq!(
                lb.run(&later),
                (XDP_PASS, with_addr(later.clone(), backend, true)),
                "{name} later fragment"
            );
            // Its fragmented reply leaves whole, from the VIP.
            let mut reply = request.clone();
            (reply.src, reply.sport, reply.dst, reply.dport) =
                (backend, TARGET_PORT, client, request.sport);
            let (first, later) = fragments(&reply, 9);
            let mut as_vip = reply.clone();
            (as_vip.src, as_vip.sport) = (vip, PORT);
            let (expected_first, _) = fragments(&as_vip, 9);
            assert_eq!(
                lb.run_tc(&first),
                (TC_ACT_UNSPEC, expected_first),
                "{name} reply's first"
            );
            assert_eq!(
                lb.run_tc(&later),
                (TC_ACT_UNSPEC, with_addr(later.clone(), vip, false)),
                "{name} reply's later fragment"
            );
        }
        assert_eq!(lb.reason(Reason::ReverseNat), 4);
        assert_eq!(lb.reason(Reason::DnatFibFallback), 4);
        // One flow per family, both placed by their first fragment.
        assert_eq!(lb.event(Event::ConntrackMiss), 2);
        // A later fragment of a datagram whose first never came: dropped, to a VIP.
        let (_, orphan) = fragments(&Spec::udp(CLIENT4, 41001, VIP4, PORT), 11);
        assert_eq!(lb.run(&orphan).0, XDP_DROP);
        assert_eq!(lb.reason(Reason::DropFragment), 1);
    });
}
