//! IP fragments of VIP flows, after Cilium's fragment tracking: the ports of a first fragment
//! are remembered by (source, destination, identification, protocol), so the later fragments of
//! its datagram, which carry no transport header, follow it through the same service, flow and
//! rewrite, in both directions.
use lb_common::{FragmentKey, FragmentPorts};

use crate::{
    maps::FRAGMENTS,
    parse::{FRAGMENT_FIRST, Packet},
};

#[inline(always)]
fn key(packet: &Packet) -> FragmentKey {
    FragmentKey {
        src: packet.src,
        dst: packet.dst,
        id: packet.fragment_id,
        proto: packet.proto,
        pad: [0; 3],
    }
}

/// Remembers the ports of `packet` if it is a first fragment (call before rewriting it: the
/// later fragments arrive with the addresses it arrived with). Inlined, so that the packets
/// that are not fragments (nearly all) pay for one comparison, not a call.
#[inline(always)]
pub fn remember(packet: &Packet) {
    if packet.fragment == FRAGMENT_FIRST {
        remember_first(packet);
    }
}

/// Not inlined (nor `recall`): the key gets a stack frame of its own.
#[inline(never)]
fn remember_first(packet: &Packet) {
    let ports = FragmentPorts {
        sport: packet.sport,
        dport: packet.dport,
    };
    // A failed insert leaves the later fragments unknown: they are counted where they arrive.
    let _ = FRAGMENTS.insert(&key(packet), &ports, 0);
}

/// Fills the ports of a later fragment from its first fragment; false when it is not known
/// (the first has not come yet, or was not ours).
#[inline(never)]
pub fn recall(packet: &mut Packet) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(ports) = (unsafe { FRAGMENTS.get(&key(packet)) }).copied() else {
        return false;
    };
    packet.sport = ports.sport;
    packet.dport = ports.dport;
    packet.tcp_flags = 0;
    true
}
