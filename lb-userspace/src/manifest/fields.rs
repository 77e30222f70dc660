//! The fields the typed (k8s-openapi) deserializers know, place by place, and what to make of a
//! field they ignored: a near miss of a known one (a typo, refused) or a field this version does
//! not know (newer API servers add fields; a warning).
//!
//! The names are not kept by hand: [`table`] runs a type's own `Deserialize` against a probe
//! that answers every `deserialize_struct` with each of the field names the type passes (the
//! very list its deserializer matches keys against), recording them under the place it is at.
//! A field added to k8s-openapi is known here as soon as the crate is updated.

use std::{cell::RefCell, collections::BTreeMap};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor,
};

/// Field names by place: `""` for the object itself, `spec.ports` for each item of
/// `spec.ports` (indices left out).
pub type Table = BTreeMap<String, &'static [&'static str]>;

/// Every place of `T` and the field names its deserializer knows there.
///
/// # Panics
/// When `T`'s deserializer asks for something the probe cannot give (a recursive type, an
/// enum): a programming error, caught by the tests.
pub fn table<T: DeserializeOwned + k8s_openapi::Resource>() -> Table {
    let table = RefCell::new(Table::new());
    let probe = Probe {
        path: String::new(),
        depth: 0,
        table: &table,
        root: (T::API_VERSION, T::KIND),
    };
    if let Err(e) = T::deserialize(probe) {
        panic!("listing the fields of {}: {e}", T::KIND);
    }
    table.into_inner()
}

/// A field a typed deserializer ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// Its path as written: `spec.ports[0].nam`.
    pub written: String,
    /// The place it is at, indices left out: `spec.ports`.
    pub place: String,
    /// Its name: `nam`.
    pub name: String,
}

impl Ignored {
    /// From `serde_ignored`'s path.
    pub fn new(path: &serde_ignored::Path<'_>) -> Self {
        let mut segments = Vec::new();
        collect(path, &mut segments);
        let mut written = String::new();
        let mut keys = Vec::new();
        for segment in &segments {
            match segment {
                Segment::Key(key) => {
                    if !written.is_empty() {
                        written.push('.');
                    }
                    written.push_str(key);
                    keys.push(key.as_str());
                }
                Segment::Index(index) => written.push_str(&format!("[{index}]")),
            }
        }
        let name = keys.pop().unwrap_or_default().to_owned();
        Self {
            written,
            place: keys.join("."),
            name,
        }
    }

    /// The known field this one is a near miss of, if any: the same name but for case, or
    /// within a Damerau-Levenshtein distance of 2 for names of 4 characters or more (the
    /// closest wins).
    pub fn near_miss(&self, table: &Table) -> Option<&'static str> {
        near_miss(
            &self.name,
            table.get(&self.place).copied().unwrap_or_default(),
        )
    }
}

/// The known name `unknown` is a near miss of, if any (see [`Ignored::near_miss`]).
pub fn near_miss(unknown: &str, known: &[&'static str]) -> Option<&'static str> {
    let lower = unknown.to_lowercase();
    let long_enough = unknown.chars().count() >= 4;
    known
        .iter()
        .filter_map(|&candidate| {
            let candidate_lower = candidate.to_lowercase();
            if candidate_lower == lower {
                return Some((0, candidate));
            }
            if !long_enough || candidate.chars().count() < 4 {
                return None;
            }
            let distance = strsim::damerau_levenshtein(&lower, &candidate_lower);
            (distance <= 2).then_some((distance, candidate))
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

enum Segment {
    Key(String),
    Index(usize),
}

fn collect(path: &serde_ignored::Path<'_>, segments: &mut Vec<Segment>) {
    match path {
        serde_ignored::Path::Root => {}
        serde_ignored::Path::Seq { parent, index } => {
            collect(parent, segments);
            segments.push(Segment::Index(*index));
        }
        serde_ignored::Path::Map { parent, key } => {
            collect(parent, segments);
            segments.push(Segment::Key(key.clone()));
        }
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => collect(parent, segments),
    }
}

/// Deeper than any type we read: a type that goes further is recursive.
const MAX_DEPTH: usize = 32;

/// A string every string field takes, timestamps included.
const ANY_STRING: &str = "1970-01-01T00:00:00Z";

/// The deserializer that walks a type: every optional value present, every list with one item,
/// every map empty, every struct with each of its fields.
struct Probe<'a> {
    path: String,
    depth: usize,
    table: &'a RefCell<Table>,
    /// `apiVersion` and `kind` of the object, which its deserializer checks.
    root: (&'static str, &'static str),
}

impl<'a> Probe<'a> {
    fn at(&self, field: &str) -> Self {
        Probe {
            path: if self.path.is_empty() {
                field.to_owned()
            } else {
                format!("{}.{field}", self.path)
            },
            depth: self.depth + 1,
            table: self.table,
            root: self.root,
        }
    }

    fn string(&self) -> &'static str {
        match self.path.as_str() {
            "apiVersion" => self.root.0,
            "kind" => self.root.1,
            _ => ANY_STRING,
        }
    }
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = de::value::Error;

    // IntOrString and free-form JSON (managedFields' fieldsV1) take a number.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_i32(1)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_bool(true)
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_i8(1)
    }

    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_i16(1)
    }

    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_i32(1)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_i64(1)
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_u8(1)
    }

    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_u16(1)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_u32(1)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_u64(1)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_f32(1.0)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_f64(1.0)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_char('x')
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_str(self.string())
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_str(self.string())
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_bytes(b"")
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_bytes(b"")
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_seq(OneItem(Some(self)))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.deserialize_seq(visitor)
    }

    // Maps (labels, annotations, selectors) keep every key: nothing to list.
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(de::value::MapDeserializer::new(std::iter::empty::<(
            &str,
            &str,
        )>()))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        if self.depth > MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "{}: deeper than {MAX_DEPTH} levels",
                self.path
            )));
        }
        self.table.borrow_mut().insert(self.path.clone(), fields);
        visitor.visit_map(Fields {
            probe: self,
            fields: fields.iter(),
            current: "",
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        _variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom(format!(
            "{}: enum {name} is not probed",
            self.path
        )))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }
}

/// A list of one item, at the list's own place.
struct OneItem<'a>(Option<Probe<'a>>);

impl<'de> SeqAccess<'de> for OneItem<'_> {
    type Error = de::value::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.0
            .take()
            .map(|probe| seed.deserialize(probe))
            .transpose()
    }
}

/// A struct's fields, each once, each with a value probed at its own place.
struct Fields<'a> {
    probe: Probe<'a>,
    fields: std::slice::Iter<'static, &'static str>,
    current: &'static str,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = de::value::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some(field) = self.fields.next() else {
            return Ok(None);
        };
        self.current = field;
        seed.deserialize(de::value::BorrowedStrDeserializer::new(field))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        seed.deserialize(self.probe.at(self.current))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        core::v1::{Endpoints, Service},
        discovery::v1::EndpointSlice,
    };

    use super::*;

    #[test]
    fn the_tables_list_the_fields_of_every_place() {
        let service = table::<Service>();
        assert_eq!(
            service[""],
            ["apiVersion", "kind", "metadata", "spec", "status"]
        );
        for (place, field) in [
            ("spec", "sessionAffinity"),
            ("spec", "loadBalancerClass"),
            ("spec", "trafficDistribution"),
            ("spec.ports", "targetPort"),
            ("spec.sessionAffinityConfig.clientIP", "timeoutSeconds"),
            ("metadata", "managedFields"),
            ("metadata.managedFields", "fieldsV1"),
            ("metadata.ownerReferences", "blockOwnerDeletion"),
            ("status.conditions", "lastTransitionTime"),
            ("status.loadBalancer.ingress", "ipMode"),
            ("status.loadBalancer.ingress.ports", "error"),
        ] {
            assert!(service[place].contains(&field), "{place}: {field}");
        }
        let slice = table::<EndpointSlice>();
        for (place, field) in [
            ("", "addressType"),
            ("endpoints", "addresses"),
            ("endpoints.conditions", "terminating"),
            ("endpoints.hints.forZones", "name"),
            ("ports", "appProtocol"),
        ] {
            assert!(slice[place].contains(&field), "{place}: {field}");
        }
        let endpoints = table::<Endpoints>();
        for (place, field) in [
            ("subsets", "notReadyAddresses"),
            ("subsets.addresses", "ip"),
            ("subsets.addresses.targetRef", "uid"),
            ("subsets.ports", "appProtocol"),
        ] {
            assert!(endpoints[place].contains(&field), "{place}: {field}");
        }
    }

    #[test]
    fn near_misses_are_case_or_two_edits_away() {
        let spec = table::<Service>()["spec"];
        for (typo, meant) in [
            ("sessionAfinity", "sessionAffinity"),
            ("loadBalancerIp", "loadBalancerIP"),
            ("externalIPS", "externalIPs"),
            ("tpye", "type"),
            ("selecter", "selector"),
        ] {
            assert_eq!(near_miss(typo, spec), Some(meant), "{typo}");
        }
        for other in ["fooBarBaz", "typ", "futureField"] {
            assert_eq!(near_miss(other, spec), None, "{other}");
        }
    }
}
