//! The data plane's own parser (`lb-ebpf/src/parse.rs` over `lb-ebpf/src/frame.rs`), compiled
//! for userspace over byte slices: the property test below and the fuzz target (`fuzz/`) run the
//! very source the kernel runs, not a copy.

use crate::{
    frame::Frame,
    parse::{Kind, Packet},
};

/// A byte slice as a [`Frame`].
pub struct SliceFrame<'a> {
    bytes: &'a [u8],
}

impl Frame for SliceFrame<'_> {
    fn start(&self) -> usize {
        self.bytes.as_ptr() as usize
    }
    fn end(&self) -> usize {
        self.start() + self.bytes.len()
    }
}

/// Parses `bytes` as the XDP program would.
pub fn parse(bytes: &[u8]) -> (Kind, Packet) {
    let mut packet = Packet::default();
    let kind = crate::parse::packet(&SliceFrame { bytes }, &mut packet);
    (kind, packet)
}

/// Parses `bytes` and checks what the data path relies on; panics on a violation. Shared by
/// the property test and the fuzz target.
pub fn check(bytes: &[u8]) {
    let (kind, packet) = parse(bytes);
    // The VIP filter's early read of the destination names the address the parser reads,
    // whenever the parser gets that far on an untagged frame.
    let early = crate::parse::destination(&SliceFrame { bytes });
    if !packet.vlan && !matches!(kind, Kind::Truncated | Kind::NotIp) {
        assert_eq!(early, Some(packet.dst), "early destination");
    }
    if early.is_none() {
        assert!(
            packet.vlan || matches!(kind, Kind::Truncated | Kind::NotIp),
            "an untagged IP frame with addresses and no early destination"
        );
    }
    match kind {
        Kind::Parsed => {
            assert!(
                [14, 18, 22].contains(&packet.l3_off),
                "l3 at {}",
                packet.l3_off
            );
            assert!(
                packet.l4_off >= packet.l3_off + 20,
                "l4 at {}",
                packet.l4_off
            );
            // The ports and the transport checksum the rewrite touches are inside the frame.
            assert!(
                packet.l4_check_off() + 2 <= bytes.len(),
                "checksum beyond the frame"
            );
            assert!(packet.proto == 6 || packet.proto == 17);
        }
        Kind::Truncated | Kind::NotIp => assert_eq!(packet.dst, [0; 16]),
        // The ICMP header's offset follows a whole IP header.
        Kind::Icmp => assert!(
            packet.l4_off >= packet.l3_off + 20,
            "icmp at {}",
            packet.l4_off
        ),
        Kind::OtherProtocol | Kind::Fragment | Kind::Malformed | Kind::Unsupported => {}
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::frames::Spec;

    #[test]
    fn the_kernel_parser_reads_what_etherparse_built() {
        for (spec, vlans, options) in [
            (
                Spec::tcp(
                    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
                    1234,
                    IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1)),
                    8080,
                ),
                0,
                0,
            ),
            (
                Spec::udp(
                    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
                    1234,
                    IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1)),
                    53,
                ),
                2,
                40,
            ),
            (
                Spec::tcp(
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                    4321,
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                    443,
                ),
                1,
                0,
            ),
        ] {
            let mut spec = spec;
            spec.vlans = vlans;
            spec.ipv4_options = options;
            let frame = spec.build();
            let (kind, packet) = parse(&frame);
            assert!(kind == Kind::Parsed);
            assert_eq!((packet.sport, packet.dport), (spec.sport, spec.dport));
            assert_eq!(packet.l3_off, 14 + 4 * usize::from(vlans));
            check(&frame);
        }
    }

    /// Every truncation and many random corruptions of valid frames, and random bytes.
    #[test]
    fn the_kernel_parser_holds_its_invariants_on_any_input() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20_000u32 {
            let mut spec = if round % 2 == 0 {
                Spec::tcp(
                    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
                    1,
                    IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1)),
                    2,
                )
            } else {
                Spec::udp(
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                    1,
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    2,
                )
            };
            spec.vlans = (next() % 3) as u8;
            let mut frame = spec.build();
            for _ in 0..next() % 4 {
                let at = (next() as usize) % frame.len();
                frame[at] = next() as u8;
            }
            let cut = 14 + (next() as usize) % (frame.len() - 13);
            check(&frame[..cut]);
            let random: Vec<u8> = (0..14 + next() % 100).map(|_| next() as u8).collect();
            check(&random);
        }
    }
}
