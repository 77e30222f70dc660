//! The maps shared with userspace. Names are part of the contract with `lb-userspace`.
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use lb_common::{Counter, stats::REASON_COUNT};

/// One [`Counter`] per [`lb_common::Reason`].
#[btf_map]
pub static STATS: PerCpuArray<Counter, { REASON_COUNT as usize }> = PerCpuArray::new();
