use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hookgate::config::{Config, LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// A webhook forwarding gateway for content-moderation callbacks.
#[derive(Parser)]
#[command(name = "hookgate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const DEFAULT_CONFIG: &str = "config/hookgate.toml";

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    #[command(after_help = SERVE_HELP)]
    Serve {
        /// The gateway's config file (TOML); the rules file is named in it.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the config and the rules, printing every problem found;
    /// exit 1 if there is one.
    Check {
        /// The gateway's config file (TOML); the rules file is named in it.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show which rules match a payload and where it would go, without sending it.
    Route {
        /// The gateway's config file (TOML); the rules file is named in it.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The query string of the callback URL, e.g. 'tenant=acme&filename=a.mp4'.
        #[arg(long)]
        query: Option<String>,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
        /// A webhook body (JSON) as the vendor would send it.
        payload: PathBuf,
    },
    /// Run routing tests (payload + query -> expected destinations).
    Test {
        /// A routing-test file (TOML): each case a payload, a query and the
        /// destinations expected; exit 1 if one fails.
        file: PathBuf,
    },
    /// Print the X-Hub-Signature-256 value of a file.
    Sign {
        /// The environment variable holding the secret.
        #[arg(long)]
        secret_env: String,
        /// The exact bytes to sign (a webhook body).
        payload: PathBuf,
    },
    /// POST a file signed as the vendor would.
    Send {
        /// Where to POST it, e.g. 'http://127.0.0.1:8080/results?tenant=acme'.
        #[arg(long)]
        url: String,
        /// The environment variable holding the secret; unsigned without it.
        #[arg(long)]
        secret_env: Option<String>,
        /// The webhook body to send, byte for byte.
        payload: PathBuf,
    },
    /// A local receiver that prints each webhook and whether its signature verifies.
    Listen {
        /// The port to listen on.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Listen on this address instead of 127.0.0.1.
        #[arg(long, default_value_t = Ipv4Addr::LOCALHOST.into())]
        bind: std::net::IpAddr,
        /// The environment variable holding the secret to verify with.
        #[arg(long)]
        secret_env: Option<String>,
    },
}

/// What `serve --help` adds below the options.
const SERVE_HELP: &str = "\
Environment:
  HOOKGATE_<SECTION>__<KEY>  overrides a config key (a double underscore
                             nests), e.g. HOOKGATE_DELIVERY__TIMEOUT=5s
  RUST_LOG                   a tracing filter; wins over log.level
  the variables the config names: verify.secrets' env, admin.token_env,
  spool.nats.token_env (secrets are never written in the config)

Signals:
  SIGTERM, SIGINT  drain: readiness 503, new webhooks 503, those in flight
                   finish, then exit within shutdown.grace
  SIGHUP           reload the rules now

Exit codes:
  0  stopped cleanly after a signal
  1  could not start (config, rules, secrets, ports, spool), or failed";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config } => Ok(hookgate::tools::check(&config)),
        Command::Route {
            config,
            query,
            json,
            payload,
        } => hookgate::tools::route(&config, query.as_deref(), &payload, json),
        Command::Test { file } => hookgate::tools::test(&file),
        Command::Sign {
            secret_env,
            payload,
        } => hookgate::tools::sign(&secret_env, &payload),
        Command::Send {
            url,
            secret_env,
            payload,
        } => runtime().and_then(|rt| {
            rt.block_on(hookgate::tools::send(&url, secret_env.as_deref(), &payload))
        }),
        Command::Listen {
            port,
            bind,
            secret_env,
        } => runtime().and_then(|rt| {
            rt.block_on(hookgate::tools::listen(
                SocketAddr::new(bind, port),
                secret_env.as_deref(),
            ))
        }),
    };
    result.unwrap_or_else(|e| {
        for line in format!("{e:#}").lines() {
            eprintln!("error: {line}");
        }
        ExitCode::FAILURE
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(config_path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = Config::load(&config_path)?;
    init_logging(&config.log);
    let listeners = hookgate::Listeners {
        webhook: std::net::TcpListener::bind(config.server.listen)
            .map_err(|e| anyhow::anyhow!("server.listen {}: {e}", config.server.listen))?,
        admin: std::net::TcpListener::bind(config.admin.listen)
            .map_err(|e| anyhow::anyhow!("admin.listen {}: {e}", config.admin.listen))?,
    };
    let runtime = runtime()?;
    runtime.block_on(async {
        let grace = config.shutdown.grace;
        let running = hookgate::start(config, listeners).await?;
        signalled().await;
        running.shutdown(grace).await;
        Ok::<_, hookgate::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Returns at SIGTERM or SIGINT (never, if they cannot be listened for).
async fn signalled() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

fn init_logging(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        // Colours only for a person at a terminal, never in a file.
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
