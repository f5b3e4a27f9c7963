//! The consent domain: the four statuses, the `contact_id` rule and the write body.
//!
//! Everything here is pure parsing of what the network sends, shared by the proxy and the
//! simulator, so both sides agree on what a valid contact and a valid body are.

use std::fmt;
use std::sync::Arc;

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

/// Longest accepted contact id, in characters (all ASCII, so also bytes).
pub const MAX_CONTACT_ID_LEN: usize = 64;

/// A validated, normalised contact id (percent-decoded once). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ContactId(Arc<str>);

impl ContactId {
    /// Decodes one path segment (percent-decoding once) and applies the contract's rule:
    /// 1 to 64 characters of `A-Z a-z 0-9 + . _ -`, the first a letter, a digit or `+`.
    pub fn from_path_segment(segment: &str) -> Option<ContactId> {
        if !segment.contains('%') {
            // Nothing to decode: one allocation (the `Arc<str>`), and none when invalid.
            return Self::validate(segment).then(|| ContactId(Arc::from(segment)));
        }
        let decoded = percent_decode_once(segment)?;
        Self::validate(&decoded).then(|| ContactId(Arc::from(decoded)))
    }

    fn validate(id: &str) -> bool {
        let bytes = id.as_bytes();
        let Some(&first) = bytes.first() else {
            return false;
        };
        bytes.len() <= MAX_CONTACT_ID_LEN
            && (first.is_ascii_alphanumeric() || first == b'+')
            && bytes
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'_' | b'-'))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }

    /// The id as a path segment for upstream: `+` percent-encoded so no server reads it as a
    /// space; every other allowed character is unreserved and goes as it is.
    pub fn to_path_segment(&self) -> String {
        self.0.replace('+', "%2B")
    }

    /// The id for logs: the first four and last two characters kept, the rest masked, so a
    /// phone number is never logged whole (`+15551234567` → `+155******67`).
    pub fn masked(&self) -> String {
        mask_contact_id(&self.0)
    }
}

impl fmt::Debug for ContactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContactId({})", self.masked())
    }
}

/// Masks all but the first four and the last two characters; short ids are masked whole.
pub fn mask_contact_id(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 6 {
        return "*".repeat(chars.len());
    }
    let keep_tail = chars.len() - 2;
    chars
        .iter()
        .enumerate()
        .map(|(i, &c)| if i < 4 || i >= keep_tail { c } else { '*' })
        .collect()
}

/// Percent-decodes once. `None` when an escape is malformed or the result is not UTF-8.
pub fn percent_decode_once(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    if !bytes.contains(&b'%') {
        return Some(input.to_owned());
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let high = (hex[0] as char).to_digit(16)?;
            let low = (hex[1] as char).to_digit(16)?;
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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
    fn plus_and_encoded_plus_are_one_contact() {
        let raw = ContactId::from_path_segment("+15551234567").unwrap();
        let encoded = ContactId::from_path_segment("%2B15551234567").unwrap();
        assert_eq!(raw, encoded);
        assert_eq!(raw.to_path_segment(), "%2B15551234567");
    }

    #[test]
    fn contact_rule() {
        for ok in ["a", "1", "+1", "abc.DEF_9-+", &"9".repeat(64)] {
            assert!(ContactId::from_path_segment(ok).is_some(), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "-a",
            "_a",
            "a b",
            "a/b",
            "%2F",
            "%252B1",
            "%",
            "%zz",
            "a%00",
            "é",
            &"9".repeat(65),
        ] {
            assert!(ContactId::from_path_segment(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn masking_hides_the_middle() {
        assert_eq!(mask_contact_id("+15551234567"), "+155******67");
        assert_eq!(mask_contact_id("abc"), "***");
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
}
