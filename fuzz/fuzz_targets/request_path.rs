//! The whole path of a webhook before I/O: signature header, query string
//! and body through verify, parse, query and routing by the shipped rules.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use hookgate::webhook::job::Job;
use hookgate::webhook::query::Query;
use hookgate::rules::{Input, RuleSet};
use hookgate::webhook::verify::{self, Secret, Verifier};
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"fuzz-secret-0123456789";

fn rules() -> &'static RuleSet {
    static RULES: OnceLock<RuleSet> = OnceLock::new();
    RULES.get_or_init(|| {
        RuleSet::parse(include_str!("../../config/rules.toml")).expect("the shipped rules load")
    })
}

fuzz_target!(|input: (&str, bool, &[u8])| {
    let (query, signed, body) = input;
    let verifier = Verifier::new(vec![Secret::new("current", KEY)]);
    // Half the inputs carry a valid signature, so parsing and routing are
    // reached; the others exercise the refusals.
    let header = if signed { verify::sign(KEY, body) } else { String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned() };
    let Ok(header) = http::HeaderValue::from_str(&header) else { return };
    let Ok(verified) = verifier.verify(Bytes::copy_from_slice(body), Some(&header)) else { return };
    let Ok(job) = Job::parse(&verified) else { return };
    let query = Query::new(Some(query), job.callback_url.as_deref());
    let input = Input { job: &job, query: &query };
    let decision = rules().decide(input);
    let _ = rules().explain(input);
    for route in &decision.routes {
        if let Ok(url) = &route.url {
            // Only the rules file's hosts are ever called.
            assert!(url.host().is_some_and(|h| h.ends_with(".svc")), "{url}");
        }
    }
});
