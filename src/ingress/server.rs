//! The HTTP layer: warp filters for the webhook and admin ports, served
//! through hyper's connection builder for what `warp::serve` does not
//! expose (a header-read timeout, a connection limit, graceful drain).
//!
//! It holds no business logic: it reads a request within its limits,
//! hands it to the [`Pipeline`], and writes the [`Reply`].

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::reply::Response;
use warp::{Filter, Rejection as WarpRejection, Reply as _};

use crate::ingress::pipeline::{Pipeline, Rejection, Reply, Webhook};
use crate::webhook::verify;

/// The webhook port: `POST {path}` and nothing else (404 / 405 otherwise).
pub fn webhook_routes(
    gateway: Arc<Pipeline>,
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
    gateway: &Pipeline,
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
            let mut chunk = chunk.map_err(|e| Rejection::BadBody(e.to_string()))?;
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
        .unwrap_or(Err(Rejection::SlowBody(timeout)))
}

/// The answer's JSON body.
#[derive(serde::Serialize)]
struct Answer<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

fn render(reply: Reply) -> Response {
    let (status, answer) = match &reply {
        Reply::Done { status, job_id } => (
            *status,
            Answer {
                status: "ok",
                job_id: Some(job_id),
                reason: None,
                message: None,
                duplicate: false,
            },
        ),
        Reply::Duplicate { job_id } => (
            http::StatusCode::ACCEPTED,
            Answer {
                status: "ok",
                job_id: Some(job_id),
                reason: None,
                message: Some(
                    "this job_id was accepted within dedupe.window: not forwarded again".into(),
                ),
                duplicate: true,
            },
        ),
        Reply::NotDelivered { status, job_id } => (
            *status,
            Answer {
                status: "not_delivered",
                job_id: Some(job_id),
                reason: None,
                message: None,
                duplicate: false,
            },
        ),
        Reply::Rejected(r) => (
            r.status(),
            Answer {
                status: "rejected",
                job_id: None,
                reason: Some(r.reason()),
                message: Some(r.to_string()),
                duplicate: false,
            },
        ),
    };
    let mut response = warp::reply::with_status(warp::reply::json(&answer), status).into_response();
    if let Reply::Rejected(r) = &reply {
        if let Some(seconds) = r.retry_after() {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
    }
    response
}

/// The threads that serve a port's connections.
///
/// Each filter gets a thread of its own running a single-threaded runtime,
/// and every accepted connection goes to the thread with the fewest open
/// ones. A connection, its requests and the forwarding they do then stay
/// on one thread, as in nginx's worker model: with tokio's work-stealing
/// runtime, the wake-ups between threads cost a third of the CPU spent
/// per webhook (measured with `bench/`).
pub struct Workers(Vec<Worker>);

impl Workers {
    /// Starts one thread per filter, named `{name}-{index}` (or `name`
    /// alone for one). A client must send a request's headers within
    /// `header_read_timeout`; `grace` is how long each thread lets open
    /// requests finish once the port closes.
    pub fn start<F, R>(
        name: &str,
        filters: Vec<F>,
        header_read_timeout: Duration,
        grace: Duration,
    ) -> std::io::Result<Self>
    where
        F: Filter<Extract = (R,), Error = WarpRejection> + Clone + Send + Sync + 'static,
        R: warp::Reply,
    {
        let one = filters.len() == 1;
        filters
            .into_iter()
            .enumerate()
            .map(|(index, filter)| {
                let name = if one {
                    name.to_owned()
                } else {
                    format!("{name}-{index}")
                };
                Worker::start(name, filter, header_read_timeout, grace)
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map(Self)
    }
}

/// Accepts connections on `listener` for `workers` until `shutdown`, then
/// waits for the workers to drain.
pub async fn serve(
    listener: TcpListener,
    workers: Workers,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
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
        let Some(worker) = workers
            .0
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
        else {
            break;
        };
        match stream.into_std() {
            Ok(stream) => worker.hand_over(stream, permit),
            Err(e) => tracing::debug!("cannot hand over a connection: {e}"),
        }
    }
    drop(listener);
    for worker in workers.0 {
        worker.finish().await;
    }
}

type Accepted = (std::net::TcpStream, OwnedSemaphorePermit);

/// A server thread and the connections it serves.
struct Worker {
    connections: mpsc::UnboundedSender<Accepted>,
    open: Arc<AtomicUsize>,
    done: oneshot::Receiver<()>,
}

impl Worker {
    fn start<F, R>(
        name: String,
        filter: F,
        header_read_timeout: Duration,
        grace: Duration,
    ) -> std::io::Result<Self>
    where
        F: Filter<Extract = (R,), Error = WarpRejection> + Clone + Send + Sync + 'static,
        R: warp::Reply,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (connections, accepted) = mpsc::unbounded_channel();
        let (finished, done) = oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        std::thread::Builder::new().name(name).spawn(move || {
            runtime.block_on(Self::run(
                accepted,
                filter,
                counter,
                header_read_timeout,
                grace,
            ));
            let _ = finished.send(());
        })?;
        Ok(Self {
            connections,
            open,
            done,
        })
    }

    fn hand_over(&self, stream: std::net::TcpStream, permit: OwnedSemaphorePermit) {
        self.open.fetch_add(1, Ordering::Relaxed);
        if self.connections.send((stream, permit)).is_err() {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Stops handing it connections and waits until it has drained.
    async fn finish(self) {
        drop(self.connections);
        let _ = self.done.await;
    }

    async fn run<F, R>(
        mut accepted: mpsc::UnboundedReceiver<Accepted>,
        filter: F,
        open: Arc<AtomicUsize>,
        header_read_timeout: Duration,
        grace: Duration,
    ) where
        F: Filter<Extract = (R,), Error = WarpRejection> + Clone + Send + Sync + 'static,
        R: warp::Reply,
    {
        let service = warp::service(filter);
        let graceful = GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        while let Some((stream, permit)) = accepted.recv().await {
            let stream = match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!("cannot serve a connection: {e}");
                    open.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
            };
            let conn = builder.serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            );
            let conn = graceful.watch(conn);
            let open = open.clone();
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("connection closed with an error: {e}");
                }
                open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the {grace:?} grace period were closed");
        }
    }
}
