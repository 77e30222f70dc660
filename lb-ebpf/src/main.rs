//! The load balancer's kernel programs. Entry points only dispatch and count; the work lives in
//! the modules, split by concern like Katran's `lib/bpf/`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
    use lb_common::Reason;

    use crate::{parse, stats};

    /// Ingress of the client-facing interface.
    #[xdp]
    pub fn lb_xdp(ctx: XdpContext) -> u32 {
        let (reason, action) = classify(&ctx);
        stats::count(reason, &ctx);
        action
    }

    #[inline(always)]
    fn classify(ctx: &XdpContext) -> (Reason, u32) {
        match parse::l3(ctx) {
            Ok(parse::L3::Ipv4) => (Reason::PassIpv4, xdp_action::XDP_PASS),
            Ok(parse::L3::Ipv6) => (Reason::PassIpv6, xdp_action::XDP_PASS),
            Ok(parse::L3::Other) => (Reason::PassNotIp, xdp_action::XDP_PASS),
            Err(parse::Truncated) => (Reason::PassTruncated, xdp_action::XDP_PASS),
        }
    }
}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that can reach this loop, so a panic path is a build bug
    // caught at load time, never a runtime hang.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// Host builds (clippy, the build dependency of `lb-userspace`) compile nothing but this.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
