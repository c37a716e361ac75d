//! Query parameters the customer put on the callback URL.
//!
//! They arrive twice: in the request's own query string, and inside the
//! payload as `callback_url`. The request wins; the payload fills in names
//! the request lacks (a proxy in front may strip the query string). The
//! payload's copy is only parsed when a name is missing from the request.

use std::borrow::Cow;
use std::cell::OnceCell;

type Pairs<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

#[derive(Debug, Default, Clone)]
pub struct Query<'a> {
    request: Pairs<'a>,
    callback: Option<&'a str>,
    callback_pairs: OnceCell<Pairs<'a>>,
}

impl<'a> Query<'a> {
    /// `request` is the raw query string of the incoming request (without
    /// `?`); `callback_url` is the payload's copy of the URL.
    pub fn new(request: Option<&'a str>, callback_url: Option<&'a str>) -> Self {
        Self {
            request: request.map(parse).unwrap_or_default(),
            // The fragment goes first: a `?` inside it is not a query.
            callback: callback_url
                .map(|url| url.split_once('#').map_or(url, |(url, _)| url))
                .and_then(|url| url.split_once('?'))
                .map(|(_, q)| q),
            callback_pairs: OnceCell::new(),
        }
    }

    /// The first value given for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        find(&self.request, name).or_else(|| {
            let pairs = self
                .callback_pairs
                .get_or_init(|| self.callback.map(parse).unwrap_or_default());
            find(pairs, name)
        })
    }
}

fn parse(query: &str) -> Pairs<'_> {
    form_urlencoded::parse(query.as_bytes()).collect()
}

fn find<'p>(pairs: &'p Pairs<'_>, name: &str) -> Option<&'p str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_ref())
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
            (None, Some("https://x/r#?tenant=acme"), "tenant", None),
            (None, Some("https://x/r?a=1#?tenant=acme"), "tenant", None),
            (
                None,
                Some("https://x/r?tenant=acme#x?tenant=b"),
                "tenant",
                Some("acme"),
            ),
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
