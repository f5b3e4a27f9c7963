//! The consent domain, shared by the proxy and the simulator: the four statuses, the
//! `contact_id` rule, the resource path, the write body, how a write ended, the answer passed back to callers,
//! and Talkdesk's scope names.
//!
//! Everything here is pure: parsing and formatting of what the network carries, so both
//! sides agree on what a valid contact and a valid body are.

mod answer;
mod contact;
mod path;
mod status;
mod write;

pub use answer::ConsentAnswer;
pub use contact::{mask_contact_id, ContactId, MAX_CONTACT_ID_LEN};
pub use path::{consent_path, consent_path_segment, consent_url, CONSENT_ROUTE};
pub use status::{consent_status_of, parse_consent_body, BodyError, ConsentStatus};
pub use write::WriteOutcome;

/// Talkdesk's OAuth scope for reading consent (a GET needs it).
pub const READ_SCOPE: &str = "voicebiometrics-consent:read";
/// Talkdesk's OAuth scope for writing consent (a PUT needs it).
pub const WRITE_SCOPE: &str = "voicebiometrics-consent:write";
