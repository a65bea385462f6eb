//! Fashion-MNIST (Zalando, MIT licence) in its gzipped IDX form.
//!
//! Two sources: the full dataset from a directory holding the four upstream files (the Debian package
//! `dataset-fashion-mnist` installs them in [`DEFAULT_DIR`]), and a balanced subset (6000 train +
//! 1000 test images) compiled into the crate, so that demos and tests run on real images with no
//! download. See `data/fashion-mnist/README.md` for the subset and its licence.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle::{Device, Tensor};
use image::RgbImage;

use crate::error::{DataError, Result};

/// Where Debian's `dataset-fashion-mnist` installs the dataset.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The ten class names, in label order.
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Image side length in pixels.
pub const SIDE: usize = 28;

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte.gz";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte.gz";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte.gz";

static EMBEDDED_TRAIN_IMAGES: &[u8] =
    include_bytes!("../data/fashion-mnist/train-images-idx3-ubyte.gz");
static EMBEDDED_TRAIN_LABELS: &[u8] =
    include_bytes!("../data/fashion-mnist/train-labels-idx1-ubyte.gz");
static EMBEDDED_TEST_IMAGES: &[u8] =
    include_bytes!("../data/fashion-mnist/t10k-images-idx3-ubyte.gz");
static EMBEDDED_TEST_LABELS: &[u8] =
    include_bytes!("../data/fashion-mnist/t10k-labels-idx1-ubyte.gz");

/// One split (train or test): `len()` grey 28x28 images with their labels.
#[derive(Debug, Clone)]
pub struct MnistSplit {
    /// Row-major pixels, `len() * 28 * 28` bytes, 0 = black background.
    pub images: Vec<u8>,
    /// One label in `0..10` per image.
    pub labels: Vec<u8>,
}

impl MnistSplit {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split has no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 784 pixels of image `i` (row-major). Panics if `i >= len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * SIDE * SIDE..(i + 1) * SIDE * SIDE]
    }

    /// The label of image `i`. Panics if `i >= len()`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// Image `i` as an RGB image (grey replicated on the three channels), for the generic transforms.
    pub fn rgb_image(&self, i: usize) -> RgbImage {
        let g = self.image(i);
        RgbImage::from_fn(SIDE as u32, SIDE as u32, |x, y| {
            let v = g[y as usize * SIDE + x as usize];
            image::Rgb([v, v, v])
        })
    }

    /// The first `n` images (or all if fewer), e.g. to train quickly on a slice.
    pub fn take(&self, n: usize) -> MnistSplit {
        let n = n.min(self.len());
        MnistSplit {
            images: self.images[..n * SIDE * SIDE].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// All images as an f32 tensor `(N, 1, 28, 28)` scaled to `[0, 1]`, and labels as u32 `(N,)`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let n = self.len();
        let pixels: Vec<f32> = self.images.iter().map(|&p| p as f32 / 255.0).collect();
        let images = Tensor::from_vec(pixels, (n, 1, SIDE, SIDE), device)?;
        let labels: Vec<u32> = self.labels.iter().map(|&l| l as u32).collect();
        let labels = Tensor::from_vec(labels, n, device)?;
        Ok((images, labels))
    }

    /// Parse one split from the (possibly gzipped) bytes of its image and label IDX files;
    /// `img_path` / `lab_path` name them in error messages.
    fn from_idx(images: &[u8], labels: &[u8], img_path: &Path, lab_path: &Path) -> Result<Self> {
        let img_path = img_path.to_path_buf();
        let lab_path = lab_path.to_path_buf();
        let (dims, pixels) = parse_idx(&gunzip(images, &img_path)?, &img_path)?;
        let (ldims, labels) = parse_idx(&gunzip(labels, &lab_path)?, &lab_path)?;
        if dims.len() != 3 || dims[1] != SIDE || dims[2] != SIDE {
            return Err(DataError::Format {
                path: img_path,
                reason: format!("expected an image array (N, 28, 28), found dimensions {dims:?}"),
            });
        }
        if ldims.len() != 1 || ldims[0] != dims[0] {
            return Err(DataError::Format {
                path: lab_path,
                reason: format!("expected {} labels, found dimensions {ldims:?}", dims[0]),
            });
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= CLASS_NAMES.len()) {
            return Err(DataError::Format {
                path: lab_path,
                reason: format!("label {bad} is not a Fashion-MNIST class (0..10)"),
            });
        }
        Ok(MnistSplit {
            images: pixels,
            labels,
        })
    }
}

/// Fashion-MNIST: a train and a test split.
#[derive(Debug, Clone)]
pub struct FashionMnist {
    /// Training split (60,000 images upstream, 6,000 embedded).
    pub train: MnistSplit,
    /// Test split (10,000 images upstream, 1,000 embedded).
    pub test: MnistSplit,
}

impl FashionMnist {
    /// The balanced subset compiled into the crate: 600 train and 100 test images per class.
    pub fn embedded() -> Result<Self> {
        let base = Path::new("<embedded fashion-mnist>");
        Ok(FashionMnist {
            train: MnistSplit::from_idx(
                EMBEDDED_TRAIN_IMAGES,
                EMBEDDED_TRAIN_LABELS,
                &base.join(TRAIN_IMAGES),
                &base.join(TRAIN_LABELS),
            )?,
            test: MnistSplit::from_idx(
                EMBEDDED_TEST_IMAGES,
                EMBEDDED_TEST_LABELS,
                &base.join(TEST_IMAGES),
                &base.join(TEST_LABELS),
            )?,
        })
    }

    /// Load the four upstream files (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
    /// `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`) from `dir`. Uncompressed copies
    /// (same names without `.gz`) are accepted too.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let read = |name: &str| -> Result<(Vec<u8>, PathBuf)> {
            let gz = dir.join(name);
            let plain = dir.join(name.trim_end_matches(".gz"));
            let path = if gz.exists() || !plain.exists() {
                gz
            } else {
                plain
            };
            let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            Ok((bytes, path))
        };
        let split = |images: &str, labels: &str| -> Result<MnistSplit> {
            let (ib, ip) = read(images)?;
            let (lb, lp) = read(labels)?;
            MnistSplit::from_idx(&ib, &lb, &ip, &lp)
        };
        Ok(FashionMnist {
            train: split(TRAIN_IMAGES, TRAIN_LABELS)?,
            test: split(TEST_IMAGES, TEST_LABELS)?,
        })
    }

    /// [`FashionMnist::from_dir`] on [`DEFAULT_DIR`] if it exists, else [`FashionMnist::embedded`].
    pub fn full_or_embedded() -> Result<Self> {
        if Path::new(DEFAULT_DIR).join(TRAIN_IMAGES).exists() {
            Self::from_dir(DEFAULT_DIR)
        } else {
            Self::embedded()
        }
    }

    /// The class names in label order.
    pub fn class_names(&self) -> &'static [&'static str; 10] {
        &CLASS_NAMES
    }
}

/// Decompress `bytes` if they start with the gzip magic, else return them as they are.
fn gunzip(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
        let mut out = Vec::with_capacity(bytes.len() * 2);
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                reason: format!("corrupt gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parse an IDX file of unsigned bytes: magic `0x00 0x00 0x08 ndim`, `ndim` big-endian u32
/// dimensions, then the data. Returns the dimensions and the data.
fn parse_idx(bytes: &[u8], path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |reason: String| DataError::Format {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes is too short for an IDX header",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(
            "not an IDX file (magic must start with two zero bytes)".into(),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX element type 0x{:02x} is not unsigned byte (0x08)",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad(format!(
            "truncated IDX header ({ndim} dimensions announced)"
        )));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("IDX dimensions {dims:?} overflow")))?;
    let data = &bytes[header..];
    if data.len() != count {
        return Err(bad(format!(
            "IDX dimensions {dims:?} announce {count} bytes of data, found {}",
            data.len()
        )));
    }
    Ok((dims, data.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_subset_is_balanced_and_real() {
        let ds = FashionMnist::embedded().unwrap();
        assert_eq!(ds.train.len(), 6000);
        assert_eq!(ds.test.len(), 1000);
        for (split, per_class) in [(&ds.train, 600), (&ds.test, 100)] {
            let mut counts = [0usize; 10];
            for &l in &split.labels {
                counts[l as usize] += 1;
            }
            assert_eq!(counts, [per_class; 10]);
        }
        // Checksums printed by scripts/fixtures/data_fashion_subset.py when the subset was made.
        let sum = |s: &MnistSplit| s.images.iter().map(|&p| p as u64).sum::<u64>();
        assert_eq!(sum(&ds.train), 344_160_204);
        assert_eq!(sum(&ds.test), 56_973_981);
        // The first upstream training image is an ankle boot.
        assert_eq!(ds.train.label(0), 9);
        assert_eq!(ds.class_names()[9], "Ankle boot");
    }

    #[test]
    fn tensors_have_the_right_shapes() {
        let ds = FashionMnist::embedded().unwrap();
        let small = ds.test.take(5);
        let (x, y) = small.to_tensors(&Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[5, 1, 28, 28]);
        assert_eq!(y.dims(), &[5]);
        let max = x.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max > 0.5 && max <= 1.0);
        let rgb = small.rgb_image(0);
        assert_eq!(rgb.dimensions(), (28, 28));
        assert_eq!(rgb.get_pixel(14, 14)[0], small.image(0)[14 * 28 + 14]);
    }

    #[test]
    fn from_dir_reads_files_and_reports_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            (TRAIN_IMAGES, EMBEDDED_TEST_IMAGES),
            (TRAIN_LABELS, EMBEDDED_TEST_LABELS),
            (TEST_IMAGES, EMBEDDED_TEST_IMAGES),
        ] {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        // Missing label file: the error names it.
        let err = FashionMnist::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(TEST_LABELS), "{err}");
        // Labels of the wrong length: the error names the file and the count.
        std::fs::write(dir.path().join(TEST_LABELS), EMBEDDED_TRAIN_LABELS).unwrap();
        let err = FashionMnist::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(TEST_LABELS) && err.contains("1000"), "{err}");
        // Correct files load.
        std::fs::write(dir.path().join(TEST_LABELS), EMBEDDED_TEST_LABELS).unwrap();
        let ds = FashionMnist::from_dir(dir.path()).unwrap();
        assert_eq!(ds.train.len(), 1000);
        // Garbage instead of gzip/IDX is a format error, not a panic.
        std::fs::write(dir.path().join(TRAIN_IMAGES), b"\x1f\x8bgarbage").unwrap();
        assert!(FashionMnist::from_dir(dir.path()).is_err());
        std::fs::write(dir.path().join(TRAIN_IMAGES), [0u8, 0, 8, 3, 0, 0]).unwrap();
        assert!(FashionMnist::from_dir(dir.path()).is_err());
    }

    #[test]
    #[ignore = "needs `apt-get install -y dataset-fashion-mnist`"]
    fn full_dataset_from_debian_package() {
        let ds = FashionMnist::from_dir(DEFAULT_DIR).unwrap();
        assert_eq!((ds.train.len(), ds.test.len()), (60_000, 10_000));
    }
}
