//! Reading a request's images (a raw image body, or several multipart parts) and preparing them
//! exactly as `beit-cli predict` does, before they join a batch: a bad image fails its own
//! request only.

use std::path::Path;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};
use beit_data::decode::decode_bytes;
use beit_data::{DecodeOptions, ImageProcessor};
use candle::{Device, Tensor};

use crate::api::ApiError;

/// One image as received.
pub struct RawImage {
    /// Its multipart file name (or field name), `body` for a raw body.
    pub name: String,
    /// The encoded bytes.
    pub bytes: Bytes,
}

/// The images of `req`: every part of a `multipart/form-data` body, or the whole body. At most
/// `max_images`, within `max_body_bytes` in all.
pub async fn read_images(
    req: Request,
    max_images: usize,
    max_body_bytes: usize,
) -> Result<Vec<RawImage>, ApiError> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let images = if is_multipart {
        read_multipart(req, max_images).await?
    } else {
        let bytes = axum::body::to_bytes(req.into_body(), max_body_bytes)
            .await
            .map_err(|_| too_large(max_body_bytes))?;
        vec![RawImage {
            name: "body".into(),
            bytes,
        }]
    };
    if images.is_empty() {
        return Err(ApiError::bad_request(
            "multipart body without any image part",
        ));
    }
    if let Some(empty) = images.iter().find(|i| i.bytes.is_empty()) {
        return Err(ApiError::bad_request(format!(
            "`{}` is empty: send an image (JPEG, PNG, WebP or BMP)",
            empty.name
        )));
    }
    Ok(images)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body over the limit of {limit} bytes"),
    )
}

async fn read_multipart(req: Request, max_images: usize) -> Result<Vec<RawImage>, ApiError> {
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let mut images = Vec::new();
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::new(e.status(), format!("multipart body: {}", e.body_text())))?;
        let Some(field) = field else { break };
        if images.len() == max_images {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("more than {max_images} images in one request"),
            ));
        }
        let name = field
            .file_name()
            .or(field.name())
            .unwrap_or("part")
            .to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::new(e.status(), format!("`{name}`: {}", e.body_text())))?;
        images.push(RawImage { name, bytes });
    }
    Ok(images)
}

/// A request's images, prepared for the model.
pub struct Prepared {
    /// `(n, 3, H, W)` on the model's device.
    pub pixels: Tensor,
    /// Each image's decoded `(width, height)`.
    pub sizes: Vec<(u32, u32)>,
}

/// Decode and prepare `images` as the checkpoint's processor says: `(n, 3, H, W)` on `device`.
/// Undecodable images are a 422 naming the image and the decoder's complaint.
pub fn prepare(
    images: &[RawImage],
    processor: &ImageProcessor,
    decode: &DecodeOptions,
    device: &Device,
) -> Result<Prepared, ApiError> {
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    let mut rows = Vec::with_capacity(images.len());
    let mut sizes = Vec::with_capacity(images.len());
    for img in images {
        let rgb = decode_bytes(&img.bytes, Path::new(&img.name), decode)
            .map_err(|e| unprocessable(e.to_string()))?;
        let px = processor
            .pixel_values(&rgb, device)
            .map_err(|e| unprocessable(format!("`{}`: {e}", img.name)))?;
        rows.push(px);
        sizes.push(rgb.dimensions());
    }
    let pixels = Tensor::stack(&rows, 0).map_err(|e| {
        unprocessable(format!(
            "the images of one request must prepare to one size: {e}"
        ))
    })?;
    Ok(Prepared { pixels, sizes })
}
