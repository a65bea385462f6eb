//! JPEG decoding with libjpeg-turbo itself (built from source by `turbojpeg-sys`), set up as Pillow
//! sets it up, so that decoded pixels are bit-identical to `PIL.Image.open(path).convert("RGB")`:
//! the accurate integer inverse DCT (`JDCT_ISLOW`) and fancy (smooth) chroma upsampling, both the
//! TurboJPEG defaults; grey images replicated to RGB; CMYK/YCCK images read with Adobe's inverted
//! polarity and converted with Pillow's formula `R = (255 - K) - (C * (255 - K)) / 255` (rounded
//! as Pillow's `MULDIV255`). Other Rust JPEG decoders round the IDCT and upsampling differently,
//! which moves some pixels by one or two levels.

use std::ffi::{c_int, CStr};

use image::RgbImage;
use turbojpeg_sys as tj;

use crate::decode::DecodeOptions;

/// Largest number of progressive scans accepted (a real progressive JPEG has about ten; hostile
/// files with thousands of tiny scans make decoding quadratic).
const MAX_SCANS: c_int = 1000;

/// A TurboJPEG decompressor instance, destroyed on drop.
struct Handle(tj::tjhandle);

impl Handle {
    fn new() -> Result<Self, String> {
        // SAFETY: tj3Init has no preconditions; it returns NULL on failure, checked below.
        let ptr = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if ptr.is_null() {
            return Err("cannot initialise the libjpeg-turbo decompressor".into());
        }
        Ok(Self(ptr))
    }

    fn set(&mut self, param: tj::TJPARAM, value: c_int) -> Result<(), String> {
        // SAFETY: self.0 is a live handle from tj3Init (destroyed only in Drop).
        if unsafe { tj::tj3Set(self.0, param as c_int, value) } != 0 {
            return Err(self.error());
        }
        Ok(())
    }

    fn get(&mut self, param: tj::TJPARAM) -> c_int {
        // SAFETY: self.0 is a live handle from tj3Init.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }

    /// The message of the last error, and whether it was only a warning (the output is complete).
    fn last_error(&mut self) -> (String, bool) {
        // SAFETY: self.0 is live; tj3GetErrorStr returns a pointer to a NUL-terminated string owned
        // by the handle (or a static one), valid until the next call on the handle; it is copied
        // out immediately.
        let msg = unsafe {
            let p = tj::tj3GetErrorStr(self.0);
            if p.is_null() {
                "unknown libjpeg-turbo error".to_string()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        // SAFETY: self.0 is live.
        let code = unsafe { tj::tj3GetErrorCode(self.0) };
        (msg, code == tj::TJERR_TJERR_WARNING as c_int)
    }

    fn error(&mut self) -> String {
        self.last_error().0
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: self.0 came from tj3Init and is destroyed exactly once, here.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

/// What the header says about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JpegHeader {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Colour space of the compressed data (TurboJPEG's `TJCS_*`).
    colorspace: c_int,
}

fn read_header(h: &mut Handle, bytes: &[u8]) -> Result<JpegHeader, String> {
    // SAFETY: h.0 is live; the pointer/length pair describes `bytes`, which outlives the call and
    // is only read.
    let rc = unsafe { tj::tj3DecompressHeader(h.0, bytes.as_ptr(), bytes.len() as tj::size_t) };
    if rc != 0 {
        let (msg, warning) = h.last_error();
        if !warning {
            return Err(msg);
        }
    }
    let precision = h.get(tj::TJPARAM_TJPARAM_PRECISION);
    if precision != 8 {
        return Err(format!(
            "{precision}-bit JPEG samples are not supported (8-bit only, as Pillow)"
        ));
    }
    let (w, hgt) = (
        h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH),
        h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    if w <= 0 || hgt <= 0 {
        return Err(format!("invalid JPEG dimensions {w}x{hgt}"));
    }
    Ok(JpegHeader {
        width: w as u32,
        height: hgt as u32,
        colorspace: h.get(tj::TJPARAM_TJPARAM_COLORSPACE),
    })
}

/// Decode a JPEG held in memory to RGB as Pillow does. The header is checked against `opts`
/// before any pixel buffer is allocated; libjpeg-turbo's own working memory is capped at
/// `opts.max_alloc` and progressive files at [`MAX_SCANS`] scans. Corrupt-data warnings (extra
/// bytes before a marker...) do not fail the decode, as in Pillow.
pub(crate) fn decode(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage, String> {
    let mut h = Handle::new()?;
    let max_mb = (opts.max_alloc >> 20).clamp(1, c_int::MAX as u64) as c_int;
    h.set(tj::TJPARAM_TJPARAM_MAXMEMORY, max_mb)?;
    h.set(tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_SCANS)?;
    let header = read_header(&mut h, bytes)?;
    let (w, hgt) = (header.width, header.height);
    if w > opts.max_side || hgt > opts.max_side || w as u64 * hgt as u64 > opts.max_pixels {
        return Err(format!(
            "{w}x{hgt} exceeds the decoding limits (max side {}, max {} pixels)",
            opts.max_side, opts.max_pixels
        ));
    }
    let (format, channels) = match header.colorspace as tj::TJCS {
        tj::TJCS_TJCS_GRAY => (tj::TJPF_TJPF_GRAY, 1usize),
        tj::TJCS_TJCS_CMYK | tj::TJCS_TJCS_YCCK => (tj::TJPF_TJPF_CMYK, 4),
        _ => (tj::TJPF_TJPF_RGB, 3),
    };
    let pitch = w as usize * channels;
    let len = pitch * hgt as usize;
    if len as u64 > opts.max_alloc {
        return Err(format!(
            "decoding needs {len} bytes, over the {} byte limit",
            opts.max_alloc
        ));
    }
    let pitch_c =
        c_int::try_from(pitch).map_err(|_| format!("row of {pitch} bytes is too long"))?;
    let mut buf = vec![0u8; len];
    // SAFETY: h.0 is live; `bytes` is valid for reads of its length; `buf` holds exactly
    // pitch * height bytes, the size TurboJPEG writes for an unscaled image of the header's
    // dimensions in `format` (`channels` bytes per pixel) with this pitch.
    let rc = unsafe {
        tj::tj3Decompress8(
            h.0,
            bytes.as_ptr(),
            bytes.len() as tj::size_t,
            buf.as_mut_ptr(),
            pitch_c,
            format as c_int,
        )
    };
    if rc != 0 {
        let (msg, warning) = h.last_error();
        if !warning {
            return Err(msg);
        }
    }
    let rgb = match channels {
        3 => buf,
        1 => buf.iter().flat_map(|&g| [g, g, g]).collect(),
        _ => buf.chunks_exact(4).flat_map(cmyk_to_rgb).collect(),
    };
    RgbImage::from_raw(w, hgt, rgb).ok_or_else(|| "decoded buffer has the wrong size".into())
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
