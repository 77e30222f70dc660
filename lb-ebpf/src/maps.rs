//! The maps shared with userspace; their names are the contract in `lb_common::maps::names`.
use aya_ebpf::{
    btf_maps::{Array, DevMapHash, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use core::{ops::Deref, ptr::NonNull};

use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, Counter, FlowCounter, FlowKey, FlowValue,
    FragmentKey, FragmentPorts, ReverseValue, ServiceKey, ServiceValue, TunnelConfig,
    maps::{
        AFFINITY_SIZE, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, FRAGMENTS_SIZE,
        MAGLEV_MAX_SIZE, MAGLEV_TABLE_FLAGS, MAX_POD_PORTS, MAX_SERVICES, MAX_TUNNEL_PEERS,
        MAX_TX_PORTS, NEXT_HOP_SLOTS, REPLY_HOP_SLOTS, SOURCE_RANGES_SIZE, VIP_FILTER_WORDS,
    },
    select::SelectionMaps,
    stats::{EVENT_COUNT, REASON_COUNT},
};

/// VIP:port:proto -> service.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// VIP address -> number of services on it (with `VIP_ADDR_F_HOST` for the host's own
/// addresses): decides whether an unparseable packet is ours.
#[btf_map]
pub static VIP_ADDRS: HashMap<[u8; 16], u32, { MAX_SERVICES as usize }> = HashMap::new();

/// A bit per hash of every service address (`lb_common::maps::vip_filter_bit`), set by
/// userspace before the address's services are written: a clear bit sends a packet on without
/// a service lookup.
#[btf_map]
pub static VIP_FILTER: Array<u64, { VIP_FILTER_WORDS as usize }> = Array::new();

/// A service's Maglev table: slot 0 holds the table size M, slots 1..=M the backend ids, and
/// slots M+1..=2M, when present, the fallback table over the backends that take new flows.
/// `BPF_F_INNER_MAP` lets each service's table have its own size; `BPF_F_MMAPABLE` lets userspace
/// write it through a memory mapping.
pub type MaglevTable =
    Array<u32, { MAGLEV_MAX_SIZE as usize + 1 }, { MAGLEV_TABLE_FLAGS as usize }>;

/// Service id -> its Maglev table, swapped whole by one update.
#[btf_map]
pub static MAGLEV: HashOfMaps<u32, MaglevTable, { MAX_SERVICES as usize }> = HashOfMaps::new();

/// Backend id -> backend. Userspace sizes it (`--max-backends`) at load time.
#[btf_map]
pub static BACKENDS: Array<Backend, { DEFAULT_MAX_BACKENDS as usize }> = Array::new();

/// (service id, backend address, port) -> backend id: the backend a tunnel packet names.
/// Sized with `BACKENDS` at load time.
#[btf_map]
pub static BACKEND_IDS: HashMap<BackendKey, u32, { DEFAULT_MAX_BACKENDS as usize }> =
    HashMap::new();

/// This node's end of the tunnel to the other nodes (one slot).
#[btf_map]
pub static TUNNEL: Array<TunnelConfig, 1> = Array::new();

/// The other nodes' underlay addresses: the only sources whose tunnel packets are taken.
#[btf_map]
pub static TUNNEL_PEERS: HashMap<[u8; 16], u32, { MAX_TUNNEL_PEERS as usize }> = HashMap::new();

/// Forward 5-tuple (client -> VIP) -> backend. Userspace may resize it at load time.
#[btf_map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowValue, { DEFAULT_CONNTRACK_SIZE as usize }> =
    LruHashMap::new();

/// Reply 5-tuple (backend -> client) -> the VIP:port to restore.
#[btf_map]
pub static REVERSE_NAT: LruHashMap<FlowKey, ReverseValue, { DEFAULT_CONNTRACK_SIZE as usize }> =
    LruHashMap::new();

/// (client, service) -> the backend it last got.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_SIZE as usize }> =
    LruHashMap::new();

/// A first fragment's ports, for the later fragments of its datagram (both directions).
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts, { FRAGMENTS_SIZE as usize }> =
    LruHashMap::new();

/// Interfaces that accept XDP-redirected frames, keyed by ifindex.
#[btf_map]
pub static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

/// Host-side interfaces of local pods (ifindex -> 0, reserved for flags): frames for them are moved
/// into the pod's namespace by the TC ingress program, not routed by the host's stack.
#[btf_map]
pub static POD_PORTS: HashMap<u32, u32, { MAX_POD_PORTS as usize }> = HashMap::new();

/// The client ranges of services with `SERVICE_F_SOURCE_RANGES`: an LPM trie over
/// [`lb_common::SourceRangeKey::data`] (the service id, big-endian, then the client address),
/// value 0 (reserved). Created with `BPF_F_NO_PREALLOC`, which LPM tries require.
#[btf_map]
pub static SOURCE_RANGES: LpmTrie<[u8; 20], u32, { SOURCE_RANGES_SIZE as usize }> = LpmTrie::new();

/// Per-packet working state, kept off the 512-byte stack.
#[derive(Default)]
pub struct Scratch {
    /// The parsed packet.
    pub packet: crate::parse::Packet,
    /// The backend chosen for it.
    pub selected: crate::select::Selected,
    /// The backend another node chose for it, when it came through the tunnel.
    pub assigned: crate::tunnel::Assigned,
    /// A reply's flow, as the reverse table holds it (here rather than on the stack, where
    /// initialising it cost a memset call per reply).
    pub reverse: lb_common::ReverseValue,
}

/// One [`Scratch`] per CPU; a program run owns its CPU's slot until it returns.
#[btf_map]
pub static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// Scratch space for the route lookup's parameters, which do not fit the 512-byte stack beside
/// the rest of the program's state.
#[btf_map]
pub static FIB_PARAMS: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup, 1> = PerCpuArray::new();

/// A backend's next hop as the last route lookup found it.
#[derive(Clone, Copy)]
pub struct NextHop {
    /// When the entry stops being used (`bpf_ktime_get_ns`).
    pub expires_ns: u64,
    /// The backend address it was looked up for (slots are reused by other backends).
    pub addr: [u8; 16],
    /// The interface the looked-up frame arrived on.
    pub ingress: u32,
    /// The interface to send on.
    pub egress: u32,
    /// How frames reach the egress: [`crate::forward::PATH_KERNEL`] (not known to be
    /// possible), [`crate::forward::PATH_XDP`] (XDP_TX, or a redirect to a port in `TX_PORTS`)
    /// or [`crate::forward::PATH_POD`] (a local pod's interface in `POD_PORTS`).
    pub path: u32,
    /// Whether the lookup found a route and a neighbour (else the kernel forwards).
    pub routable: u32,
    /// The egress MTU (0: unknown); a larger packet goes to the kernel.
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Next hops per CPU, a cache of route lookups: backend `id` uses slot `id % NEXT_HOP_SLOTS`
/// (checking the address and ingress it was looked up for), so the route lookup, the most
/// expensive step of forwarding, is done once per backend every
/// [`crate::forward::NEXT_HOP_TTL_NS`], not per packet. Its size does not follow the backend
/// capacity: it is per CPU, and a few thousand backends in use at once cover most nodes.
#[btf_map]
pub static NEXT_HOPS: PerCpuArray<NextHop, { NEXT_HOP_SLOTS as usize }> = PerCpuArray::new();

/// Routes to clients per CPU, for replies the pod program sends straight out: client address
/// `a` uses slot `hash(a) % REPLY_HOP_SLOTS`, checked against the address and ingress it was
/// looked up for, and kept as long as `NEXT_HOPS`' entries.
#[btf_map]
pub static REPLY_HOPS: PerCpuArray<NextHop, { REPLY_HOP_SLOTS as usize }> = PerCpuArray::new();

/// One [`Counter`] per [`lb_common::Reason`].
#[btf_map]
pub static STATS: PerCpuArray<Counter, { REASON_COUNT as usize }> = PerCpuArray::new();

/// One count per [`lb_common::Event`].
#[btf_map]
pub static EVENTS: PerCpuArray<u64, { EVENT_COUNT as usize }> = PerCpuArray::new();

/// Traffic per service id.
#[btf_map]
pub static SERVICE_STATS: PerCpuArray<FlowCounter, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Traffic per backend id, sized with `BACKENDS`.
#[btf_map]
pub static BACKEND_STATS: PerCpuArray<FlowCounter, { DEFAULT_MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// A value of a hash map as a lookup found it: read through `Deref`, written in place with
/// [`Entry::get_mut`], so a packet that updates the entry it looked up costs one lookup.
#[derive(Clone, Copy)]
pub struct Entry<T>(NonNull<T>);

impl<T> Deref for Entry<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        // SAFETY: a value of the map, valid for the program run; other CPUs may write the same
        // entry, at worst losing one state or lifetime update that the next packet makes again.
        unsafe { self.0.as_ref() }
    }
}

impl<T> Entry<T> {
    /// The value, to update in place (see `deref`).
    #[inline(always)]
    pub fn get_mut(&mut self) -> &mut T {
        // SAFETY: as `deref`.
        unsafe { self.0.as_mut() }
    }
}

/// The maps backend selection reads ([`lb_common::select`]).
pub struct Selection;

impl SelectionMaps for Selection {
    type Flow = Entry<FlowValue>;
    type Affinity = Entry<AffinityValue>;
    type Backend = &'static Backend;

    #[inline(always)]
    fn flow(&self, key: &FlowKey) -> Option<Entry<FlowValue>> {
        CONNTRACK.get_ptr_mut(key).and_then(NonNull::new).map(Entry)
    }

    #[inline(always)]
    fn backend(&self, id: u32) -> Option<&'static Backend> {
        BACKENDS.get(id)
    }

    #[inline(always)]
    fn affinity(&self, key: &AffinityKey) -> Option<Entry<AffinityValue>> {
        AFFINITY.get_ptr_mut(key).and_then(NonNull::new).map(Entry)
    }

    #[inline(always)]
    fn maglev_slot(&self, service_id: u32, hash: u32) -> Option<u32> {
        // SAFETY: the table is only read; userspace replaces whole tables, never edits one in
        // use.
        let table = unsafe { MAGLEV.get(&service_id) }?;
        let size = *table.get(0)?;
        if size == 0 {
            return None;
        }
        table.get(1 + hash % size).copied()
    }

    #[inline(always)]
    fn maglev_fallback_slot(&self, service_id: u32, hash: u32) -> Option<u32> {
        // SAFETY: as in `maglev_slot`.
        let table = unsafe { MAGLEV.get(&service_id) }?;
        let size = *table.get(0)?;
        if size == 0 {
            return None;
        }
        // A table without fallback ends at slot M: the lookup finds nothing.
        table.get(1 + size + hash % size).copied()
    }
}
