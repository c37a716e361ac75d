//! The HTTP client that carries deliveries to destinations: hyper's
//! HTTP/1.1 and HTTP/2 connections (`hyper::client::conn`) under a pool of
//! hookgate's own. Framing, parsing and connection state are hyper's; this
//! module only decides which connection a request goes on.
//!
//! Connecting is hyper-util's `HttpConnector`: Happy Eyeballs across a
//! name's addresses (the other address family is raced after 300 ms), a
//! connect timeout of its own, TCP keepalive and no Nagle delay. TLS is
//! rustls, with the platform's trust store unless a destination names its
//! own CA and client certificate ([`Transport`]).
//!
//! An HTTP/1.1 connection is driven by the task that sends on it, polled
//! together with the request (no connection task, no channel hop: most of
//! what a delivery costs in user space); an idle one sits in the pool,
//! newest first, until it is reused, found closed, idle for a minute, or
//! older than the connection lifetime (so that DNS changes reach long-lived
//! pools). An HTTP/2 connection runs on a task of its own and is shared by
//! concurrent requests.
//!
//! A request goes again on a new connection only when hyper hands it back
//! unsent; once it may have been written, its fate is an attempt like any
//! other (RFC 9110 §9.2.2: a POST is not retried by the transport).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use rustls_platform_verifier::BuilderVerifierExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower_service::Service;

use crate::transport::{Transport, alpn, install_provider};

/// Every request names its sender.
const USER_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("hookgate/", env!("CARGO_PKG_VERSION")));
/// How much of a response body is read (and discarded beyond what the
/// caller keeps) so that the connection can go back to the pool; a longer
/// body closes it instead.
const READ_LIMIT: usize = 64 * 1024;
/// Idle connections kept per origin; more are closed when returned.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the whole pool is swept of expired and closed connections,
/// so that those of an origin no longer called do not linger.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// After this long without an answer on the preferred address family,
/// the other is tried alongside (RFC 8305).
const HAPPY_EYEBALLS: Duration = Duration::from_millis(300);
/// Probes on an idle TCP connection, so that a peer gone silently is found.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0} is not an http:// or https:// URL with a host")]
    Url(Uri),
    #[error("cannot connect to {authority}: {message}")]
    Connect {
        authority: Authority,
        message: String,
        timed_out: bool,
    },
    #[error("TLS handshake with {authority} failed: {source}")]
    Handshake {
        authority: Authority,
        source: io::Error,
    },
    #[error("{0}")]
    Http(String),
    #[error("timed out")]
    Timeout,
}

impl ClientError {
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Self::Timeout
                | Self::Connect {
                    timed_out: true,
                    ..
                }
        )
    }

    /// hyper's error with its causes, for the log and dead letters.
    fn http(e: hyper::Error) -> Self {
        Self::Http(chain(&e))
    }
}

/// An error and its sources, `a: b: c`.
fn chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// What a destination answered.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub retry_after: Option<HeaderValue>,
    /// The body, up to the limit given to [`Client::post`]; cut short if
    /// reading it failed or ran out of time (the status stands).
    pub body: Bytes,
}

/// Connection settings shared by every destination.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// A connection older than this is not reused.
    pub lifetime: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    tls: bool,
    authority: Authority,
    transport: u64,
}

type H1Conn = http1::Connection<TokioIo<Io>, Full<Bytes>>;

enum Conn {
    H1 {
        sender: http1::SendRequest<Full<Bytes>>,
        conn: Pin<Box<H1Conn>>,
    },
    /// Driven by a task of its own; the sender is shared.
    H2(http2::SendRequest<Full<Bytes>>),
}

struct Pooled {
    conn: Conn,
    born: Instant,
    idle_since: Instant,
}

impl Pooled {
    fn expired(&self, now: Instant, lifetime: Duration) -> bool {
        now.duration_since(self.born) >= lifetime
            || now.duration_since(self.idle_since) >= IDLE_TIMEOUT
    }
}

struct Pool {
    idle: HashMap<Key, Vec<Pooled>>,
    swept: Instant,
}

/// A request that hyper handed back unsent, or the attempt's error.
enum Failed {
    Unsent(Request<Full<Bytes>>),
    Error(ClientError),
}

/// A pool of connections, for one thread's use (other threads fork their
/// own); the lock is never contended.
pub struct Client {
    connector: HttpConnector,
    /// The platform's trust store, for destinations without TLS files of
    /// their own: offering HTTP/1.1 only, and HTTP/2 too.
    platform: [TlsConnector; 2],
    settings: Settings,
    pool: Mutex<Pool>,
}

impl Client {
    pub fn new(settings: Settings) -> Result<Self, ClientError> {
        install_provider();
        let platform = |http2: bool| -> Result<TlsConnector, ClientError> {
            let mut config = rustls::ClientConfig::builder()
                .with_platform_verifier()?
                .with_no_client_auth();
            config.alpn_protocols = alpn(http2);
            Ok(TlsConnector::from(Arc::new(config)))
        };
        Ok(Self {
            connector: connector(HttpConnector::new(), &settings),
            platform: [platform(false)?, platform(true)?],
            settings,
            pool: Pool::new(),
        })
    }

    /// A client with a pool of its own and the same settings.
    pub fn fork(&self) -> Self {
        Self {
            connector: self.connector.clone(),
            platform: self.platform.clone(),
            settings: self.settings,
            pool: Pool::new(),
        }
    }

    /// POSTs `body` with `headers` (and `Host`, `User-Agent`) to `url`,
    /// within `deadline`. The answer counts once its head is read: the body
    /// is read within what is left of the deadline (its first `keep` bytes
    /// kept), and failing to read it changes nothing but whether the
    /// connection is reused.
    pub async fn post(
        &self,
        url: &Uri,
        transport: &Transport,
        headers: &HeaderMap,
        body: Bytes,
        keep: usize,
        deadline: Instant,
    ) -> Result<Response, ClientError> {
        let key = key(url, transport)?;
        let mut request = build(url, &key.authority, headers, body)?;
        if let Some(pooled) = self.checkout(&key) {
            match self.exchange(&key, pooled, request, keep, deadline).await {
                Ok(response) => return Ok(response),
                // Never written: the connection closed while idle.
                Err(Failed::Unsent(back)) => request = back,
                Err(Failed::Error(e)) => return Err(e),
            }
        }
        let pooled = tokio::time::timeout_at(deadline, self.connect(&key, transport))
            .await
            .map_err(|_| ClientError::Timeout)??;
        match self.exchange(&key, pooled, request, keep, deadline).await {
            Ok(response) => Ok(response),
            Err(Failed::Unsent(_)) => Err(ClientError::Http(
                "the new connection closed before the request could be sent".into(),
            )),
            Err(Failed::Error(e)) => Err(e),
        }
    }

    /// A pooled connection for `key` that is not known to be closed. One
    /// that the destination closed while it sat idle is found by hyper
    /// when the request is sent on it: it hands the request back unsent.
    fn checkout(&self, key: &Key) -> Option<Pooled> {
        let now = Instant::now();
        loop {
            let pooled = {
                let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                let conns = pool.idle.get_mut(key)?;
                // Newest first: under a steady load the oldest age out.
                let top = conns.last()?;
                if let Conn::H2(sender) = &top.conn {
                    if !top.expired(now, self.settings.lifetime) && !sender.is_closed() {
                        // Shared: it stays in the pool.
                        return Some(Pooled {
                            conn: Conn::H2(sender.clone()),
                            born: top.born,
                            idle_since: now,
                        });
                    }
                }
                conns.pop()?
            };
            let usable = match &pooled.conn {
                Conn::H1 { sender, .. } => sender.is_ready(),
                Conn::H2(sender) => !sender.is_closed(),
            };
            if usable && !pooled.expired(now, self.settings.lifetime) {
                return Some(pooled);
            }
        }
    }

    fn checkin(&self, key: &Key, pooled: Pooled) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(pool.swept) >= SWEEP_EVERY {
            pool.swept = now;
            let lifetime = self.settings.lifetime;
            pool.idle.retain(|_, conns| {
                conns.retain(|p| !p.expired(now, lifetime));
                !conns.is_empty()
            });
        }
        let conns = pool.idle.entry(key.clone()).or_default();
        if let Conn::H2(_) = pooled.conn {
            // One shared connection per origin is enough.
            conns.retain(|p| !matches!(p.conn, Conn::H2(_)));
        }
        if conns.len() < MAX_IDLE {
            conns.push(Pooled {
                idle_since: now,
                ..pooled
            });
        }
    }

    async fn connect(&self, key: &Key, transport: &Transport) -> Result<Pooled, ClientError> {
        let authority = &key.authority;
        let scheme = if key.tls { "https" } else { "http" };
        let dial = Uri::try_from(format!("{scheme}://{authority}/"))
            .map_err(|_| ClientError::Url(Uri::from(authority.clone())))?;
        let tcp = self
            .connector
            .clone()
            .call(dial)
            .await
            .map_err(|e| ClientError::Connect {
                authority: authority.clone(),
                timed_out: timed_out(&e),
                message: chain(&e),
            })?
            .into_inner();
        let (io, h2) = if key.tls {
            let connector = match transport.tls() {
                Some(config) => TlsConnector::from(config.clone()),
                None => self.platform[usize::from(transport.http2())].clone(),
            };
            // `Authority::host` keeps an IPv6 literal's brackets.
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = ServerName::try_from(host.to_owned()).map_err(|_| ClientError::Connect {
                authority: authority.clone(),
                message: "not a valid TLS server name".into(),
                timed_out: false,
            })?;
            let stream =
                connector
                    .connect(name, tcp)
                    .await
                    .map_err(|source| ClientError::Handshake {
                        authority: authority.clone(),
                        source,
                    })?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            (Io::Tls(Box::new(stream)), h2)
        } else {
            // Prior knowledge: HTTP/2 over cleartext only when asked.
            (Io::Plain(tcp), transport.http2())
        };
        let io = TokioIo::new(io);
        let now = Instant::now();
        let conn = if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .handshake(io)
                .await
                .map_err(ClientError::http)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("HTTP/2 connection ended: {e}");
                }
            });
            Conn::H2(sender)
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(ClientError::http)?;
            Conn::H1 {
                sender,
                conn: Box::pin(conn),
            }
        };
        Ok(Pooled {
            conn,
            born: now,
            idle_since: now,
        })
    }

    /// One request and its answer on `pooled`, which goes back to the pool
    /// if it can carry another.
    async fn exchange(
        &self,
        key: &Key,
        mut pooled: Pooled,
        mut request: Request<Full<Bytes>>,
        keep: usize,
        deadline: Instant,
    ) -> Result<Response, Failed> {
        let answered = match &mut pooled.conn {
            Conn::H1 { sender, conn } => {
                // Origin-form: the target without scheme and authority.
                let target = request.uri().path_and_query().cloned();
                *request.uri_mut() =
                    Uri::from(target.unwrap_or_else(|| PathAndQuery::from_static("/")));
                let sent = sender.try_send_request(request);
                tokio::time::timeout_at(deadline, drive(Some(conn.as_mut()), sent)).await
            }
            Conn::H2(sender) => {
                // `:scheme` and `:authority` come from the URI.
                let scheme = if key.tls { Scheme::HTTPS } else { Scheme::HTTP };
                let mut parts = request.uri().clone().into_parts();
                parts.scheme = Some(scheme);
                parts.authority = Some(key.authority.clone());
                if let Ok(uri) = Uri::from_parts(parts) {
                    *request.uri_mut() = uri;
                }
                request.headers_mut().remove(http::header::HOST);
                let sent = sender.try_send_request(request);
                tokio::time::timeout_at(deadline, sent).await
            }
        };
        let response = match answered {
            Err(_) => return Err(Failed::Error(ClientError::Timeout)),
            Ok(Ok(response)) => response,
            Ok(Err(mut e)) => {
                return Err(match e.take_message() {
                    Some(request) => Failed::Unsent(request),
                    None => Failed::Error(ClientError::http(e.into_error())),
                });
            }
        };
        let (head, body) = response.into_parts();
        let retry_after = head.headers.get(http::header::RETRY_AFTER).cloned();
        let conn = match &mut pooled.conn {
            Conn::H1 { conn, .. } => Some(conn.as_mut()),
            Conn::H2(_) => None,
        };
        // Given up at the deadline, the body is left out; the status stands.
        let (body, complete) = tokio::time::timeout_at(deadline, read_body(conn, body, keep))
            .await
            .unwrap_or_default();
        if complete && reusable(&mut pooled).await {
            self.checkin(key, pooled);
        }
        Ok(Response {
            status: head.status,
            retry_after,
            body,
        })
    }
}

/// Whether a connection whose exchange is complete can carry another
/// request: polled once more, hyper has it waiting for one (not closing).
async fn reusable(pooled: &mut Pooled) -> bool {
    match &mut pooled.conn {
        Conn::H1 { sender, conn } => {
            poll_fn(|cx| {
                let open = conn.as_mut().poll(cx).is_pending();
                Poll::Ready(open && sender.is_ready())
            })
            .await
        }
        Conn::H2(sender) => !sender.is_closed(),
    }
}

/// Connecting: both schemes (TLS is layered on here), no Nagle delay, the
/// connect timeout, Happy Eyeballs, TCP keepalive.
fn connector<R: Clone>(mut connector: HttpConnector<R>, settings: &Settings) -> HttpConnector<R> {
    connector.enforce_http(false);
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(settings.connect_timeout));
    connector.set_happy_eyeballs_timeout(Some(HAPPY_EYEBALLS));
    connector.set_keepalive(Some(TCP_KEEPALIVE));
    connector
}

impl Pool {
    fn new() -> Mutex<Self> {
        Mutex::new(Self {
            idle: HashMap::new(),
            swept: Instant::now(),
        })
    }
}

/// Polls `fut` and, alongside, the HTTP/1.1 connection that carries it:
/// on the calling task, so that request, connection and reactor never
/// hand work to one another across tasks. A connection that ends makes
/// hyper resolve `fut` with its error.
async fn drive<F: Future>(mut conn: Option<Pin<&mut H1Conn>>, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    poll_fn(|cx: &mut Context<'_>| {
        if let Some(c) = &mut conn {
            if c.as_mut().poll(cx).is_ready() {
                conn = None;
            }
        }
        fut.as_mut().poll(cx)
    })
    .await
}

/// Reads a body of up to [`READ_LIMIT`] bytes, keeping the first `keep`
/// of them; true if it was read to its end (and so the connection may be
/// reused).
async fn read_body(
    mut conn: Option<Pin<&mut H1Conn>>,
    mut body: Incoming,
    keep: usize,
) -> (Bytes, bool) {
    let mut out = BytesMut::new();
    let mut read = 0;
    loop {
        match drive(conn.as_mut().map(|c| c.as_mut()), body.frame()).await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len();
                    if read > READ_LIMIT {
                        return (out.freeze(), false);
                    }
                    let room = keep.saturating_sub(out.len()).min(data.len());
                    out.extend_from_slice(&data[..room]);
                }
            }
            None => return (out.freeze(), true),
            Some(Err(e)) => {
                tracing::debug!("reading a response body failed: {e}");
                return (out.freeze(), false);
            }
        }
    }
}

fn timed_out(e: &(dyn StdError + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = e.source();
    }
    false
}

fn key(url: &Uri, transport: &Transport) -> Result<Key, ClientError> {
    let tls = match url.scheme() {
        Some(s) if *s == Scheme::HTTP => false,
        Some(s) if *s == Scheme::HTTPS => true,
        _ => return Err(ClientError::Url(url.clone())),
    };
    match url.authority() {
        Some(a) if !a.host().is_empty() && !a.as_str().contains('@') => Ok(Key {
            tls,
            authority: a.clone(),
            transport: transport.id(),
        }),
        _ => Err(ClientError::Url(url.clone())),
    }
}

/// The request: origin-form target, `Host` (HTTP/1.1; hyper makes it
/// `:authority` for HTTP/2), `User-Agent`, then the delivery's headers.
/// hyper sets `Content-Length` from the body.
fn build(
    url: &Uri,
    authority: &Authority,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, ClientError> {
    let host =
        HeaderValue::from_str(authority.as_str()).map_err(|_| ClientError::Url(url.clone()))?;
    let mut request = Request::post(url.clone())
        .body(Full::new(body))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let out = request.headers_mut();
    out.reserve(headers.len() + 2);
    out.insert(http::header::HOST, host);
    out.insert(http::header::USER_AGENT, USER_AGENT);
    for (name, value) in headers {
        if name == http::header::HOST
            || name == http::header::USER_AGENT
            || name == http::header::CONTENT_LENGTH
            || name == http::header::TRANSFER_ENCODING
            || name == http::header::CONNECTION
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    Ok(request)
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name's addresses as a resolver would give them.
    #[derive(Clone)]
    struct Fixed(Vec<std::net::SocketAddr>);

    impl Service<hyper_util::client::legacy::connect::dns::Name> for Fixed {
        type Response = std::vec::IntoIter<std::net::SocketAddr>;
        type Error = io::Error;
        type Future = std::future::Ready<Result<Self::Response, io::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
            std::future::ready(Ok(self.0.clone().into_iter()))
        }
    }

    /// A listener whose accept queue is full: handshakes to it go
    /// unanswered, as to an address whose packets are dropped.
    async fn silent(addr: &str) -> (tokio::net::TcpListener, Vec<TcpStream>) {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let socket = if addr.is_ipv6() {
            tokio::net::TcpSocket::new_v6().unwrap()
        } else {
            tokio::net::TcpSocket::new_v4().unwrap()
        };
        socket.bind(addr).unwrap();
        let listener = socket.listen(1).unwrap();
        let bound = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        loop {
            let attempt = TcpStream::connect(bound);
            match tokio::time::timeout(Duration::from_millis(200), attempt).await {
                Ok(Ok(s)) => queued.push(s),
                _ => break,
            }
            assert!(queued.len() < 64, "the accept queue never filled");
        }
        (listener, queued)
    }

    /// Happy Eyeballs: the first address (IPv6) drops the handshake; the
    /// second (IPv4) is tried 300 ms later, not after the first's share of
    /// the connect timeout.
    #[tokio::test]
    async fn an_unreachable_first_address_leaves_the_next_within_300_ms() {
        let (silent, _queued) = silent("[::1]:0").await;
        let port = silent.local_addr().unwrap().port();
        let good = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => panic!("127.0.0.1:{port} is taken ({e}); run again"),
        };
        let addrs = vec![
            format!("[::1]:{port}").parse().unwrap(),
            format!("127.0.0.1:{port}").parse().unwrap(),
        ];
        let settings = Settings {
            connect_timeout: Duration::from_secs(4),
            lifetime: Duration::from_secs(60),
        };
        let mut c = connector(HttpConnector::new_with_resolver(Fixed(addrs)), &settings);
        let started = Instant::now();
        let uri = Uri::try_from(format!("http://two-addresses.test:{port}/")).unwrap();
        let tcp = c.call(uri).await.unwrap().into_inner();
        let took = started.elapsed();
        assert_eq!(tcp.peer_addr().unwrap(), good.local_addr().unwrap());
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_millis(900),
            "connected after {took:?}"
        );
    }

    #[test]
    fn keys() {
        let t = Transport::default();
        let cases = [
            ("http://a.svc/x", Some((false, "a.svc"))),
            ("https://a.svc:8443/x?y", Some((true, "a.svc:8443"))),
            ("ftp://a.svc/", None),
            ("http://user@a.svc/", None),
            ("/relative", None),
        ];
        for (url, want) in cases {
            let got = key(&Uri::try_from(url).unwrap(), &t).ok();
            let got = got.map(|k| (k.tls, k.authority.to_string()));
            assert_eq!(got, want.map(|(t, a)| (t, a.to_owned())), "{url}");
        }
    }

    #[test]
    fn the_request_carries_the_delivery_headers_and_ours() {
        let url = Uri::try_from("http://a.svc:81/hook?x=1").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-hookgate-job-id", HeaderValue::from_static("j1"));
        headers.insert("host", HeaderValue::from_static("evil"));
        headers.insert("content-length", HeaderValue::from_static("99"));
        let request = build(&url, url.authority().unwrap(), &headers, Bytes::new()).unwrap();
        let h = request.headers();
        assert_eq!(h["host"], "a.svc:81");
        assert_eq!(h["x-hookgate-job-id"], "j1");
        assert!(h["user-agent"].to_str().unwrap().starts_with("hookgate/"));
        assert!(h.get("content-length").is_none(), "hyper sets it");
        assert_eq!(request.uri().path_and_query().unwrap(), "/hook?x=1");
    }
}
