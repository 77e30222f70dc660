//! Incremental Internet checksum updates (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
//!
//! Values are the fields' numeric values (read big-endian from the wire); the checksum is
//! returned the same way.

/// Folds a 32-bit one's-complement sum to 16 bits.
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
#[must_use]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// The checksum after a 32-bit field (two 16-bit words) changed from `old` to `new`.
#[inline(always)]
#[must_use]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = !check as u32
        + !(old >> 16) as u16 as u32
        + !(old as u16) as u32
        + (new >> 16)
        + (new & 0xffff);
    !fold(sum)
}

/// The checksum after a 16-byte address changed from `old` to `new`.
#[inline(always)]
#[must_use]
pub fn replace128(check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut sum = !check as u32;
    let mut i = 0;
    while i < 16 {
        let o = u16::from_be_bytes([old[i], old[i + 1]]);
        let n = u16::from_be_bytes([new[i], new[i + 1]]);
        sum += !o as u32 + n as u32;
        i += 2;
    }
    !fold(sum)
}

/// Adds the big-endian 16-bit words of `data` (an even number of bytes; a last odd byte is
/// ignored) to the unfolded one's-complement `sum`. For headers built whole, not updated:
/// `finish(add_words(add_words(0, a), b))` is the checksum of `a` then `b`. The sum must stay
/// under 2^32: up to 65,537 words.
#[inline(always)]
#[must_use]
pub fn add_words(mut sum: u32, data: &[u8]) -> u32 {
    for word in data.chunks_exact(2) {
        sum += u16::from_be_bytes([word[0], word[1]]) as u32;
    }
    sum
}

/// The checksum field of an unfolded one's-complement `sum`.
#[inline(always)]
#[must_use]
pub const fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// The one's-complement checksum of `data` (for tests and userspace checks).
#[must_use]
pub fn compute(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum = sum.wrapping_add(word as u32);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20-byte IPv4 header with a valid checksum.
    fn header() -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 198, 18, 0, 1, 198, 18, 1, 10,
        ];
        let c = compute(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn incremental_updates_match_recomputation() {
        let mut h = header();
        let check = u16::from_be_bytes([h[10], h[11]]);
        let old = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let new = u32::from_be_bytes([10, 244, 3, 7]);
        h[16..20].copy_from_slice(&new.to_be_bytes());
        let updated = replace32(check, old, new);
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, compute(&h));

        let check = updated;
        h[10..12].copy_from_slice(&check.to_be_bytes());
        let updated = replace16(check, 0x4006, 0x3f06);
        h[8..10].copy_from_slice(&[0x3f, 0x06]);
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, compute(&h));
    }

    #[test]
    fn sums_in_parts_match_the_whole() {
        let h = header();
        // A valid header sums to 0xffff: its checksum over it is 0.
        assert_eq!(finish(add_words(0, &h)), 0);
        let mut zeroed = h;
        zeroed[10..12].copy_from_slice(&[0, 0]);
        let parts = add_words(add_words(0, &zeroed[..8]), &zeroed[8..]);
        assert_eq!(finish(parts), compute(&zeroed));
        assert_eq!(finish(parts), u16::from_be_bytes([h[10], h[11]]));
    }

    #[test]
    fn replace128_matches_recomputation() {
        let mut data = [0u8; 40];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        let check = compute(&data);
        let old: [u8; 16] = data[8..24].try_into().unwrap();
        let new = [0xfe; 16];
        data[8..24].copy_from_slice(&new);
        // compute() over data that includes the checksum field would differ; data has none.
        assert_eq!(replace128(check, &old, &new), compute(&data));
    }
}
