//! kdmcse's own CUDA kernels (`*.cu` beside this file: dropout masks, the fused training ops,
//! AdamW updates), compiled at run time with NVRTC, once per process and module, and loaded onto
//! candle's CUDA device. Each kernel does exactly what its CPU twin does; the tests build the `.cu`
//! files for the host (one thread doing every element) and compare them with the CPU code, so the
//! arithmetic is checked on machines without a GPU.

/// A kernel source: its module name and CUDA C++ text.
#[cfg(any(feature = "cuda", test))]
#[derive(Clone, Copy)]
pub(crate) struct Module {
    name: &'static str,
    source: &'static str,
}

#[cfg(any(feature = "cuda", test))]
pub(crate) const DROPOUT: Module = Module { name: "kdmcse_dropout", source: include_str!("dropout.cu") };
#[cfg(any(feature = "cuda", test))]
pub(crate) const OPS: Module = Module { name: "kdmcse_ops", source: include_str!("ops.cu") };
#[cfg(any(feature = "cuda", test))]
pub(crate) const ADAMW: Module = Module { name: "kdmcse_adamw", source: include_str!("adamw.cu") };

/// One kernel of a module, loaded on a device, with the device's stream to launch on.
#[cfg(feature = "cuda")]
pub(crate) struct Kernel {
    name: String,
    function: candle_core::cuda_backend::cudarc::driver::CudaFunction,
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
}

#[cfg(feature = "cuda")]
impl Kernel {
    /// `kernel` of `module`, compiled (first use in this process only) and loaded on `device`.
    pub(crate) fn load(
        device: &candle_core::CudaDevice,
        module: Module,
        kernel: &str,
    ) -> candle_core::Result<Self> {
        let function =
            device.get_or_load_custom_func(kernel, module.name, ptx(module)?)?.into_cuda_function();
        Ok(Self { name: format!("{}::{kernel}", module.name), function, stream: device.cuda_stream() })
    }

    /// An argument list to push the kernel's parameters onto, in its signature's order.
    pub(crate) fn args(&self) -> candle_core::cuda_backend::cudarc::driver::LaunchArgs<'_> {
        self.stream.launch_builder(&self.function)
    }

    /// Launches the kernel with `args` (from [`Self::args`]).
    ///
    /// # Safety
    /// `args` must match the kernel's signature in its `.cu` file, and every buffer must hold the
    /// elements the kernel touches under `config`.
    pub(crate) unsafe fn launch(
        &self,
        mut args: candle_core::cuda_backend::cudarc::driver::LaunchArgs<'_>,
        config: candle_core::cuda_backend::cudarc::driver::LaunchConfig,
    ) -> candle_core::Result<()> {
        unsafe { args.launch(config) }
            .map_err(|e| candle_core::Error::Cuda(format!("{}: {e}", self.name).into()))?;
        Ok(())
    }
}

/// The PTX of `module`, compiled with NVRTC on first use and kept for the process's lifetime
/// (launches look it up on every call).
#[cfg(feature = "cuda")]
fn ptx(module: Module) -> candle_core::Result<&'static str> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    static PTX: OnceLock<Mutex<HashMap<&'static str, &'static str>>> = OnceLock::new();
    let mut cache = PTX.get_or_init(Default::default).lock().expect("PTX cache lock");
    if let Some(ptx) = cache.get(module.name) {
        return Ok(ptx);
    }
    let ptx = candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(module.source)
        .map_err(|e| candle_core::Error::Msg(format!("NVRTC, compiling {}: {e}", module.name)))?
        .to_src();
    let ptx: &'static str = Box::leak(ptx.into_boxed_str());
    cache.insert(module.name, ptx);
    Ok(ptx)
}

#[cfg(test)]
pub(crate) mod host {
    //! The kernels built for the host: `__global__` functions become plain functions run by a
    //! single "thread" whose grid-stride loop covers every element.

    use std::path::{Path, PathBuf};

    /// Compiles `main` (C++ calling the kernels of `module`) into an executable in `dir`.
    pub(crate) fn compile(dir: &Path, module: super::Module, main: &str) -> PathBuf {
        let source = dir.join("harness.cpp");
        let shim = "#include <cmath>\n#include <cstdio>\n#include <cstdlib>\n#include <cstring>\n#include <vector>\n\
                    #define __global__\n#define __device__\n#define __forceinline__ inline\n#define __shared__ static\n#define __syncthreads()\n\
                    struct Dim { unsigned int x; };\n\
                    static const Dim blockIdx{0}, threadIdx{0}, blockDim{1}, gridDim{1};\n";
        std::fs::write(&source, format!("{shim}{}\n{main}", module.source)).unwrap();
        let exe = dir.join("harness");
        let status = std::process::Command::new("c++")
            .args(["-O1", "-std=c++17", "-o"])
            .arg(&exe)
            .arg(&source)
            .status()
            .expect("a C++ compiler (c++) on PATH");
        assert!(status.success(), "compiling {} for the host", module.name);
        exe
    }
}
