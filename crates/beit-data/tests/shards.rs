//! Tar shards end to end: an ImageFolder packed and read back, brace patterns, sharding across
//! ranks, resuming from a stream position, and hostile shards.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use beit_data::shard_dataset::decode_raw;
use beit_data::{
    decode_file, describe_source, load_splits, open_images, pack_image_folder, DataConfig, Dataset,
    DecodeOptions, EvalTransform, ImageFolder, Loader, LoaderConfig, PackOptions, ShardSet,
    ShardStream, TrainTransform,
};
use candle::Device;

#[path = "common/image_folder.rs"]
mod image_folder;
use image_folder::{make_folder, photo};

/// A packed copy of a fresh ImageFolder: (temp dir, ImageFolder root, packed root).
fn packed(
    train_per_class: u32,
    shard_bytes: u64,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("folder"), dir.path().join("shards"));
    make_folder(&data, train_per_class);
    let opts = PackOptions {
        shard_bytes,
        seed: 1,
    };
    pack_image_folder(&data, &out, &opts).unwrap();
    (dir, data, out)
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

/// Every sample of a split's stream (one split of one), decoded: (label, pixels).
fn read_all(set: &ShardSet) -> Vec<(u32, Vec<u8>)> {
    let plan = set.epoch_plan(true, 3, 0, 0, 1).unwrap();
    let classes = Arc::new(set.classes().to_vec());
    let stream = ShardStream::open(&plan, classes, 4).unwrap();
    stream
        .take(plan.quota)
        .map(|r| {
            let s = decode_raw(&r.unwrap(), &DecodeOptions::default()).unwrap();
            (s.label.unwrap(), s.image.into_raw())
        })
        .collect()
}

#[test]
fn packed_folder_reads_back_identical() {
    let (_t, data, out) = packed(5, 3000);
    for split in ["train", "val"] {
        let folder = ImageFolder::new(data.join(split)).unwrap();
        let set = ShardSet::open(&out.join(split).to_string_lossy()).unwrap();
        assert!(out.join(split).join("manifest.json").is_file());
        assert_eq!(set.classes(), folder.classes());
        assert_eq!(set.total_samples(), folder.len());
        let mut want: Vec<(u32, Vec<u8>)> = folder
            .samples()
            .iter()
            .map(|(p, l)| {
                (
                    *l,
                    decode_file(p, &DecodeOptions::default())
                        .unwrap()
                        .into_raw(),
                )
            })
            .collect();
        let mut got = read_all(&set);
        want.sort();
        got.sort();
        assert_eq!(got, want, "{split}");
    }
    let train = ShardSet::open(&out.join("train").to_string_lossy()).unwrap();
    assert!(train.shards().len() > 2, "{} shards", train.shards().len());
    // Random access agrees with the stream.
    assert_eq!(train.get(3).unwrap().image.dimensions(), (20, 14));
    // The packed root is a --data root like the ImageFolder.
    let s = load_splits(&DataConfig {
        source: out.to_string_lossy().into_owned(),
        ..DataConfig::default()
    })
    .unwrap();
    assert_eq!((s.train.len(), s.val.len(), s.classes.len()), (15, 6, 3));
    let (imgs, what) = open_images(&out.to_string_lossy()).unwrap();
    assert_eq!(imgs.len(), 15, "{what}");
    let text = describe_source(&out.to_string_lossy()).unwrap();
    assert!(
        text.contains("train:") && text.contains("15 samples"),
        "{text}"
    );
}

#[test]
fn brace_patterns_name_the_shards() {
    let (_t, _data, out) = packed(5, 3000);
    let n = ShardSet::open(&out.join("train").to_string_lossy())
        .unwrap()
        .shards()
        .len();
    let pattern = format!(
        "{}/shard-{{000000..{:06}}}.tar",
        out.join("train").display(),
        n - 1
    );
    let set = ShardSet::open(&pattern).unwrap();
    assert_eq!((set.shards().len(), set.total_samples()), (n, 15));
    let (imgs, _) = open_images(&pattern).unwrap();
    assert_eq!(imgs.len(), 15);
    // Without the manifest, the counts come from the tar headers.
    std::fs::remove_file(out.join("train/manifest.json")).unwrap();
    let scanned = ShardSet::open(&pattern).unwrap();
    assert_eq!(scanned.total_samples(), 15);
    assert_eq!(scanned.classes(), ["0", "1", "2"]);
    // A missing shard is named.
    let missing = format!(
        "{}/shard-{{000000..{:06}}}.tar",
        out.join("train").display(),
        n
    );
    let err = ShardSet::open(&missing).unwrap_err().to_string();
    assert!(err.contains(&format!("shard-{n:06}.tar")), "{err}");
}

#[test]
fn ranks_and_workers_read_disjoint_shards_and_equal_batches() {
    let (_t, _data, out) = packed(9, 2500);
    let set = ShardSet::open(&out.join("train").to_string_lossy()).unwrap();
    assert!(set.shards().len() >= 4, "{}", set.shards().len());
    for epoch in 0..2 {
        let plans: Vec<_> = (0..4)
            .map(|s| set.epoch_plan(true, 7, epoch, s, 4).unwrap())
            .collect();
        let mut all: Vec<_> = plans.iter().flat_map(|p| p.shards.clone()).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!((n, all.len()), (set.shards().len(), set.shards().len()));
        assert!(plans.iter().all(|p| p.quota == 27 / 4));
    }
    let ds: Arc<dyn Dataset> = Arc::new(set);
    let t = Arc::new(EvalTransform::unilm(16));
    let mut seen = Vec::new();
    for rank in 0..2 {
        let loader = Loader::new(ds.clone(), t.clone(), cfg(4, rank, 2), Device::Cpu).unwrap();
        assert_eq!(loader.batches_per_epoch(), 4); // 13 samples per rank
        let sizes: Vec<usize> = loader.epoch(1).unwrap().map(|b| b.unwrap().len()).collect();
        assert_eq!(sizes, [4, 4, 4, 1]);
        seen.push(loader.epoch(1).unwrap().filter(|b| b.is_ok()).count());
    }
    assert_eq!(seen, [4, 4]);
    // The two ranks' samples are disjoint and together all but the remainder.
    let set = ds.shards().unwrap();
    let keys: Vec<BTreeSet<String>> = (0..2)
        .map(|rank| {
            let plan = set.epoch_plan(true, 5, 1, rank, 2).unwrap();
            let stream = ShardStream::open(&plan, Arc::new(set.classes().to_vec()), 8).unwrap();
            stream.take(plan.quota).map(|r| r.unwrap().key).collect()
        })
        .collect();
    assert_eq!((keys[0].len(), keys[1].len()), (13, 13));
    assert!(keys[0].is_disjoint(&keys[1]));
    assert!(ShardSet::open(&out.join("train").to_string_lossy())
        .unwrap()
        .epoch_plan(true, 0, 0, 0, 100)
        .is_err());
}

fn batch_data(b: &beit_data::Batch) -> (Vec<f32>, Vec<u32>) {
    let img = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let labels = b.labels.as_ref().unwrap().to_vec1::<u32>().unwrap();
    (img, labels)
}

#[test]
fn resuming_from_a_position_gives_the_remaining_batches() {
    let (_t, _data, out) = packed(7, 2500);
    let set = ShardSet::open(&out.join("train").to_string_lossy())
        .unwrap()
        .with_shuffle_buffer(5);
    let loader = Loader::new(
        Arc::new(set),
        Arc::new(TrainTransform::beit_finetune(16)),
        cfg(3, 0, 1),
        Device::Cpu,
    )
    .unwrap();
    let mut it = loader.epoch(2).unwrap();
    let mut full = Vec::new();
    let mut positions = Vec::new();
    while let Some(b) = it.next() {
        full.push(batch_data(&b.unwrap()));
        positions.push(it.position().unwrap());
    }
    assert_eq!(full.len(), 7);
    let saved = serde_json::to_string(&positions[2]).unwrap();
    let pos = serde_json::from_str(&saved).unwrap();
    let rest: Vec<_> = loader
        .epoch_from(pos)
        .unwrap()
        .map(|b| batch_data(&b.unwrap()))
        .collect();
    assert_eq!(rest, full[3..]);
    // Another epoch is another order.
    let other: Vec<_> = loader
        .epoch(3)
        .unwrap()
        .map(|b| batch_data(&b.unwrap()))
        .collect();
    assert_ne!(other, full);
}

/// Append `name` with `bytes` to a tar builder.
fn member(b: &mut tar::Builder<std::fs::File>, name: &str, bytes: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, name, bytes).unwrap();
}

fn png_bytes(seed: u32) -> Vec<u8> {
    let mut v = Vec::new();
    photo(seed)
        .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
        .unwrap();
    v
}

/// A shard of `good` valid samples, then a corrupt image, a bad label and an image-less key.
fn hostile_shard(path: &Path, good: u32) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for i in 0..good {
        member(&mut b, &format!("s{i}.png"), &png_bytes(i));
        member(&mut b, &format!("s{i}.cls"), b"1");
    }
    member(&mut b, "bad_image.jpg", b"\xff\xd8 not a jpeg \xff\xd9");
    member(&mut b, "bad_image.cls", b"0");
    member(&mut b, "bad_label.png", &png_bytes(99));
    member(&mut b, "bad_label.cls", b"one");
    member(&mut b, "no_image.cls", b"0");
    b.into_inner().unwrap().flush().unwrap();
}

#[test]
fn hostile_shards_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    hostile_shard(&d.join("a-0.tar"), 6);
    hostile_shard(&d.join("a-1.tar"), 6);
    // Truncated in the middle of a member.
    let whole = std::fs::read(d.join("a-1.tar")).unwrap();
    std::fs::write(d.join("a-1.tar"), &whole[..whole.len() / 2]).unwrap();
    std::fs::write(d.join("a-2.tar"), b"").unwrap(); // empty shard
    hostile_shard(&d.join("a-3.tar"), 3);
    std::fs::write(d.join("a-4.tar"), vec![0x5a; 3000]).unwrap(); // not a tar at all
    let set = ShardSet::open(&format!("{}/a-{{0..4}}.tar", d.display())).unwrap();
    assert_eq!(set.shards()[2].samples, 0);
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
        assert!(batches.iter().all(|b| b.labels.is_some()));
    }
    let skipped: BTreeSet<String> = loader.skipped().into_iter().map(|s| s.source).collect();
    let text = format!("{skipped:?}");
    for what in ["bad_image.jpg", "bad_label", "no_image", "a-1.tar"] {
        assert!(text.contains(what), "{what} not in {text}");
    }
    // Each skipped sample is reported once, however many epochs see it.
    assert_eq!(skipped.len(), loader.skipped().len());
}

#[test]
fn unusable_sources_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("e-0.tar"), b"").unwrap();
    let err = ShardSet::open(&format!("{}/e-{{0..0}}.tar", d.display()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no sample"), "{err}");
    let err = ShardSet::open(&format!("{}/e-{{0..1}}.tar", d.display()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("e-1.tar"), "{err}");
    // Only bad samples: the loader errors instead of waiting forever.
    let mut b = tar::Builder::new(std::fs::File::create(d.join("bad.tar")).unwrap());
    member(&mut b, "x.png", b"garbage");
    b.into_inner().unwrap().flush().unwrap();
    let set = ShardSet::open(&d.join("bad.tar").to_string_lossy()).unwrap();
    let loader = Loader::new(
        Arc::new(set),
        Arc::new(EvalTransform::unilm(16)),
        cfg(4, 0, 1),
        Device::Cpu,
    )
    .unwrap();
    let first = loader.epoch(0).unwrap().next().unwrap();
    assert!(first.is_err());
}
