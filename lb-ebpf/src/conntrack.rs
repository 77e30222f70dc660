//! Connection tracking, after Cilium's `bpf/lib/conntrack.h`: the one module that builds flow
//! keys and reads, creates, updates and removes the entries of `CONNTRACK` (client -> VIP,
//! holding the flow's state and its one lifetime) and `REVERSE_NAT` (backend -> client, living
//! and dying with it). How a packet changes a flow is `lb_common::conntrack`'s pure function.
use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    Backend, Event, FlowKey, FlowValue, ReverseValue,
    conntrack::{
        self, CT_FIN_BACKEND, CT_FIN_CLIENT, CT_REMOTE, Direction, Found, LIFETIME_GRANULARITY_NS,
        TCP_FIN, TCP_RST, TCP_SYN,
    },
    maps::{PROTO_TCP, is_ipv4_mapped},
    select::Tracked,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, Entry, REVERSE_NAT},
    parse::Packet,
    stats,
};

/// Now, on the clock entries expire by (`CLOCK_MONOTONIC`, coarse: a few ms of resolution is
/// plenty for lifetimes of seconds, and it costs no clock read).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
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

/// The key of the replies of the forward flow of `packet` (client -> VIP) placed on `backend`.
#[inline(always)]
fn reply_key(packet: &Packet, backend: &Backend) -> FlowKey {
    FlowKey {
        src: backend.addr,
        dst: packet.src,
        sport: backend.port,
        dport: packet.sport,
        proto: packet.proto,
        pad: [0; 3],
    }
}

/// Applies a packet's transition to a live entry: writes the state when it changes and the
/// lifetime when it moves by more than [`LIFETIME_GRANULARITY_NS`]. Returns whether the flow is
/// over.
#[inline(always)]
fn advance(entry: &mut FlowValue, packet: &Packet, direction: Direction, now: u64) -> bool {
    let step = conntrack::on_packet(packet.proto, entry.state, direction, packet.tcp_flags);
    let expires_ns = now + step.lifetime_ns;
    if step.state != entry.state {
        entry.state = step.state;
        entry.expires_ns = expires_ns;
    } else if expires_ns.abs_diff(entry.expires_ns) > LIFETIME_GRANULARITY_NS {
        entry.expires_ns = expires_ns;
    }
    step.remove
}

/// Counts what a forward `packet` made of its connection-table entry (`tracked`, as
/// [`lb_common::select::select`] judged it). An entry not followed is replaced by the new
/// placement: the old reverse entry (its backend's, if that slot still holds it) goes now, so
/// no late reply of the old placement is rewritten into the new one.
#[inline(always)]
pub fn judged(packet: &Packet, tracked: &Tracked<Entry<FlowValue>, &Backend>) {
    let (Some(entry), Some(found)) = (tracked.entry, tracked.found) else {
        let syn = conntrack::is_syn(packet.proto, packet.tcp_flags);
        stats::event(if syn || packet.proto != PROTO_TCP {
            Event::ConntrackMiss
        } else {
            Event::ConntrackMissNonSyn
        });
        return;
    };
    stats::event(found.event());
    if found == Found::Follow {
        return;
    }
    if let Some(old) = tracked
        .backend
        .filter(|b| b.serves(entry.service_id, packet.ipv4))
    {
        let _ = REVERSE_NAT.remove(&reply_key(packet, old));
    }
}

/// Applies a forward `packet` (client -> VIP) to the entry it follows, on `backend`.
///
/// A SYN without ACK never follows an old entry ([`conntrack::judge`]): a new connection on a
/// reused 5-tuple is placed afresh, and the old connection's reverse entry is removed with it.
#[inline(always)]
pub fn follow(key: &FlowKey, packet: &Packet, mut entry: Entry<FlowValue>, backend: &Backend) {
    if advance(entry.get_mut(), packet, Direction::Forward, packet.now_ns) {
        // The last packet of the flow: it is still sent on, the entries go now.
        remove(key, &reply_key(packet, backend));
    }
}

/// Records a new flow of `packet` (client -> VIP) placed on `backend` in both tables, as the
/// packet leaves it (an RST is sent on but not recorded). A flow whose backend lives on
/// another node ([`CT_REMOTE`]) gets no reverse entry: its replies never pass here.
///
/// Not inlined: the entries get a stack frame of their own.
#[inline(never)]
pub fn create(key: &FlowKey, packet: &Packet, service_id: u32, id: u32, backend: &Backend) {
    if !conntrack::creates_entry(packet.proto, packet.tcp_flags) {
        return;
    }
    let now = packet.now_ns;
    let remote = backend.node != [0u8; 16];
    let mut entry = FlowValue {
        backend_id: id,
        service_id,
        expires_ns: 0,
        state: conntrack::opened(packet.proto, packet.tcp_flags)
            | if remote { CT_REMOTE } else { 0 },
        pad: [0; 6],
    };
    advance(&mut entry, packet, Direction::Forward, now);
    if remote {
        if CONNTRACK.insert(key, &entry, 0).is_err() {
            stats::event(Event::ConntrackInsertFailed);
        }
        return;
    }
    let reverse = ReverseValue {
        vip: packet.dst,
        vip_port: packet.dport,
        state: entry.state,
        service_id,
        backend_id: id,
        pad: 0,
        checked_ns: 0,
    };
    if CONNTRACK.insert(key, &entry, 0).is_err()
        || REVERSE_NAT
            .insert(&reply_key(packet, backend), &reverse, 0)
            .is_err()
    {
        stats::event(Event::ConntrackInsertFailed);
    }
}

/// Removes a flow's two entries.
#[inline(always)]
fn remove(forward: &FlowKey, reply: &FlowKey) {
    let _ = CONNTRACK.remove(forward);
    let _ = REVERSE_NAT.remove(reply);
    stats::event(Event::ConntrackClosed);
}

/// What a reply (backend -> client) must be rewritten to, with the packet applied to its
/// flow; false when it is not a reply of a tracked flow.
///
/// A reply updates its flow's entry (its state, its lifetime) only when it can change it: the
/// first reply, one with FIN, RST or SYN, or one more than [`LIFETIME_GRANULARITY_NS`] after
/// the last update. Every other reply costs one lookup, the reverse entry's.
#[inline(always)]
pub fn reply(packet: &mut Packet, to: &mut ReverseValue) -> bool {
    reply_if(packet, to, |_| true)
}

/// As [`reply`], but only when `may_take` agrees, asked once the reverse entry is found and
/// before anything changes: a reply it refuses leaves its flow as it was, for whoever takes it
/// next. One lookup of the reverse table either way.
///
/// Not inlined: the keys get a stack frame of their own.
#[inline(never)]
pub fn reply_if(
    packet: &mut Packet,
    to: &mut ReverseValue,
    may_take: impl FnOnce(&Packet) -> bool,
) -> bool {
    let key = flow_key(packet);
    let Some(found) = REVERSE_NAT.get_ptr_mut(&key) else {
        return false;
    };
    if !may_take(packet) {
        return false;
    }
    // SAFETY: a value of the map; another CPU may write the same entry, at worst losing one
    // state or lifetime update that the next packet makes again.
    let found = unsafe { &mut *found };
    *to = *found;
    packet.now_ns = now_ns();
    let now = packet.now_ns;
    if packet.tcp_flags & (TCP_FIN | TCP_RST | TCP_SYN) == 0
        && found.state & (CT_FIN_CLIENT | CT_FIN_BACKEND) == 0
        && found.checked_ns != 0
        && now < found.checked_ns + LIFETIME_GRANULARITY_NS
    {
        return true;
    }
    let forward = conntrack::forward_key_of_reply(&key, to);
    let closed = match CONNTRACK.get_ptr_mut(&forward) {
        // SAFETY: a value of the map; another CPU may write the same entry, at worst losing one
        // state or lifetime update that the next packet makes again.
        Some(entry) => {
            let entry = unsafe { &mut *entry };
            if entry.backend_id != to.backend_id {
                // The client's port now belongs to a newer connection on another backend.
                stats::event(Event::ReverseStale);
                let _ = REVERSE_NAT.remove(&key);
                return false;
            }
            // A reply revives an entry that expired but is not swept yet: the flow is alive.
            let closed = advance(entry, packet, Direction::Reply, now);
            found.state = entry.state;
            closed
        }
        None => {
            // The flow's entry was evicted (a table over capacity): write it again from the
            // reverse one, so the next forward packet still finds its backend.
            stats::event(Event::ConntrackRestored);
            let mut entry = FlowValue {
                backend_id: to.backend_id,
                service_id: to.service_id,
                expires_ns: 0,
                state: conntrack::CT_PICKED_UP,
                pad: [0; 6],
            };
            let closed = advance(&mut entry, packet, Direction::Reply, now);
            if !closed && CONNTRACK.insert(&forward, &entry, 0).is_err() {
                stats::event(Event::ConntrackInsertFailed);
            }
            found.state = entry.state;
            closed
        }
    };
    if closed {
        remove(&forward, &key);
    } else {
        found.checked_ns = now;
    }
    true
}

/// The backend of the flow a forward key names, for ICMP errors about it.
#[inline(always)]
pub fn backend_of(key: &FlowKey) -> Option<(u32, Backend)> {
    // SAFETY: the value is copied out at once.
    let flow = unsafe { CONNTRACK.get(key) }.copied()?;
    let backend = *BACKENDS.get(flow.backend_id)?;
    backend
        .serves(flow.service_id, is_ipv4_mapped(&key.src))
        .then_some((flow.backend_id, backend))
}

/// What a backend's ICMP error about the flow whose reply key is `key` must be rewritten to.
#[inline(always)]
pub fn reverse_of(key: &FlowKey) -> Option<ReverseValue> {
    // SAFETY: the value is copied out at once.
    unsafe { REVERSE_NAT.get(key) }.copied()
}
