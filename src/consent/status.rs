//! The four consent statuses and the consent body `{"status": "<STATUS>"}`: parsing a
//! caller's write body strictly, reading upstream's answers leniently.

use std::fmt;

use serde_json::Value;

/// A consent status, exactly as Talkdesk spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConsentStatus {
    NoConsent,
    Consented,
    Deleted,
    Refused,
}

impl ConsentStatus {
    pub const ALL: [ConsentStatus; 4] = [
        ConsentStatus::NoConsent,
        ConsentStatus::Consented,
        ConsentStatus::Deleted,
        ConsentStatus::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConsentStatus::NoConsent => "NO_CONSENT",
            ConsentStatus::Consented => "CONSENTED",
            ConsentStatus::Deleted => "DELETED",
            ConsentStatus::Refused => "REFUSED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// The canonical JSON body `{"status":"<STATUS>"}`, without allocating.
    pub fn canonical_body(self) -> &'static [u8] {
        match self {
            ConsentStatus::NoConsent => br#"{"status":"NO_CONSENT"}"#,
            ConsentStatus::Consented => br#"{"status":"CONSENTED"}"#,
            ConsentStatus::Deleted => br#"{"status":"DELETED"}"#,
            ConsentStatus::Refused => br#"{"status":"REFUSED"}"#,
        }
    }
}

impl fmt::Display for ConsentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The consent status in an upstream body, if it is a valid consent body.
pub fn consent_status_of(body: &[u8]) -> Option<ConsentStatus> {
    // Upstream's usual answer is a canonical body: told by comparing bytes, not parsing JSON
    // (a miss reads the body twice: to accept the answer and to store it).
    if let Some(status) = ConsentStatus::ALL
        .into_iter()
        .find(|status| status.canonical_body() == body)
    {
        return Some(status);
    }
    parsed_status_of(body)
}

/// The consent status in any consent body, read as JSON.
fn parsed_status_of(body: &[u8]) -> Option<ConsentStatus> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        status: std::borrow::Cow<'a, str>,
    }
    let parsed: Body<'_> = serde_json::from_slice(body).ok()?;
    ConsentStatus::parse(&parsed.status)
}

/// Why a consent write body was rejected: the message, and the offending field if one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    pub message: String,
    pub field: Option<String>,
}

impl BodyError {
    fn new(message: impl Into<String>, field: Option<&str>) -> Self {
        BodyError {
            message: message.into(),
            field: field.map(str::to_owned),
        }
    }
}

/// Parses a consent body `{"status": "<STATUS>"}` with no other properties (the schema
/// Talkdesk's setup guide uses: `additionalProperties: false`) and `status` given once: a
/// parser that kept the first or the last of two would decide a consent the caller left
/// ambiguous.
pub fn parse_consent_body(body: &[u8]) -> Result<ConsentStatus, BodyError> {
    let not_json = |_| BodyError::new("the body is not valid JSON", None);
    // Read as a `Value` first only to tell "not JSON" from "not an object"; a `Value`'s map
    // keeps one of two equal names, so the members are then read as they came.
    let value: Value = serde_json::from_slice(body).map_err(not_json)?;
    if !value.is_object() {
        return Err(BodyError::new("the body must be a JSON object", None));
    }
    let members: Members = serde_json::from_slice(body).map_err(not_json)?;
    members.status()
}

/// A body object's members as they came (names with their escapes decoded).
#[derive(Default)]
struct Members {
    /// The first `status` value.
    status: Option<Value>,
    /// `status` came more than once.
    repeated: bool,
    /// The first name other than `status`.
    unexpected: Option<String>,
}

impl Members {
    fn status(self) -> Result<ConsentStatus, BodyError> {
        if let Some(extra) = &self.unexpected {
            // Echo at most 64 characters of a caller-chosen name, in the message and in `fields`.
            let name = truncate_for_message(extra);
            return Err(BodyError::new(
                format!("unexpected property '{name}'"),
                Some(name),
            ));
        }
        if self.repeated {
            return Err(BodyError::new(
                "'status' is given more than once",
                Some("status"),
            ));
        }
        match self.status {
            None => Err(BodyError::new("'status' is required", Some("status"))),
            Some(Value::String(s)) => ConsentStatus::parse(&s).ok_or_else(|| {
                BodyError::new(
                    "'status' must be one of NO_CONSENT, CONSENTED, DELETED, REFUSED",
                    Some("status"),
                )
            }),
            Some(_) => Err(BodyError::new("'status' must be a string", Some("status"))),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        impl<'de> serde::de::Visitor<'de> for MembersVisitor {
            type Value = Members;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members = Members::default();
                while let Some(name) = map.next_key::<String>()? {
                    if name != "status" {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        members.unexpected.get_or_insert(name);
                    } else if members.status.is_some() {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        members.repeated = true;
                    } else {
                        members.status = Some(map.next_value()?);
                    }
                }
                Ok(members)
            }
        }

        deserializer.deserialize_map(MembersVisitor)
    }
}

fn truncate_for_message(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((idx, _)) => &s[..idx],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_bodies_are_read_alike_canonical_or_not() {
        for status in ConsentStatus::ALL {
            let canonical = status.canonical_body();
            assert_eq!(consent_status_of(canonical), Some(status));
            assert_eq!(
                parsed_status_of(canonical),
                Some(status),
                "the bytes compared"
            );
            let spaced = format!("{{ \"status\" : \"{status}\", \"updatedAt\": 1 }}");
            assert_eq!(consent_status_of(spaced.as_bytes()), Some(status));
        }
        for body in [
            &b""[..],
            b"{}",
            br#"{"status":"MAYBE"}"#,
            br#"{"status":"REFUSED""#,
        ] {
            assert_eq!(consent_status_of(body), None);
        }
    }

    #[test]
    fn body_rules() {
        assert_eq!(
            parse_consent_body(br#"{"status":"REFUSED"}"#),
            Ok(ConsentStatus::Refused)
        );
        let extra = parse_consent_body(br#"{"status":"REFUSED","x":1}"#).unwrap_err();
        assert_eq!(extra.field.as_deref(), Some("x"));
        let missing = parse_consent_body(br#"{}"#).unwrap_err();
        assert_eq!(missing.field.as_deref(), Some("status"));
        assert!(parse_consent_body(br#"{"status":"MAYBE"}"#).is_err());
        assert!(parse_consent_body(b"[]").is_err());
        assert!(parse_consent_body(b"nope").is_err());
    }

    #[test]
    fn a_status_given_twice_is_refused_whatever_the_values() {
        for body in [
            &br#"{"status":"CONSENTED","status":"REFUSED"}"#[..],
            br#"{"status":"REFUSED","status":"REFUSED"}"#,
            br#"{"status":"CONSENTED","st\u0061tus":"REFUSED"}"#,
            br#"{"status":"CONSENTED","status":5}"#,
        ] {
            let error = parse_consent_body(body).unwrap_err();
            assert_eq!(
                error,
                BodyError::new("'status' is given more than once", Some("status")),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Another name repeated is an unexpected property, as once.
        let error = parse_consent_body(br#"{"status":"REFUSED","x":1,"x":2}"#).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("x"));
        // The same name inside a value is not a member of the body.
        assert!(parse_consent_body(br#"{"status":{"a":1,"a":2}}"#)
            .unwrap_err()
            .message
            .contains("must be a string"));
    }
}
