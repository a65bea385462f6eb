//! The HTTP routes and their handlers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use beit_recipes::features::Pool;

use crate::api::{
    ApiError, ClassifyQuery, EmbedQuery, EmbedResponse, ImageEmbedding, ImagePredictions,
    SAFETENSORS_MIME,
};
use crate::infer::{infer, internal, Inferred};
use crate::model::{Answer, Task};
use crate::state::AppState;

/// Every route of the server over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/classify", post(classify))
        .route("/v1/embed", post(embed))
        .route("/v1/segment", post(crate::segment::segment))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The route label of `path` for the metrics (unknown paths share one label).
fn route_label(path: &str) -> &'static str {
    match path {
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/v1/classify" => "/v1/classify",
        "/v1/embed" => "/v1/embed",
        "/v1/segment" => "/v1/segment",
        _ => "other",
    }
}

async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    state
        .metrics
        .observe_request(route, status, start.elapsed());
    resp
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        "ready\n".into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "model warming up").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn classify(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ClassifyQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Json<Vec<ImagePredictions>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let top_k = q.top_k.unwrap_or(5);
    if top_k == 0 || top_k > state.config.max_top_k {
        let max = state.config.max_top_k;
        return Err(ApiError::bad_request(format!(
            "top_k must be in 1..={max}, got {top_k}"
        )));
    }
    if state.model_segments {
        return Err(segmentation_only());
    }
    if !state.model_classifies {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "this checkpoint has no classification head: use /v1/embed",
        ));
    }
    let Inferred { names, answer, .. } = infer(&state, req, Task::Classify { top_k }).await?;
    let Answer::Classes(classes) = answer else {
        return Err(internal(
            "the model answered features to a classify request",
        ));
    };
    let results = names
        .into_iter()
        .zip(classes)
        .map(|(image, predictions)| ImagePredictions { image, predictions })
        .collect();
    Ok(Json(results))
}

async fn embed(
    State(state): State<Arc<AppState>>,
    query: Result<Query<EmbedQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let pool: Pool = match q.pool.as_deref() {
        None => Pool::Mean,
        Some(p) => p
            .parse()
            .map_err(|e| ApiError::bad_request(format!("{e}")))?,
    };
    if state.model_segments {
        return Err(segmentation_only());
    }
    let layer = q.layer.unwrap_or(state.num_layers);
    if layer > state.num_layers {
        let n = state.num_layers;
        return Err(ApiError::bad_request(format!(
            "layer must be in 0..={n}, got {layer}"
        )));
    }
    let Inferred { names, answer, .. } = infer(&state, req, Task::Embed { layer, pool }).await?;
    let Answer::Features(features) = answer else {
        return Err(internal("the model answered classes to an embed request"));
    };
    let wants_safetensors = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(SAFETENSORS_MIME) || v.contains("application/octet-stream"));
    if wants_safetensors {
        return crate::api::safetensors_answer(&names, &features, pool, layer);
    }
    let dim = features.first().map_or(0, Vec::len);
    let embeddings = names
        .into_iter()
        .zip(features)
        .map(|(image, embedding)| ImageEmbedding { image, embedding })
        .collect();
    let body = EmbedResponse {
        pool: pool.name().into(),
        layer,
        dim,
        embeddings,
    };
    Ok(Json(body).into_response())
}

/// 404 of `/v1/classify` and `/v1/embed` on a semantic segmentation checkpoint.
fn segmentation_only() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "this checkpoint is a semantic segmentation model: use /v1/segment",
    )
}
