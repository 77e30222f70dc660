//! Where the fields the programs read and write sit in their headers, in bytes from the start
//! of the header: the one place for them, like Katran's `balancer_consts.h`. Built for
//! userspace too (the tests include the parser, which uses it).

/// Ethernet: the EtherType (after two MAC addresses).
pub const ETHER_TYPE: usize = 12;
/// Ethernet: the two MAC addresses (destination, then source), 6 bytes each.
pub const ETH_MACS_LEN: usize = 12;

/// IPv4: the version and header length byte.
pub const IPV4_VIHL: usize = 0;
/// IPv4: the TTL.
pub const IPV4_TTL: usize = 8;
/// IPv4: the protocol.
pub const IPV4_PROTO: usize = 9;
/// IPv4: the header checksum.
pub const IPV4_CHECK: usize = 10;
/// IPv4: the source address (the destination follows it).
pub const IPV4_SRC: usize = 12;
/// IPv4: the destination address.
pub const IPV4_DST: usize = 16;
/// IPv4: the header without options.
pub const IPV4_MIN_LEN: usize = 20;

/// IPv6: the next header.
pub const IPV6_NEXT_HEADER: usize = 6;
/// IPv6: the hop limit.
pub const IPV6_HOP_LIMIT: usize = 7;
/// IPv6: the source address (the destination follows it).
pub const IPV6_SRC: usize = 8;
/// IPv6: the destination address.
pub const IPV6_DST: usize = 24;
/// IPv6: the fixed header.
pub const IPV6_LEN: usize = 40;

/// TCP and UDP: the destination port (the source port is at 0).
pub const L4_DPORT: usize = 2;
/// TCP: the sequence number.
pub const TCP_SEQ: usize = 4;
/// TCP: the data offset (its high nibble, in 32-bit words).
pub const TCP_DATA_OFFSET: usize = 12;
/// TCP: the flags.
pub const TCP_FLAGS: usize = 13;
/// UDP: the length.
pub const UDP_LEN: usize = 4;
/// TCP: the checksum.
pub const TCP_CHECK: usize = 16;
/// TCP: the header without options.
pub const TCP_MIN_LEN: usize = 20;
/// UDP: the header.
pub const UDP_HEADER_LEN: usize = 8;
/// UDP: the checksum.
pub const UDP_CHECK: usize = 6;

/// ICMP and ICMPv6: the checksum (the type is at 0).
pub const ICMP_CHECK: usize = 2;
/// ICMP and ICMPv6 error: where the quoted packet starts (after type, code, checksum and 4
/// bytes unused by "destination unreachable").
pub const ICMP_QUOTE: usize = 8;
