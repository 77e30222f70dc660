//! The sweep of expired flows: the data path ignores an expired entry the moment its lifetime
//! ends and removes a closed flow's entries itself; this sweep, run off the packet path by the
//! controller every few seconds, gives the room of flows that simply went quiet (UDP, a client
//! that vanished) back to the table, and removes reverse-NAT entries whose flow is gone, so the
//! two tables keep one lifetime per flow.
//!
//! It reads the tables with `BPF_MAP_LOOKUP_BATCH` (a few system calls for the whole table, and
//! safe against entries the data path removes meanwhile, unlike a key-by-key walk) and checks
//! each entry again right before removing it, so a flow a packet revived in between stays.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use lb_common::{FlowKey, FlowValue, ReverseValue, conntrack::expired};

use crate::dataplane::{Dataplane, DataplaneError};

/// Errors of sweeping the connection tables.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// A table could not be opened.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// A system call on a table failed.
    #[error("sweeping {table}: {source}")]
    Syscall {
        /// The map's name.
        table: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// What one sweep found and removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Flows in the connection table before the sweep.
    pub flows: usize,
    /// Expired flows removed (with their reverse entries).
    pub expired: usize,
    /// Reverse entries removed whose flow was gone, expired or on another backend.
    pub orphans: usize,
}

/// `CLOCK_MONOTONIC_COARSE` now, the clock of `bpf_ktime_get_coarse_ns`.
pub fn now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// An all-zero `T`, which every [`aya::Pod`] type may be.
fn zeroed<T: aya::Pod>() -> T {
    // SAFETY: `Pod` types are valid for any bit pattern.
    unsafe { std::mem::zeroed() }
}

/// The connection and reverse-NAT tables of a data plane, as file descriptors of their own so
/// a sweeper thread can hold them beside the controller.
pub struct FlowTables {
    conntrack: OwnedFd,
    reverse: OwnedFd,
}

const CONNTRACK: &str = lb_common::maps::names::CONNTRACK;
const REVERSE_NAT: &str = lb_common::maps::names::REVERSE_NAT;

impl FlowTables {
    /// The tables of `dataplane`.
    pub fn of(dataplane: &Dataplane) -> Result<Self, SweepError> {
        let clone = |name: &'static str| -> Result<OwnedFd, SweepError> {
            dataplane
                .map_fd(name)?
                .try_clone_to_owned()
                .map_err(|source| SweepError::Syscall {
                    table: name,
                    source,
                })
        };
        Ok(Self {
            conntrack: clone(CONNTRACK)?,
            reverse: clone(REVERSE_NAT)?,
        })
    }

    /// Removes the flows expired at `now_ns` and the reverse entries no live flow owns.
    pub fn sweep(&self, now_ns: u64) -> Result<SweepReport, SweepError> {
        let fd = self.conntrack.as_raw_fd();
        let rev_fd = self.reverse.as_raw_fd();
        let error = |table| move |source| SweepError::Syscall { table, source };
        let flows: Vec<(FlowKey, FlowValue)> = read_all(fd).map_err(error(CONNTRACK))?;
        let mut report = SweepReport {
            flows: flows.len(),
            ..SweepReport::default()
        };
        let mut live = HashMap::with_capacity(flows.len());
        for (key, value) in flows {
            if !expired(value.expires_ns, now_ns) {
                live.insert(key, value.backend_id);
                continue;
            }
            // Checked again: a reply may have revived it since it was read.
            let now_expired = lookup::<FlowKey, FlowValue>(fd, &key)
                .is_some_and(|v| expired(v.expires_ns, now_ns));
            if now_expired && delete(fd, &key) {
                report.expired += 1;
            }
        }
        let reverse: Vec<(FlowKey, ReverseValue)> = read_all(rev_fd).map_err(error(REVERSE_NAT))?;
        for (key, to) in reverse {
            let forward = forward_key(&key, &to);
            if live.get(&forward) == Some(&to.backend_id) {
                continue;
            }
            // Not live when the table was read: look again (it may have been created since).
            let owned = lookup::<FlowKey, FlowValue>(fd, &forward)
                .is_some_and(|v| v.backend_id == to.backend_id && !expired(v.expires_ns, now_ns));
            if !owned && delete(rev_fd, &key) {
                report.orphans += 1;
            }
        }
        Ok(report)
    }
}

/// How often the controller sweeps: an idle UDP flow's room returns to the table within its
/// lifetime plus this.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Sweeps `tables` every [`SWEEP_INTERVAL`] on a thread of its own, off the controller's loop
/// (a sweep of a full table takes a while and must not delay applies or scrapes). The thread
/// ends with the process.
pub fn spawn_sweeper(tables: FlowTables) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(SWEEP_INTERVAL);
            match tables.sweep(now_ns()) {
                Ok(report) if report.expired + report.orphans > 0 => tracing::info!(
                    flows = report.flows,
                    expired = report.expired,
                    orphans = report.orphans,
                    "swept the connection tables"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "sweeping the connection tables"),
            }
        }
    })
}

/// The forward key (client -> VIP) of the flow whose replies have key `reply` and go back as
/// `to`; the kernel's `forward_key_of_reply`.
fn forward_key(reply: &FlowKey, to: &ReverseValue) -> FlowKey {
    FlowKey {
        src: reply.dst,
        dst: to.vip,
        sport: reply.dport,
        dport: to.vip_port,
        proto: reply.proto,
        pad: [0; 3],
    }
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

/// Every entry of a hash map, read in batches.
fn read_all<K: aya::Pod, V: aya::Pod>(fd: i32) -> io::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    let mut keys = vec![zeroed::<K>(); BATCH];
    let mut values = vec![zeroed::<V>(); BATCH];
    // Hash maps take a 4-byte bucket cursor.
    let mut cursor = 0u32;
    let mut first = true;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_ref(&cursor) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let read = attr.count as usize;
        entries.extend(
            keys[..read]
                .iter()
                .copied()
                .zip(values[..read].iter().copied()),
        );
        match result {
            Ok(()) => {}
            // The end of the table.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Err(e) => return Err(e),
        }
        cursor = next;
        first = false;
    }
}

fn lookup<K: aya::Pod, V: aya::Pod>(fd: i32, key: &K) -> Option<V> {
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
fn delete<K: aya::Pod>(fd: i32, key: &K) -> bool {
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: 0,
        flags: 0,
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).is_ok()
}

/// Keeps the descriptors' types honest: both are maps of the data plane.
impl std::fmt::Debug for FlowTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTables")
            .field("conntrack", &self.conntrack.as_fd())
            .field("reverse", &self.reverse.as_fd())
            .finish()
    }
}
