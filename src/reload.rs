//! `SIGHUP` (`systemctl reload tandem`): reads the config again and applies
//! what can change without a restart, keeping every connection: the jobs,
//! the log level and the API token. Every other difference is logged as
//! needing a restart; a config that no longer loads changes nothing.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::{self, Config};

type LevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_LEVEL: OnceLock<LevelSetter> = OnceLock::new();

/// Installs how the log level is changed (by the binary, which owns the
/// subscriber). Without it a reload cannot change the level.
pub fn set_log_level_setter(f: LevelSetter) {
    let _ = LOG_LEVEL.set(f);
}

/// Reloads on every `SIGHUP` until `cancel`.
pub async fn on_hangup(app: Arc<App>, cancel: CancellationToken) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading is off");
            cancel.cancelled().await;
            return;
        }
    };
    let mut level = app.config.log.level.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = hup.recv() => if got.is_none() { cancel.cancelled().await; return; },
        }
        let env: HashMap<String, String> = std::env::vars().collect();
        match config::load(app.config.source.as_deref(), &env) {
            Ok(loaded) => {
                apply(&app, &loaded.config, &mut level);
            }
            Err(e) => {
                tracing::error!(error = %e, "reload: the config does not load; nothing changed")
            }
        }
    }
}

/// Applies a reloaded config; answers what changed (for tests and logs).
pub fn apply(app: &App, new: &Config, level: &mut String) -> Vec<String> {
    let mut changed = Vec::new();
    let old_jobs = app.jobs();
    if format!("{:?}", *old_jobs) != format!("{:?}", new.jobs) {
        app.set_jobs(new.jobs.clone());
        changed.push("jobs".to_string());
    }
    if app.token() != new.api.token {
        app.set_token(new.api.token.clone());
        changed.push("api.token".to_string());
    }
    if *level != new.log.level {
        if std::env::var_os("RUST_LOG").is_some() {
            tracing::warn!(
                "reload: log.level changed but RUST_LOG is set and wins; unset it to use log.level"
            );
        } else if let Some(set) = LOG_LEVEL.get() {
            match set(&new.log.level) {
                Ok(()) => {
                    *level = new.log.level.clone();
                    changed.push("log.level".to_string());
                }
                Err(e) => tracing::error!(error = %e, "reload: cannot change the log level"),
            }
        }
    }
    let restart = needs_restart(&app.config, new);
    tracing::info!(
        changed = ?changed,
        "reload: applied{}",
        if changed.is_empty() { " (nothing changed)" } else { "" }
    );
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "reload: these settings changed and take effect only after a restart (systemctl restart tandem)");
    }
    changed
}

/// The settings that differ and that a reload does not apply.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    let mut out = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            out.push(name);
        }
    };
    check("data_dir", old.data_dir != new.data_dir);
    check("cache_dir", old.cache_dir != new.cache_dir);
    check("host.id", old.host_id != new.host_id);
    // Secrets print as `***`: compared by value.
    check(
        "database",
        !same(&old.database, &new.database)
            || old.database.url != new.database.url
            || old.database.password != new.database.password,
    );
    let strip = |a: &config::ApiConfig| {
        let mut a = a.clone();
        a.token = None;
        format!("{a:?}")
    };
    check(
        "api (other than api.token)",
        strip(&old.api) != strip(&new.api),
    );
    check("sync", !same(&old.sync, &new.sync));
    check("cluster", !same(&old.cluster, &new.cluster));
    check("leader", !same(&old.leader, &new.leader));
    check("scheduler", !same(&old.scheduler, &new.scheduler));
    check("search", !same(&old.search, &new.search));
    check(
        "uploads",
        !same(&old.uploads, &new.uploads)
            || old.uploads.secret_access_key != new.uploads.secret_access_key,
    );
    check("events", !same(&old.events, &new.events));
    check("log.format", old.log.format != new.log.format);
    out
}
