//! The operator's commands: `check`, `route`, `test`, `sign`, `send`,
//! `listen`.
//!
//! These are edges: they print for people (or `--json` for machines) and
//! return the process exit code.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use warp::Filter;

mod route;

pub use route::{route, test};

use crate::config::Config;
use crate::delivery::client::{Client, Settings};
use crate::rules::RuleSet;
use crate::transport::Transport;
use crate::webhook::verify::{self, Secret, Verifier};

/// Validates the config and the rules it names, printing every problem of
/// both files before the summary: a config that does not load still names
/// its rules file (read leniently), so one run shows everything to fix.
pub fn check(config_path: &Path) -> ExitCode {
    let mut errors = 0;
    let mut warnings = 0;
    let rules_path = match Config::load(config_path) {
        Ok(config) => {
            if config.verify.secrets.is_empty() && config.verify.required {
                eprintln!(
                    "error: {}: verify.secrets is empty and verify.required is true: the gateway would refuse to start",
                    config_path.display()
                );
                errors += 1;
            } else if let Err(e) = config.secret_keys() {
                // A missing secret stops `serve`, but `check` runs where
                // secrets are not mounted (CI, a laptop).
                eprintln!("warning: {e}");
                warnings += 1;
            }
            if let Err(e) = config.admin_token() {
                eprintln!("warning: {e}");
                warnings += 1;
            }
            config.rules_path()
        }
        Err(e) => {
            let text = e.to_string();
            for line in text.lines() {
                eprintln!("error: {line}");
            }
            errors += text.lines().count();
            Config::rules_path_in(config_path)
        }
    };
    match RuleSet::load(&rules_path) {
        Ok(rules) => {
            for w in rules.warnings() {
                match w.line {
                    0 => eprintln!("warning: {}: {}", rules_path.display(), w.message),
                    line => eprintln!("warning: {}:{line}: {}", rules_path.display(), w.message),
                }
                warnings += 1;
            }
            println!(
                "{}: {} destinations, {} rules",
                rules_path.display(),
                rules.destinations.len(),
                rules.rules.len()
            );
        }
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("error: {line}");
            }
            errors += e.problems.len();
        }
    }
    println!("{errors} errors, {warnings} warnings");
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn secret_from_env(var: &str) -> anyhow::Result<Vec<u8>> {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => Ok(v.into_encoded_bytes()),
        _ => bail!("the environment variable {var} is not set or empty"),
    }
}

/// Prints the `X-Hub-Signature-256` value for a file.
pub fn sign(secret_env: &str, payload: &Path) -> anyhow::Result<ExitCode> {
    let key = secret_from_env(secret_env)?;
    let body =
        std::fs::read(payload).with_context(|| format!("cannot read {}", payload.display()))?;
    println!("{}", verify::sign(&key, &body));
    Ok(ExitCode::SUCCESS)
}

/// POSTs a file signed as the vendor would.
pub async fn send(url: &str, secret_env: Option<&str>, payload: &Path) -> anyhow::Result<ExitCode> {
    let body =
        std::fs::read(payload).with_context(|| format!("cannot read {}", payload.display()))?;
    let uri = http::Uri::try_from(url).with_context(|| format!("{url:?} is not a URL"))?;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(var) = secret_env {
        let signature = verify::sign(&secret_from_env(var)?, &body);
        headers.insert(
            crate::delivery::attempt::HEADER_SIGNATURE,
            signature.parse()?,
        );
    }
    let client = Client::new(Settings {
        connect_timeout: Duration::from_secs(10),
        lifetime: Duration::from_secs(60),
    })?;
    // An answer is a status and a short message; more is not printed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let response = client
        .post(
            &uri,
            &Transport::default(),
            &headers,
            body.into(),
            64 * 1024,
            deadline,
        )
        .await
        .with_context(|| format!("cannot POST to {url}"))?;
    let status = response.status;
    let text = String::from_utf8_lossy(&response.body);
    println!("{status}");
    if !text.is_empty() {
        println!("{text}");
    }
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A local receiver that prints each webhook and whether it verifies.
pub async fn listen(addr: SocketAddr, secret_env: Option<&str>) -> anyhow::Result<ExitCode> {
    let verifier = match secret_env {
        Some(var) => Verifier::new(vec![Secret::new(var, &secret_from_env(var)?)]),
        None => Verifier::new(Vec::new()),
    };
    let checking = secret_env.is_some();
    let route = warp::any()
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(16 << 20))
        .and(warp::body::bytes())
        .map(
            move |method: http::Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: http::HeaderMap,
                  body: Bytes| {
                let verdict = match (
                    checking,
                    verifier.verify(body.clone(), headers.get("x-hub-signature-256")),
                ) {
                    (false, _) => "not checked (no --secret-env)".to_owned(),
                    (true, Ok(_)) => "signature OK".to_owned(),
                    (true, Err(e)) => format!("signature FAILED: {e}"),
                };
                let sep = if query.is_empty() { "" } else { "?" };
                println!(
                    "--- {method} {}{sep}{query} ({} bytes): {verdict}",
                    path.as_str(),
                    body.len()
                );
                for (name, value) in &headers {
                    let name = name.as_str();
                    if name.starts_with("x-") || name == "content-type" {
                        println!("{name}: {}", String::from_utf8_lossy(value.as_bytes()));
                    }
                }
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                    Err(_) => println!("{}", String::from_utf8_lossy(&body)),
                }
                "OK"
            },
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    eprintln!(
        "listening on http://{}/ (Ctrl-C to stop)",
        listener.local_addr()?
    );
    warp::serve(route)
        .incoming(listener)
        .graceful(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .run()
        .await;
    Ok(ExitCode::SUCCESS)
}
