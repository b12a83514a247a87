//! What the hub's and the workers' HTTP APIs share: bearer-token authentication and JSON
//! errors.

use crate::model::ApiError;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

/// An error answer: a status and a message, as `{"error": ...}`.
#[derive(Debug)]
pub struct Failure(pub StatusCode, pub String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl Failure {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Failure(StatusCode::BAD_REQUEST, message.into())
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Failure(StatusCode::NOT_FOUND, message.into())
    }
}

/// Refuses requests without `Authorization: Bearer <token>`. The comparison takes the
/// same time wherever the first difference is.
pub async fn require_token(
    State(token): State<Arc<str>>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Failure(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token (Authorization: Bearer ...)".into(),
        )
        .into_response();
    }
    next.run(request).await
}

/// The largest request body either API takes.
pub const MAX_BODY: u64 = 2 << 20;

/// Refuses a request whose declared body is larger than [`MAX_BODY`] before reading any
/// of it (bodies without a length are still cut at the limit while being read).
pub async fn limit_body(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY} bytes"),
        )
        .into_response();
    }
    next.run(request).await
}

/// Turns axum's own JSON rejections into JSON errors.
pub fn rejection(e: axum::extract::rejection::JsonRejection) -> Failure {
    Failure(e.status(), e.body_text())
}
