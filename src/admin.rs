//! The admin port: metrics, health, readiness, and the operator API
//! (reload) behind a bearer token.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::metrics::Metrics;
use crate::reload::{Reloaded, Reloader};

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub draining: CancellationToken,
    pub reloader: Arc<Reloader>,
    /// The bearer token for POSTs; with none configured they are refused.
    pub token: Option<String>,
}

impl AdminState {
    /// `None` when the request may proceed, else the refusal to send.
    fn refuse(&self, authorization: Option<&HeaderValue>) -> Option<Response> {
        let Some(token) = &self.token else {
            return Some(json_reply(
                StatusCode::FORBIDDEN,
                &json!({ "error": "the admin API is disabled: set admin.token_env to enable it" }),
            ));
        };
        let offered = authorization
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if constant_time_eq(offered, token.as_bytes()) {
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

/// Compares without an early exit, so the time taken does not tell how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        });
    let authorization = warp::header::value("authorization")
        .map(Some)
        .or(warp::any().map(|| None))
        .unify();
    let reload = warp::path!("-" / "reload")
        .and(warp::post())
        .and(with_state)
        .and(authorization)
        .then(|state: Arc<AdminState>, auth: Option<HeaderValue>| async move {
            if let Some(refused) = state.refuse(auth.as_ref()) {
                return refused;
            }
            match state.reloader.reload(true).await {
                Ok(Reloaded::Loaded { hash }) => json_reply(StatusCode::OK, &json!({ "result": "success", "hash": hash })),
                Ok(Reloaded::Unchanged) => json_reply(StatusCode::OK, &json!({ "result": "unchanged" })),
                Err(e) => json_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({ "result": "failure", "errors": e.to_string().lines().collect::<Vec<_>>() }),
                ),
            }
        });
    metrics
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(reload)
        .unify()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
