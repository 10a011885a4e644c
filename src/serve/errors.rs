//! Errors as JSON with a fitting status: `{"error": message, "kind": Error::kind()}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::Error;

/// An error answered by the API: a status and the `{"error", "kind"}` body.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A short, stable name (the library's [`Error::kind`], or one of the API's own:
    /// `bad_request`, `not_found`, `unknown_job`, `unknown_upload`, `no_scorer`).
    pub kind: &'static str,
    /// What happened and what to do, on one line.
    pub message: String,
}

impl ApiError {
    /// An error of the API itself (a malformed request, an unknown route or job).
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// A malformed request (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

/// The status of each kind of library error.
pub(crate) fn status_of(e: &Error) -> StatusCode {
    match e.kind() {
        "bad_image" | "invalid_argument" | "unknown_extractor" | "dimension_mismatch"
        | "not_enough_data" | "not_trainable" => StatusCode::BAD_REQUEST,
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "unknown_image" | "unknown_model" | "empty" => StatusCode::NOT_FOUND,
        "locked" | "job_running" | "active_model" | "model_changed" | "cancelled" => {
            StatusCode::CONFLICT
        }
        "disk_full" => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError {
            status: status_of(&e),
            kind: e.kind(),
            message: e.message(),
        }
    }
}

impl From<axum::extract::multipart::MultipartError> for ApiError {
    fn from(e: axum::extract::multipart::MultipartError) -> Self {
        let status = e.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        ApiError::new(
            status,
            kind,
            format!("could not read the upload: {}", e.body_text()),
        )
    }
}

impl From<axum::extract::multipart::MultipartRejection> for ApiError {
    fn from(e: axum::extract::multipart::MultipartRejection) -> Self {
        ApiError::new(e.status(), "bad_request", e.body_text())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(e.status(), "too_large", e.body_text());
        }
        // Malformed or mistyped JSON alike (axum says 422 for the latter): a bad request.
        ApiError::bad_request(e.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the request's worker failed: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error": self.message, "kind": self.kind})),
        )
            .into_response()
    }
}

/// Runs blocking database work off the async runtime.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> crate::Result<T> + Send + 'static,
    T: Send + 'static,
{
    Ok(tokio::task::spawn_blocking(f).await??)
}
