//! Request and response bodies, and errors as JSON answers.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use beit_recipes::predictions::Prediction;
use serde::{Deserialize, Serialize};

/// A failed request: its status and a message naming the problem, sent as `{"error": ...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What is wrong, for the client.
    pub message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: a malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: &self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Query of `POST /v1/classify`.
#[derive(Debug, Deserialize)]
pub struct ClassifyQuery {
    /// Classes per image (default 5).
    pub top_k: Option<usize>,
}

/// Query of `POST /v1/embed`.
#[derive(Debug, Deserialize)]
pub struct EmbedQuery {
    /// `mean` (default) or `cls`.
    pub pool: Option<String>,
    /// Block whose output is pooled (default: the last).
    pub layer: Option<usize>,
}

/// The predictions for one image: the same object as `beit-cli predict --json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct ImagePredictions {
    /// The multipart file name, or `body` for a raw image body.
    pub image: String,
    /// Top-k classes, most probable first.
    pub predictions: Vec<Prediction>,
}

/// One image's features.
#[derive(Debug, Serialize, Deserialize)]
pub struct ImageEmbedding {
    /// The multipart file name, or `body` for a raw image body.
    pub image: String,
    /// The pooled feature vector.
    pub embedding: Vec<f32>,
}

/// Answer of `POST /v1/embed` as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct EmbedResponse {
    /// Pooling used.
    pub pool: String,
    /// Block pooled.
    pub layer: usize,
    /// Feature dimension.
    pub dim: usize,
    /// One entry per image, in request order.
    pub embeddings: Vec<ImageEmbedding>,
}

/// Content type of the safetensors answer of `/v1/embed`.
pub const SAFETENSORS_MIME: &str = "application/vnd.safetensors";

/// The features as a safetensors file: `embeddings` `(n, dim)` f32, with the image names (a JSON
/// array), the pooling and the layer in its metadata.
pub fn safetensors_answer(
    names: &[String],
    features: &[Vec<f32>],
    pool: beit_recipes::features::Pool,
    layer: usize,
) -> Result<Response, ApiError> {
    let dim = features.first().map_or(0, Vec::len);
    let bytes: Vec<u8> = features
        .iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let internal = |m: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m);
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![features.len(), dim],
        &bytes,
    )
    .map_err(|e| internal(format!("safetensors: {e}")))?;
    let images = serde_json::to_string(names).map_err(|e| internal(e.to_string()))?;
    let meta = [
        ("images".to_string(), images),
        ("pool".to_string(), pool.name().to_string()),
        ("layer".to_string(), layer.to_string()),
    ];
    let file = safetensors::serialize([("embeddings", view)], Some(meta.into_iter().collect()))
        .map_err(|e| internal(format!("safetensors: {e}")))?;
    Ok(([(header::CONTENT_TYPE, SAFETENSORS_MIME)], file).into_response())
}
