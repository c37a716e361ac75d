//! The operator's commands: `check`, `route`, `sign`, `send`, `listen`.
//!
//! These are edges: they print for people (or `--json` for machines) and
//! return the process exit code.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::Serialize;
use warp::Filter;

use crate::config::{Config, Mode};
use crate::job::Job;
use crate::query::Query;
use crate::rules::{Input, RuleSet, Trace, Verdict};
use crate::verify::{self, Secret, Verifier};

/// Validates the config and the rules it names, printing every problem.
pub fn check(config_path: &Path) -> ExitCode {
    let mut errors = 0;
    let mut warnings = 0;
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if config.delivery.mode == Mode::Durable {
        eprintln!(
            "error: {}: delivery.mode = \"durable\" is not available in this build; set delivery.mode = \"direct\"",
            config_path.display()
        );
        errors += 1;
    }
    if config.verify.secrets.is_empty() && config.verify.required {
        eprintln!(
            "error: {}: verify.secrets is empty and verify.required is true: the gateway would refuse to start",
            config_path.display()
        );
        errors += 1;
    } else if let Err(e) = config.secrets() {
        // A missing secret stops `serve`, but `check` runs where secrets
        // are not mounted (CI, a laptop).
        eprintln!("warning: {e}");
        warnings += 1;
    }
    if let Err(e) = config.admin_token() {
        eprintln!("warning: {e}");
        warnings += 1;
    }
    let rules_path = config.rules_path();
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

#[derive(Serialize)]
struct RouteReport<'a> {
    job_id: &'a str,
    rules: Vec<Trace>,
    destinations: Vec<RouteLine>,
    dropped: bool,
    unrouted: bool,
}

#[derive(Serialize)]
struct RouteLine {
    destination: String,
    rule: String,
    url: Option<String>,
    error: Option<String>,
    headers: Vec<(String, String)>,
}

/// Explains where a payload would go, without sending it.
pub fn route(
    config_path: &Path,
    query: Option<&str>,
    payload: &Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let rules = RuleSet::load(&config.rules_path())?;
    let body =
        std::fs::read(payload).with_context(|| format!("cannot read {}", payload.display()))?;
    let job =
        Job::from_bytes(&body).with_context(|| format!("{} is not a job", payload.display()))?;
    let query = Query::new(query, job.callback_url.as_deref());
    let input = Input {
        job: &job,
        query: &query,
    };
    let decision = rules.decide(input);
    let report = RouteReport {
        job_id: &job.job_id,
        rules: rules.explain(input),
        destinations: decision
            .routes
            .iter()
            .map(|r| RouteLine {
                destination: r.destination.name.to_string(),
                rule: r.rule.name.to_string(),
                url: r.url.as_ref().ok().map(|u| u.to_string()),
                error: r.url.as_ref().err().map(|e| e.to_string()),
                headers: r
                    .headers()
                    .map(|(n, v)| {
                        (
                            n.to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
            })
            .collect(),
        dropped: !decision.is_unrouted() && decision.routes.is_empty(),
        unrouted: decision.is_unrouted(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let categories: Vec<String> = job
        .categories
        .iter()
        .map(|c| format!("{}:{}", c.name, c.risk_level))
        .collect();
    println!(
        "job {} (is_error = {}, categories [{}])",
        job.job_id,
        job.is_error,
        categories.join(", ")
    );
    println!("rules ({}):", config.rules_path().display());
    for t in &report.rules {
        match &t.verdict {
            Verdict::Matched => println!("  MATCH    {} (line {})", t.rule, t.line),
            Verdict::Skipped { failed, observed } => {
                println!(
                    "  skip     {} (line {}): {failed} does not hold ({observed})",
                    t.rule, t.line
                )
            }
            Verdict::NotReached { after } => {
                println!(
                    "  -        {} (line {}): not evaluated, {after} matched first",
                    t.rule, t.line
                )
            }
        }
    }
    if report.unrouted {
        println!("=> unrouted: no rule matches; the job would not be forwarded");
    } else if report.dropped {
        println!("=> dropped: acknowledged and sent nowhere");
    }
    for d in &report.destinations {
        match (&d.url, &d.error) {
            (Some(url), _) => println!("=> {} via rule {}: POST {url}", d.destination, d.rule),
            (None, Some(e)) => println!(
                "=> {} via rule {}: NOT FORWARDED: {e}",
                d.destination, d.rule
            ),
            (None, None) => {}
        }
        for (name, value) in &d.headers {
            println!("     {name}: {value}");
        }
    }
    Ok(ExitCode::SUCCESS)
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
    let client = crate::deliver::client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut request = client
        .post(url)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(var) = secret_env {
        request = request.header(
            "X-Hub-Signature-256",
            verify::sign(&secret_from_env(var)?, &body),
        );
    }
    let response = request
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot POST to {url}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
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
