//! The load balancer's kernel programs. Entry points only dispatch and count; the work lives in
//! the modules, split by concern like Katran's `lib/bpf/`:
//! `parse` (headers), `ranges` (`loadBalancerSourceRanges`), `select` (conntrack, affinity,
//! Maglev), `reject` (no usable backend: RST, ICMP port unreachable or drop), `nat` (rewrites and
//! checksums), `forward` (route lookup, TX/redirect), `pods` (local pods past the host's stack),
//! `tunnel` (GUE to and from the other nodes), `stats` (counters), `maps`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Map keys and values are passed by reference on purpose: passing them by value copies them
// onto the 512-byte stack once more.
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod context;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod fragments;
#[cfg(target_arch = "bpf")]
mod frame;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod offsets;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod pods;
#[cfg(target_arch = "bpf")]
mod ranges;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod tunnel;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use lb_common::{Event, Reason, ServiceKey, maps::VIP_ADDR_F_HOST};

    use crate::{
        conntrack,
        context::Frame as _,
        forward, fragments, icmp,
        maps::{SCRATCH, SERVICES, Scratch, VIP_ADDRS, VIP_FILTER},
        nat,
        parse::{self, Kind},
        pods::{self, Delivery},
        ranges, reject, select, stats,
        tunnel::{self, Decap, Encap},
    };

    /// Bytes of headers the TC program wants in the linear part of a socket buffer: Ethernet,
    /// two VLAN tags, IPv6 and a TCP header with options.
    const TC_HEADERS_LEN: u32 = 14 + 8 + 40 + 60;

    /// Ingress of the client-facing interface: DNAT of VIP traffic.
    #[xdp]
    pub fn lb_xdp(ctx: XdpContext) -> u32 {
        let reason = xdp_ingress(&ctx);
        stats::count(reason, ctx.len());
        xdp_verdict(reason)
    }

    /// Egress of the client-facing interface: reverse NAT of replies.
    #[classifier]
    pub fn lb_tc_egress(ctx: TcContext) -> i32 {
        let reason = tc_egress(&ctx);
        stats::count(reason, ctx.len() as usize);
        tc_verdict(reason)
    }

    /// Ingress of the client-facing interface, after XDP: moves the frames the XDP program
    /// handed over into their local pods' namespaces, and sends the encapsulated frames for
    /// other nodes whose next hop it could not address. Every other frame was counted by the XDP
    /// program and goes on uncounted (a second count of each would cost every packet of the
    /// host); a hand-off that fails is counted as an event.
    #[classifier]
    pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
        match pods::deliver(&ctx) {
            Delivery::NotHandedOver => tunnel::send_unresolved(&ctx).unwrap_or(TC_ACT_UNSPEC),
            Delivery::Moved(verdict) => verdict,
            Delivery::Failed => {
                stats::event(Event::PodHandoffFailed);
                TC_ACT_UNSPEC
            }
        }
    }

    /// Ingress of a local pod's host-side interface: reverse NAT of its replies, sent straight
    /// to the client-facing interface.
    #[classifier]
    pub fn lb_tc_pod(ctx: TcContext) -> i32 {
        let reason = pod_ingress(&ctx);
        stats::count(reason, ctx.len() as usize);
        tc_verdict(reason)
    }

    /// Every reason implies its verdict, so no path can count one thing and do another.
    #[inline(always)]
    fn xdp_verdict(reason: Reason) -> u32 {
        match reason {
            Reason::DropMalformed
            | Reason::DropFragment
            | Reason::DropUnsupported
            | Reason::DropNoBackend
            | Reason::DropIcmpUnknownFlow
            | Reason::DropSourceRange
            | Reason::DropNoLocalBackend
            | Reason::DropTunnelPeer
            | Reason::DropTunnelInvalid => xdp_action::XDP_DROP,
            Reason::DnatTx
            | Reason::IcmpEchoReply
            | Reason::RejectTcp
            | Reason::RejectUdp
            | Reason::TunnelTx
            | Reason::TunnelTooBig => xdp_action::XDP_TX,
            Reason::DnatRedirect | Reason::TunnelRedirect => xdp_action::XDP_REDIRECT,
            _ => xdp_action::XDP_PASS,
        }
    }

    /// Everything but a failed rewrite goes on to the next program of the tcx chain
    /// (`TC_ACT_UNSPEC`): `TC_ACT_OK` would end the chain, so programs attached after ours
    /// (another CNI's, a firewall's) would never see the packet.
    #[inline(always)]
    fn tc_verdict(reason: Reason) -> i32 {
        match reason {
            Reason::ReverseNatFailed => TC_ACT_SHOT,
            Reason::ReverseNatPod => TC_ACT_REDIRECT,
            _ => TC_ACT_UNSPEC,
        }
    }

    /// The floor of every comparison, and the program veth peers need to take redirected frames.
    #[xdp]
    pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// This CPU's scratch slot. The parser resets what it reads.
    #[inline(always)]
    fn scratch() -> Option<&'static mut Scratch> {
        let scratch = SCRATCH.get_ptr_mut(0)?;
        // SAFETY: a per-CPU slot: nothing else runs on this CPU until the program returns.
        Some(unsafe { &mut *scratch })
    }

    #[inline(always)]
    fn xdp_ingress(ctx: &XdpContext) -> Reason {
        // Nearly all of a node's traffic is to addresses no service uses: it leaves here,
        // before the parser. (This node's tunnel addresses are in the filter too.)
        if parse::destination(ctx).is_some_and(|dst| !maybe_vip(&dst)) {
            return Reason::PassNotVip;
        }
        // Index 0 of a one-slot array always exists; the branch only satisfies the verifier.
        let Some(Scratch {
            packet,
            selected,
            assigned,
            ..
        }) = scratch()
        else {
            return Reason::PassUnparsed;
        };
        match tunnel::decapsulate(ctx, assigned) {
            Decap::NotTunnel => {}
            Decap::Decapsulated => stats::event(Event::TunnelDecapsulated),
            Decap::Refused(reason) => return reason,
        }
        let kind = parse::packet(ctx, packet);
        if kind != Kind::Parsed && !(kind == Kind::Fragment && fragments::recall(packet)) {
            if assigned.present {
                // A tunnel packet is for a service here, never for the host.
                return Reason::DropTunnelInvalid;
            }
            return ingress_unparsed(ctx, kind, packet);
        }
        // Tagged frames skipped the check above.
        if packet.vlan && !maybe_vip(&packet.dst) {
            return Reason::PassNotVip;
        }
        let key = ServiceKey {
            addr: packet.dst,
            port: packet.dport,
            proto: packet.proto,
            pad: 0,
        };
        // SAFETY: the value is copied out at once.
        let Some(service) = (unsafe { SERVICES.get(&key) }).copied() else {
            return if assigned.present {
                Reason::DropTunnelInvalid
            } else {
                Reason::PassNotVip
            };
        };
        // Every packet, so that removing a range cuts established flows too.
        if !ranges::admitted(&service, &packet.src) {
            return Reason::DropSourceRange;
        }
        // Read once, for the connection table and the next-hop cache alike; not for packets
        // that are not ours.
        packet.now_ns = conntrack::now_ns();
        // A packet out of the tunnel goes to the backend the receiving node picked for it (or
        // its tracked flow's), which lives here: it never goes back into the tunnel.
        let assigned_id = if assigned.present {
            match tunnel::backend_id(assigned, service.id) {
                Some(id) => id,
                None => return Reason::DropTunnelInvalid,
            }
        } else {
            select::NOT_ASSIGNED
        };
        if !select::backend(packet, &service, selected, assigned_id) {
            return if assigned.present {
                Reason::DropTunnelInvalid
            } else {
                reject::no_backend(ctx, packet, &service)
            };
        }
        fragments::remember(packet);
        if selected.backend.node != [0u8; 16] {
            if assigned.present {
                return Reason::DropTunnelInvalid;
            }
            match tunnel::encapsulate(ctx, packet, selected) {
                Encap::Unavailable => {}
                Encap::TooBig(mtu) => {
                    return if reject::too_big(ctx, packet, mtu) {
                        Reason::TunnelTooBig
                    } else {
                        Reason::DropMalformed
                    };
                }
                Encap::Broken => return Reason::DropMalformed,
                Encap::Ready => {
                    stats::flow(service.id, selected.id, ctx.len(), selected.new_flow);
                    let forwarded = forward::forward(ctx, packet, selected.id);
                    return tunnel::sent(ctx, packet, forwarded);
                }
            }
        }
        if nat::dnat(ctx, packet, &selected.backend).is_err() {
            return Reason::DropMalformed;
        }
        stats::flow(service.id, selected.id, ctx.len(), selected.new_flow);
        packet.dst = selected.backend.addr;
        packet.dport = selected.backend.port;
        forward::forward(ctx, packet, selected.id)
    }

    /// Whether `addr` may be a service address: false for nearly every other address after one
    /// array read, sparing the service-table hash lookup (the most expensive step of a packet
    /// that is not ours).
    #[inline(always)]
    fn maybe_vip(addr: &[u8; 16]) -> bool {
        let bit = lb_common::maps::vip_filter_bit(addr);
        VIP_FILTER
            .get(bit / 64)
            .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }

    /// Whether `addr` is a service address the load balancer owns: its unparseable packets are
    /// dropped, not passed. An address of the host itself (a node IP serving nodePorts, a VIP
    /// allowed with `--allow-host-addresses`) is not: only packets to one of its services are
    /// ours, everything else the host's own.
    #[inline(always)]
    fn owned_vip(addr: &[u8; 16]) -> bool {
        vip_flags(addr).is_some_and(|flags| flags & VIP_ADDR_F_HOST == 0)
    }

    /// `VIP_ADDRS`' value for `addr`: `None` when no service uses the address.
    #[inline(always)]
    fn vip_flags(addr: &[u8; 16]) -> Option<u32> {
        // SAFETY: the value is copied out at once.
        unsafe { VIP_ADDRS.get(addr) }.copied()
    }

    #[inline(always)]
    fn ingress_unparsed(ctx: &XdpContext, kind: Kind, packet: &mut parse::Packet) -> Reason {
        match kind {
            Kind::NotIp => Reason::PassNotIp,
            Kind::Truncated => Reason::PassUnparsed,
            Kind::Icmp => match vip_flags(&packet.dst) {
                Some(flags) => {
                    packet.now_ns = conntrack::now_ns();
                    icmp::ingress(ctx, packet, flags & VIP_ADDR_F_HOST != 0)
                }
                None => Reason::PassNotVip,
            },
            Kind::Parsed | Kind::OtherProtocol => Reason::PassNotVip,
            Kind::Fragment if owned_vip(&packet.dst) => Reason::DropFragment,
            Kind::Fragment => Reason::PassNotVip,
            Kind::Malformed if owned_vip(&packet.dst) => Reason::DropMalformed,
            Kind::Malformed => Reason::PassUnparsed,
            Kind::Unsupported if owned_vip(&packet.dst) => Reason::DropUnsupported,
            Kind::Unsupported => Reason::PassNotVip,
        }
    }

    /// Makes the headers of a socket buffer directly readable, as far as it can.
    #[inline(always)]
    fn pull_headers(ctx: &TcContext) {
        if (ctx.len() as usize) > ctx.data_end() - ctx.data() {
            // Best effort: a failure leaves the headers where they were and parsing says so.
            let _ = ctx.pull_data(ctx.len().min(TC_HEADERS_LEN));
        }
    }

    #[inline(always)]
    fn pod_ingress(ctx: &TcContext) -> Reason {
        pull_headers(ctx);
        let Some(Scratch {
            packet, reverse, ..
        }) = scratch()
        else {
            return Reason::PodPass;
        };
        match parse::packet(ctx, packet) {
            Kind::Parsed => pods::reply(ctx, packet, reverse),
            // ICMP errors, fragments, the rest: the client-facing egress handles them.
            _ => Reason::PodPass,
        }
    }

    #[inline(always)]
    fn tc_egress(ctx: &TcContext) -> Reason {
        pull_headers(ctx);
        // Already from a service address: a reply the pod program rewrote and sent straight
        // out (or any packet no backend sent). It leaves before the parser and the
        // reverse-table lookup (a likely cache miss).
        if parse::source(ctx).is_some_and(|src| maybe_vip(&src) && owned_vip(&src)) {
            return Reason::EgressPass;
        }
        let Some(Scratch {
            packet, reverse, ..
        }) = scratch()
        else {
            return Reason::EgressUnparsed;
        };
        match parse::packet(ctx, packet) {
            Kind::Parsed => {}
            Kind::Fragment if fragments::recall(packet) => {}
            Kind::Icmp if icmp::egress(ctx, packet) => return Reason::ReverseNatIcmp,
            Kind::Truncated | Kind::Malformed => return Reason::EgressUnparsed,
            _ => return Reason::EgressPass,
        }
        if !conntrack::reply(packet, reverse) {
            return Reason::EgressPass;
        }
        fragments::remember(packet);
        match nat::reverse_nat(ctx, packet, reverse) {
            Ok(()) => {
                stats::flow(
                    reverse.service_id,
                    reverse.backend_id,
                    ctx.len() as usize,
                    false,
                );
                Reason::ReverseNat
            }
            // A half-rewritten reply must not leave: the client would see a backend address.
            Err(_) => Reason::ReverseNatFailed,
        }
    }
}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that can reach this loop, so a panic path is a build bug
    // caught at load time, never a runtime hang.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// Host builds (clippy, the build dependency of `lb-userspace`) compile nothing but this.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
