//! `route` and `test`: what the rules decide for a payload, explained, and
//! ops-written expectations checked against it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::rules::{Input, RuleSet, Trace, Verdict};
use crate::webhook::job::Job;
use crate::webhook::query::Query;

#[derive(Serialize)]
struct RouteReport<'a> {
    job_id: &'a str,
    rules: Vec<Trace>,
    destinations: Vec<RouteLine>,
    dropped: bool,
    unrouted: bool,
}

impl<'a> RouteReport<'a> {
    fn new(rules: &RuleSet, job: &'a Job<'_>, query: Option<&str>) -> Self {
        let query = Query::new(query, job.callback_url.as_deref());
        let input = Input { job, query: &query };
        let decision = rules.decide(input);
        RouteReport {
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
        }
    }
}

impl RouteReport<'_> {
    fn render(&self, job: &Job<'_>, rules_path: &Path) -> String {
        let mut out = String::new();
        let categories: Vec<String> = job
            .categories
            .iter()
            .map(|c| format!("{}:{}", c.name, c.risk_level))
            .collect();
        let _ = writeln!(
            out,
            "job {} (is_error = {}, categories [{}])",
            job.job_id,
            job.is_error,
            categories.join(", ")
        );
        let _ = writeln!(out, "rules ({}):", rules_path.display());
        for t in &self.rules {
            let _ = match &t.verdict {
                Verdict::Matched => writeln!(out, "  MATCH    {} (line {})", t.rule, t.line),
                Verdict::Skipped { failed, observed } => {
                    writeln!(
                        out,
                        "  skip     {} (line {}): {failed} does not hold ({observed})",
                        t.rule, t.line
                    )
                }
                Verdict::NotReached { after } => {
                    writeln!(
                        out,
                        "  -        {} (line {}): not evaluated, {after} matched first",
                        t.rule, t.line
                    )
                }
            };
        }
        if self.unrouted {
            let _ = writeln!(
                out,
                "=> unrouted: no rule matches; the job would not be forwarded"
            );
        } else if self.dropped {
            let _ = writeln!(out, "=> dropped: acknowledged and sent nowhere");
        }
        for d in &self.destinations {
            let _ = match (&d.url, &d.error) {
                (Some(url), _) => {
                    writeln!(out, "=> {} via rule {}: POST {url}", d.destination, d.rule)
                }
                (_, e) => writeln!(
                    out,
                    "=> {} via rule {}: NOT FORWARDED: {}",
                    d.destination,
                    d.rule,
                    e.as_deref().unwrap_or_default()
                ),
            };
            for (name, value) in &d.headers {
                let _ = writeln!(out, "     {name}: {value}");
            }
        }
        out
    }
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
    let report = RouteReport::new(&rules, &job, query);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", report.render(&job, &config.rules_path()));
    Ok(ExitCode::SUCCESS)
}

/// A file of routing tests, written by ops next to the rules.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTests {
    /// The rules under test, relative to the test file.
    #[serde(default = "default_rules")]
    rules: PathBuf,
    tests: Vec<RuleTest>,
}

fn default_rules() -> PathBuf {
    "rules.toml".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTest {
    name: String,
    /// A payload file, relative to the test file ...
    payload: Option<PathBuf>,
    /// ... or the payload inline.
    json: Option<String>,
    /// The callback URL's query string, e.g. `tenant=acme`.
    query: Option<String>,
    /// Where the job must go (any order); empty for dropped or unrouted.
    expect_destinations: Vec<String>,
    /// The rules that must match, in order; checked when given.
    expect_rules: Option<Vec<String>>,
}

/// Runs ops-written routing tests, in the spirit of `promtool test rules`.
pub fn test(file: &Path) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let tests: RuleTests = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
        anyhow::anyhow!("{}:{line}: {}", file.display(), e.message())
    })?;
    let dir = file.parent().unwrap_or(Path::new(""));
    let rules_path = dir.join(&tests.rules);
    let rules = RuleSet::load(&rules_path)?;
    println!(
        "Unit testing: {} (rules: {})",
        file.display(),
        rules_path.display()
    );
    let mut failed = 0;
    for t in &tests.tests {
        match run_one(&rules, &rules_path, dir, t) {
            Ok(()) => println!("  PASS  {}", t.name),
            Err(report) => {
                failed += 1;
                println!("  FAIL  {}", t.name);
                for line in report.lines() {
                    println!("        {line}");
                }
            }
        }
    }
    let total = tests.tests.len();
    if failed == 0 {
        println!("SUCCESS: {total} tests passed");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAILED: {failed} of {total} tests failed");
        Ok(ExitCode::FAILURE)
    }
}

/// `Err` holds a readable diff and the decision's explanation.
fn run_one(rules: &RuleSet, rules_path: &Path, dir: &Path, t: &RuleTest) -> Result<(), String> {
    let body = match (&t.payload, &t.json) {
        (Some(path), None) => {
            let path = dir.join(path);
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
        }
        (None, Some(json)) => json.clone().into_bytes(),
        _ => return Err("give exactly one of `payload` (a file) or `json` (inline)".into()),
    };
    let job = Job::from_bytes(&body).map_err(|e| format!("the payload is not a job: {e}"))?;
    let report = RouteReport::new(rules, &job, t.query.as_deref());
    let mut diff = String::new();
    let mut got: Vec<&str> = report
        .destinations
        .iter()
        .map(|d| d.destination.as_str())
        .collect();
    let mut want: Vec<&str> = t.expect_destinations.iter().map(String::as_str).collect();
    got.sort_unstable();
    want.sort_unstable();
    if got != want {
        diff_lists(&mut diff, "destinations", &want, &got);
    }
    if let Some(expected) = &t.expect_rules {
        let matched: Vec<&str> = report
            .rules
            .iter()
            .filter(|r| matches!(r.verdict, Verdict::Matched))
            .map(|r| r.rule.as_str())
            .collect();
        let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        if matched != expected {
            diff_lists(&mut diff, "matched rules", &expected, &matched);
        }
    }
    if diff.is_empty() {
        return Ok(());
    }
    diff.push_str("why:\n");
    for line in report.render(&job, rules_path).lines() {
        let _ = writeln!(diff, "  {line}");
    }
    Err(diff)
}

fn diff_lists(out: &mut String, what: &str, want: &[&str], got: &[&str]) {
    let _ = writeln!(out, "{what}:");
    let _ = writeln!(out, "  expected: {want:?}");
    let _ = writeln!(out, "  got:      {got:?}");
    for w in want.iter().filter(|w| !got.contains(w)) {
        let _ = writeln!(out, "  - {w} (expected, missing)");
    }
    for g in got.iter().filter(|g| !want.contains(g)) {
        let _ = writeln!(out, "  + {g} (not expected)");
    }
}
