//! The wire side: paths to resources, verbs to store operations, answers as the real server
//! writes them (JSON bodies, `Status` errors, chunked watch streams of one event a line).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use super::Shared;
use super::object::Form;
use super::resources::{RESOURCES, by_path};
use super::selectors::Filter;
use super::status::{ApiError, StatusBody, object_details};
use super::store::{Deleted, ListQuery, Precondition, WatchStart};

/// How long a watch without `timeoutSeconds` lasts (the real server's `--min-request-timeout`).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// The longest watch the stand-in keeps open, whatever the client asks.
const LONGEST_WATCH: Duration = Duration::from_secs(24 * 3600);

/// The query parameters of a request (the last value of a repeated one).
pub(super) type Params = HashMap<String, String>;

/// The routes: everything goes through one handler, which parses the path itself (the
/// resource table decides what exists, not a route list).
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// The query of `uri`, decoded.
pub(super) fn params(uri: &Uri) -> Result<Params, ApiError> {
    Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map(|Query(pairs)| pairs.into_iter().collect())
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let response = answer(&shared, &method, &uri, &headers, &body);
    shared.record(&method, &uri, &headers, response.status().as_u16());
    response
}

/// What a request path names.
#[derive(Debug, PartialEq)]
struct Target {
    resource: usize,
    namespace: Option<String>,
    /// `None` for the collection.
    name: Option<String>,
    /// The `status` subresource.
    status: bool,
}

impl Target {
    /// `/api/v1/[namespaces/{ns}/]{plural}[/{name}[/status]]`, and the same under
    /// `/apis/{group}/{version}`; `None` for anything not served.
    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        let (namespace, plural, tail) = match rest {
            // `namespaces/{name}/status` is the Namespace's own status, not a resource in it.
            ["namespaces", namespace, plural, tail @ ..]
                if !matches!(*plural, "status" | "finalize") =>
            {
                (Some(*namespace), *plural, tail)
            }
            [plural, tail @ ..] => (None, *plural, tail),
            [] => return None,
        };
        let (name, status) = match tail {
            [] => (None, false),
            [name] => (Some(*name), false),
            [name, "status"] => (Some(*name), true),
            _ => return None,
        };
        let resource = by_path(group, version, plural)?;
        let rt = &RESOURCES[resource];
        let scope_fits = match (rt.namespaced, namespace, name) {
            (false, Some(_), _) => false,
            // A namespaced object is only reachable through its namespace.
            (true, None, Some(_)) => false,
            _ => true,
        };
        if !scope_fits || (status && !rt.status_subresource) || name == Some("") {
            return None;
        }
        Some(Target {
            resource,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            status,
        })
    }
}

fn answer(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let path = uri.path();
    let target = Target::parse(path);
    if let Some(code) = shared.take_fault(method.as_str(), path) {
        let object = target
            .as_ref()
            .and_then(|t| Some((&RESOURCES[t.resource], t.name.as_deref()?)));
        return error_response(&ApiError::injected(code, object));
    }
    if path == "/version" && method == Method::GET {
        return json_response(StatusCode::OK, &version());
    }
    let Some(target) = target else {
        return error_response(&ApiError::unknown_path());
    };
    match serve(shared, method, &target, uri, headers, body) {
        Ok(response) => response,
        Err(error) => error_response(&error),
    }
}

/// One verb on one target.
fn serve(
    shared: &Shared,
    method: &Method,
    target: &Target,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let params = params(uri)?;
    if params.contains_key("dryRun") {
        // Refused rather than ignored: a dry run that writes would mislead a test.
        return Err(ApiError::bad_request(
            "the stand-in does not support dryRun",
        ));
    }
    let rt = &RESOURCES[target.resource];
    let resource = target.resource;
    let namespace = target.namespace.as_deref();
    let status_only = target.status;
    let form = form(headers);
    let object = |code: StatusCode, object: &Value| json_response(code, &form.of(object));
    match (method, target.name.as_deref()) {
        (&Method::GET, None) if flag(&params, "watch") => watch(shared, target, &params, form),
        (&Method::GET, None) => {
            let filter = filter(target, &params)?;
            let query = ListQuery {
                limit: number(&params, "limit")?,
                continue_token: params.get("continue").filter(|c| !c.is_empty()).cloned(),
                exact: match params.get("resourceVersionMatch").map(String::as_str) {
                    Some("Exact") => number(&params, "resourceVersion")?,
                    _ => None,
                },
            };
            let list = shared.store().list(resource, &filter, &query, form)?;
            Ok(json_response(StatusCode::OK, &list))
        }
        (&Method::POST, None) if namespace.is_some() || !rt.namespaced => {
            let body = json_body(headers, body)?;
            let created = shared.store().create(resource, namespace, body)?;
            Ok(object(StatusCode::CREATED, &created))
        }
        (&Method::GET, Some(name)) => {
            let store = shared.store();
            Ok(object(
                StatusCode::OK,
                store.get(resource, namespace, name)?,
            ))
        }
        (&Method::PUT, Some(name)) => {
            let body = json_body(headers, body)?;
            let precondition = if rt.custom {
                Precondition::Required
            } else {
                Precondition::IfGiven
            };
            let updated = shared.store().update(
                resource,
                namespace,
                name,
                body,
                status_only,
                precondition,
            )?;
            Ok(object(StatusCode::OK, &updated))
        }
        (&Method::PATCH, Some(name)) => {
            let content_type = content_type(headers);
            if content_type != "application/merge-patch+json" {
                return Err(ApiError::unsupported_media_type(
                    "application/merge-patch+json",
                ));
            }
            let patch: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            let patched =
                shared
                    .store()
                    .merge_patch(resource, namespace, name, &patch, status_only)?;
            Ok(object(StatusCode::OK, &patched))
        }
        (&Method::DELETE, Some(name)) if !status_only => {
            let options: Value = if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(body).map_err(|e| {
                    ApiError::bad_request(format!("error decoding DeleteOptions: {e}"))
                })?
            };
            let deleted = shared.store().delete(resource, namespace, name, &options)?;
            Ok(match deleted {
                Deleted::Gone(deleted) if !rt.returns_deleted_object => {
                    let mut details = object_details(rt, name);
                    details.uid = deleted
                        .get("metadata")
                        .and_then(|m| m.get("uid"))
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    json_response(StatusCode::OK, &StatusBody::deleted(&details))
                }
                Deleted::Gone(deleted) | Deleted::Pending(deleted) => {
                    object(StatusCode::OK, &deleted)
                }
            })
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// A watch: HTTP 200 at once, then one WatchEvent a line for as long as `timeoutSeconds`
/// (or until the store ends it: compaction, outage).
fn watch(
    shared: &Shared,
    target: &Target,
    params: &Params,
    form: Form,
) -> Result<Response, ApiError> {
    let filter = filter(target, params)?;
    let start =
        if flag(params, "sendInitialEvents") {
            WatchStart::InitialEvents
        } else {
            match params.get("resourceVersion").map(String::as_str) {
                None | Some("" | "0") => WatchStart::Now,
                Some(rv) => WatchStart::After(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version: {rv:?}"))
                })?),
            }
        };
    let timeout = match number::<u64>(params, "timeoutSeconds")? {
        None | Some(0) => DEFAULT_WATCH_TIMEOUT,
        Some(seconds) => Duration::from_secs(seconds).min(LONGEST_WATCH),
    };
    let lines = shared.store().watch(
        target.resource,
        filter,
        start,
        flag(params, "allowWatchBookmarks"),
        form,
    );
    let deadline = tokio::time::Instant::now() + timeout;
    // No task per watch: the body is this stream, polled by the connection. When the client
    // goes, the connection drops it, the receiver with it, and the store drops the watcher on
    // its next send.
    let stream = futures::stream::unfold(lines, move |mut lines| async move {
        tokio::select! {
            line = lines.recv() => line.map(|line| (Ok::<_, Infallible>(line), lines)),
            () = tokio::time::sleep_until(deadline) => None,
        }
    });
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache, private"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The namespace of the path and the selectors of the query.
fn filter(target: &Target, params: &Params) -> Result<Filter, ApiError> {
    Filter::new(
        target.namespace.clone(),
        params.get("labelSelector").map(String::as_str),
        params.get("fieldSelector").map(String::as_str),
    )
    .map_err(ApiError::bad_request)
}

/// A boolean query parameter (`true` or `1`, as the real server's parser).
fn flag(params: &Params, name: &str) -> bool {
    params
        .get(name)
        .is_some_and(|v| v == "true" || v == "1" || v == "True")
}

/// A numeric query parameter, if given.
fn number<T: std::str::FromStr>(params: &Params, name: &str) -> Result<Option<T>, ApiError> {
    match params.get(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(value) => value
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid {name}: {value:?}"))),
    }
}

/// The form the client asked for: `Accept: application/json;as=PartialObjectMetadata[List];
/// g=meta.k8s.io;v=v1` for metadata only.
fn form(headers: &HeaderMap) -> Form {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("as=PartialObjectMetadata") {
        Form::Metadata
    } else {
        Form::Full
    }
}

/// The media type of the body, without parameters.
fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("")
}

/// A JSON request body (the only encoding the stand-in takes).
fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    if !matches!(content_type(headers), "" | "application/json") {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

fn json_response(code: StatusCode, body: &impl Serialize) -> Response {
    // Serializing a Value or a derived struct cannot fail.
    let body = serde_json::to_vec(body).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error_response(error: &ApiError) -> Response {
    let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &StatusBody::failure(error))
}

/// `GET /version`: a Kubernetes of the release k8s-openapi's `latest` describes.
fn version() -> Value {
    json!({
        "major": "1",
        "minor": "37",
        "emulationMajor": "1",
        "emulationMinor": "37",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "36",
        "gitVersion": "v1.37.0+stand-in",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str) -> Option<(String, Option<String>, Option<String>, bool)> {
        Target::parse(path).map(|t| {
            let plural = RESOURCES[t.resource].plural.to_string();
            (plural, t.namespace, t.name, t.status)
        })
    }

    #[test]
    fn paths_name_resources_as_the_real_server_lays_them_out() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            target("/api/v1/services"),
            Some(("services".into(), None, None, false))
        );
        assert_eq!(
            target("/api/v1/namespaces/shop/services/web/status"),
            Some(("services".into(), s("shop"), s("web"), true))
        );
        assert_eq!(
            target("/api/v1/nodes/n1"),
            Some(("nodes".into(), None, s("n1"), false))
        );
        assert_eq!(
            target("/api/v1/namespaces/shop/status"),
            Some(("namespaces".into(), None, s("shop"), true))
        );
        assert_eq!(
            target("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/lb"),
            Some(("leases".into(), s("kube-system"), s("lb"), false))
        );
        assert_eq!(
            target("/apis/lb.xdp.rs/v1alpha1/loadbalancerippools"),
            Some(("loadbalancerippools".into(), None, None, false))
        );
        // Namespaced objects only through their namespace, cluster-scoped never in one, no
        // status where there is no subresource, nothing unknown.
        assert_eq!(target("/api/v1/services/web"), None);
        assert_eq!(target("/api/v1/namespaces/shop/nodes"), None);
        assert_eq!(
            target("/apis/coordination.k8s.io/v1/namespaces/a/leases/b/status"),
            None
        );
        assert_eq!(target("/apis/apps/v1/deployments"), None);
        assert_eq!(target("/healthz"), None);
    }
}
