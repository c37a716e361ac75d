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
use crate::queue::DeadFilter;
use crate::queue::Queue;

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
    /// Whether a request with this `Authorization` header may call the
    /// operator API.
    fn authorize(&self, authorization: Option<&HeaderValue>) -> Result<(), Refusal> {
        let Some(token) = &self.token else {
            return Err(Refusal::Disabled);
        };
        let offered = authorization
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        // Constant time: how long the comparison takes does not tell how
        // much of a guessed token was right.
        if bool::from(offered.ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(Refusal::Unauthorized)
        }
    }
}

/// Why an operator call is refused. Filters reject with it; one `recover`
/// renders the JSON answer.
#[derive(Debug)]
enum Refusal {
    /// No admin token configured.
    Disabled,
    Unauthorized,
    /// Direct mode: no queue, no dead letters.
    NoQueue,
    /// A query string this call does not take.
    BadQuery {
        error: String,
        accepted: &'static str,
    },
}

impl warp::reject::Reject for Refusal {}

impl Refusal {
    fn render(&self) -> Response {
        let (status, error) = match self {
            Refusal::Disabled => (
                StatusCode::FORBIDDEN,
                "the admin API is disabled: set admin.token_file or admin.token_env to enable it"
                    .to_owned(),
            ),
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required".to_owned(),
            ),
            Refusal::NoQueue => (
                StatusCode::CONFLICT,
                "delivery.mode is \"direct\": there is no spool and no dead letters".to_owned(),
            ),
            Refusal::BadQuery { error, accepted } => (
                StatusCode::BAD_REQUEST,
                format!("bad query string ({error}); this call takes {accepted}"),
            ),
        };
        let mut response = json_reply(status, &json!({ "error": error }));
        if matches!(self, Refusal::Unauthorized) {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Renders a [`Refusal`]; any other rejection goes on to warp's own
/// answer (404, 405).
async fn recover(rejection: Rejection) -> Result<Response, Rejection> {
    match rejection.find::<Refusal>() {
        Some(refusal) => Ok(refusal.render()),
        None => Err(rejection),
    }
}

/// The query string as `T`, or a [`Refusal::BadQuery`] naming the
/// parameters the call takes.
fn query<T: serde::de::DeserializeOwned + Send + 'static>(
    accepted: &'static str,
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::query::raw()
        .or(warp::any().map(String::new))
        .unify()
        .and_then(move |raw: String| async move {
            serde_urlencoded::from_str::<T>(&raw).map_err(|e| {
                warp::reject::custom(Refusal::BadQuery {
                    error: e.to_string(),
                    accepted,
                })
            })
        })
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
    // Every operator call checks the token first, then what it needs.
    let authorized = with_state.clone().and(authorization).and_then(
        |state: Arc<AdminState>, auth: Option<HeaderValue>| async move {
            state
                .authorize(auth.as_ref())
                .map(|()| state)
                .map_err(warp::reject::custom)
        },
    );
    let reload = warp::path!("-" / "reload")
        .and(warp::post())
        .and(authorized.clone())
        .then(|state: Arc<AdminState>| async move {
            match state.reloader.reload(true).await {
                Ok(Reloaded::Loaded { hash }) => json_reply(StatusCode::OK, &json!({ "result": "success", "hash": hash })),
                Ok(Reloaded::Unchanged) => json_reply(StatusCode::OK, &json!({ "result": "unchanged" })),
                Err(e) => json_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({ "result": "failure", "errors": e.to_string().lines().collect::<Vec<_>>() }),
                ),
            }
        });
    // The dead-letter calls also need the queue (durable mode).
    let queued = authorized.and_then(|state: Arc<AdminState>| async move {
        state
            .queue
            .clone()
            .ok_or_else(|| warp::reject::custom(Refusal::NoQueue))
    });
    let dead_letters = warp::path!("admin" / "dead-letters");
    let list = dead_letters
        .and(warp::get())
        .and(queued.clone())
        .and(query::<ListQuery>("destination, job_id, after, limit"))
        .then(|d: Arc<dyn Queue>, q: ListQuery| async move {
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
        .and(queued.clone())
        .and(query::<ReplayQuery>("destination, job_id, reroute"))
        .then(|d: Arc<dyn Queue>, q: ReplayQuery| async move {
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
        .and(queued.clone())
        .map(|d: Arc<dyn Queue>| match d.quarantined() {
            Ok(records) => json_reply(StatusCode::OK, &json!({ "quarantined": records })),
            Err(e) => json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "error": e.to_string() }),
            ),
        });
    let purge = dead_letters
        .and(warp::delete())
        .and(queued)
        .and(query::<FilterQuery>("destination, job_id, all"))
        .then(|d: Arc<dyn Queue>, q: FilterQuery| async move {
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
        .recover(recover)
        .unify()
}

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
