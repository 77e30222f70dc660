//! ICMP for VIP flows: echo requests to a VIP are answered; "fragmentation needed" / "packet
//! too big" errors about a VIP flow go on to the flow's backend (found through the inner
//! header, which is rewritten); errors a backend sends about a flow are rewritten back to the
//! VIP on egress, inner header included, so path MTU discovery works through the balancer.
//!
//! Checksums: the ICMP checksum covers the whole message (and, for ICMPv6, a pseudo-header
//! with the outer addresses), so every rewritten field of the inner header is folded into it
//! incrementally. The inner transport checksum is left alone, as hosts ignore it in errors.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    Event, FlowKey, Reason,
    checksum::{replace16, replace32, replace128},
    maps::ipv4_mapped,
};

use crate::{
    conntrack,
    context::Frame,
    forward,
    offsets::{
        ICMP_CHECK, ICMP_QUOTE, IPV4_CHECK, IPV4_DST, IPV4_MIN_LEN, IPV4_PROTO, IPV4_SRC,
        IPV4_VIHL, IPV6_DST, IPV6_LEN, IPV6_NEXT_HEADER, IPV6_SRC, L4_DPORT,
    },
    parse::Packet,
    stats,
};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Where the quoted (inner) packet's fields are.
struct Inner {
    /// Offset of its source address.
    src: usize,
    /// Offset of its destination address.
    dst: usize,
    /// Offset of its header checksum (IPv4 only).
    check: usize,
    /// Offset of its source and destination ports.
    ports: usize,
    proto: u8,
}

/// Locates the packet an ICMP error quotes.
#[inline(always)]
fn inner(frame: &impl Frame, packet: &Packet) -> Option<Inner> {
    let at = packet.l4_off + ICMP_QUOTE;
    if packet.ipv4 {
        let ip: *const [u8; IPV4_MIN_LEN] = frame.ptr_at(at).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        let (vihl, proto) = unsafe { ((*ip)[IPV4_VIHL], (*ip)[IPV4_PROTO]) };
        let header_len = usize::from(vihl & 0x0f) * 4;
        if vihl >> 4 != 4 || header_len < IPV4_MIN_LEN {
            return None;
        }
        frame.ptr_at::<[u8; 4]>(at + header_len).ok()?;
        Some(Inner {
            src: at + IPV4_SRC,
            dst: at + IPV4_DST,
            check: at + IPV4_CHECK,
            ports: at + header_len,
            proto,
        })
    } else {
        let ip: *const [u8; IPV6_LEN] = frame.ptr_at(at).ok()?;
        frame.ptr_at::<[u8; 4]>(at + IPV6_LEN).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        let proto = unsafe { (*ip)[IPV6_NEXT_HEADER] };
        Some(Inner {
            src: at + IPV6_SRC,
            dst: at + IPV6_DST,
            check: 0,
            ports: at + IPV6_LEN,
            proto,
        })
    }
}

/// The flow key of the answer to the quoted packet: its addresses and ports swapped.
#[inline(always)]
fn answer_key(frame: &impl Frame, inner: &Inner, ipv4: bool) -> Option<FlowKey> {
    let ports: *const [u8; 4] = frame.ptr_at(inner.ports).ok()?;
    // SAFETY: bounds checked by `ptr_at`.
    let ports = unsafe { *ports };
    Some(FlowKey {
        src: read_addr(frame, inner.dst, ipv4)?,
        dst: read_addr(frame, inner.src, ipv4)?,
        sport: u16::from_be_bytes([ports[2], ports[3]]),
        dport: u16::from_be_bytes([ports[0], ports[1]]),
        proto: inner.proto,
        pad: [0; 3],
    })
}

/// Reads an address of the frame's family at `at`, as 16 bytes.
#[inline(always)]
fn read_addr(frame: &impl Frame, at: usize, ipv4: bool) -> Option<[u8; 16]> {
    if ipv4 {
        let addr: *const [u8; 4] = frame.ptr_at(at).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        Some(ipv4_mapped(unsafe { *addr }))
    } else {
        let addr: *const [u8; 16] = frame.ptr_at(at).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        Some(unsafe { *addr })
    }
}

/// Writes `new` over the address at `at` and folds the change into the 16-bit checksum at
/// each offset of `checks` (0: none).
#[inline(always)]
fn rewrite_addr(
    frame: &impl Frame,
    at: usize,
    ipv4: bool,
    new: &[u8; 16],
    checks: [usize; 2],
) -> Option<()> {
    let old = read_addr(frame, at, ipv4)?;
    for check_at in checks {
        if check_at == 0 {
            continue;
        }
        let check: *mut [u8; 2] = frame.ptr_at(check_at).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let sum = u16::from_be_bytes(*check);
            let sum = if ipv4 {
                replace32(
                    sum,
                    u32::from_be_bytes([old[12], old[13], old[14], old[15]]),
                    u32::from_be_bytes([new[12], new[13], new[14], new[15]]),
                )
            } else {
                replace128(sum, &old, new)
            };
            *check = sum.to_be_bytes();
        }
    }
    if ipv4 {
        let addr: *mut [u8; 4] = frame.ptr_at(at).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *addr = [new[12], new[13], new[14], new[15]] };
    } else {
        let addr: *mut [u8; 16] = frame.ptr_at(at).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *addr = *new };
    }
    Some(())
}

/// Rewrites an address of the quoted packet (at `at`), folding the change into the ICMP
/// checksum; for IPv4 also into the quoted header's own checksum, whose change lies inside the
/// ICMP message too and is folded in as well.
#[inline(always)]
fn rewrite_quoted_addr(
    frame: &impl Frame,
    inner: &Inner,
    at: usize,
    ipv4: bool,
    new: &[u8; 16],
    icmp_check: usize,
) -> Option<()> {
    if !ipv4 {
        return rewrite_addr(frame, at, false, new, [icmp_check, 0]);
    }
    let read_check = || -> Option<u16> {
        let check: *const [u8; 2] = frame.ptr_at(inner.check).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        Some(u16::from_be_bytes(unsafe { *check }))
    };
    let old_check = read_check()?;
    rewrite_addr(frame, at, true, new, [inner.check, icmp_check])?;
    let new_check = read_check()?;
    let check: *mut [u8; 2] = frame.ptr_at(icmp_check).ok()?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        *check = replace16(u16::from_be_bytes(*check), old_check, new_check).to_be_bytes();
    }
    Some(())
}

/// Writes a 16-bit field, folding the change into the checksum at `check_at`.
#[inline(always)]
fn rewrite16(frame: &impl Frame, at: usize, new: u16, check_at: usize) -> Option<()> {
    let field: *mut [u8; 2] = frame.ptr_at(at).ok()?;
    let check: *mut [u8; 2] = frame.ptr_at(check_at).ok()?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        let old = u16::from_be_bytes(*field);
        *check = replace16(u16::from_be_bytes(*check), old, new).to_be_bytes();
        *field = new.to_be_bytes();
    }
    Some(())
}

/// An ICMP message to a VIP address: answered, sent on to a backend, dropped or passed. On an
/// address of the host itself (`host`) only errors about the load balancer's flows are ours:
/// the host answers its own echo requests and gets errors about its own connections (path MTU
/// discovery of its SSH, its kubelet).
///
/// Not inlined: its temporaries get a stack frame of their own.
#[inline(never)]
pub fn ingress(ctx: &XdpContext, packet: &mut Packet, host: bool) -> Reason {
    let Ok(header) = ctx.ptr_at::<[u8; 2]>(packet.l4_off) else {
        return Reason::DropIcmpUnknownFlow;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (kind, code) = unsafe { ((*header)[0], (*header)[1]) };
    let (echo_request, too_big) = if packet.ipv4 {
        (
            kind == ICMP_ECHO_REQUEST,
            kind == ICMP_DEST_UNREACHABLE && code == ICMP_FRAG_NEEDED,
        )
    } else {
        (kind == ICMPV6_ECHO_REQUEST, kind == ICMPV6_PACKET_TOO_BIG)
    };
    if echo_request && !host {
        return match echo_reply(ctx, packet) {
            Some(()) => Reason::IcmpEchoReply,
            None => Reason::DropIcmpUnknownFlow,
        };
    }
    if !too_big {
        return Reason::PassNotVip;
    }
    match u32::try_from(to_backend(ctx, packet)) {
        Ok(backend_id) => {
            stats::event(Event::IcmpToBackend);
            forward::forward(ctx, packet, backend_id)
        }
        Err(_) if host => Reason::PassNotVip,
        Err(_) => Reason::DropIcmpUnknownFlow,
    }
}

/// Turns an echo request into its reply in place: addresses and MACs swapped, the type
/// changed (the swap leaves every checksum as it was).
#[inline(always)]
fn echo_reply(ctx: &XdpContext, packet: &Packet) -> Option<()> {
    let eth: *mut [u8; 12] = ctx.ptr_at(0).ok()?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        let eth = &mut *eth;
        let dst: [u8; 6] = [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]];
        eth.copy_within(6..12, 0);
        eth[6..12].copy_from_slice(&dst);
    }
    if packet.ipv4 {
        let addrs: *mut [u8; 8] = ctx.ptr_at(packet.l3_off + IPV4_SRC).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let addrs = &mut *addrs;
            let src: [u8; 4] = [addrs[0], addrs[1], addrs[2], addrs[3]];
            addrs.copy_within(4..8, 0);
            addrs[4..8].copy_from_slice(&src);
        }
    } else {
        let addrs: *mut [u8; 32] = ctx.ptr_at(packet.l3_off + IPV6_SRC).ok()?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let addrs = &mut *addrs;
            let mut src = [0u8; 16];
            src.copy_from_slice(&addrs[..16]);
            addrs.copy_within(16..32, 0);
            addrs[16..32].copy_from_slice(&src);
        }
    }
    let (request, reply) = if packet.ipv4 {
        (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
    } else {
        (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
    };
    let header: *mut [u8; 4] = ctx.ptr_at(packet.l4_off).ok()?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        let header = &mut *header;
        let check = u16::from_be_bytes([header[2], header[3]]);
        let check = replace16(
            check,
            u16::from_be_bytes([request, header[1]]),
            u16::from_be_bytes([reply, header[1]]),
        );
        header[0] = reply;
        header[2..4].copy_from_slice(&check.to_be_bytes());
    }
    Some(())
}

/// Rewrites a "too big" error about a VIP flow so it reaches the flow's backend: the outer
/// destination and the quoted packet's source become the backend's. Returns the backend id,
/// or -1 when the error is about no known flow.
///
/// Not inlined, returning a scalar: its temporaries (keys, the backend) get a stack frame of
/// their own, apart from the forwarding that follows.
#[inline(never)]
fn to_backend(ctx: &XdpContext, packet: &mut Packet) -> i64 {
    rewrite_to_backend(ctx, packet).map_or(-1, i64::from)
}

#[inline(always)]
fn rewrite_to_backend(ctx: &XdpContext, packet: &mut Packet) -> Option<u32> {
    let inner = inner(ctx, packet)?;
    // The quoted packet went from the VIP to the client: the flow is its answer, client -> VIP.
    let key = answer_key(ctx, &inner, packet.ipv4)?;
    let (backend_id, backend) = conntrack::backend_of(&key)?;
    let icmp_check = packet.l4_off + ICMP_CHECK;
    // The ICMPv6 checksum covers the outer addresses; the IPv4 header has its own.
    let outer_check = if packet.ipv4 {
        packet.l3_off + IPV4_CHECK
    } else {
        icmp_check
    };
    let outer_dst = packet.l3_off + if packet.ipv4 { IPV4_DST } else { IPV6_DST };
    rewrite_addr(ctx, outer_dst, packet.ipv4, &backend.addr, [outer_check, 0])?;
    rewrite_quoted_addr(
        ctx,
        &inner,
        inner.src,
        packet.ipv4,
        &backend.addr,
        icmp_check,
    )?;
    rewrite16(ctx, inner.ports, backend.port, icmp_check)?;
    packet.dst = backend.addr;
    Some(backend_id)
}

/// On egress: an ICMP error a backend (or a router on its side) sent about a flow is rewritten
/// back to the VIP — the outer source if it is the backend, and the quoted packet's
/// destination. Returns whether it was one of ours.
#[inline(never)]
pub fn egress(frame: &aya_ebpf::programs::TcContext, packet: &Packet) -> bool {
    let Ok(header) = frame.ptr_at::<[u8; 2]>(packet.l4_off) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let kind = unsafe { (*header)[0] };
    let error = if packet.ipv4 {
        matches!(
            kind,
            ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    } else {
        matches!(
            kind,
            ICMPV6_DEST_UNREACHABLE
                | ICMPV6_PACKET_TOO_BIG
                | ICMPV6_TIME_EXCEEDED
                | ICMPV6_PARAMETER_PROBLEM
        )
    };
    error && from_backend(frame, packet).is_some()
}

#[inline(always)]
fn from_backend(frame: &aya_ebpf::programs::TcContext, packet: &Packet) -> Option<()> {
    let inner = inner(frame, packet)?;
    // The quoted packet went from the client to the backend: its answer's tuple is the
    // reverse-NAT key, and its source is the backend.
    let key = answer_key(frame, &inner, packet.ipv4)?;
    let backend = key.src;
    let to = conntrack::reverse_of(&key)?;
    let icmp_check = packet.l4_off + ICMP_CHECK;
    if packet.src == backend {
        let outer_check = if packet.ipv4 {
            packet.l3_off + IPV4_CHECK
        } else {
            icmp_check
        };
        let outer_src = packet.l3_off + if packet.ipv4 { IPV4_SRC } else { IPV6_SRC };
        rewrite_addr(frame, outer_src, packet.ipv4, &to.vip, [outer_check, 0])?;
    }
    rewrite_quoted_addr(frame, &inner, inner.dst, packet.ipv4, &to.vip, icmp_check)?;
    rewrite16(frame, inner.ports + L4_DPORT, to.vip_port, icmp_check)?;
    stats::flow(to.service_id, to.backend_id, frame.packet_len(), false);
    Some(())
}
