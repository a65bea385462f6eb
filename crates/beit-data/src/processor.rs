//! `preprocessor_config.json` (`BeitImageProcessor`) and its pipeline: resize, optional centre crop,
//! rescale, normalise: what `transformers` does to an image before the model.

use std::path::Path;

use candle::{Device, Tensor};
use image::RgbImage;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{DataError, Result};
use crate::normalize::Chw;
use crate::resize::{resize, Filter};
use crate::transform::{Transform, Views};

/// An invalid field of a `preprocessor_config.json`.
fn field(name: &str, reason: impl Into<String>) -> DataError {
    DataError::param(name, reason)
}

/// The preprocessing settings of a checkpoint. Defaults are `BeitImageProcessor`'s class defaults
/// (used when a checkpoint has no `preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Resize at all.
    pub do_resize: bool,
    /// Target size.
    pub size: TargetSize,
    /// Pillow filter.
    pub resample: Filter,
    /// Centre-crop after resizing.
    pub do_center_crop: bool,
    /// Crop `(height, width)`.
    pub crop_size: (u32, u32),
    /// Multiply pixel values by `rescale_factor`.
    pub do_rescale: bool,
    /// Usually 1/255.
    pub rescale_factor: f32,
    /// Normalise with mean/std.
    pub do_normalize: bool,
    /// Per-channel mean.
    pub image_mean: [f32; 3],
    /// Per-channel std.
    pub image_std: [f32; 3],
}

/// Where a centre crop of `crop` pixels out of `size` starts: `margin // 2` (`transformers`'
/// `center_crop`), or torchvision's `int(round(margin / 2.0))` with Python's round-half-to-even
/// (timm) when `torchvision` is set.
fn crop_offset(size: u32, crop: u32, torchvision: bool) -> u32 {
    let margin = size - crop;
    let k = margin / 2;
    // margin / 2 = k + 0.5 rounds to the even one of k, k + 1.
    if torchvision && margin % 2 == 1 && k % 2 == 1 {
        k + 1
    } else {
        k
    }
}

/// How `size` resizes an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSize {
    /// Squash to exactly `(height, width)`.
    Exact(u32, u32),
    /// Shorter side to this many pixels, aspect ratio kept.
    ShortestEdge(u32),
    /// The same resize as torchvision's `Resize(int)` (timm's eval pipeline), and a centre crop
    /// after it is placed with torchvision's rounding (see [`crop_offset`]).
    ShortestEdgeTorchvision(u32),
}

impl Default for ImageProcessor {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: TargetSize::Exact(224, 224),
            resample: Filter::Bicubic,
            do_center_crop: false,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

#[derive(Deserialize)]
struct Raw {
    do_resize: Option<bool>,
    size: Option<Value>,
    resample: Option<Value>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f32>,
    do_normalize: Option<bool>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
}

impl ImageProcessor {
    /// Defaults with the model's input resolution as the square target size.
    pub fn for_image_size(image_size: u32) -> Self {
        Self {
            size: TargetSize::Exact(image_size, image_size),
            crop_size: (image_size, image_size),
            ..Self::default()
        }
    }

    /// Read a `preprocessor_config.json`; fields it lacks keep the defaults of [`Self::for_image_size`].
    pub fn from_file(path: &Path, image_size: u32) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, image_size).map_err(|e| DataError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Parse the JSON text of a `preprocessor_config.json`.
    pub fn from_json(text: &str, image_size: u32) -> Result<Self> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| DataError::Format {
            path: "preprocessor_config.json".into(),
            reason: e.to_string(),
        })?;
        let mut p = Self::for_image_size(image_size);
        if let Some(v) = raw.do_resize {
            p.do_resize = v;
        }
        if let Some(v) = raw.size {
            p.size = parse_size(&v).map_err(|r| field("size", r))?;
        }
        if let Some(v) = raw.resample {
            p.resample = match &v {
                Value::Number(n) => Filter::parse(&n.to_string())?,
                Value::String(s) => Filter::parse(s)?,
                other => {
                    return Err(field(
                        "resample",
                        format!("expected a Pillow filter code, got {other}"),
                    ))
                }
            };
        }
        if let Some(v) = raw.do_center_crop {
            p.do_center_crop = v;
        }
        if let Some(v) = raw.crop_size {
            p.crop_size = match parse_size(&v).map_err(|r| field("crop_size", r))? {
                TargetSize::Exact(h, w) => (h, w),
                TargetSize::ShortestEdge(s) | TargetSize::ShortestEdgeTorchvision(s) => (s, s),
            };
        }
        if let Some(v) = raw.do_rescale {
            p.do_rescale = v;
        }
        if let Some(v) = raw.rescale_factor {
            p.rescale_factor = v;
        }
        if let Some(v) = raw.do_normalize {
            p.do_normalize = v;
        }
        if let Some(v) = raw.image_mean {
            p.image_mean = parse_triple(&v).map_err(|r| field("image_mean", r))?;
        }
        if let Some(v) = raw.image_std {
            p.image_std = parse_triple(&v).map_err(|r| field("image_std", r))?;
            if p.image_std.iter().any(|&s| s <= 0.0) {
                return Err(field("image_std", "every entry must be positive"));
            }
        }
        Ok(p)
    }

    /// The eval pipeline of a timm checkpoint, from its `pretrained_cfg` as timm's
    /// `resolve_data_config` + `create_transform(is_training=False)` build it: resize the shorter
    /// side to `floor(input_size / crop_pct)` with `interpolation`, centre-crop `input_size`
    /// (torchvision's rounding), rescale by 1/255, normalise with `mean`/`std`. Missing fields take
    /// timm's defaults (`crop_pct` 0.875, bicubic, ImageNet mean/std), `input_size` the model's.
    pub fn from_timm_pretrained_cfg(cfg: &Value, image_size: u32) -> Result<Self> {
        let get = |k: &str| cfg.get(k).filter(|v| !v.is_null());
        let size = match get("input_size") {
            Some(Value::Array(a)) if a.len() == 3 => {
                let int = |v: &Value| {
                    v.as_u64()
                        .ok_or_else(|| field("input_size", "expected integers"))
                };
                let (h, w) = (int(&a[1])?, int(&a[2])?);
                if h != w {
                    return Err(field(
                        "input_size",
                        format!("non-square input {h}x{w} is not supported"),
                    ));
                }
                h as u32
            }
            Some(other) => {
                return Err(field(
                    "input_size",
                    format!("expected [channels, height, width], got {other}"),
                ))
            }
            None => image_size,
        };
        let crop_pct = match get("crop_pct") {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| field("crop_pct", "expected a number"))?,
            None => 0.875,
        };
        if !(crop_pct > 0.0 && crop_pct <= 4.0) {
            return Err(field(
                "crop_pct",
                format!("expected a number in (0, 4], got {crop_pct}"),
            ));
        }
        let resample = match get("interpolation") {
            Some(Value::String(s)) => Filter::parse(s)?,
            Some(other) => {
                return Err(field(
                    "interpolation",
                    format!("expected a filter name, got {other}"),
                ))
            }
            None => Filter::Bicubic,
        };
        let crop_mode = match get("crop_mode") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(field(
                    "crop_mode",
                    format!("expected a string, got {other}"),
                ))
            }
            None => "center",
        };
        // Python's `math.floor(img_size / crop_pct)`, in the same double precision.
        let scale = (size as f64 / crop_pct).floor() as u32;
        if crop_mode != "center" {
            return Err(field(
                "crop_mode",
                format!("{crop_mode:?} is not supported (expected \"center\")"),
            ));
        }
        let mut p = Self {
            do_resize: true,
            size: TargetSize::ShortestEdgeTorchvision(scale),
            resample,
            do_center_crop: true,
            crop_size: (size, size),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
        };
        if let Some(v) = get("mean") {
            p.image_mean = parse_triple(v).map_err(|r| field("mean", r))?;
        }
        if let Some(v) = get("std") {
            p.image_std = parse_triple(v).map_err(|r| field("std", r))?;
            if p.image_std.iter().any(|&s| s <= 0.0) {
                return Err(field("std", "every entry must be positive"));
            }
        }
        Ok(p)
    }

    /// The JSON a checkpoint export writes (read back by `transformers`' `BeitImageProcessor`).
    pub fn to_json(&self) -> Value {
        let code = match self.resample {
            Filter::Nearest => 0,
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
            Filter::Box => 4,
            Filter::Hamming => 5,
        };
        let size = match self.size {
            TargetSize::Exact(h, w) => serde_json::json!({"height": h, "width": w}),
            TargetSize::ShortestEdge(s) | TargetSize::ShortestEdgeTorchvision(s) => {
                serde_json::json!({"shortest_edge": s})
            }
        };
        serde_json::json!({
            "image_processor_type": "BeitImageProcessor",
            "do_resize": self.do_resize,
            "size": size,
            "resample": code,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_size.0, "width": self.crop_size.1},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "do_reduce_labels": false,
        })
    }

    /// The resized (and cropped) 8-bit image the model sees, before rescaling/normalising.
    pub fn geometry(&self, img: &RgbImage) -> Result<RgbImage> {
        let mut img = if self.do_resize {
            let (w, h) = img.dimensions();
            let (th, tw) = match self.size {
                TargetSize::Exact(h, w) => (h, w),
                TargetSize::ShortestEdge(s) | TargetSize::ShortestEdgeTorchvision(s) => {
                    // transformers: short side = s, long side = int(s * long / short).
                    if w <= h {
                        (((s as u64 * h as u64) / w as u64) as u32, s)
                    } else {
                        (s, ((s as u64 * w as u64) / h as u64) as u32)
                    }
                }
            };
            resize(img, tw, th, self.resample)?
        } else {
            img.clone()
        };
        if self.do_center_crop {
            let (ch, cw) = self.crop_size;
            let (w, h) = img.dimensions();
            if ch > h || cw > w {
                return Err(field(
                    "crop_size",
                    format!("centre crop {cw}x{ch} is larger than the resized image {w}x{h}"),
                ));
            }
            let tv = matches!(self.size, TargetSize::ShortestEdgeTorchvision(_));
            let (x, y) = (crop_offset(w, cw, tv), crop_offset(h, ch, tv));
            img = image::imageops::crop_imm(&img, x, y, cw, ch).to_image();
        }
        Ok(img)
    }

    /// The model input of one image: geometry, then rescale and normalise, channels first.
    pub fn chw(&self, img: &RgbImage) -> Result<Chw> {
        let img = self.geometry(img)?;
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let mut data = vec![0f32; 3 * plane];
        let scale = if self.do_rescale {
            self.rescale_factor
        } else {
            1.0
        };
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = px[c] as f32 * scale;
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                data[c * plane + i] = v;
            }
        }
        Ok(Chw {
            data,
            height: h as usize,
            width: w as usize,
        })
    }

    /// The pixel values `(3, H, W)` of one image.
    pub fn pixel_values(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let chw = self.chw(img)?;
        Ok(Tensor::from_vec(
            chw.data,
            (3, chw.height, chw.width),
            device,
        )?)
    }

    /// The size `(height, width)` of every output, when it does not depend on the input (a
    /// fixed resize or a centre crop); `None` for a `shortest_edge` resize without a crop.
    pub fn fixed_output_size(&self) -> Option<(usize, usize)> {
        if self.do_center_crop {
            Some((self.crop_size.0 as usize, self.crop_size.1 as usize))
        } else {
            match self.size {
                TargetSize::Exact(h, w) if self.do_resize => Some((h as usize, w as usize)),
                _ => None,
            }
        }
    }
}

/// A checkpoint's preprocessing as a loader transform (deterministic), so that evaluation and
/// feature extraction see images exactly as `predict` and `transformers` do.
pub struct ProcessorTransform {
    processor: ImageProcessor,
    out: (usize, usize),
}

impl ProcessorTransform {
    /// Wrap `processor`; fails when its output size is not fixed (batches need one size).
    pub fn new(processor: ImageProcessor) -> Result<Self> {
        let out = processor.fixed_output_size().ok_or_else(|| {
            field(
                "size",
                "the preprocessor config gives images of varying size (no fixed resize or \
                 centre crop); batches need one size",
            )
        })?;
        Ok(Self { processor, out })
    }
}

impl Transform for ProcessorTransform {
    fn apply(&self, img: &RgbImage, _rng: &mut rand::rngs::StdRng) -> Result<Views> {
        Ok(Views {
            image: self.processor.chw(img)?,
            tokenizer: None,
        })
    }

    fn output_size(&self) -> (usize, usize) {
        self.out
    }
}

fn parse_size(v: &Value) -> std::result::Result<TargetSize, String> {
    let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as u32);
    Ok(match v {
        Value::Number(n) => {
            let s = n.as_u64().ok_or("expected a positive integer")? as u32;
            TargetSize::Exact(s, s)
        }
        Value::Object(_) => match (get("height"), get("width"), get("shortest_edge")) {
            (Some(h), Some(w), _) => TargetSize::Exact(h, w),
            (_, _, Some(s)) => TargetSize::ShortestEdge(s),
            _ => {
                return Err(format!(
                    "expected {{\"height\", \"width\"}} or {{\"shortest_edge\"}}, got {v}"
                ))
            }
        },
        other => return Err(format!("expected an integer or an object, got {other}")),
    })
}

fn parse_triple(v: &Value) -> std::result::Result<[f32; 3], String> {
    match v {
        Value::Number(n) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
        Value::Array(a) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x.as_f64().ok_or("expected numbers")? as f32;
            }
            Ok(out)
        }
        other => Err(format!("expected 3 numbers, got {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hub_processor_configs() {
        let hub = r#"{"crop_size": 224, "do_center_crop": false, "do_normalize": true, "do_resize": true,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 384}"#;
        let p = ImageProcessor::from_json(hub, 224).unwrap();
        assert_eq!(p.size, TargetSize::Exact(384, 384));
        assert_eq!(p.resample, Filter::Bilinear);
        assert!(!p.do_center_crop);
        let p = ImageProcessor::from_json(
            r#"{"size": {"shortest_edge": 256}, "do_center_crop": true}"#,
            224,
        )
        .unwrap();
        assert_eq!(p.size, TargetSize::ShortestEdge(256));
        let img = RgbImage::new(400, 300);
        assert_eq!(p.geometry(&img).unwrap().dimensions(), (224, 224));
        let back = ImageProcessor::from_json(&p.to_json().to_string(), 224).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn timm_pretrained_cfg_is_timms_eval_pipeline() {
        let cfg: Value = serde_json::from_str(
            r#"{"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.95,
                "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}"#,
        )
        .unwrap();
        let p = ImageProcessor::from_timm_pretrained_cfg(&cfg, 224).unwrap();
        // floor(224 / 0.95) = 235.
        assert_eq!(p.size, TargetSize::ShortestEdgeTorchvision(235));
        assert_eq!((p.crop_size, p.resample), ((224, 224), Filter::Bicubic));
        assert_eq!(p.image_mean, [0.485, 0.456, 0.406]);
        assert_eq!(
            ImageProcessor::from_timm_pretrained_cfg(&Value::Null, 224)
                .unwrap()
                .size,
            TargetSize::ShortestEdgeTorchvision(256)
        );
        let e = ImageProcessor::from_timm_pretrained_cfg(
            &serde_json::json!({"crop_mode": "border"}),
            224,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("crop_mode"), "{e:#}");
    }

    #[test]
    fn crop_offsets_follow_each_library() {
        // Margins 1, 3, 5: floor gives 0, 1, 2; Python's round(m / 2) gives 0, 2, 2.
        let floor: Vec<u32> = [1, 3, 5]
            .iter()
            .map(|m| crop_offset(10 + m, 10, false))
            .collect();
        let tv: Vec<u32> = [1, 3, 5]
            .iter()
            .map(|m| crop_offset(10 + m, 10, true))
            .collect();
        assert_eq!(floor, [0, 1, 2]);
        assert_eq!(tv, [0, 2, 2]);
    }

    #[test]
    fn bad_fields_are_named() {
        let e = ImageProcessor::from_json(r#"{"image_std": [0.5, 0]}"#, 224).unwrap_err();
        assert!(format!("{e:#}").contains("image_std"), "{e:#}");
        let e = ImageProcessor::from_json(r#"{"resample": "sinc"}"#, 224).unwrap_err();
        assert!(format!("{e:#}").contains("sinc"), "{e:#}");
    }
}
