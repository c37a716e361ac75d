//! Bad input, abuse and broken downstreams: each gets a clear answer and
//! loses nothing, and none reaches a place it should not.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Sends raw bytes on a new connection and returns what came back before
/// the server closed it or `wait` passed.
async fn raw(addr: std::net::SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn post_head(extra: &str, body_len: usize, signature: &str) -> String {
    format!(
        "POST /results HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {body_len}\r\nx-hub-signature-256: {signature}\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn signature_headers_in_every_odd_form() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/")).start().await;
    let body = job("sig", &[]);
    let good = sign(&body);
    // (header lines, expected status, reason)
    type Case<'a> = (Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("x-hub-signature-256", good.clone())], 200, ""),
        (vec![("X-HUB-SIGNATURE-256", good.clone())], 200, ""),
        (
            vec![("x-hub-signature-256", "".into())],
            401,
            "missing_signature",
        ),
        (
            vec![("x-hub-signature-256", "!!!!".into())],
            401,
            "bad_encoding",
        ),
        (
            vec![("x-hub-signature-256", "AAAA".into())],
            401,
            "bad_encoding",
        ),
        (
            vec![("x-hub-signature-256", format!("sha256={}", "g".repeat(64)))],
            401,
            "bad_encoding",
        ),
        (
            vec![("x-hub-signature-256", format!("sha256={}", "a".repeat(63)))],
            401,
            "bad_encoding",
        ),
        (
            vec![
                ("x-hub-signature-256", good.clone()),
                ("x-hub-signature-256", good.clone()),
            ],
            401,
            "bad_encoding",
        ),
        (
            vec![
                (
                    "x-hub-signature-256",
                    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
                ),
                ("x-hub-signature-256", good.clone()),
            ],
            401,
            "bad_encoding",
        ),
    ];
    let mut delivered = 0;
    for (headers, status, reason) in cases {
        let before = gw.metrics().await;
        let mut req = gw.client.post(gw.url("/results")).body(body.clone());
        for (name, value) in &headers {
            req = req.header(*name, value);
        }
        let response = req.send().await.unwrap();
        assert_eq!(response.status(), status, "{headers:?}");
        if status == 200 {
            delivered += 1;
        } else {
            let label = format!("reason=\"{reason}\"");
            let after = gw.metrics().await;
            assert_eq!(
                after.get("hookgate_webhooks_rejected_total", &label)
                    - before.get("hookgate_webhooks_rejected_total", &label),
                1.0,
                "{headers:?}"
            );
        }
    }
    gw.stop().await;
    assert_eq!(down.received().len(), delivered);
}

#[tokio::test]
async fn bodies_that_lie_or_overflow() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[server]\nbody_read_timeout = \"500ms\"")
        .start()
        .await;
    let body = job("b", &[]);
    let sig = sign(&body);

    // 10 MB declared: refused before it is read (none of it is sent).
    let head = post_head("", 10 << 20, &sig);
    let answer = raw(gw.webhook, head.as_bytes(), Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A Content-Length longer than the body: the read times out.
    let mut head = post_head("", body.len() + 50, &sig).into_bytes();
    head.extend_from_slice(&body);
    let answer = raw(gw.webhook, &head, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A broken chunked framing: 400 malformed at once, not a timeout.
    let before = gw.metrics().await;
    let mut bad_chunk = post_head("transfer-encoding: chunked\r\n", 0, &sig)
        .replace("content-length: 0\r\n", "")
        .into_bytes();
    bad_chunk.extend_from_slice(b"zz\r\nhello\r\n0\r\n\r\n");
    let started = std::time::Instant::now();
    let answer = raw(gw.webhook, &bad_chunk, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let label = "reason=\"malformed\"";
    assert_eq!(
        gw.metrics()
            .await
            .get("hookgate_webhooks_rejected_total", label)
            - before.get("hookgate_webhooks_rejected_total", label),
        1.0
    );

    // Content-Length and Transfer-Encoding together (a smuggling shape):
    // framed by Transfer-Encoding alone, as RFC 9112 says, and the
    // connection closed after the answer, so a request hidden behind it
    // is never read.
    let hidden = post_head("", body.len(), &sig);
    let mut smuggle = post_head("transfer-encoding: chunked\r\n", 5, &sig)
        .replace("connection: close\r\n", "")
        .into_bytes();
    smuggle.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    smuggle.extend_from_slice(&body);
    smuggle.extend_from_slice(b"\r\n0\r\n\r\n");
    smuggle.extend_from_slice(hidden.as_bytes());
    smuggle.extend_from_slice(&job("hidden", &[]));
    let answer = raw(gw.webhook, &smuggle, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    let got = down.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, body);

    // Signed, but not a job in every way.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let long_id = format!(r#"{{"job_id":"{}","is_error":false}}"#, "x".repeat(10_000));
    let cases: Vec<Vec<u8>> = vec![
        b"{\"job_id\":\"\xff\xfe\",\"is_error\":false}".to_vec(),
        deep.into_bytes(),
        br#"{"job_id":"a","is_error":"yes"}"#.to_vec(),
        br#"{"job_id":"a","is_error":false,"result":{"policy_categories":[{"name":"X","risk_level":3}]}}"#.to_vec(),
        br#"{"is_error":false}"#.to_vec(),
        br#"{"job_id":"","is_error":false}"#.to_vec(),
        long_id.into_bytes(),
        br#"{"job_id":42,"is_error":false}"#.to_vec(),
    ];
    for case in &cases {
        let r = gw.post(case, "").await;
        assert_eq!(
            r.status(),
            400,
            "{}",
            String::from_utf8_lossy(&case[..case.len().min(60)])
        );
    }
    let m = gw.metrics().await;
    // The cases, the lying length and the broken chunk.
    assert_eq!(
        m.get("hookgate_webhooks_rejected_total", "reason=\"malformed\""),
        cases.len() as f64 + 2.0
    );
    assert_eq!(
        m.get("hookgate_webhooks_rejected_total", "reason=\"too_large\""),
        1.0
    );
    gw.stop().await;
    assert_eq!(
        down.received().len(),
        1,
        "only the smuggling shape's own request"
    );
}

#[tokio::test]
async fn a_hundred_thousand_categories_keep_the_series_bounded() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[server]\nmax_body_bytes = \"16MiB\"")
        .start()
        .await;
    let before = gw
        .metrics()
        .await
        .0
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    let categories: Vec<(String, String)> = (0..100_000)
        .map(|i| {
            (
                format!("CAT_{i}"),
                ["LOW", "MEDIUM", "HIGH", "SEVERE"][i % 4].to_owned(),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = categories
        .iter()
        .map(|(n, r)| (n.as_str(), r.as_str()))
        .collect();
    assert_eq!(gw.post(&job("many", &refs), "").await.status(), 200);
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "hookgate_jobs_flagged_total",
            "category=\"other\",risk_level=\"HIGH\""
        ),
        25_000.0
    );
    assert_eq!(
        m.get(
            "hookgate_jobs_flagged_total",
            "category=\"other\",risk_level=\"other\""
        ),
        25_000.0
    );
    let after = m.0.lines().filter(|l| !l.starts_with('#')).count();
    // Only the histograms' samples move; no new series.
    assert_eq!(before, after);
    gw.stop().await;
}

/// 10,000 distinct query values, categories and risk levels leave the
/// number of series where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_distinct_values_add_no_series() {
    let down = Downstream::start([]).await;
    let rules = format!(
        "[destinations.down]\nurl = \"{}\"\n[[rules]]\nname = \"acme\"\nmatch = {{ query = {{ tenant = \"acme\" }} }}\nforward = [\"down\"]\n[[rules]]\nname = \"all\"\nforward = [\"down\"]\n",
        down.url("/")
    );
    let gw = Arc::new(GatewayBuilder::new(rules).start().await);
    let series = |m: &Metrics| {
        m.0.lines()
            .filter(|l| {
                !l.starts_with('#')
                    && !l.contains("_bucket{")
                    && !l.contains("_sum")
                    && !l.contains("_count")
            })
            .count()
    };
    let before = series(&gw.metrics().await);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (gw, next) = (gw.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 10_000 {
                    return;
                }
                let category = format!("CATEGORY_{i}");
                let level = format!("LEVEL_{i}");
                let body = job(&format!("card-{i}"), &[(&category, &level)]);
                let r = gw.post(&body, &format!("tenant=t{i}&x{i}=y")).await;
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let m = gw.metrics().await;
    assert_eq!(series(&m), before, "series were added by payload values");
    assert_eq!(
        m.get(
            "hookgate_jobs_flagged_total",
            "category=\"other\",risk_level=\"other\""
        ),
        10_000.0
    );
    assert_eq!(
        m.get("hookgate_jobs_routed_total", "rule=\"all\""),
        10_000.0
    );
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[server]\nheader_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"")
        .start()
        .await;
    // Headers at one byte a second: the connection is closed.
    let mut s = TcpStream::connect(gw.webhook).await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for b in b"POST /results HTTP/1.1\r\nhost: x\r\n" {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(900), s.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "a header trickle kept the connection");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A body at one byte a second: 408.
    let body = job("slow", &[]);
    let mut s = TcpStream::connect(gw.webhook).await.unwrap();
    s.write_all(post_head("", body.len(), &sign(&body)).as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    for b in &body {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(900), s.read(&mut buf)).await
        {
            answer.extend_from_slice(&buf[..n]);
            break;
        }
    }
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    gw.stop().await;
    assert!(down.received().is_empty());
}

/// 2,000 idle connections are held without harm; a webhook still gets
/// through at once.
#[tokio::test]
async fn two_thousand_idle_connections() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/")).start().await;
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(gw.webhook).await.unwrap());
    }
    let started = Instant::now();
    assert_eq!(gw.post(&job("through", &[]), "").await.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    drop(idle);
    gw.stop().await;
}

/// At the connection limit, new connections wait while the open ones keep
/// being served; a freed slot lets the next one in.
#[tokio::test]
async fn connection_limit_holds_new_connections_not_open_ones() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[server]\nmax_connections = 10")
        .start()
        .await;
    let body = job("kept", &[]);
    let request = format!(
        "POST /results HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nx-hub-signature-256: {}\r\n\r\n",
        body.len(),
        sign(&body)
    );
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(TcpStream::connect(gw.webhook).await.unwrap());
    }
    // Each of the ten is served, and stays open (keep-alive).
    for conn in &mut open {
        conn.write_all(request.as_bytes()).await.unwrap();
        conn.write_all(&body).await.unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        let mut rest = [0u8; 512];
        let _ = tokio::time::timeout(Duration::from_millis(50), conn.read(&mut rest)).await;
    }
    // An eleventh is accepted by the kernel but not served...
    let mut waiting = TcpStream::connect(gw.webhook).await.unwrap();
    waiting.write_all(request.as_bytes()).await.unwrap();
    waiting.write_all(&body).await.unwrap();
    let mut buf = [0u8; 12];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiting.read_exact(&mut buf))
            .await
            .is_err()
    );
    // ... while an open one still is.
    open[0].write_all(request.as_bytes()).await.unwrap();
    open[0].write_all(&body).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), open[0].read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    // A freed slot lets it in.
    drop(open.pop());
    tokio::time::timeout(Duration::from_secs(5), waiting.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    gw.stop().await;
}

/// Downstreams that reset, drip, redirect inward, answer forever, or do not
/// resolve: each is classified, and nothing is followed or buffered whole.
#[tokio::test]
async fn broken_downstreams() {
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_addr = trap.local_addr().unwrap();
    let trapped = Arc::new(AtomicUsize::new(0));
    let count = trapped.clone();
    tokio::spawn(async move {
        while trap.accept().await.is_ok() {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    let location = Box::leak(format!("http://{trap_addr}/internal").into_boxed_str());
    let down = Downstream::start([
        Answer::Reset,
        Answer::Drip,
        Answer::StatusWith(302, "location", location),
        Answer::Huge,
    ])
    .await;
    let gw = GatewayBuilder::new(format!(
        r#"
[destinations.down]
url = "{}"
timeout = "1s"
max_attempts = 1
[destinations.nowhere]
url = "http://no-such-host.invalid:8080/"
max_attempts = 1
[[rules]]
name = "nowhere"
match = {{ query = {{ to = "nowhere" }} }}
forward = ["nowhere"]
[[rules]]
name = "all"
forward = ["down"]
"#,
        down.url("/")
    ))
    .start()
    .await;
    let outcomes = [
        ("reset", "connect_error"),
        // The status counts once the head is read; the slow body is
        // given up at the attempt's deadline.
        ("drip", "success"),
        ("redirect", "http_3xx"),
        ("huge", "success"),
    ];
    for (i, (what, outcome)) in outcomes.iter().enumerate() {
        let started = Instant::now();
        let status = gw
            .post(&job(&format!("broken-{i}"), &[]), "")
            .await
            .status();
        let expect = if *outcome == "success" {
            200
        } else if *outcome == "timeout" {
            504
        } else {
            502
        };
        assert_eq!(status, expect, "{what}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{what} took {:?}",
            started.elapsed()
        );
        let label = format!("destination=\"down\",outcome=\"{outcome}\"");
        assert!(
            gw.metrics()
                .await
                .get("hookgate_forward_attempts_total", &label)
                >= 1.0,
            "{what}"
        );
    }
    assert_eq!(gw.post(&job("dns", &[]), "to=nowhere").await.status(), 502);
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "hookgate_forward_attempts_total",
            "destination=\"nowhere\",outcome=\"connect_error\""
        ),
        1.0
    );
    gw.stop().await;
    assert_eq!(trapped.load(Ordering::SeqCst), 0, "a redirect was followed");
}

/// At debug level, the logs carry neither a secret nor a signature.
#[tokio::test]
async fn logs_never_carry_secrets_or_signatures() {
    let down = Downstream::start([Answer::Status(500)]).await;
    let (dir, path) = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[log]\nlevel = \"debug\"\nformat = \"json\"\n[delivery]\nmode = \"durable\"")
        .write();
    let gw = BinaryGateway::spawn(dir.path(), &path, &[("RUST_LOG", "trace")]).await;
    let body = job("logged", &[]);
    let good = sign(&body);
    let hex: String = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&good)
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    assert_eq!(gw.post(&body).await.status(), 202);
    let forged = hookgate::webhook::verify::sign(b"some-other-secret-here", &body);
    for header in [forged.clone(), hex.clone(), format!("sha256={hex}")] {
        let r = gw
            .client
            .post(format!("http://{}/results", gw.webhook))
            .header("X-Hub-Signature-256", &header)
            .body(job("logged-2", &[]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    down.wait_for(2, Duration::from_secs(5)).await;
    let (code, log) = gw.stop().await;
    assert_eq!(code, Some(0));
    assert!(log.lines().count() > 10, "debug logging is on:\n{log}");
    for needle in [SECRET, good.as_str(), forged.as_str(), hex.as_str()] {
        assert!(!log.contains(needle), "the log contains {needle:?}");
    }
}

/// A rotation through the Secret's files, without a restart: the new and
/// the previous secret both verify, then only the new one.
#[tokio::test]
async fn secret_rotation_through_a_reload() {
    const OLD: &str = "the-old-secret-1234567890";
    const NEW: &str = "the-new-secret-0987654321";
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .secrets(&[("current", OLD)])
        .optional_secret("previous", "")
        .config("[rules]\nreload_interval = \"200ms\"")
        .start()
        .await;
    let body = job("rot", &[]);
    let signed = |key: &str| hookgate::webhook::verify::sign(key.as_bytes(), &body);
    let status = |key: &'static str| {
        let (gw, body, sig) = (&gw, body.clone(), signed(key));
        async move { gw.post_with(&body, "", Some(&sig)).await.status().as_u16() }
    };
    assert_eq!(status(OLD).await, 200);
    assert_eq!(status(NEW).await, 401);

    // The vendor issues a new secret: current = new, previous = old.
    std::fs::write(gw.dir().join("secret-0"), NEW).unwrap();
    std::fs::write(gw.dir().join("secret-1"), OLD).unwrap();
    eventually(
        Duration::from_secs(5),
        "the new secret verifies",
        || async { status(NEW).await == 200 },
    )
    .await;
    assert_eq!(status(OLD).await, 200, "the previous secret still verifies");
    let m = gw.metrics().await;
    assert!(m.get("hookgate_signature_verified_total", "secret=\"previous\"") >= 1.0);

    // The rotation is over: previous removed.
    std::fs::remove_file(gw.dir().join("secret-1")).unwrap();
    eventually(
        Duration::from_secs(5),
        "the old secret no longer verifies",
        || async { status(OLD).await == 401 },
    )
    .await;
    assert_eq!(status(NEW).await, 200);

    // A broken secret file keeps the running secrets. The reloader reads
    // the secrets right after the rules in each poll: once a rules change
    // made after the next one is reloaded too, that poll has read the
    // emptied file.
    std::fs::write(gw.dir().join("secret-0"), "").unwrap();
    let rules = std::fs::read_to_string(gw.dir().join("rules.toml")).unwrap();
    for round in 1..=2 {
        let before = gw
            .metrics()
            .await
            .get("hookgate_config_reloads_total", "result=\"success\"");
        std::fs::write(
            gw.dir().join("rules.toml"),
            format!("{rules}\n# round {round}\n"),
        )
        .unwrap();
        gw.wait_for_metric(
            "hookgate_config_reloads_total",
            "result=\"success\"",
            before + 1.0,
        )
        .await;
    }
    assert_eq!(status(NEW).await, 200);
    gw.stop().await;
}

/// With no admin token configured, the admin calls are refused with 403,
/// and the answer names both ways to configure one.
#[tokio::test]
async fn a_disabled_admin_api_says_how_to_enable_it() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/")).start().await;
    let refused = gw.reload(Some("any-token")).await;
    assert_eq!(refused.status(), 403);
    let body: serde_json::Value = refused.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("admin.token_file") && error.contains("admin.token_env"),
        "{error}"
    );
    gw.stop().await;
}
