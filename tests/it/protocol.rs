//! The delivery client against scripted servers: hostile and unusual
//! responses, a status that counts once its head is read, HTTP/2 over TLS
//! and cleartext, a destination's own CA and client certificate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// A CA, a server certificate for `localhost` and a client certificate,
/// both signed by it.
struct Pki {
    ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: PrivateKeyDer<'static>,
    ca_der: CertificateDer<'static>,
    client_cert_pem: String,
    client_key_pem: String,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hookgate test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hookgate");
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().clone(),
        server_cert: server.der().clone(),
        server_key: PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        client_cert_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// A TLS server configuration offering `alpn`, requiring a client
/// certificate signed by the CA when `mutual`.
fn server_tls(pki: &Pki, alpn: &[&[u8]], mutual: bool) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if mutual {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(vec![pki.server_cert.clone()], pki.server_key.clone_key())
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// What a hyper server saw: the HTTP version of each request, and the
/// connections it accepted.
#[derive(Clone, Default)]
struct Seen {
    versions: Arc<Mutex<Vec<http::Version>>>,
    connections: Arc<Mutex<usize>>,
}

/// A hyper server answering 200: over TLS when `tls` is given (HTTP/2 if
/// ALPN chose it), else cleartext, HTTP/2 by prior knowledge when `h2c`.
async fn hyper_server(tls: Option<tokio_rustls::TlsAcceptor>, h2c: bool) -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, seen) = (tls.clone(), s.clone());
            tokio::spawn(async move {
                let versions = seen.versions.clone();
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    versions.lock().unwrap().push(req.version());
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                match tls {
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        *seen.connections.lock().unwrap() += 1;
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        let io = TokioIo::new(stream);
                        if h2 {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        }
                    }
                    None => {
                        *seen.connections.lock().unwrap() += 1;
                        let io = TokioIo::new(tcp);
                        if h2c {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        }
                    }
                }
            });
        }
    });
    (port, seen)
}

/// Writes the PKI's files beside the rules, and starts the gateway.
async fn gateway_with_pki(builder: GatewayBuilder, pki: &Pki) -> TestGateway {
    let (dir, path) = builder.write();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(dir.path().join("client.pem"), &pki.client_cert_pem).unwrap();
    std::fs::write(dir.path().join("client.key"), &pki.client_key_pem).unwrap();
    TestGateway::launch(dir, path).await
}

fn direct(rules: String) -> GatewayBuilder {
    GatewayBuilder::new(rules).config(
        "[server]\nworkers = 1\n[delivery]\nmode = \"direct\"\nmax_attempts = 2\nbackoff_initial = \"10ms\"\nbackoff_max = \"10ms\"",
    )
}

fn attempts(m: &Metrics, destination: &str, outcome: &str) -> f64 {
    m.find(
        "hookgate_forward_attempts_total",
        &format!("destination=\"{destination}\",outcome=\"{outcome}\""),
    )
    .unwrap_or(0.0)
}

/// Reads a request up to the end of its head (the body is left unread);
/// false if the peer closed first.
async fn read_head(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match io.read(&mut chunk).await {
            Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
    true
}

/// A chunk size of 16 hex digits after a chunk of one byte (it once wrapped
/// an addition and crashed the gateway): the status before it counts, and
/// the gateway goes on.
#[tokio::test]
async fn a_huge_chunk_size_is_only_a_bad_body() {
    let hostile = |status: &str| -> &'static str {
        Box::leak(
            format!(
                "HTTP/1.1 {status}\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\nb\r\n"
            )
            .into_boxed_str(),
        )
    };
    let down = Downstream::start([
        Answer::RawThenClose(hostile("503 Service Unavailable")),
        Answer::RawThenClose(hostile("200 OK")),
    ])
    .await;
    let gw = direct(GatewayBuilder::forward_all_rules(&down.url("/")))
        .start()
        .await;
    assert_eq!(gw.post(&job("chunk-1", &[]), "").await.status(), 200);
    let m = gw.metrics().await;
    assert_eq!(attempts(&m, "down", "http_5xx"), 1.0, "a failed attempt");
    assert_eq!(attempts(&m, "down", "success"), 1.0);
    // Still serving.
    assert_eq!(gw.post(&job("chunk-2", &[]), "").await.status(), 200);
    gw.stop().await;
}

/// `Content-Length: 5, 5` is one length, said twice (RFC 9110 §8.6).
#[tokio::test]
async fn a_repeated_content_length_is_one_length() {
    let down = Downstream::start([
        Answer::Raw("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello"),
        Answer::Raw("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello"),
    ])
    .await;
    let gw = direct(GatewayBuilder::forward_all_rules(&down.url("/")))
        .start()
        .await;
    for i in 0..3 {
        assert_eq!(
            gw.post(&job(&format!("cl-{i}"), &[]), "").await.status(),
            200
        );
    }
    let m = gw.metrics().await;
    assert_eq!(attempts(&m, "down", "success"), 3.0);
    assert_eq!(down.connections(), 1, "and the connection is reused");
    gw.stop().await;
}

/// A TLS server that answers with a body delimited by closing the
/// connection, and closes without close_notify (as many do): the status
/// counts, once.
#[tokio::test]
async fn a_close_delimited_tls_response_counts() {
    let pki = pki();
    let acceptor = server_tls(&pki, &[b"http/1.1"], false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if !read_head(&mut tls).await {
                    return;
                }
                *counted.lock().unwrap() += 1;
                let _ = tls
                    .write_all(b"HTTP/1.1 201 Created\r\n\r\nuntil the end")
                    .await;
                let _ = tls.flush().await;
                // The TCP connection goes, without a TLS close_notify.
                let (tcp, _) = tls.into_inner();
                drop(tcp);
            });
        }
    });
    let rules = format!(
        "[destinations.down]\nurl = \"https://localhost:{port}/\"\ntls = {{ ca_file = \"ca.pem\" }}\n\
         [[rules]]\nname = \"all\"\nforward = [\"down\"]\n"
    );
    let gw = gateway_with_pki(direct(rules), &pki).await;
    assert_eq!(gw.post(&job("tls-close", &[]), "").await.status(), 200);
    let m = gw.metrics().await;
    assert_eq!(attempts(&m, "down", "success"), 1.0);
    assert_eq!(attempts(&m, "down", "connect_error"), 0.0);
    assert_eq!(*requests.lock().unwrap(), 1, "sent once");
    gw.stop().await;
}

/// A destination that refuses a large body with 413 before reading it,
/// then closes: the 413 is read and final (a dead letter), not a connection
/// error retried for days.
#[tokio::test]
async fn an_early_413_is_a_dead_letter() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !read_head(&mut tcp).await {
                    return;
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                    .await;
                // The body is never read; the connection goes soon after.
                tokio::time::sleep(Duration::from_millis(200)).await;
            });
        }
    });
    let token = "protocol-admin-token";
    let gw = GatewayBuilder::forward_all_to(&format!("http://{addr}/"))
        .config(
            "[delivery]\nmode = \"durable\"\nbackoff_initial = \"10ms\"\nbackoff_max = \"10ms\"",
        )
        .admin_token(token)
        .start()
        .await;
    // A webhook of about 900 KiB: more than the socket buffers take at once.
    let padding = "x".repeat(900 * 1024);
    let body = format!(
        r#"{{"data":{{"job_id":"big-1","is_error":false,"result":{{"policy_categories":[],"metadata":{{"pad":"{padding}"}}}}}}}}"#
    );
    assert_eq!(gw.post(body.as_bytes(), "").await.status(), 202);
    // Listed once its commit is on disk, a moment after it is counted.
    let listed = || async {
        let (_, listed) = gw
            .admin(reqwest::Method::GET, "/admin/dead-letters", token)
            .await;
        listed["dead_letters"][0]["reason"]
            .as_str()
            .map(str::to_owned)
    };
    eventually(Duration::from_secs(5), "a dead letter listed", || async {
        listed().await.is_some()
    })
    .await;
    let reason = listed().await.unwrap();
    assert!(reason.contains("413"), "{reason}");
    let m = gw.metrics().await;
    assert_eq!(attempts(&m, "down", "http_4xx"), 1.0);
    assert_eq!(attempts(&m, "down", "connect_error"), 0.0);
    gw.stop().await;
}

/// `http2 = true`: HTTP/2 over TLS (ALPN) and over cleartext (prior
/// knowledge), one shared connection each; without it, HTTP/1.1 even to a
/// server that offers HTTP/2.
#[tokio::test]
async fn http2_over_tls_and_cleartext() {
    let pki = pki();
    let (tls_port, tls_seen) =
        hyper_server(Some(server_tls(&pki, &[b"h2", b"http/1.1"], false)), false).await;
    let (h2c_port, h2c_seen) = hyper_server(None, true).await;
    let (h1_port, h1_seen) =
        hyper_server(Some(server_tls(&pki, &[b"h2", b"http/1.1"], false)), false).await;
    let rules = format!(
        "[destinations.tls2]\nurl = \"https://localhost:{tls_port}/\"\nhttp2 = true\ntls = {{ ca_file = \"ca.pem\" }}\n\
         [destinations.h2c]\nurl = \"http://127.0.0.1:{h2c_port}/\"\nhttp2 = true\n\
         [destinations.h1]\nurl = \"https://localhost:{h1_port}/\"\ntls = {{ ca_file = \"ca.pem\" }}\n\
         [[rules]]\nname = \"all\"\nforward = [\"tls2\", \"h2c\", \"h1\"]\n"
    );
    let gw = gateway_with_pki(direct(rules), &pki).await;
    for i in 0..3 {
        assert_eq!(
            gw.post(&job(&format!("h2-{i}"), &[]), "").await.status(),
            200
        );
    }
    for (name, seen, version) in [
        ("tls2", &tls_seen, http::Version::HTTP_2),
        ("h2c", &h2c_seen, http::Version::HTTP_2),
        ("h1", &h1_seen, http::Version::HTTP_11),
    ] {
        assert_eq!(*seen.versions.lock().unwrap(), vec![version; 3], "{name}");
        assert_eq!(
            *seen.connections.lock().unwrap(),
            1,
            "{name}: one connection"
        );
    }
    gw.stop().await;
}

/// A destination's own CA and client certificate: a server that requires
/// one accepts it, and refuses a destination that has none.
#[tokio::test]
async fn mutual_tls_accepted_and_refused() {
    let pki = pki();
    let (port, seen) = hyper_server(Some(server_tls(&pki, &[b"http/1.1"], true)), false).await;
    let rules = format!(
        "[destinations.with-cert]\nurl = \"https://localhost:{port}/\"\n\
         tls = {{ ca_file = \"ca.pem\", client_cert_file = \"client.pem\", client_key_file = \"client.key\" }}\n\
         [destinations.without]\nurl = \"https://localhost:{port}/\"\ntls = {{ ca_file = \"ca.pem\" }}\n\
         [[rules]]\nname = \"with\"\nmatch = {{ query = {{ to = \"with\" }} }}\nforward = [\"with-cert\"]\n\
         [[rules]]\nname = \"without\"\nforward = [\"without\"]\n"
    );
    let gw = gateway_with_pki(direct(rules), &pki).await;
    assert_eq!(gw.post(&job("mtls-1", &[]), "to=with").await.status(), 200);
    assert_eq!(gw.post(&job("mtls-2", &[]), "").await.status(), 502);
    assert_eq!(
        seen.versions.lock().unwrap().len(),
        1,
        "only the one with a certificate"
    );
    let m = gw.metrics().await;
    assert_eq!(attempts(&m, "with-cert", "success"), 1.0);
    assert_eq!(attempts(&m, "without", "connect_error"), 2.0);
    gw.stop().await;
}

/// `hookgate check` reads a destination's TLS files and says which one is
/// wrong, with its line.
#[tokio::test]
async fn check_reports_unreadable_tls_files() {
    let (dir, path) = GatewayBuilder::new(
        "[destinations.d]\nurl = \"https://d.svc/\"\ntls = { ca_file = \"missing-ca.pem\" }\n\
         [[rules]]\nname = \"all\"\nforward = [\"d\"]\n",
    )
    .write();
    let out = assert_cmd::Command::new(assert_cmd::cargo::cargo_bin!("hookgate"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("rules.toml:3"), "{text}");
    assert!(text.contains("missing-ca.pem"), "{text}");
}
