//! Real sockets through the load balancer on a routing node: client -> node (XDP DNAT, TC
//! reverse NAT) -> pod, in namespaces this test creates and removes; through the host's stack
//! and past it (a local pod on the fast path), IPv4 and IPv6.
//!
//! ```text
//! client 198.18.0.1 --veth-- 198.18.0.2 node 198.18.1.254 --veth-- 198.18.1.1 pod
//!                            (lb on veth-n)
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use lb_common::{
    Backend, Event, Reason, ServiceKey, ServiceValue,
    maps::{BACKEND_F_VALID, PROTO_TCP, PROTO_UDP, ipv4_mapped},
};
use lb_tests::netns::{Netns, veth_pair};
use lb_userspace::{AttachMode, Dataplane};

/// Which way packets cross the node.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Path {
    /// The XDP program passes DNATed frames to the host's stack, which routes them; replies
    /// are routed by the stack and reverse-NATed on the client-facing egress.
    Stack,
    /// The pod's interface is on the fast path: frames are moved into the pod by the TC
    /// ingress program and replies sent straight out by the pod interface's, past the stack.
    Pod,
}

/// The addresses of one run.
struct Plan {
    ipv4: bool,
    client: &'static str,
    node_client_side: &'static str,
    node_pod_side: &'static str,
    pod: &'static str,
    vip: &'static str,
    prefix: &'static str,
}

const IPV4: Plan = Plan {
    ipv4: true,
    client: "198.18.0.1",
    node_client_side: "198.18.0.2",
    node_pod_side: "198.18.1.254",
    pod: "198.18.1.1",
    vip: "198.18.100.1",
    prefix: "24",
};

const IPV6: Plan = Plan {
    ipv4: false,
    client: "2001:db8::1",
    node_client_side: "2001:db8::2",
    node_pod_side: "2001:db8:1::fe",
    pod: "2001:db8:1::1",
    vip: "2001:db8:100::1",
    prefix: "64",
};

#[test]
fn tcp_and_udp_reach_the_pod_through_the_vip_and_replies_come_from_the_vip() {
    exchange("e2e", &IPV4, Path::Stack);
}

#[test]
fn a_local_pod_is_reached_and_answers_past_the_host_stack_ipv4() {
    exchange("e2f", &IPV4, Path::Pod);
}

#[test]
fn a_local_pod_is_reached_and_answers_past_the_host_stack_ipv6() {
    exchange("e2g", &IPV6, Path::Pod);
}

/// Datagrams the node's IP stack forwarded so far (IPv4 or IPv6).
fn forwarded(node: &Netns, ipv4: bool) -> u64 {
    if ipv4 {
        let text =
            String::from_utf8(node.exec("cat", &["/proc/net/snmp"]).unwrap().stdout).unwrap();
        let mut ip = text.lines().filter(|l| l.starts_with("Ip: "));
        let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
        let at = names
            .split_whitespace()
            .position(|n| n == "ForwDatagrams")
            .unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    } else {
        let text =
            String::from_utf8(node.exec("cat", &["/proc/net/snmp6"]).unwrap().stdout).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("Ip6OutForwDatagrams"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

/// TCP connections and UDP datagrams from a client through the VIP to one pod and back, over
/// `path`: the replies come from the VIP, the pod sees the client's own address, and the
/// counters say which way every packet went.
fn exchange(tag: &str, plan: &Plan, path: Path) {
    let client = Netns::create(&format!("{tag}c")).unwrap();
    let node = Netns::create(&format!("{tag}n")).unwrap();
    let pod = Netns::create(&format!("{tag}p")).unwrap();
    veth_pair((&client, "veth-c"), (&node, "veth-n")).unwrap();
    veth_pair((&node, "veth-np"), (&pod, "veth-p")).unwrap();
    let addr = |ns: &Netns, addr: &str, dev: &str| {
        let cidr = format!("{addr}/{}", plan.prefix);
        let mut args = vec!["addr", "add", &cidr, "dev", dev];
        if !plan.ipv4 {
            args.push("nodad");
        }
        ns.ip(&args).unwrap();
    };
    addr(&client, plan.client, "veth-c");
    addr(&node, plan.node_client_side, "veth-n");
    addr(&node, plan.node_pod_side, "veth-np");
    addr(&pod, plan.pod, "veth-p");
    client
        .ip(&["route", "add", plan.vip, "via", plan.node_client_side])
        .unwrap();
    pod.ip(&["route", "add", "default", "via", plan.node_pod_side])
        .unwrap();
    let forwarding = if plan.ipv4 {
        "net.ipv4.conf.all.forwarding=1"
    } else {
        "net.ipv6.conf.all.forwarding=1"
    };
    node.exec("sysctl", &["-qw", forwarding]).unwrap();
    // A NIC hands XDP frames with complete checksums; a veth hands it the sender's offloaded
    // partial ones. Make the client's veth behave like a wire.
    client
        .exec("ethtool", &["-K", "veth-c", "tx", "off"])
        .unwrap();
    // The node knows its neighbours, as a node in service does: no packet of the run waits
    // for a neighbour lookup (which the kernel's stack does, so the counts below are exact).
    for (ns, dev, target, node_dev) in [
        (&client, "veth-c", plan.client, "veth-n"),
        (&pod, "veth-p", plan.pod, "veth-np"),
    ] {
        let mac = ns
            .exec("cat", &[&format!("/sys/class/net/{dev}/address")])
            .unwrap()
            .stdout;
        let mac = String::from_utf8(mac).unwrap();
        node.ip(&[
            "neigh",
            "replace",
            target,
            "lladdr",
            mac.trim(),
            "dev",
            node_dev,
            "nud",
            "permanent",
        ])
        .unwrap();
    }

    let vip: std::net::IpAddr = plan.vip.parse().unwrap();
    let pod_addr: std::net::IpAddr = plan.pod.parse().unwrap();
    let mut dataplane = Dataplane::load().unwrap();
    node.enter(|| dataplane.attach("veth-n", AttachMode::Auto))
        .unwrap()
        .unwrap();
    if path == Path::Pod {
        node.enter(|| dataplane.attach_pod_interface("veth-np"))
            .unwrap()
            .unwrap();
    }
    let proto_addr = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    for (id, proto) in [(1, PROTO_TCP), (2, PROTO_UDP)] {
        let key = ServiceKey {
            addr: proto_addr(vip),
            port: 8080,
            proto,
            pad: 0,
        };
        let value = ServiceValue {
            id,
            flags: 0,
            affinity_timeout_secs: 0,
        };
        dataplane.set_service(&key, &value).unwrap();
        let backend = Backend {
            addr: proto_addr(pod_addr),
            port: 9090,
            flags: BACKEND_F_VALID,
            service_id: id,
            node: [0; 16],
        };
        dataplane.set_backend(id, &backend).unwrap();
        dataplane.set_maglev_table(id, &[id; 13]).unwrap();
    }
    dataplane.set_vip_addr(proto_addr(vip), 2).unwrap();
    let forwarded_before = forwarded(&node, plan.ipv4);

    // The pod: a TCP server that answers with its name and a UDP echo, on 9090.
    let any = if plan.ipv4 {
        "0.0.0.0:9090"
    } else {
        "[::]:9090"
    };
    let (tcp, udp) = pod
        .enter(|| {
            (
                TcpListener::bind(any).unwrap(),
                UdpSocket::bind(any).unwrap(),
            )
        })
        .unwrap();
    let client_addr: std::net::IpAddr = plan.client.parse().unwrap();
    let tcp_server = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut stream, peer) = tcp.accept().unwrap();
            let mut request = [0u8; 64];
            let n = stream.read(&mut request).unwrap();
            assert_eq!(&request[..n], b"hello");
            // The client's own address reaches the pod: no SNAT.
            assert_eq!(peer.ip(), client_addr);
            stream.write_all(b"pod-1").unwrap();
        }
    });
    let udp_server = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let (n, peer) = udp.recv_from(&mut buf).unwrap();
            udp.send_to(&buf[..n], peer).unwrap();
        }
    });

    let vip = SocketAddr::new(vip, 8080);
    let local = if plan.ipv4 { "0.0.0.0:0" } else { "[::]:0" };
    client
        .enter(|| {
            for _ in 0..3 {
                let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(5))
                    .expect("TCP connection to the VIP");
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                stream.write_all(b"hello").unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).unwrap();
                assert_eq!(answer, "pod-1");
                assert_eq!(stream.peer_addr().unwrap(), vip);
            }
            let socket = UdpSocket::bind(local).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            for i in 0..3u8 {
                socket.send_to(&[i; 8], vip).unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = socket
                    .recv_from(&mut buf)
                    .expect("UDP echo through the VIP");
                assert_eq!(
                    (&buf[..n], from),
                    (&[i; 8][..], vip),
                    "the reply comes from the VIP"
                );
            }
        })
        .unwrap();
    tcp_server.join().unwrap();
    udp_server.join().unwrap();

    let count = |reason| dataplane.reason_counter(reason).unwrap().packets;
    let forwarded_by_stack = forwarded(&node, plan.ipv4) - forwarded_before;
    // Per TCP connection at least SYN, ACK with data, FIN and ACK from the client, and
    // SYN-ACK, data and FIN from the pod; one datagram each way per UDP exchange.
    let (least_in, least_out) = (3 * 3 + 3, 3 * 2 + 3);
    match path {
        Path::Stack => {
            let dnat = count(Reason::DnatFibFallback);
            let reverse = count(Reason::ReverseNat);
            assert!(dnat >= least_in, "client packets DNATed: {dnat}");
            assert!(reverse >= least_out, "replies reverse-NATed: {reverse}");
            assert!(
                forwarded_by_stack >= dnat + reverse,
                "the stack forwarded {forwarded_by_stack} of {dnat} + {reverse}"
            );
        }
        Path::Pod => {
            let dnat = count(Reason::DnatPod);
            let reverse = count(Reason::ReverseNatPod);
            assert!(
                dnat >= least_in,
                "client packets moved into the pod: {dnat}"
            );
            assert!(reverse >= least_out, "replies sent straight out: {reverse}");
            let by_stack = [
                (Reason::DnatFibFallback, count(Reason::DnatFibFallback)),
                (Reason::ReverseNat, count(Reason::ReverseNat)),
            ];
            // (The pod's own neighbour lookups pass: `pod_pass`.)
            assert!(
                by_stack.iter().all(|(_, n)| *n == 0),
                "no packet of the flows took the host's stack: {by_stack:?}"
            );
            assert_eq!(
                forwarded_by_stack, 0,
                "the node's IP stack forwarded none of the flows' packets"
            );
            assert_eq!(dataplane.event_counter(Event::PodHandoffFailed).unwrap(), 0);
        }
    }
    assert_eq!(dataplane.service_counter(1).unwrap().new_flows, 3);
    assert_eq!(dataplane.backend_counter(2).unwrap().new_flows, 1);
    dataplane.detach_all().unwrap();
}
