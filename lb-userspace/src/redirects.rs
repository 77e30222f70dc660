//! ICMP redirects off on the attached interface, and back as they were on detach.
//!
//! On a one-armed host (clients and backends on IFACE's segment) a backend's reply comes in on
//! IFACE and is routed back out of it, so the kernel tells the backend, with an ICMP redirect,
//! to reach the client directly; a backend that follows it bypasses the load balancer, and its
//! replies are never reverse-NATed. IPv4 sends redirects when `conf/all/send_redirects` *or*
//! `conf/IFACE/send_redirects` is 1 (`IN_DEV_ORCONF`), so attach sets both to 0.
//!
//! The values found are recorded in a small file beside the applied state before anything is
//! changed, and a later attach never overwrites that record (a restarted controller finds the
//! settings at 0, its predecessor's doing). `all` is one setting for every interface of a
//! network namespace: records of one namespace share its original, and the last one removed
//! restores it.
//!
//! `/proc/sys/net` shows the network namespace of the thread that opens it, so the record names
//! its namespace; a `detach` run from another namespace (the host's, say) restores the settings
//! from a thread that entered it.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// Errors of turning redirects off and restoring them.
#[derive(Debug, thiserror::Error)]
pub enum RedirectsError {
    /// A setting or the record could not be read or written.
    #[error("{path}: {action}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The record does not parse.
    #[error("{path}: not a send_redirects record: {message}")]
    Record {
        /// The record file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The record's network namespace exists but could not be entered.
    #[error("entering the network namespace of {path}: {source}")]
    Enter {
        /// The record file.
        path: String,
        /// The underlying error.
        source: nix::Error,
    },
}

/// A network namespace's identity: the device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NetnsId {
    dev: u64,
    ino: u64,
}

impl NetnsId {
    /// The calling thread's network namespace.
    fn current() -> std::io::Result<Self> {
        Self::of(Path::new("/proc/thread-self/ns/net"))
    }

    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// The settings of one interface as found before attach.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    netns: NetnsId,
    iface: String,
    /// `conf/all/send_redirects` as found (or as the first record of the namespace found it).
    all: String,
    /// `conf/IFACE/send_redirects` as found.
    interface: String,
}

impl Record {
    fn to_text(&self) -> String {
        format!(
            "# send_redirects before lb-userspace attached {iface}; restored by detach\n\
             netns={}:{}\niface={iface}\nall={}\ninterface={}\n",
            self.netns.dev,
            self.netns.ino,
            self.all,
            self.interface,
            iface = self.iface,
        )
    }

    fn parse(path: &Path, text: &str) -> Result<Self, RedirectsError> {
        let error = |message: String| RedirectsError::Record {
            path: path.display().to_string(),
            message,
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
                .ok_or_else(|| error(format!("no {name}=")))
        };
        let netns = field("netns")?;
        let (dev, ino) = netns
            .split_once(':')
            .and_then(|(d, i)| Some((d.parse().ok()?, i.parse().ok()?)))
            .ok_or_else(|| error(format!("netns={netns}: expected DEV:INODE")))?;
        let record = Self {
            netns: NetnsId { dev, ino },
            iface: field("iface")?,
            all: field("all")?,
            interface: field("interface")?,
        };
        for value in [&record.all, &record.interface] {
            if value.parse::<u8>().is_err() {
                return Err(error(format!("{value:?} is not a setting")));
            }
        }
        Ok(record)
    }

    fn read(path: &Path) -> Result<Option<Self>, RedirectsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io(path, "reading")(source)),
        }
    }

    /// Written whole or not at all (write, then rename).
    fn write(&self, path: &Path) -> Result<(), RedirectsError> {
        let tmp = path.with_extension("sysctl.tmp");
        std::fs::write(&tmp, self.to_text()).map_err(io(&tmp, "writing"))?;
        std::fs::rename(&tmp, path).map_err(io(path, "writing"))
    }
}

fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> RedirectsError {
    let path = path.display().to_string();
    move |source| RedirectsError::Io {
        path,
        action,
        source,
    }
}

fn setting_path(scope: &str) -> PathBuf {
    Path::new("/proc/sys/net/ipv4/conf")
        .join(scope)
        .join("send_redirects")
}

fn read_setting(scope: &str) -> Result<String, RedirectsError> {
    let path = setting_path(scope);
    std::fs::read_to_string(&path)
        .map(|v| v.trim().to_owned())
        .map_err(io(&path, "reading"))
}

fn write_setting(scope: &str, value: &str) -> Result<(), RedirectsError> {
    let path = setting_path(scope);
    std::fs::write(&path, value).map_err(io(&path, "writing"))
}

/// The other records in `record`'s folder that belong to network namespace `netns`.
fn siblings(record: &Path, netns: NetnsId) -> Vec<Record> {
    let Some(folder) = record.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p != record && p.extension().is_some_and(|e| e == "sysctl"))
        .filter_map(|p| Record::read(&p).ok().flatten())
        .filter(|r| r.netns == netns)
        .collect()
}

/// Turns ICMP redirects off on `iface` and for the whole namespace (`all`), first recording the
/// values found in `record` unless a record is there already (a restarted controller's attach,
/// which finds them at 0).
pub fn disable(iface: &str, record: &Path) -> Result<(), RedirectsError> {
    if Record::read(record)?.is_none() {
        let netns =
            NetnsId::current().map_err(io(Path::new("/proc/thread-self/ns/net"), "reading"))?;
        // Another interface of this namespace turned `all` off already: its record holds the
        // value found before any attach.
        let all = match siblings(record, netns).first() {
            Some(other) => other.all.clone(),
            None => read_setting("all")?,
        };
        Record {
            netns,
            iface: iface.to_owned(),
            all,
            interface: read_setting(iface)?,
        }
        .write(record)?;
    }
    write_setting(iface, "0")?;
    write_setting("all", "0")
}

/// Puts back the values recorded in `record` and removes it; `false` when there was no record.
/// `all` is put back only by the namespace's last record. Run from another network namespace,
/// it enters the record's (found among the named ones of `ip netns` and those of running
/// processes); a namespace that is gone took its settings with it.
pub fn restore(record: &Path) -> Result<bool, RedirectsError> {
    let Some(found) = Record::read(record)? else {
        return Ok(false);
    };
    let last = siblings(record, found.netns).is_empty();
    let put_back = || -> Result<(), RedirectsError> {
        // An interface deleted meanwhile has no setting left to restore.
        match write_setting(&found.iface, &found.interface) {
            Err(RedirectsError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
        if last {
            write_setting("all", &found.all)?;
        }
        Ok(())
    };
    let here = NetnsId::current().is_ok_and(|id| id == found.netns);
    if here {
        put_back()?;
    } else if let Some(ns) = find_netns(found.netns) {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| {
                        RedirectsError::Enter {
                            path: record.display().to_string(),
                            source,
                        }
                    })?;
                    put_back()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
    } else {
        tracing::info!(
            record = %record.display(),
            "the network namespace of the send_redirects record is gone, and its settings with it"
        );
    }
    std::fs::remove_file(record).map_err(io(record, "removing"))?;
    Ok(true)
}

/// An open handle on the network namespace `id`: a named one (`ip netns`), else one a process
/// is in.
fn find_netns(id: NetnsId) -> Option<File> {
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path());
    let of_processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .map(|e| e.path().join("ns/net"));
    named
        .chain(of_processes)
        .find(|path| NetnsId::of(path).is_ok_and(|found| found == id))
        .and_then(|path| File::open(path).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_what_was_written() {
        let record = Record {
            netns: NetnsId {
                dev: 4,
                ino: 4026531840,
            },
            iface: "eth0".into(),
            all: "1".into(),
            interface: "0".into(),
        };
        let path = Path::new("eth0.sysctl");
        assert_eq!(Record::parse(path, &record.to_text()).unwrap(), record);
        let error = Record::parse(path, "netns=4:1\niface=eth0\nall=yes\ninterface=1\n");
        assert!(error.is_err(), "{error:?}");
        assert!(Record::parse(path, "iface=eth0\n").is_err());
    }

    #[test]
    fn records_of_one_namespace_are_siblings() {
        let folder = tempfile::tempdir().unwrap();
        let mine = NetnsId { dev: 4, ino: 1 };
        let other = NetnsId { dev: 4, ino: 2 };
        for (name, netns) in [("a", mine), ("b", mine), ("c", other)] {
            Record {
                netns,
                iface: name.into(),
                all: "1".into(),
                interface: "1".into(),
            }
            .write(&folder.path().join(format!("{name}.sysctl")))
            .unwrap();
        }
        let found = siblings(&folder.path().join("a.sysctl"), mine);
        assert_eq!(
            found.iter().map(|r| r.iface.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
    }
}
