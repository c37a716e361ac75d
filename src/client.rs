//! The HTTP/1.1 client that carries deliveries to destinations.
//!
//! A delivery is always the same exchange: one POST with a known length,
//! one response whose status (and `Retry-After`) is all that counts. This
//! client does exactly that on the calling task: it writes the request
//! with one syscall and reads the response on the same connection, with no
//! connection task, channel or wake-up in between (with hyper-util's
//! pooled client these were a third of a delivery's user-space CPU).
//! Responses are parsed by `httparse`.
//!
//! Connections are kept alive in a pool per origin and reused newest
//! first; idle ones are closed after a minute, swept lazily as the pool is
//! used. A pooled connection the destination has closed meanwhile is
//! noticed when it is taken (the reactor has seen it readable), and a
//! request that meets a closed connection before any byte of an answer is
//! sent again, once, on a new one. TLS is rustls with the platform's trust
//! store.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use rustls::pki_types::ServerName;
use rustls_platform_verifier::ConfigVerifierExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Every request names its sender.
const USER_AGENT: &str = concat!("hookgate/", env!("CARGO_PKG_VERSION"));
/// A response head larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Idle connections kept per origin; more are closed when returned.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the whole pool is swept of expired and closed connections,
/// so that those of an origin no longer called do not linger.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0} is not an http:// or https:// URL with a host")]
    Url(Uri),
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: Authority,
        source: io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(Authority),
    #[error("TLS handshake with {authority} failed: {source}")]
    Handshake {
        authority: Authority,
        source: io::Error,
    },
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("the connection closed before a complete response")]
    Closed,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

impl ClientError {
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::ConnectTimeout(_) => true,
            Self::Io(e) | Self::Connect { source: e, .. } | Self::Handshake { source: e, .. } => {
                e.kind() == io::ErrorKind::TimedOut
            }
            _ => false,
        }
    }
}

impl From<httparse::Error> for ClientError {
    fn from(e: httparse::Error) -> Self {
        Self::Invalid(match e {
            httparse::Error::TooManyHeaders => "too many headers",
            httparse::Error::Version => "not HTTP/1.x",
            httparse::Error::Status => "bad status line",
            _ => "malformed head",
        })
    }
}

/// What a destination answered.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub retry_after: Option<HeaderValue>,
    /// The body, up to the limit given to [`Client::post`].
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    tls: bool,
    authority: Authority,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        now.duration_since(self.since) < IDLE_TIMEOUT && self.conn.is_open()
    }
}

struct Pool {
    idle: HashMap<Origin, Vec<Idle>>,
    swept: Instant,
}

/// A pool of connections, for one thread's use (other threads fork their
/// own); the lock is never contended.
pub struct Client {
    tls: TlsConnector,
    connect_timeout: Duration,
    pool: Mutex<Pool>,
}

impl Client {
    /// rustls is built with ring only (small, quick to build), installed
    /// here as the process's provider before any TLS configuration is made.
    pub fn new(connect_timeout: Duration) -> Result<Self, ClientError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = rustls::ClientConfig::with_platform_verifier()?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
            connect_timeout,
            pool: Pool::new(),
        })
    }

    /// A client with a pool of its own and the same TLS configuration.
    pub fn fork(&self) -> Self {
        Self {
            tls: self.tls.clone(),
            connect_timeout: self.connect_timeout,
            pool: Pool::new(),
        }
    }

    /// POSTs `body` with `headers` (and `Host`, `User-Agent`,
    /// `Content-Length`) to `url`.
    /// Reads at most `keep` bytes of the response body; a longer body
    /// costs the connection its place in the pool. Not timed: the caller
    /// bounds the whole exchange.
    pub async fn post(
        &self,
        url: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        keep: usize,
    ) -> Result<Response, ClientError> {
        let origin = origin(url)?;
        let request = encode(url, &origin.authority, headers, body);
        if let Some(mut conn) = self.checkout(&origin) {
            match conn.exchange(&request, keep).await {
                Ok((response, reusable)) => {
                    if reusable {
                        self.checkin(origin, conn);
                    }
                    return Ok(response);
                }
                // The destination closed it while it was idle: try again
                // on a new connection, which is what a fresh one would do.
                Err(e) if conn.unanswered && is_closed(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let mut conn = self.connect(&origin).await?;
        let (response, reusable) = conn.exchange(&request, keep).await?;
        if reusable {
            self.checkin(origin, conn);
        }
        Ok(response)
    }

    fn checkout(&self, origin: &Origin) -> Option<Conn> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.idle.get_mut(origin)?;
        let now = Instant::now();
        // Newest first: under a steady load the oldest age out.
        while let Some(idle) = conns.pop() {
            if idle.usable(now) {
                return Some(idle.conn);
            }
        }
        None
    }

    fn checkin(&self, origin: Origin, conn: Conn) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(pool.swept) >= SWEEP_EVERY {
            pool.swept = now;
            pool.idle.retain(|_, conns| {
                conns.retain(|idle| idle.usable(now));
                !conns.is_empty()
            });
        }
        let conns = pool.idle.entry(origin).or_default();
        if conns.len() < MAX_IDLE {
            conns.push(Idle { conn, since: now });
        }
    }

    async fn connect(&self, origin: &Origin) -> Result<Conn, ClientError> {
        let authority = &origin.authority;
        let default_port = if origin.tls { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        // `Authority::host` keeps an IPv6 literal's brackets.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let tcp = dial(host, port, self.connect_timeout)
            .await
            .map_err(|e| match e {
                None => ClientError::ConnectTimeout(authority.clone()),
                Some(source) => ClientError::Connect {
                    authority: authority.clone(),
                    source,
                },
            })?;
        tcp.set_nodelay(true)?;
        let io = if origin.tls {
            let name = ServerName::try_from(host.to_owned()).map_err(|_| ClientError::Connect {
                authority: authority.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a valid TLS server name"),
            })?;
            let stream =
                self.tls
                    .connect(name, tcp)
                    .await
                    .map_err(|source| ClientError::Handshake {
                        authority: authority.clone(),
                        source,
                    })?;
            Io::Tls(Box::new(stream))
        } else {
            Io::Plain(tcp)
        };
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            unanswered: false,
        })
    }
}

impl Pool {
    fn new() -> Mutex<Self> {
        Mutex::new(Self {
            idle: HashMap::new(),
            swept: Instant::now(),
        })
    }
}

/// Connects to the first of `host`'s addresses that answers within
/// `timeout`. Each address gets an equal share of the time left, so that
/// one that drops packets (an unreachable IPv6 route, say) leaves time for
/// the next. The error is the last address's; `None` if it timed out.
async fn dial(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, Option<io::Error>> {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
            Ok(addrs) => addrs.map_err(Some)?.collect(),
            Err(_) => return Err(None),
        };
    dial_any(&addrs, deadline).await
}

async fn dial_any(addrs: &[SocketAddr], deadline: Instant) -> Result<TcpStream, Option<io::Error>> {
    let mut last = Some(io::Error::new(
        io::ErrorKind::NotFound,
        "the name has no address",
    ));
    for (i, addr) in addrs.iter().enumerate() {
        let share = deadline.saturating_duration_since(Instant::now()) / (addrs.len() - i) as u32;
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = None,
        }
    }
    Err(last)
}

fn origin(url: &Uri) -> Result<Origin, ClientError> {
    let tls = match url.scheme() {
        Some(s) if *s == Scheme::HTTP => false,
        Some(s) if *s == Scheme::HTTPS => true,
        _ => return Err(ClientError::Url(url.clone())),
    };
    match url.authority() {
        Some(a) if !a.host().is_empty() && !a.as_str().contains('@') => Ok(Origin {
            tls,
            authority: a.clone(),
        }),
        _ => Err(ClientError::Url(url.clone())),
    }
}

/// The request head and body in one buffer: one write, one segment.
/// Header names and values were validated when they were made.
fn encode(url: &Uri, authority: &Authority, headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
    let target = url.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_str().as_bytes());
    out.extend_from_slice(b"\r\nuser-agent: ");
    out.extend_from_slice(USER_AGENT.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == http::header::HOST
            || name == http::header::USER_AGENT
            || name == http::header::CONTENT_LENGTH
            || name == http::header::TRANSFER_ENCODING
            || name == http::header::CONNECTION
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // Writing to a Vec cannot fail.
    let _ = write!(out, "content-length: {}\r\n\r\n", body.len());
    out.extend_from_slice(body);
    out
}

fn is_closed(e: &ClientError) -> bool {
    match e {
        ClientError::Closed => true,
        ClientError::Io(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the server closes: never reusable.
    Close,
}

/// The parts of a response head that matter here.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: StatusCode,
    retry_after: Option<HeaderValue>,
    framing: Framing,
    keep_alive: bool,
}

/// Parses a complete head at the start of `buf`: the head and its length,
/// or `None` if more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| ClientError::Invalid("bad status code"))?;
    let mut keep_alive = response.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut retry_after = None;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(ClientError::Invalid("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ClientError::Invalid("conflicting content-length"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            // Chunked must be the last coding applied.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            if h.value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                keep_alive = false;
            }
        } else if h.name.eq_ignore_ascii_case("retry-after") && retry_after.is_none() {
            retry_after = HeaderValue::from_bytes(h.value).ok();
        }
    }
    let framing = if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if encoded {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3).
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    if framing == Framing::Close || (encoded && length.is_some()) {
        keep_alive = false;
    }
    Ok(Some((
        Head {
            status,
            retry_after,
            framing,
            keep_alive,
        },
        len,
    )))
}

struct Conn {
    io: Io,
    /// Read-ahead; empty between exchanges.
    buf: BytesMut,
    /// True from sending a request until the first byte of its answer.
    unanswered: bool,
}

impl Conn {
    /// An idle connection is fit for use if the destination has not
    /// closed it or sent anything unasked. Usually costs no syscall: the
    /// reactor knows whether the socket became readable.
    fn is_open(&self) -> bool {
        let tcp = match &self.io {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => tls.get_ref().0,
        };
        matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends the request and reads the answer: the response and whether
    /// the connection can carry another request.
    async fn exchange(
        &mut self,
        request: &[u8],
        keep: usize,
    ) -> Result<(Response, bool), ClientError> {
        self.unanswered = true;
        self.io.write_all(request).await?;
        self.io.flush().await?;
        let head = loop {
            let head = self.read_head().await?;
            // 1xx answers are interim; 101 is never asked for.
            if !head.status.is_informational() {
                break head;
            }
        };
        let (body, complete) = match head.framing {
            Framing::Empty => (Bytes::new(), true),
            Framing::Length(n) => self.read_length(n, keep).await?,
            Framing::Chunked => self.read_chunked(keep).await?,
            Framing::Close => self.read_to_close(keep).await?,
        };
        let reusable = head.keep_alive && complete && self.buf.is_empty();
        let response = Response {
            status: head.status,
            retry_after: head.retry_after,
            body,
        };
        Ok((response, reusable))
    }

    /// Reads more into the buffer; a close is an error here.
    async fn fill(&mut self) -> Result<(), ClientError> {
        self.buf.reserve(8 * 1024);
        if self.io.read_buf(&mut self.buf).await? == 0 {
            return Err(ClientError::Closed);
        }
        self.unanswered = false;
        Ok(())
    }

    async fn read_head(&mut self) -> Result<Head, ClientError> {
        loop {
            if !self.buf.is_empty() {
                if let Some((head, len)) = parse_head(&self.buf)? {
                    self.buf.advance(len);
                    return Ok(head);
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(ClientError::Invalid("head too large"));
                }
            }
            self.fill().await?;
        }
    }

    /// A body of `n` bytes; `complete` is false if it was longer than
    /// `keep` and left unread.
    async fn read_length(&mut self, n: u64, keep: usize) -> Result<(Bytes, bool), ClientError> {
        let Ok(n) = usize::try_from(n) else {
            return Ok((Bytes::new(), false));
        };
        if n > keep {
            return Ok((Bytes::new(), false));
        }
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok((self.buf.split_to(n).freeze(), true))
    }

    async fn read_chunked(&mut self, keep: usize) -> Result<(Bytes, bool), ClientError> {
        let mut body = BytesMut::new();
        loop {
            let size = loop {
                match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((len, size))) => {
                        self.buf.advance(len);
                        break size;
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD => {
                        self.fill().await?
                    }
                    _ => return Err(ClientError::Invalid("bad chunk size")),
                }
            };
            if size == 0 {
                break;
            }
            let size = match usize::try_from(size) {
                Ok(s) if body.len() + s <= keep => s,
                _ => return Ok((body.freeze(), false)),
            };
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buf[..size]);
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(ClientError::Invalid("chunk not followed by CRLF"));
            }
            self.buf.advance(size + 2);
        }
        // Trailers, ignored, up to the empty line.
        loop {
            let mut trailers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(&self.buf, &mut trailers)? {
                httparse::Status::Complete((len, _)) => {
                    self.buf.advance(len);
                    return Ok((body.freeze(), true));
                }
                httparse::Status::Partial if self.buf.len() < MAX_HEAD => self.fill().await?,
                httparse::Status::Partial => {
                    return Err(ClientError::Invalid("trailers too large"));
                }
            }
        }
    }

    async fn read_to_close(&mut self, keep: usize) -> Result<(Bytes, bool), ClientError> {
        while self.buf.len() <= keep {
            match self.fill().await {
                Ok(()) => {}
                Err(ClientError::Closed) => break,
                Err(e) => return Err(e),
            }
        }
        let n = self.buf.len().min(keep);
        Ok((self.buf.split_to(n).freeze(), false))
    }
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

    #[test]
    fn heads() {
        use Framing::*;
        let ok = |framing, keep_alive| Some((framing, keep_alive));
        let cases: &[(&str, Option<(Framing, bool)>)] = &[
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n",
                ok(Length(2), true),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length:  7 \r\n\r\n",
                ok(Length(7), true),
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n",
                ok(Length(2), false),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                ok(Chunked, true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n",
                ok(Chunked, true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                ok(Close, false),
            ),
            // Both framings: chunked wins, and the connection is not reused.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
                ok(Chunked, false),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", ok(Close, false)),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n",
                ok(Empty, true),
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", ok(Empty, true)),
            ("HTTP/1.1 100 Continue\r\n\r\n", ok(Empty, true)),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
                ok(Length(0), false),
            ),
            (
                "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n",
                ok(Length(0), false),
            ),
            ("HTTP/1.1 500 Oops\r\ncontent-len", None),
        ];
        for (raw, want) in cases {
            let got = parse_head(raw.as_bytes()).unwrap().map(|(head, len)| {
                assert_eq!(len, raw.len(), "{raw:?}");
                (head.framing, head.keep_alive)
            });
            assert_eq!(got, *want, "{raw:?}");
        }
    }

    #[test]
    fn bad_heads() {
        let cases = [
            "HTTP/2 200\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 099 Low\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        ];
        for raw in cases {
            assert!(parse_head(raw.as_bytes()).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn retry_after_is_kept() {
        let raw =
            b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nretry-after: 9\r\ncontent-length: 0\r\n\r\n";
        let (head, _) = parse_head(raw).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(head.retry_after, Some(HeaderValue::from_static("7")));
    }

    #[test]
    fn request_encoding() {
        let url: Uri = "http://down.internal:8080/hooks?tenant=a%20b"
            .parse()
            .unwrap();
        let to = origin(&url).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-hookgate-rule", HeaderValue::from_static("all"));
        // Framing headers are the client's own, never passed through.
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.insert("host", HeaderValue::from_static("elsewhere"));
        let request = encode(&url, &to.authority, &headers, b"{}");
        assert_eq!(
            String::from_utf8(request).unwrap(),
            format!(
                "POST /hooks?tenant=a%20b HTTP/1.1\r\nhost: down.internal:8080\r\n\
                 user-agent: {USER_AGENT}\r\nx-hookgate-rule: all\r\ncontent-length: 2\r\n\r\n{{}}"
            )
        );
        let bare: Uri = "https://down.internal".parse().unwrap();
        let request = encode(
            &bare,
            &origin(&bare).unwrap().authority,
            &HeaderMap::new(),
            b"",
        );
        assert!(request.starts_with(b"POST / HTTP/1.1\r\nhost: down.internal\r\n"));
    }

    #[test]
    fn origins() {
        for url in ["ftp://down/", "/relative", "http://user@down/"] {
            let url: Uri = url.parse().unwrap();
            assert!(origin(&url).is_err(), "{url}");
        }
        let a = origin(&"https://Down:443/a".parse().unwrap()).unwrap();
        let b = origin(&"https://down:443/b".parse().unwrap()).unwrap();
        assert_eq!(a, b, "one pool per origin, whatever the path or case");
    }

    /// An address that drops the handshake does not use up the timeout:
    /// the next one still gets its share.
    #[tokio::test]
    async fn a_silent_address_leaves_time_for_the_next() {
        // A listener whose accept queue is full drops further handshakes.
        let silent = tokio::net::TcpSocket::new_v4().unwrap();
        silent.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let _silent = silent.listen(1).unwrap();
        let mut queued = Vec::new();
        loop {
            let attempt = TcpStream::connect(silent_addr);
            match tokio::time::timeout(Duration::from_millis(200), attempt).await {
                Ok(Ok(s)) => queued.push(s),
                _ => break,
            }
            assert!(queued.len() < 64, "the accept queue never filled");
        }
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(2);
        let tcp = dial_any(&[silent_addr, good_addr], deadline).await.unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), good_addr);
        assert!(started.elapsed() < Duration::from_millis(1500));
        let err = dial_any(&[silent_addr], Instant::now() + Duration::from_millis(300)).await;
        assert!(matches!(err, Err(None)), "a silent address times out");
    }
}
