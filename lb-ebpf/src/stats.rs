//! Per-CPU counting.
use lb_common::{Event, FlowCounter, Reason};

use crate::maps::{BACKEND_STATS, EVENTS, SERVICE_STATS, STATS};

/// Counts one packet of `bytes` under `reason`.
#[inline(always)]
pub fn count(reason: Reason, bytes: usize) {
    if let Some(counter) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

/// Counts one `event`.
#[inline(always)]
pub fn event(event: Event) {
    if let Some(count) = EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: as in `count`.
        unsafe { *count += 1 };
    }
}

/// Counts a forwarded packet of `bytes` for a service and its backend; `new_flow` when the
/// packet placed a new flow.
#[inline(always)]
pub fn flow(service_id: u32, backend_id: u32, bytes: usize, new_flow: bool) {
    if let Some(counter) = SERVICE_STATS.get_ptr_mut(service_id) {
        add(counter, bytes, new_flow);
    }
    if let Some(counter) = BACKEND_STATS.get_ptr_mut(backend_id) {
        add(counter, bytes, new_flow);
    }
}

#[inline(always)]
fn add(counter: *mut FlowCounter, bytes: usize, new_flow: bool) {
    // SAFETY: a per-CPU slot from a map lookup; only this CPU writes it while the program runs.
    unsafe {
        (*counter).packets += 1;
        (*counter).bytes += bytes as u64;
        (*counter).new_flows += u64::from(new_flow);
    }
}
