//! Per-CPU counters: one slot per [`Reason`], each a [`Counter`] of packets and bytes.

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

#[cfg(feature = "user")]
// SAFETY: `Counter` is `repr(C)`, has no padding and any bit pattern is valid.
unsafe impl aya::Pod for Counter {}

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)+) => {
        /// Why the program did what it did with a packet. Every packet is counted under exactly
        /// one reason; the discriminant is the index into the `STATS` per-CPU array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])* $variant,)+
        }

        impl Reason {
            /// Every reason, in index order.
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

reasons! {
    /// Passed: the frame is not IPv4 or IPv6 (ARP, LLDP, ...).
    PassNotIp = "pass_not_ip",
    /// Passed: an IPv4 packet.
    PassIpv4 = "pass_ipv4",
    /// Passed: an IPv6 packet.
    PassIpv6 = "pass_ipv6",
    /// Passed: the frame ends before the headers it announces.
    PassTruncated = "pass_truncated",
}

/// Number of slots in the `STATS` map.
pub const REASON_COUNT: u32 = Reason::ALL.len() as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_discriminants_are_dense_indices() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.name());
        }
    }
}
