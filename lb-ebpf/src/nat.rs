//! Address and port rewrites with incremental checksum updates.
//!
//! XDP rewrites the frame directly: frames from the wire carry complete checksums. TC uses the
//! kernel's checksum helpers, which also handle socket buffers whose transport checksum is
//! still partial (offloaded), as replies forwarded from local pods often are.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    cty::c_long,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Backend, ReverseValue,
    checksum::{replace16, replace32, replace128},
    maps::PROTO_UDP,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    context::{Frame, OutOfBounds},
    frame::copy_bytes,
    offsets::{IPV4_CHECK, IPV4_SRC, IPV6_DST, IPV6_SRC, L4_DPORT},
    parse::{FRAGMENT_LATER, Packet},
};

/// Rewrites the destination of `packet` to `backend` (address and port), fixing the IPv4
/// header checksum and the TCP/UDP checksum. A UDP checksum of 0 (none) stays 0. A later
/// fragment carries no transport header: only its address changes (the first fragment's
/// transport checksum already accounts for the new address).
///
/// Not inlined: its temporaries get a stack frame of their own.
#[inline(never)]
pub fn dnat(ctx: &XdpContext, packet: &Packet, backend: &Backend) -> Result<(), OutOfBounds> {
    if packet.fragment == FRAGMENT_LATER {
        return rewrite_dst_addr(ctx, packet, &backend.addr).map(|_| ());
    }
    let l4_check: *mut [u8; 2] = ctx.ptr_at(packet.l4_check_off())?;
    let dport: *mut [u8; 2] = ctx.ptr_at(packet.l4_off + L4_DPORT)?;
    // SAFETY (all dereferences below): every pointer comes from `ptr_at`, which checked bounds.
    let mut check = u16::from_be_bytes(unsafe { *l4_check });
    // A UDP checksum of 0 means none was computed: it stays 0 (legal for IPv4; for IPv6 the
    // backend's stack decides, as it would without us, and the reply direction keeps it too).
    let no_checksum = packet.proto == PROTO_UDP && check == 0;
    let old = rewrite_dst_addr(ctx, packet, &backend.addr)?;
    if !no_checksum {
        check = if packet.ipv4 {
            replace32(check, low32(&old), low32(&backend.addr))
        } else {
            replace128(check, &old, &backend.addr)
        };
        check = replace16(check, packet.dport, backend.port);
        if packet.proto == PROTO_UDP && check == 0 {
            // 0 means "no checksum" in UDP; the same sum is sent as 0xffff.
            check = 0xffff;
        }
        unsafe { *l4_check = check.to_be_bytes() };
    }
    unsafe { *dport = backend.port.to_be_bytes() };
    Ok(())
}

/// Writes `new` as the packet's destination address (fixing the IPv4 header checksum);
/// returns the old one.
#[inline(always)]
fn rewrite_dst_addr(
    ctx: &XdpContext,
    packet: &Packet,
    new: &[u8; 16],
) -> Result<[u8; 16], OutOfBounds> {
    let old = packet.dst;
    if packet.ipv4 {
        let ip: *mut Ipv4Hdr = ctx.ptr_at(packet.l3_off)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let ip_check = replace32(u16::from_be_bytes((*ip).check), low32(&old), low32(new));
            (*ip).check = ip_check.to_be_bytes();
            (*ip).dst_addr = low32(new).to_be_bytes();
        }
    } else {
        let dst: *mut [u8; 16] = ctx.ptr_at(packet.l3_off + IPV6_DST)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *dst = *new };
    }
    Ok(old)
}

/// The IPv4 address in the last 4 bytes of an IPv4-mapped address, as a number.
#[inline(always)]
fn low32(addr: &[u8; 16]) -> u32 {
    u32::from_be_bytes([addr[12], addr[13], addr[14], addr[15]])
}

/// Rewrites the source of a reply back to the VIP:port the client used.
#[inline(always)]
pub fn reverse_nat(ctx: &TcContext, packet: &Packet, to: &ReverseValue) -> Result<(), c_long> {
    let check_off = packet.l4_check_off();
    let keep_zero = if packet.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | keep_zero | 4;
    // A later fragment has no transport header: its address alone changes.
    let whole = packet.fragment != FRAGMENT_LATER;
    if packet.ipv4 {
        let old = ne32(&packet.src, 12);
        let new = ne32(&to.vip, 12);
        ctx.l3_csum_replace(packet.l3_off + IPV4_CHECK, old, new, 4)?;
        if whole {
            ctx.l4_csum_replace(check_off, old, new, pseudo)?;
        }
        let bytes: [u8; 4] = [to.vip[12], to.vip[13], to.vip[14], to.vip[15]];
        store(ctx, packet.l3_off + IPV4_SRC, &bytes)?;
    } else {
        if whole {
            for word in 0..4 {
                let old = ne32(&packet.src, word * 4);
                let new = ne32(&to.vip, word * 4);
                ctx.l4_csum_replace(check_off, old, new, pseudo)?;
            }
        }
        store(ctx, packet.l3_off + IPV6_SRC, &to.vip)?;
    }
    if !whole {
        return Ok(());
    }
    let old_port = u64::from(u16::from_ne_bytes(packet.sport.to_be_bytes()));
    let new_port_bytes = to.vip_port.to_be_bytes();
    let new_port = u64::from(u16::from_ne_bytes(new_port_bytes));
    ctx.l4_csum_replace(check_off, old_port, new_port, keep_zero | 2)?;
    store(ctx, packet.l4_off, &new_port_bytes)
}

/// Writes `bytes` at `offset` of a socket buffer directly: cheaper than the store helper, and
/// the checksums are the helpers' business above. (A program that writes packet data directly
/// gets the kernel's unclone prologue, so the buffer is its own.)
#[inline(always)]
fn store<const N: usize>(ctx: &TcContext, offset: usize, bytes: &[u8; N]) -> Result<(), c_long> {
    // Fresh pointers: the checksum helpers may have moved the data.
    let at = ctx.ptr_at::<[u8; N]>(offset).map_err(|_| -1)?;
    // SAFETY: bounds checked by `ptr_at`.
    copy_bytes(unsafe { &mut *at }, bytes);
    Ok(())
}

/// The 4 bytes of `addr` at `at` as the helpers take them: in memory (network) order.
#[inline(always)]
fn ne32(addr: &[u8; 16], at: usize) -> u64 {
    u64::from(u32::from_ne_bytes([
        addr[at],
        addr[at + 1],
        addr[at + 2],
        addr[at + 3],
    ]))
}
