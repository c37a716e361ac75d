//! The `hookgate` binary as operators run it.

use assert_cmd::Command;

use std::time::Duration;

use crate::support::*;

fn hookgate() -> Command {
    let mut cmd = Command::cargo_bin("hookgate").unwrap();
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

#[test]
fn check_passes_the_shipped_config() {
    let out = hookgate()
        .args(["check"])
        .env("HOOKGATE_SECRET", "a-secret-of-sufficient-length")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 errors, 0 warnings"));
}

/// The first command of the README serves the shipped config: on a laptop
/// it must expose nothing beyond loopback.
#[test]
fn the_shipped_config_listens_on_loopback_only() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = hookgate::config::Config::load(&root.join("config/hookgate.toml")).unwrap();
    assert!(
        config.server.listen.ip().is_loopback(),
        "{}",
        config.server.listen
    );
    assert!(
        config.admin.listen.ip().is_loopback(),
        "{}",
        config.admin.listen
    );
}

#[test]
fn check_names_file_and_line_of_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hookgate.toml"),
        "[verify]\nrequired = false\n[delivery]\nmode = \"direct\"\n",
    )
    .unwrap();
    let rules = r#"[destinations.a]
url = "http://a.internal/"

[[rules]]
name = "typo"
forwrad = ["a"]

[[rules]]
name = "undefined"
forward = ["nowhere"]

[[rules]]
name = "regex"
match = { query = { tenant = { regex = "([" } } }
forward = ["a"]
"#;
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    let config = dir.path().join("hookgate.toml");
    let out = hookgate()
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = dir.path().join("rules.toml").display().to_string();
    for (line, text) in [
        (6, "unknown key forwrad (did you mean \"forward\"?)"),
        (10, "\"nowhere\", which is not defined"),
        (14, "bad regex"),
    ] {
        let prefix = format!("error: {file}:{line}: ");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains(text)),
            "no line starting {prefix:?} containing {text:?} in:\n{stderr}"
        );
    }
}

/// One run of `check` shows every problem of both files, config and rules,
/// in plain words, each on the line of its key, before the summary line.
#[test]
fn check_reports_every_problem_of_both_files_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hookgate.toml"),
        "[verify]\nrequired = false\n[server]\nmax_connections = \"lots\"\n\
         [delivery]\ntimeout = 5\nconcurency = 3\n",
    )
    .unwrap();
    let rules = r#"[destinations.a]
url = "http://127.0.0.1:1/"
headers = { "X-A" = "b" }
max_attempts = "three"
retries = 3

[[rules]]
name = "r"
match = { min_rsk = "HIGH" }
forward = ["a"]

[[rules]]
name = "t"
forward = "a"
"#;
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    // Both streams in one pipe, as a terminal shows them.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("\"$0\" check --config \"$1\" 2>&1")
        .arg(assert_cmd::cargo::cargo_bin!("hookgate"))
        .arg(dir.path().join("hookgate.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let want = [
        "hookgate.toml:4: server.max_connections: found the text \"lots\", expected a whole number",
        "hookgate.toml:6: delivery.timeout: found the number 5, expected a duration",
        "hookgate.toml:7: unknown key delivery.concurency (did you mean \"concurrency\"?)",
        "rules.toml:4: destination \"a\": max_attempts: found the text \"three\", expected a whole number",
        "rules.toml:5: destination \"a\": unknown key retries",
        "rules.toml:9: rule \"r\": `match.min_rsk`: unknown matcher `min_rsk` (did you mean \"min_risk\"?)",
        "rules.toml:14: rule #2: forward: found the text \"a\", expected a list",
    ];
    for w in want {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("error: ") && l.contains(w)),
            "{w:?} not in:\n{text}"
        );
    }
    assert_eq!(lines.last(), Some(&"7 errors, 0 warnings"), "{text}");
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("error: ")).count(),
        7,
        "{text}"
    );
}

#[test]
fn bad_config_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookgate.toml");
    std::fs::write(&config, "[delivery]\nmax_attempts = \"many\"\n").unwrap();
    let out = hookgate()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("hookgate.toml") && stderr.contains("max_attempts"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(
        hookgate().arg("frobnicate").output().unwrap().status.code(),
        Some(2)
    );
}

#[test]
fn sign_matches_the_vendor_vector() {
    let out = hookgate()
        .args(["sign", "--secret-env", "VENDOR_SECRET"])
        .arg(payload_path("success_compact.json"))
        .env("VENDOR_SECRET", "test_key")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "8pFFlWH5PwFPHiFm9sJdhr/WNc6C6Yt5ZGFkWdwWj9s="
    );
}

#[test]
fn route_explains_the_decision() {
    let out = hookgate()
        .args(["route", "--json"])
        .arg(payload_path("success_compact.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let destinations: Vec<&str> = report["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["destination"].as_str().unwrap())
        .collect();
    assert_eq!(destinations, ["trust-safety", "tenant-archive"]);
    assert_eq!(report["rules"][0]["verdict"], "skipped");
    assert_eq!(report["rules"][0]["failed"], "is_error = true");
}

/// The README's run command: the shipped config serves, accepts into its
/// spool, tries to deliver, and stops cleanly on SIGTERM (exit 0).
#[tokio::test]
async fn serve_runs_the_shipped_config_and_stops_on_sigterm() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let spool = tempfile::tempdir().unwrap();
    let spool_path = spool.path().display().to_string();
    let gw = BinaryGateway::spawn(
        root,
        std::path::Path::new("config/hookgate.toml"),
        &[
            ("HOOKGATE_SECRET", SECRET),
            ("HOOKGATE_SPOOL__PATH", &spool_path),
        ],
    )
    .await;
    let body = payload("error_python_default.json");
    assert_eq!(gw.post(&body).await.status(), 202);
    // The shipped destinations are cluster names that do not resolve here:
    // the job waits in the spool and is retried.
    eventually(Duration::from_secs(5), "a delivery attempt", || async {
        let m = gw.metrics().await;
        m.get(
            "hookgate_forward_attempts_total",
            "destination=\"ops-errors\",outcome=\"connect_error\"",
        ) >= 1.0
    })
    .await;
    let m = gw.metrics().await;
    assert_eq!(m.get("hookgate_jobs_routed_total", "rule=\"errors\""), 1.0);
    assert_eq!(
        m.get("hookgate_queue_depth", "destination=\"ops-errors\""),
        1.0
    );
    let unsigned = gw
        .client
        .post(format!("http://{}/results", gw.webhook))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    let (code, stderr) = gw.stop().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains(SECRET), "the secret was logged");
    assert!(spool.path().join("spool.redb").exists());
}

#[test]
fn rule_tests_pass_on_the_shipped_rules() {
    let out = hookgate()
        .args(["test", "config/rules_test.toml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SUCCESS: 8 tests passed"), "{stdout}");
}

#[test]
fn a_wrong_expectation_fails_with_a_readable_diff() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        root.join("config/rules.toml"),
        dir.path().join("rules.toml"),
    )
    .unwrap();
    std::fs::copy(
        payload_path("success_compact.json"),
        dir.path().join("high.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t.toml"),
        r#"
[[tests]]
name = "right"
payload = "high.json"
expect_destinations = ["tenant-archive", "trust-safety"]

[[tests]]
name = "wrong"
payload = "high.json"
expect_destinations = ["trust-safety", "review-queue"]
expect_rules = ["high-risk"]
"#,
    )
    .unwrap();
    let out = hookgate()
        .arg("test")
        .arg(dir.path().join("t.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in [
        "PASS  right",
        "FAIL  wrong",
        "- review-queue (expected, missing)",
        "+ tenant-archive (not expected)",
        "matched rules:",
        "expected: [\"high-risk\"]",
        "got:      [\"high-risk\", \"tenant-archive\"]",
        "skip     medium-review",
        "FAILED: 1 of 2 tests failed",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

/// The README's "try it": `send` signs as the vendor would, `listen`
/// prints what it got and whether the signature verifies.
#[tokio::test]
async fn send_to_listen_round_trip() {
    let port = free_port();
    let bin = assert_cmd::cargo::cargo_bin!("hookgate");
    let listen = ChildGuard::spawn(
        std::process::Command::new(bin)
            .args([
                "listen",
                "--port",
                &port.to_string(),
                "--secret-env",
                "TRY_SECRET",
            ])
            .env("TRY_SECRET", "try-it-secret-1234567")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null()),
    );
    let client = reqwest::Client::builder().build().unwrap();
    eventually(Duration::from_secs(10), "listen is up", || {
        let req = client
            .post(format!("http://127.0.0.1:{port}/"))
            .body("{}")
            .send();
        async move { req.await.is_ok() }
    })
    .await;
    let payload = payload_path("success_compact.json");
    let send = |secret: &'static str| {
        hookgate()
            .args([
                "send",
                "--url",
                &format!("http://127.0.0.1:{port}/results?tenant=acme"),
                "--secret-env",
                "TRY_SECRET",
            ])
            .arg(&payload)
            .env("TRY_SECRET", secret)
            .output()
            .unwrap()
    };
    let good = send("try-it-secret-1234567");
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(String::from_utf8_lossy(&good.stdout).starts_with("200"));
    let bad = send("some-other-secret-000");
    assert!(bad.status.success());
    let out = listen.kill_with_output();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("POST /results?tenant=acme") && printed.contains("signature OK"),
        "{printed}"
    );
    assert!(printed.contains("signature FAILED"), "{printed}");
    assert!(
        printed.contains("\"job_id\": \"8a7c1f3e-5b2d-4c9a-9e41-2f6d0b7a1c55\""),
        "{printed}"
    );
}

#[test]
fn check_refuses_a_rules_file_without_rules() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hookgate.toml"),
        "[verify]\nrequired = false\n[delivery]\nmode = \"direct\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("rules.toml"), "").unwrap();
    let out = hookgate()
        .args(["check", "--config"])
        .arg(dir.path().join("hookgate.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rules.toml") && stderr.contains("the file is empty"),
        "{stderr}"
    );
}

/// Every argument and option of every command says what it is, and
/// `serve --help` names the environment it reads and its exit codes.
#[test]
fn help_describes_every_argument() {
    let help = |args: &[&str]| {
        let out = hookgate().args(args).arg("--help").output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let commands = ["serve", "check", "route", "test", "sign", "send", "listen"];
    for command in commands {
        let text = help(&[command]);
        let mut section = "";
        for line in text.lines() {
            if !line.starts_with(' ') {
                section = line;
                continue;
            }
            if !matches!(section, "Arguments:" | "Options:") {
                continue;
            }
            // "  --name <NAME>  What it is" or "  <NAME>  What it is".
            let described = line
                .trim_start()
                .split_once("  ")
                .is_some_and(|(_, rest)| !rest.trim().is_empty());
            assert!(described, "{command} --help: {line:?} has no description");
        }
    }
    let top = help(&[]);
    assert!(
        top.lines()
            .any(|l| l.contains("check") && l.ends_with("if there is one")),
        "{top}"
    );
    let serve = help(&["serve"]);
    for needle in ["HOOKGATE_", "RUST_LOG", "SIGTERM", "SIGHUP", "Exit codes"] {
        assert!(
            serve.contains(needle),
            "serve --help lacks {needle}: {serve}"
        );
    }
}

/// `check` names each problem of the config file with its line, or the
/// environment variable it came from, and suggests the key meant.
#[test]
fn config_problems_name_their_line_or_variable() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.toml"),
        GatewayBuilder::forward_all_rules("http://127.0.0.1:1/"),
    )
    .unwrap();
    let file = dir.path().join("hookgate.toml");
    let config = "[verify]\nrequired = false\n\n[server]\nlisten = \"127.0.0.1:8080\"\n\
                  max_body_byte = 5\n[delivery]\ntimout = \"5s\"\nmode = \"durabel\"\n";
    let valid = "[verify]\nrequired = false\n";
    // (the file, the environment, the errors expected)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            config,
            &[],
            &[
                "hookgate.toml:6: unknown key server.max_body_byte (did you mean \"max_body_bytes\"?)",
                "hookgate.toml:8: unknown key delivery.timout (did you mean \"timeout\"?)",
                "hookgate.toml:9: delivery.mode: \"durabel\" is not one of durable, direct (did you mean \"durable\"?)",
            ],
        ),
        (
            valid,
            &[("HOOKGATE_DELIVERY__TIMOUT", "5s")],
            &["HOOKGATE_DELIVERY__TIMOUT: unknown key delivery.timout (did you mean \"timeout\"?)"],
        ),
        (
            valid,
            &[("HOOKGATE_DELIVERY__TIMEOUT", "5")],
            &[
                "HOOKGATE_DELIVERY__TIMEOUT: delivery.timeout: found the number 5, expected a duration (write a unit: \"5s\"",
            ],
        ),
    ];
    for (text, envs, want) in cases {
        std::fs::write(&file, text).unwrap();
        let out = hookgate()
            .arg("check")
            .arg("--config")
            .arg(&file)
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("error: "))
            .collect();
        assert_eq!(errors.len(), want.len(), "{stderr}");
        for w in *want {
            assert!(
                errors.iter().any(|e| e.contains(w)),
                "{w:?} not in {stderr}"
            );
        }
    }
}
