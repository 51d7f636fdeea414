//! The API's one error type: a status, a stable code and a message, always
//! answered as `{"error": {"code": "...", "message": "..."}}`.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::cache::keys::NameError;
use crate::db::DbError;

/// A path parameter that cannot be read (not UTF-8, say): 400 in the API's
/// format.
pub fn path_error(e: PathRejection) -> ApiError {
    ApiError::bad_request(
        "invalid_path",
        format!("cannot read the path: {}", e.body_text()),
    )
}

/// axum's `Path`, rejecting in the API's JSON format (axum's own rejection
/// is plain text).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(path_error)
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is not read: the connection cannot be
            // reused, so tell the client before it tries.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tandem\""),
            );
        }
        response
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        let code = match e {
            NameError::BadCache(_) => "invalid_cache",
            _ => "invalid_key",
        };
        ApiError::bad_request(code, e.to_string())
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match &e {
            DbError::Unavailable(why) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                format!(
                    "the database is unreachable; reads are still served from the local cache ({why})"
                ),
            ),
            DbError::Query(_) => match e.code() {
                // Invalid parameter values, raised by tandem's SQL functions.
                Some("22023" | "22004" | "22021" | "22P05" | "54000") => ApiError::bad_request(
                    "invalid_request",
                    e.db_message().unwrap_or_else(|| e.to_string()),
                ),
                // The schema is not there (yet): tandem migrates it when it
                // first reaches the database.
                Some("3F000" | "42P01" | "42883") => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_not_ready",
                    "tandem's schema is not in the database yet (it is created when tandem first connects); try again shortly",
                ),
                Some("57014") => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_timeout",
                    "the database cancelled the statement",
                ),
                _ => {
                    tracing::error!(error = %e, "database error");
                    ApiError::internal("database error (logged on the server)")
                }
            },
        }
    }
}
