//! App locks: named, with a TTL judged by the database's clock and a fencing
//! token that grows with every acquisition of the name. A lock whose holder
//! died frees itself at its TTL.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::app::App;
use crate::db::DbError;

/// A lock name: also a URL path segment.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c))
}

/// The answer to an acquisition.
#[derive(Debug, Clone, Serialize)]
pub struct LockState {
    pub name: String,
    pub acquired: bool,
    /// The fencing token: of this acquisition when acquired, else of the
    /// current holder's.
    pub token: i64,
    /// Seconds until the lock expires (database time).
    pub expires_in: f64,
    /// The host and owner label of the holder.
    pub holder: Option<String>,
    pub owner: Option<String>,
}

/// Takes lock `name` for `ttl`, waiting up to `wait` while another holds it.
pub async fn acquire(
    app: &App,
    name: &str,
    owner: Option<&str>,
    ttl: Duration,
    wait: Duration,
) -> Result<LockState, DbError> {
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(10);
    let mut waited = false;
    loop {
        // Registered before asking, so a release in between is not missed.
        let released = app.sync.lock_released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        app.metrics.db_queries.with_label_values(&["lock"]).inc();
        let row = app
            .db
            .query_one(
                &app.queries.lock_acquire,
                &[&name, &app.config.host_id, &owner, &ttl.as_secs_f64()],
            )
            .await?;
        let state = LockState {
            name: name.to_string(),
            acquired: row.get(0),
            token: row.get(1),
            expires_in: row.get(2),
            holder: row.get(3),
            owner: row.get(4),
        };
        let m = &app.metrics.coord.lock_acquisitions;
        if state.acquired {
            m.with_label_values(&[if waited { "waited" } else { "acquired" }])
                .inc();
            return Ok(state);
        }
        let now = Instant::now();
        if now >= deadline {
            m.with_label_values(&["busy"]).inc();
            return Ok(state);
        }
        waited = true;
        // Ask again when a lock is released anywhere (a notification), when
        // the holder's TTL runs out, or after a backoff, whichever is first.
        let until_expiry = Duration::from_secs_f64(state.expires_in) + Duration::from_millis(2);
        let sleep = pause.min(until_expiry).min(deadline - now);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = &mut released => {}
        }
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Extends a held lock; `None` if `token` no longer holds it.
pub async fn renew(
    app: &App,
    name: &str,
    token: i64,
    ttl: Duration,
) -> Result<Option<f64>, DbError> {
    app.metrics.db_queries.with_label_values(&["lock"]).inc();
    let row = app
        .db
        .query_one(
            &app.queries.lock_renew,
            &[&name, &token, &ttl.as_secs_f64()],
        )
        .await?;
    Ok(row.get(0))
}

/// Releases a held lock; false if `token` no longer holds it.
pub async fn release(app: &App, name: &str, token: i64) -> Result<bool, DbError> {
    app.metrics.db_queries.with_label_values(&["lock"]).inc();
    let row = app
        .db
        .query_one(&app.queries.lock_release, &[&name, &token])
        .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert!(super::valid_name("orders:42"));
        assert!(super::valid_name("a.b-c_d"));
        assert!(!super::valid_name(""));
        assert!(!super::valid_name("../x"));
        assert!(!super::valid_name("-x"));
        assert!(!super::valid_name(&"a".repeat(129)));
    }
}
