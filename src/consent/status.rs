//! The four consent statuses and the consent body `{"status": "<STATUS>"}`: parsing a
//! caller's write body strictly, reading upstream's answers leniently.

use std::fmt;

use serde_json::{Map, Value};

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
/// Talkdesk's setup guide uses: `additionalProperties: false`).
pub fn parse_consent_body(body: &[u8]) -> Result<ConsentStatus, BodyError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| BodyError::new("the body is not valid JSON", None))?;
    let Value::Object(object) = value else {
        return Err(BodyError::new("the body must be a JSON object", None));
    };
    status_from_object(&object)
}

fn status_from_object(object: &Map<String, Value>) -> Result<ConsentStatus, BodyError> {
    if let Some(extra) = object.keys().find(|key| key.as_str() != "status") {
        // Echo at most 64 characters of a caller-chosen name, in the message and in `fields`.
        let name = truncate_for_message(extra);
        return Err(BodyError::new(
            format!("unexpected property '{name}'"),
            Some(name),
        ));
    }
    match object.get("status") {
        None => Err(BodyError::new("'status' is required", Some("status"))),
        Some(Value::String(s)) => ConsentStatus::parse(s).ok_or_else(|| {
            BodyError::new(
                "'status' must be one of NO_CONSENT, CONSENTED, DELETED, REFUSED",
                Some("status"),
            )
        }),
        Some(_) => Err(BodyError::new("'status' must be a string", Some("status"))),
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
}
