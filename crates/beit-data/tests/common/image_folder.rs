//! A small ImageFolder written on the fly: three classes of 20x14 synthetic photos, PNGs and
//! JPEGs alternating, every image different. Shared by the shard and Parquet tests.

use std::path::Path;

use beit_data::RgbImage;

/// The classes of [`make_folder`], in folder order.
pub const CLASSES: [&str; 3] = ["bird", "cat", "dog"];

/// A synthetic 20x14 photo, different for every `seed`.
pub fn photo(seed: u32) -> RgbImage {
    RgbImage::from_fn(20, 14, |x, y| {
        image::Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 11 + seed * 53) % 256) as u8,
            ((x * y + seed * 3) % 256) as u8,
        ])
    })
}

/// `root/{train,val}/{bird,cat,dog}/`: PNGs and JPEGs, all different.
pub fn make_folder(root: &Path, train_per_class: u32) {
    let mut seed = 0;
    for (split, n) in [("train", train_per_class), ("val", 2)] {
        for class in CLASSES {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                seed += 1;
                let (ext, fmt) = if i % 2 == 0 {
                    ("png", image::ImageFormat::Png)
                } else {
                    ("jpg", image::ImageFormat::Jpeg)
                };
                photo(seed)
                    .save_with_format(dir.join(format!("im{i}.{ext}")), fmt)
                    .unwrap();
            }
        }
    }
}
