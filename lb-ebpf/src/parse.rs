//! Bounds-checked header access.
use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// The frame ends before the header being read.
pub struct Truncated;

/// What the Ethernet header says follows it.
pub enum L3 {
    Ipv4,
    Ipv6,
    Other,
}

/// Returns a pointer to a `T` at `offset` bytes into the frame, if the frame holds all of it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Truncated> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Truncated);
    }
    Ok((start + offset) as *mut T)
}

/// Reads the Ethernet header's EtherType and checks the fixed IP header that follows is whole.
#[inline(always)]
pub fn l3(ctx: &XdpContext) -> Result<L3, Truncated> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the header lies within the frame.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv4 as u16 {
        ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
        Ok(L3::Ipv4)
    } else if ether_type == EtherType::Ipv6 as u16 {
        ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN)?;
        Ok(L3::Ipv6)
    } else {
        Ok(L3::Other)
    }
}
