//! PostgreSQL access.
//!
//! A host holds at most two connections: the sync connection (LISTEN, reads,
//! cold boots; owned by [`crate::sync`]) and the shared connection here, on
//! which every other query (API writes, heartbeats, pruning, cluster views)
//! is pipelined. Statements are prepared once per connection and cached.

pub mod embedded;
pub mod migrate;
pub mod queries;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification, Row, Statement};

use crate::config::DatabaseConfig;

/// A database failure, split the way callers must branch.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection (or it broke): retry later; the API answers 503.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database refused the statement.
    #[error("database error: {}", describe(.0))]
    Query(#[source] tokio_postgres::Error),
}

/// The server's message and SQLSTATE, which the driver's `Display` omits.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

impl DbError {
    /// The SQLSTATE of a refused statement.
    pub fn code(&self) -> Option<&str> {
        match self {
            DbError::Query(e) => e.as_db_error().map(|d| d.code().code()),
            DbError::Unavailable(_) => None,
        }
    }

    /// The server's message for a refused statement.
    pub fn db_message(&self) -> Option<String> {
        match self {
            DbError::Query(e) => e.as_db_error().map(|d| d.message().to_string()),
            DbError::Unavailable(_) => None,
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.as_db_error().is_some() {
            DbError::Query(e)
        } else {
            DbError::Unavailable(e.to_string())
        }
    }
}

/// Replaces `{schema}` and `{channel}` in SQL text.
pub fn render(template: &str, schema: &str) -> String {
    template
        .replace("{schema}", schema)
        .replace("{channel}", schema)
}

/// The notification channels of a schema.
pub fn channel(schema: &str, suffix: &str) -> String {
    format!("{schema}_{suffix}")
}

/// Builds the driver config from tandem's database config.
pub fn pg_config(
    db: &DatabaseConfig,
    embedded: Option<tokio_postgres::Config>,
) -> tokio_postgres::Config {
    let mut cfg = match (&db.url, embedded) {
        (Some(url), _) => url.expose().parse().expect("validated with the config"),
        (None, Some(cfg)) => cfg,
        (None, None) => tokio_postgres::Config::new(),
    };
    if let Some(password) = &db.password {
        cfg.password(password.expose());
    }
    cfg.connect_timeout(db.connect_timeout);
    cfg.application_name("tandem");
    // Notice a silently dead peer (a cut network) within about 30 seconds,
    // unless the URL says otherwise.
    if cfg.get_keepalives() && cfg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        cfg.keepalives_idle(Duration::from_secs(15));
        cfg.keepalives_interval(Duration::from_secs(5));
        cfg.keepalives_retries(3);
        cfg.tcp_user_timeout(Duration::from_secs(30));
    }
    cfg
}

/// Opens a connection; notifications (if any LISTEN is issued) arrive on the
/// returned channel, which closes when the connection ends.
pub async fn connect(
    cfg: &tokio_postgres::Config,
    timeout: Duration,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<Notification>), DbError> {
    let (client, mut connection) = tokio::time::timeout(timeout, cfg.connect(NoTls))
        .await
        .map_err(|_| DbError::Unavailable(format!("connecting timed out after {timeout:?}")))?
        .map_err(|e| DbError::Unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n);
                }
                Ok(AsyncMessage::Notice(notice)) => {
                    tracing::debug!(notice = %notice.message(), "database notice");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "database connection ended");
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// A connection with its prepared statements.
pub struct Conn {
    client: Client,
    statements: Mutex<HashMap<String, Statement>>,
}

impl Conn {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            statements: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Prepares `sql` once per connection.
    pub async fn prepare(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.lock().expect("not poisoned").get(sql) {
            return Ok(s.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements
            .lock()
            .expect("not poisoned")
            .insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        let statement = self.prepare(sql).await?;
        Ok(self.client.query(&statement, params).await?)
    }

    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, DbError> {
        let statement = self.prepare(sql).await?;
        Ok(self.client.query_one(&statement, params).await?)
    }
}

/// Callbacks the shared connection reports its state to (metrics).
pub trait ConnObserver: Send + Sync {
    fn connected(&self, up: bool);
    fn reconnected(&self);
}

/// The shared, pipelined connection, reconnected on demand.
pub struct Shared {
    config: tokio_postgres::Config,
    timeout: Duration,
    current: Mutex<Option<Arc<Conn>>>,
    connecting: tokio::sync::Mutex<Backoff>,
    observer: Arc<dyn ConnObserver>,
    /// The runtime the connection lives on: the daemon's main one, not that
    /// of whichever HTTP thread happens to connect first (those stop first
    /// at shutdown, and the connection must outlive them).
    runtime: tokio::runtime::Handle,
}

/// Capped exponential backoff between connection attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    failures: u32,
    next_try: Option<Instant>,
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            failures: 0,
            next_try: None,
            base,
            cap,
        }
    }

    /// The delay after `failures` consecutive failures.
    pub fn delay(&self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(16);
        self.base.saturating_mul(1 << exp).min(self.cap)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn failed(&mut self) -> Duration {
        self.failures += 1;
        let d = self.delay();
        self.next_try = Some(Instant::now() + d);
        d
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.next_try = None;
    }

    /// Whether an attempt is allowed now.
    pub fn ready(&self) -> bool {
        self.next_try.is_none_or(|t| Instant::now() >= t)
    }
}

impl Shared {
    /// Must be called on the runtime the connection should live on.
    pub fn new(
        config: tokio_postgres::Config,
        timeout: Duration,
        observer: Arc<dyn ConnObserver>,
    ) -> Self {
        Self {
            runtime: tokio::runtime::Handle::current(),
            config,
            timeout,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(Backoff::new(
                Duration::from_millis(250),
                Duration::from_secs(10),
            )),
            observer,
        }
    }

    fn cached(&self) -> Option<Arc<Conn>> {
        let guard = self.current.lock().expect("not poisoned");
        guard.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    /// The connection, (re)connecting if needed. While the database is down,
    /// attempts are spaced out and callers fail fast in between.
    pub async fn conn(&self) -> Result<Arc<Conn>, DbError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let mut backoff = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        if !backoff.ready() {
            return Err(DbError::Unavailable("reconnecting (backing off)".into()));
        }
        let (config, timeout) = (self.config.clone(), self.timeout);
        let attempt = self
            .runtime
            .spawn(async move { connect(&config, timeout).await })
            .await
            .unwrap_or_else(|e| Err(DbError::Unavailable(format!("connecting failed: {e}"))));
        match attempt {
            Ok((client, _notifications)) => {
                let conn = Arc::new(Conn::new(client));
                let had_failed = backoff.failures() > 0;
                backoff.succeeded();
                *self.current.lock().expect("not poisoned") = Some(conn.clone());
                self.observer.connected(true);
                if had_failed {
                    self.observer.reconnected();
                    tracing::info!("shared database connection restored");
                }
                Ok(conn)
            }
            Err(e) => {
                let delay = backoff.failed();
                self.observer.connected(false);
                if backoff.failures() == 1 {
                    tracing::warn!(error = %e, retry_in = ?delay, "shared database connection failed");
                }
                Err(e)
            }
        }
    }

    /// Runs a query; a broken connection is dropped so the next call
    /// reconnects.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        let conn = self.conn().await?;
        let result = conn.query(sql, params).await;
        self.check(&conn, &result);
        result
    }

    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, DbError> {
        let conn = self.conn().await?;
        let result = conn.query_one(sql, params).await;
        self.check(&conn, &result);
        result
    }

    fn check<T>(&self, conn: &Arc<Conn>, result: &Result<T, DbError>) {
        let broken = match result {
            Err(DbError::Unavailable(_)) => true,
            // A statement prepared before a schema change may no longer plan.
            Err(DbError::Query(e)) => {
                e.as_db_error().is_some_and(|d| {
                    matches!(d.code().code(), "0A000" | "42P01" | "42883" | "3F000")
                }) || conn.is_closed()
            }
            Ok(_) => false,
        };
        if broken {
            let mut current = self.current.lock().expect("not poisoned");
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                *current = None;
            }
            if conn.is_closed() {
                self.observer.connected(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert!(b.ready());
        assert_eq!(b.failed(), Duration::from_millis(100));
        assert_eq!(b.failed(), Duration::from_millis(200));
        assert_eq!(b.failed(), Duration::from_millis(400));
        assert_eq!(b.failed(), Duration::from_millis(800));
        assert_eq!(b.failed(), Duration::from_secs(1));
        assert_eq!(b.failed(), Duration::from_secs(1));
        assert!(!b.ready());
        b.succeeded();
        assert!(b.ready());
        assert_eq!(b.failed(), Duration::from_millis(100));
    }

    #[test]
    fn render_fills_schema() {
        assert_eq!(
            render("SELECT {schema}.put(); NOTIFY {channel}_log", "app1"),
            "SELECT app1.put(); NOTIFY app1_log"
        );
    }
}
