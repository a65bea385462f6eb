//! One Parquet file in the Hugging Face datasets layout, read as a shard: an `image` column of
//! `{bytes, path}` structs (or plain binary) and, in a labelled set, an integer `label` column.
//! Class names come from a `ClassLabel` feature in the file's `huggingface` key-value metadata
//! (`{"info": {"features": {"label": {"_type": "ClassLabel", "names": [...]}}}}`, as the
//! `datasets` library writes it); without it labels are indices.
//!
//! Rows are read through the `parquet` crate's row API, row group after row group, projected on
//! the two columns, 16 rows decoded ahead: only the pages at hand and those rows are in memory. A row that cannot be used (no image
//! bytes, a missing or negative label in a labelled set) comes out as an error naming file and row;
//! a file whose footer or pages cannot be read ends with one error naming the file.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};
use parquet::schema::types::Type;

use crate::error::{DataError, Result};
use crate::shard_count::ShardCount;
use crate::tar_shard::RawSample;

/// The image column: `{bytes, path}` structs, or binary.
pub const IMAGE_COLUMN: &str = "image";
/// The label column: integers (a `ClassLabel` feature).
pub const LABEL_COLUMN: &str = "label";
/// The key-value metadata entry holding the `datasets` features.
pub const HF_METADATA_KEY: &str = "huggingface";
/// Rows the row reader decodes ahead per column (its default, 1024, would hold that many images).
const ROW_BATCH: usize = 16;

fn format_err(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Open `path`'s footer.
pub fn open(path: &Path) -> Result<SerializedFileReader<File>> {
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    SerializedFileReader::new(file).map_err(|e| {
        format_err(
            path,
            format!("not a readable Parquet file (truncated?): {e}"),
        )
    })
}

/// Whether the file's schema has a top-level column `name`.
fn has_column(reader: &SerializedFileReader<File>, name: &str) -> bool {
    let schema = reader.metadata().file_metadata().schema();
    schema.get_fields().iter().any(|f| f.name() == name)
}

/// The schema projected on the image column and, when present, the label column. Errors name the
/// file and the missing `image` column.
fn projection(path: &Path, reader: &SerializedFileReader<File>) -> Result<Type> {
    let schema = reader.metadata().file_metadata().schema();
    let fields: Vec<Arc<Type>> = schema
        .get_fields()
        .iter()
        .filter(|f| f.name() == IMAGE_COLUMN || f.name() == LABEL_COLUMN)
        .cloned()
        .collect();
    if !fields.iter().any(|f| f.name() == IMAGE_COLUMN) {
        return Err(format_err(path, format!("no `{IMAGE_COLUMN}` column")));
    }
    Type::group_type_builder(schema.name())
        .with_fields(fields)
        .build()
        .map_err(|e| format_err(path, format!("schema: {e}")))
}

/// The `ClassLabel` names of the label column in the `huggingface` metadata, if any.
pub fn hub_class_names(reader: &SerializedFileReader<File>) -> Option<Vec<String>> {
    let kv = reader.metadata().file_metadata().key_value_metadata()?;
    let text = kv
        .iter()
        .find(|k| k.key == HF_METADATA_KEY)?
        .value
        .as_ref()?;
    let meta: serde_json::Value = serde_json::from_str(text).ok()?;
    let names = meta
        .pointer("/info/features/label/names")?
        .as_array()?
        .iter()
        .map(|n| n.as_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()?;
    (!names.is_empty()).then_some(names)
}

/// An integer field as a label; `None` for null or negative (the hub's "no label", -1).
fn int_label(field: &Field) -> Option<i64> {
    let v = match *field {
        Field::Byte(v) => v as i64,
        Field::Short(v) => v as i64,
        Field::Int(v) => v as i64,
        Field::Long(v) => v,
        Field::UByte(v) => v as i64,
        Field::UShort(v) => v as i64,
        Field::UInt(v) => v as i64,
        Field::ULong(v) => i64::try_from(v).ok()?,
        _ => return None,
    };
    (0..=u32::MAX as i64).contains(&v).then_some(v)
}

/// The bytes (and stored path) of an image field: a `{bytes, path}` struct or plain binary.
fn image_field(field: &Field) -> (Option<&[u8]>, Option<&str>) {
    match field {
        Field::Bytes(b) => (Some(b.data()), None),
        Field::Group(g) => {
            let (mut bytes, mut path) = (None, None);
            for (name, f) in g.get_column_iter() {
                match (name.as_str(), f) {
                    ("bytes", Field::Bytes(b)) => bytes = Some(b.data()),
                    ("path", Field::Str(s)) => path = Some(s.as_str()),
                    _ => {}
                }
            }
            (bytes, path)
        }
        _ => (None, None),
    }
}

/// The image format of encoded bytes by their signature, else by the stored file name.
fn image_ext(bytes: &[u8], path: Option<&str>) -> String {
    let by_magic = match bytes {
        [0xff, 0xd8, ..] => Some("jpg"),
        [0x89, b'P', b'N', b'G', ..] => Some("png"),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some("webp"),
        [b'B', b'M', ..] => Some("bmp"),
        _ => None,
    };
    let by_name = || {
        let ext = Path::new(path?).extension()?.to_str()?.to_ascii_lowercase();
        crate::tar_shard::IMAGE_EXTS
            .contains(&ext.as_str())
            .then_some(ext)
    };
    by_magic
        .map(str::to_string)
        .or_else(by_name)
        .unwrap_or_else(|| "jpg".into())
}

/// Turn row `index` of `shard` into a sample; `classes` non-empty: a labelled set.
fn row_sample(shard: &Path, index: usize, row: Row, classes: &[String]) -> Result<RawSample> {
    let key = format!("row-{index}");
    let err = |reason: String| format_err(&shard.join(&key), reason);
    let (mut image, mut label) = (None, None);
    for (name, field) in row.get_column_iter() {
        match name.as_str() {
            IMAGE_COLUMN => {
                let (bytes, path) = image_field(field);
                image = bytes.map(|b| (image_ext(b, path), b.to_vec()));
            }
            LABEL_COLUMN => label = int_label(field),
            _ => {}
        }
    }
    let (image_ext, image) = image.ok_or_else(|| err("row has no image bytes".into()))?;
    let label = match label {
        Some(l) if !classes.is_empty() && l as usize >= classes.len() => {
            return Err(err(format!("label {l} >= {} classes", classes.len())))
        }
        None if !classes.is_empty() => return Err(err("row has no label".into())),
        l => l.map(|l| l as u32),
    };
    Ok(RawSample {
        shard: shard.to_path_buf(),
        key,
        image_ext,
        image,
        label,
    })
}

/// Read every row of `shard` in order, handing each sample (or its error) to `visit`, which
/// returns whether to go on. With `classes` (a labelled set) the file must have a `label` column.
/// An unreadable file, or a corrupt page, ends the file with one error naming it.
pub fn read_shard(
    shard: &Path,
    classes: &[String],
    visit: &mut dyn FnMut(Result<RawSample>) -> bool,
) {
    let read = catch_unwind(AssertUnwindSafe(|| read_rows(shard, classes, visit)));
    let err = match read {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(_) => format_err(shard, "corrupt Parquet data (the reader failed)"),
    };
    visit(Err(err));
}

fn read_rows(
    shard: &Path,
    classes: &[String],
    visit: &mut dyn FnMut(Result<RawSample>) -> bool,
) -> Result<()> {
    let reader = open(shard)?;
    if !classes.is_empty() && !has_column(&reader, LABEL_COLUMN) {
        return Err(format_err(
            shard,
            format!("no `{LABEL_COLUMN}` column (a labelled split needs one)"),
        ));
    }
    let proj = projection(shard, &reader)?;
    let corrupt = |e: parquet::errors::ParquetError| format_err(shard, format!("corrupt: {e}"));
    let rows = RowIter::from_file(Some(proj), &reader)
        .map_err(corrupt)?
        .with_batch_size(ROW_BATCH);
    for (index, row) in rows.enumerate() {
        if !visit(row_sample(shard, index, row.map_err(corrupt)?, classes)) {
            break;
        }
    }
    Ok(())
}

/// Rows of `shard`, its `ClassLabel` names and (without names) its largest label. A file whose
/// footer cannot be read holds no sample here; reading it reports the error.
pub fn count_shard(shard: &Path) -> Result<ShardCount> {
    let reader = match open(shard) {
        Ok(r) => r,
        Err(DataError::Format { reason, .. }) => {
            tracing::warn!("{}: {reason}; it holds no sample", shard.display());
            return Ok(ShardCount::default());
        }
        Err(e) => return Err(e),
    };
    projection(shard, &reader)?;
    let samples = reader.metadata().file_metadata().num_rows().max(0) as usize;
    let classes = hub_class_names(&reader);
    let max_label = if classes.is_none() && has_column(&reader, LABEL_COLUMN) {
        catch_unwind(AssertUnwindSafe(|| max_label(&reader))).unwrap_or(None)
    } else {
        None
    };
    Ok(ShardCount {
        samples,
        max_label,
        classes,
    })
}

/// The largest label of the file, reading the label column alone.
fn max_label(reader: &SerializedFileReader<File>) -> Option<u32> {
    let schema = reader.metadata().file_metadata().schema();
    let label = schema
        .get_fields()
        .iter()
        .find(|f| f.name() == LABEL_COLUMN)?
        .clone();
    let proj = Type::group_type_builder(schema.name())
        .with_fields(vec![label])
        .build()
        .ok()?;
    let rows = reader.get_row_iter(Some(proj)).ok()?;
    rows.map_while(|r| r.ok())
        .filter_map(|r| r.get_column_iter().next().and_then(|(_, f)| int_label(f)))
        .map(|l| l as u32)
        .max()
}

/// Whether `path` (a Parquet file) has a `label` column; errors name the file.
pub fn has_label_column(path: &Path) -> Result<bool> {
    Ok(has_column(&open(path)?, LABEL_COLUMN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_signature_then_name() {
        assert_eq!(image_ext(&[0xff, 0xd8, 0xff], None), "jpg");
        assert_eq!(image_ext(b"\x89PNG\r\n", Some("x.jpg")), "png");
        assert_eq!(image_ext(b"????", Some("a/b.BMP")), "bmp");
        assert_eq!(image_ext(b"????", Some("a/b.txt")), "jpg");
    }

    #[test]
    fn labels_from_integers() {
        assert_eq!(int_label(&Field::Long(3)), Some(3));
        assert_eq!(int_label(&Field::Int(-1)), None);
        assert_eq!(int_label(&Field::Null), None);
        assert_eq!(int_label(&Field::Str("3".into())), None);
    }
}
