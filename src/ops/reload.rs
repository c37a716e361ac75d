//! Live reload of the rules file, and of the verification secrets.
//!
//! The file is polled by content, not by modification time or inotify:
//! Kubernetes updates a ConfigMap volume by swapping a `..data` symlink
//! (the file's own mtime may not change), editors replace files by rename,
//! and a file may be briefly missing mid-update. A new version is parsed and
//! validated whole, then published as one `Arc<RuleSet>`, so each webhook is
//! routed by exactly one version. A version that fails keeps the running
//! rules in force.
//!
//! A file written in place (truncated, then written) can be read half
//! written, and a prefix cut after a whole rule is a valid file on its own:
//! loading it would leave unrouted every job that only the missing rules
//! route. So a changed file is loaded only once it has settled: read again
//! after [`SETTLE`] with the same content. (Its mtime cannot tell: a
//! ConfigMap swap keeps an old one, and a write within the same tick of the
//! clock keeps the new one.) Renaming a new file into place needs no
//! settling, but costs the same one quiet period.
//!
//! Secrets are re-read on the same schedule: a Kubernetes Secret updated in
//! place (a rotation) takes effect without a restart. A set that cannot be
//! read whole keeps the running secrets.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NamedKey};
use crate::metrics::Metrics;
use crate::rules::{LoadError, RuleSet};
use crate::webhook::verify::Verifier;

/// How long a changed file must stay the same before it is loaded: well
/// above the time an editor or `cat >` takes to write a rules file (under
/// a millisecond for tens of KiB), well below the poll interval.
pub const SETTLE: Duration = Duration::from_millis(250);

/// How long a file may keep changing before this poll gives up on it (the
/// running rules stay; the next poll tries again).
const SETTLE_FOR_AT_MOST: Duration = Duration::from_secs(5);

/// What was last seen at the path, so that an unchanged file (or an
/// unchanged failure) is not reloaded, logged and counted every poll.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Content([u8; 32]),
    Unreadable(String),
}

pub struct Reloader {
    path: PathBuf,
    rules: watch::Sender<Arc<RuleSet>>,
    metrics: Arc<Metrics>,
    /// Also serialises reloads from the poller, SIGHUP and the admin API.
    seen: Mutex<Seen>,
}

/// How a reload went, for the admin API's answer.
#[derive(Debug)]
pub enum Reloaded {
    /// The file's content was unchanged; nothing to do.
    Unchanged,
    Loaded {
        hash: u64,
    },
}

impl Reloader {
    /// Loads the rules for start-up: here a failure is fatal.
    pub fn start(
        path: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, watch::Receiver<Arc<RuleSet>>), LoadError> {
        let bytes = std::fs::read(&path).map_err(|e| LoadError::unreadable(&path, &e))?;
        let rules = RuleSet::from_bytes(&path, &bytes)?;
        let (tx, rx) = watch::channel(Arc::new(rules));
        let reloader = Self {
            path,
            rules: tx,
            metrics,
            seen: Mutex::new(Seen::Content(Sha256::digest(&bytes).into())),
        };
        reloader.succeeded(&reloader.rules.borrow());
        Ok((reloader, rx))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Re-reads the file. With `force` it is parsed even when unchanged
    /// (SIGHUP and `POST /-/reload` mean "do it now").
    pub async fn reload(&self, force: bool) -> Result<Reloaded, LoadError> {
        let mut seen = self.seen.lock().await;
        let (mut now, mut bytes) = self.read().await;
        if !force && now == *seen {
            return Ok(Reloaded::Unchanged);
        }
        let started = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(SETTLE).await;
            let (again, again_bytes) = self.read().await;
            if again == now {
                break;
            }
            if started.elapsed() >= SETTLE_FOR_AT_MOST {
                tracing::warn!(
                    file = %self.path.display(),
                    "the rules file kept changing for {SETTLE_FOR_AT_MOST:?}; the running rules stay, the next poll looks again"
                );
                return Ok(Reloaded::Unchanged);
            }
            (now, bytes) = (again, again_bytes);
        }
        *seen = now;
        let result = bytes
            .map_err(|e| LoadError::unreadable(&self.path, &e))
            .and_then(|bytes| RuleSet::from_bytes(&self.path, &bytes));
        match result {
            Ok(rules) => {
                let hash = rules.hash;
                self.succeeded(&rules);
                tracing::info!(
                    file = %self.path.display(),
                    rules = rules.rules.len(),
                    destinations = rules.destinations.len(),
                    hash,
                    "rules reloaded"
                );
                self.rules.send_replace(Arc::new(rules));
                Ok(Reloaded::Loaded { hash })
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["failure"]).inc();
                self.metrics.last_reload_successful.set(0);
                tracing::error!(file = %self.path.display(), "rules reload failed, the previous rules stay in force: {e}");
                Err(e)
            }
        }
    }

    /// The file's content and what identifies it.
    async fn read(&self) -> (Seen, std::io::Result<Vec<u8>>) {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => (Seen::Content(Sha256::digest(&bytes).into()), Ok(bytes)),
            Err(e) => (Seen::Unreadable(e.to_string()), Err(e)),
        }
    }

    fn succeeded(&self, rules: &RuleSet) {
        self.metrics.track(rules);
        self.metrics.reloads.with_label_values(&["success"]).inc();
        self.metrics.last_reload_successful.set(1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.metrics.last_reload_success_timestamp.set(now);
    }

    /// Polls the file (and the secrets) every `interval` and reloads on
    /// SIGHUP, until `stop`.
    pub async fn watch(
        self: Arc<Self>,
        secrets: Arc<Secrets>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!("cannot listen for SIGHUP, polling only: {e}"))
            .ok();
        // The file was just loaded: the first look is one interval away.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::info!("SIGHUP: reloading rules");
                    true
                }
                () = stop.cancelled() => return,
            };
            // Failures are logged and counted inside.
            let _ = self.reload(force).await;
            secrets.refresh();
        }
    }
}

/// The configured secrets, re-read on each poll; published only when they
/// changed, and only whole.
pub struct Secrets {
    config: Config,
    verifier: watch::Sender<Arc<Verifier>>,
    metrics: Arc<Metrics>,
    fingerprint: std::sync::Mutex<[u8; 32]>,
}

impl Secrets {
    /// Reads the secrets for start-up, where a missing one is fatal; logs
    /// the warnings (short secrets, optional ones skipped).
    pub fn start(
        config: Config,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, watch::Receiver<Arc<Verifier>>), crate::config::ConfigError> {
        let (keys, warnings) = config.secret_keys()?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        let fingerprint = fingerprint(&keys);
        let verifier = Verifier::from_keys(&keys);
        for secret in verifier.secrets() {
            metrics.verified.with_label_values(&[secret.name()]);
        }
        let (tx, rx) = watch::channel(Arc::new(verifier));
        Ok((
            Self {
                config,
                verifier: tx,
                metrics,
                fingerprint: std::sync::Mutex::new(fingerprint),
            },
            rx,
        ))
    }

    /// Re-reads the secrets; publishes them if they changed.
    pub fn refresh(&self) {
        let keys = match self.config.secret_keys() {
            Ok((keys, _)) => keys,
            Err(e) => {
                tracing::error!("secrets not reloaded, the previous ones stay in force: {e}");
                return;
            }
        };
        let now = fingerprint(&keys);
        let mut seen = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return;
        }
        *seen = now;
        let verifier = Verifier::from_keys(&keys);
        let names: Vec<&str> = verifier.secrets().iter().map(|s| s.name()).collect();
        for name in &names {
            self.metrics.verified.with_label_values(&[name]);
        }
        tracing::info!(secrets = ?names, "secrets reloaded");
        self.verifier.send_replace(Arc::new(verifier));
    }
}

/// Identifies a set of named keys without keeping them.
fn fingerprint(keys: &[NamedKey]) -> [u8; 32] {
    let mut h = Sha256::new();
    for (name, key) in keys {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((key.len() as u64).to_le_bytes());
        h.update(key);
    }
    h.finalize().into()
}
