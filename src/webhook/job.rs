//! The moderation result carried by a webhook, parsed without copying.
//!
//! The vendor sends `{"data": {...}}`; its own receiver example reads the
//! same fields at the top level. Both shapes are accepted. Only the fields
//! routing needs are read; everything else stays in the original bytes,
//! which are what gets forwarded.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::webhook::verify::Verified;

/// Longest accepted `job_id`: it travels in a header and keys the dedupe
/// index, and real ones are UUIDs.
pub const MAX_JOB_ID_LEN: usize = 256;

/// Ordered so that thresholds compare naturally; a level the vendor adds
/// later ranks below `Low` until it is known.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RiskLevel {
    Unknown(String),
    Low,
    Medium,
    High,
}

impl RiskLevel {
    pub fn parse(s: &str) -> Self {
        match s {
            "LOW" => Self::Low,
            "MEDIUM" => Self::Medium,
            "HIGH" => Self::High,
            other => Self::Unknown(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Low => "LOW",
            Self::Medium => "MEDIUM",
            Self::High => "HIGH",
            Self::Unknown(s) => s,
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Self::Unknown(_) => 0,
            Self::Low => 1,
            Self::Medium => 2,
            Self::High => 3,
        }
    }

    /// True when `self` reaches the threshold `min`.
    pub fn at_least(&self, min: &RiskLevel) -> bool {
        self.rank() >= min.rank()
    }
}

impl fmt::Display for RiskLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Category<'a> {
    pub name: Cow<'a, str>,
    pub risk_level: RiskLevel,
}

/// Why a verified body is not a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the body is not a JSON job: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the job has no `job_id` (looked in `data` and at the top level)")]
    MissingJobId,
    #[error("`job_id` must be 1 to {MAX_JOB_ID_LEN} printable ASCII characters")]
    BadJobId,
    #[error("the job has no boolean `is_error`")]
    MissingIsError,
}

/// A parsed job. Borrows from the verified body it came from, so it cannot
/// outlive it, and cannot be made from an unverified one.
#[derive(Debug)]
pub struct Job<'a> {
    pub job_id: Cow<'a, str>,
    pub callback_url: Option<Cow<'a, str>>,
    pub is_error: bool,
    pub categories: Vec<Category<'a>>,
    raw: &'a [u8],
    value: OnceLock<Option<serde_json::Value>>,
}

impl<'a> Job<'a> {
    pub fn parse(verified: &'a Verified) -> Result<Self, JobError> {
        Self::from_bytes(verified.body())
    }

    /// Within the crate only: for the tools that read a payload from a
    /// file (`route`, `test`: they decide where a job would go, they never
    /// forward it), and for stored jobs (verified when accepted). Anything
    /// else goes through [`Job::parse`] and a [`Verified`] body.
    pub(crate) fn from_bytes(raw: &'a [u8]) -> Result<Self, JobError> {
        let wire: Wire<'a> = serde_json::from_slice(raw)?;
        let fields = match wire.data {
            Some(data) => data,
            None => Fields {
                job_id: wire.job_id,
                callback_url: wire.callback_url,
                is_error: wire.is_error,
                result: wire.result,
            },
        };
        let job_id = fields.job_id.ok_or(JobError::MissingJobId)?;
        if job_id.is_empty()
            || job_id.len() > MAX_JOB_ID_LEN
            || !job_id.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(JobError::BadJobId);
        }
        let is_error = fields.is_error.ok_or(JobError::MissingIsError)?;
        let categories = fields
            .result
            .and_then(|r| r.policy_categories)
            .unwrap_or_default()
            .into_iter()
            .map(|c| Category {
                risk_level: c
                    .risk_level
                    .as_deref()
                    .map_or(RiskLevel::Unknown(String::new()), RiskLevel::parse),
                name: c.name,
            })
            .collect();
        Ok(Self {
            job_id,
            callback_url: fields.callback_url,
            is_error,
            categories,
            raw,
            value: OnceLock::new(),
        })
    }

    /// The highest risk level over all categories.
    pub fn max_risk(&self) -> Option<&RiskLevel> {
        self.categories.iter().map(|c| &c.risk_level).max()
    }

    /// The whole document, parsed on first use: only `json` matchers need it.
    pub fn value(&self) -> Option<&serde_json::Value> {
        self.value
            .get_or_init(|| serde_json::from_slice(self.raw).ok())
            .as_ref()
    }
}

/// Both shapes in one pass: the fields at the top level (the flat shape)
/// and under `data` (the vendor's envelope), whichever is there. The field
/// list repeats [`Fields`] rather than using `#[serde(flatten)]`, which
/// buffers the whole document and was a quarter of parse time.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    data: Option<Fields<'a>>,
    #[serde(borrow)]
    job_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    callback_url: Option<Cow<'a, str>>,
    is_error: Option<bool>,
    #[serde(borrow)]
    result: Option<ResultFields<'a>>,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    job_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    callback_url: Option<Cow<'a, str>>,
    is_error: Option<bool>,
    #[serde(borrow)]
    result: Option<ResultFields<'a>>,
}

#[derive(Deserialize)]
struct ResultFields<'a> {
    #[serde(borrow)]
    policy_categories: Option<Vec<WireCategory<'a>>>,
}

#[derive(Deserialize)]
struct WireCategory<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    risk_level: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "envelope",
                r#"{"data":{"job_id":"a","callback_url":"https://x/?t=1","is_error":false,"result":{"policy_categories":[{"name":"ARMS_AMMO","description":"d","risk_level":"HIGH"},{"name":"HATE","risk_level":"LOW"}],"metadata":{"fps":30}}}}"#,
                "a false 2 HIGH",
            ),
            (
                "flat",
                r#"{"job_id":"b","is_error":true,"result":{"error":"Failed"}}"#,
                "b true 0 -",
            ),
            (
                "unknown level ranks lowest",
                r#"{"job_id":"c","is_error":false,"result":{"policy_categories":[{"name":"X","risk_level":"SEVERE"},{"name":"Y","risk_level":"LOW"}]}}"#,
                "c false 2 LOW",
            ),
            (
                "escaped id",
                r#"{"job_id":"d\u0031","is_error":false}"#,
                "d1 false 0 -",
            ),
        ];
        for (name, body, want) in cases {
            let job = Job::from_bytes(body.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = format!(
                "{} {} {} {}",
                job.job_id,
                job.is_error,
                job.categories.len(),
                job.max_risk().map_or("-".into(), |r| r.to_string())
            );
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn not_a_job() {
        let long = format!(
            r#"{{"job_id":"{}","is_error":false}}"#,
            "x".repeat(MAX_JOB_ID_LEN + 1)
        );
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let cases: &[(&str, &str)] = &[
            ("not json", "hello"),
            ("array", "[1,2]"),
            ("no job_id", r#"{"data":{"is_error":false}}"#),
            ("empty job_id", r#"{"job_id":"","is_error":false}"#),
            ("numeric job_id", r#"{"job_id":7,"is_error":false}"#),
            (
                "control char in job_id",
                r#"{"job_id":"a\nb","is_error":false}"#,
            ),
            ("long job_id", &long),
            ("no is_error", r#"{"job_id":"a"}"#),
            ("string is_error", r#"{"job_id":"a","is_error":"yes"}"#),
            (
                "numeric risk",
                r#"{"job_id":"a","is_error":false,"result":{"policy_categories":[{"name":"X","risk_level":3}]}}"#,
            ),
            ("deep nesting", &deep),
        ];
        for (name, body) in cases {
            assert!(Job::from_bytes(body.as_bytes()).is_err(), "{name} parsed");
        }
        assert!(
            Job::from_bytes(b"{\"job_id\":\"\xff\",\"is_error\":false}").is_err(),
            "invalid utf-8 parsed"
        );
    }

    #[test]
    fn thresholds() {
        use RiskLevel::*;
        let unknown = Unknown("SEVERE".into());
        assert!(High.at_least(&Medium) && Medium.at_least(&Medium) && !Low.at_least(&Medium));
        assert!(!unknown.at_least(&Low) && unknown.at_least(&Unknown(String::new())));
    }
}
