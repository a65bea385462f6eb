//! `POST /v1/segment`: the label map of each image (a class per pixel at the image's own size),
//! as `beit-cli segment --json` prints it, or a label PNG on `Accept: image/png`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use beit_model::segmentation::label_map;
use beit_recipes::segment::{class_areas, label_png, ImageSegmentation};
use candle::Tensor;

use crate::api::ApiError;
use crate::infer::{infer_untimed, internal, within_timeout, Inferred};
use crate::model::{Answer, Task};
use crate::state::AppState;

/// Content type of the label image answer.
pub const PNG_MIME: &str = "image/png";

/// The handler of `POST /v1/segment`.
pub async fn segment(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    if !state.model_segments {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "this checkpoint is not a semantic segmentation model: use /v1/classify or /v1/embed",
        ));
    }
    let wants_png = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(PNG_MIME));
    within_timeout(&state, segment_untimed(&state, req, wants_png)).await
}

async fn segment_untimed(
    state: &Arc<AppState>,
    req: Request,
    wants_png: bool,
) -> Result<Response, ApiError> {
    let Inferred {
        names,
        sizes,
        answer,
    } = infer_untimed(state, req, Task::Segment).await?;
    let Answer::Logits(logits) = answer else {
        return Err(internal(
            "the model answered no logits to a segment request",
        ));
    };
    if wants_png && names.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "`Accept: {PNG_MIME}` answers one image per request, got {}",
            names.len()
        )));
    }
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        let maps = label_maps(&st, names, &sizes, &logits)?;
        if wants_png {
            png_answer(&st, &maps[0])
        } else {
            Ok(Json(maps).into_response())
        }
    })
    .await
    .map_err(|e| internal(format!("post-processing task: {e}")))?
}

/// Each image's logits resized bilinearly to its own size and the best class per pixel: the
/// answer of `beit_recipes::segment::segment_image` (whole-image inference).
fn label_maps(
    state: &AppState,
    names: Vec<String>,
    sizes: &[(u32, u32)],
    logits: &[Tensor],
) -> Result<Vec<ImageSegmentation>, ApiError> {
    let cfg = &state.model_config;
    names
        .into_iter()
        .zip(sizes)
        .zip(logits)
        .map(|((image, &(w, h)), logits)| {
            let (w, h) = (w as usize, h as usize);
            let labels = label_map(logits, h, w)
                .map_err(|e| internal(format!("`{image}`: label map: {e}")))?;
            let classes = class_areas(&labels, |i| cfg.label(i));
            Ok(ImageSegmentation {
                image,
                height: h,
                width: w,
                labels: labels.chunks(w).map(<[u32]>::to_vec).collect(),
                classes,
            })
        })
        .collect()
}

/// One label map as a PNG: palette colours as `beit-cli segment --out` writes them (16-bit grey,
/// the class index, for more than 256 classes).
fn png_answer(state: &AppState, map: &ImageSegmentation) -> Result<Response, ApiError> {
    let flat: Vec<u32> = map.labels.iter().flatten().copied().collect();
    let bytes = label_png(
        map.width as u32,
        map.height as u32,
        &flat,
        &map.classes,
        &state.palette,
    )
    .map_err(|e| internal(format!("label PNG: {e:#}")))?;
    Ok(([(header::CONTENT_TYPE, PNG_MIME)], bytes).into_response())
}
