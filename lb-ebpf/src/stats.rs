//! Per-CPU counting.
use aya_ebpf::programs::XdpContext;
use lb_common::Reason;

use crate::maps::STATS;

/// Counts one packet of `ctx`'s length under `reason`.
#[inline(always)]
pub fn count(reason: Reason, ctx: &XdpContext) {
    if let Some(counter) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += (ctx.data_end() - ctx.data()) as u64;
        }
    }
}
