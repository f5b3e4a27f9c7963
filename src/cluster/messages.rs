//! The announcements instances exchange on the cluster's channel, as one JSON object each
//! (serde): a write about to go upstream (`pending`), how it ended (`done`), an admin purge
//! (`purge`), and each instance's heartbeat. Every message names its sender and carries the sender's wall-clock
//! time, used only for the propagation metric (never for ordering: Redis orders the channel).

use serde::{Deserialize, Serialize};

use crate::consent::WriteOutcome;
use crate::consent::{ConsentStatus, ContactId};

/// The format's version; a message with another one is not understood.
pub const VERSION: u8 = 1;

/// One message on the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub v: u8,
    /// The sending instance (random per process).
    pub from: String,
    /// When it was sent: Unix time in microseconds, by the sender's clock.
    pub at_us: u64,
    #[serde(flatten)]
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// Proves the feed live to its sender when it comes back (pub/sub delivers in order).
    Heartbeat { seq: u64 },
    /// A write of `contact` is about to go upstream; `write` numbers it within its sender.
    Pending { write: u64, contact: String },
    /// How write `write` ended; `status` is set when it was applied.
    Done {
        write: u64,
        contact: String,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<String>,
    },
    /// `DELETE /admin/cache/{contact}` through the sender: every instance drops the contact.
    Purge { contact: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    NotApplied,
    Unknown,
}

/// Why a message could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not an announcement")]
    Json(#[from] serde_json::Error),
    #[error("format version {0}, this instance understands {VERSION}")]
    Version(u8),
    #[error("the contact id is not valid")]
    Contact,
    #[error("the consent status is not valid")]
    Status,
}

impl Announcement {
    pub fn new(from: &str, body: Body) -> Self {
        Announcement {
            v: VERSION,
            from: from.to_owned(),
            at_us: unix_us(),
            body,
        }
    }

    pub fn pending(from: &str, write: u64, contact: &ContactId) -> Self {
        Self::new(
            from,
            Body::Pending {
                write,
                contact: contact.as_str().to_owned(),
            },
        )
    }

    pub fn done(from: &str, write: u64, contact: &ContactId, outcome: WriteOutcome) -> Self {
        let (outcome, status) = match outcome {
            WriteOutcome::Applied(status) => (Outcome::Applied, Some(status.as_str().to_owned())),
            WriteOutcome::NotApplied => (Outcome::NotApplied, None),
            WriteOutcome::Unknown => (Outcome::Unknown, None),
        };
        Self::new(
            from,
            Body::Done {
                write,
                contact: contact.as_str().to_owned(),
                outcome,
                status,
            },
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A message from the channel, checked: the version understood, the contact id valid.
    pub fn decode(payload: &[u8]) -> Result<Announcement, DecodeError> {
        let announcement: Announcement = serde_json::from_slice(payload)?;
        if announcement.v != VERSION {
            return Err(DecodeError::Version(announcement.v));
        }
        match &announcement.body {
            Body::Heartbeat { .. } => {}
            Body::Pending { contact, .. } | Body::Purge { contact } => {
                contact_id(contact)?;
            }
            Body::Done {
                contact, status, ..
            } => {
                contact_id(contact)?;
                announcement.outcome()?;
                if let Some(status) = status {
                    ConsentStatus::parse(status).ok_or(DecodeError::Status)?;
                }
            }
        }
        Ok(announcement)
    }

    /// The contact a write message is about.
    pub fn contact(&self) -> Option<ContactId> {
        match &self.body {
            Body::Heartbeat { .. } => None,
            Body::Pending { contact, .. }
            | Body::Done { contact, .. }
            | Body::Purge { contact } => contact_id(contact).ok(),
        }
    }

    /// A `done` message's outcome, for the cache.
    pub fn outcome(&self) -> Result<WriteOutcome, DecodeError> {
        match &self.body {
            Body::Done {
                outcome, status, ..
            } => Ok(match outcome {
                Outcome::Applied => WriteOutcome::Applied(
                    status
                        .as_deref()
                        .and_then(ConsentStatus::parse)
                        .ok_or(DecodeError::Status)?,
                ),
                Outcome::NotApplied => WriteOutcome::NotApplied,
                Outcome::Unknown => WriteOutcome::Unknown,
            }),
            _ => Ok(WriteOutcome::Unknown),
        }
    }

    /// Seconds from sending to `now_us` (Unix microseconds); 0 when the clocks disagree.
    pub fn age_s(&self, now_us: u64) -> f64 {
        now_us.saturating_sub(self.at_us) as f64 / 1_000_000.0
    }
}

fn contact_id(contact: &str) -> Result<ContactId, DecodeError> {
    // Sent in normal form, which has no '%': read as a path segment it is taken as it is.
    ContactId::from_path_segment(contact)
        .filter(|id| id.as_str() == contact)
        .ok_or(DecodeError::Contact)
}

/// Unix time in microseconds (0 before 1970).
pub fn unix_us() -> u64 {
    crate::clock::since_epoch().as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact() -> ContactId {
        ContactId::from_path_segment("+15551234567").unwrap()
    }

    #[test]
    fn round_trips() {
        for announcement in [
            Announcement::new("a1", Body::Heartbeat { seq: 7 }),
            Announcement::pending("a1", 3, &contact()),
            Announcement::done(
                "a1",
                3,
                &contact(),
                WriteOutcome::Applied(ConsentStatus::Refused),
            ),
            Announcement::done("a1", 4, &contact(), WriteOutcome::Unknown),
            Announcement::done("a1", 5, &contact(), WriteOutcome::NotApplied),
            Announcement::new(
                "a1",
                Body::Purge {
                    contact: contact().as_str().to_owned(),
                },
            ),
        ] {
            let decoded = Announcement::decode(&announcement.encode()).unwrap();
            assert_eq!(decoded, announcement);
        }
        let done = Announcement::done(
            "a1",
            3,
            &contact(),
            WriteOutcome::Applied(ConsentStatus::Refused),
        );
        assert!(matches!(
            done.outcome().unwrap(),
            WriteOutcome::Applied(ConsentStatus::Refused)
        ));
        assert_eq!(done.contact(), Some(contact()));
    }

    #[test]
    fn the_wire_format_is_stable() {
        let pending = Announcement {
            at_us: 1_700_000_000_000_000,
            ..Announcement::pending("0123abcd", 9, &contact())
        };
        assert_eq!(
            String::from_utf8(pending.encode()).unwrap(),
            r#"{"v":1,"from":"0123abcd","at_us":1700000000000000,"kind":"pending","write":9,"contact":"+15551234567"}"#
        );
    }

    #[test]
    fn what_is_not_understood_is_refused() {
        for (payload, expected) in [
            (&b"hello"[..], "not an announcement"),
            (
                br#"{"v":2,"from":"a","at_us":1,"kind":"heartbeat","seq":1}"#,
                "format version 2",
            ),
            (
                br#"{"v":1,"from":"a","at_us":1,"kind":"evict_all"}"#,
                "not an announcement",
            ),
            (
                br#"{"v":1,"from":"a","at_us":1,"kind":"pending","write":1,"contact":"no spaces"}"#,
                "contact id",
            ),
            (
                br#"{"v":1,"from":"a","at_us":1,"kind":"pending","write":1,"contact":"%2B1555"}"#,
                "contact id",
            ),
            (
                br#"{"v":1,"from":"a","at_us":1,"kind":"done","write":1,"contact":"+1555","outcome":"applied"}"#,
                "consent status",
            ),
            (
                br#"{"v":1,"from":"a","at_us":1,"kind":"done","write":1,"contact":"+1555","outcome":"applied","status":"MAYBE"}"#,
                "consent status",
            ),
        ] {
            let err = Announcement::decode(payload).unwrap_err().to_string();
            assert!(err.contains(expected), "{payload:?}: {err}");
        }
    }

    #[test]
    fn ages_never_go_negative() {
        let mut announcement = Announcement::new("a", Body::Heartbeat { seq: 1 });
        announcement.at_us = 10_000_000;
        assert_eq!(announcement.age_s(12_500_000), 2.5);
        assert_eq!(announcement.age_s(9_000_000), 0.0);
    }
}
