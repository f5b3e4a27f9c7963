//! The keys a serde struct accepts, read from the struct itself: a deserializer that records
//! the `fields` each struct asks for and walks into every field, so that suggestions for
//! unknown keys never need a hand-kept list.

use std::{cell::RefCell, collections::BTreeMap};

use serde::de::{
    value::Error, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess,
    SeqAccess, Visitor,
};

/// Field names of every struct inside `T`, by path: `""` for `T` itself, `"server"` for its
/// field `server`, `"clients[]"` for the elements of its list `clients`.
pub(super) type StructFields = BTreeMap<String, &'static [&'static str]>;

pub(super) fn struct_fields<T: DeserializeOwned>() -> StructFields {
    let found = RefCell::new(StructFields::new());
    // Every leaf is offered a unit; one that refuses it ends the walk there with an error,
    // and what was recorded up to then stands.
    let _ = T::deserialize(Probe {
        path: String::new(),
        found: &found,
    });
    found.into_inner()
}

struct Probe<'a> {
    path: String,
    found: &'a RefCell<StructFields>,
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let element = Probe {
            path: format!("{}[]", self.path),
            found: self.found,
        };
        visitor.visit_seq(OneElement(Some(element)))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.found.borrow_mut().insert(self.path.clone(), fields);
        visitor.visit_map(Fields {
            parent: self,
            fields: fields.iter(),
            current: "",
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct tuple tuple_struct map enum identifier ignored_any
    }
}

/// A struct's fields, each with a probe for its value.
struct Fields<'a> {
    parent: Probe<'a>,
    fields: std::slice::Iter<'static, &'static str>,
    current: &'static str,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(&field) = self.fields.next() else {
            return Ok(None);
        };
        self.current = field;
        seed.deserialize(field.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let path = match self.parent.path.as_str() {
            "" => self.current.to_owned(),
            parent => format!("{parent}.{}", self.current),
        };
        seed.deserialize(Probe {
            path,
            found: self.parent.found,
        })
    }
}

/// A list with one element, standing for all of them.
struct OneElement<'a>(Option<Probe<'a>>);

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.0
            .take()
            .map(|probe| seed.deserialize(probe))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use serde::{de::IgnoredAny, Deserialize};

    use super::*;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        first: Inner,
        items: Vec<Inner>,
        maybe: Option<Inner>,
        plain: u32,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        a: IgnoredAny,
        b: Option<IgnoredAny>,
    }

    #[test]
    fn records_every_struct_by_path() {
        // `plain` refuses the unit it is offered: the walk stops there, after the structs.
        let found = struct_fields::<Outer>();
        assert_eq!(found[""], ["first", "items", "maybe", "plain"]);
        assert_eq!(found["first"], ["a", "b"]);
        assert_eq!(found["items[]"], ["a", "b"]);
        assert_eq!(found["maybe"], ["a", "b"]);
    }
}
