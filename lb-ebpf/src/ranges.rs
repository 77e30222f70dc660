//! `loadBalancerSourceRanges`: a frontend with `SERVICE_F_SOURCE_RANGES` admits only clients
//! in the ranges stored under its service id in `SOURCE_RANGES`. Checked on every packet, so
//! an edit that removes a range cuts the established flows from it too, as kube-proxy's filter
//! rules do.
use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    ServiceValue, SourceRangeKey,
    maps::{SERVICE_F_SOURCE_RANGES, SOURCE_RANGE_FULL_PREFIX},
};

use crate::maps::SOURCE_RANGES;

/// Whether `service` admits a packet from `src` (16 bytes, IPv4-mapped for IPv4): always when
/// it has no source ranges, else when a range of its own holds `src`.
#[inline(always)]
pub fn admitted(service: &ServiceValue, src: &[u8; 16]) -> bool {
    service.flags & SERVICE_F_SOURCE_RANGES == 0 || in_ranges(service.id, src)
}

/// One longest-prefix lookup of (service id, whole client address).
///
/// Not inlined: the key gets a stack frame of its own, apart from backend selection's.
#[inline(never)]
fn in_ranges(service_id: u32, src: &[u8; 16]) -> bool {
    let key = SourceRangeKey {
        prefixlen: SOURCE_RANGE_FULL_PREFIX,
        service_id: service_id.to_be_bytes(),
        addr: *src,
    };
    let key = Key::new(key.prefixlen, key.data());
    SOURCE_RANGES.get(&key).is_some()
}
