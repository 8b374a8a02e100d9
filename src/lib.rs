//! kdmcse: multimodal sentence embeddings trained with KDMCSE.
//!
//! The library holds the method (`model`, `loss`, `data`, `eval`, the fused `ops` and their CUDA
//! `kernels`), the run's configuration (`config`), the machinery of distributed training
//! (`dist`, `checkpoint` with the saved run's rules, `device`), what users take away (`export`,
//! `model_card`, `embed`), and the training application built on them (`train`, which nothing
//! else in the library uses but `check`).
//! The `kdmcse` binary is a thin command line over it; `kdmcse-launch` (launcher/) starts its
//! workers.

pub mod check;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod embed;
pub mod eval;
pub mod events;
pub mod export;
pub mod hub;
mod kernels;
pub mod loss;
pub mod model;
pub mod model_card;
pub mod ops;
pub mod tensorboard;
pub mod train;

/// What `--version` prints: the version, the git revision built from, and whether the build
/// has the `cuda` feature (GPUs and NCCL) or runs on CPUs only.
#[cfg(feature = "cuda")]
pub const VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("KDMCSE_GIT_REVISION"), ", CUDA build)");
#[cfg(not(feature = "cuda"))]
pub const VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("KDMCSE_GIT_REVISION"), ", CPU build)");

/// An error in what the user gave -- the configuration, a data or model file, a checkpoint that
/// does not fit the run, a run that diverges -- which running again cannot mend. `kdmcse` exits
/// with `dist::contract::exit::INPUT_ERROR` on it, so `kdmcse-launch` and Kubernetes fail at
/// once instead of restarting.
#[derive(Debug)]
pub struct InputError(String);

impl InputError {
    /// `err` (with its whole context chain) as an input error.
    pub fn wrap(err: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(InputError(format!("{err:#}")))
    }

    /// Whether `err` is, or was caused by, an input error.
    pub fn is(err: &anyhow::Error) -> bool {
        err.chain().any(|cause| cause.is::<InputError>())
    }
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// The global allocator of kdmcse's binaries. A training step allocates and frees hundreds of MB
/// of activations; glibc's malloc hands large blocks back to the kernel and page-faults them in
/// again every step (a fifth of CPU step time). mimalloc, told by [`keep_freed_memory`] never to
/// purge, keeps them, like PyTorch's caching allocator.
pub type Allocator = mimalloc::MiMalloc;

/// Tells mimalloc to keep freed memory for reuse instead of returning it to the OS.
pub fn keep_freed_memory() {
    // `mi_option_purge_delay` (mimalloc.h; not exported by libmimalloc-sys); -1 = never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
