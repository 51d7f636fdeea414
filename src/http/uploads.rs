//! `/v1/uploads`: storing uploads (streamed), reading them on any host
//! (with HEAD and Range), their local path, listing and deleting.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::ApiError;
use super::write::{Wait, WaitParams, answer, authorize};
use crate::app::App;
use crate::config::units::parse_duration;
use crate::uploads::{Meta, UploadError, sanitize_content_type, sanitize_name, valid_id};

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::TooLarge { .. } => ApiError::too_large("upload_too_large", e.to_string()),
            UploadError::Body(_) => ApiError::bad_request("upload_interrupted", e.to_string()),
            UploadError::Store(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            ),
            // The expiry job abandoned it while it streamed in (it took
            // longer than uploads.abandon_after, or this host looked dead).
            UploadError::Db(d) if d.code() == Some("55000") => ApiError::new(
                StatusCode::CONFLICT,
                "upload_abandoned",
                format!(
                    "{}; nothing was registered",
                    d.db_message().unwrap_or_default()
                ),
            ),
            UploadError::Db(d) => d.into(),
            UploadError::Checksum(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "checksum_mismatch", e.to_string())
            }
            UploadError::Missing(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "store_missing", e.to_string())
            }
            UploadError::Local(_) => ApiError::internal(e.to_string()),
        }
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

fn id_of(id: &str) -> Result<&str, ApiError> {
    if valid_id(id) {
        Ok(id)
    } else {
        Err(ApiError::bad_request(
            "invalid_id",
            "upload ids are 32 lower-case hex digits",
        ))
    }
}

async fn meta_of(app: &App, id: &str) -> Result<Meta, ApiError> {
    app.uploads.meta(app, id_of(id)?).await?.ok_or_else(|| {
        ApiError::not_found(format!("no upload {id} (never stored, deleted or expired)"))
    })
}

#[derive(Deserialize)]
pub struct UploadParams {
    name: Option<String>,
    ttl: Option<String>,
    #[serde(flatten)]
    wait: WaitParams,
}

/// `POST /v1/uploads?name=…`: streams the body into the store, then
/// registers it everywhere. 201 with the upload's metadata.
pub async fn create(
    State(app): State<Arc<App>>,
    q: Result<Query<UploadParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let params = query(q)?;
    let (wait, timeout) = params.wait.parse(&app)?;
    let max = app.uploads.config.max_size;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(UploadError::TooLarge { max }.into());
    }
    let ttl = match params.ttl.as_deref() {
        None | Some("") => app.uploads.config.ttl,
        Some(t) => {
            let d = parse_duration(t)
                .map_err(|e| ApiError::bad_request("invalid_ttl", format!("ttl: {e}")))?;
            if d < Duration::from_secs(1) || d > Duration::from_secs(3650 * 86400) {
                return Err(ApiError::bad_request(
                    "invalid_ttl",
                    "ttl must be between 1s and 3650d",
                ));
            }
            d
        }
    };
    let name = sanitize_name(params.name.as_deref().unwrap_or("upload"));
    let content_type = sanitize_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let uploads = &app.uploads;
    let stored = uploads
        .store_body(&app, &name, &content_type, ttl, body.into_data_stream())
        .await
        .map_err(|e| {
            let store = matches!(e, UploadError::Store(_));
            let mut error = ApiError::from(e);
            if store {
                error.message.push_str("; nothing was registered");
            }
            error
        })?;
    let (token, meta) = uploads
        .register(&app, stored, "http", wait == Wait::Cluster)
        .await?;
    let id = meta.id.clone();
    let body = serde_json::to_value(&meta).expect("serialisable");
    let mut response = answer(&app, token, body, wait, timeout).await?;
    if response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::CREATED;
    }
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/uploads/{id}")) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

fn meta_headers(meta: &Meta, headers: &mut HeaderMap) {
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set(headers, header::CONTENT_TYPE, meta.content_type.clone());
    set(headers, header::ETAG, format!("\"{}\"", meta.sha256));
    set(headers, header::ACCEPT_RANGES, "bytes".into());
    set(
        headers,
        header::CONTENT_DISPOSITION,
        format!("inline; filename*=UTF-8''{}", percent(&meta.name)),
    );
    set(
        headers,
        header::HeaderName::from_static("tandem-upload-sha256"),
        meta.sha256.clone(),
    );
}

/// RFC 5987 encoding of a file name.
fn percent(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `HEAD /v1/uploads/{id}`: the headers a GET would answer, without
/// fetching anything.
pub async fn head(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let meta = meta_of(&app, &id).await?;
    let mut response = StatusCode::OK.into_response();
    meta_headers(&meta, response.headers_mut());
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    Ok(response)
}

/// A single byte range of `size` bytes, parsed from a Range header:
/// `Ok(None)` means the whole body, `Err` an unsatisfiable range.
fn parse_range(value: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Several ranges: answered with the whole body, as RFC 9110 allows.
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

/// Bodies up to this size are read in one go; larger ones are streamed.
const READ_WHOLE: u64 = 2 << 20;

/// `len` bytes of a local copy from `start`.
async fn read_local(path: std::path::PathBuf, start: u64, len: u64) -> std::io::Result<Body> {
    if len <= READ_WHOLE {
        // One trip to the blocking pool instead of one per chunk.
        let bytes = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek};
            let mut f = std::fs::File::open(&path)?;
            f.seek(std::io::SeekFrom::Start(start))?;
            let mut buf = vec![0u8; len as usize];
            f.read_exact(&mut buf)?;
            Ok::<_, std::io::Error>(buf)
        })
        .await
        .map_err(std::io::Error::other)??;
        return Ok(Body::from(bytes));
    }
    let mut file = tokio::fs::File::open(&path).await?;
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start)).await?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 << 10);
    Ok(Body::from_stream(stream))
}

/// `GET /v1/uploads/{id}`: the bytes, from the local copy (fetched from the
/// store and verified first if this host has none). Honours one Range.
pub async fn get(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let meta = meta_of(&app, &id).await?;
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        meta.size,
    );
    let range = match range {
        Ok(r) => r,
        Err(()) => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the upload has {} bytes", meta.size),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", meta.size)) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    let (status, start, len) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, meta.size),
    };
    let mut attempt = 0;
    let body = loop {
        attempt += 1;
        // A small upload fetched by this very request is served from the
        // bytes just verified instead of being read back from the new copy.
        let (path, fetched) = match app.uploads.local_copy(&app, &meta, READ_WHOLE).await {
            Ok(copy) => copy,
            Err(UploadError::Missing(_)) if !still_stored(&app, &meta.id).await => {
                // Deleted on another host, not yet applied here.
                return Err(ApiError::not_found(format!("no upload {id} (deleted)")));
            }
            Err(e) => return Err(e.into()),
        };
        match fetched {
            Some(bytes) => break Body::from(bytes.slice(start as usize..(start + len) as usize)),
            None => match read_local(path, start, len).await {
                Ok(body) => break body,
                // Trimmed or withdrawn between the two: once more.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt == 1 => {}
                Err(e) => {
                    return Err(ApiError::internal(format!(
                        "cannot read the local copy: {e}"
                    )));
                }
            },
        }
    };
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    meta_headers(&meta, h);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) =
            HeaderValue::from_str(&format!("bytes {start}-{}/{}", start + len - 1, meta.size))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(response)
}

/// Whether the database still holds `id` as a live upload (an error counts
/// as yes: the store's answer stands).
async fn still_stored(app: &App, id: &str) -> bool {
    app.db
        .query(&app.queries.upload_get, &[&id])
        .await
        .map_or(true, |rows| !rows.is_empty())
}

/// `GET /v1/uploads/{id}/path`: makes sure the local copy exists and
/// answers its absolute path, for apps that open files themselves.
pub async fn path(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let meta = meta_of(&app, &id).await?;
    let path = app.uploads.local_path(&app, &meta).await?;
    let mut body = serde_json::to_value(&meta).expect("serialisable");
    body["path"] = json!(path.display().to_string());
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
pub struct ListParams {
    limit: Option<i32>,
    after: Option<String>,
    name: Option<String>,
}

/// `GET /v1/uploads?limit=&after=&name=`: live uploads, oldest first, paged
/// by id.
pub async fn list(
    State(app): State<Arc<App>>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be 1 to 1000",
        ));
    }
    let after = match p.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(id_of(a)?.to_string()),
    };
    let rows = app
        .db
        .query(&app.queries.upload_list, &[&after, &p.name, &(limit + 1)])
        .await?;
    let more = rows.len() > limit as usize;
    let uploads: Vec<serde_json::Value> = rows
        .iter()
        .take(limit as usize)
        .filter_map(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
        .collect();
    let next = if more {
        uploads
            .last()
            .and_then(|u| u["id"].as_str())
            .map(String::from)
    } else {
        None
    };
    Ok(Json(json!({ "uploads": uploads, "next": next })).into_response())
}

/// `DELETE /v1/uploads/{id}`: withdraws it everywhere, then removes its
/// bytes from the store.
pub async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    q: Result<Query<WaitParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let id = id_of(&id)?.to_string();
    let (wait, timeout) = query(q)?.parse(&app)?;
    let sql = if wait == Wait::Cluster {
        &app.queries.upload_delete_ack
    } else {
        &app.queries.upload_delete
    };
    let row = app.db.query_one(sql, &[&id]).await?;
    if !row.get::<_, bool>(1) {
        return Err(ApiError::not_found(format!("no upload {id}")));
    }
    app.uploads.remove_deleted(&app, &id).await;
    answer(
        &app,
        row.get(0),
        json!({ "id": id, "deleted": true }),
        wait,
        timeout,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some("bytes=90-"), 100), Ok(Some((90, 99))));
        assert_eq!(parse_range(Some("bytes=-5"), 100), Ok(Some((95, 99))));
        assert_eq!(parse_range(Some("bytes=-500"), 100), Ok(Some((0, 99))));
        assert_eq!(parse_range(Some("bytes=50-1000"), 100), Ok(Some((50, 99))));
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=5-2"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=x-2"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=-0"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=0-0"), 0), Err(()));
    }

    #[test]
    fn file_names_are_encoded() {
        assert_eq!(percent("a b.txt"), "a%20b.txt");
        assert_eq!(percent("é\"x"), "%C3%A9%22x");
    }
}
