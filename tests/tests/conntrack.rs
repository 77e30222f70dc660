//! Connection tracking through BPF_PROG_TEST_RUN: flows live exactly as long as their TCP and
//! UDP connections. Each case drives both programs (client -> VIP through XDP, backend ->
//! client through TC) and reads both tables, so a flow's state, its lifetime and the removal of
//! its two entries are checked, not inferred.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    Event, FlowKey, FlowValue, Reason,
    conntrack::{
        self, TCP_ACK, TCP_ESTABLISHED_LIFETIME_NS, TCP_FIN, TCP_OPENING_LIFETIME_NS, TCP_RST,
        TCP_SYN, UDP_LIFETIME_NS, UDP_REPLIED_LIFETIME_NS,
    },
    maps::{BACKEND_F_TERMINATING, BACKEND_F_VALID, PROTO_TCP, PROTO_UDP},
};
use lb_tests::frames::{Spec, assert_checksums_valid};
use lb_userspace::{
    Dataplane,
    conntrack::{FlowTables, now_ns},
    dataplane::LoadOptions,
};

mod harness;
use harness::*;

const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
const FIN_ACK: u8 = TCP_FIN | TCP_ACK;

/// The reply to `request` from `backend` (as the backend sends it, before reverse NAT).
fn reply_of(request: &Spec, backend: IpAddr, flags: u8) -> Spec {
    let mut reply = request.with_flags(flags);
    reply.src = backend;
    reply.sport = TARGET_PORT;
    reply.dst = request.src;
    reply.dport = request.sport;
    reply
}

/// The connection-table key of `request`'s flow.
fn key_of(request: &Spec) -> FlowKey {
    FlowKey {
        src: addr16(request.src),
        dst: addr16(request.dst),
        sport: request.sport,
        dport: request.dport,
        proto: if request.tcp { PROTO_TCP } else { PROTO_UDP },
        pad: [0; 3],
    }
}

fn entry(lb: &Lb, request: &Spec) -> Option<FlowValue> {
    let key = key_of(request);
    lb.dataplane
        .flows()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn state(lb: &Lb, request: &Spec) -> &'static str {
    let proto = if request.tcp { PROTO_TCP } else { PROTO_UDP };
    entry(lb, request).map_or("gone", |v| conntrack::state_name(proto, v.state))
}

/// Sends a forward packet (DNATed, to the kernel: no route here) and checks it was.
fn forward(lb: &Lb, request: &Spec, flags: u8) -> u8 {
    let (verdict, output) = lb.run(&request.with_flags(flags).build());
    assert_eq!(verdict, XDP_PASS);
    assert_checksums_valid(&output);
    backend_of(&output)
}

/// Sends a reply through TC and checks it was rewritten to the VIP.
fn reply(lb: &Lb, request: &Spec, backend: IpAddr, flags: u8) {
    let (verdict, output) = lb.run_tc(&reply_of(request, backend, flags).build());
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let mut expected = reply_of(request, backend, flags);
    expected.src = request.dst;
    expected.sport = request.dport;
    assert_eq!(output, expected.build(), "reply rewritten to the VIP");
}

fn one_backend_lb() -> Lb {
    let mut lb = Lb::new();
    lb.service(1, VIP4, PROTO_TCP, 0, &[(1, backend4(1), BACKEND_F_VALID)]);
    lb.service(2, VIP4, PROTO_UDP, 0, &[(2, backend4(2), BACKEND_F_VALID)]);
    lb
}

fn tables_empty(lb: &Lb) -> bool {
    lb.dataplane.flows().unwrap().is_empty() && lb.dataplane.reverse_flows().unwrap().is_empty()
}

#[test]
fn a_connection_the_client_closes_is_removed_by_its_last_ack() {
    in_fresh_netns("ctcli", |_| {
        let lb = one_backend_lb();
        let request = Spec::tcp(CLIENT4, 40000, VIP4, PORT);
        let b = backend4(1);
        let mut states = Vec::new();
        forward(&lb, &request, TCP_SYN);
        states.push(state(&lb, &request));
        reply(&lb, &request, b, SYN_ACK);
        states.push(state(&lb, &request));
        forward(&lb, &request, TCP_ACK);
        reply(&lb, &request, b, TCP_ACK);
        states.push(state(&lb, &request));
        forward(&lb, &request, FIN_ACK);
        states.push(state(&lb, &request));
        reply(&lb, &request, b, FIN_ACK);
        states.push(state(&lb, &request));
        assert!(!tables_empty(&lb), "both FINs seen, the last ACK not yet");
        forward(&lb, &request, TCP_ACK);
        states.push(state(&lb, &request));
        assert_eq!(
            states,
            [
                "syn-sent",
                "established",
                "established",
                "client-closed",
                "closing",
                "gone"
            ]
        );
        assert!(tables_empty(&lb), "both entries removed");
        assert_eq!(lb.event(Event::ConntrackClosed), 1);
    });
}

#[test]
fn a_connection_the_backend_closes_is_removed_by_the_backends_last_ack() {
    in_fresh_netns("ctsrv", |_| {
        let lb = one_backend_lb();
        let request = Spec::tcp(CLIENT4, 40001, VIP4, PORT);
        let b = backend4(1);
        forward(&lb, &request, TCP_SYN);
        reply(&lb, &request, b, SYN_ACK);
        forward(&lb, &request, TCP_ACK);
        reply(&lb, &request, b, FIN_ACK);
        assert_eq!(state(&lb, &request), "backend-closed");
        forward(&lb, &request, FIN_ACK);
        assert_eq!(state(&lb, &request), "closing");
        // The backend's last ACK is still rewritten, then the flow is gone.
        reply(&lb, &request, b, TCP_ACK);
        assert!(tables_empty(&lb));
        assert_eq!(lb.event(Event::ConntrackClosed), 1);
    });
}

#[test]
fn a_reset_either_way_removes_the_flow_and_a_stray_reset_creates_none() {
    in_fresh_netns("ctrst", |_| {
        let lb = one_backend_lb();
        let b = backend4(1);
        let by_client = Spec::tcp(CLIENT4, 40002, VIP4, PORT);
        forward(&lb, &by_client, TCP_SYN);
        reply(&lb, &by_client, b, SYN_ACK);
        forward(&lb, &by_client, TCP_RST);
        assert!(tables_empty(&lb), "client RST");
        let by_backend = Spec::tcp(CLIENT4, 40003, VIP4, PORT);
        forward(&lb, &by_backend, TCP_SYN);
        reply(&lb, &by_backend, b, SYN_ACK);
        reply(&lb, &by_backend, b, TCP_RST | TCP_ACK);
        assert!(tables_empty(&lb), "backend RST");
        // An RST of no known flow is sent on (the backend decides) but not tracked.
        let stray = Spec::tcp(CLIENT4, 40004, VIP4, PORT);
        assert_eq!(forward(&lb, &stray, TCP_RST), 1);
        assert!(tables_empty(&lb));
        assert_eq!(lb.event(Event::ConntrackClosed), 2);
    });
}

#[test]
fn lifetimes_follow_the_state_for_tcp_and_udp() {
    in_fresh_netns("ctlife", |_| {
        let lb = one_backend_lb();
        let left = |request: &Spec| entry(&lb, request).unwrap().expires_ns - now_ns();
        let second = 1_000_000_000;
        let tcp = Spec::tcp(CLIENT4, 40005, VIP4, PORT);
        forward(&lb, &tcp, TCP_SYN);
        assert!(left(&tcp).abs_diff(TCP_OPENING_LIFETIME_NS) < 2 * second);
        reply(&lb, &tcp, backend4(1), SYN_ACK);
        assert!(left(&tcp).abs_diff(TCP_ESTABLISHED_LIFETIME_NS) < 2 * second);
        let udp = Spec::udp(CLIENT4, 40006, VIP4, PORT);
        forward(&lb, &udp, 0);
        assert_eq!(state(&lb, &udp), "unreplied");
        assert!(left(&udp).abs_diff(UDP_LIFETIME_NS) < 2 * second);
        reply(&lb, &udp, backend4(2), 0);
        assert_eq!(state(&lb, &udp), "replied");
        assert!(left(&udp).abs_diff(UDP_REPLIED_LIFETIME_NS) < 2 * second);
    });
}

/// A new connection that reuses a client port is placed afresh (a SYN never follows an old
/// entry): after the old connection's backend went terminating, it lands on a serving one, and
/// the old connection's reverse entry goes with the old entry.
#[test]
fn a_syn_on_a_stale_entry_is_placed_afresh() {
    in_fresh_netns("ctsyn", |_| {
        let mut lb = Lb::new();
        let two = valid_backends4(2);
        lb.service(1, VIP4, PROTO_TCP, 0, &two);
        // A client port whose flow Maglev puts on backend 2.
        let request = (20000..)
            .map(|p| Spec::tcp(CLIENT4, p, VIP4, PORT))
            .find(|r| {
                let b = backend_of(&lb.run(&r.build()).1);
                b == 2
            })
            .unwrap();
        reply(&lb, &request, backend4(2), SYN_ACK);
        assert_eq!(forward(&lb, &request, TCP_ACK), 2, "tracked on backend 2");
        // Backend 2 terminates: established flows stay on it...
        let terminating = [
            (1, backend4(1), BACKEND_F_VALID),
            (2, backend4(2), BACKEND_F_VALID | BACKEND_F_TERMINATING),
        ];
        lb.service(1, VIP4, PROTO_TCP, 0, &terminating);
        assert_eq!(forward(&lb, &request, TCP_ACK), 2);
        // ...but a new connection from the same port goes to a serving backend.
        let replaced = lb.event(Event::ConntrackSynReplaced);
        assert_eq!(forward(&lb, &request, TCP_SYN), 1);
        assert_eq!(lb.event(Event::ConntrackSynReplaced), replaced + 1);
        assert_eq!(entry(&lb, &request).unwrap().backend_id, 1);
        let reverse: Vec<_> = lb
            .dataplane
            .reverse_flows()
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.dport == request.sport)
            .collect();
        assert_eq!(reverse.len(), 1, "only the new connection's reverse entry");
        assert_eq!(reverse[0].1.backend_id, 1);
        // The old backend's late packet for that port is not rewritten into the new one.
        let (verdict, output) = lb.run_tc(&reply_of(&request, backend4(2), TCP_ACK).build());
        assert_eq!(verdict, TC_ACT_UNSPEC);
        assert_eq!(output, reply_of(&request, backend4(2), TCP_ACK).build());
    });
}

/// An expired entry is never followed: the flow is placed by the current table.
#[test]
fn an_expired_entry_is_placed_afresh() {
    in_fresh_netns("ctexp", |_| {
        let mut lb = Lb::new();
        lb.service(1, VIP4, PROTO_TCP, 0, &[(1, backend4(1), BACKEND_F_VALID)]);
        let request = Spec::tcp(CLIENT4, 40007, VIP4, PORT);
        assert_eq!(forward(&lb, &request, TCP_SYN), 1);
        reply(&lb, &request, backend4(1), SYN_ACK);
        // The service now has only backend 3 in its table (backend 1 still valid).
        lb.service(
            1,
            VIP4,
            PROTO_TCP,
            0,
            &[
                (1, backend4(1), BACKEND_F_VALID | BACKEND_F_TERMINATING),
                (3, backend4(3), BACKEND_F_VALID),
            ],
        );
        assert_eq!(forward(&lb, &request, TCP_ACK), 1, "live: kept");
        let mut value = entry(&lb, &request).unwrap();
        value.expires_ns = 1;
        lb.dataplane.set_flow(&key_of(&request), &value).unwrap();
        assert_eq!(forward(&lb, &request, TCP_ACK), 3, "expired: placed afresh");
        assert_eq!(lb.event(Event::ConntrackExpired), 1);
        assert_eq!(entry(&lb, &request).unwrap().backend_id, 3);
        assert_eq!(state(&lb, &request), "picked-up");
    });
}

/// An entry of another service (its id since reused) never takes a packet to that service's
/// backend.
#[test]
fn an_entry_of_another_service_is_ignored() {
    in_fresh_netns("ctfor", |_| {
        let mut lb = Lb::new();
        lb.service(1, VIP4, PROTO_TCP, 0, &[(1, backend4(1), BACKEND_F_VALID)]);
        let other = IpAddr::V4(Ipv4Addr::new(198, 18, 100, 2));
        lb.service(2, other, PROTO_TCP, 0, &[(2, backend4(2), BACKEND_F_VALID)]);
        let request = Spec::tcp(CLIENT4, 40008, VIP4, PORT);
        let stale = FlowValue {
            backend_id: 2,
            service_id: 2,
            expires_ns: now_ns() + TCP_ESTABLISHED_LIFETIME_NS,
            state: conntrack::CT_REPLIED,
            pad: [0; 6],
        };
        lb.dataplane.set_flow(&key_of(&request), &stale).unwrap();
        assert_eq!(forward(&lb, &request, TCP_ACK), 1);
        assert_eq!(lb.event(Event::ConntrackForeign), 1);
        // Nor an entry naming a backend that is not the service's.
        let stale = FlowValue {
            service_id: 1,
            ..stale
        };
        lb.dataplane.set_flow(&key_of(&request), &stale).unwrap();
        assert_eq!(forward(&lb, &request, TCP_ACK), 1);
    });
}

/// A reply whose flow entry was evicted writes it again, so the flow keeps its backend.
#[test]
fn a_reply_restores_an_evicted_flow_entry() {
    in_fresh_netns("ctres", |_| {
        let mut lb = one_backend_lb();
        let request = Spec::tcp(CLIENT4, 40009, VIP4, PORT);
        forward(&lb, &request, TCP_SYN);
        reply(&lb, &request, backend4(1), SYN_ACK);
        lb.dataplane.remove_flow(&key_of(&request)).unwrap();
        // A reply within a second of the last one that updated the flow changes nothing there
        // and does not look: the next one after that second does.
        reply(&lb, &request, backend4(1), TCP_ACK);
        assert_eq!(lb.event(Event::ConntrackRestored), 0);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        reply(&lb, &request, backend4(1), TCP_ACK);
        assert_eq!(lb.event(Event::ConntrackRestored), 1);
        let restored = entry(&lb, &request).unwrap();
        assert_eq!((restored.backend_id, restored.service_id), (1, 1));
        assert_eq!(state(&lb, &request), "established");
        forward(&lb, &request, TCP_ACK);
        assert_eq!(lb.event(Event::ConntrackHit), 1);
    });
}

/// A TCP segment without SYN that finds nothing is counted apart from SYNs (Katran's signal
/// for reshuffles and table thrash) and picked up.
#[test]
fn a_non_syn_miss_is_counted_apart_and_picked_up() {
    in_fresh_netns("ctnsyn", |_| {
        let lb = one_backend_lb();
        forward(&lb, &Spec::tcp(CLIENT4, 40010, VIP4, PORT), TCP_SYN);
        forward(&lb, &Spec::udp(CLIENT4, 40011, VIP4, PORT), 0);
        let mid = Spec::tcp(CLIENT4, 40012, VIP4, PORT);
        forward(&lb, &mid, TCP_ACK);
        assert_eq!(lb.event(Event::ConntrackMiss), 2);
        assert_eq!(lb.event(Event::ConntrackMissNonSyn), 1);
        assert_eq!(state(&lb, &mid), "picked-up");
    });
}

/// The sweep removes expired flows with their reverse entries, and reverse entries no live flow
/// owns; live flows stay.
#[test]
fn the_sweep_removes_expired_flows_and_orphans_only() {
    in_fresh_netns("ctswp", |_| {
        let mut lb = one_backend_lb();
        let live = Spec::tcp(CLIENT4, 40013, VIP4, PORT);
        forward(&lb, &live, TCP_SYN);
        reply(&lb, &live, backend4(1), SYN_ACK);
        let quiet = Spec::udp(CLIENT4, 40014, VIP4, PORT);
        forward(&lb, &quiet, 0);
        let orphaned = Spec::tcp(CLIENT4, 40015, VIP4, PORT);
        forward(&lb, &orphaned, TCP_SYN);
        lb.dataplane.remove_flow(&key_of(&orphaned)).unwrap();
        let tables = FlowTables::of(&lb.dataplane).unwrap();
        let report = tables.sweep(now_ns()).unwrap();
        assert_eq!((report.expired, report.orphans), (0, 1), "{report:?}");
        // 31 s later the UDP flow (30 s unreplied) has expired; the TCP one has not.
        let report = tables
            .sweep(now_ns() + UDP_LIFETIME_NS + 1_000_000_000)
            .unwrap();
        assert_eq!((report.expired, report.orphans), (1, 1), "{report:?}");
        let flows = lb.dataplane.flows().unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].0, key_of(&live));
        assert_eq!(lb.dataplane.reverse_flows().unwrap().len(), 1);
        reply(&lb, &live, backend4(1), TCP_ACK);
    });
}

/// The promise of the connection table: N entries keep every live flow as long as fewer than N
/// are alive at once, however many came and went. Idle connections outlive ten times the table
/// in short connections (closed normally) and in UDP flows that went quiet (swept), and their
/// replies still find the way back.
#[test]
fn idle_flows_outlive_ten_times_the_table_in_closed_and_quiet_flows() {
    in_fresh_netns("ctten", |_| {
        let mut lb = Lb::with_dataplane(
            Dataplane::load_with(LoadOptions {
                conntrack_size: 256,
                ..Default::default()
            })
            .unwrap(),
        );
        lb.service(1, VIP4, PROTO_TCP, 0, &valid_backends4(2));
        // Backend ids are per service, as the controller allocates them.
        lb.service(
            2,
            VIP4,
            PROTO_UDP,
            0,
            &[
                (3, backend4(1), BACKEND_F_VALID),
                (4, backend4(2), BACKEND_F_VALID),
            ],
        );
        let idle: Vec<(Spec, u8)> = (0..10)
            .map(|p| {
                let request = Spec::tcp(CLIENT4, 30000 + p, VIP4, PORT);
                let b = forward(&lb, &request, TCP_SYN);
                reply(&lb, &request, backend4(b), SYN_ACK);
                (request, b)
            })
            .collect();
        // Short connections, each closed normally: their last packet removes them.
        for n in 0..2600u16 {
            let client = IpAddr::V4(Ipv4Addr::new(198, 18, 9, (n / 200) as u8 + 1));
            let short = Spec::tcp(client, 1024 + n % 200, VIP4, PORT);
            let b = backend4(forward(&lb, &short, TCP_SYN));
            reply(&lb, &short, b, SYN_ACK);
            forward(&lb, &short, FIN_ACK);
            reply(&lb, &short, b, FIN_ACK);
            forward(&lb, &short, TCP_ACK);
        }
        // UDP flows that went quiet, 200 at a time (with the 10 idle ones always fewer than
        // the table's 256 alive): the sweep gives their room back.
        let tables = FlowTables::of(&lb.dataplane).unwrap();
        for round in 0..13u16 {
            for i in 0..200u16 {
                let client = IpAddr::V4(Ipv4Addr::new(198, 18, 10, round as u8 + 1));
                forward(&lb, &Spec::udp(client, 1024 + i, VIP4, PORT), 0);
            }
            // 31 s later for the sweep: the quiet UDP flows have expired, the idle TCP ones not.
            tables
                .sweep(now_ns() + UDP_LIFETIME_NS + 1_000_000_000)
                .unwrap();
        }
        assert_eq!(lb.event(Event::ConntrackClosed), 2600);
        for (request, b) in &idle {
            assert!(
                entry(&lb, request).is_some(),
                "idle flow {} kept",
                request.sport
            );
            // The backend speaks first: the reply is still rewritten to the VIP.
            reply(&lb, request, backend4(*b), TCP_ACK);
            assert_eq!(forward(&lb, request, TCP_ACK), *b);
        }
        assert_eq!(lb.reason(Reason::ReverseNat), 10 + 2600 * 2 + 10);
    });
}

#[test]
fn an_ipv6_udp_checksum_of_zero_stays_zero_both_ways() {
    in_fresh_netns("ctz6", |_| {
        let mut lb = Lb::new();
        lb.service(4, VIP6, PROTO_UDP, 0, &[(4, backend6(4), BACKEND_F_VALID)]);
        let request = Spec::udp(CLIENT6, 40016, VIP6, PORT);
        // UDP checksum at Ethernet 14 + IPv6 40 + 6.
        let zero = |mut frame: Vec<u8>| {
            frame[60..62].copy_from_slice(&[0, 0]);
            frame
        };
        let (verdict, output) = lb.run(&zero(request.build()));
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(output, zero(request.to(backend6(4), TARGET_PORT).build()));
        let answer = reply_of(&request, backend6(4), 0);
        let (verdict, output) = lb.run_tc(&zero(answer.build()));
        assert_eq!(verdict, TC_ACT_UNSPEC);
        let mut expected = answer.clone();
        expected.src = VIP6;
        expected.sport = PORT;
        assert_eq!(output, zero(expected.build()));
    });
}
