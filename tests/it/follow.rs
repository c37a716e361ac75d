//! Deliveries follow their destination: the rules in force decide every
//! attempt and every replay; one origin's outage never delays another;
//! an outage is told in the log, once per transition.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::Method;
use tokio::time::Instant;

use crate::support::*;

const TOKEN: &str = "follow-admin-token-7";

on_both_backends!(
    a_wrong_port_fixed_by_reload_delivers_the_backlog,
    a_dead_letter_replays_to_the_fixed_path,
    a_removed_destination_dead_letters_its_backlog_and_replays_once_back,
    replay_with_reroute_sends_dead_letters_where_the_rules_now_say,
    one_tenants_outage_never_delays_another,
);

/// Durable, with retries quick enough for a test unless `delivery`
/// overrides them.
fn durable(rules: String, delivery: &str) -> GatewayBuilder {
    on(rules, delivery, &Backend::Embedded)
}

/// [`durable`], keeping the deliveries in `backend`.
fn on(rules: String, delivery: &str, backend: &Backend) -> GatewayBuilder {
    GatewayBuilder::new(rules)
        .on(backend)
        .config("[delivery]\nmode = \"durable\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\nmax_attempts = 1000")
        .config(&format!("[delivery]\n{delivery}"))
        .admin_token(TOKEN)
}

/// Rules with one destination per `(name, url)` and one rule sending every
/// job to all of them.
fn rules(destinations: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, url) in destinations {
        out.push_str(&format!("[destinations.{name}]\nurl = \"{url}\"\n"));
    }
    let names: Vec<String> = destinations
        .iter()
        .map(|(n, _)| format!("\"{n}\""))
        .collect();
    out.push_str(&format!(
        "[[rules]]\nname = \"all\"\nforward = [{}]\n",
        names.join(", ")
    ));
    out
}

/// Writes new rules and reloads them through the admin API.
async fn apply(gw: &TestGateway, rules: &str) {
    std::fs::write(gw.dir().join("rules.toml"), rules).unwrap();
    let reloaded = gw.reload(Some(TOKEN)).await;
    assert_eq!(reloaded.status(), 200, "{}", reloaded.text().await.unwrap());
}

/// The dead letters of `destination` once there are `n` (the gauge counts
/// a dead letter as it is decided, the listing once it is committed).
async fn dead_letters(gw: &TestGateway, destination: &str, n: usize) -> Vec<serde_json::Value> {
    eventually(
        Duration::from_secs(5),
        "the dead letters listed",
        || async { list_dead_letters(gw, destination).await.len() == n },
    )
    .await;
    list_dead_letters(gw, destination).await
}

async fn list_dead_letters(gw: &TestGateway, destination: &str) -> Vec<serde_json::Value> {
    let (status, body) = gw
        .admin(
            Method::GET,
            &format!("/admin/dead-letters?destination={destination}"),
            TOKEN,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["dead_letters"].as_array().unwrap().clone()
}

async fn replay(gw: &TestGateway, query: &str) -> serde_json::Value {
    let (status, body) = gw
        .admin(
            Method::POST,
            &format!("/admin/dead-letters/replay?{query}"),
            TOKEN,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// A port nothing listens on.
fn closed_port_url(path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", free_port())
}

/// (a) A destination with a wrong port: the backlog waits; once the URL
/// is fixed by a live reload, it arrives at the new URL, without a restart
/// and within `backoff_max` and a few seconds.
async fn a_wrong_port_fixed_by_reload_delivers_the_backlog(backend: Backend) {
    const N: usize = 20;
    let down = Downstream::start([]).await;
    let wrong = closed_port_url("/results");
    let gw = on(rules(&[("archive", &wrong)]), "", &backend)
        .start()
        .await;
    for i in 0..N {
        assert_eq!(
            gw.post(&job(&format!("a-{i}"), &[]), "").await.status(),
            202
        );
    }
    // Failing at the wrong port, and its circuit open.
    gw.wait_for_metric("hookgate_circuit_open", "destination=\"archive\"", 1.0)
        .await;
    assert!(down.received().is_empty());

    apply(&gw, &rules(&[("archive", &down.url("/results"))])).await;
    let fixed = Instant::now();
    let got = down.wait_for(N, Duration::from_secs(1 + 3)).await;
    let took = fixed.elapsed();
    assert!(got.iter().all(|r| r.path == "/results"));
    let mut ids: Vec<&str> = got
        .iter()
        .map(|r| r.header("x-hookgate-job-id").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N, "every job once");
    gw.wait_for_metric("hookgate_queue_depth", "destination=\"archive\"", 0.0)
        .await;
    let m = gw.metrics().await;
    assert_eq!(
        m.get("hookgate_dead_letters", "destination=\"archive\""),
        0.0
    );
    assert_eq!(
        m.get("hookgate_circuit_open", "destination=\"archive\""),
        0.0
    );
    eprintln!("the backlog of {N} arrived {took:?} after the fix");
    gw.stop().await;
}

/// (b) A dead letter from a 404 on a wrong path: fix the path, replay, and
/// it goes to the new path, with the destination's new headers.
async fn a_dead_letter_replays_to_the_fixed_path(backend: Backend) {
    let down = Downstream::start([]).await;
    down.answer_path("/wrong", Answer::Status(404));
    let gw = on(rules(&[("archive", &down.url("/wrong"))]), "", &backend)
        .start()
        .await;
    assert_eq!(gw.post(&job("b-1", &[]), "").await.status(), 202);
    gw.wait_for_metric("hookgate_dead_letters", "destination=\"archive\"", 1.0)
        .await;
    let dead = dead_letters(&gw, "archive", 1).await;
    assert!(
        dead[0]["reason"].as_str().unwrap().contains("404"),
        "{dead:?}"
    );

    let fixed = format!(
        "[destinations.archive]\nurl = \"{}\"\nheaders = {{ \"X-Fixed\" = \"yes\" }}\n\
         [[rules]]\nname = \"all\"\nforward = [\"archive\"]\n",
        down.url("/right")
    );
    apply(&gw, &fixed).await;
    let report = replay(&gw, "destination=archive").await;
    assert_eq!(report["replayed"], 1, "{report}");
    let got = down.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got[1].path, "/right");
    assert_eq!(got[1].header("x-hookgate-job-id"), Some("b-1"));
    assert_eq!(got[1].header("x-fixed"), Some("yes"));
    gw.wait_for_metric("hookgate_dead_letters", "destination=\"archive\"", 0.0)
        .await;
    gw.stop().await;
}

/// (c) A destination removed from the rules: its pending deliveries become
/// `destination_removed` dead letters at once (not at their next retry),
/// the other destination is untouched; added back, a replay delivers them.
async fn a_removed_destination_dead_letters_its_backlog_and_replays_once_back(backend: Backend) {
    const N: usize = 3;
    let keep = Downstream::start([]).await;
    let gone_url = closed_port_url("/");
    // Retries far apart: only the removal can make them dead letters soon.
    let gw = on(
        rules(&[("keep", &keep.url("/")), ("gone", &gone_url)]),
        "backoff_initial = \"1h\"\nbackoff_max = \"1h\"",
        &backend,
    )
    .start()
    .await;
    for i in 0..N {
        assert_eq!(
            gw.post(&job(&format!("c-{i}"), &[]), "").await.status(),
            202
        );
    }
    keep.wait_for(N, Duration::from_secs(5)).await;
    eventually(
        Duration::from_secs(5),
        "a first failed attempt each",
        || async {
            gw.metrics().await.find(
                "hookgate_forward_attempts_total",
                "destination=\"gone\",outcome=\"connect_error\"",
            ) == Some(N as f64)
        },
    )
    .await;

    apply(&gw, &rules(&[("keep", &keep.url("/"))])).await;
    gw.wait_for_metric("hookgate_dead_letters", "destination=\"gone\"", N as f64)
        .await;
    gw.wait_for_metric("hookgate_queue_depth", "destination=\"gone\"", 0.0)
        .await;
    for letter in dead_letters(&gw, "gone", N).await {
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.starts_with("destination_removed"), "{reason}");
    }

    let back = Downstream::start([]).await;
    apply(
        &gw,
        &rules(&[("keep", &keep.url("/")), ("gone", &back.url("/back"))]),
    )
    .await;
    let report = replay(&gw, "destination=gone").await;
    assert_eq!(report["replayed"], N, "{report}");
    let got = back.wait_for(N, Duration::from_secs(5)).await;
    assert!(got.iter().all(|r| r.path == "/back"));
    gw.wait_for_metric("hookgate_dead_letters", "destination=\"gone\"", 0.0)
        .await;
    assert_eq!(
        keep.received().len(),
        N,
        "the kept destination got each once"
    );
    gw.stop().await;
}

/// `replay?reroute=true` routes a dead letter's job again through the rules
/// in force, whatever destination it died at: here one renamed.
async fn replay_with_reroute_sends_dead_letters_where_the_rules_now_say(backend: Backend) {
    let down = Downstream::start([]).await;
    down.answer_path("/old", Answer::Status(410));
    let gw = on(rules(&[("old", &down.url("/old"))]), "", &backend)
        .start()
        .await;
    assert_eq!(gw.post(&job("r-1", &[]), "").await.status(), 202);
    gw.wait_for_metric("hookgate_dead_letters", "destination=\"old\"", 1.0)
        .await;

    apply(&gw, &rules(&[("new", &down.url("/new"))])).await;
    let report = replay(&gw, "destination=old&reroute=true").await;
    assert_eq!(report["rerouted"], 1, "{report}");
    let got = down.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got[1].path, "/new");
    assert_eq!(got[1].header("x-hookgate-job-id"), Some("r-1"));
    gw.wait_for_metric("hookgate_dead_letters", "destination=\"old\"", 0.0)
        .await;
    gw.wait_for_metric(
        "hookgate_deliveries_total",
        "destination=\"new\",result=\"delivered\"",
        1.0,
    )
    .await;
    gw.stop().await;
}

/// Two tenants' hosts behind one templated destination, on 127.0.0.1 and
/// 127.0.0.2.
struct Tenants {
    good: Downstream,
    bad: Downstream,
    gw: TestGateway,
}

impl Tenants {
    async fn start(backend: &Backend) -> Self {
        let port = free_port();
        let at = |host: &str| -> SocketAddr { format!("{host}:{port}").parse().unwrap() };
        let good = Downstream::start_on(at("127.0.0.1"), []).await;
        let bad = Downstream::start_on(at("127.0.0.2"), []).await;
        let url = format!("http://127.0.0.{{query.host}}:{port}/results");
        let gw = on(
            format!(
                "[destinations.tenants]\nurl = \"{url}\"\nconcurrency = 4\n\
                 [[rules]]\nname = \"all\"\nforward = [\"tenants\"]\n"
            ),
            "",
            backend,
        )
        .start()
        .await;
        Self { good, bad, gw }
    }

    /// Sends `n` jobs for the good tenant at once; how long until the last
    /// one arrived.
    async fn good_burst(&self, tag: &str, n: usize) -> Duration {
        let before = self.good.received().len();
        let started = Instant::now();
        for i in 0..n {
            let body = job(&format!("{tag}-{i}"), &[]);
            assert_eq!(self.gw.post(&body, "host=1").await.status(), 202);
        }
        let got = self
            .good
            .wait_for(before + n, Duration::from_secs(30))
            .await;
        got.iter().map(|r| r.at).max().unwrap() - started
    }
}

/// (d) One tenant's host answering 500 opens only its own origin's circuit:
/// the other tenant's deliveries take no longer than with no failing
/// tenant. Both are measured here, one after the other.
async fn one_tenants_outage_never_delays_another(backend: Backend) {
    const N: usize = 10;
    let t = Tenants::start(&backend).await;
    // Warm up, then the baseline with no failing tenant.
    t.good_burst("warm", N).await;
    let alone = t.good_burst("alone", N).await;

    t.bad.answer_all(Some(Answer::Status(500)));
    for i in 0..30 {
        let body = job(&format!("bad-{i}"), &[]);
        assert_eq!(t.gw.post(&body, "host=2").await.status(), 202);
    }
    t.gw.wait_for_metric("hookgate_circuit_open", "destination=\"tenants\"", 1.0)
        .await;
    let beside = t.good_burst("beside", N).await;
    // The failing tenant was failing throughout, and still waits.
    let m = t.gw.metrics().await;
    assert_eq!(
        m.get("hookgate_circuit_open", "destination=\"tenants\""),
        1.0
    );
    eventually(
        Duration::from_secs(5),
        "the failing tenant's 30 queued",
        || async {
            t.gw.metrics()
                .await
                .get("hookgate_queue_depth", "destination=\"tenants\"")
                >= 30.0
        },
    )
    .await;
    eprintln!("{N} deliveries: {alone:?} alone, {beside:?} beside a failing tenant");
    assert!(
        beside <= alone * 2 + Duration::from_millis(300),
        "{beside:?} beside a failing tenant against {alone:?} alone"
    );

    // Back up: its backlog drains and its circuit closes.
    t.bad.answer_all(None);
    t.gw.wait_for_metric("hookgate_queue_depth", "destination=\"tenants\"", 0.0)
        .await;
    t.gw.wait_for_metric("hookgate_circuit_open", "destination=\"tenants\"", 0.0)
        .await;
    t.gw.stop().await;
}

/// (e) What an operator reads in the log through an outage: the circuit
/// opening and closing, the destination stalled, a dead letter, the
/// backlog drained; each once, and no failed attempt at WARN.
#[tokio::test]
async fn an_outage_is_told_in_the_log_once_per_transition() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let strict = Downstream::start([Answer::Status(404)]).await;
    let (dir, config) = durable(
        rules(&[
            ("archive", &format!("http://{addr}/results")),
            ("strict", &strict.url("/")),
        ]),
        "stalled_after = \"1s\"\nbackoff_max = \"300ms\"",
    )
    .write();
    let gw = BinaryGateway::spawn(dir.path(), &config, &[("RUST_LOG", "info")]).await;
    for i in 0..3 {
        assert_eq!(gw.post(&job(&format!("e-{i}"), &[])).await.status(), 202);
    }
    let log_has = |what: &'static str| {
        let gw = &gw;
        move || async move { gw.log().contains(what) }
    };
    eventually(
        Duration::from_secs(10),
        "circuit opened",
        log_has("circuit opened"),
    )
    .await;
    eventually(Duration::from_secs(10), "stalled", log_has("succeeded for")).await;
    // The outage goes on for a while: nothing more is said about it.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let up = Downstream::start_on(addr, []).await;
    up.wait_for(3, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(10),
        "backlog drained",
        log_has("backlog drained"),
    )
    .await;
    let (_, log) = gw.stop().await;

    let lines = |what: &str| -> Vec<&str> { log.lines().filter(|l| l.contains(what)).collect() };
    let once = |what: &str, level: &str| {
        let found = lines(what);
        assert_eq!(found.len(), 1, "{what}: {found:#?}\n{log}");
        assert!(found[0].contains(level), "{}", found[0]);
        found[0].to_owned()
    };
    let opened = once("circuit opened", "WARN");
    for field in [
        "destination=archive",
        &format!("origin=http://127.0.0.1:{port}"),
        "consecutive_failures=5",
        "cooldown=",
    ] {
        assert!(opened.contains(field), "{field} in {opened}");
    }
    let closed = once("circuit closed", "WARN");
    assert!(closed.contains("destination=archive"), "{closed}");
    let stalled = once("succeeded for", "WARN");
    assert!(stalled.contains("destination=archive"), "{stalled}");
    once("succeed again", "INFO");
    once("backlog drained", "INFO");
    let dead = once("dead letter", "WARN");
    for field in ["job_id=e-", "destination=strict", "attempts=1", "404"] {
        assert!(dead.contains(field), "{field} in {dead}");
    }
    let failed_attempts_at_warn = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("retrying"))
        .count();
    assert_eq!(failed_attempts_at_warn, 0, "{log}");
}

/// A spool written by the release whose records carried the URL and
/// headers resolved at accept (`tests/fixtures/spool-v1`, made by its
/// `make.sh`): it opens, its records are rewritten without them, and its
/// deliveries go where the rules in force say, with their headers.
#[tokio::test]
async fn a_format_1_spool_is_migrated_and_follows_the_rules_in_force() {
    let down = Downstream::start([]).await;
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spool-v1/spool.redb");
    // The fixture's jobs were accepted on the day it was made: an age
    // limit that has not run out for them.
    let builder = durable(
        format!(
            "[destinations.archive]\nurl = \"{}\"\nheaders = {{ \"X-New\" = \"now\" }}\n\
             [destinations.tenant]\nurl = \"{}\"\n\
             [destinations.refuser]\nurl = \"{}\"\n\
             [[rules]]\nname = \"flagged\"\nmatch = {{ flagged = true }}\nforward = [\"archive\", \"tenant\"]\n\
             headers = {{ \"X-Rule\" = \"now\" }}\n",
            down.url("/fixed"),
            down.url("/t/{query.tenant}"),
            down.url("/refuser"),
        ),
        "max_age = \"1000000h\"",
    );
    // A spool directory of the test's own, to read after the gateway stops.
    let spool = tempfile::tempdir().unwrap();
    let path = spool.path().join("spool.redb");
    std::fs::copy(&fixture, &path).unwrap();
    let builder = builder.config(&format!("[spool]\npath = \"{}\"", spool.path().display()));
    let (dir, config) = builder.write();
    let gw = TestGateway::launch(dir, config).await;

    // Pending in the fixture: three for archive (its stored URL a closed
    // port), two for tenant.
    let got = down.wait_for(5, Duration::from_secs(10)).await;
    let to = |path: &str| got.iter().filter(|r| r.path == path).count();
    assert_eq!((to("/fixed"), to("/t/acme")), (3, 2), "{got:#?}");
    for r in got.iter().filter(|r| r.path == "/fixed") {
        assert_eq!(r.header("x-new"), Some("now"));
        assert_eq!(r.header("x-rule"), Some("now"));
        assert_eq!(r.header("x-old"), None, "headers stored at accept are gone");
        assert_eq!(r.header("x-hookgate-rule"), Some("flagged"));
    }
    // Dead letters in the fixture: refused, not forwarded (no tenant),
    // unrouted. The refused one replays to the destination's URL now.
    let m = gw.metrics().await;
    for destination in ["refuser", "tenant", "unrouted"] {
        let labels = format!("destination=\"{destination}\"");
        assert_eq!(
            m.get("hookgate_dead_letters", &labels),
            1.0,
            "{destination}"
        );
    }
    let report = replay(&gw, "destination=refuser").await;
    assert_eq!(report["replayed"], 1, "{report}");
    let got = down.wait_for(6, Duration::from_secs(5)).await;
    assert_eq!(got[5].path, "/refuser");
    assert_eq!(got[5].header("x-hookgate-job-id"), Some("v1-refused"));
    gw.stop().await;

    // On disk: format 2, and no record carries a URL any more.
    let db = redb::Database::open(&path).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    let format = txn
        .open_table(meta)
        .unwrap()
        .get("format")
        .unwrap()
        .unwrap();
    assert_eq!(format.value(), 2);
    let dead: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("dead");
    let table = txn.open_table(dead).unwrap();
    let mut records = 0;
    for entry in redb::ReadableTable::iter(&table).unwrap() {
        let (_, raw) = entry.unwrap();
        let record: serde_json::Value = serde_json::from_slice(raw.value()).unwrap();
        assert!(record.get("url").is_none(), "{record}");
        assert!(record.get("headers").is_none(), "{record}");
        records += 1;
    }
    assert_eq!(records, 2, "the two dead letters not replayed");
}
