//! Builds the `lb-ebpf` object for the BPF target with aya-build so that a plain `cargo build`
//! produces a binary with its kernel programs embedded.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build for quick host-only checks on machines without the
//! nightly toolchain and bpf-linker; the binary then carries an empty object and refuses to load
//! it with an error saying so.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    println!("cargo:rerun-if-changed=../lb-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    for name in ["lb-ebpf", "lb-bench-ebpf"] {
        let object = PathBuf::from(env::var("OUT_DIR")?).join(name);
        if !object.exists() {
            // Only reached with AYA_BUILD_SKIP: see the module docs.
            fs::write(&object, [])?;
        }
    }
    Ok(())
}
