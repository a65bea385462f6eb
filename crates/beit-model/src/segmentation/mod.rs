//! Semantic segmentation: `BeitForSemanticSegmentation` (BEiT backbone, four-scale neck, UperNet
//! decode head, optional FCN auxiliary head) exactly as `transformers` computes it, with the
//! operations candle lacks (differentiable bilinear resizing and adaptive average pooling,
//! BatchNorm with running statistics, synchronised across processes in data-parallel training)
//! and the checkpoint layouts of the hub and of unilm/mmseg.
//!
//! See `docs/segmentation.md` for the architecture, the layer-indexing difference with unilm and
//! the key names.

pub mod blocks;
pub mod config;
pub mod heads;
pub mod load;
pub mod model;
pub mod postprocess;
pub mod resize;
pub mod sync_bn;

pub use blocks::{is_buffer, BatchNorm2d};
pub use config::SegmentationConfig;
pub use load::{
    expected_segmentation_parameters, normalize_segmentation_names, save_segmentation_hf,
    segmentation_model, segmentation_model_in_varmap,
};
pub use model::{upsampled_cross_entropy, BeitForSemanticSegmentation, SegmentationOutput};
pub use postprocess::{label_map, sliding_windows};
pub use resize::{adaptive_avg_pool2d, resize_bilinear};
pub use sync_bn::BatchStatsSync;
