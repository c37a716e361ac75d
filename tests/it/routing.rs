//! Routing and delivery against real downstreams.

use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;

/// Templated URLs only ever carry safe values: the bad ones reach no server.
#[tokio::test]
async fn template_values_never_reach_a_server() {
    let down = Downstream::start([]).await;
    let port = down.addr.port();
    let rules = format!(
        r#"
[destinations.tenant]
url = "http://127.0.0.1:{port}/tenants/{{query.tenant}}/results"
[[rules]]
name = "per-tenant"
forward = ["tenant"]
"#
    );
    let gw = GatewayBuilder::new(rules).start().await;
    let body = job("t1", &[]);
    assert_eq!(gw.post(&body, "tenant=acme").await.status(), 200);
    assert_eq!(
        down.wait_for(1, Duration::from_secs(5)).await[0].path,
        "/tenants/acme/results"
    );
    for bad in ["..", "a/b", "evil.com:80", "", "a%2Fb", "%2e%2e"] {
        let response = gw.post(&body, &format!("tenant={bad}")).await;
        assert_eq!(response.status(), 502, "{bad:?}");
    }
    gw.stop().await;
    assert_eq!(
        down.received().len(),
        1,
        "a request with an unsafe value went out"
    );
    assert_eq!(down.connections(), 1);
}

/// The payload's callback_url is data, never a destination.
#[tokio::test]
async fn callback_url_is_never_called() {
    let trap = StdListener::bind("127.0.0.1:0").unwrap();
    let trap_addr = trap.local_addr().unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap = tokio::net::TcpListener::from_std(trap).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while trap.accept().await.is_ok() {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/")).start().await;
    let body = format!(
        r#"{{"data":{{"job_id":"cb","callback_url":"http://{trap_addr}/steal?tenant=acme","is_error":false,"result":{{"policy_categories":[]}}}}}}"#
    );
    assert_eq!(gw.post(body.as_bytes(), "").await.status(), 200);
    down.wait_for(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.stop().await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the gateway connected to the callback_url"
    );
}

/// 503, 503, 200: delivered on the third attempt, each attempt counted.
/// A 400 is final: one attempt, and the sender is told 502.
#[tokio::test]
async fn retries_transient_failures_not_client_errors() {
    let down = Downstream::start([
        Answer::Status(503),
        Answer::Status(503),
        Answer::Status(200),
        Answer::Status(400),
    ])
    .await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/")).start().await;
    assert_eq!(gw.post(&job("r1", &[]), "").await.status(), 200);
    assert_eq!(down.received().len(), 3);
    assert_eq!(gw.post(&job("r2", &[]), "").await.status(), 502);
    assert_eq!(down.received().len(), 4, "a 400 was retried");
    let m = gw.metrics().await;
    let attempts = |outcome: &str| {
        m.get(
            "hookgate_forward_attempts_total",
            &format!("destination=\"down\",outcome=\"{outcome}\""),
        )
    };
    assert_eq!(
        (
            attempts("http_5xx"),
            attempts("success"),
            attempts("http_4xx")
        ),
        (2.0, 1.0, 1.0)
    );
    assert_eq!(
        m.get(
            "hookgate_deliveries_total",
            "destination=\"down\",result=\"delivered\""
        ),
        1.0
    );
    assert_eq!(m.get("hookgate_jobs_routed_total", "rule=\"all\""), 2.0);
    gw.stop().await;
}

/// Retry-After is a floor: the next attempt does not come earlier.
#[tokio::test]
async fn honours_retry_after() {
    let down = Downstream::start([Answer::StatusWith(503, "retry-after", "1")]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[delivery]\nbackoff_max = \"5s\"")
        .start()
        .await;
    assert_eq!(gw.post(&job("ra", &[]), "").await.status(), 200);
    let got = down.received();
    assert_eq!(got.len(), 2);
    assert!(
        got[1].at - got[0].at >= Duration::from_secs(1),
        "retried after {:?}",
        got[1].at - got[0].at
    );
    gw.stop().await;
}

/// A hanging downstream: the sender gets 504 within the deadline.
#[tokio::test]
async fn hanging_downstream_times_out() {
    let down = Downstream::start(vec![Answer::Hang; 20]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[delivery]\ntimeout = \"200ms\"\nbackoff_max = \"20ms\"\ndirect_deadline = \"1s\"")
        .start()
        .await;
    let started = std::time::Instant::now();
    assert_eq!(gw.post(&job("h", &[]), "").await.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(3));
    let m = gw.metrics().await;
    assert!(
        m.get(
            "hookgate_forward_attempts_total",
            "destination=\"down\",outcome=\"timeout\""
        ) >= 1.0
    );
    gw.stop().await;
}

/// Per-rule and per-destination series exist at zero before any traffic,
/// and labels from payloads are bounded.
#[tokio::test]
async fn series_exist_at_zero_and_labels_are_bounded() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/")).start().await;
    let m = gw.metrics().await;
    assert_eq!(m.get("hookgate_jobs_routed_total", "rule=\"all\""), 0.0);
    assert_eq!(
        m.get("hookgate_jobs_routed_total", "rule=\"unrouted\""),
        0.0
    );
    assert_eq!(
        m.get(
            "hookgate_forward_attempts_total",
            "destination=\"down\",outcome=\"timeout\""
        ),
        0.0
    );
    assert_eq!(
        m.get(
            "hookgate_deliveries_total",
            "destination=\"down\",result=\"dead_lettered\""
        ),
        0.0
    );
    assert_eq!(
        m.get("hookgate_webhooks_rejected_total", "reason=\"draining\""),
        0.0
    );
    assert_eq!(
        m.get(
            "hookgate_build_info",
            &format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );
    let body = job(
        "b",
        &[
            ("ARMS_AMMO", "HIGH"),
            ("MADE_UP_1", "LOW"),
            ("MADE_UP_2", "EXTREME"),
        ],
    );
    assert_eq!(gw.post(&body, "").await.status(), 200);
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "hookgate_jobs_flagged_total",
            "category=\"ARMS_AMMO\",risk_level=\"HIGH\""
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "hookgate_jobs_flagged_total",
            "category=\"other\",risk_level=\"LOW\""
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "hookgate_jobs_flagged_total",
            "category=\"other\",risk_level=\"other\""
        ),
        1.0
    );
    assert!(!m.0.contains("MADE_UP"));
    gw.stop().await;
}
