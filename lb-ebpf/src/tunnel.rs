//! The tunnel between nodes (layout in `lb_common::tunnel`), after Katran's `encap.h` and
//! `decap.h`, built in XDP: no kernel tunnel device is involved on either side.
//!
//! - [`encapsulate`]: the receiving node, having picked a backend on another node, wraps the
//!   packet as it came (destination still the VIP) in an outer IP/UDP/GUE header naming that
//!   backend, and sends it to the backend's node like any routed frame.
//! - [`decapsulate`]: the backend's node takes a tunnel packet, from a known node only, off
//!   its outer header; the inner packet then goes through the same path as one from a client,
//!   to the backend it names ([`lb_common::select::Query::assigned`]), and the DNAT and the
//!   reverse NAT happen here, so replies leave this node straight for the client.
use aya_ebpf::{
    helpers::generated::bpf_redirect_neigh,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    BackendKey, PodHandoff, Reason,
    checksum::{add_words, finish},
    hash::flow_hash,
    maps::{PROTO_UDP, TUNNEL_HANDOFF_MAGIC, is_ipv4_mapped},
    tunnel::{
        GUE_LEN, OUTER_TTL, UDP_LEN, inner_mtu, overhead, parse_gue, source_port, udp_gue_header,
    },
};

use crate::{
    context::{adjust_head, metadata, reserve_metadata},
    forward,
    frame::{copy_bytes, read, write},
    maps::{BACKEND_IDS, TUNNEL, TUNNEL_PEERS},
    offsets::{ETH_MACS_LEN, ETHER_TYPE, IPV4_MIN_LEN, IPV6_LEN},
    parse::{self, FRAGMENT_NONE, Packet},
    select::Selected,
};

const ETH_LEN: usize = 14;
const ETHER_TYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHER_TYPE_IPV6: [u8; 2] = [0x86, 0xdd];
/// IPv4: don't fragment (the high byte of the flags and fragment offset).
const IPV4_DF: u8 = 0x40;

/// The backend a tunnel packet was sent for, as its private data names it.
#[derive(Default)]
pub struct Assigned {
    /// The packet came through the tunnel (the other fields hold its backend).
    pub present: bool,
    /// The backend's address (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// The backend's port, host order.
    pub port: u16,
}

/// What [`decapsulate`] made of a frame.
pub enum Decap {
    /// Not a tunnel packet: the frame is untouched.
    NotTunnel,
    /// Decapsulated: the frame now starts with an Ethernet header before the inner packet.
    Decapsulated,
    /// A tunnel packet refused: the frame is dropped under this reason.
    Refused(Reason),
}

/// The id of the backend a tunnel packet for service `service_id` was sent for: `None` when
/// this node has no such backend.
///
/// Not inlined: the key gets a stack frame of its own.
#[inline(never)]
pub fn backend_id(assigned: &Assigned, service_id: u32) -> Option<u32> {
    let key = BackendKey {
        addr: assigned.addr,
        port: assigned.port,
        pad: 0,
        service_id,
    };
    // SAFETY: the value is copied out at once.
    unsafe { BACKEND_IDS.get(&key) }.copied()
}

/// Takes a tunnel packet off its outer header into `assigned` (whose `present` says whether
/// it was one); see [`Decap`]. Only an untagged frame with an option-free IPv4 header or an
/// IPv6 header without extension headers, to this node's underlay address and the tunnel
/// port, is a tunnel packet: the senders build nothing else.
///
/// Not inlined: the outer header gets a stack frame of its own.
#[inline(never)]
pub fn decapsulate(ctx: &XdpContext, assigned: &mut Assigned) -> Decap {
    assigned.present = false;
    let Some(config) = TUNNEL.get(0) else {
        return Decap::NotTunnel;
    };
    // Read again rather than passed from the entry point's VIP-filter check: kept alive
    // across that frame, the address pushes the deepest call chain past the 512-byte stack.
    let Some(dst) = parse::destination(ctx) else {
        return Decap::NotTunnel;
    };
    if config.port == 0 || (dst != config.addr4 && dst != config.addr6) {
        return Decap::NotTunnel;
    }
    let Ok(ether_type) = read::<[u8; 2]>(ctx, ETHER_TYPE) else {
        return Decap::NotTunnel;
    };
    let mut src = [0u8; 16];
    let ip_len = if ether_type == ETHER_TYPE_IPV4 {
        let Ok(ip) = read::<[u8; IPV4_MIN_LEN]>(ctx, ETH_LEN) else {
            return Decap::NotTunnel;
        };
        // Options, another protocol, or a fragment (DF is set on what we send): not ours.
        if ip[0] != 0x45 || ip[9] != PROTO_UDP || ip[6] & 0x3f != 0 || ip[7] != 0 {
            return Decap::NotTunnel;
        }
        src[10] = 0xff;
        src[11] = 0xff;
        src[12] = ip[12];
        src[13] = ip[13];
        src[14] = ip[14];
        src[15] = ip[15];
        IPV4_MIN_LEN
    } else if ether_type == ETHER_TYPE_IPV6 {
        let Ok(head) = read::<[u8; 8]>(ctx, ETH_LEN) else {
            return Decap::NotTunnel;
        };
        if head[6] != PROTO_UDP {
            return Decap::NotTunnel;
        }
        let Ok(addr) = read::<[u8; 16]>(ctx, ETH_LEN + 8) else {
            return Decap::NotTunnel;
        };
        copy_bytes(&mut src, &addr);
        IPV6_LEN
    } else {
        return Decap::NotTunnel;
    };
    let Ok(udp) = read::<[u8; UDP_LEN]>(ctx, ETH_LEN + ip_len) else {
        return Decap::NotTunnel;
    };
    if u16::from_be_bytes([udp[2], udp[3]]) != config.port {
        return Decap::NotTunnel;
    }
    // To this node's tunnel port (the caller checked the address): ours to take or refuse.
    if TUNNEL_PEERS.get_ptr(&src).is_none() {
        return Decap::Refused(Reason::DropTunnelPeer);
    }
    let Ok(gue) = read::<[u8; GUE_LEN]>(ctx, ETH_LEN + ip_len + UDP_LEN) else {
        return Decap::Refused(Reason::DropTunnelInvalid);
    };
    let Some((inner_ipv4, addr, port)) = parse_gue(&gue) else {
        return Decap::Refused(Reason::DropTunnelInvalid);
    };
    let Ok(macs) = read::<[u8; ETH_MACS_LEN]>(ctx, 0) else {
        return Decap::Refused(Reason::DropTunnelInvalid);
    };
    // The new Ethernet header goes right before the inner packet; the outer one is cut off.
    let strip = ip_len + UDP_LEN + GUE_LEN;
    let inner_type = if inner_ipv4 {
        ETHER_TYPE_IPV4
    } else {
        ETHER_TYPE_IPV6
    };
    if write(ctx, strip, &macs).is_err()
        || write(ctx, strip + ETHER_TYPE, &inner_type).is_err()
        || !adjust_head(ctx, strip as i32)
    {
        return Decap::Refused(Reason::DropTunnelInvalid);
    }
    assigned.present = true;
    copy_bytes(&mut assigned.addr, &addr);
    assigned.port = port;
    Decap::Decapsulated
}

/// What [`encapsulate`] made of a packet.
pub enum Encap {
    /// This node has no tunnel address of the family the backend's node needs: the packet is
    /// untouched (the caller DNATs it as a routed backend).
    Unavailable,
    /// Too large once encapsulated: the client is to be told to send at most this many
    /// bytes. The packet is untouched.
    TooBig(u32),
    /// Encapsulated: `packet` now describes the outer packet, ready to be forwarded.
    Ready,
    /// Half-built (a write failed): it must not leave.
    Broken,
}

/// Wraps `packet` (parsed, untouched) for the node its backend `selected` lives on, inside
/// the tunnel; see [`Encap`]. The caller forwards it ([`sent`] names how it went).
///
/// Not inlined: the outer header gets a stack frame of its own (the caller's forwarding
/// step gets another, not stacked on this one).
#[inline(never)]
pub fn encapsulate(ctx: &XdpContext, packet: &mut Packet, selected: &Selected) -> Encap {
    let Some(config) = TUNNEL.get(0) else {
        return Encap::Unavailable;
    };
    let node = &selected.backend.node;
    let outer_ipv4 = is_ipv4_mapped(node);
    let own = if outer_ipv4 {
        &config.addr4
    } else {
        &config.addr6
    };
    if *own == [0u8; 16] || config.port == 0 {
        return Encap::Unavailable;
    }
    let overhead = overhead(node);
    if packet.l3_len as usize + overhead > config.mtu as usize {
        return Encap::TooBig(inner_mtu(config.mtu, node));
    }
    let hash = flow_hash(
        &packet.src,
        &packet.dst,
        packet.sport,
        packet.dport,
        packet.proto,
    );
    let inner_len = packet.l3_len as usize;
    let Ok(macs) = read::<[u8; ETH_MACS_LEN]>(ctx, 0) else {
        return Encap::Unavailable;
    };
    // VLAN tags go with the old Ethernet header: the outer frame is routed like any other.
    let grow = (ETH_LEN + overhead) as i32 - packet.l3_off as i32;
    if !adjust_head(ctx, -grow) {
        return Encap::Unavailable;
    }
    let ip_len = overhead - UDP_LEN - GUE_LEN;
    let udp_gue = udp_gue_header(
        inner_len,
        packet.ipv4,
        source_port(hash),
        config.port,
        &selected.backend.addr,
        selected.backend.port,
    );
    let written = if outer_ipv4 {
        write(ctx, ETH_LEN, &ipv4_header(own, node, overhead + inner_len))
            .and_then(|()| write(ctx, ETHER_TYPE, &ETHER_TYPE_IPV4))
    } else {
        write(
            ctx,
            ETH_LEN,
            &ipv6_header(own, node, inner_len + UDP_LEN + GUE_LEN, hash),
        )
        .and_then(|()| write(ctx, ETHER_TYPE, &ETHER_TYPE_IPV6))
    };
    if written.is_err()
        || write(ctx, 0, &macs).is_err()
        || write(ctx, ETH_LEN + ip_len, &udp_gue).is_err()
    {
        return Encap::Broken;
    }
    // From here `packet` describes the outer packet, which is what is routed.
    packet.l3_off = ETH_LEN;
    packet.l4_off = ETH_LEN + ip_len;
    packet.ipv4 = outer_ipv4;
    packet.vlan = false;
    packet.fragment = FRAGMENT_NONE;
    copy_bytes(&mut packet.src, own);
    copy_bytes(&mut packet.dst, node);
    packet.sport = source_port(hash);
    packet.dport = config.port;
    packet.proto = PROTO_UDP;
    packet.tcp_flags = 0;
    packet.l3_len += overhead as u32;
    Encap::Ready
}

/// The reason of an encapsulated packet the forwarding step sent as `forwarded`; one it left
/// to the kernel is handed to the TC ingress program instead ([`send_unresolved`]): the
/// kernel would drop it (its source is this node's own address), but the neighbour
/// subsystem can send it, resolving the next hop the fast path had no MAC for.
#[inline(always)]
pub fn sent(ctx: &XdpContext, packet: &Packet, forwarded: Reason) -> Reason {
    match forwarded {
        Reason::DnatTx => Reason::TunnelTx,
        Reason::DnatRedirect => Reason::TunnelRedirect,
        _ => {
            if let Some(egress) = forward::egress_of(ctx, packet)
                && let Some(meta) = reserve_metadata::<PodHandoff>(ctx)
            {
                // SAFETY: `reserve_metadata` checked the bounds.
                unsafe {
                    meta.write_unaligned(PodHandoff {
                        magic: TUNNEL_HANDOFF_MAGIC,
                        ifindex: egress,
                        dmac: [0; 6],
                        smac: [0; 6],
                    });
                }
            }
            Reason::TunnelFallback
        }
    }
}

/// Sends an encapsulated frame the XDP program handed over ([`sent`]) out of its egress with
/// `bpf_redirect_neigh`: `Some(TC_ACT_REDIRECT)`, or `None` for any other frame.
#[inline(always)]
pub fn send_unresolved(ctx: &TcContext) -> Option<i32> {
    let handoff = metadata::<PodHandoff>(ctx)?;
    if handoff.magic != TUNNEL_HANDOFF_MAGIC {
        return None;
    }
    // SAFETY: the helper only records where the buffer goes; without parameters it looks the
    // route up itself.
    Some(unsafe { bpf_redirect_neigh(handoff.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// The outer IPv4 header from `src` to `dst` for a packet of `total` bytes: DF set, checksum
/// included.
#[inline(always)]
fn ipv4_header(src: &[u8; 16], dst: &[u8; 16], total: usize) -> [u8; IPV4_MIN_LEN] {
    let len = (total as u16).to_be_bytes();
    let mut header = [
        0x45, 0, len[0], len[1], 0, 0, IPV4_DF, 0, OUTER_TTL, PROTO_UDP, 0, 0, src[12], src[13],
        src[14], src[15], dst[12], dst[13], dst[14], dst[15],
    ];
    let check = finish(add_words(0, &header)).to_be_bytes();
    header[10] = check[0];
    header[11] = check[1];
    header
}

/// The outer IPv6 header from `src` to `dst` with `payload` bytes after it; the flow label
/// from the flow's `hash`, so the underlay's ECMP keeps a flow on one path.
#[inline(always)]
fn ipv6_header(src: &[u8; 16], dst: &[u8; 16], payload: usize, hash: u32) -> [u8; IPV6_LEN] {
    let len = (payload as u16).to_be_bytes();
    let label = (hash & 0x000f_ffff).to_be_bytes();
    let (s, d) = (src, dst);
    [
        0x60, label[1], label[2], label[3], len[0], len[1], PROTO_UDP, OUTER_TTL, s[0], s[1], s[2],
        s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15], d[0],
        d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14],
        d[15],
    ]
}
