//! API errors: a status and a JSON body `{"error": ..., "detail": ...}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use crate::manager::ManagerError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Short message.
    pub error: String,
    /// More detail, when there is any.
    pub detail: serde_json::Value,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: error.into(),
            detail: serde_json::Value::Null,
        }
    }

    /// Adds detail.
    pub fn detail(mut self, detail: impl Into<serde_json::Value>) -> ApiError {
        self.detail = detail.into();
        self
    }

    /// 400 with a message.
    pub fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, msg)
    }

    /// 404 for a session.
    pub fn no_session(id: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "no such session").detail(json!({ "id": id }))
    }

    /// 404 with a message.
    pub fn not_found(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, msg)
    }

    /// 500 with a message.
    pub fn internal(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg)
    }

    /// 401.
    pub fn unauthorized(msg: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, msg)
    }
}

/// The body of every error answer, as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({ "error": "no such session", "detail": { "id": "0123abcd" } }))]
pub struct ErrorBody {
    /// What went wrong, in a short sentence naming the bad value.
    pub error: String,
    /// More detail when there is any (often `{"field": ...}` naming the
    /// request field at fault), else `null`.
    pub detail: serde_json::Value,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.error,
            detail: self.detail,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> ApiError {
        let status = match &e {
            ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
            ManagerError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
            ManagerError::Conflict(_) => StatusCode::CONFLICT,
            ManagerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}
