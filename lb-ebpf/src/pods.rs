//! Local pods without the host's IP stack, after Cilium's BPF host routing (`bpf_redirect_peer`
//! into a pod, a redirect to the route's interface out of it): the node model, where pods sit
//! behind the node on veth pairs whose pod ends run ordinary applications.
//!
//! - Towards a pod: the XDP program DNATs, finds the pod's host-side interface in `POD_PORTS`
//!   and passes the frame with a [`PodHandoff`] in its metadata; [`deliver`], at the TC
//!   ingress of the same interface, writes the MACs and hop limit and moves the socket buffer
//!   into the pod's namespace with `bpf_redirect_peer`. (XDP cannot: a veth takes redirected
//!   frames only when its peer runs an XDP program.)
//! - From a pod: [`reply`], at the TC ingress of the pod's host-side interface, reverse-NATs a
//!   reply of a tracked flow and sends it straight out of the route's interface with
//!   `bpf_redirect`.
//!
//! Whatever cannot take this path goes to the host's stack as before, unchanged: the reverse
//! NAT of a reply then happens on the client-facing egress.
use aya_ebpf::{
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use lb_common::{PodHandoff, Reason, ReverseValue, maps::POD_HANDOFF_MAGIC};
use network_types::eth::{EthHdr, EtherType};

use crate::{
    conntrack,
    context::{Frame, ingress_ifindex, metadata},
    forward::{decrement_hop_limit, hop_limit_expiring, reply_route},
    frame::copy_bytes,
    nat,
    parse::{FRAGMENT_NONE, Packet},
    stats,
};

/// What [`deliver`] did with a socket buffer.
pub enum Delivery {
    /// Not handed over by the XDP program: none of ours.
    NotHandedOver,
    /// Moved into the pod's namespace; the program returns this verdict.
    Moved(i32),
    /// Handed over but not movable: left to the kernel, which routes it.
    Failed,
}

/// Moves a frame the XDP program handed over into its pod's namespace.
#[inline(always)]
pub fn deliver(ctx: &TcContext) -> Delivery {
    let Some(handoff) = metadata::<PodHandoff>(ctx) else {
        return Delivery::NotHandedOver;
    };
    if handoff.magic != POD_HANDOFF_MAGIC {
        return Delivery::NotHandedOver;
    }
    // The XDP program hands over untagged frames only: the IP header follows Ethernet's.
    let Ok(eth) = ctx.ptr_at::<EthHdr>(0) else {
        return Delivery::Failed;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let ether_type = unsafe { (*eth).ether_type };
    let ipv4 = if ether_type == EtherType::Ipv4 as u16 {
        true
    } else if ether_type == EtherType::Ipv6 as u16 {
        false
    } else {
        return Delivery::Failed;
    };
    // The XDP program checked it stays above zero.
    if decrement_hop_limit(ctx, EthHdr::LEN, ipv4).is_err() {
        return Delivery::Failed;
    }
    let Ok(eth) = ctx.ptr_at::<EthHdr>(0) else {
        return Delivery::Failed;
    };
    // SAFETY: bounds checked by `ptr_at`; the helper only records where the buffer goes.
    unsafe {
        copy_bytes(&mut (*eth).dst_addr, &handoff.dmac);
        copy_bytes(&mut (*eth).src_addr, &handoff.smac);
        Delivery::Moved(bpf_redirect_peer(handoff.ifindex, 0) as i32)
    }
}

/// Takes a pod's reply of a tracked flow past the host's stack: reverse NAT, then straight out
/// of the route's interface (the program returns `TC_ACT_REDIRECT` for [`Reason::ReverseNatPod`]).
/// `packet` is parsed; `to` receives its flow. Whatever is not taken is passed unchanged.
///
/// The route is looked up once the reverse entry is found and before the flow's state is
/// touched, so a reply the kernel must route (no neighbour yet, larger than the egress MTU,
/// TTL expiring) reaches the client-facing egress as it was and is reverse-NATed there, once.
#[inline(always)]
pub fn reply(ctx: &TcContext, packet: &mut Packet, to: &mut ReverseValue) -> Reason {
    if packet.vlan || packet.fragment != FRAGMENT_NONE {
        return Reason::PodPass;
    }
    let ingress = ingress_ifindex(ctx);
    // Filled in whole by the check below (an `Option` written from inside the closure leaves
    // a register the verifier sees as uninitialised on its `None` path).
    let (mut egress, mut dmac, mut smac) = (0, [0u8; 6], [0u8; 6]);
    let taken = conntrack::reply_if(packet, to, |packet| {
        if hop_limit_expiring(ctx, packet.l3_off, packet.ipv4) {
            return false;
        }
        match reply_route(ctx, packet, ingress) {
            Some((out, next, own)) if out != ingress => {
                (egress, dmac, smac) = (out, next, own);
                true
            }
            _ => false,
        }
    });
    if !taken {
        return Reason::PodPass;
    }
    if nat::reverse_nat(ctx, packet, to).is_err() {
        return Reason::ReverseNatFailed;
    }
    stats::flow(to.service_id, to.backend_id, ctx.len() as usize, false);
    if decrement_hop_limit(ctx, packet.l3_off, packet.ipv4).is_err() {
        return Reason::ReverseNatFailed;
    }
    let Ok(eth) = ctx.ptr_at::<EthHdr>(0) else {
        return Reason::ReverseNatFailed;
    };
    // SAFETY: bounds checked by `ptr_at`; the helper only records where the buffer goes (with
    // no flags it cannot fail).
    unsafe {
        copy_bytes(&mut (*eth).dst_addr, &dmac);
        copy_bytes(&mut (*eth).src_addr, &smac);
        bpf_redirect(egress, 0);
    }
    Reason::ReverseNatPod
}
