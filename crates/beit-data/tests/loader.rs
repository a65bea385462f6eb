//! Datasets and the loader on real files written at run time: valid, truncated and garbage images.

use std::path::Path;
use std::sync::Arc;

use beit_data::{
    decode_file, Dataset, DecodeOptions, EvalTransform, FashionMnist, ImageFolder, Loader,
    LoaderConfig, Mixup, RgbImage, TrainTransform, TwoViewTransform, UnlabelledFolder,
};
use candle::{Device, IndexOp};

fn photo(seed: u32) -> RgbImage {
    RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([
            ((x * 4 + seed * 30) % 256) as u8,
            ((y * 5 + seed * 50) % 256) as u8,
            ((x * y + seed) % 256) as u8,
        ])
    })
}

fn write(path: &Path, img: &RgbImage, format: image::ImageFormat) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, format).unwrap();
}

/// root/cat: 2 good images; root/dog: 1 good, 1 truncated JPEG, 1 truncated PNG, 1 garbage file.
fn make_folder(root: &Path) {
    write(&root.join("cat/a.png"), &photo(1), image::ImageFormat::Png);
    write(
        &root.join("cat/sub/B.JPG"),
        &photo(2),
        image::ImageFormat::Jpeg,
    );
    write(
        &root.join("dog/c.jpeg"),
        &photo(3),
        image::ImageFormat::Jpeg,
    );
    let jpg = std::fs::read(root.join("dog/c.jpeg")).unwrap();
    std::fs::write(root.join("dog/d_truncated.jpg"), &jpg[..jpg.len() / 2]).unwrap();
    let png = std::fs::read(root.join("cat/a.png")).unwrap();
    std::fs::write(root.join("dog/e_truncated.png"), &png[..png.len() * 2 / 3]).unwrap();
    std::fs::write(
        root.join("dog/f_garbage.png"),
        b"this is not an image at all",
    )
    .unwrap();
    std::fs::write(
        root.join("dog/notes.txt"),
        b"ignored: not an image extension",
    )
    .unwrap();
}

fn cfg(batch_size: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        num_threads: 2,
        prefetch: 2,
        ..LoaderConfig::default()
    }
}

#[test]
fn image_folder_follows_torchvision_layout() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let ds = ImageFolder::new(dir.path()).unwrap();
    assert_eq!(ds.classes(), ["cat", "dog"]);
    let names: Vec<String> = ds
        .samples()
        .iter()
        .map(|(p, l)| format!("{}:{l}", p.strip_prefix(dir.path()).unwrap().display()))
        .collect();
    assert_eq!(
        names,
        [
            "cat/a.png:0",
            "cat/sub/B.JPG:0",
            "dog/c.jpeg:1",
            "dog/d_truncated.jpg:1",
            "dog/e_truncated.png:1",
            "dog/f_garbage.png:1"
        ]
    );
    // Each bad file is a decode error naming it; good ones decode.
    for i in 0..3 {
        assert_eq!(ds.get(i).unwrap().image.dimensions(), (64, 48));
    }
    for i in 3..6 {
        let err = ds.get(i).unwrap_err().to_string();
        assert!(err.contains(&ds.describe(i)), "{err}");
    }
    let unl = UnlabelledFolder::new(dir.path()).unwrap();
    assert_eq!(unl.len(), 6);
    assert!(unl.get(0).unwrap().label.is_none());
}

#[test]
fn empty_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = ImageFolder::new(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no class sub-folders"), "{err}");
    write(
        &dir.path().join("a/x.png"),
        &photo(0),
        image::ImageFormat::Png,
    );
    std::fs::create_dir_all(dir.path().join("b_empty")).unwrap();
    std::fs::write(dir.path().join("b_empty/readme.txt"), b"no images").unwrap();
    let err = ImageFolder::new(dir.path()).unwrap_err().to_string();
    assert!(err.contains("b_empty"), "{err}");
    let err = UnlabelledFolder::new(dir.path().join("b_empty"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no image"), "{err}");
    let err = ImageFolder::new(dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn corrupt_files_are_skipped_counted_and_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let ds = Arc::new(ImageFolder::new(dir.path()).unwrap());
    let loader = Loader::new(
        ds.clone(),
        Arc::new(EvalTransform::unilm(32)),
        cfg(2),
        Device::Cpu,
    )
    .unwrap();
    for epoch in 0..2 {
        let batches: Vec<_> = loader.epoch(epoch).unwrap().map(|b| b.unwrap()).collect();
        // 3 good images in batches of 2: full batches are refilled past the bad files.
        let sizes: Vec<usize> = batches.iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [2, 1]);
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        seen.sort();
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(batches[0].images.dims(), &[2, 3, 32, 32]);
        assert_eq!(batches[0].labels.as_ref().unwrap().dims(), &[2]);
    }
    let skipped = loader.skipped();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped
        .iter()
        .any(|s| s.source.ends_with("d_truncated.jpg")));
    assert!(skipped
        .iter()
        .any(|s| s.source.ends_with("e_truncated.png")));
    assert!(skipped.iter().any(|s| s.source.ends_with("f_garbage.png")));
    let summary = loader.summary();
    assert!(summary.contains("3 unreadable"), "{summary}");
}

#[test]
fn huge_images_hit_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.png");
    write(&path, &RgbImage::new(300, 200), image::ImageFormat::Png);
    let strict = DecodeOptions {
        max_pixels: 10_000,
        ..DecodeOptions::default()
    };
    let err = decode_file(&path, &strict).unwrap_err().to_string();
    assert!(err.contains("big.png") && err.contains("10000"), "{err}");
    let tiny_alloc = DecodeOptions {
        max_alloc: 1_000,
        ..DecodeOptions::default()
    };
    assert!(decode_file(&path, &tiny_alloc).is_err());
    assert!(decode_file(&path, &DecodeOptions::default()).is_ok());
}

#[test]
fn label_file_form_for_a_flat_val_folder() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("val/x1.png"),
        &photo(1),
        image::ImageFormat::Png,
    );
    write(
        &dir.path().join("val/x2.png"),
        &photo(2),
        image::ImageFormat::Png,
    );
    let list = dir.path().join("val.txt");
    std::fs::write(&list, "# file label\nx1.png 3\nx2.png,1\n").unwrap();
    let ds = ImageFolder::from_label_file(dir.path().join("val"), &list, None).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.classes().len(), 4);
    assert_eq!(ds.get(1).unwrap().label, Some(1));
    let names = vec!["a".to_string(), "b".to_string()];
    std::fs::write(&list, "x1.png b\nx2.png a\n").unwrap();
    let ds =
        ImageFolder::from_label_file(dir.path().join("val"), &list, Some(names.clone())).unwrap();
    assert_eq!(ds.get(0).unwrap().label, Some(1));
    std::fs::write(&list, "x1.png zebra\n").unwrap();
    let err = ImageFolder::from_label_file(dir.path().join("val"), &list, Some(names))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("val.txt") && err.contains("line 1") && err.contains("zebra"),
        "{err}"
    );
}

#[test]
fn two_view_batches_are_deterministic_per_seed_and_epoch() {
    let fm = FashionMnist::embedded().unwrap();
    let ds = Arc::new(fm.train.take(24));
    let mut t = TwoViewTransform::beit(32, 16);
    t.crop.scale = (0.5, 1.0);
    let make = |seed| {
        Loader::new(
            ds.clone(),
            Arc::new(t.clone()),
            LoaderConfig { seed, ..cfg(8) },
            Device::Cpu,
        )
        .unwrap()
    };
    let a = make(1);
    let first: Vec<_> = a.epoch(0).unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(first.len(), 3);
    let b0 = &first[0];
    assert_eq!(b0.images.dims(), &[8, 3, 32, 32]);
    let tok = b0.tokenizer_images.as_ref().unwrap();
    assert_eq!(tok.dims(), &[8, 3, 16, 16]);
    let (lo, hi) = (
        tok.min_all().unwrap().to_scalar::<f32>().unwrap(),
        tok.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert!(lo >= 0.1 - 1e-6 && hi <= 0.9 + 1e-6, "{lo} {hi}");
    let img_range = b0
        .images
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(img_range <= 1.0 + 1e-6 && img_range > 0.5);
    // Same seed and epoch: identical batches (order and augmentations), whatever the thread timing.
    let again: Vec<_> = make(1).epoch(0).unwrap().map(|b| b.unwrap()).collect();
    for (x, y) in first.iter().zip(&again) {
        assert_eq!(x.indices, y.indices);
        let d = (&x.images - &y.images)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
    // Another epoch: another order; another seed: other augmentations of the same sample.
    let e1: Vec<_> = a.epoch(1).unwrap().map(|b| b.unwrap()).collect();
    assert_ne!(e1[0].indices, first[0].indices);
    let other = make(2);
    let mut cfg_noshuffle = other.config().clone();
    cfg_noshuffle.shuffle = false;
    let s1 = Loader::new(
        ds.clone(),
        Arc::new(t.clone()),
        LoaderConfig {
            shuffle: false,
            ..a.config().clone()
        },
        Device::Cpu,
    )
    .unwrap();
    let s2 = Loader::new(ds.clone(), Arc::new(t.clone()), cfg_noshuffle, Device::Cpu).unwrap();
    let x = s1.epoch(0).unwrap().next().unwrap().unwrap();
    let y = s2.epoch(0).unwrap().next().unwrap().unwrap();
    assert_eq!(x.indices, y.indices);
    let d = (&x.images - &y.images)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() > 0.0);
}

#[test]
fn finetune_batches_with_mixup_sharding_and_drop_last() {
    let fm = FashionMnist::embedded().unwrap();
    let ds = Arc::new(fm.test.take(50));
    let t = Arc::new(TrainTransform::beit_finetune(28));
    let mut c = cfg(8);
    c.drop_last = true;
    c.world_size = 2;
    c.rank = 1;
    let loader = Loader::new(ds.clone(), t.clone(), c, Device::Cpu)
        .unwrap()
        .with_mixup(Mixup::beit(10))
        .unwrap();
    assert_eq!(loader.samples_per_epoch(), 25);
    assert_eq!(loader.batches_per_epoch(), 3);
    let batches: Vec<_> = loader.epoch(0).unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 3);
    let b = &batches[0];
    let soft = b.soft_targets.as_ref().unwrap();
    assert_eq!(soft.dims(), &[8, 10]);
    let sums = soft.sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
    // Hard labels stay available.
    let labels = b.labels.as_ref().unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(labels[0], fm.test.label(b.indices[0]) as u32);
    // The other rank sees the complementary samples.
    let mut c0 = loader.config().clone();
    c0.rank = 0;
    c0.drop_last = false;
    let l0 = Loader::new(ds.clone(), t, c0.clone(), Device::Cpu).unwrap();
    let mut c1 = c0;
    c1.rank = 1;
    let l1 = Loader::new(
        ds.clone(),
        Arc::new(EvalTransform::huggingface(28)),
        c1,
        Device::Cpu,
    )
    .unwrap();
    let mut all: Vec<usize> = l0
        .epoch(3)
        .unwrap()
        .chain(l1.epoch(3).unwrap())
        .flat_map(|b| b.unwrap().indices)
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 50);
}

#[test]
fn eval_on_fashion_mnist_keeps_pixels() {
    let fm = FashionMnist::embedded().unwrap();
    let ds = Arc::new(fm.test.take(4));
    let mut t = EvalTransform::huggingface(28);
    t.normalize = beit_data::Normalize::IDENTITY;
    let mut c = cfg(4);
    c.shuffle = false;
    c.progress = true; // drawn on stderr when it is a terminal, hidden otherwise
    let loader = Loader::new(ds, Arc::new(t), c, Device::Cpu).unwrap();
    let b = loader.epoch(0).unwrap().next().unwrap().unwrap();
    let v = b
        .images
        .i((0, 0, 14, 14))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((v - fm.test.image(0)[14 * 28 + 14] as f32 / 255.0).abs() < 1e-6);
    // Dropping an epoch early stops its producer without hanging.
    let it = loader.epoch(1).unwrap();
    drop(it);
    let it = loader.epoch(2).unwrap();
    let n: usize = it.map(|b| b.unwrap().len()).sum();
    assert_eq!(n, 4);
    assert!(loader.summary().contains("no file skipped"));
}
