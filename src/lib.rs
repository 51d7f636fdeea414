//! tandem: a sidecar daemon that keeps every web server's local cache
//! directory in step with the others through one PostgreSQL database.
//!
//! Read `docs/ARCHITECTURE.md` for the consistency model and the tasks.
//!
//! # Layout
//!
//! - [`app`]: the state shared by the HTTP handlers and the tasks.
//! - [`config`]: the TOML file, `TANDEM_*` overrides, validation.
//! - [`daemon`]: [`run`], start-up and the ordered shutdown.
//! - [`db`]: connections, migrations, the embedded PostgreSQL, SQL text.
//! - [`sync`]: the snapshot cursor, reading the log, the applier thread,
//!   cold boots, lag and readiness.
//! - [`cache`]: the cache directory (generations, key encoding, atomic files).
//! - [`cluster`]: heartbeats (which also hold the leader lease), the host
//!   registry, pruning, cluster-wide waits.
//! - [`coord`]: the leader lease as this host sees it, app locks.
//! - [`sched`]: the job scheduler and job actions.
//! - [`search`]: local full-text indexes (tantivy) fed by the applier.
//! - [`uploads`]: shared uploads through an object store (HTTP and a
//!   watched directory), fetched on demand, expired by a cluster job.
//! - [`events`]: the event stream of applied changes (SSE and a webhook).
//! - [`http`]: the localhost API (routes, errors, metrics middleware).
//! - [`metrics`]: the Prometheus registry.
//! - [`reload`]: `SIGHUP` reloads jobs, the log level and the API token.
//! - [`cli`]: `check-config`, `migrate`, `status`, `resync`.
//! - [`systemd`]: readiness and watchdog notifications.

pub mod app;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod coord;
pub mod daemon;
pub mod db;
pub mod events;
pub mod http;
pub mod metrics;
pub mod reload;
pub mod sched;
pub mod search;
pub mod sync;
pub mod systemd;
pub mod uploads;

pub use config::Config;
pub use daemon::run;
pub use http::Listeners;
