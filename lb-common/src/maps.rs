//! Map keys, values, names and sizes: the contract between the kernel programs and userspace.

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IPv6 next-header number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// Largest Maglev table a service may have (a prime). Its inner array has one more slot: slot 0
/// holds the table size, so that the size and the table are swapped in one map update (and,
/// when some backends take no new flows, a second table of the same size follows the first:
/// the fallback over those that do).
pub const MAGLEV_MAX_SIZE: u32 = 131_071;
/// Default Maglev table size (a prime).
pub const MAGLEV_DEFAULT_SIZE: u32 = 16_381;
/// Capacity of the services map, and so the largest service id plus one.
pub const MAX_SERVICES: u32 = 16_384;
/// Default capacity of the backends array (`--max-backends`), and so the largest backend id
/// plus one. It also sizes the per-CPU backend counters, so it costs memory on every CPU:
/// 24 bytes per backend per possible CPU (1.5 MiB per CPU at the default).
pub const DEFAULT_MAX_BACKENDS: u32 = 65_536;
/// Slots of the per-CPU next-hop cache, a power of two: backend `id` uses slot
/// `id % NEXT_HOP_SLOTS` and checks the address it holds, so a shared slot costs a route
/// lookup, never a wrong next hop.
pub const NEXT_HOP_SLOTS: u32 = 4096;
/// Slots of the per-CPU cache of routes to clients, for replies sent straight out by the pod
/// program (a power of two: a client address's slot is a hash's top bits).
pub const REPLY_HOP_SLOTS: u32 = 1024;
/// Default capacity of the connection table and of the reverse-NAT table.
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;
/// Entries the kernel's LRU may hold free per CPU (`LOCAL_FREE_TARGET`): it starts evicting
/// while up to this many per CPU, and as many again for the evicting CPU, are still free. The
/// connection tables are created this much larger per CPU so that `--conntrack-size` live
/// flows always fit.
pub const LRU_FREE_PER_CPU: u32 = 128;

/// Entries to create an LRU connection table with so that `flows` live flows fit on a machine
/// with `cpus` possible CPUs.
#[must_use]
pub const fn lru_entries_for(flows: u32, cpus: u32) -> u32 {
    flows.saturating_add(LRU_FREE_PER_CPU.saturating_mul(cpus.saturating_add(1)))
}
/// Capacity of the ClientIP affinity table.
pub const AFFINITY_SIZE: u32 = 65_536;
/// Capacity of the redirect-target device map.
pub const MAX_TX_PORTS: u32 = 256;
/// Capacity of the pod-interface table: local pods the data plane delivers to directly.
pub const MAX_POD_PORTS: u32 = 4096;
/// Capacity of the source-range trie: `loadBalancerSourceRanges` entries of all services
/// together.
pub const SOURCE_RANGES_SIZE: u32 = 16_384;
/// `BPF_F_NO_PREALLOC`: the kernel takes LPM tries only with it (nodes are allocated as
/// entries are inserted).
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Names of the maps in the eBPF object.
pub mod names {
    /// [`super::ServiceKey`] -> [`super::ServiceValue`].
    pub const SERVICES: &str = "SERVICES";
    /// VIP address -> number of services on it, with [`super::VIP_ADDR_F_HOST`].
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    /// [`super::VIP_FILTER_WORDS`] words of bits set by [`super::vip_filter_bit`].
    pub const VIP_FILTER: &str = "VIP_FILTER";
    /// Service id -> Maglev table (inner array, slot 0 = size).
    pub const MAGLEV: &str = "MAGLEV";
    /// Backend id -> [`super::Backend`].
    pub const BACKENDS: &str = "BACKENDS";
    /// Forward 5-tuple -> [`super::FlowValue`].
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Reply 5-tuple -> [`super::ReverseValue`].
    pub const REVERSE_NAT: &str = "REVERSE_NAT";
    /// [`super::AffinityKey`] -> [`super::AffinityValue`].
    pub const AFFINITY: &str = "AFFINITY";
    /// Interfaces that accept XDP-redirected frames (ifindex -> ifindex).
    pub const TX_PORTS: &str = "TX_PORTS";
    /// Host-side interfaces of local pods (ifindex -> 0, reserved for flags).
    pub const POD_PORTS: &str = "POD_PORTS";
    /// LPM trie: [`super::SourceRangeKey`] -> 0 (reserved): the client ranges a service with
    /// [`super::SERVICE_F_SOURCE_RANGES`] admits.
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    /// Per-CPU [`super::super::Counter`] per [`super::super::Reason`].
    pub const STATS: &str = "STATS";
    /// Per-CPU count per [`super::super::Event`].
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU [`super::super::FlowCounter`] per service id.
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// Per-CPU [`super::super::FlowCounter`] per backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// One [`super::TunnelConfig`]: this node's end of the tunnel to the other nodes.
    pub const TUNNEL: &str = "TUNNEL";
    /// The underlay addresses of the other nodes (address -> 0, reserved): the only sources
    /// whose tunnel packets are taken.
    pub const TUNNEL_PEERS: &str = "TUNNEL_PEERS";
    /// [`super::BackendKey`] -> backend id: how a packet another node placed finds the
    /// backend it was sent for.
    pub const BACKEND_IDS: &str = "BACKEND_IDS";
}

/// Capacity of the tunnel peer table: nodes (times their address families) in the cluster.
pub const MAX_TUNNEL_PEERS: u32 = 4096;

/// The UDP port tunnel packets are sent to by default (`--tunnel-port`): Katran's GUE port.
pub const DEFAULT_TUNNEL_PORT: u16 = 6080;

/// This node's end of the tunnel (`TUNNEL`, one slot), written by userspace. A node with
/// neither address takes no tunnel packets and sends none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// This node's IPv4 underlay address (IPv4-mapped), the outer source of what it
    /// encapsulates over IPv4 and the outer destination it decapsulates; all zero: none.
    pub addr4: [u8; 16],
    /// This node's IPv6 underlay address; all zero: none.
    pub addr6: [u8; 16],
    /// The UDP port tunnel packets go to, host byte order.
    pub port: u16,
    /// Always zero.
    pub pad: u16,
    /// The largest IP packet the underlay carries (the attached interface's MTU): a packet
    /// that would exceed it once encapsulated is answered with "fragmentation needed" /
    /// "packet too big" instead.
    pub mtu: u32,
}

/// A backend as another node names it in a tunnel packet: the pod's address and port, within
/// this node's service (`BACKEND_IDS`' key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    /// Endpoint address (16 bytes, IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Target port, host byte order.
    pub port: u16,
    /// Always zero.
    pub pad: u16,
    /// The service id on this node.
    pub service_id: u32,
}

/// `BPF_F_INNER_MAP`: lets inner arrays of one map-in-map differ in size.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: userspace writes a new Maglev table through a memory mapping instead of
/// one system call per slot.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of every Maglev table (the inner map template's and the tables userspace creates
/// must match).
pub const MAGLEV_TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

/// Returns `addr` IPv4-mapped into 16 bytes.
#[must_use]
pub const fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

/// The 16-byte form of an address the data plane uses: IPv4 as an IPv4-mapped IPv6 address.
#[must_use]
pub const fn addr16(addr: core::net::IpAddr) -> [u8; 16] {
    match addr {
        core::net::IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// Whether a 16-byte address is an IPv4-mapped IPv4 address.
#[must_use]
pub fn is_ipv4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

/// `VIP_ADDRS` value bit: the address is also the host's own (a node IP serving nodePorts, a
/// VIP allowed with `--allow-host-addresses`); the other bits count the services on it. Only
/// packets to one of its services are the load balancer's; everything else to it (fragments,
/// ICMP errors about the host's own connections, packets it cannot parse) is passed to the
/// host.
pub const VIP_ADDR_F_HOST: u32 = 1 << 31;

/// Bits of the VIP filter: one per hash of an address some service uses, so that a packet to
/// any other address (nearly all of a node's traffic) leaves after one array read instead of a
/// service-table hash lookup. 2^20 bits (128 KiB) keep false positives under 2% with every
/// possible service on its own address.
pub const VIP_FILTER_BITS: u32 = 1 << 20;
/// 64-bit words of the VIP filter.
pub const VIP_FILTER_WORDS: u32 = VIP_FILTER_BITS / 64;

/// The VIP filter bit of `addr` (see [`address_slot`]). A set bit means "maybe a VIP" (look the
/// service up); a clear one means "certainly not" (a false positive costs one lookup, never a
/// packet).
#[inline(always)]
#[must_use]
pub fn vip_filter_bit(addr: &[u8; 16]) -> u32 {
    address_slot(addr, VIP_FILTER_BITS)
}

/// `addr`'s slot among `slots` (a power of two): Fibonacci hashing of the address's four words
/// folded into one, cheap enough to run on every packet.
#[inline(always)]
#[must_use]
pub fn address_slot(addr: &[u8; 16], slots: u32) -> u32 {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let folded = word(0) ^ word(4).rotate_left(8) ^ word(8).rotate_left(16) ^ word(12);
    folded.wrapping_mul(0x9e37_79b9) >> (32 - slots.trailing_zeros())
}

/// A service's identity: VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// The VIP (16 bytes, IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// The service port, host byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Always zero.
    pub pad: u8,
}

/// `ServiceValue::flags`: new connections of a client stick to its previous backend.
pub const SERVICE_F_AFFINITY: u32 = 1;
/// `ServiceValue::flags`: this frontend admits only clients in the ranges stored under its
/// service id in `SOURCE_RANGES` (`loadBalancerSourceRanges`); every other client's packets
/// are dropped, those of established flows included.
pub const SERVICE_F_SOURCE_RANGES: u32 = 2;
/// `ServiceValue::flags`: a packet this frontend has no backend for is dropped, not answered
/// with a TCP reset or an ICMP port unreachable (`externalTrafficPolicy: Local` frontends
/// without a local endpoint, which kube-proxy drops).
pub const SERVICE_F_DROP_EMPTY: u32 = 4;

/// A key of the source-range trie (`SOURCE_RANGES`, an LPM trie): the service id then the
/// client address, matched over their first `prefixlen` bits. The service id is always matched
/// whole, so a service's ranges never admit another's clients.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    /// Bits matched: 32 (the service id) plus the range's prefix length within the 16-byte
    /// address (96 + n for an IPv4 /n, as addresses are IPv4-mapped).
    pub prefixlen: u32,
    /// The service id, big-endian (the trie matches bytes in order).
    pub service_id: [u8; 4],
    /// The range's address (IPv4-mapped for IPv4), its bits past the prefix zero.
    pub addr: [u8; 16],
}

/// The prefix length of a lookup: the service id and the whole client address.
pub const SOURCE_RANGE_FULL_PREFIX: u32 = 32 + 128;

impl SourceRangeKey {
    /// The bytes the trie matches (everything after `prefixlen`), as the kernel and aya's
    /// `lpm_trie::Key<[u8; 20]>` hold them.
    #[inline(always)]
    #[must_use]
    pub const fn data(&self) -> [u8; 20] {
        let (id, a) = (self.service_id, self.addr);
        [
            id[0], id[1], id[2], id[3], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9],
            a[10], a[11], a[12], a[13], a[14], a[15],
        ]
    }
}

/// The trie key of the range `addr`/`prefix` of service `service_id`, where `addr` is 16 bytes
/// (IPv4-mapped for IPv4) and `prefix` counts bits within those 16 bytes (96 + n for an IPv4
/// /n); a `prefix` over 128 is taken as 128. The address's bits past the prefix are cleared, so
/// one range has one key however it was written.
#[must_use]
pub fn source_range_key(service_id: u32, addr: &[u8; 16], prefix: u32) -> SourceRangeKey {
    let prefix = prefix.min(128);
    let mut masked = [0u8; 16];
    for (i, (to, from)) in masked.iter_mut().zip(addr).enumerate() {
        let bits = prefix.saturating_sub(8 * i as u32).min(8);
        // `bits` leading ones of the byte: 0xff << (8 - bits), 0 when no bit is kept.
        let mask = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
        *to = from & mask;
    }
    SourceRangeKey {
        prefixlen: 32 + prefix,
        service_id: service_id.to_be_bytes(),
        addr: masked,
    }
}

/// What the data plane needs to know of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index of the service's Maglev table and counters.
    pub id: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// ClientIP affinity timeout in seconds (with [`SERVICE_F_AFFINITY`]).
    pub affinity_timeout_secs: u32,
}

/// `Backend::flags`: the slot holds a live backend.
pub const BACKEND_F_VALID: u16 = 1;
/// `Backend::flags`: the backend keeps its flows but takes no new ones.
pub const BACKEND_F_TERMINATING: u16 = 2;

/// A backend (endpoint address and target port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Endpoint address (16 bytes, IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Target port, host byte order.
    pub port: u16,
    /// `BACKEND_F_*` bits; zero marks an empty slot.
    pub flags: u16,
    /// The service this backend serves (for counters and sanity checks).
    pub service_id: u32,
    /// The underlay address of the node the endpoint lives on when that is another node
    /// reached through the tunnel (16 bytes, IPv4-mapped for IPv4): packets for it are sent
    /// there encapsulated, untouched, and that node does the DNAT and answers the client
    /// itself. All zero: this node, or a node the host routes to (the DNAT happens here).
    pub node: [u8; 16],
}

impl Backend {
    /// Whether this slot holds a live backend of service `service_id` in the address family of
    /// the packet (`ipv4`): the one test before a packet is sent to it, a tracked or a new one.
    #[must_use]
    pub fn serves(&self, service_id: u32, ipv4: bool) -> bool {
        self.flags & BACKEND_F_VALID != 0
            && self.service_id == service_id
            && is_ipv4_mapped(&self.addr) == ipv4
    }
}

/// A 5-tuple, as seen on the wire (source first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero.
    pub pad: [u8; 3],
}

/// A tracked flow: which backend it goes to, its state and its one lifetime (see
/// [`crate::conntrack`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// The backend id.
    pub backend_id: u32,
    /// The service id: a packet of another service (whose id was reused) never follows it.
    pub service_id: u32,
    /// When the flow expires without another packet (`CLOCK_MONOTONIC` ns).
    pub expires_ns: u64,
    /// `CT_*` bits of [`crate::conntrack`].
    pub state: u16,
    /// Always zero.
    pub pad: [u8; 6],
}

/// What a reply from a backend must be rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseValue {
    /// The VIP the client used.
    pub vip: [u8; 16],
    /// The service port the client used, host byte order.
    pub vip_port: u16,
    /// The flow's state (`CT_*` bits) when a reply last updated its entry.
    pub state: u16,
    /// The service id.
    pub service_id: u32,
    /// The backend id.
    pub backend_id: u32,
    /// Always zero.
    pub pad: u32,
    /// When a reply last updated the flow's entry (0: never). A reply within
    /// [`crate::conntrack::LIFETIME_GRANULARITY_NS`] after it, without FIN, RST or SYN, of a
    /// flow that had no FIN then, would change nothing there and skips it.
    pub checked_ns: u64,
}

/// A datagram's fragments: the later ones carry no ports and are matched to the first by this.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// The IP identification (IPv4: 16 bits; IPv6: the fragment header's 32).
    pub id: u32,
    /// IP protocol.
    pub proto: u8,
    /// Always zero.
    pub pad: [u8; 3],
}

/// The ports of a fragmented datagram, from its first fragment (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// Capacity of the fragment table: datagrams in reassembly at once.
pub const FRAGMENTS_SIZE: u32 = 8192;

/// ClientIP affinity: a client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client address.
    pub client: [u8; 16],
    /// The service id.
    pub service_id: u32,
}

/// ClientIP affinity: the backend a client last got, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// The backend id.
    pub backend_id: u32,
    /// Always zero.
    pub pad: u32,
    /// `bpf_ktime_get_ns` of the client's last new connection.
    pub last_used_ns: u64,
}

/// What the XDP program leaves in a frame's metadata (`bpf_xdp_adjust_meta`) when it hands a
/// DNATed frame to the TC ingress program of the same interface, which moves it into a local
/// pod's network namespace (`bpf_redirect_peer`): XDP cannot, because the pod's end of a veth
/// takes redirected frames only when it runs an XDP program, which an ordinary pod does not.
///
/// The frame's Ethernet header and hop limit are left as they came, so a frame the TC program
/// does not take (not attached, say) is still a frame the kernel routes correctly; the TC
/// program writes them when it moves the frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodHandoff {
    /// [`POD_HANDOFF_MAGIC`]: metadata of ours, not another program's.
    pub magic: u32,
    /// The pod's host-side interface: its peer is the pod's.
    pub ifindex: u32,
    /// The pod's MAC address.
    pub dmac: [u8; 6],
    /// The host-side interface's MAC address.
    pub smac: [u8; 6],
}

/// [`PodHandoff::magic`].
pub const POD_HANDOFF_MAGIC: u32 = 0x4c42_5044;
/// [`PodHandoff::magic`] of an encapsulated frame for another node whose next hop the fast
/// path cannot address yet (no neighbour entry): the TC ingress program sends it out of
/// `ifindex` with `bpf_redirect_neigh`, which resolves the neighbour (the MACs are unused).
pub const TUNNEL_HANDOFF_MAGIC: u32 = 0x4c42_5455;

/// The trie key of the range `addr`/`len` of service `service_id` as written in a Service
/// (`10.0.0.0/8`, `2001:db8::/32`); `None` when `len` is longer than the family's addresses.
#[must_use]
pub fn source_range_key_of(
    service_id: u32,
    addr: core::net::IpAddr,
    len: u8,
) -> Option<SourceRangeKey> {
    let (addr, prefix) = match addr {
        core::net::IpAddr::V4(v4) if len <= 32 => (ipv4_mapped(v4.octets()), 96 + u32::from(len)),
        core::net::IpAddr::V6(v6) if len <= 128 => (v6.octets(), u32::from(len)),
        _ => return None,
    };
    Some(source_range_key(service_id, &addr, prefix))
}

/// The range a trie key holds, as a Service writes it: an IPv4 range for an IPv4-mapped key at
/// least 96 bits long, else IPv6; `None` for a key of no range (shorter than a service id).
#[must_use]
pub fn source_range_of(key: &SourceRangeKey) -> Option<(core::net::IpAddr, u8)> {
    let prefix = key.prefixlen.checked_sub(32)?.min(128);
    if prefix >= 96 && is_ipv4_mapped(&key.addr) {
        let v4 = [key.addr[12], key.addr[13], key.addr[14], key.addr[15]];
        return Some((core::net::IpAddr::from(v4), (prefix - 96) as u8));
    }
    Some((core::net::IpAddr::from(key.addr), prefix as u8))
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `repr(C)`, explicit padding fields, any bit pattern valid.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::TunnelConfig {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::ReverseValue {}
    unsafe impl aya::Pod for super::PodHandoff {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentPorts {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 12);
        assert_eq!(size_of::<Backend>(), 40);
        assert_eq!(size_of::<TunnelConfig>(), 40);
        assert_eq!(size_of::<BackendKey>(), 24);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowValue>(), 24);
        assert_eq!(size_of::<ReverseValue>(), 40);
        assert_eq!(size_of::<AffinityKey>(), 20);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<FragmentKey>(), 40);
        assert_eq!(size_of::<FragmentPorts>(), 4);
        // As the kernel's `struct bpf_lpm_trie_key_u8` with 20 bytes of data.
        assert_eq!(size_of::<SourceRangeKey>(), 24);
    }

    #[test]
    fn source_range_keys_mask_the_address_past_the_prefix() {
        // 10.1.2.3/16 of service 7: the service id and 96 + 16 bits of the mapped address.
        let key = source_range_key(7, &ipv4_mapped([10, 1, 2, 3]), 96 + 16);
        assert_eq!(key.prefixlen, 32 + 96 + 16);
        assert_eq!(key.service_id, [0, 0, 0, 7]);
        assert_eq!(key.addr, ipv4_mapped([10, 1, 0, 0]));
        assert_eq!(key.data()[..4], [0, 0, 0, 7]);
        assert_eq!(key.data()[4..], key.addr);
        // A prefix inside a byte: 192.168.77.0/20 keeps the high nibble of the third byte.
        let key = source_range_key(1, &ipv4_mapped([192, 168, 77, 9]), 96 + 20);
        assert_eq!(key.addr, ipv4_mapped([192, 168, 64, 0]));
        // IPv6 /0 (everyone) keeps nothing of the address; /128 keeps all; more is 128.
        let v6 = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(source_range_key(1, &v6, 0).addr, [0; 16]);
        assert_eq!(source_range_key(1, &v6, 0).prefixlen, 32);
        assert_eq!(source_range_key(1, &v6, 128).addr, v6);
        assert_eq!(source_range_key(1, &v6, 200), source_range_key(1, &v6, 128));
        assert_eq!(SOURCE_RANGE_FULL_PREFIX, 32 + 128);
        // From a Service's own notation, and back.
        let v4 = core::net::IpAddr::from([10, 1, 2, 3]);
        let key = source_range_key_of(7, v4, 16).unwrap();
        assert_eq!(key, source_range_key(7, &ipv4_mapped([10, 1, 0, 0]), 112));
        assert_eq!(
            source_range_of(&key),
            Some((core::net::IpAddr::from([10, 1, 0, 0]), 16))
        );
        assert_eq!(source_range_key_of(7, v4, 33), None);
        let v6 = core::net::IpAddr::from(v6);
        let key = source_range_key_of(7, v6, 32).unwrap();
        assert_eq!(key.prefixlen, 64);
        assert_eq!(
            source_range_of(&key),
            Some((
                core::net::IpAddr::from([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                32
            ))
        );
        assert_eq!(source_range_key_of(7, v6, 129), None);
        // Written two ways, one range.
        assert_eq!(
            source_range_key(3, &ipv4_mapped([10, 0, 0, 1]), 104),
            source_range_key(3, &ipv4_mapped([10, 0, 0, 0]), 104)
        );
    }

    #[test]
    fn ipv4_mapping_round_trips() {
        let mapped = ipv4_mapped([198, 18, 0, 1]);
        assert!(is_ipv4_mapped(&mapped));
        assert_eq!(mapped[12..], [198, 18, 0, 1]);
        assert!(!is_ipv4_mapped(&[
            0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
    }

    #[test]
    fn vip_filter_bits_spread_nearby_addresses() {
        extern crate std;
        use std::{collections::HashSet, vec::Vec};
        // 10,000 IPv4 VIPs of one /18 and as many IPv6 ones of one /64: few share a bit, so a
        // packet to an address near them rarely pays for a service lookup.
        let v4 = (0..10_000u32).map(|i| ipv4_mapped((0xc613_0000 + i).to_be_bytes()));
        let v6 = (0..10_000u32).map(|i| {
            let mut addr = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            addr[12..].copy_from_slice(&i.to_be_bytes());
            addr
        });
        for addrs in [v4.collect::<Vec<_>>(), v6.collect()] {
            let bits: HashSet<u32> = addrs.iter().map(vip_filter_bit).collect();
            assert!(bits.iter().all(|bit| *bit < VIP_FILTER_BITS));
            assert!(bits.len() > 9_900, "{} distinct bits", bits.len());
        }
    }
}
