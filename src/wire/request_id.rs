//! The `x-request-id` of an answer: the caller's when it is short printable ASCII, else a new
//! random one. Both listeners put it on every answer; the consent listener also sends it
//! upstream and logs it.

use std::cell::RefCell;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

/// As a constant: inserting under a `&str` name that is not a standard header allocates a
/// copy of the name on every response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest caller-supplied `x-request-id` passed on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The caller's `x-request-id` when it is 1 to 128 printable ASCII characters, else a new one.
pub fn request_id_of(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= MAX_REQUEST_ID_LEN
                && bytes.iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// A new request id: 128 random bits as 32 lower-case hex digits. Made 64 at a time per
/// thread, in one buffer that each id shares (a slice of it): most requests bring no id of
/// their own, and an allocation each would be one in every request's path.
pub fn new_request_id() -> HeaderValue {
    thread_local! {
        static BATCH: RefCell<(Bytes, usize)> = const { RefCell::new((Bytes::new(), 0)) };
    }
    BATCH.with_borrow_mut(|(ids, used)| {
        if *used == IDS_PER_BATCH {
            *ids = Bytes::new();
            *used = 0;
        }
        if ids.is_empty() {
            let mut random = [0u8; IDS_PER_BATCH * 16];
            rand::fill(&mut random[..]);
            let mut digits = vec![0u8; IDS_PER_BATCH * ID_DIGITS];
            // The lengths match (16 bytes → 32 digits each), so encoding cannot fail.
            let _ = hex::encode_to_slice(random, &mut digits);
            *ids = Bytes::from(digits);
        }
        let id = ids.slice(*used * ID_DIGITS..(*used + 1) * ID_DIGITS);
        *used += 1;
        // 32 hex digits are always a valid header value.
        HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("-"))
    })
}

/// Request ids made at once per thread (see `new_request_id`).
const IDS_PER_BATCH: usize = 64;
/// Hex digits in a request id.
const ID_DIGITS: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id_of(&headers), "abc-123");
        headers.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_eq!(request_id_of(&headers).len(), 32);
        headers.insert(
            "x-request-id",
            HeaderValue::from_str(&"a".repeat(129)).unwrap(),
        );
        assert_eq!(request_id_of(&headers).len(), 32);
        headers.remove("x-request-id");
        let made = request_id_of(&headers);
        assert!(
            made.as_bytes().iter().all(u8::is_ascii_hexdigit),
            "{made:?}"
        );
    }

    #[test]
    fn new_ids_differ_across_batches() {
        let ids: std::collections::HashSet<_> = (0..3 * IDS_PER_BATCH + 1)
            .map(|_| new_request_id())
            .collect();
        assert_eq!(ids.len(), 3 * IDS_PER_BATCH + 1);
        assert!(ids.iter().all(|id| id.len() == ID_DIGITS));
    }
}
