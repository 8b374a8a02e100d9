//! kdmcse: multimodal sentence embeddings trained with KDMCSE.
//!
//! The library holds the method (model, losses, data, evaluation); the `kdmcse` binary and the
//! launcher build the training application on top of it.

pub mod check;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod embed;
pub mod eval;
pub mod export;
mod kernels;
pub mod loss;
pub mod model;
pub mod train;

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
