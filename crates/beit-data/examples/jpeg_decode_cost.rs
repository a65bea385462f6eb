//! Decode JPEG files with the decoder `beit-data` links (MozJPEG 4's, libjpeg-turbo's) set up as
//! `jpeg.rs` sets it up (accurate integer IDCT, fancy upsampling), and print each file's decoded
//! size and an FNV-1a hash of its pixels. Each file is decoded once, in `decode_one`, so that an
//! instruction counter can take the decoder's cost alone, and the hashes show that the portable C
//! and SIMD builds give the same pixels (crates/beit-data/README.md, "JPEG decoder cost"):
//!
//! ```sh
//! cargo build --release -p beit-data --example jpeg_decode_cost [--features jpeg-simd]
//! valgrind --tool=callgrind --toggle-collect='*decode_one*' \
//!     target/release/examples/jpeg_decode_cost fixtures/data/rocket.jpg
//! ```
//!
//! Not part of the test suite.

use std::os::raw::c_ulong;

use mozjpeg_sys as jpeg;
use mozjpeg_sys::J_COLOR_SPACE as Cs;

/// Decode one JPEG (libjpeg's default error handler: a broken file ends the process).
#[inline(never)]
fn decode_one(bytes: &[u8]) -> Vec<u8> {
    // SAFETY: the structs are plain C data, zeroed as libjpeg expects before `jpeg_std_error` and
    // `jpeg_create_decompress` fill them; `bytes` outlives the decompressor; every row pointer
    // handed to `jpeg_read_scanlines` lies inside `out`, which holds `output_height` rows.
    unsafe {
        let mut err: jpeg::jpeg_error_mgr = std::mem::zeroed();
        let mut cinfo: jpeg::jpeg_decompress_struct = std::mem::zeroed();
        cinfo.common.err = jpeg::jpeg_std_error(&mut err);
        jpeg::jpeg_create_decompress(&mut cinfo);
        jpeg::jpeg_mem_src(&mut cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
        jpeg::jpeg_read_header(&mut cinfo, 1);
        cinfo.out_color_space = match cinfo.jpeg_color_space {
            Cs::JCS_GRAYSCALE => Cs::JCS_GRAYSCALE,
            Cs::JCS_CMYK | Cs::JCS_YCCK => Cs::JCS_CMYK,
            _ => Cs::JCS_RGB,
        };
        cinfo.dct_method = jpeg::J_DCT_METHOD::JDCT_ISLOW;
        jpeg::jpeg_start_decompress(&mut cinfo);
        let stride = cinfo.output_width as usize * cinfo.output_components as usize;
        let mut out = vec![0u8; stride * cinfo.output_height as usize];
        while cinfo.output_scanline < cinfo.output_height {
            let mut row = out
                .as_mut_ptr()
                .add(stride * cinfo.output_scanline as usize);
            jpeg::jpeg_read_scanlines(&mut cinfo, &mut row, 1);
        }
        jpeg::jpeg_finish_decompress(&mut cinfo);
        jpeg::jpeg_destroy_decompress(&mut cinfo);
        out
    }
}

fn main() -> std::io::Result<()> {
    for path in std::env::args().skip(1) {
        let pixels = decode_one(&std::fs::read(&path)?);
        let hash = pixels.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        println!("{path} {} bytes fnv1a {hash:016x}", pixels.len());
    }
    Ok(())
}
