//! The four-scale neck, the UperNet decode head and the FCN auxiliary head.

use candle::{Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{max_pool_2x2, BatchNorm2d, Conv2d, ConvBnRelu, Upsample2x};
use super::config::SegmentationConfig;
use super::resize::{adaptive_avg_pool2d, resize_bilinear};

/// The neck: turns four same-resolution feature maps `(B, C, H/16, W/16)` into a pyramid at
/// x4, x2, x1 and x0.5 (`fpn1` .. `fpn4` at the top level of the checkpoint).
#[derive(Debug, Clone)]
pub struct Neck {
    fpn1_up1: Upsample2x,
    fpn1_bn: BatchNorm2d,
    fpn1_up2: Upsample2x,
    fpn2: Upsample2x,
}

impl Neck {
    /// `fpn1.{0,1,3}.*` and `fpn2.0.*` under `vb` (the model's root).
    pub fn new(c: usize, init_std: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fpn1_up1: Upsample2x::new(c, c, init_std, vb.pp("fpn1").pp(0))?,
            fpn1_bn: BatchNorm2d::new(c, vb.pp("fpn1").pp(1))?,
            fpn1_up2: Upsample2x::new(c, c, init_std, vb.pp("fpn1").pp(3))?,
            fpn2: Upsample2x::new(c, c, init_std, vb.pp("fpn2").pp(0))?,
        })
    }

    /// The BatchNorm of `fpn1`.
    pub fn batch_norms(&self) -> Vec<&BatchNorm2d> {
        vec![&self.fpn1_bn]
    }

    /// The BatchNorm of `fpn1`, to change.
    pub fn batch_norms_mut(&mut self) -> Vec<&mut BatchNorm2d> {
        vec![&mut self.fpn1_bn]
    }

    /// `fpn1`: ConvT -> BN -> GELU -> ConvT; `fpn2`: ConvT; `fpn3`: identity; `fpn4`: MaxPool 2x2
    /// ([`max_pool_2x2`]: PyTorch's gradient).
    pub fn forward(&self, features: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let [f1, f2, f3, f4] = features else {
            candle::bail!("the neck takes 4 feature maps, got {}", features.len());
        };
        let p1 = self.fpn1_up1.forward(f1)?;
        let p1 = self.fpn1_bn.forward(&p1, train)?.gelu_erf()?;
        let p1 = self.fpn1_up2.forward(&p1)?;
        let p2 = self.fpn2.forward(f2)?;
        let p4 = max_pool_2x2(f4)?;
        Ok(vec![p1, p2, f3.clone(), p4])
    }
}

/// UperNet (`decode_head.*`): pyramid pooling on the coarsest level, a top-down FPN, fusion of the
/// four levels at the finest resolution, and a 1x1 classifier.
#[derive(Debug, Clone)]
pub struct UperHead {
    pool_scales: Vec<usize>,
    psp: Vec<ConvBnRelu>,
    bottleneck: ConvBnRelu,
    lateral: Vec<ConvBnRelu>,
    fpn: Vec<ConvBnRelu>,
    fpn_bottleneck: ConvBnRelu,
    classifier: Conv2d,
}

impl UperHead {
    /// Build under `vb` (= `decode_head`) with `c` channels in and inside, `num_labels` out.
    pub fn new(
        c: usize,
        num_labels: usize,
        seg: &SegmentationConfig,
        init_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let psp = (0..seg.pool_scales.len())
            .map(|i| ConvBnRelu::new(c, c, 1, init_std, vb.pp("psp_modules").pp(i).pp(1)))
            .collect::<Result<Vec<_>>>()?;
        let bottleneck = ConvBnRelu::new(
            c + seg.pool_scales.len() * c,
            c,
            3,
            init_std,
            vb.pp("bottleneck"),
        )?;
        let lateral = (0..3)
            .map(|i| ConvBnRelu::new(c, c, 1, init_std, vb.pp("lateral_convs").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let fpn = (0..3)
            .map(|i| ConvBnRelu::new(c, c, 3, init_std, vb.pp("fpn_convs").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            pool_scales: seg.pool_scales.clone(),
            psp,
            bottleneck,
            lateral,
            fpn,
            fpn_bottleneck: ConvBnRelu::new(4 * c, c, 3, init_std, vb.pp("fpn_bottleneck"))?,
            classifier: Conv2d::new(c, num_labels, 1, 0, 1, true, init_std, vb.pp("classifier"))?,
        })
    }

    /// Every BatchNorm of the head.
    pub fn batch_norms(&self) -> Vec<&BatchNorm2d> {
        self.psp
            .iter()
            .chain([&self.bottleneck])
            .chain(&self.lateral)
            .chain(&self.fpn)
            .chain([&self.fpn_bottleneck])
            .map(ConvBnRelu::bn)
            .collect()
    }

    /// Every BatchNorm of the head, to change.
    pub fn batch_norms_mut(&mut self) -> Vec<&mut BatchNorm2d> {
        self.psp
            .iter_mut()
            .chain([&mut self.bottleneck])
            .chain(&mut self.lateral)
            .chain(&mut self.fpn)
            .chain([&mut self.fpn_bottleneck])
            .map(ConvBnRelu::bn_mut)
            .collect()
    }

    /// Logits `(B, num_labels, H1, W1)` at the resolution of the first pyramid level.
    pub fn forward(&self, levels: &[Tensor], train: bool) -> Result<Tensor> {
        if levels.len() != 4 {
            candle::bail!("the decode head takes 4 levels, got {}", levels.len());
        }
        // Pyramid pooling on the coarsest level: pool, 1x1 block, back to its size; concatenated.
        let top = &levels[3];
        let (_, _, th, tw) = top.dims4()?;
        let mut parts = vec![top.clone()];
        for (scale, block) in self.pool_scales.iter().zip(&self.psp) {
            let pooled = adaptive_avg_pool2d(top, *scale, *scale)?;
            parts.push(resize_bilinear(&block.forward(&pooled, train)?, th, tw)?);
        }
        let psp = self.bottleneck.forward(&Tensor::cat(&parts, 1)?, train)?;
        let mut laterals = self
            .lateral
            .iter()
            .zip(levels)
            .map(|(conv, x)| conv.forward(x, train))
            .collect::<Result<Vec<_>>>()?;
        laterals.push(psp);
        // Top-down: each level receives the (already updated) coarser level, upsampled.
        for i in (1..laterals.len()).rev() {
            let (_, _, h, w) = laterals[i - 1].dims4()?;
            let up = resize_bilinear(&laterals[i], h, w)?;
            laterals[i - 1] = (&laterals[i - 1] + up)?;
        }
        let (_, _, h0, w0) = laterals[0].dims4()?;
        let mut outs = Vec::with_capacity(4);
        for (i, conv) in self.fpn.iter().enumerate() {
            let o = conv.forward(&laterals[i], train)?;
            outs.push(if i == 0 {
                o
            } else {
                resize_bilinear(&o, h0, w0)?
            });
        }
        outs.push(resize_bilinear(&laterals[3], h0, w0)?);
        let fused = self
            .fpn_bottleneck
            .forward(&Tensor::cat(&outs, 1)?, train)?;
        self.classifier.forward(&fused)
    }
}

/// FCN auxiliary head (`auxiliary_head.*`) on pyramid level 2: `auxiliary_num_convs` 3x3 blocks,
/// optionally `conv_cat` over `[input, output]`, then a 1x1 classifier.
#[derive(Debug, Clone)]
pub struct FcnHead {
    convs: Vec<ConvBnRelu>,
    conv_cat: Option<ConvBnRelu>,
    classifier: Conv2d,
}

/// The pyramid level the auxiliary head reads.
pub const AUXILIARY_IN_INDEX: usize = 2;

impl FcnHead {
    /// Build under `vb` (= `auxiliary_head`) reading `c` input channels.
    pub fn new(
        c: usize,
        num_labels: usize,
        seg: &SegmentationConfig,
        init_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let ch = seg.auxiliary_channels;
        let convs = (0..seg.auxiliary_num_convs)
            .map(|i| {
                let inp = if i == 0 { c } else { ch };
                ConvBnRelu::new(inp, ch, 3, init_std, vb.pp("convs").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_cat = if seg.auxiliary_concat_input {
            Some(ConvBnRelu::new(c + ch, ch, 3, init_std, vb.pp("conv_cat"))?)
        } else {
            None
        };
        Ok(Self {
            convs,
            conv_cat,
            classifier: Conv2d::new(ch, num_labels, 1, 0, 1, true, init_std, vb.pp("classifier"))?,
        })
    }

    /// Every BatchNorm of the head.
    pub fn batch_norms(&self) -> Vec<&BatchNorm2d> {
        self.convs
            .iter()
            .chain(&self.conv_cat)
            .map(ConvBnRelu::bn)
            .collect()
    }

    /// Every BatchNorm of the head, to change.
    pub fn batch_norms_mut(&mut self) -> Vec<&mut BatchNorm2d> {
        self.convs
            .iter_mut()
            .chain(&mut self.conv_cat)
            .map(ConvBnRelu::bn_mut)
            .collect()
    }

    /// Logits `(B, num_labels, H, W)` at the resolution of level 2.
    pub fn forward(&self, levels: &[Tensor], train: bool) -> Result<Tensor> {
        let Some(x) = levels.get(AUXILIARY_IN_INDEX) else {
            candle::bail!(
                "the auxiliary head reads level {AUXILIARY_IN_INDEX}, got {} levels",
                levels.len()
            );
        };
        let mut h = x.clone();
        for conv in &self.convs {
            h = conv.forward(&h, train)?;
        }
        if let Some(cat) = &self.conv_cat {
            h = cat.forward(&Tensor::cat(&[x, &h], 1)?, train)?;
        }
        self.classifier.forward(&h)
    }
}
