//! What a client presents to authenticate: the `Authorization` header (its scheme, Basic
//! credentials as API keys use them and as OAuth clients encode them) and the
//! `application/x-www-form-urlencoded` body of an OAuth token request.
//!
//! Decoding is strict: anything malformed is refused, never repaired, so two parsers can
//! never disagree on who is asking or for what.

use base64::Engine as _;
use http::{HeaderMap, HeaderValue};
use percent_encoding::percent_decode;

use crate::wire::body::media_type;

/// An `Authorization` header split into its scheme and credentials, both trimmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authorization<'a> {
    pub scheme: &'a str,
    /// Never empty.
    pub credentials: &'a str,
}

impl<'a> Authorization<'a> {
    /// Splits `Scheme credentials`. `None` when the value is not visible ASCII or has no
    /// credentials.
    pub fn parse(value: &'a HeaderValue) -> Option<Self> {
        let (scheme, credentials) = value.to_str().ok()?.trim().split_once(' ')?;
        // The value is trimmed, so what follows the first space ends in a visible character.
        Some(Authorization {
            scheme,
            credentials: credentials.trim(),
        })
    }

    /// Whether the scheme is `scheme` (schemes are case-insensitive).
    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }
}

/// The user id and password of `Authorization: Basic` credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    pub user_id: String,
    pub password: String,
}

impl BasicCredentials {
    /// Decodes Basic credentials as RFC 7617 has them: base64 of `user-id:password`, split
    /// at the first colon (so the password may hold colons, the user id may not).
    pub fn decode(credentials: &str) -> Option<Self> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user_id, password) = decoded.split_once(':')?;
        Some(BasicCredentials {
            user_id: user_id.to_owned(),
            password: password.to_owned(),
        })
    }

    /// These credentials as an OAuth client's (RFC 6749 §2.3.1): the client id and secret
    /// are each form-urlencoded before the Basic encoding, so either may hold a colon
    /// (`%3A`), and `+` is a space.
    pub fn form_decoded(&self) -> Option<Self> {
        Some(BasicCredentials {
            user_id: form_decode(&self.user_id)?,
            password: form_decode(&self.password)?,
        })
    }
}

/// Whether the request's `Content-Type` is `application/x-www-form-urlencoded` (parameters
/// such as `charset` allowed).
pub fn is_form_urlencoded(headers: &HeaderMap) -> bool {
    media_type(headers)
        .is_some_and(|essence| essence.eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}

/// The parameters of an `application/x-www-form-urlencoded` body, each present once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FormParams(Vec<(String, String)>);

/// Why a form body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("the body is not UTF-8")]
    NotUtf8,
    /// A `%` not followed by two hex digits, or escapes that do not decode to UTF-8.
    #[error("malformed form encoding")]
    Malformed,
    /// RFC 6749 §3.2: request parameters must not be included more than once.
    #[error("parameter '{0}' is repeated")]
    Repeated(String),
}

impl FormParams {
    /// Parses a form body: `+` is a space, `%XX` a byte, a name without `=` has an empty
    /// value. Refuses a body that is not UTF-8, a malformed escape, escapes that do not decode
    /// to UTF-8 (the `form_urlencoded` crate would repair all three silently) and a repeated
    /// parameter.
    pub fn parse(body: &[u8]) -> Result<Self, FormError> {
        let text = std::str::from_utf8(body).map_err(|_| FormError::NotUtf8)?;
        if !escapes_are_well_formed(text) {
            return Err(FormError::Malformed);
        }
        // Separators are ASCII, so the whole body decodes to UTF-8 exactly when every name
        // and value does: one check here and the crate's lossy decoding never replaces a byte.
        if percent_decode(body).decode_utf8().is_err() {
            return Err(FormError::Malformed);
        }
        let mut params: Vec<(String, String)> = Vec::new();
        for (name, value) in form_urlencoded::parse(body) {
            if params.iter().any(|(seen, _)| *seen == name) {
                return Err(FormError::Repeated(name.into_owned()));
            }
            params.push((name.into_owned(), value.into_owned()));
        }
        Ok(FormParams(params))
    }

    /// The value of parameter `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(param, _)| param == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Decodes one form-urlencoded name or value, refusing what [`FormParams::parse`] refuses.
fn form_decode(encoded: &str) -> Option<String> {
    if !escapes_are_well_formed(encoded) {
        return None;
    }
    let spaced = encoded.replace('+', " ");
    let decoded = percent_decode(spaced.as_bytes()).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

/// Whether every `%` starts a `%XX` escape (percent-decoding leaves malformed ones as they
/// are instead of refusing them).
fn escapes_are_well_formed(encoded: &str) -> bool {
    encoded.split('%').skip(1).all(|after_percent| {
        after_percent
            .as_bytes()
            .get(..2)
            .is_some_and(|digits| digits.iter().all(u8::is_ascii_hexdigit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    fn basic(user_pass: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    }

    fn oauth_client(credentials: &str) -> Option<BasicCredentials> {
        BasicCredentials::decode(credentials)?.form_decoded()
    }

    #[test]
    fn authorization_splits_scheme_and_credentials() {
        let value = HeaderValue::from_static("  bEaReR   abc.def  ");
        let authorization = Authorization::parse(&value).unwrap();
        assert!(authorization.is("Bearer"));
        assert!(!authorization.is("Basic"));
        assert_eq!(authorization.credentials, "abc.def");
        for malformed in ["Bearer", "Bearer   ", ""] {
            let value = HeaderValue::from_static(malformed);
            assert_eq!(Authorization::parse(&value), None, "{malformed:?}");
        }
        let not_ascii = HeaderValue::from_bytes(b"Basic \xff").unwrap();
        assert_eq!(Authorization::parse(&not_ascii), None);
    }

    #[test]
    fn basic_credentials_split_at_the_first_colon() {
        let decoded = BasicCredentials::decode(&basic("ops:key:with:colons")).unwrap();
        assert_eq!(decoded.user_id, "ops");
        assert_eq!(decoded.password, "key:with:colons");
        // Raw: no form decoding for API keys.
        let decoded = BasicCredentials::decode(&basic("a+b:c%2B")).unwrap();
        assert_eq!(
            (decoded.user_id.as_str(), decoded.password.as_str()),
            ("a+b", "c%2B")
        );
        let empty = BasicCredentials::decode(&basic(":")).unwrap();
        assert_eq!((empty.user_id.as_str(), empty.password.as_str()), ("", ""));
    }

    #[test]
    fn malformed_basic_credentials_are_refused() {
        let not_utf8 = base64::engine::general_purpose::STANDARD.encode(b"ops:\xff");
        for credentials in ["%%%", "b3Bz", &basic("no colon"), &not_utf8] {
            assert_eq!(BasicCredentials::decode(credentials), None, "{credentials}");
        }
    }

    #[test]
    fn oauth_client_credentials_are_form_decoded() {
        let decoded = oauth_client(&basic("sim+client:p%40ss%3Aw%25rd")).unwrap();
        assert_eq!(decoded.user_id, "sim client");
        assert_eq!(decoded.password, "p@ss:w%rd");
        let plus = oauth_client(&basic("a%2Bb:c")).unwrap();
        assert_eq!(plus.user_id, "a+b");
        for malformed in ["id:%zz", "id:%4", "%:secret", "id:%FF"] {
            assert_eq!(oauth_client(&basic(malformed)), None, "{malformed}");
        }
    }

    #[test]
    fn form_content_type_is_recognised_by_its_essence() {
        let mut headers = HeaderMap::new();
        assert!(!is_form_urlencoded(&headers));
        for (value, form) in [
            ("application/x-www-form-urlencoded", true),
            ("Application/X-WWW-Form-Urlencoded ; charset=UTF-8", true),
            ("application/json", false),
            ("application/x-www-form-urlencoded-not", false),
        ] {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_form_urlencoded(&headers), form, "{value}");
        }
    }

    #[test]
    fn form_params_are_decoded() {
        let form =
            FormParams::parse(b"grant_type=client_credentials&scope=a%3Ar+b&plus=%2B&&empty")
                .unwrap();
        assert_eq!(form.get("grant_type"), Some("client_credentials"));
        assert_eq!(form.get("scope"), Some("a:r b"));
        assert_eq!(form.get("plus"), Some("+"));
        assert_eq!(form.get("empty"), Some(""));
        assert_eq!(form.get("missing"), None);
        let unicode = FormParams::parse("name=caf%C3%A9&raw=café".as_bytes()).unwrap();
        assert_eq!(unicode.get("name"), Some("café"));
        assert_eq!(unicode.get("raw"), Some("café"));
        assert_eq!(FormParams::parse(b"").unwrap(), FormParams::default());
    }

    #[test]
    fn malformed_forms_are_refused() {
        for (body, error) in [
            (&b"a=%zz"[..], FormError::Malformed),
            (b"a=%4", FormError::Malformed),
            (b"a=100%", FormError::Malformed),
            (b"%%41=b", FormError::Malformed),
            (b"a=%FF", FormError::Malformed),
            // A character split across two parameters is not UTF-8 in either.
            (b"a=%C3&b=%A9", FormError::Malformed),
            (b"a=\xff", FormError::NotUtf8),
            (b"a=1&a=2", FormError::Repeated("a".to_owned())),
            // Repeated once decoded.
            (
                b"scope=x&sc%6Fpe=y",
                FormError::Repeated("scope".to_owned()),
            ),
        ] {
            assert_eq!(
                FormParams::parse(body),
                Err(error),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
