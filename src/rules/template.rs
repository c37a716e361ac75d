//! Destination URLs with `{query.NAME}` placeholders.
//!
//! A placeholder takes a customer-chosen value, so the value is held to
//! `[A-Za-z0-9_-]{1,63}`: it can name a tenant but can never add a dot, a
//! slash, a port or a user, and so can never steer a request to a host the
//! rules file did not mean.

use std::collections::HashMap;
use std::fmt;
use std::sync::RwLock;

use http::Uri;
use url::Url;

use crate::webhook::query::Query;

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Query(String),
}

#[derive(Debug)]
pub struct UrlTemplate {
    source: String,
    parts: Vec<Part>,
    /// Parsed once when there is nothing to fill in.
    fixed: Option<Uri>,
    /// Filled-in URLs already parsed: parsing (with IDNA) is most of the
    /// cost of routing, and the values (tenants) repeat. Bounded: emptied
    /// when full, so odd values cannot grow it.
    resolved: RwLock<HashMap<String, Uri>>,
}

const RESOLVED_MAX: usize = 1024;

/// Why a templated URL could not be filled in for a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("query parameter `{name}` is missing, so the URL template cannot be filled in")]
    Missing { name: String },
    #[error(
        "query parameter `{name}` = {value:?} is not 1 to 63 of [A-Za-z0-9_-], so it may not go into a URL"
    )]
    Invalid { name: String, value: String },
}

const MAX_VALUE_LEN: usize = 63;

impl UrlTemplate {
    /// Checks the template once: it must be an http(s) URL whatever safe
    /// value fills its placeholders.
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("unclosed `{{` in {source:?}"))?;
            let inner = &rest[open + 1..close];
            let name = inner
                .strip_prefix("query.")
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    format!("`{{{inner}}}` is not a placeholder; the only form is {{query.NAME}}")
                })?;
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            parts.push(Part::Query(name.to_owned()));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in {source:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let sample: String = parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.as_str(),
                Part::Query(_) => "sample",
            })
            .collect();
        let url = Url::parse(&sample).map_err(|e| format!("{source:?} is not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "{source:?} must be an http:// or https:// URL with a host"
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{source:?} carries credentials, which are never sent from a URL; \
                 put them in the destination's `headers` (Authorization) instead"
            ));
        }
        let uri = normalized(&url).map_err(|e| format!("{source:?} is not a valid URL: {e}"))?;
        let templated = parts.iter().any(|p| matches!(p, Part::Query(_)));
        Ok(Self {
            source: source.to_owned(),
            parts,
            fixed: (!templated).then_some(uri),
            resolved: RwLock::new(HashMap::new()),
        })
    }

    /// The template as written in the rules file.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when it has placeholders: filling it in needs the job's query.
    pub fn is_templated(&self) -> bool {
        self.fixed.is_none()
    }

    pub fn resolve(&self, query: &Query<'_>) -> Result<Uri, TemplateError> {
        if let Some(url) = &self.fixed {
            return Ok(url.clone());
        }
        let mut out = String::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Query(name) => {
                    let value = query
                        .get(name)
                        .ok_or_else(|| TemplateError::Missing { name: name.clone() })?;
                    if !is_safe(value) {
                        return Err(TemplateError::Invalid {
                            name: name.clone(),
                            value: value.chars().take(80).collect(),
                        });
                    }
                    out.push_str(value);
                }
            }
        }
        if let Some(url) = self
            .resolved
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&out)
        {
            return Ok(url.clone());
        }
        // The template parsed with a safe sample; the same characters
        // cannot break it. Kept as an error rather than a panic regardless.
        let url = Url::parse(&out)
            .ok()
            .and_then(|url| normalized(&url).ok())
            .ok_or_else(|| TemplateError::Invalid {
                name: self.placeholders().next().unwrap_or_default().to_owned(),
                value: out.clone(),
            })?;
        let mut resolved = self.resolved.write().unwrap_or_else(|p| p.into_inner());
        if resolved.len() >= RESOLVED_MAX {
            resolved.clear();
        }
        resolved.insert(out, url.clone());
        Ok(url)
    }

    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Query(n) => Some(n.as_str()),
            Part::Literal(_) => None,
        })
    }
}

impl fmt::Display for UrlTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The URL as the client sends it: parsed and normalized by the WHATWG
/// rules (IDNA, percent-encoding, default port) once, here, so the host
/// that was checked is the host that is called.
fn normalized(url: &Url) -> Result<Uri, http::uri::InvalidUri> {
    Uri::try_from(url.as_str())
}

fn is_safe(value: &str) -> bool {
    (1..=MAX_VALUE_LEN).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_or_explain() {
        let cases: &[(&str, bool)] = &[
            ("http://a.internal:8080/results", true),
            (
                "http://archive-{query.tenant}.internal:8080/r/{query.kind}",
                true,
            ),
            ("https://x/{query.a}{query.b}", true),
            ("ftp://x/", false),
            ("not a url", false),
            ("http://x/{tenant}", false),
            ("http://x/{query.}", false),
            ("http://x/{query.a", false),
            ("http://x/}", false),
            ("{query.scheme}://x/", false),
            ("http://user:secret@x/", false),
            ("http://user@x/", false),
        ];
        for (source, ok) in cases {
            assert_eq!(UrlTemplate::parse(source).is_ok(), *ok, "{source}");
        }
    }

    #[test]
    fn only_safe_values_fill_in() {
        let t = UrlTemplate::parse("http://archive-{query.tenant}.internal:8080/results").unwrap();
        let resolve = |q: &str| t.resolve(&Query::new(Some(q), None)).map(|u| u.to_string());
        assert_eq!(
            resolve("tenant=acme_1-b").unwrap(),
            "http://archive-acme_1-b.internal:8080/results"
        );
        for bad in [
            "tenant=..",
            "tenant=a/b",
            "tenant=evil.com:80",
            "tenant=",
            "tenant=a%40b",
            "tenant=%2e%2e",
        ] {
            assert!(
                matches!(resolve(bad), Err(TemplateError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            resolve(&format!("tenant={}", "a".repeat(64))),
            Err(TemplateError::Invalid { .. })
        ));
        assert_eq!(
            resolve("other=1"),
            Err(TemplateError::Missing {
                name: "tenant".into()
            })
        );
    }
}
