//! Backend selection: the connection table first, then ClientIP affinity, then the service's
//! Maglev table.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    AffinityKey, AffinityValue, Backend, Event, FlowKey, FlowValue, ReverseValue, ServiceValue,
    hash::{client_hash, flow_hash},
    maps::{BACKEND_F_TERMINATING, BACKEND_F_VALID, SERVICE_F_AFFINITY, is_ipv4_mapped},
};

use crate::{
    maps::{AFFINITY, BACKENDS, CONNTRACK, MAGLEV, REVERSE_NAT},
    parse::Packet,
    stats,
};

/// The backend a packet goes to.
#[derive(Default)]
pub struct Selected {
    pub id: u32,
    pub backend: Backend,
    /// The packet placed a new flow.
    pub new_flow: bool,
}

/// The flow key of a parsed packet, as seen on the wire.
#[inline(always)]
pub fn flow_key(packet: &Packet) -> FlowKey {
    FlowKey {
        src: packet.src,
        dst: packet.dst,
        sport: packet.sport,
        dport: packet.dport,
        proto: packet.proto,
        pad: [0; 3],
    }
}

/// The backend with `id`, if it is live and of the packet's address family.
#[inline(always)]
fn live_backend(id: u32, ipv4: bool) -> Option<Backend> {
    let backend = *BACKENDS.get(id)?;
    (backend.flags & BACKEND_F_VALID != 0 && is_ipv4_mapped(&backend.addr) == ipv4)
        .then_some(backend)
}

/// A backend that may take a new flow: live and not terminating.
#[inline(always)]
fn accepting_backend(id: u32, ipv4: bool) -> Option<Backend> {
    live_backend(id, ipv4).filter(|backend| backend.flags & BACKEND_F_TERMINATING == 0)
}

/// The backend id in the Maglev slot `hash` falls on.
#[inline(always)]
fn maglev_pick(service_id: u32, hash: u32) -> Option<u32> {
    // SAFETY: the table is only read; userspace replaces whole tables, never edits one in use.
    let table = unsafe { MAGLEV.get(&service_id) }?;
    let size = *table.get(0)?;
    if size == 0 {
        return None;
    }
    table.get(1 + hash % size).copied()
}

/// Picks the backend of `packet` for `service` into `selected`, tracking the flow if it is
/// new; false when the service has no usable backend.
///
/// Not inlined, and writing through `selected` rather than returning it: its temporaries get a
/// stack frame of their own, and BPF functions return no aggregates.
#[inline(never)]
pub fn backend(packet: &Packet, service: &ServiceValue, selected: &mut Selected) -> bool {
    let key = flow_key(packet);
    // SAFETY: the value is copied out at once.
    if let Some(tracked) = unsafe { CONNTRACK.get(&key) }.copied() {
        if let Some(backend) = live_backend(tracked.backend_id, packet.ipv4) {
            stats::event(Event::ConntrackHit);
            *selected = Selected {
                id: tracked.backend_id,
                backend,
                new_flow: false,
            };
            return true;
        }
        stats::event(Event::ConntrackRebalanced);
    } else {
        stats::event(Event::ConntrackMiss);
    }
    let Some((id, backend)) = place_new_flow(packet, service) else {
        return false;
    };
    track(&key, packet, service.id, id, &backend);
    *selected = Selected {
        id,
        backend,
        new_flow: true,
    };
    true
}

#[inline(always)]
fn place_new_flow(packet: &Packet, service: &ServiceValue) -> Option<(u32, Backend)> {
    if service.flags & SERVICE_F_AFFINITY == 0 {
        let hash = flow_hash(
            &packet.src,
            &packet.dst,
            packet.sport,
            packet.dport,
            packet.proto,
        );
        let id = maglev_pick(service.id, hash)?;
        return accepting_backend(id, packet.ipv4).map(|backend| (id, backend));
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let key = AffinityKey {
        client: packet.src,
        service_id: service.id,
    };
    let timeout_ns = u64::from(service.affinity_timeout_secs) * 1_000_000_000;
    // SAFETY: the value is copied out at once.
    let remembered = unsafe { AFFINITY.get(&key) }
        .copied()
        .filter(|seen| now.saturating_sub(seen.last_used_ns) < timeout_ns)
        .and_then(|seen| {
            accepting_backend(seen.backend_id, packet.ipv4).map(|b| (seen.backend_id, b))
        });
    let (id, backend) = match remembered {
        Some(found) => {
            stats::event(Event::AffinityHit);
            found
        }
        None => {
            let id = maglev_pick(service.id, client_hash(&packet.src, &packet.dst))?;
            (id, accepting_backend(id, packet.ipv4)?)
        }
    };
    let value = AffinityValue {
        backend_id: id,
        pad: 0,
        last_used_ns: now,
    };
    if AFFINITY.insert(&key, &value, 0).is_err() {
        stats::event(Event::ConntrackInsertFailed);
    }
    Some((id, backend))
}

/// Records a new flow in the connection table and its reply in the reverse-NAT table.
///
/// Not inlined: the reply key and value get a stack frame of their own.
#[inline(never)]
fn track(key: &FlowKey, packet: &Packet, service_id: u32, id: u32, backend: &Backend) {
    let forward = FlowValue {
        backend_id: id,
        service_id,
    };
    let reply = FlowKey {
        src: backend.addr,
        dst: packet.src,
        sport: backend.port,
        dport: packet.sport,
        proto: packet.proto,
        pad: [0; 3],
    };
    let reverse = ReverseValue {
        vip: packet.dst,
        vip_port: packet.dport,
        pad: 0,
        service_id,
        backend_id: id,
    };
    if CONNTRACK.insert(key, &forward, 0).is_err()
        || REVERSE_NAT.insert(&reply, &reverse, 0).is_err()
    {
        stats::event(Event::ConntrackInsertFailed);
    }
}
