//! The published checkpoints of the BEiT architecture on the hub, with their published results:
//! Microsoft's BEiT, timm's BEiT v1 and v2, data2vec-vision and DiT (the same network under other
//! names; `beit_model::BeitConfig` reads each family's files).

/// What a checkpoint's head does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Masked-image-modeling head (`BeitForMaskedImageModeling`, 8192 visual tokens): the
    /// self-supervised pre-training checkpoint.
    MaskedImageModeling,
    /// ImageNet-22k classifier (21841 classes).
    ImageNet22k,
    /// ImageNet-1k classifier (1000 classes).
    ImageNet1k,
    /// UperNet semantic segmentation head on ADE20K (150 classes).
    Ade20k,
    /// Document classifier on RVL-CDIP (16 classes; DiT).
    RvlCdip,
    /// Pre-trained backbone without a head (features; fine-tune it first).
    Backbone,
}

/// Which library published a checkpoint, and under which name the architecture goes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `microsoft/beit-*` (`transformers` BEiT).
    Beit,
    /// `timm/beit_*` (BEiT v1 weights in timm's layout).
    TimmBeit,
    /// `timm/beitv2_*` (BEiT v2, timm's layout; transformers has no BEiT v2 class).
    TimmBeitV2,
    /// `facebook/data2vec-vision-*` (`transformers` data2vec-vision).
    Data2VecVision,
    /// `microsoft/dit-*` (Document Image Transformer: BEiT with absolute position embeddings).
    Dit,
}

impl Family {
    /// A short label for listings.
    pub fn label(self) -> &'static str {
        match self {
            Family::Beit => "BEiT",
            Family::TimmBeit => "BEiT (timm)",
            Family::TimmBeitV2 => "BEiT v2 (timm)",
            Family::Data2VecVision => "data2vec",
            Family::Dit => "DiT",
        }
    }
}

impl Head {
    /// A short label for listings.
    pub fn label(self) -> &'static str {
        match self {
            Head::MaskedImageModeling => "MIM",
            Head::ImageNet22k => "IN-22k cls",
            Head::ImageNet1k => "IN-1k cls",
            Head::Ade20k => "ADE20K seg",
            Head::RvlCdip => "RVL-CDIP cls",
            Head::Backbone => "backbone",
        }
    }
}

/// One published checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnownCheckpoint {
    /// Hub repository id.
    pub repo: &'static str,
    /// The family (library and naming) it was published in.
    pub family: Family,
    /// `base` (ViT-B/16, 86M) or `large` (ViT-L/16, 304M).
    pub size: &'static str,
    /// The head.
    pub head: Head,
    /// Input resolution in pixels (square).
    pub resolution: u32,
    /// Approximate download size in MB: fp32 parameters plus the int64 relative-position-index
    /// buffers the converted checkpoints carry (an estimate from the architecture; it matches the
    /// published 1.42 GB of large-512 and 900 MB of the ADE20K base checkpoint).
    pub approx_mb: u32,
    /// The published result: ImageNet-1k top-1 (%) for 1k classifiers, ADE20K single-scale mIoU for
    /// segmentation; `None` for checkpoints without a published number of that kind.
    pub published: Option<f32>,
    /// What the published number is, e.g. `IN-1k top-1`.
    pub metric: &'static str,
    /// The unilm file it was converted from (BEiT), or the original release's name.
    pub unilm_name: &'static str,
}

const KNOWN: &[KnownCheckpoint] = &[
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-base-patch16-224-pt22k",
        size: "base",
        head: Head::MaskedImageModeling,
        resolution: 224,
        approx_mb: 370,
        published: None,
        metric: "",
        unilm_name: "beit_base_patch16_224_pt22k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-large-patch16-224-pt22k",
        size: "large",
        head: Head::MaskedImageModeling,
        resolution: 224,
        approx_mb: 1250,
        published: None,
        metric: "",
        unilm_name: "beit_large_patch16_224_pt22k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-base-patch16-224-pt22k-ft22k",
        size: "base",
        head: Head::ImageNet22k,
        resolution: 224,
        approx_mb: 415,
        published: None,
        metric: "",
        unilm_name: "beit_base_patch16_224_pt22k_ft22k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-large-patch16-224-pt22k-ft22k",
        size: "large",
        head: Head::ImageNet22k,
        resolution: 224,
        approx_mb: 1310,
        published: None,
        metric: "",
        unilm_name: "beit_large_patch16_224_pt22k_ft22k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-base-patch16-224",
        size: "base",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 350,
        published: Some(85.2),
        metric: "IN-1k top-1",
        unilm_name: "beit_base_patch16_224_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-base-patch16-384",
        size: "base",
        head: Head::ImageNet1k,
        resolution: 384,
        approx_mb: 380,
        published: Some(86.8),
        metric: "IN-1k top-1",
        unilm_name: "beit_base_patch16_384_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-large-patch16-224",
        size: "large",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 1225,
        published: Some(87.4),
        metric: "IN-1k top-1",
        unilm_name: "beit_large_patch16_224_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-large-patch16-384",
        size: "large",
        head: Head::ImageNet1k,
        resolution: 384,
        approx_mb: 1285,
        published: Some(88.4),
        metric: "IN-1k top-1",
        unilm_name: "beit_large_patch16_384_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-large-patch16-512",
        size: "large",
        head: Head::ImageNet1k,
        resolution: 512,
        approx_mb: 1425,
        published: Some(88.6),
        metric: "IN-1k top-1",
        unilm_name: "beit_large_patch16_512_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-base-finetuned-ade-640-640",
        size: "base",
        head: Head::Ade20k,
        resolution: 640,
        approx_mb: 900,
        published: Some(53.6),
        metric: "ADE20K mIoU",
        unilm_name: "beit_base_patch16_640_pt22k_ft22ktoade20k",
    },
    KnownCheckpoint {
        family: Family::Beit,
        repo: "microsoft/beit-large-finetuned-ade-640-640",
        size: "large",
        head: Head::Ade20k,
        resolution: 640,
        approx_mb: 2260,
        published: Some(56.7),
        metric: "ADE20K mIoU",
        unilm_name: "beit_large_patch16_640_pt22k_ft22ktoade20k",
    },
    KnownCheckpoint {
        repo: "timm/beit_base_patch16_224.in22k_ft_in22k_in1k",
        family: Family::TimmBeit,
        size: "base",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 350,
        published: Some(85.2),
        metric: "IN-1k top-1",
        unilm_name: "beit_base_patch16_224_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        repo: "timm/beit_base_patch16_224.in22k_ft_in22k",
        family: Family::TimmBeit,
        size: "base",
        head: Head::ImageNet22k,
        resolution: 224,
        approx_mb: 415,
        published: None,
        metric: "",
        unilm_name: "beit_base_patch16_224_pt22k_ft22k",
    },
    KnownCheckpoint {
        repo: "timm/beit_base_patch16_384.in22k_ft_in22k_in1k",
        family: Family::TimmBeit,
        size: "base",
        head: Head::ImageNet1k,
        resolution: 384,
        approx_mb: 350,
        published: Some(86.8),
        metric: "IN-1k top-1",
        unilm_name: "beit_base_patch16_384_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        repo: "timm/beit_large_patch16_224.in22k_ft_in22k_in1k",
        family: Family::TimmBeit,
        size: "large",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 1220,
        published: Some(87.4),
        metric: "IN-1k top-1",
        unilm_name: "beit_large_patch16_224_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        repo: "timm/beit_large_patch16_224.in22k_ft_in22k",
        family: Family::TimmBeit,
        size: "large",
        head: Head::ImageNet22k,
        resolution: 224,
        approx_mb: 1310,
        published: None,
        metric: "",
        unilm_name: "beit_large_patch16_224_pt22k_ft22k",
    },
    KnownCheckpoint {
        repo: "timm/beit_large_patch16_384.in22k_ft_in22k_in1k",
        family: Family::TimmBeit,
        size: "large",
        head: Head::ImageNet1k,
        resolution: 384,
        approx_mb: 1220,
        published: Some(88.4),
        metric: "IN-1k top-1",
        unilm_name: "beit_large_patch16_384_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        repo: "timm/beit_large_patch16_512.in22k_ft_in22k_in1k",
        family: Family::TimmBeit,
        size: "large",
        head: Head::ImageNet1k,
        resolution: 512,
        approx_mb: 1225,
        published: Some(88.6),
        metric: "IN-1k top-1",
        unilm_name: "beit_large_patch16_512_pt22k_ft22kto1k",
    },
    KnownCheckpoint {
        repo: "timm/beitv2_base_patch16_224.in1k_ft_in1k",
        family: Family::TimmBeitV2,
        size: "base",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 350,
        published: Some(85.5),
        metric: "IN-1k top-1",
        unilm_name: "beitv2_base_patch16_224_pt1k_ft1k",
    },
    KnownCheckpoint {
        repo: "timm/beitv2_base_patch16_224.in1k_ft_in22k_in1k",
        family: Family::TimmBeitV2,
        size: "base",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 350,
        published: None,
        metric: "",
        unilm_name: "beitv2_base_patch16_224_pt1k_ft21kto1k",
    },
    KnownCheckpoint {
        repo: "timm/beitv2_base_patch16_224.in1k_ft_in22k",
        family: Family::TimmBeitV2,
        size: "base",
        head: Head::ImageNet22k,
        resolution: 224,
        approx_mb: 415,
        published: None,
        metric: "",
        unilm_name: "beitv2_base_patch16_224_pt1k_ft21k",
    },
    KnownCheckpoint {
        repo: "timm/beitv2_large_patch16_224.in1k_ft_in1k",
        family: Family::TimmBeitV2,
        size: "large",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 1220,
        published: Some(87.3),
        metric: "IN-1k top-1",
        unilm_name: "beitv2_large_patch16_224_pt1k_ft1k",
    },
    KnownCheckpoint {
        repo: "timm/beitv2_large_patch16_224.in1k_ft_in22k_in1k",
        family: Family::TimmBeitV2,
        size: "large",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 1220,
        published: None,
        metric: "",
        unilm_name: "beitv2_large_patch16_224_pt1k_ft21kto1k",
    },
    KnownCheckpoint {
        repo: "timm/beitv2_large_patch16_224.in1k_ft_in22k",
        family: Family::TimmBeitV2,
        size: "large",
        head: Head::ImageNet22k,
        resolution: 224,
        approx_mb: 1310,
        published: None,
        metric: "",
        unilm_name: "beitv2_large_patch16_224_pt1k_ft21k",
    },
    KnownCheckpoint {
        repo: "facebook/data2vec-vision-base",
        family: Family::Data2VecVision,
        size: "base",
        head: Head::Backbone,
        resolution: 224,
        approx_mb: 345,
        published: None,
        metric: "",
        unilm_name: "data2vec_vision_base_pt1k",
    },
    KnownCheckpoint {
        repo: "facebook/data2vec-vision-base-ft1k",
        family: Family::Data2VecVision,
        size: "base",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 350,
        published: Some(84.2),
        metric: "IN-1k top-1",
        unilm_name: "data2vec_vision_base_ft1k",
    },
    KnownCheckpoint {
        repo: "facebook/data2vec-vision-large",
        family: Family::Data2VecVision,
        size: "large",
        head: Head::Backbone,
        resolution: 224,
        approx_mb: 1215,
        published: None,
        metric: "",
        unilm_name: "data2vec_vision_large_pt1k",
    },
    KnownCheckpoint {
        repo: "facebook/data2vec-vision-large-ft1k",
        family: Family::Data2VecVision,
        size: "large",
        head: Head::ImageNet1k,
        resolution: 224,
        approx_mb: 1220,
        published: Some(86.6),
        metric: "IN-1k top-1",
        unilm_name: "data2vec_vision_large_ft1k",
    },
    KnownCheckpoint {
        repo: "microsoft/dit-base",
        family: Family::Dit,
        size: "base",
        head: Head::MaskedImageModeling,
        resolution: 224,
        approx_mb: 370,
        published: None,
        metric: "",
        unilm_name: "dit-base-224-p16-500k",
    },
    KnownCheckpoint {
        repo: "microsoft/dit-large",
        family: Family::Dit,
        size: "large",
        head: Head::MaskedImageModeling,
        resolution: 224,
        approx_mb: 1250,
        published: None,
        metric: "",
        unilm_name: "dit-large-224-p16-500k",
    },
    KnownCheckpoint {
        repo: "microsoft/dit-base-finetuned-rvlcdip",
        family: Family::Dit,
        size: "base",
        head: Head::RvlCdip,
        resolution: 224,
        approx_mb: 345,
        published: Some(92.11),
        metric: "RVL-CDIP acc",
        unilm_name: "dit-base-224-p16-rvlcdip",
    },
    KnownCheckpoint {
        repo: "microsoft/dit-large-finetuned-rvlcdip",
        family: Family::Dit,
        size: "large",
        head: Head::RvlCdip,
        resolution: 224,
        approx_mb: 1215,
        published: Some(92.69),
        metric: "RVL-CDIP acc",
        unilm_name: "dit-large-224-p16-rvlcdip",
    },
];

/// The published checkpoints: `microsoft/beit-*` (base and large MIM pre-training (pt22k), the
/// ImageNet-22k classifiers (pt22k-ft22k), the ImageNet-1k classifiers at 224/384/512, the ADE20K
/// segmenters at 640), timm's BEiT v1 and v2 classifiers, data2vec-vision (pre-trained backbones and
/// ImageNet-1k classifiers) and DiT (MIM and RVL-CDIP classifiers).
pub fn known_checkpoints() -> &'static [KnownCheckpoint] {
    KNOWN
}

/// The known checkpoint with this repo id, if any.
pub fn find_known(repo: &str) -> Option<&'static KnownCheckpoint> {
    KNOWN.iter().find(|k| k.repo == repo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for k in known_checkpoints() {
            assert!(crate::spec::is_repo_id(k.repo), "{}", k.repo);
            assert!(seen.insert(k.repo), "duplicate {}", k.repo);
            // Only 1k classifiers, segmenters and document classifiers carry a published number
            // (not every one: timm's intermediate-fine-tuned v2 weights have none in the paper).
            let may_have_number = matches!(k.head, Head::ImageNet1k | Head::Ade20k | Head::RvlCdip);
            assert!(may_have_number || k.published.is_none(), "{}", k.repo);
            assert_eq!(k.published.is_some(), !k.metric.is_empty(), "{}", k.repo);
            if k.family == Family::Beit && k.head == Head::ImageNet1k {
                assert!(k.published.is_some(), "{}", k.repo);
            }
        }
        assert_eq!(
            find_known("microsoft/beit-base-patch16-224")
                .unwrap()
                .published,
            Some(85.2)
        );
    }
}
