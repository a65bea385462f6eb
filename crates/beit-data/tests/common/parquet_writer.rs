//! Parquet files in the Hugging Face `datasets` layout, written with the parquet crate's writer:
//! an `image` column of `{bytes, path}` structs, an int64 `label` column, the `huggingface`
//! metadata naming the classes. Shared by beit-data's and beit-cli's tests.

use std::path::Path;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// One row: image bytes (None: null) and label (None: null).
pub type Row = (Option<Vec<u8>>, Option<i64>);

/// What a written file holds besides its rows.
#[derive(Clone, Copy)]
pub struct Layout {
    /// The class names written in the `huggingface` metadata (`None`: no names).
    pub names: Option<&'static [&'static str]>,
    /// Have a `label` column.
    pub label: bool,
    /// Rows per row group.
    pub group: usize,
    /// The pages' codec.
    pub codec: Compression,
}

/// What the `datasets` library writes (classes `bird`, `cat`, `dog`).
pub const HUB: Layout = Layout {
    names: Some(&["bird", "cat", "dog"]),
    label: true,
    group: 2,
    codec: Compression::SNAPPY,
};

fn schema(label: bool) -> String {
    let label = if label { "optional int64 label;" } else { "" };
    format!(
        "message schema {{ optional group image {{ optional binary bytes; \
         optional binary path (STRING); }} {label} }}"
    )
}

fn hub_metadata(names: &[&str]) -> KeyValue {
    let meta = serde_json::json!({"info": {"features": {
        "image": {"_type": "Image"},
        "label": {"names": names, "_type": "ClassLabel"}}}});
    KeyValue::new("huggingface".into(), meta.to_string())
}

/// Write `rows` as the `datasets` library does, `layout.group` rows per row group.
pub fn write_parquet(path: &Path, rows: &[Row], layout: Layout) {
    let schema = Arc::new(parse_message_type(&schema(layout.label)).unwrap());
    let props = WriterProperties::builder()
        .set_compression(layout.codec)
        .set_key_value_metadata(layout.names.map(|n| vec![hub_metadata(n)]))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, Arc::new(props)).unwrap();
    for chunk in rows.chunks(layout.group) {
        let mut rg = w.next_row_group().unwrap();
        let bytes: Vec<ByteArray> = chunk
            .iter()
            .filter_map(|r| r.0.clone().map(ByteArray::from))
            .collect();
        let defs: Vec<i16> = chunk.iter().map(|r| 1 + r.0.is_some() as i16).collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&bytes, Some(&defs), None)
            .unwrap();
        col.close().unwrap();
        let paths: Vec<ByteArray> = (0..chunk.len())
            .map(|i| ByteArray::from(format!("{i}.png").into_bytes()))
            .collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&paths, Some(&vec![2; chunk.len()]), None)
            .unwrap();
        col.close().unwrap();
        if layout.label {
            let labels: Vec<i64> = chunk.iter().filter_map(|r| r.1).collect();
            let defs: Vec<i16> = chunk.iter().map(|r| r.1.is_some() as i16).collect();
            let mut col = rg.next_column().unwrap().unwrap();
            col.typed::<Int64Type>()
                .write_batch(&labels, Some(&defs), None)
                .unwrap();
            col.close().unwrap();
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}
