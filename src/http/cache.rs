//! `/v1/cache/...` and `/v1/batch`: reads come from the local cache
//! directory (they work while the database is down); writes go to the
//! database and come back through the log like everyone else's.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::error::path_error;
use super::write::{self, WaitParams, authorize};
use crate::app::App;
use crate::cache::DEFAULT_CONTENT_TYPE;
use crate::cache::keys::{check_cache, check_key};
use crate::cache::memory::{Cached, MAX_VALUE};
use crate::cache::read::open_value;
use crate::cluster;

/// Values up to this size are read on the async worker (page-cache hits
/// take microseconds); larger ones on the blocking pool.
const INLINE_READ: u64 = 64 << 10;

fn query_error(e: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", e.body_text())
}

fn shorten(s: &str) -> String {
    if s.len() <= 120 {
        return format!("{s:?}");
    }
    let mut end = 120;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}…", &s[..end])
}

/// Reads a request body of at most `limit` bytes.
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: u64,
    what: &str,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(
            "body_too_large",
            format!("the {what} is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, limit as usize);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(
            "invalid_body",
            format!("cannot read the request body: {e}"),
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct GetParams {
    /// Answer only once the write with this token is applied here.
    after: Option<String>,
    timeout: Option<String>,
}

/// `GET /v1/cache/{cache}/{key}`: the value, with its content type.
pub async fn get_entry(
    State(app): State<Arc<App>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<GetParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((cache, key)) = path.map_err(path_error)?;
    let Query(params) = query.map_err(query_error)?;
    check_cache(&cache)?;
    check_key(&key)?;
    if let Some(after) = params.after.as_deref().filter(|t| !t.is_empty()) {
        let tx: u64 = after.parse().map_err(|_| {
            ApiError::bad_request(
                "invalid_token",
                format!("after={after:?} is not a write token"),
            )
        })?;
        let timeout = write::parse_timeout(params.timeout.as_deref(), &app)?;
        if !cluster::wait_local(&app, tx, Instant::now() + timeout).await {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "not_applied",
                format!("write {after} was not applied on this host within {timeout:?}"),
            ));
        }
    }
    let memory = app.cache.memory();
    if let Some(hit) = memory.get(&cache, &key) {
        app.metrics.read_cache.with_label_values(&["hit"]).inc();
        return Ok(value_response(hit.value, &hit.content_type));
    }
    let ticket = memory.ticket(&cache, &key);
    let file_path = app.cache.path_of(&cache, &key);
    let opened = open_value(&file_path).map_err(|e| read_failed(&cache, &key, e))?;
    let Some(opened) = opened else {
        return Err(ApiError::not_found(format!(
            "no key {} in cache {cache:?} on this host",
            shorten(&key)
        )));
    };
    let content_type = opened.content_type.clone();
    let value = if opened.size <= INLINE_READ {
        opened.read_all()
    } else {
        tokio::task::spawn_blocking(move || opened.read_all())
            .await
            .map_err(|e| ApiError::internal(format!("read task failed: {e}")))?
    }
    .map_err(|e| read_failed(&cache, &key, e))?;
    let value = Bytes::from(value);
    if memory.enabled() && value.len() <= MAX_VALUE {
        app.metrics.read_cache.with_label_values(&["miss"]).inc();
        let cached = Cached {
            value: value.clone(),
            content_type: content_type.clone(),
        };
        memory.insert(ticket, &cache, &key, cached);
    }
    Ok(value_response(value, &content_type))
}

fn value_response(value: Bytes, content_type: &str) -> Response {
    let content_type = HeaderValue::from_str(content_type)
        .unwrap_or_else(|_| HeaderValue::from_static(DEFAULT_CONTENT_TYPE));
    let mut response = Response::new(Body::from(value));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

fn read_failed(cache: &str, key: &str, e: std::io::Error) -> ApiError {
    tracing::error!(cache, key = %shorten(key), error = %e, "cannot read a cached value");
    ApiError::internal("cannot read the cached value (logged on the server)")
}

/// `PUT /v1/cache/{cache}/{key}`: the body is the value; its Content-Type is
/// kept.
pub async fn put_entry(
    State(app): State<Arc<App>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WaitParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (cache, key, wait, timeout) = entry_write(&app, &headers, path, query)?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => DEFAULT_CONTENT_TYPE.to_string(),
        Some(v) => check_content_type(v.to_str().ok())?,
    };
    let value = read_body(body, &headers, app.config.api.max_value_size, "value").await?;
    let value: &[u8] = &value;
    let q = &app.queries;
    write::commit(
        &app,
        &q.put,
        &q.put_ack,
        &[&cache, &key, &value, &content_type],
        wait,
        timeout,
    )
    .await
}

/// What a write to one entry checks first: the token, the path, the wait.
fn entry_write(
    app: &App,
    headers: &HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WaitParams>, QueryRejection>,
) -> Result<(String, String, write::Wait, std::time::Duration), ApiError> {
    authorize(app, headers)?;
    let Path((cache, key)) = path.map_err(path_error)?;
    let Query(wait) = query.map_err(query_error)?;
    check_cache(&cache)?;
    check_key(&key)?;
    let (wait, timeout) = wait.parse(app)?;
    Ok((cache, key, wait, timeout))
}

fn check_content_type(value: Option<&str>) -> Result<String, ApiError> {
    match value {
        Some(ct)
            if !ct.is_empty()
                && ct.len() <= 255
                && ct.bytes().all(|b| (0x20..0x7f).contains(&b)) =>
        {
            Ok(ct.to_string())
        }
        _ => Err(ApiError::bad_request(
            "invalid_content_type",
            "the content type must be 1 to 255 printable ASCII characters",
        )),
    }
}

/// `DELETE /v1/cache/{cache}/{key}`
pub async fn delete_entry(
    State(app): State<Arc<App>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WaitParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (cache, key, wait, timeout) = entry_write(&app, &headers, path, query)?;
    let q = &app.queries;
    write::commit(
        &app,
        &q.delete,
        &q.delete_ack,
        &[&cache, &key],
        wait,
        timeout,
    )
    .await
}

/// `DELETE /v1/cache/{cache}`: removes every key of the cache.
pub async fn clear(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<WaitParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let Path(cache) = path.map_err(path_error)?;
    let Query(wait) = query.map_err(query_error)?;
    check_cache(&cache)?;
    let (wait, timeout) = wait.parse(&app)?;
    let q = &app.queries;
    write::commit(&app, &q.clear, &q.clear_ack, &[&cache], wait, timeout).await
}

#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    prefix: Option<String>,
    start_after: Option<String>,
    limit: Option<usize>,
}

const MAX_LIST: usize = 10_000;

/// `GET /v1/cache/{cache}`: this host's keys, sorted, paged.
pub async fn list(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(cache) = path.map_err(path_error)?;
    let Query(params) = query.map_err(query_error)?;
    check_cache(&cache)?;
    let limit = params.limit.unwrap_or(1000).clamp(1, MAX_LIST);
    let dir = app.cache.clone();
    let c = cache.clone();
    let keys = tokio::task::spawn_blocking(move || dir.list(&c))
        .await
        .map_err(|e| ApiError::internal(format!("list task failed: {e}")))?
        .map_err(|e| {
            tracing::error!(cache = %cache, error = %e, "cannot list a cache");
            ApiError::internal("cannot list the cache (logged on the server)")
        })?;
    let prefix = params.prefix.unwrap_or_default();
    let mut page: Vec<String> = keys
        .into_iter()
        .filter(|k| k.starts_with(&prefix))
        .filter(|k| params.start_after.as_ref().is_none_or(|a| k > a))
        .take(limit + 1)
        .collect();
    let next = if page.len() > limit {
        page.truncate(limit);
        page.last().cloned()
    } else {
        None
    };
    Ok(Json(json!({"cache": cache, "keys": page, "next": next})).into_response())
}

/// `GET /v1/cache`: the caches present on this host.
pub async fn list_caches(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let dir = app.cache.clone();
    let caches = tokio::task::spawn_blocking(move || dir.caches())
        .await
        .map_err(|e| ApiError::internal(format!("list task failed: {e}")))?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot list the caches");
            ApiError::internal("cannot list the caches (logged on the server)")
        })?;
    Ok(Json(json!({"caches": caches})).into_response())
}

/// One operation of a batch, checked.
#[derive(Debug, PartialEq)]
pub struct Op {
    pub op: &'static str,
    pub cache: String,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub content_type: String,
}

/// Reads `{"ops": [...]}`, refusing as soon as it holds more than
/// `max_ops` operations (a parsed value takes many times the bytes of its
/// text: the count is checked while reading, not after).
mod batch_doc {
    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde_json::Value;

    /// The error text that marks "too many operations".
    pub const TOO_MANY: &str = "tandem: too many operations";

    pub struct Doc(pub usize);
    struct Ops(usize);

    impl<'de> DeserializeSeed<'de> for Doc {
        type Value = Option<Vec<Value>>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Doc {
        type Value = Option<Vec<Value>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("{\"ops\": [ ... ]}")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut ops = None;
            while let Some(k) = map.next_key::<String>()? {
                if k != "ops" {
                    return Err(de::Error::custom(format!("unknown field {k:?}")));
                }
                ops = Some(map.next_value_seed(Ops(self.0))?);
            }
            Ok(ops)
        }
    }

    impl<'de> DeserializeSeed<'de> for Ops {
        type Value = Vec<Value>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for Ops {
        type Value = Vec<Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of operations")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut ops = Vec::new();
            while let Some(op) = seq.next_element::<Value>()? {
                if ops.len() == self.0 {
                    return Err(de::Error::custom(TOO_MANY));
                }
                ops.push(op);
            }
            Ok(ops)
        }
    }
}

/// Parses and checks a batch body: `{"ops": [...]}`.
pub fn parse_batch(body: &[u8], max_ops: usize, max_value: u64) -> Result<Vec<Op>, ApiError> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = batch_doc::Doc(max_ops)
        .deserialize(&mut de)
        .and_then(|ops| de.end().map(|()| ops));
    let ops = match parsed {
        Ok(Some(ops)) => ops,
        Ok(None) => {
            return Err(ApiError::bad_request(
                "invalid_batch",
                "expected {\"ops\": [ ... ]}",
            ));
        }
        Err(e) if e.to_string().contains(batch_doc::TOO_MANY) => {
            return Err(ApiError::too_large(
                "batch_too_large",
                format!("more than {max_ops} operations; a batch holds at most {max_ops}"),
            ));
        }
        Err(e) if e.is_data() => {
            return Err(ApiError::bad_request(
                "invalid_batch",
                format!("expected {{\"ops\": [ ... ]}}: {e}"),
            ));
        }
        Err(e) => {
            return Err(ApiError::bad_request(
                "invalid_json",
                format!("the body is not valid JSON: {e}"),
            ));
        }
    };
    if ops.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_batch",
            "the batch has no operations",
        ));
    }
    ops.iter()
        .enumerate()
        .map(|(i, op)| parse_op(i, op, max_value))
        .collect()
}

fn parse_op(i: usize, op: &Value, max_value: u64) -> Result<Op, ApiError> {
    let bad = |msg: String| ApiError::bad_request("invalid_batch", format!("ops[{i}]: {msg}"));
    let obj = op.as_object().ok_or_else(|| bad("not an object".into()))?;
    let text = |name: &str| -> Result<Option<String>, ApiError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(format!("{name} must be a string"))),
        }
    };
    let kind = match text("op")?.as_deref() {
        Some("put") => "put",
        Some("delete") => "delete",
        Some("clear") => "clear",
        Some(other) => return Err(bad(format!("unknown op {other:?} (put, delete or clear)"))),
        None => return Err(bad("missing op".into())),
    };
    let allowed: &[&str] = match kind {
        "put" => &[
            "op",
            "cache",
            "key",
            "value",
            "json",
            "base64",
            "content_type",
        ],
        "delete" => &["op", "cache", "key"],
        _ => &["op", "cache"],
    };
    if let Some(extra) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!("unknown field {extra:?} for {kind}")));
    }
    let cache = text("cache")?.ok_or_else(|| bad("missing cache".into()))?;
    check_cache(&cache).map_err(|e| bad(e.to_string()))?;
    let key = if kind == "clear" {
        None
    } else {
        let key = text("key")?.ok_or_else(|| bad("missing key".into()))?;
        check_key(&key).map_err(|e| bad(e.to_string()))?;
        Some(key)
    };
    let mut value = Vec::new();
    let mut content_type = String::new();
    if kind == "put" {
        let forms = ["value", "json", "base64"]
            .iter()
            .filter(|f| obj.contains_key(**f))
            .count();
        if forms != 1 {
            return Err(bad(
                "a put needs exactly one of value (text), json or base64".into(),
            ));
        }
        let default_type;
        (value, default_type) = if let Some(v) = obj.get("value") {
            let s = v
                .as_str()
                .ok_or_else(|| bad("value must be a string (use json for JSON values)".into()))?;
            (s.as_bytes().to_vec(), "text/plain; charset=utf-8")
        } else if let Some(v) = obj.get("json") {
            (
                serde_json::to_vec(v).expect("JSON serialises"),
                "application/json",
            )
        } else {
            let s = text("base64")?.unwrap_or_default();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(|e| bad(format!("base64: {e}")))?;
            (bytes, DEFAULT_CONTENT_TYPE)
        };
        if value.len() as u64 > max_value {
            return Err(ApiError::too_large(
                "value_too_large",
                format!(
                    "ops[{i}]: the value is {} bytes; the limit is {max_value}",
                    value.len()
                ),
            ));
        }
        content_type = match text("content_type")? {
            Some(ct) => check_content_type(Some(&ct)).map_err(|e| bad(e.message))?,
            None => default_type.to_string(),
        };
    }
    Ok(Op {
        op: kind,
        cache,
        key,
        value,
        content_type,
    })
}

/// `POST /v1/batch`: several operations in one transaction.
pub async fn batch(
    State(app): State<Arc<App>>,
    query: Result<Query<WaitParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let Query(wait) = query.map_err(query_error)?;
    let (wait, timeout) = wait.parse(&app)?;
    let body = read_body(body, &headers, app.config.api.max_batch_size, "batch").await?;
    let ops = parse_batch(
        &body,
        app.config.api.max_batch_ops,
        app.config.api.max_value_size,
    )?;
    let mut kinds = Vec::with_capacity(ops.len());
    let mut caches = Vec::with_capacity(ops.len());
    let mut keys = Vec::with_capacity(ops.len());
    let mut values = Vec::with_capacity(ops.len());
    let mut types = Vec::with_capacity(ops.len());
    for op in ops {
        kinds.push(op.op);
        caches.push(op.cache);
        keys.push(op.key);
        values.push(op.value);
        types.push(op.content_type);
    }
    let q = &app.queries;
    write::commit(
        &app,
        &q.batch,
        &q.batch_ack,
        &[&kinds, &caches, &keys, &values, &types],
        wait,
        timeout,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Vec<Op>, ApiError> {
        parse_batch(body.as_bytes(), 3, 10)
    }

    proptest::proptest! {
        /// Batch bodies are untrusted: any bytes, and any JSON, give ops
        /// or a 4xx, never a panic.
        #[test]
        fn parsing_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Err(e) = parse_batch(&body, 10, 100) {
                proptest::prop_assert!(e.status.is_client_error());
            }
        }

        #[test]
        fn json_shapes_never_panic(
            op in "(put|delete|clear|x)",
            cache in "[a-zA-Z0-9_./-]{0,70}",
            key in "\\PC{0,20}",
            value in proptest::option::of("\\PC{0,20}"),
            b64 in proptest::option::of("[A-Za-z0-9+/=%]{0,12}"),
        ) {
            let mut o = serde_json::json!({"op": op, "cache": cache, "key": key});
            if let Some(v) = value { o["value"] = serde_json::json!(v); }
            if let Some(b) = b64 { o["base64"] = serde_json::json!(b); }
            let body = serde_json::to_vec(&serde_json::json!({"ops": [o]})).unwrap();
            if let Err(e) = parse_batch(&body, 10, 100) {
                proptest::prop_assert!(e.status.is_client_error());
            }
        }
    }

    #[test]
    fn value_forms() {
        let ops = parse(
            r#"{"ops":[{"op":"put","cache":"c","key":"t","value":"hi"},
                       {"op":"put","cache":"c","key":"j","json":{"a":1},"content_type":"application/vnd.x+json"},
                       {"op":"put","cache":"c","key":"b","base64":"AAE="}]}"#,
        )
        .unwrap();
        assert_eq!(ops[0].value, b"hi");
        assert_eq!(ops[0].content_type, "text/plain; charset=utf-8");
        assert_eq!(ops[1].value, br#"{"a":1}"#);
        assert_eq!(ops[1].content_type, "application/vnd.x+json");
        assert_eq!(ops[2].value, vec![0, 1]);
        assert_eq!(ops[2].content_type, DEFAULT_CONTENT_TYPE);
    }

    #[test]
    fn delete_and_clear() {
        let ops =
            parse(r#"{"ops":[{"op":"delete","cache":"c","key":"k"},{"op":"clear","cache":"c"}]}"#)
                .unwrap();
        assert_eq!(ops[0].key.as_deref(), Some("k"));
        assert_eq!(ops[1].op, "clear");
        assert_eq!(ops[1].key, None);
    }

    #[test]
    fn errors_name_the_op() {
        let cases = [
            ("not json", "invalid_json"),
            ("[]", "invalid_batch"),
            (r#"{"ops":[]}"#, "invalid_batch"),
            (r#"{"ops":[],"x":1}"#, "invalid_batch"),
            (r#"{"ops":[1]}"#, "invalid_batch"),
            (
                r#"{"ops":[{"op":"put","cache":"c","key":"k"}]}"#,
                "invalid_batch",
            ),
            (
                r#"{"ops":[{"op":"put","cache":"c","key":"k","value":"a","json":1}]}"#,
                "invalid_batch",
            ),
            (
                r#"{"ops":[{"op":"put","cache":"c","key":"k","value":1}]}"#,
                "invalid_batch",
            ),
            (
                r#"{"ops":[{"op":"put","cache":"C","key":"k","value":"v"}]}"#,
                "invalid_batch",
            ),
            (
                r#"{"ops":[{"op":"put","cache":"c","key":"","value":"v"}]}"#,
                "invalid_batch",
            ),
            (
                r#"{"ops":[{"op":"put","cache":"c","key":"k","base64":"%%"}]}"#,
                "invalid_batch",
            ),
            (
                r#"{"ops":[{"op":"delete","cache":"c","key":"k","value":"v"}]}"#,
                "invalid_batch",
            ),
            (r#"{"ops":[{"op":"rename","cache":"c"}]}"#, "invalid_batch"),
            (
                r#"{"ops":[{"op":"put","cache":"c","key":"k","value":"01234567890"}]}"#,
                "value_too_large",
            ),
            (
                r#"{"ops":[{"op":"clear","cache":"c"},{"op":"clear","cache":"c"},{"op":"clear","cache":"c"},{"op":"clear","cache":"c"}]}"#,
                "batch_too_large",
            ),
        ];
        for (body, code) in cases {
            let e = parse(body).unwrap_err();
            assert_eq!(e.code, code, "{body}: {}", e.message);
        }
        let e = parse(r#"{"ops":[{"op":"clear","cache":"c"},{"op":"put","cache":"c","key":"k"}]}"#)
            .unwrap_err();
        assert!(e.message.starts_with("ops[1]:"), "{}", e.message);
    }
}
