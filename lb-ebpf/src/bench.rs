//! Programs for `cargo xtask bench`, built beside the load balancer's but never loaded by it:
//! a traffic generator for XDP live frames, counting sinks (XDP, and TC for pods that run no
//! XDP), the minimal XDP DNAT forwarder that is the floor of the forwarding comparison, and the
//! minimal forwarders of the node model (XDP DNAT then a TC `bpf_redirect_peer` into the pod;
//! TC reverse NAT then `bpf_redirect` out of the node).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
        btf_maps::{Array, DevMapHash, HashMap, PerCpuArray},
        helpers::generated::{bpf_redirect, bpf_redirect_peer},
        macros::{btf_map, classifier, xdp},
        programs::{TcContext, XdpContext},
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
    /// Frames counted by `bench_sink` (XDP).
    #[btf_map]
    static SINK_COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();
    /// Frames counted by `bench_tc_sink` (TC).
    #[btf_map]
    static TC_SINK_COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();

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
    /// `bench_min_peer`'s one target: frames to `addr` go to the pod behind the host-side veth
    /// `ifindex` (the MACs are unused).
    #[btf_map]
    static MIN_PEER: Array<MinBackend, 1> = Array::new();
    /// `bench_min_reply`'s one rewrite: the source becomes `addr` (the VIP), the MACs are set
    /// and the frame leaves by `ifindex` (the node's client-facing interface).
    #[btf_map]
    static MIN_REPLY: Array<MinBackend, 1> = Array::new();

    /// Byte offsets in an untagged IPv4 frame without options.
    const ETH_TYPE: usize = 12;
    const IP_VERSION_IHL: usize = 14;
    const IP_PROTO: usize = 23;
    const IP_CHECK: usize = 24;
    const IP_SRC: usize = 26;
    const IP_DST: usize = 30;
    const UDP_CHECK: usize = 40;
    const PROTO_UDP: u8 = 17;

    #[inline(always)]
    fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
        bounded(ctx.data(), ctx.data_end(), offset)
    }

    #[inline(always)]
    fn bounded<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
        (start + offset + core::mem::size_of::<T>() <= end).then_some((start + offset) as *mut T)
    }

    /// The headers of an untagged IPv4 UDP frame without options, if `frame` is one.
    #[inline(always)]
    fn udp4(frame: &[u8; HEADERS]) -> bool {
        frame[ETH_TYPE] == 0x08
            && frame[ETH_TYPE + 1] == 0x00
            && frame[IP_VERSION_IHL] == 0x45
            && frame[IP_PROTO] == PROTO_UDP
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

    /// Counts and drops, for interfaces whose receivers are ordinary sockets, not XDP: a pod's
    /// `eth0` (at tcx ingress, as the first thing its stack does with a frame).
    #[classifier]
    pub fn bench_tc_sink(_ctx: TcContext) -> i32 {
        if let Some(count) = TC_SINK_COUNT.get_ptr_mut(0) {
            // SAFETY: this CPU's slot.
            unsafe { *count += 1 };
        }
        TC_ACT_SHOT
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

    /// The floor of the node model's forward path, its XDP half: the minimal DNAT (one lookup
    /// by destination, address rewritten with the IPv4 and UDP checksums, MACs set to the
    /// pod's), then XDP_PASS: the kernel makes the socket buffer and `bench_min_peer` at tcx
    /// ingress moves it into the pod.
    #[xdp]
    pub fn bench_min_dnat_pass(ctx: XdpContext) -> u32 {
        let Some(frame) = ptr_at::<[u8; HEADERS]>(&ctx, 0) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: a bounds-checked pointer into the frame.
        let frame = unsafe { &mut *frame };
        if !udp4(frame) {
            return xdp_action::XDP_PASS;
        }
        let dst = [
            frame[IP_DST],
            frame[IP_DST + 1],
            frame[IP_DST + 2],
            frame[IP_DST + 3],
        ];
        // SAFETY: the value is copied out at once.
        let Some(backend) = (unsafe { MIN_BACKENDS.get(dst) }).copied() else {
            return xdp_action::XDP_PASS;
        };
        replace_addr(frame, IP_DST, backend.addr);
        frame[0..6].copy_from_slice(&backend.dmac);
        frame[6..12].copy_from_slice(&backend.smac);
        xdp_action::XDP_PASS
    }

    /// The floor of the node model's forward path, its TC half (tcx ingress of the node's
    /// client-facing interface): a frame to the backend `bench_min_dnat_pass` chose goes into
    /// the pod's namespace with `bpf_redirect_peer` (it enters the pod's `eth0` ingress, past
    /// the node's IP stack and the veth's transmit path). aya-ebpf 0.2.1 has no wrapper for the
    /// helper: the generated binding is called.
    #[classifier]
    pub fn bench_min_peer(ctx: TcContext) -> i32 {
        let (Some(frame), Some(target)) = (
            bounded::<[u8; HEADERS]>(ctx.data(), ctx.data_end(), 0),
            MIN_PEER.get(0),
        ) else {
            return TC_ACT_OK;
        };
        // SAFETY: a bounds-checked pointer into the frame.
        let frame = unsafe { &*frame };
        let dst = [
            frame[IP_DST],
            frame[IP_DST + 1],
            frame[IP_DST + 2],
            frame[IP_DST + 3],
        ];
        if !udp4(frame) || u32::from_ne_bytes(dst) != u32::from_ne_bytes(target.addr) {
            return TC_ACT_OK;
        }
        // The frame carries the pod's MAC, so the node's stack marked it for another host
        // (PACKET_OTHERHOST), which a pod's IP layer drops; the kernel's redirect_peer scrubs
        // the packet, which makes it PACKET_HOST again ("bpf: Scrub packet on
        // bpf_redirect_peer", May 2025, also in 6.12.y; checked on 6.18: with no sink, the
        // pod's IP layer takes every frame). Older kernels need a
        // bpf_skb_change_type(PACKET_HOST) here.
        // SAFETY: a helper with no pointer arguments.
        unsafe { bpf_redirect_peer(target.ifindex, 0) as i32 }
    }

    /// The floor of the node model's reply path (tcx ingress of the pod's host-side veth): the
    /// source rewritten back to the VIP (IPv4 and UDP checksums), MACs set, sent out of the
    /// node's client-facing interface with `bpf_redirect`.
    #[classifier]
    pub fn bench_min_reply(ctx: TcContext) -> i32 {
        let (Some(frame), Some(to)) = (
            bounded::<[u8; HEADERS]>(ctx.data(), ctx.data_end(), 0),
            MIN_REPLY.get(0),
        ) else {
            return TC_ACT_OK;
        };
        // SAFETY: a bounds-checked pointer into the frame.
        let frame = unsafe { &mut *frame };
        if !udp4(frame) {
            return TC_ACT_OK;
        }
        replace_addr(frame, IP_SRC, to.addr);
        frame[0..6].copy_from_slice(&to.dmac);
        frame[6..12].copy_from_slice(&to.smac);
        // SAFETY: a helper with no pointer arguments.
        unsafe { bpf_redirect(to.ifindex, 0) as i32 }
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
