//! Per-CPU counters: a [`Counter`] per [`Reason`] (every packet under exactly one), a count per
//! [`Event`] (things that happen on the way), and a [`FlowCounter`] per service and backend.

/// Packets and bytes seen for one counter slot on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Number of packets.
    pub packets: u64,
    /// Sum of the packets' frame lengths in bytes.
    pub bytes: u64,
}

impl Counter {
    /// Adds another CPU's (or another slot's) figures to this one.
    #[must_use]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// The total of every CPU's (or slot's) figures.
impl<'a> core::iter::Sum<&'a Counter> for Counter {
    fn sum<I: Iterator<Item = &'a Counter>>(iter: I) -> Self {
        iter.fold(Self::default(), |total, one| total.plus(*one))
    }
}

/// Traffic of one service or backend on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounter {
    /// Packets forwarded (both directions).
    pub packets: u64,
    /// Bytes forwarded (both directions).
    pub bytes: u64,
    /// New flows placed.
    pub new_flows: u64,
}

impl FlowCounter {
    /// Adds another CPU's figures to this one.
    #[must_use]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            new_flows: self.new_flows + other.new_flows,
        }
    }
}

/// The total of every CPU's figures.
impl<'a> core::iter::Sum<&'a FlowCounter> for FlowCounter {
    fn sum<I: Iterator<Item = &'a FlowCounter>>(iter: I) -> Self {
        iter.fold(Self::default(), |total, one| total.plus(*one))
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `repr(C)`, no padding, any bit pattern valid.
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FlowCounter {}
}

macro_rules! named_enum {
    ($(#[$meta:meta])* $enum:ident { $($(#[doc = $doc:literal])* $variant:ident = $name:literal,)+ }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $enum {
            $($(#[doc = $doc])* $variant,)+
        }

        impl $enum {
            /// Every variant, in index order.
            pub const ALL: &[Self] = &[$(Self::$variant,)+];

            /// The stable snake_case name used by the CLI and the metrics.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }
        }
    };
}

named_enum! {
    /// Why a program did what it did with a packet. Every packet a program sees is counted under
    /// exactly one reason; the discriminant is the index into the `STATS` per-CPU array.
    Reason {
        /// XDP, passed: not IPv4 or IPv6 (ARP, LLDP, ...).
        PassNotIp = "pass_not_ip",
        /// XDP, passed: IP, but not to a service VIP:port:proto.
        PassNotVip = "pass_not_vip",
        /// XDP, passed: cannot be fully parsed and not to a VIP address.
        PassUnparsed = "pass_unparsed",
        /// XDP, dropped: to a VIP address but truncated or with lying lengths.
        DropMalformed = "drop_malformed",
        /// XDP, dropped: a non-first IPv4 fragment to a VIP address.
        DropFragment = "drop_fragment",
        /// XDP, dropped: to a VIP address with what the program does not parse (IPv6
        /// extension headers).
        DropUnsupported = "drop_unsupported",
        /// XDP, dropped: to a service with no usable backend, and nothing to answer (a TCP
        /// segment without SYN, a fragment), or too short to answer.
        DropNoBackend = "drop_no_backend",
        /// XDP, dropped: an ICMP error to a VIP about a flow the connection table does not
        /// know, or too short to tell which.
        DropIcmpUnknownFlow = "drop_icmp_unknown_flow",
        /// XDP, answered: an echo request to a VIP, sent back as an echo reply (XDP_TX).
        IcmpEchoReply = "icmp_echo_reply",
        /// XDP, DNAT then sent back out of the same interface (XDP_TX).
        DnatTx = "dnat_tx",
        /// XDP, DNAT then redirected to another interface.
        DnatRedirect = "dnat_redirect",
        /// XDP, DNAT then passed to the kernel to forward (no neighbour yet, no route, VLAN,
        /// TTL expiring, or an egress device that takes no redirected frames).
        DnatFibFallback = "dnat_fib_fallback",
        /// TC egress: a reply of a tracked flow, source rewritten back to the VIP.
        ReverseNat = "reverse_nat",
        /// TC egress, passed: not a reply of a tracked flow.
        EgressPass = "egress_pass",
        /// TC egress, passed: cannot be fully parsed.
        EgressUnparsed = "egress_unparsed",
        /// TC egress, dropped: a reply's rewrite failed half way (a helper refused).
        ReverseNatFailed = "reverse_nat_failed",
        /// TC egress: an ICMP error a backend sent about a flow, rewritten (outer source and
        /// inner destination) back to the VIP.
        ReverseNatIcmp = "reverse_nat_icmp",
        /// XDP, DNAT then passed with its pod's interface in the frame's metadata: the TC
        /// ingress program moves it into the local pod's namespace (`bpf_redirect_peer`),
        /// past the host's IP stack.
        DnatPod = "dnat_pod",
        /// TC ingress of a pod's interface: a reply of a tracked flow, source rewritten back
        /// to the VIP and sent straight out of the route's interface (`bpf_redirect`, or
        /// `bpf_redirect_neigh` while the next hop's MAC is unknown), past the host's IP stack.
        ReverseNatPod = "reverse_nat_pod",
        /// TC ingress of a pod's interface, passed: not a reply of a tracked flow, or one the
        /// kernel must route (its reverse NAT happens on the client-facing egress).
        PodPass = "pod_pass",
        /// XDP, dropped: to a frontend with `loadBalancerSourceRanges` from a client outside
        /// them (every packet, those of established flows too).
        DropSourceRange = "drop_source_range",
        /// XDP, dropped: to a frontend that drops rather than rejects (`externalTrafficPolicy:
        /// Local` without a local endpoint) with no usable backend.
        DropNoLocalBackend = "drop_no_local_backend",
        /// XDP, answered: a TCP SYN to a service with no usable backend, answered with an RST
        /// (XDP_TX), as kube-proxy rejects it.
        RejectTcp = "reject_tcp",
        /// XDP, answered: a UDP datagram to a service with no usable backend, answered with an
        /// ICMP / ICMPv6 port unreachable (XDP_TX), as kube-proxy rejects it.
        RejectUdp = "reject_udp",
        /// XDP: the backend lives on another node: sent there inside the tunnel, untouched,
        /// out of the same interface (XDP_TX). That node does the DNAT and answers the client.
        TunnelTx = "tunnel_tx",
        /// XDP: sent to the backend's node inside the tunnel, redirected to another interface.
        TunnelRedirect = "tunnel_redirect",
        /// XDP: encapsulated for the backend's node, then passed on (no neighbour yet, or an
        /// egress device that takes no redirected frames): the TC ingress program sends it
        /// with `bpf_redirect_neigh`, the kernel's neighbour subsystem resolving the next hop.
        TunnelFallback = "tunnel_fallback",
        /// XDP, answered: the packet would exceed the underlay's MTU once encapsulated:
        /// answered with an ICMP "fragmentation needed" / ICMPv6 "packet too big" giving the
        /// tunnel's MTU (XDP_TX), as Katran does.
        TunnelTooBig = "tunnel_too_big",
        /// XDP, dropped: a tunnel packet (to this node's underlay address and tunnel port) from
        /// an address that is no known node's.
        DropTunnelPeer = "drop_tunnel_peer",
        /// XDP, dropped: a tunnel packet from a known node that is malformed, for no service
        /// here, or for a backend that does not live on this node.
        DropTunnelInvalid = "drop_tunnel_invalid",
    }
}

named_enum! {
    /// Things that happen on the way to a verdict; the index into the `EVENTS` per-CPU array.
    Event {
        /// A packet of a VIP flow found its flow in the connection table.
        ConntrackHit = "conntrack_hit",
        /// A packet that opens a flow (a TCP SYN, or a UDP datagram) found no live entry.
        ConntrackMiss = "conntrack_miss",
        /// A tracked flow's backend was removed: the flow was placed again.
        ConntrackRebalanced = "conntrack_rebalanced",
        /// A new flow followed its client's ClientIP affinity.
        AffinityHit = "affinity_hit",
        /// Inserting into the connection or reverse table failed.
        ConntrackInsertFailed = "conntrack_insert_failed",
        /// An ICMP "fragmentation needed" / "packet too big" about a VIP flow was sent on to the
        /// flow's backend.
        IcmpToBackend = "icmp_to_backend",
        /// A TCP segment without SYN found no live entry: its flow was evicted, expired, or
        /// moved here (an ECMP change); it was placed again and picked up mid-stream. Katran's
        /// signal for routing reshuffles and table thrash.
        ConntrackMissNonSyn = "conntrack_miss_non_syn",
        /// A SYN found an entry of the same 5-tuple and replaced it (a new connection reusing
        /// a port is placed afresh).
        ConntrackSynReplaced = "conntrack_syn_replaced",
        /// An entry had expired when its next packet came: the flow was placed afresh.
        ConntrackExpired = "conntrack_expired",
        /// An entry belonged to another service (its id was reused) or to a backend of
        /// another service: ignored, the flow placed afresh.
        ConntrackForeign = "conntrack_foreign",
        /// A flow ended (the last ACK after both FINs, or an RST): its entries were removed.
        ConntrackClosed = "conntrack_closed",
        /// A reply found its reverse entry but not its flow's entry (evicted): the flow's
        /// entry was written again from the reverse one.
        ConntrackRestored = "conntrack_restored",
        /// A reply's reverse entry belonged to an older connection of the same client port
        /// (now placed on another backend): removed, the reply passed unchanged.
        ReverseStale = "reverse_stale",
        /// A rewritten frame was larger than the cached next hop's MTU: passed to the kernel,
        /// which fragments it or answers "fragmentation needed" / "packet too big".
        MtuExceeded = "mtu_exceeded",
        /// A redirect to the cached egress port failed (the port left the device map): the
        /// frame went to the kernel instead.
        RedirectFailed = "redirect_failed",
        /// A DNATed frame for a local pod could not be handed to the TC ingress program (the
        /// driver keeps no XDP metadata) or moved by it: the kernel forwarded it.
        PodHandoffFailed = "pod_handoff_failed",
        /// A tunnel packet from a known node was decapsulated; its inner packet went on to the
        /// backend it was sent for (counted under that packet's reason).
        TunnelDecapsulated = "tunnel_decapsulated",
    }
}

/// Number of slots in the `STATS` map.
pub const REASON_COUNT: u32 = Reason::ALL.len() as u32;
/// Number of slots in the `EVENTS` map.
pub const EVENT_COUNT: u32 = Event::ALL.len() as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_are_dense_indices() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.name());
        }
        for (index, event) in Event::ALL.iter().enumerate() {
            assert_eq!(*event as usize, index, "{}", event.name());
        }
    }
}
