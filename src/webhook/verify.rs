//! Signature verification over the raw request bytes.
//!
//! The vendor signs with `base64(HMAC-SHA256(secret, body))`; GitHub-style
//! senders use `sha256=<hex>`. Both are accepted in `X-Hub-Signature-256`.
//! Several named secrets may be configured so that a rotation window
//! accepts the previous secret as well as the current one.
//!
//! A [`Verified`] value can only be made here: it is the proof, carried by
//! the type system, that a body may be routed and forwarded.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const DIGEST_LEN: usize = 32;
const HEX_PREFIX: &str = "sha256=";

/// A named HMAC key, keyed once at start-up so each verification only
/// clones the prepared state.
#[derive(Clone)]
pub struct Secret {
    name: String,
    mac: HmacSha256,
}

impl Secret {
    pub fn new(name: impl Into<String>, key: &[u8]) -> Self {
        Self {
            name: name.into(),
            // HMAC accepts keys of any length; this cannot fail.
            mac: HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn matches(&self, body: &[u8], digest: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(body);
        // `verify_slice` compares in constant time.
        mac.verify_slice(digest).is_ok()
    }

    fn digest(&self, body: &[u8]) -> [u8; DIGEST_LEN] {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why a request was refused before its body was trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the X-Hub-Signature-256 header is missing or empty")]
    Missing,
    #[error(
        "the X-Hub-Signature-256 header is neither base64 of a 32-byte digest nor sha256=<64 hex digits>{}",
        hint.text()
    )]
    BadEncoding { hint: Hint },
    #[error("the signature does not match the body under any configured secret{}", hint.text())]
    Mismatch { hint: Hint },
    #[error("the X-Hub-Signature-256 header appears more than once; send exactly one")]
    Repeated,
    #[error("the X-Hub-Signature-256 header is {0} bytes long, more than {MAX_HEADER_LEN}")]
    TooLong(usize),
}

impl SignatureError {
    /// The `reason` label of `hookgate_webhooks_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing_signature",
            Self::BadEncoding { .. } | Self::Repeated | Self::TooLong(_) => "bad_encoding",
            Self::Mismatch { .. } => "bad_signature",
        }
    }
}

/// What the header would have meant in the other accepted encoding: the
/// most common integration mistake is hex where base64 is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    None,
    LooksLikeHex { would_match: bool },
    LooksLikeBase64 { would_match: bool },
}

impl Hint {
    fn text(&self) -> &'static str {
        match self {
            Hint::None => "",
            Hint::LooksLikeHex { would_match: true } => {
                " (it is a hex digest without the sha256= prefix, and that digest does match: send base64, or prefix it with sha256=)"
            }
            Hint::LooksLikeHex { would_match: false } => {
                " (it looks like a hex digest without the sha256= prefix; accepted forms are base64 or sha256=<hex>)"
            }
            Hint::LooksLikeBase64 { would_match: true } => {
                " (it is base64 after a sha256= prefix, and that digest does match: drop the prefix, or send hex after it)"
            }
            Hint::LooksLikeBase64 { would_match: false } => {
                " (it looks like base64 after a sha256= prefix; accepted forms are base64 or sha256=<hex>)"
            }
        }
    }
}

/// A body whose signature checked out (or that was accepted because
/// verification is explicitly disabled). Only [`Verifier::verify`] makes one.
#[derive(Debug, Clone)]
pub struct Verified {
    body: Bytes,
    signature: Option<http::HeaderValue>,
    secret: Option<usize>,
}

impl Verified {
    /// The exact bytes that were signed, to be forwarded unchanged.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The original header, forwarded so that downstreams can verify too.
    pub fn signature(&self) -> Option<&http::HeaderValue> {
        self.signature.as_ref()
    }

    /// Index of the secret that matched, if any.
    pub fn secret(&self) -> Option<usize> {
        self.secret
    }
}

/// The configured secrets, in order of preference.
#[derive(Debug, Clone)]
pub struct Verifier {
    secrets: Vec<Secret>,
}

impl Verifier {
    /// An empty list disables verification: the caller decides whether that
    /// is allowed (`verify.required = false`).
    pub fn new(secrets: Vec<Secret>) -> Self {
        Self { secrets }
    }

    /// From named keys, in order of preference.
    pub fn from_keys(keys: &[crate::config::NamedKey]) -> Self {
        Self::new(
            keys.iter()
                .map(|(name, key)| Secret::new(name.clone(), key))
                .collect(),
        )
    }

    pub fn secrets(&self) -> &[Secret] {
        &self.secrets
    }

    pub fn verify(
        &self,
        body: Bytes,
        header: Option<&http::HeaderValue>,
    ) -> Result<Verified, SignatureError> {
        let header = header.filter(|h| !h.is_empty());
        if self.secrets.is_empty() {
            return Ok(Verified {
                body,
                signature: header.cloned(),
                secret: None,
            });
        }
        let header = header.ok_or(SignatureError::Missing)?;
        let raw = header.as_bytes();
        let Some(digest) = decode(raw) else {
            return Err(SignatureError::BadEncoding {
                hint: self.hint(&body, raw),
            });
        };
        match self.secrets.iter().position(|s| s.matches(&body, &digest)) {
            Some(index) => Ok(Verified {
                body,
                signature: Some(header.clone()),
                secret: Some(index),
            }),
            None => Err(SignatureError::Mismatch { hint: Hint::None }),
        }
    }

    fn hint(&self, body: &[u8], raw: &[u8]) -> Hint {
        let would_match = |digest: Option<[u8; DIGEST_LEN]>| {
            digest.is_some_and(|d| self.secrets.iter().any(|s| s.matches(body, &d)))
        };
        if raw.len() == 2 * DIGEST_LEN && raw.iter().all(u8::is_ascii_hexdigit) {
            return Hint::LooksLikeHex {
                would_match: would_match(decode_hex(raw)),
            };
        }
        if let Some(rest) = raw.strip_prefix(HEX_PREFIX.as_bytes()) {
            if let Some(digest) = decode_base64(rest) {
                return Hint::LooksLikeBase64 {
                    would_match: would_match(Some(digest)),
                };
            }
        }
        Hint::None
    }
}

/// The one `X-Hub-Signature-256` of a request. Several are refused: a
/// proxy in front might pick another one than hookgate does.
pub fn signature_header(
    headers: &http::HeaderMap,
) -> Result<Option<&http::HeaderValue>, SignatureError> {
    let mut all = headers.get_all(HEADER).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(SignatureError::Repeated);
    }
    match first {
        Some(value) if value.len() > MAX_HEADER_LEN => Err(SignatureError::TooLong(value.len())),
        _ => Ok(first),
    }
}

/// The longest signature header taken: a real one is 44 (base64) or 71
/// (`sha256=` and hex) bytes. It is stored with the job, and forwarded.
pub const MAX_HEADER_LEN: usize = 1024;

/// The header the vendor signs in.
pub const HEADER: &str = "x-hub-signature-256";

/// The signature of `body` under `key`, in the vendor's base64 form.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    BASE64.encode(Secret::new("", key).digest(body))
}

fn decode(raw: &[u8]) -> Option<[u8; DIGEST_LEN]> {
    match raw.strip_prefix(HEX_PREFIX.as_bytes()) {
        Some(hex) => decode_hex(hex),
        None => decode_base64(raw),
    }
}

fn decode_base64(raw: &[u8]) -> Option<[u8; DIGEST_LEN]> {
    // 32 bytes encode to 44 characters; anything longer cannot be a digest,
    // and checking first keeps the decode buffer on the stack.
    if raw.len() != 44 {
        return None;
    }
    let mut out = [0u8; 33];
    match BASE64.decode_slice(raw, &mut out) {
        Ok(DIGEST_LEN) => out[..DIGEST_LEN].try_into().ok(),
        _ => None,
    }
}

fn decode_hex(raw: &[u8]) -> Option<[u8; DIGEST_LEN]> {
    if raw.len() != 2 * DIGEST_LEN {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; DIGEST_LEN];
    for (byte, pair) in out.iter_mut().zip(raw.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"data":{"job_id":"1","is_error":false}}"#;

    fn verifier(keys: &[&str]) -> Verifier {
        Verifier::new(keys.iter().map(|k| Secret::new(*k, k.as_bytes())).collect())
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn check(
        v: &Verifier,
        body: &[u8],
        header: Option<&str>,
    ) -> Result<Option<usize>, SignatureError> {
        let header = header.map(|h| http::HeaderValue::from_str(h).unwrap());
        v.verify(Bytes::copy_from_slice(body), header.as_ref())
            .map(|ok| ok.secret())
    }

    #[test]
    fn the_signature_header_is_one_and_bounded() {
        let headers = |values: &[String]| {
            let mut map = http::HeaderMap::new();
            for v in values {
                map.append(HEADER, http::HeaderValue::from_str(v).unwrap());
            }
            map
        };
        let ok = "a".repeat(MAX_HEADER_LEN);
        let long = "a".repeat(MAX_HEADER_LEN + 1);
        let cases: &[(&[String], Result<bool, SignatureError>)] = &[
            (&[], Ok(false)),
            (std::slice::from_ref(&ok), Ok(true)),
            (&[ok.clone(), ok.clone()], Err(SignatureError::Repeated)),
            (
                std::slice::from_ref(&long),
                Err(SignatureError::TooLong(MAX_HEADER_LEN + 1)),
            ),
        ];
        for (values, want) in cases {
            let map = headers(values);
            let got = signature_header(&map).map(|h| h.is_some());
            assert_eq!(
                format!("{got:?}"),
                format!("{want:?}"),
                "{} headers",
                values.len()
            );
        }
    }

    #[test]
    fn verdicts() {
        let v = verifier(&["current-secret-1", "previous-secret-1"]);
        let current = sign(b"current-secret-1", BODY);
        let previous = sign(b"previous-secret-1", BODY);
        let current_hex = hex(&BASE64.decode(&current).unwrap());
        let stranger = sign(b"someone-else-000", BODY);
        type Case<'a> = (
            &'a str,
            Option<String>,
            Result<Option<usize>, SignatureError>,
        );
        let cases: Vec<Case> = vec![
            ("base64, current", Some(current.clone()), Ok(Some(0))),
            ("base64, previous", Some(previous), Ok(Some(1))),
            (
                "hex form",
                Some(format!("sha256={current_hex}")),
                Ok(Some(0)),
            ),
            (
                "upper-case hex",
                Some(format!("sha256={}", current_hex.to_uppercase())),
                Ok(Some(0)),
            ),
            ("absent", None, Err(SignatureError::Missing)),
            ("empty", Some(String::new()), Err(SignatureError::Missing)),
            (
                "unknown secret",
                Some(stranger),
                Err(SignatureError::Mismatch { hint: Hint::None }),
            ),
            (
                "hex without prefix",
                Some(current_hex.clone()),
                Err(SignatureError::BadEncoding {
                    hint: Hint::LooksLikeHex { would_match: true },
                }),
            ),
            (
                "base64 behind the hex prefix",
                Some(format!("sha256={current}")),
                Err(SignatureError::BadEncoding {
                    hint: Hint::LooksLikeBase64 { would_match: true },
                }),
            ),
            (
                "prefix only",
                Some("sha256=".into()),
                Err(SignatureError::BadEncoding { hint: Hint::None }),
            ),
            (
                "bad hex",
                Some(format!("sha256={}", "zz".repeat(32))),
                Err(SignatureError::BadEncoding { hint: Hint::None }),
            ),
            (
                "truncated base64",
                Some(current[..40].to_string()),
                Err(SignatureError::BadEncoding { hint: Hint::None }),
            ),
            (
                "garbage",
                Some("not base64 at all!".into()),
                Err(SignatureError::BadEncoding { hint: Hint::None }),
            ),
        ];
        for (name, header, want) in cases {
            assert_eq!(check(&v, BODY, header.as_deref()), want, "{name}");
        }
    }

    #[test]
    fn any_changed_byte_fails() {
        let v = verifier(&["current-secret-1"]);
        let header = sign(b"current-secret-1", BODY);
        for i in 0..BODY.len() {
            let mut body = BODY.to_vec();
            body[i] ^= 0x01;
            assert_eq!(
                check(&v, &body, Some(&header)),
                Err(SignatureError::Mismatch { hint: Hint::None }),
                "byte {i}"
            );
        }
    }

    #[test]
    fn disabled_accepts_and_keeps_header() {
        let v = Verifier::new(Vec::new());
        assert_eq!(check(&v, BODY, None), Ok(None));
        assert_eq!(check(&v, BODY, Some("anything")), Ok(None));
    }
}
