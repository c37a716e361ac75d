//! Durable mode: accepted means on disk; delivered through outages,
//! crashes and restarts; dead letters replayable; duplicates forwarded once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::Method;

use crate::support::*;

const TOKEN: &str = "durable-admin-token-42";

on_both_backends!(
    retry_after_is_a_floor,
    refused_jobs_become_dead_letters_and_replay,
    unrouted_jobs_wait_for_better_rules_and_purge_is_explicit,
    a_hanging_destination_does_not_delay_another,
    duplicates_are_forwarded_once_across_restarts,
    sigterm_keeps_pending_deliveries_for_the_next_start,
    a_long_queue_waits_on_disk_and_is_delivered_whole,
    a_full_spool_refuses_with_retry_after,
);

fn durable(rules: String) -> GatewayBuilder {
    on(rules, &Backend::Embedded)
}

/// A durable gateway keeping its deliveries in `backend`.
fn on(rules: String, backend: &Backend) -> GatewayBuilder {
    GatewayBuilder::new(rules)
        .on(backend)
        .config("[delivery]\nmode = \"durable\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\nmax_attempts = 1000")
        .admin_token(TOKEN)
}

fn to(url: &str) -> String {
    format!(
        "[destinations.down]\nurl = \"{url}\"\n[[rules]]\nname = \"all\"\nforward = [\"down\"]\n"
    )
}

/// Kill -9 at random points while 500 webhooks are being accepted with the
/// downstream down; after a restart with it up, every job answered 202 is
/// delivered. Five rounds, each with its own kill point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_accepted_webhook() {
    let mut total_duplicates = 0;
    for round in 0..5 {
        let port = free_port();
        let down_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (dir, config) = durable(to(&format!("http://{down_addr}/hook"))).write();
        let envs = [("RUST_LOG", "warn")];
        let gw = BinaryGateway::spawn(dir.path(), &config, &envs).await;
        let (webhook, admin) = (gw.webhook, gw.admin);
        // Kill somewhere between the first and the last of 500 answers.
        let kill_after = fastrand::usize(20..480);
        let killed = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut senders = Vec::new();
        for worker in 0..16 {
            let (client, killed, accepted) = (gw.client.clone(), killed.clone(), accepted.clone());
            senders.push(tokio::spawn(async move {
                for i in 0..500 / 16 + 1 {
                    let id = format!("r{round}-w{worker}-{i}");
                    if killed.load(Ordering::SeqCst) {
                        return;
                    }
                    let sent = client
                        .post(format!("http://{webhook}/results"))
                        .header("X-Hub-Signature-256", sign(&job(&id, &[])))
                        .body(job(&id, &[]))
                        .send()
                        .await;
                    // A request cut by the kill may have been stored or not:
                    // only a 202 is a promise.
                    if let Ok(r) = sent {
                        if r.status() == 202 {
                            accepted.lock().unwrap().push(id);
                        }
                    }
                }
            }));
        }
        while accepted.lock().unwrap().len() < kill_after {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        gw.kill9();
        killed.store(true, Ordering::SeqCst);
        for s in senders {
            let _ = s.await;
        }
        let promised: Vec<String> = accepted.lock().unwrap().clone();
        assert!(promised.len() >= kill_after);

        let down = Downstream::start_on(down_addr, []).await;
        let gw = BinaryGateway::spawn_on(dir.path(), &config, &envs, webhook, admin).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let delivered = loop {
            let mut count: HashMap<String, usize> = HashMap::new();
            for r in down.received() {
                *count
                    .entry(r.header("x-hookgate-job-id").unwrap().to_owned())
                    .or_default() += 1;
            }
            if promised.iter().all(|id| count.contains_key(id)) {
                break count;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: {} of {} accepted jobs delivered",
                promised.iter().filter(|id| count.contains_key(*id)).count(),
                promised.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let duplicates: usize = delivered.values().map(|n| n - 1).sum();
        total_duplicates += duplicates;
        println!(
            "round {round}: killed after {kill_after} answers; {} accepted, all delivered; {} delivered in all, {duplicates} duplicates",
            promised.len(),
            delivered.len()
        );
        let (code, _) = gw.stop().await;
        assert_eq!(code, Some(0));
    }
    println!("duplicates over 5 kills: {total_duplicates}");
}

/// 503 with Retry-After: 2, then 200: delivered, never earlier than asked.
async fn retry_after_is_a_floor(backend: Backend) {
    let down = Downstream::start([Answer::StatusWith(503, "retry-after", "2")]).await;
    let gw = on(to(&down.url("/")), &backend)
        .config("[delivery]\nbackoff_max = \"10s\"")
        .start()
        .await;
    assert_eq!(gw.post(&job("ra", &[]), "").await.status(), 202);
    let got = down.wait_for(2, Duration::from_secs(10)).await;
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_secs(2),
        "second attempt after {gap:?}"
    );
    eventually(Duration::from_secs(5), "delivered is counted", || async {
        gw.metrics().await.get(
            "hookgate_deliveries_total",
            "destination=\"down\",result=\"delivered\"",
        ) == 1.0
    })
    .await;
    gw.wait_for_metric("hookgate_queue_depth", "destination=\"down\"", 0.0)
        .await;
    gw.stop().await;
}

/// A 400 is final: a dead letter after one attempt, listed with its
/// reason; replay (with the token) after the fix delivers it.
async fn refused_jobs_become_dead_letters_and_replay(backend: Backend) {
    let down = Downstream::start([Answer::Status(400)]).await;
    let gw = on(to(&down.url("/")), &backend).start().await;
    assert_eq!(gw.post(&job("dl", &[]), "").await.status(), 202);
    eventually(Duration::from_secs(5), "the dead letter gauge", || async {
        gw.metrics()
            .await
            .get("hookgate_dead_letters", "destination=\"down\"")
            == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(down.received().len(), 1, "a 400 was retried");
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "hookgate_deliveries_total",
            "destination=\"down\",result=\"dead_lettered\""
        ),
        1.0
    );

    let admin = |path: &str| format!("http://{}{path}", gw.admin);
    let (_, list) = gw
        .admin(Method::GET, "/admin/dead-letters?destination=down", TOKEN)
        .await;
    let letters = list["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{list}");
    assert_eq!(letters[0]["job_id"], "dl");
    assert_eq!(letters[0]["attempts"], 1);
    assert!(
        letters[0]["reason"].as_str().unwrap().contains("400"),
        "{list}"
    );

    let refused = gw
        .client
        .post(admin("/admin/dead-letters/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "replay without the token");
    let (status, _) = gw.admin(Method::GET, "/admin/dead-letters", "guess").await;
    assert_eq!(status, 401, "listing with a wrong token");
    // A misspelt parameter is named, with what the call takes; the token
    // is checked first.
    let misspelt = "/admin/dead-letters?destinaton=down";
    let (status, body) = gw.admin(Method::GET, misspelt, TOKEN).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("destinaton") && error.contains("destination, job_id, after, limit"),
        "{error}"
    );
    let (status, _) = gw.admin(Method::GET, misspelt, "guess").await;
    assert_eq!(status, 401);
    assert_eq!(
        gw.metrics()
            .await
            .get("hookgate_dead_letters", "destination=\"down\""),
        1.0
    );

    // The downstream is fixed (its script is spent: it now answers 200).
    let (_, replayed) = gw
        .admin(Method::POST, "/admin/dead-letters/replay?job_id=dl", TOKEN)
        .await;
    assert_eq!(replayed["replayed"], 1, "{replayed}");
    let got = down.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got[1].header("x-hookgate-job-id"), Some("dl"));
    assert_eq!(got[1].body, job("dl", &[]));
    gw.wait_for_metric("hookgate_dead_letters", "destination=\"down\"", 0.0)
        .await;
    gw.stop().await;
}

/// Purge needs a filter (or all=true); unrouted jobs are dead letters
/// that a replay re-routes once the rules cover them.
async fn unrouted_jobs_wait_for_better_rules_and_purge_is_explicit(backend: Backend) {
    let down = Downstream::start([]).await;
    let only_high = format!(
        "[destinations.down]\nurl = \"{}\"\n[[rules]]\nname = \"high\"\nmatch = {{ min_risk = \"HIGH\" }}\nforward = [\"down\"]\n",
        down.url("/")
    );
    let gw = on(only_high, &backend).start().await;
    assert_eq!(
        gw.post(&job("low", &[("HATE_SPEECH", "LOW")]), "")
            .await
            .status(),
        202
    );
    assert_eq!(gw.post(&job("low2", &[]), "").await.status(), 202);
    let m = gw.metrics().await;
    assert_eq!(
        m.get("hookgate_jobs_routed_total", "rule=\"unrouted\""),
        2.0
    );
    gw.wait_for_metric("hookgate_dead_letters", "destination=\"unrouted\"", 2.0)
        .await;
    let (status, _) = gw.admin(Method::DELETE, "/admin/dead-letters", TOKEN).await;
    assert_eq!(status, 400, "purging everything needs all=true");
    let (_, purged) = gw
        .admin(Method::DELETE, "/admin/dead-letters?job_id=low2", TOKEN)
        .await;
    assert_eq!(purged["purged"], 1);

    std::fs::write(gw.dir().join("rules.toml"), to(&down.url("/"))).unwrap();
    assert_eq!(gw.reload(Some(TOKEN)).await.status(), 200);
    let (_, replayed) = gw
        .admin(
            Method::POST,
            "/admin/dead-letters/replay?destination=unrouted",
            TOKEN,
        )
        .await;
    assert_eq!(replayed["rerouted"], 1, "{replayed}");
    let got = down.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].header("x-hookgate-job-id"), Some("low"));
    assert_eq!(got[0].header("x-hookgate-rule"), Some("all"));
    gw.wait_for_metric("hookgate_dead_letters", "destination=\"unrouted\"", 0.0)
        .await;
    gw.stop().await;
}

/// One hanging destination does not delay deliveries to another.
async fn a_hanging_destination_does_not_delay_another(backend: Backend) {
    let hang = Downstream::start(vec![Answer::Hang; 100]).await;
    let fast = Downstream::start([]).await;
    let rules = format!(
        r#"
[destinations.hang]
url = "{}"
timeout = "30s"
concurrency = 2
[destinations.fast]
url = "{}"
[[rules]]
name = "both"
forward = ["hang", "fast"]
"#,
        hang.url("/"),
        fast.url("/")
    );
    let gw = on(rules, &backend)
        .config("[shutdown]\ngrace = \"500ms\"")
        .start()
        .await;
    let started = tokio::time::Instant::now();
    for i in 0..20 {
        assert_eq!(gw.post(&job(&format!("h{i}"), &[]), "").await.status(), 202);
    }
    fast.wait_for(20, Duration::from_secs(3)).await;
    println!(
        "20 deliveries to the fast destination in {:?} while the other hangs",
        started.elapsed()
    );
    assert_eq!(
        hang.received().len(),
        2,
        "the hanging destination's concurrency limit"
    );
    // The last delivery is recorded just after the downstream answers it.
    eventually(
        Duration::from_secs(5),
        "fast drained, hang holding 20",
        || async {
            let m = gw.metrics().await;
            m.get("hookgate_queue_depth", "destination=\"hang\"") == 20.0
                && m.get("hookgate_queue_depth", "destination=\"fast\"") == 0.0
        },
    )
    .await;
    gw.stop().await;
}

/// The same job_id twice, and again after a restart: forwarded once.
async fn duplicates_are_forwarded_once_across_restarts(backend: Backend) {
    let down = Downstream::start([]).await;
    let gw = on(to(&down.url("/")), &backend).start().await;
    let body = job("dup-1", &[("ARMS_AMMO", "HIGH")]);
    let first = gw.post(&body, "").await;
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = first.json().await.unwrap();
    assert_eq!(first.get("duplicate"), None, "{first}");
    down.wait_for(1, Duration::from_secs(5)).await;
    let again = gw.post(&body, "").await;
    assert_eq!(again.status(), 202);
    // The answer says why nothing more will arrive.
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["job_id"], "dup-1", "{again}");
    let m = gw.metrics().await;
    assert_eq!(m.get("hookgate_jobs_duplicate_total", ""), 1.0);
    let flagged = "category=\"ARMS_AMMO\",risk_level=\"HIGH\"";
    assert_eq!(
        m.get("hookgate_jobs_flagged_total", flagged),
        1.0,
        "a duplicate is not a new job"
    );
    assert_eq!(m.get("hookgate_jobs_routed_total", "rule=\"all\""), 1.0);
    let gw = gw.restart().await;
    assert_eq!(gw.post(&body, "").await.status(), 202);
    let m = gw.metrics().await;
    assert_eq!(
        m.get("hookgate_jobs_duplicate_total", ""),
        1.0,
        "the duplicate after the restart"
    );
    assert_eq!(m.get("hookgate_jobs_flagged_total", flagged), 0.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(down.received().len(), 1);
    gw.stop().await;
}

/// Past spool.max_bytes: 503 with Retry-After, never a 202 that is not on
/// disk; everything that got a 202 is delivered once the downstream is up.
async fn a_full_spool_refuses_with_retry_after(backend: Backend) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let gw = on(to(&format!("http://{addr}/")), &backend)
        .config("[spool]\nmax_bytes = \"20KiB\"")
        .start()
        .await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..200 {
        let id = format!("full-{i}");
        let response = gw.post(&job(&id, &[]), "").await;
        match response.status().as_u16() {
            202 => accepted.push(id),
            503 => {
                assert_eq!(response.headers().get("retry-after").unwrap(), "10");
                refused += 1;
            }
            other => panic!("{other}"),
        }
    }
    assert!(
        refused > 0 && accepted.len() > 5,
        "{} accepted, {refused} refused",
        accepted.len()
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.get("hookgate_webhooks_rejected_total", "reason=\"overloaded\""),
        refused as f64
    );
    // The sender of an accepted job that retries is acknowledged, full or not.
    let again = gw.post(&job(&accepted[0], &[]), "").await;
    assert_eq!(again.status(), 202);
    let body: serde_json::Value = again.json().await.unwrap();
    assert_eq!(body["duplicate"], true, "{body}");
    let down = Downstream::start_on(addr, []).await;
    let got = down.wait_for(accepted.len(), Duration::from_secs(20)).await;
    let ids = distinct_job_ids(&got);
    let mut want: Vec<&str> = accepted.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    println!(
        "{} accepted, {refused} refused with 503 at a 20 KiB spool",
        accepted.len()
    );
    gw.stop().await;
}

/// A damaged spool file is moved aside and an empty spool started.
#[tokio::test]
async fn a_damaged_spool_is_moved_aside() {
    let down = Downstream::start([]).await;
    let (dir, path) = durable(to(&down.url("/"))).write();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("spool.redb"), vec![0xA5; 64 * 1024]).unwrap();
    let gw = BinaryGateway::spawn(dir.path(), &path, &[]).await;
    assert_eq!(gw.post(&job("after-damage", &[])).await.status(), 202);
    down.wait_for(1, Duration::from_secs(5)).await;
    let (code, log) = gw.stop().await;
    assert_eq!(code, Some(0));
    assert!(log.contains("THE SPOOL FILE WAS DAMAGED"), "{log}");
    let aside: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
        .collect();
    assert_eq!(aside.len(), 1);
}

/// SIGTERM with deliveries pending: exit 0 at once, and they are delivered
/// after the next start.
async fn sigterm_keeps_pending_deliveries_for_the_next_start(backend: Backend) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (dir, path) = on(to(&format!("http://{addr}/")), &backend).write();
    let gw = BinaryGateway::spawn(dir.path(), &path, &[]).await;
    for i in 0..20 {
        assert_eq!(gw.post(&job(&format!("t{i}"), &[])).await.status(), 202);
    }
    let started = std::time::Instant::now();
    let (code, log) = gw.stop().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let down = Downstream::start_on(addr, []).await;
    let gw = BinaryGateway::spawn(dir.path(), &path, &[]).await;
    down.wait_for(20, Duration::from_secs(10)).await;
    let _ = gw.stop().await;
}

/// A queue longer than a lane holds in memory (4,096 deliveries) waits on
/// disk, survives a restart, and is delivered whole once the destination
/// is back: each job once.
async fn a_long_queue_waits_on_disk_and_is_delivered_whole(backend: Backend) {
    const N: usize = 5_000;
    let down_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = on(to(&format!("http://{down_addr}/hook")), &backend)
        .start()
        .await;
    let client = reqwest::Client::new();
    let url = gw.url("/results");
    let mut senders = Vec::new();
    for worker in 0..16 {
        let (client, url) = (client.clone(), url.clone());
        senders.push(tokio::spawn(async move {
            for i in (worker..N).step_by(16) {
                let body = job(&format!("long-{i}"), &[]);
                let r = client
                    .post(&url)
                    .header("X-Hub-Signature-256", sign(&body))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let depth = |m: &Metrics| m.get("hookgate_queue_depth", "destination=\"down\"");
    gw.wait_for_metric("hookgate_queue_depth", "destination=\"down\"", N as f64)
        .await;

    let gw = gw.restart().await;
    gw.wait_for_metric("hookgate_queue_depth", "destination=\"down\"", N as f64)
        .await;

    let down = Downstream::start_on(down_addr, []).await;
    let got = down.wait_for(N, Duration::from_secs(60)).await;
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.header("x-hookgate-job-id").unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N, "every job delivered");
    eventually(Duration::from_secs(5), "the queue drained", || async {
        depth(&gw.metrics().await) == 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(down.received().len(), N, "no job delivered twice");
    gw.stop().await;
}

/// Direct mode has no spool: the dead-letter calls check the token first,
/// then answer 409 rather than pretend there is nothing.
#[tokio::test]
async fn dead_letter_calls_in_direct_mode() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[delivery]\nmode = \"direct\"")
        .admin_token(TOKEN)
        .start()
        .await;
    let calls = [
        (Method::GET, "/admin/dead-letters"),
        (Method::POST, "/admin/dead-letters/replay?reroute=true"),
        (Method::DELETE, "/admin/dead-letters?all=true"),
    ];
    for (method, path) in calls {
        let (status, _) = gw.admin(method.clone(), path, "guess").await;
        assert_eq!(status, 401, "{method} {path} without the token");
        let (status, body) = gw.admin(method.clone(), path, TOKEN).await;
        assert_eq!(status, 409, "{method} {path}");
        assert!(body["error"].as_str().unwrap().contains("direct"), "{body}");
    }
    gw.stop().await;
}
