//! Small HTTP helpers shared by the proxy's routes, the admin listener and the simulator:
//! the buffered body type, JSON answers, and reading a body under a size limit.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

/// Every answer this crate makes is small and fully buffered.
pub type Body = Full<Bytes>;

pub const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

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
