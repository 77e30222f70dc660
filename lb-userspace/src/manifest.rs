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
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;
use serde_yaml_ng::Value;

/// Why a manifest (or an object of it) cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConfigReason {
    /// The file could not be read.
    Unreadable,
    /// The file is empty: taken as being written.
    Empty,
    /// A document is not YAML (or JSON).
    NotYaml,
    /// A document is not a Kubernetes object (a mapping with `apiVersion` and `kind`).
    NotAnObject,
    /// A required field is missing (`apiVersion`, `kind`, `metadata.name`).
    MissingField,
    /// One of our kinds in an API version this load balancer does not read.
    UnknownKind,
    /// A near miss of a known field (a typo).
    UnknownField,
    /// A field's value is wrong (not a port, not an IP address, not a prime ...).
    InvalidValue,
    /// A VIP:port/protocol another Service has (the older one keeps it).
    Conflict,
    /// A VIP that is an address of this host (refused unless `--allow-host-addresses`).
    HostAddress,
}

impl ConfigReason {
    /// Whether the whole configuration is refused, not one object: the file cannot be read,
    /// is being written, or holds a document whose kind and name cannot be told (whose
    /// Service, then, cannot be kept as it was).
    pub fn refuses_everything(self) -> bool {
        matches!(
            self,
            Self::Unreadable | Self::Empty | Self::NotYaml | Self::NotAnObject
        )
    }
}

/// The object a [`ConfigError`] is about, as precisely as the reader could tell it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    /// `Service`, `Endpoints`, `EndpointSlice`, another kind, or empty when not known.
    pub kind: String,
    /// The namespace (`default` when the object gives none).
    pub namespace: String,
    /// The name; empty when the object has none.
    pub name: String,
    /// Where in its file it is, for an object without a name: `document 2`, `document 1,
    /// item 3`.
    pub place: String,
    /// The Service it serves: a Service's or an Endpoints' own name, an EndpointSlice's
    /// `kubernetes.io/service-name` label; `None` when not known.
    pub service: Option<String>,
}

impl ObjectRef {
    /// A named object of `kind`.
    pub fn named(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            service: matches!(kind, "Service" | "Endpoints").then(|| name.into()),
            ..Self::default()
        }
    }

    /// An object known only by its place in its file.
    pub fn at(place: &str) -> Self {
        Self {
            place: place.into(),
            ..Self::default()
        }
    }
}

impl fmt::Display for ObjectRef {
    /// `Kind namespace/name`; `Kind (document N)` or `document N` when it has no name; `-` when
    /// no object is concerned.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind.as_str(), self.name.as_str(), self.place.as_str()) {
            (kind, name, _) if !name.is_empty() => {
                write!(f, "{kind} {}/{name}", self.namespace)
            }
            ("", _, "") => f.write_str("-"),
            ("", _, place) => f.write_str(place),
            (kind, _, "") => f.write_str(kind),
            (kind, _, place) => write!(f, "{kind} ({place})"),
        }
    }
}

/// The namespace of an object that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// An object's namespace, [`DEFAULT_NAMESPACE`] when it names none.
pub fn namespace_of(namespace: Option<&str>) -> &str {
    namespace.unwrap_or(DEFAULT_NAMESPACE)
}

/// A manifest that cannot be used, located as precisely as the reader could.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {object}: {field}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The object.
    pub object: Box<ObjectRef>,
    /// The field path, `-` when the whole object is concerned.
    pub field: String,
    /// Why, as a type.
    pub reason: ConfigReason,
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
    /// `v1 Node`s: their addresses are where node ports are served (see
    /// [`crate::api::node_addresses`]).
    pub nodes: Vec<Located<Node>>,
    /// What was read past, one line each naming file, object and field: unknown fields that
    /// are no near miss, kinds that are not ours, slices of an address type not served.
    pub warnings: Vec<String>,
    /// Objects of our kinds refused as they were read (a near miss of a field, a value of the
    /// wrong type, an API version not read): left out, the others read on.
    pub refused: Vec<ConfigError>,
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
        object: Box::new(ObjectRef::default()),
        field: "-".into(),
        reason: ConfigReason::Unreadable,
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
            object: Box::new(ObjectRef::default()),
            field: "-".into(),
            reason: ConfigReason::Empty,
            message:
                "empty: taken as being written (a file's services are removed by removing the file)"
                    .into(),
        });
    }
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let object = format!("document {}", index + 1);
        let value = Value::deserialize(document).map_err(|e| ConfigError {
            file: file.display().to_string(),
            object: Box::new(ObjectRef::at(&object)),
            field: "-".into(),
            reason: ConfigReason::NotYaml,
            message: format!("not valid YAML: {e}"),
        })?;
        if value.is_null() {
            continue;
        }
        read_object(file, &object, value, manifests)?;
    }
    Ok(())
}

/// The identity of a raw object, for messages and for telling which Service it serves.
fn describe(value: &Value, fallback: &str) -> ObjectRef {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let metadata = value.get("metadata");
    let text = |key: &str| {
        metadata
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let namespace = namespace_of(text("namespace").as_deref()).to_owned();
    match text("name") {
        Some(name) => {
            let mut object = ObjectRef::named(kind, &namespace, &name);
            if kind == "EndpointSlice" {
                object.service = metadata
                    .and_then(|m| m.get("labels"))
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
            }
            object
        }
        None => ObjectRef {
            kind: kind.into(),
            namespace,
            place: fallback.into(),
            ..ObjectRef::default()
        },
    }
}

/// The EndpointSlice label naming the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn read_object(
    file: &Path,
    fallback: &str,
    value: Value,
    manifests: &mut Manifests,
) -> Result<(), ConfigError> {
    let object = describe(&value, fallback);
    let error = |field: &str, reason: ConfigReason, message: String| ConfigError {
        file: file.display().to_string(),
        object: Box::new(object.clone()),
        field: field.into(),
        reason,
        message,
    };
    // Without a mapping, an apiVersion and a kind the object cannot be told, nor whose
    // Service it serves: the whole configuration is refused (see `ConfigReason`).
    if !value.is_mapping() {
        return Err(error(
            "-",
            ConfigReason::NotAnObject,
            "expected a Kubernetes object (a mapping)".into(),
        ));
    }
    let missing = |field: &str| error(field, ConfigReason::NotAnObject, "missing".into());
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| missing("apiVersion"))?
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| missing("kind"))?
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
            if let Some(service) = parse_or_refuse(value, known, file, &object, manifests) {
                manifests.services.push(service);
            }
            Ok(())
        }
        ("v1", "Endpoints") => {
            static KNOWN: OnceLock<fields::Table> = OnceLock::new();
            let known = KNOWN.get_or_init(fields::table::<Endpoints>);
            if let Some(endpoints) = parse_or_refuse(value, known, file, &object, manifests) {
                manifests.endpoints.push(endpoints);
            }
            Ok(())
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            static KNOWN: OnceLock<fields::Table> = OnceLock::new();
            let known = KNOWN.get_or_init(fields::table::<EndpointSlice>);
            let Some(slice) =
                parse_or_refuse::<EndpointSlice>(value, known, file, &object, manifests)
            else {
                return Ok(());
            };
            // kube-proxy reads IPv4 and IPv6 slices only; FQDN ones (and any type a newer
            // release adds) name no address to forward to.
            if !matches!(slice.object.address_type.as_str(), "IPv4" | "IPv6") {
                manifests.warnings.push(format!(
                    "{}: {object}: addressType {}: not an IP address type; skipped",
                    file.display(),
                    slice.object.address_type
                ));
                return Ok(());
            }
            manifests.slices.push(slice);
            Ok(())
        }
        ("v1", "Node") => {
            static KNOWN: OnceLock<fields::Table> = OnceLock::new();
            let known = KNOWN.get_or_init(fields::table::<Node>);
            if let Some(node) = parse_or_refuse(value, known, file, &object, manifests) {
                manifests.nodes.push(node);
            }
            Ok(())
        }
        // Our kinds in a version we cannot read: served half-understood or not at all, either
        // would be a surprise.
        (api_version, kind @ ("Service" | "Endpoints" | "EndpointSlice" | "Node" | "List")) => {
            manifests.refused.push(error(
                "kind",
                ConfigReason::UnknownKind,
                format!(
                    "unknown kind {kind} ({api_version}); expected v1 Service, v1 Endpoints, \
                     discovery.k8s.io/v1 EndpointSlice, v1 Node or v1 List"
                ),
            ));
            Ok(())
        }
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

/// An object of one of our kinds, with its file; `None` when it is refused (the refusal kept
/// in `manifests`, which reads on: a bad object is that object's problem only).
fn parse_or_refuse<T: serde::de::DeserializeOwned>(
    value: Value,
    known: &fields::Table,
    file: &Path,
    object: &ObjectRef,
    manifests: &mut Manifests,
) -> Option<Located<T>> {
    match parse(value, known, file, object, &mut manifests.warnings) {
        Ok(parsed) => Some(Located {
            file: file.to_path_buf(),
            object: parsed,
        }),
        Err(refused) => {
            manifests.refused.push(refused);
            None
        }
    }
}

/// Deserializes a typed object, reporting the path of the field that failed, and what it
/// ignored: a near miss of a known field is an error, any other unknown field a warning.
fn parse<T: serde::de::DeserializeOwned>(
    value: Value,
    known: &fields::Table,
    file: &Path,
    object: &ObjectRef,
    warnings: &mut Vec<String>,
) -> Result<T, ConfigError> {
    let error = |field: &str, reason: ConfigReason, message: String| ConfigError {
        file: file.display().to_string(),
        object: Box::new(object.clone()),
        field: field.into(),
        reason,
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
                ConfigReason::UnknownField,
                format!("unknown field; did you mean {meant}?"),
            ));
        }
    }
    let typed = typed.map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "-".to_owned() } else { path };
        let message = e.into_inner().to_string();
        let reason = if message.starts_with("missing field") {
            ConfigReason::MissingField
        } else {
            ConfigReason::InvalidValue
        };
        error(&field, reason, message)
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
