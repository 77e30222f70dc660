//! The stand-in's etcd and registry in one: objects by resource and key, one resourceVersion
//! counter for everything (etcd's revision), the history of changes that watches resume from,
//! and the open watches that every write is published to.

use std::borrow::Cow;
use std::collections::BTreeMap;

use axum::body::Bytes;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::object::{
    Form, as_object_mut, generated_name, has_finalizers, meta_mut, meta_str, new_uid, now,
    resource_version, set_resource_version,
};
use super::resources::{RESOURCES, ResourceType, SERVICES};
use super::selectors::Filter;
use super::services::{self, Allocator};
use super::status::{ApiError, StatusBody};

/// An object's place in its resource: namespace (`""` for cluster-scoped kinds) and name, in
/// the order etcd's keys list them.
pub(super) type Key = (String, String);

/// One write, as etcd's watch reports it.
struct Change {
    resource: usize,
    rv: u64,
    /// The object after the write; `None` for a deletion.
    object: Option<Value>,
    /// The object before the write; `None` for a creation.
    previous: Option<Value>,
}

/// An open watch: what it sees, and where its lines go (the HTTP body reads the other end).
struct Watcher {
    resource: usize,
    filter: Filter,
    bookmarks: bool,
    form: Form,
    lines: UnboundedSender<Bytes>,
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum WatchStart {
    /// No resourceVersion (or "0"): a synthetic ADDED for every object, then changes.
    Now,
    /// `sendInitialEvents=true`: as `Now`, then a BOOKMARK marking the end of the initial
    /// events.
    InitialEvents,
    /// Every change after this resourceVersion, then new ones.
    After(u64),
}

/// How a replace treats the resourceVersion in its body.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Precondition {
    /// It must be there and current (replacing a custom resource).
    Required,
    /// If there, it must be current (built-in kinds, merge patches).
    IfGiven,
    /// Not looked at (the tests' own writes, `StandIn::apply`).
    Ignored,
}

/// What a DELETE did.
#[derive(Debug)]
pub(super) enum Deleted {
    /// The object is gone; this is its last state (with the deletion's resourceVersion).
    Gone(Value),
    /// The object has finalizers: it is marked for deletion and stays until they are removed.
    Pending(Value),
}

/// Paging and consistency of a list.
#[derive(Clone, Debug, Default)]
pub(super) struct ListQuery {
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    /// `resourceVersionMatch=Exact`: the list as it was at this resourceVersion.
    pub exact: Option<u64>,
}

/// The message of a 410 for a continue token older than the compaction (the real server's).
const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

/// Objects, history and watches.
pub(super) struct Store {
    /// The last resourceVersion handed out.
    rv: u64,
    /// Changes at or before this resourceVersion are forgotten (etcd compaction).
    compacted: u64,
    /// Per entry of [`RESOURCES`].
    objects: Vec<BTreeMap<Key, Value>>,
    /// Every change after `compacted`, oldest first.
    history: Vec<Change>,
    watchers: Vec<Watcher>,
    allocator: Allocator,
}

impl Store {
    pub fn new() -> Self {
        Store {
            // A fresh cluster is not at 0: "0" means "any version" to a client.
            rv: 1,
            compacted: 0,
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            history: Vec::new(),
            watchers: Vec::new(),
            allocator: Allocator::default(),
        }
    }

    fn key(resource: usize, namespace: Option<&str>, name: &str) -> Key {
        let namespace = if RESOURCES[resource].namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        (namespace.to_string(), name.to_string())
    }

    /// The stored object.
    pub fn get(
        &self,
        resource: usize,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<&Value, ApiError> {
        self.objects[resource]
            .get(&Self::key(resource, namespace, name))
            .ok_or_else(|| ApiError::not_found(&RESOURCES[resource], name))
    }

    /// Every stored object of `resource`, in key order.
    pub fn objects(&self, resource: usize) -> impl Iterator<Item = &Value> {
        self.objects[resource].values()
    }

    /// POST: stores a new object with the fields the server owns filled in.
    pub fn create(
        &mut self,
        resource: usize,
        namespace: Option<&str>,
        body: Value,
    ) -> Result<Value, ApiError> {
        let rt = &RESOURCES[resource];
        let mut object = decode(rt, body)?;
        let name = match meta_str(&object, "name").filter(|n| !n.is_empty()) {
            Some(name) => name.to_string(),
            None => match meta_str(&object, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => generated_name(prefix),
                None => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    ));
                }
            },
        };
        if rt.namespaced
            && let Some(given) = meta_str(&object, "namespace").filter(|n| !n.is_empty())
            && Some(given) != namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let key = Self::key(resource, namespace, &name);
        if self.objects[resource].contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }

        let metadata = meta_mut(&mut object);
        metadata.insert("name".into(), json!(name));
        if rt.namespaced {
            metadata.insert("namespace".into(), json!(key.0));
        } else {
            metadata.remove("namespace");
        }
        for owned_by_the_server in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "generation",
        ] {
            metadata.remove(owned_by_the_server);
        }
        metadata.insert("uid".into(), json!(new_uid()));
        metadata.insert("creationTimestamp".into(), now());
        if rt.generation {
            metadata.insert("generation".into(), json!(1));
        }
        if rt.status_dropped_on_create {
            as_object_mut(&mut object).remove("status");
        }
        if resource == SERVICES {
            self.default_service(&mut object, None, &key)?;
        }
        Ok(self.commit(resource, key, Some(object)))
    }

    /// PUT (and the end of a PATCH): replaces the object, or only its status.
    pub fn update(
        &mut self,
        resource: usize,
        namespace: Option<&str>,
        name: &str,
        body: Value,
        status_only: bool,
        precondition: Precondition,
    ) -> Result<Value, ApiError> {
        let rt = &RESOURCES[resource];
        let key = Self::key(resource, namespace, name);
        let old = self.get(resource, namespace, name)?.clone();
        let incoming = decode(rt, body)?;
        if let Some(given) = meta_str(&incoming, "name").filter(|n| !n.is_empty())
            && given != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({given}) does not match the name on the URL ({name})"
            )));
        }
        if rt.namespaced
            && let Some(given) = meta_str(&incoming, "namespace").filter(|n| !n.is_empty())
            && given != key.0
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let stored_rv = meta_str(&old, "resourceVersion").unwrap_or("");
        match (
            precondition,
            meta_str(&incoming, "resourceVersion").filter(|rv| !rv.is_empty()),
        ) {
            (Precondition::Ignored, _) => {}
            (_, Some(given)) if given != stored_rv => return Err(ApiError::conflict(rt, name)),
            (Precondition::Required, None) => {
                return Err(ApiError::invalid(
                    rt,
                    name,
                    "metadata.resourceVersion",
                    "Invalid value: 0x0: must be specified for an update",
                ));
            }
            _ => {}
        }

        let mut object = if status_only {
            let mut object = old.clone();
            copy_field(&mut object, "status", incoming.get("status"));
            object
        } else {
            let mut object = incoming;
            let old_metadata = old.get("metadata");
            let metadata = meta_mut(&mut object);
            for owned_by_the_server in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match old_metadata.and_then(|m| m.get(owned_by_the_server)) {
                    Some(value) => metadata.insert(owned_by_the_server.into(), value.clone()),
                    None => metadata.remove(owned_by_the_server),
                };
            }
            if rt.status_subresource {
                copy_field(&mut object, "status", old.get("status"));
            }
            if resource == SERVICES {
                self.default_service(&mut object, Some(&old), &key)?;
            }
            object
        };
        set_resource_version(&mut object, resource_version(&old));
        if rt.generation && outside_metadata(rt, &object) != outside_metadata(rt, &old) {
            let generation = old
                .get("metadata")
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut object).insert("generation".into(), json!(generation + 1));
        }
        // A write that changes nothing is not a write: no new resourceVersion, no event.
        if object == old {
            return Ok(old);
        }
        if meta_str(&object, "deletionTimestamp").is_some() && !has_finalizers(&object) {
            // The last finalizer is gone: the pending deletion completes.
            return Ok(self.commit(resource, key, None));
        }
        Ok(self.commit(resource, key, Some(object)))
    }

    /// PATCH with an RFC 7386 merge patch; a resourceVersion in the patch is a precondition.
    pub fn merge_patch(
        &mut self,
        resource: usize,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        if !patch.is_object() {
            return Err(ApiError::bad_request(
                "the body of a merge patch must be a JSON object",
            ));
        }
        let mut patched = self.get(resource, namespace, name)?.clone();
        super::object::merge_patch(&mut patched, patch);
        self.update(
            resource,
            namespace,
            name,
            patched,
            status_only,
            Precondition::IfGiven,
        )
    }

    /// DELETE, with the preconditions of its DeleteOptions.
    pub fn delete(
        &mut self,
        resource: usize,
        namespace: Option<&str>,
        name: &str,
        options: &Value,
    ) -> Result<Deleted, ApiError> {
        let rt = &RESOURCES[resource];
        let key = Self::key(resource, namespace, name);
        let old = self.get(resource, namespace, name)?.clone();
        let preconditions = options.get("preconditions");
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            let wanted = preconditions
                .and_then(|p| p.get(field))
                .and_then(Value::as_str);
            let actual = meta_str(&old, field).unwrap_or("");
            if let Some(wanted) = wanted
                && wanted != actual
            {
                return Err(ApiError::conflict_because(
                    rt,
                    name,
                    &format!(
                        "Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {actual}"
                    ),
                ));
            }
        }
        if !has_finalizers(&old) {
            return Ok(Deleted::Gone(self.commit(resource, key, None)));
        }
        if meta_str(&old, "deletionTimestamp").is_some() {
            return Ok(Deleted::Pending(old));
        }
        let mut marked = old.clone();
        let metadata = meta_mut(&mut marked);
        metadata.insert("deletionTimestamp".into(), now());
        metadata.insert("deletionGracePeriodSeconds".into(), json!(0));
        if let Some(generation) = metadata.get("generation").and_then(Value::as_i64) {
            metadata.insert("generation".into(), json!(generation + 1));
        }
        Ok(Deleted::Pending(self.commit(resource, key, Some(marked))))
    }

    /// A list body: `{kind}List`, the resourceVersion it is consistent with, maybe a continue
    /// token, and the items (without kind and apiVersion, as the real server writes built-in
    /// kinds).
    pub fn list(
        &self,
        resource: usize,
        filter: &Filter,
        query: &ListQuery,
        form: Form,
    ) -> Result<Value, ApiError> {
        let rt = &RESOURCES[resource];
        let (at, after) = match &query.continue_token {
            Some(token) => {
                let (rv, key) = parse_continue(token).ok_or_else(|| {
                    ApiError::bad_request(format!("continue key is not valid: {token:?}"))
                })?;
                if rv < self.compacted {
                    return Err(ApiError::expired(CONTINUE_EXPIRED));
                }
                (rv, Some(key))
            }
            None => match query.exact {
                Some(rv) if rv < self.compacted => {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {rv} ({})",
                        self.compacted
                    )));
                }
                Some(rv) => (rv.min(self.rv), None),
                None => (self.rv, None),
            },
        };
        let objects = self.snapshot(resource, at);
        let matching: Vec<(&Key, &Value)> = objects
            .iter()
            .filter(|(key, _)| after.as_ref().is_none_or(|after| *key > after))
            .filter(|(_, object)| filter.matches(object))
            .collect();
        let page = query
            .limit
            .filter(|limit| *limit > 0)
            .unwrap_or(usize::MAX)
            .min(matching.len());
        let remaining = matching.len() - page;

        let mut metadata = json!({"resourceVersion": at.to_string()});
        if remaining > 0 {
            let (namespace, name) = matching[page - 1].0;
            metadata["continue"] = json!(format!("{at}/{namespace}/{name}"));
            metadata["remainingItemCount"] = json!(remaining);
        } else if rt.custom {
            metadata["continue"] = json!("");
        }
        let items = matching[..page].iter().map(|(_, object)| object);
        Ok(match form {
            Form::Full => json!({
                "kind": format!("{}List", rt.kind),
                "apiVersion": rt.api_version(),
                "metadata": metadata,
                "items": items.map(|object| list_item(rt, object)).collect::<Vec<_>>(),
            }),
            // Here the items do say what they are (PartialObjectMetadata), as the real server's.
            Form::Metadata => json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
                "items": items.map(|object| form.of(object).into_owned()).collect::<Vec<_>>(),
            }),
        })
    }

    /// Opens a watch: what it must see first is queued at once, under the same lock as every
    /// write, so no change falls between the history and the live events.
    pub fn watch(
        &mut self,
        resource: usize,
        filter: Filter,
        start: WatchStart,
        bookmarks: bool,
        form: Form,
    ) -> UnboundedReceiver<Bytes> {
        let (lines, receiver) = unbounded_channel();
        match start {
            WatchStart::After(rv) if rv < self.compacted => {
                let expired = ApiError::expired(format!(
                    "too old resource version: {rv} ({})",
                    self.compacted
                ));
                // One ERROR event, then the end of the stream (`lines` is dropped here).
                let _ = lines.send(watch_line("ERROR", &StatusBody::failure(&expired)));
                return receiver;
            }
            WatchStart::After(rv) => {
                let first = self.history.partition_point(|change| change.rv <= rv);
                for change in &self.history[first..] {
                    if change.resource == resource
                        && let Some(line) = event_line(&filter, change, form)
                    {
                        let _ = lines.send(line);
                    }
                }
            }
            WatchStart::Now | WatchStart::InitialEvents => {
                for object in self.objects[resource].values() {
                    if filter.matches(object) {
                        let _ = lines.send(watch_line("ADDED", &form.of(object)));
                    }
                }
                if start == WatchStart::InitialEvents {
                    let _ = lines.send(bookmark_line(resource, self.rv, true, form));
                }
            }
        }
        self.watchers.push(Watcher {
            resource,
            filter,
            bookmarks,
            form,
            lines,
        });
        receiver
    }

    /// Forgets the history (etcd compaction at the current revision) and ends every watch, so
    /// that clients resume from what they saw and are told it is too old.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
        self.watchers.clear();
    }

    /// How many watches are open; the ones whose client has gone are dropped first.
    pub fn open_watches(&mut self) -> usize {
        self.watchers.retain(|watcher| !watcher.lines.is_closed());
        self.watchers.len()
    }

    /// A BOOKMARK at the current resourceVersion to every watch that asked for them; closed
    /// watches are dropped on the way.
    pub fn send_bookmarks(&mut self) {
        let rv = self.rv;
        self.watchers.retain(|watcher| {
            if watcher.bookmarks {
                watcher
                    .lines
                    .send(bookmark_line(watcher.resource, rv, false, watcher.form))
                    .is_ok()
            } else {
                !watcher.lines.is_closed()
            }
        });
    }

    /// Applies the Service defaults and allocations, with what the other Services hold.
    fn default_service(
        &mut self,
        service: &mut Value,
        old: Option<&Value>,
        key: &Key,
    ) -> Result<(), ApiError> {
        let others = self.objects[SERVICES]
            .iter()
            .filter(|(other, _)| *other != key)
            .map(|(_, object)| object);
        services::apply_defaults(service, old, others, &mut self.allocator).map_err(|invalid| {
            ApiError::invalid(
                &RESOURCES[SERVICES],
                &key.1,
                &invalid.field,
                &invalid.detail,
            )
        })
    }

    /// Writes (or removes, for `None`) at a new resourceVersion, records the change and
    /// publishes it; returns the object as stored (for a removal, its last state).
    fn commit(&mut self, resource: usize, key: Key, object: Option<Value>) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let (object, previous) = match object {
            Some(mut object) => {
                set_resource_version(&mut object, rv);
                let previous = self.objects[resource].insert(key, object.clone());
                (Some(object), previous)
            }
            None => (None, self.objects[resource].remove(&key)),
        };
        let answer = match (&object, &previous) {
            (Some(object), _) => object.clone(),
            (None, Some(previous)) => {
                // Deletion is a revision too: the last state carries it, as in the DELETED
                // event.
                let mut gone = previous.clone();
                set_resource_version(&mut gone, rv);
                gone
            }
            (None, None) => Value::Null,
        };
        let change = Change {
            resource,
            rv,
            object,
            previous,
        };
        self.watchers.retain(|watcher| {
            if watcher.resource != change.resource {
                return !watcher.lines.is_closed();
            }
            match event_line(&watcher.filter, &change, watcher.form) {
                Some(line) => watcher.lines.send(line).is_ok(),
                None => !watcher.lines.is_closed(),
            }
        });
        self.history.push(change);
        answer
    }

    /// The objects of `resource` as they were at `rv` (no older than the compaction): the
    /// current ones with the later changes undone.
    fn snapshot(&self, resource: usize, rv: u64) -> Cow<'_, BTreeMap<Key, Value>> {
        if rv >= self.rv {
            return Cow::Borrowed(&self.objects[resource]);
        }
        let mut objects = self.objects[resource].clone();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if change.resource != resource {
                continue;
            }
            let Some(either) = change.object.as_ref().or(change.previous.as_ref()) else {
                continue;
            };
            let key = (
                meta_str(either, "namespace").unwrap_or("").to_string(),
                meta_str(either, "name").unwrap_or("").to_string(),
            );
            match &change.previous {
                Some(previous) => objects.insert(key, previous.clone()),
                None => objects.remove(&key),
            };
        }
        Cow::Owned(objects)
    }
}

/// Decodes a body for `resource` as the real server's decoder: kind and apiVersion, if given,
/// must be the resource's; the typed round trip drops unknown fields and refuses wrong types.
fn decode(rt: &ResourceType, body: Value) -> Result<Value, ApiError> {
    let api_version = rt.api_version();
    if let Some(given) = body.get("apiVersion").and_then(Value::as_str)
        && given != api_version
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({given}) does not match the expected API version ({api_version})"
        )));
    }
    if let Some(given) = body.get("kind").and_then(Value::as_str)
        && given != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({given}) does not match the expected kind ({})",
            rt.kind
        )));
    }
    let mut object = (rt.decode)(body).map_err(|e| {
        ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: {e}",
            kind = rt.kind,
            version = rt.version
        ))
    })?;
    let map = as_object_mut(&mut object);
    map.insert("apiVersion".into(), json!(api_version));
    map.insert("kind".into(), json!(rt.kind));
    Ok(object)
}

/// Sets `object.field` to `value`, or removes it for `None`.
fn copy_field(object: &mut Value, field: &str, value: Option<&Value>) {
    let map = as_object_mut(object);
    match value {
        Some(value) => map.insert(field.into(), value.clone()),
        None => map.remove(field),
    };
}

/// What `metadata.generation` counts changes of: everything but metadata (and the status,
/// where it is a subresource).
fn outside_metadata(rt: &ResourceType, object: &Value) -> Value {
    let mut rest = object.clone();
    let map = as_object_mut(&mut rest);
    map.remove("metadata");
    if rt.status_subresource {
        map.remove("status");
    }
    rest
}

/// A list item: built-in kinds leave out kind and apiVersion (the list says them once);
/// custom resources keep them (the real server serves them unstructured).
fn list_item(rt: &ResourceType, object: &Value) -> Value {
    let mut item = object.clone();
    if !rt.custom {
        let map = as_object_mut(&mut item);
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

/// `{rv}/{namespace}/{name}`: the snapshot a continued list is served from and where the
/// previous page ended (names and namespaces cannot contain `/`).
fn parse_continue(token: &str) -> Option<(u64, Key)> {
    let mut parts = token.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    let namespace = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    Some((rv, (namespace, name)))
}

/// One line of a watch body: a WatchEvent and a newline.
fn watch_line(kind: &str, object: &impl Serialize) -> Bytes {
    #[derive(Serialize)]
    struct WatchEvent<'a, T> {
        #[serde(rename = "type")]
        kind: &'a str,
        object: &'a T,
    }
    let mut line = serde_json::to_vec(&WatchEvent { kind, object }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The event a watch with `filter` sees for `change`, as the real watch cache decides it: an
/// object that starts matching is ADDED, one that stops matching is DELETED (its previous
/// state, at the change's resourceVersion).
fn event_line(filter: &Filter, change: &Change, form: Form) -> Option<Bytes> {
    let now = change.object.as_ref().filter(|o| filter.matches(o));
    let before = change.previous.as_ref().filter(|o| filter.matches(o));
    match (now, before) {
        (Some(object), None) => Some(watch_line("ADDED", &form.of(object))),
        (Some(object), Some(_)) => Some(watch_line("MODIFIED", &form.of(object))),
        (None, Some(previous)) => {
            let mut gone = previous.clone();
            set_resource_version(&mut gone, change.rv);
            Some(watch_line("DELETED", &form.of(&gone)))
        }
        (None, None) => None,
    }
}

/// A BOOKMARK: an object of the watched kind with only a resourceVersion (and, ending the
/// initial events of a streaming list, the annotation that says so).
fn bookmark_line(resource: usize, rv: u64, initial_events_end: bool, form: Form) -> Bytes {
    let rt = &RESOURCES[resource];
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object = json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata});
    watch_line("BOOKMARK", &form.of(&object))
}

#[cfg(test)]
mod tests {
    use super::super::resources::EVENTS;
    use super::*;

    fn service(name: &str, label: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": label}},
            "spec": {"ports": [{"port": 80}]}})
    }

    fn lines(receiver: &mut UnboundedReceiver<Bytes>) -> Vec<Value> {
        let mut lines = Vec::new();
        while let Ok(line) = receiver.try_recv() {
            lines.push(serde_json::from_slice(&line).unwrap());
        }
        lines
    }

    #[test]
    fn one_counter_for_every_write_and_no_write_for_no_change() {
        let mut store = Store::new();
        let web = store
            .create(SERVICES, Some("default"), service("web", "web"))
            .unwrap();
        assert_eq!(meta_str(&web, "resourceVersion"), Some("2"));
        let same = store
            .update(
                SERVICES,
                Some("default"),
                "web",
                web.clone(),
                false,
                Precondition::IfGiven,
            )
            .unwrap();
        assert_eq!(same, web);
        let stale = store.merge_patch(
            SERVICES,
            Some("default"),
            "web",
            &json!({"metadata": {"resourceVersion": "1", "labels": {"app": "x"}}}),
            false,
        );
        assert_eq!(stale.unwrap_err().code, 409);
    }

    #[test]
    fn selectors_turn_modifications_into_additions_and_deletions() {
        let mut store = Store::new();
        let filter = Filter::new(None, Some("app=web"), None).unwrap();
        let mut watch = store.watch(SERVICES, filter, WatchStart::Now, false, Form::Full);
        store
            .create(SERVICES, Some("default"), service("a", "db"))
            .unwrap();
        store.apply_label("a", "web");
        store.apply_label("a", "db");
        let types: Vec<_> = lines(&mut watch)
            .iter()
            .map(|l| l["type"].clone())
            .collect();
        assert_eq!(types, ["ADDED", "DELETED"]);
    }

    #[test]
    fn continued_lists_are_consistent_with_their_first_page() {
        let mut store = Store::new();
        for name in ["a", "b", "c"] {
            store
                .create(SERVICES, Some("default"), service(name, "web"))
                .unwrap();
        }
        let all = Filter::default();
        let first = store
            .list(
                SERVICES,
                &all,
                &ListQuery {
                    limit: Some(2),
                    ..ListQuery::default()
                },
                Form::Full,
            )
            .unwrap();
        assert_eq!(first["metadata"]["remainingItemCount"], 1);
        store
            .delete(SERVICES, Some("default"), "c", &Value::Null)
            .unwrap();
        let token = first["metadata"]["continue"].as_str().unwrap().to_string();
        let query = ListQuery {
            limit: Some(2),
            continue_token: Some(token),
            exact: None,
        };
        let second = store.list(SERVICES, &all, &query, Form::Full).unwrap();
        assert_eq!(second["items"][0]["metadata"]["name"], "c");
        assert_eq!(
            second["metadata"]["resourceVersion"],
            first["metadata"]["resourceVersion"]
        );
        store.compact();
        assert_eq!(
            store
                .list(SERVICES, &all, &query, Form::Full)
                .unwrap_err()
                .code,
            410
        );
    }

    #[test]
    fn finalizers_hold_a_deletion_until_they_are_removed() {
        let mut store = Store::new();
        let mut held = service("held", "web");
        held["metadata"]["finalizers"] = json!(["example.com/cleanup"]);
        store.create(SERVICES, Some("default"), held).unwrap();
        let pending = store
            .delete(SERVICES, Some("default"), "held", &Value::Null)
            .unwrap();
        assert!(
            matches!(pending, Deleted::Pending(ref o) if meta_str(o, "deletionTimestamp").is_some())
        );
        let release = json!({"metadata": {"finalizers": null}});
        store
            .merge_patch(SERVICES, Some("default"), "held", &release, false)
            .unwrap();
        assert!(store.get(SERVICES, Some("default"), "held").is_err());
    }

    #[test]
    fn typed_decoding_refuses_wrong_types() {
        let mut store = Store::new();
        let event = json!({"metadata": {"name": "e"}, "eventTime": 5});
        let refused = store.create(EVENTS, Some("default"), event).unwrap_err();
        assert_eq!(refused.code, 400);
        assert!(
            refused
                .message
                .starts_with("Event in version \"v1\" cannot be handled as a Event")
        );
    }

    #[test]
    fn watches_whose_client_is_gone_are_dropped() {
        let mut store = Store::new();
        let kept = store.watch(
            SERVICES,
            Filter::default(),
            WatchStart::Now,
            true,
            Form::Full,
        );
        let gone = store.watch(
            SERVICES,
            Filter::default(),
            WatchStart::Now,
            false,
            Form::Full,
        );
        assert_eq!(store.open_watches(), 2);
        drop(gone);
        store.send_bookmarks();
        assert_eq!(store.watchers.len(), 1);
        drop(kept);
        store
            .create(SERVICES, Some("default"), service("web", "web"))
            .unwrap();
        assert!(store.watchers.is_empty());
    }

    impl Store {
        fn apply_label(&mut self, name: &str, label: &str) {
            let patch = json!({"metadata": {"labels": {"app": label}}});
            self.merge_patch(SERVICES, Some("default"), name, &patch, false)
                .unwrap();
        }
    }
}
