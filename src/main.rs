//! The `tandem` binary: parses arguments, sets up logging, loads the config,
//! binds the listeners and calls [`tandem::run`].

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tandem::config::{self, Config, LogFormat};
use tandem::{Listeners, cli};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Keeps the caches of load-balanced web servers in step"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file (default: /etc/tandem/tandem.toml if it exists, else built-in defaults).
    #[arg(long, short, env = "TANDEM_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run(ConfigArg),
    /// Apply the database schema migrations and exit.
    Migrate(ConfigArg),
    /// Check the config; names the bad key and why.
    CheckConfig(ConfigArg),
    /// Show every host of the cluster (asks the local daemon).
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the scheduled jobs (asks the local daemon); `jobs run NAME`
    /// runs one now, once cluster-wide.
    Jobs {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<JobsAction>,
    },
    /// List this host's search indexes; `search rebuild NAME` rebuilds one
    /// from the local cache directory.
    Search {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<SearchAction>,
    },
    /// Ask this host (or --host ID) to rebuild its cache from the database.
    Resync {
        #[command(flatten)]
        config: ConfigArg,
        /// Another host's id (asked through the database).
        #[arg(long)]
        host: Option<String>,
    },
}

#[derive(Subcommand)]
enum SearchAction {
    /// Rebuild an index from the local cache directory (searches keep
    /// answering from the current index meanwhile).
    Rebuild {
        /// The index's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum JobsAction {
    /// Run a job now, once cluster-wide.
    Run {
        /// The job's name.
        name: String,
    },
}

fn load(arg: &ConfigArg) -> Result<Config, ExitCode> {
    let env: HashMap<String, String> = std::env::vars().collect();
    match config::load(arg.config.as_deref(), &env) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            Ok(loaded.config)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// Logs to stderr: JSON with `log.format = "json"`; plain lines without
/// timestamps under journald (which adds its own); the level from
/// `RUST_LOG`, else `log.level` (reloadable with `SIGHUP`).
fn init_tracing(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    macro_rules! install {
        ($b:expr) => {{
            let b = $b.with_env_filter(filter).with_filter_reloading();
            let handle = b.reload_handle();
            b.init();
            tandem::reload::set_log_level_setter(Box::new(move |level: &str| {
                let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                handle.reload(f).map_err(|e| e.to_string())
            }));
        }};
    }
    match config.log.format {
        LogFormat::Json => install!(builder.json()),
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            install!(builder.without_time().with_ansi(false))
        }
        LogFormat::Text => install!(builder),
    }
}

/// Raises the soft limit on open files to the hard limit: a batch of new
/// keys holds a descriptor per staged value until it is committed.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("can build the tokio runtime")
}

async fn bind(config: &Config) -> anyhow::Result<Listeners> {
    let mut listeners = Listeners::default();
    if let Some(addr) = config.api.listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (api.listen): {e}"))?;
        listeners.tcp = Some(tcp);
    }
    if let Some(path) = &config.api.unix_socket {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let unix = tokio::net::UnixListener::bind(path).map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (api.unix_socket): {e}", path.display())
        })?;
        std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(config.api.unix_socket_mode),
        )?;
        listeners.unix = Some(unix);
    }
    Ok(listeners)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn report(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Run(arg) => {
            let config = match load(&arg) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_tracing(&config);
            raise_fd_limit();
            let result = runtime().block_on(async {
                let listeners = bind(&config).await?;
                tandem::run(config, listeners, shutdown_signal()).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig(arg) => match load(&arg) {
            Ok(config) => {
                print!("{}", cli::describe(&config));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Migrate(arg) => {
            let config = match load(&arg) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_tracing(&config);
            report(runtime().block_on(cli::migrate(&config)))
        }
        Command::Status { config, json } => match load(&config) {
            Ok(config) => report(runtime().block_on(cli::status(&config, json))),
            Err(code) => code,
        },
        Command::Jobs {
            config,
            json,
            action,
        } => match load(&config) {
            Ok(config) => report(runtime().block_on(async {
                match action {
                    None => cli::jobs(&config, json).await,
                    Some(JobsAction::Run { name }) => cli::run_job(&config, &name).await,
                }
            })),
            Err(code) => code,
        },
        Command::Search {
            config,
            json,
            action,
        } => match load(&config) {
            Ok(config) => report(runtime().block_on(async {
                match action {
                    None => cli::search_indexes(&config, json).await,
                    Some(SearchAction::Rebuild { name }) => {
                        cli::search_rebuild(&config, &name).await
                    }
                }
            })),
            Err(code) => code,
        },
        Command::Resync { config, host } => match load(&config) {
            Ok(config) => report(runtime().block_on(cli::resync(&config, host.as_deref()))),
            Err(code) => code,
        },
    }
}
