//! The admin port: metrics, health, readiness, and the operator API
//! (reload) behind a bearer token.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::metrics::Metrics;
use crate::ops::reload::{Reloaded, Reloader};
use crate::queue::Queue;
use crate::queue::embedded::DeadFilter;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub draining: CancellationToken,
    pub reloader: Arc<Reloader>,
    /// Durable mode: the queue, for readiness, gauges and dead letters.
    pub queue: Option<Arc<dyn Queue>>,
    /// The bearer token for POSTs; with none configured they are refused.
    pub token: Option<String>,
}

impl AdminState {
    /// `None` when the request may proceed, else the refusal to send.
    fn refuse(&self, authorization: Option<&HeaderValue>) -> Option<Response> {
        let Some(token) = &self.token else {
            return Some(json_reply(
                StatusCode::FORBIDDEN,
                &json!({ "error": "the admin API is disabled: set admin.token_file or admin.token_env to enable it" }),
            ));
        };
        let offered = authorization
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        // Constant time: how long the comparison takes does not tell how
        // much of a guessed token was right.
        if bool::from(offered.ct_eq(token.as_bytes())) {
            return None;
        }
        let mut response = json_reply(
            StatusCode::UNAUTHORIZED,
            &json!({ "error": "a valid bearer token is required" }),
        );
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        Some(response)
    }
}

fn json_reply(status: StatusCode, body: &serde_json::Value) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

fn text(status: StatusCode, body: &'static str) -> Response {
    warp::reply::with_status(body, status).into_response()
}

pub fn routes(
    state: Arc<AdminState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: Arc<AdminState>| {
            if let Some(q) = &state.queue {
                q.refresh_gauges();
            }
            let mut response = Response::new(state.metrics.encode().into());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        });
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| text(StatusCode::OK, "ok\n"));
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: Arc<AdminState>| {
            if state.draining.is_cancelled() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
            }
            match state.queue.as_ref().map(|q| q.ready()) {
                Some(Err(why)) => {
                    warp::reply::with_status(format!("{why}\n"), StatusCode::SERVICE_UNAVAILABLE)
                        .into_response()
                }
                _ => text(StatusCode::OK, "ready\n"),
            }
        });
    let authorization = warp::header::value("authorization")
        .map(Some)
        .or(warp::any().map(|| None))
        .unify();
    // Every operator call checks the token first: the handler gets the
    // state, or the refusal to send back.
    let authorized = with_state.clone().and(authorization).map(
        |state: Arc<AdminState>, auth: Option<HeaderValue>| match state.refuse(auth.as_ref()) {
            None => Ok(state),
            Some(refused) => Err(Box::new(refused)),
        },
    );
    let reload = warp::path!("-" / "reload")
        .and(warp::post())
        .and(authorized.clone())
        .then(|authorized: Authorized| async move {
            let state = match authorized {
                Ok(state) => state,
                Err(refused) => return *refused,
            };
            match state.reloader.reload(true).await {
                Ok(Reloaded::Loaded { hash }) => json_reply(StatusCode::OK, &json!({ "result": "success", "hash": hash })),
                Ok(Reloaded::Unchanged) => json_reply(StatusCode::OK, &json!({ "result": "unchanged" })),
                Err(e) => json_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({ "result": "failure", "errors": e.to_string().lines().collect::<Vec<_>>() }),
                ),
            }
        });
    // The dead-letter calls also need the spool (durable mode).
    let spooled = authorized.map(|authorized: Authorized| {
        authorized.and_then(|state| state.queue.clone().ok_or_else(|| Box::new(no_spool())))
    });
    let dead_letters = warp::path!("admin" / "dead-letters");
    let list = dead_letters
        .and(warp::get())
        .and(spooled.clone())
        .and(warp::query::<ListQuery>())
        .then(|spooled: Spooled, q: ListQuery| async move {
            let d = match spooled {
                Ok(d) => d,
                Err(refused) => return *refused,
            };
            let filter = DeadFilter {
                destination: q.destination,
                job_id: q.job_id,
            };
            let limit = q.limit.unwrap_or(100).clamp(1, 1000);
            match d.dead_letters(filter, q.after, limit).await {
                Ok(page) => {
                    let next_after = page
                        .last()
                        .filter(|_| page.len() == limit)
                        .map(|(id, _)| *id);
                    let items: Vec<serde_json::Value> = page
                        .into_iter()
                        .map(|(id, r)| {
                            json!({
                                "id": id,
                                "job_id": r.job_id,
                                "destination": r.destination,
                                "rule": r.rule,
                                "attempts": r.attempts,
                                "reason": r.dead_reason,
                                "last_error": r.last_error,
                                "accepted_at_ms": r.first_ms,
                                "last_attempt_at_ms": r.last_attempt_ms,
                                "dead_at_ms": r.dead_ms,
                            })
                        })
                        .collect();
                    json_reply(
                        StatusCode::OK,
                        &json!({ "dead_letters": items, "next_after": next_after }),
                    )
                }
                Err(e) => json_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({ "error": e.to_string() }),
                ),
            }
        });
    let replay = warp::path!("admin" / "dead-letters" / "replay")
        .and(warp::post())
        .and(spooled.clone())
        .and(warp::query::<ReplayQuery>())
        .then(|spooled: Spooled, q: ReplayQuery| async move {
            let d = match spooled {
                Ok(d) => d,
                Err(refused) => return *refused,
            };
            let filter = DeadFilter {
                destination: q.destination,
                job_id: q.job_id,
            };
            match d.replay(filter, q.reroute).await {
                Ok(report) => json_reply(StatusCode::OK, &json!(report)),
                Err(e) => json_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "error": e.to_string() }),
                ),
            }
        });
    let quarantine = warp::path!("admin" / "quarantine")
        .and(warp::get())
        .and(spooled.clone())
        .map(|spooled: Spooled| {
            let d = match spooled {
                Ok(d) => d,
                Err(refused) => return *refused,
            };
            match d.quarantined() {
                Ok(records) => json_reply(StatusCode::OK, &json!({ "quarantined": records })),
                Err(e) => json_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "error": e.to_string() }),
                ),
            }
        });
    let purge = dead_letters
        .and(warp::delete())
        .and(spooled)
        .and(warp::query::<FilterQuery>())
        .then(|spooled: Spooled, q: FilterQuery| async move {
            let d = match spooled {
                Ok(d) => d,
                Err(refused) => return *refused,
            };
            if !q.all && q.destination.is_none() && q.job_id.is_none() {
                return json_reply(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": "name a destination or job_id, or pass all=true to purge every dead letter" }),
                );
            }
            match d.purge(q.filter()).await {
                Ok(purged) => json_reply(StatusCode::OK, &json!({ "purged": purged })),
                Err(e) => json_reply(StatusCode::SERVICE_UNAVAILABLE, &json!({ "error": e.to_string() })),
            }
        });
    metrics
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(reload)
        .unify()
        .or(replay)
        .unify()
        .or(list)
        .unify()
        .or(purge)
        .unify()
        .or(quarantine)
        .unify()
}

/// The admin state for a request with a valid token, else the refusal.
type Authorized = Result<Arc<AdminState>, Box<Response>>;

/// As [`Authorized`], for a call that also needs the spool.
type Spooled = Result<Arc<dyn Queue>, Box<Response>>;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    destination: Option<String>,
    job_id: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayQuery {
    destination: Option<String>,
    job_id: Option<String>,
    /// Route the jobs again through the rules in force, instead of
    /// sending them to the destination they were dead-lettered for.
    #[serde(default)]
    reroute: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterQuery {
    destination: Option<String>,
    job_id: Option<String>,
    #[serde(default)]
    all: bool,
}

impl FilterQuery {
    fn filter(&self) -> DeadFilter {
        DeadFilter {
            destination: self.destination.clone(),
            job_id: self.job_id.clone(),
        }
    }
}

fn no_spool() -> Response {
    json_reply(
        StatusCode::CONFLICT,
        &json!({ "error": "delivery.mode is \"direct\": there is no spool and no dead letters" }),
    )
}
