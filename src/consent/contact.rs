//! The contact id: the contract's rule for `{contact_id}`, its normal form (one cache entry
//! for `+1...` and `%2B1...`), its form in an upstream path, and its masked form for logs.

use std::fmt;
use std::sync::Arc;

use percent_encoding::{utf8_percent_encode, AsciiSet, PercentEncode, NON_ALPHANUMERIC};

/// What is percent-encoded in an upstream path segment: of the characters a contact id may
/// hold, only `+` (so no server reads it as a space).
const UPSTREAM_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'_').remove(b'-');

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
        // Decoded once and checked as it goes, on the stack (one allocation, the `Arc<str>`).
        // A malformed escape would stay a literal '%', which the rule refuses; so would any
        // byte outside the rule's ASCII, so what is decoded is UTF-8.
        let bytes = segment.as_bytes();
        let mut buffer = [0u8; MAX_CONTACT_ID_LEN];
        let (mut read, mut len) = (0, 0);
        while read < bytes.len() {
            let byte = if bytes[read] == b'%' {
                let hex = |at: usize| bytes.get(at).and_then(|&b| (b as char).to_digit(16));
                let (high, low) = (hex(read + 1)?, hex(read + 2)?);
                read += 3;
                (high * 16 + low) as u8
            } else {
                read += 1;
                bytes[read - 1]
            };
            if len == MAX_CONTACT_ID_LEN || !allowed(byte, len == 0) {
                return None;
            }
            buffer[len] = byte;
            len += 1;
        }
        let decoded = std::str::from_utf8(&buffer[..len]).ok()?;
        (len > 0).then(|| ContactId(Arc::from(decoded)))
    }

    fn validate(id: &str) -> bool {
        let bytes = id.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_CONTACT_ID_LEN
            && bytes
                .iter()
                .enumerate()
                .all(|(at, &byte)| allowed(byte, at == 0))
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
        self.path_segment().to_string()
    }

    /// The same, as pieces to write out without an allocation of its own.
    pub fn path_segment(&self) -> PercentEncode<'_> {
        utf8_percent_encode(&self.0, UPSTREAM_SEGMENT)
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

/// Whether the rule allows `byte` in a contact id, `first` or not.
fn allowed(byte: u8, first: bool) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'+' || (!first && matches!(byte, b'.' | b'_' | b'-'))
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
        for ok in [
            "a",
            "1",
            "+1",
            "abc.DEF_9-+",
            &"9".repeat(64),
            "%2B1",
            "%2b1%2E%5f%2D",
            "%41%7a",
        ] {
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
            // Decoded, the same rule: the first character, the alphabet, UTF-8, whole escapes.
            "%2Ea",
            "%2d1",
            "%5F1",
            "%C3%A9",
            "%FF",
            "%4",
            "1%2",
            "1%2G",
            "%20",
        ] {
            assert!(ContactId::from_path_segment(bad).is_none(), "{bad}");
        }
        // An escape decodes three characters into one: 64 escapes are 64 characters, 65 are
        // too many; a segment longer than the decoding buffer is refused before decoding.
        assert!(ContactId::from_path_segment(&"%41".repeat(64)).is_some());
        assert!(ContactId::from_path_segment(&"%41".repeat(65)).is_none());
        let long = format!("%41{}", "a".repeat(3 * MAX_CONTACT_ID_LEN));
        assert!(ContactId::from_path_segment(&long).is_none());
    }

    #[test]
    fn masking_hides_the_middle() {
        assert_eq!(mask_contact_id("+15551234567"), "+155******67");
        assert_eq!(mask_contact_id("abc"), "***");
    }
}
