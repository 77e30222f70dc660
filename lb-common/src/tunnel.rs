//! The tunnel between nodes: IP-in-UDP after GUE (draft-ietf-intarea-gue, variant 0), the
//! header layout both sides (and the tests' packet builders) agree on.
//!
//! A node that receives a flow whose backend lives on another node sends the packet there
//! untouched inside `outer IP | UDP | GUE | private data | inner IP ...`:
//!
//! - outer IP: this node's underlay address to the pod's node's, the same family as the
//!   backend's when that node has one (IPv4 in IPv4, IPv6 in IPv6), else the other; IPv4 with
//!   DF set (the underlay must never fragment what the far end cannot reassemble);
//! - UDP: source port from the flow's hash (the underlay's ECMP spreads flows), destination
//!   the tunnel port; checksum 0 (RFC 6935/6936 allow it for tunnels over IPv6: the inner
//!   packet carries its own);
//! - GUE: version 0, no flags, `Hlen` 5 (the private data's 20 bytes), protocol 4 (IPv4) or 41
//!   (IPv6);
//! - private data: the backend the receiving node picked, its address (16 bytes) and port (2),
//!   then 2 zero bytes. The pod's node delivers to exactly that pod, even while its own tables
//!   are a moment older or newer than the sender's.

use crate::maps::is_ipv4_mapped;

/// The GUE header: version, flags, `Hlen`, protocol.
pub const GUE_HEADER_LEN: usize = 4;
/// The private data carried after the GUE header: the backend's address and port.
pub const GUE_PRIVATE_LEN: usize = 20;
/// GUE header and private data.
pub const GUE_LEN: usize = GUE_HEADER_LEN + GUE_PRIVATE_LEN;
/// The first byte of our GUE header: version 0, C 0, `Hlen` = the private data in words.
pub const GUE_FIRST_BYTE: u8 = (GUE_PRIVATE_LEN / 4) as u8;
/// GUE protocol field: the inner packet is IPv4 (IPIP).
pub const GUE_PROTO_IPV4: u8 = 4;
/// GUE protocol field: the inner packet is IPv6.
pub const GUE_PROTO_IPV6: u8 = 41;
/// UDP header length.
pub const UDP_LEN: usize = 8;
/// What an IPv4 outer header adds to a packet: IPv4, UDP, GUE.
pub const OVERHEAD_IPV4: usize = 20 + UDP_LEN + GUE_LEN;
/// What an IPv6 outer header adds to a packet: IPv6, UDP, GUE.
pub const OVERHEAD_IPV6: usize = 40 + UDP_LEN + GUE_LEN;
/// The outer TTL / hop limit.
pub const OUTER_TTL: u8 = 64;
/// The lowest UDP source port of a tunnel packet (the ephemeral range, as RFC 7605 asks of
/// flow entropy in a source port).
pub const SOURCE_PORT_BASE: u16 = 49_152;

/// The outer header's length for a tunnel to `node` (16 bytes, IPv4-mapped for IPv4).
#[inline(always)]
#[must_use]
pub fn overhead(node: &[u8; 16]) -> usize {
    if is_ipv4_mapped(node) {
        OVERHEAD_IPV4
    } else {
        OVERHEAD_IPV6
    }
}

/// The largest inner IP packet a tunnel to `node` carries over an underlay of `mtu`: what
/// "fragmentation needed" / "packet too big" tells the client.
#[inline(always)]
#[must_use]
pub fn inner_mtu(mtu: u32, node: &[u8; 16]) -> u32 {
    mtu.saturating_sub(overhead(node) as u32)
}

/// The UDP source port of a flow whose hash is `hash`: the same for every packet of the flow.
#[inline(always)]
#[must_use]
pub const fn source_port(hash: u32) -> u16 {
    SOURCE_PORT_BASE | (hash as u16 & 0x3fff)
}

/// The UDP header, GUE header and private data of a tunnel packet carrying an inner IP packet
/// of `inner_len` bytes (`inner_ipv4`) for `backend_addr`:`backend_port`, from `sport` to
/// `dport`.
#[inline(always)]
#[must_use]
pub fn udp_gue_header(
    inner_len: usize,
    inner_ipv4: bool,
    sport: u16,
    dport: u16,
    backend_addr: &[u8; 16],
    backend_port: u16,
) -> [u8; UDP_LEN + GUE_LEN] {
    let len = ((UDP_LEN + GUE_LEN + inner_len) as u16).to_be_bytes();
    let (s, d, p, a) = (
        sport.to_be_bytes(),
        dport.to_be_bytes(),
        backend_port.to_be_bytes(),
        backend_addr,
    );
    let proto = if inner_ipv4 {
        GUE_PROTO_IPV4
    } else {
        GUE_PROTO_IPV6
    };
    [
        s[0],
        s[1],
        d[0],
        d[1],
        len[0],
        len[1],
        0,
        0,
        GUE_FIRST_BYTE,
        proto,
        0,
        0,
        a[0],
        a[1],
        a[2],
        a[3],
        a[4],
        a[5],
        a[6],
        a[7],
        a[8],
        a[9],
        a[10],
        a[11],
        a[12],
        a[13],
        a[14],
        a[15],
        p[0],
        p[1],
        0,
        0,
    ]
}

/// What a tunnel packet's GUE header and private data say: the inner packet's family and the
/// backend it was sent for. `None` when it is not a header of ours (another version, flags,
/// length or protocol).
#[inline(always)]
#[must_use]
pub fn parse_gue(gue: &[u8; GUE_LEN]) -> Option<(bool, [u8; 16], u16)> {
    if gue[0] != GUE_FIRST_BYTE || gue[2] != 0 || gue[3] != 0 {
        return None;
    }
    let inner_ipv4 = match gue[1] {
        GUE_PROTO_IPV4 => true,
        GUE_PROTO_IPV6 => false,
        _ => return None,
    };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        addr[i] = gue[GUE_HEADER_LEN + i];
        i += 1;
    }
    if is_ipv4_mapped(&addr) != inner_ipv4 {
        return None;
    }
    let port = u16::from_be_bytes([gue[GUE_HEADER_LEN + 16], gue[GUE_HEADER_LEN + 17]]);
    Some((inner_ipv4, addr, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::ipv4_mapped;

    #[test]
    fn headers_round_trip() {
        let backend = ipv4_mapped([198, 18, 17, 1]);
        let header = udp_gue_header(60, true, source_port(0xdead_beef), 6080, &backend, 8080);
        assert_eq!(&header[..2], &source_port(0xdead_beef).to_be_bytes());
        assert_eq!(&header[2..4], &6080u16.to_be_bytes());
        assert_eq!(u16::from_be_bytes([header[4], header[5]]), 8 + 24 + 60);
        assert_eq!(&header[6..8], &[0, 0]);
        let gue: [u8; GUE_LEN] = header[UDP_LEN..].try_into().unwrap();
        assert_eq!(parse_gue(&gue), Some((true, backend, 8080)));
        // Another version, another protocol, a family that does not match: not ours.
        let mut other = gue;
        other[0] = 0x40 | GUE_FIRST_BYTE;
        assert_eq!(parse_gue(&other), None);
        let mut other = gue;
        other[1] = 17;
        assert_eq!(parse_gue(&other), None);
        let mut other = gue;
        other[1] = GUE_PROTO_IPV6;
        assert_eq!(parse_gue(&other), None);
    }

    #[test]
    fn overheads_and_ports() {
        assert_eq!(OVERHEAD_IPV4, 52);
        assert_eq!(OVERHEAD_IPV6, 72);
        assert_eq!(inner_mtu(1500, &ipv4_mapped([198, 18, 1, 12])), 1448);
        assert_eq!(
            inner_mtu(
                1500,
                &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
            ),
            1428
        );
        assert!(
            (0..=u32::MAX)
                .step_by(65_537)
                .all(|h| source_port(h) >= SOURCE_PORT_BASE)
        );
    }
}
