//! This host and the cluster: `/v1/status`, `/v1/cluster`, `/v1/resync`,
//! `/v1/wait`, `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use super::write::{authorize, parse_timeout};
use crate::app::App;
use crate::cluster;

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `GET /v1/status`: this host as it sees itself (no database needed).
pub async fn status(State(app): State<Arc<App>>) -> Response {
    let s = app.sync.status();
    let ready = app.ready();
    let position = s.persisted.as_ref();
    let applied = app
        .sync
        .applied()
        .borrow()
        .as_ref()
        .map(ToString::to_string);
    Json(json!({
        "host": app.config.host_id,
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": rfc3339(app.started_at),
        "uptime_seconds": app.started.elapsed().as_secs_f64(),
        "ready": ready.is_ok(),
        "not_ready_reason": ready.err(),
        "database": {
            "connected": s.connected,
            "last_error": s.last_error,
            "schema": app.config.database.schema,
            "embedded": app.config.database.url.is_none(),
        },
        "sync": {
            "applied": applied,
            "persisted": position.map(|p| p.done.to_string()),
            "paging": position.is_some_and(|p| p.pending.is_some()),
            "lag_seconds": app.sync.lag().as_secs_f64(),
            "pending_rows": app.metrics.pending_rows.get(),
            "last_batch_at": s.last_batch.map(rfc3339),
            "cold_booting": s.cold_booting.map(|r| r.as_str()),
            "last_cold_boot": s.last_cold_boot.map(|(r, t)| json!({"reason": r.as_str(), "at": rfc3339(t)})),
        },
        "cache": {
            "dir": app.cache.link().display().to_string(),
            "generation": s.generation,
            "entries": app.metrics.cache_entries.get(),
        },
        "oldest_transaction_age_seconds": app.metrics.oldest_xact_age.get(),
        "uploads": {
            "watch_pending": app.metrics.uploads.watch_pending.get(),
            "local_files": app.metrics.uploads.local_files.get(),
            "local_bytes": app.metrics.uploads.local_bytes.get(),
        },
    }))
    .into_response()
}

/// `GET /v1/cluster`: every registered host.
pub async fn cluster(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let hosts = cluster::hosts(&app).await?;
    let row = app.db.query_one(&app.queries.upload_backlog, &[]).await?;
    let uploads = json!({
        "in_progress": row.get::<_, i64>(0),
        "to_clean": row.get::<_, i64>(1),
        "stored": row.get::<_, i64>(2),
    });
    Ok(
        Json(json!({"this_host": app.config.host_id, "hosts": hosts, "uploads": uploads}))
            .into_response(),
    )
}

#[derive(Debug, Default, Deserialize)]
pub struct ResyncParams {
    host: Option<String>,
}

/// `POST /v1/resync[?host=ID]`: cold-boot this host (or ask another one
/// through the database).
pub async fn resync(
    State(app): State<Arc<App>>,
    query: Result<Query<ResyncParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    match params.host.filter(|h| *h != app.config.host_id) {
        None => {
            tracing::info!("resync requested over the API");
            app.sync.request_resync();
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"resync": "scheduled", "host": app.config.host_id})),
            )
                .into_response())
        }
        Some(host) => {
            let rows = app.db.query(&app.queries.request_resync, &[&host]).await?;
            if rows.is_empty() {
                return Err(ApiError::not_found(format!(
                    "no host {host:?} in the registry"
                )));
            }
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"resync": "requested", "host": host, "note": "it is picked up at that host's next heartbeat"})),
            )
                .into_response())
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct WaitQuery {
    token: Option<String>,
    #[serde(rename = "for")]
    target: Option<String>,
    timeout: Option<String>,
}

/// `GET /v1/wait?token=T&for=local|cluster&timeout=5s`: waits until a write
/// (for example one made through SQL, whose token is its transaction id) is
/// applied here or on every live host.
pub async fn wait(
    State(app): State<Arc<App>>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let token = q
        .token
        .ok_or_else(|| ApiError::bad_request("invalid_token", "token= is required"))?;
    let tx: u64 = token.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_token",
            format!("token={token:?} is not a write token"),
        )
    })?;
    let timeout = parse_timeout(q.timeout.as_deref(), &app)?;
    let deadline = Instant::now() + timeout;
    let target = q.target.as_deref().unwrap_or("local");
    let applied = match target {
        "local" => cluster::wait_local(&app, tx, deadline).await,
        "cluster" => {
            // Ask every host to report as soon as it has applied it.
            app.db.query(&app.queries.ack_request, &[&token]).await?;
            cluster::wait_cluster(&app, tx, deadline).await?
        }
        other => {
            return Err(ApiError::bad_request(
                "invalid_wait",
                format!("for={other:?}: expected local or cluster"),
            ));
        }
    };
    if applied {
        Ok(Json(json!({"token": token, "wait": target, "applied": true})).into_response())
    } else {
        Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "not_applied",
            format!("write {token} was not applied ({target}) within {timeout:?}"),
        ))
    }
}

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /readyz`: 200 when caught up; 503 with the reason otherwise.
pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.ready() {
        Ok(()) => Json(json!({"ready": true})).into_response(),
        Err(reason) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", reason).into_response()
        }
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    app.metrics.lag_seconds.set(app.sync.lag().as_secs_f64());
    app.metrics.ready.set(i64::from(app.ready().is_ok()));
    app.metrics
        .read_cache_bytes
        .set(app.cache.memory().bytes() as i64);
    let mut response = app.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
