//! What every write shares: the bearer token, `?wait=` and `?timeout=`,
//! running the write statement, and waiting for this host or the cluster.

use std::time::{Duration, Instant};

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio_postgres::types::ToSql;

use super::ApiError;
use crate::app::App;
use crate::cluster;

/// What a write waits for before answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    None,
    Local,
    Cluster,
}

impl Wait {
    fn as_str(self) -> &'static str {
        match self {
            Wait::None => "none",
            Wait::Local => "local",
            Wait::Cluster => "cluster",
        }
    }
}

/// `?wait=local|cluster&timeout=5s`
#[derive(Debug, Default, Deserialize)]
pub struct WaitParams {
    pub wait: Option<String>,
    pub timeout: Option<String>,
}

/// How long a wait may last when the request does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(5);

impl WaitParams {
    /// The wait and its timeout (counted from the commit, not from now).
    pub fn parse(&self, app: &App) -> Result<(Wait, Duration), ApiError> {
        let wait = match self.wait.as_deref() {
            None | Some("") | Some("none") => Wait::None,
            Some("local") => Wait::Local,
            Some("cluster") => Wait::Cluster,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_wait",
                    format!("wait={other:?}: expected local or cluster"),
                ));
            }
        };
        let timeout = parse_timeout(self.timeout.as_deref(), app)?;
        Ok((wait, timeout))
    }
}

/// Parses `timeout=` (a duration such as `500ms` or `5s`), capped by
/// `api.max_wait`.
pub fn parse_timeout(text: Option<&str>, app: &App) -> Result<Duration, ApiError> {
    let timeout = match text {
        None | Some("") => DEFAULT_WAIT,
        Some(t) => crate::config::units::parse_duration(t)
            .map_err(|e| ApiError::bad_request("invalid_timeout", format!("timeout: {e}")))?,
    };
    Ok(timeout.min(app.config.api.max_wait))
}

/// Requires the bearer token (when one is configured) for writes.
pub fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = app.token() else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "writes need the API token: Authorization: Bearer <token>",
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs a write statement (the `_ack` variant when waiting for the
/// cluster), then waits as asked. Answers 200 with the token, or 202 when the
/// write committed but the wait timed out.
pub async fn commit(
    app: &App,
    sql: &str,
    sql_ack: &str,
    params: &[&(dyn ToSql + Sync)],
    wait: Wait,
    timeout: Duration,
) -> Result<Response, ApiError> {
    commit_with(app, sql, sql_ack, params, wait, timeout, |_| json!({})).await
}

/// Like [`commit`], adding what `extra` reads from the statement's row
/// (whose first column is the token) to the answer.
pub async fn commit_with(
    app: &App,
    sql: &str,
    sql_ack: &str,
    params: &[&(dyn ToSql + Sync)],
    wait: Wait,
    timeout: Duration,
    extra: impl FnOnce(&tokio_postgres::Row) -> serde_json::Value,
) -> Result<Response, ApiError> {
    let statement = if wait == Wait::Cluster { sql_ack } else { sql };
    let row = app.db.query_one(statement, params).await?;
    let token: String = row.get(0);
    let body = extra(&row);
    answer(app, token, body, wait, timeout).await
}

/// Answers a committed write named by `token` (its transaction id): waits
/// as asked, then adds the token (and how the wait went) to `body`.
pub async fn answer(
    app: &App,
    token: String,
    mut body: serde_json::Value,
    wait: Wait,
    timeout: Duration,
) -> Result<Response, ApiError> {
    let tx: u64 = token
        .parse()
        .map_err(|_| ApiError::internal(format!("unexpected transaction id {token:?}")))?;
    let deadline = Instant::now() + timeout;
    let applied = match wait {
        Wait::None => None,
        Wait::Local => Some(cluster::wait_local(app, tx, deadline).await),
        Wait::Cluster => {
            match tokio::time::timeout_at(deadline.into(), cluster::wait_cluster(app, tx, deadline))
                .await
                .unwrap_or(Ok(false))
            {
                Ok(applied) => Some(applied),
                Err(e) => {
                    // The write committed; only the wait failed.
                    tracing::warn!(error = %e, token = %token, "cannot follow a cluster wait");
                    Some(false)
                }
            }
        }
    };
    body["token"] = json!(token);
    if let Some(applied) = applied {
        body["wait"] = json!(wait.as_str());
        body["applied"] = json!(applied);
    }
    let status = if applied == Some(false) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let mut response = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&token) {
        response.headers_mut().insert("tandem-token", v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
