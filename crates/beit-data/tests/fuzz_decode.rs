//! Fuzzing image decoding (every supported format) with byte-level mutations of valid files and
//! random bytes: `decode_bytes` returns an image within the limits or an error naming the file;
//! it never panics, and no allocation exceeds `DecodeOptions::max_alloc`.
//!
//! CI runs a short pass; `cargo test -p beit-data --release --test fuzz_decode -- --ignored` runs
//! 100,000 cases.

#[path = "../../beit-model/tests/common/fuzz.rs"]
mod fuzz;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use beit_data::decode::{decode_bytes, DecodeOptions};
use image::{DynamicImage, ImageFormat, RgbImage};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: fuzz::Tracking = fuzz::Tracking;

const OPTS: DecodeOptions = DecodeOptions {
    max_side: 4096,
    max_pixels: 1 << 22,
    max_alloc: 64 << 20,
};

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/jpeg");
    let mut out: Vec<(String, Vec<u8>)> = [
        "chelsea_420.jpg",
        "chelsea_progressive.jpg",
        "chelsea_cmyk.jpg",
        "chelsea_gray.jpg",
    ]
    .iter()
    .map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap()))
    .collect();
    // Small images in the other formats, encoded here.
    let rgb = RgbImage::from_fn(23, 17, |x, y| {
        image::Rgb([(x * 11) as u8, (y * 15) as u8, (x ^ y) as u8])
    });
    let img = DynamicImage::ImageRgb8(rgb);
    for (name, format, image) in [
        ("seed.png", ImageFormat::Png, img.clone()),
        (
            "seed_rgba.png",
            ImageFormat::Png,
            DynamicImage::ImageRgba8(img.to_rgba8()),
        ),
        ("seed.bmp", ImageFormat::Bmp, img.clone()),
        ("seed.webp", ImageFormat::WebP, img.clone()),
        (
            "seed.gif",
            ImageFormat::Gif,
            DynamicImage::ImageRgba8(img.to_rgba8()),
        ),
    ] {
        let mut buf = Cursor::new(Vec::new());
        image.write_to(&mut buf, format).unwrap();
        out.push((name.to_string(), buf.into_inner()));
    }
    out
}

#[derive(Debug, Clone)]
enum Input {
    Mutated(usize, Vec<fuzz::Edit>),
    /// Random bytes after a format's magic number.
    Random(usize, Vec<u8>),
}

const MAGICS: [&[u8]; 6] = [
    b"\xFF\xD8\xFF",
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"GIF89a",
    b"",
];

fn target(cases: u32) {
    let seeds = seeds();
    let n = seeds.len();
    let strategy = prop_oneof![
        6 => (0..n, fuzz::edits()).prop_map(|(i, e)| Input::Mutated(i, e)),
        1 => (0..MAGICS.len(), prop::collection::vec(any::<u8>(), 0..256)).prop_map(|(m, b)| Input::Random(m, b)),
    ];
    fuzz::run("image decoding", cases, strategy, |input| {
        let (name, bytes) = match &input {
            Input::Mutated(i, edits) => (seeds[*i].0.clone(), fuzz::apply(&seeds[*i].1, edits)),
            Input::Random(m, tail) => (
                "random.bin".to_string(),
                [MAGICS[*m], tail.as_slice()].concat(),
            ),
        };
        let path = PathBuf::from(format!("fuzz/{name}"));
        match decode_bytes(&bytes, &path, &OPTS) {
            Ok(img) => {
                let (w, h) = img.dimensions();
                prop_assert!(w <= OPTS.max_side && h <= OPTS.max_side);
                prop_assert!(w as u64 * h as u64 <= OPTS.max_pixels);
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(&name), "error does not name the file: {msg}");
            }
        }
        fuzz::check_allocations(OPTS.max_alloc as usize, "image decoding")
    });
}

#[test]
fn fuzz_image_decoding_short() {
    target(fuzz::SHORT_CASES);
}

#[test]
#[ignore = "100k cases: run with --release -- --ignored"]
fn fuzz_image_decoding_100k() {
    target(fuzz::FULL_CASES);
}
