//! `Status` bodies: the API server's errors (and its delete answer), with the messages, reasons
//! and details the real one writes, so that clients branching on them see the same thing.

use serde::Serialize;

use super::resources::ResourceType;

/// An error answer: HTTP code, `reason` and `message` as the real server words them.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// Boxed: errors travel in every `Result` of the store, and are rarely built.
    pub details: Option<Box<Details>>,
}

/// `Status.details`: which object the answer is about.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(super) struct Details {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub group: &'static str,
    /// The resource (`services`) for most errors, the kind (`Service`) for validation errors.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<Cause>,
}

/// One field a validation error is about.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct Cause {
    pub reason: &'static str,
    pub message: String,
    pub field: String,
}

/// The wire form of a `Status` (field order as the real server writes it).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StatusBody<'a> {
    kind: &'static str,
    api_version: &'static str,
    metadata: Empty,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a Details>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
}

#[derive(Serialize)]
struct Empty {}

impl<'a> StatusBody<'a> {
    /// The body of a failure.
    pub fn failure(error: &'a ApiError) -> Self {
        StatusBody {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Failure",
            message: Some(&error.message),
            reason: Some(error.reason),
            details: error.details.as_deref(),
            code: Some(error.code),
        }
    }

    /// The body of a DELETE that removed the object at once (no code, as the real server).
    pub fn deleted(details: &'a Details) -> Self {
        StatusBody {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Success",
            message: None,
            reason: None,
            details: Some(details),
            code: None,
        }
    }
}

/// The details naming one object of `resource`.
pub(super) fn object_details(resource: &ResourceType, name: &str) -> Details {
    Details {
        name: name.to_string(),
        group: resource.group,
        kind: resource.plural.to_string(),
        ..Details::default()
    }
}

impl ApiError {
    /// 404 for an object that does not exist.
    pub fn not_found(resource: &ResourceType, name: &str) -> Self {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("{} \"{name}\" not found", resource.group_resource()),
            details: Some(Box::new(object_details(resource, name))),
        }
    }

    /// 404 for a path that names nothing served.
    pub fn unknown_path() -> Self {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: "the server could not find the requested resource".into(),
            details: Some(Box::default()),
        }
    }

    /// 405 for a verb the path does not take.
    pub fn method_not_allowed() -> Self {
        ApiError {
            code: 405,
            reason: "MethodNotAllowed",
            message: "the server does not allow this method on the requested resource".into(),
            details: Some(Box::default()),
        }
    }

    /// 409 for a create of a name that is taken.
    pub fn already_exists(resource: &ResourceType, name: &str) -> Self {
        ApiError {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} \"{name}\" already exists", resource.group_resource()),
            details: Some(Box::new(object_details(resource, name))),
        }
    }

    /// 409 for a write whose resourceVersion is not the stored one.
    pub fn conflict(resource: &ResourceType, name: &str) -> Self {
        Self::conflict_because(
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 409 with the real server's wording around `why`.
    pub fn conflict_because(resource: &ResourceType, name: &str, why: &str) -> Self {
        ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                resource.group_resource()
            ),
            details: Some(Box::new(object_details(resource, name))),
        }
    }

    /// 422 for a field the real server's validation refuses.
    pub fn invalid(resource: &ResourceType, name: &str, field: &str, detail: &str) -> Self {
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!(
                "{} \"{name}\" is invalid: {field}: {detail}",
                resource.group_kind()
            ),
            details: Some(Box::new(Details {
                name: name.to_string(),
                group: resource.group,
                kind: resource.kind.to_string(),
                uid: None,
                causes: vec![Cause {
                    reason: "FieldValueInvalid",
                    message: detail.to_string(),
                    field: field.to_string(),
                }],
            })),
        }
    }

    /// 400 for a request the server cannot make sense of.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
            details: None,
        }
    }

    /// 410: what the client asked for has been compacted away.
    pub fn expired(message: impl Into<String>) -> Self {
        ApiError {
            code: 410,
            reason: "Expired",
            message: message.into(),
            details: None,
        }
    }

    /// 415 for a body type the stand-in does not take.
    pub fn unsupported_media_type(accepted: &str) -> Self {
        ApiError {
            code: 415,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: {accepted}"
            ),
            details: None,
        }
    }

    /// An injected fault (`StandIn::fail_next`): the reason that goes with `code`, and the real
    /// message where the stand-in knows the object.
    pub fn injected(code: u16, object: Option<(&ResourceType, &str)>) -> Self {
        match (code, object) {
            (409, Some((resource, name))) => Self::conflict(resource, name),
            (404, Some((resource, name))) => Self::not_found(resource, name),
            _ => {
                let reason = match code {
                    400 => "BadRequest",
                    401 => "Unauthorized",
                    403 => "Forbidden",
                    404 => "NotFound",
                    405 => "MethodNotAllowed",
                    409 => "Conflict",
                    410 => "Expired",
                    415 => "UnsupportedMediaType",
                    422 => "Invalid",
                    429 => "TooManyRequests",
                    503 => "ServiceUnavailable",
                    504 => "Timeout",
                    _ => "InternalError",
                };
                ApiError {
                    code,
                    reason,
                    message: format!("{reason} injected by the stand-in (fail_next)"),
                    details: object
                        .map(|(resource, name)| Box::new(object_details(resource, name))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::resources::{RESOURCES, SERVICES};
    use super::*;

    #[test]
    fn not_found_is_worded_as_the_real_server() {
        let error = ApiError::not_found(&RESOURCES[SERVICES], "web");
        let body = serde_json::to_string(&StatusBody::failure(&error)).unwrap();
        assert_eq!(
            body,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"services \"web\" not found","reason":"NotFound","details":{"name":"web","kind":"services"},"code":404}"#
        );
    }

    #[test]
    fn non_core_groups_are_named_in_message_and_details() {
        let leases = RESOURCES.iter().find(|r| r.plural == "leases").unwrap();
        let error = ApiError::conflict(leases, "lb");
        assert_eq!(
            error.message,
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"lb\": the object has been modified; please apply your changes to the latest version and try again"
        );
        let body = serde_json::to_value(StatusBody::failure(&error)).unwrap();
        assert_eq!(body["details"]["group"], "coordination.k8s.io");
    }
}
