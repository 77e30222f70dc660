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

use lb_common::{
    FlowKey, FlowValue, ReverseValue,
    conntrack::{expired, forward_key_of_reply},
};

use crate::{
    dataplane::{Dataplane, DataplaneError},
    syscall::{delete, lookup, read_all},
};

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
            let forward = forward_key_of_reply(&key, &to);
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

/// Keeps the descriptors' types honest: both are maps of the data plane.
impl std::fmt::Debug for FlowTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTables")
            .field("conntrack", &self.conntrack.as_fd())
            .field("reverse", &self.reverse.as_fd())
            .finish()
    }
}
