//! The programs live in the `lb-ebpf` binary (`src/main.rs`); this library target only exists so
//! `lb-userspace` can declare a build dependency on this crate and be rebuilt when it changes.
#![no_std]
