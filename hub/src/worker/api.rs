//! The worker's order API, for the hub.
//!
//! | request | effect |
//! |---|---|
//! | `POST /v1/start` ([`StartOrder`]) | run the app; answers [`Started`] once it listens |
//! | `POST /v1/apps/{name}/swap-out` | snapshot it to cold storage and free it |
//! | `DELETE /v1/apps/{name}` | end it without a snapshot |
//! | `DELETE /v1/apps/{name}/snapshots` | delete its snapshots from cold storage |
//! | `GET /v1/apps` | the resident apps and their addresses |
//! | `GET /metrics` | Prometheus metrics (see [`crate::metrics`]) |

use super::Worker;
use crate::http::{limit_body, rejection, require_token, Failure, MAX_BODY};
use crate::model::{StartOrder, Started, SwappedOut};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use std::net::Ipv4Addr;
use std::sync::Arc;

/// The order API's routes.
pub fn router(worker: Arc<Worker>, token: Arc<str>) -> Router {
    Router::new()
        .route("/v1/start", post(start))
        .route("/v1/apps", get(apps))
        .route("/v1/apps/{name}/swap-out", post(swap_out))
        .route("/v1/apps/{name}", delete(discard))
        .route("/v1/apps/{name}/snapshots", delete(forget))
        .route("/metrics", get(metrics))
        .with_state(worker)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY as usize))
        .layer(axum::middleware::from_fn(limit_body))
        .layer(axum::middleware::from_fn_with_state(token, require_token))
}

async fn start(
    State(worker): State<Arc<Worker>>,
    order: Result<Json<StartOrder>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Started>, Failure> {
    let Json(order) = order.map_err(rejection)?;
    order.spec.validate().map_err(Failure::bad_request)?;
    // On a task of its own: a start runs to its end even if the hub that ordered it goes
    // away meanwhile (its connection dropped, this handler with it); the app is then
    // resident, and the next report tells whichever hub takes it.
    let started = tokio::spawn(async move { worker.start(order).await });
    started
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map(Json)
        .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, e))
}

async fn apps(State(worker): State<Arc<Worker>>) -> Json<Vec<(String, Ipv4Addr)>> {
    Json(worker.resident().await)
}

async fn swap_out(
    State(worker): State<Arc<Worker>>,
    Path(name): Path<String>,
) -> Result<Json<SwappedOut>, Failure> {
    worker.swap_out(&name).await.map(Json).map_err(|e| match e {
        super::WorkerError::NotHere(_) => Failure::not_found(e.to_string()),
        e => Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    })
}

async fn forget(
    State(worker): State<Arc<Worker>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Failure> {
    worker
        .forget(&name)
        .await
        .map(|removed| Json(serde_json::json!({ "removed": removed })))
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn discard(
    State(worker): State<Arc<Worker>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    worker
        .discard(&name)
        .await
        .map(|()| StatusCode::NO_CONTENT)
        .map_err(|e| Failure::not_found(e.to_string()))
}

async fn metrics(State(worker): State<Arc<Worker>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        worker.render_metrics().await,
    )
}
