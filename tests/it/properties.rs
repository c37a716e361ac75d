//! Property tests: signatures, the rules engine on arbitrary JSON, and the
//! spool against a model through accept / deliver / restart sequences.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hookgate::queue::embedded::{Accepted, NewJob, Record, Spool, StoredJob};
use hookgate::rules::{Input, RuleSet};
use hookgate::webhook::job::Job;
use hookgate::webhook::query::Query;
use hookgate::webhook::verify::{self, Secret, SignatureError, Verifier};
use proptest::prelude::*;

fn header(s: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(s).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_signature_verifies_its_body(body in proptest::collection::vec(any::<u8>(), 0..2048), key in "[ -~]{1,64}") {
        let v = Verifier::new(vec![Secret::new("k", key.as_bytes())]);
        let sig = verify::sign(key.as_bytes(), &body);
        prop_assert!(v.verify(Bytes::from(body), Some(&header(&sig))).is_ok());
    }

    #[test]
    fn any_bit_flip_fails(body in proptest::collection::vec(any::<u8>(), 1..1024), key in "[ -~]{1,64}", bit in any::<usize>(), in_body in any::<bool>()) {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::STANDARD;
        let v = Verifier::new(vec![Secret::new("k", key.as_bytes())]);
        let mut digest = engine.decode(verify::sign(key.as_bytes(), &body)).unwrap();
        let mut body = body;
        if in_body {
            let i = bit % (body.len() * 8);
            body[i / 8] ^= 1 << (i % 8);
        } else {
            let i = bit % (digest.len() * 8);
            digest[i / 8] ^= 1 << (i % 8);
        }
        let result = v.verify(Bytes::from(body), Some(&header(&engine.encode(&digest))));
        prop_assert!(matches!(result, Err(SignatureError::Mismatch { .. })), "{result:?}");
    }

    #[test]
    fn arbitrary_headers_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..128)) {
        let v = Verifier::new(vec![Secret::new("k", b"key")]);
        if let Ok(h) = http::HeaderValue::from_bytes(&raw) {
            let _ = v.verify(Bytes::from_static(b"{}"), Some(&h));
        }
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::json!(f)),
        prop_oneof![
            "[A-Z_]{0,12}",
            Just("HIGH".to_owned()),
            Just("MEDIUM".to_owned()),
            Just("LOW".to_owned()),
            "\\PC{0,16}",
            Just("https://gw/results?tenant=acme&x=%2F".to_owned()),
        ]
        .prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("data".to_owned()),
                    Just("job_id".to_owned()),
                    Just("is_error".to_owned()),
                    Just("result".to_owned()),
                    Just("policy_categories".to_owned()),
                    Just("name".to_owned()),
                    Just("risk_level".to_owned()),
                    Just("callback_url".to_owned()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn shipped_rules() -> RuleSet {
    RuleSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules.toml")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn the_rules_engine_never_panics_on_arbitrary_json(value in json_value(), query in "[a-z=&%0-9]{0,24}") {
        let rules = shipped_rules();
        let body = serde_json::to_vec(&value).unwrap();
        if let Ok(job) = Job::from_bytes(&body) {
            let q = Query::new(Some(&query), job.callback_url.as_deref());
            let input = Input { job: &job, query: &q };
            let decision = rules.decide(input);
            let traces = rules.explain(input);
            prop_assert_eq!(traces.len(), rules.rules.len());
            prop_assert!(decision.routes.len() <= rules.destinations.len());
        }
    }

    #[test]
    fn arbitrary_bytes_are_a_job_or_an_error(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Job::from_bytes(&body);
    }

    #[test]
    fn arbitrary_rules_files_load_or_explain(text in "\\PC{0,256}") {
        if let Err(problems) = RuleSet::parse(&text) {
            prop_assert!(!problems.is_empty());
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A job to `n` destinations (0: dropped).
    Accept(u8),
    /// The `k`-th pending delivery (modulo) succeeds.
    Deliver(usize),
    /// Close and reopen: what was promised must come back.
    Restart,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            4 => (0u8..3).prop_map(Op::Accept),
            3 => any::<usize>().prop_map(Op::Deliver),
            1 => Just(Op::Restart),
        ],
        1..40,
    )
}

fn record(destination: usize) -> Record {
    Record {
        job: 0,
        job_id: String::new(),
        destination: format!("d{destination}"),
        rule: "r".into(),
        attempts: 0,
        first_ms: 0,
        next_ms: 0,
        last_attempt_ms: None,
        last_error: None,
        dead_reason: None,
        dead_ms: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the sequence, after every restart the spool holds exactly
    /// the deliveries accepted and not yet delivered, and the jobs that
    /// these still use.
    #[test]
    fn the_spool_never_loses_an_accepted_delivery(ops in ops()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let open = || Spool::open(dir.path(), 1 << 30, Duration::from_secs(3600)).unwrap();
        let (mut spool, _) = open();
        let mut model: BTreeSet<u64> = BTreeSet::new();
        // Delivery id -> its job's sequence number; every job ever stored.
        let mut job_of: BTreeMap<u64, u64> = BTreeMap::new();
        let mut jobs: BTreeSet<u64> = BTreeSet::new();
        let jobs_kept = |spool: &Spool, job_of: &BTreeMap<u64, u64>, jobs: &BTreeSet<u64>| {
            jobs.iter().all(|seq| {
                spool.job(*seq).unwrap().is_some() == job_of.values().any(|s| s == seq)
            })
        };
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Accept(destinations) => {
                    let job = NewJob {
                        job: StoredJob {
                            job_id: format!("job-{n}"),
                            signature: None,
                            query: None,
                            accepted_ms: 0,
                            body: Bytes::from(format!("{{\"n\":{n}}}")),
                        },
                        records: (0..destinations as usize).map(record).collect(),
                    };
                    match runtime.block_on(spool.accept(job)).unwrap() {
                        Accepted::New { pending, .. } => {
                            for (id, record) in &pending {
                                model.insert(*id);
                                job_of.insert(*id, record.job);
                                jobs.insert(record.job);
                            }
                        }
                        Accepted::Duplicate => prop_assert!(false, "job ids are distinct"),
                    }
                }
                Op::Deliver(k) => {
                    if let Some(&id) = model.iter().nth(k % model.len().max(1)) {
                        let loaded = spool.load(id).unwrap();
                        prop_assert!(loaded.is_some(), "pending {id} is loadable");
                        let (record, _) = loaded.unwrap();
                        spool.complete(id, record.job).unwrap();
                        model.remove(&id);
                        job_of.remove(&id);
                    }
                }
                Op::Restart => {
                    spool.close();
                    // The file lock goes with the last handle.
                    drop(spool);
                    let (reopened, recovered) = open();
                    spool = reopened;
                    let found: BTreeSet<u64> = recovered.pending.iter().map(|(id, _)| *id).collect();
                    prop_assert_eq!(&found, &model);
                    prop_assert!(jobs_kept(&spool, &job_of, &jobs), "jobs match deliveries");
                }
            }
        }
        spool.close();
        drop(spool);
        let (spool, recovered) = open();
        let found: BTreeSet<u64> = recovered.pending.iter().map(|(id, _)| *id).collect();
        prop_assert_eq!(found, model);
        prop_assert!(jobs_kept(&spool, &job_of, &jobs), "jobs match deliveries");
    }
}
