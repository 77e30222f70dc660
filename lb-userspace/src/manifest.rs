//! Reading Kubernetes manifests: `v1 Service`, `v1 Endpoints`, `discovery.k8s.io/v1
//! EndpointSlice`, and `v1 List`s of them, from a file or a folder of multi-document YAML (or
//! JSON) as written by hand or by `kubectl get ... -o yaml`.
//!
//! Other kinds (a Deployment beside its Service, a PodDisruptionBudget, a kind of a newer
//! release) are skipped, with a warning unless they are well-known companions; a document that
//! does not parse, is not an object or lacks `apiVersion`/`kind` is an error naming the file,
//! the object and the field.
//!
//! Unknown fields: the typed deserializers ignore a field they do not know, so a typo
//! (`sessionAfinity`) would silently change what is served. Each ignored field is reported
//! (through `serde_ignored`): one that is a near miss of a field known at the same place (see
//! [`fields`]) refuses the object, naming the field it probably meant; any other is a warning
//! and the object is served, since newer API servers add fields this version does not know.
//! An `EndpointSlice` of `addressType: FQDN` is skipped with a warning, as kube-proxy does.

mod fields;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;
use serde_yaml_ng::Value;

/// A manifest that cannot be used, located as precisely as the reader could.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {object}: {field}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The object: `Kind namespace/name`, or `document N` when it has no name.
    pub object: String,
    /// The field path, `-` when the whole object is concerned.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// An object and where it came from.
#[derive(Debug, Clone)]
pub struct Located<T> {
    /// The file it was read from.
    pub file: PathBuf,
    /// The object.
    pub object: T,
}

/// Every object read from a path.
#[derive(Debug, Default, Clone)]
pub struct Manifests {
    /// `v1 Service`s.
    pub services: Vec<Located<Service>>,
    /// `v1 Endpoints`.
    pub endpoints: Vec<Located<Endpoints>>,
    /// `discovery.k8s.io/v1 EndpointSlice`s.
    pub slices: Vec<Located<EndpointSlice>>,
    /// What was read past, one line each naming file, object and field: unknown fields that
    /// are no near miss, kinds that are not ours, slices of an address type not served.
    pub warnings: Vec<String>,
}

/// Kinds that may sit beside services in a folder and are not ours to read: skipped without a
/// word (any other kind is skipped with a warning).
const SKIPPED_KINDS: &[&str] = &[
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Pod",
    "ConfigMap",
    "Secret",
    "Namespace",
    "ServiceAccount",
    "Ingress",
    "NetworkPolicy",
    "HorizontalPodAutoscaler",
    "Job",
    "CronJob",
];

/// File endings read from a folder.
const MANIFEST_EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// Reads `path`: one file, or every `*.yaml`, `*.yml` and `*.json` file of a folder (not its
/// subfolders), in name order.
pub fn load(path: &Path) -> Result<Manifests, ConfigError> {
    let files = if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| io_error(path, &e))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| MANIFEST_EXTENSIONS.contains(&e))
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut manifests = Manifests::default();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| io_error(&file, &e))?;
        read_text(&file, &text, &mut manifests)?;
    }
    Ok(manifests)
}

fn io_error(path: &Path, error: &std::io::Error) -> ConfigError {
    ConfigError {
        file: path.display().to_string(),
        object: "-".into(),
        field: "-".into(),
        message: error.to_string(),
    }
}

/// Reads every document of one file's text into `manifests`.
///
/// An empty file (nothing but white space) is refused, not read as "no objects": it is what a
/// shell leaves between truncating a file and the writer's output (`kubectl get ... -o yaml >
/// file`), and applying it would remove its services until the write lands. The previous state
/// keeps serving meanwhile; a file meant to hold nothing is removed instead.
pub fn read_text(file: &Path, text: &str, manifests: &mut Manifests) -> Result<(), ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError {
            file: file.display().to_string(),
            object: "-".into(),
            field: "-".into(),
            message:
                "empty: taken as being written (a file's services are removed by removing the file)"
                    .into(),
        });
    }
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let object = format!("document {}", index + 1);
        let value = Value::deserialize(document).map_err(|e| ConfigError {
            file: file.display().to_string(),
            object: object.clone(),
            field: "-".into(),
            message: format!("not valid YAML: {e}"),
        })?;
        if value.is_null() {
            continue;
        }
        read_object(file, &object, value, manifests)?;
    }
    Ok(())
}

/// `Kind namespace/name` of a raw object, for messages.
fn describe(value: &Value, fallback: &str) -> String {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let metadata = value.get("metadata");
    let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match name {
        Some(name) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} ({fallback})"),
    }
}

fn read_object(
    file: &Path,
    fallback: &str,
    value: Value,
    manifests: &mut Manifests,
) -> Result<(), ConfigError> {
    let object = describe(&value, fallback);
    let error = |field: &str, message: String| ConfigError {
        file: file.display().to_string(),
        object: object.clone(),
        field: field.into(),
        message,
    };
    if !value.is_mapping() {
        return Err(error(
            "-",
            "expected a Kubernetes object (a mapping)".into(),
        ));
    }
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| error("apiVersion", "missing".into()))?
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| error("kind", "missing".into()))?
        .to_owned();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                read_object(
                    file,
                    &format!("{fallback}, item {}", i + 1),
                    item,
                    manifests,
                )?;
            }
            Ok(())
        }
        ("v1", "Service") => {
            static KNOWN: OnceLock<fields::Table> = OnceLock::new();
            let known = KNOWN.get_or_init(fields::table::<Service>);
            let service = parse(value, known, file, &object, &mut manifests.warnings)?;
            manifests.services.push(Located {
                file: file.to_path_buf(),
                object: service,
            });
            Ok(())
        }
        ("v1", "Endpoints") => {
            static KNOWN: OnceLock<fields::Table> = OnceLock::new();
            let known = KNOWN.get_or_init(fields::table::<Endpoints>);
            let endpoints = parse(value, known, file, &object, &mut manifests.warnings)?;
            manifests.endpoints.push(Located {
                file: file.to_path_buf(),
                object: endpoints,
            });
            Ok(())
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            static KNOWN: OnceLock<fields::Table> = OnceLock::new();
            let known = KNOWN.get_or_init(fields::table::<EndpointSlice>);
            let slice: EndpointSlice = parse(value, known, file, &object, &mut manifests.warnings)?;
            // kube-proxy reads IPv4 and IPv6 slices only; FQDN ones (and any type a newer
            // release adds) name no address to forward to.
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                manifests.warnings.push(format!(
                    "{}: {object}: addressType {}: not an IP address type; skipped",
                    file.display(),
                    slice.address_type
                ));
                return Ok(());
            }
            manifests.slices.push(Located {
                file: file.to_path_buf(),
                object: slice,
            });
            Ok(())
        }
        // Our kinds in a version we cannot read: served half-understood or not at all, either
        // would be a surprise.
        (api_version, kind @ ("Service" | "Endpoints" | "EndpointSlice" | "List")) => Err(error(
            "kind",
            format!(
                "unknown kind {kind} ({api_version}); expected v1 Service, v1 Endpoints, \
                 discovery.k8s.io/v1 EndpointSlice or v1 List"
            ),
        )),
        (_, kind) if SKIPPED_KINDS.contains(&kind) => {
            tracing::debug!(file = %file.display(), %object, "skipping a kind that is not ours");
            Ok(())
        }
        (api_version, kind) => {
            manifests.warnings.push(format!(
                "{}: {object}: kind {kind} ({api_version}) is not ours; skipped",
                file.display()
            ));
            Ok(())
        }
    }
}

/// Deserializes a typed object, reporting the path of the field that failed, and what it
/// ignored: a near miss of a known field is an error, any other unknown field a warning.
fn parse<T: serde::de::DeserializeOwned>(
    value: Value,
    known: &fields::Table,
    file: &Path,
    object: &str,
    warnings: &mut Vec<String>,
) -> Result<T, ConfigError> {
    let error = |field: &str, message: String| ConfigError {
        file: file.display().to_string(),
        object: object.to_owned(),
        field: field.into(),
        message,
    };
    let mut ignored = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| ignored.push(fields::Ignored::new(&path));
    let typed =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut note));
    // A near miss first, even when the object does not deserialize: a required field spelt
    // wrong (`adresses`) is then also missing, and the typo is what to fix.
    for field in &ignored {
        if let Some(meant) = field.near_miss(known) {
            return Err(error(
                &field.written,
                format!("unknown field; did you mean {meant}?"),
            ));
        }
    }
    let typed = typed.map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "-".to_owned() } else { path };
        error(&field, e.into_inner().to_string())
    })?;
    warnings.extend(ignored.iter().map(|field| {
        format!(
            "{}: {object}: {}: unknown field (not known to this version); ignored",
            file.display(),
            field.written
        )
    }));
    Ok(typed)
}
impl fmt::Display for Manifests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} services, {} endpoints, {} endpoint slices",
            self.services.len(),
            self.endpoints.len(),
            self.slices.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_refused_as_being_written_not_read_as_no_objects() {
        for text in ["", "\n", "  \n\t\n"] {
            let mut manifests = Manifests::default();
            let error = read_text(Path::new("cfg/app.yaml"), text, &mut manifests).unwrap_err();
            assert_eq!(error.file, "cfg/app.yaml");
            assert!(error.message.contains("being written"), "{}", error.message);
        }
        // A document with nothing in it, in a file that is not empty, is read as nothing.
        let mut manifests = Manifests::default();
        read_text(Path::new("cfg/app.yaml"), "---\n", &mut manifests).unwrap();
        assert!(manifests.services.is_empty());
    }
}
