//! Verification, parsing and limits at the front door.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[derive(serde::Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    body: String,
    secrets: Vec<String>,
    header: Option<String>,
    verdict: String,
}

/// Every vendor vector gets its verdict, and rejections their reason.
#[tokio::test]
async fn vendor_vectors() {
    let vectors: Vectors = serde_json::from_slice(&payload("signatures.json")).unwrap();
    assert!(vectors.cases.len() >= 20, "the vectors file shrank");
    let down = Downstream::start([]).await;
    let mut by_secrets: BTreeMap<Vec<String>, Vec<Case>> = BTreeMap::new();
    for case in vectors.cases {
        by_secrets
            .entry(case.secrets.clone())
            .or_default()
            .push(case);
    }
    let mut delivered = 0;
    for (secrets, cases) in by_secrets {
        let named: Vec<(String, String)> = secrets
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("s{i}"), s.clone()))
            .collect();
        let named: Vec<(&str, &str)> = named
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_str()))
            .collect();
        let gw = GatewayBuilder::forward_all_to(&down.url("/hook"))
            .secrets(&named)
            .start()
            .await;
        for case in cases {
            let body = payload(&case.body);
            let before = gw.metrics().await;
            let response = gw.post_with(&body, "", case.header.as_deref()).await;
            let after = gw.metrics().await;
            let what = format!("{} with {:?} under {secrets:?}", case.body, case.header);
            if case.verdict == "valid" {
                assert_eq!(response.status(), 200, "{what}");
                delivered += 1;
                let got = down.wait_for(delivered, Duration::from_secs(5)).await;
                assert_eq!(
                    got[delivered - 1].body,
                    body,
                    "{what}: forwarded bytes differ"
                );
            } else {
                assert_eq!(response.status(), 401, "{what}");
                let labels = format!("reason=\"{}\"", case.verdict);
                let counted = after.get("hookgate_webhooks_rejected_total", &labels)
                    - before.get("hookgate_webhooks_rejected_total", &labels);
                assert_eq!(counted, 1.0, "{what}: rejection not counted under {labels}");
            }
        }
        gw.stop().await;
    }
    assert_eq!(
        down.received().len(),
        delivered,
        "a rejected webhook was forwarded"
    );
}

/// The downstream gets exactly the signed bytes and the promised headers;
/// a one-byte or whitespace change is refused and nothing is forwarded.
#[tokio::test]
async fn original_bytes_and_headers_forwarded() {
    let down = Downstream::start([]).await;
    let rules = format!(
        r#"
[destinations.down]
url = "{}"
headers = {{ "X-Source" = "hookgate" }}
[[rules]]
name = "high"
match = {{ min_risk = "HIGH" }}
forward = ["down"]
headers = {{ "X-Priority" = "high" }}
"#,
        down.url("/webhooks/unitary")
    );
    let gw = GatewayBuilder::new(rules).start().await;
    let body = payload("success_pretty.json");
    let signature = sign(&body);
    let response = gw.post_with(&body, "tenant=acme", Some(&signature)).await;
    assert_eq!(response.status(), 200);
    let got = &down.wait_for(1, Duration::from_secs(5)).await[0];
    assert_eq!(got.body, body);
    assert_eq!(got.path, "/webhooks/unitary");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("x-hub-signature-256"), Some(signature.as_str()));
    assert_eq!(got.header("x-hookgate-rule"), Some("high"));
    assert_eq!(
        got.header("x-hookgate-job-id"),
        Some("8a7c1f3e-5b2d-4c9a-9e41-2f6d0b7a1c55")
    );
    assert_eq!(got.header("x-source"), Some("hookgate"));
    assert_eq!(got.header("x-priority"), Some("high"));

    let mut one_byte = body.clone();
    let at = one_byte.iter().position(|b| *b == b'H').unwrap();
    one_byte[at] = b'L';
    let mut whitespace = body.clone();
    whitespace.insert(1, b' ');
    for changed in [one_byte, whitespace] {
        let response = gw.post_with(&changed, "", Some(&signature)).await;
        assert_eq!(response.status(), 401);
    }
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "hookgate_webhooks_rejected_total",
            "reason=\"bad_signature\""
        ),
        2.0
    );
    assert_eq!(
        m.get("hookgate_signature_verified_total", "secret=\"current\""),
        1.0
    );
    assert_eq!(m.get("hookgate_webhooks_received_total", ""), 3.0);
    gw.stop().await;
    assert_eq!(down.received().len(), 1, "a changed body was forwarded");
}

/// 413 with or without Content-Length; 400 for a signed body that is not a
/// job; 404/405 elsewhere, not counted as webhooks.
#[tokio::test]
async fn limits_and_malformed_bodies() {
    let down = Downstream::start([]).await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[server]\nmax_body_bytes = 1000")
        .start()
        .await;
    let big = vec![b' '; 5000];
    let response = gw.post(&big, "").await;
    assert_eq!(response.status(), 413);

    // Chunked, no Content-Length: refused while reading.
    let mut stream = tokio::net::TcpStream::connect(gw.webhook).await.unwrap();
    let mut request = format!(
        "POST /results HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nx-hub-signature-256: {}\r\n\r\n",
        sign(&big)
    )
    .into_bytes();
    for chunk in big.chunks(500) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let mut answer = vec![0u8; 12];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");

    for body in [
        &b"not json"[..],
        br#"{"hello":"world"}"#,
        br#"{"job_id":"a","is_error":"yes"}"#,
    ] {
        assert_eq!(
            gw.post(body, "").await.status(),
            400,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let get = gw.client.get(gw.url("/results")).send().await.unwrap();
    assert_eq!(get.status(), 405);
    let other = gw
        .client
        .post(gw.url("/other"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);

    let m = gw.metrics().await;
    assert_eq!(
        m.get("hookgate_webhooks_rejected_total", "reason=\"too_large\""),
        2.0
    );
    assert_eq!(
        m.get("hookgate_webhooks_rejected_total", "reason=\"malformed\""),
        3.0
    );
    assert_eq!(m.get("hookgate_webhooks_received_total", ""), 5.0);
    gw.stop().await;
    assert!(down.received().is_empty());
}

/// Start-up refuses a configured secret that is missing or empty.
#[tokio::test]
async fn missing_secret_refuses_to_start() {
    let (_dir, path) = GatewayBuilder::forward_all_to("http://127.0.0.1:9/")
        .secrets(&[("current", "")])
        .write();
    let config = hookgate::config::Config::load(&path).unwrap();
    let listeners = hookgate::Listeners {
        webhook: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        admin: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    };
    let err = hookgate::run(config, listeners, Default::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the secret is empty"), "{err}");
}
