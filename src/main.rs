//! `ringcastd`: flags, config, tracing, then run the broker until a signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use std::time::Duration;

use ringcast::broker::Broker;
use ringcast::config::{Config, Durability, LogFormat, DEFAULT_CONFIG_TOML};
use ringcast::systemd;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Turns transparent huge pages off for this process (not system-wide).
/// With THP `always`, every page mimalloc gives back and touches again
/// faulted in and zeroed a whole 2 MiB page: 18% of the writer thread's
/// time at 128 B publishes, and more RSS (BENCHMARKS.md).
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag
    // on this process's memory map; no pointer is passed.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// mimalloc instead of glibc's malloc: events are allocated on the
/// connection tasks and freed on the writer thread or when trimmed, a
/// pattern where glibc spent ~17% of the publish path's CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The ringcast broker daemon.
#[derive(Debug, Parser)]
#[command(name = "ringcastd", version, about)]
struct Args {
    /// TOML config file (every key is optional; see config/ringcast.toml).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Overrides storage.data_dir.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides server.tcp_listen.
    #[arg(long, value_name = "ADDR")]
    tcp_listen: Option<SocketAddr>,
    /// Overrides server.http_listen.
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    /// Overrides storage.durability: fsync, interval or memory.
    #[arg(long)]
    durability: Option<Durability>,
    /// Prints the default config (every key, documented) and exits.
    #[arg(long)]
    print_config: bool,
    /// Validates the config and exits.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // --help and --version are not failures; real errors get one line.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.render().to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("bad arguments");
            eprintln!("ringcastd: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return ExitCode::SUCCESS;
    }
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringcastd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    init_tracing(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringcastd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ringcastd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(d) = &args.data_dir {
        config.storage.data_dir = d.clone();
    }
    if let Some(a) = args.tcp_listen {
        config.server.tcp_listen = a;
    }
    if let Some(a) = args.http_listen {
        config.server.http_listen = a;
    }
    if let Some(d) = args.durability {
        config.storage.durability = d;
    }
    config.validate()?;
    // Refused here, before logging starts, so the reason is the one line on
    // stderr; and `--check-config` catches it too, with unreadable key files.
    ringcast::auth::Auth::check_exposure(
        &config.auth,
        &[
            ("server.tcp_listen", config.server.tcp_listen),
            ("server.http_listen", config.server.http_listen),
        ],
    )?;
    ringcast::auth::Auth::new(&config.auth)?;
    Ok(config)
}

fn init_tracing(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    // Under systemd the journal stamps every line; don't stamp it twice.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match (config.log.format, journald) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Pretty, true) => builder.without_time().with_ansi(false).init(),
        (LogFormat::Pretty, false) => builder.init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM during startup must still stop gracefully.
    let mut signals = Signals::new()?;
    systemd::status("recovering storage");
    let broker = Broker::start(config.clone()).await?;
    let stats = broker.engine().stats();
    if config.cluster.backend == ringcast::config::Backend::Redis {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            tcp = %broker.tcp_addr(),
            http = %broker.http_addr(),
            backend = "redis",
            redis = %config.cluster.redis_url,
            node = %config.cluster.node_id,
            topics = stats.topics,
            events = stats.retained_events,
            "ringcastd started"
        );
    } else {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            tcp = %broker.tcp_addr(),
            http = %broker.http_addr(),
            data_dir = %config.storage.data_dir.display(),
            durability = %config.storage.durability,
            topics = stats.topics,
            events = broker.engine().recovered_events(),
            "ringcastd started"
        );
    }
    systemd::ready(&format!(
        "serving tcp={} http={} topics={} events={}",
        broker.tcp_addr(),
        broker.http_addr(),
        stats.topics,
        broker.engine().recovered_events()
    ));
    let watchdog = CancellationToken::new();
    systemd::spawn_watchdog(watchdog.clone());

    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => match broker.reload_auth() {
                Ok(()) => {
                    tracing::info!("SIGHUP: JWT keys reloaded");
                    systemd::status("JWT keys reloaded");
                }
                Err(e) => tracing::error!("SIGHUP: keeping the JWT keys in use: {e:#}"),
            },
        }
    }
    tracing::info!("shutting down");
    systemd::stopping();
    let timeout = config.server.shutdown_timeout;
    tokio::select! {
        r = tokio::time::timeout(timeout + Duration::from_secs(5), broker.shutdown()) => match r {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("shutdown did not finish within shutdown_timeout"),
        },
        _ = signals.next_stop() => {
            // sled is crash-safe: leaving now is like a kill, minus nothing
            // that fsync mode acknowledged.
            tracing::warn!("second signal: exiting at once");
            std::process::exit(130);
        }
    }
    watchdog.cancel();
    tracing::info!("storage flushed; bye");
    Ok(())
}

/// What a signal asks for.
#[derive(Debug, PartialEq, Eq)]
enum Signal {
    /// SIGTERM or SIGINT: shut down.
    Stop,
    /// SIGHUP: re-read the JWT key files.
    Reload,
}

/// SIGTERM, SIGINT and SIGHUP as one stream.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }

    /// The next stop signal; reloads asked for meanwhile are ignored.
    async fn next_stop(&mut self) {
        while self.next().await != Signal::Stop {}
    }
}
