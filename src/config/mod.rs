//! Configuration: a TOML file, overridden key by key by environment variables
//! (`TANDEM_<SECTION>_<KEY>`, and `DATABASE_URL`), validated into a typed
//! [`Config`]. Errors name the key and say why.
//!
//! The environment is passed in as a map so that tests never touch the
//! process environment.

pub mod events;
pub mod jobs;
pub mod keys;
mod raw;
pub mod search;
pub mod units;
pub mod uploads;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use raw::{Raw, check_known, overlay_env, type_error};
use units::{duration, flag, int_in, size};

/// Where an installed tandem looks for its config when none is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tandem/tandem.toml";

/// A config problem, naming the key (when there is one) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: Some(key.into()),
            message: message.into(),
        }
    }

    fn general(message: impl Into<String>) -> Self {
        Self {
            key: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "config key `{key}`: {}", self.message),
            None => write!(f, "config: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The path apps read: a symlink tandem manages, pointing at the current
    /// cache generation.
    pub cache_dir: PathBuf,
    pub host_id: String,
    pub database: DatabaseConfig,
    pub api: ApiConfig,
    pub sync: SyncConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
    pub leader: LeaderConfig,
    pub scheduler: SchedulerConfig,
    /// Every job, the built-ins first.
    pub jobs: Vec<jobs::JobSpec>,
    pub search: search::SearchConfig,
    pub uploads: uploads::UploadsConfig,
    pub events: events::EventsConfig,
    /// Where the config came from (for messages).
    pub source: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    /// `None` runs the embedded PostgreSQL.
    pub url: Option<Secret>,
    pub password: Option<Secret>,
    pub schema: String,
    pub connect_timeout: Duration,
    pub embedded_bin_dir: Option<PathBuf>,
    pub embedded_user: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// `None` when `api.listen` is empty (unix socket only).
    pub listen: Option<SocketAddr>,
    pub unix_socket: Option<PathBuf>,
    pub unix_socket_mode: u32,
    pub token: Option<Secret>,
    pub max_value_size: u64,
    pub max_batch_ops: usize,
    pub max_batch_size: u64,
    pub max_wait: Duration,
    /// Memory for copies of small values served by `GET /v1/cache` (0: off).
    pub read_cache_size: u64,
}

#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub poll_interval: Duration,
    pub batch_size: u32,
    pub max_lag: Duration,
    pub retain: Duration,
    pub max_retain: Duration,
    pub prune_interval: Duration,
    pub prune_batch: u32,
}

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub heartbeat_interval: Duration,
    /// A host is stale after this many missed heartbeats.
    pub stale_after: u32,
    /// Hosts stopped or stale for longer than this leave the registry.
    pub forget_after: Duration,
}

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease: Duration,
    /// False pins this host as never-leader.
    pub eligible: bool,
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub history_retain: Duration,
    /// How much of a run's output (the end) its history row keeps.
    pub output_tail: usize,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// A loaded config plus the non-fatal things worth logging about it.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Reads the config file (if any), applies the environment, validates.
///
/// `path` is the explicit `--config`; without it [`DEFAULT_CONFIG_PATH`] is
/// used when it exists, else the built-in defaults.
pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Loaded, ConfigError> {
    let (text, source) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                ConfigError::general(format!("cannot read config file {}: {e}", p.display()))
            })?;
            (text, Some(p.to_path_buf()))
        }
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            let p = Path::new(DEFAULT_CONFIG_PATH);
            let text = std::fs::read_to_string(p).map_err(|e| {
                ConfigError::general(format!("cannot read config file {}: {e}", p.display()))
            })?;
            (text, Some(p.to_path_buf()))
        }
        None => (String::new(), None),
    };
    let mut loaded = from_str(&text, env)?;
    loaded.config.source = source;
    Ok(loaded)
}

/// Like [`load`], from TOML text.
pub fn from_str(text: &str, env: &HashMap<String, String>) -> Result<Loaded, ConfigError> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::general(format!("invalid TOML: {e}")))?;
    check_known(&table)?;
    let mut warnings = Vec::new();
    overlay_env(&mut table, env, &mut warnings)?;
    check_known(&table)?;
    let raw: Raw = Raw::deserialize(toml::Value::Table(table)).map_err(type_error)?;
    let config = validate(raw, env)?;
    Ok(Loaded { config, warnings })
}

fn nonempty(value: Option<String>) -> Option<String> {
    value.filter(|s| !s.trim().is_empty())
}

fn nonempty_path(value: Option<PathBuf>) -> Option<PathBuf> {
    value.filter(|p| !p.as_os_str().is_empty())
}

/// The default data directory: systemd's `$STATE_DIRECTORY`, else
/// `/var/lib/tandem` for root, else `~/.local/state/tandem`.
fn default_data_dir(env: &HashMap<String, String>) -> PathBuf {
    if let Some(dirs) = env.get("STATE_DIRECTORY")
        && let Some(first) = dirs.split(':').next()
        && !first.is_empty()
    {
        return PathBuf::from(first);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/tandem");
    }
    match env.get("HOME") {
        Some(home) if !home.is_empty() => Path::new(home).join(".local/state/tandem"),
        _ => PathBuf::from("/var/lib/tandem"),
    }
}

/// Checks a host id: what goes into the hosts table, logs and metrics.
pub fn valid_host_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a schema name: a plain lower-case SQL identifier.
pub fn valid_schema(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 48
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::key(key, format!("cannot read {}: {e}", path.display())))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(ConfigError::key(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret::new(value))
}

fn validate(raw: Raw, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let data_dir = nonempty_path(raw.data_dir).unwrap_or_else(|| default_data_dir(env));
    if !data_dir.is_absolute() {
        return Err(ConfigError::key("data_dir", "must be an absolute path"));
    }
    let cache_dir = nonempty_path(raw.cache_dir).unwrap_or_else(|| data_dir.join("cache"));
    if !cache_dir.is_absolute() {
        return Err(ConfigError::key("cache_dir", "must be an absolute path"));
    }

    let host_id = nonempty(raw.host.id).unwrap_or_else(hostname);
    if !valid_host_id(&host_id) {
        return Err(ConfigError::key(
            "host.id",
            format!("{host_id:?} is not a valid host id ([A-Za-z0-9][A-Za-z0-9._-]{{0,62}})"),
        ));
    }

    let db = raw.database;
    let schema = nonempty(db.schema).unwrap_or_else(|| "tandem".to_string());
    if !valid_schema(&schema) {
        return Err(ConfigError::key(
            "database.schema",
            format!("{schema:?} is not a plain lower-case identifier ([a-z_][a-z0-9_]{{0,47}})"),
        ));
    }
    let url = nonempty(db.url);
    if let Some(u) = &url {
        u.parse::<tokio_postgres::Config>().map_err(|e| {
            ConfigError::key(
                "database.url",
                format!("not a PostgreSQL connection string: {e}"),
            )
        })?;
    }
    let password = match nonempty_path(db.password_file) {
        Some(p) => Some(read_secret_file("database.password_file", &p)?),
        None => None,
    };
    let database = DatabaseConfig {
        url: url.map(Secret::new),
        password,
        schema,
        connect_timeout: duration("database.connect_timeout", db.connect_timeout)?,
        embedded_bin_dir: nonempty_path(db.embedded_bin_dir),
        embedded_user: nonempty(db.embedded_user),
    };

    let api = raw.api;
    let listen = match api.listen {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 7411))),
        Some(s) if s.trim().is_empty() => None,
        Some(s) => Some(s.trim().parse().map_err(|_| {
            ConfigError::key(
                "api.listen",
                format!("{s:?} is not an address like 127.0.0.1:7411"),
            )
        })?),
    };
    let unix_socket = nonempty_path(api.unix_socket);
    if listen.is_none() && unix_socket.is_none() {
        return Err(ConfigError::key(
            "api.listen",
            "is empty and api.unix_socket is not set: the API would be unreachable",
        ));
    }
    let mode_text = nonempty(api.unix_socket_mode).unwrap_or_else(|| "0660".to_string());
    let unix_socket_mode = u32::from_str_radix(mode_text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            ConfigError::key(
                "api.unix_socket_mode",
                format!("{mode_text:?} is not an octal mode like \"0660\""),
            )
        })?;
    let token = match nonempty_path(api.token_file) {
        Some(p) => Some(read_secret_file("api.token_file", &p)?),
        None => None,
    };
    let max_value_size = size("api.max_value_size", api.max_value_size)?;
    if !(1..=(1u64 << 30)).contains(&max_value_size) {
        return Err(ConfigError::key(
            "api.max_value_size",
            "must be between 1 byte and 1GiB",
        ));
    }
    let max_batch_size = size("api.max_batch_size", api.max_batch_size)?;
    if max_batch_size < max_value_size {
        return Err(ConfigError::key(
            "api.max_batch_size",
            "must be at least api.max_value_size",
        ));
    }
    let api = ApiConfig {
        listen,
        unix_socket,
        unix_socket_mode,
        token,
        max_value_size,
        max_batch_ops: int_in("api.max_batch_ops", api.max_batch_ops, 1, 1_000_000)? as usize,
        max_batch_size,
        max_wait: duration("api.max_wait", api.max_wait)?,
        read_cache_size: size("api.read_cache_size", api.read_cache_size)?,
    };

    let s = raw.sync;
    let sync = SyncConfig {
        poll_interval: duration("sync.poll_interval", s.poll_interval)?,
        batch_size: int_in("sync.batch_size", s.batch_size, 1, 100_000)? as u32,
        max_lag: duration("sync.max_lag", s.max_lag)?,
        retain: duration("sync.retain", s.retain)?,
        max_retain: duration("sync.max_retain", s.max_retain)?,
        prune_interval: duration("sync.prune_interval", s.prune_interval)?,
        prune_batch: int_in("sync.prune_batch", s.prune_batch, 1, 1_000_000)? as u32,
    };
    if sync.poll_interval < Duration::from_millis(10) {
        return Err(ConfigError::key(
            "sync.poll_interval",
            "must be at least 10ms",
        ));
    }
    if sync.max_retain < sync.retain {
        return Err(ConfigError::key(
            "sync.max_retain",
            "must be at least sync.retain",
        ));
    }
    if sync.prune_interval < Duration::from_millis(100) {
        return Err(ConfigError::key(
            "sync.prune_interval",
            "must be at least 100ms",
        ));
    }

    let c = raw.cluster;
    let cluster = ClusterConfig {
        heartbeat_interval: duration("cluster.heartbeat_interval", c.heartbeat_interval)?,
        stale_after: int_in("cluster.stale_after", c.stale_after, 2, 100)? as u32,
        forget_after: duration("cluster.forget_after", c.forget_after)?,
    };
    if cluster.heartbeat_interval < Duration::from_millis(100) {
        return Err(ConfigError::key(
            "cluster.heartbeat_interval",
            "must be at least 100ms",
        ));
    }

    let leader = LeaderConfig {
        lease: duration("leader.lease", raw.leader.lease)?,
        eligible: flag("leader.eligible", raw.leader.eligible),
    };
    if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&leader.lease) {
        return Err(ConfigError::key(
            "leader.lease",
            "must be between 2s and 5m",
        ));
    }
    let sc = raw.scheduler;
    let scheduler = SchedulerConfig {
        history_retain: duration("scheduler.history_retain", sc.history_retain)?,
        output_tail: size("scheduler.output_tail", sc.output_tail)? as usize,
    };
    if scheduler.output_tail > 1 << 20 {
        return Err(ConfigError::key(
            "scheduler.output_tail",
            "must be at most 1MiB (it is stored with every run)",
        ));
    }
    let search = search::validate(raw.search)?;
    let uploads = uploads::validate(raw.uploads, &data_dir)?;
    let events = events::validate(raw.events)?;
    let jobs = jobs::parse(&raw.jobs, sync.prune_interval, uploads.expire_every)?;

    let l = raw.log;
    let level = nonempty(l.level).unwrap_or_else(|| "info".to_string());
    if level.parse::<tracing_subscriber::EnvFilter>().is_err() {
        return Err(ConfigError::key(
            "log.level",
            format!("{level:?} is not a level (error, warn, info, debug, trace) or filter"),
        ));
    }
    let format = match nonempty(l.format).as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(ConfigError::key(
                "log.format",
                format!("{other:?} is not \"text\" or \"json\""),
            ));
        }
    };

    Ok(Config {
        data_dir,
        cache_dir,
        host_id,
        database,
        api,
        sync,
        cluster,
        log: LogConfig { level, format },
        leader,
        scheduler,
        jobs,
        search,
        uploads,
        events,
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.entry("TANDEM_DATA_DIR".into())
            .or_insert_with(|| "/tmp/tandem-test".into());
        m
    }

    #[test]
    fn defaults() {
        let c = from_str("", &env(&[])).unwrap().config;
        assert_eq!(c.cache_dir, PathBuf::from("/tmp/tandem-test/cache"));
        assert!(c.database.url.is_none());
        assert_eq!(c.database.schema, "tandem");
        assert_eq!(c.api.listen, Some("127.0.0.1:7411".parse().unwrap()));
        assert_eq!(c.api.max_value_size, 16 << 20);
        assert_eq!(c.sync.poll_interval, Duration::from_secs(2));
        assert_eq!(c.sync.retain, Duration::from_secs(2 * 86400));
        assert_eq!(c.cluster.stale_after, 3);
        assert_eq!(c.api.unix_socket_mode, 0o660);
        // Defaults of each kind come from the key table.
        assert!(c.leader.eligible);
        assert!(!c.uploads.mirror);
        assert_eq!(c.uploads.max_size, 5 << 30);
        assert_eq!(c.scheduler.output_tail, 4096);
        assert_eq!(c.search.commit_interval, Duration::from_millis(200));
        assert_eq!(c.events.window, 10_000);
    }

    #[test]
    fn env_overrides_file() {
        let text = "[sync]\npoll_interval = \"5s\"\nbatch_size = 10\n";
        let c = from_str(
            text,
            &env(&[
                ("TANDEM_SYNC_POLL_INTERVAL", "250ms"),
                ("DATABASE_URL", "postgres://x@h/db"),
            ]),
        )
        .unwrap()
        .config;
        assert_eq!(c.sync.poll_interval, Duration::from_millis(250));
        assert_eq!(c.sync.batch_size, 10);
        assert_eq!(c.database.url.unwrap().expose(), "postgres://x@h/db");
    }

    #[test]
    fn tandem_database_url_beats_database_url() {
        let c = from_str(
            "",
            &env(&[
                ("DATABASE_URL", "postgres://a@h/a"),
                ("TANDEM_DATABASE_URL", "postgres://b@h/b"),
            ]),
        )
        .unwrap()
        .config;
        assert_eq!(c.database.url.unwrap().expose(), "postgres://b@h/b");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = from_str("[sync]\npol_interval = \"2s\"\n", &env(&[])).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("sync.pol_interval"));
        assert!(
            e.to_string().contains("did you mean `sync.poll_interval`"),
            "{e}"
        );
        let e = from_str("colour = 1\n", &env(&[])).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("colour"));
        let e = from_str("[nope]\nx = 1\n", &env(&[])).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("nope"));
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("[sync]\npoll_interval = \"soon\"\n", "sync.poll_interval"),
            ("[sync]\nbatch_size = 0\n", "sync.batch_size"),
            ("[sync]\nbatch_size = \"ten\"\n", "sync.batch_size"),
            ("[api]\nlisten = \"localhost\"\n", "api.listen"),
            (
                "[api]\nmax_value_size = \"12 parsecs\"\n",
                "api.max_value_size",
            ),
            (
                "[api]\nunix_socket_mode = \"999\"\n",
                "api.unix_socket_mode",
            ),
            ("[host]\nid = \"../etc\"\n", "host.id"),
            (
                "[database]\nschema = \"Robert'); DROP\"\n",
                "database.schema",
            ),
            (
                "[database]\nurl = \"postgres://h/db?sslmode=bogus\"\n",
                "database.url",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            (
                "[sync]\nretain = \"7d\"\nmax_retain = \"1d\"\n",
                "sync.max_retain",
            ),
            (
                "[api]\ntoken_file = \"/nonexistent/token\"\n",
                "api.token_file",
            ),
            ("sync = 3\n", "sync"),
            (
                "[uploads]\nabandon_after = \"0s\"\n",
                "uploads.abandon_after",
            ),
        ];
        for (text, key) in cases {
            let e = from_str(text, &env(&[])).expect_err(text);
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
        }
        let e = from_str("data_dir = \"relative/path\"\n", &HashMap::new()).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("data_dir"));
        let e = from_str("", &env(&[("TANDEM_SYNC_BATCH_SIZE", "lots")])).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("sync.batch_size"));
    }

    #[test]
    fn invalid_toml_is_reported() {
        let e = from_str("[sync\n", &env(&[])).unwrap_err();
        assert!(e.to_string().contains("invalid TOML"), "{e}");
    }

    #[test]
    fn unknown_env_vars_warn() {
        let l = from_str("", &env(&[("TANDEM_SYNC_POLL", "1s")])).unwrap();
        assert_eq!(l.warnings.len(), 1);
        assert!(l.warnings[0].contains("TANDEM_SYNC_POLL"));
    }

    #[test]
    fn secrets_do_not_leak_in_debug() {
        let c = from_str(
            "",
            &env(&[("TANDEM_DATABASE_URL", "postgres://u:hunter2@h/db")]),
        )
        .unwrap()
        .config;
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cret\n").unwrap();
        let text = format!("[api]\ntoken_file = {:?}\n", p.display().to_string());
        let c = from_str(&text, &env(&[])).unwrap().config;
        assert_eq!(c.api.token.unwrap().expose(), "s3cret");
    }

    proptest::proptest! {
        /// Config files are operator input: anything gives a config or an
        /// error, never a panic.
        #[test]
        fn parsing_never_panics(text in "\\PC{0,200}", key in "[a-z_]{1,20}", value in "\\PC{0,20}") {
            let _ = from_str(&text, &env(&[]));
            let _ = from_str(&format!("[sync]\n{key} = {value:?}\n"), &env(&[]));
            let _ = from_str(&format!("[api]\n{key} = {value}\n"), &env(&[]));
        }
    }

    #[test]
    fn host_ids() {
        assert!(valid_host_id("web-1.example"));
        assert!(!valid_host_id(""));
        assert!(!valid_host_id("-x"));
        assert!(!valid_host_id("a/b"));
        assert!(!valid_host_id(&"a".repeat(64)));
    }
}
