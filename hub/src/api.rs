//! The hub's HTTP API (JSON, `Authorization: Bearer <token>` on every route).
//!
//! | request | effect |
//! |---|---|
//! | `GET /v1/apps` | every app, with state, usage and events |
//! | `POST /v1/apps` ([`AppSpec`]) | register an app (201) |
//! | `GET /v1/apps/{name}` | one app |
//! | `DELETE /v1/apps/{name}` | remove it (ended on its worker if resident) |
//! | `POST /v1/apps/{name}/start` | bring it up now, as a DNS query would |
//! | `GET /v1/workers` | the live workers |
//! | `POST /v1/workers` ([`WorkerHello`]) | a worker registers |
//! | `POST /v1/workers/{id}/report` ([`WorkerReport`]) | a worker reports (its heartbeat) |
//! | `GET /metrics` | Prometheus metrics (see [`crate::metrics`]) |

use crate::http::{limit_body, rejection, require_token, Failure, MAX_BODY};
use crate::hub::{Hub, HubError, Resolution};
use crate::model::{AppRecord, AppSpec, WorkerHello, WorkerReport};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

/// The API's routes.
pub fn router(hub: Arc<Hub>) -> Router {
    let token = hub.token();
    Router::new()
        .route("/v1/apps", get(list).post(add))
        .route("/v1/apps/{name}", get(status).delete(remove))
        .route("/v1/apps/{name}/start", post(start))
        .route("/v1/workers", get(workers).post(register))
        .route("/v1/workers/{id}/report", post(report))
        .route("/metrics", get(metrics))
        .with_state(hub)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY as usize))
        .layer(axum::middleware::from_fn(limit_body))
        .layer(axum::middleware::from_fn_with_state(token, require_token))
}

fn failure(e: HubError) -> Failure {
    let status = match e {
        HubError::Invalid(_) => StatusCode::BAD_REQUEST,
        HubError::Exists(_) => StatusCode::CONFLICT,
        HubError::NoSuchApp(_) | HubError::NoSuchWorker(_) => StatusCode::NOT_FOUND,
        HubError::Registry(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Failure(status, e.to_string())
}

async fn list(State(hub): State<Arc<Hub>>) -> Json<Vec<AppRecord>> {
    Json(hub.list())
}

async fn add(
    State(hub): State<Arc<Hub>>,
    spec: Result<Json<AppSpec>, JsonRejection>,
) -> Result<(StatusCode, Json<AppRecord>), Failure> {
    let Json(spec) = spec.map_err(rejection)?;
    let record = hub.add(spec).map_err(failure)?;
    Ok((StatusCode::CREATED, Json(record)))
}

async fn status(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> Result<Json<AppRecord>, Failure> {
    hub.get(&name)
        .map(Json)
        .ok_or_else(|| failure(HubError::NoSuchApp(name)))
}

async fn remove(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    hub.remove(&name).await.map_err(failure)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> Result<Json<AppRecord>, Failure> {
    match hub.resolve(&name).await {
        Resolution::Unknown => Err(failure(HubError::NoSuchApp(name))),
        Resolution::Failed(why) => Err(Failure(StatusCode::SERVICE_UNAVAILABLE, why)),
        Resolution::Address(_) => hub
            .get(&name)
            .map(Json)
            .ok_or_else(|| failure(HubError::NoSuchApp(name))),
    }
}

async fn workers(State(hub): State<Arc<Hub>>) -> Json<Vec<serde_json::Value>> {
    Json(hub.workers())
}

async fn register(
    State(hub): State<Arc<Hub>>,
    hello: Result<Json<WorkerHello>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let Json(hello) = hello.map_err(rejection)?;
    if hello.id.is_empty() || !hello.url.starts_with("http://") {
        return Err(Failure::bad_request(
            "a worker needs an id and an http:// URL",
        ));
    }
    hub.register_worker(hello).map_err(failure)?;
    Ok(Json(serde_json::json!({"ok": true})))
}

async fn report(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    report: Result<Json<WorkerReport>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let Json(report) = report.map_err(rejection)?;
    hub.report(&id, report).map_err(failure)?;
    Ok(Json(serde_json::json!({"ok": true})))
}

async fn metrics(State(hub): State<Arc<Hub>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        hub.render_metrics(),
    )
}
