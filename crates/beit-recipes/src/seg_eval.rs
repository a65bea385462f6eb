//! Scoring a segmentation model on a labelled split, as mmseg accumulates it: the one loop behind
//! `beit-cli eval-seg` and the validation of segmentation fine-tuning.

use anyhow::{Context, Result};
use beit_data::segmentation::{LabelMap, IGNORE_INDEX};
use beit_data::ImageProcessor;
use beit_model::segmentation::BeitForSemanticSegmentation;
use beit_train::seg_metrics::SegMetrics;
use candle::Device;
use image::RgbImage;

use crate::segment::{segment_image, Inference};

/// A model and how it turns an image into a label map.
pub struct SegPredictor<'a> {
    /// The model.
    pub model: &'a BeitForSemanticSegmentation,
    /// Its preprocessing.
    pub processor: &'a ImageProcessor,
    /// Whole-image or sliding-window inference.
    pub inference: Inference,
    /// Where it runs.
    pub device: &'a Device,
}

/// Accumulate the scores of the pairs `indices` of a split: each image segmented as
/// [`segment_image`] does, compared with its annotation (pixels labelled [`IGNORE_INDEX`] are
/// ignored), the intersections and unions summed over the split before any division. `load(i)`
/// reads pair `i` and `name(i)` names it in errors. With `log_every`, a running mIoU is logged
/// every that many images and after the last.
pub fn score_pairs(
    p: &SegPredictor<'_>,
    indices: &[usize],
    load: impl Fn(usize) -> Result<(RgbImage, LabelMap)>,
    name: impl Fn(usize) -> String,
    log_every: Option<usize>,
) -> Result<SegMetrics> {
    let mut metrics = SegMetrics::new(p.model.num_labels(), IGNORE_INDEX as u32);
    let started = std::time::Instant::now();
    for (k, &i) in indices.iter().enumerate() {
        let (img, labels) = load(i)?;
        let pred = segment_image(p.model, p.processor, &img, p.inference, p.device)
            .with_context(|| format!("segmenting {}", name(i)))?;
        let gt: Vec<u32> = labels.labels.iter().map(|&v| v as u32).collect();
        metrics
            .update(&pred, &gt)
            .map_err(|e| anyhow::anyhow!("{}: {e}", name(i)))?;
        let done = k + 1;
        if log_every.is_some_and(|n| done % n.max(1) == 0 || done == indices.len()) {
            tracing::info!(
                "{done}/{} images, running mIoU {:.2} ({:.1} s)",
                indices.len(),
                100.0 * metrics.scores().miou,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(metrics)
}
