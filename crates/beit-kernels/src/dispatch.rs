//! The two run-time choices every op makes: fused kernel or plain composition (the
//! `BEIT_FUSED_OPS` switch, the device and the dtype), and which instruction set the vectorised
//! kernels are compiled for (AVX-512, AVX2 + FMA, NEON or the baseline target), detected once.

use std::sync::OnceLock;

use candle::{DType, Tensor};

/// Whether the fused kernels are in use: yes unless the environment sets `BEIT_FUSED_OPS=0`
/// (read once), which restores the plain compositions to measure what the kernels gain or to rule
/// them out when debugging.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    if let Some(on) = OVERRIDE.with(|o| o.get()) {
        return on;
    }
    *ON.get_or_init(|| std::env::var("BEIT_FUSED_OPS").map_or(true, |v| v.trim() != "0"))
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the kernels switched on or off on this thread (the model is built and run on the
/// calling thread), e.g. to compare a model's gradients with and without them.
pub fn with_fused_ops<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let previous = OVERRIDE.with(|o| o.replace(Some(on)));
    let out = f();
    OVERRIDE.with(|o| o.set(previous));
    out
}

/// True when the kernels are enabled, matrix products are not lowered to bf16
/// ([`crate::with_matmul_dtype`]) and every tensor is f32 on the CPU: the case they handle.
pub fn fused_cpu_f32(ts: &[&Tensor]) -> bool {
    enabled()
        && crate::matmul_dtype() == DType::F32
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// An instruction set the vectorised kernels ([`crate::vmath`] and the row loops) are compiled
/// for. Every path computes the same IEEE operations in the same order (no fused multiply-add is
/// introduced), so they agree bit for bit; they differ in vector width only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The baseline of the compilation target (SSE2 on x86-64, NEON on aarch64).
    Scalar,
    /// x86-64 with AVX2 and FMA (8 f32 lanes).
    Avx2,
    /// x86-64 with AVX-512 F/DQ/BW/VL (16 f32 lanes).
    Avx512,
    /// aarch64 with NEON (4 f32 lanes), compiled with the feature enabled explicitly.
    Neon,
}

impl Isa {
    /// Every path, in order of preference from the last.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Neon, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        static CPU: OnceLock<[bool; 4]> = OnceLock::new();
        let flags = CPU.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            let (avx2, avx512) = {
                let avx2 =
                    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
                let avx512 = avx2
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl");
                (avx2, avx512)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (avx2, avx512) = (false, false);
            #[cfg(target_arch = "aarch64")]
            let neon = std::arch::is_aarch64_feature_detected!("neon");
            #[cfg(not(target_arch = "aarch64"))]
            let neon = false;
            [true, avx2, avx512, neon]
        });
        match self {
            Isa::Scalar => flags[0],
            Isa::Avx2 => flags[1],
            Isa::Avx512 => flags[2],
            Isa::Neon => flags[3],
        }
    }

    /// The name used by `BEIT_KERNELS_ISA` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Parse a name of [`Isa::name`].
    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(name.trim()))
    }

    /// The best path this CPU supports.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| i.supported())
            .unwrap_or(Isa::Scalar)
    }
}

/// The path the kernels take: the best one the CPU supports, or the one named by
/// `BEIT_KERNELS_ISA` (`scalar`, `avx2`, `avx512`, `neon`; read once) when the CPU supports it, to
/// measure what each path gains. An unknown or unsupported name is ignored.
pub fn isa() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        std::env::var("BEIT_KERNELS_ISA")
            .ok()
            .and_then(|v| Isa::parse(&v))
            .filter(|i| i.supported())
            .unwrap_or_else(Isa::best)
    })
}

/// Defines `pub fn $name(args)`, which runs `$body` compiled for the path [`isa`] chose, and
/// `pub(crate) fn $on(isa, args)`, which runs it compiled for the given path (the baseline when
/// the CPU does not support that path), so that tests can force each one.
macro_rules! multiversion {
    ($(#[$doc:meta])* fn $name:ident / $on:ident ($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            $on($crate::dispatch::isa(), $($arg),*)
        }

        $(#[$doc])*
        ///
        /// Compiled for `isa` when the CPU supports it, for the baseline target otherwise.
        #[allow(dead_code)]
        pub(crate) fn $on(isa: $crate::dispatch::Isa, $($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body

            // `unsafe fn`: safe functions with `target_feature` need Rust 1.86 (the crate's
            // minimum is 1.85). Callable only where the features are present (see below).
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                body($($arg),*)
            }

            #[cfg(target_arch = "aarch64")]
            #[target_feature(enable = "neon")]
            unsafe fn neon($($arg: $ty),*) {
                body($($arg),*)
            }

            match isa {
                #[cfg(target_arch = "x86_64")]
                $crate::dispatch::Isa::Avx512 if isa.supported() => {
                    // SAFETY: the CPU supports every feature `avx512` was compiled with (checked
                    // by `supported` just above).
                    unsafe { avx512($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                $crate::dispatch::Isa::Avx2 if isa.supported() => {
                    // SAFETY: the CPU supports AVX2 and FMA (checked by `supported`).
                    unsafe { avx2($($arg),*) }
                }
                #[cfg(target_arch = "aarch64")]
                $crate::dispatch::Isa::Neon if isa.supported() => {
                    // SAFETY: the CPU supports NEON (checked by `supported`).
                    unsafe { neon($($arg),*) }
                }
                _ => body($($arg),*),
            }
        }
    };
}

pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chosen_path_is_supported_and_names_round_trip() {
        assert!(isa().supported());
        assert!(Isa::best().supported());
        assert!(Isa::Scalar.supported());
        for i in Isa::ALL {
            assert_eq!(Isa::parse(i.name()), Some(i));
        }
        assert_eq!(Isa::parse("sse9"), None);
        #[cfg(target_arch = "x86_64")]
        assert!(!Isa::Neon.supported());
        #[cfg(target_arch = "aarch64")]
        assert!(!Isa::Avx2.supported() && Isa::Neon.supported());
    }
}
