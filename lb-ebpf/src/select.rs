//! Backend selection: the decision is `lb_common::select`'s, shared with `explain`, run here over
//! the BPF maps; the table writes it implies (the tracked flow's advance, a new flow's entries,
//! the affinity entry's insert or refresh) are made here, after it.
use lb_common::{
    AffinityKey, AffinityValue, Backend, Event, ServiceValue,
    conntrack::is_syn,
    maps::SERVICE_F_AFFINITY,
    select::{Choice, Query, select},
};

use crate::{
    conntrack,
    frame::copy_bytes,
    maps::{AFFINITY, Selection},
    parse::Packet,
    stats,
};

/// `assigned` of [`backend`] for a packet that did not come through the tunnel.
pub const NOT_ASSIGNED: u32 = u32::MAX;

/// The backend a packet goes to.
#[derive(Default)]
pub struct Selected {
    pub id: u32,
    pub backend: Backend,
    /// The packet placed a new flow.
    pub new_flow: bool,
}

impl Selected {
    /// Records backend `id`, copied field by field from its slot in `BACKENDS`: a plain copy
    /// between two maps' values compiles to a byte-at-a-time `memmove` call (see
    /// `frame::copy_bytes`).
    #[inline(always)]
    fn set(&mut self, id: u32, backend: &Backend, new_flow: bool) {
        self.id = id;
        copy_bytes(&mut self.backend.addr, &backend.addr);
        self.backend.port = backend.port;
        self.backend.flags = backend.flags;
        self.backend.service_id = backend.service_id;
        copy_bytes(&mut self.backend.node, &backend.node);
        self.new_flow = new_flow;
    }
}

/// Picks the backend of `packet` for `service` into `selected`, tracking the flow if it is
/// new; false when the service has no usable backend. `assigned`: the backend the node that
/// received the packet picked, when it came through the tunnel, else [`NOT_ASSIGNED`] (a
/// plain number: an `Option` takes two of the five argument registers, and the verifier
/// refuses reading the unset one).
///
/// Not inlined, and writing through `selected` rather than returning it: its temporaries get a
/// stack frame of their own, and BPF functions return no aggregates.
#[inline(never)]
pub fn backend(
    packet: &Packet,
    service: &ServiceValue,
    selected: &mut Selected,
    assigned: u32,
) -> bool {
    let key = conntrack::flow_key(packet);
    let query = Query {
        key: &key,
        service,
        ipv4: packet.ipv4,
        syn: is_syn(packet.proto, packet.tcp_flags),
        now_ns: packet.now_ns,
        assigned: (assigned != NOT_ASSIGNED).then_some(assigned),
    };
    let selection = select(&Selection, &query);
    conntrack::judged(packet, &selection.tracked);
    let (id, backend) = match selection.choice {
        Choice::Tracked {
            backend_id,
            backend,
        } => {
            if let Some(entry) = selection.tracked.entry {
                conntrack::follow(&key, packet, entry, backend);
            }
            selected.set(backend_id, backend, false);
            return true;
        }
        Choice::Affinity {
            mut entry,
            backend_id,
            backend,
        } => {
            stats::event(Event::AffinityHit);
            // Updated in place: a client's next connection costs no table insert.
            entry.get_mut().last_used_ns = packet.now_ns;
            (backend_id, backend)
        }
        Choice::Maglev {
            backend_id,
            backend,
            ..
        } => {
            if service.flags & SERVICE_F_AFFINITY != 0 {
                remember(packet, service, backend_id);
            }
            (backend_id, backend)
        }
        Choice::Assigned {
            backend_id,
            backend,
        } => (backend_id, backend),
        Choice::None => return false,
    };
    conntrack::create(&key, packet, service.id, id, backend);
    selected.set(id, backend, true);
    true
}

/// Records that the client of `packet` got backend `id` of `service` (ClientIP affinity).
#[inline(always)]
fn remember(packet: &Packet, service: &ServiceValue, id: u32) {
    let key = AffinityKey {
        client: packet.src,
        service_id: service.id,
    };
    let value = AffinityValue {
        backend_id: id,
        pad: 0,
        last_used_ns: packet.now_ns,
    };
    if AFFINITY.insert(&key, &value, 0).is_err() {
        stats::event(Event::ConntrackInsertFailed);
    }
}
