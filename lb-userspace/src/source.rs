//! Sources of the desired state: each publishes snapshots of the objects it holds, with their
//! origin (a manifest's [`Located::file`](crate::manifest::Located)), on a channel where the
//! latest snapshot wins. The controller consumes the latest one; one it had no time to take is
//! simply replaced by the next, never queued.
//!
//! The file source ([`FileSource`]) watches a manifest file or a folder of them, lets a burst
//! of writes settle and reads them.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::info;

use crate::manifest::{self, ConfigError, Manifests};

/// What a source holds at one moment: the objects it read, or why it could not read them.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Counts the snapshots of this source, from 1.
    pub generation: u64,
    /// The objects, each with its origin; or the error that stopped the read.
    pub manifests: Result<Manifests, ConfigError>,
}

/// The latest snapshot of a source (`None` before its first).
pub type Snapshots = watch::Receiver<Option<Arc<Snapshot>>>;

/// How long a configuration must stay unchanged before it is read: editors and `kubectl`
/// write files in several steps.
pub const SETTLE: Duration = Duration::from_millis(50);
/// How long a change waits at most for the writes to settle: a file rewritten continuously
/// (faster than [`SETTLE`]) is still read this long after its first change.
pub const SETTLE_MAX: Duration = Duration::from_millis(500);

/// When a burst of changes is read: [`SETTLE`] after the last one, at most [`SETTLE_MAX`] after
/// the first.
#[derive(Debug, Clone, Copy)]
pub struct Settle {
    /// Quiet time after the last change.
    pub quiet: Duration,
    /// Longest wait after the first change.
    pub max: Duration,
}

impl Default for Settle {
    fn default() -> Self {
        Self {
            quiet: SETTLE,
            max: SETTLE_MAX,
        }
    }
}

/// Watches a manifest file (through its folder, since editors replace files) or a folder of
/// them, and publishes a [`Snapshot`] after every settled burst of changes. Dropping it stops
/// the watch.
pub struct FileSource {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileSource {
    /// Starts watching `path` (within a tokio runtime). The first snapshot comes with the first
    /// change: whoever starts the source reads the configuration as it is (after starting it,
    /// so a change written meanwhile is not missed).
    pub fn start(path: &Path, settle: Settle) -> anyhow::Result<(Self, Snapshots)> {
        let (change_tx, changes) = mpsc::channel::<()>(64);
        let watcher = watch_path(path, change_tx)?;
        let (snapshot_tx, snapshots) = watch::channel(None);
        let task = tokio::spawn(run(path.to_path_buf(), settle, changes, snapshot_tx));
        Ok((
            Self {
                _watcher: watcher,
                task,
            },
            snapshots,
        ))
    }
}

/// Waits for a burst of changes to settle, reads, publishes; again.
async fn run(
    path: PathBuf,
    settle: Settle,
    mut changes: mpsc::Receiver<()>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
) {
    let mut generation = 0;
    while changes.recv().await.is_some() {
        let deadline = Instant::now() + settle.max;
        let mut quiet_until = Instant::now() + settle.quiet;
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Some(()) => quiet_until = Instant::now() + settle.quiet,
                    None => return,
                },
                () = tokio::time::sleep_until(quiet_until.min(deadline)) => break,
            }
        }
        generation += 1;
        let read = path.clone();
        // Reading and parsing thousands of objects is not for the runtime's threads.
        let manifests = tokio::task::spawn_blocking(move || manifest::load(&read))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigError {
                    file: path.display().to_string(),
                    object: Box::default(),
                    field: "-".into(),
                    reason: manifest::ConfigReason::Unreadable,
                    message: format!("reading stopped: {e}"),
                })
            });
        let snapshot = Arc::new(Snapshot {
            generation,
            manifests,
        });
        if snapshots.send(Some(snapshot)).is_err() {
            return;
        }
    }
}

/// Watches `path` (a file, through its folder; or a folder) and signals every change.
fn watch_path(
    path: &Path,
    changes: mpsc::Sender<()>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let (folder, file) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        let folder = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        (folder, path.file_name().map(ToOwned::to_owned))
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = match &file {
            Some(name) => event.paths.iter().any(|p| p.file_name() == Some(name)),
            None => true,
        };
        if relevant {
            // A full channel already holds a change to look at: nothing is lost.
            let _ = changes.try_send(());
        }
    })?;
    watcher
        .watch(&folder, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", folder.display()))?;
    info!(path = %path.display(), "watching the configuration");
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  \
        externalIPs: [198.18.100.1]\n  ports:\n  - port: 8080\n";

    async fn next(snapshots: &mut Snapshots) -> Arc<Snapshot> {
        snapshots.changed().await.expect("the source runs");
        snapshots
            .borrow_and_update()
            .clone()
            .expect("a snapshot was sent")
    }

    #[tokio::test]
    async fn publishes_what_it_reads_with_its_origin_or_the_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_source, mut snapshots) = FileSource::start(dir.path(), Settle::default()).unwrap();
        let file = dir.path().join("web.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        let snapshot = next(&mut snapshots).await;
        let manifests = snapshot.manifests.as_ref().expect("it reads");
        assert_eq!(manifests.services.len(), 1);
        assert_eq!(manifests.services[0].file, file, "the origin is kept");
        std::fs::write(&file, "kind: [").unwrap();
        let snapshot = next(&mut snapshots).await;
        assert!(snapshot.generation >= 2);
        let error = snapshot.manifests.as_ref().expect_err("it does not parse");
        assert_eq!(error.file, file.display().to_string());
    }

    /// A file rewritten faster than it settles is read all the same: the snapshot comes while
    /// the writes go on (the writer runs until the test has seen one, or for a minute).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_rewritten_continuously_is_read_after_the_longest_wait() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        let (_source, mut snapshots) = FileSource::start(&file, Settle::default()).unwrap();
        let writing = Arc::new(AtomicBool::new(true));
        let seen = Arc::new(AtomicBool::new(false));
        let writer = {
            let (writing, seen, file) = (writing.clone(), seen.clone(), file.clone());
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                while !seen.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
                    std::fs::write(&file, SERVICE).unwrap();
                    std::thread::sleep(SETTLE / 5);
                }
                writing.store(false, Ordering::SeqCst);
            })
        };
        let snapshot = next(&mut snapshots).await;
        assert!(
            writing.load(Ordering::SeqCst),
            "read while the writes went on"
        );
        seen.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        // Written whole each time; a read may still land in the middle of a write, so only the
        // order is asserted, not what it read.
        assert_eq!(snapshot.generation, 1);
    }
}
