//! The answer passed back to a caller: upstream's status and body with the headers worth
//! keeping, or the canonical answer for a known status.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use super::ConsentStatus;

/// An upstream answer the proxy can pass on: status, body, and the headers worth keeping.
#[derive(Debug, Clone)]
pub struct ConsentAnswer {
    pub status: StatusCode,
    pub body: Bytes,
    /// Upstream's `Content-Type`; `None` means `application/json`.
    pub content_type: Option<HeaderValue>,
    pub retry_after: Option<HeaderValue>,
}

impl ConsentAnswer {
    /// `200 {"status":"<STATUS>"}` as upstream sends it.
    pub fn canonical(status: ConsentStatus) -> ConsentAnswer {
        ConsentAnswer {
            status: StatusCode::OK,
            body: Bytes::from_static(status.canonical_body()),
            content_type: None,
            retry_after: None,
        }
    }
}
