//! Live reload of the rules: ConfigMap swaps, invalid versions, deletion,
//! and reloads under load that never mix two versions.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::support::*;

fn rules_version(url: &str, version: &str) -> String {
    format!(
        r#"
[destinations.down]
url = "{url}"
[[rules]]
name = "{version}"
forward = ["down"]
"#
    )
}

/// Writes `..{version}/rules.toml` and points `..data` at it atomically, as
/// the kubelet does.
fn configmap_swap(dir: &Path, version: &str, rules: &str) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("rules.toml"), rules).unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

async fn rule_of_next_delivery(gw: &TestGateway, down: &Downstream, id: &str) -> String {
    let before = down.received().len();
    assert_eq!(gw.post(&job(id, &[]), "").await.status(), 200);
    let got = down.wait_for(before + 1, Duration::from_secs(5)).await;
    got[before].header("x-hookgate-rule").unwrap().to_owned()
}

#[tokio::test]
async fn configmap_symlink_swaps_reload_and_invalid_versions_keep_the_old_rules() {
    let down = Downstream::start([]).await;
    let url = down.url("/");
    let (dir, path) = GatewayBuilder::new("")
        .config("[rules]\nreload_interval = \"250ms\"")
        .write();
    let root = dir.path();
    std::fs::remove_file(root.join("rules.toml")).unwrap();
    configmap_swap(root, "v1", &rules_version(&url, "v1"));
    symlink("..data/rules.toml", root.join("rules.toml")).unwrap();
    let gw = TestGateway::launch(dir, path).await;
    assert_eq!(rule_of_next_delivery(&gw, &down, "a").await, "v1");

    configmap_swap(gw.dir(), "v2", &rules_version(&url, "v2"));
    let mut n = 0;
    let took = eventually(Duration::from_secs(5), "the v2 rules route", || {
        n += 1;
        let id = format!("b{n}");
        let (gw, down) = (&gw, &down);
        async move { rule_of_next_delivery(gw, down, &id).await == "v2" }
    })
    .await;
    println!("v2 in force {took:?} after the swap");

    configmap_swap(
        gw.dir(),
        "broken",
        "[[rules]]\nname = \"x\"\nforward = [\"nowhere\"]\n",
    );
    eventually(
        Duration::from_secs(5),
        "the failed reload is counted",
        || async {
            gw.metrics()
                .await
                .get("hookgate_config_reloads_total", "result=\"failure\"")
                == 1.0
        },
    )
    .await;
    let m = gw.metrics().await;
    assert_eq!(m.get("hookgate_config_last_reload_successful", ""), 0.0);
    assert_eq!(
        rule_of_next_delivery(&gw, &down, "c").await,
        "v2",
        "the old rules must stay"
    );
    let ready = gw
        .client
        .get(format!("http://{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "a failed reload must not make the gateway unready"
    );

    configmap_swap(gw.dir(), "v3", &rules_version(&url, "v3"));
    eventually(
        Duration::from_secs(5),
        "the fixed version loads",
        || async {
            gw.metrics()
                .await
                .get("hookgate_config_last_reload_successful", "")
                == 1.0
        },
    )
    .await;
    assert_eq!(rule_of_next_delivery(&gw, &down, "d").await, "v3");
    let m = gw.metrics().await;
    assert_eq!(
        m.get("hookgate_config_reloads_total", "result=\"success\""),
        3.0
    );
    assert_eq!(m.get("hookgate_jobs_routed_total", "rule=\"v3\""), 1.0);
    assert_eq!(
        m.find("hookgate_jobs_routed_total", "rule=\"v1\""),
        None,
        "series of a removed rule remain"
    );
    gw.stop().await;
}

/// Two versions, each routing every job through two rules to two paths.
/// A job routed by a mix would carry rule names of both versions.
fn two_step_version(url: &str, v: &str) -> String {
    format!(
        r#"
[destinations.first]
url = "{url}first"
[destinations.second]
url = "{url}second"
[[rules]]
name = "{v}-first"
forward = ["first"]
continue = true
[[rules]]
name = "{v}-second"
forward = ["second"]
"#
    )
}

#[tokio::test]
async fn reloads_under_load_never_mix_versions() {
    const TOKEN: &str = "reload-token-0123456789";
    let down = Downstream::start([]).await;
    let url = down.url("/");
    let gw = Arc::new(
        GatewayBuilder::new(two_step_version(&url, "a"))
            .admin_token(TOKEN)
            .config("[rules]\nreload_interval = \"1h\"")
            .start()
            .await,
    );
    // (reload sent, reload answered, version): the switch happens somewhere
    // in between, so a version may be in force from its reload being sent
    // until the next reload is answered.
    let now = Instant::now();
    let timeline = Arc::new(Mutex::new(vec![(now, now, "a")]));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut senders = Vec::new();
    for worker in 0..4 {
        let (gw, stop) = (gw.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut i = 0;
            while !stop.is_cancelled() {
                let id = format!("w{worker}-{i}");
                let started = Instant::now();
                let status = gw.post(&job(&id, &[]), "").await.status();
                assert_eq!(status, 200, "{id} failed during reloads");
                sent.push((id, started, Instant::now()));
                i += 1;
            }
            sent
        }));
    }
    let rules_path = gw.dir().join("rules.toml");
    for n in 0..20 {
        let version = if n % 2 == 0 { "b" } else { "a" };
        let tmp = gw.dir().join("rules.toml.tmp");
        std::fs::write(&tmp, two_step_version(&url, version)).unwrap();
        std::fs::rename(&tmp, &rules_path).unwrap();
        assert_eq!(
            gw.reload(None).await.status(),
            401,
            "reload without a token must be refused"
        );
        assert_eq!(gw.reload(Some("wrong-token")).await.status(), 401);
        let published = Instant::now();
        let response = gw.reload(Some(TOKEN)).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        timeline
            .lock()
            .await
            .push((published, Instant::now(), version));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.cancel();
    let mut sent = Vec::new();
    for s in senders {
        sent.extend(s.await.unwrap());
    }
    assert!(sent.len() >= 40, "only {} webhooks under load", sent.len());
    let received = down.wait_for(2 * sent.len(), Duration::from_secs(10)).await;
    let timeline = timeline.lock().await;
    let mut rules_of: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for r in &received {
        rules_of
            .entry(r.header("x-hookgate-job-id").unwrap())
            .or_default()
            .push(r.header("x-hookgate-rule").unwrap());
    }
    for (id, started, answered) in &sent {
        let rules = rules_of.get(id.as_str()).cloned().unwrap_or_default();
        assert_eq!(rules.len(), 2, "{id}: {rules:?}");
        let version = rules[0].split('-').next().unwrap();
        assert!(
            rules.iter().all(|r| r.starts_with(&format!("{version}-"))),
            "{id} routed by a mix: {rules:?}"
        );
        // Versions in force at some point between sending and the answer.
        let in_force: Vec<&str> = timeline
            .iter()
            .enumerate()
            .filter(|(i, (from, _, _))| {
                let until = timeline.get(i + 1).map(|(_, acked, _)| *acked);
                *from <= *answered && until.is_none_or(|u| u >= *started)
            })
            .map(|(_, (_, _, v))| *v)
            .collect();
        assert!(
            in_force.contains(&version),
            "{id} routed by {version}, in force then: {in_force:?}"
        );
    }
    let m = gw.metrics().await;
    assert_eq!(
        m.get("hookgate_config_reloads_total", "result=\"success\""),
        21.0
    );
    println!(
        "{} webhooks across 20 reloads, none failed, none mixed",
        sent.len()
    );
}

/// Deleting the rules file keeps the rules in force; the failure is logged
/// (by the real binary) and counted.
#[tokio::test]
async fn deleted_rules_file_keeps_the_rules() {
    let down = Downstream::start([]).await;
    let (dir, path) = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[rules]\nreload_interval = \"200ms\"")
        .write();
    let gw = BinaryGateway::spawn(dir.path(), &path, &[]).await;
    std::fs::remove_file(dir.path().join("rules.toml")).unwrap();
    eventually(Duration::from_secs(5), "the failure is counted", || async {
        gw.metrics()
            .await
            .get("hookgate_config_reloads_total", "result=\"failure\"")
            == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let m = gw.metrics().await;
    assert_eq!(
        m.get("hookgate_config_reloads_total", "result=\"failure\""),
        1.0,
        "counted once, not every poll"
    );
    assert_eq!(m.get("hookgate_config_last_reload_successful", ""), 0.0);
    assert_eq!(gw.post(&job("still-routed", &[])).await.status(), 200);
    assert_eq!(down.received().len(), 1);
    let (code, log) = gw.stop().await;
    assert_eq!(code, Some(0));
    assert!(
        log.contains("rules reload failed") && log.contains("No such file"),
        "the failure is not logged:\n{log}"
    );
}

/// Webhooks sent one after another until stopped, each with a new job id.
struct SteadyLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<u16>>,
}

impl SteadyLoad {
    fn start(gw: &TestGateway, prefix: &'static str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (client, url, stopped) = (gw.client.clone(), gw.url("/results"), stop.clone());
        let task = tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!("{prefix}-{}", statuses.len());
                let response = post_signed(&client, &url, job(&id, &[])).await;
                statuses.push(response.status().as_u16());
            }
            statuses
        });
        Self { stop, task }
    }

    /// Stops it; the status of every webhook sent.
    async fn stop(self) -> Vec<u16> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Rules written in place (truncated, then written), as an editor or
/// `cat > rules.toml` does, under load: the poller meets the empty file,
/// refuses it, and no webhook is left unrouted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_file_caught_empty_is_refused_under_load() {
    let down = Downstream::start([]).await;
    let rules = GatewayBuilder::forward_all_rules(&down.url("/"));
    let gw = GatewayBuilder::new(rules.clone())
        .config("[rules]\nreload_interval = \"50ms\"")
        .start()
        .await;
    let load = SteadyLoad::start(&gw, "in-place");
    let file = gw.dir().join("rules.toml");
    for _ in 0..5 {
        std::fs::File::create(&file).unwrap();
        // Until the poller has read the empty file and refused it.
        gw.wait_for_metric("hookgate_config_last_reload_successful", "", 0.0)
            .await;
        std::fs::write(&file, &rules).unwrap();
        gw.wait_for_metric("hookgate_config_last_reload_successful", "", 1.0)
            .await;
    }
    let statuses = load.stop().await;
    let m = gw.metrics().await;
    assert!(m.get("hookgate_config_reloads_total", "result=\"failure\"") >= 5.0);
    assert_eq!(
        m.get("hookgate_jobs_routed_total", "rule=\"unrouted\""),
        0.0
    );
    assert!(statuses.len() > 20, "{} webhooks", statuses.len());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    gw.stop().await;
}

/// Rules written in place and caught part-way, cut at random bytes (half
/// the time just after the first rule, where the prefix is a valid file
/// on its own), while a reload is asked for at that moment: a changed file
/// is loaded only once it has settled, so under load no webhook goes
/// unrouted, and the whole file is what ends up in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_file_caught_half_written_is_not_loaded() {
    let down = Downstream::start([]).await;
    let rules = format!(
        r#"[destinations.a]
url = "{}"

[[rules]]
name = "flagged"
match = {{ flagged = true }}
forward = ["a"]

[[rules]]
name = "default"
forward = ["a"]
"#,
        down.url("/")
    );
    let boundary = rules.find("\n[[rules]]\nname = \"default\"").unwrap() + 1;
    let gw = GatewayBuilder::new(rules.clone())
        .config("[rules]\nreload_interval = \"50ms\"")
        .admin_token("reload-token")
        .start()
        .await;
    let whole = gw.metrics().await.get("hookgate_config_hash", "");
    let load = SteadyLoad::start(&gw, "cut");
    let file = gw.dir().join("rules.toml");
    let mut rng = fastrand::Rng::with_seed(23);
    for _ in 0..20 {
        let cut = if rng.bool() {
            boundary
        } else {
            rng.usize(1..rules.len())
        };
        std::fs::write(&file, &rules.as_bytes()[..cut]).unwrap();
        let reload = gw.reload(Some("reload-token"));
        let finish = async {
            // A writer that takes a moment to write the rest.
            tokio::time::sleep(Duration::from_millis(rng.u64(0..20))).await;
            std::fs::write(&file, &rules).unwrap();
        };
        let (response, ()) = tokio::join!(reload, finish);
        assert!(response.status().is_success() || response.status() == 422);
    }
    gw.wait_for_metric("hookgate_config_last_reload_successful", "", 1.0)
        .await;
    let statuses = load.stop().await;
    // What is in force is the whole file, not a prefix that was loaded.
    assert_eq!(gw.metrics().await.get("hookgate_config_hash", ""), whole);
    let m = gw.metrics().await;
    assert_eq!(
        m.get("hookgate_jobs_routed_total", "rule=\"unrouted\""),
        0.0,
        "webhooks routed by a half-written file"
    );
    assert!(statuses.len() > 20, "{} webhooks", statuses.len());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    gw.stop().await;
}
