//! Routing: a job and its query parameters in, a [`Decision`] out.
//!
//! Pure by design: no I/O, no clocks, no metrics. The rules file is parsed
//! and validated once ([`RuleSet::load`]) into the types below, so routing
//! a webhook never re-checks configuration.

mod file;
mod template;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use regex::Regex;
use serde::Serialize;

use crate::transport::Transport;
use crate::webhook::job::{Job, RiskLevel};
use crate::webhook::query::Query;

pub use file::{LoadError, Problem};
pub use template::{TemplateError, UrlTemplate};

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.into())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The name of a destination in the rules file; also its metric label.
    DestinationName
);
name_type!(
    /// The name of a rule; also its metric label and `X-Hookgate-Rule`.
    RuleName
);

/// The `rule` label for jobs that no rule routed.
pub const UNROUTED: &str = "unrouted";

/// An internal service that jobs are forwarded to.
#[derive(Debug)]
pub struct Destination {
    pub name: DestinationName,
    pub url: UrlTemplate,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
    pub concurrency: Option<usize>,
    /// HTTP/2 and the destination's own TLS files, read when the rules
    /// loaded.
    pub transport: Transport,
}

#[derive(Debug)]
pub enum Action {
    /// Indices into [`RuleSet::destinations`].
    Forward(Vec<usize>),
    Drop,
}

#[derive(Debug)]
pub struct Rule {
    pub name: RuleName,
    pub matcher: Matcher,
    pub action: Action,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub continues: bool,
    /// Where the rule starts in its file, for explanations.
    pub line: usize,
}

/// A validated rules file: destinations and rules, swapped as one value.
#[derive(Debug)]
pub struct RuleSet {
    pub destinations: Vec<Destination>,
    pub rules: Vec<Rule>,
    /// Derived from the file's bytes; exported as `hookgate_config_hash`.
    pub hash: u64,
}

/// One destination a job goes to, and the rule that sent it there.
#[derive(Debug)]
pub struct Route<'r> {
    pub rule: &'r Rule,
    pub destination: &'r Destination,
    /// The destination URL with `{query.NAME}` filled in, or why it could
    /// not be (the job is then not forwarded there).
    pub url: Result<http::Uri, TemplateError>,
}

impl Route<'_> {
    /// Destination headers, then rule headers (the rule's win).
    pub fn headers(&self) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
        self.destination.headers.iter().chain(&self.rule.headers)
    }
}

#[derive(Debug, Default)]
pub struct Decision<'r> {
    /// Every rule that matched, in order (more than one with `continue`).
    pub matched: Vec<&'r Rule>,
    /// One entry per destination, the first rule naming it wins.
    pub routes: Vec<Route<'r>>,
}

impl Decision<'_> {
    /// Matched no rule that forwards or drops: never lost silently.
    pub fn is_unrouted(&self) -> bool {
        self.matched.is_empty()
    }
}

/// What the rules see of a webhook.
#[derive(Clone, Copy)]
pub struct Input<'a, 'j> {
    pub job: &'a Job<'j>,
    pub query: &'a Query<'j>,
}

impl RuleSet {
    pub fn decide<'r>(&'r self, input: Input<'_, '_>) -> Decision<'r> {
        let mut decision = Decision::default();
        for rule in &self.rules {
            if rule.matcher.check(input).is_err() {
                continue;
            }
            decision.matched.push(rule);
            if let Action::Forward(targets) = &rule.action {
                for &index in targets {
                    let destination = &self.destinations[index];
                    if decision
                        .routes
                        .iter()
                        .any(|r| std::ptr::eq(r.destination, destination))
                    {
                        continue;
                    }
                    decision.routes.push(Route {
                        rule,
                        destination,
                        url: destination.url.resolve(input.query),
                    });
                }
            }
            if !rule.continues {
                break;
            }
        }
        decision
    }

    /// Every rule with its verdict, for `hookgate route`.
    pub fn explain(&self, input: Input<'_, '_>) -> Vec<Trace> {
        let mut stopped_by: Option<&RuleName> = None;
        self.rules
            .iter()
            .map(|rule| {
                let verdict = match (stopped_by, rule.matcher.check(input)) {
                    (Some(by), _) => Verdict::NotReached { after: by.clone() },
                    (None, Ok(())) => {
                        if !rule.continues {
                            stopped_by = Some(&rule.name);
                        }
                        Verdict::Matched
                    }
                    (None, Err(miss)) => Verdict::Skipped {
                        failed: miss.to_string(),
                        observed: miss.observed(input),
                    },
                };
                Trace {
                    rule: rule.name.clone(),
                    line: rule.line,
                    verdict,
                }
            })
            .collect()
    }

    pub fn destination(&self, name: &str) -> Option<&Destination> {
        self.destinations.iter().find(|d| d.name.as_str() == name)
    }

    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name.as_str() == name)
    }
}

#[derive(Debug, Serialize)]
pub struct Trace {
    pub rule: RuleName,
    pub line: usize,
    #[serde(flatten)]
    pub verdict: Verdict,
}

#[derive(Debug, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Matched,
    Skipped { failed: String, observed: String },
    NotReached { after: RuleName },
}

/// A `*` glob over category names (`ARMS_*`).
#[derive(Debug, Clone)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: impl Into<String>) -> Self {
        Self(pattern.into())
    }

    pub fn matches(&self, text: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = text.strip_prefix(first) else {
            return false;
        };
        let mut parts = parts.peekable();
        if parts.peek().is_none() {
            return rest.is_empty();
        }
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                return rest.ends_with(part);
            }
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[derive(Debug)]
pub enum QueryCondition {
    OneOf(Vec<String>),
    Regex(Regex),
    Present(bool),
}

#[derive(Debug)]
pub enum Matcher {
    All(Vec<Matcher>),
    Any(Vec<Matcher>),
    Not(Box<Matcher>),
    IsError(bool),
    MinRisk(RiskLevel),
    Flagged(bool),
    Category(Vec<Glob>),
    CategoryWith {
        names: Vec<Glob>,
        min_risk: Option<RiskLevel>,
    },
    Query {
        name: String,
        condition: QueryCondition,
    },
    Json {
        pointer: String,
        value: serde_json::Value,
    },
}

impl Matcher {
    /// `Err` carries the matcher that decided the miss, for explanations;
    /// routing only looks at `is_ok`.
    pub fn check(&self, input: Input<'_, '_>) -> Result<(), &Matcher> {
        let job = input.job;
        let hit = match self {
            Matcher::All(all) => return all.iter().try_for_each(|m| m.check(input)),
            Matcher::Any(any) => any.iter().any(|m| m.check(input).is_ok()),
            Matcher::Not(m) => m.check(input).is_err(),
            Matcher::IsError(want) => job.is_error == *want,
            Matcher::MinRisk(min) => job.max_risk().is_some_and(|r| r.at_least(min)),
            Matcher::Flagged(want) => job.categories.is_empty() != *want,
            Matcher::Category(globs) => job
                .categories
                .iter()
                .any(|c| globs.iter().any(|g| g.matches(&c.name))),
            Matcher::CategoryWith { names, min_risk } => job.categories.iter().any(|c| {
                (names.is_empty() || names.iter().any(|g| g.matches(&c.name)))
                    && min_risk
                        .as_ref()
                        .is_none_or(|min| c.risk_level.at_least(min))
            }),
            Matcher::Query { name, condition } => {
                let value = input.query.get(name);
                match condition {
                    QueryCondition::OneOf(values) => {
                        value.is_some_and(|v| values.iter().any(|w| w == v))
                    }
                    QueryCondition::Regex(re) => value.is_some_and(|v| re.is_match(v)),
                    QueryCondition::Present(want) => value.is_some() == *want,
                }
            }
            Matcher::Json { pointer, value } => job
                .value()
                .and_then(|doc| doc.pointer(pointer))
                .is_some_and(|found| json_eq(found, value)),
        };
        if hit { Ok(()) } else { Err(self) }
    }

    /// What the job had, where this matcher looked.
    fn observed(&self, input: Input<'_, '_>) -> String {
        let job = input.job;
        let categories = || {
            let list: Vec<String> = job
                .categories
                .iter()
                .map(|c| format!("{}:{}", c.name, c.risk_level))
                .collect();
            format!("categories [{}]", list.join(", "))
        };
        match self {
            Matcher::All(_) => "a condition failed".into(),
            Matcher::Any(_) => "none of them holds".into(),
            Matcher::Not(inner) => format!("{inner} holds"),
            Matcher::IsError(_) => format!("is_error = {}", job.is_error),
            Matcher::MinRisk(_) => match job.max_risk() {
                Some(r) => format!("highest risk {r}"),
                None => "no categories".into(),
            },
            Matcher::Flagged(_) | Matcher::Category(_) | Matcher::CategoryWith { .. } => {
                categories()
            }
            Matcher::Query { name, .. } => match input.query.get(name) {
                Some(v) => format!("query {name} = {v:?}"),
                None => format!("no query parameter {name}"),
            },
            Matcher::Json { pointer, .. } => match job.value().and_then(|d| d.pointer(pointer)) {
                Some(v) => format!("{pointer} = {v}"),
                None => format!("nothing at {pointer}"),
            },
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, items: &[Matcher]| {
            for (i, m) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{{ {m} }}")?;
            }
            Ok(())
        };
        let globs = |g: &[Glob]| g.iter().map(Glob::to_string).collect::<Vec<_>>().join(", ");
        match self {
            Matcher::All(items) => {
                f.write_str("all = [")?;
                list(f, items)?;
                f.write_str("]")
            }
            Matcher::Any(items) => {
                f.write_str("any = [")?;
                list(f, items)?;
                f.write_str("]")
            }
            Matcher::Not(m) => write!(f, "not = {{ {m} }}"),
            Matcher::IsError(b) => write!(f, "is_error = {b}"),
            Matcher::MinRisk(r) => write!(f, "min_risk = \"{r}\""),
            Matcher::Flagged(b) => write!(f, "flagged = {b}"),
            Matcher::Category(g) => write!(f, "category = [{}]", globs(g)),
            Matcher::CategoryWith { names, min_risk } => {
                write!(f, "category_with = {{ name = [{}]", globs(names))?;
                if let Some(r) = min_risk {
                    write!(f, ", min_risk = \"{r}\"")?;
                }
                f.write_str(" }")
            }
            Matcher::Query { name, condition } => match condition {
                QueryCondition::OneOf(v) => write!(f, "query.{name} = {v:?}"),
                QueryCondition::Regex(re) => {
                    write!(f, "query.{name} = {{ regex = {:?} }}", re.as_str())
                }
                QueryCondition::Present(b) => write!(f, "query.{name} = {{ present = {b} }}"),
            },
            Matcher::Json { pointer, value } => write!(f, "json.\"{pointer}\" = {value}"),
        }
    }
}

/// Numbers compare by value (`720` equals `720.0`); everything else exactly.
fn json_eq(found: &serde_json::Value, want: &serde_json::Value) -> bool {
    match (found, want) {
        (serde_json::Value::Number(a), serde_json::Value::Number(b)) => {
            a == b || a.as_f64() == b.as_f64()
        }
        _ => found == want,
    }
}

#[cfg(test)]
mod tests;
