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
