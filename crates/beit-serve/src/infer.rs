//! One request through the model: its images read, prepared on the blocking pool, queued for the
//! batching thread, and the answer awaited, within the request timeout.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::StatusCode;
use tokio::sync::oneshot;

use crate::api::ApiError;
use crate::batcher::{Job, Rejected};
use crate::input::{prepare, read_images};
use crate::model::{Answer, Task};
use crate::state::AppState;

/// A 500 naming what failed.
pub(crate) fn internal(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
}

/// What the model answered for one request.
pub(crate) struct Inferred {
    /// The images' names (multipart file names, `body` for a raw body).
    pub names: Vec<String>,
    /// Each image's decoded `(width, height)`.
    pub sizes: Vec<(u32, u32)>,
    /// The model's answer.
    pub answer: Answer,
}

/// `work`, or a 504 once the request timeout has passed.
pub(crate) async fn within_timeout<T>(
    state: &AppState,
    work: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let timeout = state.config.request_timeout;
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within {} ms", timeout.as_millis()),
        )),
    }
}

/// Read, prepare and queue the images of `req`, and wait for the model's answer, all within
/// the request timeout.
pub(crate) async fn infer(
    state: &Arc<AppState>,
    req: Request,
    task: Task,
) -> Result<Inferred, ApiError> {
    within_timeout(state, infer_untimed(state, req, task)).await
}

/// Read, prepare and queue the images of `req`, and wait for the model's answer.
pub(crate) async fn infer_untimed(
    state: &Arc<AppState>,
    req: Request,
    task: Task,
) -> Result<Inferred, ApiError> {
    let cfg = &state.config;
    let images = read_images(req, cfg.max_batch, cfg.max_body_bytes).await?;
    let names = images.iter().map(|i| i.name.clone()).collect();
    let st = state.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        prepare(&images, &st.processor, &st.config.decode, &st.device)
    })
    .await
    .map_err(|e| internal(format!("preprocessing task: {e}")))??;
    let (reply, answer) = oneshot::channel();
    state
        .batcher
        .submit(Job {
            pixels: prepared.pixels,
            task,
            reply,
        })
        .map_err(|r| match r {
            Rejected::Full => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue full, retry later")
            }
            Rejected::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        })?;
    match answer.await {
        Ok(Ok(answer)) => Ok(Inferred {
            names,
            sizes: prepared.sizes,
            answer,
        }),
        Ok(Err(m)) => Err(internal(m)),
        Err(_) => Err(internal("the batching thread stopped")),
    }
}
