//! Semantic segmentation jobs: one image to a label map (with transformers' post-processing, or
//! mmseg's sliding window), its label and overlay PNGs, and the mmseg-style report of an
//! evaluation.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use beit_data::resize::resize;
use beit_data::segmentation::{encode_label_png, generic_palette, LabelMap, ADE20K_PALETTE};
use beit_data::ImageProcessor;
use beit_hub::{resolve_model, ResolveOptions};
use beit_model::segmentation::{
    label_map, resize_bilinear, sliding_windows, BeitForSemanticSegmentation,
};
use beit_model::ForwardOptions;
use beit_train::seg_metrics::SegScores;
use candle::{Device, Tensor};
use image::RgbImage;
use serde::Serialize;

/// A class present in a label map.
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct ClassArea {
    /// Class index.
    pub index: u32,
    /// Name from the config's `id2label`.
    pub label: String,
    /// Number of pixels.
    pub pixels: usize,
}

/// The result for one image.
#[derive(Debug, Serialize)]
pub struct ImageSegmentation {
    /// The image path as given.
    pub image: String,
    /// Original height.
    pub height: usize,
    /// Original width.
    pub width: usize,
    /// `height` rows of `width` class indices.
    pub labels: Vec<Vec<u32>>,
    /// Classes present, largest area first.
    pub classes: Vec<ClassArea>,
}

/// How a label map is computed from an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inference {
    /// The processor's resize, one forward pass.
    Whole,
    /// mmseg's slide inference with square `crop` windows every `stride` pixels, after a
    /// keep-ratio resize into `scale` = `(long, short)` (mmseg's test `img_scale`).
    Sliding {
        /// Window side.
        crop: usize,
        /// Step between windows.
        stride: usize,
        /// `(long, short)` bounds of the resize before the windows (`(4·crop, crop)` for
        /// `--sliding-window`, mmseg's ADE20K `(2560, 640)`).
        scale: (usize, usize),
    },
}

impl Inference {
    /// Parse `--sliding-window CROP,STRIDE` (absent: whole-image inference).
    pub fn parse(spec: Option<&str>, patch_size: usize) -> Result<Self> {
        let Some(spec) = spec else {
            return Ok(Self::Whole);
        };
        let (c, s) = spec
            .split_once(',')
            .with_context(|| format!("--sliding-window `{spec}`: expected CROP,STRIDE"))?;
        let crop: usize = c
            .trim()
            .parse()
            .with_context(|| format!("--sliding-window: invalid crop `{c}`"))?;
        let stride: usize = s
            .trim()
            .parse()
            .with_context(|| format!("--sliding-window: invalid stride `{s}`"))?;
        if crop == 0 || stride == 0 || stride > crop {
            bail!("--sliding-window {crop},{stride}: need 0 < STRIDE <= CROP");
        }
        if !crop.is_multiple_of(patch_size) {
            bail!(
                "--sliding-window: crop {crop} must be a multiple of the patch size {patch_size}"
            );
        }
        Ok(Self::Sliding {
            crop,
            stride,
            scale: (4 * crop, crop),
        })
    }
}

/// The class map (row-major, original resolution) of one image.
pub fn segment_image(
    model: &BeitForSemanticSegmentation,
    processor: &ImageProcessor,
    img: &RgbImage,
    inference: Inference,
    device: &Device,
) -> Result<Vec<u32>> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let logits = match inference {
        Inference::Whole => {
            let pixels = processor.pixel_values(img, device)?.unsqueeze(0)?;
            model
                .forward(&pixels, ForwardOptions::default())?
                .logits
                .squeeze(0)?
        }
        Inference::Sliding {
            crop,
            stride,
            scale,
        } => sliding_logits(model, processor, img, crop, stride, scale, device)?,
    };
    Ok(label_map(&logits, h, w)?)
}

/// mmseg's `slide_inference`: logits `(K, H', W')` of the rescaled image, each window's logits
/// resized to the window and averaged where windows overlap.
fn sliding_logits(
    model: &BeitForSemanticSegmentation,
    processor: &ImageProcessor,
    img: &RgbImage,
    crop: usize,
    stride: usize,
    (max_long, max_short): (usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    // mmseg's Resize(img_scale=(max_long, max_short), keep_ratio=True).
    let (long, short) = (w.max(h) as f64, w.min(h) as f64);
    let scale = (max_long as f64 / long).min(max_short as f64 / short);
    let nw = ((w as f64 * scale + 0.5) as u32).max(1);
    let nh = ((h as f64 * scale + 0.5) as u32).max(1);
    let resized = resize(img, nw, nh, processor.resample)?;
    let plain = ImageProcessor {
        do_resize: false,
        do_center_crop: false,
        ..processor.clone()
    };
    let pixels = plain.pixel_values(&resized, device)?;
    let (nh, nw) = (nh as usize, nw as usize);
    let k = model.num_labels();
    let mut sum = vec![0f32; k * nh * nw];
    let mut count = vec![0u32; nh * nw];
    for (y, x, ch, cw) in sliding_windows(nh, nw, crop, stride) {
        let window = pixels
            .narrow(1, y, ch)?
            .narrow(2, x, cw)?
            .contiguous()?
            .unsqueeze(0)?;
        let logits = model.forward(&window, ForwardOptions::default())?.logits;
        let up = resize_bilinear(&logits, ch, cw)?
            .squeeze(0)?
            .to_device(&Device::Cpu)?
            .to_dtype(candle::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for c in 0..k {
            for r in 0..ch {
                let src = &up[(c * ch + r) * cw..(c * ch + r + 1) * cw];
                let dst = &mut sum[(c * nh + y + r) * nw + x..(c * nh + y + r) * nw + x + cw];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += s;
                }
            }
        }
        for r in 0..ch {
            for v in &mut count[(y + r) * nw + x..(y + r) * nw + x + cw] {
                *v += 1;
            }
        }
    }
    for c in 0..k {
        for (s, &n) in sum[c * nh * nw..(c + 1) * nh * nw].iter_mut().zip(&count) {
            *s /= n as f32;
        }
    }
    Ok(Tensor::from_vec(sum, (k, nh, nw), &Device::Cpu)?)
}

/// Pixel counts of the classes present, largest first (ties by index).
pub fn class_areas(labels: &[u32], name: impl Fn(usize) -> String) -> Vec<ClassArea> {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for &l in labels {
        *counts.entry(l).or_insert(0) += 1;
    }
    let mut areas: Vec<ClassArea> = counts
        .into_iter()
        .map(|(index, pixels)| ClassArea {
            index,
            label: name(index as usize),
            pixels,
        })
        .collect();
    areas.sort_by(|a, b| b.pixels.cmp(&a.pixels).then(a.index.cmp(&b.index)));
    areas
}

/// The colours of `num_labels` classes: ADE20K's palette for 150 classes, else a generic one.
pub fn palette_for(num_labels: usize) -> Vec<[u8; 3]> {
    if num_labels == ADE20K_PALETTE.len() {
        ADE20K_PALETTE.to_vec()
    } else {
        generic_palette(num_labels.clamp(1, 256))
    }
}

/// `<stem>.labels.png` and `<stem>.overlay.png` in `out`.
pub fn write_outputs(
    out: &Path,
    image: &Path,
    img: &RgbImage,
    labels: &[u32],
    classes: &[ClassArea],
    palette: &[[u8; 3]],
) -> Result<()> {
    let stem = image
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("image");
    let (w, h) = img.dimensions();
    let labels_path = out.join(format!("{stem}.labels.png"));
    std::fs::write(&labels_path, label_png(w, h, labels, classes, palette)?)
        .with_context(|| format!("cannot write {}", labels_path.display()))?;
    let overlay_path = out.join(format!("{stem}.overlay.png"));
    overlay(img, labels, classes, palette)?
        .save(&overlay_path)
        .with_context(|| format!("cannot write {}", overlay_path.display()))?;
    Ok(())
}

/// The label map `labels` (`height` rows of `width`) as PNG bytes: an 8-bit palette PNG when
/// every class present has a colour in `palette` (at most 256), else 16-bit greyscale whose
/// value is the class index.
pub fn label_png(
    width: u32,
    height: u32,
    labels: &[u32],
    classes: &[ClassArea],
    palette: &[[u8; 3]],
) -> Result<Vec<u8>> {
    if classes.iter().all(|c| (c.index as usize) < palette.len()) && palette.len() <= 256 {
        let map = LabelMap {
            width,
            height,
            labels: labels.iter().map(|&l| l as u8).collect(),
        };
        return Ok(encode_label_png(&map, palette)?);
    }
    let buf: Vec<u16> = labels
        .iter()
        .map(|&l| l.min(u16::MAX as u32) as u16)
        .collect();
    let mut out = std::io::Cursor::new(Vec::new());
    image::ImageBuffer::<image::Luma<u16>, _>::from_raw(width, height, buf)
        .context("label buffer size")?
        .write_to(&mut out, image::ImageFormat::Png)
        .context("cannot encode the label PNG")?;
    Ok(out.into_inner())
}

/// The embedded legend font (DejaVu Sans, ASCII subset; licence beside the file).
static FONT: &[u8] = include_bytes!("../../beit-train/assets/DejaVuSans-ascii.ttf");
const FONT_NAME: &str = "beit-segment-legend";

/// Class colours blended half-and-half over the photo, with a legend column on the right: a
/// swatch, the class name and its share of the image for every class present (largest first).
pub fn overlay(
    img: &RgbImage,
    labels: &[u32],
    classes: &[ClassArea],
    palette: &[[u8; 3]],
) -> Result<RgbImage> {
    use plotters::prelude::*;
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // A valid TrueType file checked into the repository; failing would only lose the text.
        let _ = plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT);
    });
    const ROW: u32 = 18;
    const LEGEND: u32 = 200;
    const MAX_ROWS: usize = 40;
    let (w, h) = img.dimensions();
    let shown = classes.len().min(MAX_ROWS);
    let rows = shown as u32 + u32::from(classes.len() > MAX_ROWS);
    let (tw, th) = (w + LEGEND, h.max(rows * ROW + 8));
    let mut canvas = RgbImage::from_pixel(tw, th, image::Rgb([255, 255, 255]));
    let colour = |l: u32| palette.get(l as usize).copied().unwrap_or([128, 128, 128]);
    for (i, (px, &l)) in img.pixels().zip(labels).enumerate() {
        let c = colour(l);
        let mixed = [0, 1, 2].map(|k| (px.0[k] as u16 + c[k] as u16).div_ceil(2) as u8);
        canvas.put_pixel(i as u32 % w, i as u32 / w, image::Rgb(mixed));
    }
    let total = labels.len().max(1) as f64;
    {
        let root = BitMapBackend::with_buffer(&mut canvas, (tw, th)).into_drawing_area();
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing the legend: {e}");
        let style = (FONT_NAME, 13).into_font().color(&BLACK);
        for (i, c) in classes.iter().take(shown).enumerate() {
            let y = 4 + i as i32 * ROW as i32;
            let x = w as i32 + 6;
            let [r, g, b] = colour(c.index);
            root.draw(&Rectangle::new(
                [(x, y), (x + 14, y + 14)],
                RGBColor(r, g, b).filled(),
            ))
            .map_err(|e| fail(&e))?;
            let text = format!("{} ({:.1}%)", c.label, 100.0 * c.pixels as f64 / total);
            root.draw(&Text::new(text, (x + 20, y + 1), style.clone()))
                .map_err(|e| fail(&e))?;
        }
        if classes.len() > MAX_ROWS {
            let y = 4 + shown as i32 * ROW as i32;
            let text = format!("... {} more", classes.len() - MAX_ROWS);
            root.draw(&Text::new(text, (w as i32 + 6, y), style.clone()))
                .map_err(|e| fail(&e))?;
        }
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(canvas)
}

/// One class's scores, in percent.
#[derive(Debug, Serialize)]
pub struct ClassScore {
    /// Class index.
    pub index: usize,
    /// Name from `id2label`.
    pub label: String,
    /// IoU x 100 (`null` when the class is neither predicted nor labelled).
    pub iou: Option<f64>,
    /// Accuracy x 100 (`null` when the class is not labelled).
    pub acc: Option<f64>,
}

/// The report, in percent as mmseg prints it.
#[derive(Debug, Serialize)]
pub struct EvalSegReport {
    /// Images evaluated.
    pub images: usize,
    /// Pixels counted (labelled with a class in range).
    pub pixels: u64,
    /// Overall pixel accuracy x 100.
    #[serde(rename = "aAcc")]
    pub aacc: f64,
    /// Mean IoU x 100.
    #[serde(rename = "mIoU")]
    pub miou: f64,
    /// Mean class accuracy x 100.
    #[serde(rename = "mAcc")]
    pub macc: f64,
    /// Whether annotations were reduced (0 ignored, classes shifted down).
    pub reduce_zero_label: bool,
    /// Per-class scores.
    pub per_class: Vec<ClassScore>,
}

/// Whether the checkpoint's `preprocessor_config.json` asks for reduced labels.
pub fn checkpoint_reduces_labels(spec: &str, download: bool) -> Result<bool> {
    let files = resolve_model(spec, &ResolveOptions::default().with_download(download))?;
    let Some(path) = files.preprocessor_config else {
        return Ok(false);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
    Ok(["do_reduce_labels", "reduce_labels"]
        .iter()
        .any(|k| json.get(k).and_then(serde_json::Value::as_bool) == Some(true)))
}

/// Build the report from the scores.
pub fn report(
    scores: &SegScores,
    images: usize,
    pixels: u64,
    reduce_zero_label: bool,
    label: impl Fn(usize) -> String,
) -> EvalSegReport {
    let pct = |v: Option<f64>| v.map(|x| 100.0 * x);
    EvalSegReport {
        images,
        pixels,
        aacc: 100.0 * scores.aacc,
        miou: 100.0 * scores.miou,
        macc: 100.0 * scores.macc,
        reduce_zero_label,
        per_class: scores
            .iou
            .iter()
            .zip(&scores.acc)
            .enumerate()
            .map(|(index, (&iou, &acc))| ClassScore {
                index,
                label: label(index),
                iou: pct(iou),
                acc: pct(acc),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_spec_is_checked() {
        assert_eq!(Inference::parse(None, 16).unwrap(), Inference::Whole);
        assert_eq!(
            Inference::parse(Some("640,426"), 16).unwrap(),
            Inference::Sliding {
                crop: 640,
                stride: 426,
                scale: (2560, 640)
            }
        );
        for bad in ["640", "640,0", "100,426", "641,426", "a,b"] {
            assert!(Inference::parse(Some(bad), 16).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlay_blends_and_adds_a_legend() {
        let img = RgbImage::from_pixel(4, 2, image::Rgb([200, 100, 0]));
        let labels = [0, 0, 1, 1, 1, 1, 1, 1];
        let classes = class_areas(&labels, |i| format!("class {i}"));
        let palette = [[0, 0, 0], [0, 100, 200]];
        let out = overlay(&img, &labels, &classes, &palette).unwrap();
        assert_eq!(out.width(), 4 + 200);
        assert_eq!(out.get_pixel(0, 0).0, [100, 50, 0]);
        assert_eq!(out.get_pixel(3, 1).0, [100, 100, 100]);
        // The legend's swatch of the largest class (class 1) is drawn in its colour.
        assert_eq!(out.get_pixel(4 + 12, 10).0, [0, 100, 200]);
        // Some text pixels are dark.
        let dark = out
            .enumerate_pixels()
            .filter(|(x, _, p)| *x > 4 + 26 && p.0.iter().all(|&v| v < 100))
            .count();
        assert!(dark > 0);
    }

    #[test]
    fn areas_are_sorted_by_size() {
        let a = class_areas(&[2, 2, 1, 0, 2, 1], |i| format!("c{i}"));
        assert_eq!(
            a.iter().map(|c| (c.index, c.pixels)).collect::<Vec<_>>(),
            vec![(2, 3), (1, 2), (0, 1)]
        );
        assert_eq!(a[0].label, "c2");
    }
}
