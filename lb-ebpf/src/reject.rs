//! What a packet to a service with no usable backend gets, decided here alone (kube-proxy's
//! REJECT rules):
//!
//! - to a frontend with `SERVICE_F_DROP_EMPTY` (`externalTrafficPolicy: Local` without a local
//!   endpoint, which kube-proxy drops): dropped, [`Reason::DropNoLocalBackend`];
//! - a TCP SYN (no ACK, no RST): answered with an RST+ACK from VIP:port, [`Reason::RejectTcp`];
//! - a UDP datagram: answered with an ICMP / ICMPv6 port unreachable from the VIP quoting its IP
//!   header(s) as received and the first 8 bytes of its payload (the UDP header),
//!   [`Reason::RejectUdp`];
//! - anything else (a TCP segment without SYN, a SYN+ACK, a fragment), or an answer that cannot
//!   be built: dropped, [`Reason::DropNoBackend`].
//!
//! The tunnel's "fragmentation needed" / "packet too big" ([`too_big`]) is built here too, the
//! same way: an ICMP error from the VIP quoting the packet.
//!
//! Answers are built in place (`bpf_xdp_adjust_head` / `bpf_xdp_adjust_tail`) and sent back
//! out of the interface they came in on (XDP_TX) with the MAC addresses swapped and the VLAN
//! tags kept. There is no rate limit: an answer is never larger than its question plus 48
//! bytes (the ICMPv6 headers in front of the quote; an RST is at most as long as the SYN), so
//! a client can never make the balancer send more than it sends itself.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    Reason, ServiceValue,
    checksum::{add_words, finish},
    conntrack::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, SERVICE_F_DROP_EMPTY},
};

use crate::{
    context::{Frame, adjust_head, adjust_tail},
    frame::{read, write},
    offsets::{
        ETH_MACS_LEN, ICMP_QUOTE, IPV4_MIN_LEN, IPV6_LEN, TCP_DATA_OFFSET, TCP_MIN_LEN, TCP_SEQ,
        UDP_HEADER_LEN,
    },
    parse::{FRAGMENT_NONE, Packet},
};

/// TTL / hop limit of the answers.
const TTL: u8 = 64;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_PORT_UNREACHABLE: u8 = 3;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PORT_UNREACHABLE: u8 = 4;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// IPv4: don't fragment (the high byte of the flags and fragment offset).
const IPV4_DF: u8 = 0x40;
/// The longest quote in 4-byte words: an IPv6 header with extension headers up to where the
/// parser stops reading, and 8 bytes of UDP.
const MAX_QUOTE_WORDS: usize = 64;

/// The verdict for `packet`, to `service`, which has no usable backend for it; answers it in
/// place when the verdict is a reject.
#[inline(always)]
pub fn no_backend(ctx: &XdpContext, packet: &Packet, service: &ServiceValue) -> Reason {
    if service.flags & SERVICE_F_DROP_EMPTY != 0 {
        return Reason::DropNoLocalBackend;
    }
    // A fragment's answer would be about a part of a datagram (and a later one has no ports).
    if packet.fragment != FRAGMENT_NONE {
        return Reason::DropNoBackend;
    }
    if packet.proto == PROTO_TCP {
        let opens = packet.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
        return if opens && tcp_reset(ctx, packet) {
            Reason::RejectTcp
        } else {
            Reason::DropNoBackend
        };
    }
    if port_unreachable(ctx, packet) {
        Reason::RejectUdp
    } else {
        Reason::DropNoBackend
    }
}

/// Turns a TCP SYN into the RST+ACK that refuses it: seq 0, ack the SYN's sequence number
/// plus one (plus its payload and FIN, if any), window 0, no options; IP header fresh (IPv4:
/// no options, DF set as Linux's own resets have it; IPv6: no extension headers), everything
/// past the TCP header cut. False when it could not (the frame is dropped then).
///
/// Not inlined: its headers get a stack frame of their own.
#[inline(never)]
fn tcp_reset(ctx: &XdpContext, packet: &Packet) -> bool {
    build_reset(ctx, packet).is_some()
}

#[inline(always)]
fn build_reset(ctx: &XdpContext, packet: &Packet) -> Option<()> {
    let syn: [u8; TCP_MIN_LEN] = read(ctx, packet.l4_off).ok()?;
    let seq = u32::from_be_bytes([
        syn[TCP_SEQ],
        syn[TCP_SEQ + 1],
        syn[TCP_SEQ + 2],
        syn[TCP_SEQ + 3],
    ]);
    let tcp_header_len = u32::from(syn[TCP_DATA_OFFSET] >> 4) * 4;
    let ip_headers_len = (packet.l4_off - packet.l3_off) as u32;
    let payload = packet
        .l3_len
        .saturating_sub(ip_headers_len + tcp_header_len);
    let fin = u32::from(packet.tcp_flags & TCP_FIN != 0);
    let ack = seq.wrapping_add(1).wrapping_add(payload).wrapping_add(fin);
    let l3 = packet.l3_off;
    let tcp_at = if packet.ipv4 {
        write(ctx, l3, &ipv4_header(packet, PROTO_TCP, TCP_MIN_LEN, true)).ok()?;
        l3 + IPV4_MIN_LEN
    } else {
        write(ctx, l3, &ipv6_header(packet, PROTO_TCP, TCP_MIN_LEN)).ok()?;
        l3 + IPV6_LEN
    };
    let (sport, dport, ack) = (
        packet.dport.to_be_bytes(),
        packet.sport.to_be_bytes(),
        ack.to_be_bytes(),
    );
    let mut rst: [u8; TCP_MIN_LEN] = [
        sport[0],
        sport[1],
        dport[0],
        dport[1],
        0,
        0,
        0,
        0,
        ack[0],
        ack[1],
        ack[2],
        ack[3],
        // 5 words of header, no options.
        0x50,
        TCP_RST | TCP_ACK,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let check = finish(add_words(
        pseudo_header_sum(packet, PROTO_TCP, TCP_MIN_LEN),
        &rst,
    ))
    .to_be_bytes();
    rst[16] = check[0];
    rst[17] = check[1];
    write(ctx, tcp_at, &rst).ok()?;
    swap_macs(ctx)?;
    cut_to(ctx, tcp_at + TCP_MIN_LEN)
}

/// Turns a UDP datagram into the ICMP (type 3 code 3) or ICMPv6 (type 1 code 4) port
/// unreachable that refuses it: room made in front for a fresh IP header (IPv4: DF clear, as
/// Linux's own errors have it) and the ICMP header, the Ethernet header (and its VLAN tags)
/// moved there, the datagram cut after its UDP header. False when it could not (the frame is
/// dropped then).
///
/// Not inlined: its headers get a stack frame of their own.
#[inline(never)]
fn port_unreachable(ctx: &XdpContext, packet: &Packet) -> bool {
    let (kind, code) = if packet.ipv4 {
        (ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE)
    } else {
        (ICMPV6_DEST_UNREACHABLE, ICMPV6_PORT_UNREACHABLE)
    };
    build_error(ctx, packet, kind, code, [0; 4]).is_some()
}

/// Turns a TCP or UDP packet into the ICMP "fragmentation needed" (type 3 code 4) or ICMPv6
/// "packet too big" (type 2) that tells its sender to send at most `mtu` bytes, built as
/// [`port_unreachable`] builds its answer (quoting the IP header(s) and the first 8 bytes of
/// the transport header: enough for the sender to find its socket). False when it could not
/// (the frame is dropped then).
///
/// Not inlined: its headers get a stack frame of their own.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, packet: &Packet, mtu: u32) -> bool {
    if packet.fragment != FRAGMENT_NONE {
        return false;
    }
    let (kind, code, rest) = if packet.ipv4 {
        let mtu = (mtu.min(u32::from(u16::MAX)) as u16).to_be_bytes();
        (
            ICMP_DEST_UNREACHABLE,
            ICMP_FRAG_NEEDED,
            [0, 0, mtu[0], mtu[1]],
        )
    } else {
        (ICMPV6_PACKET_TOO_BIG, 0, mtu.to_be_bytes())
    };
    build_error(ctx, packet, kind, code, rest).is_some()
}

/// Builds, in place of `packet`, an ICMP / ICMPv6 error of `kind` and `code` from the VIP to
/// the client, with `rest` as the 4 bytes after the checksum.
#[inline(always)]
fn build_error(ctx: &XdpContext, packet: &Packet, kind: u8, code: u8, rest: [u8; 4]) -> Option<()> {
    let l3 = packet.l3_off;
    // The IP header as received (options or extension headers included) and 8 bytes.
    let quote_len = packet.l4_off - l3 + UDP_HEADER_LEN;
    if !quote_len.is_multiple_of(4) || quote_len > MAX_QUOTE_WORDS * 4 {
        return None;
    }
    // The quote's share of the ICMP checksum, summed where it lies before the frame moves.
    let mut sum = 0;
    for word in 0..MAX_QUOTE_WORDS {
        let at = word * 4;
        if at >= quote_len {
            break;
        }
        let bytes: [u8; 4] = read(ctx, l3 + at).ok()?;
        sum = add_words(sum, &bytes);
    }
    let icmp_len = ICMP_QUOTE + quote_len;
    let ip_len = if packet.ipv4 {
        IPV4_MIN_LEN
    } else {
        sum += pseudo_header_sum(packet, PROTO_ICMPV6, icmp_len);
        IPV6_LEN
    };
    let check = finish(add_words(add_words(sum, &[kind, code]), &rest)).to_be_bytes();
    // The Ethernet header, read before the frame moves: the MACs, then the VLAN tags and the
    // EtherType (10 bytes cover two tags; what lies past the EtherType is overwritten below).
    let macs: [u8; ETH_MACS_LEN] = read(ctx, 0).ok()?;
    let tags: [u8; 10] = read(ctx, ETH_MACS_LEN).ok()?;
    cut_to(ctx, l3 + quote_len)?;
    if !adjust_head(ctx, -((ip_len + ICMP_QUOTE) as i32)) {
        return None;
    }
    write(ctx, 0, &swapped(&macs)).ok()?;
    write(ctx, ETH_MACS_LEN, &tags).ok()?;
    if packet.ipv4 {
        write(ctx, l3, &ipv4_header(packet, PROTO_ICMP, icmp_len, false)).ok()?;
    } else {
        write(ctx, l3, &ipv6_header(packet, PROTO_ICMPV6, icmp_len)).ok()?;
    }
    write(
        ctx,
        l3 + ip_len,
        &[
            kind, code, check[0], check[1], rest[0], rest[1], rest[2], rest[3],
        ],
    )
    .ok()
}

/// A fresh IPv4 header from the packet's destination (the VIP) to its source (the client),
/// checksum included.
#[inline(always)]
fn ipv4_header(packet: &Packet, proto: u8, payload_len: usize, df: bool) -> [u8; IPV4_MIN_LEN] {
    let (vip, client) = (&packet.dst, &packet.src);
    let total = ((IPV4_MIN_LEN + payload_len) as u16).to_be_bytes();
    let mut header = [
        0x45,
        0,
        total[0],
        total[1],
        0,
        0,
        if df { IPV4_DF } else { 0 },
        0,
        TTL,
        proto,
        0,
        0,
        vip[12],
        vip[13],
        vip[14],
        vip[15],
        client[12],
        client[13],
        client[14],
        client[15],
    ];
    let check = finish(add_words(0, &header)).to_be_bytes();
    header[10] = check[0];
    header[11] = check[1];
    header
}

/// A fresh IPv6 header from the packet's destination (the VIP) to its source (the client).
#[inline(always)]
fn ipv6_header(packet: &Packet, next_header: u8, payload_len: usize) -> [u8; IPV6_LEN] {
    let (v, c) = (&packet.dst, &packet.src);
    let len = (payload_len as u16).to_be_bytes();
    [
        0x60,
        0,
        0,
        0,
        len[0],
        len[1],
        next_header,
        TTL,
        v[0],
        v[1],
        v[2],
        v[3],
        v[4],
        v[5],
        v[6],
        v[7],
        v[8],
        v[9],
        v[10],
        v[11],
        v[12],
        v[13],
        v[14],
        v[15],
        c[0],
        c[1],
        c[2],
        c[3],
        c[4],
        c[5],
        c[6],
        c[7],
        c[8],
        c[9],
        c[10],
        c[11],
        c[12],
        c[13],
        c[14],
        c[15],
    ]
}

/// The unfolded sum of the pseudo-header of an answer from the VIP to the client: both
/// addresses, the protocol and the upper-layer length (TCP's and ICMPv6's checksums cover it).
#[inline(always)]
fn pseudo_header_sum(packet: &Packet, proto: u8, len: usize) -> u32 {
    let len = len as u32;
    let fixed = u32::from(proto) + (len >> 16) + (len & 0xffff);
    if packet.ipv4 {
        add_words(add_words(fixed, &packet.dst[12..]), &packet.src[12..])
    } else {
        add_words(add_words(fixed, &packet.dst), &packet.src)
    }
}

/// The destination and source MAC addresses of `macs` swapped.
#[inline(always)]
fn swapped(m: &[u8; ETH_MACS_LEN]) -> [u8; ETH_MACS_LEN] {
    [
        m[6], m[7], m[8], m[9], m[10], m[11], m[0], m[1], m[2], m[3], m[4], m[5],
    ]
}

/// Swaps the frame's MAC addresses where they are.
#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Option<()> {
    let macs: [u8; ETH_MACS_LEN] = read(ctx, 0).ok()?;
    write(ctx, 0, &swapped(&macs)).ok()
}

/// Cuts the frame to `len` bytes (Ethernet padding and everything past the answer).
#[inline(always)]
fn cut_to(ctx: &XdpContext, len: usize) -> Option<()> {
    let delta = len as i64 - ctx.len() as i64;
    if delta < 0 && !adjust_tail(ctx, delta as i32) {
        return None;
    }
    Some(())
}
