//! What a delivery is under the rules in force, pure and shared by both
//! delivery engines and the ingress: the records a routing decision makes,
//! the request a stored delivery becomes at each attempt, whether a reload
//! moved a destination, and a job routed again for a replay.

use crate::delivery::attempt::Delivery;
use crate::queue::{Record, StoredJob};
use crate::rules::{Destination, Input, RuleSet, UNROUTED};
use crate::webhook::job::Job;
use crate::webhook::query::Query;

/// The reason of a dead letter whose destination left the rules.
pub fn removed_reason(destination: &str) -> String {
    format!(
        "destination_removed: {destination:?} is not in the rules in force; \
         replay once it is back, or replay with reroute=true"
    )
}

/// Whether two versions of a destination send to the same place the same
/// way: otherwise a reload retries its waiting deliveries at once.
pub fn same_target(a: &Destination, b: &Destination) -> bool {
    a.url.source() == b.url.source()
        && a.headers == b.headers
        && a.transport.id() == b.transport.id()
}

/// The spool records for a routing decision: one per destination, dead at
/// once when its URL cannot be filled in, one `unrouted` dead letter when no
/// rule matched, none when a rule dropped the job.
pub fn records_for(
    decision: &crate::rules::Decision<'_>,
    job_id: &str,
    now_ms: u64,
) -> Vec<Record> {
    let record = |destination: &str, rule: &str| Record {
        job: 0,
        job_id: job_id.to_owned(),
        destination: destination.to_owned(),
        rule: rule.to_owned(),
        attempts: 0,
        first_ms: now_ms,
        next_ms: now_ms,
        last_attempt_ms: None,
        last_error: None,
        dead_reason: None,
        dead_ms: None,
    };
    if decision.is_unrouted() {
        let mut r = record(UNROUTED, UNROUTED);
        r.dead_reason = Some("unrouted: no rule matched; replay once the rules route it".into());
        r.dead_ms = Some(now_ms);
        return vec![r];
    }
    decision
        .routes
        .iter()
        .map(|route| {
            let mut r = record(route.destination.name.as_str(), route.rule.name.as_str());
            if let Err(e) = &route.url {
                r.dead_reason = Some(format!("not forwarded: {e}"));
                r.dead_ms = Some(now_ms);
            }
            r
        })
        .collect()
}

/// The records of a stored job routed again by `rules` (a replay with
/// reroute); `None` when they route it nowhere.
pub fn route_again(rules: &RuleSet, stored: &StoredJob, now_ms: u64) -> Option<Vec<Record>> {
    let parsed = Job::from_bytes(&stored.body).ok()?;
    let query = Query::new(stored.query.as_deref(), parsed.callback_url.as_deref());
    let decision = rules.decide(Input {
        job: &parsed,
        query: &query,
    });
    if decision.is_unrouted() {
        return None;
    }
    Some(records_for(&decision, &parsed.job_id, now_ms))
}

/// The HTTP request of a stored delivery under the rules in force: the
/// destination's URL, filled in from the job's query, its headers and
/// those of the rule that routed the job (if it still exists). `Err` is
/// the dead letter's reason.
pub fn request(
    rules: &RuleSet,
    destination: &Destination,
    record: &Record,
    job: StoredJob,
) -> Result<Delivery, String> {
    let url = if destination.url.is_templated() {
        let parsed = Job::from_bytes(&job.body)
            .map_err(|e| format!("not forwarded: the stored webhook does not parse: {e}"))?;
        let query = Query::new(job.query.as_deref(), parsed.callback_url.as_deref());
        destination.url.resolve(&query)
    } else {
        destination.url.resolve(&Query::default())
    }
    .map_err(|e| format!("not forwarded: {e}"))?;
    let rule_headers = rules
        .rule(&record.rule)
        .map(|rule| rule.headers.as_slice())
        .unwrap_or_default();
    let signature = job
        .signature
        .as_ref()
        .and_then(|s| http::HeaderValue::from_bytes(s).ok());
    Ok(Delivery::build(
        destination,
        url,
        destination.headers.iter().chain(rule_headers).cloned(),
        &record.rule,
        &record.job_id,
        signature,
        job.body,
    ))
}
