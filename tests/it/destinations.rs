//! How hookgate speaks HTTP/1.1 to destinations: every way a response can
//! be framed, and connections kept alive only while that is safe.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// One server thread, so that every delivery shares one connection pool
/// and the downstream's connection count says what was reused.
async fn direct_gateway(down: &Downstream) -> TestGateway {
    GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[server]\nworkers = 1\n[delivery]\nmode = \"direct\"")
        .start()
        .await
}

#[tokio::test]
async fn every_response_framing_is_read_and_the_connection_reused_when_safe() {
    let answers = [
        // Chunked, with an extension and a trailer.
        Answer::Raw(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
             2;ext=1\r\nok\r\n3\r\n!!!\r\n0\r\nx-trailer: 1\r\n\r\n",
        ),
        // Interim 100 Continue before the answer.
        Answer::Raw(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        ),
        Answer::Raw("HTTP/1.1 204 No Content\r\n\r\n"),
        Answer::Raw("HTTP/1.1 202 Accepted\r\ncontent-length: 5\r\n\r\nqueue"),
        // The first connection ends here, as announced.
        Answer::Raw("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"),
        // Interim answer, chunks and trailer, arriving a byte at a time.
        Answer::Trickle(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
             2;ext=1\r\nok\r\n0\r\nx-trailer: 1\r\n\r\n",
        ),
        // A body delimited by the close: the second connection ends.
        Answer::RawThenClose("HTTP/1.1 200 OK\r\n\r\nuntil the end"),
        Answer::Status(200),
    ];
    let n = answers.len();
    let down = Downstream::start(answers).await;
    let gw = direct_gateway(&down).await;
    for i in 0..n {
        let status = gw
            .post(&job(&format!("framing-{i}"), &[]), "")
            .await
            .status();
        assert_eq!(status, 200, "answer {i}");
    }
    let received = down.received();
    assert_eq!(received.len(), n, "each delivered once");
    let agent = received[0].header("user-agent").unwrap_or_default();
    assert!(agent.starts_with("hookgate/"), "user-agent {agent:?}");
    assert_eq!(down.connections(), 3, "reused until a close");
    let m = gw.metrics().await;
    let success = "destination=\"down\",outcome=\"success\"";
    assert_eq!(m.get("hookgate_forward_attempts_total", success), n as f64);
    gw.stop().await;
}

/// A destination may close a keep-alive connection while it sits in the
/// pool. That is not a failed delivery: the request goes on a new one. A
/// close after the request was written is different: it may have been
/// processed, so it is a failed attempt, retried only after the backoff
/// (RFC 9110 §9.2.2), never sent again at once.
#[tokio::test]
async fn a_connection_the_destination_closed_is_replaced_without_a_failure() {
    let down = Downstream::start([
        // Answers, then closes without saying so.
        Answer::RawThenClose("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        Answer::Status(200),
        // Reads the next request whole and closes without an answer.
        Answer::Drop,
        Answer::Status(200),
    ])
    .await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config(
            "[server]\nworkers = 1\n[delivery]\nmode = \"direct\"\n\
             backoff_initial = \"300ms\"\nbackoff_max = \"300ms\"",
        )
        .start()
        .await;
    for i in 0..3 {
        let status = gw.post(&job(&format!("stale-{i}"), &[]), "").await.status();
        assert_eq!(status, 200, "webhook {i}");
    }
    let m = gw.metrics().await;
    let outcome = |o: &str| {
        m.find(
            "hookgate_forward_attempts_total",
            &format!("destination=\"down\",outcome=\"{o}\""),
        )
    };
    assert_eq!(outcome("success"), Some(3.0));
    assert_eq!(
        outcome("connect_error"),
        Some(1.0),
        "the close after the request"
    );
    let got = down.wait_for(4, Duration::from_secs(5)).await;
    assert_eq!(got[2].header("x-hookgate-job-id"), Some("stale-2"));
    assert_eq!(got[3].header("x-hookgate-job-id"), Some("stale-2"));
    // Full jitter: somewhere in the backoff, not on the spot.
    let resent_after = got[3].at - got[2].at;
    assert!(
        resent_after >= Duration::from_millis(5),
        "sent again after {resent_after:?}"
    );
    assert_eq!(down.connections(), 3);
    gw.stop().await;
}

/// Responses that are not HTTP/1.x, or frame their body two ways at once,
/// fail the attempt; nothing of them is trusted.
#[tokio::test]
async fn malformed_responses_fail_the_attempt() {
    let down = Downstream::start([
        Answer::RawThenClose("HTTP/2 200\r\n\r\n"),
        Answer::RawThenClose("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"),
        Answer::RawThenClose("HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok"),
    ])
    .await;
    let gw = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[server]\nworkers = 1\n[delivery]\nmode = \"direct\"\nmax_attempts = 1")
        .start()
        .await;
    for i in 0..3 {
        let status = gw.post(&job(&format!("bad-{i}"), &[]), "").await.status();
        assert_eq!(status, 502, "answer {i}");
    }
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "hookgate_forward_attempts_total",
            "destination=\"down\",outcome=\"connect_error\""
        ),
        3.0
    );
    gw.stop().await;
}

/// An HTTPS server on 127.0.0.1 with a certificate for `localhost` only,
/// answering 200 to each request, recording request heads and counting
/// handshakes; returns its port and the certificate.
async fn tls_downstream(
    got: Arc<Mutex<Vec<String>>>,
    handshakes: Arc<AtomicUsize>,
) -> (u16, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, got, handshakes) = (acceptor.clone(), got.clone(), handshakes.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                handshakes.fetch_add(1, Ordering::SeqCst);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = tls.read(&mut chunk).await {
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if body.len() < len {
                        continue;
                    }
                    got.lock().unwrap().push(head.to_owned());
                    buf.clear();
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if tls.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, certified.cert.pem())
}

/// HTTPS destinations are verified against the trust store (here made to
/// hold only the test's certificate): a matching name is delivered over
/// one kept-alive connection, a name the certificate does not cover is not.
#[tokio::test]
async fn https_destinations_are_verified() {
    let got = Arc::new(Mutex::new(Vec::new()));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let (port, pem) = tls_downstream(got.clone(), handshakes.clone()).await;
    let (dir, path) = GatewayBuilder::new(format!(
        r#"
[destinations.named]
url = "https://localhost:{port}/hooks"
[destinations.by_ip]
url = "https://127.0.0.1:{port}/hooks"
max_attempts = 1
[[rules]]
name = "by_ip"
match = {{ query = {{ to = "ip" }} }}
forward = ["by_ip"]
[[rules]]
name = "named"
forward = ["named"]
"#
    ))
    .config("[server]\nworkers = 1\n[delivery]\nmode = \"direct\"")
    .write();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let gw = BinaryGateway::spawn(
        dir.path(),
        &path,
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    )
    .await;
    let post = |id: &str, query: &str| {
        let body = job(id, &[]);
        gw.client
            .post(format!("http://{}/results{query}", gw.webhook))
            .header("X-Hub-Signature-256", sign(&body))
            .body(body)
            .send()
    };
    for i in 0..3 {
        let status = post(&format!("tls-{i}"), "").await.unwrap().status();
        assert_eq!(status, 200, "webhook {i}");
    }
    assert_eq!(post("tls-ip", "?to=ip").await.unwrap().status(), 502);
    let heads = got.lock().unwrap().clone();
    assert_eq!(heads.len(), 3, "only the verified name was delivered");
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
    assert!(heads[0].starts_with("POST /hooks HTTP/1.1\r\nhost: localhost:"));
    let m = gw.metrics().await;
    let attempts = |d: &str, o: &str| {
        m.get(
            "hookgate_forward_attempts_total",
            &format!("destination=\"{d}\",outcome=\"{o}\""),
        )
    };
    assert_eq!(attempts("named", "success"), 3.0);
    assert_eq!(attempts("by_ip", "connect_error"), 1.0);
    let (_, log) = gw.stop().await;
    assert!(log.contains("certificate"), "the reason is logged: {log}");
}
