//! Test frames built with etherparse, so that expected outputs (and their checksums) are
//! computed independently of the code under test.

use std::net::IpAddr;

use lb_common::conntrack::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use etherparse::{IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Header, PacketBuilder, VlanId};

/// MAC of the sending client in fixtures.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
/// MAC of the load balancer's interface in fixtures.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Everything that describes one test frame.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP (else UDP).
    pub tcp: bool,
    /// Number of VLAN tags (0, 1 or 2).
    pub vlans: u8,
    /// Bytes of IPv4 options (a multiple of 4, at most 40).
    pub ipv4_options: usize,
    /// IPv4 more-fragments flag.
    pub more_fragments: bool,
    /// IPv4 fragment offset in 8-byte units.
    pub fragment_offset: u16,
    /// IPv4 identification (which datagram a fragment belongs to).
    pub identification: u16,
    pub ttl: u8,
    /// TCP flags (`lb_common::conntrack::TCP_*`): SYN unless set otherwise.
    pub tcp_flags: u8,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub payload: Vec<u8>,
}

impl Spec {
    /// A TCP SYN from `src:sport` to `dst:dport`.
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            tcp: true,
            vlans: 0,
            ipv4_options: 0,
            more_fragments: false,
            fragment_offset: 0,
            identification: 0,
            ttl: 64,
            tcp_flags: TCP_SYN,
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        }
    }

    /// A UDP datagram from `src:sport` to `dst:dport`.
    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            tcp: false,
            payload: b"ping".to_vec(),
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    /// The same frame with TCP flags `flags`.
    pub fn with_flags(&self, flags: u8) -> Self {
        Self {
            tcp_flags: flags,
            ..self.clone()
        }
    }

    /// The same frame as a TCP segment of an established connection (ACK).
    pub fn ack(&self) -> Self {
        self.with_flags(TCP_ACK)
    }

    /// The same frame with another destination.
    pub fn to(&self, dst: IpAddr, dport: u16) -> Self {
        Self {
            dst,
            dport,
            ..self.clone()
        }
    }

    /// The frame's bytes, checksums computed by etherparse.
    pub fn build(&self) -> Vec<u8> {
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let proto = if self.tcp {
                    IpNumber::TCP
                } else {
                    IpNumber::UDP
                };
                let mut header = Ipv4Header::new(0, self.ttl, proto, src.octets(), dst.octets())
                    .expect("IPv4 header");
                // NOP options (kind 1).
                header.options =
                    Ipv4Options::try_from(&vec![1u8; self.ipv4_options][..]).expect("IPv4 options");
                header.more_fragments = self.more_fragments;
                header.fragment_offset =
                    etherparse::IpFragOffset::try_new(self.fragment_offset).expect("offset");
                header.identification = self.identification;
                IpHeaders::Ipv4(header, Default::default())
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => IpHeaders::Ipv6(
                Ipv6Header {
                    hop_limit: self.ttl,
                    next_header: if self.tcp {
                        IpNumber::TCP
                    } else {
                        IpNumber::UDP
                    },
                    source: src.octets(),
                    destination: dst.octets(),
                    ..Default::default()
                },
                Default::default(),
            ),
            _ => panic!("mixed address families"),
        };
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let vlan = |id| VlanId::try_new(id).expect("VLAN id");
        let with_ip = match self.vlans {
            0 => eth.ip(ip),
            1 => eth.single_vlan(vlan(100)).ip(ip),
            _ => eth.double_vlan(vlan(200), vlan(100)).ip(ip),
        };
        let mut frame = Vec::new();
        if self.tcp {
            let mut tcp = with_ip.tcp(self.sport, self.dport, 1000, 64240);
            if self.tcp_flags & TCP_SYN != 0 {
                tcp = tcp.syn();
            }
            if self.tcp_flags & TCP_ACK != 0 {
                tcp = tcp.ack(1);
            }
            if self.tcp_flags & TCP_FIN != 0 {
                tcp = tcp.fin();
            }
            if self.tcp_flags & TCP_RST != 0 {
                tcp = tcp.rst();
            }
            tcp.write(&mut frame, &self.payload)
                .expect("write TCP frame");
        } else {
            with_ip
                .udp(self.sport, self.dport)
                .write(&mut frame, &self.payload)
                .expect("write UDP frame");
        }
        frame
    }
}

/// What is wrong with a frame's checksums.
#[derive(Debug, PartialEq, Eq)]
pub enum ChecksumError {
    /// The frame does not parse far enough to tell.
    Unparsable(String),
    /// This checksum is wrong.
    Wrong(&'static str),
}

/// Checks the IPv4 header checksum and the TCP/UDP or ICMP/ICMPv6 checksum of `frame` from
/// scratch. Fragments' transport checksums (which cover bytes the frame lacks) and IPv4 UDP
/// checksums of 0 (none) are not checked.
pub fn check_checksums(frame: &[u8]) -> Result<(), ChecksumError> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let sliced =
        SlicedPacket::from_ethernet(frame).map_err(|e| ChecksumError::Unparsable(e.to_string()))?;
    let Some(net) = sliced.net else {
        return Ok(());
    };
    let check = |ok: bool, what| {
        if ok {
            Ok(())
        } else {
            Err(ChecksumError::Wrong(what))
        }
    };
    match (&net, &sliced.transport) {
        (NetSlice::Ipv4(ip), transport) => {
            let header = ip.header().to_header();
            check(
                header.header_checksum == header.calc_header_checksum(),
                "IPv4 header",
            )?;
            if ip.is_payload_fragmented() {
                return Ok(());
            }
            match transport {
                Some(TransportSlice::Tcp(tcp)) => check(
                    tcp.to_header()
                        .calc_checksum_ipv4(&header, tcp.payload())
                        .ok()
                        == Some(tcp.checksum()),
                    "TCP",
                ),
                Some(TransportSlice::Udp(udp)) if udp.checksum() != 0 => check(
                    udp.to_header()
                        .calc_checksum_ipv4(&header, udp.payload())
                        .ok()
                        == Some(udp.checksum()),
                    "UDP",
                ),
                _ => Ok(()),
            }
        }
        (NetSlice::Ipv6(ip), transport) => {
            let header = ip.header().to_header();
            match transport {
                Some(TransportSlice::Tcp(tcp)) => check(
                    tcp.to_header()
                        .calc_checksum_ipv6(&header, tcp.payload())
                        .ok()
                        == Some(tcp.checksum()),
                    "TCP",
                ),
                Some(TransportSlice::Udp(udp)) => check(
                    udp.to_header()
                        .calc_checksum_ipv6(&header, udp.payload())
                        .ok()
                        == Some(udp.checksum()),
                    "UDP",
                ),
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }?;
    match (&net, &sliced.transport) {
        // An ICMP message sums to zero with its checksum; ICMPv6's with its pseudo-header too.
        (NetSlice::Ipv4(_), Some(TransportSlice::Icmpv4(icmp))) => {
            check(lb_common::checksum::compute(icmp.slice()) == 0, "ICMP")
        }
        (NetSlice::Ipv6(ip), Some(TransportSlice::Icmpv6(icmp))) => {
            let header = ip.header();
            let message = icmp.slice();
            let mut pseudo = Vec::with_capacity(40 + message.len());
            pseudo.extend_from_slice(&header.source());
            pseudo.extend_from_slice(&header.destination());
            pseudo.extend_from_slice(&(message.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 58]);
            pseudo.extend_from_slice(message);
            check(lb_common::checksum::compute(&pseudo) == 0, "ICMPv6")
        }
        _ => Ok(()),
    }
}

/// Panics unless [`check_checksums`] passes.
pub fn assert_checksums_valid(frame: &[u8]) {
    if let Err(e) = check_checksums(frame) {
        panic!("checksums of the output frame: {e:?}");
    }
}
