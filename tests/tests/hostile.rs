//! A generated hostile corpus run through the XDP program with BPF_PROG_TEST_RUN: random bytes,
//! every truncation of valid frames, lying length fields, IPv4 options, fragments, IPv6
//! extension header chains, VLAN tags, ICMP errors with truncated inner headers, and bit flips.
//! For every frame: counted under exactly one reason; a frame the program passes without
//! rewriting comes out byte-identical; a rewritten frame goes to a backend and, if its input's
//! checksums were valid, has valid checksums. Deterministic seed; `LB_HOSTILE_FRAMES` sets the
//! size (default 1,000,000).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    Backend, Reason, ServiceKey, ServiceValue,
    maps::{BACKEND_F_VALID, PROTO_TCP, PROTO_UDP, ipv4_mapped},
};
use lb_tests::{
    frames::{Spec, check_checksums},
    netns::Netns,
};
use lb_userspace::Dataplane;

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const PORT: u16 = 8080;
const TARGET: u16 = 9090;

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
                IpAddr::V6(BACKEND6)
            },
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, rng.byte())),
            if to_vip {
                IpAddr::V4(VIP4)
            } else {
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))
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
    match rng.below(8) {
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
                IpAddr::V6(if rng.below(2) == 0 { VIP6 } else { BACKEND6 }),
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
                5555,
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

#[test]
fn a_hostile_corpus_is_never_corrupted_misrouted_or_left_uncounted() {
    let frames: u64 = std::env::var("LB_HOSTILE_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let ns = Netns::create("hostile").unwrap();
    let summary = ns
        .enter(move || {
            let mut dataplane = Dataplane::load().unwrap();
            setup(&mut dataplane);
            let program = dataplane.xdp_program().unwrap();
            let mut rng = Rng(0x005e_ed1b_cafe);
            let mut rewritten = 0u64;
            let mut dropped = 0u64;
            let mut echoed = 0u64;
            let mut output = vec![0u8; 4096];
            // Every truncation of 500 valid frames first, then the random corpus.
            let mut truncations: Vec<Vec<u8>> = Vec::new();
            for _ in 0..500 {
                let frame = valid(&mut rng);
                for len in 14..frame.len() {
                    truncations.push(frame[..len].to_vec());
                }
            }
            let exhaustive = truncations.len() as u64;
            let frames = frames.max(exhaustive);
            let mut truncations = truncations.into_iter();
            for n in 0..frames {
                let frame = truncations.next().unwrap_or_else(|| hostile(&mut rng));
                let result = program
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        data_out: Some(&mut output),
                        ..TestRunOptions::new()
                    })
                    .unwrap();
                let out = &output[..result.data_size_out as usize];
                match result.return_value {
                    2 if out == frame.as_slice() => {}
                    2 => {
                        rewritten += 1;
                        // Rewritten: to the backend, and valid checksums where the input had them.
                        let (l3, ipv4) = l3(out);
                        let to_backend = if ipv4 {
                            out[l3 + 16..l3 + 20] == BACKEND4.octets()
                        } else {
                            out[l3 + 24..l3 + 40] == BACKEND6.octets()
                        };
                        assert!(
                            to_backend,
                            "frame {n} rewritten elsewhere: {frame:02x?} -> {out:02x?}"
                        );
                        if check_checksums(&frame).is_ok() {
                            assert_eq!(
                                check_checksums(out),
                                Ok(()),
                                "frame {n}: {frame:02x?} -> {out:02x?}"
                            );
                        }
                    }
                    1 => {
                        dropped += 1;
                        // Only what is addressed to a VIP is ever dropped.
                        let (l3, ipv4) = l3(&frame);
                        let to_vip = if ipv4 {
                            frame.get(l3 + 16..l3 + 20) == Some(&VIP4.octets()[..])
                        } else {
                            frame.get(l3 + 24..l3 + 40) == Some(&VIP6.octets()[..])
                        };
                        assert!(to_vip, "frame {n} dropped but not to a VIP: {frame:02x?}");
                    }
                    // XDP_TX: only echo replies, without a route to send anything else out.
                    3 => echoed += 1,
                    other => panic!("frame {n}: unexpected verdict {other}"),
                }
            }
            let counted: u64 = dataplane
                .reason_counters()
                .unwrap()
                .iter()
                .map(|(_, c)| c.packets)
                .sum();
            assert_eq!(
                counted, frames,
                "every frame counted under exactly one reason"
            );
            let dnat = dataplane
                .reason_counter(Reason::DnatFibFallback)
                .unwrap()
                .packets;
            assert_eq!(dnat, rewritten, "the rewritten frames are the DNATed ones");
            let replies = dataplane
                .reason_counter(Reason::IcmpEchoReply)
                .unwrap()
                .packets;
            assert_eq!(replies, echoed, "XDP_TX only for echo replies");
            (frames, exhaustive, rewritten, dropped)
        })
        .unwrap();
    println!(
        "{} hostile frames ({} of them every truncation of 500 valid frames): {} rewritten, {} dropped, the rest passed untouched",
        summary.0, summary.1, summary.2, summary.3
    );
}
