//! Backend selection: the connection table first, then ClientIP affinity, then the service's
//! Maglev table.
use lb_common::{
    AffinityKey, AffinityValue, Backend, Event, ServiceValue,
    hash::{client_hash, flow_hash},
    maps::{BACKEND_F_TERMINATING, SERVICE_F_AFFINITY},
};

use crate::{
    conntrack,
    maps::{AFFINITY, BACKENDS, MAGLEV},
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

/// The backend with `id`, if it may take a new flow of `service_id`: live, of the packet's
/// address family, not terminating, and the service's own (a stale affinity entry of a
/// recycled service id can never reach another service's backend).
#[inline(always)]
fn accepting_backend(id: u32, service_id: u32, ipv4: bool) -> Option<Backend> {
    let backend = *BACKENDS.get(id)?;
    (backend.serves(service_id, ipv4) && backend.flags & BACKEND_F_TERMINATING == 0)
        .then_some(backend)
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
    let key = conntrack::flow_key(packet);
    if let Some(tracked) = conntrack::forward(&key, packet, service.id) {
        *selected = Selected {
            id: tracked.backend_id,
            backend: tracked.backend,
            new_flow: false,
        };
        return true;
    }
    let Some((id, backend)) = place_new_flow(packet, service) else {
        return false;
    };
    conntrack::create(&key, packet, service.id, id, &backend);
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
        return accepting_backend(id, service.id, packet.ipv4).map(|backend| (id, backend));
    }
    let now = packet.now_ns;
    let key = AffinityKey {
        client: packet.src,
        service_id: service.id,
    };
    let timeout_ns = u64::from(service.affinity_timeout_secs) * 1_000_000_000;
    if let Some(seen) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a value of the map; another CPU may write the same entry, at worst moving
        // its last use by one packet's worth.
        let seen = unsafe { &mut *seen };
        // Read once: another CPU may place this client anew meanwhile.
        let backend_id = seen.backend_id;
        let remembered = (now.saturating_sub(seen.last_used_ns) < timeout_ns)
            .then(|| accepting_backend(backend_id, service.id, packet.ipv4))
            .flatten();
        if let Some(backend) = remembered {
            stats::event(Event::AffinityHit);
            // Updated in place: a client's next connection costs no table insert.
            seen.last_used_ns = now;
            return Some((backend_id, backend));
        }
    }
    let id = maglev_pick(service.id, client_hash(&packet.src, &packet.dst))?;
    let backend = accepting_backend(id, service.id, packet.ipv4)?;
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
