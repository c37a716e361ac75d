//! The `hookgate` binary as operators run it.

use assert_cmd::Command;

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
        (6, "unknown field `forwrad`"),
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
    let vectors = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors");
    let out = hookgate()
        .args(["sign", "--secret-env", "VENDOR_SECRET"])
        .arg(vectors.join("success_compact.json"))
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
    let vectors = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors");
    let out = hookgate()
        .args(["route", "--json"])
        .arg(vectors.join("success_compact.json"))
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The README's run command: the shipped config serves, answers, and
/// stops cleanly on SIGTERM (exit 0).
#[tokio::test]
async fn serve_runs_the_shipped_config_and_stops_on_sigterm() {
    let (webhook, admin) = (free_port(), free_port());
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin!("hookgate"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HOOKGATE_SECRET", crate::support::SECRET)
        .env("HOOKGATE_SERVER__LISTEN", format!("127.0.0.1:{webhook}"))
        .env("HOOKGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("HOOKGATE_DELIVERY__DIRECT_DEADLINE", "1s")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = hookgate::deliver::client_builder().build().unwrap();
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
        {
            ready = r.status() == 200;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ready, "the gateway did not become ready");
    let body =
        std::fs::read(crate::support::vectors_dir().join("error_python_default.json")).unwrap();
    let response = client
        .post(format!("http://127.0.0.1:{webhook}/results"))
        .header("X-Hub-Signature-256", crate::support::sign(&body))
        .body(body)
        .send()
        .await
        .unwrap();
    // The shipped destinations are cluster names that do not resolve here:
    // verified and routed, then not deliverable, so the sender would retry.
    assert!(
        matches!(response.status().as_u16(), 502 | 504),
        "{}",
        response.status()
    );
    let unsigned = client
        .post(format!("http://127.0.0.1:{webhook}/results"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains(crate::support::SECRET),
        "the secret was logged"
    );
}
