//! A generated hostile corpus run through the XDP program with BPF_PROG_TEST_RUN: random bytes,
//! every truncation of valid frames, lying length fields, IPv4 options, fragments, IPv6
//! extension header chains, VLAN tags, ICMP errors with truncated inner headers, and bit flips.
//! Every frame is classified by an oracle of its own (etherparse and the length rules of
//! docs/dataplane.md's decision table, not the kernel parser) into the verdict, the reason and the
//! output the table promises, and must get exactly that: counted under that one reason, once;
//! passed byte-identical; dropped; DNATed (destination address and port alone rewritten, valid
//! checksums recomputed from scratch where the input's were); or answered (echo replies). The
//! same corpus, with replies of tracked flows, goes through the TC egress program: only those
//! replies are rewritten, everything else goes on untouched with `TC_ACT_UNSPEC`.
//! Deterministic seed; `LB_HOSTILE_FRAMES` sets the size (default 1,000,000).

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::{EtherType, IpNumber};
use lb_common::{
    Backend, Reason, ServiceKey, ServiceValue,
    maps::{BACKEND_F_VALID, PROTO_TCP, PROTO_UDP, ipv4_mapped, vip_filter_bit},
};
use lb_tests::{
    frames::{Spec, check_checksums},
    netns::Netns,
};
use lb_userspace::Dataplane;

mod harness;
use harness::{Stats, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS, XDP_TX, addr16, counted_under, run_xdp};

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const PORT: u16 = 8080;
const TARGET: u16 = 9090;
/// Where frames not to a VIP go: neither a VIP nor a backend, so that a frame wrongly
/// rewritten to a backend cannot pass for one left alone.
const ELSEWHERE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ELSEWHERE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The client port the ICMP errors of the corpus quote: below `valid`'s client ports, so no
/// frame of the corpus opened the flow they are about.
const UNKNOWN_CLIENT_PORT: u16 = 555;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn setup(dataplane: &mut Dataplane) {
    for (id, vip, proto, backend) in [
        (1, IpAddr::V4(VIP4), PROTO_TCP, IpAddr::V4(BACKEND4)),
        (2, IpAddr::V4(VIP4), PROTO_UDP, IpAddr::V4(BACKEND4)),
        (3, IpAddr::V6(VIP6), PROTO_TCP, IpAddr::V6(BACKEND6)),
        (4, IpAddr::V6(VIP6), PROTO_UDP, IpAddr::V6(BACKEND6)),
    ] {
        let addr = |a: IpAddr| match a {
            IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        dataplane
            .set_service(
                &ServiceKey {
                    addr: addr(vip),
                    port: PORT,
                    proto,
                    pad: 0,
                },
                &ServiceValue {
                    id,
                    flags: 0,
                    affinity_timeout_secs: 0,
                },
            )
            .unwrap();
        dataplane.set_vip_addr(addr(vip), 2).unwrap();
        dataplane
            .set_backend(
                id,
                &Backend {
                    addr: addr(backend),
                    port: TARGET,
                    flags: BACKEND_F_VALID,
                    service_id: id,
                    node: [0; 16],
                },
            )
            .unwrap();
        dataplane.set_maglev_table(id, &[id; 13]).unwrap();
    }
}

/// A valid frame: v4 or v6, TCP or UDP, to a VIP or elsewhere, with VLAN tags and options.
fn valid(rng: &mut Rng) -> Vec<u8> {
    let v6 = rng.below(3) == 0;
    let to_vip = rng.below(4) != 0;
    let (src, dst): (IpAddr, IpAddr) = if v6 {
        (
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                0,
                0,
                0,
                0,
                0,
                rng.below(1000) as u16 + 2,
            )),
            if to_vip {
                IpAddr::V6(VIP6)
            } else {
                IpAddr::V6(ELSEWHERE6)
            },
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, rng.byte())),
            if to_vip {
                IpAddr::V4(VIP4)
            } else {
                IpAddr::V4(ELSEWHERE4)
            },
        )
    };
    let port = if rng.below(8) == 0 {
        rng.below(65535) as u16 + 1
    } else {
        PORT
    };
    let mut spec = if rng.below(2) == 0 {
        Spec::tcp(src, rng.below(60000) as u16 + 1024, dst, port)
    } else {
        Spec::udp(src, rng.below(60000) as u16 + 1024, dst, port)
    };
    spec.vlans = [0, 0, 0, 1, 2][rng.below(5) as usize];
    if !v6 {
        spec.ipv4_options = 4 * rng.below(11) as usize;
        if rng.below(8) == 0 {
            spec.more_fragments = true;
        }
        if rng.below(10) == 0 {
            spec.fragment_offset = rng.below(8000) as u16 + 1;
        }
    }
    spec.payload = (0..rng.below(64)).map(|_| rng.byte()).collect();
    spec.build()
}

/// Offset of the IP header (after up to two VLAN tags) and whether the EtherType says IPv4.
fn l3(frame: &[u8]) -> (usize, bool) {
    let mut off = 14;
    let mut ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    for _ in 0..2 {
        if (ether_type != 0x8100 && ether_type != 0x88a8) || frame.len() < off + 4 {
            break;
        }
        ether_type = u16::from_be_bytes([frame[off + 2], frame[off + 3]]);
        off += 4;
    }
    (off, ether_type == 0x0800)
}

/// Offset of the IP header of a frame.
fn l3_offset(frame: &[u8]) -> usize {
    l3(frame).0
}

fn hostile(rng: &mut Rng) -> Vec<u8> {
    match rng.below(9) {
        // An echo request, to a VIP or elsewhere, sometimes cut short.
        8 => {
            let to_vip = rng.below(4) != 0;
            let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1]);
            let payload: Vec<u8> = (0..rng.below(32)).map(|_| rng.byte()).collect();
            let mut frame = Vec::new();
            if rng.below(2) == 0 {
                let to = if to_vip { VIP4 } else { ELSEWHERE4 };
                eth.ipv4([198, 18, 0, rng.byte()], to.octets(), 64)
                    .icmpv4_echo_request(rng.below(65536) as u16, 1)
                    .write(&mut frame, &payload)
                    .unwrap();
            } else {
                let to = if to_vip { VIP6 } else { ELSEWHERE6 };
                eth.ipv6(
                    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9).octets(),
                    to.octets(),
                    64,
                )
                .icmpv6_echo_request(rng.below(65536) as u16, 1)
                .write(&mut frame, &payload)
                .unwrap();
            }
            if rng.below(4) == 0 {
                let len = 14 + rng.below((frame.len() - 14) as u64) as usize;
                frame.truncate(len);
            }
            frame
        }
        // Random bytes, sometimes with an IP EtherType.
        0 => {
            let mut frame: Vec<u8> = (0..14 + rng.below(120)).map(|_| rng.byte()).collect();
            match rng.below(3) {
                0 => frame[12..14].copy_from_slice(&[0x08, 0x00]),
                1 => frame[12..14].copy_from_slice(&[0x86, 0xdd]),
                _ => {}
            }
            frame
        }
        // A truncation of a valid frame.
        1 => {
            let frame = valid(rng);
            let len = 14 + rng.below((frame.len() - 14) as u64) as usize;
            frame[..len].to_vec()
        }
        // Lying length fields.
        2 => {
            let mut frame = valid(rng);
            let l3 = l3_offset(&frame);
            if frame.len() < l3 + 40 {
                return frame;
            }
            if frame[l3] >> 4 == 4 {
                match rng.below(4) {
                    0 => frame[l3] = 0x40 | rng.below(16) as u8,
                    1 => frame[l3 + 2..l3 + 4]
                        .copy_from_slice(&(rng.below(3000) as u16).to_be_bytes()),
                    2 => {
                        let ihl = usize::from(frame[l3] & 0xf) * 4;
                        if frame.len() > l3 + ihl + 13 {
                            frame[l3 + ihl + 12] =
                                (rng.byte() & 0xf0) | (frame[l3 + ihl + 12] & 0x0f);
                        }
                    }
                    _ => {
                        let ihl = usize::from(frame[l3] & 0xf) * 4;
                        if frame.len() > l3 + ihl + 6 {
                            frame[l3 + ihl + 4..l3 + ihl + 6]
                                .copy_from_slice(&(rng.below(3000) as u16).to_be_bytes());
                        }
                    }
                }
            } else {
                frame[l3 + 4..l3 + 6].copy_from_slice(&(rng.below(3000) as u16).to_be_bytes());
            }
            frame
        }
        // An IPv6 extension header chain.
        3 => {
            let mut spec = Spec::udp(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9)),
                4000,
                IpAddr::V6(if rng.below(2) == 0 { VIP6 } else { ELSEWHERE6 }),
                PORT,
            );
            spec.payload = vec![7; 16];
            let mut frame = spec.build();
            let headers = 1 + rng.below(3) as usize;
            let mut next = frame[20];
            let mut chain = Vec::new();
            for _ in 0..headers {
                let kind = [0u8, 43, 60, 44][rng.below(4) as usize];
                chain.splice(0..0, [next, 0, 0, 0, 0, 0, 0, 0]);
                next = kind;
            }
            frame[20] = next;
            let payload_len = u16::from_be_bytes([frame[18], frame[19]]) + chain.len() as u16;
            frame[18..20].copy_from_slice(&payload_len.to_be_bytes());
            frame.splice(54..54, chain);
            frame
        }
        // An ICMP error about a VIP flow, its inner header truncated.
        4 => {
            let inner = Spec::tcp(
                IpAddr::V4(VIP4),
                PORT,
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7)),
                UNKNOWN_CLIENT_PORT,
            )
            .build();
            let cut = 14 + rng.below(40) as usize;
            let mut frame = Vec::new();
            etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1])
                .ipv4([198, 18, 0, 7], VIP4.octets(), 64)
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: 1400,
                    },
                ))
                .write(&mut frame, &inner[14..cut.min(inner.len())])
                .unwrap();
            frame
        }
        // Bit flips in a valid frame.
        5 => {
            let mut frame = valid(rng);
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(frame.len() as u64) as usize;
                frame[at] ^= 1 << rng.below(8);
            }
            frame
        }
        // Valid frames.
        _ => valid(rng),
    }
}

/// A datagram's identity for fragment tracking: source, destination, identification, protocol.
type Datagram = ([u8; 16], [u8; 16], u32, u8);

/// Where a frame's IP header is and the addresses it names (IPv4 mapped).
#[derive(Clone, Copy, Debug)]
struct Ip {
    l3: usize,
    v4: bool,
    src: [u8; 16],
    dst: [u8; 16],
    /// Where the IP packet ends (its length fields checked against the frame).
    end: usize,
}

/// What docs/dataplane.md's decision table needs to know of a frame, found without the kernel
/// parser: etherparse for the link layer and the IANA list of IPv6 extension headers, the
/// table's length rules for the rest (etherparse rejects lying lengths without saying whether
/// the addresses were readable, which is what the table turns on).
#[derive(Debug)]
enum Class {
    NotIp,
    /// Ends before the IP addresses.
    Truncated,
    /// Lying lengths, or truncated after the addresses.
    Malformed(Ip),
    /// A later fragment (no transport header) of this datagram.
    LaterFragment(Ip, Datagram),
    /// IPv6 with ESP, an unknown extension header or more than four: no readable ports.
    Unsupported(Ip),
    /// ICMP or ICMPv6, its header at the offset.
    Icmp(Ip, usize),
    /// TCP or UDP.
    Transport {
        ip: Ip,
        l4: usize,
        proto: u8,
        sport: u16,
        dport: u16,
        tcp_flags: u8,
        /// The datagram, when this is a first fragment.
        first_fragment: Option<Datagram>,
    },
    /// Another protocol.
    Other,
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn classify(frame: &[u8]) -> Class {
    let Ok(eth) = etherparse::Ethernet2HeaderSlice::from_slice(frame) else {
        return Class::Truncated;
    };
    let mut ether_type = eth.ether_type();
    let mut l3 = 14;
    // Up to two VLAN tags (802.1Q, 802.1ad).
    for _ in 0..2 {
        if ether_type != EtherType::VLAN_TAGGED_FRAME && ether_type != EtherType::PROVIDER_BRIDGING
        {
            break;
        }
        let Ok(vlan) = etherparse::SingleVlanHeaderSlice::from_slice(&frame[l3..]) else {
            return Class::Truncated;
        };
        ether_type = vlan.ether_type();
        l3 += 4;
    }
    match ether_type {
        EtherType::IPV4 => classify_ipv4(frame, l3),
        EtherType::IPV6 => classify_ipv6(frame, l3),
        _ => Class::NotIp,
    }
}

fn classify_ipv4(frame: &[u8], l3: usize) -> Class {
    let Some(header) = frame.get(l3..l3 + 20) else {
        return Class::Truncated;
    };
    let header_len = usize::from(header[0] & 0xf) * 4;
    let total_len = usize::from(be16(header, 2));
    let ip = Ip {
        l3,
        v4: true,
        src: ipv4_mapped(header[12..16].try_into().unwrap()),
        dst: ipv4_mapped(header[16..20].try_into().unwrap()),
        end: l3 + total_len,
    };
    if header[0] >> 4 != 4 || header_len < 20 || total_len < header_len || ip.end > frame.len() {
        return Class::Malformed(ip);
    }
    let proto = header[9];
    let datagram = (ip.src, ip.dst, u32::from(be16(header, 4)), proto);
    let flags_offset = be16(header, 6);
    if flags_offset & 0x1fff != 0 {
        return Class::LaterFragment(ip, datagram);
    }
    let first_fragment = (flags_offset & 0x2000 != 0).then_some(datagram);
    classify_l4(frame, ip, l3 + header_len, proto, first_fragment)
}

fn classify_ipv6(frame: &[u8], l3: usize) -> Class {
    let Some(header) = frame.get(l3..l3 + 40) else {
        return Class::Truncated;
    };
    let ip = Ip {
        l3,
        v4: false,
        src: header[8..24].try_into().unwrap(),
        dst: header[24..40].try_into().unwrap(),
        end: l3 + 40 + usize::from(be16(header, 4)),
    };
    if header[0] >> 4 != 6 || ip.end > frame.len() {
        return Class::Malformed(ip);
    }
    let walked = [
        IpNumber::IPV6_HEADER_HOP_BY_HOP,
        IpNumber::IPV6_ROUTE_HEADER,
        IpNumber::IPV6_FRAGMENTATION_HEADER,
        IpNumber::AUTHENTICATION_HEADER,
        IpNumber::IPV6_DESTINATION_OPTIONS,
    ];
    let (mut next, mut l4) = (header[6], l3 + 40);
    let (mut id, mut first, mut later) = (0, false, false);
    for _ in 0..4 {
        if !walked.contains(&IpNumber(next)) {
            break;
        }
        let Some(extension) = frame.get(l4..l4 + 8) else {
            return Class::Malformed(ip);
        };
        let len = match IpNumber(next) {
            IpNumber::IPV6_FRAGMENTATION_HEADER => {
                id = u32::from_be_bytes(extension[4..8].try_into().unwrap());
                if be16(extension, 2) >> 3 != 0 {
                    later = true;
                } else if extension[3] & 1 != 0 {
                    first = true;
                }
                8
            }
            // RFC 4302: in 4-byte words, less 2.
            IpNumber::AUTHENTICATION_HEADER => (usize::from(extension[1]) + 2) * 4,
            // RFC 8200: in 8-byte words, less 1.
            _ => (usize::from(extension[1]) + 1) * 8,
        };
        next = extension[0];
        l4 += len;
        if later {
            break;
        }
    }
    if l4 > ip.end {
        return Class::Malformed(ip);
    }
    let datagram = (ip.src, ip.dst, id, next);
    if later {
        return Class::LaterFragment(ip, datagram);
    }
    if IpNumber(next).is_ipv6_ext_header_value() {
        return Class::Unsupported(ip);
    }
    classify_l4(frame, ip, l4, next, first.then_some(datagram))
}

fn classify_l4(
    frame: &[u8],
    ip: Ip,
    l4: usize,
    proto: u8,
    first_fragment: Option<Datagram>,
) -> Class {
    let icmp = if ip.v4 {
        IpNumber::ICMP
    } else {
        IpNumber::IPV6_ICMP
    };
    if IpNumber(proto) == icmp {
        return Class::Icmp(ip, l4);
    }
    // A first fragment's transport lengths cannot be held against the IP length.
    let l4_len = first_fragment.is_none().then(|| ip.end - l4);
    let (sport, dport, tcp_flags) = match IpNumber(proto) {
        IpNumber::TCP => {
            let Some(tcp) = frame.get(l4..l4 + 20) else {
                return Class::Malformed(ip);
            };
            let header_len = usize::from(tcp[12] >> 4) * 4;
            if header_len < 20 || l4_len.is_some_and(|len| header_len > len) {
                return Class::Malformed(ip);
            }
            (be16(tcp, 0), be16(tcp, 2), tcp[13])
        }
        IpNumber::UDP => {
            let Some(udp) = frame.get(l4..l4 + 8) else {
                return Class::Malformed(ip);
            };
            let udp_len = usize::from(be16(udp, 4));
            if l4_len.is_some_and(|len| udp_len < 8 || udp_len > len) {
                return Class::Malformed(ip);
            }
            (be16(udp, 0), be16(udp, 2), 0)
        }
        _ => return Class::Other,
    };
    Class::Transport {
        ip,
        l4,
        proto,
        sport,
        dport,
        tcp_flags,
        first_fragment,
    }
}

fn vip(v4: bool) -> [u8; 16] {
    if v4 {
        ipv4_mapped(VIP4.octets())
    } else {
        VIP6.octets()
    }
}

fn backend(v4: bool) -> [u8; 16] {
    if v4 {
        ipv4_mapped(BACKEND4.octets())
    } else {
        BACKEND6.octets()
    }
}

/// Where an address sits in the IP header at `l3`: (offset of the source, of the destination,
/// length).
fn address_fields(ip: &Ip) -> (usize, usize, usize) {
    if ip.v4 {
        (ip.l3 + 12, ip.l3 + 16, 4)
    } else {
        (ip.l3 + 8, ip.l3 + 24, 16)
    }
}

/// What the table says happens to a frame.
#[derive(Debug)]
enum Action {
    Untouched,
    Dropped,
    /// The destination (`to_backend`) or source address, and the port at `l4` unless a later
    /// fragment, rewritten.
    Rewritten {
        ip: Ip,
        l4: Option<(usize, u8)>,
    },
    /// Answered: an echo reply.
    Echoed {
        ip: Ip,
        l4: usize,
    },
}

/// Whether the VIP filter passes `frame` before it is parsed: an untagged IPv4 or IPv6 frame
/// whose destination (read where it sits, whatever the rest of the header says) has a filter
/// bit no service address has.
fn passed_by_the_vip_filter(frame: &[u8]) -> bool {
    let dst: Option<[u8; 16]> = match frame.get(12..14) {
        Some([0x08, 0x00]) => frame
            .get(14 + 16..14 + 20)
            .map(|a| ipv4_mapped(a.try_into().expect("4 bytes"))),
        Some([0x86, 0xdd]) => frame
            .get(14 + 24..14 + 40)
            .map(|a| a.try_into().expect("16 bytes")),
        _ => None,
    };
    dst.is_some_and(|dst| {
        [vip(true), vip(false)]
            .iter()
            .all(|service| vip_filter_bit(service) != vip_filter_bit(&dst))
    })
}

/// The XDP verdict, reason and action the table gives `frame`; `datagrams` are those whose
/// first fragment was DNATed (their later fragments follow it).
fn xdp_oracle(frame: &[u8], datagrams: &mut HashSet<Datagram>) -> (Reason, Action) {
    let to_vip = |ip: &Ip| ip.dst == vip(ip.v4);
    if passed_by_the_vip_filter(frame) {
        return (Reason::PassNotVip, Action::Untouched);
    }
    match classify(frame) {
        Class::NotIp => (Reason::PassNotIp, Action::Untouched),
        Class::Truncated => (Reason::PassUnparsed, Action::Untouched),
        Class::Malformed(ip) if to_vip(&ip) => (Reason::DropMalformed, Action::Dropped),
        Class::Malformed(_) => (Reason::PassUnparsed, Action::Untouched),
        Class::LaterFragment(ip, datagram) if datagrams.contains(&datagram) => {
            (Reason::DnatFibFallback, Action::Rewritten { ip, l4: None })
        }
        Class::LaterFragment(ip, _) if to_vip(&ip) => (Reason::DropFragment, Action::Dropped),
        Class::Unsupported(ip) if to_vip(&ip) => (Reason::DropUnsupported, Action::Dropped),
        Class::Icmp(ip, l4) if to_vip(&ip) => {
            let Some(header) = frame.get(l4..l4 + 2) else {
                return (Reason::DropIcmpUnknownFlow, Action::Dropped);
            };
            let (echo_request, too_big) = if ip.v4 {
                (header[0] == 8, header[0] == 3 && header[1] == 4)
            } else {
                (header[0] == 128, header[0] == 2)
            };
            if echo_request && frame.len() >= l4 + 4 {
                (Reason::IcmpEchoReply, Action::Echoed { ip, l4 })
            } else if echo_request || too_big {
                // Too short to answer; or about a flow no frame of the corpus opened.
                (Reason::DropIcmpUnknownFlow, Action::Dropped)
            } else {
                (Reason::PassNotVip, Action::Untouched)
            }
        }
        Class::Transport {
            ip,
            l4,
            proto,
            dport,
            first_fragment,
            ..
        } if to_vip(&ip) && dport == PORT && (proto == PROTO_TCP || proto == PROTO_UDP) => {
            datagrams.extend(first_fragment);
            (
                Reason::DnatFibFallback,
                Action::Rewritten {
                    ip,
                    l4: Some((l4, proto)),
                },
            )
        }
        _ => (Reason::PassNotVip, Action::Untouched),
    }
}

/// Checks `output` is `input` with only the destination (`to_backend`) or the source rewritten
/// (address, and the port unless a later fragment) and the checksums that cover them; that a
/// UDP checksum of 0 stayed 0, and the checksums are valid (recomputed from scratch) when the
/// input's were.
fn check_rewrite(input: &[u8], output: &[u8], ip: &Ip, l4: Option<(usize, u8)>, to_backend: bool) {
    let mut expected = input.to_vec();
    let (src_at, dst_at, len) = address_fields(ip);
    let skip = if ip.v4 { 12 } else { 0 };
    let (at, port_at, addr, port) = if to_backend {
        (dst_at, 2, backend(ip.v4), TARGET)
    } else {
        (src_at, 0, vip(ip.v4), PORT)
    };
    expected[at..at + len].copy_from_slice(&addr[skip..]);
    let mut checksums = Vec::new();
    if ip.v4 {
        checksums.push(ip.l3 + 10);
    }
    if let Some((l4, proto)) = l4 {
        expected[l4 + port_at..l4 + port_at + 2].copy_from_slice(&port.to_be_bytes());
        let check_at = l4 + if proto == PROTO_TCP { 16 } else { 6 };
        if proto == PROTO_UDP && input[check_at..check_at + 2] == [0, 0] {
            assert_eq!(
                output[check_at..check_at + 2],
                [0, 0],
                "UDP checksum 0 stays 0"
            );
        }
        checksums.push(check_at);
    }
    for at in checksums {
        expected[at..at + 2].copy_from_slice(&output[at..at + 2]);
    }
    assert_eq!(
        output, expected,
        "only the address, port and checksums rewritten"
    );
    if check_checksums(input).is_ok() {
        assert_eq!(check_checksums(output), Ok(()), "checksums of the rewrite");
    }
}

/// Whether the ICMP message of `frame` at `l4` has a valid checksum, computed from scratch
/// (ICMPv6's with its pseudo-header).
fn icmp_checksum_valid(frame: &[u8], ip: &Ip, l4: usize) -> bool {
    let message = &frame[l4..ip.end];
    let mut words: Vec<u8> = Vec::new();
    if !ip.v4 {
        words.extend_from_slice(&ip.src);
        words.extend_from_slice(&ip.dst);
        words.extend_from_slice(&(message.len() as u32).to_be_bytes());
        words.extend_from_slice(&[0, 0, 0, 58]);
    }
    words.extend_from_slice(message);
    let mut sum: u32 = words
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// Checks `output` is the echo reply to `input`: MACs and addresses swapped, the type a reply's,
/// the rest (identifier, sequence, payload, TTL) as it came, a valid checksum if it had one.
fn check_echo_reply(input: &[u8], output: &[u8], ip: &Ip, l4: usize) {
    let mut expected = input.to_vec();
    expected[0..6].copy_from_slice(&input[6..12]);
    expected[6..12].copy_from_slice(&input[0..6]);
    let (src_at, dst_at, len) = address_fields(ip);
    expected[src_at..src_at + len].copy_from_slice(&input[dst_at..dst_at + len]);
    expected[dst_at..dst_at + len].copy_from_slice(&input[src_at..src_at + len]);
    expected[l4] = if ip.v4 { 0 } else { 129 };
    expected[l4 + 2..l4 + 4].copy_from_slice(&output[l4 + 2..l4 + 4]);
    assert_eq!(output, expected, "the echo reply");
    if icmp_checksum_valid(input, ip, l4) {
        let replied = Ip {
            src: ip.dst,
            dst: ip.src,
            ..*ip
        };
        assert!(
            icmp_checksum_valid(output, &replied, l4),
            "echo reply checksum"
        );
    }
}

/// Runs `frames` frames (every truncation of 500 valid frames first, then the random corpus)
/// through `run`, checking each against `oracle` and that it was counted under the reason the
/// oracle gives, once. Returns how many were rewritten and answered.
fn run_corpus(
    stats: &Stats,
    frames: impl Iterator<Item = Vec<u8>>,
    mut run: impl FnMut(&[u8]) -> (u32, Vec<u8>),
    mut oracle: impl FnMut(&[u8]) -> (Reason, Action),
    to_backend: bool,
) -> (u64, u64) {
    let (mut rewritten, mut echoed) = (0, 0);
    let mut counted = stats.packets();
    for (n, frame) in frames.enumerate() {
        let (reason, action) = oracle(&frame);
        let (verdict, output) = run(&frame);
        let now = stats.packets();
        let context =
            || format!("frame {n}, expected {reason:?} {action:?}: {frame:02x?} -> {output:02x?}");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_eq!(counted_under(&counted, &now), reason, "counted under");
            let passed = if to_backend { XDP_PASS } else { TC_ACT_UNSPEC };
            match &action {
                Action::Untouched => assert_eq!((verdict, &output), (passed, &frame)),
                Action::Dropped => assert_eq!(verdict, XDP_DROP),
                Action::Rewritten { ip, l4 } => {
                    assert_eq!(verdict, passed);
                    check_rewrite(&frame, &output, ip, *l4, to_backend);
                }
                Action::Echoed { ip, l4 } => {
                    assert_eq!(verdict, XDP_TX);
                    check_echo_reply(&frame, &output, ip, *l4);
                }
            }
        }));
        if let Err(panic) = result {
            eprintln!("{}", context());
            std::panic::resume_unwind(panic);
        }
        counted = now;
        match action {
            Action::Rewritten { .. } => rewritten += 1,
            Action::Echoed { .. } => echoed += 1,
            _ => {}
        }
    }
    (rewritten, echoed)
}

fn corpus_size() -> u64 {
    std::env::var("LB_HOSTILE_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

#[test]
fn a_hostile_corpus_gets_the_decision_tables_verdict_for_every_frame() {
    let frames = corpus_size();
    let ns = Netns::create("hostile").unwrap();
    let (total, exhaustive, rewritten, echoed) = ns
        .enter(move || {
            let mut dataplane = Dataplane::load().unwrap();
            setup(&mut dataplane);
            let stats = Stats::of(&dataplane);
            let program = dataplane.xdp_program().unwrap();
            let mut rng = Rng(0x005e_ed1b_cafe);
            // Every truncation of 500 valid frames first, then the random corpus.
            let mut truncations: Vec<Vec<u8>> = Vec::new();
            for _ in 0..500 {
                let frame = valid(&mut rng);
                for len in 14..frame.len() {
                    truncations.push(frame[..len].to_vec());
                }
            }
            let exhaustive = truncations.len() as u64;
            let total = frames.max(exhaustive);
            let corpus = truncations
                .into_iter()
                .chain(std::iter::repeat_with(move || hostile(&mut rng)))
                .take(total as usize);
            let mut datagrams = HashSet::new();
            let (rewritten, echoed) = run_corpus(
                &stats,
                corpus,
                |frame| run_xdp(program, frame, None),
                |frame| xdp_oracle(frame, &mut datagrams),
                true,
            );
            // The oracle remembers every first fragment; the kernel's table evicts beyond its
            // size, which would make the oracle wrong, not the data plane.
            assert!(
                datagrams.len() < lb_common::maps::FRAGMENTS_SIZE as usize,
                "{} fragmented datagrams: more than FRAGMENTS holds",
                datagrams.len()
            );
            (total, exhaustive, rewritten, echoed)
        })
        .unwrap();
    println!(
        "{total} hostile frames ({exhaustive} of them every truncation of 500 valid frames): {rewritten} DNATed, {echoed} echo replies"
    );
    // The corpus exercises the rewrites, not only the refusals.
    assert!(rewritten * 10 >= total, "{rewritten} DNATed of {total}");
    assert!(echoed * 100 >= total, "{echoed} echo replies of {total}");
}

/// A reply's identity: (backend, its port, client, client port, protocol).
type Reply = ([u8; 16], u16, [u8; 16], u16, u8);

/// The TC reason and action the table gives `frame`: only a reply of a tracked flow (`tracked`)
/// is rewritten, everything else goes on untouched. `datagrams` holds the ports of reply
/// datagrams whose first fragment was rewritten.
fn tc_oracle(
    frame: &[u8],
    tracked: &mut HashSet<Reply>,
    datagrams: &mut HashMap<Datagram, (u16, u16)>,
) -> (Reason, Action) {
    match classify(frame) {
        Class::Truncated | Class::Malformed(_) => (Reason::EgressUnparsed, Action::Untouched),
        Class::LaterFragment(ip, datagram) => match datagrams.get(&datagram) {
            Some(&(sport, dport))
                if tracked.contains(&(ip.src, sport, ip.dst, dport, datagram.3)) =>
            {
                (Reason::ReverseNat, Action::Rewritten { ip, l4: None })
            }
            _ => (Reason::EgressPass, Action::Untouched),
        },
        Class::Transport {
            ip,
            l4,
            proto,
            sport,
            dport,
            tcp_flags,
            first_fragment,
        } if tracked.contains(&(ip.src, sport, ip.dst, dport, proto)) => {
            if let Some(datagram) = first_fragment {
                datagrams.insert(datagram, (sport, dport));
            }
            // An RST removes the flow once it is sent on.
            if proto == PROTO_TCP && tcp_flags & lb_common::conntrack::TCP_RST != 0 {
                tracked.remove(&(ip.src, sport, ip.dst, dport, proto));
            }
            (
                Reason::ReverseNat,
                Action::Rewritten {
                    ip,
                    l4: Some((l4, proto)),
                },
            )
        }
        // ICMP included: no frame of the corpus is a backend's error about a tracked flow.
        _ => (Reason::EgressPass, Action::Untouched),
    }
}

/// A reply from the backend of a tracked flow (`client`, `port`, TCP or not), as a backend
/// sends it: an ACK, now and then a FIN or (rarely, it ends the flow) an RST.
fn reply(rng: &mut Rng, &(client, port, tcp): &(IpAddr, u16, bool)) -> Spec {
    let backend = if client.is_ipv4() {
        IpAddr::V4(BACKEND4)
    } else {
        IpAddr::V6(BACKEND6)
    };
    let mut spec = if tcp {
        let flags = match rng.below(1000) {
            0 => lb_common::conntrack::TCP_RST,
            1..=20 => lb_common::conntrack::TCP_FIN | lb_common::conntrack::TCP_ACK,
            _ => lb_common::conntrack::TCP_ACK,
        };
        Spec::tcp(backend, TARGET, client, port).with_flags(flags)
    } else {
        Spec::udp(backend, TARGET, client, port)
    };
    spec.vlans = [0, 0, 0, 1, 2][rng.below(5) as usize];
    spec.payload = (0..rng.below(64)).map(|_| rng.byte()).collect();
    spec
}

/// Whether BPF_PROG_TEST_RUN runs a TC program on `frame`: it refuses (EINVAL) a frame whose
/// EtherType says IP but whose IP header is cut short, as no packet the stack sends out is.
fn test_run_takes(frame: &[u8]) -> bool {
    match be16(frame, 12) {
        0x0800 => frame.len() >= 14 + 20,
        0x86dd => frame.len() >= 14 + 40,
        _ => true,
    }
}

#[test]
fn a_hostile_corpus_through_egress_rewrites_only_replies_of_tracked_flows() {
    let frames = corpus_size() / 10;
    let ns = Netns::create("hostiletc").unwrap();
    let (total, rewritten) = ns
        .enter(move || {
            let mut dataplane = Dataplane::load().unwrap();
            setup(&mut dataplane);
            let stats = Stats::of(&dataplane);
            let mut rng = Rng(0x7c_e9e5_5bad);
            // Flows opened through the VIP by XDP: their replies are the TC program's to rewrite.
            let flows: Vec<(IpAddr, u16, bool)> = (0..2000)
                .map(|_| {
                    let client = if rng.below(3) == 0 {
                        IpAddr::V6(Ipv6Addr::new(
                            0x2001,
                            0xdb8,
                            0,
                            0,
                            0,
                            0,
                            0,
                            rng.below(1000) as u16 + 2,
                        ))
                    } else {
                        IpAddr::V4(Ipv4Addr::new(198, 18, 0, rng.byte()))
                    };
                    (client, rng.below(60000) as u16 + 1024, rng.below(2) == 0)
                })
                .collect();
            let mut tracked = HashSet::new();
            for &(client, port, tcp) in &flows {
                let vip = if client.is_ipv4() {
                    IpAddr::V4(VIP4)
                } else {
                    IpAddr::V6(VIP6)
                };
                let request = if tcp {
                    Spec::tcp(client, port, vip, PORT)
                } else {
                    Spec::udp(client, port, vip, PORT)
                };
                let (verdict, output) =
                    run_xdp(dataplane.xdp_program().unwrap(), &request.build(), None);
                assert_eq!(verdict, XDP_PASS);
                assert_ne!(output, request.build(), "DNATed");
                let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
                tracked.insert((
                    backend(client.is_ipv4()),
                    TARGET,
                    addr16(client),
                    port,
                    proto,
                ));
            }
            let program = dataplane.tc_egress_program().unwrap();
            let corpus = std::iter::repeat_with(move || {
                let flow = &flows[rng.below(flows.len() as u64) as usize];
                match rng.below(5) {
                    0 | 1 => reply(&mut rng, flow).build(),
                    // A reply cut short or with bits flipped.
                    2 => {
                        let mut frame = reply(&mut rng, flow).build();
                        if rng.below(2) == 0 {
                            let len = 14 + rng.below((frame.len() - 14) as u64) as usize;
                            frame.truncate(len);
                        } else {
                            for _ in 0..1 + rng.below(3) {
                                let at = rng.below(frame.len() as u64) as usize;
                                frame[at] ^= 1 << rng.below(8);
                            }
                        }
                        frame
                    }
                    // From the backend's port to a client port of no tracked flow.
                    3 => reply(&mut rng, flow)
                        .to(flow.0, rng.below(1000) as u16)
                        .build(),
                    _ => hostile(&mut rng),
                }
            })
            .filter(|frame| test_run_takes(frame))
            .take(frames as usize);
            let mut datagrams = HashMap::new();
            let (rewritten, _) = run_corpus(
                &stats,
                corpus,
                |frame| harness::run_tc(program, frame),
                |frame| tc_oracle(frame, &mut tracked, &mut datagrams),
                false,
            );
            (frames, rewritten)
        })
        .unwrap();
    println!("{total} frames through egress: {rewritten} replies rewritten to the VIP");
    assert!(
        rewritten * 4 >= total,
        "{rewritten} replies rewritten of {total}"
    );
}
