//! `beit-cli segment`: semantic segmentation of images with a `BeitForSemanticSegmentation`
//! checkpoint, as `transformers`' `BeitImageProcessor` + model + `post_process_semantic_segmentation`
//! (or mmseg's sliding-window inference).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit_data::decode::{decode_file, DecodeOptions};
use beit_data::resize::resize;
use beit_data::segmentation::{generic_palette, write_label_png, LabelMap, ADE20K_PALETTE};
use beit_model::segmentation::{
    label_map, resize_bilinear, segmentation_model, sliding_windows, BeitForSemanticSegmentation,
};
use beit_model::ForwardOptions;
use candle::{Device, Tensor};
use clap::Args;
use image::RgbImage;
use serde::Serialize;

use crate::device::parse_device;
use crate::model_source::load_model;
use crate::processor::ImageProcessor;

/// Segment images: one class per pixel, at each image's original resolution.
///
/// Images are prepared as the checkpoint's `preprocessor_config.json` says (for the ADE20K
/// checkpoints: resize to 640x640, no crop, rescale, normalise); the logits are resized
/// bilinearly to the original size and the most likely class is taken per pixel, as
/// `transformers`' `post_process_semantic_segmentation` with `target_sizes` does.
///
/// Example: `beit-cli segment --model microsoft/beit-base-finetuned-ade-640-640 --out seg/ room.jpg`
#[derive(Args, Debug)]
pub struct SegmentArgs {
    /// Segmentation model: a directory (config.json + weights, HF or unilm/mmseg names) or a hub
    /// id in the local Hugging Face cache (fetch it first with `cargo xtask fetch-weights`).
    #[arg(long)]
    pub model: String,
    /// Write `<stem>.labels.png` (class index per pixel, palette PNG) and `<stem>.overlay.png`
    /// (class colours over the photo, with a legend) for every image into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print exactly one JSON array: per image {"image", "height", "width", "labels": rows of
    /// class indices, "classes": the classes present with their pixel counts}.
    #[arg(long)]
    pub json: bool,
    /// mmseg's sliding-window inference `CROP,STRIDE` (ADE20K: `640,426`): the image is resized
    /// so that its shorter side is CROP (longer side at most 4 x CROP), the model runs on
    /// CROP x CROP windows every STRIDE pixels, and overlapping logits are averaged.
    #[arg(long, value_name = "CROP,STRIDE")]
    pub sliding_window: Option<String>,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Allow downloading a hub checkpoint missing from the cache.
    #[arg(long)]
    pub download: bool,
    /// Images (JPEG, PNG, WebP, BMP; grey and RGBA are converted to RGB).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

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
    /// mmseg's slide inference with square `crop` windows every `stride` pixels.
    Sliding {
        /// Window side.
        crop: usize,
        /// Step between windows.
        stride: usize,
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
        Ok(Self::Sliding { crop, stride })
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
        Inference::Sliding { crop, stride } => {
            sliding_logits(model, processor, img, crop, stride, device)?
        }
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
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    // mmseg's Resize(img_scale=(4 * crop, crop), keep_ratio=True).
    let (long, short) = (w.max(h) as f64, w.min(h) as f64);
    let scale = (4.0 * crop as f64 / long).min(crop as f64 / short);
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

/// Run the command.
pub fn run(args: SegmentArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let loaded = load_model(&args.model, args.download)?;
    let cfg = &loaded.checkpoint.config;
    let inference = Inference::parse(args.sliding_window.as_deref(), cfg.patch_size)?;
    let model = segmentation_model(&loaded.checkpoint, &device)
        .with_context(|| format!("`{}` is not a semantic segmentation checkpoint", args.model))?;
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create output directory {}", out.display()))?;
    }
    let palette = palette_for(model.num_labels());
    let mut results = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let img = decode_file(path, &DecodeOptions::default())?;
        let labels = segment_image(&model, &loaded.processor, &img, inference, &device)
            .with_context(|| format!("segmenting {}", path.display()))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let classes = class_areas(&labels, |i| cfg.label(i));
        if let Some(out) = &args.out {
            write_outputs(out, path, &img, &labels, &classes, &palette)?;
        }
        results.push(ImageSegmentation {
            image: path.display().to_string(),
            height: h,
            width: w,
            labels: labels.chunks(w).map(<[u32]>::to_vec).collect(),
            classes,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        for r in &results {
            println!("{} ({}x{})", r.image, r.width, r.height);
            let total = (r.width * r.height) as f64;
            for c in &r.classes {
                println!(
                    "  {:>6.2}%  {:>5}  {}",
                    100.0 * c.pixels as f64 / total,
                    c.index,
                    c.label
                );
            }
        }
    }
    Ok(())
}

/// `<stem>.labels.png` and `<stem>.overlay.png` in `out`.
fn write_outputs(
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
    if classes.iter().all(|c| (c.index as usize) < palette.len()) && palette.len() <= 256 {
        let map = LabelMap {
            width: w,
            height: h,
            labels: labels.iter().map(|&l| l as u8).collect(),
        };
        write_label_png(&labels_path, &map, palette)?;
    } else {
        // More than 256 classes: 16-bit greyscale, the value is the class index.
        let buf: Vec<u16> = labels
            .iter()
            .map(|&l| l.min(u16::MAX as u32) as u16)
            .collect();
        image::ImageBuffer::<image::Luma<u16>, _>::from_raw(w, h, buf)
            .context("label buffer size")?
            .save(&labels_path)
            .with_context(|| format!("cannot write {}", labels_path.display()))?;
    }
    let overlay_path = out.join(format!("{stem}.overlay.png"));
    overlay(img, labels, classes, palette)?
        .save(&overlay_path)
        .with_context(|| format!("cannot write {}", overlay_path.display()))?;
    Ok(())
}

/// The embedded legend font (DejaVu Sans, ASCII subset; licence beside the file).
static FONT: &[u8] = include_bytes!("../../../beit-train/assets/DejaVuSans-ascii.ttf");
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
                stride: 426
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
