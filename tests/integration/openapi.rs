//! Keeps `docs/openapi.yaml` true.
//!
//! Drives an in-process proxy (with the in-process simulator behind it, see `support`) through
//! every answer it makes — each row of the contract's error table, the 200/201 paths, upstream's
//! passed-through answers and the admin routes — and checks each answer against the spec: the
//! path and method are documented (or the spec says what any other path or method answers),
//! the status is documented for that operation, the required headers are there with valid
//! values, the content type is a documented one and the body validates against the documented
//! schema, and a proxy-made error's `code` is one the spec lists for that status. Separately,
//! the spec's error codes are checked to be exactly `ProxyError::code()`'s, each under its
//! `ProxyError::status()`.
//!
//! Reading YAML: serde_yaml is not a dependency, so the spec is converted to JSON by Python's
//! PyYAML (`crate::support::yaml`); no interpreter with it is a test failure that says how to get one.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::support::calls::{basic, consent_path};
use crate::support::raw_http::read_raw_answer;
use crate::support::yaml::yaml_to_json;
use crate::support::*;
use bytes::Bytes;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::error::{FieldProblem, ProxyError};
use consent_proxy::simulator::{Fault, SimRoute};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::Value;

const SPEC_PATH: &str = "docs/openapi.yaml";
const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

// ---------------------------------------------------------------------------------------------
// The spec, as JSON

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    Consent,
    Admin,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Consent => "consent",
            Listener::Admin => "admin",
        }
    }
}

/// Who made an answer: the proxy itself, or upstream (passed through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Proxy,
    Upstream,
}

struct Spec {
    root: Value,
}

fn spec() -> &'static Spec {
    static SPEC: OnceLock<Spec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let root = yaml_to_json(&root_dir().join(SPEC_PATH));
        assert!(
            root["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.")),
            "not an OpenAPI 3 document"
        );
        Spec { root }
    })
}

impl Spec {
    /// Follows `$ref`s (local JSON pointers) to the object they name.
    fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
                return value;
            };
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local $refs are used: {reference}"));
            value = self
                .root
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {reference}"));
        }
        panic!("$ref chain too long");
    }

    /// Which listener a path item belongs to: the tag of its operations (`consent` and `oauth`
    /// are both on the consent listener).
    fn listener_of(&self, item: &Value) -> Listener {
        let tags: BTreeSet<&str> = HTTP_METHODS
            .iter()
            .filter_map(|m| item.get(*m))
            .flat_map(|op| op["tags"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        let consent = tags.contains("consent") || tags.contains("oauth");
        match (consent, tags.contains("admin")) {
            (true, false) => Listener::Consent,
            (false, true) => Listener::Admin,
            _ => panic!("a path item must be tagged consent/oauth or admin: {tags:?}"),
        }
    }

    /// The documented path (template and item) that `path` matches on `listener`.
    fn match_path(&self, listener: Listener, path: &str) -> Option<(&str, &Value)> {
        let paths = self.root["paths"].as_object().expect("paths");
        let segments: Vec<&str> = path.split('/').collect();
        paths
            .iter()
            .filter(|(_, item)| self.listener_of(item) == listener)
            .find(|(template, _)| {
                let parts: Vec<&str> = template.split('/').collect();
                parts.len() == segments.len()
                    && parts.iter().zip(&segments).all(|(part, segment)| {
                        if part.starts_with('{') && part.ends_with('}') {
                            !segment.is_empty()
                        } else {
                            part == segment
                        }
                    })
            })
            .map(|(template, item)| (template.as_str(), item))
    }

    /// The methods a path item documents, upper-case.
    fn methods_of(item: &Value) -> BTreeSet<String> {
        HTTP_METHODS
            .iter()
            .filter(|m| item.get(**m).is_some())
            .map(|m| m.to_ascii_uppercase())
            .collect()
    }

    /// The proxy-made error codes a schema allows: `properties.code.enum`, intersected through
    /// `allOf`, united through `anyOf`/`oneOf` over the branches that constrain `code` (a branch
    /// that leaves `code` free is upstream's passed-through error, not the proxy's).
    /// `None` when nothing constrains `code`.
    fn proxy_codes(&self, schema: &Value) -> Option<BTreeSet<String>> {
        let schema = self.resolve(schema);
        let mut allowed: Option<BTreeSet<String>> = schema
            .pointer("/properties/code/enum")
            .and_then(Value::as_array)
            .map(|e| {
                e.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            });
        for branch in schema["allOf"].as_array().into_iter().flatten() {
            if let Some(codes) = self.proxy_codes(branch) {
                allowed = Some(match allowed {
                    Some(a) => a.intersection(&codes).cloned().collect(),
                    None => codes,
                });
            }
        }
        let alternatives: Vec<&Value> = ["anyOf", "oneOf"]
            .iter()
            .flat_map(|k| schema[*k].as_array().into_iter().flatten())
            .collect();
        if !alternatives.is_empty() {
            let union: Option<BTreeSet<String>> = alternatives
                .iter()
                .filter_map(|b| self.proxy_codes(b))
                .reduce(|a, b| a.union(&b).cloned().collect());
            if let Some(union) = union {
                allowed = Some(match allowed {
                    Some(a) => a.intersection(&union).cloned().collect(),
                    None => union,
                });
            }
        }
        allowed
    }

    /// Every documented response as (where, status, response object).
    fn all_responses(&self) -> Vec<(String, String, &Value)> {
        let mut out = Vec::new();
        for (template, item) in self.root["paths"].as_object().expect("paths") {
            for method in HTTP_METHODS {
                if let Some(op) = item.get(method) {
                    for (status, response) in op["responses"].as_object().expect("responses") {
                        out.push((format!("{method} {template}"), status.clone(), response));
                    }
                }
            }
            if let Some(other) = item["x-unsupported-method-response"].as_object() {
                for (status, response) in other {
                    out.push((
                        format!("other methods on {template}"),
                        status.clone(),
                        response,
                    ));
                }
            }
        }
        for (listener, by_status) in self.root["x-unmatched-path-response"]
            .as_object()
            .expect("x-unmatched-path-response")
        {
            for (status, response) in by_status.as_object().expect("by status") {
                out.push((
                    format!("other paths on {listener}"),
                    status.clone(),
                    response,
                ));
            }
        }
        out
    }

    /// Validates `value` against `schema` (the JSON Schema subset the spec uses).
    fn validate(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        if value.is_null() && schema["nullable"] == Value::Bool(true) {
            return Ok(());
        }
        for branch in schema["allOf"].as_array().into_iter().flatten() {
            self.validate(branch, value, at)?;
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(branches) = schema[key].as_array() {
                let errors: Vec<String> = branches
                    .iter()
                    .filter_map(|b| self.validate(b, value, at).err())
                    .collect();
                let passed = branches.len() - errors.len();
                if passed == 0 || (key == "oneOf" && passed > 1) {
                    return Err(format!("{at}: {key} not satisfied: {errors:?}"));
                }
            }
        }
        if let Some(kind) = schema["type"].as_str() {
            let ok = match kind {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                "null" => value.is_null(),
                other => return Err(format!("{at}: unsupported type {other}")),
            };
            if !ok {
                return Err(format!("{at}: {value} is not of type {kind}"));
            }
        }
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(value) {
                return Err(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        if let (Some(s), Some(min)) = (value.as_str(), schema["minLength"].as_u64()) {
            if (s.chars().count() as u64) < min {
                return Err(format!("{at}: {value} shorter than {min}"));
            }
        }
        if let (Some(s), Some(max)) = (value.as_str(), schema["maxLength"].as_u64()) {
            if s.chars().count() as u64 > max {
                return Err(format!("{at}: {value} longer than {max}"));
            }
        }
        if let (Some(n), Some(min)) = (value.as_f64(), schema["minimum"].as_f64()) {
            if n < min {
                return Err(format!("{at}: {value} below {min}"));
            }
        }
        if let Some(object) = value.as_object() {
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap_or_default();
                if !object.contains_key(name) {
                    return Err(format!(
                        "{at}: required property '{name}' missing in {value}"
                    ));
                }
            }
            let properties = schema["properties"].as_object();
            for (name, property) in object {
                let at = format!("{at}.{name}");
                match properties.and_then(|p| p.get(name)) {
                    Some(property_schema) => self.validate(property_schema, property, &at)?,
                    None => match &schema["additionalProperties"] {
                        Value::Bool(false) => {
                            return Err(format!("{at}: property not allowed"));
                        }
                        extra @ Value::Object(_) => self.validate(extra, property, &at)?,
                        _ => {}
                    },
                }
            }
        }
        if let (Some(items), Some(item_schema)) = (value.as_array(), schema.get("items")) {
            for (i, item) in items.iter().enumerate() {
                self.validate(item_schema, item, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Checking one answer against the spec

/// One request and the answer the proxy gave.
struct Exchange<'a> {
    listener: Listener,
    method: &'a Method,
    path: &'a str,
    response: &'a TestResponse,
    origin: Origin,
}

impl Exchange<'_> {
    fn describe(&self) -> String {
        format!(
            "{} {} on the {} listener → {} {:?}\n  headers: {:?}\n  body: {}",
            self.method,
            self.path,
            self.listener.name(),
            self.response.status,
            self.origin,
            self.response.headers,
            String::from_utf8_lossy(&self.response.body)
        )
    }
}

/// Panics unless the answer is documented exactly as it was given.
fn assert_documented(exchange: &Exchange<'_>) {
    if let Err(problem) = check_documented(exchange) {
        panic!(
            "{SPEC_PATH} does not document this answer: {problem}\n{}",
            exchange.describe()
        );
    }
}

fn check_documented(ex: &Exchange<'_>) -> Result<(), String> {
    let spec = spec();
    let status = ex.response.status.to_string();
    let path = ex.path.split('?').next().unwrap_or_default();
    let method = ex.method.as_str().to_ascii_lowercase();
    let (place, response) = match spec.match_path(ex.listener, path) {
        Some((template, item)) => match item.get(method.as_str()) {
            Some(operation) => {
                let responses = &operation["responses"];
                let response = responses
                    .get(&status)
                    .or_else(|| responses.get("default"))
                    .ok_or_else(|| format!("{method} {template} has no {status} response"))?;
                (format!("{method} {template}"), response)
            }
            None => {
                let response = item["x-unsupported-method-response"]
                    .get(&status)
                    .ok_or_else(|| {
                        format!("{template} documents no {status} for other methods ({method})")
                    })?;
                // A 405's Allow header names exactly the documented methods.
                if ex.response.status == 405 {
                    let allow: BTreeSet<String> = ex
                        .response
                        .header("allow")
                        .ok_or("no Allow header")?
                        .split(',')
                        .map(|m| m.trim().to_owned())
                        .collect();
                    let documented = Spec::methods_of(item);
                    if allow != documented {
                        return Err(format!(
                            "Allow {allow:?} is not the documented methods {documented:?}"
                        ));
                    }
                }
                (format!("other methods on {template}"), response)
            }
        },
        None => {
            let response = spec.root["x-unmatched-path-response"][ex.listener.name()]
                .get(&status)
                .ok_or_else(|| {
                    format!(
                        "{path} matches no documented path and other paths on the {} listener \
                         are not documented to answer {status}",
                        ex.listener.name()
                    )
                })?;
            (format!("other paths on {}", ex.listener.name()), response)
        }
    };
    let response = spec.resolve(response);

    // Headers.
    for (name, header) in response["headers"].as_object().into_iter().flatten() {
        let header = spec.resolve(header);
        let name_lc = name.to_ascii_lowercase();
        match ex.response.headers.get(name_lc.as_str()) {
            None if header["required"] == Value::Bool(true) => {
                return Err(format!("{place} {status}: required header {name} missing"));
            }
            None => {}
            Some(value) => {
                let text = value
                    .to_str()
                    .map_err(|_| format!("header {name} is not ASCII"))?;
                let schema = &header["schema"];
                let as_json = match spec.resolve(schema)["type"].as_str() {
                    Some("integer") => Value::from(
                        text.parse::<i64>()
                            .map_err(|_| format!("header {name}: {text:?} is not an integer"))?,
                    ),
                    _ => Value::from(text),
                };
                spec.validate(schema, &as_json, &format!("header {name}"))?;
            }
        }
    }

    // Content type and body.
    match response["content"].as_object() {
        None => {
            if !ex.response.body.is_empty() {
                return Err(format!("{place} {status} is documented without a body"));
            }
        }
        Some(content) => {
            let content_type = ex
                .response
                .header("content-type")
                .ok_or_else(|| format!("{place} {status}: no Content-Type"))?;
            let essence = content_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            let media = content.get(&essence).ok_or_else(|| {
                format!(
                    "{place} {status}: Content-Type {content_type} is not one of {:?}",
                    content.keys().collect::<Vec<_>>()
                )
            })?;
            // A HEAD answer has the headers of the answer it stands for, and no body.
            let has_body = ex.method != Method::HEAD;
            if has_body && (essence == "application/json" || essence.ends_with("+json")) {
                let body: Value = serde_json::from_slice(&ex.response.body)
                    .map_err(|_| format!("{place} {status}: the body is not JSON"))?;
                spec.validate(&media["schema"], &body, "body")?;
                if ex.origin == Origin::Proxy {
                    if let Some(code) = body.get("code").and_then(Value::as_str) {
                        let codes = spec.proxy_codes(&media["schema"]).unwrap_or_default();
                        if !codes.contains(code) {
                            return Err(format!(
                                "{place} {status}: the proxy's code {code:?} is not among the \
                                 documented {codes:?}"
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Driving the proxy

async fn call(
    h: &Harness,
    from: &TestClient,
    listener: Listener,
    method: Method,
    path: &str,
    request: (&[(&str, &str)], Option<String>),
) -> TestResponse {
    let base = match listener {
        Listener::Consent => h.proxy.url(),
        Listener::Admin => h.proxy.admin_url(),
    };
    let (headers, body) = request;
    from.send(method, &format!("{base}{path}"), headers, body)
        .await
}

/// A request to send: `ask(listener, method, path)`, with `.headers(…)` and `.body(…)` when it
/// has them (and `.from(client)` to send it from another address), then
/// `.expect(h, status, origin)`.
struct Ask<'a> {
    listener: Listener,
    method: Method,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
    body: Option<&'a str>,
    /// `None`: the harness's own client.
    from: Option<&'a TestClient>,
}

fn ask(listener: Listener, method: Method, path: &str) -> Ask<'_> {
    Ask {
        listener,
        method,
        path,
        headers: &[],
        body: None,
        from: None,
    }
}

impl<'a> Ask<'a> {
    fn headers(self, headers: &'a [(&'a str, &'a str)]) -> Self {
        Ask { headers, ..self }
    }

    fn body(self, body: &'a str) -> Self {
        Ask {
            body: Some(body),
            ..self
        }
    }

    /// From another client, i.e. another source address: failed authentications are
    /// throttled per address, and some scenarios fail more than ten times.
    fn from(self, client: &'a TestClient) -> Self {
        Ask {
            from: Some(client),
            ..self
        }
    }

    /// Sends the request, asserts the status it must get, and that the answer is documented
    /// as coming from `origin`.
    async fn expect(self, h: &Harness, status: u16, origin: Origin) -> TestResponse {
        let response = call(
            h,
            self.from.unwrap_or(&h.http),
            self.listener,
            self.method.clone(),
            self.path,
            (self.headers, self.body.map(str::to_owned)),
        )
        .await;
        let exchange = Exchange {
            listener: self.listener,
            method: &self.method,
            path: self.path,
            response: &response,
            origin,
        };
        assert_eq!(
            response.status,
            status,
            "the scenario went wrong\n{}",
            exchange.describe()
        );
        assert_documented(&exchange);
        response
    }
}

const RW: (&str, &str) = ("x-api-key", RW_KEY);
const JSON: (&str, &str) = ("content-type", "application/json");

/// Sends raw bytes on a fresh connection; the answer parsed as a `TestResponse`
/// (the server closes the connection: `Connection: close`).
async fn raw_exchange(addr: SocketAddr, request: &[u8], hold_open: Duration) -> TestResponse {
    // One complete answer with a Content-Length is enough.
    let complete = |answer: &[u8]| {
        parse_raw(answer).is_some_and(|parsed| {
            parsed.body.len()
                >= parsed
                    .header("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(usize::MAX)
        })
    };
    let answer = read_raw_answer(addr, request, hold_open + Duration::from_secs(10), complete)
        .await
        .expect("no answer in time");
    parse_raw(&answer)
        .unwrap_or_else(|| panic!("not an HTTP answer: {:?}", String::from_utf8_lossy(&answer)))
}

fn parse_raw(answer: &[u8]) -> Option<TestResponse> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
            HeaderValue::from_str(value.trim()).ok()?,
        );
    }
    Some(TestResponse {
        status,
        headers,
        body: Bytes::copy_from_slice(&answer[split + 4..]),
    })
}

fn assert_raw_documented(listener: Listener, method: Method, path: &str, response: &TestResponse) {
    assert_documented(&Exchange {
        listener,
        method: &method,
        path,
        response,
        origin: Origin::Proxy,
    });
}

// ---------------------------------------------------------------------------------------------
// The spec against the proxy's error type

/// Every `ProxyError` variant. The `match` makes adding a variant a compile error here, so the
/// spec cannot silently miss a new code.
fn every_proxy_error() -> Vec<ProxyError> {
    let all = vec![
        ProxyError::InvalidContactId,
        ProxyError::InvalidBody {
            message: "m".into(),
            fields: vec![FieldProblem {
                name: "status".into(),
                description: "d".into(),
            }],
        },
        ProxyError::Unauthorized,
        ProxyError::MissingCredentials,
        ProxyError::TooManyAttempts {
            retry_after: std::time::Duration::from_secs(30),
        },
        ProxyError::InvalidToken("access token expired".into()),
        ProxyError::Forbidden("write"),
        ProxyError::ScopeLacks("write"),
        ProxyError::NotFound,
        ProxyError::MethodNotAllowed { allow: "GET, PUT" },
        ProxyError::PayloadTooLarge { limit: 4096 },
        ProxyError::UnsupportedMediaType,
        ProxyError::RequestTimeout,
        ProxyError::Upstream("x".into()),
        ProxyError::TokenUnavailable("x".into()),
        ProxyError::UpstreamTimeout,
        ProxyError::UpstreamUnavailable {
            reason: "circuit_open",
            retry_after: std::time::Duration::from_secs(1),
        },
        ProxyError::ClusterUnavailable("x".into()),
        ProxyError::AuditUnavailable("x".into()),
        ProxyError::AuditDisabled,
        ProxyError::Internal("x".into()),
    ];
    for error in &all {
        match error {
            ProxyError::InvalidContactId
            | ProxyError::InvalidBody { .. }
            | ProxyError::Unauthorized
            | ProxyError::MissingCredentials
            | ProxyError::TooManyAttempts { .. }
            | ProxyError::InvalidToken(_)
            | ProxyError::Forbidden(_)
            | ProxyError::ScopeLacks(_)
            | ProxyError::NotFound
            | ProxyError::MethodNotAllowed { .. }
            | ProxyError::PayloadTooLarge { .. }
            | ProxyError::UnsupportedMediaType
            | ProxyError::RequestTimeout
            | ProxyError::Upstream(_)
            | ProxyError::TokenUnavailable(_)
            | ProxyError::UpstreamTimeout
            | ProxyError::UpstreamUnavailable { .. }
            | ProxyError::ClusterUnavailable(_)
            | ProxyError::AuditUnavailable(_)
            | ProxyError::AuditDisabled
            | ProxyError::Internal(_) => {}
        }
    }
    all
}

#[test]
fn the_specs_error_codes_are_exactly_the_proxys() {
    let spec = spec();
    let errors = every_proxy_error();
    let proxy_codes: BTreeSet<String> = errors.iter().map(|e| e.code().to_owned()).collect();

    // The base error schema lists every code, and nothing else.
    let base: BTreeSet<String> = spec
        .proxy_codes(&spec.root["components"]["schemas"]["ProxyError"])
        .expect("ProxyError.code has an enum");
    assert_eq!(base, proxy_codes, "components.schemas.ProxyError code enum");

    // Each code is documented under its own status somewhere, and no code under another status.
    let mut documented: BTreeSet<(String, String)> = BTreeSet::new();
    for (place, status, response) in spec.all_responses() {
        let response = spec.resolve(response);
        for media in response["content"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|c| c.1)
        {
            for code in spec.proxy_codes(&media["schema"]).unwrap_or_default() {
                let error = errors
                    .iter()
                    .find(|e| e.code() == code)
                    .unwrap_or_else(|| panic!("{place} {status}: {code} is not a proxy code"));
                assert_eq!(
                    error.status().as_str(),
                    status,
                    "{place}: code {code} documented under the wrong status"
                );
                documented.insert((status.clone(), code));
            }
        }
    }
    for error in &errors {
        let key = (error.status().as_str().to_owned(), error.code().to_owned());
        assert!(
            documented.contains(&key),
            "{} {} is documented nowhere",
            key.0,
            key.1
        );
    }
}

#[tokio::test]
async fn every_error_renders_as_documented_somewhere() {
    // Each variant's own rendering (body shape, headers) against the response documented for its
    // status and code, wherever that is.
    let spec = spec();
    for error in every_proxy_error() {
        let code = error.code();
        let status = error.status().as_str().to_owned();
        let response = error.into_response();
        let (parts, body) = response.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        let value: Value = serde_json::from_slice(&body).unwrap();
        let mut matched = false;
        for (place, documented_status, documented) in spec.all_responses() {
            let documented = spec.resolve(documented);
            if documented_status != status {
                continue;
            }
            let Some(schema) = documented.pointer("/content/application~1json/schema") else {
                continue;
            };
            if !spec.proxy_codes(schema).unwrap_or_default().contains(code) {
                continue;
            }
            spec.validate(schema, &value, "body")
                .unwrap_or_else(|e| panic!("{place} {status} ({code}): {e}"));
            for (name, header) in documented["headers"].as_object().into_iter().flatten() {
                let header = spec.resolve(header);
                // x-request-id is added by the HTTP layer, not by the error itself.
                if header["required"] == Value::Bool(true) && name != "x-request-id" {
                    assert!(
                        parts
                            .headers
                            .contains_key(name.to_ascii_lowercase().as_str()),
                        "{place} {status} ({code}): {name} missing"
                    );
                }
            }
            matched = true;
        }
        assert!(matched, "{status} {code} documented nowhere");
    }
}

// ---------------------------------------------------------------------------------------------
// The consent listener

#[tokio::test]
async fn consent_successes_are_documented() {
    use Listener::Consent as C;
    use Origin::Upstream as U;
    let h = Harness::start().await;
    h.sim.set_status("+15552000001", ConsentStatus::Consented);
    h.wait_ready().await;

    // GET 200: a miss, then a hit (with `age`), in both spellings of `+`, with a query string.
    let miss = ask(C, Method::GET, &consent_path("%2B15552000001"))
        .headers(&[RW])
        .expect(&h, 200, U)
        .await;
    assert_eq!(miss.header("x-cache-status"), Some("MISS"));
    let hit = ask(C, Method::GET, &consent_path("+15552000001"))
        .headers(&[RW])
        .expect(&h, 200, U)
        .await;
    assert_eq!(hit.header("x-cache-status"), Some("HIT"));
    ask(
        C,
        Method::GET,
        &format!("{}?x=1", consent_path("+15552000001")),
    )
    .headers(&[RW])
    .expect(&h, 200, U)
    .await;
    // The caller's request id is echoed.
    let echoed = ask(C, Method::GET, &consent_path("+15552000001"))
        .headers(&[RW, ("x-request-id", "abc-123")])
        .expect(&h, 200, U)
        .await;
    assert_eq!(echoed.header("x-request-id"), Some("abc-123"));

    // The three credential forms.
    let bearer = format!("Bearer {RW_KEY}");
    let basic_rw = basic("rw", RW_KEY);
    for auth in [bearer.as_str(), basic_rw.as_str()] {
        ask(C, Method::GET, &consent_path("+15552000001"))
            .headers(&[("authorization", auth)])
            .expect(&h, 200, U)
            .await;
    }

    // GET of an unknown contact: upstream's 404, passed through (and then from the cache).
    let unknown = ask(C, Method::GET, &consent_path("+15552000002"))
        .headers(&[RW])
        .expect(&h, 404, U)
        .await;
    assert_eq!(unknown.header("x-cache-status"), Some("MISS"));
    let unknown = ask(C, Method::GET, &consent_path("+15552000002"))
        .headers(&[RW])
        .expect(&h, 404, U)
        .await;
    assert_eq!(unknown.header("x-cache-status"), Some("HIT"));

    // PUT: 201 creates, 200 updates; each status; JSON content types.
    for (i, status) in ConsentStatus::ALL.into_iter().enumerate() {
        let contact = format!("+1555200010{i}");
        let body = format!(r#"{{"status":"{status}"}}"#);
        ask(C, Method::PUT, &consent_path(&contact))
            .headers(&[RW, JSON])
            .body(&body)
            .expect(&h, 201, U)
            .await;
        ask(C, Method::PUT, &consent_path(&contact))
            .headers(&[RW, ("content-type", "application/json; charset=utf-8")])
            .body(&body)
            .expect(&h, 200, U)
            .await;
        ask(C, Method::PUT, &consent_path(&contact))
            .headers(&[RW])
            .body(&body)
            .expect(&h, 200, U)
            .await;
        let read = ask(C, Method::GET, &consent_path(&contact))
            .headers(&[RW])
            .expect(&h, 200, U)
            .await;
        assert_eq!(read.status_field(), status.as_str());
    }
}

/// STALE answers (`cache.stale_if_error_s`): a 200 and a cached 404, with `age` and `warning`.
#[tokio::test]
async fn stale_answers_are_documented() {
    use Listener::Consent as C;
    use Origin::Upstream as U;
    let h = Harness::start_with(|c| {
        c.set("cache.ttl_s", "1")
            .set("cache.not_found_ttl_s", "1")
            .set("cache.stale_if_error_s", "30")
            .set("talkdesk.max_retries", "0");
    })
    .await;
    h.sim.set_status("+15552000301", ConsentStatus::Refused);
    h.wait_ready().await;
    let get = |contact: &str, status: u16| {
        let path = consent_path(contact);
        let h = &h;
        async move {
            ask(C, Method::GET, &path)
                .headers(&[RW])
                .expect(h, status, U)
                .await
        }
    };
    let cached = [("+15552000301", 200), ("+15552000302", 404)];
    for (contact, status) in cached {
        get(contact, status).await;
    }
    // The TTLs pass, then upstream fails.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.sim.inject(SimRoute::Get, Fault::Status500, u32::MAX);
    for (contact, status) in cached {
        let stale = get(contact, status).await;
        assert_eq!(stale.header("x-cache-status"), Some("STALE"));
        assert!(stale.header("warning").is_some() && stale.header("age").is_some());
    }
}

#[tokio::test]
async fn consent_errors_made_by_the_proxy_are_documented() {
    use Listener::Consent as C;
    use Origin::Proxy as P;
    let h = Harness::start_with(|c| {
        c.set("server.max_body_bytes", "256")
            .set("server.max_header_bytes", "2048");
    })
    .await;
    let ok = consent_path("+15552100001");

    // 400 invalid_contact_id, both methods.
    let too_long = "9".repeat(65);
    for contact in [
        ".abc",
        "-1",
        "_1",
        "a%2Fb",
        "a%20b",
        "%zz",
        "%C3%A9",
        "%252B1",
        too_long.as_str(),
    ] {
        let r = ask(C, Method::GET, &consent_path(contact))
            .headers(&[RW])
            .expect(&h, 400, P)
            .await;
        assert_eq!(r.code(), "invalid_contact_id", "{contact}");
        let r = ask(C, Method::PUT, &consent_path(contact))
            .headers(&[RW, JSON])
            .body(r#"{"status":"REFUSED"}"#)
            .expect(&h, 400, P)
            .await;
        assert_eq!(r.code(), "invalid_contact_id", "{contact}");
    }

    // 400 invalid_body, with `fields` naming the culprit where there is one.
    for body in [
        "",
        "nope",
        "[]",
        "\"CONSENTED\"",
        "{}",
        r#"{"status":"MAYBE"}"#,
        r#"{"status":1}"#,
        r#"{"status":null}"#,
        r#"{"status":"REFUSED","x":1}"#,
    ] {
        let r = ask(C, Method::PUT, &ok)
            .headers(&[RW, JSON])
            .body(body)
            .expect(&h, 400, P)
            .await;
        assert_eq!(r.code(), "invalid_body", "{body}");
    }
    let extra = ask(C, Method::PUT, &ok)
        .headers(&[RW, JSON])
        .body(r#"{"status":"REFUSED","extra":true}"#)
        .expect(&h, 400, P)
        .await;
    assert_eq!(extra.json()["fields"][0]["name"], "extra");

    // 401: none, wrong, malformed; WWW-Authenticate is required by the spec. Each from its own
    // address: together they are more failures than one address may make in a minute.
    let wrong_basic = basic("ops", RW_KEY);
    for (i, headers) in [
        vec![],
        vec![("x-api-key", "wrong-key-0123456789")],
        vec![("authorization", "Bearer wrong-key-0123456789")],
        vec![("authorization", wrong_basic.as_str())],
        vec![("authorization", "Basic %%%")],
        vec![("authorization", "Token abc")],
    ]
    .into_iter()
    .enumerate()
    {
        let from = TestClient::from_address(Ipv4Addr::new(127, 0, 2, i as u8 + 1).into());
        let mut put_headers = headers.clone();
        put_headers.push(JSON);
        ask(C, Method::GET, &ok)
            .headers(&headers)
            .from(&from)
            .expect(&h, 401, P)
            .await;
        ask(C, Method::PUT, &ok)
            .from(&from)
            .headers(&put_headers)
            .body(r#"{"status":"REFUSED"}"#)
            .expect(&h, 401, P)
            .await;
    }

    // 403: a read-only key writing.
    let r = ask(C, Method::PUT, &ok)
        .headers(&[("x-api-key", READER_KEY), JSON])
        .body(r#"{"status":"REFUSED"}"#)
        .expect(&h, 403, P)
        .await;
    assert_eq!(r.code(), "forbidden");

    // 404 not_found: any other path, any method.
    for path in [
        "/",
        "/voicebiometrics/contacts//consent",
        "/voicebiometrics/contacts/+1555/consent/",
        "//voicebiometrics/contacts/+1555/consent",
        "/voicebiometrics/contacts/a/b/consent",
        "/voicebiometrics/contacts/+1555/enrollment",
        "/metrics",
    ] {
        for method in [Method::GET, Method::PUT, Method::POST] {
            let r = ask(C, method, path).headers(&[RW]).expect(&h, 404, P).await;
            assert_eq!(r.code(), "not_found");
        }
    }

    // 405 with Allow: other methods on a consent path.
    for method in [
        Method::POST,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::HEAD,
    ] {
        ask(C, method, &ok).headers(&[RW]).expect(&h, 405, P).await;
    }

    // 413: over max_body_bytes (256 here), with Content-Length.
    let big = format!(r#"{{"status":"REFUSED","pad":"{}"}}"#, "x".repeat(300));
    let r = ask(C, Method::PUT, &ok)
        .headers(&[RW, JSON])
        .body(&big)
        .expect(&h, 413, P)
        .await;
    assert_eq!(r.code(), "payload_too_large");

    // 415: a declared non-JSON body.
    let r = ask(C, Method::PUT, &ok)
        .headers(&[RW, ("content-type", "text/plain")])
        .body(r#"{"status":"REFUSED"}"#)
        .expect(&h, 415, P)
        .await;
    assert_eq!(r.code(), "unsupported_media_type");

    // 431: headers over max_header_bytes (2048 here), answered by the HTTP layer...
    let pad = "y".repeat(2100);
    ask(C, Method::GET, &ok)
        .headers(&[RW, ("x-padding", &pad)])
        .expect(&h, 431, P)
        .await;
    // The size is checked first, on any path and method.
    ask(C, Method::GET, "/nope")
        .headers(&[("x-padding", &pad)])
        .expect(&h, 431, P)
        .await;
    ask(C, Method::POST, &ok)
        .headers(&[("x-padding", &pad)])
        .expect(&h, 431, P)
        .await;
    // ...and far over, by hyper itself (no x-request-id then; the spec does not require it).
    let huge = "w".repeat(64 * 1024);
    let request = format!(
        "GET {ok} HTTP/1.1\r\nHost: proxy\r\nX-API-Key: {RW_KEY}\r\nX-Huge: {huge}\r\nConnection: close\r\n\r\n"
    );
    let r = raw_exchange(h.proxy.listen_addr, request.as_bytes(), Duration::ZERO).await;
    assert_eq!(r.status, 431);
    assert_raw_documented(C, Method::GET, &ok, &r);

    assert_eq!(
        h.sim.stats().gets + h.sim.stats().puts,
        0,
        "upstream was called"
    );
}

#[tokio::test]
async fn upstream_answers_passed_through_are_documented() {
    use Listener::Consent as C;
    use Origin::{Proxy as P, Upstream as U};
    let h = Harness::start_with(|c| {
        c.set("talkdesk.max_retries", "0")
            .set("cache.enabled", "false");
    })
    .await;
    h.wait_ready().await;
    let body = r#"{"status":"REFUSED"}"#;
    // With the cache off, a GET says BYPASS.
    h.sim.set_status("+15552200099", ConsentStatus::Deleted);
    let r = ask(C, Method::GET, &consent_path("+15552200099"))
        .headers(&[RW])
        .expect(&h, 200, U)
        .await;
    assert_eq!(r.header("x-cache-status"), Some("BYPASS"));
    let talkdesk_error = |status: u16, code: &str| Fault::Respond {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(format!(
            r#"{{"code":"{code}","message":"upstream says no","description":"d","fields":[{{"name":"contact_id","description":"bad"}}]}}"#
        )),
    };
    // Upstream's own 400/403/404/409, on both routes.
    for (i, (status, code)) in [
        (400, "bad_request"),
        (403, "forbidden"),
        (404, "not_found"),
        (409, "conflict"),
    ]
    .into_iter()
    .enumerate()
    {
        let contact = format!("+1555220000{i}");
        h.sim.inject(SimRoute::Get, talkdesk_error(status, code), 1);
        ask(C, Method::GET, &consent_path(&contact))
            .headers(&[RW])
            .expect(&h, status, U)
            .await;
        h.sim.inject(SimRoute::Put, talkdesk_error(status, code), 1);
        ask(C, Method::PUT, &consent_path(&contact))
            .headers(&[RW, JSON])
            .body(body)
            .expect(&h, status, U)
            .await;
    }
    // 502 upstream_error: a reset, a 5xx, an unusable 200, a 401 even after a renewal.
    for fault in [
        Fault::CloseConnection,
        Fault::Status500,
        Fault::Respond {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(b"<html>surprise</html>"),
        },
    ] {
        h.sim.inject(SimRoute::Get, fault.clone(), 1);
        let r = ask(C, Method::GET, &consent_path("+15552200020"))
            .headers(&[RW])
            .expect(&h, 502, P)
            .await;
        assert_eq!(r.code(), "upstream_error");
        if fault != Fault::CloseConnection && !matches!(fault, Fault::Respond { .. }) {
            h.sim.inject(SimRoute::Put, fault, 1);
            ask(C, Method::PUT, &consent_path("+15552200020"))
                .headers(&[RW, JSON])
                .body(body)
                .expect(&h, 502, P)
                .await;
        }
    }
    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 2);
    ask(C, Method::GET, &consent_path("+15552200021"))
        .headers(&[RW])
        .expect(&h, 502, P)
        .await;
    // 429 with Retry-After once the retries are spent (last: it holds off all upstream traffic).
    h.sim.inject(
        SimRoute::Get,
        Fault::TooManyRequests { retry_after_s: 7 },
        1,
    );
    let r = ask(C, Method::GET, &consent_path("+15552200010"))
        .headers(&[RW])
        .expect(&h, 429, U)
        .await;
    assert_eq!(r.header("retry-after"), Some("7"));
    // Until upstream's Retry-After has passed, nothing is sent: 503 upstream_unavailable
    // with the time left.
    let puts_before = h.sim.stats().puts;
    let r = ask(C, Method::PUT, &consent_path("+15552200010"))
        .headers(&[RW, JSON])
        .body(body)
        .expect(&h, 503, P)
        .await;
    assert_eq!(r.code(), "upstream_unavailable");
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=7).contains(&wait), "Retry-After {wait}");
    assert_eq!(h.sim.stats().puts, puts_before, "nothing reached upstream");
}

#[tokio::test]
async fn timeouts_are_documented() {
    use Listener::Consent as C;
    use Origin::Proxy as P;
    let h = Harness::start_with(|c| {
        c.set("server.request_timeout_ms", "700")
            .set("talkdesk.timeout_ms", "5000");
    })
    .await;
    h.wait_ready().await;
    // 504 upstream_timeout: upstream slower than the request's deadline.
    h.sim
        .inject(SimRoute::Get, Fault::Delay(Duration::from_secs(3)), 1);
    let r = ask(C, Method::GET, &consent_path("+15552300001"))
        .headers(&[RW])
        .expect(&h, 504, P)
        .await;
    assert_eq!(r.code(), "upstream_timeout");
    h.sim
        .inject(SimRoute::Put, Fault::Delay(Duration::from_secs(3)), 1);
    ask(C, Method::PUT, &consent_path("+15552300001"))
        .headers(&[RW, JSON])
        .body(r#"{"status":"REFUSED"}"#)
        .expect(&h, 504, P)
        .await;

    // A body that never arrives: the caller's fault, documented as 408 request_timeout.
    let path = consent_path("+15552300002");
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: proxy\r\nX-API-Key: {RW_KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: 20\r\nConnection: close\r\n\r\n{{\"sta"
    );
    let r = raw_exchange(
        h.proxy.listen_addr,
        request.as_bytes(),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(r.status, 408, "{:?}", String::from_utf8_lossy(&r.body));
    assert_raw_documented(C, Method::PUT, &path, &r);
}

#[tokio::test]
async fn token_unavailable_and_not_ready_are_documented() {
    use Listener::{Admin as A, Consent as C};
    use Origin::Proxy as P;
    let h = Harness::start_with(|c| {
        c.set_str("talkdesk.client_secret", "not-the-sim-secret");
    })
    .await;
    let r = ask(C, Method::GET, &consent_path("+15552400001"))
        .headers(&[RW])
        .expect(&h, 503, P)
        .await;
    assert_eq!(r.code(), "token_unavailable");
    ask(C, Method::PUT, &consent_path("+15552400001"))
        .headers(&[RW, JSON])
        .body(r#"{"status":"REFUSED"}"#)
        .expect(&h, 503, P)
        .await;
    ask(A, Method::GET, "/readyz").expect(&h, 503, P).await;
}

/// Cluster mode with a Redis that cannot be reached: a PUT is refused with
/// `cluster_unavailable` (the default `write_policy = "require"`), a GET is answered from
/// upstream (`BYPASS`), and `/readyz` stays 200 with the feed's state.
#[tokio::test]
async fn cluster_unavailable_and_a_feed_that_is_down_are_documented() {
    use Listener::{Admin as A, Consent as C};
    use Origin::Proxy as P;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let h = Harness::start_with(|c| {
        c.clustered(&format!("redis://127.0.0.1:{closed}"));
    })
    .await;
    h.sim.set_status("+15552500001", ConsentStatus::Consented);
    h.wait_ready().await;
    let r = ask(C, Method::PUT, &consent_path("+15552500001"))
        .headers(&[RW, JSON])
        .body(r#"{"status":"REFUSED"}"#)
        .expect(&h, 503, P)
        .await;
    assert_eq!(r.code(), "cluster_unavailable");
    assert_eq!(h.sim.puts_for("+15552500001"), 0, "upstream is not called");
    let r = ask(C, Method::GET, &consent_path("+15552500001"))
        .headers(&[RW])
        .expect(&h, 200, Origin::Upstream)
        .await;
    assert_eq!(r.header("x-cache-status"), Some("BYPASS"));
    let ready = ask(A, Method::GET, "/readyz").expect(&h, 200, P).await;
    assert_eq!(ready.json()["cluster"]["feed"], "down", "{}", ready.text());
}

// ---------------------------------------------------------------------------------------------
// The token endpoint, and its tokens on the consent routes

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

#[tokio::test]
async fn token_endpoint_answers_are_documented() {
    use Listener::Consent as C;
    use Origin::{Proxy as P, Upstream as U};
    let h = Harness::start_with(|c| {
        c.set("server.max_body_bytes", "256")
            .set("server.max_header_bytes", "2048");
    })
    .await;
    h.sim.set_status("+15552600001", ConsentStatus::Consented);
    h.wait_ready().await;
    let token_path = "/oauth/token";
    let rw_basic = basic("rw", RW_KEY);
    let grant = "grant_type=client_credentials";

    // 200, both client authentication methods, with and without a scope.
    let issued = ask(C, Method::POST, token_path)
        .headers(&[("authorization", &rw_basic), FORM])
        .body(grant)
        .expect(&h, 200, P)
        .await;
    assert_eq!(issued.header("cache-control"), Some("no-store"));
    let token = issued.json()["access_token"].as_str().unwrap().to_owned();
    let post = format!(
        "{grant}&client_id=reader&client_secret={READER_KEY}&scope=voicebiometrics-consent%3Aread"
    );
    let read_token = ask(C, Method::POST, token_path)
        .headers(&[FORM])
        .body(&post)
        .expect(&h, 200, P)
        .await;
    let read_token = read_token.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();

    // 400: every invalid_request, unsupported_grant_type and invalid_scope case.
    let both = format!("{grant}&client_id=rw&client_secret={RW_KEY}");
    for (headers, body, error) in [
        (
            vec![("authorization", rw_basic.as_str()), FORM],
            "",
            "invalid_request",
        ),
        (
            vec![("authorization", rw_basic.as_str()), FORM],
            "grant_type=password",
            "unsupported_grant_type",
        ),
        (
            vec![("authorization", rw_basic.as_str()), FORM],
            &both,
            "invalid_request",
        ),
        (
            vec![("authorization", rw_basic.as_str()), JSON],
            grant,
            "invalid_request",
        ),
        (
            vec![("authorization", rw_basic.as_str())],
            grant,
            "invalid_request",
        ),
        (
            vec![("authorization", rw_basic.as_str()), FORM],
            "grant_type=client_credentials&grant_type=client_credentials",
            "invalid_request",
        ),
        (
            vec![("authorization", rw_basic.as_str()), FORM],
            "grant_type=client_credentials&scope=admin",
            "invalid_scope",
        ),
    ] {
        let r = ask(C, Method::POST, token_path)
            .headers(&headers)
            .body(body)
            .expect(&h, 400, P)
            .await;
        assert_eq!(r.json()["error"], error, "{headers:?} {body}");
    }
    let reader_basic = basic("reader", READER_KEY);
    let r = ask(C, Method::POST, token_path)
        .headers(&[("authorization", &reader_basic), FORM])
        .body("grant_type=client_credentials&scope=voicebiometrics-consent%3Awrite")
        .expect(&h, 400, P)
        .await;
    assert_eq!(r.json()["error"], "invalid_scope");

    // 401 invalid_client: none, wrong, unknown, malformed (from an address of their own: with
    // the five below they make the ten failures that throttle it, and the tokens must still
    // work from this test's usual address afterwards).
    let guesser = TestClient::from_address(Ipv4Addr::new(127, 0, 3, 1).into());
    let wrong = basic("rw", "wrong-key-0123456789");
    let unknown = basic("nobody", RW_KEY);
    for headers in [
        vec![FORM],
        vec![("authorization", wrong.as_str()), FORM],
        vec![("authorization", unknown.as_str()), FORM],
        vec![("authorization", "Basic %%%"), FORM],
        vec![("authorization", "Bearer abc"), FORM],
    ] {
        let r = ask(C, Method::POST, token_path)
            .headers(&headers)
            .body(grant)
            .from(&guesser)
            .expect(&h, 401, P)
            .await;
        assert_eq!(r.json()["error"], "invalid_client");
    }

    // 405 with Allow: POST; 413; 431.
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        ask(C, method, token_path).expect(&h, 405, P).await;
    }
    let big = format!("{grant}&scope={}", "x".repeat(300));
    let r = ask(C, Method::POST, token_path)
        .headers(&[("authorization", &rw_basic), FORM])
        .body(&big)
        .expect(&h, 413, P)
        .await;
    assert_eq!(r.code(), "payload_too_large");
    let pad = "y".repeat(2100);
    ask(C, Method::POST, token_path)
        .headers(&[("x-padding", &pad)])
        .expect(&h, 431, P)
        .await;

    // 429 with Retry-After: five more failures make ten; the eleventh attempt is throttled.
    for _ in 0..5 {
        ask(C, Method::POST, token_path)
            .headers(&[("authorization", &wrong), FORM])
            .body(grant)
            .from(&guesser)
            .expect(&h, 401, P)
            .await;
    }
    let r = ask(C, Method::POST, token_path)
        .headers(&[("authorization", &rw_basic), FORM])
        .body(grant)
        .from(&guesser)
        .expect(&h, 429, P)
        .await;
    assert_eq!(r.json()["error"], "temporarily_unavailable");

    // The tokens on the consent routes: 200, 201, 403 (a read token writing) and 401 with the
    // Bearer challenge for a token that is not one.
    let bearer = format!("Bearer {token}");
    let read_bearer = format!("Bearer {read_token}");
    let path = consent_path("+15552600001");
    ask(C, Method::GET, &path)
        .headers(&[("authorization", &bearer)])
        .expect(&h, 200, U)
        .await;
    ask(C, Method::PUT, &consent_path("+15552600002"))
        .headers(&[("authorization", &bearer), JSON])
        .body(r#"{"status":"REFUSED"}"#)
        .expect(&h, 201, U)
        .await;
    let r = ask(C, Method::PUT, &path)
        .headers(&[("authorization", &read_bearer), JSON])
        .body(r#"{"status":"REFUSED"}"#)
        .expect(&h, 403, P)
        .await;
    assert_eq!(r.code(), "forbidden");
    let tampered = format!("{bearer}x");
    for method in [Method::GET, Method::PUT] {
        let r = ask(C, method, &path)
            .headers(&[("authorization", &tampered), JSON])
            .body(r#"{"status":"REFUSED"}"#)
            .expect(&h, 401, P)
            .await;
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="consent-proxy", error="invalid_token""#)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The admin listener

#[tokio::test]
async fn admin_answers_are_documented() {
    use Listener::Admin as A;
    use Origin::Proxy as P;
    let h = Harness::start().await;
    h.wait_ready().await;
    let metrics = ask(A, Method::GET, "/metrics").expect(&h, 200, P).await;
    assert!(metrics.text().contains("consent_proxy_"));
    ask(A, Method::GET, "/healthz").expect(&h, 200, P).await;
    ask(A, Method::GET, "/readyz").expect(&h, 200, P).await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            ask(A, method, path).expect(&h, 405, P).await;
        }
    }

    // The purge: 204 in each credential form, 400, 401, 403, 404, 405.
    let admin = [("x-api-key", ADMIN_KEY)];
    let bearer = format!("Bearer {ADMIN_KEY}");
    let basic_ops = basic("ops", ADMIN_KEY);
    ask(A, Method::DELETE, "/admin/cache/+15552500001")
        .headers(&admin)
        .expect(&h, 204, P)
        .await;
    ask(A, Method::DELETE, "/admin/cache/%2B15552500001")
        .headers(&[("authorization", &bearer)])
        .expect(&h, 204, P)
        .await;
    ask(A, Method::DELETE, "/admin/cache/abc")
        .headers(&[("authorization", &basic_ops)])
        .expect(&h, 204, P)
        .await;
    let r = ask(A, Method::DELETE, "/admin/cache/.bad")
        .headers(&admin)
        .expect(&h, 400, P)
        .await;
    assert_eq!(r.code(), "invalid_contact_id");
    ask(A, Method::DELETE, "/admin/cache/+15552500001")
        .expect(&h, 401, P)
        .await;
    ask(A, Method::DELETE, "/admin/cache/+15552500001")
        .headers(&[("x-api-key", "wrong-key-0123456789")])
        .expect(&h, 401, P)
        .await;
    ask(A, Method::DELETE, "/admin/cache/+15552500001")
        .headers(&[RW])
        .expect(&h, 403, P)
        .await;
    for method in [Method::GET, Method::PUT, Method::POST] {
        ask(A, method, "/admin/cache/+15552500001")
            .headers(&admin)
            .expect(&h, 405, P)
            .await;
    }
    for path in [
        "/",
        "/nope",
        "/metrics/",
        "/admin/cache/",
        "/admin/cache/a/b",
        "/admin",
        "/voicebiometrics/contacts/+1555/consent",
    ] {
        ask(A, Method::DELETE, path)
            .headers(&admin)
            .expect(&h, 404, P)
            .await;
        ask(A, Method::GET, path)
            .headers(&admin)
            .expect(&h, 404, P)
            .await;
    }
}

#[tokio::test]
async fn audit_answers_are_documented() {
    use crate::support::audit::AuditDir;
    use Listener::{Admin as A, Consent as C};
    use Origin::Proxy as P;
    let dir = AuditDir::new();
    let h = Harness::start_with(|c| {
        dir.sqlite(c, "require");
    })
    .await;
    h.wait_ready().await;
    ask(A, Method::GET, "/readyz").expect(&h, 200, P).await;
    let path = "/voicebiometrics/contacts/+15552600001/consent";
    ask(C, Method::PUT, path)
        .headers(&[RW, JSON])
        .body(r#"{"status":"REFUSED"}"#)
        .expect(&h, 201, P)
        .await;
    let admin = [("x-api-key", ADMIN_KEY)];
    let history = "/admin/audit/contacts/%2B15552600001";
    let r = ask(A, Method::GET, history)
        .headers(&admin)
        .expect(&h, 200, P)
        .await;
    assert_eq!(r.json()["records"].as_array().map(Vec::len), Some(1));
    let r = ask(A, Method::GET, "/admin/audit/contacts/.bad")
        .headers(&admin)
        .expect(&h, 400, P)
        .await;
    assert_eq!(r.code(), "invalid_contact_id");
    ask(A, Method::GET, history).expect(&h, 401, P).await;
    ask(A, Method::GET, history)
        .headers(&[RW])
        .expect(&h, 403, P)
        .await;
    for method in [Method::PUT, Method::POST, Method::DELETE] {
        ask(A, method, history)
            .headers(&admin)
            .expect(&h, 405, P)
            .await;
    }
    ask(A, Method::GET, "/admin/audit/contacts/")
        .headers(&admin)
        .expect(&h, 404, P)
        .await;
    // The store unwritable: PUTs are refused (audit_unavailable), /readyz says so.
    dir.set_immutable(true);
    let r = ask(C, Method::PUT, path)
        .headers(&[RW, JSON])
        .body(r#"{"status":"CONSENTED"}"#)
        .expect(&h, 503, P)
        .await;
    assert_eq!(r.code(), "audit_unavailable");
    let r = ask(A, Method::GET, "/readyz").expect(&h, 200, P).await;
    assert_eq!(r.json()["audit"]["store"], "down");
    dir.set_immutable(false);

    let off = Harness::start().await;
    let r = ask(A, Method::GET, history)
        .headers(&admin)
        .expect(&off, 404, P)
        .await;
    assert_eq!(r.code(), "audit_disabled");
}
