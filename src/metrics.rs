//! Prometheus metrics, in a registry owned by one gateway (tests get a
//! fresh one each).
//!
//! Label values never come straight from a payload: risk levels and
//! categories outside the known set become `other`, and `rule` and
//! `destination` are names from the rules file. Series for every configured
//! rule and destination exist at zero from start-up and follow reloads, so
//! dashboards and alerts never see gaps.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::rules::{RuleSet, UNROUTED};
use crate::webhook::job::{Job, RiskLevel};

/// Rejection reasons, all exported at zero from start-up.
pub const REJECT_REASONS: &[&str] = &[
    "missing_signature",
    "bad_encoding",
    "bad_signature",
    "too_large",
    "malformed",
    "overloaded",
    "queue_unavailable",
    "draining",
];

pub const ATTEMPT_OUTCOMES: &[&str] = &[
    "success",
    "http_3xx",
    "http_4xx",
    "http_5xx",
    "timeout",
    "connect_error",
];
pub const DELIVERY_RESULTS: &[&str] = &["delivered", "dead_lettered", "dropped"];

/// The policy categories (GARM) the vendor reports; others count as `other`
/// unless configured under `metrics.categories`.
const KNOWN_CATEGORIES: &[&str] = &[
    "ADULT_EXPLICIT_SEXUAL_CONTENT",
    "ARMS_AMMO",
    "CRIME_HARMFUL_ACTS",
    "DEATH_INJURY_MILITARY",
    "ONLINE_PIRACY",
    "HATE_SPEECH",
    "OBSCENITY_PROFANITY",
    "ILLEGAL_DRUGS_TOBACCO_ECIGARETTES_VAPING_ALCOHOL",
    "SPAM_HARMFUL_CONTENT",
    "TERRORISM",
    "DEBATED_SENSITIVE_SOCIAL_ISSUE",
];

const OTHER: &str = "other";

const KNOWN_RISK_LEVELS: [&str; 3] = ["LOW", "MEDIUM", "HIGH"];

/// Latencies inside a cluster: from a fraction of a millisecond to the
/// tens of seconds of a slow downstream.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The embedded spool's own health: a spool that cannot write refuses
/// webhooks, and these say why before anyone reads the log.
/// The shared queue's reachability (the nats backend), registered only
/// there.
pub struct QueueMetrics {
    /// 1 while JetStream answers, else 0.
    pub backend_up: IntGauge,
}

pub struct SpoolMetrics {
    /// `op`: `open` (reopening or moving a damaged file aside), `commit`,
    /// `read`.
    pub errors: IntCounterVec,
    pub writable: IntGauge,
    pub quarantined: IntGauge,
}

/// The `op` label values of `hookgate_spool_errors_total`.
pub const SPOOL_OPS: [&str; 3] = ["open", "commit", "read"];

#[derive(Clone, Copy)]
enum Series {
    Create,
    Remove,
}

pub struct Metrics {
    registry: Registry,
    pub received: IntCounter,
    pub rejected: IntCounterVec,
    pub verified: IntCounterVec,
    pub flagged: IntCounterVec,
    pub errored: IntCounter,
    pub routed: IntCounterVec,
    pub duplicate: IntCounter,
    pub forward_attempts: IntCounterVec,
    pub deliveries: IntCounterVec,
    pub forward_duration: HistogramVec,
    pub request_duration: Histogram,
    pub queue_depth: IntGaugeVec,
    pub queue_oldest_age: GaugeVec,
    pub dead_letters: IntGaugeVec,
    pub circuit_open: IntGaugeVec,
    pub reloads: IntCounterVec,
    pub last_reload_successful: IntGauge,
    pub last_reload_success_timestamp: Gauge,
    pub config_hash: Gauge,
    /// Durable mode only: registered by [`Metrics::register_spool`].
    pub spool: SpoolMetrics,
    /// The nats backend only: registered by
    /// [`Metrics::register_queue_backend`].
    pub queue: QueueMetrics,
    categories: HashSet<String>,
    /// The rule and destination names whose series currently exist.
    tracked: Mutex<(Vec<String>, Vec<String>)>,
}

impl Metrics {
    pub fn new(extra_categories: &[String]) -> Self {
        let registry = Registry::new();
        macro_rules! register {
            ($metric:expr) => {{
                let m = $metric.unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
                registry
                    .register(Box::new(m.clone()))
                    .unwrap_or_else(|e| unreachable!("metric registered twice: {e}"));
                m
            }};
        }
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let gauge_vec =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["destination"]);
        let histogram = |name: &str, help: &str| {
            HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
        };

        let build_info = IntGaugeVec::new(
            Opts::new(
                "hookgate_build_info",
                "Always 1; the version is in the label.",
            ),
            &["version"],
        );
        register!(build_info)
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let m = Self {
            received: register!(counter(
                "hookgate_webhooks_received_total",
                "Webhook requests received on the webhook path, before verification."
            )),
            rejected: register!(counter_vec(
                "hookgate_webhooks_rejected_total",
                "Webhook requests refused, by reason.",
                &["reason"]
            )),
            verified: register!(counter_vec(
                "hookgate_signature_verified_total",
                "Webhooks whose signature matched, by the name of the secret that matched.",
                &["secret"]
            )),
            flagged: register!(counter_vec(
                "hookgate_jobs_flagged_total",
                "Policy categories found in accepted jobs, by risk level and category.",
                &["risk_level", "category"]
            )),
            errored: register!(counter(
                "hookgate_jobs_errored_total",
                "Accepted jobs that report a processing error (is_error = true)."
            )),
            routed: register!(counter_vec(
                "hookgate_jobs_routed_total",
                "Jobs matched, by rule; rule=\"unrouted\" counts jobs no rule matched.",
                &["rule"]
            )),
            duplicate: register!(counter(
                "hookgate_jobs_duplicate_total",
                "Jobs acknowledged but not forwarded again because their job_id was seen within the dedupe window."
            )),
            forward_attempts: register!(counter_vec(
                "hookgate_forward_attempts_total",
                "HTTP attempts to deliver a job to a destination, by outcome.",
                &["destination", "outcome"]
            )),
            deliveries: register!(counter_vec(
                "hookgate_deliveries_total",
                "Deliveries finished, by destination and result.",
                &["destination", "result"]
            )),
            forward_duration: register!(HistogramVec::new(
                histogram(
                    "hookgate_forward_duration_seconds",
                    "Duration of one delivery attempt, from connect to the last byte of the response head."
                ),
                &["destination"]
            )),
            request_duration: register!(Histogram::with_opts(histogram(
                "hookgate_request_duration_seconds",
                "Time from a webhook request's arrival to its answer."
            ))),
            queue_depth: register!(gauge_vec(
                "hookgate_queue_depth",
                "Deliveries waiting or in flight, by destination."
            )),
            queue_oldest_age: register!(GaugeVec::new(
                Opts::new(
                    "hookgate_queue_oldest_age_seconds",
                    "Age of the oldest delivery still waiting, by destination."
                ),
                &["destination"]
            )),
            dead_letters: register!(gauge_vec(
                "hookgate_dead_letters",
                "Deliveries that gave up and wait for replay or purge, by destination."
            )),
            circuit_open: register!(gauge_vec(
                "hookgate_circuit_open",
                "Origins (scheme, host, port) of the destination whose circuit breaker is open: 0 or 1 for a plain URL, up to one per filled-in host for a templated one."
            )),
            reloads: register!(counter_vec(
                "hookgate_config_reloads_total",
                "Rules file reloads, by result.",
                &["result"]
            )),
            last_reload_successful: register!(IntGauge::new(
                "hookgate_config_last_reload_successful",
                "1 if the last rules reload succeeded, 0 if it failed (the previous rules stay in force)."
            )),
            last_reload_success_timestamp: register!(Gauge::new(
                "hookgate_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful rules load."
            )),
            config_hash: register!(Gauge::new(
                "hookgate_config_hash",
                "A number derived from the loaded rules file: it changes when the rules in force change."
            )),
            queue: QueueMetrics {
                backend_up: IntGauge::new(
                    "hookgate_queue_backend_up",
                    "1 while NATS JetStream is reachable and takes webhooks, else 0.",
                )
                .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            },
            spool: SpoolMetrics {
                errors: IntCounterVec::new(
                    Opts::new(
                        "hookgate_spool_errors_total",
                        "Spool operations that failed, by operation (open, commit, read).",
                    ),
                    &["op"],
                )
                .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
                writable: IntGauge::new(
                    "hookgate_spool_writable",
                    "1 while the spool commits, 0 while its writes fail (webhooks get 503 meanwhile).",
                )
                .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
                quarantined: IntGauge::new(
                    "hookgate_spool_quarantined_records",
                    "Spool records kept aside because they could not be decoded (GET /admin/quarantine).",
                )
                .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            },
            categories: KNOWN_CATEGORIES
                .iter()
                .map(|c| c.to_string())
                .chain(extra_categories.iter().cloned())
                .collect(),
            tracked: Mutex::new((Vec::new(), Vec::new())),
            registry,
        };
        for reason in REJECT_REASONS {
            m.rejected.with_label_values(&[*reason]);
        }
        for result in ["success", "failure"] {
            m.reloads.with_label_values(&[result]);
        }
        for risk in KNOWN_RISK_LEVELS {
            for category in m.categories.iter().map(String::as_str).chain([OTHER]) {
                m.flagged.with_label_values(&[risk, category]);
            }
        }
        m.flagged.with_label_values(&[OTHER, OTHER]);
        m
    }

    /// Exposes the spool's series, at their start values (durable mode).
    /// Exposes the shared queue's series (the nats backend).
    pub fn register_queue_backend(&self) {
        let _ = self
            .registry
            .register(Box::new(self.queue.backend_up.clone()));
        self.queue.backend_up.set(1);
    }

    pub fn register_spool(&self) {
        let spool = &self.spool;
        for collector in [
            Box::new(spool.errors.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(spool.writable.clone()),
            Box::new(spool.quarantined.clone()),
        ] {
            // Registered once per registry: a second call changes nothing.
            let _ = self.registry.register(collector);
        }
        for op in SPOOL_OPS {
            spool.errors.with_label_values(&[op]);
        }
        spool.writable.set(1);
    }

    /// Counts what the moderation result says, with bounded labels.
    pub fn observe_job(&self, job: &Job<'_>) {
        if job.is_error {
            self.errored.inc();
        }
        for c in &job.categories {
            let risk = match c.risk_level {
                RiskLevel::Unknown(_) => OTHER,
                ref known => known.as_str(),
            };
            let category = if self.categories.contains(c.name.as_ref()) {
                c.name.as_ref()
            } else {
                OTHER
            };
            self.flagged.with_label_values(&[risk, category]).inc();
        }
    }

    /// Makes the series of every rule and destination of `rules` exist, and
    /// removes those of rules and destinations that are gone.
    pub fn track(&self, rules: &RuleSet) {
        let new_rules: Vec<String> = rules
            .rules
            .iter()
            .map(|r| r.name.to_string())
            .chain([UNROUTED.to_owned()])
            .collect();
        let new_destinations: Vec<String> = rules
            .destinations
            .iter()
            .map(|d| d.name.to_string())
            .collect();
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        for gone in tracked.0.iter().filter(|r| !new_rules.contains(r)) {
            let _ = self.routed.remove_label_values(&[gone]);
        }
        for gone in tracked.1.iter().filter(|d| !new_destinations.contains(d)) {
            self.destination_series(gone, Series::Remove);
        }
        for rule in &new_rules {
            self.routed.with_label_values(&[rule]);
        }
        for d in &new_destinations {
            self.destination_series(d, Series::Create);
        }
        self.config_hash.set(rules.hash as f64);
        *tracked = (new_rules, new_destinations);
    }

    /// Every series labelled with destination `d`, listed once for both
    /// creating and removing them.
    fn destination_series(&self, d: &str, what: Series) {
        macro_rules! each {
            ($vec:expr, $labels:expr) => {
                match what {
                    Series::Create => {
                        $vec.with_label_values($labels);
                    }
                    // Removing a series that does not exist is not an error
                    // worth a log.
                    Series::Remove => {
                        let _ = $vec.remove_label_values($labels);
                    }
                }
            };
        }
        for outcome in ATTEMPT_OUTCOMES {
            each!(self.forward_attempts, &[d, outcome]);
        }
        for result in DELIVERY_RESULTS {
            each!(self.deliveries, &[d, result]);
        }
        each!(self.forward_duration, &[d]);
        each!(self.queue_depth, &[d]);
        each!(self.queue_oldest_age, &[d]);
        each!(self.dead_letters, &[d]);
        each!(self.circuit_open, &[d]);
    }

    /// The text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on a malformed metric family, which
        // the registry does not produce.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
