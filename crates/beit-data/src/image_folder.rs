//! Image folders: `root/<class>/<image>` as torchvision's `ImageFolder`, a flat folder with a label
//! file, and unlabelled folders for pre-training.

use std::path::{Path, PathBuf};

use crate::dataset::{Dataset, Sample};
use crate::decode::{decode_file, is_image_file, DecodeOptions, IMAGE_EXTENSIONS};
use crate::error::{DataError, Result};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// All image files under `dir` (recursively, following symlinks), in torchvision's order: directories
/// sorted by path, files sorted by name within each.
fn walk_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut per_dir: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
    while let Some(d) = dirs.pop() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            let path = entry.path();
            // `metadata` follows symlinks, as os.walk(followlinks=True).
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // dangling symlink
            };
            if meta.is_dir() {
                dirs.push(path);
            } else if is_image_file(&path) {
                files.push(path);
            }
        }
        files.sort();
        per_dir.push((d, files));
    }
    per_dir.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
    Ok(per_dir.into_iter().flat_map(|(_, f)| f).collect())
}

/// `root/<class>/<image>`: one class per sub-folder, class indices in sorted folder-name order (as
/// torchvision), images found recursively with the extensions in [`IMAGE_EXTENSIONS`].
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, u32)>,
    decode: DecodeOptions,
}

impl ImageFolder {
    /// Scan `root`. Errors if it has no class folders, or if a class folder has no image.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let mut classes = Vec::new();
        for entry in std::fs::read_dir(&root).map_err(io_err(&root))? {
            let entry = entry.map_err(io_err(&root))?;
            if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
                classes.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(DataError::Empty(format!(
                "{} has no class sub-folders (expected root/<class>/<image>)",
                root.display()
            )));
        }
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (idx, class) in classes.iter().enumerate() {
            let files = walk_images(&root.join(class))?;
            if files.is_empty() {
                empty.push(class.clone());
            }
            samples.extend(files.into_iter().map(|f| (f, idx as u32)));
        }
        if !empty.is_empty() {
            return Err(DataError::Empty(format!(
                "{}: no image ({}) in class folder(s) {}",
                root.display(),
                IMAGE_EXTENSIONS.join(", "),
                empty.join(", ")
            )));
        }
        Ok(ImageFolder {
            root,
            classes,
            samples,
            decode: DecodeOptions::default(),
        })
    }

    /// A flat folder of images with a label file: one `relative/path label` per line (whitespace or a
    /// comma between them; `#` comments and blank lines ignored). A label is a class index or, when
    /// `class_names` is given, a class name. Without `class_names`, classes are named by their index
    /// and their number is the largest label + 1.
    pub fn from_label_file(
        root: impl AsRef<Path>,
        label_file: impl AsRef<Path>,
        class_names: Option<Vec<String>>,
    ) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let label_file = label_file.as_ref();
        let text = std::fs::read_to_string(label_file).map_err(io_err(label_file))?;
        let mut samples = Vec::new();
        let mut max_label = 0u32;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| DataError::Format {
                path: label_file.to_path_buf(),
                reason: format!("line {}: {reason}", n + 1),
            };
            let (file, label) = line
                .rsplit_once(|c: char| c == ',' || c.is_whitespace())
                .ok_or_else(|| bad(format!("expected `path label`, found `{line}`")))?;
            let (file, label) = (file.trim().trim_end_matches(','), label.trim());
            let label = match (label.parse::<u32>(), &class_names) {
                (Ok(l), Some(names)) if l as usize >= names.len() => {
                    return Err(bad(format!(
                        "label {l} >= number of classes {}",
                        names.len()
                    )))
                }
                (Ok(l), _) => l,
                (Err(_), Some(names)) => names
                    .iter()
                    .position(|c| c == label)
                    .ok_or_else(|| bad(format!("unknown class `{label}`")))?
                    as u32,
                (Err(_), None) => return Err(bad(format!("label `{label}` is not a class index"))),
            };
            max_label = max_label.max(label);
            samples.push((root.join(file), label));
        }
        if samples.is_empty() {
            return Err(DataError::Empty(format!(
                "label file {} lists no image",
                label_file.display()
            )));
        }
        let classes =
            class_names.unwrap_or_else(|| (0..=max_label).map(|i| i.to_string()).collect());
        Ok(ImageFolder {
            root,
            classes,
            samples,
            decode: DecodeOptions::default(),
        })
    }

    /// Replace the decoding limits.
    pub fn with_decode_options(mut self, decode: DecodeOptions) -> Self {
        self.decode = decode;
        self
    }

    /// The dataset root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// `(path, label)` of every sample, in order.
    pub fn samples(&self) -> &[(PathBuf, u32)] {
        &self.samples
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn label(&self, index: usize) -> Option<u32> {
        self.samples.get(index).map(|s| s.1)
    }

    fn get(&self, index: usize) -> Result<Sample> {
        let (path, label) = self.samples.get(index).ok_or(DataError::OutOfRange {
            index,
            len: self.samples.len(),
        })?;
        Ok(Sample {
            image: decode_file(path, &self.decode)?,
            label: Some(*label),
        })
    }

    fn class_names(&self) -> Option<Vec<String>> {
        Some(self.classes.clone())
    }

    fn describe(&self, index: usize) -> String {
        self.samples
            .get(index)
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_else(|| format!("sample {index}"))
    }
}

/// Every image under a folder, recursively, without labels (pre-training data).
#[derive(Debug, Clone)]
pub struct UnlabelledFolder {
    root: PathBuf,
    files: Vec<PathBuf>,
    decode: DecodeOptions,
}

impl UnlabelledFolder {
    /// Scan `root` recursively. Errors if it holds no image.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let files = walk_images(&root)?;
        if files.is_empty() {
            return Err(DataError::Empty(format!(
                "no image ({}) under {}",
                IMAGE_EXTENSIONS.join(", "),
                root.display()
            )));
        }
        Ok(UnlabelledFolder {
            root,
            files,
            decode: DecodeOptions::default(),
        })
    }

    /// Replace the decoding limits.
    pub fn with_decode_options(mut self, decode: DecodeOptions) -> Self {
        self.decode = decode;
        self
    }

    /// The dataset root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image files, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl Dataset for UnlabelledFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn get(&self, index: usize) -> Result<Sample> {
        let path = self.files.get(index).ok_or(DataError::OutOfRange {
            index,
            len: self.files.len(),
        })?;
        Ok(Sample {
            image: decode_file(path, &self.decode)?,
            label: None,
        })
    }

    fn describe(&self, index: usize) -> String {
        self.files
            .get(index)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("sample {index}"))
    }
}
