//! Programs for `cargo xtask bench`, built beside the load balancer's but never loaded by it:
//! a traffic generator for XDP live frames, a counting sink, and the minimal XDP DNAT forwarder
//! that is the floor of every comparison.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::xdp_action,
        btf_maps::{Array, DevMapHash, HashMap, PerCpuArray},
        macros::{btf_map, xdp},
        programs::XdpContext,
    };

    /// Bytes of the generated frame's headers: Ethernet, IPv4 (no options), UDP.
    const HEADERS: usize = 42;

    /// What the generator sends.
    #[repr(C)]
    pub struct GenConfig {
        /// Headers of the frame (UDP checksum 0, IPv4 checksum valid).
        pub template: [u8; HEADERS],
        /// Zero: flows differ in their source (port, then address); non-zero: in their
        /// destination (replies of a server to many clients).
        pub cycle_dst: u8,
        /// Always zero.
        pub pad: u8,
        /// Flow `k` of `0..flows` (frame `n` is flow `n % flows`) has port
        /// `base_port + k % span` and the template's address plus `k / span` in its second
        /// byte, where `span = 65536 - base_port`: ports alone would repeat past `span` flows.
        pub flows: u32,
        pub base_port: u16,
        /// Non-zero: every frame is a new flow (source port and the low 16 bits of the source
        /// address count frames, the second byte says which CPU sent it); `flows` and
        /// `cycle_dst` are ignored.
        pub new_flows: u16,
    }

    #[btf_map]
    static GEN_CONFIG: Array<GenConfig, 1> = Array::new();
    #[btf_map]
    static GEN_SEQ: PerCpuArray<u32, 1> = PerCpuArray::new();
    #[btf_map]
    static SINK_COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();

    /// The floor forwarder's one backend per VIP.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct MinBackend {
        /// Backend IPv4 address, as on the wire.
        pub addr: [u8; 4],
        /// Egress interface (0: XDP_TX on the ingress one).
        pub ifindex: u32,
        pub dmac: [u8; 6],
        pub smac: [u8; 6],
    }

    #[btf_map]
    static MIN_BACKENDS: HashMap<[u8; 4], MinBackend, 16> = HashMap::new();
    #[btf_map]
    static MIN_TX: DevMapHash<16> = DevMapHash::new();

    /// Byte offsets in an untagged IPv4 frame without options.
    const IP_CHECK: usize = 24;
    const IP_SRC: usize = 26;
    const IP_DST: usize = 30;
    const UDP_CHECK: usize = 40;

    #[inline(always)]
    fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
        let start = ctx.data();
        (start + offset + core::mem::size_of::<T>() <= ctx.data_end())
            .then_some((start + offset) as *mut T)
    }

    /// Replaces the IPv4 address at `at` (source or destination) with `new`, fixing the IPv4
    /// checksum and the UDP one (a UDP checksum of 0, "none", stays 0).
    #[inline(always)]
    fn replace_addr(frame: &mut [u8; HEADERS], at: usize, new: [u8; 4]) {
        let old = u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
        let new_value = u32::from_be_bytes(new);
        let check = u16::from_be_bytes([frame[IP_CHECK], frame[IP_CHECK + 1]]);
        let check = lb_common::checksum::replace32(check, old, new_value);
        frame[IP_CHECK..IP_CHECK + 2].copy_from_slice(&check.to_be_bytes());
        let udp = u16::from_be_bytes([frame[UDP_CHECK], frame[UDP_CHECK + 1]]);
        if udp != 0 {
            let udp = match lb_common::checksum::replace32(udp, old, new_value) {
                0 => 0xffff,
                sum => sum,
            };
            frame[UDP_CHECK..UDP_CHECK + 2].copy_from_slice(&udp.to_be_bytes());
        }
        frame[at..at + 4].copy_from_slice(&new);
    }

    /// Rewrites the whole header of every frame (live-frame buffers are recycled with whatever
    /// the receivers wrote into them) and sends it out.
    #[xdp]
    pub fn bench_gen(ctx: XdpContext) -> u32 {
        let (Some(config), Some(seq), Some(frame)) = (
            GEN_CONFIG.get(0),
            GEN_SEQ.get_ptr_mut(0),
            ptr_at::<[u8; HEADERS]>(&ctx, 0),
        ) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: `frame` is bounds-checked; `seq` is this CPU's slot.
        unsafe {
            let frame = &mut *frame;
            *frame = config.template;
            let n = *seq;
            *seq = n.wrapping_add(1);
            if config.new_flows != 0 {
                // 198.18.0.0/15: the second byte is 18 or 19 by CPU, the last two count.
                let cpu = aya_ebpf::helpers::generated::bpf_get_smp_processor_id();
                let src = [198, 18 + (cpu & 1) as u8, (n >> 24) as u8, (n >> 16) as u8];
                let old = u32::from_be_bytes([frame[26], frame[27], frame[28], frame[29]]);
                let check = u16::from_be_bytes([frame[24], frame[25]]);
                let check = lb_common::checksum::replace32(check, old, u32::from_be_bytes(src));
                frame[24..26].copy_from_slice(&check.to_be_bytes());
                frame[26..30].copy_from_slice(&src);
                frame[34..36].copy_from_slice(&(n as u16).to_be_bytes());
            } else {
                let flows = if config.flows == 0 { 1 } else { config.flows };
                let flow = n % flows;
                let span = 65536 - u32::from(config.base_port);
                let port = config.base_port.wrapping_add((flow % span) as u16);
                let (port_at, addr_at) = if config.cycle_dst == 0 {
                    (34, IP_SRC)
                } else {
                    (36, IP_DST)
                };
                frame[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
                let step = (flow / span) as u8;
                if step != 0 {
                    let mut addr = [
                        frame[addr_at],
                        frame[addr_at + 1],
                        frame[addr_at + 2],
                        frame[addr_at + 3],
                    ];
                    addr[1] = addr[1].wrapping_add(step);
                    replace_addr(frame, addr_at, addr);
                }
            }
        }
        xdp_action::XDP_TX
    }

    /// Counts and drops.
    #[xdp]
    pub fn bench_sink(_ctx: XdpContext) -> u32 {
        if let Some(count) = SINK_COUNT.get_ptr_mut(0) {
            // SAFETY: this CPU's slot.
            unsafe { *count += 1 };
        }
        xdp_action::XDP_DROP
    }

    /// The minimal DNAT forwarder: one lookup by destination, the address rewritten with its
    /// header checksum (the generator's UDP checksum is 0), MACs set, sent on.
    #[xdp]
    pub fn bench_min_dnat(ctx: XdpContext) -> u32 {
        let Some(ip) = ptr_at::<[u8; 20]>(&ctx, 14) else {
            return xdp_action::XDP_PASS;
        };
        let Some(eth) = ptr_at::<[u8; 12]>(&ctx, 0) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: bounds-checked pointers into the frame.
        unsafe {
            let (ip, eth) = (&mut *ip, &mut *eth);
            let dst = [ip[16], ip[17], ip[18], ip[19]];
            let Some(backend) = MIN_BACKENDS.get(dst).copied() else {
                return xdp_action::XDP_PASS;
            };
            let old = u32::from_be_bytes(dst);
            let new = u32::from_be_bytes(backend.addr);
            let check = u16::from_be_bytes([ip[10], ip[11]]);
            let check = lb_common::checksum::replace32(check, old, new);
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            ip[16..20].copy_from_slice(&backend.addr);
            eth[0..6].copy_from_slice(&backend.dmac);
            eth[6..12].copy_from_slice(&backend.smac);
            if backend.ifindex == 0 {
                return xdp_action::XDP_TX;
            }
            match MIN_TX.redirect(backend.ifindex, 0) {
                Ok(action) | Err(action) => action,
            }
        }
    }
}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
