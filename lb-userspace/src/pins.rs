//! Where the data plane's state lives between controller runs: pinned maps and links in a
//! bpffs folder, and the applied state (JSON) in a plain folder beside it.
//!
//! The default roots are under `/run/lb`, not `/sys/fs/bpf`: `ip netns exec` gives each command
//! a fresh `/sys` without the host's bpffs, so pins under `/sys/fs/bpf` made in one namespace
//! would be invisible to a controller restarted from another.

use std::{
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// Default bpffs folder; one subfolder per interface.
pub const DEFAULT_PIN_ROOT: &str = "/run/lb/bpf";
/// Default folder of the applied states; one file per interface.
pub const DEFAULT_STATE_ROOT: &str = "/run/lb/state";

/// Errors of preparing the pin folders.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// A folder could not be made, mounted or inspected.
    #[error("{path}: {action}: {source}")]
    Io {
        /// The folder.
        path: String,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The folders of one attached interface.
#[derive(Debug, Clone)]
pub struct Paths {
    /// bpffs folder of its pinned maps and links.
    pub pin_dir: PathBuf,
    /// Its applied-state file.
    pub state_file: PathBuf,
    /// Beside the state: the ICMP redirect settings found before attach, put back by detach
    /// (see [`crate::redirects`]).
    pub redirects_file: PathBuf,
}

impl Paths {
    /// The folders of `iface` under the given roots.
    pub fn new(pin_root: &Path, state_root: &Path, iface: &str) -> Self {
        Self {
            pin_dir: pin_root.join(iface),
            state_file: state_root.join(format!("{iface}.json")),
            redirects_file: state_root.join(format!("{iface}.sysctl")),
        }
    }

    /// Makes both folders (readable by root only), mounting a bpffs at the pin root when it is
    /// not on one already.
    pub fn prepare(&self, pin_root: &Path) -> Result<(), PinError> {
        let io = |path: &Path, action| {
            let path = path.display().to_string();
            move |source| PinError::Io {
                path,
                action,
                source,
            }
        };
        // Roots under the default one share its bpffs, so that tests and sandboxes that pick
        // their own subfolder leave no mount behind.
        let mount_point = if pin_root.starts_with(DEFAULT_PIN_ROOT) {
            Path::new(DEFAULT_PIN_ROOT)
        } else {
            pin_root
        };
        make_private_dir(mount_point).map_err(io(mount_point, "creating"))?;
        if !is_bpffs(mount_point) {
            mount(
                Some("bpf"),
                mount_point,
                Some("bpf"),
                MsFlags::empty(),
                Some("mode=0700"),
            )
            .map_err(|e| io(mount_point, "mounting a bpffs")(e.into()))?;
        }
        make_private_dir(pin_root).map_err(io(pin_root, "creating"))?;
        make_private_dir(&self.pin_dir).map_err(io(&self.pin_dir, "creating"))?;
        if let Some(state_dir) = self.state_file.parent() {
            make_private_dir(state_dir).map_err(io(state_dir, "creating"))?;
        }
        Ok(())
    }
}

fn make_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Whether `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}
