//! The DALL-E pixel mapping and image helpers (load, resize, save).
//!
//! The dVAE's logit-Laplace likelihood is defined on the open interval (0, 1), so DALL-E squeezes
//! pixels into `[eps, 1 - eps]` with `eps = 0.1` before encoding and undoes it after decoding.

use std::path::Path;

use candle::{Device, Tensor};
use image::{DynamicImage, RgbImage};

use crate::error::{Result, TokenizerError};

/// DALL-E's logit-Laplace epsilon.
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

/// `x -> (1 - 2 eps) x + eps`: pixels in `[0, 1]` to the `[0.1, 0.9]` range the encoder expects.
pub fn map_pixels(x: &Tensor) -> candle::Result<Tensor> {
    x.affine(1.0 - 2.0 * LOGIT_LAPLACE_EPS, LOGIT_LAPLACE_EPS)
}

/// Inverse of [`map_pixels`], clamped to `[0, 1]`.
pub fn unmap_pixels(x: &Tensor) -> candle::Result<Tensor> {
    x.affine(
        1.0 / (1.0 - 2.0 * LOGIT_LAPLACE_EPS),
        -LOGIT_LAPLACE_EPS / (1.0 - 2.0 * LOGIT_LAPLACE_EPS),
    )?
    .clamp(0f32, 1f32)
}

/// Open an image file (any format the `image` crate decodes).
pub fn open_image(path: &Path) -> Result<DynamicImage> {
    image::open(path).map_err(|source| TokenizerError::Image {
        path: path.to_path_buf(),
        source,
    })
}

/// Resize to `size x size` with Pillow's `LANCZOS`, as BEiT's tokenizer view does (the
/// Pillow-exact resampler of `beit-data`). An image already at that size is returned unchanged, so a
/// pre-cropped view is not resampled.
pub fn resize_lanczos(img: &RgbImage, size: u32) -> Result<RgbImage> {
    if img.width() == size && img.height() == size {
        return Ok(img.clone());
    }
    beit_data::resize(img, size, size, beit_data::Filter::Lanczos)
        .map_err(|e| TokenizerError::Input(e.to_string()))
}

/// An RGB image as a `(channels, H, W)` f32 tensor in `[0, 1]`. With `channels == 1` the image is
/// converted to luma first; with 3 the RGB planes are used.
pub fn image_to_tensor(img: &RgbImage, channels: usize, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = match channels {
        3 => {
            let mut planes = vec![0f32; 3 * h * w];
            for (x, y, p) in img.enumerate_pixels() {
                for c in 0..3 {
                    planes[c * h * w + y as usize * w + x as usize] = p[c] as f32 / 255.0;
                }
            }
            planes
        }
        1 => DynamicImage::ImageRgb8(img.clone())
            .to_luma8()
            .pixels()
            .map(|p| p[0] as f32 / 255.0)
            .collect(),
        other => {
            return Err(TokenizerError::Input(format!(
                "images can be read with 1 or 3 channels, the model wants {other}"
            )))
        }
    };
    Ok(Tensor::from_vec(data, (channels, h, w), device)?)
}

/// A `(C, H, W)` tensor in `[0, 1]` (C = 1 or 3) as an RGB image (grey replicated).
pub fn tensor_to_image(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    if c != 1 && c != 3 {
        return Err(TokenizerError::Input(format!(
            "cannot make an image from {c} channels"
        )));
    }
    let v: Vec<f32> = t.to_dtype(candle::DType::F32)?.flatten_all()?.to_vec1()?;
    let px = |ch: usize, x: u32, y: u32| -> u8 {
        let val = v[ch * h * w + y as usize * w + x as usize];
        (val.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        if c == 1 {
            let g = px(0, x, y);
            image::Rgb([g, g, g])
        } else {
            image::Rgb([px(0, x, y), px(1, x, y), px(2, x, y)])
        }
    }))
}

/// Save an RGB image (format from the extension).
pub fn save_image(img: &RgbImage, path: &Path) -> Result<()> {
    img.save(path).map_err(|source| TokenizerError::Image {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_and_unmap_are_inverse_and_clamped() -> candle::Result<()> {
        let x = Tensor::new(&[0f32, 0.25, 1.0], &Device::Cpu)?.reshape((1, 1, 1, 3))?;
        let m = map_pixels(&x)?;
        for (a, b) in m
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .zip([0.1f32, 0.3, 0.9])
        {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let back = unmap_pixels(&m)?.flatten_all()?.to_vec1::<f32>()?;
        for (a, b) in back.iter().zip([0f32, 0.25, 1.0]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let out = Tensor::new(&[0.0f32, 0.95], &Device::Cpu)?;
        assert_eq!(unmap_pixels(&out)?.to_vec1::<f32>()?, vec![0.0, 1.0]);
        Ok(())
    }

    #[test]
    fn resize_skips_images_already_at_size() {
        let img = RgbImage::from_fn(4, 4, |x, y| image::Rgb([(x * 60) as u8, (y * 60) as u8, 7]));
        assert_eq!(resize_lanczos(&img, 4).unwrap(), img);
        let big = resize_lanczos(&img, 8).unwrap();
        assert_eq!(big.dimensions(), (8, 8));
    }

    #[test]
    fn image_tensor_round_trip() -> Result<()> {
        let img = RgbImage::from_fn(3, 2, |x, y| {
            image::Rgb([(x * 100) as u8, (y * 200) as u8, 9])
        });
        let t = image_to_tensor(&img, 3, &Device::Cpu)?;
        assert_eq!(t.dims(), &[3, 2, 3]);
        assert_eq!(tensor_to_image(&t)?, img);
        assert_eq!(image_to_tensor(&img, 1, &Device::Cpu)?.dims(), &[1, 2, 3]);
        assert!(image_to_tensor(&img, 2, &Device::Cpu).is_err());
        Ok(())
    }
}
