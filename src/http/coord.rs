//! Leader, jobs, locks and version counters: `/v1/role`, `/v1/jobs`,
//! `/v1/locks/{name}`, `/v1/versions/{name}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::ApiError;
use super::cache::read_body;
use super::error::ApiPath;
use super::write::{WaitParams, authorize, commit_with};
use crate::app::App;
use crate::config::jobs::JobSpec;
use crate::coord::locks;
use crate::sched;

fn query<T: Default>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// The largest lock request body read.
const MAX_LOCK_BODY: u64 = 64 << 10;

/// Parses an optional JSON body (empty means all defaults).
fn body<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("request body: {e}")))
}

fn duration(
    field: &str,
    text: Option<&str>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ApiError> {
    let d = match text {
        None => default,
        Some(t) => crate::config::units::parse_duration(t)
            .map_err(|e| ApiError::bad_request("invalid_duration", format!("{field}: {e}")))?,
    };
    if d < min || d > max {
        return Err(ApiError::bad_request(
            "invalid_duration",
            format!(
                "{field} must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(d)
}

/// `GET /v1/role`
pub async fn role(State(app): State<Arc<App>>) -> Response {
    Json(app.leadership.view()).into_response()
}

fn find_job(app: &App, name: &str) -> Result<JobSpec, ApiError> {
    app.jobs()
        .iter()
        .find(|j| j.name == name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no job named {name:?} in the config")))
}

/// `GET /v1/jobs`
pub async fn jobs(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let jobs = sched::api::jobs(&app).await?;
    Ok(Json(json!({"host": app.config.host_id, "jobs": jobs})).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct RunsQuery {
    limit: Option<i32>,
    before: Option<i64>,
}

/// `GET /v1/jobs/{name}/runs?limit=50&before=ID`
pub async fn runs(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let job = find_job(&app, &name)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let runs = sched::api::runs(&app, &job.name, q.before, limit).await?;
    Ok(Json(json!({"job": job.name, "runs": runs})).into_response())
}

/// `POST /v1/jobs/{name}/run`: run now, once cluster-wide.
pub async fn run_now(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let job = find_job(&app, &name)?;
    if !job.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_disabled",
            format!("job {name:?} is disabled in the config"),
        ));
    }
    match sched::api::run_now(&app, &job).await? {
        Some((id, at)) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({
                "job": job.name,
                "run_id": id,
                "scheduled_for": chrono::DateTime::from_timestamp_millis((at * 1000.0).round() as i64)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                "state": "queued",
                "note": format!("GET /v1/jobs/{}/runs shows its outcome", job.name),
            })),
        )
            .into_response()),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_running",
            format!("a run of {name:?} is already queued or running and the job does not allow overlap"),
        )),
    }
}

/// Lock and version names share one rule (`locks::valid_name`).
fn check_name(name: &str, code: &'static str, what: &str) -> Result<(), ApiError> {
    if locks::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            code,
            format!(
                "{what} names are 1 to 128 characters of [A-Za-z0-9._:-], starting with a letter or digit"
            ),
        ))
    }
}

fn lock_name(name: &str) -> Result<(), ApiError> {
    check_name(name, "invalid_lock_name", "lock")
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireBody {
    /// How long the lock is held unless renewed (default 30s).
    ttl: Option<String>,
    /// How long to wait for a held lock (default 0: answer 409 at once).
    wait: Option<String>,
    /// A label for whoever holds it (shown to others), e.g. "worker 12".
    owner: Option<String>,
}

const MIN_TTL: Duration = Duration::from_millis(100);
const MAX_TTL: Duration = Duration::from_secs(86_400);

/// `POST /v1/locks/{name}`
pub async fn acquire(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    lock_name(&name)?;
    let bytes = read_body(request, &headers, MAX_LOCK_BODY, "lock request body").await?;
    let b: AcquireBody = body(&bytes)?;
    let ttl = duration(
        "ttl",
        b.ttl.as_deref(),
        Duration::from_secs(30),
        MIN_TTL,
        MAX_TTL,
    )?;
    let wait = duration(
        "wait",
        b.wait.as_deref(),
        Duration::ZERO,
        Duration::ZERO,
        app.config.api.max_wait,
    )?;
    if b.owner.as_ref().is_some_and(|o| o.len() > 200) {
        return Err(ApiError::bad_request(
            "invalid_owner",
            "owner: at most 200 bytes",
        ));
    }
    let state = locks::acquire(&app, &name, b.owner.as_deref(), ttl, wait).await?;
    if state.acquired {
        return Ok(Json(json!({
            "name": name,
            "token": state.token,
            "expires_in": state.expires_in,
            "ttl": ttl.as_secs_f64(),
        }))
        .into_response());
    }
    Ok((
        StatusCode::CONFLICT,
        Json(json!({
            "error": {
                "code": "lock_held",
                "message": format!("lock {name:?} is held by {}", state.holder.as_deref().unwrap_or("another host")),
            },
            "holder": state.holder,
            "owner": state.owner,
            "token": state.token,
            "expires_in": state.expires_in,
        })),
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    token: Option<i64>,
    ttl: Option<String>,
}

fn lost(name: &str, token: i64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "lock_lost",
        format!("token {token} no longer holds lock {name:?} (released, expired or taken over)"),
    )
}

/// `POST /v1/locks/{name}/renew` with `{"token": N, "ttl": "30s"}`
pub async fn renew(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    lock_name(&name)?;
    let bytes = read_body(request, &headers, MAX_LOCK_BODY, "lock request body").await?;
    let b: RenewBody = body(&bytes)?;
    let token = b
        .token
        .ok_or_else(|| ApiError::bad_request("invalid_json", "token is required"))?;
    let ttl = duration(
        "ttl",
        b.ttl.as_deref(),
        Duration::from_secs(30),
        MIN_TTL,
        MAX_TTL,
    )?;
    match locks::renew(&app, &name, token, ttl).await? {
        Some(expires_in) => Ok(Json(
            json!({"name": name, "token": token, "expires_in": expires_in}),
        )
        .into_response()),
        None => Err(lost(&name, token)),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ReleaseQuery {
    token: Option<i64>,
}

/// `DELETE /v1/locks/{name}?token=N`
pub async fn release(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
    q: Result<Query<ReleaseQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    lock_name(&name)?;
    let token = query(q)?
        .token
        .ok_or_else(|| ApiError::bad_request("invalid_query", "token is required: ?token=N"))?;
    if locks::release(&app, &name, token).await? {
        Ok(Json(json!({"name": name, "released": true})).into_response())
    } else {
        Err(lost(&name, token))
    }
}

fn version_name(name: &str) -> Result<(), ApiError> {
    check_name(name, "invalid_version_name", "version")
}

/// `GET /v1/versions`: every counter, from memory.
pub async fn versions(State(app): State<Arc<App>>) -> Response {
    let all: serde_json::Map<String, serde_json::Value> = app
        .cache
        .versions()
        .all()
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect();
    Json(json!({"versions": all})).into_response()
}

/// `GET /v1/versions/{name}`: from memory; 0 for a counter never bumped.
pub async fn version(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    version_name(&name)?;
    let v = app.cache.versions().get(&name).unwrap_or(0);
    Ok(Json(json!({"name": name, "version": v})).into_response())
}

/// `POST /v1/versions/{name}/bump[?wait=local|cluster]`
pub async fn bump(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
    q: Result<Query<WaitParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    version_name(&name)?;
    let (wait, timeout) = query(q)?.parse(&app)?;
    let answer = commit_with(
        &app,
        &app.queries.bump,
        &app.queries.bump_ack,
        &[&name],
        wait,
        timeout,
        |row| json!({"name": name, "version": row.get::<_, i64>(1)}),
    )
    .await?;
    app.metrics.coord.version_bumps.inc();
    Ok(answer)
}
