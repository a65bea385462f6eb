//! JPEG decoding with a libjpeg-turbo-lineage decoder (MozJPEG 4, built from source by the `cc`
//! crate through `mozjpeg-sys`), set up as Pillow sets up libjpeg-turbo, so that decoded pixels are
//! bit-identical to `PIL.Image.open(path).convert("RGB")`: the accurate integer inverse DCT
//! (`JDCT_ISLOW`) and fancy (smooth) chroma upsampling, both the library defaults; grey images
//! replicated to RGB; CMYK/YCCK images read with Adobe's inverted polarity and converted with
//! Pillow's formula `R = (255 - K) - (C * (255 - K)) / 255` (rounded as Pillow's `MULDIV255`).
//! Other Rust JPEG decoders round the IDCT and upsampling differently, which moves some pixels by
//! one or two levels. The portable C code is the default; the `jpeg-simd` feature assembles the
//! SIMD kernels with nasm, which give the same pixels (libjpeg-turbo's SIMD IDCT and upsamplers
//! are exact).
//!
//! libjpeg reports a fatal error through `error_exit`, which must not return. Ours unwinds with
//! [`std::panic::resume_unwind`] (the C code is compiled with unwinding tables, and the callbacks
//! use the `C-unwind` ABI); [`decode`] catches it and returns the message. `resume_unwind` does
//! not run the panic hook, so a corrupt image prints nothing.

use std::ffi::{c_int, c_long, c_ulong};
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use image::RgbImage;
use mozjpeg_sys as jpeg;
use mozjpeg_sys::J_COLOR_SPACE as Cs;

use crate::limits::DecodeOptions;

/// Largest number of progressive scans accepted (a real progressive JPEG has about ten; hostile
/// files with thousands of tiny scans make decoding quadratic).
const MAX_SCANS: c_int = 1000;

/// The payload `error_exit` unwinds with: libjpeg's formatted message.
struct JpegError(String);

/// libjpeg's message for the error or warning last raised on `cinfo`.
///
/// # Safety
/// `cinfo.err` must point to a live error manager set up by `jpeg_std_error`.
unsafe fn message(cinfo: &mut jpeg::jpeg_common_struct) -> String {
    // libjpeg's JMSG_LENGTH_MAX: `format_message` writes at most this many bytes.
    let mut buf = [0u8; 200];
    // SAFETY: the caller guarantees `cinfo.err` is live; `format_message` was set by
    // jpeg_std_error.
    let fmt = unsafe { (*cinfo.err).format_message };
    let Some(fmt) = fmt else {
        return "libjpeg error".into();
    };
    type Writer = unsafe extern "C-unwind" fn(&mut jpeg::jpeg_common_struct, *mut u8);
    // SAFETY: the binding declares the buffer as `&[u8; 80]`, but the C function writes up to
    // JMSG_LENGTH_MAX bytes into it. Both signatures take two thin pointers with the same ABI;
    // calling through a writable pointer keeps the write visible to Rust and sized right.
    let fmt: Writer = unsafe { std::mem::transmute(fmt) };
    // SAFETY: `buf` is writable for JMSG_LENGTH_MAX bytes.
    unsafe { fmt(cinfo, buf.as_mut_ptr()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `error_exit`: unwind out of libjpeg with its message (never returns).
unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg::jpeg_common_struct) {
    // SAFETY: libjpeg calls this with the struct whose `err` we installed in `Decompressor::new`.
    let msg = unsafe { message(cinfo) };
    resume_unwind(Box::new(JpegError(msg)));
}

/// `emit_message`: corrupt-data warnings (extra bytes before a marker...) do not fail the decode
/// and print nothing, as in Pillow; trace messages are dropped too.
unsafe extern "C-unwind" fn ignore_message(_cinfo: &mut jpeg::jpeg_common_struct, _level: c_int) {}

/// `progress_monitor`: refuse progressive files with more than [`MAX_SCANS`] scans.
unsafe extern "C-unwind" fn limit_scans(cinfo: &mut jpeg::jpeg_common_struct) {
    if cinfo.is_decompressor == 0 {
        return;
    }
    let ptr = cinfo as *mut jpeg::jpeg_common_struct as *const jpeg::jpeg_decompress_struct;
    // SAFETY: `is_decompressor` says this common struct is the head of a decompress struct
    // (`common` is its first field, `repr(C)`).
    let scans = unsafe { (*ptr).input_scan_number };
    if scans > MAX_SCANS {
        resume_unwind(Box::new(JpegError(format!(
            "progressive JPEG with over {MAX_SCANS} scans refused"
        ))));
    }
}

/// A libjpeg decompressor reading from a byte slice, destroyed on drop. Boxed, since libjpeg keeps
/// pointers to its error and progress managers.
struct Decompressor<'a> {
    cinfo: jpeg::jpeg_decompress_struct,
    err: jpeg::jpeg_error_mgr,
    progress: jpeg::jpeg_progress_mgr,
    _bytes: std::marker::PhantomData<&'a [u8]>,
}

impl<'a> Decompressor<'a> {
    /// Create a decompressor over `bytes` with `max_alloc` bytes of working memory at most. Runs
    /// inside [`decode`]'s `catch_unwind` (creation itself can raise `error_exit`).
    fn new(bytes: &'a [u8], max_alloc: u64) -> Box<Self> {
        // SAFETY: all-zero is a valid bit pattern for these plain C structs (null pointers,
        // `None` callbacks, zero integers); each is initialised by libjpeg before use below.
        let mut d: Box<Self> = unsafe { Box::new(MaybeUninit::zeroed().assume_init()) };
        // SAFETY: `d.err` is a live, exclusively borrowed error manager; jpeg_std_error fills it.
        unsafe { jpeg::jpeg_std_error(&mut d.err) };
        d.err.error_exit = Some(error_exit);
        d.err.emit_message = Some(ignore_message);
        d.progress.progress_monitor = Some(limit_scans);
        d.cinfo.common.err = &mut d.err;
        // SAFETY: `cinfo.common.err` points into the same box, which does not move while the
        // decompressor lives; jpeg_create_decompress initialises the rest of `cinfo`.
        unsafe { jpeg::jpeg_create_decompress(&mut d.cinfo) };
        d.cinfo.common.progress = &mut d.progress;
        // SAFETY: `mem` was set by jpeg_create_decompress and lives until jpeg_destroy.
        unsafe {
            (*d.cinfo.common.mem).max_memory_to_use = max_alloc.min(c_long::MAX as u64) as c_long
        };
        // SAFETY: `bytes` outlives the decompressor (lifetime 'a) and is only read.
        unsafe { jpeg::jpeg_mem_src(&mut d.cinfo, bytes.as_ptr(), bytes.len() as c_ulong) };
        d
    }
}

impl Drop for Decompressor<'_> {
    fn drop(&mut self) {
        // SAFETY: `cinfo` was created by jpeg_create_decompress (or is still all-zero with a null
        // `mem`, which jpeg_destroy tolerates) and is destroyed exactly once, here. Destroying
        // after an error raised mid-decode is libjpeg's documented way to clean up.
        unsafe { jpeg::jpeg_destroy_decompress(&mut self.cinfo) }
    }
}

/// Decode a JPEG held in memory to RGB as Pillow does. The header is checked against `opts`
/// before any pixel buffer is allocated; libjpeg's own working memory is capped at
/// `opts.max_alloc` and progressive files at [`MAX_SCANS`] scans. Corrupt-data warnings (extra
/// bytes before a marker...) do not fail the decode, as in Pillow.
pub(crate) fn decode(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty JPEG data".into());
    }
    match catch_unwind(AssertUnwindSafe(|| decode_unwinding(bytes, opts))) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<JpegError>() {
            Ok(e) => Err(e.0),
            // A panic that is not libjpeg's (a bug of ours): keep unwinding.
            Err(other) => resume_unwind(other),
        },
    }
}

/// The body of [`decode`]; libjpeg errors unwind out of it as [`JpegError`].
fn decode_unwinding(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage, String> {
    let mut d = Decompressor::new(bytes, opts.max_alloc);
    // SAFETY: `d.cinfo` is a live decompressor with a memory source; errors unwind.
    unsafe { jpeg::jpeg_read_header(&mut d.cinfo, 1) };
    let (w, h) = (d.cinfo.image_width, d.cinfo.image_height);
    if w == 0 || h == 0 {
        return Err(format!("invalid JPEG dimensions {w}x{h}"));
    }
    if w > opts.max_side || h > opts.max_side || w as u64 * h as u64 > opts.max_pixels {
        return Err(format!(
            "{w}x{h} exceeds the decoding limits (max side {}, max {} pixels)",
            opts.max_side, opts.max_pixels
        ));
    }
    let (out_space, channels) = match d.cinfo.jpeg_color_space {
        Cs::JCS_GRAYSCALE => (Cs::JCS_GRAYSCALE, 1usize),
        Cs::JCS_CMYK | Cs::JCS_YCCK => (Cs::JCS_CMYK, 4),
        _ => (Cs::JCS_RGB, 3),
    };
    d.cinfo.out_color_space = out_space;
    d.cinfo.dct_method = jpeg::J_DCT_METHOD::JDCT_ISLOW;
    d.cinfo.do_fancy_upsampling = 1;
    let pitch = w as usize * channels;
    let len = pitch * h as usize;
    if len as u64 > opts.max_alloc {
        return Err(format!(
            "decoding needs {len} bytes, over the {} byte limit",
            opts.max_alloc
        ));
    }
    // SAFETY: the header has been read and the output parameters set; errors unwind.
    unsafe { jpeg::jpeg_start_decompress(&mut d.cinfo) };
    if d.cinfo.output_components as usize != channels
        || d.cinfo.output_width != w
        || d.cinfo.output_height != h
    {
        return Err("decoder output does not match the header".into());
    }
    let mut buf = vec![0u8; len];
    while d.cinfo.output_scanline < h {
        let row = d.cinfo.output_scanline as usize;
        let mut ptr = buf[row * pitch..].as_mut_ptr();
        // SAFETY: `ptr` points at row `row` of `buf`, which has `pitch` = width * components
        // writable bytes, exactly one output scanline; one row is requested.
        let got = unsafe { jpeg::jpeg_read_scanlines(&mut d.cinfo, &mut ptr, 1) };
        if got == 0 {
            return Err("JPEG data ended before the last row".into());
        }
    }
    // SAFETY: every scanline has been read; errors unwind.
    unsafe { jpeg::jpeg_finish_decompress(&mut d.cinfo) };
    drop(d);
    let rgb = match channels {
        3 => buf,
        1 => buf.iter().flat_map(|&g| [g, g, g]).collect(),
        _ => buf.chunks_exact(4).flat_map(cmyk_to_rgb).collect(),
    };
    RgbImage::from_raw(w, h, rgb).ok_or_else(|| "decoded buffer has the wrong size".into())
}

/// One stored (Adobe-inverted) CMYK pixel to RGB, as Pillow's `CMYK;I` unpacking followed by its
/// `cmyk2rgb`: `C = 255 - stored`, `R = clip((255 - K) - C * (255 - K) / 255)` with the division
/// rounded like `MULDIV255`.
fn cmyk_to_rgb(px: &[u8]) -> [u8; 3] {
    let nk = px[3] as i32; // 255 - K, K = 255 - stored
    let ch = |stored: u8| {
        let c = 255 - stored as i32;
        let t = c * nk + 128;
        let prod = ((t >> 8) + t) >> 8;
        (nk - prod).clamp(0, 255) as u8
    };
    [ch(px[0]), ch(px[1]), ch(px[2])]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_matches_pillow_on_corners() {
        // Stored 255 = no ink: white; stored K 0 = full black.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        // Full cyan, no black: red channel 0.
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255]), [0, 255, 255]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let opts = DecodeOptions::default();
        assert!(decode(b"", &opts).is_err());
        assert!(decode(&[0xFF, 0xD8, 0xFF, 0xD9], &opts).is_err());
        assert!(decode(&[0xFF, 0xD8, 0xFF, 0xC0, 0, 0, 0, 0], &opts).is_err());
    }
}
