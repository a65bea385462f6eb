//! Reading image files into RGB buffers, with a memory limit and truncation checks.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, ImageReader, RgbImage};

use crate::error::{DataError, Result};
pub use crate::limits::DecodeOptions;

/// File extensions recognised as images (compared case-insensitively), as torchvision's
/// `IMG_EXTENSIONS` restricted to the formats we decode.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Read and decode an image file into 8-bit RGB (alpha dropped, grey replicated), like
/// `PIL.Image.open(path).convert("RGB")`.
///
/// The format is detected from the content, not the extension. JPEG is decoded by libjpeg-turbo's
/// decoder (MozJPEG 4) with Pillow's settings, so the pixels are bit-identical to Pillow's; the
/// other formats by the `image` crate (lossless formats decode identically anyway). Errors name
/// the file: unreadable, not an image, truncated (a JPEG without its end-of-image marker, a PNG
/// without `IEND`), or over the [`DecodeOptions`] limits.
pub fn decode_file(path: &Path, opts: &DecodeOptions) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_bytes(&bytes, path, opts)
}

/// [`decode_file`] on bytes already in memory; `path` only names them in errors.
pub fn decode_bytes(bytes: &[u8], path: &Path, opts: &DecodeOptions) -> Result<RgbImage> {
    let fail = |reason: String| DataError::Decode {
        path: path.to_path_buf(),
        reason,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    let format = reader
        .format()
        .ok_or_else(|| fail("not a recognised image format".into()))?;
    // Some decoders fill a truncated stream with grey instead of failing; Pillow refuses such files
    // (LOAD_TRUNCATED_IMAGES is off by default), and so do we.
    check_complete(bytes, format).map_err(fail)?;
    if format == ImageFormat::Jpeg {
        // libjpeg-turbo's decoder (MozJPEG), as Pillow: bit-identical pixels (see `jpeg`).
        return crate::jpeg::decode(bytes, opts).map_err(fail);
    }
    // Read the header first so that an oversized image is refused before any pixel allocation.
    let (w, h) = reader.into_dimensions().map_err(|e| fail(e.to_string()))?;
    if w > opts.max_side || h > opts.max_side || w as u64 * h as u64 > opts.max_pixels {
        return Err(fail(format!(
            "{w}x{h} exceeds the decoding limits (max side {}, max {} pixels)",
            opts.max_side, opts.max_pixels
        )));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(opts.max_side);
    limits.max_image_height = Some(opts.max_side);
    limits.max_alloc = Some(opts.max_alloc);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| fail(e.to_string()))?;
    Ok(match img {
        image::DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// Cheap structural check that a file was not cut short.
fn check_complete(bytes: &[u8], format: ImageFormat) -> std::result::Result<(), String> {
    match format {
        ImageFormat::Jpeg => {
            // The end-of-image marker FF D9 must be present near the end (some writers append a few
            // bytes of padding after it).
            let tail = &bytes[bytes.len().saturating_sub(4096)..];
            if tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
                Ok(())
            } else {
                Err("truncated JPEG (no end-of-image marker)".into())
            }
        }
        ImageFormat::Png => {
            let tail = &bytes[bytes.len().saturating_sub(64)..];
            if tail.windows(4).any(|w| w == b"IEND") {
                Ok(())
            } else {
                Err("truncated PNG (no IEND chunk)".into())
            }
        }
        _ => Ok(()),
    }
}
