//! The per-webhook CPU work before any I/O: verify the signature, parse the
//! job, derive the query, route by the shipped rules. Target: under 3 µs.

use std::hint::black_box;
use std::path::Path;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hookgate::rules::{Input, RuleSet};
use hookgate::webhook::job::Job;
use hookgate::webhook::query::Query;
use hookgate::webhook::verify::{self, Secret, Verifier};

const SECRET: &[u8] = b"a-benchmark-secret-of-32-bytes!!";

fn body() -> Bytes {
    // The vendor's documented success payload, about 700 bytes.
    Bytes::from_static(
        br#"{"data":{"job_id":"8a7c1f3e-5b2d-4c9a-9e41-2f6d0b7a1c55","callback_url":"https://gw.example.com/results?tenant=acme&filename=clip.mp4","is_error":false,"result":{"policy_categories":[{"name":"ARMS_AMMO","description":"Arms & Ammunition","risk_level":"HIGH"},{"name":"DEATH_INJURY_MILITARY","description":"Death, Injury or Military Conflict","risk_level":"MEDIUM"},{"name":"HATE_SPEECH","description":"Hate speech","risk_level":"LOW"}],"metadata":{"width":720,"height":480,"fps":30,"duration":11.6,"seconds_processed":11},"url":"https://cdn.example.com/videos/2026/11/30/8a7c1f3e-5b2d-4c9a-9e41-2f6d0b7a1c55/clip.mp4"}}}"#,
    )
}

fn pipeline(c: &mut Criterion) {
    let rules_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules.toml");
    let rules = RuleSet::load(&rules_path).expect("the shipped rules load");
    let verifier = Verifier::new(vec![Secret::new("current", SECRET)]);
    let body = body();
    let signature = http::HeaderValue::from_str(&verify::sign(SECRET, &body)).unwrap();
    let query = Some("tenant=acme&filename=clip.mp4");

    let mut group = c.benchmark_group("webhook");
    group.throughput(Throughput::Elements(1));
    group.bench_function("verify", |b| {
        b.iter(|| {
            verifier
                .verify(black_box(body.clone()), Some(&signature))
                .unwrap()
        })
    });
    group.bench_function("verify+parse+route", |b| {
        b.iter(|| {
            let verified = verifier
                .verify(black_box(body.clone()), Some(&signature))
                .unwrap();
            let job = Job::parse(&verified).unwrap();
            let query = Query::new(black_box(query), job.callback_url.as_deref());
            let decision = rules.decide(Input {
                job: &job,
                query: &query,
            });
            black_box(decision.routes.len())
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
