//! Parquet files in the Hugging Face layout end to end: written here with the parquet crate's
//! writer (an `image` column of `{bytes, path}` structs, an int64 `label` column, the
//! `huggingface` metadata naming the classes), read back as the equivalent ImageFolder, splits by
//! hub file names, sharding across ranks, resume, packing into tar shards, and hostile files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use beit_data::shard_dataset::decode_raw;
use beit_data::{
    decode_file, describe_source, load_splits, open_images, pack_source, DataConfig, Dataset,
    DecodeOptions, EvalTransform, ImageFolder, Loader, LoaderConfig, PackOptions, ShardSet,
    ShardStream, TrainTransform,
};
use candle::Device;
use parquet::basic::Compression;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

#[path = "common/parquet_writer.rs"]
mod parquet_writer;
use parquet_writer::{write_parquet, Layout, Row, HUB};

#[path = "common/image_folder.rs"]
mod image_folder;
use image_folder::{make_folder, photo, CLASSES};

/// The rows of an ImageFolder split: file bytes and class index.
fn folder_rows(dir: &Path) -> Vec<Row> {
    let folder = ImageFolder::new(dir).unwrap();
    folder
        .samples()
        .iter()
        .map(|(p, l)| (Some(std::fs::read(p).unwrap()), Some(*l as i64)))
        .collect()
}

/// An ImageFolder and its hub-layout Parquet copy in `hub/data/`: (temp dir, folder, hub root).
fn hub_dataset(
    train_per_class: u32,
    train_files: usize,
    layout: Layout,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (folder, hub) = (dir.path().join("folder"), dir.path().join("hub"));
    make_folder(&folder, train_per_class);
    std::fs::create_dir_all(hub.join("data")).unwrap();
    let train = folder_rows(&folder.join("train"));
    let per = train.len().div_ceil(train_files);
    for (i, rows) in train.chunks(per).enumerate() {
        let name = format!("train-{i:05}-of-{train_files:05}.parquet");
        write_parquet(&hub.join("data").join(name), rows, layout);
    }
    let val = folder_rows(&folder.join("val"));
    let name = "validation-00000-of-00001.parquet";
    write_parquet(&hub.join("data").join(name), &val, layout);
    (dir, folder, hub)
}

/// Every sample of a set's stream (one split of one), decoded: (label, pixels).
fn read_all(set: &ShardSet) -> Vec<(u32, Vec<u8>)> {
    let plan = set.epoch_plan(true, 3, 0, 0, 1).unwrap();
    let stream = ShardStream::open(&plan, Arc::new(set.classes().to_vec()), 4).unwrap();
    stream
        .take(plan.quota)
        .map(|r| {
            let s = decode_raw(&r.unwrap(), &DecodeOptions::default()).unwrap();
            (s.label.unwrap(), s.image.into_raw())
        })
        .collect()
}

/// The decoded samples of an ImageFolder split, sorted.
fn folder_pixels(dir: &Path) -> Vec<(u32, Vec<u8>)> {
    let folder = ImageFolder::new(dir).unwrap();
    let mut v: Vec<_> = folder
        .samples()
        .iter()
        .map(|(p, l)| {
            let img = decode_file(p, &DecodeOptions::default()).unwrap();
            (*l, img.into_raw())
        })
        .collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<(u32, Vec<u8>)>) -> Vec<(u32, Vec<u8>)> {
    v.sort();
    v
}

fn source(path: &Path) -> DataConfig {
    DataConfig {
        source: path.to_string_lossy().into_owned(),
        ..DataConfig::default()
    }
}

#[test]
fn hub_parquet_reads_like_the_image_folder() {
    let (_t, folder, hub) = hub_dataset(5, 3, HUB);
    let s = load_splits(&source(&hub)).unwrap();
    assert_eq!(s.classes, CLASSES);
    assert_eq!((s.train.len(), s.val.len()), (15, 6), "{}", s.description);
    for (split, ds) in [("train", &s.train), ("val", &s.val)] {
        let set = ds.shards().unwrap();
        assert_eq!(sorted(read_all(&set)), folder_pixels(&folder.join(split)));
    }
    // Random access agrees with the stream's content.
    assert_eq!(s.train.get(4).unwrap().image.dimensions(), (20, 14));
    let (imgs, what) = open_images(&hub.to_string_lossy()).unwrap();
    assert_eq!(imgs.len(), 15, "{what}");
    let text = describe_source(&hub.to_string_lossy()).unwrap();
    for want in [
        "train: 3 Parquet shards, 15 samples",
        "validation: 1 Parquet",
        "3 classes",
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
    // One file, and a brace pattern, are one split each.
    let data = hub.join("data");
    let one = data.join("validation-00000-of-00001.parquet");
    assert_eq!(
        ShardSet::open(&one.to_string_lossy())
            .unwrap()
            .total_samples(),
        6
    );
    let pattern = format!("{}/train-{{00000..00002}}-of-00003.parquet", data.display());
    let set = ShardSet::open(&pattern).unwrap();
    assert_eq!((set.shards().len(), set.classes().len()), (3, 3));
    assert!(describe_source(&pattern).unwrap().contains("15 samples"));
}

#[test]
fn labels_without_names_are_indices_and_zstd_reads() {
    let layout = Layout {
        names: None,
        codec: Compression::ZSTD(Default::default()),
        ..HUB
    };
    let (_t, folder, hub) = hub_dataset(3, 2, layout);
    // The files directly in the root, not under data/.
    for f in std::fs::read_dir(hub.join("data")).unwrap().flatten() {
        std::fs::rename(f.path(), hub.join(f.file_name())).unwrap();
    }
    let s = load_splits(&source(&hub)).unwrap();
    assert_eq!(s.classes, ["0", "1", "2"]);
    let train = s.train.shards().unwrap();
    assert_eq!(
        sorted(read_all(&train)),
        folder_pixels(&folder.join("train"))
    );
}

#[test]
fn packing_parquet_gives_the_same_samples() {
    let (t, folder, hub) = hub_dataset(4, 2, HUB);
    let out = t.path().join("packed");
    let opts = PackOptions {
        shard_bytes: 3000,
        seed: 2,
    };
    let done = pack_source(&hub.to_string_lossy(), &out, &opts).unwrap();
    let names: Vec<&str> = done.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["train", "validation"]);
    let s = load_splits(&source(&out)).unwrap();
    assert_eq!(s.classes, CLASSES);
    let train = s.train.shards().unwrap();
    assert!(ShardSet::shards(&train).len() > 1);
    assert_eq!(
        sorted(read_all(&train)),
        folder_pixels(&folder.join("train"))
    );
    let val = s.val.shards().unwrap();
    assert_eq!(sorted(read_all(&val)), folder_pixels(&folder.join("val")));
}

fn cfg(batch_size: usize, rank: usize, world_size: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        num_threads: 2,
        prefetch: 2,
        rank,
        world_size,
        seed: 5,
        ..LoaderConfig::default()
    }
}

#[test]
fn ranks_read_disjoint_files_and_equal_batches() {
    let (_t, _folder, hub) = hub_dataset(9, 4, HUB); // 27 rows in 4 files of 7, 7, 7, 6
    let ds = load_splits(&source(&hub)).unwrap().train;
    let set = ds.shards().unwrap();
    let t = Arc::new(EvalTransform::unilm(16));
    for rank in 0..2 {
        let loader = Loader::new(ds.clone(), t.clone(), cfg(4, rank, 2), Device::Cpu).unwrap();
        assert_eq!(loader.batches_per_epoch(), 4); // 13 samples per rank
        let sizes: Vec<usize> = loader.epoch(1).unwrap().map(|b| b.unwrap().len()).collect();
        assert_eq!(sizes, [4, 4, 4, 1]);
    }
    let seen: Vec<BTreeSet<String>> = (0..2)
        .map(|rank| {
            let plan = set.epoch_plan(true, 5, 1, rank, 2).unwrap();
            let stream = ShardStream::open(&plan, Arc::new(set.classes().to_vec()), 8).unwrap();
            stream
                .take(plan.quota)
                .map(|r| r.unwrap().describe())
                .collect()
        })
        .collect();
    assert_eq!((seen[0].len(), seen[1].len()), (13, 13));
    assert!(seen[0].is_disjoint(&seen[1]));
}

fn batch_data(b: &beit_data::Batch) -> (Vec<f32>, Vec<u32>) {
    let img = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let labels = b.labels.as_ref().unwrap().to_vec1::<u32>().unwrap();
    (img, labels)
}

#[test]
fn resuming_from_a_position_gives_the_remaining_batches() {
    let (_t, _folder, hub) = hub_dataset(7, 3, HUB);
    let set = load_splits(&source(&hub)).unwrap().train.shards().unwrap();
    let set = (*set).clone().with_shuffle_buffer(5);
    let loader = Loader::new(
        Arc::new(set),
        Arc::new(TrainTransform::beit_finetune(16)),
        cfg(3, 0, 1),
        Device::Cpu,
    )
    .unwrap();
    let mut it = loader.epoch(2).unwrap();
    let (mut full, mut positions) = (Vec::new(), Vec::new());
    while let Some(b) = it.next() {
        full.push(batch_data(&b.unwrap()));
        positions.push(it.position().unwrap());
    }
    assert_eq!(full.len(), 7);
    let rest: Vec<_> = loader
        .epoch_from(positions[2])
        .unwrap()
        .map(|b| batch_data(&b.unwrap()))
        .collect();
    assert_eq!(rest, full[3..]);
}

fn png_bytes(seed: u32) -> Vec<u8> {
    let mut v = Vec::new();
    photo(seed)
        .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
        .unwrap();
    v
}

/// `good` rows, then garbage image bytes, a null image and a null label.
fn hostile_rows(good: u32) -> Vec<Row> {
    let mut rows: Vec<Row> = (0..good).map(|i| (Some(png_bytes(i)), Some(1))).collect();
    rows.push((Some(b"\xff\xd8 not a jpeg \xff\xd9".to_vec()), Some(0)));
    rows.push((None, Some(2)));
    rows.push((Some(png_bytes(99)), None));
    rows
}

#[test]
fn hostile_files_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_parquet(&d.join("a-0.parquet"), &hostile_rows(6), HUB);
    write_parquet(&d.join("a-1.parquet"), &hostile_rows(6), HUB);
    let whole = std::fs::read(d.join("a-1.parquet")).unwrap();
    std::fs::write(d.join("a-1.parquet"), &whole[..whole.len() / 2]).unwrap(); // truncated
    write_parquet(&d.join("a-2.parquet"), &hostile_rows(3), HUB);
    std::fs::write(d.join("a-3.parquet"), vec![0x5a; 3000]).unwrap(); // not Parquet at all
    let set = ShardSet::open(&format!("{}/a-{{0..3}}.parquet", d.display())).unwrap();
    assert_eq!(set.shards()[1].samples, 0);
    assert_eq!(set.classes(), CLASSES);
    let loader = Loader::new(
        Arc::new(set),
        Arc::new(EvalTransform::unilm(16)),
        cfg(4, 0, 1),
        Device::Cpu,
    )
    .unwrap();
    let n = loader.batches_per_epoch();
    for epoch in 0..2 {
        let batches: Vec<_> = loader.epoch(epoch).unwrap().map(|b| b.unwrap()).collect();
        assert_eq!(batches.len(), n);
    }
    let text = format!("{:?}", loader.skipped());
    for what in [
        "a-0.parquet/row-6",
        "row has no image",
        "row has no label",
        "a-1.parquet",
        "a-3.parquet",
    ] {
        assert!(text.contains(what), "{what} not in {text}");
    }
}

#[test]
fn missing_columns_are_errors_naming_file_and_column() {
    let (_t, _folder, hub) = hub_dataset(2, 1, HUB);
    let bad = hub.join("data/validation-00000-of-00001.parquet");
    let rows = folder_rows(&_folder.join("val"));
    write_parquet(
        &bad,
        &rows,
        Layout {
            label: false,
            ..HUB
        },
    );
    let err = load_splits(&source(&hub)).err().unwrap().to_string();
    assert!(
        err.contains("validation-00000-of-00001.parquet") && err.contains("`label`"),
        "{err}"
    );
    // Unlabelled use (pre-training) is fine without labels.
    assert_eq!(
        ShardSet::open(&bad.to_string_lossy())
            .unwrap()
            .total_samples(),
        6
    );
    // A file without the image column.
    let schema = Arc::new(parse_message_type("message schema { optional int64 label; }").unwrap());
    let file = std::fs::File::create(&bad).unwrap();
    let w = SerializedFileWriter::new(file, schema, Default::default()).unwrap();
    w.close().unwrap();
    let err = ShardSet::open(&bad.to_string_lossy())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("validation-00000-of-00001.parquet") && err.contains("`image`"),
        "{err}"
    );
    // Validation files only: no train split.
    std::fs::remove_file(hub.join("data/train-00000-of-00001.parquet")).unwrap();
    assert!(load_splits(&source(&hub)).is_err());
}
