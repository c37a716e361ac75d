use super::*;

/// A job with `categories` given as (name, level) pairs.
fn job_json(is_error: bool, categories: &[(&str, &str)], extra: &str) -> String {
    let cats: Vec<String> = categories
        .iter()
        .map(|(n, r)| format!(r#"{{"name":"{n}","risk_level":"{r}"}}"#))
        .collect();
    format!(
        r#"{{"data":{{"job_id":"j1","callback_url":"https://gw/results?tenant=fromcallback","is_error":{is_error},"result":{{"policy_categories":[{}],"metadata":{{"width":720,"fps":30}}{extra}}}}}}}"#,
        cats.join(",")
    )
}

/// Runs `rules` on a job and returns "rule>destination" for each route, or
/// "drop:rule" / "unrouted".
fn decide(rules: &RuleSet, body: &str, query: Option<&str>) -> Vec<String> {
    let job = Job::from_bytes(body.as_bytes()).unwrap();
    let query = Query::new(query, job.callback_url.as_deref());
    let d = rules.decide(Input {
        job: &job,
        query: &query,
    });
    if d.is_unrouted() {
        return vec!["unrouted".into()];
    }
    if d.routes.is_empty() {
        return d
            .matched
            .iter()
            .map(|r| format!("drop:{}", r.name))
            .collect();
    }
    d.routes
        .iter()
        .map(|r| match &r.url {
            Ok(_) => format!("{}>{}", r.rule.name, r.destination.name),
            Err(_) => format!("{}>{}!", r.rule.name, r.destination.name),
        })
        .collect()
}

/// One rule `m` forwarding to `hit`, then a catch-all to `miss`.
fn single(matcher: &str) -> RuleSet {
    let text = format!(
        r#"
[destinations.hit]
url = "http://hit.internal/"
[destinations.miss]
url = "http://miss.internal/"
[[rules]]
name = "r"
match = {matcher}
forward = ["hit"]
[[rules]]
name = "default"
forward = ["miss"]
"#
    );
    RuleSet::parse(&text).unwrap_or_else(|p| panic!("{matcher}: {p:?}"))
}

#[test]
fn every_matcher() {
    let high = job_json(false, &[("ARMS_AMMO", "HIGH"), ("HATE_SPEECH", "LOW")], "");
    let medium = job_json(false, &[("ARMS_AMMO", "MEDIUM")], "");
    let unknown = job_json(false, &[("NEW_THING", "SEVERE")], "");
    let clean = job_json(false, &[], "");
    let error = r#"{"job_id":"e","is_error":true,"result":{"error":"Failed"}}"#.to_owned();
    #[rustfmt::skip]
    let cases: &[(&str, &str, Option<&str>, bool)] = &[
        ("{ is_error = true }", &error, None, true),
        ("{ is_error = true }", &clean, None, false),
        ("{ is_error = false }", &clean, None, true),
        ("{ min_risk = \"HIGH\" }", &high, None, true),
        ("{ min_risk = \"HIGH\" }", &medium, None, false),
        ("{ min_risk = \"MEDIUM\" }", &medium, None, true),
        ("{ min_risk = \"LOW\" }", &unknown, None, false),
        ("{ min_risk = \"LOW\" }", &clean, None, false),
        ("{ flagged = true }", &unknown, None, true),
        ("{ flagged = true }", &clean, None, false),
        ("{ flagged = false }", &clean, None, true),
        ("{ category = \"ARMS_AMMO\" }", &medium, None, true),
        ("{ category = [\"ARMS_*\"] }", &medium, None, true),
        ("{ category = [\"*_SPEECH\", \"X\"] }", &high, None, true),
        ("{ category = [\"ARMS\"] }", &medium, None, false),
        ("{ category_with = { name = \"HATE_*\", min_risk = \"MEDIUM\" } }", &high, None, false),
        ("{ category_with = { name = \"ARMS_*\", min_risk = \"MEDIUM\" } }", &high, None, true),
        ("{ category_with = { min_risk = \"HIGH\" } }", &medium, None, false),
        ("{ query = { tenant = \"acme\" } }", &clean, Some("tenant=acme"), true),
        ("{ query = { tenant = \"acme\" } }", &clean, Some("tenant=globex"), false),
        ("{ query = { tenant = \"fromcallback\" } }", &clean, None, true),
        ("{ query = { tenant = [\"a\", \"acme\"] } }", &clean, Some("tenant=acme"), true),
        ("{ query = { tenant = { regex = \"ac.*\" } } }", &clean, Some("tenant=acme"), true),
        ("{ query = { tenant = { regex = \"cm\" } } }", &clean, Some("tenant=acme"), false),
        ("{ query = { filename = { present = true } } }", &clean, Some("filename=a.mp4"), true),
        ("{ query = { filename = { present = true } } }", &clean, None, false),
        ("{ query = { filename = { present = false } } }", &clean, None, true),
        ("{ json = { \"/data/result/metadata/width\" = 720 } }", &clean, None, true),
        ("{ json = { \"/data/result/metadata/width\" = 720.0 } }", &clean, None, true),
        ("{ json = { \"/data/result/metadata/width\" = 721 } }", &clean, None, false),
        ("{ json = { \"/data/job_id\" = \"j1\" } }", &clean, None, true),
        ("{ json = { \"/nope\" = 1 } }", &clean, None, false),
        ("{ all = [ { flagged = true }, { min_risk = \"HIGH\" } ] }", &high, None, true),
        ("{ all = [ { flagged = true }, { min_risk = \"HIGH\" } ] }", &medium, None, false),
        ("{ any = [ { is_error = true }, { min_risk = \"HIGH\" } ] }", &high, None, true),
        ("{ any = [ { is_error = true }, { min_risk = \"HIGH\" } ] }", &medium, None, false),
        ("{ not = { min_risk = \"HIGH\" } }", &medium, None, true),
        ("{ not = { min_risk = \"HIGH\" } }", &high, None, false),
        ("{ min_risk = \"HIGH\", query = { tenant = \"acme\" } }", &high, Some("tenant=acme"), true),
        ("{ min_risk = \"HIGH\", query = { tenant = \"acme\" } }", &high, Some("tenant=other"), false),
        ("{ min_risk = \"HIGH\", query = { tenant = \"acme\" } }", &medium, Some("tenant=acme"), false),
    ];
    for (matcher, body, query, hit) in cases {
        let want = if *hit { "r>hit" } else { "default>miss" };
        assert_eq!(
            decide(&single(matcher), body, *query),
            [want],
            "{matcher} on {body} ?{query:?}"
        );
    }
}

const FLOW: &str = r#"
[destinations.ts]
url = "http://ts.internal/"
[destinations.review]
url = "http://review.internal/"
[destinations.archive]
url = "http://archive.internal/"
[destinations.tenant]
url = "http://archive-{query.tenant}.internal:8080/results"

[[rules]]
name = "high"
match = { min_risk = "HIGH" }
forward = ["ts"]
continue = true

[[rules]]
name = "also-high"
match = { min_risk = "HIGH" }
forward = ["ts", "review"]
continue = true

[[rules]]
name = "spam"
match = { category = "SPAM_*" }
drop = true

[[rules]]
name = "tenant"
match = { query = { tenant = { present = true } } }
forward = ["tenant"]

[[rules]]
name = "default"
forward = ["archive"]
"#;

#[test]
fn first_match_continue_drop_default_and_templates() {
    let rules = RuleSet::parse(FLOW).unwrap();
    let high = job_json(false, &[("ARMS_AMMO", "HIGH")], "");
    let spam = job_json(false, &[("SPAM_HARMFUL_CONTENT", "LOW")], "");
    let clean = r#"{"job_id":"c","is_error":false}"#;
    #[rustfmt::skip]
    let cases: &[(&str, &str, Option<&str>, &[&str])] = &[
        ("continue collects, a destination once", &high, None, &["high>ts", "also-high>review", "tenant>tenant"]),
        ("drop stops", &spam, None, &["drop:spam"]),
        ("template filled", clean, Some("tenant=acme"), &["tenant>tenant"]),
        ("default", clean, None, &["default>archive"]),
    ];
    for (name, body, query, want) in cases {
        assert_eq!(decide(&rules, body, *query), *want, "{name}");
    }
    for bad in ["..", "a/b", "evil.com:80", "", "a%2Fb", "x@y"] {
        let q = format!("tenant={bad}");
        assert_eq!(
            decide(&rules, clean, Some(&q)),
            ["tenant>tenant!"],
            "{bad:?} must not resolve"
        );
    }
}

#[test]
fn unrouted_without_catch_all() {
    let rules = RuleSet::parse(
        r#"
[destinations.ts]
url = "http://ts.internal/"
[[rules]]
name = "high"
match = { min_risk = "HIGH" }
forward = ["ts"]
"#,
    )
    .unwrap();
    assert_eq!(
        decide(&rules, r#"{"job_id":"c","is_error":false}"#, None),
        ["unrouted"]
    );
    let warnings = rules.warnings();
    assert!(
        warnings.iter().any(|w| w.message.contains("no catch-all")),
        "{warnings:?}"
    );
}

#[test]
fn problems_name_their_line() {
    let text = r#"
[destinations.a]
url = "http://a.internal/"

[destinations.b]
url = "ftp://b.internal/"

[[rules]]
name = "one"
match = { min_risk = "HIGH" }
forwrad = ["a"]

[[rules]]
name = "two"
match = { query = { tenant = { regex = "(" } } }
forward = ["a"]

[[rules]]
name = "three"
forward = ["nowhere"]

[[rules]]
name = "four"
match = { min_risk = "SEVERE" }
forward = ["a"]

[[rules]]
name = "five"
match = { colour = "red" }
drop = true

[[rules]]
name = "five"
forward = ["a"]
headers = { "X-Hookgate-Rule" = "spoof" }
"#;
    let problems = RuleSet::parse(text).unwrap_err();
    let got: Vec<(usize, &str)> = problems
        .iter()
        .map(|p| (p.line, p.message.as_str()))
        .collect();
    #[rustfmt::skip]
    let want: &[(usize, &str)] = &[
        (6, "must be an http:// or https:// URL"),
        (11, "unknown key forwrad (did you mean \"forward\"?)"),
        (15, "bad regex"),
        (20, "\"nowhere\", which is not defined"),
        (24, "\"SEVERE\" is not a risk level"),
        (29, "unknown matcher `colour`"),
        (33, "used by an earlier rule"),
        (35, "cannot be overridden"),
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for ((line, message), (want_line, want_text)) in got.iter().zip(want) {
        assert!(
            message.contains(want_text),
            "{message:?} should contain {want_text:?}"
        );
        assert_eq!(line, want_line, "{message}");
    }
}

#[test]
fn syntax_errors_have_a_line() {
    let problems = RuleSet::parse("[[rules]]\nname = \"a\"\nforward = [\"x\"\n").unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].line >= 3, "{problems:?}");
    let problems = RuleSet::parse("[destination.a]\nurl = \"http://a/\"\n").unwrap_err();
    assert!(
        problems[0].message == "unknown key destination (did you mean \"destinations\"?)",
        "{problems:?}"
    );
    assert_eq!(problems[0].line, 1);
}

#[test]
fn warns_about_shadowed_rules_and_unused_destinations() {
    let rules = RuleSet::parse(
        r#"
[destinations.a]
url = "http://a.internal/"
[destinations.unused]
url = "http://u.internal/"
[[rules]]
name = "all"
forward = ["a"]
[[rules]]
name = "never"
match = { is_error = true }
forward = ["a"]
"#,
    )
    .unwrap();
    let messages: Vec<String> = rules.warnings().into_iter().map(|w| w.message).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages[0].contains("\"never\" can never match"));
    assert!(messages[1].contains("\"unused\" is not used"));
}

#[test]
fn globs() {
    let cases = [
        ("ARMS_*", "ARMS_AMMO", true),
        ("ARMS_*", "ARMS_", true),
        ("ARMS_*", "XARMS_AMMO", false),
        ("*_AMMO", "ARMS_AMMO", true),
        ("*", "", true),
        ("A*B*C", "AxxBxxC", true),
        ("A*B*C", "AxxCxxB", false),
        ("EXACT", "EXACT", true),
        ("EXACT", "EXACTLY", false),
        ("A**", "AB", true),
    ];
    for (pattern, text, want) in cases {
        assert_eq!(Glob::new(pattern).matches(text), want, "{pattern} ~ {text}");
    }
}

#[test]
fn explain_names_the_failing_matcher() {
    let rules = single("{ all = [ { flagged = true }, { min_risk = \"HIGH\" } ] }");
    let body = job_json(false, &[("ARMS_AMMO", "MEDIUM")], "");
    let job = Job::from_bytes(body.as_bytes()).unwrap();
    let query = Query::default();
    let traces = rules.explain(Input {
        job: &job,
        query: &query,
    });
    match &traces[0].verdict {
        Verdict::Skipped { failed, observed } => {
            assert_eq!(failed, "min_risk = \"HIGH\"");
            assert_eq!(observed, "highest risk MEDIUM");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(traces[1].verdict, Verdict::Matched));
}

#[test]
fn a_file_without_rules_is_refused() {
    let cases: &[(&str, &str)] = &[
        ("", "the file is empty"),
        ("\n  \n", "the file is empty"),
        ("# only a comment\n", "no [[rules]]"),
        (
            "[destinations.a]\nurl = \"http://a.internal/\"\n",
            "no [[rules]]",
        ),
    ];
    for (text, want) in cases {
        let problems = RuleSet::parse(text).unwrap_err();
        assert_eq!(problems.len(), 1, "{text:?}: {problems:?}");
        assert!(problems[0].message.contains(want), "{text:?}: {problems:?}");
    }
}

#[test]
fn an_undefined_destination_gets_the_closest_name() {
    let rules = |forward: &str| {
        format!(
            "[destinations.high]\nurl = \"http://a/\"\n[destinations.archive]\nurl = \"http://b/\"\n\
             [[rules]]\nname = \"r\"\nforward = [\"{forward}\"]\n"
        )
    };
    let cases = [
        ("hihg", Some("(did you mean \"high\"?)")),
        ("archve", Some("(did you mean \"archive\"?)")),
        ("elsewhere", None),
    ];
    for (forward, hint) in cases {
        let problems = RuleSet::parse(&rules(forward)).unwrap_err();
        let message = &problems[0].message;
        assert!(message.contains("which is not defined"), "{message}");
        match hint {
            Some(hint) => assert!(message.ends_with(hint), "{message}"),
            None => assert!(!message.contains("did you mean"), "{message}"),
        }
    }
}

/// Every bad key of a table is one problem on its own line: a required key
/// of the wrong type is not reported a second time as missing.
#[test]
fn every_bad_key_once_on_its_line() {
    let text = r#"[destinations.a]
url = 5
retries = 3

[[rules]]
name = 7
forward = ["a"]
"#;
    let problems = RuleSet::parse(text).unwrap_err();
    let got: Vec<(usize, &str)> = problems
        .iter()
        .map(|p| (p.line, p.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                2,
                "destination \"a\": url: found the number 5, expected text in quotes"
            ),
            (3, "destination \"a\": unknown key retries"),
            (
                6,
                "rule #1: name: found the number 7, expected text in quotes"
            ),
        ]
    );
}
