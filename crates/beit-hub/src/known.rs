//! The BEiT checkpoints Microsoft published on the hub, with their published results.

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
}

impl Head {
    /// A short label for listings.
    pub fn label(self) -> &'static str {
        match self {
            Head::MaskedImageModeling => "MIM (pt22k)",
            Head::ImageNet22k => "IN-22k cls",
            Head::ImageNet1k => "IN-1k cls",
            Head::Ade20k => "ADE20K seg",
        }
    }
}

/// One published checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnownCheckpoint {
    /// Hub repository id.
    pub repo: &'static str,
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
    /// The unilm file it was converted from.
    pub unilm_name: &'static str,
}

const KNOWN: &[KnownCheckpoint] = &[
    KnownCheckpoint {
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
        repo: "microsoft/beit-large-finetuned-ade-640-640",
        size: "large",
        head: Head::Ade20k,
        resolution: 640,
        approx_mb: 2260,
        published: Some(56.7),
        metric: "ADE20K mIoU",
        unilm_name: "beit_large_patch16_640_pt22k_ft22ktoade20k",
    },
];

/// The published `microsoft/beit-*` checkpoints: base and large MIM pre-training (pt22k), the
/// ImageNet-22k classifiers (pt22k-ft22k), the ImageNet-1k classifiers at 224/384/512, and the ADE20K
/// segmenters at 640.
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
            // Classifier and segmentation repos carry their published number; MIM/22k ones do not.
            let has_number = matches!(k.head, Head::ImageNet1k | Head::Ade20k);
            assert_eq!(k.published.is_some(), has_number, "{}", k.repo);
        }
        assert_eq!(
            find_known("microsoft/beit-base-patch16-224")
                .unwrap()
                .published,
            Some(85.2)
        );
    }
}
