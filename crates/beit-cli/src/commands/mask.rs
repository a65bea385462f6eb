//! `beit-cli mask`: draw BEiT's blockwise (or uniform random) MIM masks and show them as text,
//! JSON or a PNG grid, to see what the pre-training hides.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use beit_mim::stats::{connected_components, masked_count, render_ascii};
use beit_mim::{MaskBatch, MaskStrategy, MaskingConfig};
use clap::Args;
use image::{Rgb, RgbImage};

/// Arguments of `beit-cli mask`.
#[derive(Args, Debug)]
pub struct MaskArgs {
    /// Patch grid: `N` for N x N, or `HxW` (image size / patch size: 14 for 224/16, 24 for 384/16).
    #[arg(long, default_value = "14", value_parser = parse_grid)]
    pub input_size: [usize; 2],
    /// Patches to mask per image (75 of 196 = 40% in BEiT).
    #[arg(long, default_value_t = 75)]
    pub num_masking_patches: usize,
    /// Smallest block area, in patches (blockwise only).
    #[arg(long, default_value_t = 16)]
    pub min_num_patches: usize,
    /// Largest block area, in patches (blockwise only; default: the target).
    #[arg(long)]
    pub max_num_patches: Option<usize>,
    /// Lower end of the block aspect-ratio range; the upper end is its inverse unless `--max-aspect`.
    #[arg(long, default_value_t = 0.3)]
    pub min_aspect: f64,
    /// Upper end of the block aspect-ratio range (blockwise only).
    #[arg(long)]
    pub max_aspect: Option<f64>,
    /// Uniform random masking with exactly the target count (the paper's ablation).
    #[arg(long)]
    pub random: bool,
    /// Number of masks to draw.
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Random seed; mask `i` is a pure function of (seed, i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print exactly one JSON object `{"input_size": [h, w], "masks": [[0/1 ...], ...]}` on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also draw the masks as a grid of images into this PNG (masked patches grey).
    #[arg(long)]
    pub png: Option<PathBuf>,
    /// Pixels per patch side in the PNG.
    #[arg(long, default_value_t = 16)]
    pub cell_px: u32,
}

fn parse_grid(s: &str) -> std::result::Result<[usize; 2], String> {
    let parse = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{s}` is not a grid size: expected N or HxW, e.g. 14 or 14x10"))
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok([parse(h)?, parse(w)?]),
        None => {
            let n = parse(s)?;
            Ok([n, n])
        }
    }
}

/// Run the command.
pub fn run(args: MaskArgs) -> Result<()> {
    if args.samples == 0 {
        bail!("`--samples` must be at least 1");
    }
    let cfg = MaskingConfig {
        strategy: if args.random {
            MaskStrategy::Random
        } else {
            MaskStrategy::Blockwise
        },
        input_size: args.input_size,
        num_masking_patches: args.num_masking_patches,
        min_num_patches: args.min_num_patches,
        max_num_patches: args.max_num_patches,
        min_aspect: args.min_aspect,
        max_aspect: args.max_aspect,
    };
    let sampler = cfg.build().context("cannot build the mask generator")?;
    let batch = sampler.sample_batch(args.seed, 0, args.samples);
    log_summary(&batch, args.num_masking_patches);

    if let Some(path) = &args.png {
        let img = draw_grid(&batch, args.cell_px)?;
        img.save(path)
            .with_context(|| format!("cannot write PNG `{}`", path.display()))?;
        tracing::info!("wrote {} masks to {}", batch.batch_size(), path.display());
    }
    let text = if args.json {
        let masks: Vec<Vec<u8>> = batch
            .masks
            .iter()
            .map(|m| m.iter().map(|&b| u8::from(b)).collect())
            .collect();
        let doc = serde_json::json!({ "input_size": args.input_size, "masks": masks });
        format!("{doc}\n")
    } else if args.png.is_none() {
        let (h, w) = (batch.height, batch.width);
        let mut text = String::new();
        for (i, m) in batch.masks.iter().enumerate() {
            text += &format!(
                "mask {i}: {} of {} patches, {} block(s)\n",
                masked_count(m),
                h * w,
                connected_components(m, h, w)
            );
            text += &render_ascii(m, h, w);
        }
        text
    } else {
        String::new()
    };
    write_stdout(&text)
}

/// Write to stdout; a closed pipe (`beit-cli mask ... | head`) ends the command quietly instead of
/// panicking like `println!` would.
fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn log_summary(batch: &MaskBatch, target: usize) {
    let counts = batch.counts();
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<usize>() as f64 / n;
    let exact = counts.iter().filter(|&&c| c == target).count() as f64 / n;
    let blocks = batch
        .masks
        .iter()
        .map(|m| connected_components(m, batch.height, batch.width))
        .sum::<usize>() as f64
        / n;
    tracing::info!(
        "{} masks on a {}x{} grid: mean {mean:.2} masked (target {target}), {:.1}% exactly on target, {blocks:.2} connected groups on average",
        counts.len(),
        batch.height,
        batch.width,
        100.0 * exact
    );
}

/// Largest PNG side we agree to allocate.
const MAX_PNG_SIDE: u64 = 16_384;

/// Masks side by side in a near-square grid; each mask is a tile of `cell` px patches with thin
/// grid lines, masked patches grey, visible ones white.
fn draw_grid(batch: &MaskBatch, cell: u32) -> Result<RgbImage> {
    if cell < 2 {
        bail!("`--cell-px` must be at least 2, got {cell}");
    }
    let (h, w) = (batch.height as u64, batch.width as u64);
    let n = batch.batch_size() as u64;
    let cols = (n as f64).sqrt().ceil() as u64;
    let rows = n.div_ceil(cols);
    let gap = u64::from(cell / 2).max(4);
    // One extra pixel closes the grid lines on the right and bottom.
    let (tile_w, tile_h) = (w * u64::from(cell) + 1, h * u64::from(cell) + 1);
    let width = cols * tile_w + (cols + 1) * gap;
    let height = rows * tile_h + (rows + 1) * gap;
    if width > MAX_PNG_SIDE || height > MAX_PNG_SIDE {
        bail!(
            "the PNG would be {width}x{height} px (limit {MAX_PNG_SIDE}): use fewer --samples or a smaller --cell-px"
        );
    }
    let background = Rgb([255u8, 255, 255]);
    let visible = Rgb([250u8, 250, 250]);
    let masked = Rgb([128u8, 128, 128]);
    let line = Rgb([200u8, 200, 200]);
    let mut img = RgbImage::from_pixel(width as u32, height as u32, background);
    for (k, mask) in batch.masks.iter().enumerate() {
        let (tr, tc) = (k as u64 / cols, k as u64 % cols);
        let x0 = gap + tc * (tile_w + gap);
        let y0 = gap + tr * (tile_h + gap);
        for y in 0..tile_h {
            for x in 0..tile_w {
                let (r, c) = (y / u64::from(cell), x / u64::from(cell));
                let on_line = y % u64::from(cell) == 0 || x % u64::from(cell) == 0;
                let colour = if on_line {
                    line
                } else if mask[(r * w + c) as usize] {
                    masked
                } else {
                    visible
                };
                img.put_pixel((x0 + x) as u32, (y0 + y) as u32, colour);
            }
        }
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_sizes_parse() {
        assert_eq!(parse_grid("14").unwrap(), [14, 14]);
        assert_eq!(parse_grid("7x5").unwrap(), [7, 5]);
        assert!(parse_grid("a").unwrap_err().contains("HxW"));
    }
}
