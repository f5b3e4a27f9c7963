//! Small HTTP helpers shared by the proxy's routes, the admin listener and the simulator:
//! the buffered body type, JSON answers, and reading a body under a size limit.

use std::fmt::Write as _;
use std::sync::OnceLock;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

/// Every answer this crate makes is small and fully buffered.
pub type Body = Full<Bytes>;

pub const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The media type a `Content-Type` header declares, without its parameters (`None`: no
/// header; `""`: a value that is not text).
pub fn media_type(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::CONTENT_TYPE)?;
    let essence = value.to_str().unwrap_or("").split(';').next().unwrap_or("");
    Some(essence.trim())
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    // Serialising a `Value` cannot fail.
    let body = serde_json::to_vec(value).unwrap_or_default();
    bytes_response(status, APPLICATION_JSON, Bytes::from(body))
}

pub fn bytes_response(
    status: StatusCode,
    content_type: HeaderValue,
    body: Bytes,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

/// Ages below this many seconds have a pre-built `Age` header value.
const AGE_TABLE_LEN: usize = 1024;

/// The `Age` header value for `seconds`. Ages below 1024 s come from a table built on first
/// use, whose values borrow one string kept for the life of the process, so a cache hit does
/// not allocate for its `Age` (`HeaderValue::from(u32)` allocates every time); larger ages
/// fall back to that.
pub fn age_value(seconds: u32) -> HeaderValue {
    static TABLE: OnceLock<Box<[HeaderValue]>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut digits = String::new();
        let mut bounds = Vec::with_capacity(AGE_TABLE_LEN);
        for n in 0..AGE_TABLE_LEN {
            let start = digits.len();
            let _ = write!(digits, "{n}");
            bounds.push((start, digits.len()));
        }
        // About 3 KB, made once: what lets every value be a static, copy-free header value.
        let digits: &'static str = Box::leak(digits.into_boxed_str());
        bounds
            .into_iter()
            .map(|(start, end)| HeaderValue::from_static(&digits[start..end]))
            .collect()
    });
    match table.get(seconds as usize) {
        Some(value) => value.clone(),
        None => HeaderValue::from(seconds),
    }
}

/// The bytes of all request headers together, as `server.max_header_bytes` counts them (name,
/// value, and 4 for `: ` and CRLF).
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// 431 when the request's headers together exceed `limit` bytes. Both listeners check it
/// themselves: hyper's HTTP/1 read buffer only refuses far beyond it (the buffer grows in
/// steps), and h2 counts header sizes its own way.
pub fn headers_too_large(headers: &HeaderMap, limit: usize) -> Option<Response<Body>> {
    (header_bytes(headers) > limit)
        .then(|| empty_response(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
}

pub fn empty_response(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum ReadBodyError {
    TooLarge,
    Failed(String),
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_body_limited<B>(body: B, limit: usize) -> Result<Bytes, ReadBodyError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) => {
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ReadBodyError::TooLarge)
            } else {
                Err(ReadBodyError::Failed(err.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_values_are_the_decimal_seconds() {
        for age in [0, 1, 9, 10, 99, 100, 299, 1023, 1024, 86_400, u32::MAX] {
            assert_eq!(age_value(age), age.to_string().as_str(), "{age}");
        }
    }
}
