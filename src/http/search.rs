//! `/v1/search`: searching the local indexes, their status, rebuilds.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tantivy::Order;

use super::ApiError;
use super::error::ApiPath;
use super::write::authorize;
use crate::app::App;
use crate::search::SearchIndex;
use crate::search::query::{self, Request, SearchError};

fn index_of<'a>(app: &'a App, name: &str) -> Result<&'a Arc<SearchIndex>, ApiError> {
    app.search.get(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "no search index {name:?} (indexes are declared with [[search.index]] in the config)"
        ))
    })
}

fn describe(ix: &SearchIndex) -> serde_json::Value {
    let fields: Vec<_> = ix
        .spec
        .fields
        .iter()
        .map(|f| {
            json!({
                "name": f.name,
                "pointer": f.pointer,
                "type": f.kind.as_str(),
                "stored": f.stored,
                "fast": f.fast,
                "facet": f.facet,
                "tokenizer": f.tokenizer.tantivy_name(),
            })
        })
        .collect();
    json!({
        "name": ix.spec.name,
        "cache": ix.spec.cache,
        "fields": fields,
        "status": ix.status(),
    })
}

/// `GET /v1/search`: every index and its state.
pub async fn indexes(State(app): State<Arc<App>>) -> Response {
    let list: Vec<_> = app.search.indexes().iter().map(|ix| describe(ix)).collect();
    Json(json!({ "indexes": list })).into_response()
}

/// `POST /v1/search/{index}/rebuild`: rebuild from the local cache directory.
pub async fn rebuild(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    index_of(&app, &name)?;
    if !app.search.rebuild(&name) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "index_busy",
            "the index writer's queue is full; try again shortly",
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "index": name,
            "rebuilding": true,
            "message": "rebuilding from the local cache directory; searches answer from the current index meanwhile (see GET /v1/search for progress)",
        })),
    )
        .into_response())
}

fn parse_request(
    raw: Option<&str>,
    max_limit: usize,
    max_offset: usize,
) -> Result<Request, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_query", format!("bad query string: {e}")))?;
    let mut req = Request {
        limit: 20,
        highlight: true,
        ..Request::default()
    };
    let number = |name: &str, v: &str| {
        v.parse::<usize>().map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("{name}={v:?} is not a whole number"),
            )
        })
    };
    for (k, v) in pairs {
        match k.as_str() {
            "q" => req.q = v,
            "fields" => {
                req.fields = Some(
                    v.split(',')
                        .map(|f| f.trim().to_string())
                        .filter(|f| !f.is_empty())
                        .collect(),
                )
            }
            "limit" => req.limit = number("limit", &v)?.min(max_limit),
            "offset" => req.offset = number("offset", &v)?,
            "filter" => {
                let Some((field, value)) = v.split_once(':') else {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!("filter={v:?} is not field:value"),
                    ));
                };
                req.filters.push((field.to_string(), value.to_string()));
            }
            "sort" => {
                let (field, dir) = v.split_once(':').unwrap_or((v.as_str(), "asc"));
                let order = match dir {
                    "asc" => Order::Asc,
                    "desc" => Order::Desc,
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid_query",
                            format!("sort={v:?}: the direction is asc or desc"),
                        ));
                    }
                };
                req.sort = Some((field.to_string(), order));
            }
            "facets" => {
                req.facets = Some(
                    v.split(',')
                        .map(|f| f.trim().to_string())
                        .filter(|f| !f.is_empty())
                        .collect(),
                )
            }
            "highlight" => {
                req.highlight = match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid_query",
                            format!("highlight={v:?} is not true or false"),
                        ));
                    }
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "unknown parameter {other:?} (known: q, limit, offset, filter, sort, fields, facets, highlight)"
                    ),
                ));
            }
        }
    }
    if req.offset > max_offset {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "offset {} is above search.max_offset ({max_offset}); narrow the query or sort instead of paging so deep",
                req.offset
            ),
        ));
    }
    Ok(req)
}

/// `GET /v1/search/{index}?q=…`.
pub async fn search(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let ix = index_of(&app, &name)?.clone();
    let cfg = &app.search.config;
    let m = &app.metrics.search;
    let req = match parse_request(raw.as_deref(), cfg.max_limit, cfg.max_offset) {
        Ok(r) => r,
        Err(e) => {
            m.queries.with_label_values(&[&name, "bad_request"]).inc();
            return Err(e);
        }
    };
    let (limit, offset, q) = (req.limit, req.offset, req.q.clone());
    let runner = ix.clone();
    let result = tokio::task::spawn_blocking(move || query::run(&runner, &req))
        .await
        .map_err(|_| ApiError::internal("the search panicked (logged on the server)"))?;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(SearchError::BadRequest(_)) => "bad_request",
        Err(_) => "error",
    };
    m.queries.with_label_values(&[&name, outcome]).inc();
    let took = started.elapsed();
    m.query_duration
        .with_label_values(&[&name])
        .observe(took.as_secs_f64());
    let answer = match result {
        Ok(a) => a,
        Err(SearchError::BadRequest(msg)) => {
            return Err(ApiError::bad_request("invalid_query", msg));
        }
        Err(SearchError::Building) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "index_building",
                format!(
                    "search index {name:?} is being built for the first time; try again shortly"
                ),
            ));
        }
        Err(SearchError::Internal(msg)) => {
            tracing::error!(index = %name, error = %msg, "search failed");
            return Err(ApiError::internal(format!("search failed: {msg}")));
        }
    };
    let status = ix.status();
    Ok(Json(json!({
        "index": name,
        "query": q,
        "total": answer.total,
        "limit": limit,
        "offset": offset,
        "took_ms": took.as_secs_f64() * 1e3,
        "position": status.position,
        "hits": answer.hits,
        "facets": answer.facets,
    }))
    .into_response())
}
