//! Connection tracking as a pure function: how a flow's state and lifetime change with each
//! packet. The kernel programs apply it to every tracked packet; the views (`explain`,
//! `describe`) and the controller's sweep of expired flows read the same states and names.
//!
//! One entry in `CONNTRACK` (keyed by the client -> VIP 5-tuple) holds the flow's state and its
//! one lifetime; the entry in `REVERSE_NAT` (keyed by the backend -> client 5-tuple) lives and
//! dies with it.
//!
//! Lifetimes follow netfilter's defaults where they exist (UDP 30 s until a reply, 120 s once
//! replied), and Cilium's for an established TCP flow (6 hours without a packet) and for a
//! connection attempt (60 s).

use crate::{Backend, Event, FlowKey, FlowValue, ReverseValue, maps::PROTO_TCP};

/// `FlowValue::state`: the backend has answered (a packet went backend -> client).
pub const CT_REPLIED: u16 = 1;
/// `FlowValue::state`: the client sent a FIN.
pub const CT_FIN_CLIENT: u16 = 1 << 1;
/// `FlowValue::state`: the backend sent a FIN.
pub const CT_FIN_BACKEND: u16 = 1 << 2;
/// `FlowValue::state`: the flow was first seen by a packet that did not open it (a TCP segment
/// without SYN: its entry was evicted, or it moved here from another node).
pub const CT_PICKED_UP: u16 = 1 << 3;
/// `FlowValue::state`: the flow's backend lives on another node, reached through the tunnel:
/// its replies go from that node straight to the client and never pass here. A client's ACK
/// stands for the backend's answer (a client acknowledges only what it received), so the flow
/// lives as long here as on the backend's node.
pub const CT_REMOTE: u16 = 1 << 4;

/// TCP header flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
/// SYN.
pub const TCP_SYN: u8 = 0x02;
/// RST.
pub const TCP_RST: u8 = 0x04;
/// ACK.
pub const TCP_ACK: u8 = 0x10;

const SECOND_NS: u64 = 1_000_000_000;
/// A TCP connection that has not been answered yet (SYN sent).
pub const TCP_OPENING_LIFETIME_NS: u64 = 60 * SECOND_NS;
/// An established TCP connection without a packet in either direction.
pub const TCP_ESTABLISHED_LIFETIME_NS: u64 = 6 * 3600 * SECOND_NS;
/// A TCP flow picked up mid-stream that the backend has not answered yet: a stray segment
/// (the last ACK of a connection already removed, a spoofed ACK) is forgotten soon, while a
/// real connection is answered within a round trip and becomes established.
pub const TCP_PICKED_UP_LIFETIME_NS: u64 = 10 * SECOND_NS;
/// A TCP connection one side has closed (FIN one way): the other side may still send.
pub const TCP_HALF_CLOSED_LIFETIME_NS: u64 = 120 * SECOND_NS;
/// A TCP connection both sides closed, waiting for the last ACK; it is removed when that ACK
/// passes, this only bounds a lost one.
pub const TCP_CLOSING_LIFETIME_NS: u64 = 10 * SECOND_NS;
/// A UDP flow the backend has not answered.
pub const UDP_LIFETIME_NS: u64 = 30 * SECOND_NS;
/// A UDP flow the backend has answered.
pub const UDP_REPLIED_LIFETIME_NS: u64 = 120 * SECOND_NS;

/// An entry's lifetime is written again only when it moves by more than this: at most one write
/// per flow and second, not one per packet.
pub const LIFETIME_GRANULARITY_NS: u64 = SECOND_NS;

/// Which way a packet of a flow goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client -> VIP (XDP ingress).
    Forward,
    /// Backend -> client (TC egress).
    Reply,
}

/// What a packet does to its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The flow's new state bits.
    pub state: u16,
    /// How long the flow lives from now without another packet.
    pub lifetime_ns: u64,
    /// The flow is over: its entries are removed once this packet is sent on.
    pub remove: bool,
}

/// The state a new flow starts in, from its first packet (client -> VIP) with TCP `flags`.
#[must_use]
pub const fn opened(proto: u8, flags: u8) -> u16 {
    if proto == PROTO_TCP && flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        CT_PICKED_UP
    } else {
        0
    }
}

/// The transition a packet going `direction` with TCP `flags` (ignored for UDP) makes from
/// `state`.
#[must_use]
pub const fn on_packet(proto: u8, state: u16, direction: Direction, flags: u8) -> Transition {
    if proto != PROTO_TCP {
        let state = match direction {
            Direction::Forward => state,
            Direction::Reply => state | CT_REPLIED,
        };
        let lifetime_ns = if state & CT_REPLIED != 0 {
            UDP_REPLIED_LIFETIME_NS
        } else {
            UDP_LIFETIME_NS
        };
        return Transition {
            state,
            lifetime_ns,
            remove: false,
        };
    }
    let mut next = state;
    if let Direction::Reply = direction {
        next |= CT_REPLIED;
    }
    if state & CT_REMOTE != 0 && flags & TCP_ACK != 0 {
        next |= CT_REPLIED;
    }
    if flags & TCP_RST != 0 {
        return Transition {
            state: next,
            lifetime_ns: 0,
            remove: true,
        };
    }
    let closed_before = state & (CT_FIN_CLIENT | CT_FIN_BACKEND) == CT_FIN_CLIENT | CT_FIN_BACKEND;
    if flags & TCP_FIN != 0 {
        next |= match direction {
            Direction::Forward => CT_FIN_CLIENT,
            Direction::Reply => CT_FIN_BACKEND,
        };
    }
    let closed = next & (CT_FIN_CLIENT | CT_FIN_BACKEND) == CT_FIN_CLIENT | CT_FIN_BACKEND;
    // Both sides have sent FIN: the last ACK (of the side that closed first, answering the
    // other's FIN) ends the connection.
    let last_ack = closed_before && flags & (TCP_ACK | TCP_FIN | TCP_SYN) == TCP_ACK;
    let lifetime_ns = if closed {
        TCP_CLOSING_LIFETIME_NS
    } else if next & (CT_FIN_CLIENT | CT_FIN_BACKEND) != 0 {
        TCP_HALF_CLOSED_LIFETIME_NS
    } else if next & CT_REPLIED != 0 {
        TCP_ESTABLISHED_LIFETIME_NS
    } else if next & CT_PICKED_UP != 0 {
        TCP_PICKED_UP_LIFETIME_NS
    } else {
        TCP_OPENING_LIFETIME_NS
    };
    Transition {
        state: next,
        lifetime_ns,
        remove: last_ack,
    }
}

/// A TCP segment that opens a connection: SYN without ACK. It never follows an old entry.
#[must_use]
pub const fn is_syn(proto: u8, flags: u8) -> bool {
    proto == PROTO_TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether a packet that finds no entry should create one: every packet but a TCP RST (it ends
/// whatever it belongs to).
#[must_use]
pub const fn creates_entry(proto: u8, flags: u8) -> bool {
    proto != PROTO_TCP || flags & TCP_RST == 0
}

/// A state's name, as `explain` and `describe` print it.
#[must_use]
pub const fn state_name(proto: u8, state: u16) -> &'static str {
    let replied = state & CT_REPLIED != 0;
    if proto != PROTO_TCP {
        return if replied { "replied" } else { "unreplied" };
    }
    match (
        state & CT_FIN_CLIENT != 0,
        state & CT_FIN_BACKEND != 0,
        replied,
    ) {
        (true, true, _) => "closing",
        (true, false, _) => "client-closed",
        (false, true, _) => "backend-closed",
        (false, false, true) => "established",
        (false, false, false) if state & CT_PICKED_UP != 0 => "picked-up",
        (false, false, false) => "syn-sent",
    }
}

/// Whether an entry written to expire at `expires_ns` has expired at `now_ns` (both
/// `CLOCK_MONOTONIC`, as `bpf_ktime_get_coarse_ns` reads it).
#[must_use]
pub const fn expired(expires_ns: u64, now_ns: u64) -> bool {
    expires_ns <= now_ns
}

/// What a packet does with the connection-table entry it finds: the one decision the kernel
/// makes and `explain` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// The entry decides: the packet goes to its backend.
    Follow,
    /// A SYN without ACK: a new connection on a reused 5-tuple, placed afresh.
    Syn,
    /// The entry is another service's (its id was reused): placed afresh.
    OtherService,
    /// The entry expired: placed afresh by the current table.
    Expired,
    /// Its backend no longer serves the service (removed): placed afresh.
    BackendGone,
}

impl Found {
    /// The event the kernel counts for it.
    #[must_use]
    pub const fn event(self) -> Event {
        match self {
            Self::Follow => Event::ConntrackHit,
            Self::Syn => Event::ConntrackSynReplaced,
            Self::OtherService => Event::ConntrackForeign,
            Self::Expired => Event::ConntrackExpired,
            Self::BackendGone => Event::ConntrackRebalanced,
        }
    }
}

/// What a packet of service `service_id` (`ipv4`, a SYN without ACK when `syn`) does with the
/// entry it found at `now_ns`, whose backend slot holds `backend`.
#[must_use]
pub fn judge(
    entry: &FlowValue,
    backend: Option<&Backend>,
    service_id: u32,
    ipv4: bool,
    syn: bool,
    now_ns: u64,
) -> Found {
    if syn {
        Found::Syn
    } else if entry.service_id != service_id {
        Found::OtherService
    } else if expired(entry.expires_ns, now_ns) {
        Found::Expired
    } else if !backend.is_some_and(|b| b.serves(service_id, ipv4)) {
        Found::BackendGone
    } else {
        Found::Follow
    }
}

/// The forward key (client -> VIP) of the flow whose replies have key `reply` (backend ->
/// client) and are rewritten as `to`: how a reply, and the sweep, find a flow's entry.
#[must_use]
pub const fn forward_key_of_reply(reply: &FlowKey, to: &ReverseValue) -> FlowKey {
    FlowKey {
        src: reply.dst,
        dst: to.vip,
        sport: reply.dport,
        dport: to.vip_port,
        proto: reply.proto,
        pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::maps::PROTO_UDP;

    const SYN: u8 = TCP_SYN;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const ACK: u8 = TCP_ACK;
    const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
    const RST: u8 = TCP_RST;

    /// Runs `packets` from a new flow opened by the first; returns every transition.
    fn run(proto: u8, packets: &[(Direction, u8)]) -> Vec<Transition> {
        let mut state = opened(proto, packets[0].1);
        packets
            .iter()
            .map(|&(direction, flags)| {
                let t = on_packet(proto, state, direction, flags);
                state = t.state;
                t
            })
            .collect()
    }

    use Direction::{Forward as F, Reply as R};

    #[test]
    fn a_tcp_connection_lives_from_syn_to_the_last_ack_of_a_client_close() {
        let t = run(
            PROTO_TCP,
            &[
                (F, SYN),
                (R, SYN_ACK),
                (F, ACK),
                (F, FIN_ACK),
                (R, FIN_ACK),
                (F, ACK),
            ],
        );
        let names: Vec<_> = t.iter().map(|t| state_name(PROTO_TCP, t.state)).collect();
        assert_eq!(
            names,
            [
                "syn-sent",
                "established",
                "established",
                "client-closed",
                "closing",
                "closing"
            ]
        );
        assert_eq!(t[0].lifetime_ns, TCP_OPENING_LIFETIME_NS);
        assert_eq!(t[1].lifetime_ns, TCP_ESTABLISHED_LIFETIME_NS);
        assert_eq!(t[3].lifetime_ns, TCP_HALF_CLOSED_LIFETIME_NS);
        assert_eq!(t[4].lifetime_ns, TCP_CLOSING_LIFETIME_NS);
        let removed: Vec<_> = t.iter().map(|t| t.remove).collect();
        assert_eq!(removed, [false, false, false, false, false, true]);
    }

    #[test]
    fn a_backend_close_ends_with_the_backends_last_ack() {
        let t = run(
            PROTO_TCP,
            &[(F, SYN), (R, SYN_ACK), (R, FIN_ACK), (F, FIN_ACK), (R, ACK)],
        );
        assert_eq!(state_name(PROTO_TCP, t[2].state), "backend-closed");
        assert_eq!(
            t.iter().map(|t| t.remove).collect::<Vec<_>>(),
            [false, false, false, false, true]
        );
    }

    #[test]
    fn a_half_closed_connection_keeps_flowing_the_other_way() {
        let t = run(
            PROTO_TCP,
            &[(F, SYN), (R, SYN_ACK), (F, FIN_ACK), (R, ACK), (R, ACK)],
        );
        assert!(t.iter().all(|t| !t.remove));
        assert_eq!(t[4].lifetime_ns, TCP_HALF_CLOSED_LIFETIME_NS);
    }

    #[test]
    fn a_reset_either_way_removes_the_flow() {
        for direction in [F, R] {
            let t = run(PROTO_TCP, &[(F, SYN), (R, SYN_ACK), (direction, RST)]);
            assert!(t[2].remove);
        }
        assert!(!creates_entry(PROTO_TCP, RST));
        assert!(creates_entry(PROTO_TCP, ACK));
        assert!(creates_entry(PROTO_UDP, 0));
    }

    #[test]
    fn a_retransmitted_fin_after_both_fins_is_not_the_last_ack() {
        let t = run(
            PROTO_TCP,
            &[
                (F, SYN),
                (R, SYN_ACK),
                (F, FIN_ACK),
                (R, FIN_ACK),
                (R, FIN_ACK),
            ],
        );
        assert!(!t[4].remove);
    }

    #[test]
    fn a_flow_picked_up_mid_stream_is_named_so_until_answered() {
        assert_eq!(opened(PROTO_TCP, ACK), CT_PICKED_UP);
        assert_eq!(opened(PROTO_TCP, SYN), 0);
        let t = run(PROTO_TCP, &[(F, ACK), (R, ACK)]);
        assert_eq!(state_name(PROTO_TCP, t[0].state), "picked-up");
        assert_eq!(t[0].lifetime_ns, TCP_PICKED_UP_LIFETIME_NS);
        assert_eq!(state_name(PROTO_TCP, t[1].state), "established");
        assert_eq!(t[1].lifetime_ns, TCP_ESTABLISHED_LIFETIME_NS);
    }

    #[test]
    fn udp_lives_30_s_until_answered_then_120_s() {
        let t = run(PROTO_UDP, &[(F, 0), (F, 0), (R, 0), (F, 0)]);
        assert_eq!(t[0].lifetime_ns, UDP_LIFETIME_NS);
        assert_eq!(t[1].lifetime_ns, UDP_LIFETIME_NS);
        assert_eq!(t[2].lifetime_ns, UDP_REPLIED_LIFETIME_NS);
        assert_eq!(t[3].lifetime_ns, UDP_REPLIED_LIFETIME_NS);
        assert!(t.iter().all(|t| !t.remove));
        assert_eq!(state_name(PROTO_UDP, t[3].state), "replied");
    }

    #[test]
    fn only_a_syn_without_ack_opens() {
        assert!(is_syn(PROTO_TCP, SYN));
        assert!(!is_syn(PROTO_TCP, SYN_ACK));
        assert!(!is_syn(PROTO_TCP, ACK));
        assert!(!is_syn(PROTO_UDP, SYN));
    }

    #[test]
    fn an_entry_is_followed_only_by_a_non_syn_of_its_service_while_it_lives_and_its_backend_serves()
    {
        use crate::maps::{BACKEND_F_VALID, ipv4_mapped};
        let entry = FlowValue {
            backend_id: 7,
            service_id: 3,
            expires_ns: 100,
            ..FlowValue::default()
        };
        let backend = Backend {
            addr: ipv4_mapped([198, 18, 1, 1]),
            port: 8080,
            flags: BACKEND_F_VALID,
            service_id: 3,
            node: [0; 16],
        };
        let judge = |backend: Option<&Backend>, service, ipv4, syn, now| {
            judge(&entry, backend, service, ipv4, syn, now)
        };
        assert_eq!(judge(Some(&backend), 3, true, false, 50), Found::Follow);
        assert_eq!(judge(Some(&backend), 3, true, true, 50), Found::Syn);
        assert_eq!(
            judge(Some(&backend), 4, true, false, 50),
            Found::OtherService
        );
        assert_eq!(judge(Some(&backend), 3, true, false, 100), Found::Expired);
        assert_eq!(judge(None, 3, true, false, 50), Found::BackendGone);
        assert_eq!(
            judge(Some(&backend), 3, false, false, 50),
            Found::BackendGone
        );
        let emptied = Backend {
            flags: 0,
            ..backend
        };
        assert_eq!(
            judge(Some(&emptied), 3, true, false, 50),
            Found::BackendGone
        );
        let reused = Backend {
            service_id: 9,
            ..backend
        };
        assert_eq!(judge(Some(&reused), 3, true, false, 50), Found::BackendGone);
    }

    #[test]
    fn expiry_is_inclusive() {
        assert!(expired(5, 5));
        assert!(!expired(6, 5));
    }

    #[test]
    fn a_flow_on_another_node_lives_on_its_client_s_acks() {
        // The receiving node sees only the client's packets: its ACK of the backend's SYN-ACK
        // makes the flow established there, as it is on the backend's node.
        let mut state = opened(PROTO_TCP, SYN) | CT_REMOTE;
        let syn = on_packet(PROTO_TCP, state, F, SYN);
        assert_eq!(syn.lifetime_ns, TCP_OPENING_LIFETIME_NS);
        state = syn.state;
        let ack = on_packet(PROTO_TCP, state, F, ACK);
        assert_eq!(ack.state, CT_REMOTE | CT_REPLIED);
        assert_eq!(ack.lifetime_ns, TCP_ESTABLISHED_LIFETIME_NS);
        assert_eq!(state_name(PROTO_TCP, ack.state), "established");
        // Without the bit, an ACK alone proves nothing.
        assert_eq!(
            on_packet(PROTO_TCP, 0, F, ACK).lifetime_ns,
            TCP_OPENING_LIFETIME_NS
        );
        // A client's RST still ends it.
        assert!(on_packet(PROTO_TCP, ack.state, F, RST | ACK).remove);
    }
}
