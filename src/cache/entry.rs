//! What the cache stores per contact: a compact entry (16 bytes inline) and the rules for
//! which upstream answers may be stored at all.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::consent::{consent_status_of, ConsentAnswer, ConsentStatus};

/// Ages are kept as wrapping 32-bit milliseconds, exact while an entry is younger than
/// 2^31 ms; no TTL may reach that, so longer configured TTLs are clamped (24 days is far past
/// any sensible consent TTL).
pub const MAX_TTL: Duration = Duration::from_millis(1 << 31);

/// What kind of cacheable answer an upstream GET answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A 200 with a consent body.
    Found(ConsentStatus),
    /// A 404.
    NotFound,
}

impl Kind {
    /// `answer`'s kind, if it is cacheable: a 200 with a consent body, or (when
    /// `not_found_cached`) a 404. Only these are ever stored (rule 4 of docs/CONSISTENCY.md). Copies nothing.
    pub fn of(answer: &ConsentAnswer, not_found_cached: bool) -> Option<Kind> {
        match answer.status {
            StatusCode::OK => consent_status_of(&answer.body).map(Kind::Found),
            StatusCode::NOT_FOUND if not_found_cached => Some(Kind::NotFound),
            _ => None,
        }
    }
}

/// A cached answer, kept small: the common `{"status":"..."}` 200 answer is one byte of status
/// and shares a static body; anything else keeps upstream's answer behind an `Arc`.
#[derive(Clone)]
pub struct StoredAnswer {
    /// Upstream's answer when it is not the canonical body of `status`.
    raw: Option<Arc<ConsentAnswer>>,
    status: ConsentStatus,
    /// Milliseconds since the cache's epoch when stored, wrapping (see `MAX_TTL`).
    stored_at_ms: u32,
}

impl StoredAnswer {
    /// The written (or read) status, as its canonical answer.
    pub fn canonical(status: ConsentStatus, now_ms: u32) -> Self {
        StoredAnswer {
            raw: None,
            status,
            stored_at_ms: now_ms,
        }
    }

    /// An upstream GET answer as an entry, if it is cacheable (see [`Kind::of`]).
    pub fn from_read(answer: &ConsentAnswer, not_found_cached: bool, now_ms: u32) -> Option<Self> {
        let (status, raw) = match Kind::of(answer, not_found_cached)? {
            Kind::Found(status) => {
                let canonical = answer.body[..] == *status.canonical_body();
                (status, (!canonical).then(|| Arc::new(compact(answer))))
            }
            // The status is unused for a raw answer.
            Kind::NotFound => (ConsentStatus::NoConsent, Some(Arc::new(compact(answer)))),
        };
        Some(StoredAnswer {
            raw,
            status,
            stored_at_ms: now_ms,
        })
    }

    /// The consent status of a 200 entry (meaningless for a 404: see `is_not_found`).
    pub fn status(&self) -> ConsentStatus {
        self.status
    }

    pub fn is_not_found(&self) -> bool {
        self.raw
            .as_ref()
            .is_some_and(|a| a.status == StatusCode::NOT_FOUND)
    }

    /// Milliseconds since it was stored, given the cache's clock now.
    pub fn age_ms(&self, now_ms: u32) -> u32 {
        now_ms.wrapping_sub(self.stored_at_ms)
    }

    /// The answer to send; no body bytes are copied.
    pub fn to_answer(&self) -> ConsentAnswer {
        match &self.raw {
            None => ConsentAnswer::canonical(self.status),
            Some(answer) => ConsentAnswer::clone(answer),
        }
    }
}

/// An answer's bytes copied into exactly sized buffers, so a cached entry does not pin a
/// larger receive buffer: hyper parses a response's body and header values as slices of the
/// connection's read buffer (8 KiB and more), and a clone of either keeps all of it alive.
fn compact(answer: &ConsentAnswer) -> ConsentAnswer {
    ConsentAnswer {
        status: answer.status,
        body: Bytes::copy_from_slice(&answer.body),
        // `from_bytes` copies; it cannot fail on the bytes of a valid header value.
        content_type: answer
            .content_type
            .as_ref()
            .and_then(|value| HeaderValue::from_bytes(value.as_bytes()).ok()),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: StatusCode, body: &'static str) -> ConsentAnswer {
        ConsentAnswer {
            status,
            body: Bytes::from_static(body.as_bytes()),
            content_type: None,
            retry_after: None,
        }
    }

    #[test]
    fn entries_stay_small() {
        assert_eq!(std::mem::size_of::<StoredAnswer>(), 16);
    }

    #[test]
    fn only_200_consent_bodies_and_404s_are_cacheable() {
        let canonical = answer(StatusCode::OK, r#"{"status":"REFUSED"}"#);
        let stored = StoredAnswer::from_read(&canonical, true, 0).unwrap();
        assert!(stored.raw.is_none(), "the canonical body is not kept");
        let spaced = answer(StatusCode::OK, r#"{ "status": "REFUSED" }"#);
        let stored = StoredAnswer::from_read(&spaced, true, 0).unwrap();
        assert_eq!(
            stored.to_answer().body,
            spaced.body,
            "upstream's bytes kept"
        );
        let not_found = answer(StatusCode::NOT_FOUND, r#"{"code":"not_found"}"#);
        assert!(StoredAnswer::from_read(&not_found, true, 0)
            .unwrap()
            .is_not_found());
        assert!(StoredAnswer::from_read(&not_found, false, 0).is_none());
        for status in [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS] {
            assert!(StoredAnswer::from_read(&answer(status, "{}"), true, 0).is_none());
        }
        assert!(StoredAnswer::from_read(&answer(StatusCode::OK, "{}"), true, 0).is_none());
    }

    #[test]
    fn a_stored_answer_does_not_pin_the_receive_buffer() {
        // As hyper hands them over: body and header value slices of one larger buffer.
        let buffer = Bytes::from(format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\r\n{}{}",
            r#"{"code":"not_found"}"#,
            " ".repeat(8000)
        ));
        let at = |needle: &str| {
            let start = buffer
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap();
            buffer.slice(start..start + needle.len())
        };
        let received = ConsentAnswer {
            status: StatusCode::NOT_FOUND,
            body: at(r#"{"code":"not_found"}"#),
            content_type: Some(HeaderValue::from_maybe_shared(at("application/json")).unwrap()),
            retry_after: None,
        };
        let stored = StoredAnswer::from_read(&received, true, 0)
            .unwrap()
            .to_answer();
        let inside = |bytes: &[u8]| buffer.as_ptr_range().contains(&bytes.as_ptr());
        assert_eq!(stored.body, received.body);
        assert!(
            !inside(&stored.body),
            "the body still points into the buffer"
        );
        let content_type = stored.content_type.unwrap();
        assert_eq!(content_type, "application/json");
        assert!(
            !inside(content_type.as_bytes()),
            "the content type still points into the buffer"
        );
    }

    #[test]
    fn ages_wrap() {
        let stored = StoredAnswer::canonical(ConsentStatus::Consented, u32::MAX - 5);
        assert_eq!(stored.age_ms(4), 10);
    }
}
