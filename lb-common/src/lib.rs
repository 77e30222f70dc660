//! Types and pure functions shared by the kernel programs (`lb-ebpf`) and userspace
//! (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so both sides agree on the
//! layout byte for byte. With the `user` feature the types implement [`aya::Pod`].
#![no_std]

pub mod stats;

pub use stats::{Counter, Reason};
