//! The OTLP trace export request (`ExportTraceServiceRequest` of opentelemetry-proto's
//! `collector/trace/v1`) encoded as protobuf by hand: the few messages and fields the proxy
//! sends, each written with the field number the `.proto` files give it. Decoding is the
//! collector's job (and the test's, with the `opentelemetry-proto` Python package).

use super::data::{AttributeValue, FinishedSpan, SpanKind};

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;

/// One export request: one resource (the service) with one scope (this crate) holding `spans`.
pub fn export_request(service_name: &str, spans: &[FinishedSpan]) -> Vec<u8> {
    let mut resource = Vec::new();
    key_value(
        &mut resource,
        1,
        "service.name",
        &AttributeValue::Str(service_name.to_owned().into()),
    );
    key_value(
        &mut resource,
        1,
        "service.version",
        &AttributeValue::Str(env!("CARGO_PKG_VERSION").into()),
    );
    let mut scope = Vec::new();
    string(&mut scope, 1, env!("CARGO_PKG_NAME"));
    string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
    let mut scope_spans = Vec::new();
    message(&mut scope_spans, 1, &scope);
    let mut encoded = Vec::new();
    for span in spans {
        encoded.clear();
        encode_span(&mut encoded, span);
        message(&mut scope_spans, 2, &encoded);
    }
    let mut resource_spans = Vec::new();
    message(&mut resource_spans, 1, &resource);
    message(&mut resource_spans, 2, &scope_spans);
    let mut request = Vec::with_capacity(resource_spans.len() + 8);
    message(&mut request, 1, &resource_spans);
    request
}

/// `opentelemetry.proto.trace.v1.Span`.
fn encode_span(out: &mut Vec<u8>, span: &FinishedSpan) {
    bytes(out, 1, &span.trace_id);
    bytes(out, 2, &span.span_id);
    if let Some(state) = &span.trace_state {
        string(out, 3, state);
    }
    if let Some(parent) = &span.parent_span_id {
        bytes(out, 4, parent);
    }
    string(out, 5, &span.name);
    let kind = match span.kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
    };
    tag(out, 6, VARINT);
    varint(out, kind);
    tag(out, 7, FIXED64);
    out.extend_from_slice(&span.start_unix_nanos.to_le_bytes());
    tag(out, 8, FIXED64);
    out.extend_from_slice(&span.end_unix_nanos.to_le_bytes());
    for (key, value) in &span.attributes {
        key_value(out, 9, key, value);
    }
    // Status: code 2 = ERROR with its message; unset otherwise (HTTP semantic conventions
    // leave a span's status unset unless it failed).
    if let Some(message) = &span.error {
        let mut status = Vec::new();
        string(&mut status, 2, message);
        tag(&mut status, 3, VARINT);
        varint(&mut status, 2);
        self::message(out, 15, &status);
    }
}

/// `opentelemetry.proto.common.v1.KeyValue` as field `field` of the enclosing message.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &AttributeValue) {
    let mut any = Vec::new();
    match value {
        AttributeValue::Str(s) => string(&mut any, 1, s),
        AttributeValue::Bool(b) => {
            tag(&mut any, 2, VARINT);
            varint(&mut any, u64::from(*b));
        }
        AttributeValue::Int(n) => {
            tag(&mut any, 3, VARINT);
            // int64: two's complement as a 64-bit varint.
            varint(&mut any, *n as u64);
        }
    }
    let mut pair = Vec::new();
    string(&mut pair, 1, key);
    message(&mut pair, 2, &any);
    message(out, field, &pair);
}

fn tag(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, u64::from((field << 3) | u32::from(wire_type)));
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn bytes(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    tag(out, field, LENGTH_DELIMITED);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

fn string(out: &mut Vec<u8>, field: u32, value: &str) {
    bytes(out, field, value.as_bytes());
}

fn message(out: &mut Vec<u8>, field: u32, encoded: &[u8]) {
    bytes(out, field, encoded);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_base_128() {
        let encode = |n| {
            let mut out = Vec::new();
            varint(&mut out, n);
            out
        };
        assert_eq!(encode(0), [0]);
        assert_eq!(encode(1), [1]);
        assert_eq!(encode(300), [0xac, 0x02]);
        assert_eq!(encode(u64::MAX).len(), 10);
        // A negative int64 takes all ten bytes.
        assert_eq!(encode(-1i64 as u64), encode(u64::MAX));
    }

    #[test]
    fn a_span_encodes_its_ids_name_and_kind_as_the_proto_numbers_them() {
        let span = FinishedSpan {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            trace_state: None,
            name: "GET".into(),
            kind: SpanKind::Client,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: Vec::new(),
            error: None,
        };
        let mut out = Vec::new();
        encode_span(&mut out, &span);
        let mut expected = vec![0x0a, 16];
        expected.extend([1; 16]);
        expected.extend([0x12, 8]);
        expected.extend([2; 8]);
        expected.extend([0x2a, 3, b'G', b'E', b'T', 0x30, 3]);
        expected.extend([0x39, 1, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend([0x41, 2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out, expected);
    }
}
