//! Reading `rules.toml`: every problem found, each with its file and line.
//!
//! The file is read in two passes so that one mistake does not hide the
//! next: the TOML syntax and top-level tables first, then each destination
//! and rule on its own. Matchers are read by hand rather than by derive so
//! that an error names the exact path (`match.all[1].query.tenant`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::{Spanned, Table, Value};

use super::{
    Action, Destination, DestinationName, Glob, Matcher, QueryCondition, Rule, RuleName, RuleSet,
    UNROUTED, UrlTemplate,
};
use crate::transport::{TlsFiles, Transport};
use crate::webhook::job::RiskLevel;

/// A problem in the rules file, at a line (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

/// Every error found in a rules file. The file is rejected whole.
#[derive(Debug, thiserror::Error)]
pub struct LoadError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if p.line == 0 {
                write!(f, "{}: {}", self.path.display(), p.message)?;
            } else {
                write!(f, "{}:{}: {}", self.path.display(), p.line, p.message)?;
            }
        }
        Ok(())
    }
}

impl LoadError {
    pub fn unreadable(path: &Path, e: &std::io::Error) -> Self {
        Self {
            path: path.to_owned(),
            problems: vec![Problem {
                line: 0,
                message: format!("cannot read the rules file: {e}"),
            }],
        }
    }
}

/// Headers that hookgate sets itself and a rule may not replace.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "x-hub-signature-256",
    "x-hookgate-rule",
    "x-hookgate-job-id",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    destinations: BTreeMap<Spanned<String>, Spanned<Value>>,
    #[serde(default)]
    rules: Vec<Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationSpec {
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    max_attempts: Option<u32>,
    concurrency: Option<usize>,
    /// HTTP/2: offered by ALPN for https://, by prior knowledge for http://.
    #[serde(default)]
    http2: bool,
    tls: Option<TlsSpec>,
}

/// A destination's own TLS files, relative to the rules file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSpec {
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    #[serde(rename = "match")]
    matcher: Option<Table>,
    #[serde(default)]
    forward: Vec<String>,
    #[serde(default)]
    drop: bool,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default, rename = "continue")]
    continues: bool,
}

/// Maps byte offsets of the source to lines, and finds where a key or
/// value sits inside a table so that messages point at the right line.
struct Source<'a> {
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    /// The line of the first `needle` inside `span`, else the span's start.
    fn find(&self, span: &Range<usize>, needle: &str) -> usize {
        let slice = self.text.get(span.clone()).unwrap_or_default();
        match slice.find(needle) {
            Some(at) if !needle.is_empty() => self.line(span.start + at),
            _ => self.line(span.start),
        }
    }
}

impl RuleSet {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::unreadable(path, &e))?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses a file's content; `path` is only for messages.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, LoadError> {
        let fail = |problems| LoadError {
            path: path.to_owned(),
            problems,
        };
        let text = std::str::from_utf8(bytes).map_err(|e| {
            fail(vec![Problem {
                line: 0,
                message: format!("the file is not UTF-8 text: {e}"),
            }])
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse_in(text, dir).map_err(fail)
    }

    /// Parses rules whose relative file names (TLS files) are relative to
    /// the working directory.
    pub fn parse(text: &str) -> Result<Self, Vec<Problem>> {
        Self::parse_in(text, Path::new("."))
    }

    /// Parses rules whose relative file names are relative to `dir`.
    pub fn parse_in(text: &str, dir: &Path) -> Result<Self, Vec<Problem>> {
        let src = Source { text };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let message = e.message().trim();
            vec![Problem {
                line: e.span().map_or(0, |s| src.line(s.start)),
                message: unknown_key(message)
                    .map_or_else(|| crate::wording::serde_message(message), |(_, m)| m),
            }]
        })?;
        let mut problems = Vec::new();
        let mut destinations = Vec::new();
        for (name, value) in raw.destinations {
            let span = value.span();
            let line = src.line(name.span().start);
            let name = name.into_inner();
            if let Err(e) = check_name(&name) {
                problems.push(Problem {
                    line,
                    message: format!("destination {name:?}: {e}"),
                });
            }
            let filler = [("url", Value::from("http://127.0.0.1/"))];
            match deserialize_all::<DestinationSpec>(value.into_inner(), &filler, "url")
                .and_then(|spec| destination(&name, spec, dir).map_err(|e| vec![e]))
            {
                Ok(d) => destinations.push(d),
                Err(located) => {
                    problems.extend(located.into_iter().map(|(needle, message)| Problem {
                        line: src.find(&span, &needle),
                        message: format!("destination {name:?}: {message}"),
                    }))
                }
            }
        }
        let mut rules = Vec::new();
        let mut seen = HashSet::new();
        for (index, value) in raw.rules.into_iter().enumerate() {
            let span = value.span();
            let line = src.line(span.start);
            let filler = [("name", Value::from("r")), ("drop", Value::from(true))];
            let spec = match deserialize_all::<RuleSpec>(value.into_inner(), &filler, "") {
                Ok(spec) => spec,
                Err(located) => {
                    problems.extend(located.into_iter().map(|(needle, message)| Problem {
                        line: src.find(&span, &needle),
                        message: format!("rule #{}: {message}", index + 1),
                    }));
                    continue;
                }
            };
            let rule_problem = |needle: &str, message: String| Problem {
                line: src.find(&span, needle),
                message: format!("rule {:?}: {message}", spec.name),
            };
            if let Err(e) = check_name(&spec.name) {
                problems.push(rule_problem("name", e));
            } else if spec.name == UNROUTED {
                problems.push(rule_problem(
                    "name",
                    format!("`{UNROUTED}` is reserved for jobs no rule routes"),
                ));
            } else if !seen.insert(spec.name.clone()) {
                problems.push(rule_problem(
                    "name",
                    "the name is used by an earlier rule".into(),
                ));
            }
            let matcher = match spec
                .matcher
                .as_ref()
                .map(|t| matcher(t, "match"))
                .transpose()
            {
                Ok(m) => m.unwrap_or(Matcher::All(Vec::new())),
                Err((needle, message)) => {
                    problems.push(rule_problem(&needle, message));
                    continue;
                }
            };
            let action = match (spec.forward.is_empty(), spec.drop) {
                (false, true) => {
                    problems.push(rule_problem(
                        "drop",
                        "`forward` and `drop = true` exclude each other".into(),
                    ));
                    continue;
                }
                (true, false) => {
                    problems.push(rule_problem(
                        "name",
                        "a rule must `forward` to at least one destination or `drop = true`".into(),
                    ));
                    continue;
                }
                (true, true) => Action::Drop,
                (false, false) => {
                    let mut targets = Vec::new();
                    for name in &spec.forward {
                        match destinations.iter().position(|d: &Destination| d.name.as_str() == name) {
                            Some(i) if targets.contains(&i) => {}
                            Some(i) => targets.push(i),
                            None => problems.push(rule_problem(
                                &format!("\"{name}\""),
                                format!(
                                    "forwards to {name:?}, which is not defined under [destinations]{}",
                                    crate::suggest::hint(name, destinations.iter().map(|d| d.name.as_str())),
                                ),
                            )),
                        }
                    }
                    Action::Forward(targets)
                }
            };
            let headers = match headers(&spec.headers) {
                Ok(h) => h,
                Err((needle, message)) => {
                    problems.push(rule_problem(&needle, message));
                    continue;
                }
            };
            rules.push(Rule {
                name: RuleName(spec.name.as_str().into()),
                matcher,
                action,
                headers,
                continues: spec.continues,
                line,
            });
        }
        if rules.is_empty() && problems.is_empty() {
            // Also what a file caught half-written (truncated, then
            // written) looks like: never loaded, it would route nothing.
            problems.push(Problem {
                line: 0,
                message: if text.trim().is_empty() {
                    "the file is empty: a rules file needs at least one [[rules]] entry".into()
                } else {
                    "there are no [[rules]]: nothing would be routed".into()
                },
            });
        }
        if !problems.is_empty() {
            problems.sort_by_key(|p| p.line);
            return Err(problems);
        }
        let digest = Sha256::digest(text.as_bytes());
        // 52 bits: the gauge is an f64, which holds them exactly.
        let hash = u64::from_be_bytes(digest[..8].try_into().unwrap_or_default()) >> 12;
        Ok(RuleSet {
            destinations,
            rules,
            hash,
        })
    }

    /// Legal but probably not meant: for `hookgate check`.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut warnings = Vec::new();
        let mut shadowed_by: Option<&Rule> = None;
        for rule in &self.rules {
            if let Some(by) = shadowed_by {
                warnings.push(Problem {
                    line: rule.line,
                    message: format!(
                        "rule {:?} can never match: rule {:?} (line {}) matches everything and does not `continue`",
                        rule.name.as_str(),
                        by.name.as_str(),
                        by.line
                    ),
                });
            } else if is_unconditional(&rule.matcher) && !rule.continues {
                shadowed_by = Some(rule);
            }
        }
        if shadowed_by.is_none() {
            warnings.push(Problem {
                line: 0,
                message: "no catch-all rule: a job that no rule matches is not forwarded (dead-lettered as `unrouted` in durable mode, answered 502 in direct mode); add a last rule without `match`".into(),
            });
        }
        for (i, d) in self.destinations.iter().enumerate() {
            let used = self
                .rules
                .iter()
                .any(|r| matches!(&r.action, Action::Forward(t) if t.contains(&i)));
            if !used {
                warnings.push(Problem {
                    line: 0,
                    message: format!("destination {:?} is not used by any rule", d.name.as_str()),
                });
            }
        }
        warnings
    }
}

fn is_unconditional(m: &Matcher) -> bool {
    matches!(m, Matcher::All(v) if v.iter().all(is_unconditional))
}

/// The first `name` in a serde message such as "unknown field `forwrad`".
fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

/// A table as `T`, or every problem with it: a key that is wrong is
/// reported, taken out (a required one replaced by its `filler` value, so
/// that it is not reported again as missing), and the rest read again (as
/// the gateway file's keys are), so that one run names them all.
fn deserialize_all<T: serde::de::DeserializeOwned>(
    mut value: Value,
    filler: &[(&str, Value)],
    fallback: &str,
) -> Result<T, Vec<Located>> {
    let mut problems = Vec::new();
    loop {
        let e = match T::deserialize(value.clone()) {
            Ok(spec) if problems.is_empty() => return Ok(spec),
            Ok(_) => return Err(problems),
            Err(e) => e,
        };
        let (problem, culprit) = explain::<T>(&value, e.message(), filler, fallback);
        problems.push(problem);
        let taken_out = culprit
            .zip(value.as_table_mut())
            .is_some_and(|(key, table)| {
                let found = table.remove(&key).is_some();
                if let Some((_, fill)) = filler.iter().find(|(k, _)| *k == key) {
                    table.insert(key, fill.clone());
                }
                found
            });
        if !taken_out || problems.len() >= 20 {
            return Err(problems);
        }
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`" as the key and
/// `unknown key x (did you mean "a"?)`, the gateway file's wording.
fn unknown_key(message: &str) -> Option<Located> {
    let rest = message.strip_prefix("unknown field ")?;
    let typed = backticked(rest).unwrap_or_default();
    let known: Vec<&str> = rest
        .split_once("expected ")
        .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default();
    let hint = crate::suggest::hint(typed, known);
    Some((typed.to_owned(), format!("unknown key {typed}{hint}")))
}

/// serde's message about a table that did not deserialize as `T`, in the
/// words of [`crate::wording`], with the text to find its line by
/// (`fallback` when no key is named), and the key at fault when there is
/// one to take out. serde names the key of an unknown or missing field but
/// not of a value of the wrong type: that key is found by deserializing
/// each key alone (beside `filler`, values for the required fields) and
/// keeping the one that fails the same way.
fn explain<T: serde::de::DeserializeOwned>(
    value: &Value,
    message: &str,
    filler: &[(&str, Value)],
    fallback: &str,
) -> (Located, Option<String>) {
    let message = message.trim();
    if let Some(unknown) = unknown_key(message) {
        let key = unknown.0.clone();
        return (unknown, Some(key));
    }
    if message.starts_with("missing field ") {
        let key = backticked(message).unwrap_or(fallback).to_owned();
        return ((fallback.to_owned(), format!("`{key}` is required")), None);
    }
    let culprit = value.as_table().and_then(|table| {
        table.iter().find_map(|(key, v)| {
            let mut alone = Table::new();
            for (k, fill) in filler {
                alone.insert((*k).to_owned(), fill.clone());
            }
            alone.insert(key.clone(), v.clone());
            T::deserialize(Value::Table(alone))
                .err()
                .filter(|e| e.message().trim() == message)
                .map(|_| key.clone())
        })
    });
    let plain = crate::wording::serde_message(message);
    match culprit {
        Some(key) => ((key.clone(), format!("{key}: {plain}")), Some(key)),
        None => ((fallback.to_owned(), plain), None),
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("names are 1 to 64 of [A-Za-z0-9_.-] (they become metric labels)".into())
    }
}

/// An error with the text to look for in the table to find its line.
type Located = (String, String);

fn destination(name: &str, spec: DestinationSpec, dir: &Path) -> Result<Destination, Located> {
    let url = UrlTemplate::parse(&spec.url).map_err(|e| ("url".to_owned(), e))?;
    if spec.max_attempts == Some(0) {
        return Err((
            "max_attempts".into(),
            "`max_attempts` must be at least 1".into(),
        ));
    }
    if spec.concurrency == Some(0) {
        return Err((
            "concurrency".into(),
            "`concurrency` must be at least 1".into(),
        ));
    }
    if spec.timeout.is_some_and(|t| t.is_zero()) {
        return Err(("timeout".into(), "`timeout` must be more than 0s".into()));
    }
    let files = spec.tls.map(|tls| TlsFiles {
        ca_file: tls.ca_file.map(|f| dir.join(f)),
        client_cert_file: tls.client_cert_file.map(|f| dir.join(f)),
        client_key_file: tls.client_key_file.map(|f| dir.join(f)),
    });
    if files.is_some() && url.source().starts_with("http://") {
        return Err((
            "tls".into(),
            "`tls` is for https:// URLs; this one is http://".into(),
        ));
    }
    let transport = Transport::new(spec.http2, files.as_ref())
        .map_err(|e| ("tls".to_owned(), format!("tls: {e}")))?;
    Ok(Destination {
        name: DestinationName(name.into()),
        url,
        headers: headers(&spec.headers)?,
        timeout: spec.timeout,
        max_attempts: spec.max_attempts,
        concurrency: spec.concurrency,
        transport,
    })
}

fn headers(spec: &BTreeMap<String, String>) -> Result<Vec<(HeaderName, HeaderValue)>, Located> {
    spec.iter()
        .map(|(name, value)| {
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                (
                    name.clone(),
                    format!("header name {name:?} is not a valid HTTP header name"),
                )
            })?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err((
                    name.clone(),
                    format!("header {name:?} is set by hookgate and cannot be overridden"),
                ));
            }
            let value = HeaderValue::from_str(value).map_err(|_| {
                (
                    name.clone(),
                    format!("header {name:?} has a value that is not valid in HTTP"),
                )
            })?;
            Ok((header, value))
        })
        .collect()
}

const MATCHERS: &str =
    "is_error, min_risk, flagged, category, category_with, query, json, all, any, not";

fn matcher(table: &Table, path: &str) -> Result<Matcher, Located> {
    let mut all = Vec::new();
    for (key, value) in table {
        let at = format!("{path}.{key}");
        let err = |message: String| (key.clone(), format!("`{at}`: {message}"));
        let m = match key.as_str() {
            "is_error" => Matcher::IsError(boolean(value).map_err(err)?),
            "flagged" => Matcher::Flagged(boolean(value).map_err(err)?),
            "min_risk" => Matcher::MinRisk(risk(value).map_err(err)?),
            "category" => Matcher::Category(
                strings(value)
                    .map_err(err)?
                    .into_iter()
                    .map(Glob::new)
                    .collect(),
            ),
            "category_with" => {
                let t = value.as_table().ok_or_else(|| {
                    err(
                        "expected a table such as { name = \"ARMS_*\", min_risk = \"MEDIUM\" }"
                            .into(),
                    )
                })?;
                let mut names = Vec::new();
                let mut min_risk = None;
                for (k, v) in t {
                    match k.as_str() {
                        "name" => {
                            names = strings(v)
                                .map_err(err)?
                                .into_iter()
                                .map(Glob::new)
                                .collect()
                        }
                        "min_risk" => min_risk = Some(risk(v).map_err(err)?),
                        other => {
                            return Err(err(format!(
                                "unknown condition `{other}`, expected `name` or `min_risk`"
                            )));
                        }
                    }
                }
                Matcher::CategoryWith { names, min_risk }
            }
            "query" => {
                let t = value
                    .as_table()
                    .ok_or_else(|| err("expected a table of parameter = condition".into()))?;
                let mut conditions = Vec::new();
                for (name, cond) in t {
                    let err = |m: String| (name.clone(), format!("`{at}.{name}`: {m}"));
                    conditions.push(Matcher::Query {
                        name: name.clone(),
                        condition: query_condition(cond).map_err(err)?,
                    });
                }
                Matcher::All(conditions)
            }
            "json" => {
                let t = value
                    .as_table()
                    .ok_or_else(|| err("expected a table of \"/json/pointer\" = value".into()))?;
                let mut conditions = Vec::new();
                for (pointer, v) in t {
                    if !pointer.is_empty() && !pointer.starts_with('/') {
                        return Err((
                            pointer.clone(),
                            format!("`{at}`: {pointer:?} is not a JSON pointer (it starts with /)"),
                        ));
                    }
                    let value = serde_json::to_value(v).map_err(|e| err(e.to_string()))?;
                    conditions.push(Matcher::Json {
                        pointer: pointer.clone(),
                        value,
                    });
                }
                Matcher::All(conditions)
            }
            "all" | "any" => {
                let items = value
                    .as_array()
                    .ok_or_else(|| err("expected a list of match tables".into()))?;
                let mut list = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let t = item
                        .as_table()
                        .ok_or_else(|| err(format!("item {i} is not a match table")))?;
                    list.push(matcher(t, &format!("{at}[{i}]"))?);
                }
                if key == "all" {
                    Matcher::All(list)
                } else {
                    Matcher::Any(list)
                }
            }
            "not" => {
                let t = value
                    .as_table()
                    .ok_or_else(|| err("expected a match table".into()))?;
                Matcher::Not(Box::new(matcher(t, &at)?))
            }
            other => {
                return Err(err(format!(
                    "unknown matcher `{other}`{}; matchers are {MATCHERS}",
                    crate::suggest::hint(other, MATCHERS.split(", "))
                )));
            }
        };
        all.push(m);
    }
    Ok(match all.len() {
        1 => all.pop().unwrap_or(Matcher::All(Vec::new())),
        _ => Matcher::All(all),
    })
}

fn boolean(v: &Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("expected true or false, found {}", v.type_str()))
}

fn risk(v: &Value) -> Result<RiskLevel, String> {
    match v.as_str().map(RiskLevel::parse) {
        Some(RiskLevel::Unknown(s)) => Err(format!(
            "{s:?} is not a risk level; use LOW, MEDIUM or HIGH"
        )),
        Some(level) => Ok(level),
        None => Err(format!(
            "expected \"LOW\", \"MEDIUM\" or \"HIGH\", found {}",
            v.type_str()
        )),
    }
}

fn strings(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| "expected a list of strings".to_owned())
            })
            .collect(),
        _ => Err("expected a string or a non-empty list of strings".into()),
    }
}

fn query_condition(v: &Value) -> Result<QueryCondition, String> {
    if let Some(t) = v.as_table() {
        return match (t.get("regex"), t.get("present"), t.len()) {
            (Some(re), None, 1) => {
                let re = re.as_str().ok_or("`regex` takes a string")?;
                let re = regex::RegexBuilder::new(&format!("^(?:{re})$"))
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("bad regex {re:?}: {}", e.to_string().lines().last().unwrap_or_default()))?;
                Ok(QueryCondition::Regex(re))
            }
            (None, Some(p), 1) => Ok(QueryCondition::Present(boolean(p)?)),
            _ => Err("expected a value, a list of values, { regex = \"...\" } or { present = true|false }".into()),
        };
    }
    strings(v).map(QueryCondition::OneOf)
}
