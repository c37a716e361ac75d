//! The gateway's configuration: built-in defaults ← TOML file ← `HOOKGATE_`
//! environment (`__` nests: `HOOKGATE_DELIVERY__MODE=direct`).
//!
//! Parsed and checked once into typed values before any port is bound.
//! Secrets are never in this file: it names where they are (an environment
//! variable or a file), and [`Config::secret_keys`] reads them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Deserializer};

/// A secret's name and its bytes.
pub type NamedKey = (String, Vec<u8>);

/// A secret shorter than this still works, with a warning: the vendor
/// issues the secret, so refusing it would only block the integration.
pub const SHORT_SECRET: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub verify: VerifyConfig,
    pub rules: RulesConfig,
    pub delivery: DeliveryConfig,
    pub spool: SpoolConfig,
    pub dedupe: DedupeConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// Where the file was read from: relative paths in it resolve against
    /// its directory.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub path: String,
    pub max_body_bytes: ByteSize,
    /// A client must send its request headers within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// ... and its whole body within this time.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Open connections beyond this wait in the listen backlog.
    pub max_connections: usize,
    /// Threads serving webhook connections; 0 means one per CPU the
    /// process may use (its cgroup quota included).
    pub workers: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The environment variable holding the bearer token for admin POSTs.
    pub token_env: Option<String>,
    /// ... or a file holding it (a mounted Secret), relative to this file.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifyConfig {
    pub secrets: Vec<SecretSource>,
    pub required: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub name: String,
    pub env: Option<String>,
    pub file: Option<PathBuf>,
    /// An optional secret that is absent (or empty) is skipped with a
    /// warning: the `previous` slot of a rotation, which is empty between
    /// rotations.
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    pub file: PathBuf,
    /// How often the file's content is checked for a change.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Durable,
    Direct,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    pub mode: Mode,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Setting up a connection (all addresses, TCP), within `timeout`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A kept-alive connection older than this is not reused, so that a
    /// destination's DNS changes reach a busy pool.
    #[serde(with = "humantime_serde")]
    pub connection_lifetime: Duration,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    pub concurrency: usize,
    /// Direct mode: how long one webhook request may spend on all its
    /// attempts before the sender is told to retry (502/504).
    #[serde(with = "humantime_serde")]
    pub direct_deadline: Duration,
    /// Durable mode: a destination with deliveries waiting and no success
    /// for this long is reported at WARN, once, until one goes through.
    #[serde(with = "humantime_serde")]
    pub stalled_after: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Where accepted webhooks wait: the embedded spool, or NATS JetStream.
    pub backend: Backend,
    pub path: PathBuf,
    pub max_bytes: ByteSize,
    pub nats: NatsConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// redb under `spool.path`: one pod's own queue.
    Embedded,
    /// Streams in a NATS JetStream cluster, shared by every replica.
    Nats,
}

/// `spool.nats`: how to reach JetStream. Credentials are named, never
/// written here.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://` or `tls://` URLs of the cluster's servers (default: one
    /// on this host).
    pub servers: Vec<String>,
    pub creds_file: Option<PathBuf>,
    pub nkey_file: Option<PathBuf>,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    pub tls: Option<NatsTls>,
    /// Names the streams, subjects and consumers, so that several
    /// deployments can share one NATS.
    pub prefix: String,
    /// 1, or 3 for a stream replicated over a Raft quorum.
    pub replicas: usize,
    /// How long NATS may be unreachable before readiness turns 503.
    #[serde(with = "humantime_serde")]
    pub unavailable_after: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            creds_file: None,
            nkey_file: None,
            token_env: None,
            token_file: None,
            tls: None,
            prefix: "hookgate".into(),
            replicas: 1,
            unavailable_after: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupeConfig {
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, text when it is.
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter; `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Category names that get their own `category` label value, on top of
    /// the built-in ones; any other name is counted as `other`.
    pub categories: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            admin: AdminConfig::default(),
            verify: VerifyConfig::default(),
            rules: RulesConfig::default(),
            delivery: DeliveryConfig::default(),
            spool: SpoolConfig::default(),
            dedupe: DedupeConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            source: PathBuf::new(),
        }
    }
}

impl ServerConfig {
    /// The number of webhook server threads.
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            path: "/results".into(),
            max_body_bytes: ByteSize(1 << 20),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            workers: 0,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            token_env: None,
            token_file: None,
        }
    }
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            secrets: Vec::new(),
            required: true,
        }
    }
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            file: "rules.toml".into(),
            reload_interval: Duration::from_secs(2),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Durable,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            connection_lifetime: Duration::from_secs(300),
            max_attempts: 50,
            max_age: Duration::from_secs(72 * 3600),
            stalled_after: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(3600),
            concurrency: 64,
            direct_deadline: Duration::from_secs(25),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            path: "data/spool".into(),
            max_bytes: ByteSize(1 << 30),
            nats: NatsConfig::default(),
        }
    }
}

impl Default for DedupeConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(24 * 3600),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(20),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

/// A configuration problem, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    /// Every problem found, each `file:line: what` (or the environment
    /// variable's name), one per line.
    #[error("{}", .0.join("\n"))]
    Problems(Vec<String>),
    #[error("{path}: verify.secrets[{index}] ({name:?}): {message}")]
    Secret {
        path: String,
        index: usize,
        name: String,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        };
        if !path.is_file() {
            return Err(invalid(
                "the config file does not exist or is not a file".into(),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        let mut config = extract(path, &text)?;
        config.source = path.to_owned();
        let problems = config.validate();
        if !problems.is_empty() {
            let file = path.display();
            // Each message starts with the key it is about.
            let at = |problem: &str| {
                let key: Vec<String> = problem
                    .split([' ', ':', '['])
                    .next()
                    .unwrap_or_default()
                    .split('.')
                    .map(str::to_owned)
                    .collect();
                match line_of_key(&text, &key) {
                    0 => format!("{file}: {problem}"),
                    line => format!("{file}:{line}: {problem}"),
                }
            };
            return Err(ConfigError::Problems(
                problems.iter().map(|p| at(p)).collect(),
            ));
        }
        Ok(config)
    }

    /// Every problem of a config that parsed.
    fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let d = &self.delivery;
        let checks: &[(bool, &str)] = &[
            (
                self.server.path.starts_with('/'),
                "server.path must start with /",
            ),
            (
                self.server.max_body_bytes.0 > 0,
                "server.max_body_bytes must be more than 0",
            ),
            (
                self.server.max_connections > 0,
                "server.max_connections must be at least 1",
            ),
            (
                !d.timeout.is_zero(),
                "delivery.timeout must be more than 0s",
            ),
            (
                d.max_attempts > 0,
                "delivery.max_attempts must be at least 1",
            ),
            (d.concurrency > 0, "delivery.concurrency must be at least 1"),
            (
                !d.backoff_initial.is_zero() && d.backoff_initial <= d.backoff_max,
                "delivery.backoff_initial must be more than 0s and at most delivery.backoff_max",
            ),
            (
                !d.direct_deadline.is_zero(),
                "delivery.direct_deadline must be more than 0s",
            ),
            (
                !d.connect_timeout.is_zero() && !d.connection_lifetime.is_zero(),
                "delivery.connect_timeout and delivery.connection_lifetime must be more than 0s",
            ),
            (
                self.spool.backend == Backend::Embedded || !self.spool.nats.servers.is_empty(),
                "spool.backend = \"nats\" needs spool.nats.servers",
            ),
            (
                matches!(self.spool.nats.replicas, 1 | 3),
                "spool.nats.replicas is 1 or 3",
            ),
            (
                !self.spool.nats.prefix.is_empty()
                    && self.spool.nats.prefix.len() <= 32
                    && self
                        .spool
                        .nats
                        .prefix
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')),
                "spool.nats.prefix is 1 to 32 of [A-Za-z0-9_-] (it names streams and subjects)",
            ),
            (
                [
                    self.spool.nats.creds_file.is_some(),
                    self.spool.nats.nkey_file.is_some(),
                    self.spool.nats.token_env.is_some() || self.spool.nats.token_file.is_some(),
                ]
                .iter()
                .filter(|set| **set)
                .count()
                    <= 1,
                "spool.nats: one of creds_file, nkey_file, or token_env / token_file",
            ),
            (
                !d.stalled_after.is_zero(),
                "delivery.stalled_after must be more than 0s",
            ),
            (
                self.server.listen != self.admin.listen,
                "server.listen and admin.listen must differ",
            ),
            (
                !self.rules.reload_interval.is_zero(),
                "rules.reload_interval must be more than 0s",
            ),
        ];
        problems.extend(
            checks
                .iter()
                .filter(|(ok, _)| !ok)
                .map(|(_, m)| (*m).to_owned()),
        );
        for (i, s) in self.verify.secrets.iter().enumerate() {
            if s.env.is_some() == s.file.is_some() {
                problems.push(format!(
                    "verify.secrets[{i}] ({:?}) must have exactly one of `env` or `file`",
                    s.name
                ));
            }
            if self.verify.secrets[..i].iter().any(|o| o.name == s.name) {
                problems.push(format!(
                    "verify.secrets[{i}]: the name {:?} is used twice",
                    s.name
                ));
            }
        }
        problems
    }

    /// The rules file, relative to the config file's directory.
    pub fn rules_path(&self) -> PathBuf {
        self.relative(&self.rules.file)
    }

    /// The rules file that the config at `path` names, read leniently from
    /// a config that does not load (`HOOKGATE_RULES__FILE`, else the file's
    /// `rules.file` if it is text, else the default), so that `check` can
    /// report the rules' problems beside the config's.
    pub fn rules_path_in(path: &Path) -> PathBuf {
        let named = std::env::var("HOOKGATE_RULES__FILE").ok().or_else(|| {
            let doc: toml::Table = std::fs::read_to_string(path).ok()?.parse().ok()?;
            doc.get("rules")?.get("file")?.as_str().map(str::to_owned)
        });
        let file = named.map_or_else(|| RulesConfig::default().file, PathBuf::from);
        path.parent().unwrap_or(Path::new("")).join(file)
    }

    /// Reads every configured secret. An absent or empty one is an error:
    /// starting with fewer secrets than configured would reject real traffic.
    /// Returns the named keys and warnings (short secrets, optional ones
    /// skipped).
    pub fn secret_keys(&self) -> Result<(Vec<NamedKey>, Vec<String>), ConfigError> {
        let mut secrets = Vec::new();
        let mut warnings = Vec::new();
        for (index, source) in self.verify.secrets.iter().enumerate() {
            let fail = |message: String| ConfigError::Secret {
                path: self.source.display().to_string(),
                index,
                name: source.name.clone(),
                message,
            };
            let key = match (&source.env, &source.file) {
                (Some(var), _) => std::env::var_os(var)
                    .ok_or_else(|| format!("the environment variable {var} is not set"))
                    .map(|v| v.into_encoded_bytes()),
                (None, Some(file)) => {
                    let path = self.relative(file);
                    std::fs::read(&path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))
                        .map(|mut bytes| {
                            // Secret files written by editors or `echo` end in a
                            // newline the sender does not use.
                            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                                bytes.pop();
                            }
                            bytes
                        })
                }
                (None, None) => Err("no `env` or `file`".to_owned()),
            };
            let key = key.and_then(|k| {
                if k.is_empty() {
                    Err("the secret is empty".to_owned())
                } else {
                    Ok(k)
                }
            });
            let key = match key {
                Ok(key) => key,
                Err(message) if source.optional => {
                    warnings.push(format!(
                        "optional secret {:?} skipped: {message}",
                        source.name
                    ));
                    continue;
                }
                Err(message) => return Err(fail(message)),
            };
            if key.len() < SHORT_SECRET {
                warnings.push(format!(
                    "secret {:?} is {} bytes; the vendor's secrets are normally at least {SHORT_SECRET}",
                    source.name,
                    key.len()
                ));
            }
            secrets.push((source.name.clone(), key));
        }
        if secrets.is_empty() && self.verify.required {
            return Err(ConfigError::Invalid {
                path: self.source.display().to_string(),
                message: "no verify.secrets configured: refusing to accept unsigned webhooks (set verify.required = false to run without verification)".into(),
            });
        }
        Ok((secrets, warnings))
    }

    /// The admin bearer token, if one is configured.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: self.source.display().to_string(),
            message,
        };
        let token = match (&self.admin.token_env, &self.admin.token_file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "admin.token_env and admin.token_file exclude each other".into(),
                ));
            }
            (Some(var), None) => std::env::var(var)
                .map_err(|_| invalid(format!("admin.token_env names {var}, which is not set")))?,
            (None, Some(file)) => {
                let path = self.relative(file);
                std::fs::read_to_string(&path)
                    .map_err(|e| {
                        invalid(format!(
                            "admin.token_file: cannot read {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned()
            }
        };
        if token.is_empty() {
            return Err(invalid("the admin token is empty".into()));
        }
        Ok(Some(token))
    }

    /// A path from the config file, relative to the file's directory.
    fn relative(&self, path: &Path) -> PathBuf {
        self.source.parent().unwrap_or(Path::new("")).join(path)
    }
}

/// figment's messages can span lines; the CLI prints one.
/// The config from the file's `text` and the `HOOKGATE_` variables, or
/// every problem: a key the file may not hold is reported, taken out, and
/// the rest read again, so one run names them all (a variable's problem
/// ends the search: it cannot be taken out of the file).
fn extract(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let file = path.display();
    let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map_or(0, |s| line_of_offset(text, s.start));
        let message = e.message().lines().collect::<Vec<_>>().join("; ");
        ConfigError::Problems(vec![format!("{file}:{line}: {message}")])
    })?;
    let mut problems = Vec::new();
    loop {
        let source = toml::to_string(&doc).unwrap_or_default();
        let extracted = Figment::new()
            .merge(Toml::string(&source))
            .merge(
                Env::prefixed("HOOKGATE_")
                    .filter(|key| key.as_str().contains("__"))
                    .split("__"),
            )
            .extract::<Config>();
        let e = match extracted {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(_) => return Err(ConfigError::Problems(problems)),
            Err(e) => e,
        };
        let key: Vec<String> = e.path.iter().map(|k| k.to_lowercase()).collect();
        let from_env = e
            .metadata
            .as_ref()
            .is_some_and(|m| m.name.contains("environment"));
        let at = if from_env {
            format!("HOOKGATE_{}", key.join("__").to_uppercase())
        } else {
            format!("{file}:{}", line_of_key(text, &key))
        };
        problems.push(format!("{at}: {}", describe(&e.kind, &key)));
        if from_env || problems.len() >= 20 || !remove(&mut doc, &key) {
            return Err(ConfigError::Problems(problems));
        }
    }
}

/// What is wrong with `key`, in an operator's words.
fn describe(kind: &figment::error::Kind, key: &[String]) -> String {
    use figment::error::Kind;
    let dotted = key.join(".");
    match kind {
        Kind::UnknownField(field, expected) => format!(
            "unknown key {dotted}{}",
            crate::suggest::hint(&field.to_lowercase(), expected.iter().copied())
        ),
        Kind::UnknownVariant(value, expected) => format!(
            "{dotted}: {value:?} is not one of {}{}",
            expected.join(", "),
            crate::suggest::hint(value, expected.iter().copied())
        ),
        Kind::InvalidType(actual, expected) if expected.contains("duration") => {
            format!(
                "{dotted}: found {}, expected a duration (write a unit: \"5s\", \"250ms\", \"2m\")",
                crate::wording::found(&actual.to_string())
            )
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!(
                "{dotted}: {}",
                crate::wording::wrong_type(&actual.to_string(), expected)
            )
        }
        other => format!("{dotted}: {other}"),
    }
}

/// Takes `key` out of the document (to look for more problems).
fn remove(doc: &mut toml::Table, key: &[String]) -> bool {
    let Some((last, parents)) = key.split_last() else {
        return false;
    };
    let mut table = doc;
    for k in parents {
        match table.get_mut(k) {
            Some(toml::Value::Table(t)) => table = t,
            _ => return false,
        }
    }
    table.remove(last).is_some()
}

/// The line (from 1) where `key` is set in the TOML `text`: under its
/// table's header (`[a.b]` then `c =`), or written out whole (`a.b.c =`,
/// or inside an inline table); 0 if not found.
fn line_of_key(text: &str, key: &[String]) -> usize {
    let Some((last, parents)) = key.split_last() else {
        return 0;
    };
    let header = parents.join(".");
    let mut table = String::new();
    let mut fallback = 0;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.split(']').next()) {
            table = name.trim().trim_start_matches('[').to_owned();
            continue;
        }
        let Some((left, _)) = trimmed.split_once('=') else {
            continue;
        };
        let left = left.trim();
        let full = if table.is_empty() {
            left.to_owned()
        } else {
            format!("{table}.{left}")
        };
        if full == key.join(".") || (table == header && left == last) {
            return i + 1;
        }
        if fallback == 0
            && line.contains(last.as_str())
            && (parents.is_empty() || line.contains(&header) || table.starts_with(&header))
        {
            fallback = i + 1;
        }
    }
    fallback
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A size such as `1048576`, `"512KiB"`, `"10MB"` or `"1GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as \"64MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit {other:?}; use B, KB, KiB, MB, MiB, GB or GiB"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let cases = [
            ("1024", Ok(1024)),
            ("64KiB", Ok(65536)),
            ("10MB", Ok(10_000_000)),
            ("1GiB", Ok(1 << 30)),
            ("1 GiB", Ok(1 << 30)),
            ("1TB", Err(())),
            ("GiB", Err(())),
        ];
        for (text, want) in cases {
            assert_eq!(
                ByteSize::parse(text).map(|b| b.0).map_err(|_| ()),
                want,
                "{text}"
            );
        }
    }
}
