//! JPEG decoding is bit-identical to Pillow (`Image.open(p).convert("RGB")`, libjpeg-turbo) on
//! real photos: baseline 4:2:0 / 4:2:2 / 4:4:4, progressive, grey and CMYK variants written by
//! Pillow (`scripts/fixtures/family_fixtures.py`), and the big camera JPEG; the reference pixels are
//! Pillow's own decode, stored as PNG.

use std::path::{Path, PathBuf};

use beit_data::decode::{decode_bytes, decode_file, DecodeOptions};

fn jpeg_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/jpeg")
}

#[test]
fn every_variant_decodes_exactly_as_pillow() {
    let dir = jpeg_dir();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let images = manifest["images"].as_array().unwrap();
    assert!(images.len() >= 7);
    for entry in images {
        let jpeg = dir.join(entry["jpeg"].as_str().unwrap());
        let ours = decode_file(&jpeg, &DecodeOptions::default()).unwrap();
        let pillow = image::open(dir.join(entry["pillow_rgb"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(ours.dimensions(), pillow.dimensions(), "{}", jpeg.display());
        let differing = ours
            .as_raw()
            .iter()
            .zip(pillow.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "{} ({}): {differing} differing samples of {}",
            entry["jpeg"],
            entry["mode"],
            ours.as_raw().len()
        );
        assert_eq!(
            differing,
            0,
            "{}: not bit-identical to Pillow",
            jpeg.display()
        );
    }
}

#[test]
fn limits_and_truncation_are_refused_with_the_file_named() {
    let path = jpeg_dir().join("chelsea_444.jpg");
    let bytes = std::fs::read(&path).unwrap();
    let small = DecodeOptions {
        max_pixels: 1000,
        ..DecodeOptions::default()
    };
    let e = decode_bytes(&bytes, &path, &small).unwrap_err().to_string();
    assert!(
        e.contains("chelsea_444.jpg") && e.contains("exceeds"),
        "{e}"
    );
    let cut = &bytes[..bytes.len() / 2];
    let e = decode_bytes(cut, &path, &DecodeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    // Corrupted entropy-coded data: an error or an image, never a panic.
    let mut bad = bytes.clone();
    for i in (600..bad.len() - 2).step_by(97) {
        bad[i] ^= 0x5A;
    }
    let _ = decode_bytes(&bad, &path, &DecodeOptions::default());
}
