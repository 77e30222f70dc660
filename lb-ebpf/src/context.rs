//! The XDP and TC contexts as [`Frame`]s.
use aya_ebpf::programs::{TcContext, XdpContext};

pub use crate::frame::{Frame, OutOfBounds};

// The context's fields are read with volatile loads so that a non-inlined callee reads them
// itself: were LLVM to load them in the caller and pass the values as integers, the verifier
// would lose track of them as packet pointers.

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        // SAFETY: `ctx` is the program's valid xdp_md.
        unsafe { core::ptr::read_volatile(&raw const (*self.ctx).data) as usize }
    }
    #[inline(always)]
    fn end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const (*self.ctx).data_end) as usize }
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        // SAFETY: `skb` is the program's valid __sk_buff.
        unsafe { core::ptr::read_volatile(&raw const (*self.skb.skb).data) as usize }
    }
    #[inline(always)]
    fn end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const (*self.skb.skb).data_end) as usize }
    }
    #[inline(always)]
    fn packet_len(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const (*self.skb.skb).len) as usize }
    }
}

/// Moves the start of an XDP frame by `delta` bytes (`bpf_xdp_adjust_head`): a negative
/// `delta` makes room in front of the data, a positive one drops bytes from the front. False
/// when the kernel refuses (not enough headroom, or a frame shorter than an Ethernet header
/// left). Every pointer into the frame is stale afterwards: `Frame::ptr_at` reads the new
/// bounds.
#[inline(always)]
pub fn adjust_head(ctx: &XdpContext, delta: i32) -> bool {
    // SAFETY: `ctx` is the program's valid xdp_md; the helper only moves `data`.
    unsafe { aya_ebpf::helpers::generated::bpf_xdp_adjust_head(ctx.ctx, delta) == 0 }
}

/// Moves the end of an XDP frame by `delta` bytes (`bpf_xdp_adjust_tail`): a negative `delta`
/// cuts the frame short. False when the kernel refuses. Pointers are stale afterwards, as with
/// [`adjust_head`].
#[inline(always)]
pub fn adjust_tail(ctx: &XdpContext, delta: i32) -> bool {
    // SAFETY: `ctx` is the program's valid xdp_md; the helper only moves `data_end`.
    unsafe { aya_ebpf::helpers::generated::bpf_xdp_adjust_tail(ctx.ctx, delta) == 0 }
}

/// Room for a `T` made in front of an XDP frame's data (`bpf_xdp_adjust_meta`), for the TC
/// program that sees the frame next. `None` when the driver keeps no metadata.
#[inline(always)]
pub fn reserve_metadata<T>(ctx: &XdpContext) -> Option<*mut T> {
    let size = core::mem::size_of::<T>() as i32;
    // SAFETY: `ctx` is the program's valid xdp_md; the helper only moves `data_meta`.
    if unsafe { aya_ebpf::helpers::generated::bpf_xdp_adjust_meta(ctx.ctx, -size) } != 0 {
        return None;
    }
    // SAFETY: as in `Frame::start`; the pointers were just moved by the helper.
    let (meta, data) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.ctx).data_meta) as usize,
            core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
        )
    };
    (meta + core::mem::size_of::<T>() <= data).then_some(meta as *mut T)
}

/// The `T` an XDP program left in front of a socket buffer's data (see [`reserve_metadata`]);
/// `None` when the metadata is shorter.
#[inline(always)]
pub fn metadata<T: Copy>(ctx: &TcContext) -> Option<T> {
    // SAFETY: `skb` is the program's valid __sk_buff.
    let (meta, data) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.skb.skb).data_meta) as usize,
            core::ptr::read_volatile(&raw const (*ctx.skb.skb).data) as usize,
        )
    };
    // Not also "exactly one": the compiler folds both tests into an inequality the verifier
    // draws no bounds from. The caller checks what it reads.
    if meta + core::mem::size_of::<T>() > data {
        return None;
    }
    // SAFETY: the comparison above bounds the read to the metadata.
    Some(unsafe { (meta as *const T).read_unaligned() })
}

/// The interface a socket buffer arrived on.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the program's valid __sk_buff.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// The segment size of a GSO socket buffer (a batch of segments the kernel cuts on the way
/// out); 0 for a single packet.
#[inline(always)]
pub fn gso_size(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the program's valid __sk_buff.
    unsafe { (*ctx.skb.skb).gso_size }
}
