//! Hashes shared by both sides: the flow hash that picks a Maglev slot for a new flow, and the
//! byte hash userspace uses to place backends in the Maglev table.
//!
//! Both are MurmurHash3 (x86, 32-bit) over little-endian words, so the same inputs give the
//! same slot on every machine and several load balancers behind ECMP agree on every flow.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn mix_addr(mut h: u32, addr: &[u8; 16]) -> u32 {
    h = mix(h, u32::from_le_bytes([addr[0], addr[1], addr[2], addr[3]]));
    h = mix(h, u32::from_le_bytes([addr[4], addr[5], addr[6], addr[7]]));
    h = mix(
        h,
        u32::from_le_bytes([addr[8], addr[9], addr[10], addr[11]]),
    );
    mix(
        h,
        u32::from_le_bytes([addr[12], addr[13], addr[14], addr[15]]),
    )
}

/// Hash of a flow's 5-tuple (addresses 16 bytes, ports host order).
#[inline(always)]
#[must_use]
pub fn flow_hash(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = mix_addr(0, src);
    h = mix_addr(h, dst);
    h = mix(h, (sport as u32) << 16 | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 40)
}

/// Hash used for ClientIP affinity: the client and the VIP only, so every connection of one
/// client lands on the same slot.
#[inline(always)]
#[must_use]
pub fn client_hash(client: &[u8; 16], vip: &[u8; 16]) -> u32 {
    finish(mix_addr(mix_addr(0, client), vip), 32)
}

/// MurmurHash3 x86_32 of arbitrary bytes with a seed.
#[must_use]
pub fn bytes_hash(seed: u32, data: &[u8]) -> u32 {
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        h = mix(
            h,
            u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
        );
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k |= (*b as u32) << (8 * i);
        }
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    finish(h, data.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_hash_matches_reference_murmur3_vectors() {
        assert_eq!(bytes_hash(0, b""), 0);
        assert_eq!(bytes_hash(1, b""), 0x514e_28b7);
        assert_eq!(bytes_hash(0, b"test"), 0xba6b_d213);
        assert_eq!(bytes_hash(0x9747_b28c, b"Hello, world!"), 0x2488_4cba);
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let a = [1u8; 16];
        let b = [2u8; 16];
        let base = flow_hash(&a, &b, 1000, 80, 6);
        assert_ne!(base, flow_hash(&b, &a, 1000, 80, 6));
        assert_ne!(base, flow_hash(&a, &b, 1001, 80, 6));
        assert_ne!(base, flow_hash(&a, &b, 1000, 81, 6));
        assert_ne!(base, flow_hash(&a, &b, 1000, 80, 17));
        assert_eq!(base, flow_hash(&a, &b, 1000, 80, 6));
    }
}
