//! One tar shard in the WebDataset layout: members grouped into samples by key (the path up to
//! the first dot of the file name: `n0144/x_17.jpg` and `n0144/x_17.cls` are sample `n0144/x_17`),
//! each with an image (`.jpg`, `.jpeg`, `.png`, `.webp`, `.bmp`) and optionally a label (`.cls`: a class
//! index; `.txt`: an index or a class name; `.json`: a number, or an object with a `label` or
//! `cls` field). Other members are ignored.
//!
//! A shard is read front to back once; only the members of the sample at hand are held in memory.
//! A sample that cannot be used (no image, a bad label, an oversized member) comes out as an error
//! naming shard and key, and reading goes on; a truncated or corrupt archive ends its shard with
//! an error.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Image member extensions, compared case-insensitively.
pub const IMAGE_EXTS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];
/// Label member extensions, in order of preference.
pub const LABEL_EXTS: [&str; 3] = ["cls", "json", "txt"];
/// Largest member read into memory; larger ones make their sample fail.
pub const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// One sample of a shard, its image still encoded.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// The shard it came from.
    pub shard: PathBuf,
    /// Its key within the shard.
    pub key: String,
    /// The image member's extension (lower case).
    pub image_ext: String,
    /// The encoded image.
    pub image: Vec<u8>,
    /// The class index, when the sample has a label member.
    pub label: Option<u32>,
}

impl RawSample {
    /// `shard/key.ext`, for messages.
    pub fn describe(&self) -> String {
        format!("{}/{}.{}", self.shard.display(), self.key, self.image_ext)
    }
}

/// Split a member path into (key, extension) by WebDataset's rule; `None` for names without a dot.
pub fn split_key(path: &str) -> Option<(&str, &str)> {
    let start = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[start..].find('.')? + start;
    (dot > start).then(|| (&path[..dot], &path[dot + 1..]))
}

fn sample_err(shard: &Path, key: &str, reason: impl Into<String>) -> DataError {
    DataError::Format {
        path: shard.join(key),
        reason: reason.into(),
    }
}

/// Parse a label member into a class index; `classes` resolves `.txt` class names.
pub fn parse_label(
    ext: &str,
    bytes: &[u8],
    classes: &[String],
) -> std::result::Result<u32, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| format!(".{ext} label is not UTF-8"))?;
    let text = text.trim();
    let by_name = |name: &str| {
        classes
            .iter()
            .position(|c| c == name)
            .map(|i| i as u32)
            .ok_or_else(|| format!(".{ext} label `{name}` is neither an index nor a known class"))
    };
    match ext {
        "cls" => text
            .parse::<u32>()
            .map_err(|_| format!(".cls label `{text}` is not a class index")),
        "txt" => text.parse::<u32>().or_else(|_| by_name(text)),
        _ => {
            let v: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!(".json label: {e}"))?;
            let v = match &v {
                serde_json::Value::Object(m) => m.get("label").or_else(|| m.get("cls")).cloned(),
                other => Some(other.clone()),
            };
            match v {
                Some(serde_json::Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!(".json label {n} is not a class index")),
                Some(serde_json::Value::String(s)) => by_name(&s),
                _ => Err(".json label has no numeric `label` or `cls`".into()),
            }
        }
    }
}

/// The members of one key collected so far.
#[derive(Default)]
struct Group {
    key: String,
    image: Option<(String, Vec<u8>)>,
    label: Option<(String, Vec<u8>)>,
    problem: Option<String>,
}

impl Group {
    fn finish(self, shard: &Path, classes: &[String]) -> Result<RawSample> {
        if let Some(p) = self.problem {
            return Err(sample_err(shard, &self.key, p));
        }
        let (image_ext, image) = self
            .image
            .ok_or_else(|| sample_err(shard, &self.key, "sample has no image member"))?;
        let label = match self.label {
            Some((ext, bytes)) => Some(
                parse_label(&ext, &bytes, classes).map_err(|r| sample_err(shard, &self.key, r))?,
            ),
            None if !classes.is_empty() => {
                return Err(sample_err(shard, &self.key, "sample has no label member"))
            }
            None => None,
        };
        Ok(RawSample {
            shard: shard.to_path_buf(),
            key: self.key,
            image_ext,
            image,
            label,
        })
    }
}

/// What a member is to us.
enum Role {
    Image,
    Label,
}

fn role(ext: &str) -> Option<Role> {
    if IMAGE_EXTS.contains(&ext) {
        Some(Role::Image)
    } else if LABEL_EXTS.contains(&ext) {
        Some(Role::Label)
    } else {
        None
    }
}

/// Keep a label member if it is preferred over the one already held.
fn better_label(held: &Option<(String, Vec<u8>)>, ext: &str) -> bool {
    let rank = |e: &str| LABEL_EXTS.iter().position(|x| *x == e);
    held.as_ref().is_none_or(|(h, _)| rank(ext) < rank(h))
}

fn read_member(entry: &mut impl Read, size: u64) -> std::result::Result<Vec<u8>, String> {
    if size > MAX_MEMBER_BYTES {
        return Err(format!("member of {size} bytes exceeds {MAX_MEMBER_BYTES}"));
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading member: {e}"))?;
    if buf.len() as u64 != size {
        return Err(format!("member cut short ({} of {size} bytes)", buf.len()));
    }
    Ok(buf)
}

/// Read every sample of `shard` in order, handing each (or its error) to `visit`, which returns
/// whether to go on. With `classes` (a labelled set), a sample without a label is an error. A
/// truncated or corrupt archive ends with one error naming the shard.
pub fn read_shard(
    shard: &Path,
    classes: &[String],
    visit: &mut dyn FnMut(Result<RawSample>) -> bool,
) {
    if let Err(e) = read_shard_inner(shard, classes, visit) {
        visit(Err(e));
    }
}

fn read_shard_inner(
    shard: &Path,
    classes: &[String],
    visit: &mut dyn FnMut(Result<RawSample>) -> bool,
) -> Result<()> {
    let corrupt = |e: std::io::Error| DataError::Format {
        path: shard.to_path_buf(),
        reason: format!("corrupt or truncated tar: {e}"),
    };
    let file = File::open(shard).map_err(|source| DataError::Io {
        path: shard.to_path_buf(),
        source,
    })?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let mut group: Option<Group> = None;
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(corrupt)?
            .to_string_lossy()
            .into_owned();
        let Some((key, ext)) = split_key(&path) else {
            continue;
        };
        let ext = ext.to_ascii_lowercase();
        let Some(role) = role(&ext) else { continue };
        if group.as_ref().is_some_and(|g| g.key != key) {
            let done = group.take().map(|g| g.finish(shard, classes));
            if done.is_some_and(|d| !visit(d)) {
                return Ok(());
            }
        }
        let g = group.get_or_insert_with(|| Group {
            key: key.to_string(),
            ..Group::default()
        });
        let keep = match role {
            Role::Image => g.image.is_none(),
            Role::Label => better_label(&g.label, &ext),
        };
        if !keep || g.problem.is_some() {
            continue;
        }
        let size = entry.size();
        match read_member(&mut entry, size) {
            Ok(bytes) if matches!(role, Role::Image) => g.image = Some((ext, bytes)),
            Ok(bytes) => g.label = Some((ext, bytes)),
            Err(reason) if reason.contains("cut short") => {
                return Err(corrupt_short(shard, reason))
            }
            Err(reason) => g.problem = Some(reason),
        }
    }
    if let Some(g) = group {
        visit(g.finish(shard, classes));
    }
    Ok(())
}

fn corrupt_short(shard: &Path, reason: String) -> DataError {
    DataError::Format {
        path: shard.to_path_buf(),
        reason: format!("truncated tar: {reason}"),
    }
}

/// Number of samples of a shard (as [`read_shard`] would deliver them, errors included) and the
/// largest `.cls` label seen, reading only headers and label members.
pub fn count_shard(shard: &Path) -> Result<(usize, Option<u32>)> {
    let corrupt = |e: std::io::Error| DataError::Format {
        path: shard.to_path_buf(),
        reason: format!("corrupt or truncated tar: {e}"),
    };
    let file = File::open(shard).map_err(|source| DataError::Io {
        path: shard.to_path_buf(),
        source,
    })?;
    let mut archive = tar::Archive::new(file);
    let (mut count, mut max_label) = (0usize, None::<u32>);
    let mut last_key: Option<String> = None;
    for entry in archive.entries_with_seek().map_err(corrupt)? {
        let Ok(mut entry) = entry else { break };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let Ok(path) = entry.path().map(|p| p.to_string_lossy().into_owned()) else {
            continue;
        };
        let Some((key, ext)) = split_key(&path) else {
            continue;
        };
        let ext = ext.to_ascii_lowercase();
        if role(&ext).is_none() {
            continue;
        }
        if last_key.as_deref() != Some(key) {
            count += 1;
            last_key = Some(key.to_string());
        }
        if ext == "cls" && entry.size() < 64 {
            let mut buf = Vec::new();
            if entry.read_to_end(&mut buf).is_ok() {
                if let Ok(l) = parse_label("cls", &buf, &[]) {
                    max_label = Some(max_label.map_or(l, |m| m.max(l)));
                }
            }
        }
    }
    Ok((count, max_label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_webdataset() {
        assert_eq!(split_key("a/b/x_1.jpg"), Some(("a/b/x_1", "jpg")));
        assert_eq!(split_key("x.seg.png"), Some(("x", "seg.png")));
        assert_eq!(split_key("a.b/x"), None);
        assert_eq!(split_key(".hidden"), None);
    }

    #[test]
    fn labels_in_three_formats() {
        let classes = vec!["cat".to_string(), "dog".to_string()];
        assert_eq!(parse_label("cls", b" 7\n", &classes), Ok(7));
        assert_eq!(parse_label("txt", b"dog", &classes), Ok(1));
        assert_eq!(parse_label("json", br#"{"label": 3}"#, &classes), Ok(3));
        assert_eq!(parse_label("json", b"1", &classes), Ok(1));
        assert_eq!(parse_label("json", br#"{"cls": "cat"}"#, &classes), Ok(0));
        assert!(parse_label("cls", b"seven", &classes).is_err());
        assert!(parse_label("json", b"{", &classes).is_err());
        assert!(parse_label("txt", b"bird", &classes).is_err());
        assert!(parse_label("cls", &[0xff, 0xfe], &classes).is_err());
    }
}
