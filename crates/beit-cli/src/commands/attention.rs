//! `beit-cli attention`: self-attention maps of a query (CLS or a patch) over an image, per head and
//! averaged, as heat-map overlays: the paper's Figure 2 analysis.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use beit_data::decode::{decode_file, DecodeOptions};
use beit_model::ForwardOptions;
use clap::Args;
use image::{Rgb, RgbImage};

use beit_recipes::load_model;
use beit_recipes::parse_device;

/// Draw self-attention maps of a query patch (or CLS) over an image.
///
/// Writes one PNG: the input as the model sees it, the head-averaged map, then one map per head,
/// each as a heat-map overlay (bright = attended).
#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Model directory or hub id (any BEiT checkpoint: pre-trained or fine-tuned).
    #[arg(long)]
    pub model: String,
    /// The image.
    #[arg(long)]
    pub image: PathBuf,
    /// Output PNG.
    #[arg(long, default_value = "attention.png")]
    pub out: PathBuf,
    /// Block whose attention is drawn (0-based; default: the last).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Query token: `cls`, or a patch as `x,y` (column, row in the patch grid).
    #[arg(long, default_value = "cls")]
    pub query: String,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Allow downloading a hub checkpoint missing from the cache.
    #[arg(long)]
    pub download: bool,
}

/// Run the command.
pub fn run(args: AttentionArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let loaded = load_model(&args.model, args.download)?;
    let cfg = loaded.checkpoint.config.clone();
    let backbone = loaded.checkpoint.backbone(&device)?;
    let img = decode_file(&args.image, &DecodeOptions::default())?;
    let shown = loaded.processor.geometry(&img)?;
    let pixels = loaded.processor.pixel_values(&img, &device)?.unsqueeze(0)?;
    let (_, _, h, w) = pixels.dims4()?;
    let (gh, gw) = (h / cfg.patch_size, w / cfg.patch_size);
    let layer = args.layer.unwrap_or(cfg.num_hidden_layers - 1);
    if layer >= cfg.num_hidden_layers {
        bail!(
            "--layer {layer}: the model has {} blocks (0..{})",
            cfg.num_hidden_layers,
            cfg.num_hidden_layers - 1
        );
    }
    let query = parse_query(&args.query, gh, gw)?;
    let opts = ForwardOptions {
        output_attentions: true,
        ..ForwardOptions::default()
    };
    let out = backbone.forward(&pixels, None, opts)?;
    // (1, H, T, T) -> the query's row over the patch keys (CLS key dropped): (H, gh*gw).
    let probs = out.attentions[layer]
        .squeeze(0)?
        .narrow(1, query, 1)?
        .squeeze(1)?;
    let maps = probs
        .narrow(1, 1, gh * gw)?
        .to_dtype(candle::DType::F32)?
        .to_vec2::<f32>()?;
    let heads = maps.len();
    let mean: Vec<f32> = (0..gh * gw)
        .map(|i| maps.iter().map(|m| m[i]).sum::<f32>() / heads as f32)
        .collect();
    let mut panels = vec![shown.clone(), overlay(&shown, &mean, gh, gw)];
    panels.extend(maps.iter().map(|m| overlay(&shown, m, gh, gw)));
    let sheet = contact_sheet(&panels, 7);
    sheet
        .save(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} (layer {layer}, query {}, {heads} heads + mean)",
        args.out.display(),
        args.query
    );
    Ok(())
}

/// Token index of `cls` (0) or patch `x,y` (1 + y*gw + x).
fn parse_query(q: &str, gh: usize, gw: usize) -> Result<usize> {
    if q.eq_ignore_ascii_case("cls") {
        return Ok(0);
    }
    let (x, y) = q
        .split_once(',')
        .and_then(|(x, y)| {
            Some((
                x.trim().parse::<usize>().ok()?,
                y.trim().parse::<usize>().ok()?,
            ))
        })
        .with_context(|| format!("--query `{q}`: expected `cls` or `x,y`"))?;
    if x >= gw || y >= gh {
        bail!("--query {x},{y} is outside the {gw}x{gh} patch grid");
    }
    Ok(1 + y * gw + x)
}

/// Blend a min-max normalised map (nearest-upsampled to the image) over a dimmed image.
fn overlay(img: &RgbImage, map: &[f32], gh: usize, gw: usize) -> RgbImage {
    let (lo, hi) = map
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let span = (hi - lo).max(1e-12);
    let (w, h) = img.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let gy = (y as usize * gh / h as usize).min(gh - 1);
        let gx = (x as usize * gw / w as usize).min(gw - 1);
        let t = (map[gy * gw + gx] - lo) / span;
        let c = heat(t);
        let p = img.get_pixel(x, y);
        let mix = |a: u8, b: u8| (0.45 * a as f32 + 0.55 * b as f32) as u8;
        Rgb([mix(p[0], c[0]), mix(p[1], c[1]), mix(p[2], c[2])])
    })
}

/// A black-red-yellow-white colour ramp for t in [0, 1].
fn heat(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let r = (3.0 * t).min(1.0);
    let g = (3.0 * t - 1.0).clamp(0.0, 1.0);
    let b = (3.0 * t - 2.0).clamp(0.0, 1.0);
    [(255.0 * r) as u8, (255.0 * g) as u8, (255.0 * b) as u8]
}

/// Panels of equal size in rows of `cols`, with a 4 px white gap.
fn contact_sheet(panels: &[RgbImage], cols: usize) -> RgbImage {
    let (pw, ph) = panels[0].dimensions();
    let gap = 4;
    let cols = cols.min(panels.len()) as u32;
    let rows = panels.len().div_ceil(cols as usize) as u32;
    let mut sheet = RgbImage::from_pixel(
        cols * (pw + gap) + gap,
        rows * (ph + gap) + gap,
        Rgb([255, 255, 255]),
    );
    for (i, p) in panels.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(
            &mut sheet,
            p,
            (gap + c * (pw + gap)) as i64,
            (gap + r * (ph + gap)) as i64,
        );
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_to_token_indices() {
        assert_eq!(parse_query("cls", 14, 14).unwrap(), 0);
        assert_eq!(parse_query("3,2", 14, 14).unwrap(), 1 + 2 * 14 + 3);
        assert!(parse_query("14,0", 14, 14).is_err());
        assert!(parse_query("center", 14, 14).is_err());
    }
}
