//! Property tests of every parser the network controls: the contact id (path segment), the
//! consent body, the caller's credentials, the token endpoint's answer (and the form encoding
//! of the token request) and the consent route matcher.
//!
//! Each property runs a few hundred generated cases (seconds in all). A failing case is shrunk
//! and printed; proptest records it under `tests/properties.proptest-regressions` so it is
//! replayed first from then on (commit that file if it appears).

use std::collections::BTreeSet;

use base64::Engine as _;
use consent_proxy::auth::{Authenticator, Permission};
use consent_proxy::config::{ClientSettings, Permissions};
use consent_proxy::consent::{
    consent_path_segment, parse_consent_body, ConsentStatus, ContactId, MAX_CONTACT_ID_LEN,
};
use consent_proxy::error::ProxyError;
use consent_proxy::upstream::token::{form_encode, parse_token_response};
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

const CASES: u32 = 400;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

/// A contact id the contract accepts: `[A-Za-z0-9+][A-Za-z0-9+._-]{0,63}`.
fn valid_contact_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9+][A-Za-z0-9+._-]{0,63}"
}

/// Path segments a hostile or careless caller might send: arbitrary Unicode, arbitrary bytes
/// (lossily), and mixtures of valid characters with escapes, broken escapes, `/`, spaces and
/// double encodings.
fn any_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..80)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        "(%[0-9A-Fa-f]{2}|%[0-9A-Za-z%]{0,2}|%2[bB]|%25|[A-Za-z0-9+._~ /-]|.){0,80}",
        valid_contact_id(),
        valid_contact_id().prop_map(|id| format!("{id}%")),
        "[A-Za-z0-9+._-]{60,70}",
        // A first character the rule refuses there only, escaped or not, then valid ones.
        "(%2[eEdD]|%5[fF]|[._-])(%[0-9A-Fa-f]{2}|[A-Za-z0-9+._-]){0,63}",
    ]
}

/// Percent-encodes every byte, each hex digit's case chosen by `upper`.
fn encode_all(s: &str, upper: &[bool]) -> String {
    s.bytes()
        .enumerate()
        .map(|(i, b)| {
            if upper.get(i).copied().unwrap_or(true) {
                format!("%{b:02X}")
            } else {
                format!("%{b:02x}")
            }
        })
        .collect()
}

/// Percent-encodes the bytes whose flag is set.
fn encode_some(s: &str, which: &[bool]) -> String {
    s.bytes()
        .enumerate()
        .map(|(i, b)| {
            if which.get(i).copied().unwrap_or(false) {
                format!("%{b:02X}")
            } else {
                (b as char).to_string()
            }
        })
        .collect()
}

/// An independent statement of the contract's rule: percent-decode once (every `%` starts a
/// two-hex-digit escape, the result must be UTF-8), then 1 to 64 characters of
/// `A-Z a-z 0-9 + . _ -`, the first a letter, a digit or `+`.
fn reference_contact_id(segment: &str) -> Option<String> {
    let mut bytes = Vec::new();
    let mut chars = segment.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let hi = chars.next()?;
            let lo = chars.next()?;
            if !hi.is_ascii_hexdigit() || !lo.is_ascii_hexdigit() {
                return None;
            }
            bytes.push(u8::from_str_radix(&format!("{hi}{lo}"), 16).ok()?);
        } else {
            let mut buf = [0u8; 4];
            bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    let decoded = String::from_utf8(bytes).ok()?;
    let allowed = |c: char| c.is_ascii_alphanumeric() || "+._-".contains(c);
    let first_ok = decoded
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '+');
    let len = decoded.chars().count();
    (first_ok && (1..=MAX_CONTACT_ID_LEN).contains(&len) && decoded.chars().all(allowed))
        .then_some(decoded)
}

/// What may be forwarded upstream as the contact segment: `A-Za-z0-9._-` and `%2B`.
fn is_safe_upstream_segment(segment: &str) -> bool {
    let rest = segment.replace("%2B", "");
    rest.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Arbitrary JSON, with keys that are often `status` and strings that are often near-statuses.
fn any_json() -> impl Strategy<Value = Value> {
    let near_status = prop_oneof![
        Just("NO_CONSENT".to_owned()),
        Just("CONSENTED".to_owned()),
        Just("DELETED".to_owned()),
        Just("REFUSED".to_owned()),
        Just("consented".to_owned()),
        Just(" CONSENTED".to_owned()),
        Just("CONSENTED ".to_owned()),
        Just("CONSENTED\u{0}".to_owned()),
        Just("NO CONSENT".to_owned()),
        Just("".to_owned()),
        any::<String>(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        near_status.prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        let key = prop_oneof![
            3 => Just("status".to_owned()),
            1 => Just("Status".to_owned()),
            1 => Just("status ".to_owned()),
            2 => "[a-z]{1,6}",
            1 => any::<String>(),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(key, inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn any_status() -> impl Strategy<Value = ConsentStatus> {
    proptest::sample::select(ConsentStatus::ALL.to_vec())
}

/// An API key as the configuration allows it: at least 16 visible ASCII characters.
fn api_key() -> impl Strategy<Value = String> {
    "[!-~]{16,48}"
}

/// `scheme` in a random letter case.
fn scheme_case(scheme: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), scheme.len()).prop_map(move |upper| {
        scheme
            .chars()
            .zip(upper)
            .map(|(c, u)| {
                if u {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(usize, char),
    Delete(usize),
    Insert(usize, char),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let graphic = proptest::char::range('!', '~');
    prop_oneof![
        (any::<usize>(), graphic.clone()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), graphic).prop_map(|(i, c)| Mutation::Insert(i, c)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

/// Applies a mutation to an ASCII key; always returns a different string.
fn mutate(key: &str, mutation: &Mutation) -> String {
    let mut chars: Vec<char> = key.chars().collect();
    let len = chars.len();
    match *mutation {
        Mutation::Replace(i, c) => {
            let i = i % len;
            chars[i] = if chars[i] == c {
                if c == '~' {
                    '!'
                } else {
                    (c as u8 + 1) as char
                }
            } else {
                c
            };
        }
        Mutation::Delete(i) => {
            chars.remove(i % len);
        }
        Mutation::Insert(i, c) => chars.insert(i % (len + 1), c),
        Mutation::Truncate(i) => chars.truncate(i % len),
    }
    chars.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Credentials helpers

const READER: &str = "ivr";
const OPS: &str = "ops";

fn authenticator(reader_key: &str, ops_key: &str) -> Authenticator {
    Authenticator::new(
        vec![
            ClientSettings {
                name: READER.into(),
                key_sha256: Sha256::digest(reader_key.as_bytes()).into(),
                permissions: Permissions {
                    read: true,
                    write: false,
                    admin: false,
                },
            },
            ClientSettings {
                name: OPS.into(),
                key_sha256: Sha256::digest(ops_key.as_bytes()).into(),
                permissions: Permissions {
                    read: true,
                    write: true,
                    admin: true,
                },
            },
        ],
        true,
    )
}

fn headers_with(name: &'static str, value: &[u8]) -> Option<HeaderMap> {
    let value = HeaderValue::from_bytes(value).ok()?;
    let mut headers = HeaderMap::new();
    headers.insert(name, value);
    Some(headers)
}

fn basic_credentials(user: &str, key: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{key}"))
}

/// The three forms of one key for `client`, schemes in the given letter case.
fn three_forms(client: &str, key: &str, bearer: &str, basic: &str) -> Vec<HeaderMap> {
    vec![
        headers_with("x-api-key", key.as_bytes()).expect("a visible-ASCII key is a header"),
        headers_with("authorization", format!("{bearer} {key}").as_bytes()).unwrap(),
        headers_with(
            "authorization",
            format!("{basic} {}", basic_credentials(client, key)).as_bytes(),
        )
        .unwrap(),
    ]
}

// ---------------------------------------------------------------------------------------------
// contact_id

proptest! {
    #![proptest_config(config())]

    /// Any segment: no panic, the same verdict as the contract's rule stated independently, and
    /// an accepted id only holds the alphabet and forwards only safe characters.
    #[test]
    fn contact_id_decoding_follows_the_rule(segment in any_segment()) {
        let parsed = ContactId::from_path_segment(&segment);
        let expected = reference_contact_id(&segment);
        prop_assert_eq!(parsed.as_ref().map(|id| id.as_str().to_owned()), expected);
        if let Some(id) = parsed {
            let s = id.as_str();
            prop_assert!((1..=MAX_CONTACT_ID_LEN).contains(&s.len()));
            prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+._-".contains(&b)));
            prop_assert!(s.as_bytes()[0].is_ascii_alphanumeric() || s.as_bytes()[0] == b'+');
            let forwarded = id.to_path_segment();
            prop_assert!(is_safe_upstream_segment(&forwarded), "forwarded {:?}", forwarded);
            // The forwarded form names the same contact (one cache key).
            prop_assert_eq!(ContactId::from_path_segment(&forwarded), Some(id.clone()));
            // Masking never shows the whole of a long id.
            if s.len() > 6 {
                prop_assert_ne!(id.masked(), s);
            }
        }
    }

    /// A valid id: accepted raw, fully percent-encoded (either hex case) and partly encoded, all
    /// as the same contact; `to_path_segment` round-trips.
    #[test]
    fn contact_id_spellings_are_one_contact(
        id in valid_contact_id(),
        upper in proptest::collection::vec(any::<bool>(), 64),
        which in proptest::collection::vec(any::<bool>(), 64),
    ) {
        let raw = ContactId::from_path_segment(&id).expect("valid id accepted");
        prop_assert_eq!(raw.as_str(), id.as_str());
        prop_assert_eq!(ContactId::from_path_segment(&encode_all(&id, &upper)), Some(raw.clone()));
        prop_assert_eq!(ContactId::from_path_segment(&encode_some(&id, &which)), Some(raw.clone()));
        prop_assert_eq!(ContactId::from_path_segment(&raw.to_path_segment()), Some(raw.clone()));
        // `+` and `%2B`/`%2b` are the same contact.
        for plus in ["%2B", "%2b"] {
            let spelled = id.replace('+', plus);
            prop_assert_eq!(ContactId::from_path_segment(&spelled), Some(raw.clone()));
        }
        // Decoding is once only: a double-encoded id is a different (invalid) one.
        let double = encode_all(&encode_all(&id, &upper), &upper);
        prop_assert_eq!(ContactId::from_path_segment(&double), None);
    }

    /// One character outside the alphabet anywhere, raw or encoded, is refused.
    #[test]
    fn one_bad_character_is_refused(
        id in valid_contact_id(),
        at in any::<usize>(),
        bad in any::<char>().prop_filter("outside the alphabet", |c| {
            !(c.is_ascii_alphanumeric() || "+._-".contains(*c))
        }),
        encoded in any::<bool>(),
    ) {
        let mut chars: Vec<char> = id.chars().collect();
        chars.truncate(MAX_CONTACT_ID_LEN - 1);
        let at = at % (chars.len() + 1);
        let mut buf = [0u8; 4];
        let bad_text = if encoded {
            encode_all(bad.encode_utf8(&mut buf), &[])
        } else {
            bad.to_string()
        };
        let segment: String = chars[..at]
            .iter()
            .collect::<String>()
            + &bad_text
            + &chars[at..].iter().collect::<String>();
        // A raw `%` starts an escape; when `bad` is `%` itself, only the encoded form is
        // a "character outside the alphabet" for sure.
        prop_assume!(bad != '%' || encoded);
        prop_assert_eq!(ContactId::from_path_segment(&segment), None, "{:?}", segment);
    }
}

// ---------------------------------------------------------------------------------------------
// The consent body

/// The contract's body rule on a parsed JSON value, stated independently.
fn reference_body(value: &Value) -> Option<ConsentStatus> {
    let object = value.as_object()?;
    if object.len() != 1 {
        return None;
    }
    let status = object.get("status")?.as_str()?;
    ConsentStatus::ALL
        .into_iter()
        .find(|s| s.as_str() == status)
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes: no panic; accepted only when they are JSON `{"status": <one of four>}`.
    #[test]
    fn body_parser_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(status) = parse_consent_body(&bytes) {
            let value: Value = serde_json::from_slice(&bytes).expect("accepted bytes are JSON");
            prop_assert_eq!(reference_body(&value), Some(status));
        }
    }

    /// Arbitrary JSON: accepted exactly when it is an object whose one property is `status`
    /// with one of the four values; a rejection names the culprit property when there is one.
    #[test]
    fn body_parser_accepts_exactly_the_four_statuses(value in any_json(), pretty in any::<bool>()) {
        let bytes = if pretty {
            serde_json::to_vec_pretty(&value).unwrap()
        } else {
            serde_json::to_vec(&value).unwrap()
        };
        let parsed = parse_consent_body(&bytes);
        prop_assert_eq!(parsed.as_ref().ok().copied(), reference_body(&value));
        if let (Err(error), Some(object)) = (&parsed, value.as_object()) {
            let field = error.field.as_deref();
            if object.keys().any(|k| k != "status") {
                let field = field.expect("an extra property is named");
                prop_assert!(field != "status" && object.contains_key(field));
            } else {
                prop_assert_eq!(field, Some("status"));
            }
            prop_assert!(error.message.chars().count() <= 200, "{:?}", error.message);
        }
    }

    /// Each status, in a one-property object however it is spaced, is accepted as itself; with
    /// any extra property it is refused.
    #[test]
    fn each_status_alone_is_accepted(
        status in any_status(),
        space in "[ \t\r\n]{0,3}",
        extra in "[a-zA-Z_]{1,10}".prop_filter("not status", |k| k != "status"),
        extra_value in any_json(),
    ) {
        let body = format!("{space}{{{space}\"status\"{space}:{space}\"{status}\"{space}}}{space}");
        prop_assert_eq!(parse_consent_body(body.as_bytes()), Ok(status));
        let mut object = Map::new();
        object.insert("status".into(), json!(status.as_str()));
        object.insert(extra.clone(), extra_value);
        let error = parse_consent_body(&serde_json::to_vec(&Value::Object(object)).unwrap())
            .expect_err("extra property refused");
        prop_assert_eq!(error.field, Some(extra));
        prop_assert_eq!(parse_consent_body(status.canonical_body()), Ok(status));
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials

proptest! {
    #![proptest_config(config())]

    /// A valid key authenticates in each form (schemes in any letter case) as its own client.
    #[test]
    fn a_valid_key_authenticates_in_all_three_forms(
        reader_key in api_key(),
        ops_key in api_key(),
        bearer in scheme_case("bearer"),
        basic in scheme_case("basic"),
    ) {
        prop_assume!(reader_key != ops_key);
        let auth = authenticator(&reader_key, &ops_key);
        for (client, key, index) in [(READER, &reader_key, 0), (OPS, &ops_key, 1)] {
            for headers in three_forms(client, key, &bearer, &basic) {
                let caller = auth.authenticate(&headers);
                prop_assert!(caller.is_ok(), "{client} refused with {headers:?}");
                prop_assert_eq!(caller.unwrap().client_index, Some(index));
            }
        }
        // Permissions still apply.
        for headers in three_forms(READER, &reader_key, &bearer, &basic) {
            prop_assert!(matches!(
                auth.authorize(&headers, Permission::Write),
                Err(ProxyError::Forbidden(_))
            ));
        }
    }

    /// Any mutation of the key (a character replaced, removed or added, or the key cut short)
    /// does not authenticate in any form; nor does the right key under another client's name.
    #[test]
    fn a_mutated_key_does_not_authenticate(
        reader_key in api_key(),
        ops_key in api_key(),
        mutation in mutation(),
    ) {
        prop_assume!(reader_key != ops_key);
        let auth = authenticator(&reader_key, &ops_key);
        let mutated = mutate(&ops_key, &mutation);
        prop_assert_ne!(&mutated, &ops_key);
        prop_assume!(mutated != reader_key);
        for client in [READER, OPS] {
            for headers in three_forms(client, &mutated, "Bearer", "Basic")
                .into_iter()
                .chain(headers_with("x-api-key", mutated.as_bytes()))
            {
                // A Bearer value that is no key is refused as an access token would be (an
                // empty one is a malformed header).
                let bearer = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .is_some_and(|credentials| !credentials.trim().is_empty());
                let refused = match auth.authenticate(&headers) {
                    Err(ProxyError::InvalidToken(_)) => bearer,
                    Err(ProxyError::Unauthorized) => !bearer,
                    _ => false,
                };
                prop_assert!(refused, "{mutation:?} accepted: {headers:?}");
            }
        }
        let wrong_name = headers_with(
            "authorization",
            format!("Basic {}", basic_credentials(READER, &ops_key)).as_bytes(),
        )
        .unwrap();
        prop_assert!(auth.authenticate(&wrong_name).is_err());
    }

    /// A changed character in the Basic credentials' base64 never authenticates.
    #[test]
    fn a_mutated_basic_credential_does_not_authenticate(
        key in api_key(),
        at in any::<usize>(),
        replacement in proptest::char::range('!', '~'),
    ) {
        let auth = authenticator("reader-key-0123456789", &key);
        prop_assume!(key != "reader-key-0123456789");
        let encoded = basic_credentials(OPS, &key);
        let mut chars: Vec<char> = encoded.chars().collect();
        let at = at % chars.len();
        prop_assume!(chars[at] != replacement);
        chars[at] = replacement;
        let mutated: String = chars.into_iter().collect();
        let headers = headers_with("authorization", format!("Basic {mutated}").as_bytes()).unwrap();
        prop_assert!(auth.authenticate(&headers).is_err(), "{mutated:?} accepted");
    }

    /// Arbitrary header values in `X-API-Key` or `Authorization` (raw, after a `Bearer ` or a
    /// `Basic ` prefix): never a panic, never a caller.
    #[test]
    fn arbitrary_credentials_are_refused(
        key in api_key(),
        value in proptest::collection::vec(any::<u8>(), 0..120),
        prefix in prop_oneof![Just(""), Just("Bearer "), Just("Basic "), Just("bearer"), Just(" ")],
        as_api_key in any::<bool>(),
    ) {
        let auth = authenticator("reader-key-0123456789", &key);
        let mut full = prefix.as_bytes().to_vec();
        full.extend_from_slice(&value);
        prop_assume!(!String::from_utf8_lossy(&full).contains(key.as_str()));
        let name = if as_api_key { "x-api-key" } else { "authorization" };
        if let Some(headers) = headers_with(name, &full) {
            prop_assert!(auth.authenticate(&headers).is_err());
        }
        // Base64 of arbitrary bytes as Basic credentials.
        let encoded = base64::engine::general_purpose::STANDARD.encode(&value);
        let headers = headers_with("authorization", format!("Basic {encoded}").as_bytes()).unwrap();
        prop_assert!(auth.authenticate(&headers).is_err());
        // Both headers at once: X-API-Key is the one read.
        let mut both = headers_with("x-api-key", b"not-the-key-at-all-0123").unwrap();
        both.insert("authorization", HeaderValue::from_str(&format!("Bearer {key}")).unwrap());
        prop_assert!(auth.authenticate(&both).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// The token endpoint's answer, and the form encoding of the token request

/// Marks the token so a leak into an error message is visible.
const MARK: &str = "SECRET-";

fn token_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._~+/=-]{1,60}",
        "[ -~]{0,40}",
        any::<String>(),
        "[a-z]{0,5}(\r|\n|\r\n|\u{0}|\t|\u{7f}| )[a-z]{0,5}",
    ]
    .prop_map(|t| format!("{MARK}{t}"))
}

fn expires_in() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        (-10i64..100_000).prop_map(|n| Some(json!(n))),
        any::<f64>().prop_map(|f| Some(json!(f))),
        any::<u64>().prop_map(|n| Some(json!(n))),
        "[0-9]{1,6}".prop_map(|s| Some(json!(s))),
        prop_oneof![
            Just("NaN"),
            Just("inf"),
            Just("-inf"),
            Just("1e400"),
            Just("0.5"),
            Just(""),
            Just("600s")
        ]
        .prop_map(|s| Some(json!(s))),
        Just(Some(Value::Null)),
        Just(Some(json!(true))),
    ]
}

fn token_type() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(json!("Bearer"))),
        Just(Some(json!("bearer"))),
        Just(Some(json!("BEARER"))),
        Just(Some(json!("mac"))),
        Just(Some(json!("DPoP"))),
        Just(Some(json!(1))),
        Just(Some(Value::Null)),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes (with the mark in them): no panic, and an error never echoes them.
    #[test]
    fn token_parser_on_arbitrary_bytes(
        before in proptest::collection::vec(any::<u8>(), 0..60),
        after in proptest::collection::vec(any::<u8>(), 0..60),
    ) {
        let mut body = before;
        body.extend_from_slice(MARK.as_bytes());
        body.extend_from_slice(&after);
        if let Err(message) = parse_token_response(&body) {
            prop_assert!(!message.to_string().contains("SECRET"), "{message}");
        }
    }

    /// Token answers with arbitrary tokens, types and lifetimes: an accepted token becomes
    /// exactly `Bearer <token>`, sensitive, with no CR/LF/NUL (no header injection) and only
    /// visible ASCII in the token; a 1 s to 1 year lifetime; an error never echoes the token.
    #[test]
    fn token_parser_never_injects_or_leaks(
        token in token_text(),
        token_type in token_type(),
        expires_in in expires_in(),
        scope in proptest::option::of("[a-z:-]{0,30}"),
    ) {
        let mut object = Map::new();
        object.insert("access_token".into(), json!(token));
        if let Some(t) = &token_type {
            object.insert("token_type".into(), t.clone());
        }
        if let Some(e) = &expires_in {
            object.insert("expires_in".into(), e.clone());
        }
        if let Some(s) = scope {
            object.insert("scope".into(), json!(s));
        }
        let body = serde_json::to_vec(&Value::Object(object)).unwrap();
        match parse_token_response(&body) {
            Ok(parsed) => {
                let header = parsed.authorization.as_bytes();
                prop_assert!(!header.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
                let expected = format!("Bearer {token}");
                prop_assert_eq!(header, expected.as_bytes());
                prop_assert!(token.bytes().all(|b| b.is_ascii_graphic()), "{:?}", token);
                prop_assert!(parsed.authorization.is_sensitive());
                prop_assert!(parsed.expires_in.as_secs_f64() >= 1.0);
                prop_assert!(parsed.expires_in.as_secs() <= 365 * 86_400);
                let type_ok = token_type
                    .as_ref()
                    .is_none_or(|t| t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("bearer")));
                prop_assert!(type_ok);
            }
            Err(message) => {
                prop_assert!(!message.to_string().contains("SECRET"), "{message}");
            }
        }
    }

    /// A well-formed answer is accepted.
    #[test]
    fn a_well_formed_token_answer_is_accepted(
        token in "[A-Za-z0-9._~+/=-]{1,200}",
        lifetime in 1u64..100_000,
        as_string in any::<bool>(),
    ) {
        let expires_in = if as_string { json!(lifetime.to_string()) } else { json!(lifetime) };
        let body = serde_json::to_vec(&json!({
            "access_token": token, "token_type": "Bearer", "expires_in": expires_in
        }))
        .unwrap();
        let parsed = parse_token_response(&body).expect("accepted");
        let expected = format!("Bearer {token}");
        prop_assert_eq!(parsed.authorization.as_bytes(), expected.as_bytes());
        prop_assert_eq!(parsed.expires_in.as_secs(), lifetime);
    }

    /// Form encoding: only unreserved characters, `+` and `%XX` escapes come out, and decoding
    /// gives back the input exactly.
    #[test]
    fn form_encoding_round_trips(value in any::<String>()) {
        let encoded = form_encode(&value);
        prop_assert!(encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._*+%".contains(&b)));
        let mut decoded = Vec::new();
        let bytes = encoded.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => decoded.push(b' '),
                b'%' => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    decoded.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                b => decoded.push(b),
            }
            i += 1;
        }
        prop_assert_eq!(decoded, value.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// The consent route matcher

const PREFIX: &str = "/voicebiometrics/contacts/";
const SUFFIX: &str = "/consent";

fn any_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just("//".to_owned()),
        Just("voicebiometrics".to_owned()),
        Just("contacts".to_owned()),
        Just("consent".to_owned()),
        Just(PREFIX.to_owned()),
        Just(SUFFIX.to_owned()),
        any_segment(),
    ];
    prop_oneof![
        proptest::collection::vec(piece, 0..6).prop_map(|p| p.concat()),
        any_segment().prop_map(|s| format!("{PREFIX}{s}{SUFFIX}")),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any path: no panic; a match is exactly `PREFIX segment SUFFIX` with a non-empty segment
    /// free of `/`; and whatever gets through both the matcher and the contact rule forwards
    /// only safe characters.
    #[test]
    fn route_matcher_is_exact(path in any_path()) {
        match consent_path_segment(&path) {
            Some(segment) => {
                prop_assert!(!segment.is_empty() && !segment.contains('/'));
                prop_assert_eq!(format!("{PREFIX}{segment}{SUFFIX}"), path.clone());
                if let Some(id) = ContactId::from_path_segment(segment) {
                    prop_assert!(is_safe_upstream_segment(&id.to_path_segment()));
                }
            }
            None => {
                let inner = path
                    .strip_prefix(PREFIX)
                    .and_then(|rest| rest.strip_suffix(SUFFIX));
                prop_assert!(
                    inner.is_none_or(|s| s.is_empty() || s.contains('/')),
                    "{path:?} refused"
                );
            }
        }
    }

    /// Every non-empty segment without `/` is matched, and only the exact path is.
    #[test]
    fn route_matcher_finds_every_segment(
        segment in any_segment().prop_filter("one segment", |s| !s.is_empty() && !s.contains('/')),
        junk in prop_oneof![Just("/"), Just("//"), Just(" "), Just("x"), Just("/consent")],
        at_end in any::<bool>(),
    ) {
        let path = format!("{PREFIX}{segment}{SUFFIX}");
        prop_assert_eq!(consent_path_segment(&path), Some(segment.as_str()));
        let changed = if at_end { format!("{path}{junk}") } else { format!("{junk}{path}") };
        prop_assert_eq!(consent_path_segment(&changed), None, "{:?}", changed);
    }
}

#[test]
fn the_alphabet_is_what_the_rule_says() {
    // The hand-written oracle above agrees with the contract's examples.
    for ok in ["+15551234567", "%2B15551234567", "a", "9", "+", "A.b_c-d+"] {
        assert!(reference_contact_id(ok).is_some(), "{ok}");
        assert!(ContactId::from_path_segment(ok).is_some(), "{ok}");
    }
    for bad in [
        "", ".a", "_a", "-a", "a b", "%", "%2", "%zz", "%252B1", "a%2Fb",
    ] {
        assert!(reference_contact_id(bad).is_none(), "{bad}");
    }
    let alphabet: BTreeSet<char> = ('A'..='Z')
        .chain('a'..='z')
        .chain('0'..='9')
        .chain("+._-".chars())
        .collect();
    assert_eq!(alphabet.len(), 66);
}
