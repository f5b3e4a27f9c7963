//! The `x-request-id` of an answer: the caller's when it is short printable ASCII, else a new
//! random one. Both listeners put it on every answer; the consent listener also sends it
//! upstream and logs it.

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

/// A new request id: 128 random bits as 32 lower-case hex digits, encoded on the stack
/// (one allocation, the header value's own).
pub fn new_request_id() -> HeaderValue {
    let id: [u8; 16] = rand::random();
    let mut digits = [0u8; 32];
    // Both lengths are fixed (16 bytes, 32 digits), so encoding cannot fail, and 32 hex
    // digits are always a valid header value.
    let _ = hex::encode_to_slice(id, &mut digits);
    HeaderValue::from_bytes(&digits).unwrap_or(HeaderValue::from_static("-"))
}

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
}
