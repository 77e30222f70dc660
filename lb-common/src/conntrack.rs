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

use crate::maps::PROTO_TCP;

/// `FlowValue::state`: the backend has answered (a packet went backend -> client).
pub const CT_REPLIED: u16 = 1;
/// `FlowValue::state`: the client sent a FIN.
pub const CT_FIN_CLIENT: u16 = 1 << 1;
/// `FlowValue::state`: the backend sent a FIN.
pub const CT_FIN_BACKEND: u16 = 1 << 2;
/// `FlowValue::state`: the flow was first seen by a packet that did not open it (a TCP segment
/// without SYN: its entry was evicted, or it moved here from another node).
pub const CT_PICKED_UP: u16 = 1 << 3;

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
    fn expiry_is_inclusive() {
        assert!(expired(5, 5));
        assert!(!expired(6, 5));
    }
}
