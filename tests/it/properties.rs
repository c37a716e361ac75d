//! Property tests: signatures, the rules engine on arbitrary JSON, and the
//! spool against a model through accept / deliver / restart sequences.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hookgate::queue::embedded::Spool;
use hookgate::queue::{Accepted, NewJob, Record, StoredJob};
use hookgate::rules::{Input, RuleSet};
use hookgate::webhook::job::Job;
use hookgate::webhook::query::Query;
use hookgate::webhook::verify::{self, Secret, SignatureError, Verifier};
use proptest::prelude::*;

fn header(s: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(s).unwrap()
}

/// A body taken as verified, as with no secret configured.
fn unchecked(body: Vec<u8>) -> hookgate::webhook::verify::Verified {
    hookgate::webhook::verify::Verifier::new(Vec::new())
        .verify(body.into(), None)
        .unwrap()
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
            // Refused (not a panic): 128 random bytes are not the digest.
            let refused = v.verify(Bytes::from_static(b"{}"), Some(&h)).is_err();
            prop_assert!(refused);
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
        let verified = unchecked(body);
        if let Ok(job) = Job::parse(&verified) {
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
        let verified = unchecked(body);
        // A job that parses has an id that can key the dedupe index and
        // travel in a header.
        if let Ok(job) = Job::parse(&verified) {
            prop_assert!((1..=hookgate::webhook::job::MAX_JOB_ID_LEN).contains(&job.job_id.len()));
            prop_assert!(job.job_id.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
        }
    }

    #[test]
    fn a_rules_file_loads_exactly_when_it_is_valid(file in rules_file()) {
        let (text, valid) = file;
        let lines = text.lines().count();
        match RuleSet::parse(&text) {
            Ok(_) => prop_assert!(valid, "loaded although invalid:\n{text}"),
            Err(problems) => {
                prop_assert!(!valid, "refused although valid: {problems:?}\n{text}");
                for p in &problems {
                    prop_assert!((1..=lines).contains(&p.line), "{p:?} outside the file:\n{text}");
                }
            }
        }
    }
}

/// A rules file built from parts, some of them wrong (an ftp URL, a
/// destination that is not defined, a risk level that does not exist), and
/// whether it is valid.
fn rules_file() -> impl Strategy<Value = (String, bool)> {
    let rule = (
        proptest::collection::btree_set(0usize..5, 1..3),
        prop_oneof![
            Just(None),
            Just(Some("LOW")),
            Just(Some("HIGH")),
            Just(Some("SEVERE"))
        ],
    );
    (
        proptest::collection::btree_map(0usize..4, any::<bool>(), 1..4),
        proptest::collection::vec(rule, 1..4),
    )
        .prop_map(|(destinations, rules)| {
            let names = ["a", "b", "c", "d", "e"];
            let mut text = String::new();
            let mut valid = true;
            for (&d, &good_url) in &destinations {
                let url = if good_url {
                    "http://127.0.0.1:9/x"
                } else {
                    "ftp://127.0.0.1/x"
                };
                valid &= good_url;
                text += &format!("[destinations.{}]\nurl = \"{url}\"\n\n", names[d]);
            }
            for (i, (targets, risk)) in rules.iter().enumerate() {
                text += &format!("[[rules]]\nname = \"r{i}\"\n");
                if let Some(risk) = risk {
                    valid &= *risk != "SEVERE";
                    text += &format!("match = {{ min_risk = \"{risk}\" }}\n");
                }
                let forward: Vec<String> = targets
                    .iter()
                    .map(|&t| format!("\"{}\"", names[t]))
                    .collect();
                valid &= targets.iter().all(|t| destinations.contains_key(t));
                text += &format!("forward = [{}]\n\n", forward.join(", "));
            }
            (text, valid)
        })
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
