//! The invalid-manifest corpus (`invalid/`, one file per mistake) with what each file must be
//! rejected for, read from the file's own header:
//!
//! ```yaml
//! # expect-object: Service default/web
//! # expect-field: spec.ports[0].port
//! # expect-message: is not a port
//! ```
//!
//! Included with `#[path]` by the unit test over `model::load` and by the binary's tests
//! (start-up and live reload), so the three paths hold every file to the same expectation.
// Each includer uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// How many files the corpus has: a file lost (renamed away from `.yaml`, deleted) fails the
/// tests instead of shrinking them.
pub const CORPUS_FILES: usize = 36;

/// One corpus file and the error it must produce.
#[derive(Debug, Clone)]
pub struct Invalid {
    /// The file.
    pub path: PathBuf,
    /// Its text, header included (the header is YAML comments).
    pub text: String,
    /// `ConfigError::object`.
    pub object: String,
    /// `ConfigError::field`.
    pub field: String,
    /// How `ConfigError::message` begins: the mistake and the value at fault.
    pub message: String,
}

impl Invalid {
    /// How the one-line error (`ConfigError`'s display) for a copy of this file at `file`
    /// begins: file, object, field and the mistake, in one piece, so that a message naming a
    /// longer value ("70000 is not a port" for "0 is not a port") does not match.
    pub fn expected_error(&self, file: &Path) -> String {
        format!(
            "{}: {}: {}: {}",
            file.display(),
            self.object,
            self.field,
            self.message
        )
    }
}

/// Every file of the corpus in `dir` (`lb-userspace/tests/data/invalid`), in name order.
pub fn invalid_corpus(dir: &Path) -> Vec<Invalid> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the invalid-manifest corpus")
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    paths.sort();
    assert_eq!(paths.len(), CORPUS_FILES, "{paths:?}");
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("a corpus file");
            let header = |key: &str| {
                let prefix = format!("# expect-{key}: ");
                text.lines()
                    .find_map(|line| line.strip_prefix(&prefix))
                    .unwrap_or_else(|| panic!("{}: no `{prefix}` line", path.display()))
                    .to_owned()
            };
            Invalid {
                object: header("object"),
                field: header("field"),
                message: header("message"),
                text,
                path,
            }
        })
        .collect()
}
