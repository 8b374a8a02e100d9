//! Which x86 vector extensions the CPU kernels run with, chosen once per process: AVX-512 with
//! AMX's bf16 tiles, AVX-512 (x86-64-v4), AVX2 with FMA (v3), or the x86-64 baseline (SSE2), the
//! best this CPU has unless `KDMCSE_ISA` names a lower one. A kernel's body is an
//! `#[inline(always)]` function or closure; [`Isa::run`] calls it inside a function compiled for
//! the level, so each level gets its own machine code, and all of them compute the same bits:
//! Rust neither reorders nor contracts float arithmetic, so wider vectors change only how many
//! elements one instruction handles. The one exception is AMX's: bf16 products on its tiles sum
//! in the tiles' order, so their f32 sums agree with the other levels' to rounding and the bf16
//! results to within one bf16 step.

use std::sync::atomic::{AtomicU8, Ordering};

/// A level of x86 vector extensions, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Baseline,
    Avx2,
    Avx512,
    /// AVX-512, and bf16 products on AMX tiles.
    Amx,
}

/// The environment variable that caps the level.
pub const ISA_ENV: &str = "KDMCSE_ISA";

/// The selected level plus one; 0 until first read.
static SELECTED: AtomicU8 = AtomicU8::new(0);

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Baseline, Isa::Avx2, Isa::Avx512, Isa::Amx];

    /// `KDMCSE_ISA`'s spelling of the level.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// The best level this CPU runs.
    pub fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512dq") && has!("avx512bw") && has!("avx512vl") {
                return if super::matmul::amx_usable() { Isa::Amx } else { Isa::Avx512 };
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// The level `KDMCSE_ISA` asks for (at most [`Isa::detected`]; unset: detected), or an
    /// error naming the variable and what it accepts.
    pub fn from_env() -> Result<Isa, String> {
        let detected = Isa::detected();
        match std::env::var(ISA_ENV) {
            Err(_) => Ok(detected),
            Ok(value) => match Isa::ALL.into_iter().find(|isa| isa.name() == value) {
                Some(isa) => Ok(isa.min(detected)),
                None => Err(format!("{ISA_ENV}={value:?}: expected baseline, avx2, avx512 or amx")),
            },
        }
    }

    /// The level the kernels run with: [`Isa::from_env`] on first use (the binaries check the
    /// variable at start, so a bad value is refused there before any kernel runs).
    pub fn selected() -> Isa {
        match SELECTED.load(Ordering::Relaxed) {
            0 => Isa::select(Isa::from_env().unwrap_or_else(|e| panic!("{e}"))),
            n => Isa::ALL[n as usize - 1],
        }
    }

    /// Makes `isa` (at most [`Isa::detected`]) the level the kernels run with, and returns it.
    /// Any level gives the same results, so threads that see the change mid-kernel stay correct.
    pub fn select(isa: Isa) -> Isa {
        let isa = isa.min(Isa::detected());
        SELECTED.store(isa as u8 + 1, Ordering::Relaxed);
        isa
    }

    /// The levels this CPU runs.
    pub fn available() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|&isa| isa <= Isa::detected())
    }

    /// `kernel()` compiled for this level (pass it as `#[inline(always)] || ...`, so that its
    /// body is compiled into the level's function).
    #[inline(always)]
    pub fn run<R>(self, kernel: impl FnOnce() -> R) -> R {
        #[cfg(target_arch = "x86_64")]
        match self.min(Isa::detected_cached()) {
            // SAFETY: the CPU has the level's features (at most the detected level runs).
            Isa::Amx | Isa::Avx512 => return unsafe { x86::avx512(kernel) },
            Isa::Avx2 => return unsafe { x86::avx2(kernel) },
            Isa::Baseline => {}
        }
        kernel()
    }

    /// [`Isa::detected`], read once.
    fn detected_cached() -> Isa {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(Isa::detected)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn avx512<R>(kernel: impl FnOnce() -> R) -> R {
        kernel()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<R>(kernel: impl FnOnce() -> R) -> R {
        kernel()
    }
}
