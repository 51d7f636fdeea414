//! Starting and stopping the daemon: [`run`].
//!
//! Start-up: lock the data dir, start the embedded PostgreSQL if there is no
//! database URL, open the cache directory, serve HTTP at once (reads work,
//! `/readyz` says not ready), connect and migrate (retrying while the database
//! is down), then start the sync, heartbeat (and leader lease), readiness
//! and scheduler tasks. Readiness is a latch released by the first catch-up;
//! the same moment sends `READY=1` to systemd.
//!
//! Shutdown (time-boxed, in order): not ready; the scheduler starts no new
//! run; release the leader lease (another host takes over at once); let
//! running jobs finish (up to 10s); stop the sync task (after its current
//! batch); let the search index writers commit; mark the host stopped in the registry; stop heartbeats; drain
//! HTTP; stop the embedded PostgreSQL.

use std::fs::File;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Parts};
use crate::cache::CacheDir;
use crate::config::Config;
use crate::db::embedded::Embedded;
use crate::db::migrate::{self, MigrateError};
use crate::db::{self, Backoff, DbError};
use crate::events::{self, Hub};
use crate::http::{self, Listeners};
use crate::metrics::Metrics;
use crate::sched::{self, Scheduler};
use crate::search::Search;
use crate::sync::apply::Applier;
use crate::sync::position::StateFile;
use crate::sync::{SyncSettings, SyncShared, Syncer};
use crate::uploads::{self, Uploads};
use crate::{cluster, systemd};

/// Holds an exclusive lock on the data directory for the process lifetime.
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let path = data_dir.join("tandem.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| {
                anyhow::anyhow!(
                    "another tandem is already running with data_dir {} (it holds {})",
                    data_dir.display(),
                    path.display()
                )
            },
        )?;
        Ok(Self { _file: file })
    }
}

/// Runs the daemon until `shutdown` completes (or a task fails).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    tracing::info!(
        host = %config.host_id,
        data_dir = %config.data_dir.display(),
        cache_dir = %config.cache_dir.display(),
        schema = %config.database.schema,
        version = env!("CARGO_PKG_VERSION"),
        "starting tandem"
    );

    let embedded = match &config.database.url {
        Some(_) => None,
        None => Some(
            Embedded::start(&config.data_dir.join("postgres"), &config.database)
                .await
                .context("starting the embedded PostgreSQL (set database.url to use your own)")?,
        ),
    };
    let result = run_with_database(config, listeners, shutdown, embedded.as_ref()).await;
    if let Some(e) = embedded {
        e.stop().await;
    }
    result
}

async fn run_with_database(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    embedded: Option<&Embedded>,
) -> anyhow::Result<()> {
    let pg = db::pg_config(&config.database, embedded.map(Embedded::pg_config));
    let metrics = Arc::new(Metrics::new(&config.host_id));
    let (cache, generation) = CacheDir::open(
        &config.cache_dir,
        &config.data_dir,
        config.api.read_cache_size,
    )?;
    let state_file = StateFile::new(&config.data_dir);
    let state = state_file.load();
    let generation_name = generation.name().to_string();
    let (search, feed) = Search::start(
        config.search.clone(),
        &config.data_dir,
        cache.clone(),
        &generation_name,
        state.as_ref().ok().and_then(Option::as_ref),
        metrics.clone(),
    );
    let uploads = Arc::new(
        Uploads::open(&config.uploads, cache.upload_events().clone())
            .map_err(|e| anyhow::anyhow!("uploads ({}): {e}", config.uploads.store))?,
    );
    let hub = Arc::new(Hub::new(
        config.events.window,
        config.events.buffer,
        metrics.events.clone(),
    ));
    let applier = Applier::start(cache.clone(), generation, state_file, feed, hub.clone());
    metrics.cache_entries.set(applier.entries().await as i64);
    let sync = Arc::new(SyncShared::new());
    let shared_db = db::Shared::new(pg.clone(), config.database.connect_timeout, metrics.clone());
    let app = Arc::new(App::new(Parts {
        config,
        db: shared_db,
        sync: sync.clone(),
        metrics: metrics.clone(),
        cache,
        search: search.clone(),
        uploads,
        events: hub.clone(),
    }));
    let config = &app.config;

    let root = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let mut http_task = tokio::spawn(http::serve(app.clone(), listeners, http_stop.clone()));
    tokio::pin!(shutdown);
    // SIGHUP reloads from now on (its default action would end the process
    // while the database is still being reached).
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::reload::on_hangup(app.clone(), root.child_token()));

    // Connect and migrate, retrying while the database is down.
    let first = tokio::select! {
        r = connect_and_migrate(&pg, config) => Some(r?),
        _ = &mut shutdown => None,
        r = &mut http_task => return Err(http_ended(r)),
    };
    let Some(first) = first else {
        root.cancel();
        tasks.abort_all();
        app.events.close();
        http_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
        return Ok(());
    };

    let settings = SyncSettings {
        host_id: config.host_id.clone(),
        schema: config.database.schema.clone(),
        poll_interval: config.sync.poll_interval,
        batch_size: config.sync.batch_size,
        persist_interval: config.cluster.heartbeat_interval,
        connect_timeout: config.database.connect_timeout,
    };
    let syncer = Syncer::new(
        settings,
        pg,
        sync,
        metrics,
        applier,
        state,
        generation_name,
        search.clone(),
    );
    let sync_stop = root.child_token();
    let mut sync_task = tokio::spawn(syncer.run(Some(first), sync_stop.clone()));

    tasks.spawn(cluster::heartbeat_loop(app.clone(), root.child_token()));
    tasks.spawn(readiness_loop(app.clone(), root.child_token()));
    tasks.spawn(uploads::run(app.clone(), root.child_token()));
    tasks.spawn(uploads::watch::run(app.clone(), root.child_token()));
    tasks.spawn(events::webhook::run(app.clone(), root.child_token()));
    let sched_stop = CancellationToken::new();
    let mut sched_task = tokio::spawn(Scheduler::new(app.clone()).run(sched_stop.clone()));

    let failure = tokio::select! {
        _ = &mut shutdown => None,
        r = &mut sync_task => Some(anyhow::anyhow!("the sync task ended unexpectedly: {r:?}")),
        r = tasks.join_next() => Some(anyhow::anyhow!("a background task ended unexpectedly: {r:?}")),
        r = &mut http_task => Some(http_ended(r)),
        r = &mut sched_task => Some(anyhow::anyhow!("the scheduler ended unexpectedly: {r:?}")),
    };
    if let Some(e) = &failure {
        tracing::error!(error = %e, "stopping");
    }

    tracing::info!("shutting down");
    systemd::notify_stopping();
    app.begin_shutdown();
    sched_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(2), cluster::resign(&app)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release the leader lease; it expires at its TTL")
        }
        Err(_) => tracing::warn!("releasing the leader lease timed out; it expires at its TTL"),
    }
    if !sched_task.is_finished()
        && tokio::time::timeout(
            sched::SHUTDOWN_GRACE + Duration::from_secs(1),
            &mut sched_task,
        )
        .await
        .is_err()
    {
        sched_task.abort();
    }
    sync_stop.cancel();
    // (A task that ended above has been awaited already: not again.)
    if !sync_task.is_finished()
        && tokio::time::timeout(Duration::from_secs(10), &mut sync_task)
            .await
            .is_err()
    {
        tracing::warn!("the sync task did not stop within 10s");
        sync_task.abort();
    }
    // The indexes commit what they have (the sync task sends no more).
    let stopping = search.clone();
    if tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || stopping.stop()),
    )
    .await
    .is_err()
    {
        tracing::warn!("the search index writers did not stop within 10s");
    }
    match tokio::time::timeout(Duration::from_secs(3), cluster::mark_stopped(&app)).await {
        Ok(Ok(())) => tracing::info!("marked this host stopped in the registry"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not mark this host stopped"),
        Err(_) => tracing::warn!("marking this host stopped timed out"),
    }
    root.cancel();
    if tokio::time::timeout(Duration::from_secs(3), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("background tasks did not stop within 3s");
        tasks.abort_all();
    }
    // Event streams end, so that their connections close.
    app.events.close();
    http_stop.cancel();
    if !http_task.is_finished()
        && tokio::time::timeout(Duration::from_secs(5), &mut http_task)
            .await
            .is_err()
    {
        tracing::warn!("HTTP requests still open after 5s; closing them");
        http_task.abort();
    }
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn http_ended(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match r {
        Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped unexpectedly"),
        Ok(Err(e)) => anyhow::Error::new(e).context("the HTTP server failed"),
        Err(e) => anyhow::Error::new(e).context("the HTTP server task failed"),
    }
}

/// Opens the sync connection and applies migrations on it, retrying while
/// the database is unreachable. Refusals (a newer schema, no permission) are
/// fatal.
async fn connect_and_migrate(
    pg: &tokio_postgres::Config,
    config: &Config,
) -> anyhow::Result<(
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
)> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        let attempt = async {
            let (mut client, notes) = db::connect(pg, config.database.connect_timeout).await?;
            let outcome = migrate::run(&mut client, &config.database.schema).await?;
            Ok::<_, MigrateError>((client, notes, outcome))
        };
        match attempt.await {
            Ok((client, notes, outcome)) => {
                if outcome.from != outcome.to {
                    tracing::info!(from = outcome.from, to = outcome.to, "schema migrated");
                }
                return Ok((client, notes));
            }
            Err(MigrateError::Db(DbError::Unavailable(why))) => {
                let delay = backoff.failed();
                tracing::warn!(error = %why, retry_in = ?delay, "database unreachable at start-up; serving reads from the local cache meanwhile");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context("preparing the database schema")),
        }
    }
}

/// Keeps the ready gauge current, sends `READY=1` when the latch first
/// opens, and pings the systemd watchdog while the sync task is alive.
async fn readiness_loop(app: Arc<App>, cancel: CancellationToken) {
    let watchdog = systemd::watchdog_interval();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announced = false;
    let mut last_ping = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ready = app.ready();
        app.metrics.ready.set(i64::from(ready.is_ok()));
        if ready.is_ok() && !announced {
            announced = true;
            tracing::info!("ready: caught up with the database");
            systemd::notify_ready();
        }
        if let Some(interval) = watchdog
            && last_ping.elapsed() >= interval / 2
            && app.sync.alive_within(interval)
        {
            systemd::notify_watchdog();
            last_ping = tokio::time::Instant::now();
        }
    }
}
