//! Backend selection, written once: the connection table first, then ClientIP affinity, then
//! the service's Maglev table. The kernel program runs it over its BPF maps for every forward
//! packet; `explain` runs it over the same maps, pinned, so what it says is what the kernel
//! does.
//!
//! It only reads. The kernel does its table writes around it, after the decision: the tracked
//! flow's state advance, a new flow's entries, the affinity entry's insert or refresh.

use core::ops::Deref;

use crate::{
    AffinityKey, AffinityValue, Backend, FlowKey, FlowValue, ServiceValue,
    conntrack::{Found, judge},
    hash::{client_hash, flow_hash},
    maps::{BACKEND_F_TERMINATING, SERVICE_F_AFFINITY},
};

/// How selection reads the maps. Values come back as handles: the kernel's point into the map
/// (so it updates an entry in place after the decision without a second lookup, and no value
/// is copied onto its small stack); userspace's hold a copy, [`Copied`].
pub trait SelectionMaps {
    /// A found `CONNTRACK` entry.
    type Flow: Deref<Target = FlowValue>;
    /// A found `AFFINITY` entry.
    type Affinity: Deref<Target = AffinityValue>;
    /// A `BACKENDS` slot.
    type Backend: Deref<Target = Backend> + Copy;
    /// The `CONNTRACK` entry of `key`.
    fn flow(&self, key: &FlowKey) -> Option<Self::Flow>;
    /// The `BACKENDS` slot `id`.
    fn backend(&self, id: u32) -> Option<Self::Backend>;
    /// The `AFFINITY` entry of `key`.
    fn affinity(&self, key: &AffinityKey) -> Option<Self::Affinity>;
    /// The backend id in the slot `hash` falls on in service `service_id`'s Maglev table
    /// (slot `1 + hash % M`, slot 0 holding the size `M`); `None` without a table or with an
    /// empty one.
    fn maglev_slot(&self, service_id: u32, hash: u32) -> Option<u32>;
    /// The backend id in the slot `hash` falls on in the fallback table that follows the first
    /// (slot `1 + M + hash % M`): it places only backends that take new flows, for the flows
    /// whose first slot names one that does not. `None` without a fallback table.
    fn maglev_fallback_slot(&self, service_id: u32, hash: u32) -> Option<u32>;
}

/// A map entry read by copy: userspace's handle.
#[derive(Clone, Copy, Debug)]
pub struct Copied<T>(pub T);

impl<T> Deref for Copied<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The packet a selection is for.
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    /// Its forward 5-tuple (client -> VIP).
    pub key: &'a FlowKey,
    /// Its service.
    pub service: &'a ServiceValue,
    /// Its address family.
    pub ipv4: bool,
    /// A TCP SYN without ACK ([`crate::conntrack::is_syn`]).
    pub syn: bool,
    /// Now, on the clock entries expire by.
    pub now_ns: u64,
    /// The backend another node placed the packet on, when it came through the tunnel: a new
    /// placement is that node's, not this one's (its tables may be a moment older or newer).
    pub assigned: Option<u32>,
}

/// The connection-table entry a packet found, and what it made of it: all `None` when it
/// found none. (Options side by side rather than one optional struct: whatever the path, every
/// field holds a defined value, and the kernel's compiler never merges an undefined one, which
/// the verifier refuses as an uninitialised register.)
pub struct Tracked<F, B> {
    /// The entry.
    pub entry: Option<F>,
    /// The judgement ([`judge`]).
    pub found: Option<Found>,
    /// The backend slot the entry names, as read.
    pub backend: Option<B>,
}

/// Where a packet goes.
#[derive(Debug)]
pub enum Choice<A, B> {
    /// Its tracked flow's backend ([`Selection::tracked`] is followed).
    Tracked {
        /// Backend id.
        backend_id: u32,
        /// The backend.
        backend: B,
    },
    /// ClientIP affinity: the client's last backend of the service, within the timeout and
    /// still taking new flows.
    Affinity {
        /// The affinity entry (the kernel refreshes its last use).
        entry: A,
        /// Backend id.
        backend_id: u32,
        /// The backend.
        backend: B,
    },
    /// A new placement by the Maglev table.
    Maglev {
        /// The hash (the flow's, or the client's with affinity).
        hash: u32,
        /// Backend id.
        backend_id: u32,
        /// The backend.
        backend: B,
    },
    /// The backend the node that received the packet picked ([`Query::assigned`]).
    Assigned {
        /// Backend id.
        backend_id: u32,
        /// The backend.
        backend: B,
    },
    /// No backend takes the packet.
    None,
}

/// A selection: the tracked entry found (if any) and the choice.
pub struct Selection<M: SelectionMaps + ?Sized> {
    /// The connection-table entry of the packet's 5-tuple, judged.
    pub tracked: Tracked<M::Flow, M::Backend>,
    /// Where the packet goes.
    pub choice: Choice<M::Affinity, M::Backend>,
}

/// The backend slot `id`, if it may take a new flow of `service_id`: live, of the packet's
/// address family, not terminating, and the service's own (a stale affinity entry of a recycled
/// service id can never reach another service's backend).
#[inline(always)]
pub fn accepting<M: SelectionMaps>(
    maps: &M,
    id: u32,
    service_id: u32,
    ipv4: bool,
) -> Option<M::Backend> {
    let backend = maps.backend(id)?;
    (backend.serves(service_id, ipv4) && backend.flags & BACKEND_F_TERMINATING == 0)
        .then_some(backend)
}

/// The backend slot `id`, if it serves `service_id` in the packet's address family (live,
/// terminating or not).
#[inline(always)]
fn serving<M: SelectionMaps>(maps: &M, id: u32, service_id: u32, ipv4: bool) -> Option<M::Backend> {
    let backend = maps.backend(id)?;
    backend.serves(service_id, ipv4).then_some(backend)
}

/// Whether an affinity entry last used at `last_used_ns` still holds at `now_ns` for a
/// timeout of `timeout_secs`.
#[inline(always)]
#[must_use]
pub const fn affinity_live(last_used_ns: u64, now_ns: u64, timeout_secs: u32) -> bool {
    now_ns.saturating_sub(last_used_ns) < timeout_secs as u64 * 1_000_000_000
}

/// Selects the backend of the packet `query` describes: its tracked flow's when the entry is
/// followed ([`judge`]), else (with affinity) the client's last backend while it holds and
/// takes new flows, else the Maglev table's. Reads only.
#[inline(always)]
pub fn select<M: SelectionMaps>(maps: &M, query: &Query) -> Selection<M> {
    let service_id = query.service.id;
    let mut tracked = Tracked {
        entry: None,
        found: None,
        backend: None,
    };
    if let Some(entry) = maps.flow(query.key) {
        let backend = maps.backend(entry.backend_id);
        let found = judge(
            &entry,
            backend.as_deref(),
            service_id,
            query.ipv4,
            query.syn,
            query.now_ns,
        );
        if let (Found::Follow, Some(backend)) = (found, backend) {
            let backend_id = entry.backend_id;
            return Selection {
                tracked: Tracked {
                    entry: Some(entry),
                    found: Some(found),
                    backend: Some(backend),
                },
                choice: Choice::Tracked {
                    backend_id,
                    backend,
                },
            };
        }
        tracked = Tracked {
            entry: Some(entry),
            found: Some(found),
            backend,
        };
    }
    Selection {
        tracked,
        choice: place(maps, query),
    }
}

/// A new placement: the receiving node's (through the tunnel), else ClientIP affinity, then
/// Maglev.
#[inline(always)]
fn place<M: SelectionMaps>(maps: &M, query: &Query) -> Choice<M::Affinity, M::Backend> {
    let service = query.service;
    if let Some(backend_id) = query.assigned {
        // A terminating backend is taken too: the receiving node decided while it was not,
        // and its own table sends the flow's next packets there anyway.
        return match serving(maps, backend_id, service.id, query.ipv4) {
            Some(backend) => Choice::Assigned {
                backend_id,
                backend,
            },
            None => Choice::None,
        };
    }
    let key = query.key;
    let hash = if service.flags & SERVICE_F_AFFINITY == 0 {
        flow_hash(&key.src, &key.dst, key.sport, key.dport, key.proto)
    } else {
        let affinity_key = AffinityKey {
            client: key.src,
            service_id: service.id,
        };
        if let Some(entry) = maps.affinity(&affinity_key) {
            // Read once: another CPU may place this client anew meanwhile.
            let backend_id = entry.backend_id;
            if affinity_live(
                entry.last_used_ns,
                query.now_ns,
                service.affinity_timeout_secs,
            ) && let Some(backend) = accepting(maps, backend_id, service.id, query.ipv4)
            {
                return Choice::Affinity {
                    entry,
                    backend_id,
                    backend,
                };
            }
        }
        client_hash(&key.src, &key.dst)
    };
    let Some(backend_id) = maps.maglev_slot(service.id, hash) else {
        return Choice::None;
    };
    if let Some(backend) = accepting(maps, backend_id, service.id, query.ipv4) {
        return Choice::Maglev {
            hash,
            backend_id,
            backend,
        };
    }
    // The first table names a backend that takes no new flows (not ready, terminating): the
    // fallback table, over those that do. Every other flow keeps its first-table backend
    // whatever the others' readiness, so a pod going away moves no other pod's new flows.
    let Some(backend_id) = maps.maglev_fallback_slot(service.id, hash) else {
        return Choice::None;
    };
    match accepting(maps, backend_id, service.id, query.ipv4) {
        Some(backend) => Choice::Maglev {
            hash,
            backend_id,
            backend,
        },
        None => Choice::None,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::BTreeMap, vec::Vec};

    use super::*;
    use crate::maps::{BACKEND_F_VALID, PROTO_TCP, ipv4_mapped};

    #[derive(Default)]
    struct Maps {
        flows: BTreeMap<[u8; 40], FlowValue>,
        backends: Vec<Backend>,
        affinity: Option<AffinityValue>,
        table: Vec<u32>,
        fallback: Vec<u32>,
    }

    fn bytes(key: &FlowKey) -> [u8; 40] {
        let mut out = [0; 40];
        out[..16].copy_from_slice(&key.src);
        out[16..32].copy_from_slice(&key.dst);
        out[32..34].copy_from_slice(&key.sport.to_le_bytes());
        out[34..36].copy_from_slice(&key.dport.to_le_bytes());
        out[36] = key.proto;
        out
    }

    impl SelectionMaps for Maps {
        type Flow = Copied<FlowValue>;
        type Affinity = Copied<AffinityValue>;
        type Backend = Copied<Backend>;
        fn flow(&self, key: &FlowKey) -> Option<Self::Flow> {
            self.flows.get(&bytes(key)).copied().map(Copied)
        }
        fn backend(&self, id: u32) -> Option<Self::Backend> {
            self.backends.get(id as usize).copied().map(Copied)
        }
        fn affinity(&self, _: &AffinityKey) -> Option<Self::Affinity> {
            self.affinity.map(Copied)
        }
        fn maglev_slot(&self, _: u32, hash: u32) -> Option<u32> {
            let size = u32::try_from(self.table.len()).ok()?;
            (size > 0).then(|| self.table[(hash % size) as usize])
        }
        fn maglev_fallback_slot(&self, _: u32, hash: u32) -> Option<u32> {
            let size = u32::try_from(self.fallback.len()).ok()?;
            (size > 0).then(|| self.fallback[(hash % size) as usize])
        }
    }

    fn backend(i: u8, flags: u16) -> Backend {
        Backend {
            addr: ipv4_mapped([198, 18, 1, i]),
            port: 8080,
            flags,
            service_id: 1,
            node: [0; 16],
        }
    }

    fn kind<A, B>(choice: &Choice<A, B>) -> (&'static str, u32) {
        match choice {
            Choice::Tracked { backend_id, .. } => ("tracked", *backend_id),
            Choice::Affinity { backend_id, .. } => ("affinity", *backend_id),
            Choice::Maglev { backend_id, .. } => ("maglev", *backend_id),
            Choice::Assigned { backend_id, .. } => ("assigned", *backend_id),
            Choice::None => ("none", 0),
        }
    }

    #[test]
    fn tracked_then_affinity_then_maglev() {
        let key = FlowKey {
            src: ipv4_mapped([198, 18, 0, 1]),
            dst: ipv4_mapped([198, 18, 100, 1]),
            sport: 40000,
            dport: 8080,
            proto: PROTO_TCP,
            pad: [0; 3],
        };
        let service = ServiceValue {
            id: 1,
            flags: SERVICE_F_AFFINITY,
            affinity_timeout_secs: 10,
        };
        let mut maps = Maps {
            backends: std::vec![
                Backend::default(),
                backend(1, BACKEND_F_VALID),
                backend(2, BACKEND_F_VALID),
                backend(3, BACKEND_F_VALID | BACKEND_F_TERMINATING),
            ],
            table: std::vec![1],
            ..Maps::default()
        };
        let now = 100_000_000_000;
        let query = Query {
            key: &key,
            service: &service,
            ipv4: true,
            syn: false,
            now_ns: now,
            assigned: None,
        };
        assert_eq!(kind(&select(&maps, &query).choice), ("maglev", 1));
        // A fresh affinity entry wins; an expired one, or one naming a terminating backend,
        // does not.
        maps.affinity = Some(AffinityValue {
            backend_id: 2,
            pad: 0,
            last_used_ns: now - 9_000_000_000,
        });
        assert_eq!(kind(&select(&maps, &query).choice), ("affinity", 2));
        maps.affinity.as_mut().unwrap().last_used_ns = now - 10_000_000_000;
        assert_eq!(kind(&select(&maps, &query).choice), ("maglev", 1));
        maps.affinity = Some(AffinityValue {
            backend_id: 3,
            pad: 0,
            last_used_ns: now,
        });
        assert_eq!(kind(&select(&maps, &query).choice), ("maglev", 1));
        // A live tracked entry decides, even on a terminating backend.
        maps.flows.insert(
            bytes(&key),
            FlowValue {
                backend_id: 3,
                service_id: 1,
                expires_ns: now + 1,
                ..FlowValue::default()
            },
        );
        assert_eq!(kind(&select(&maps, &query).choice), ("tracked", 3));
        let syn = Query { syn: true, ..query };
        let selection = select(&maps, &syn);
        assert_eq!(kind(&selection.choice), ("maglev", 1));
        assert_eq!(selection.tracked.found, Some(Found::Syn));
        // A first-table slot naming a backend that takes no new flows: the fallback table's.
        maps.flows.clear();
        maps.affinity = None;
        maps.table = std::vec![3];
        assert_eq!(kind(&select(&maps, &syn).choice), ("none", 0));
        maps.fallback = std::vec![2];
        assert_eq!(kind(&select(&maps, &syn).choice), ("maglev", 2));
        maps.table = std::vec![1];
        assert_eq!(kind(&select(&maps, &syn).choice), ("maglev", 1));
        maps.flows.insert(
            bytes(&key),
            FlowValue {
                backend_id: 3,
                service_id: 1,
                expires_ns: now + 1,
                ..FlowValue::default()
            },
        );
        // A packet another node placed (through the tunnel) goes where that node said when it
        // opens a flow, even to a terminating backend, and follows its tracked entry otherwise.
        let assigned = Query {
            assigned: Some(3),
            ..syn
        };
        assert_eq!(kind(&select(&maps, &assigned).choice), ("assigned", 3));
        let assigned_mid_flow = Query {
            assigned: Some(2),
            ..query
        };
        assert_eq!(
            kind(&select(&maps, &assigned_mid_flow).choice),
            ("tracked", 3)
        );
        // ... never to a slot that does not serve the service.
        let nowhere = Query {
            assigned: Some(0),
            ..syn
        };
        assert_eq!(kind(&select(&maps, &nowhere).choice), ("none", 0));
        // No table: nothing.
        maps.table.clear();
        assert_eq!(kind(&select(&maps, &syn).choice), ("none", 0));
    }
}
