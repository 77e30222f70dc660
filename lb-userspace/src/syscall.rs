//! The few `bpf(2)` map commands aya 0.14 does not offer: batch updates (one per apply for all
//! its Maglev tables) and batch reads (the connection tables' sweep), with the single-element
//! lookups and deletions that go with them on raw descriptors.

use std::io;

/// `BPF_MAP_UPDATE_BATCH` of `u32` keys and `u32` values.
pub fn update_batch(map_fd: u32, keys: &[u32], values: &[u32]) -> io::Result<()> {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd,
        elem_flags: 0,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    if attr.count as usize != keys.len() {
        return Err(io::Error::other("partial batch update"));
    }
    Ok(())
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The `map_elem` member of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Entries read per system call.
const BATCH: usize = 4096;

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is the `bpf_attr` member the command reads, and every pointer in it is
    // valid for the sizes the map was created with (the callers' types).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One `BPF_MAP_LOOKUP_BATCH` of up to `count` entries into the arrays at `keys` and `values`,
/// from the start (`cursor` `None`) or after `cursor`: how many entries it read, the cursor to
/// go on from, and whether it reached the end of the map.
fn lookup_batch(
    fd: i32,
    cursor: Option<u32>,
    keys: u64,
    values: u64,
    count: usize,
) -> io::Result<(usize, u32, bool)> {
    // Hash maps and arrays take a 4-byte cursor (a bucket, an index).
    let mut next = 0u32;
    let mut attr = BatchAttr {
        in_batch: cursor.as_ref().map_or(0, |c| std::ptr::from_ref(c) as u64),
        out_batch: std::ptr::from_mut(&mut next) as u64,
        keys,
        values,
        count: count as u32,
        map_fd: fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(()) => Ok((attr.count as usize, next, false)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((attr.count as usize, next, true)),
        Err(e) => Err(e),
    }
}

/// Every entry of the hash map `fd`, read in batches.
pub fn read_all<K: aya::Pod, V: aya::Pod>(fd: i32) -> io::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    let mut keys = vec![zeroed::<K>(); BATCH];
    let mut values = vec![zeroed::<V>(); BATCH];
    let mut cursor = None;
    loop {
        let (read, next, ended) = lookup_batch(
            fd,
            cursor,
            keys.as_mut_ptr() as u64,
            values.as_mut_ptr() as u64,
            BATCH,
        )?;
        entries.extend(
            keys[..read]
                .iter()
                .copied()
                .zip(values[..read].iter().copied()),
        );
        if ended {
            return Ok(entries);
        }
        cursor = Some(next);
    }
}

/// Every slot of the per-CPU array `fd` of `slots` entries whose values are `u64` words, in
/// one `BPF_MAP_LOOKUP_BATCH`: slot by slot, `words` per CPU for each of `cpus` possible CPUs.
/// Cheap enough to read after every packet a test runs.
pub fn read_per_cpu_array(
    fd: i32,
    slots: usize,
    cpus: usize,
    words: usize,
) -> io::Result<Vec<u64>> {
    let mut keys = vec![0u32; slots];
    let mut values = vec![0u64; slots * cpus * words];
    let (read, _, _) = lookup_batch(
        fd,
        None,
        keys.as_mut_ptr() as u64,
        values.as_mut_ptr() as u64,
        slots,
    )?;
    if read != slots || keys.iter().enumerate().any(|(i, k)| *k as usize != i) {
        return Err(io::Error::other("partial batch read"));
    }
    Ok(values)
}

/// The value of `key` in the map `fd`, if it has one.
pub fn lookup<K: aya::Pod, V: aya::Pod>(fd: i32, key: &K) -> Option<V> {
    let mut value = zeroed::<V>();
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).ok().map(|()| value)
}

/// Removes `key`; false if it was gone already.
pub fn delete<K: aya::Pod>(fd: i32, key: &K) -> bool {
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: 0,
        flags: 0,
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).is_ok()
}

/// An all-zero `T`, which every [`aya::Pod`] type may be.
fn zeroed<T: aya::Pod>() -> T {
    // SAFETY: `Pod` types are valid for any bit pattern.
    unsafe { std::mem::zeroed() }
}
