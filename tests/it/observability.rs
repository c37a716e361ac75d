//! The dashboard and alerts against the real thing: every metric they name
//! exists, promtool accepts the exposition and the rules, the alerts' unit
//! tests pass, and a real Prometheus scraping a real gateway evaluates every
//! panel's query to what a scripted mix of webhooks should show.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Prometheus tool from the `prometheus` Debian package.
fn tool(name: &str) -> Option<PathBuf> {
    crate::support::tool(name, "apt-get install prometheus")
}

fn dashboard() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(root().join("dashboards/hookgate.json")).unwrap())
        .unwrap()
}

/// Every PromQL expression of the dashboard's panels.
fn panel_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("hookgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

async fn durable_on(rules: String, backend: &Backend) -> TestGateway {
    GatewayBuilder::new(rules)
        .config(
            "[delivery]\nmode = \"durable\"\nbackoff_initial = \"10ms\"\nbackoff_max = \"20ms\"",
        )
        .on(backend)
        .start()
        .await
}

on_both_backends!(every_metric_in_the_dashboard_and_alerts_is_exported);
on_both_backends!(
    needs prometheus;
    promtool_accepts_the_exposition_and_the_rules,
    every_panel_evaluates_on_a_real_prometheus,
);

/// The health series of the other backend than `backend`: each exists
/// only with its own.
fn other_backend(backend: &Backend) -> &'static [&'static str] {
    match backend {
        Backend::Embedded => &["hookgate_queue_backend_up"],
        Backend::Nats(_) => &[
            "hookgate_spool_errors_total",
            "hookgate_spool_quarantined_records",
            "hookgate_spool_writable",
        ],
    }
}

async fn every_metric_in_the_dashboard_and_alerts_is_exported(backend: Backend) {
    let down = Downstream::start([]).await;
    let gw = durable_on(GatewayBuilder::forward_all_rules(&down.url("/")), &backend).await;
    let exposition = gw.metrics().await.0;
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    let dashboard_text = std::fs::read_to_string(root().join("dashboards/hookgate.json")).unwrap();
    let alerts_text = std::fs::read_to_string(root().join("dashboards/alerts.yml")).unwrap();
    let mut named = metric_names(&dashboard_text);
    named.extend(metric_names(&alerts_text));
    assert!(named.len() >= 15, "{named:?}");
    for name in other_backend(&backend) {
        assert!(
            named.remove(*name),
            "{name} is on the dashboard or in the alerts"
        );
    }
    let missing: Vec<&String> = named.difference(&exported).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}");
    // And the other way: every exported family is on the dashboard.
    let on_dashboard = metric_names(&dashboard_text);
    let unshown: Vec<&String> = exported.difference(&on_dashboard).collect();
    assert!(unshown.is_empty(), "exported but on no panel: {unshown:?}");
    gw.stop().await;
}

async fn promtool_accepts_the_exposition_and_the_rules(backend: Backend) {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let down = Downstream::start([]).await;
    let gw = durable_on(GatewayBuilder::forward_all_rules(&down.url("/")), &backend).await;
    assert_eq!(
        gw.post(&job("p1", &[("ARMS_AMMO", "HIGH")]), "")
            .await
            .status(),
        202
    );
    let exposition = gw.metrics().await.0;
    let mut child = ChildGuard::spawn(
        Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    use std::io::Write;
    child
        .child_mut()
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.into_inner().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(root().join("dashboards/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
    gw.stop().await;
}

#[test]
#[ignore = "needs promtool (apt-get install prometheus); CI runs it"]
fn alert_unit_tests_pass() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let out = Command::new(promtool)
        .args(["test", "rules"])
        .arg(root().join("dashboards/alerts_test.yml"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_dashboard_imports_into_current_grafana() {
    let d = dashboard();
    assert_eq!(d["uid"], "hookgate");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 39);
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus")
    );
    assert!(vars.iter().any(|v| v["name"] == "instance"));
    let mut ids = BTreeSet::new();
    for panel in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate panel id"
        );
        let pos = &panel["gridPos"];
        assert!(pos["w"].as_u64().unwrap() <= 24 && pos["h"].as_u64().unwrap() > 0);
        if panel["type"] == "row" {
            continue;
        }
        // No hard-coded datasource: always the variable.
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let description = panel["description"].as_str().unwrap_or_default();
        assert!(
            description.len() > 40,
            "{}: says what healthy looks like",
            panel["title"]
        );
        for t in panel["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${datasource}");
            assert!(
                t["expr"]
                    .as_str()
                    .unwrap()
                    .contains("instance=~\"$instance\""),
                "{}",
                panel["title"]
            );
        }
    }
    let rows: Vec<&str> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        rows,
        [
            "Ingress",
            "Moderation",
            "Routing",
            "Delivery",
            "Config",
            "Queue"
        ]
    );
}

struct Prometheus {
    _child: ChildGuard,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(binary: &Path, target: std::net::SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: hookgate\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = ChildGuard::spawn(
            Command::new(binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let p = Self {
            _child: child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let client = reqwest::Client::builder().build().unwrap();
        eventually(Duration::from_secs(20), "prometheus is ready", || {
            let req = client.get(format!("{}/-/ready", p.url)).send();
            async move { req.await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        p
    }

    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let body: serde_json::Value = reqwest::Client::builder()
            .build()
            .unwrap()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["status"], "success", "{expr}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The single value of an instant query.
    async fn value(&self, expr: &str) -> f64 {
        let result = self.query(expr).await;
        assert_eq!(result.len(), 1, "{expr}: {result:?}");
        result[0]["value"][1].as_str().unwrap().parse().unwrap()
    }
}

async fn every_panel_evaluates_on_a_real_prometheus(backend: Backend) {
    let Some(binary) = tool("prometheus") else {
        return;
    };
    let ok = Downstream::start([]).await;
    let failing = Downstream::start(vec![Answer::Status(503); 1000]).await;
    let rules = format!(
        r#"
[destinations.ok]
url = "{}"
[destinations.failing]
url = "{}"
max_attempts = 2
[[rules]]
name = "errors"
match = {{ is_error = true }}
forward = ["ok"]
[[rules]]
name = "high"
match = {{ min_risk = "HIGH" }}
forward = ["failing"]
continue = true
[[rules]]
name = "default"
forward = ["ok"]
"#,
        ok.url("/"),
        failing.url("/")
    );
    let gw = durable_on(rules, &backend).await;
    let prometheus = Prometheus::start(&binary, gw.admin).await;
    // Counters must be seen before the script moves them, or their
    // increase is invisible to rate() and increase().
    eventually(Duration::from_secs(20), "a first scrape", || async {
        prometheus.query("up{job=\"hookgate\"} == 1").await.len() == 1
    })
    .await;

    // The script.
    let mut sent = 0;
    for i in 0..4 {
        assert_eq!(
            gw.post(&job(&format!("high-{i}"), &[("ARMS_AMMO", "HIGH")]), "")
                .await
                .status(),
            202
        );
    }
    for i in 0..3 {
        assert_eq!(
            gw.post(
                &job(&format!("medium-{i}"), &[("HATE_SPEECH", "MEDIUM")]),
                ""
            )
            .await
            .status(),
            202
        );
    }
    for i in 0..3 {
        assert_eq!(
            gw.post(&job(&format!("clean-{i}"), &[]), "").await.status(),
            202
        );
    }
    for i in 0..2 {
        let body = format!(
            r#"{{"data":{{"job_id":"err-{i}","is_error":true,"result":{{"error":"Failed to decode video."}}}}}}"#
        );
        assert_eq!(gw.post(body.as_bytes(), "").await.status(), 202);
    }
    sent += 12;
    for i in 0..5 {
        let body = job(&format!("forged-{i}"), &[]);
        let forged = hookgate::webhook::verify::sign(b"not-the-secret-at-all", &body);
        assert_eq!(gw.post_with(&body, "", Some(&forged)).await.status(), 401);
    }
    for i in 0..2 {
        assert_eq!(
            gw.post_with(&job(&format!("unsigned-{i}"), &[]), "", None)
                .await
                .status(),
            401
        );
    }
    assert_eq!(gw.post(b"not json", "").await.status(), 400);
    sent += 8;
    assert_eq!(
        gw.post(&job("high-0", &[("ARMS_AMMO", "HIGH")]), "")
            .await
            .status(),
        202,
        "a duplicate"
    );
    sent += 1;
    // 4 HIGH jobs dead-letter at `failing` after 2 attempts each.
    ok.wait_for(12, Duration::from_secs(10)).await;
    let gave_up = tokio::time::timeout(Duration::from_secs(10), async {
        while gw
            .metrics()
            .await
            .get("hookgate_dead_letters", "destination=\"failing\"")
            != 4.0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        gave_up.is_ok(),
        "{}",
        gw.metrics()
            .await
            .0
            .lines()
            .filter(|l| l.contains("failing"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eventually(
        Duration::from_secs(20),
        "prometheus has scraped the end of the script",
        || async {
            let q = prometheus.query("hookgate_webhooks_received_total").await;
            let dead = prometheus
                .query("hookgate_dead_letters{destination=\"failing\"}")
                .await;
            q.first()
                .is_some_and(|r| r["value"][1] == sent.to_string().as_str())
                && dead.first().is_some_and(|r| r["value"][1] == "4")
        },
    )
    .await;
    // Rates need two samples inside their window (every series is scraped
    // with this one).
    eventually(
        Duration::from_secs(20),
        "two samples inside a rate window",
        || async {
            prometheus
                .query("count_over_time(hookgate_webhooks_received_total[1m])")
                .await
                .first()
                .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
                .is_some_and(|n| n >= 2.0)
        },
    )
    .await;

    for (title, expr) in panel_queries() {
        if other_backend(&backend).iter().any(|m| expr.contains(m)) {
            continue;
        }
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$instance", ".*");
        let result = prometheus.query(&expr).await;
        assert!(
            !result.is_empty(),
            "panel {title:?}: {expr} returned nothing"
        );
    }

    let p = &prometheus;
    let sum = |m: &str| format!("sum({m})");
    assert_eq!(
        p.value(&sum("hookgate_webhooks_received_total")).await,
        21.0
    );
    assert_eq!(
        p.value(&sum(
            "hookgate_webhooks_rejected_total{reason=\"bad_signature\"}"
        ))
        .await,
        5.0
    );
    assert_eq!(
        p.value(&sum(
            "hookgate_webhooks_rejected_total{reason=\"missing_signature\"}"
        ))
        .await,
        2.0
    );
    assert_eq!(
        p.value(&sum(
            "hookgate_webhooks_rejected_total{reason=\"malformed\"}"
        ))
        .await,
        1.0
    );
    assert_eq!(
        p.value(&sum(
            "hookgate_signature_verified_total{secret=\"current\"}"
        ))
        .await,
        14.0
    );
    assert_eq!(
        p.value(&sum("hookgate_jobs_flagged_total{risk_level=\"HIGH\"}"))
            .await,
        4.0
    );
    assert_eq!(
        p.value(&sum(
            "hookgate_jobs_flagged_total{risk_level=\"MEDIUM\",category=\"HATE_SPEECH\"}"
        ))
        .await,
        3.0
    );
    assert_eq!(p.value(&sum("hookgate_jobs_errored_total")).await, 2.0);
    assert_eq!(p.value(&sum("hookgate_jobs_duplicate_total")).await, 1.0);
    assert_eq!(
        p.value(&sum("hookgate_jobs_routed_total{rule=\"high\"}"))
            .await,
        4.0
    );
    assert_eq!(
        p.value(&sum("hookgate_jobs_routed_total{rule=\"default\"}"))
            .await,
        10.0
    );
    assert_eq!(
        p.value(&sum("hookgate_jobs_routed_total{rule=\"errors\"}"))
            .await,
        2.0
    );
    assert_eq!(
        p.value(&sum("hookgate_jobs_routed_total{rule=\"unrouted\"}"))
            .await,
        0.0
    );
    assert_eq!(
        p.value(&sum(
            "hookgate_deliveries_total{destination=\"ok\",result=\"delivered\"}"
        ))
        .await,
        12.0
    );
    assert_eq!(
        p.value(&sum(
            "hookgate_deliveries_total{destination=\"failing\",result=\"dead_lettered\"}"
        ))
        .await,
        4.0
    );
    assert_eq!(
        p.value(&sum(
            "hookgate_forward_attempts_total{destination=\"failing\",outcome=\"http_5xx\"}"
        ))
        .await,
        8.0
    );
    assert_eq!(
        p.value(&sum("hookgate_dead_letters{destination=\"failing\"}"))
            .await,
        4.0
    );
    assert_eq!(p.value(&sum("hookgate_queue_depth")).await, 0.0);
    assert_eq!(
        p.value("min(hookgate_config_last_reload_successful)").await,
        1.0
    );
    assert_eq!(
        p.value("count(count_values(\"hash\", hookgate_config_hash))")
            .await,
        1.0
    );
    // The panels' derived views agree with the script too.
    let ratio = p
        .value("sum(increase(hookgate_webhooks_rejected_total[5m])) / sum(increase(hookgate_webhooks_received_total[5m]))")
        .await;
    assert!((ratio - 8.0 / 21.0).abs() < 0.01, "rejection ratio {ratio}");
    let success = p
        .value("sum(rate(hookgate_forward_attempts_total{destination=\"failing\",outcome=\"success\"}[1m])) / sum(rate(hookgate_forward_attempts_total{destination=\"failing\"}[1m]))")
        .await;
    assert_eq!(success, 0.0);
    gw.stop().await;
}

/// A refusal that repeats is one WARN line per reason per 10 s, carrying
/// the count of those left out; the metric counts every one. An unsafe
/// `{query.NAME}` value is a WARN naming the job, the destination and the
/// parameter.
#[tokio::test]
async fn repeated_warnings_are_rate_limited_and_unsafe_query_values_named() {
    let (dir, path) = GatewayBuilder::new(
        "[destinations.tenant]\nurl = \"http://archive-{query.tenant}.invalid:8080/r\"\n\
         [[rules]]\nname = \"all\"\nforward = [\"tenant\"]\n",
    )
    .config("[delivery]\nmode = \"durable\"")
    .write();
    let gw = BinaryGateway::spawn(dir.path(), &path, &[("HOOKGATE_LOG__FORMAT", "json")]).await;
    let url = format!("http://{}/results", gw.webhook);
    for _ in 0..50 {
        let r = gw
            .client
            .post(&url)
            .header("X-Hub-Signature-256", sign(b"another body"))
            .body(job("unsigned", &[]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = post_signed(&gw.client, &format!("{url}?tenant=.."), job("dot-dot", &[])).await;
    assert_eq!(r.status(), 202);
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "hookgate_webhooks_rejected_total",
            "reason=\"bad_signature\""
        ),
        50.0
    );
    let (code, log) = gw.stop().await;
    assert_eq!(code, Some(0));
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let rejected: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("webhook rejected")
        })
        .collect();
    assert_eq!(rejected.len(), 1, "{log}");
    assert_eq!(rejected[0]["level"], "WARN");
    let unsafe_value = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("not forwarded there")
        })
        .unwrap_or_else(|| panic!("no warning for the unsafe value:\n{log}"));
    assert_eq!(unsafe_value["level"], "WARN");
    assert_eq!(unsafe_value["job_id"], "dot-dot");
    assert_eq!(unsafe_value["destination"], "tenant");
    assert!(
        unsafe_value["message"]
            .as_str()
            .unwrap()
            .contains("`tenant`"),
        "{unsafe_value}"
    );
}
