//! The network behind the server: a classifier checkpoint (classify and embed), a backbone
//! (embed only) or a semantic segmentation model (segment only), run on a whole batch at once.

use anyhow::{bail, Result};
use beit_model::segmentation::BeitForSemanticSegmentation;
use beit_model::{BeitConfig, BeitForImageClassification, BeitModel, ForwardOptions};
use beit_recipes::features::{pooled_layer, Pool};
use beit_recipes::predictions::{predictions, Prediction};
use candle::Tensor;

/// What one request asks of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Top-k classes of each image.
    Classify {
        /// Classes per image.
        top_k: usize,
    },
    /// Pooled features of each image.
    Embed {
        /// Block whose output is pooled (0 = patch embeddings).
        layer: usize,
        /// Pooling.
        pool: Pool,
    },
    /// Per-pixel class logits of each image, at the model's output resolution.
    Segment,
}

/// What the model answered for one request, one entry per image.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Top-k classes per image.
    Classes(Vec<Vec<Prediction>>),
    /// One feature vector per image.
    Features(Vec<Vec<f32>>),
    /// Logits `(K, h, w)` per image, on the CPU (the label maps are made from them off the
    /// batching thread).
    Logits(Vec<Tensor>),
}

/// A loaded network.
pub enum Network {
    /// `BeitForImageClassification`.
    Classifier(BeitForImageClassification),
    /// A bare backbone (e.g. from a pre-training checkpoint).
    Backbone(BeitModel),
    /// `BeitForSemanticSegmentation` (UperNet; boxed, being the largest by far).
    Segmenter(Box<BeitForSemanticSegmentation>),
}

/// The network and its config.
pub struct ServedModel {
    /// The network.
    pub network: Network,
    /// Its config (labels, number of blocks).
    pub config: BeitConfig,
}

impl ServedModel {
    /// Whether `/v1/classify` is available.
    pub fn can_classify(&self) -> bool {
        matches!(self.network, Network::Classifier(_))
    }

    /// Whether `/v1/segment` is available (and nothing else).
    pub fn can_segment(&self) -> bool {
        matches!(self.network, Network::Segmenter(_))
    }

    /// The task of the warm-up forward pass.
    pub fn warmup_task(&self) -> Task {
        match self.network {
            Network::Classifier(_) => Task::Classify { top_k: 1 },
            Network::Backbone(_) => Task::Embed {
                layer: 0,
                pool: Pool::default(),
            },
            Network::Segmenter(_) => Task::Segment,
        }
    }

    /// Run `pixels` `(B, 3, H, W)`, the images of several requests stacked, and answer each
    /// request; `tasks[i]` covers the next `counts[i]` rows.
    pub fn run(&self, pixels: &Tensor, tasks: &[(Task, usize)]) -> Result<Vec<Answer>> {
        let needs_hidden = tasks.iter().any(|(t, _)| matches!(t, Task::Embed { .. }));
        let opts = ForwardOptions {
            output_hidden_states: needs_hidden,
            ..ForwardOptions::default()
        };
        let (logits, hidden) = match &self.network {
            Network::Classifier(m) => {
                let out = m.forward(pixels, opts)?;
                (Some(out.logits), out.backbone.hidden_states)
            }
            Network::Backbone(m) => (None, m.forward(pixels, None, opts)?.hidden_states),
            Network::Segmenter(m) => (Some(m.forward(pixels, opts)?.logits), Vec::new()),
        };
        let mut start = 0;
        let mut answers = Vec::with_capacity(tasks.len());
        for &(task, n) in tasks {
            answers.push(self.answer(task, logits.as_ref(), &hidden, start, n)?);
            start += n;
        }
        Ok(answers)
    }

    fn answer(
        &self,
        task: Task,
        logits: Option<&Tensor>,
        hidden: &[Tensor],
        start: usize,
        n: usize,
    ) -> Result<Answer> {
        match task {
            Task::Classify { top_k } => {
                let Some(logits) = logits.filter(|_| self.can_classify()) else {
                    bail!("this checkpoint has no classification head");
                };
                let rows = logits.narrow(0, start, n)?;
                Ok(Answer::Classes(predictions(&rows, top_k, &self.config)?))
            }
            Task::Segment => {
                let Some(logits) = logits.filter(|_| self.can_segment()) else {
                    bail!("this checkpoint is not a semantic segmentation model");
                };
                let rows = logits
                    .narrow(0, start, n)?
                    .to_device(&candle::Device::Cpu)?;
                Ok(Answer::Logits(
                    (0..n).map(|i| rows.get(i)).collect::<candle::Result<_>>()?,
                ))
            }
            Task::Embed { .. } if self.can_segment() => {
                bail!("a semantic segmentation model does not serve embeddings")
            }
            Task::Embed { layer, pool } => {
                let rows: Vec<Tensor> = hidden
                    .iter()
                    .map(|h| h.narrow(0, start, n))
                    .collect::<candle::Result<_>>()?;
                Ok(Answer::Features(
                    pooled_layer(&rows, layer, pool)?.to_vec2()?,
                ))
            }
        }
    }
}
