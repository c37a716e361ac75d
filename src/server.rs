//! The HTTP layer: warp filters for the webhook and admin ports, served
//! through hyper's connection builder for what `warp::serve` does not
//! expose (a header-read timeout, a connection limit, graceful drain).
//!
//! It holds no business logic: it reads a request within its limits,
//! hands it to the [`Gateway`], and writes the [`Reply`].

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::reply::Response;
use warp::{Filter, Rejection as WarpRejection, Reply as _};

use crate::gateway::{Gateway, Rejection, Reply, Webhook};
use crate::verify;

/// Limits applied to every connection of a listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// The webhook port: `POST {path}` and nothing else (404 / 405 otherwise).
pub fn webhook_routes(
    gateway: Arc<Gateway>,
    in_flight: TaskTracker,
    path: &str,
    max_body_bytes: u64,
    body_read_timeout: Duration,
) -> impl Filter<Extract = (Response,), Error = WarpRejection> + Clone + Send + Sync + 'static {
    let path: Arc<str> = path.into();
    let exact_path = warp::path::full()
        .and_then(move |full: warp::path::FullPath| {
            let found = full.as_str() == &*path;
            async move {
                if found {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            }
        })
        .untuple_one();
    let query = warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify();
    exact_path
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(query)
        .and(warp::body::stream())
        .then(move |headers: http::HeaderMap, query, body| {
            let gateway = gateway.clone();
            in_flight.track_future(async move {
                let started = Instant::now();
                gateway.metrics().received.inc();
                let limits = BodyLimits {
                    max_bytes: max_body_bytes,
                    timeout: body_read_timeout,
                };
                let reply = receive(&gateway, headers, query, body, limits).await;
                gateway
                    .metrics()
                    .request_duration
                    .observe(started.elapsed().as_secs_f64());
                render(reply)
            })
        })
}

#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    max_bytes: u64,
    timeout: Duration,
}

/// One webhook request: admitted (not draining), one signature header,
/// the body read within its limits, then handed to the gateway.
async fn receive<S, B>(
    gateway: &Gateway,
    headers: HeaderMap,
    query: Option<String>,
    body: S,
    limits: BodyLimits,
) -> Reply
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    if let Err(refused) = gateway.admit() {
        return refused;
    }
    let signature = match verify::signature_header(&headers) {
        Ok(signature) => signature.cloned(),
        Err(e) => return gateway.reject(e.into()),
    };
    let content_length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    match read_body(content_length, body, limits.max_bytes, limits.timeout).await {
        Ok(body) => {
            gateway
                .handle(Webhook {
                    body,
                    signature,
                    query,
                })
                .await
        }
        Err(rejection) => gateway.reject(rejection),
    }
}

/// Reads the whole body, refusing it as soon as it is known to be too
/// large: from `Content-Length` before reading, else while streaming.
async fn read_body<S, B>(
    content_length: Option<u64>,
    body: S,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    if content_length.is_some_and(|len| len > limit) {
        return Err(Rejection::TooLarge { limit });
    }
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut buf = BytesMut::with_capacity(content_length.unwrap_or(1024) as usize);
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk.map_err(|e| Rejection::Incomplete(e.to_string()))?;
            if (buf.len() + chunk.remaining()) as u64 > limit {
                return Err(Rejection::TooLarge { limit });
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                buf.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(Rejection::Incomplete(format!(
                "not complete within {timeout:?}"
            )))
        })
}

fn render(reply: Reply) -> Response {
    let (status, body) = match &reply {
        Reply::Done { status, job_id } => (
            *status,
            serde_json::json!({ "status": "ok", "job_id": job_id }),
        ),
        Reply::NotDelivered { status, job_id } => (
            *status,
            serde_json::json!({ "status": "not_delivered", "job_id": job_id }),
        ),
        Reply::Rejected(r) => (
            r.status(),
            serde_json::json!({ "status": "rejected", "reason": r.reason(), "message": r.to_string() }),
        ),
    };
    let mut response = warp::reply::with_status(warp::reply::json(&body), status).into_response();
    if let Reply::Rejected(r) = &reply {
        if let Some(seconds) = r.retry_after() {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
    }
    response
}

/// Serves `filter` on `listener` until `shutdown`, then lets open requests
/// finish for up to `grace`.
pub async fn serve<F, R>(
    listener: TcpListener,
    filter: F,
    limits: ConnLimits,
    shutdown: CancellationToken,
    grace: Duration,
) where
    F: Filter<Extract = (R,), Error = WarpRejection> + Clone + Send + Sync + 'static,
    R: warp::Reply,
{
    let service = warp::service(filter);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        // Past the limit, new connections wait in the kernel's backlog
        // while the open ones keep being served.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, typically: back off briefly
                    // rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(service.clone()),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection closed with an error: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the {grace:?} grace period were closed");
    }
}
