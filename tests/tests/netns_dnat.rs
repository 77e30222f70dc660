//! Real sockets through the load balancer on a routing node: client -> node (XDP DNAT, TC
//! reverse NAT) -> pod, in namespaces this test creates and removes.
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
    Backend, Reason, ServiceKey, ServiceValue,
    maps::{BACKEND_F_VALID, PROTO_TCP, PROTO_UDP, ipv4_mapped},
};
use lb_tests::netns::{Netns, veth_pair};
use lb_userspace::{AttachMode, Dataplane};

const VIP: [u8; 4] = [198, 18, 100, 1];
const POD: [u8; 4] = [198, 18, 1, 1];

#[test]
fn tcp_and_udp_reach_the_pod_through_the_vip_and_replies_come_from_the_vip() {
    let client = Netns::create("e2ec").unwrap();
    let node = Netns::create("e2en").unwrap();
    let pod = Netns::create("e2ep").unwrap();
    veth_pair((&client, "veth-c"), (&node, "veth-n")).unwrap();
    veth_pair((&node, "veth-np"), (&pod, "veth-p")).unwrap();
    client
        .ip(&["addr", "add", "198.18.0.1/24", "dev", "veth-c"])
        .unwrap();
    client
        .ip(&["route", "add", "198.18.100.0/24", "via", "198.18.0.2"])
        .unwrap();
    node.ip(&["addr", "add", "198.18.0.2/24", "dev", "veth-n"])
        .unwrap();
    node.ip(&["addr", "add", "198.18.1.254/24", "dev", "veth-np"])
        .unwrap();
    node.exec("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
        .unwrap();
    pod.ip(&["addr", "add", "198.18.1.1/24", "dev", "veth-p"])
        .unwrap();
    pod.ip(&["route", "add", "default", "via", "198.18.1.254"])
        .unwrap();
    // A NIC hands XDP frames with complete checksums; a veth hands it the sender's offloaded
    // partial ones. Make the client's veth behave like a wire.
    client
        .exec("ethtool", &["-K", "veth-c", "tx", "off"])
        .unwrap();

    let mut dataplane = Dataplane::load().unwrap();
    node.enter(|| dataplane.attach("veth-n", AttachMode::Auto))
        .unwrap()
        .unwrap();
    for (id, proto) in [(1, PROTO_TCP), (2, PROTO_UDP)] {
        let key = ServiceKey {
            addr: ipv4_mapped(VIP),
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
            addr: ipv4_mapped(POD),
            port: 9090,
            flags: BACKEND_F_VALID,
            service_id: id,
        };
        dataplane.set_backend(id, &backend).unwrap();
        dataplane.set_maglev_table(id, &[id; 13]).unwrap();
    }
    dataplane.set_vip_addr(ipv4_mapped(VIP), 2).unwrap();

    // The pod: a TCP server that answers with its name and a UDP echo, on 9090.
    let (tcp, udp) = pod
        .enter(|| {
            (
                TcpListener::bind("0.0.0.0:9090").unwrap(),
                UdpSocket::bind("0.0.0.0:9090").unwrap(),
            )
        })
        .unwrap();
    let tcp_server = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut stream, peer) = tcp.accept().unwrap();
            let mut request = [0u8; 64];
            let n = stream.read(&mut request).unwrap();
            assert_eq!(&request[..n], b"hello");
            // The client's own address reaches the pod: no SNAT.
            assert_eq!(peer.ip().to_string(), "198.18.0.1");
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

    let vip: SocketAddr = "198.18.100.1:8080".parse().unwrap();
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
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
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

    let dnat = dataplane
        .reason_counter(Reason::DnatFibFallback)
        .unwrap()
        .packets
        + dataplane.reason_counter(Reason::DnatTx).unwrap().packets
        + dataplane
            .reason_counter(Reason::DnatRedirect)
            .unwrap()
            .packets;
    let reverse = dataplane
        .reason_counter(Reason::ReverseNat)
        .unwrap()
        .packets;
    assert!(dnat >= 3 * 3 + 3, "client packets DNATed: {dnat}");
    assert!(reverse >= 3 * 2 + 3, "replies reverse-NATed: {reverse}");
    assert_eq!(dataplane.service_counter(1).unwrap().new_flows, 3);
    assert_eq!(dataplane.backend_counter(2).unwrap().new_flows, 1);
    dataplane.detach_all().unwrap();
}
