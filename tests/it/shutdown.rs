//! SIGTERM, as the kubelet sends it: readiness 503 at once, new webhooks
//! 503, what is in flight finishes or stays in the spool, exit 0 in time.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

on_both_backends!(sigterm_drains_in_order_and_loses_nothing);

async fn sigterm_drains_in_order_and_loses_nothing(backend: Backend) {
    let down = Downstream::start(vec![Answer::Delay(Duration::from_millis(1500), 200); 4]).await;
    let (dir, path) = GatewayBuilder::forward_all_to(&down.url("/"))
        .config("[delivery]\nmode = \"durable\"\n[shutdown]\ngrace = \"5s\"")
        .on(&backend)
        .write();
    let gw = BinaryGateway::spawn(dir.path(), &path, &[]).await;
    // A delivery in flight (the downstream takes 1.5 s) ...
    assert_eq!(gw.post(&job("in-flight-delivery", &[])).await.status(), 202);
    down.wait_for(1, Duration::from_secs(5)).await;
    // ... and a request in flight: headers and half the body sent.
    let body = job("in-flight-request", &[]);
    let mut slow = tokio::net::TcpStream::connect(gw.webhook).await.unwrap();
    let head = format!(
        "POST /results HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nx-hub-signature-256: {}\r\n\r\n",
        body.len(),
        sign(&body)
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body[..body.len() / 2]).await.unwrap();
    // Both requests are in the gateway's hands (it counts a webhook once
    // its head has arrived).
    eventually(Duration::from_secs(5), "two webhooks received", || async {
        gw.metrics()
            .await
            .find("hookgate_webhooks_received_total", "")
            == Some(2.0)
    })
    .await;

    let pid = gw.pid();
    let started = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );

    let admin = format!("http://{}/readyz", gw.admin);
    // At once in practice (milliseconds); the bound only keeps a loaded
    // machine from failing the test.
    eventually(
        Duration::from_secs(5),
        "readiness turns 503 before the exit",
        || async {
            gw.client
                .get(&admin)
                .send()
                .await
                .is_ok_and(|r| r.status() == 503)
        },
    )
    .await;
    let refused = gw.post(&job("after-sigterm", &[])).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers().get("retry-after").unwrap(), "5");

    // The request in flight is finished and answered.
    slow.write_all(&body[body.len() / 2..]).await.unwrap();
    let mut answer = vec![0u8; 12];
    slow.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 202");
    drop(slow);

    let (code, log) = gw.wait().await;
    let took = started.elapsed();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        took < Duration::from_secs(5),
        "exit after {took:?}, beyond shutdown.grace"
    );
    println!("SIGTERM to exit: {took:?}");
    // The delivery in flight finished during the drain.
    let ids: Vec<String> = down
        .received()
        .iter()
        .map(|r| r.header("x-hookgate-job-id").unwrap().to_owned())
        .collect();
    assert!(ids.contains(&"in-flight-delivery".to_owned()), "{ids:?}");
    assert!(!ids.contains(&"after-sigterm".to_owned()));

    // Whatever was still pending goes out after the next start.
    let gw = BinaryGateway::spawn(dir.path(), &path, &[]).await;
    eventually(
        Duration::from_secs(10),
        "the request answered during the drain is delivered",
        || async {
            down.received()
                .iter()
                .any(|r| r.header("x-hookgate-job-id") == Some("in-flight-request"))
        },
    )
    .await;
    let (code, _) = gw.stop().await;
    assert_eq!(code, Some(0));
}
