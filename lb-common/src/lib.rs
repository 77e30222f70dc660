//! Types and pure functions shared by the kernel programs (`lb-ebpf`) and userspace
//! (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so both sides agree on the
//! layout byte for byte. With the `user` feature the types implement [`aya::Pod`].
//!
//! Addresses are 16 bytes for both families: an IPv4 address is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one map and one code path serve IPv4 and IPv6.
#![no_std]

pub mod checksum;
pub mod conntrack;
pub mod hash;
pub mod maps;
pub mod select;
pub mod stats;
pub mod tunnel;

pub use maps::{
    AffinityKey, AffinityValue, Backend, BackendKey, FlowKey, FlowValue, FragmentKey,
    FragmentPorts, PodHandoff, ReverseValue, ServiceKey, ServiceValue, SourceRangeKey,
    TunnelConfig,
};
pub use stats::{Counter, Event, FlowCounter, Reason};
