//! Sending a rewritten frame on: a route lookup, then XDP_TX or a redirect with the next hop's
//! MAC addresses, a hand-off to the TC ingress program for a local pod, or the kernel's stack
//! where it must help.
use core::mem;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Event, PodHandoff, Reason,
    checksum::replace16,
    maps::{NEXT_HOP_SLOTS, POD_HANDOFF_MAGIC, REPLY_HOP_SLOTS, address_slot},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    conntrack::now_ns,
    context::{Frame, gso_size, reserve_metadata},
    frame::copy_bytes,
    maps::{FIB_PARAMS, NEXT_HOPS, NextHop, POD_PORTS, REPLY_HOPS, TX_PORTS},
    offsets::{IPV4_TTL, IPV6_HOP_LIMIT},
    parse::Packet,
    stats,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// [`NextHop::path`]: the kernel forwards (no faster way is known to work).
pub const PATH_KERNEL: u32 = 0;
/// [`NextHop::path`]: XDP_TX, or an XDP redirect to a port in `TX_PORTS`.
pub const PATH_XDP: u32 = 1;
/// [`NextHop::path`]: a local pod's interface in `POD_PORTS`, reached through the TC ingress
/// program.
pub const PATH_POD: u32 = 2;

/// How long a looked-up next hop is used before the route is looked up again: a route or
/// neighbour change reaches the fast path within this time.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;
/// How long a failed route lookup is kept: a neighbour the kernel resolves meanwhile reaches
/// the fast path within this time.
pub const NO_ROUTE_TTL_NS: u64 = 100_000_000;

/// Forwards the DNATed `packet` (whose destination fields already hold backend `backend_id`)
/// and says how: [`Reason::DnatTx`], [`Reason::DnatRedirect`], [`Reason::DnatPod`] or
/// [`Reason::DnatFibFallback`].
///
/// Not inlined: the route lookup's parameters get a stack frame of their own.
#[inline(never)]
pub fn forward(ctx: &XdpContext, packet: &Packet, backend_id: u32) -> Reason {
    const FALLBACK: Reason = Reason::DnatFibFallback;
    // A tagged frame belongs to a VLAN device the route lookup does not see: let the kernel
    // untag and route it.
    if packet.vlan {
        return FALLBACK;
    }
    // SAFETY: ctx.ctx is the program's xdp_md.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let Some(hop) = NEXT_HOPS.get_ptr_mut(backend_id % NEXT_HOP_SLOTS) else {
        return FALLBACK;
    };
    // SAFETY: this CPU's slot.
    let hop = unsafe { &mut *hop };
    if !refresh(hop, ctx, packet, ingress, packet.now_ns, 0) {
        return FALLBACK;
    }
    let egress = hop.egress;
    if hop.path == PATH_KERNEL {
        // Only a positive answer is kept: a port registered later is used at once.
        hop.path = path_to(egress, ingress);
        if hop.path == PATH_KERNEL {
            return FALLBACK;
        }
    }
    let same_port = egress == ingress;
    if hop_limit_expiring(ctx, packet.l3_off, packet.ipv4) {
        // TTL expiring here: the kernel sends the ICMP time-exceeded.
        return FALLBACK;
    }
    if hop.mtu != 0 && packet.l3_len > hop.mtu {
        // The kernel fragments it or answers "fragmentation needed" / "packet too big".
        stats::event(Event::MtuExceeded);
        return FALLBACK;
    }
    if hop.path == PATH_POD {
        return hand_to_pod(ctx, hop);
    }
    // The redirect is set up before the frame is touched: should it fail (the port left the
    // device map since the lookup), the frame goes to the kernel as it is.
    if !same_port
        && TX_PORTS
            .redirect(egress, u64::from(xdp_action::XDP_PASS))
            .is_err()
    {
        stats::event(Event::RedirectFailed);
        hop.path = PATH_KERNEL;
        return FALLBACK;
    }
    let Ok(eth) = ctx.ptr_at::<EthHdr>(0) else {
        return FALLBACK;
    };
    if decrement_hop_limit(ctx, packet.l3_off, packet.ipv4).is_err() {
        return FALLBACK;
    }
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        copy_bytes(&mut (*eth).dst_addr, &hop.dmac);
        copy_bytes(&mut (*eth).src_addr, &hop.smac);
    }
    if same_port {
        Reason::DnatTx
    } else {
        Reason::DnatRedirect
    }
}

/// How frames for `egress` can leave a frame that arrived on `ingress` (`PATH_*`).
#[inline(always)]
fn path_to(egress: u32, ingress: u32) -> u32 {
    if egress == ingress || TX_PORTS.get(egress).is_some() {
        PATH_XDP
    } else if POD_PORTS.get_ptr(&egress).is_some() {
        PATH_POD
    } else {
        PATH_KERNEL
    }
}

/// Leaves the frame, DNATed but otherwise as it came, to the TC ingress program with the
/// pod's interface and MACs in its metadata (see [`PodHandoff`]).
#[inline(always)]
fn hand_to_pod(ctx: &XdpContext, hop: &NextHop) -> Reason {
    let Some(meta) = reserve_metadata::<PodHandoff>(ctx) else {
        stats::event(Event::PodHandoffFailed);
        return Reason::DnatFibFallback;
    };
    // SAFETY: `reserve_metadata` checked the bounds.
    unsafe {
        meta.write_unaligned(PodHandoff {
            magic: POD_HANDOFF_MAGIC,
            ifindex: hop.egress,
            dmac: hop.dmac,
            smac: hop.smac,
        });
    }
    Reason::DnatPod
}

/// Brings the cached next hop `hop` up to date for `packet` arriving on `ingress` when it has
/// expired or was looked up for another address or ingress; returns whether it holds a route.
/// A failed lookup (no route, no neighbour yet) is kept briefly too, so the packets the kernel
/// must forward meanwhile do not each pay for a lookup that will fail again. `tot_len` is
/// [`route`]'s. The path is left for the caller to decide ([`PATH_KERNEL`]).
#[inline(always)]
fn refresh<C: EbpfContext + Frame>(
    hop: &mut NextHop,
    ctx: &C,
    packet: &Packet,
    ingress: u32,
    now: u64,
    tot_len: u16,
) -> bool {
    if hop.expires_ns > now && hop.ingress == ingress && hop.addr == packet.dst {
        return hop.routable != 0;
    }
    let found = route(ctx, packet, ingress, tot_len);
    if let Some(found) = found {
        hop.egress = found.ifindex;
        // SAFETY: the lookup wrote the MTU over the length it was given.
        hop.mtu = u32::from(unsafe { found.__bindgen_anon_1.mtu_result });
        hop.path = PATH_KERNEL;
        copy_bytes(&mut hop.smac, &found.smac);
        copy_bytes(&mut hop.dmac, &found.dmac);
    }
    copy_bytes(&mut hop.addr, &packet.dst);
    hop.ingress = ingress;
    hop.routable = u32::from(found.is_some());
    hop.expires_ns = now
        + if found.is_some() {
            NEXT_HOP_TTL_NS
        } else {
            NO_ROUTE_TTL_NS
        };
    found.is_some()
}

/// The route to `packet`'s destination (a reply's client) for a socket buffer that arrived on
/// `ingress`: egress and MACs. Looked up once per client and CPU every [`NEXT_HOP_TTL_NS`]
/// (`REPLY_HOPS`), and every packet checked against the route's MTU; a GSO batch is looked up
/// each time, the kernel judging its segments.
#[inline(always)]
pub fn reply_route(
    ctx: &TcContext,
    packet: &Packet,
    ingress: u32,
) -> Option<(u32, [u8; 6], [u8; 6])> {
    if gso_size(ctx) != 0 {
        return route(ctx, packet, ingress, 0).map(|found| (found.ifindex, found.dmac, found.smac));
    }
    let slot = address_slot(&packet.dst, REPLY_HOP_SLOTS);
    let hop = REPLY_HOPS.get_ptr_mut(slot)?;
    // SAFETY: this CPU's slot.
    let hop = unsafe { &mut *hop };
    // A nominal length of 1: the lookup answers with the route's MTU instead of judging this one
    // packet, which the check below does for every packet.
    if !refresh(hop, ctx, packet, ingress, now_ns(), 1) || (hop.mtu != 0 && packet.l3_len > hop.mtu)
    {
        return None;
    }
    Some((hop.egress, hop.dmac, hop.smac))
}

/// The kernel's route to `packet`'s destination, for a packet that arrived on `ingress`, with
/// the next hop's MAC addresses: `None` when there is no route or no neighbour yet, or the
/// packet is larger than the egress MTU allows. `tot_len` 0 asks the lookup for the egress
/// MTU (XDP) or to judge the socket buffer itself, GSO batches included (TC); a nominal length
/// asks for the route's MTU.
#[inline(always)]
pub fn route<C: EbpfContext + Frame>(
    ctx: &C,
    packet: &Packet,
    ingress: u32,
    tot_len: u16,
) -> Option<&'static bpf_fib_lookup> {
    lookup(ctx, packet, ingress, tot_len, 0)
}

/// The interface the route to `packet`'s destination leaves by, whether its neighbour is
/// resolved or not (`BPF_FIB_LOOKUP_SKIP_NEIGH`): where the kernel's neighbour subsystem is
/// asked to send a frame the fast path cannot address yet.
///
/// Not inlined: the lookup's parameters get a stack frame of their own.
#[inline(never)]
pub fn egress_of(ctx: &XdpContext, packet: &Packet) -> Option<u32> {
    // SAFETY: ctx.ctx is the program's xdp_md.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    lookup(ctx, packet, ingress, 0, BPF_FIB_LOOKUP_SKIP_NEIGH).map(|found| found.ifindex)
}

#[inline(always)]
fn lookup<C: EbpfContext + Frame>(
    ctx: &C,
    packet: &Packet,
    ingress: u32,
    tot_len: u16,
    flags: u32,
) -> Option<&'static bpf_fib_lookup> {
    let params = FIB_PARAMS.get_ptr_mut(0)?;
    // SAFETY: a per-CPU scratch slot, used by this program run only.
    let params = unsafe { &mut *params };
    fill_fib_params(params, ctx, packet, ingress).ok()?;
    params.__bindgen_anon_1.tot_len = tot_len;
    // SAFETY: the helper reads and writes only `params`.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            params,
            mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    (rc == BPF_FIB_LKUP_RET_SUCCESS as i64).then_some(params)
}

/// Fills the route lookup's parameters for `packet` arriving on `ingress`.
#[inline(always)]
fn fill_fib_params<C: Frame>(
    params: &mut bpf_fib_lookup,
    ctx: &C,
    packet: &Packet,
    ingress: u32,
) -> Result<(), ()> {
    // An all-zero bpf_fib_lookup is valid. Zeroed as eight words: `mem::zeroed()` compiles to
    // a byte-at-a-time memset call (see `copy_bytes`).
    const WORDS: usize = mem::size_of::<bpf_fib_lookup>() / 8;
    let words = (params as *mut bpf_fib_lookup).cast::<[u64; WORDS]>();
    for i in 0..WORDS {
        // SAFETY: `params` is 8-byte aligned (a map value) and `WORDS` words long.
        unsafe { core::ptr::write_volatile(&raw mut (*words)[i], 0) };
    }
    params.l4_protocol = packet.proto;
    params.sport = packet.sport.to_be();
    params.dport = packet.dport.to_be();
    params.ifindex = ingress;
    if packet.ipv4 {
        let ip: *const Ipv4Hdr = ctx.ptr_at(packet.l3_off).map_err(|_| ())?;
        params.family = AF_INET;
        // SAFETY: `ptr_at` checked bounds; the unions are written, not read. The length is
        // left 0 so the lookup answers with the egress MTU instead of checking this one
        // packet: the cached next hop checks every packet against it.
        unsafe {
            params.__bindgen_anon_2.tos = (*ip).tos;
            params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
            params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
        }
    } else {
        params.family = AF_INET6;
        // SAFETY: `[u32; 4]` and `[u8; 16]` have the same size; the unions are written only.
        unsafe {
            params.__bindgen_anon_3.ipv6_src = mem::transmute::<[u8; 16], [u32; 4]>(packet.src);
            params.__bindgen_anon_4.ipv6_dst = mem::transmute::<[u8; 16], [u32; 4]>(packet.dst);
        }
    }
    Ok(())
}

/// Whether the TTL / hop limit of the IP header at `l3_off` would reach zero here (or cannot
/// be read).
#[inline(always)]
pub fn hop_limit_expiring(ctx: &impl Frame, l3_off: usize, ipv4: bool) -> bool {
    let at = l3_off + if ipv4 { IPV4_TTL } else { IPV6_HOP_LIMIT };
    // See `decrement_hop_limit` for why two bytes are read.
    match ctx.ptr_at::<[u8; 2]>(at) {
        // SAFETY: bounds checked by `ptr_at`.
        Ok(field) => unsafe { (*field)[0] <= 1 },
        Err(_) => true,
    }
}

/// Decrements the IPv4 TTL (fixing the header checksum) or the IPv6 hop limit, as a router
/// must. The caller has checked with [`hop_limit_expiring`] that it stays above zero; this only
/// fails when the header cannot be reached.
#[inline(always)]
pub fn decrement_hop_limit(ctx: &impl Frame, l3_off: usize, ipv4: bool) -> Result<(), ()> {
    if ipv4 {
        let ip: *mut Ipv4Hdr = ctx.ptr_at(l3_off).map_err(|_| ())?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let ttl = (*ip).ttl;
            let old = u16::from_be_bytes([ttl, (*ip).proto]);
            let new = u16::from_be_bytes([ttl.wrapping_sub(1), (*ip).proto]);
            (*ip).ttl = ttl.wrapping_sub(1);
            (*ip).check = replace16(u16::from_be_bytes((*ip).check), old, new).to_be_bytes();
        }
    } else {
        // The first 8 bytes of the header: a one-byte bounds check compiles to a comparison the
        // verifier does not take as proof of one readable byte.
        let head: *mut [u8; 8] = ctx.ptr_at(l3_off).map_err(|_| ())?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let head = &mut *head;
            head[IPV6_HOP_LIMIT] = head[IPV6_HOP_LIMIT].wrapping_sub(1);
        }
    }
    Ok(())
}
