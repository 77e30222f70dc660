//! Bounds-checked access to a frame's bytes: the one abstraction the parser needs, with no
//! kernel types, so the same parser source also builds for userspace (tests and fuzzing in
//! `lb-tests` include it).

/// Where the last header the programs read may start: Ethernet, two VLAN tags, an IPv4 header
/// with options or IPv6, then the TCP checksum.
pub const MAX_HEADER_OFFSET: usize = 256;

/// The frame ends before the bytes being read.
pub struct OutOfBounds;

/// A context whose packet can be read directly between `data` and `data_end`.
// A frame always holds at least an Ethernet header: there is no empty one to ask about.
#[allow(clippy::len_without_is_empty)]
pub trait Frame {
    /// Address of the first byte.
    fn start(&self) -> usize;
    /// Address one past the last byte.
    fn end(&self) -> usize;

    /// Length of the directly readable frame.
    #[inline(always)]
    fn len(&self) -> usize {
        self.end() - self.start()
    }

    /// Length of the whole packet, which the IP length fields are checked against. For a
    /// socket buffer this includes paged data beyond the directly readable part.
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len()
    }

    /// A pointer to a `T` at `offset`, if the frame holds all of it.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Result<*mut T, OutOfBounds> {
        // Offsets kept in map memory (the per-CPU scratch) carry no bounds the verifier knows;
        // this comparison gives it one. No header this program reads starts further in.
        if offset > MAX_HEADER_OFFSET {
            return Err(OutOfBounds);
        }
        let start = self.start();
        if start + offset + core::mem::size_of::<T>() > self.end() {
            return Err(OutOfBounds);
        }
        Ok((start + offset) as *mut T)
    }
}

/// Reads a `T` at `offset`.
#[inline(always)]
pub fn read<T: Copy>(frame: &impl Frame, offset: usize) -> Result<T, OutOfBounds> {
    let ptr = frame.ptr_at::<T>(offset)?;
    // SAFETY: `ptr_at` checked the value lies within the frame; `T` is read unaligned-safe
    // because every header type here is made of byte arrays.
    Ok(unsafe { ptr.read_unaligned() })
}

/// Writes `bytes` at `offset` (one byte store at a time, see [`copy_bytes`]).
#[inline(always)]
pub fn write<const N: usize>(
    frame: &impl Frame,
    offset: usize,
    bytes: &[u8; N],
) -> Result<(), OutOfBounds> {
    let ptr = frame.ptr_at::<[u8; N]>(offset)?;
    // SAFETY: `ptr_at` checked the bytes lie within the frame; byte arrays have no alignment.
    copy_bytes(unsafe { &mut *ptr }, bytes);
    Ok(())
}

/// Copies `src` into `dst` one byte store at a time.
///
/// A plain assignment of a byte array here compiles to a call of the byte-at-a-time `memmove`
/// or `memset` that `compiler_builtins` provides (the BPF backend expands neither inline), which
/// costs several times the stores themselves: the parser's addresses alone were five such
/// calls per packet. Volatile stores keep the compiler from folding the loop back into one.
#[inline(always)]
pub fn copy_bytes<const N: usize>(dst: &mut [u8; N], src: &[u8; N]) {
    for (to, from) in dst.iter_mut().zip(src) {
        // SAFETY: `to` is a valid, exclusive reference.
        unsafe { core::ptr::write_volatile(to, *from) };
    }
}

/// Writes `addr` IPv4-mapped (`::ffff:a.b.c.d`) into `dst`, as [`copy_bytes`] does.
#[inline(always)]
pub fn set_ipv4_mapped(dst: &mut [u8; 16], addr: [u8; 4]) {
    let (prefix, v4) = dst.split_at_mut(12);
    for (i, to) in prefix.iter_mut().enumerate() {
        let byte = if i < 10 { 0 } else { 0xff };
        // SAFETY: as in `copy_bytes`.
        unsafe { core::ptr::write_volatile(to, byte) };
    }
    for (to, from) in v4.iter_mut().zip(addr) {
        // SAFETY: as in `copy_bytes`.
        unsafe { core::ptr::write_volatile(to, from) };
    }
}
