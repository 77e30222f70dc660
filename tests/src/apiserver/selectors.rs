//! Which objects a list or watch sees: its namespace, `labelSelector` and `fieldSelector`.

use serde_json::Value;

use super::object::{labels, meta_str};

/// The objects a request is about.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Filter {
    /// Only this namespace (a namespaced path); all of them otherwise.
    pub namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

#[derive(Clone, Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

#[derive(Clone, Debug, PartialEq)]
struct FieldRequirement {
    /// `metadata.name` or `metadata.namespace`, the fields every resource supports.
    field: &'static str,
    value: String,
    equal: bool,
}

impl Filter {
    /// Parses the selectors as the real server does; its 400 message for what it refuses.
    pub fn new(
        namespace: Option<String>,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Self, String> {
        let labels = split_terms(label_selector.unwrap_or(""))
            .map(parse_label_requirement)
            .collect::<Result<_, _>>()?;
        let fields = split_terms(field_selector.unwrap_or(""))
            .map(parse_field_requirement)
            .collect::<Result<_, _>>()?;
        Ok(Filter {
            namespace,
            labels,
            fields,
        })
    }

    /// Whether `object` is one the request sees.
    pub fn matches(&self, object: &Value) -> bool {
        if let Some(namespace) = &self.namespace
            && meta_str(object, "namespace") != Some(namespace.as_str())
        {
            return false;
        }
        let label = |key: &str| labels(object).find(|(k, _)| *k == key).map(|(_, v)| v);
        let labels_match = self.labels.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
            LabelRequirement::In(key, values) => {
                label(key).is_some_and(|v| values.iter().any(|value| value == v))
            }
            LabelRequirement::NotIn(key, values) => {
                label(key).is_none_or(|v| values.iter().all(|value| value != v))
            }
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::DoesNotExist(key) => label(key).is_none(),
        });
        labels_match
            && self.fields.iter().all(|requirement| {
                let field = requirement.field.trim_start_matches("metadata.");
                let actual = meta_str(object, field).unwrap_or("");
                (actual == requirement.value) == requirement.equal
            })
    }
}

/// The comma-separated terms of a selector; commas inside `in (a,b)` belong to the term.
fn split_terms(selector: &str) -> impl Iterator<Item = &str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms.into_iter().map(str::trim).filter(|t| !t.is_empty())
}

fn parse_label_requirement(term: &str) -> Result<LabelRequirement, String> {
    let invalid = || format!("unable to parse requirement: invalid label selector term {term:?}");
    let key = |key: &str| {
        let key = key.trim();
        let valid = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if valid {
            Ok(key.to_string())
        } else {
            Err(invalid())
        }
    };
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(invalid)?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(LabelRequirement::NotIn(key(k)?, set(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(LabelRequirement::In(key(k)?, set(rest)?));
    }
    if let Some(k) = term.strip_prefix('!') {
        return Ok(LabelRequirement::DoesNotExist(key(k)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(LabelRequirement::NotEquals(key(k)?, v.trim().to_string()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(LabelRequirement::Equals(key(k)?, v.trim().to_string()));
    }
    Ok(LabelRequirement::Exists(key(term)?))
}

fn parse_field_requirement(term: &str) -> Result<FieldRequirement, String> {
    let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
        (f, v, false)
    } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        (f, v, true)
    } else {
        return Err(format!(
            "invalid selector: '{term}'; can't understand '{term}'"
        ));
    };
    let field = match field.trim() {
        "metadata.name" => "metadata.name",
        "metadata.namespace" => "metadata.namespace",
        other => return Err(format!("field label not supported: {other}")),
    };
    Ok(FieldRequirement {
        field,
        value: value.trim().to_string(),
        equal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn web() -> Value {
        json!({"metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web", "tier": "front"}}})
    }

    fn sees(labels: &str, fields: &str) -> bool {
        Filter::new(None, Some(labels), Some(fields))
            .unwrap()
            .matches(&web())
    }

    #[test]
    fn label_selectors_as_kube_rs_writes_them() {
        assert!(sees("app=web", ""));
        assert!(sees("app==web,tier", ""));
        assert!(!sees("app!=web", ""));
        assert!(sees("app in (db,web),tier notin (back)", ""));
        assert!(!sees("app notin (web)", ""));
        assert!(sees("!absent", ""));
        assert!(!sees("!app", ""));
        assert!(sees("", ""));
    }

    #[test]
    fn field_selectors_on_name_and_namespace() {
        assert!(sees("", "metadata.name=web"));
        assert!(!sees("", "metadata.name=db"));
        assert!(sees("", "metadata.namespace==shop,metadata.name!=db"));
        let refused = Filter::new(None, None, Some("spec.type=ClusterIP")).unwrap_err();
        assert_eq!(refused, "field label not supported: spec.type");
        assert!(Filter::new(None, Some("a in b"), None).is_err());
    }

    #[test]
    fn the_namespace_of_the_path_filters_too() {
        let filter = Filter::new(Some("default".into()), None, None).unwrap();
        assert!(!filter.matches(&web()));
    }
}
