//! Any header value against any body: a verdict, never a panic.
#![no_main]

use bytes::Bytes;
use hookgate::webhook::verify::{Secret, Verifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &[u8])| {
    let (header, body) = input;
    let verifier = Verifier::new(vec![Secret::new("current", b"fuzz-secret-0123456789"), Secret::new("previous", b"x")]);
    if let Ok(header) = http::HeaderValue::from_bytes(header) {
        let _ = verifier.verify(Bytes::copy_from_slice(body), Some(&header));
    }
    let mut headers = http::HeaderMap::new();
    for part in header.split(|b| *b == b'\n') {
        if let Ok(v) = http::HeaderValue::from_bytes(part) {
            headers.append("x-hub-signature-256", v);
        }
    }
    let _ = hookgate::webhook::verify::signature_header(&headers);
});
