//! Complete per-sample pipelines: evaluation, fine-tuning, and BEiT's two-view pre-training
//! transform. Each turns a decoded RGB image into normalised CHW buffers.

use image::RgbImage;
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::color_jitter::ColorJitter;
use crate::error::{DataError, Result};
use crate::geometry::{center_crop, hflip, resize_shorter_side, CropBox, RandomResizedCrop};
use crate::normalize::{map_pixels, Chw, Normalize};
use crate::rand_augment::RandAugment;
use crate::random_erasing::RandomErasing;
use crate::resize::{resize, resize_region, Filter};

/// The output of a transform: the model input and, for BEiT pre-training, the tokenizer's view.
#[derive(Debug, Clone)]
pub struct Views {
    /// The image for the model, normalised, `(3, H, W)`.
    pub image: Chw,
    /// The same crop for the tokenizer (DALL-E `map_pixels`), `(3, h, w)`, when the transform makes one.
    pub tokenizer: Option<Chw>,
}

/// A per-sample transform. Implementations draw all randomness from `rng`, which the loader seeds
/// from `(seed, epoch, sample index)`.
pub trait Transform: Send + Sync {
    /// Transform one image.
    fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> Result<Views>;

    /// Output `(height, width)` of [`Views::image`].
    fn output_size(&self) -> (usize, usize);

    /// Output `(height, width)` of [`Views::tokenizer`], if produced.
    fn tokenizer_size(&self) -> Option<(usize, usize)> {
        None
    }
}

/// How evaluation resizes an image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalResize {
    /// timm/unilm: resize the shorter side to `floor(size / crop_pct)`, then centre-crop `size`.
    ShorterSideCrop {
        /// Fraction of the resized image kept by the centre crop (0.875 for unilm at 224, 0.9 timm).
        crop_pct: f64,
    },
    /// Hugging Face processors: resize straight to `size` x `size`, no crop.
    Squash,
}

/// Deterministic evaluation transform: resize (+ centre crop), `ToTensor`, `Normalize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalTransform {
    /// Output side in pixels.
    pub size: u32,
    /// Resize mode.
    pub resize: EvalResize,
    /// Resampling filter.
    pub interpolation: Filter,
    /// Normalisation.
    pub normalize: Normalize,
}

impl EvalTransform {
    /// unilm BEiT evaluation: shorter side to `int(size / 0.875)` bicubic, centre crop, mean/std 0.5.
    pub fn unilm(size: u32) -> Self {
        EvalTransform {
            size,
            resize: EvalResize::ShorterSideCrop { crop_pct: 0.875 },
            interpolation: Filter::Bicubic,
            normalize: Normalize::HALF,
        }
    }

    /// Hugging Face `BeitImageProcessor` as published with the checkpoints: squash-resize bilinear,
    /// mean/std 0.5.
    pub fn huggingface(size: u32) -> Self {
        EvalTransform {
            size,
            resize: EvalResize::Squash,
            interpolation: Filter::Bilinear,
            normalize: Normalize::HALF,
        }
    }

    /// The resized, cropped 8-bit image before normalisation.
    pub fn geometry(&self, img: &RgbImage) -> Result<RgbImage> {
        match self.resize {
            EvalResize::Squash => resize(img, self.size, self.size, self.interpolation),
            EvalResize::ShorterSideCrop { crop_pct } => {
                if !(crop_pct > 0.0 && crop_pct <= 1.0) {
                    return Err(DataError::param(
                        "crop_pct",
                        format!("{crop_pct} must be in (0, 1]"),
                    ));
                }
                let scale = (self.size as f64 / crop_pct).floor() as u32;
                let resized = resize_shorter_side(img, scale, self.interpolation)?;
                Ok(center_crop(&resized, self.size, self.size))
            }
        }
    }
}

impl Transform for EvalTransform {
    fn apply(&self, img: &RgbImage, _rng: &mut StdRng) -> Result<Views> {
        Ok(Views {
            image: self.normalize.to_chw(&self.geometry(img)?),
            tokenizer: None,
        })
    }

    fn output_size(&self) -> (usize, usize) {
        (self.size as usize, self.size as usize)
    }
}

/// Fine-tuning transform in timm's order (`create_transform(is_training=True)`):
/// `RandomResizedCrop` → horizontal flip → `ColorJitter` or RandAugment → `ToTensor` → `Normalize` →
/// random erasing. As in timm, colour jitter is not applied when RandAugment is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainTransform {
    /// The random crop and its output size.
    pub crop: RandomResizedCrop,
    /// Probability of a horizontal flip.
    pub hflip: f64,
    /// Colour jitter (ignored when `rand_augment` is set).
    pub color_jitter: Option<ColorJitter>,
    /// RandAugment policy, e.g. `rand-m9-mstd0.5-inc1`.
    pub rand_augment: Option<RandAugment>,
    /// Normalisation.
    pub normalize: Normalize,
    /// Random erasing on the normalised tensor.
    pub random_erasing: Option<RandomErasing>,
}

impl TrainTransform {
    /// The BEiT fine-tuning recipe: RRC bicubic, flip 0.5, `rand-m9-mstd0.5-inc1`, erasing p=0.25
    /// (pixel mode), mean/std 0.5.
    pub fn beit_finetune(size: u32) -> Self {
        TrainTransform {
            crop: RandomResizedCrop::new(size),
            hflip: 0.5,
            color_jitter: Some(ColorJitter::uniform(0.4)),
            rand_augment: Some(RandAugment::parse("rand-m9-mstd0.5-inc1").expect("valid policy")),
            normalize: Normalize::HALF,
            random_erasing: Some(RandomErasing::default()),
        }
    }

    /// Check every parameter.
    pub fn validate(&self) -> Result<()> {
        self.crop.validate()?;
        check_prob("hflip", self.hflip)?;
        if let Some(cj) = &self.color_jitter {
            cj.validate()?;
        }
        if let Some(re) = &self.random_erasing {
            re.validate()?;
        }
        self.normalize.validate()
    }
}

fn check_prob(name: &str, p: f64) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(DataError::param(
            name,
            format!("probability {p} not in [0, 1]"),
        ))
    }
}

impl Transform for TrainTransform {
    fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> Result<Views> {
        let (w, h) = img.dimensions();
        let b = self.crop.sample_box(w, h, rng);
        let mut out = self.crop.apply_box(img, b)?;
        if rng.random::<f64>() < self.hflip {
            hflip(&mut out);
        }
        if let Some(ra) = &self.rand_augment {
            out = ra.apply(&out, rng);
        } else if let Some(cj) = &self.color_jitter {
            out = cj.apply(&out, rng);
        }
        let mut chw = self.normalize.to_chw(&out);
        if let Some(re) = &self.random_erasing {
            re.apply(&mut chw, rng);
        }
        Ok(Views {
            image: chw,
            tokenizer: None,
        })
    }

    fn output_size(&self) -> (usize, usize) {
        (self.crop.size.0 as usize, self.crop.size.1 as usize)
    }
}

/// BEiT pre-training transform (unilm `DataAugmentationForBEiT`): `ColorJitter` → horizontal flip →
/// ONE `RandomResizedCrop` box, resized twice: to `crop.size` with `crop.interpolation` (bicubic
/// 224) for the patches, normalised; and to `second_size` with `second_interpolation` (Lanczos 112)
/// for the tokenizer, through DALL-E `map_pixels`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TwoViewTransform {
    /// Colour jitter on the full image (0.4, 0.4, 0.4 in BEiT).
    pub color_jitter: Option<ColorJitter>,
    /// Probability of a horizontal flip.
    pub hflip: f64,
    /// The crop, with the patch view's size and filter.
    pub crop: RandomResizedCrop,
    /// Tokenizer view `(height, width)`.
    pub second_size: (u32, u32),
    /// Tokenizer view filter.
    pub second_interpolation: Filter,
    /// Normalisation of the patch view.
    pub normalize: Normalize,
}

impl TwoViewTransform {
    /// The BEiT recipe: jitter 0.4, flip 0.5, 224 bicubic + 112 Lanczos, mean/std 0.5.
    pub fn beit(size: u32, second_size: u32) -> Self {
        TwoViewTransform {
            color_jitter: Some(ColorJitter::uniform(0.4)),
            hflip: 0.5,
            crop: RandomResizedCrop::new(size),
            second_size: (second_size, second_size),
            second_interpolation: Filter::Lanczos,
            normalize: Normalize::HALF,
        }
    }

    /// Check every parameter.
    pub fn validate(&self) -> Result<()> {
        self.crop.validate()?;
        check_prob("hflip", self.hflip)?;
        if let Some(cj) = &self.color_jitter {
            cj.validate()?;
        }
        if self.second_size.0 == 0 || self.second_size.1 == 0 {
            return Err(DataError::param("second_size", "must be positive"));
        }
        self.normalize.validate()
    }

    /// Both views as 8-bit images for a given crop box and flip: the deterministic part, exposed for
    /// parity tests against torchvision.
    pub fn views_for_box(
        &self,
        img: &RgbImage,
        b: CropBox,
        flip: bool,
        jitter: Option<&crate::color_jitter::JitterDraw>,
    ) -> Result<(RgbImage, RgbImage)> {
        let (w, _) = img.dimensions();
        let (first, second) = (self.crop.size, self.second_size);
        if jitter.is_none() && !flip {
            // Nothing pixel-wise to do: resample the region straight from the source.
            let region = (b.left, b.top, b.width, b.height);
            return Ok((
                resize_region(img, region, first.1, first.0, self.crop.interpolation)?,
                resize_region(img, region, second.1, second.0, self.second_interpolation)?,
            ));
        }
        // The box is drawn on the flipped image: its source is the mirrored box.
        let src = if flip { b.flipped(w) } else { b };
        let mut region = match jitter {
            Some(j) => j.apply_region(img, src),
            None => {
                image::imageops::crop_imm(img, src.left, src.top, src.width, src.height).to_image()
            }
        };
        if flip {
            hflip(&mut region);
        }
        Ok((
            resize(&region, first.1, first.0, self.crop.interpolation)?,
            resize(&region, second.1, second.0, self.second_interpolation)?,
        ))
    }
}

impl Transform for TwoViewTransform {
    fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> Result<Views> {
        // Draw in the order of the torchvision pipeline: jitter, flip, crop.
        let jitter = self.color_jitter.as_ref().map(|cj| cj.sample(rng));
        let flip = rng.random::<f64>() < self.hflip;
        let (w, h) = img.dimensions();
        let b = self.crop.sample_box(w, h, rng);
        let (a, t) = self.views_for_box(img, b, flip, jitter.as_ref())?;
        Ok(Views {
            image: self.normalize.to_chw(&a),
            tokenizer: Some(map_pixels(&t)),
        })
    }

    fn output_size(&self) -> (usize, usize) {
        (self.crop.size.0 as usize, self.crop.size.1 as usize)
    }

    fn tokenizer_size(&self) -> Option<(usize, usize)> {
        Some((self.second_size.0 as usize, self.second_size.1 as usize))
    }
}
