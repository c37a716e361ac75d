//! Query parameters the customer put on the callback URL.
//!
//! They arrive twice: in the request's own query string, and inside the
//! payload as `callback_url`. The request wins; the payload fills in names
//! the request lacks (a proxy in front may strip the query string).

use std::borrow::Cow;

#[derive(Debug, Default, Clone)]
pub struct Query<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Query<'a> {
    /// `request` is the raw query string of the incoming request (without
    /// `?`); `callback_url` is the payload's copy of the URL.
    pub fn new(request: Option<&'a str>, callback_url: Option<&'a str>) -> Self {
        let mut pairs: Vec<_> = request
            .map(|q| form_urlencoded::parse(q.as_bytes()).collect())
            .unwrap_or_default();
        let callback = callback_url
            .and_then(|url| url.split_once('?'))
            .map(|(_, q)| q.split_once('#').map_or(q, |(q, _)| q));
        if let Some(q) = callback {
            let from_request = pairs.len();
            for (name, value) in form_urlencoded::parse(q.as_bytes()) {
                if !pairs[..from_request].iter().any(|(n, _)| *n == name) {
                    pairs.push((name, value));
                }
            }
        }
        Self { pairs }
    }

    /// The first value given for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wins_callback_fills_in() {
        // (request query, callback_url, name, expected value)
        type Case<'a> = (Option<&'a str>, Option<&'a str>, &'a str, Option<&'a str>);
        let cases: &[Case] = &[
            (Some("tenant=acme"), None, "tenant", Some("acme")),
            (
                Some("tenant=acme"),
                Some("https://x/r?tenant=globex&f=a.mp4"),
                "tenant",
                Some("acme"),
            ),
            (
                Some("tenant=acme"),
                Some("https://x/r?tenant=globex&f=a.mp4"),
                "f",
                Some("a.mp4"),
            ),
            (
                None,
                Some("https://x/r?name=%C3%A9t%C3%A9"),
                "name",
                Some("été"),
            ),
            (None, Some("https://x/r?a=1#frag=2"), "frag", None),
            (Some("a=1&a=2"), None, "a", Some("1")),
            (Some("flag"), None, "flag", Some("")),
            (None, Some("https://x/r"), "tenant", None),
            (Some("t=a+b%2Fc"), None, "t", Some("a b/c")),
        ];
        for (request, callback, name, want) in cases {
            let q = Query::new(*request, *callback);
            assert_eq!(q.get(name), *want, "{request:?} {callback:?} {name}");
        }
    }
}
