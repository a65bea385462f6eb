//! Semantic-segmentation data: the ADE20K (SceneParsing) layout, label maps in PNG files (read and
//! written with their class indices untouched), mmseg's `reduce_zero_label`, and a small real
//! segmentation set derived from Fashion-MNIST for tests and CPU demos.
//!
//! ADE20K: `ADEChallengeData2016/images/{training,validation}/*.jpg` with
//! `annotations/{training,validation}/*.png` of the same stem; annotation value 0 is "other"
//! (ignored) and 1..=150 are the classes, which `reduce_zero_label` maps to 255 and 0..=149.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};

use crate::decode::{decode_file, DecodeOptions};
use crate::error::{DataError, Result};
use crate::fashion_mnist::{MnistSplit, CLASS_NAMES, SIDE};

/// The label value every metric and loss ignores.
pub const IGNORE_INDEX: u8 = 255;

/// The 150 ADE20K (SceneParsing) class names, index 0 = `wall` (labels already reduced: the
/// file's 0 "other" is ignored and its 1..=150 become 0..=149).
pub const ADE20K_CLASSES: [&str; 150] = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
];

/// The colour of each ADE20K class in its visualisations (the palette mmseg and the ADE
/// toolkit use), in [`ADE20K_CLASSES`] order.
pub const ADE20K_PALETTE: [[u8; 3]; 150] = [
    [120, 120, 120],
    [180, 120, 120],
    [6, 230, 230],
    [80, 50, 50],
    [4, 200, 3],
    [120, 120, 80],
    [140, 140, 140],
    [204, 5, 255],
    [230, 230, 230],
    [4, 250, 7],
    [224, 5, 255],
    [235, 255, 7],
    [150, 5, 61],
    [120, 120, 70],
    [8, 255, 51],
    [255, 6, 82],
    [143, 255, 140],
    [204, 255, 4],
    [255, 51, 7],
    [204, 70, 3],
    [0, 102, 200],
    [61, 230, 250],
    [255, 6, 51],
    [11, 102, 255],
    [255, 7, 71],
    [255, 9, 224],
    [9, 7, 230],
    [220, 220, 220],
    [255, 9, 92],
    [112, 9, 255],
    [8, 255, 214],
    [7, 255, 224],
    [255, 184, 6],
    [10, 255, 71],
    [255, 41, 10],
    [7, 255, 255],
    [224, 255, 8],
    [102, 8, 255],
    [255, 61, 6],
    [255, 194, 7],
    [255, 122, 8],
    [0, 255, 20],
    [255, 8, 41],
    [255, 5, 153],
    [6, 51, 255],
    [235, 12, 255],
    [160, 150, 20],
    [0, 163, 255],
    [140, 140, 140],
    [250, 10, 15],
    [20, 255, 0],
    [31, 255, 0],
    [255, 31, 0],
    [255, 224, 0],
    [153, 255, 0],
    [0, 0, 255],
    [255, 71, 0],
    [0, 235, 255],
    [0, 173, 255],
    [31, 0, 255],
    [11, 200, 200],
    [255, 82, 0],
    [0, 255, 245],
    [0, 61, 255],
    [0, 255, 112],
    [0, 255, 133],
    [255, 0, 0],
    [255, 163, 0],
    [255, 102, 0],
    [194, 255, 0],
    [0, 143, 255],
    [51, 255, 0],
    [0, 82, 255],
    [0, 255, 41],
    [0, 255, 173],
    [10, 0, 255],
    [173, 255, 0],
    [0, 255, 153],
    [255, 92, 0],
    [255, 0, 255],
    [255, 0, 245],
    [255, 0, 102],
    [255, 173, 0],
    [255, 0, 20],
    [255, 184, 184],
    [0, 31, 255],
    [0, 255, 61],
    [0, 71, 255],
    [255, 0, 204],
    [0, 255, 194],
    [0, 255, 82],
    [0, 10, 255],
    [0, 112, 255],
    [51, 0, 255],
    [0, 194, 255],
    [0, 122, 255],
    [0, 255, 163],
    [255, 153, 0],
    [0, 255, 10],
    [255, 112, 0],
    [143, 255, 0],
    [82, 0, 255],
    [163, 255, 0],
    [255, 235, 0],
    [8, 184, 170],
    [133, 0, 255],
    [0, 255, 92],
    [184, 0, 255],
    [255, 0, 31],
    [0, 184, 255],
    [0, 214, 255],
    [255, 0, 112],
    [92, 255, 0],
    [0, 224, 255],
    [112, 224, 255],
    [70, 184, 160],
    [163, 0, 255],
    [153, 0, 255],
    [71, 255, 0],
    [255, 0, 163],
    [255, 204, 0],
    [255, 0, 143],
    [0, 255, 235],
    [133, 255, 0],
    [255, 0, 235],
    [245, 0, 255],
    [255, 0, 122],
    [255, 245, 0],
    [10, 190, 212],
    [214, 255, 0],
    [0, 204, 255],
    [20, 0, 255],
    [255, 255, 0],
    [0, 153, 255],
    [0, 41, 255],
    [0, 255, 204],
    [41, 0, 255],
    [41, 255, 0],
    [173, 0, 255],
    [0, 245, 255],
    [71, 0, 255],
    [122, 0, 255],
    [0, 255, 184],
    [0, 92, 255],
    [184, 255, 0],
    [0, 133, 255],
    [255, 214, 0],
    [25, 194, 194],
    [102, 255, 0],
    [92, 0, 255],
];

/// A label map: one class index per pixel, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height` class indices.
    pub labels: Vec<u8>,
}

impl LabelMap {
    /// mmseg's `reduce_zero_label`: 0 ("other") becomes 255 (ignored), every other value
    /// `v` becomes `v - 1` (and 255 stays ignored).
    pub fn reduce_zero_label(&mut self) {
        for v in &mut self.labels {
            *v = match *v {
                0 | 255 => IGNORE_INDEX,
                x => x - 1,
            };
        }
    }
}

/// Read a label PNG (8-bit greyscale or 8-bit palette) keeping the stored indices: a palette
/// image yields its palette indices, not colours.
pub fn read_label_png(path: &Path) -> Result<LabelMap> {
    let format = |reason: String| DataError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| format(format!("not a readable PNG ({e})")))?;
    let (color, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight
        || !matches!(color, png::ColorType::Grayscale | png::ColorType::Indexed)
    {
        return Err(format(format!(
            "a label map must be an 8-bit greyscale or palette PNG, found {color:?} with {depth:?} bits"
        )));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| format("image too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format(format!("corrupt PNG data ({e})")))?;
    let (w, h) = (info.width, info.height);
    let mut labels = Vec::with_capacity((w * h) as usize);
    for row in buf.chunks(info.line_size).take(h as usize) {
        labels.extend_from_slice(&row[..w as usize]);
    }
    Ok(LabelMap {
        width: w,
        height: h,
        labels,
    })
}

/// Write `map` as an 8-bit palette PNG ([`encode_label_png`]). Written to a temporary name and
/// renamed.
pub fn write_label_png(path: &Path, map: &LabelMap, palette: &[[u8; 3]]) -> Result<()> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = encode_label_png(map, palette).map_err(|e| match e {
        DataError::Format { reason, .. } => DataError::Format {
            path: path.to_path_buf(),
            reason,
        },
        other => other,
    })?;
    let tmp = path.with_extension("png.tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// `map` as the bytes of an 8-bit palette PNG (index per pixel; `palette` gives the colours of
/// indices `0..palette.len()`, at most 256).
pub fn encode_label_png(map: &LabelMap, palette: &[[u8; 3]]) -> Result<Vec<u8>> {
    if palette.is_empty() || palette.len() > 256 {
        return Err(DataError::param(
            "palette",
            format!("needs 1..=256 colours, got {}", palette.len()),
        ));
    }
    if map.labels.len() != (map.width * map.height) as usize {
        return Err(DataError::param(
            "labels",
            "length differs from width x height",
        ));
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, map.width, map.height);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(palette.iter().flatten().copied().collect::<Vec<u8>>());
        let fail = |e: png::EncodingError| DataError::Format {
            path: PathBuf::from("<label map>"),
            reason: format!("cannot encode PNG ({e})"),
        };
        let mut writer = enc.write_header().map_err(fail)?;
        writer.write_image_data(&map.labels).map_err(fail)?;
        writer.finish().map_err(fail)?;
    }
    Ok(out)
}

/// One image and its label file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentationPair {
    /// The photo.
    pub image: PathBuf,
    /// The label PNG.
    pub annotation: PathBuf,
}

/// A segmentation split on disk in the ADE20K layout.
#[derive(Debug, Clone)]
pub struct SegmentationFolder {
    /// The pairs, sorted by file name.
    pub pairs: Vec<SegmentationPair>,
    /// Whether labels go through [`LabelMap::reduce_zero_label`] (ADE20K: yes).
    pub reduce_zero_label: bool,
}

impl SegmentationFolder {
    /// Open split `split` (`training` or `validation`) under `root`, which is the
    /// `ADEChallengeData2016` directory or one that contains it: every image of
    /// `images/<split>/` must have an annotation `annotations/<split>/<stem>.png`.
    pub fn ade20k(root: &Path, split: &str, reduce_zero_label: bool) -> Result<Self> {
        let root = if root.join("ADEChallengeData2016").is_dir() {
            root.join("ADEChallengeData2016")
        } else {
            root.to_path_buf()
        };
        let images = root.join("images").join(split);
        let annotations = root.join("annotations").join(split);
        let entries = std::fs::read_dir(&images).map_err(|source| DataError::Io {
            path: images.clone(),
            source,
        })?;
        let mut pairs = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| DataError::Io {
                    path: images.clone(),
                    source,
                })?
                .path();
            if !crate::decode::is_image_file(&path) {
                continue;
            }
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let annotation = annotations.join(format!("{stem}.png"));
            if !annotation.is_file() {
                return Err(DataError::Format {
                    path: annotation,
                    reason: format!("missing annotation for image {}", path.display()),
                });
            }
            pairs.push(SegmentationPair {
                image: path,
                annotation,
            });
        }
        if pairs.is_empty() {
            return Err(DataError::Empty(format!(
                "no images in {} (expected the ADE20K layout images/{split}/*.jpg + annotations/{split}/*.png)",
                images.display()
            )));
        }
        pairs.sort_by(|a, b| a.image.cmp(&b.image));
        Ok(Self {
            pairs,
            reduce_zero_label,
        })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether the split is empty.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Decode pair `i`: the RGB photo and its label map (reduced if configured). The two must
    /// have the same size.
    pub fn load(&self, i: usize) -> Result<(RgbImage, LabelMap)> {
        let pair = self.pairs.get(i).ok_or(DataError::OutOfRange {
            index: i,
            len: self.pairs.len(),
        })?;
        let img = decode_file(&pair.image, &DecodeOptions::default())?;
        let mut labels = read_label_png(&pair.annotation)?;
        if img.dimensions() != (labels.width, labels.height) {
            return Err(DataError::Format {
                path: pair.annotation.clone(),
                reason: format!(
                    "label map is {}x{} but its image is {}x{}",
                    labels.width,
                    labels.height,
                    img.width(),
                    img.height()
                ),
            });
        }
        if self.reduce_zero_label {
            labels.reduce_zero_label();
        }
        Ok((img, labels))
    }
}

/// Class names of the Fashion-MNIST segmentation set: `background`, then the 10 garments.
pub fn fashion_seg_classes() -> Vec<String> {
    std::iter::once("background".to_string())
        .chain(CLASS_NAMES.iter().map(|s| s.to_string()))
        .collect()
}

/// Pixel value (0..=255) above which a Fashion-MNIST pixel belongs to the garment.
pub const FASHION_SEG_THRESHOLD: u8 = 25;

/// The Fashion-MNIST segmentation pairs, in memory: each image is a 2x2 mosaic of four
/// Fashion-MNIST garments drawn from `split` (56x56 grey photos stored as RGB); a pixel brighter
/// than [`FASHION_SEG_THRESHOLD`] is labelled with its garment's class + 1, the background 0
/// (classes: [`fashion_seg_classes`]). Derived from real images: the garment shapes are real, the
/// scene layout is synthetic. Deterministic for a given `seed`.
pub fn fashion_segmentation(
    split: &MnistSplit,
    count: usize,
    seed: u64,
) -> Result<Vec<(RgbImage, LabelMap)>> {
    if split.is_empty() {
        return Err(DataError::Empty("Fashion-MNIST split".into()));
    }
    let mut order: Vec<usize> = (0..split.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let side = 2 * SIDE;
    let mut out = Vec::with_capacity(count);
    for n in 0..count {
        let mut img = RgbImage::new(side as u32, side as u32);
        let mut labels = vec![0u8; side * side];
        for q in 0..4 {
            let idx = order[(4 * n + q) % order.len()];
            let pixels = split.image(idx);
            let class = split.label(idx) + 1;
            let (oy, ox) = ((q / 2) * SIDE, (q % 2) * SIDE);
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let v = pixels[y * SIDE + x];
                    img.put_pixel((ox + x) as u32, (oy + y) as u32, image::Rgb([v, v, v]));
                    if v > FASHION_SEG_THRESHOLD {
                        labels[(oy + y) * side + ox + x] = class;
                    }
                }
            }
        }
        let map = LabelMap {
            width: side as u32,
            height: side as u32,
            labels,
        };
        out.push((img, map));
    }
    Ok(out)
}

/// Write [`fashion_segmentation`]'s pairs in the ADE20K layout under `root`
/// (`images/<split_name>/*.png` with `annotations/<split_name>/*.png`, no zero-label reduction).
pub fn write_fashion_segmentation(
    root: &Path,
    split_name: &str,
    split: &MnistSplit,
    count: usize,
    seed: u64,
) -> Result<()> {
    let img_dir = root.join("images").join(split_name);
    let ann_dir = root.join("annotations").join(split_name);
    for d in [&img_dir, &ann_dir] {
        std::fs::create_dir_all(d).map_err(|source| DataError::Io {
            path: d.clone(),
            source,
        })?;
    }
    let palette = fashion_palette();
    for (n, (img, map)) in fashion_segmentation(split, count, seed)?
        .into_iter()
        .enumerate()
    {
        let name = format!("fashion_{split_name}_{n:05}");
        let img_path = img_dir.join(format!("{name}.png"));
        img.save(&img_path).map_err(|e| DataError::Format {
            path: img_path.clone(),
            reason: e.to_string(),
        })?;
        write_label_png(&ann_dir.join(format!("{name}.png")), &map, &palette)?;
    }
    Ok(())
}

/// A palette for `n` classes beyond ADE20K's: well-separated colours from a fixed hash of the
/// index (index 0 black).
pub fn generic_palette(n: usize) -> Vec<[u8; 3]> {
    (0..n.min(256))
        .map(|i| {
            if i == 0 {
                return [0, 0, 0];
            }
            // Bit-interleaved colour map (as PASCAL VOC's): bits of i spread over the channels.
            let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
            let mut c = i;
            for j in 0..8 {
                r |= ((c & 1) as u8) << (7 - j);
                g |= (((c >> 1) & 1) as u8) << (7 - j);
                b |= (((c >> 2) & 1) as u8) << (7 - j);
                c >>= 3;
            }
            [r, g, b]
        })
        .collect()
}

fn fashion_palette() -> Vec<[u8; 3]> {
    generic_palette(11)
}

/// Pixel counts per class of a label map (ignored pixels excluded).
pub fn class_histogram(labels: &[u8]) -> BTreeMap<u8, usize> {
    let mut h = BTreeMap::new();
    for &v in labels {
        if v != IGNORE_INDEX {
            *h.entry(v).or_insert(0) += 1;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fashion_mnist::FashionMnist;

    #[test]
    fn reduce_zero_label_as_mmseg() {
        let mut m = LabelMap {
            width: 4,
            height: 1,
            labels: vec![0, 1, 150, 255],
        };
        m.reduce_zero_label();
        assert_eq!(m.labels, vec![255, 0, 149, 255]);
    }

    #[test]
    fn palette_png_round_trips_indices() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.png");
        let map = LabelMap {
            width: 3,
            height: 2,
            labels: vec![0, 1, 149, 7, 7, 2],
        };
        write_label_png(&p, &map, &ADE20K_PALETTE)?;
        assert_eq!(read_label_png(&p)?, map);
        // The photo decoder sees the palette colours.
        let rgb = decode_file(&p, &DecodeOptions::default())?;
        assert_eq!(rgb.get_pixel(2, 0).0, ADE20K_PALETTE[149]);
        Ok(())
    }

    #[test]
    fn fashion_set_in_ade_layout() -> Result<()> {
        let fm = FashionMnist::embedded()?;
        let dir = tempfile::tempdir().unwrap();
        write_fashion_segmentation(dir.path(), "validation", &fm.test, 3, 7)?;
        let set = SegmentationFolder::ade20k(dir.path(), "validation", false)?;
        assert_eq!(set.len(), 3);
        let (img, labels) = set.load(0)?;
        assert_eq!(img.dimensions(), (56, 56));
        let hist = class_histogram(&labels.labels);
        assert!(hist.get(&0).copied().unwrap_or(0) > 0, "background present");
        assert!(hist.keys().any(|&k| k > 0), "garments present");
        assert!(hist.keys().all(|&k| k <= 10));
        // A labelled pixel is bright, a background pixel dark.
        for (i, &l) in labels.labels.iter().enumerate() {
            let v = img.as_raw()[3 * i];
            assert_eq!(l > 0, v > FASHION_SEG_THRESHOLD);
        }
        let err = SegmentationFolder::ade20k(dir.path(), "training", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("training"), "{err}");
        Ok(())
    }
}
