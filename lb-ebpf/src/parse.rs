//! Parsing a frame into the 5-tuple and header offsets the data path needs.
//!
//! Every way a frame can fail to parse has a [`Kind`], so the caller can count it and decide on
//! purpose: drop it if it is to a VIP address, pass it otherwise.
use lb_common::maps::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ipv4_mapped};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::{
    frame::{Frame, copy_bytes, read, set_ipv4_mapped},
    offsets::{
        ETHER_TYPE, IPV4_DST, IPV4_SRC, IPV6_DST, IPV6_SRC, TCP_CHECK, TCP_DATA_OFFSET, TCP_FLAGS,
        UDP_CHECK, UDP_LEN,
    },
};

/// At most this many stacked VLAN tags (802.1Q in 802.1ad) are parsed.
const MAX_VLAN_TAGS: usize = 2;

/// A TCP or UDP packet over IPv4 or IPv6, parsed.
#[derive(Default)]
pub struct Packet {
    /// Offset of the IP header.
    pub l3_off: usize,
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
    /// IPv4 (else IPv6).
    pub ipv4: bool,
    /// The frame carries at least one VLAN tag.
    pub vlan: bool,
    /// Source address (IPv4-mapped for IPv4).
    pub src: [u8; 16],
    /// Destination address (IPv4-mapped for IPv4); also set when the frame is not fully
    /// parsed but its addresses were read.
    pub dst: [u8; 16],
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// TCP flags (byte 13 of the header); 0 for UDP.
    pub tcp_flags: u8,
    /// Length of the IP packet (header included), for the next hop's MTU.
    pub l3_len: u32,
    /// Whether the packet is a fragment: [`FRAGMENT_NONE`], [`FRAGMENT_FIRST`] (it carries the
    /// ports) or [`FRAGMENT_LATER`] (it does not: `Kind::Fragment`).
    pub fragment: u8,
    /// The fragment's identification (IPv4: 16 bits; IPv6: the fragment header's 32).
    pub fragment_id: u32,
    /// When the program started on this packet (`CLOCK_MONOTONIC`, coarse), read once by the
    /// entry point and shared by every step that needs the time. Not set by the parser.
    pub now_ns: u64,
}

/// Not a fragment.
pub const FRAGMENT_NONE: u8 = 0;
/// The first fragment of a datagram: its transport header is here.
pub const FRAGMENT_FIRST: u8 = 1;
/// A later fragment: no transport header, the ports are the first fragment's.
pub const FRAGMENT_LATER: u8 = 2;

/// At most this many IPv6 extension headers are walked before the transport header.
const MAX_EXTENSION_HEADERS: usize = 4;
/// IPv6 next-header values of the extension headers walked.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTHENTICATION: u8 = 51;
const IPV6_DESTINATION_OPTIONS: u8 = 60;

impl Packet {
    /// Offset of the TCP or UDP checksum.
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        self.l4_off
            + if self.proto == PROTO_TCP {
                TCP_CHECK
            } else {
                UDP_CHECK
            }
    }
}

/// What parsing found. Every kind but `Parsed` leaves the packet only partly filled.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP or UDP packet, fully parsed.
    Parsed,
    /// Not IPv4 or IPv6.
    NotIp,
    /// Ends before its IP addresses: nothing to decide by (`dst` is zero).
    Truncated,
    /// IP, but neither TCP nor UDP nor ICMP: a valid packet that is not ours.
    OtherProtocol,
    /// ICMP or ICMPv6 (`proto`, `l4_off` and the addresses are set).
    Icmp,
    /// A later fragment (no transport header) to `dst`: addresses, `proto` and
    /// `fragment_id` are set, the ports are the first fragment's.
    Fragment,
    /// Lying or inconsistent lengths, or truncated after the addresses, to `dst`.
    Malformed,
    /// IPv6 extension headers not walked (ESP, unknown ones, more than
    /// `MAX_EXTENSION_HEADERS`) before the transport header, to `dst`.
    Unsupported,
}

/// The destination address of an untagged IPv4 or IPv6 frame (IPv4-mapped), read without
/// parsing anything else: enough to pass a packet to an address no service uses at once.
/// `None` for anything else (tagged, not IP, too short), which the full parse decides.
#[inline(always)]
pub fn destination(frame: &impl Frame) -> Option<[u8; 16]> {
    address_at(frame, IPV4_DST, IPV6_DST)
}

/// The source address of an untagged IPv4 or IPv6 frame, as [`destination`] reads it.
#[inline(always)]
pub fn source(frame: &impl Frame) -> Option<[u8; 16]> {
    address_at(frame, IPV4_SRC, IPV6_SRC)
}

/// The address at `v4` or `v6` bytes into the IP header of an untagged frame.
#[inline(always)]
fn address_at(frame: &impl Frame, v4: usize, v6: usize) -> Option<[u8; 16]> {
    let ether_type = u16::from_ne_bytes(read::<[u8; 2]>(frame, ETHER_TYPE).ok()?);
    if ether_type == EtherType::Ipv4 as u16 {
        read::<[u8; 4]>(frame, EthHdr::LEN + v4)
            .ok()
            .map(ipv4_mapped)
    } else if ether_type == EtherType::Ipv6 as u16 {
        read::<[u8; 16]>(frame, EthHdr::LEN + v6).ok()
    } else {
        None
    }
}

/// Parses Ethernet, up to two VLAN tags, IPv4 (with options) or IPv6, and TCP or UDP into
/// `packet`.
///
/// Not inlined, writing through `packet` and returning a plain enum: the parser's temporaries
/// get a stack frame of their own, and BPF functions return no aggregates.
#[inline(never)]
pub fn packet(frame: &impl Frame, packet: &mut Packet) -> Kind {
    // The packet lives in per-CPU scratch memory: clear what an earlier packet left there.
    packet.vlan = false;
    packet.ipv4 = false;
    copy_bytes(&mut packet.dst, &[0; 16]);
    packet.fragment = FRAGMENT_NONE;
    let Ok(mut ether_type) = read::<[u8; 2]>(frame, ETHER_TYPE) else {
        return Kind::Truncated;
    };
    let mut l3_off = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        let tagged = u16::from_ne_bytes(ether_type);
        if tagged != EtherType::Ieee8021q as u16 && tagged != EtherType::Ieee8021ad as u16 {
            break;
        }
        // The tag's own EtherType follows its 2-byte TCI.
        let Ok(inner) = read(frame, l3_off + 2) else {
            return Kind::Truncated;
        };
        ether_type = inner;
        l3_off += VlanHdr::LEN;
        packet.vlan = true;
    }
    packet.l3_off = l3_off;
    let ether_type = u16::from_ne_bytes(ether_type);
    if ether_type == EtherType::Ipv4 as u16 {
        ipv4(frame, packet)
    } else if ether_type == EtherType::Ipv6 as u16 {
        ipv6(frame, packet)
    } else {
        Kind::NotIp
    }
}

#[inline(always)]
fn ipv4(frame: &impl Frame, packet: &mut Packet) -> Kind {
    let l3_off = packet.l3_off;
    let Ok(ip) = frame.ptr_at::<Ipv4Hdr>(l3_off) else {
        return Kind::Truncated;
    };
    // SAFETY (all dereferences of `ip`): `ptr_at` checked the header lies within the frame.
    set_ipv4_mapped(&mut packet.dst, unsafe { (*ip).dst_addr });
    set_ipv4_mapped(&mut packet.src, unsafe { (*ip).src_addr });
    packet.ipv4 = true;
    let vihl = unsafe { (*ip).vihl };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    if vihl >> 4 != 4
        || header_len < Ipv4Hdr::LEN
        || total_len < header_len
        || l3_off + total_len > frame.packet_len()
    {
        return Kind::Malformed;
    }
    let frags = u16::from_be_bytes(unsafe { (*ip).frags });
    let proto = unsafe { (*ip).proto };
    packet.proto = proto;
    packet.l3_len = total_len as u32;
    packet.fragment_id = u32::from(u16::from_be_bytes(unsafe { (*ip).id }));
    if frags & 0x1fff != 0 {
        packet.fragment = FRAGMENT_LATER;
        return Kind::Fragment;
    }
    if frags & 0x2000 != 0 {
        packet.fragment = FRAGMENT_FIRST;
    }
    packet.l4_off = l3_off + header_len;
    if proto == PROTO_ICMP {
        return Kind::Icmp;
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Kind::OtherProtocol;
    }
    // A first fragment (more-fragments set) carries only part of the datagram: its L4 lengths
    // cannot be checked against the IP length.
    let l4_len = if packet.fragment == FRAGMENT_FIRST {
        None
    } else {
        Some(total_len - header_len)
    };
    l4(frame, packet, l4_len)
}

/// IPv6 next-header values of extension headers.
#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

#[inline(always)]
fn ipv6(frame: &impl Frame, packet: &mut Packet) -> Kind {
    let l3_off = packet.l3_off;
    let Ok(ip) = frame.ptr_at::<Ipv6Hdr>(l3_off) else {
        return Kind::Truncated;
    };
    // SAFETY (all dereferences of `ip`): `ptr_at` checked the header lies within the frame.
    copy_bytes(&mut packet.dst, unsafe { &(*ip).dst_addr });
    copy_bytes(&mut packet.src, unsafe { &(*ip).src_addr });
    let payload_len = u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize;
    if unsafe { (*ip).vcf[0] } >> 4 != 6 || l3_off + Ipv6Hdr::LEN + payload_len > frame.packet_len()
    {
        return Kind::Malformed;
    }
    packet.l3_len = (Ipv6Hdr::LEN + payload_len) as u32;
    let payload_off = l3_off + Ipv6Hdr::LEN;
    let mut proto = unsafe { (*ip).next_hdr };
    let mut l4_off = payload_off;
    // Hop-by-hop, routing, destination options, authentication and fragment headers, in any
    // order, up to a bound (the verifier needs one; real chains are short).
    for _ in 0..MAX_EXTENSION_HEADERS {
        if !matches!(
            proto,
            IPV6_HOP_BY_HOP
                | IPV6_ROUTING
                | IPV6_FRAGMENT
                | IPV6_AUTHENTICATION
                | IPV6_DESTINATION_OPTIONS
        ) {
            break;
        }
        let Ok(header) = read::<[u8; 8]>(frame, l4_off) else {
            return Kind::Malformed;
        };
        let length = match proto {
            IPV6_FRAGMENT => {
                let offset = u16::from_be_bytes([header[2], header[3]]) >> 3;
                packet.fragment_id =
                    u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                if offset != 0 {
                    packet.fragment = FRAGMENT_LATER;
                } else if header[3] & 1 != 0 {
                    packet.fragment = FRAGMENT_FIRST;
                }
                8
            }
            // Its length counts 4-byte words, less 2.
            IPV6_AUTHENTICATION => (usize::from(header[1]) + 2) * 4,
            // Their lengths count 8-byte words, less 1.
            _ => (usize::from(header[1]) + 1) * 8,
        };
        proto = header[0];
        l4_off += length;
        if packet.fragment == FRAGMENT_LATER {
            break;
        }
    }
    packet.proto = proto;
    if l4_off > payload_off + payload_len {
        return Kind::Malformed;
    }
    if packet.fragment == FRAGMENT_LATER {
        return Kind::Fragment;
    }
    if is_extension_header(proto) {
        return Kind::Unsupported;
    }
    packet.l4_off = l4_off;
    if proto == PROTO_ICMPV6 {
        return Kind::Icmp;
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Kind::OtherProtocol;
    }
    let l4_len = if packet.fragment == FRAGMENT_FIRST {
        None
    } else {
        Some(payload_off + payload_len - l4_off)
    };
    l4(frame, packet, l4_len)
}

/// Reads the ports of the TCP or UDP header, checking its length fields against `l4_len` (the
/// IP payload length) when it is known.
#[inline(always)]
fn l4(frame: &impl Frame, packet: &mut Packet, l4_len: Option<usize>) -> Kind {
    let ports = if packet.proto == PROTO_TCP {
        let Ok(tcp) = read::<[u8; TcpHdr::LEN]>(frame, packet.l4_off) else {
            return Kind::Malformed;
        };
        let header_len = ((tcp[TCP_DATA_OFFSET] >> 4) as usize) * 4;
        if header_len < TcpHdr::LEN || l4_len.is_some_and(|len| header_len > len) {
            return Kind::Malformed;
        }
        packet.tcp_flags = tcp[TCP_FLAGS];
        [tcp[0], tcp[1], tcp[2], tcp[3]]
    } else {
        packet.tcp_flags = 0;
        let Ok(udp) = read::<[u8; UdpHdr::LEN]>(frame, packet.l4_off) else {
            return Kind::Malformed;
        };
        let udp_len = u16::from_be_bytes([udp[UDP_LEN], udp[UDP_LEN + 1]]) as usize;
        if l4_len.is_some_and(|len| udp_len < UdpHdr::LEN || udp_len > len) {
            return Kind::Malformed;
        }
        [udp[0], udp[1], udp[2], udp[3]]
    };
    packet.sport = u16::from_be_bytes([ports[0], ports[1]]);
    packet.dport = u16::from_be_bytes([ports[2], ports[3]]);
    Kind::Parsed
}
