//! hookgate: a webhook forwarding gateway for content-moderation callbacks.
//!
//! # Layout
//!
//! A webhook flows through the parts in one direction; read top to
//! bottom, each uses only those below it:
//!
//! - [`ingress`]: the webhook port. [`ingress::server`] is the thin HTTP
//!   layer (warp on hyper; limits, timeouts, one single-threaded runtime
//!   per core); [`ingress::pipeline`] takes one webhook through verify,
//!   parse, route, then onward: queued (durable) or forwarded (direct).
//! - [`ops`]: the operator's port ([`ops::admin`]: metrics, health,
//!   reload, the dead-letter API) and the live rules ([`ops::reload`]).
//! - [`tools`]: the operator commands (`check`, `route`, `test`, `sign`,
//!   `send`, `listen`).
//! - [`delivery`]: getting a job to a destination. [`delivery::lanes`]
//!   drain the queue, one lane per destination, with the rules in force at
//!   each attempt; [`delivery::origins`] isolates a destination's hosts;
//!   [`delivery::schedule`] and [`delivery::backoff`] decide when to retry
//!   and when to give up (pure); [`delivery::follow`] says what a stored
//!   delivery is under the rules in force (pure, for both engines and the
//!   ingress); [`delivery::attempt`] makes and classifies
//!   one attempt with [`delivery::client`] (hyper under a per-origin pool).
//! - [`queue`]: what was accepted and is not yet delivered: the types both
//!   backends store ([`queue::Record`], [`queue::StoredJob`], ...), one
//!   interface ([`queue::Queue`]) and two backends: [`queue::embedded`],
//!   the crash-safe spool of one process (redb, group commit), delivered
//!   by [`delivery::lanes`]; and [`queue::nats`], NATS JetStream shared by
//!   every replica, delivered by [`delivery::pull`].
//! - [`metrics`]: the Prometheus registry everything above reports to;
//!   [`throttle`]: rate-limited log lines for warnings that come in bursts.
//! - [`rules`]: pure routing, a job and its query in, a
//!   [`rules::Decision`] out; also reads and checks `rules.toml`, with each
//!   destination's [`transport`] (HTTP/2, its own TLS files).
//! - [`webhook`]: what arrived, pure: [`webhook::verify`] checks the HMAC
//!   over the raw bytes and makes the [`webhook::verify::Verified`] body
//!   everything after it requires; [`webhook::job`] parses the moderation
//!   result from it without copying; [`webhook::query`] holds the
//!   customer's callback query parameters.
//! - [`config`]: the gateway file (defaults ← TOML ← `HOOKGATE_` env), typed
//!   and checked once; [`suggest`]: "did you mean" for misspelt names;
//!   [`wording`]: a mistake in either file in the same plain words.
//!
//! [`start`] wires them together and returns the [`Running`] gateway,
//! whose [`Running::shutdown`] drains it; `main.rs` only parses the command
//! line and waits for the signal.

pub mod config;
pub mod delivery;
pub mod ingress;
pub mod metrics;
pub mod ops;
pub mod queue;
pub mod rules;
pub mod suggest;
pub mod throttle;
pub mod tools;
pub mod transport;
pub mod webhook;
pub mod wording;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, Mode};
use crate::delivery::attempt::Attempts;
use crate::delivery::client::ClientError;
use crate::delivery::lanes::Lanes;
use crate::ingress::pipeline::Onward;
use crate::ingress::pipeline::Pipeline;
use crate::metrics::Metrics;
use crate::ops::admin::AdminState;
use crate::ops::reload::{Reloader, Secrets};
use crate::queue::embedded::{OpenError, Spool};
use crate::rules::LoadError;

/// The two ports, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub webhook: std::net::TcpListener,
    pub admin: std::net::TcpListener,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Rules(#[from] LoadError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Spool(#[from] OpenError),
    #[error(transparent)]
    Nats(#[from] queue::nats::NatsError),
    #[error("cannot use the listening socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// Runs the gateway until `shutdown` is cancelled, then drains within
/// `shutdown.grace` (see [`Running::shutdown`]).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let grace = config.shutdown.grace;
    let running = start(config, listeners).await?;
    shutdown.cancelled().await;
    running.shutdown(grace).await;
    Ok(())
}

/// A gateway that serves: both ports, the delivery of what it accepted,
/// the rules and secrets reloaded. [`Running::shutdown`] stops it.
pub struct Running {
    webhook: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    /// Turns readiness 503 and refuses new webhooks.
    draining: CancellationToken,
    /// Webhooks being received or answered.
    in_flight: TaskTracker,
    /// The embedded spool's delivery lanes, or the JetStream workers.
    lanes: Option<Arc<Lanes>>,
    nats: Option<Arc<delivery::pull::Workers>>,
    /// Stops the servers and the reloader.
    stop: CancellationToken,
    servers: [tokio::task::JoinHandle<()>; 2],
    /// What closing open connections may take once nothing is in flight.
    close_grace: std::time::Duration,
}

impl Running {
    /// Where webhooks are taken.
    pub fn webhook_addr(&self) -> std::net::SocketAddr {
        self.webhook
    }

    /// The admin port.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        self.admin
    }

    /// Drains, as the kubelet's SIGTERM asks: readiness turns 503, new
    /// webhooks get 503, webhooks in flight finish, deliveries in flight
    /// finish or stay queued, all within `grace`; then the ports close.
    pub async fn shutdown(self, grace: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        tracing::info!(grace = ?grace, "shutting down: refusing new webhooks, finishing those in flight");
        self.draining.cancel();
        self.in_flight.close();
        if tokio::time::timeout_at(deadline, self.in_flight.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "webhooks still in flight after the grace period: their senders will retry"
            );
        }
        let left = || {
            deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .saturating_sub(self.close_grace)
        };
        if let Some(lanes) = &self.lanes {
            // Deliveries not finished by then stay pending in the spool.
            lanes.shutdown(left()).await;
        }
        if let Some(workers) = &self.nats {
            // Messages not acknowledged by then are handed out again.
            workers.shutdown(left()).await;
        }
        self.stop.cancel();
        let [webhook, admin] = self.servers;
        let _ = tokio::join!(webhook, admin);
        tracing::info!("stopped");
    }
}

/// Starts the gateway on `listeners`: everything is serving when this
/// returns.
pub async fn start(config: Config, listeners: Listeners) -> Result<Running, Error> {
    let admin_token = config.admin_token()?;
    let metrics = Arc::new(Metrics::new(&config.metrics.categories));
    let (secrets, verifier) = Secrets::start(config.clone(), metrics.clone())?;
    if verifier.borrow().secrets().is_empty() {
        tracing::warn!(
            "verify.required = false and no secrets: webhooks are accepted without any signature check"
        );
    }
    let (reloader, rules_rx) = Reloader::start(config.rules_path(), metrics.clone())?;
    let reloader = Arc::new(reloader);
    {
        let rules = rules_rx.borrow();
        tracing::info!(
            rules = rules.rules.len(),
            destinations = rules.destinations.len(),
            file = %reloader.path().display(),
            "rules loaded"
        );
    }

    listeners.webhook.set_nonblocking(true)?;
    listeners.admin.set_nonblocking(true)?;
    let webhook_listener = tokio::net::TcpListener::from_std(listeners.webhook)?;
    let admin_listener = tokio::net::TcpListener::from_std(listeners.admin)?;

    let draining = CancellationToken::new();
    let in_flight = TaskTracker::new();
    let attempts = Attempts::new(&config.delivery, metrics.clone())?;
    let mut nats_workers = None;
    let (onward, lanes) = match config.delivery.mode {
        Mode::Direct => (
            Onward::Direct {
                attempts: Box::new(attempts),
                deadline: config.delivery.direct_deadline,
            },
            None,
        ),
        Mode::Durable if config.spool.backend == config::Backend::Nats => {
            let workers = start_nats(&config, attempts, metrics.clone(), rules_rx.clone()).await?;
            nats_workers = Some(workers.clone());
            (Onward::Durable(workers), None)
        }
        Mode::Durable => {
            let lanes = open_spool(&config, attempts, metrics.clone(), rules_rx.clone())?;
            (Onward::Durable(Arc::new(lanes.clone())), Some(lanes))
        }
    };
    let queue = match &onward {
        Onward::Durable(queue) => Some(queue.clone()),
        Onward::Direct { .. } => None,
    };
    let gateway = Pipeline::new(
        verifier,
        rules_rx,
        onward,
        metrics.clone(),
        draining.clone(),
    );

    let (webhook, admin) = (webhook_listener.local_addr()?, admin_listener.local_addr()?);
    tracing::info!(
        %webhook,
        %admin,
        path = %config.server.path,
        mode = ?config.delivery.mode,
        "hookgate listening"
    );

    let stop = CancellationToken::new();
    // Once the webhooks in flight are done, open connections only need a
    // moment to be told to close.
    let close_grace = std::time::Duration::from_secs(1);
    let mut gateways = Vec::new();
    for _ in 1..config.server.workers() {
        gateways.push(gateway.fork());
    }
    gateways.push(gateway);
    let webhook_workers = ingress::server::Workers::start(
        "hookgate-web",
        gateways
            .into_iter()
            .map(|gateway| {
                ingress::server::webhook_routes(
                    Arc::new(gateway),
                    in_flight.clone(),
                    &config.server.path,
                    config.server.max_body_bytes.0,
                    config.server.body_read_timeout,
                )
            })
            .collect(),
        config.server.header_read_timeout,
        close_grace,
    );
    let webhook_workers = match webhook_workers {
        Ok(workers) => workers,
        Err(e) => return Err(abandon(lanes, e).await),
    };
    let admin_workers = ingress::server::Workers::start(
        "hookgate-admin",
        vec![ops::admin::routes(Arc::new(AdminState {
            metrics,
            draining: draining.clone(),
            reloader: reloader.clone(),
            queue: queue.clone(),
            token: admin_token,
        }))],
        config.server.header_read_timeout,
        close_grace,
    );
    let admin_workers = match admin_workers {
        Ok(workers) => workers,
        Err(e) => return Err(abandon(lanes, e).await),
    };
    let webhook_server = tokio::spawn(ingress::server::serve(
        webhook_listener,
        webhook_workers,
        config.server.max_connections,
        stop.clone(),
    ));
    let admin_server = tokio::spawn(ingress::server::serve(
        admin_listener,
        admin_workers,
        config.server.max_connections,
        stop.clone(),
    ));

    tokio::spawn(reloader.watch(
        Arc::new(secrets),
        config.rules.reload_interval,
        stop.clone(),
    ));

    Ok(Running {
        webhook,
        admin,
        draining,
        in_flight,
        lanes,
        nats: nats_workers,
        stop,
        servers: [webhook_server, admin_server],
        close_grace,
    })
}

/// A server thread could not start after the spool was opened: the
/// delivery thread is stopped and the spool closed before giving up.
async fn abandon(lanes: Option<Arc<Lanes>>, e: std::io::Error) -> Error {
    if let Some(lanes) = lanes {
        lanes.shutdown(std::time::Duration::ZERO).await;
    }
    Error::Thread(e)
}

/// Connects to JetStream (creating or updating what it needs there) and
/// starts a delivery worker for each destination of the rules, and for
/// each one a reload adds.
async fn start_nats(
    config: &Config,
    attempts: Attempts,
    metrics: Arc<Metrics>,
    rules: tokio::sync::watch::Receiver<Arc<rules::RuleSet>>,
) -> Result<Arc<delivery::pull::Workers>, Error> {
    let nats = &config.spool.nats;
    let queue = Arc::new(
        queue::nats::NatsQueue::connect(nats, config.spool.max_bytes.0, config.dedupe.window)
            .await?,
    );
    tracing::info!(servers = ?nats.servers, prefix = %nats.prefix, replicas = nats.replicas, "JetStream streams ready");
    let workers = Arc::new(delivery::pull::Workers::new(
        queue.clone(),
        rules.clone(),
        Arc::new(attempts),
        metrics,
        config.delivery.max_age,
    ));
    tokio::spawn(workers.clone().report());
    workers.clone().follow().await?;
    Ok(workers)
}

/// Opens the spool and resumes what it holds.
fn open_spool(
    config: &Config,
    attempts: Attempts,
    metrics: Arc<Metrics>,
    rules: tokio::sync::watch::Receiver<Arc<rules::RuleSet>>,
) -> Result<Arc<Lanes>, Error> {
    let (spool, recovered) = Spool::open(
        &config.spool.path,
        config.spool.max_bytes.0,
        config.dedupe.window,
    )?;
    if let Some(aside) = &recovered.moved_aside {
        tracing::error!(
            spool = %config.spool.path.display(),
            moved_to = %aside.path.display(),
            bytes = aside.bytes,
            reason = %aside.reason,
            "THE SPOOL FILE WAS DAMAGED: it was moved aside and an empty spool started; \
             the webhooks it held are not delivered from it (inspect or restore it by hand)"
        );
    }
    if recovered.repaired {
        tracing::error!(
            spool = %config.spool.path.display(),
            "the spool file failed its integrity check and was rolled back to its last intact \
             commit: webhooks accepted in the commit that was damaged may be lost"
        );
    }
    for q in &recovered.quarantined {
        tracing::error!(
            table = %q.table,
            key = q.key,
            bytes = q.bytes,
            "a spool record could not be decoded: it was quarantined (GET /admin/quarantine)"
        );
    }
    if recovered.migrated > 0 {
        tracing::info!(
            records = recovered.migrated,
            "spool records migrated to the current format: deliveries now take their \
             destination's URL and headers from the rules at each attempt"
        );
    }
    tracing::info!(
        pending = recovered.pending.len()
            + recovered.on_disk.values().map(|d| d.count).sum::<usize>(),
        dead_letters = recovered.dead_by_destination.values().sum::<i64>(),
        bytes = spool.bytes(),
        path = %config.spool.path.display(),
        "spool opened"
    );
    let lanes = Lanes::new(
        Arc::new(spool),
        Arc::new(attempts),
        metrics,
        rules,
        delivery::lanes::Limits {
            max_age: config.delivery.max_age,
            stalled_after: config.delivery.stalled_after,
        },
    )
    .map_err(Error::Thread)?;
    lanes.resume(recovered);
    Ok(lanes)
}
