//! Semantic-segmentation metrics exactly as mmsegmentation accumulates them: per-class
//! intersection, union, predicted and labelled pixel counts summed over the whole dataset (not
//! averaged per image), pixels labelled with the ignore index dropped, labels outside
//! `0..num_classes` not counted in any class (mmseg's `histc` range).
//!
//! - IoU of class c = Σ intersection_c / Σ union_c (undefined, `None`, when the class is neither
//!   predicted nor labelled anywhere: mmseg's NaN);
//! - mIoU = mean of the defined IoUs (mmseg's `nanmean`);
//! - Acc of class c = Σ intersection_c / Σ label_c, mAcc their defined mean;
//! - aAcc = Σ_c intersection_c / Σ_c label_c (overall pixel accuracy).
//!
//! Counts are exact integers (u64), so large datasets lose nothing to float accumulation.

use serde::Serialize;

/// Running per-class pixel counts over a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegMetrics {
    num_classes: usize,
    ignore_index: u32,
    intersect: Vec<u64>,
    pred_area: Vec<u64>,
    label_area: Vec<u64>,
}

/// The scores of [`SegMetrics::scores`], as fractions in `[0, 1]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegScores {
    /// Overall pixel accuracy.
    pub aacc: f64,
    /// Mean IoU over the classes whose IoU is defined.
    pub miou: f64,
    /// Mean per-class accuracy over the classes present in the labels.
    pub macc: f64,
    /// IoU per class (`None`: class absent from predictions and labels).
    pub iou: Vec<Option<f64>>,
    /// Accuracy per class (`None`: class absent from the labels).
    pub acc: Vec<Option<f64>>,
}

impl SegMetrics {
    /// Empty counts for `num_classes` classes; pixels labelled `ignore_index` are skipped.
    pub fn new(num_classes: usize, ignore_index: u32) -> Self {
        Self {
            num_classes,
            ignore_index,
            intersect: vec![0; num_classes],
            pred_area: vec![0; num_classes],
            label_area: vec![0; num_classes],
        }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Add one image: `pred` and `label` hold one class index per pixel, in the same order.
    /// Returns an error message when the lengths differ.
    pub fn update(&mut self, pred: &[u32], label: &[u32]) -> Result<(), String> {
        if pred.len() != label.len() {
            return Err(format!(
                "prediction has {} pixels but the label map has {}",
                pred.len(),
                label.len()
            ));
        }
        let k = self.num_classes as u32;
        for (&p, &l) in pred.iter().zip(label) {
            if l == self.ignore_index {
                continue;
            }
            if p < k {
                self.pred_area[p as usize] += 1;
            }
            if l < k {
                self.label_area[l as usize] += 1;
                if p == l {
                    self.intersect[l as usize] += 1;
                }
            }
        }
        Ok(())
    }

    /// Merge the counts of another accumulator (same classes).
    pub fn merge(&mut self, other: &SegMetrics) {
        for (a, b) in [
            (&mut self.intersect, &other.intersect),
            (&mut self.pred_area, &other.pred_area),
            (&mut self.label_area, &other.label_area),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }

    /// Sum the counts over the ranks of a data-parallel run (each rank counted its share of the
    /// images): afterwards every rank holds the counts of the whole split. The counts travel as
    /// f64, exact below 2^53 pixels per class.
    pub fn all_reduce(&mut self, world: &dyn crate::distributed::Collective) -> crate::Result<()> {
        if world.size() == 1 {
            return Ok(());
        }
        let k = self.num_classes;
        let mut buf: Vec<f64> = [&self.intersect, &self.pred_area, &self.label_area]
            .into_iter()
            .flatten()
            .map(|&c| c as f64)
            .collect();
        world.all_reduce_sum_f64("segmentation counts", &mut buf)?;
        for (i, counts) in [
            &mut self.intersect,
            &mut self.pred_area,
            &mut self.label_area,
        ]
        .into_iter()
        .enumerate()
        {
            for (c, &v) in counts.iter_mut().zip(&buf[i * k..(i + 1) * k]) {
                *c = v as u64;
            }
        }
        Ok(())
    }

    /// Pixels counted so far (labelled with a class in range).
    pub fn labelled_pixels(&self) -> u64 {
        self.label_area.iter().sum()
    }

    /// IoU, accuracy and their means from the counts so far.
    pub fn scores(&self) -> SegScores {
        let ratio = |num: u64, den: u64| (den > 0).then(|| num as f64 / den as f64);
        let iou: Vec<Option<f64>> = (0..self.num_classes)
            .map(|c| {
                let union = self.pred_area[c] + self.label_area[c] - self.intersect[c];
                ratio(self.intersect[c], union)
            })
            .collect();
        let acc: Vec<Option<f64>> = (0..self.num_classes)
            .map(|c| ratio(self.intersect[c], self.label_area[c]))
            .collect();
        let nanmean = |v: &[Option<f64>]| {
            let defined: Vec<f64> = v.iter().flatten().copied().collect();
            if defined.is_empty() {
                f64::NAN
            } else {
                defined.iter().sum::<f64>() / defined.len() as f64
            }
        };
        let total_label: u64 = self.label_area.iter().sum();
        let total_intersect: u64 = self.intersect.iter().sum();
        SegScores {
            aacc: ratio(total_intersect, total_label).unwrap_or(f64::NAN),
            miou: nanmean(&iou),
            macc: nanmean(&acc),
            iou,
            acc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_sums_the_counts_of_the_ranks() {
        let mut m = SegMetrics::new(3, 255);
        m.update(&[0, 1, 2, 2, 1], &[0, 1, 1, 255, 2]).unwrap();
        let one = m.clone();
        m.all_reduce(&crate::distributed::SingleProcess).unwrap();
        assert_eq!(m, one, "a world of one changes nothing");
        // Three ranks that counted the same images: three times the counts, the same scores.
        m.all_reduce(&crate::distributed::tests::Replicated::new(3))
            .unwrap();
        let mut three = one.clone();
        three.merge(&one);
        three.merge(&one);
        assert_eq!(m, three);
        assert_eq!(m.scores(), one.scores());
    }

    /// Two images, 3 classes, one ignored pixel and one out-of-range label; the expected values
    /// are worked out by hand with mmseg's definitions.
    #[test]
    fn accumulates_over_the_dataset_like_mmseg() {
        let mut m = SegMetrics::new(3, 255);
        // image 1: labels 0 0 1 1 255, predictions 0 1 1 1 2
        m.update(&[0, 1, 1, 1, 2], &[0, 0, 1, 1, 255]).unwrap();
        // image 2: labels 2 2 7 0, predictions 2 0 2 0
        m.update(&[2, 0, 2, 0], &[2, 2, 7, 0]).unwrap();
        // Counted pixels: labels {0,0,1,1,2,2,0} (7 is out of range, 255 ignored).
        // intersect: c0 = 2 (img1 px0, img2 px3), c1 = 2, c2 = 1
        // pred area (pixels whose label is not ignored): c0 = 1+2 = 3, c1 = 3, c2 = 2
        // label area: c0 = 3, c1 = 2, c2 = 2
        let s = m.scores();
        let iou = [
            2.0 / (3.0 + 3.0 - 2.0),
            2.0 / (3.0 + 2.0 - 2.0),
            1.0 / (2.0 + 2.0 - 1.0),
        ];
        for (got, want) in s.iou.iter().zip(iou) {
            assert!((got.unwrap() - want).abs() < 1e-12);
        }
        assert!((s.miou - iou.iter().sum::<f64>() / 3.0).abs() < 1e-12);
        assert!((s.aacc - 5.0 / 7.0).abs() < 1e-12);
        assert!((s.macc - (2.0 / 3.0 + 1.0 + 0.5) / 3.0).abs() < 1e-12);
        assert_eq!(m.labelled_pixels(), 7);
    }

    #[test]
    fn absent_classes_are_left_out_of_the_means() {
        let mut m = SegMetrics::new(4, 255);
        m.update(&[0, 0, 1], &[0, 0, 1]).unwrap();
        let s = m.scores();
        assert_eq!(s.iou[2], None);
        assert_eq!(s.iou[3], None);
        assert_eq!(s.miou, 1.0);
        assert!(m.update(&[0], &[0, 1]).is_err());
        let mut total = SegMetrics::new(4, 255);
        total.merge(&m);
        total.merge(&m);
        assert_eq!(total.labelled_pixels(), 6);
        assert_eq!(total.scores().miou, 1.0);
    }
}
