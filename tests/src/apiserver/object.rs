//! Small operations on objects held as JSON: metadata fields, RFC 7386 merge patch, the
//! server-assigned values (uid, timestamps).

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value};

/// How a client asked to see objects, by its `Accept` header.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) enum Form {
    /// The objects themselves.
    #[default]
    Full,
    /// `as=PartialObjectMetadata`: only their metadata (kube-rs's `metadata_watcher`,
    /// `list_metadata`, `get_metadata`).
    Metadata,
}

impl Form {
    /// `object` in this form: a PartialObjectMetadata keeps kind, apiVersion and metadata only,
    /// and says it is one.
    pub fn of(self, object: &Value) -> Cow<'_, Value> {
        match self {
            Form::Full => Cow::Borrowed(object),
            Form::Metadata => Cow::Owned(serde_json::json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": object.get("metadata").cloned().unwrap_or_else(|| Value::Object(Map::new())),
            })),
        }
    }
}

/// `metadata.<field>` as a string, if it is one.
pub(super) fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

/// `metadata`, made an object if it is missing (or not an object).
pub(super) fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    field_object_mut(object, "metadata")
}

/// `object.<field>` as an object, created (or replaced) if it is not one; `object` itself is
/// made an object first.
pub(super) fn field_object_mut<'a>(
    object: &'a mut Value,
    field: &str,
) -> &'a mut Map<String, Value> {
    let map = as_object_mut(object);
    let slot = map
        .entry(field.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    as_object_mut(slot)
}

/// `value` as an object, replaced by an empty one if it is anything else.
pub(super) fn as_object_mut(value: &mut Value) -> &mut Map<String, Value> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    match value {
        Value::Object(map) => map,
        _ => unreachable!("made an object just above"),
    }
}

/// The stored resourceVersion of an object, as a number (0 if it has none).
pub(super) fn resource_version(object: &Value) -> u64 {
    meta_str(object, "resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

/// Sets `metadata.resourceVersion`, as a decimal string (as etcd's revision).
pub(super) fn set_resource_version(object: &mut Value, rv: u64) {
    meta_mut(object).insert("resourceVersion".into(), Value::String(rv.to_string()));
}

/// `metadata.labels` as pairs (empty if none).
pub(super) fn labels(object: &Value) -> impl Iterator<Item = (&str, &str)> {
    object
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
}

/// Whether `metadata.finalizers` names anything.
pub(super) fn has_finalizers(object: &Value) -> bool {
    object
        .get("metadata")
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    let target = as_object_mut(target);
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The current time as the API server writes `creationTimestamp` (RFC 3339, seconds, UTC).
pub(super) fn now() -> Value {
    // jiff's clock needs its `std` feature, which k8s-openapi leaves off: std's clock instead.
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let seconds = i64::try_from(seconds).unwrap_or(0);
    Timestamp::from_second(seconds)
        .ok()
        .and_then(|t| serde_json::to_value(Time(t)).ok())
        .unwrap_or(Value::Null)
}

/// A fresh uid in the UUID form the real server uses, random-looking and unique.
pub(super) fn new_uid() -> String {
    let bits = (u128::from(random_u64()) << 64) | u128::from(random_u64());
    // Version 4, RFC 4122 variant, as the real server's uuid.NewUUID.
    let bits = (bits & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `generateName` plus five random characters from the real server's alphabet.
pub(super) fn generated_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut random = random_u64();
    let mut name = prefix.to_string();
    for _ in 0..5 {
        name.push(char::from(
            ALPHABET[(random % ALPHABET.len() as u64) as usize],
        ));
        random /= ALPHABET.len() as u64;
    }
    name
}

/// 64 random-looking bits: std's randomly keyed hasher over a counter (uniqueness comes from
/// the counter, unpredictability is not needed).
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // The example of RFC 7386, section 3.
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}}));
        let mut target = json!({"a": [1, 2]});
        merge_patch(&mut target, &json!({"a": [3], "b": {"c": null}}));
        assert_eq!(target, json!({"a": [3], "b": {}}));
    }

    #[test]
    fn uids_look_like_the_real_servers() {
        let a = new_uid();
        let b = new_uid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn timestamps_are_seconds_in_utc() {
        let now = now();
        let now = now.as_str().unwrap();
        assert_eq!(now.len(), "2026-06-15T04:14:53Z".len(), "{now}");
        assert!(now.ends_with('Z'));
    }
}
