//! What the trail holds. An [`Entry`] is one immutable, chained row: a record's `pending` entry
//! (made durable before the PUT goes upstream) or its `completion` (the outcome, after). A
//! [`Record`] is what readers see: a pending entry joined with its completion, if any.

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Which of a record's two entries a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Pending,
    Completion,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Pending => "pending",
            EntryKind::Completion => "completion",
        }
    }

    pub fn parse(s: &str) -> Option<EntryKind> {
        match s {
            "pending" => Some(EntryKind::Pending),
            "completion" => Some(EntryKind::Completion),
            _ => None,
        }
    }
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not completed yet (or never, when the instance crashed: then resolved as `Unknown`).
    Pending,
    /// Upstream answered 2xx.
    Applied,
    /// Not applied: upstream refused it (its status is recorded), or it never reached
    /// upstream (open circuit, no token, unreachable, the cluster could not be told).
    Refused,
    /// Upstream may or may not have applied it: a timeout, a connection lost after sending,
    /// a crash before the answer.
    Unknown,
}

impl Outcome {
    /// In the order of `consent_proxy_audit_records_total`'s series.
    pub const ALL: [Outcome; 4] = [
        Outcome::Pending,
        Outcome::Applied,
        Outcome::Refused,
        Outcome::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Applied => "applied",
            Outcome::Refused => "refused",
            Outcome::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// One row of the trail, everything its hash covers but its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The record both entries of a write share.
    pub record_id: String,
    pub kind: EntryKind,
    /// Pending: when the PUT arrived. Completion: when its outcome was known.
    pub at_us: i64,
    /// Pending only (None in a completion).
    pub contact_id: Option<String>,
    pub request_id: Option<String>,
    pub client: Option<String>,
    pub auth: Option<String>,
    pub status: Option<String>,
    pub previous: Option<String>,
    /// Completion only.
    pub outcome: Option<String>,
    pub upstream_status: Option<i32>,
}

impl Entry {
    /// A completion of `record_id`.
    pub fn completion(
        record_id: String,
        at_us: i64,
        outcome: Outcome,
        upstream_status: Option<u16>,
    ) -> Entry {
        Entry {
            record_id,
            kind: EntryKind::Completion,
            at_us,
            contact_id: None,
            request_id: None,
            client: None,
            auth: None,
            status: None,
            previous: None,
            outcome: Some(outcome.as_str().to_owned()),
            upstream_status: upstream_status.map(i32::from),
        }
    }
}

/// An entry in its chain: what the store keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub chain: String,
    pub seq: i64,
    pub entry: Entry,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// A write as readers see it (the admin route, `audit export`), in the contract's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub id: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: i64,
    #[serde(serialize_with = "rfc3339_or_null")]
    pub answered_at: Option<i64>,
    pub instance: String,
    pub contact_id: String,
    pub request_id: String,
    pub client: String,
    pub auth: String,
    pub status: String,
    pub previous: Option<String>,
    pub outcome: String,
    pub upstream_status: Option<i32>,
}

/// The CSV columns of `audit export --format csv`, in order.
pub const CSV_COLUMNS: [&str; 12] = [
    "id",
    "at",
    "answered_at",
    "instance",
    "contact_id",
    "request_id",
    "client",
    "auth",
    "status",
    "previous",
    "outcome",
    "upstream_status",
];

impl Record {
    /// The record as the admin route shows it: without `contact_id` (the answer names it once).
    pub fn to_api_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.remove("contact_id");
        }
        value
    }

    /// One CSV line (RFC 4180 quoting), columns as [`CSV_COLUMNS`].
    pub fn to_csv_line(&self) -> String {
        let fields = [
            self.id.clone(),
            format_time(self.at),
            self.answered_at.map(format_time).unwrap_or_default(),
            self.instance.clone(),
            self.contact_id.clone(),
            self.request_id.clone(),
            self.client.clone(),
            self.auth.clone(),
            self.status.clone(),
            self.previous.clone().unwrap_or_default(),
            self.outcome.clone(),
            self.upstream_status
                .map(|s| s.to_string())
                .unwrap_or_default(),
        ];
        fields
            .iter()
            .map(|f| csv_field(f))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// Microseconds since the epoch as RFC 3339 in UTC.
pub fn format_time(at_us: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_us) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| at_us.to_string())
}

/// An RFC 3339 time (`2026-01-31T12:00:00Z`, any offset) or a date (`2026-01-31`, midnight
/// UTC) as microseconds since the epoch.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let parsed = OffsetDateTime::parse(text, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(&format!("{text}T00:00:00Z"), &Rfc3339));
    parsed
        .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
        .map_err(|_| {
            format!(
                "{text:?} is not an RFC 3339 time (2026-01-31T12:00:00Z) or a date (2026-01-31)"
            )
        })
}

/// Now, in microseconds since the epoch.
pub fn now_us() -> i64 {
    i64::try_from(crate::clock::since_epoch().as_micros()).unwrap_or(i64::MAX)
}

fn rfc3339<S: serde::Serializer>(at_us: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_time(*at_us))
}

fn rfc3339_or_null<S: serde::Serializer>(
    at_us: &Option<i64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at_us {
        Some(at_us) => serializer.serialize_str(&format_time(*at_us)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        let at = parse_time("2026-12-07T13:06:14.123456Z").unwrap();
        assert_eq!(format_time(at), "2026-12-07T13:06:14.123456Z");
        assert_eq!(parse_time("2026-12-07").unwrap() % 86_400_000_000, 0);
        assert_eq!(
            parse_time("2026-12-07T14:06:14+01:00").unwrap(),
            parse_time("2026-12-07T13:06:14Z").unwrap()
        );
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
